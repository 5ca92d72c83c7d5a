package serial

import (
	"bytes"
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"collective/devices"
	"collective/internal/testenv"
)

// fakeIRQ records every level the device drives.
type fakeIRQ struct {
	mu     sync.Mutex
	levels []bool
}

func (f *fakeIRQ) SetLevel(high bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.levels = append(f.levels, high)
}

func (f *fakeIRQ) take() []bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	l := f.levels
	f.levels = nil
	return l
}

func (f *fakeIRQ) level() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.levels) > 0 && f.levels[len(f.levels)-1]
}

// Each step is a guest access: a write of val, or a read expecting want.
type step struct {
	write bool
	off   uint64
	val   uint8 // write value, or expected read value
	host  string
}

func wr(off uint64, v uint8) step    { return step{write: true, off: off, val: v} }
func rd(off uint64, want uint8) step { return step{off: off, val: want} }
func host(s string) step             { return step{host: s} }

func run(t *testing.T, s *Serial, steps []step) {
	t.Helper()
	for i, st := range steps {
		switch {
		case st.host != "":
			if n := s.Enqueue([]byte(st.host)); n != len(st.host) {
				t.Fatalf("step %d: Enqueue(%q) took %d bytes", i, st.host, n)
			}
		case st.write:
			s.Write(st.off, []byte{st.val})
		default:
			var b [1]byte
			s.Read(st.off, b[:])
			if b[0] != st.val {
				t.Fatalf("step %d: read offset %d = %#02x, want %#02x", i, st.off, b[0], st.val)
			}
		}
	}
}

