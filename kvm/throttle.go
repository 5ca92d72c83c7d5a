package kvm

import (
	"sync"
	"time"
)

// ThrottleSlice is how long a throttled vCPU runs between two sleeps: at
// pct percent, each vCPU runs ThrottleSlice, then sleeps
// ThrottleSlice*pct/(100-pct) (QEMU's cpu-throttle keeps the same
// 10 ms timeslice, so the two throttle alike).
const ThrottleSlice = 10 * time.Millisecond

// MaxThrottle is the largest throttle SetThrottle takes, in percent.
const MaxThrottle = 99

// throttler takes a VM's vCPUs off their CPUs for a share of the time.
type throttler struct {
	mu   sync.Mutex // guards pct, stop, done
	pct  int
	stop chan struct{} // closed to end the ticking goroutine; nil when off
	done chan struct{} // closed by the ticking goroutine when it ends
}

// SetThrottle makes every vCPU sleep pct percent of the time (0 turns
// throttling off; pct is clamped to 0..MaxThrottle): live migration's
// auto-converge slows a guest that dirties memory faster than the link
// carries it. A throttled vCPU's sleep ends early when the VM is paused,
// stopped or unthrottled, so a pause is never delayed by it.
//
// Turning it off returns once the ticking goroutine has ended: no kick
// reaches a vCPU after it (Close turns it off before it closes the vCPUs).
func (vm *VM) SetThrottle(pct int) {
	pct = min(max(pct, 0), MaxThrottle)
	t := &vm.throttle
	t.mu.Lock()
	t.pct = pct
	if pct > 0 {
		if t.stop == nil {
			t.stop, t.done = make(chan struct{}), make(chan struct{})
			go vm.tick(t.stop, t.done)
		}
		t.mu.Unlock()
		return
	}
	stop, done := t.stop, t.done
	t.stop, t.done = nil, nil
	t.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done // the goroutine takes t.mu: waited for without it
	}
	for _, v := range vm.VCPUs() {
		v.sleepNS.Store(0)
		v.wakeUp()
	}
}

// Throttle returns the throttle set by SetThrottle, in percent.
func (vm *VM) Throttle() int {
	vm.throttle.mu.Lock()
	defer vm.throttle.mu.Unlock()
	return vm.throttle.pct
}

// tick asks every vCPU to sleep once per period (a slice of running plus
// the sleep) until stop is closed.
func (vm *VM) tick(stop, done chan struct{}) {
	defer close(done)
	tm := time.NewTimer(ThrottleSlice)
	defer tm.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tm.C:
		}
		pct := vm.Throttle()
		if pct == 0 {
			return
		}
		sleep := ThrottleSlice * time.Duration(pct) / time.Duration(100-pct)
		for _, v := range vm.VCPUs() {
			v.sleepNS.Store(int64(sleep))
			v.kick()
		}
		tm.Reset(ThrottleSlice + sleep)
	}
}

// throttleSleep sleeps the time the throttler asked for, if any, ending
// early on a wake-up (pause, stop, unthrottle).
func (v *VCPU) throttleSleep() {
	d := time.Duration(v.sleepNS.Swap(0))
	if d <= 0 {
		return
	}
	// A wake-up left from before is stale; a pause or stop that sent it
	// is seen in its flag, one that comes later wakes the sleep.
	select {
	case <-v.wake:
	default:
	}
	if v.pause.Load() || v.stop.Load() {
		return
	}
	tm := time.NewTimer(d)
	select {
	case <-tm.C:
	case <-v.wake:
		tm.Stop()
	}
}

// wakeUp ends a throttle sleep under way (or the next one at once).
func (v *VCPU) wakeUp() {
	select {
	case v.wake <- struct{}{}:
	default:
	}
}
