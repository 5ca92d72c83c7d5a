package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"collective/internal/testenv"
)

// TestMakeRunPaths runs scripts/run.sh, what make run runs, with BIN set
// to a stand-in that records the command it is given instead of booting:
// the direct path (hardware KVM, NESTED=0) must ask collective run for
// the appliance that collective image build default reports, with MEM
// and ARGS passed on; the nested path (NESTED=1) must hand the same flags
// to collective nested --appliance. Unset, the script takes the nested
// path exactly when this host's KVM is kvm-pvm. Booting is covered by
// TestMakeRunNested below and by the e2e tests, which boot the appliance
// with collective run on L1's KVM (which boots stock kernels, as
// hardware KVM does).
func TestMakeRunPaths(t *testing.T) {
	testenv.RequireKVM(t)
	testenv.RequireCommand(t, "apt-get") // the appliance's kernel package
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		testenv.RequireCommand(t, "qemu-system-x86_64") // else the nested path installs it
	}
	bin := binary(t)
	dir := t.TempDir()
	record := filepath.Join(dir, "argv")
	stub := filepath.Join(dir, "collective")
	// image is answered by the real build (so the script parses its real
	// output); run and nested are recorded, one word per line.
	script := "#!/bin/sh\ncase $1 in\nrun|nested) printf '%s\\n' \"$@\" >" + record + "; exit 0 ;;\nesac\nexec " + bin + " \"$@\"\n"
	if err := os.WriteFile(stub, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	info, err := exec.Command(bin, "image", "build", "default").Output()
	if err != nil {
		t.Fatalf("collective image build default: %v", err)
	}
	field := func(name string) string {
		for _, l := range strings.Split(string(info), "\n") {
			if k, v, ok := strings.Cut(l, " "); ok && k == name {
				return strings.TrimSpace(v)
			}
		}
		t.Fatalf("image build default printed no %q line:\n%s", name, info)
		return ""
	}
	kernel, _, _ := strings.Cut(field("kernel"), " (")
	initrd, cmdline := field("initrd"), field("cmdline")

	_, pvm := os.Stat("/sys/module/kvm_pvm")
	nestedHere := pvm == nil
	for _, tc := range []struct {
		nested string // NESTED
		want   []string
	}{
		{"0", []string{"run", "--kernel", kernel, "--initrd", initrd, "--append", cmdline, "--mem", "256M", "--cpus", "2", "--disk", "d.img"}},
		{"1", []string{"nested", "--appliance", "--", "--mem", "256M", "--cpus", "2", "--disk", "d.img"}},
		{"", nil},
	} {
		want := tc.want
		if tc.nested == "" {
			want = []string{"run", "--kernel", kernel, "--initrd", initrd, "--append", cmdline, "--mem", "256M", "--cpus", "2", "--disk", "d.img"}
			if nestedHere {
				want = []string{"nested", "--appliance", "--", "--mem", "256M", "--cpus", "2", "--disk", "d.img"}
			}
		}
		os.Remove(record)
		cmd := exec.Command("sh", "../../scripts/run.sh")
		cmd.Env = append(os.Environ(), "BIN="+stub, "MEM=256M", "ARGS=--cpus 2 --disk d.img", "NESTED="+tc.nested)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("NESTED=%q scripts/run.sh: %v\n%s", tc.nested, err, out)
		}
		b, err := os.ReadFile(record)
		if err != nil {
			t.Fatalf("NESTED=%q: the script ran neither run nor nested: %v\n%s", tc.nested, err, out)
		}
		got := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
		if !slices.Equal(got, want) {
			t.Errorf("NESTED=%q: the script ran\n  collective %q\nwant\n  collective %q\noutput:\n%s", tc.nested, got, want, out)
		}
		if got[0] == "run" {
			for _, f := range []string{kernel, initrd} {
				if _, err := os.Stat(f); err != nil {
					t.Errorf("NESTED=%q: %v", tc.nested, err)
				}
			}
		}
		if got[0] == "nested" && !strings.Contains(string(out), "kvm-pvm") && tc.nested == "" {
			t.Errorf("the nested path did not say why in one line:\n%s", out)
		}
	}
}

// TestMakeRunNested runs make run's nested path for real, as the README's
// first command does on a kvm-pvm host, with a script piped in: the
// appliance boots in the nested host with ARGS passed on, runs the typed
// commands and powers off with status 0.
func TestMakeRunNested(t *testing.T) {
	testenv.RequireKVM(t)
	testenv.RequireCommand(t, "qemu-system-x86_64")
	testenv.RequireCommand(t, "apt-get")
	if testing.Short() {
		t.Skip("boots the nested host (-short)")
	}
	bin := binary(t)
	cmd := exec.Command("sh", "../../scripts/run.sh")
	cmd.Env = append(os.Environ(), "BIN="+bin, "NESTED=1", "ARGS=--cpus 2")
	cmd.Stdin = strings.NewReader("echo cpus=$(nproc)\npoweroff\n")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make run: %v\n%s", err, out)
	}
	for _, want := range []string{"Collective appliance: Linux", "cpus=2"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("make run's output lacks %q:\n%s", want, out)
		}
	}
}