func TestRegisters(t *testing.T) {
	tests := []struct {
		name  string
		steps []step
		out   string
	}{
		{"reset values", []step{
			rd(regIER, 0), rd(regIIR, 0x01), rd(regLCR, 0), rd(regMCR, 0),
			rd(regLSR, 0x60), rd(regMSR, 0xb0), rd(regSCR, 0), rd(regData, 0),
		}, ""},
		{"scratch", []step{wr(regSCR, 0x5a), rd(regSCR, 0x5a)}, ""},
		{"IER keeps bits 3:0 (Linux autoconfig IER test)", []step{
			wr(regIER, 0), rd(regIER, 0), wr(regIER, 0xff), rd(regIER, 0x0f), wr(regIER, 0), rd(regIER, 0),
		}, ""},
		{"DLAB switches offsets 0 and 1 to the divisor latch", []step{
			rd(regLCR, 0),
			wr(regLCR, 0x83), rd(regData, resetDivisor), rd(regIER, 0),
			wr(regData, 0x01), wr(regIER, 0x02), rd(regData, 0x01), rd(regIER, 0x02),
			wr(regLCR, 0x03), rd(regIER, 0x00), rd(regLSR, 0x60), rd(regLCR, 0x03),
		}, ""},
		{"FIFO enable shows IIR bits 7:6", []step{
			wr(regIIR, 0x01), rd(regIIR, 0xc1), wr(regIIR, 0xc7), rd(regIIR, 0xc1), wr(regIIR, 0x00), rd(regIIR, 0x01),
		}, ""},
		{"THR goes to the host", []step{
			wr(regData, 'h'), wr(regData, 'i'), rd(regLSR, 0x60),
		}, "hi"},
		{"THRE interrupt raise and clear by IIR read", []step{
			wr(regIER, ierTHRE), rd(regIIR, 0x02), rd(regIIR, 0x01),
			wr(regIER, 0), wr(regIER, ierTHRE), rd(regIIR, 0x02), rd(regIIR, 0x01),
			wr(regIER, ierTHRE), rd(regIIR, 0x01), // already enabled: no new edge
		}, ""},
		{"THRE interrupt cleared by THR write, raised when THR empties", []step{
			wr(regIER, ierTHRE), wr(regData, 'x'), rd(regIIR, 0x02), rd(regIIR, 0x01),
		}, "x"},
		{"RX without FIFO", []step{
			wr(regMCR, mcrRTS), wr(regIER, ierRDA), rd(regIIR, 0x01), host("a"), rd(regLSR, 0x61), rd(regIIR, 0x04),
			rd(regData, 'a'), rd(regIIR, 0x01), rd(regLSR, 0x60),
		}, ""},
		{"RX trigger level 8 with character timeout", []step{
			wr(regIIR, 0x81), wr(regMCR, mcrRTS), wr(regIER, ierRDA), host("abc"), rd(regIIR, 0xcc),
			host("defgh"), rd(regIIR, 0xc4), rd(regData, 'a'), rd(regIIR, 0xcc),
			wr(regIIR, 0x83), rd(regIIR, 0xc1), rd(regLSR, 0x60),
		}, ""},
		{"RX trigger levels 1, 4, 14", []step{
			wr(regMCR, mcrRTS), wr(regIER, ierRDA), wr(regIIR, 0x01), host("a"), rd(regIIR, 0xc4),
			wr(regIIR, 0x43), host("abc"), rd(regIIR, 0xcc), host("d"), rd(regIIR, 0xc4),
			wr(regIIR, 0xc3), host("abcdefghijklm"), rd(regIIR, 0xcc), host("n"), rd(regIIR, 0xc4),
		}, ""},
		{"loopback routes TX to RX and modem lines", []step{
			wr(regMCR, mcrLoop|mcrRTS|mcrOUT2), rd(regMSR, 0x90|msrDDSR),
			wr(regMCR, mcrLoop|mcrDTR|mcrOUT1), rd(regMSR, 0x60|msrDCTS|msrDDSR|msrDDCD),
			wr(regMCR, mcrLoop), rd(regMSR, msrDDSR|msrTERI),
			wr(regData, 'z'), rd(regLSR, 0x61), rd(regData, 'z'), rd(regLSR, 0x60),
		}, ""},
		{"overrun in FIFO mode drops the byte and sets OE", []step{
			wr(regIIR, 0x01), wr(regMCR, mcrLoop), wr(regIER, ierRLS|ierRDA),
			wr(regData, '0'), wr(regData, '1'), wr(regData, '2'), wr(regData, '3'),
			wr(regData, '4'), wr(regData, '5'), wr(regData, '6'), wr(regData, '7'),
			wr(regData, '8'), wr(regData, '9'), wr(regData, 'a'), wr(regData, 'b'),
			wr(regData, 'c'), wr(regData, 'd'), wr(regData, 'e'), wr(regData, 'f'),
			rd(regIIR, 0xc4), wr(regData, 'X'), rd(regIIR, 0xc6),
			rd(regLSR, 0x63), rd(regLSR, 0x61), rd(regIIR, 0xc4),
			rd(regData, '0'), rd(regData, '1'),
		}, ""},
		{"overrun without FIFO overwrites RBR", []step{
			wr(regMCR, mcrLoop), wr(regData, 'a'), wr(regData, 'b'),
			rd(regLSR, 0x63), rd(regData, 'b'), rd(regLSR, 0x60),
		}, ""},
		{"priorities: line status > data > THRE > modem status", []step{
			wr(regMCR, mcrLoop), wr(regIER, 0x0f),
			rd(regIIR, 0x02), wr(regMCR, mcrLoop|mcrRTS), rd(regIIR, 0x00), rd(regMSR, 0x10|msrDCTS|msrDDSR|msrDDCD), rd(regIIR, 0x01),
			wr(regData, 'a'), rd(regIIR, 0x04), wr(regData, 'b'), rd(regIIR, 0x06),
			rd(regLSR, 0x63), rd(regIIR, 0x04), rd(regData, 'b'), rd(regIIR, 0x02), rd(regIIR, 0x01),
		}, ""},
		{"Linux 8250 autoconfig probe", []step{
			// IER test
			rd(regIER, 0), wr(regIER, 0), rd(regIER, 0), wr(regIER, 0x0f), rd(regIER, 0x0f), wr(regIER, 0),
			// loopback test: MCR = LOOP|OUT2|RTS reads MSR 0x9X
			wr(regMCR, 0x1a), rd(regMSR, 0x90|msrDDSR), wr(regMCR, 0),
			// FIFO type: EFR probe with LCR=0xBF must not read 0
			wr(regLCR, 0xbf), wr(regIIR, 0), wr(regLCR, 0), wr(regIIR, 0x01), rd(regIIR, 0xc1),
			wr(regLCR, 0xbf), rd(regIIR, 0xc1), wr(regLCR, 0x80), rd(regIIR, 0xc1), wr(regLCR, 0),
			// 16750 probe: IIR bit 5 stays 0
			wr(regIIR, 0x21), rd(regIIR, 0xc1),
		}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out testenv.Buffer
			s := New(&out, nil)
			run(t, s, tt.steps)
			if got := out.String(); got != tt.out {
				t.Errorf("output %q, want %q", got, tt.out)
			}
		})
	}
}

