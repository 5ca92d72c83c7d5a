package fuzz

import (
	"log/slog"
	"reflect"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"collective/devices/i8042"
	"collective/devices/rtc"
	"collective/devices/serial"
)

// quiet drops the devices' warnings: fuzz input triggers them on purpose.
var quiet = slog.New(slog.DiscardHandler)

// An access is one step decoded from fuzz input: a guest read or write of
// size bytes at off, or a host-side action (input, clock tick).
type access struct {
	kind uint8 // opRead, opWrite, opHost, opTick
	off  uint64
	size int
	val  uint8
	data []byte // host input for opHost
}

const (
	opRead = iota
	opWrite
	opHost
	opTick
)

// sizes maps 3 bits of an op byte to an access size; mostly 1, the size
// legacy devices see, but also the sizes they must refuse.
var sizes = [8]int{1, 1, 1, 1, 2, 4, 8, 0}

// decode turns fuzz input into accesses. Each step is three bytes:
//
//	op:  bits 1:0 kind, bits 4:2 size, bit 7 offset beyond the window
//	off: offset (modulo window unless op bit 7)
//	val: value written, or the host input's length (modulo 24) with that
//	     many input bytes following
func decode(data []byte, window uint64, fn func(access)) {
	for len(data) >= 3 {
		op, off, val := data[0], uint64(data[1]), data[2]
		data = data[3:]
		a := access{kind: op & 3, size: sizes[op>>2&7], val: val}
		if op&0x80 != 0 {
			a.off = off << (op >> 5 & 3 * 8) // up to 0xff << 24
		} else {
			a.off = off % window
		}
		if a.kind == opHost {
			n := min(int(val)%24, len(data))
			a.data, data = data[:n], data[n:]
		}
		fn(a)
	}
}

// fakeIRQ remembers the last level driven and counts redundant calls.
type fakeIRQ struct {
	level     bool
	redundant int
}

func (f *fakeIRQ) SetLevel(high bool) {
	if high == f.level {
		f.redundant++
	}
	f.level = high
}

func do(dev interface {
	Read(uint64, []byte)
	Write(uint64, []byte)
}, a access) {
	p := make([]byte, a.size)
	if a.kind == opWrite {
		for i := range p {
			p[i] = a.val
		}
		dev.Write(a.off, p)
		return
	}
	dev.Read(a.off, p)
}

func step(ops ...[]byte) []byte {
	var out []byte
	for _, o := range ops {
		out = append(out, o...)
	}
	return out
}

func wr(off, v uint8) []byte { return []byte{opWrite, off, v} }
func rd(off uint8) []byte    { return []byte{opRead, off, 0} }
func host(s string) []byte   { return append([]byte{opHost, 0, uint8(len(s))}, s...) }

// serialPending computes from a saved State whether the UART has an
// enabled interrupt pending (IIR bit 0 clear).
func serialPending(st serial.State) bool {
	return st.IER&0x04 != 0 && st.LSRErrors != 0 ||
		st.IER&0x01 != 0 && len(st.RX) > 0 ||
		st.IER&0x02 != 0 && st.THREPending ||
		st.IER&0x08 != 0 && st.MSRDeltas != 0
}

