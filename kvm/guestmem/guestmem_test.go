package guestmem

import (
	"bytes"
	"errors"
	"sync/atomic"
	"testing"
)

func newTest(t *testing.T) *Memory {
	t.Helper()
	// Two regions with a hole between them, like RAM around the MMIO hole.
	m, err := NewFake(Range{0, 4 * PageSize}, Range{8 * PageSize, 2 * PageSize})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestNewRejects(t *testing.T) {
	for _, tc := range []struct {
		name   string
		ranges []Range
	}{
		{"unaligned address", []Range{{1, PageSize}}},
		{"unaligned size", []Range{{0, 100}}},
		{"empty", []Range{{0, 0}}},
		{"overlap", []Range{{0, 2 * PageSize}, {PageSize, PageSize}}},
		{"wraps", []Range{{^uint64(0) - PageSize + 1, 2 * PageSize}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := NewFake(tc.ranges...); err == nil {
				t.Fatal("NewFake succeeded")
			}
		})
	}
}

func TestBounds(t *testing.T) {
	m := newTest(t)
	for _, tc := range []struct {
		name   string
		gpa, n uint64
		ok     bool
		done   int
	}{
		{"inside", 0, 16, true, 16},
		{"end of first region", 4*PageSize - 8, 8, true, 8},
		{"into the hole", 4*PageSize - 8, 16, false, 8},
		{"in the hole", 5 * PageSize, 1, false, 0},
		{"second region", 8 * PageSize, 2 * PageSize, true, 2 * PageSize},
		{"past the end", 10 * PageSize, 1, false, 0},
		{"near 2^64", ^uint64(0) - 3, 8, false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := make([]byte, tc.n)
			n, err := m.ReadAt(p, tc.gpa)
			if (err == nil) != tc.ok || n != tc.done {
				t.Errorf("ReadAt(%#x, %d) = %d, %v; want %d, ok=%v", tc.gpa, tc.n, n, err, tc.done, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrOutOfRange) {
				t.Errorf("error %v is not ErrOutOfRange", err)
			}
			if got := m.Contains(tc.gpa, tc.n); got != tc.ok {
				t.Errorf("Contains = %v, want %v", got, tc.ok)
			}
			_, serr := m.Slice(tc.gpa, tc.n)
			if (serr == nil) != tc.ok {
				t.Errorf("Slice error = %v, want ok=%v", serr, tc.ok)
			}
		})
	}
}

func TestAdjacentRegions(t *testing.T) {
	m, err := NewFake(Range{0, PageSize}, Range{PageSize, PageSize})
	if err != nil {
		t.Fatal(err)
	}
	in := bytes.Repeat([]byte{0xab}, 64)
	if _, err := m.WriteAt(in, PageSize-32); err != nil {
		t.Fatalf("write across adjacent regions: %v", err)
	}
	out := make([]byte, 64)
	if _, err := m.ReadAt(out, PageSize-32); err != nil || !bytes.Equal(in, out) {
		t.Fatalf("read back %x, %v", out, err)
	}
	if _, err := m.Slice(PageSize-32, 64); err == nil {
		t.Fatal("Slice across regions succeeded; it must lie in one region")
	}
}

func TestDirtyLog(t *testing.T) {
	m := newTest(t)
	if err := m.PutUint32(PageSize+10, 7); err != nil {
		t.Fatal(err)
	}
	if _, err := m.WriteAt(make([]byte, PageSize+2), 8*PageSize+PageSize-1); err == nil {
		t.Fatal("write past the end succeeded")
	}
	if err := m.Zero(2*PageSize, 10); err != nil {
		t.Fatal(err)
	}
	if _, err := m.WriteSlice(3*PageSize, 1); err != nil {
		t.Fatal(err)
	}
	var buf [8]byte
	m.ReadAt(buf[:], 0) // reads never dirty
	r := m.Regions()
	if got := r[0].TakeDirty()[0]; got != 0b1110 {
		t.Errorf("region 0 dirty = %b, want 1110", got)
	}
	// The failed write wrote its first page (partial writes are recorded).
	if got := r[1].TakeDirty()[0]; got != 0b11 {
		t.Errorf("region 1 dirty = %b, want 11", got)
	}
	if got := r[0].TakeDirty()[0]; got != 0 {
		t.Errorf("TakeDirty did not clear: %b", got)
	}
	m.MarkDirty(0, ^uint64(0)) // saturating, no panic
	if got := r[1].TakeDirty()[0]; got != 0b11 {
		t.Errorf("MarkDirty(all) = %b", got)
	}
}

func TestIntegers(t *testing.T) {
	m := newTest(t)
	m.PutUint16(0, 0x1234)
	m.PutUint32(2, 0x89abcdef)
	m.PutUint64(8, 0x0102030405060708)
	a, _ := m.Uint16(0)
	b, _ := m.Uint32(2)
	c, _ := m.Uint64(8)
	if a != 0x1234 || b != 0x89abcdef || c != 0x0102030405060708 {
		t.Fatalf("got %#x %#x %#x", a, b, c)
	}
	if _, err := m.Uint64(4*PageSize - 4); err == nil {
		t.Fatal("read across the hole succeeded")
	}
}

func FuzzAccess(f *testing.F) {
	f.Add(uint64(0), uint64(8), true)
	f.Add(uint64(4*PageSize-1), uint64(2), false)
	f.Fuzz(func(t *testing.T, gpa, n uint64, write bool) {
		m, _ := NewFake(Range{0, 4 * PageSize}, Range{8 * PageSize, 2 * PageSize})
		n %= 3 * PageSize
		p := make([]byte, n)
		var done int
		var err error
		if write {
			done, err = m.WriteAt(p, gpa)
		} else {
			done, err = m.ReadAt(p, gpa)
		}
		if (err == nil) != m.Contains(gpa, n) {
			t.Fatalf("err %v disagrees with Contains", err)
		}
		if err == nil && done != int(n) || done > int(n) {
			t.Fatalf("done %d of %d", done, n)
		}
	})
}

// TestWordsNotTorn is the regression test for torn virtqueue indices: a
// guest moving an index from 0x01ff to 0x0200 in one store must never be
// read as 0x02ff or 0x0100 (two one-byte moves did that under load).
func TestWordsNotTorn(t *testing.T) {
	m, err := NewFake(Range{0, PageSize})
	if err != nil {
		t.Fatal(err)
	}
	w, ok := m.word32(0)
	if !ok {
		t.Skip("fake memory not 4-byte aligned")
	}
	atomic.StoreUint32(w, 0xabcd01ff)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 2_000_000; i++ {
			v := uint32(0x01ff)
			if i%2 == 1 {
				v = 0x0200
			}
			atomic.StoreUint32(w, 0xabcd0000|v) // the guest's single store
		}
	}()
	for {
		select {
		case <-done:
			// The device's own 16-bit store keeps the other half intact.
			if err := m.PutUint16(0, 0x1234); err != nil {
				t.Fatal(err)
			}
			if v, _ := m.Uint32(0); v != 0xabcd1234 {
				t.Fatalf("PutUint16 changed the neighbouring half: %#x", v)
			}
			return
		default:
		}
		if v, _ := m.Uint16(0); v != 0x01ff && v != 0x0200 {
			t.Fatalf("torn read %#x", v)
		}
	}
}
