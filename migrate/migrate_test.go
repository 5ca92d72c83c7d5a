package migrate

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"collective/kvm"
	"collective/kvm/boot"
	"collective/kvm/guestmem"
	"collective/machine"
	"collective/snapshot"
)

// World 1: a fake source and target over fake guest memory and loopback
// TCP; a goroutine plays the guest, dirtying pages through guestmem (the
// VMM's log) while the source is not paused.

const testMem = 32 << 20

func fakeState(mem uint64) *machine.MachineState {
	return &machine.MachineState{Version: machine.StateVersion, MemSize: mem, CPUs: 1,
		VCPUs: []*kvm.VCPUState{{ID: 0}}, VM: &kvm.VMState{}}
}

type fakeSource struct {
	mem    *guestmem.Memory
	paused atomic.Bool
	pauses atomic.Int32
	mu     sync.Mutex // held by the guest goroutine while it writes

	throttle   atomic.Int32 // SetThrottle's percent
	throttleMu sync.Mutex
	throttles  []int // every SetThrottle, in order
}

func newFakeSource(t testing.TB, mem uint64) *fakeSource {
	m, err := guestmem.NewFake(boot.RAMLayout(mem)...)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 4096)
	// A quarter of the pages hold data, some compressible, some not.
	for p := uint64(0); p < mem/4096; p += 4 {
		if p%8 == 0 {
			for i := range buf {
				buf[i] = byte(rng.Uint32())
			}
		} else {
			clear(buf)
			copy(buf, "compressible page ")
			buf[100] = byte(p)
		}
		m.WriteAt(buf, p*4096)
	}
	return &fakeSource{mem: m}
}

func (f *fakeSource) Memory() *guestmem.Memory        { return f.mem }
func (f *fakeSource) SetDirtyLogging(int, bool) error { return nil }
func (f *fakeSource) DirtyLog(i int) ([]uint64, error) {
	return make([]uint64, (f.mem.Regions()[i].Size()/4096+63)/64), nil
}
func (f *fakeSource) Pause()                                    { f.mu.Lock(); f.paused.Store(true); f.pauses.Add(1); f.mu.Unlock() }
func (f *fakeSource) Resume()                                   { f.paused.Store(false) }
func (f *fakeSource) SaveState() (*machine.MachineState, error) { return fakeState(f.mem.Size()), nil }
func (f *fakeSource) CPUs() int                                 { return 1 }

// SetThrottle records the throttle; the fake guest dirties that much
// slower.
func (f *fakeSource) SetThrottle(pct int) {
	f.throttleMu.Lock()
	f.throttles = append(f.throttles, pct)
	f.throttleMu.Unlock()
	f.throttle.Store(int32(pct))
}

// dirty writes random pages (also zeroing some) until ctx is done, while
// the source is not paused.
func (f *fakeSource) dirty(ctx context.Context, pagesPerMS int) {
	rng := rand.New(rand.NewPCG(3, 4))
	buf := make([]byte, 4096)
	for ctx.Err() == nil {
		f.mu.Lock()
		if !f.paused.Load() {
			for i := 0; i < pagesPerMS*int(100-f.throttle.Load())/100; i++ {
				p := rng.Uint64N(f.mem.Size() / 4096)
				if rng.IntN(10) == 0 {
					clear(buf)
				} else {
					buf[rng.IntN(4096)] = byte(rng.Uint32())
					buf[0] = 1
				}
				f.mem.WriteAt(buf, p*4096)
			}
		}
		f.mu.Unlock()
		time.Sleep(time.Millisecond)
	}
}

type fakeTarget struct {
	mem     *guestmem.Memory
	resumed atomic.Bool
	closed  atomic.Bool
}

func (f *fakeTarget) Memory() *guestmem.Memory { return f.mem }
func (f *fakeTarget) RestoreState(st *machine.MachineState) error {
	if st.MemSize != f.mem.Size() {
		return errors.New("size")
	}
	return st.Validate()
}
func (f *fakeTarget) Resume() error { f.resumed.Store(true); return nil }
func (f *fakeTarget) Close() error  { f.closed.Store(true); return nil }

func fakeBuilder(got **fakeTarget) func(uint64, int) (Target, error) {
	return func(size uint64, cpus int) (Target, error) {
		if size > 64<<20 {
			return nil, errors.New("too large for a test")
		}
		m, err := guestmem.NewFake(boot.RAMLayout(size)...)
		if err != nil {
			return nil, err
		}
		t := &fakeTarget{mem: m}
		*got = t
		return t, nil
	}
}