func FuzzSerial(f *testing.F) {
	f.Add(step(rd(0), rd(1), rd(2), rd(3), rd(4), rd(5), rd(6), rd(7)))
	// Linux 8250 probe and startup.
	f.Add(step(wr(1, 0), rd(1), wr(1, 0x0f), rd(1), wr(1, 0), wr(4, 0x1a), rd(6), wr(4, 0),
		wr(3, 0xbf), wr(2, 0), wr(3, 0), wr(2, 1), rd(2), wr(3, 0x83), wr(0, 1), wr(1, 0), wr(3, 3),
		wr(2, 0xc7), wr(4, 0x0b), wr(1, 2), rd(5), rd(2), wr(1, 0), wr(1, 2), rd(2), wr(1, 5),
		host("uname -r\n"), rd(2), rd(5), rd(0), rd(0), wr(0, 'x'), rd(2)))
	// Loopback overrun with all interrupts enabled.
	f.Add(step(wr(2, 0x41), wr(4, 0x1f), wr(1, 0x0f), wr(0, 1), wr(0, 2), wr(0, 3), wr(0, 4), wr(0, 5),
		wr(0, 6), wr(0, 7), wr(0, 8), wr(0, 9), wr(0, 10), wr(0, 11), wr(0, 12), wr(0, 13), wr(0, 14),
		wr(0, 15), wr(0, 16), wr(0, 17), rd(2), rd(5), rd(6), rd(2), wr(4, 0x08), rd(2)))
	// Bad sizes and offsets.
	f.Add([]byte{0x11, 0, 0, 0x15, 5, 0, 0x80, 0xff, 0, 0xe1, 0x10, 1, 0x19, 3, 0x80})

	f.Fuzz(func(t *testing.T, data []byte) {
		var irq fakeIRQ
		s := serial.New(nil, &irq)
		s.SetLogger(quiet)
		decode(data, serial.Size, func(a access) {
			if a.kind == opHost || a.kind == opTick {
				n := s.Enqueue(a.data)
				if n < 0 || n > len(a.data) {
					t.Fatalf("Enqueue(%d bytes) = %d", len(a.data), n)
				}
			} else {
				do(s, a)
			}
			st := s.Save()
			limit := 1
			if st.FCR&1 != 0 {
				limit = serial.FIFOSize
			}
			if len(st.RX) > limit {
				t.Fatalf("RX holds %d bytes, limit %d", len(st.RX), limit)
			}
			gate := st.MCR&0x08 != 0 && st.MCR&0x10 == 0
			if want := gate && serialPending(st); irq.level != want || s.IRQLevel() != want {
				t.Fatalf("IRQ line %v (device says %v), want %v for %+v", irq.level, s.IRQLevel(), want, st)
			}
			if irq.redundant != 0 {
				t.Fatalf("SetLevel called %d times without a change", irq.redundant)
			}
			// Round trip into a fresh device, and ask its IIR.
			var irq2 fakeIRQ
			r := serial.New(nil, &irq2)
			if err := r.Restore(st); err != nil {
				t.Fatalf("Restore(Save()) = %v for %+v", err, st)
			}
			if st2 := r.Save(); !reflect.DeepEqual(st, st2) {
				t.Fatalf("Save after Restore (-want +got):\n%s", cmp.Diff(st, st2, cmpopts.EquateEmpty()))
			}
			if irq2.level != irq.level {
				t.Fatalf("restored IRQ line %v, original %v", irq2.level, irq.level)
			}
			if st.LCR&0x80 == 0 {
				var iir [1]byte
				r.Read(2, iir[:])
				if pending := iir[0]&1 == 0; pending != serialPending(st) {
					t.Fatalf("IIR %#x, pending from state %v, for %+v", iir[0], serialPending(st), st)
				}
				if fifo := iir[0]&0xc0 == 0xc0; fifo != (st.FCR&1 != 0) || iir[0]&0x30 != 0 {
					t.Fatalf("IIR %#x with FCR %#x", iir[0], st.FCR)
				}
			}
		})
		st := s.Save()
		r := serial.New(nil, nil)
		if err := r.Restore(st); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(st, r.Save(), cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("final Save after Restore (-want +got):\n%s", diff)
		}
	})
}

// isBCD reports whether b holds two decimal digits.
func isBCD(b uint8) bool { return b>>4 <= 9 && b&0x0f <= 9 }

func FuzzRTC(f *testing.F) {
	f.Add(step(wr(0, 0x0a), rd(1), wr(0, 0), rd(1), wr(0, 2), rd(1), wr(0, 4), rd(1), wr(0, 0x32), rd(1)))
	// Set the time: SET, write the clock, clear SET.
	f.Add(step(wr(0, 0x0b), wr(1, 0x82), wr(0, 9), wr(1, 0x99), wr(0, 8), wr(1, 0x12), wr(0, 7), wr(1, 0x31),
		wr(0, 4), wr(1, 0x23), wr(0, 0x0b), wr(1, 0x02), wr(0, 0), rd(1), []byte{opTick, 0, 200}, rd(1)))
	// Binary, 12-hour, NMI mask, CMOS memory.
	f.Add(step(wr(0, 0x8b), wr(1, 0x04), wr(0, 4), rd(1), wr(1, 0x8c), rd(1), wr(0, 0x40), wr(1, 0x55), rd(1)))
	f.Add([]byte{0x11, 1, 0, 0x15, 0, 0, 0x80, 0xff, 0, 0xe1, 0x10, 1, 0x19, 3, 0x80})

	f.Fuzz(func(t *testing.T, data []byte) {
		now := time.Date(2024, 2, 29, 23, 59, 58, 999_000_000, time.UTC)
		clock := func() time.Time { return now }
		r := rtc.New(clock)
		r.SetLogger(quiet)
		decode(data, rtc.Size, func(a access) {
			switch a.kind {
			case opHost, opTick:
				now = now.Add(time.Duration(a.val) * 7 * time.Millisecond)
			default:
				do(r, a)
			}
			st := r.Save()
			r2 := rtc.New(clock)
			if err := r2.Restore(st); err != nil {
				t.Fatalf("Restore(Save()) = %v for %+v", err, st)
			}
			if st2 := r2.Save(); st != st2 {
				t.Fatalf("Save after Restore (-want +got):\n%s", cmp.Diff(st, st2))
			}
			// The restored copy reads the same clock; in BCD mode every
			// clock register holds BCD digits.
			r3 := rtc.New(clock)
			if err := r3.Restore(st); err != nil {
				t.Fatal(err)
			}
			for _, reg := range []uint8{0, 2, 4, 6, 7, 8, 9, 0x32, 0x0a, 0x0c, 0x0d} {
				var v1, v2 [1]byte
				r2.Write(0, []byte{reg})
				r2.Read(1, v1[:])
				r3.Write(0, []byte{reg})
				r3.Read(1, v2[:])
				if v1 != v2 {
					t.Fatalf("register %#x reads %#x and %#x from one state", reg, v1[0], v2[0])
				}
				b := st.CMOS[0x0b]
				if b&0x80 == 0 && b&0x04 == 0 && reg <= 0x32 && reg != 0x0a && reg != 0x0c && reg != 0x0d {
					if !isBCD(v1[0] &^ 0x80) {
						t.Fatalf("register %#x = %#x is not BCD (B %#x)", reg, v1[0], b)
					}
				}
			}
		})
		st := r.Save()
		r2 := rtc.New(clock)
		if err := r2.Restore(st); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(st, r2.Save()); diff != "" {
			t.Fatalf("final Save after Restore (-want +got):\n%s", diff)
		}
	})
}

