package nested

import (
	"context"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"

	"collective/internal/testenv"
)

var shared struct {
	mu   sync.Mutex
	host *Host
	err  error
}

// Shared returns the test binary's one nested test host, booting it on
// first use (with the zero Options: Debian's kernel and the default
// appliance from the image cache). A later caller gets the same Host, or
// a new one if the previous died (a script that hung L1). A missing
// requirement (QEMU, busybox-static, the kernel package) skips t, or
// fails it under CI=true; a failed boot fails t. Under -short it skips.
// The Host lives until the test binary exits (QEMU dies with it) or
// CloseShared.
func Shared(t testing.TB) *Host {
	t.Helper()
	if testing.Short() {
		t.Skip("skipped under -short: the nested test host boots Linux under TCG")
	}
	Require(t)
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if shared.host != nil {
		shared.host.mu.Lock()
		dead := shared.host.dead
		shared.host.mu.Unlock()
		if dead == nil {
			return shared.host
		}
		t.Logf("nested: the shared host died (%v); booting a new one", dead)
		shared.host.Close()
		shared.host, shared.err = nil, nil
	}
	if shared.err != nil {
		t.Fatalf("nested: the shared host failed to start earlier: %v", shared.err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	// Two knobs for chasing nested-virtualisation bugs: QEMU's TCG thread
	// mode and L1's CPU model.
	h, err := Start(ctx, Options{WithQEMU: true, Logf: t.Logf,
		TCGThread: os.Getenv("COLLECTIVE_L1_TCG_THREAD"), CPU: os.Getenv("COLLECTIVE_L1_CPU")})
	if err != nil {
		shared.err = err
		t.Fatalf("%v", err)
	}
	t.Logf("nested: L1 booted in %s (L1 kernel uptime %s)", h.BootTime.Round(time.Millisecond), h.KernelUptime)
	shared.host = h
	return h
}

// CloseShared closes the shared host, if any (for TestMain).
func CloseShared() {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if shared.host != nil {
		shared.host.Close()
		shared.host = nil
	}
}

// Require skips t (fails it under CI=true) unless the nested test host
// can be built here: qemu-system-x86_64, a static /bin/busybox, the go
// tool (to build a static collective) and apt-get/dpkg-deb (for the
// kernel package) are there.
func Require(t testing.TB) {
	t.Helper()
	testenv.RequireCommand(t, "qemu-system-x86_64")
	testenv.RequireCommand(t, "go")
	if err := checkStatic("/bin/busybox"); err != nil {
		missing(t, "%v (apt-get install busybox-static)", err)
	}
	if _, err := exec.LookPath("dpkg-deb"); err != nil {
		missing(t, "dpkg-deb is not installed (needed for Debian's kernel package)")
	}
}

// missing skips t, or fails it under CI=true, as testenv does.
func missing(t testing.TB, format string, a ...any) {
	t.Helper()
	if testenv.CI() {
		t.Fatalf("CI=true and a requirement is missing: "+format, a...)
	}
	t.Skipf("skipped: "+format, a...)
}