func TestIRQLine(t *testing.T) {
	tests := []struct {
		name  string
		steps []step
		want  []bool
	}{
		{"no OUT2, no IRQ", []step{wr(regIER, ierTHRE), rd(regIIR, 0x02)}, nil},
		{"OUT2 gates a pending interrupt", []step{
			wr(regIER, ierTHRE), wr(regMCR, mcrOUT2), rd(regIIR, 0x02), rd(regIIR, 0x01),
		}, []bool{true, false}},
		{"loopback disconnects the line", []step{
			wr(regMCR, mcrOUT2), wr(regIER, ierTHRE), wr(regMCR, mcrOUT2|mcrLoop), wr(regMCR, mcrOUT2),
		}, []bool{true, false, true}},
		{"THR write drops and re-raises the line", []step{
			wr(regMCR, mcrOUT2), wr(regIER, ierTHRE), wr(regData, 'x'),
		}, []bool{true, false, true}},
		{"RX data raises until read", []step{
			wr(regMCR, mcrOUT2|mcrRTS), wr(regIER, ierRDA), host("a"), rd(regData, 'a'), rd(regData, 0),
		}, []bool{true, false}},
		{"IER disable lowers", []step{
			wr(regMCR, mcrOUT2|mcrRTS), wr(regIER, ierRDA), host("a"), wr(regIER, 0), wr(regIER, ierRDA),
		}, []bool{true, false, true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var irq fakeIRQ
			s := New(nil, &irq)
			run(t, s, tt.steps)
			if diff := cmp.Diff(tt.want, irq.take()); diff != "" {
				t.Errorf("IRQ levels (-want +got):\n%s", diff)
			}
		})
	}
}

func TestEnqueue(t *testing.T) {
	t.Run("refused while not listening", func(t *testing.T) {
		s := New(nil, nil)
		if n := s.Enqueue([]byte("abc")); n != 0 {
			t.Fatalf("Enqueue = %d, want 0", n)
		}
		s.Write(regIER, []byte{ierRDA})
		if n := s.Enqueue([]byte("abc")); n != 0 {
			t.Fatalf("Enqueue with RTS low (Linux probing the port) = %d, want 0", n)
		}
		s.Write(regMCR, []byte{mcrRTS})
		select {
		case <-s.InputReady():
		default:
			t.Fatal("raising RTS did not signal InputReady")
		}
		s.Write(regMCR, []byte{mcrLoop})
		if n := s.Enqueue([]byte("abc")); n != 0 {
			t.Fatalf("Enqueue in loopback = %d, want 0", n)
		}
	})
	t.Run("bounded by the FIFO", func(t *testing.T) {
		s := New(nil, nil)
		s.Write(regMCR, []byte{mcrRTS})
		s.Write(regIER, []byte{ierRDA})
		if n := s.Enqueue([]byte("abc")); n != 1 {
			t.Fatalf("Enqueue without FIFO = %d, want 1", n)
		}
		s.Write(regIIR, []byte{0x07})
		if n := s.Enqueue(bytes.Repeat([]byte("x"), 20)); n != FIFOSize {
			t.Fatalf("Enqueue with FIFO = %d, want %d", n, FIFOSize)
		}
		if n := s.Enqueue([]byte("y")); n != 0 {
			t.Fatalf("Enqueue into a full FIFO = %d, want 0", n)
		}
		select {
		case <-s.InputReady():
		default:
		}
		var b [1]byte
		s.Read(regData, b[:])
		select {
		case <-s.InputReady():
		default:
			t.Fatal("reading RBR did not signal InputReady")
		}
		if n := s.Enqueue([]byte("yz")); n != 1 {
			t.Fatalf("Enqueue after one read = %d, want 1", n)
		}
	})
	t.Run("Feed loses nothing with a slow guest", func(t *testing.T) {
		var irq fakeIRQ
		s := New(nil, &irq)
		// The guest driver resets the FIFOs before it listens, as Linux does.
		s.Write(regIIR, []byte{0x87})
		input := strings.Repeat("uname -r\npoweroff\n", 20)
		done := make(chan error, 1)
		go func() { done <- s.Feed(context.Background(), strings.NewReader(input)) }()
		time.Sleep(time.Millisecond)
		s.Write(regIIR, []byte{0x87})
		s.Write(regMCR, []byte{mcrOUT2 | mcrDTR | mcrRTS})
		s.Write(regIER, []byte{ierRDA | ierRLS})
		var got []byte
		deadline := time.Now().Add(10 * time.Second)
		for len(got) < len(input) && time.Now().Before(deadline) {
			var b [1]byte
			s.Read(regLSR, b[:])
			if b[0]&lsrDR == 0 {
				time.Sleep(10 * time.Microsecond)
				continue
			}
			s.Read(regData, b[:])
			got = append(got, b[0])
		}
		if string(got) != input {
			t.Fatalf("guest read %d bytes %q..., want %d", len(got), got[:min(len(got), 40)], len(input))
		}
		if err := <-done; err != nil {
			t.Fatalf("Feed: %v", err)
		}
	})
	t.Run("Feed stops with its context", func(t *testing.T) {
		s := New(nil, nil)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.Feed(ctx, strings.NewReader("never taken")) }()
		cancel()
		if err := <-done; err != context.Canceled {
			t.Fatalf("Feed = %v, want context.Canceled", err)
		}
	})
}

