package cow_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"collective/devices/virtioblk"
)

// TestDiskSpecBase: --disk PATH,base=BASE creates the overlay and opens
// it again; PATH alone is refused (never opened as a raw file).
func TestDiskSpecBase(t *testing.T) {
	dir := t.TempDir()
	base, ov := filepath.Join(dir, "base.img"), filepath.Join(dir, "vm.cow")
	os.WriteFile(base, bytes.Repeat([]byte{7}, 1<<20), 0o444)
	spec, err := virtioblk.ParseDisk(ov + ",base=" + base + ",serial=root")
	if err != nil {
		t.Fatal(err)
	}
	blk, err := virtioblk.Open(spec)
	if err != nil {
		t.Fatal(err)
	}
	be := blk.Backend()
	if be.Size() != 1<<20 {
		t.Fatalf("size %d", be.Size())
	}
	if _, err := be.WriteAt([]byte("hello"), 4096); err != nil {
		t.Fatal(err)
	}
	if err := be.Close(); err != nil {
		t.Fatal(err)
	}
	// Without base= an overlay is refused, not opened raw, and the base
	// path in its header is not followed.
	spec, _ = virtioblk.ParseDisk(ov)
	if _, err := virtioblk.Open(spec); err == nil || !strings.Contains(err.Error(), "give base=") {
		t.Fatalf("overlay without base=: %v", err)
	}
	spec, _ = virtioblk.ParseDisk(ov + ",ro,base=" + base)
	blk, err = virtioblk.Open(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer blk.Backend().Close()
	b := make([]byte, 8)
	blk.Backend().ReadAt(b, 4094)
	if string(b) != "\x07\x07hello\x07" {
		t.Fatalf("read %q", b)
	}
	// A missing base is an error naming it.
	spec, _ = virtioblk.ParseDisk(filepath.Join(dir, "new.cow") + ",base=" + filepath.Join(dir, "nope.img"))
	if _, err := virtioblk.Open(spec); err == nil || !strings.Contains(err.Error(), "nope.img") {
		t.Fatalf("missing base: %v", err)
	}
}
