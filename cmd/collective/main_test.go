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
	"time"

	"collective/cmd/collective/internal/vmmexec"
	"collective/guest"
	"collective/internal/testenv"
)

// binary builds the collective command into a temporary folder, and
// then collective-vmm next to it, which run and restore exec: the tests
// run what make build builds.
func binary(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	p := filepath.Join(dir, "collective")
	for _, args := range [][]string{
		{"build", "-o", p, "."},
		{"build", "-tags", "vmm", "-o", filepath.Join(dir, vmmexec.Name), "."},
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
	testenv.RequireKVM(t)
	testenv.RequireCommand(t, "gcc")
	elf, err := guest.Build()
	if err != nil {
		t.Fatal(err)
	}
	bin := binary(t)
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

// TestRunExecsVMM checks that collective run becomes the collective-vmm
// next to it (the same process, so a signal reaches the VMM), and runs
// in-process, saying so, when collective-vmm is older than collective,
// and silently when there is none.
func TestRunExecsVMM(t *testing.T) {
	testenv.RequireKVM(t)
	testenv.RequireCommand(t, "gcc")
	elf, err := guest.Build()
	if err != nil {
		t.Fatal(err)
	}
	bin := binary(t)
	vmm := filepath.Join(filepath.Dir(bin), vmmexec.Name)

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
	if err != nil || exe != vmm {
		t.Errorf("the VMM process runs %q (%v), want %s", exe, err, vmm)
	}
	go io.Copy(io.Discard, out)
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Errorf("after SIGTERM: %v, want status 0", err)
	}

	hello := func() (string, string) {
		t.Helper()
		code, stdout, stderr := run(t, bin, "", "run", "--kernel", elf, "--append", "hello", "--mem", "64M")
		if code != 0 || !strings.Contains(stdout, "collective-guest: hello") {
			t.Fatalf("hello: status %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
		}
		return stdout, stderr
	}
	old := time.Now().Add(-time.Hour)
	if err := os.Chtimes(vmm, old, old); err != nil {
		t.Fatal(err)
	}
	if _, stderr := hello(); !strings.Contains(stderr, "is older than") {
		t.Errorf("a stale collective-vmm: stderr %q, want it said", stderr)
	}
	os.Remove(vmm)
	if _, stderr := hello(); stderr != "" {
		t.Errorf("without collective-vmm: stderr %q, want none", stderr)
	}
}

// TestRunPipedInput drives the guest's serial input from a pipe, as
// `printf 'uname -r\npoweroff\n' | collective run` drives a Linux shell:
// every byte must arrive, however early it is written.
func TestRunPipedInput(t *testing.T) {
	testenv.RequireKVM(t)
	testenv.RequireCommand(t, "gcc")
	elf, err := guest.Build()
	if err != nil {
		t.Fatal(err)
	}
	bin := binary(t)
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