// blockingWriter blocks every Write until release is closed.
type blockingWriter struct {
	started chan struct{}
	release chan struct{}
}

func (w *blockingWriter) Write(p []byte) (int, error) {
	close(w.started)
	<-w.release
	return len(p), nil
}

func TestBlockingOutputDoesNotHoldRegisters(t *testing.T) {
	w := &blockingWriter{started: make(chan struct{}), release: make(chan struct{})}
	s := New(w, nil)
	s.Write(regMCR, []byte{mcrRTS})
	s.Write(regIER, []byte{ierTHRE | ierRDA})
	done := make(chan struct{})
	go func() { s.Write(regData, []byte{'x'}); close(done) }()
	<-w.started
	var b [1]byte
	s.Read(regLSR, b[:])
	if b[0]&(lsrTHRE|lsrTEMT) != 0 {
		t.Errorf("LSR during a host write = %#x, want THRE and TEMT clear", b[0])
	}
	if n := s.Enqueue([]byte("a")); n != 1 {
		t.Errorf("Enqueue during a host write = %d, want 1", n)
	}
	if got := s.Save(); !got.THREPending {
		t.Errorf("Save during a host write: THREPending false, want true (saved as sent)")
	}
	close(w.release)
	<-done
	s.Read(regLSR, b[:])
	if b[0] != 0x61 {
		t.Errorf("LSR after the host write = %#x, want 0x61", b[0])
	}
}

func TestBadAccess(t *testing.T) {
	s := New(nil, nil)
	s.Write(regMCR, []byte{mcrRTS})
	s.Write(regIER, []byte{ierRDA})
	s.Enqueue([]byte("a"))
	before := s.Save()
	for _, tt := range []struct {
		off  uint64
		size int
	}{{0, 2}, {0, 4}, {0, 8}, {8, 1}, {1 << 63, 1}, {5, 0}} {
		p := make([]byte, tt.size)
		s.Read(tt.off, p)
		for _, b := range p {
			if b != 0xff {
				t.Errorf("read %d bytes at %#x = %x, want all 0xff", tt.size, tt.off, p)
				break
			}
		}
		s.Write(tt.off, p)
	}
	if diff := cmp.Diff(before, s.Save()); diff != "" {
		t.Errorf("bad accesses changed the state (-before +after):\n%s", diff)
	}
}

