package machine

import (
	"context"
	"strings"
	"testing"
	"time"

	"collective/guest"
	"collective/internal/testenv"
)

// TestThrottle runs the workload guest dirtying memory as fast as it can
// and checks that kvm.VM.SetThrottle slows it (auto-converge's lever),
// that a pause is not held up by a throttle sleep, and that the guest
// runs at full speed again once unthrottled.
func TestThrottle(t *testing.T) {
	elf := guestELF(t)
	var console testenv.Buffer
	m, err := New(Config{Kernel: elf, Cmdline: "dirty 2M 0 60", MemSize: 64 << 20, CPUs: 1, Console: &console})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan Exit, 1)
	go func() { done <- m.Run(ctx) }()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(console.String(), "pass 1 verified") {
		if time.Now().After(deadline) {
			t.Fatalf("no verified pass; console:\n%s", console.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	passes := func() uint64 {
		n, err := m.Memory().Uint64(guest.HeartbeatAddr + 0x18)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	// rate is the guest's passes per second over d.
	rate := func(d time.Duration) float64 {
		p0, t0 := passes(), time.Now()
		time.Sleep(d)
		return float64(passes()-p0) / time.Since(t0).Seconds()
	}
	full := rate(300 * time.Millisecond)
	if full < 10 {
		t.Fatalf("the guest makes %.0f passes/s unthrottled; console:\n%s", full, console.String())
	}
	m.VM().SetThrottle(80)
	if got := m.VM().Throttle(); got != 80 {
		t.Fatalf("Throttle() = %d, want 80", got)
	}
	slow := rate(500 * time.Millisecond)
	// At 80% the guest runs a fifth of the time: well under half speed.
	if slow > full/2 {
		t.Errorf("throttled at 80%%: %.0f passes/s, unthrottled %.0f", slow, full)
	}
	// At 99% a vCPU sleeps 990 ms per 10 ms slice; a pause wakes it.
	m.VM().SetThrottle(150) // clamped
	if got := m.VM().Throttle(); got != 99 {
		t.Fatalf("Throttle() = %d after SetThrottle(150), want 99", got)
	}
	time.Sleep(100 * time.Millisecond)
	t0 := time.Now()
	m.Pause()
	if d := time.Since(t0); d > 500*time.Millisecond {
		t.Errorf("a pause of a throttled guest took %v", d)
	}
	m.VM().SetThrottle(0)
	m.Resume()
	again := rate(300 * time.Millisecond)
	if again < full/2 {
		t.Errorf("unthrottled again: %.0f passes/s, before %.0f", again, full)
	}
	t.Logf("passes/s: %.0f unthrottled, %.0f at 80%%, %.0f unthrottled again", full, slow, again)
	m.Stop()
	if exit := <-done; exit.Reason != ExitStopped {
		t.Errorf("exit %+v", exit)
	}
}
