package cow

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func TestCommit(t *testing.T) {
	const cs = 64 << 10
	d := newTestDisk(t, 1<<20, 2<<20, cs)
	o := openT(t, d.ovPath, d.basePath)
	want := make([]byte, 2<<20)
	copy(want, d.base)
	p := bytes.Repeat([]byte("new data"), 5000)
	o.WriteAt(p, 300_000)
	copy(want[300_000:], p)
	o.Punch(0, 4*cs) // a zero run: a hole in the new base
	clear(want[:4*cs])
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	var calls int
	res, err := Commit(d.ovPath, "", out, func(done, total int64) { calls++ })
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(want)
	if res.Hash != sum || filepath.Base(res.Path) != hex.EncodeToString(sum[:])+".img" {
		t.Fatalf("committed %s with hash %x, want %x", res.Path, res.Hash, sum)
	}
	got, err := os.ReadFile(res.Path)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("committed contents differ (%v)", err)
	}
	if res.Written >= int64(len(want)) || calls == 0 {
		t.Fatalf("written %d of %d bytes, %d progress calls", res.Written, len(want), calls)
	}
	var st syscall.Stat_t
	syscall.Stat(res.Path, &st)
	if st.Blocks*512 >= int64(len(want)) {
		t.Fatalf("new base occupies %d bytes: no holes", st.Blocks*512)
	}
	// Its hash is cached, and an overlay over it works.
	if h, cached, err := BaseHash(res.Path, nil); err != nil || !cached || h != sum {
		t.Fatalf("BaseHash: %x cached=%v %v", h, cached, err)
	}
	// Committing again names the same file and leaves it.
	if res2, err := Commit(d.ovPath, "", out, nil); err != nil || !res2.Existed || res2.Path != res.Path {
		t.Fatalf("second commit: %+v %v", res2, err)
	}
	if fileHash(t, d.basePath) != d.baseHash {
		t.Fatal("the base changed")
	}
	inf, err := Inspect(d.ovPath, "", false, nil)
	if err != nil || !inf.BaseMatches || inf.Allocated != 2 || inf.Zero != 4 {
		t.Fatalf("Inspect: %+v %v", inf, err)
	}
}