func TestSaveRestore(t *testing.T) {
	tests := []struct {
		name  string
		steps []step
	}{
		{"reset", nil},
		{"divisor and scratch", []step{wr(regLCR, 0x83), wr(regData, 3), wr(regIER, 1), wr(regSCR, 9)}},
		{"bytes in the FIFO, RX interrupt pending", []step{
			wr(regIIR, 0xc1), wr(regMCR, mcrOUT2|mcrRTS), wr(regIER, 0x0f), host("hello"),
		}},
		{"THRE pending", []step{wr(regMCR, mcrOUT2), wr(regIER, ierTHRE)}},
		{"overrun and modem deltas in loopback", []step{
			wr(regMCR, mcrLoop|mcrOUT2|mcrRTS), wr(regIER, 0x0f), wr(regData, 1), wr(regData, 2),
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var irq1, irq2 fakeIRQ
			s := New(nil, &irq1)
			run(t, s, tt.steps)
			st := s.Save()
			r := New(nil, &irq2)
			if err := r.Restore(st); err != nil {
				t.Fatalf("Restore: %v", err)
			}
			if diff := cmp.Diff(st, r.Save(), cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("Save after Restore (-want +got):\n%s", diff)
			}
			if irq1.level() != irq2.level() {
				t.Errorf("restored IRQ level %v, want %v", irq2.level(), irq1.level())
			}
			// Both behave the same from here on.
			for _, off := range []uint64{regIIR, regLSR, regMSR, regData, regIIR, regData} {
				var a, b [1]byte
				s.Read(off, a[:])
				r.Read(off, b[:])
				if a != b {
					t.Errorf("read offset %d: restored %#x, original %#x", off, b[0], a[0])
				}
			}
		})
	}
}

func TestRestoreRejects(t *testing.T) {
	good := New(nil, nil).Save()
	tests := []struct {
		name   string
		mutate func(*State)
		want   string
	}{
		{"unknown version", func(s *State) { s.Version = 7 }, "version 7, want version 1"},
		{"IER reserved bits", func(s *State) { s.IER = 0x10 }, "IER"},
		{"FCR reset bit", func(s *State) { s.FCR = 0x03 }, "FCR"},
		{"FCR without enable", func(s *State) { s.FCR = 0xc0 }, "FCR"},
		{"MCR reserved", func(s *State) { s.MCR = 0x20 }, "MCR"},
		{"LSR non-error", func(s *State) { s.LSRErrors = 0x01 }, "LSR"},
		{"MSR inputs", func(s *State) { s.MSRDeltas = 0x10 }, "MSR"},
		{"RX too long without FIFO", func(s *State) { s.RX = []byte{1, 2} }, "limit 1"},
		{"RX too long", func(s *State) { s.FCR = 1; s.RX = make([]byte, 17) }, "limit 16"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := good
			tt.mutate(&st)
			s := New(nil, nil)
			err := s.Restore(st)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Restore = %v, want an error containing %q", err, tt.want)
			}
			if diff := cmp.Diff(good, s.Save()); diff != "" {
				t.Errorf("failed Restore changed the state:\n%s", diff)
			}
		})
	}
}

func TestHotPathAllocs(t *testing.T) {
	s := New(nil, devices.IRQFunc(func(bool) {}))
	s.Write(regMCR, []byte{mcrOUT2})
	s.Write(regIER, []byte{ierTHRE})
	p := []byte{'x'}
	var b [1]byte
	if n := testing.AllocsPerRun(100, func() {
		s.Write(regData, p)
		s.Read(regLSR, b[:])
		s.Read(regIIR, b[:])
	}); n > 0 {
		t.Errorf("THR write, LSR and IIR read: %v allocations, want 0", n)
	}
}

func TestConcurrentAccess(t *testing.T) {
	var out testenv.Buffer
	var irq fakeIRQ
	s := New(&out, &irq)
	s.Write(regIIR, []byte{0x07})
	s.Write(regMCR, []byte{mcrOUT2 | mcrRTS})
	s.Write(regIER, []byte{0x0f})
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var b [1]byte
			for i := range 500 {
				switch (g + i) % 6 {
				case 0:
					s.Write(regData, []byte{'a' + byte(g)})
				case 1:
					s.Read(regIIR, b[:])
				case 2:
					s.Read(regData, b[:])
				case 3:
					s.Enqueue([]byte("xy"))
				case 4:
					if err := New(nil, nil).Restore(s.Save()); err != nil {
						t.Error(err)
					}
				case 5:
					s.Read(regLSR, b[:])
				}
			}
		}()
	}
	wg.Wait()
	want := 0
	for g := range 4 {
		for i := range 500 {
			if (g+i)%6 == 0 {
				want++
			}
		}
	}
	if n := len(out.String()); n != want {
		t.Errorf("%d bytes written to the host, want %d", n, want)
	}
	if irq.level() != s.IRQLevel() {
		t.Errorf("line %v, device says %v", irq.level(), s.IRQLevel())
	}
}
