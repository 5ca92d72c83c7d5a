package bus

import (
	"testing"
)

type reg struct {
	reads, writes []uint64
}

func (r *reg) Read(off uint64, p []byte) {
	r.reads = append(r.reads, off)
	p[0] = byte(off)
}
func (r *reg) Write(off uint64, p []byte) { r.writes = append(r.writes, off) }

func TestInsertOverlap(t *testing.T) {
	var b Bus
	if err := b.Insert("a", 0x3f8, 8, &reg{}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		base, size uint64
		ok         bool
	}{
		{0x3f0, 8, true},
		{0x3f0, 9, false},
		{0x3ff, 1, false},
		{0x400, 1, true},
		{0x3fa, 2, false},
		{0x100, 0, false},
		{^uint64(0), 2, false},
	} {
		err := b.Insert("b", tc.base, tc.size, &reg{})
		if (err == nil) != tc.ok {
			t.Errorf("Insert(%#x, %d) = %v, want ok=%v", tc.base, tc.size, err, tc.ok)
		}
		if err == nil {
			b.Remove(tc.base)
		}
	}
}

func TestDispatch(t *testing.T) {
	var b Bus
	com, rtc := &reg{}, &reg{}
	b.Insert("com1", 0x3f8, 8, com)
	b.Insert("rtc", 0x70, 2, rtc)
	p := []byte{0}
	if !b.Read(0x3fd, p) || p[0] != 5 {
		t.Fatalf("read 0x3fd: %v %d", com.reads, p[0])
	}
	if !b.Write(0x71, p) || len(rtc.writes) != 1 || rtc.writes[0] != 1 {
		t.Fatalf("write 0x71: %v", rtc.writes)
	}
	q := []byte{0, 0}
	if b.Read(0x400, q) || q[0] != 0xff || q[1] != 0xff {
		t.Fatalf("unclaimed read = %x", q)
	}
	if b.Write(0x6f, p) {
		t.Fatal("unclaimed write claimed")
	}
	if got := len(b.Ranges()); got != 2 {
		t.Fatalf("%d ranges", got)
	}
}

func BenchmarkRead(b *testing.B) {
	var bus Bus
	for i := uint64(0); i < 16; i++ {
		bus.Insert("r", 0x100+i*8, 8, &reg{})
	}
	d := &nopDev{}
	bus.Insert("cf8", 0xcf8, 8, d)
	p := make([]byte, 4)
	b.ReportAllocs()
	for b.Loop() {
		bus.Read(0xcfc, p)
	}
}

type nopDev struct{}

func (nopDev) Read(uint64, []byte)  {}
func (nopDev) Write(uint64, []byte) {}