func FuzzI8042(f *testing.F) {
	const data, cmd = 0, 4
	f.Add(step(rd(cmd), wr(cmd, 0xaa), rd(cmd), rd(data), wr(cmd, 0x20), rd(data), wr(cmd, 0x60), wr(data, 0x47),
		wr(cmd, 0xd3), wr(data, 0x5a), rd(cmd), rd(data), wr(cmd, 0xa7), wr(cmd, 0xa8), wr(cmd, 0xa9), rd(data),
		wr(data, 0xf2), rd(data), wr(cmd, 0xd4), wr(data, 0xff), rd(data)))
	f.Add(step(wr(cmd, 0xd1), wr(data, 0xdf), wr(cmd, 0xd0), rd(data), wr(cmd, 0xfe), wr(cmd, 0xd2), wr(data, 1), rd(data)))
	f.Add(step(host("\x1e\x9e\x1c\x9c"), rd(cmd), rd(data), wr(cmd, 0xad), host("\x01"), wr(cmd, 0x60), wr(data, 0x03)))
	f.Add([]byte{0x11, 1, 0, 0x15, 0, 0, 0x80, 0xff, 0, 0xe1, 0x10, 1, 0x19, 3, 0x80})

	f.Fuzz(func(t *testing.T, in []byte) {
		var kbd, aux fakeIRQ
		resets := 0
		c := i8042.New(&kbd, &aux, func() { resets++ })
		c.SetLogger(quiet)
		decode(in, i8042.Size, func(a access) {
			if a.kind == opHost || a.kind == opTick {
				if n := c.PushScancode(a.data...); n < 0 || n > len(a.data) {
					t.Fatalf("PushScancode(%d bytes) = %d", len(a.data), n)
				}
			} else {
				do(c, a)
			}
			st := c.Save()
			if len(st.Out) > i8042.QueueSize {
				t.Fatalf("output buffer holds %d bytes", len(st.Out))
			}
			var wantKbd, wantAux bool
			if len(st.Out) > 0 {
				wantKbd = !st.Out[0].Aux && st.CommandByte&1 != 0
				wantAux = st.Out[0].Aux && st.CommandByte&2 != 0
			}
			if kbd.level != wantKbd || aux.level != wantAux {
				t.Fatalf("IRQ lines kbd %v aux %v, want %v %v for %+v", kbd.level, aux.level, wantKbd, wantAux, st)
			}
			if kbd.redundant != 0 || aux.redundant != 0 {
				t.Fatalf("SetLevel called without a change")
			}
			var kbd2, aux2 fakeIRQ
			r := i8042.New(&kbd2, &aux2, nil)
			if err := r.Restore(st); err != nil {
				t.Fatalf("Restore(Save()) = %v for %+v", err, st)
			}
			if st2 := r.Save(); !reflect.DeepEqual(st, st2) {
				t.Fatalf("Save after Restore (-want +got):\n%s", cmp.Diff(st, st2, cmpopts.EquateEmpty()))
			}
			if kbd2.level != kbd.level || aux2.level != aux.level {
				t.Fatal("restored IRQ lines differ")
			}
			var s [1]byte
			r.Read(4, s[:])
			if obf := s[0]&1 != 0; obf != (len(st.Out) > 0) || s[0]&0x02 != 0 {
				t.Fatalf("status %#x with %d bytes waiting", s[0], len(st.Out))
			}
		})
		st := c.Save()
		r := i8042.New(nil, nil, nil)
		if err := r.Restore(st); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(st, r.Save(), cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("final Save after Restore (-want +got):\n%s", diff)
		}
	})
}