type pair struct {
	src    *fakeSource
	tgt    *fakeTarget
	rep    *Report
	srcErr error
	tgtErr error
	in     *Incoming
}

// migratePair runs a migration between a fake source and target over
// loopback TCP; proxy, when set, sits between them.
func migratePair(t *testing.T, opts Options, rate int, proxy func(a, b net.Conn)) *pair {
	return migratePairCtx(t, context.Background(), opts, rate, proxy)
}

func migratePairCtx(t *testing.T, parent context.Context, opts Options, rate int, proxy func(a, b net.Conn)) *pair {
	t.Helper()
	return migratePairWrap(t, parent, opts, rate, proxy, nil)
}

// migratePairWrap is migratePairCtx whose target passes each extra stream
// it accepts through wrap (when set).
func migratePairWrap(t *testing.T, parent context.Context, opts Options, rate int, proxy func(a, b net.Conn), wrap func(net.Conn) net.Conn) *pair {
	t.Helper()
	p := &pair{src: newFakeSource(t, testMem)}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	addr := l.Addr().String()
	if proxy != nil {
		pl, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer pl.Close()
		taddr := addr
		go func() {
			a, err := pl.Accept()
			if err != nil {
				return
			}
			b, err := net.Dial("tcp", taddr)
			if err != nil {
				a.Close()
				return
			}
			proxy(a, b)
		}()
		addr = pl.Addr().String()
	}
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	if rate > 0 {
		go p.src.dirty(context.Background(), rate)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := l.Accept()
		if err != nil {
			p.tgtErr = err
			return
		}
		defer c.Close()
		accept := l.Accept
		if wrap != nil {
			accept = func() (net.Conn, error) {
				c, err := l.Accept()
				if err != nil {
					return nil, err
				}
				return wrap(c), nil
			}
		}
		p.in, p.tgtErr = Receive(context.Background(), c, ReceiveOptions{Build: fakeBuilder(&p.tgt), IdleTimeout: 5 * time.Second, Accept: accept})
	}()
	opts.ReplyTimeout = 5 * time.Second
	p.rep, p.srcErr = Migrate(ctx, p.src, addr, opts)
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("target did not finish")
	}
	return p
}

func sameMem(t *testing.T, a, b *guestmem.Memory) {
	t.Helper()
	for i, r := range a.Regions() {
		h := b.Regions()[i].Host
		for off := 0; off < len(r.Host); off += 4096 {
			if !bytes.Equal(r.Host[off:off+4096], h[off:off+4096]) {
				t.Fatalf("page %#x differs", r.GPA+uint64(off))
			}
		}
	}
}

func TestMigrateRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
		rate int
	}{
		{"idle", Options{}, 0},
		{"dirty", Options{Downtime: time.Millisecond}, 20},
		{"lz4", Options{Compress: "always"}, 5},
		{"bandwidth", Options{Bandwidth: 50e6, MaxRounds: 3}, 5},
		{"streams", Options{Streams: 4}, 20},
		{"streams-lz4", Options{Streams: 3, Compress: "always", Downtime: time.Millisecond}, 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := migratePair(t, tc.opts, tc.rate, nil)
			if p.srcErr != nil || p.tgtErr != nil {
				t.Fatalf("source: %v; target: %v", p.srcErr, p.tgtErr)
			}
			if !p.rep.OK || !p.tgt.resumed.Load() || !p.src.paused.Load() {
				t.Fatalf("report %+v, target resumed %v, source paused %v", p.rep, p.tgt.resumed.Load(), p.src.paused.Load())
			}
			sameMem(t, p.src.mem, p.tgt.mem)
			// One host, one clock: the exact downtime lies within the
			// source's upper bound.
			if d := float64(p.rep.TargetResumedUnixNS-p.rep.StoppedUnixNS) / 1e6; p.rep.StoppedUnixNS == 0 || d <= 0 || d > p.rep.DowntimeMS {
				t.Errorf("wall-clock downtime %.3f ms (stopped %d, resumed %d), ack downtime %.3f ms", d, p.rep.StoppedUnixNS, p.rep.TargetResumedUnixNS, p.rep.DowntimeMS)
			}
			if want := max(tc.opts.Streams, 1); p.rep.Streams != want {
				t.Errorf("%d streams, want %d", p.rep.Streams, want)
			}
			nz := p.rep.NonZeroBytes
			if tc.rate == 0 && float64(p.rep.BytesWire) > 1.05*float64(nz) {
				t.Errorf("idle: %d bytes on the wire for %d non-zero bytes", p.rep.BytesWire, nz)
			}
			// Always, and auto under a bandwidth cap far below what lz4
			// compresses at, send compressed pages.
			if (tc.opts.Compress == "always" || tc.opts.Bandwidth > 0) && p.rep.Pages.Compressed == 0 {
				t.Errorf("no compressed pages: %+v, %s", p.rep.Pages, p.rep.Compression)
			}
			t.Logf("rounds %d, wire %d, pages %+v, downtime %.2f ms, total %.1f ms, %s", p.rep.Rounds, p.rep.BytesWire, p.rep.Pages, p.rep.DowntimeMS, p.rep.TotalMS, p.rep.Compression)
		})
	}
}

