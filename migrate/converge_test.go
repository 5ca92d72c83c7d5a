package migrate

import (
	"context"
	"errors"
	"io"
	"net"
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

// TestAutoConverge migrates a fake guest that dirties memory faster than
// a capped link carries it: auto-converge throttles it, the memory
// arrives intact, and the throttle is lifted at the end.
func TestAutoConverge(t *testing.T) {
	// The guest dirties up to 400 MB/s over a 100 MB/s link: every round
	// dirties more than it sends, slowed down or not (even under -race).
	// The rounds are bounded, not the convergence: the throttle steps
	// are what is checked.
	p := migratePair(t, Options{AutoConverge: true, Bandwidth: 100e6, Compress: "never", Downtime: 2 * time.Millisecond, MaxRounds: 6}, 100, nil)
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

// faultyConn fails its reads past n bytes: it cuts the connection, or
// with flip flips one bit of byte n and reads on.
type faultyConn struct {
	net.Conn
	n    int64
	flip bool
	done bool
}

func (c *faultyConn) Read(b []byte) (int, error) {
	k, err := c.Conn.Read(b)
	if c.done || int64(k) <= c.n {
		c.n -= int64(k)
		return k, err
	}
	c.done = true
	if c.flip {
		b[c.n] ^= 0x10
		return k, err
	}
	c.Conn.Close()
	return int(c.n), io.ErrUnexpectedEOF
}

// TestStreamFaults breaks one extra stream of a three-stream migration,
// in round 0: both sides fail, the source runs on, the target discards
// its machine, as for a fault on the first connection.
func TestStreamFaults(t *testing.T) {
	for _, tc := range []struct {
		name string
		flip bool
		want string
	}{{"cut", false, ""}, {"corrupt", true, "CRC"}} {
		t.Run(tc.name, func(t *testing.T) {
			wrap := func(c net.Conn) net.Conn { return &faultyConn{Conn: c, n: 1 << 20, flip: tc.flip} }
			p := migratePairWrap(t, context.Background(), Options{Streams: 3}, 5, nil, wrap)
			checkFault(t, p, tc.want)
		})
	}
}

// TestStreamHello checks an extra stream's first frame: the token must be
// the migration's and the index in range.
func TestStreamHello(t *testing.T) {
	tok := newToken()
	f := frame{typ: frameStream, payload: marshalStreamHello(tok, 2)}
	if i, err := parseStreamHello(f, tok, 3); err != nil || i != 2 {
		t.Fatalf("parseStreamHello = %d, %v", i, err)
	}
	for name, c := range map[string]struct {
		f       frame
		streams uint32
	}{
		"other token":  {frame{typ: frameStream, payload: marshalStreamHello(newToken(), 1)}, 3},
		"index 0":      {frame{typ: frameStream, payload: marshalStreamHello(tok, 0)}, 3},
		"index beyond": {frame{typ: frameStream, payload: marshalStreamHello(tok, 3)}, 3},
		"short":        {frame{typ: frameStream, payload: tok[:]}, 3},
		"not a stream": {frame{typ: framePages, payload: marshalStreamHello(tok, 1)}, 3},
	} {
		if _, err := parseStreamHello(c.f, tok, c.streams); !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: %v, want a protocol error", name, err)
		}
	}
}
