// Package testenv decides whether a test's requirements (/dev/kvm, QEMU,
// gcc) are met. On a developer's machine a missing requirement skips the
// test with the reason; under CI=true it fails it, so that CI never
// passes by skipping.
package testenv

import (
	"collective/guest"
	"os"
	"os/exec"
	"strconv"
	"testing"
)

// kvmPath is the KVM device node (kvm.DevicePath; not imported, so that
// package kvm's own tests can use this package).
const kvmPath = "/dev/kvm"

// CI reports whether the tests run in CI (CI=true).
func CI() bool { return os.Getenv("CI") == "true" }

// missing skips or fails t.
func missing(t testing.TB, format string, a ...any) {
	t.Helper()
	if CI() {
		t.Fatalf("CI=true and a requirement is missing: "+format, a...)
	}
	t.Skipf("skipped: "+format, a...)
}

// RequireKVM skips t (fails it under CI=true) when /dev/kvm cannot be used.
func RequireKVM(t testing.TB) {
	t.Helper()
	f, err := os.OpenFile(kvmPath, os.O_RDWR, 0)
	if err != nil {
		missing(t, "no usable %s: %v", kvmPath, err)
		return
	}
	f.Close()
}

// RequireCommand returns the path of the named program, skipping t (or
// failing it under CI=true) when it is not installed.
func RequireCommand(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		missing(t, "%s is not installed", name)
	}
	return p
}

// RequireNetNS skips t (fails it under CI=true) unless network namespaces
// can be made: root, the ip command (iproute2), and a probe namespace
// that can be added and deleted. It returns the path of ip.
func RequireNetNS(t testing.TB) string {
	t.Helper()
	if os.Geteuid() != 0 {
		missing(t, "network namespaces need root (euid %d)", os.Geteuid())
		return ""
	}
	ip := RequireCommand(t, "ip")
	probe := "clvprobe" + strconv.Itoa(os.Getpid())
	if out, err := exec.Command(ip, "netns", "add", probe).CombinedOutput(); err != nil {
		missing(t, "ip netns add: %v: %s", err, out)
		return ""
	}
	exec.Command(ip, "netns", "del", probe).Run()
	return ip
}

// WorkloadGuest requires KVM and gcc (skipping t, or failing it under
// CI=true, without them), builds the workload guest and returns its ELF:
// the preamble of every test that runs the guest.
func WorkloadGuest(t testing.TB) string {
	t.Helper()
	RequireKVM(t)
	RequireCommand(t, "gcc")
	elf, err := guest.Build()
	if err != nil {
		t.Fatalf("building the workload guest: %v", err)
	}
	return elf
}