// cutAfter forwards a->b until n bytes passed, then closes both; with
// flip, it flips one bit at byte n instead and goes on.
func cutAfter(n int64, flip bool) func(a, b net.Conn) {
	return func(a, b net.Conn) {
		go func() { bufCopy(a, b); a.Close() }() // target -> source
		var done int64
		buf := make([]byte, 32<<10)
		for {
			k, err := a.Read(buf)
			if k > 0 {
				chunk := buf[:k]
				if done <= n && n < done+int64(k) {
					if !flip {
						b.Write(chunk[:n-done])
						a.Close()
						b.Close()
						return
					}
					chunk[n-done] ^= 0x10
				}
				done += int64(k)
				if _, err := b.Write(chunk); err != nil {
					a.Close()
					return
				}
			}
			if err != nil {
				b.Close()
				return
			}
		}
	}
}

func bufCopy(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// checkFault: both sides failed, the source is running (resumed if it
// had paused), the target discarded its machine.
func checkFault(t *testing.T, p *pair, want string) {
	t.Helper()
	if p.srcErr == nil || p.tgtErr == nil {
		t.Fatalf("want both sides to fail; source: %v; target: %v", p.srcErr, p.tgtErr)
	}
	if p.src.paused.Load() {
		t.Errorf("source left paused after %v", p.srcErr)
	}
	if p.tgt != nil && (p.tgt.resumed.Load() || !p.tgt.closed.Load()) {
		t.Errorf("target resumed %v closed %v", p.tgt.resumed.Load(), p.tgt.closed.Load())
	}
	if p.rep.OK || p.rep.Error == "" {
		t.Errorf("report %+v", p.rep)
	}
	t.Logf("source: %v\ntarget: %v", p.srcErr, p.tgtErr)
	if want != "" && !bytes.Contains([]byte(p.srcErr.Error()+p.tgtErr.Error()), []byte(want)) {
		t.Errorf("errors do not mention %q", want)
	}
}

func TestMigrateFaults(t *testing.T) {
	t.Run("cut in round 0", func(t *testing.T) {
		checkFault(t, migratePair(t, Options{}, 5, cutAfter(3<<20, false)), "")
	})
	t.Run("cut in the hello", func(t *testing.T) {
		checkFault(t, migratePair(t, Options{}, 0, cutAfter(20, false)), "")
	})
	t.Run("corrupt frame", func(t *testing.T) {
		checkFault(t, migratePair(t, Options{}, 5, cutAfter(1<<20, true)), "")
	})
	t.Run("corrupt frame at the source", func(t *testing.T) {
		checkFault(t, migratePair(t, Options{CorruptFrame: 50}, 5, nil), "CRC")
	})
	t.Run("fault while paused", func(t *testing.T) {
		p := migratePair(t, Options{Hook: func(ph string) error {
			if ph == "paused" {
				return errors.New("injected fault while paused")
			}
			return nil
		}}, 5, nil)
		checkFault(t, p, "injected")
		if p.src.pauses.Load() != 1 {
			t.Errorf("source paused %d times", p.src.pauses.Load())
		}
	})
	t.Run("cancel", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		p := migratePairCtx(t, ctx, Options{Hook: func(ph string) error {
			if ph == "round" {
				cancel()
				time.Sleep(10 * time.Millisecond)
			}
			return nil
		}, Downtime: time.Nanosecond, MaxRounds: 5}, 20, nil)
		checkFault(t, p, "")
		if !errors.Is(p.srcErr, ErrCanceled) {
			t.Errorf("source error %v is not ErrCanceled", p.srcErr)
		}
	})
	t.Run("unreachable", func(t *testing.T) {
		l, _ := net.Listen("tcp", "127.0.0.1:0")
		addr := l.Addr().String()
		l.Close()
		src := newFakeSource(t, testMem)
		rep, err := Migrate(context.Background(), src, addr, Options{})
		if err == nil || rep.OK || src.paused.Load() {
			t.Fatalf("err %v, report %+v", err, rep)
		}
		t.Log(err)
	})
	t.Run("in doubt", func(t *testing.T) {
		// The commit is sent and the connection dies before the ack: the
		// source must stay paused.
		p := migratePair(t, Options{Hook: func(ph string) error {
			if ph == "committed" {
				return errors.New("injected: ack lost")
			}
			return nil
		}}, 0, nil)
		if !errors.Is(p.srcErr, ErrInDoubt) || !p.src.paused.Load() || !p.rep.InDoubt {
			t.Fatalf("source: %v, paused %v", p.srcErr, p.src.paused.Load())
		}
		if p.tgtErr == nil || p.tgt.resumed.Load() {
			t.Fatalf("target: %v resumed %v", p.tgtErr, p.tgt.resumed.Load())
		}
	})
}

