package machine

import (
	"collective/internal/testenv"
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func TestCheckVersion(t *testing.T) {
	for _, tc := range []struct {
		have string
		ok   bool
	}{
		{"1.0.0", true}, {"1.0.7", true}, {"0.9.0", false}, {"2.0.0", false}, {"1.1.0", false},
		{"", false}, {"1.0", false}, {"1.0.x", false}, {"01.0.0", false},
	} {
		err := CheckVersion("state", tc.have, "1.0.0")
		if (err == nil) != tc.ok {
			t.Errorf("CheckVersion(%q) = %v, want ok=%v", tc.have, err, tc.ok)
		}
		if err != nil && (!errors.Is(err, ErrVersion) || !strings.Contains(err.Error(), "1.0.0")) {
			t.Errorf("CheckVersion(%q) = %q: want ErrVersion naming both versions", tc.have, err)
		}
	}
}

func TestStateValidate(t *testing.T) {
	for name, st := range map[string]*MachineState{
		"empty":       {},
		"newer":       {Version: "1.9.0", CPUs: 1, MemSize: 64 << 20},
		"no vcpus":    {Version: StateVersion, CPUs: 1, MemSize: 64 << 20},
		"bad memsize": {Version: StateVersion, CPUs: 0, MemSize: 3},
	} {
		if err := st.Validate(); err == nil {
			t.Errorf("%s: Validate accepted it", name)
		}
	}
}

// waitFor polls the console until it holds n occurrences of s.
func waitFor(t *testing.T, c *testenv.Buffer, s string, n int, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for strings.Count(c.String(), s) < n {
		if time.Now().After(deadline) {
			t.Fatalf("no %d× %q within %v; console:\n%s", n, s, d, c.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestSaveRestoreDirtyGuest: the workload guest dirtying 8 MiB is paused
// mid-run, its state saved and its memory copied into a new machine, which
// runs on: the guest's self-check passes.
func TestSaveRestoreDirtyGuest(t *testing.T) {
	elf := guestELF(t)
	var console testenv.Buffer
	m, err := New(Config{Kernel: elf, Cmdline: "dirty 8M 0 6", MemSize: 128 << 20, CPUs: 1, Console: &console})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	done := make(chan Exit, 1)
	go func() { done <- m.Run(context.Background()) }()
	waitFor(t, &console, "verified", 2, 30*time.Second)
	time.Sleep(200 * time.Millisecond)

	if _, err := m.SaveState(); err == nil {
		t.Fatal("SaveState of a running VM succeeded")
	}
	m.VM().Pause()
	st, err := m.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	var mem [][]byte
	for _, r := range m.Memory().Regions() {
		mem = append(mem, append([]byte(nil), r.Host...))
	}
	m.Stop()
	<-done
	before := console.String()

	if _, err := Restore(Config{MemSize: 64 << 20}, st); !errors.Is(err, ErrConfig) {
		t.Fatalf("Restore with another memory size: %v", err)
	}
	var console2 testenv.Buffer
	m2, err := Restore(Config{Console: &console2}, st)
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	for i, r := range m2.Memory().Regions() {
		copy(r.Host, mem[i])
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	exit := m2.Run(ctx)
	out := console2.String()
	if exit.Reason != ExitDebug || exit.Code != 0 {
		t.Fatalf("restored guest: exit %+v; console before:\n%s\nafter:\n%s", exit, before, out)
	}
	if !strings.Contains(out, "verified") || !strings.Contains(out, "final verified") {
		t.Fatalf("restored guest printed no verified pass:\n%s", out)
	}
	t.Logf("before: %d verified lines; after restore:\n%s", strings.Count(before, "verified"), out)
}

// TestVCPUBriefs reads a running guest's vCPUs and leaves it running.
func TestVCPUBriefs(t *testing.T) {
	elf := guestELF(t)
	var console testenv.Buffer
	m, err := New(Config{Kernel: elf, Cmdline: "dirty 8M 0 1000", MemSize: 64 << 20, CPUs: 2, Console: &console})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	done := make(chan Exit, 1)
	go func() { done <- m.Run(context.Background()) }()
	defer func() { m.Stop(); <-done }()
	waitFor(t, &console, "verified", 1, 30*time.Second)
	b, err := m.VCPUBriefs()
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 2 || b[0].ID != 0 || b[1].ID != 1 || b[0].RIP == 0 || b[0].CR3 == 0 || b[0].MPState != "runnable" {
		t.Fatalf("briefs of a 2-vCPU guest at work: %v", b)
	}
	if m.Paused() {
		t.Fatal("VCPUBriefs left the machine paused")
	}
	n := strings.Count(console.String(), "verified")
	waitFor(t, &console, "verified", n+1, 30*time.Second)
	m.VM().Pause()
	if _, err := m.VCPUBriefs(); err != nil || !m.Paused() {
		t.Fatalf("on a paused machine: %v, paused %v", err, m.Paused())
	}
	t.Logf("%s\n%s", b[0], b[1])
}

// TestLogTripleFault: a triple fault is logged with the vCPU's brief, or
// on AMD (whose KVM resets the vCPU first) with a word why there is none.
func TestLogTripleFault(t *testing.T) {
	testenv.RequireKVM(t)
	var log testenv.Buffer
	m, err := NewBare(Config{MemSize: 16 << 20, CPUs: 1, Log: slog.New(slog.NewTextHandler(&log, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	m.logTripleFault(m.VM().VCPUs()[0])
	want := "vCPU 0 runnable rip=0xfff0"
	if m.sys.ResetsOnShutdown() {
		want = "no registers are left"
	}
	t.Logf("vendor %q", m.sys.Vendor())
	if out := log.String(); !strings.Contains(out, "level=WARN") || !strings.Contains(out, "guest triple fault") ||
		!strings.Contains(out, want) {
		t.Errorf("log (want %q): %s", want, out)
	}
}
