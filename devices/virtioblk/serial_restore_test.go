package virtioblk

import (
	"os"
	"path/filepath"
	"testing"
)

// TestRestoreKeepsGuestSerial: a snapshot restored onto a disk file with
// another name (a new overlay) keeps the serial the guest saw
// (regression: restore refused any disk whose default serial differed).
func TestRestoreKeepsGuestSerial(t *testing.T) {
	open := func(name string) *Block {
		p := filepath.Join(t.TempDir(), name)
		if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		b, err := Open(DiskSpec{Path: p, Serial: name})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b.Close() })
		return b
	}
	a, b := open("first.img"), open("second.img")
	if err := b.Restore(a.Save()); err != nil {
		t.Fatal(err)
	}
	if got := b.Save().Serial; got != a.Save().Serial {
		t.Fatalf("serial after restore %q, want %q", got, a.Save().Serial)
	}
}