// TestHashTransfer: the target holds a snapshot of the source's memory;
// the source sends hashes for those pages, and the memories still match.
func TestHashTransfer(t *testing.T) {
	src := newFakeSource(t, testMem)
	dir := t.TempDir()
	if _, err := snapshot.WriteFull(filepath.Join(dir, "base.snap"), src.mem, fakeState(testMem), false); err != nil {
		t.Fatal(err)
	}
	// The guest changes some pages after the snapshot.
	src.mem.WriteAt(bytes.Repeat([]byte{9}, 3*4096), 0x200000)
	cache, err := LoadCache(dir)
	if err != nil || cache.Len() == 0 {
		t.Fatalf("cache: %v, %d pages", err, cache.Len())
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var tgt *fakeTarget
	done := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		_, err = Receive(context.Background(), c, ReceiveOptions{Build: fakeBuilder(&tgt), Cache: cache})
		done <- err
	}()
	rep, err := Migrate(context.Background(), src, l.Addr().String(), Options{Compress: "never"})
	if err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	sameMem(t, src.mem, tgt.mem)
	if rep.Pages.HashHit == 0 || rep.Pages.Full > 8 || rep.BytesWire > rep.NonZeroBytes/10 {
		t.Fatalf("pages %+v, wire %d for %d non-zero bytes", rep.Pages, rep.BytesWire, rep.NonZeroBytes)
	}
	t.Logf("pages %+v, %d bytes on the wire for %d non-zero bytes (%d hashes announced)", rep.Pages, rep.BytesWire, rep.NonZeroBytes, rep.HashesAnnounced)
}

// TestLZ4Pays: the compression model's decisions in the cases it is
// for. Figures are bytes per second, as decideCompression measures them.
func TestLZ4Pays(t *testing.T) {
	const MB = 1e6
	for _, tc := range []struct {
		name                string
		ratio, cspeed, link float64
		want                bool
	}{
		// Loopback with a busy guest: one encoder at 700 MB/s, the
		// writer's rate the CPU's.
		{"loopback, one encoder", 0.5, 700 * MB, 600 * MB, false},
		{"loopback, slow writes", 0.5, 700 * MB, 350 * MB, false},
		// A 1 Gb/s link or a bandwidth cap.
		{"1 Gb/s", 0.5, 700 * MB, 125 * MB, true},
		{"cap 30 MB/s", 0.5, 700 * MB, 30 * MB, true},
		// Incompressible pages never pay.
		{"incompressible, slow link", 1.0, 10000 * MB, 30 * MB, false},
		// Highly compressible pages over a fast link, with encoders to
		// spare (the stop phase's, or a big host).
		{"ratio 0.1, 4 encoders", 0.1, 2800 * MB, 1000 * MB, true},
	} {
		if got := lz4Pays(tc.ratio, tc.cspeed, tc.link); got != tc.want {
			t.Errorf("%s: lz4Pays(%.2f, %.0f MB/s, %.0f MB/s) = %v, want %v", tc.name, tc.ratio, tc.cspeed/MB, tc.link/MB, got, tc.want)
		}
	}
}
