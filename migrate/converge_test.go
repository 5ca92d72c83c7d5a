package migrate

import (
	"slices"
	"testing"
	"time"

	"collective/kvm"
)

// recordThrottle is a Throttler that records what it is set to.
type recordThrottle struct{ set []int }

func (r *recordThrottle) SetThrottle(pct int) { r.set = append(r.set, pct) }

// TestThrottleUpPolicy checks auto-converge's steps: the throttle starts
// at ThrottleInitial after two rounds in a row that dirtied more than half
// of what they sent, grows by ThrottleStep after every two more, stops at
// kvm.MaxThrottle, and a calm round resets the count.
func TestThrottleUpPolicy(t *testing.T) {
	r := &recordThrottle{}
	s := &sender{opts: Options{AutoConverge: true}, throttler: r, rep: &Report{}}
	const sent = 1000
	high, low := int64(sent/2+1), int64(sent/2)
	s.throttleUp(sent, high)
	s.throttleUp(sent, low) // breaks the run
	s.throttleUp(sent, high)
	if len(r.set) != 0 {
		t.Fatalf("throttled after rounds that were not two high in a row: %v", r.set)
	}
	s.throttleUp(sent, high)
	if !slices.Equal(r.set, []int{ThrottleInitial}) {
		t.Fatalf("after two high rounds: %v, want [%d]", r.set, ThrottleInitial)
	}
	for range 40 {
		s.throttleUp(sent, high)
	}
	want := []int{}
	for p := ThrottleInitial; p < kvm.MaxThrottle; p += ThrottleStep {
		want = append(want, p)
	}
	want = append(want, kvm.MaxThrottle)
	if !slices.Equal(r.set, want) {
		t.Errorf("throttle steps %v, want %v", r.set, want)
	}
	if s.rep.ThrottlePct != kvm.MaxThrottle {
		t.Errorf("report's throttle %d, want %d", s.rep.ThrottlePct, kvm.MaxThrottle)
	}
	// Off unless asked for.
	r2 := &recordThrottle{}
	s2 := &sender{throttler: r2, rep: &Report{}}
	for range 4 {
		s2.throttleUp(sent, sent*2)
	}
	if len(r2.set) != 0 {
		t.Errorf("throttled without AutoConverge: %v", r2.set)
	}
}

// TestAutoConverge migrates a fake guest that dirties memory about as
// fast as a capped link carries it: auto-converge throttles it, the
// memory arrives intact, and the throttle is lifted at the end.
func TestAutoConverge(t *testing.T) {
	p := migratePair(t, Options{AutoConverge: true, Bandwidth: 100e6, Compress: "never", Downtime: 2 * time.Millisecond}, 40, nil)
	if p.srcErr != nil || p.tgtErr != nil {
		t.Fatalf("source: %v; target: %v", p.srcErr, p.tgtErr)
	}
	sameMem(t, p.src.mem, p.tgt.mem)
	p.src.throttleMu.Lock()
	set := slices.Clone(p.src.throttles)
	p.src.throttleMu.Unlock()
	t.Logf("rounds %d, throttle %d%%, set %v, downtime %.2f ms, total %.1f ms", p.rep.Rounds, p.rep.ThrottlePct, set, p.rep.DowntimeMS, p.rep.TotalMS)
	if p.rep.ThrottlePct < ThrottleInitial || len(set) < 2 {
		t.Fatalf("no throttle: report %d%%, set %v", p.rep.ThrottlePct, set)
	}
	if set[len(set)-1] != 0 || p.src.throttle.Load() != 0 {
		t.Errorf("throttle not lifted at the end: %v", set)
	}
	var throttled bool
	for _, rs := range p.rep.RoundStats {
		throttled = throttled || rs.Throttle > 0
	}
	if !throttled {
		t.Errorf("no round ran throttled: %+v", p.rep.RoundStats)
	}
}
