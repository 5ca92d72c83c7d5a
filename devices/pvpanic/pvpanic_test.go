package pvpanic

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestRegister(t *testing.T) {
	var got []uint8
	d, err := New(func(ev uint8) { got = append(got, ev) })
	if err != nil {
		t.Fatal(err)
	}
	r := (*register)(d)
	p := []byte{0xff, 0xff}
	r.Read(0, p)
	if p[0] != Panicked|CrashLoaded || p[1] != 0 {
		t.Fatalf("read %x, want supported events 03 00", p)
	}
	r.Read(7, p[:1])
	if p[0] != 0 {
		t.Fatalf("offset 7 reads %x", p[0])
	}
	r.Write(4, []byte{Panicked}) // wrong offset: ignored
	r.Write(0, []byte{0xf0})     // unknown bits only: ignored
	r.Write(0, []byte{})         // empty: ignored
	r.Write(0, []byte{0xf0 | Panicked})
	r.Write(0, []byte{CrashLoaded, 0xff})
	if diff := cmp.Diff([]uint8{Panicked, CrashLoaded}, got); diff != "" {
		t.Fatalf("notifications (-want +got):\n%s", diff)
	}
	if d.Events() != Panicked|CrashLoaded {
		t.Fatalf("events %#x", d.Events())
	}
	if id := d.PCI().Save().Data; id[0] != 0x36 || id[1] != 0x1b || id[2] != 0x11 || id[3] != 0 {
		t.Fatalf("PCI ID % x", id[:4])
	}
}

func TestSaveRestore(t *testing.T) {
	d, _ := New(func(uint8) {})
	(*register)(d).Write(0, []byte{Panicked})
	st := d.Save()
	e, _ := New(func(uint8) {})
	if err := e.Restore(st); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(st, e.Save()); diff != "" {
		t.Fatal(diff)
	}
	for _, bad := range []State{{Version: 99}, {Version: StateVersion, Events: 0x80}} {
		if err := e.Restore(bad); err == nil {
			t.Errorf("Restore(%+v) succeeded", bad)
		}
	}
}
