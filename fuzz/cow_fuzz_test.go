package fuzz

import (
	"bytes"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"collective/devices/virtioblk/cow"
)

// cowBase is the fuzz overlays' base: 40 KiB + 1000 bytes, so that the
// last cluster is partly past its end.
func cowBase() []byte {
	b := make([]byte, 40<<10+1000)
	for i := range b {
		b[i] = byte(i*13 + i>>9)
	}
	return b
}

// cowSeeds makes overlays over base: fresh, written, discarded, with torn
// history, in 4 KiB and 64 KiB clusters.
func cowSeeds(f *testing.F, dir, base string) [][]byte {
	var out [][]byte
	for i, cs := range []int64{4096, 64 << 10} {
		p := filepath.Join(dir, "seed"+string(rune('a'+i))+".cow")
		if err := cow.Create(p, base, cow.CreateOptions{ClusterSize: cs, Size: 64 << 10}); err != nil {
			f.Fatal(err)
		}
		fresh, _ := os.ReadFile(p)
		out = append(out, fresh)
		o, err := cow.Open(p, base, false)
		if err != nil {
			f.Fatal(err)
		}
		o.WriteAt(bytes.Repeat([]byte{0xaa}, 6000), 1000)
		o.Punch(16<<10, 8<<10)
		o.Sync()
		o.WriteAt([]byte("again"), 30000)
		o.Zero(0, 4096)
		if err := o.Close(); err != nil {
			f.Fatal(err)
		}
		b, _ := os.ReadFile(p)
		out = append(out, b)
	}
	return out
}

// FuzzOverlayOpen opens arbitrary bytes as an overlay over a fixed base.
// Invariants: open errors (with a nil overlay) or gives an overlay whose
// every read inside the disk succeeds and whose reads outside fail; the
// memory open allocates stays under a cap proportional to the input; an
// overlay that opened takes a write and a sync and opens again with the
// write in it. Never a panic.
func FuzzOverlayOpen(f *testing.F) {
	dir := f.TempDir()
	base := filepath.Join(dir, "base.img")
	if err := os.WriteFile(base, cowBase(), 0o444); err != nil {
		f.Fatal(err)
	}
	for _, s := range cowSeeds(f, dir, base) {
		f.Add(s)
	}
	if g, err := os.ReadFile(filepath.Join("..", "devices", "virtioblk", "cow", "testdata", "golden-1.0.cow")); err == nil {
		f.Add(g) // another base: reaches the base check
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		p := filepath.Join(t.TempDir(), "ov.cow")
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		o, err := cow.Open(p, base, false)
		runtime.ReadMemStats(&after)
		if limit := uint64(4<<20 + 16*len(data)); after.TotalAlloc-before.TotalAlloc > limit {
			t.Fatalf("open allocated %d bytes for a %d-byte file (cap %d)", after.TotalAlloc-before.TotalAlloc, len(data), limit)
		}
		if err != nil {
			if o != nil {
				t.Fatal("error with an overlay")
			}
			return
		}
		size := o.Size()
		st := o.Stats()
		if size <= 0 || size%512 != 0 || st.Clusters > cow.MaxClusters || st.Allocated+st.Zero > st.Clusters {
			t.Fatalf("opened with size %d, stats %+v", size, st)
		}
		// Read up to 64 clusters spread over the disk, and the last bytes.
		buf := make([]byte, st.ClusterSize)
		step := max(1, st.Clusters/64)
		for c := int64(0); c < st.Clusters; c += step {
			n := min(st.ClusterSize, size-c*st.ClusterSize)
			if _, err := o.ReadAt(buf[:n], c*st.ClusterSize); err != nil {
				t.Fatalf("reading cluster %d: %v", c, err)
			}
		}
		if _, err := o.ReadAt(buf[:1], size); err == nil {
			t.Fatal("read past the end succeeded")
		}
		if _, err := o.ReadAt(buf[:1], -1); err == nil {
			t.Fatal("read at -1 succeeded")
		}
		if _, err := o.WriteAt(buf[:1], size); err == nil {
			t.Fatal("write past the end succeeded")
		}
		mark := []byte("fuzz-mark")
		if _, err := o.WriteAt(mark, size-512); err != nil {
			t.Fatalf("write: %v", err)
		}
		if err := o.Punch(0, min(size, 8192)); err != nil {
			t.Fatalf("punch: %v", err)
		}
		if err := o.Close(); err != nil {
			t.Fatalf("close: %v", err)
		}
		o, err = cow.Open(p, base, true)
		if err != nil {
			t.Fatalf("reopening our own writes: %v", err)
		}
		defer o.Close()
		got := make([]byte, len(mark))
		if _, err := o.ReadAt(got, size-512); err != nil || !bytes.Equal(got, mark) {
			t.Fatalf("read back %q, %v", got, err)
		}
	})
}
