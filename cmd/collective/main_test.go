package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"collective/internal/testenv"
)

// binary builds, as make build does, collective (-tags vmm: run and
// restore) into a temporary folder and collective-tools (every command)
// next to it, which collective execs for the other commands.
func binary(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	p := filepath.Join(dir, "collective")
	for _, args := range [][]string{
		{"build", "-tags", "vmm", "-o", p, "."},
		{"build", "-o", filepath.Join(dir, toolsName), "."},
	} {
		out, err := exec.Command("go", args...).CombinedOutput()
		if err != nil {
			t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return p
}

func run(t *testing.T, bin string, stdin string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	cmd.Stdin = strings.NewReader(stdin)
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatal(err)
	}
	return code, o.String(), e.String()
}

func TestRunRefusesCleanly(t *testing.T) {
	bin := binary(t)
	dir := t.TempDir()
	text := filepath.Join(dir, "notes.txt")
	os.WriteFile(text, []byte("not a kernel\n"), 0o644)
	for _, tc := range []struct {
		name string
		args []string
		kvm  bool
	}{
		{"no kernel", []string{"run"}, false},
		{"unknown flag", []string{"run", "--bogus"}, false},
		{"bad mem", []string{"run", "--kernel", text, "--mem", "lots"}, false},
		{"bad serial", []string{"run", "--kernel", text, "--serial", "tcp:1"}, false},
		{"stray argument", []string{"run", "--kernel", text, "extra"}, false},
		{"missing kernel file", []string{"run", "--kernel", filepath.Join(dir, "none")}, false},
		{"not a kernel", []string{"run", "--kernel", text}, true},
		{"unknown command", []string{"fly"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.kvm {
				testenv.RequireKVM(t)
			}
			code, _, stderr := run(t, bin, "", tc.args...)
			if code != 2 {
				t.Errorf("exit status %d, want 2; stderr:\n%s", code, stderr)
			}
			if strings.Contains(stderr, "goroutine ") || strings.Contains(stderr, "panic") {
				t.Errorf("stack trace on stderr:\n%s", stderr)
			}
			if stderr == "" {
				t.Error("no message on stderr")
			}
		})
	}
}

func TestRunGuestExitStatus(t *testing.T) {
	elf, bin := guestAndBinary(t)
	code, stdout, stderr := run(t, bin, "", "run", "--kernel", elf, "--append", "hello", "--mem", "64M")
	if code != 0 || !strings.Contains(stdout, "collective-guest: hello") {
		t.Fatalf("hello: status %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	code, _, stderr = run(t, bin, "", "run", "--kernel", elf, "--append", "nonsense", "--mem", "64M", "--serial", "none")
	if code != 2 {
		t.Fatalf("unknown guest mode: status %d, want the guest's code 2\n%s", code, stderr)
	}
	logf := filepath.Join(t.TempDir(), "console.log")
	code, stdout, _ = run(t, bin, "", "run", "--kernel", elf, "--append", "hello", "--mem", "64M", "--serial", "file:"+logf)
	data, _ := os.ReadFile(logf)
	if code != 0 || stdout != "" || !strings.Contains(string(data), "hello") {
		t.Fatalf("--serial file: status %d, stdout %q, file %q", code, stdout, data)
	}
}

// TestTwoBuilds checks that collective run is the collective process
// itself (no exec: a signal reaches the VMM), that the commands it does
// not link run in the collective-tools next to it, with one clear line
// when that is missing, and that collective-tools runs run in-process.
func TestTwoBuilds(t *testing.T) {
	elf, bin := guestAndBinary(t)
	tools := filepath.Join(filepath.Dir(bin), toolsName)

	cmd := exec.Command(bin, "run", "--kernel", elf, "--append", "spin", "--mem", "64M")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	if _, err := bufio.NewReader(out).ReadString('\n'); err != nil {
		t.Fatalf("no serial output: %v", err)
	}
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", cmd.Process.Pid))
	if err != nil || exe != bin {
		t.Errorf("the VMM process runs %q (%v), want %s", exe, err, bin)
	}
	go io.Copy(io.Discard, out)
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Errorf("after SIGTERM: %v, want status 0", err)
	}

	for _, b := range []string{bin, tools} {
		code, stdout, stderr := run(t, b, "", "run", "--kernel", elf, "--append", "hello", "--mem", "64M")
		if code != 0 || !strings.Contains(stdout, "collective-guest: hello") {
			t.Fatalf("%s run hello: status %d\nstdout:\n%s\nstderr:\n%s", b, code, stdout, stderr)
		}
	}
	if code, _, stderr := run(t, bin, "", "bench", "-h"); code != 2 || !strings.Contains(stderr, "usage: collective bench") {
		t.Errorf("collective bench -h: status %d, stderr %q, want collective-tools's usage and 2", code, stderr)
	}
	if code, _, stderr := run(t, bin, "", "nonsense"); code != 2 || !strings.Contains(stderr, `unknown command "nonsense"`) {
		t.Errorf("collective nonsense: status %d, stderr %q", code, stderr)
	}
	os.Remove(tools)
	code, _, stderr := run(t, bin, "", "bench", "-h")
	if code != 1 || strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, "collective-tools") || !strings.Contains(stderr, "make build") {
		t.Errorf("collective bench -h without collective-tools: status %d, stderr %q, want 1 and one line saying how to build it", code, stderr)
	}
}

// TestRunPipedInput drives the guest's serial input from a pipe, as
// `printf 'uname -r\npoweroff\n' | collective run` drives a Linux shell:
// every byte must arrive, however early it is written.
func TestRunPipedInput(t *testing.T) {
	elf, bin := guestAndBinary(t)
	var in strings.Builder
	var want []string
	for i := 0; i < 200; i++ {
		line := strings.Repeat(string(rune('a'+i%26)), 1+i%60)
		in.WriteString(line + "\n")
		want = append(want, "echo: "+line)
	}
	in.WriteString("quit\n")
	code, stdout, stderr := run(t, bin, in.String(), "run", "--kernel", elf, "--append", "echo", "--mem", "64M")
	if code != 0 {
		t.Fatalf("status %d\n%s\n%s", code, stdout, stderr)
	}
	got := strings.Split(strings.ReplaceAll(stdout, "\r", ""), "\n")
	var echoed []string
	for _, l := range got {
		if strings.HasPrefix(l, "echo: ") && l != "echo: ready" && l != "echo: bye" {
			echoed = append(echoed, l)
		}
	}
	if strings.Join(echoed, "\n") != strings.Join(want, "\n") {
		t.Fatalf("echoed %d lines, want %d; output:\n%s", len(echoed), len(want), stdout)
	}
}

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
		ok   bool
	}{
		{"512M", 512 << 20, true}, {"2G", 2 << 30, true}, {"64MiB", 64 << 20, true},
		{"4096K", 4 << 20, true}, {"128", 128 << 20, true}, {"1gb", 1 << 30, true},
		{"", 0, false}, {"0", 0, false}, {"-1M", 0, false}, {"12Q", 0, false}, {"99999999T", 0, false},
	} {
		got, err := parseSize(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v", tc.in, got, err)
		}
	}
}

// guestAndBinary requires KVM and gcc, then builds the workload guest and
// the command: the preamble of every test that runs a guest through it.
func guestAndBinary(t *testing.T) (elf, bin string) {
	t.Helper()
	return testenv.WorkloadGuest(t), binary(t)
}
