package cow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

var updateGolden = flag.Bool("update", false, "rewrite testdata/golden-1.0.cow")

func openT(t *testing.T, path, base string) *Overlay {
	t.Helper()
	o, err := Open(path, base, false)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

func readT(t *testing.T, o *Overlay, off, n int64) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := o.ReadAt(b, off); err != nil {
		t.Fatalf("ReadAt(%d, %d): %v", off, n, err)
	}
	return b
}

func TestReadThrough(t *testing.T) {
	// The base ends inside a cluster and the disk is larger: the rest
	// reads as zeros.
	d := newTestDisk(t, 100_000, 256<<10, 64<<10)
	o := openT(t, d.ovPath, d.basePath)
	defer o.Close()
	if o.Size() != 256<<10 {
		t.Fatalf("size %d", o.Size())
	}
	got := readT(t, o, 0, o.Size())
	want := make([]byte, o.Size())
	copy(want, d.base)
	if !bytes.Equal(got, want) {
		t.Fatal("a fresh overlay does not read as its base")
	}
	// Unaligned reads across the base's end.
	if got := readT(t, o, 99_990, 30); !bytes.Equal(got, want[99_990:100_020]) {
		t.Fatalf("read across the base's end: %x", got)
	}
	if st := o.Stats(); st.Allocated != 0 || st.Zero != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestCopyOnWritePartial(t *testing.T) {
	d := newTestDisk(t, 256<<10, 0, 64<<10)
	o := openT(t, d.ovPath, "") // base from the header's hint
	want := clone(d.base)
	for _, w := range []struct{ off, n int64 }{
		{512, 512},            // inside cluster 0
		{64<<10 - 700, 1400},  // across clusters 0 and 1
		{128 << 10, 64 << 10}, // all of cluster 2
		{200<<10 + 3, 5},      // unaligned bytes in cluster 3
		{128<<10 + 100, 100},  // in place in an allocated cluster
	} {
		p := bytes.Repeat([]byte{byte(w.off)}, int(w.n))
		if _, err := o.WriteAt(p, w.off); err != nil {
			t.Fatal(err)
		}
		copy(want[w.off:], p)
	}
	if got := readT(t, o, 0, o.Size()); !bytes.Equal(got, want) {
		t.Fatal("contents differ after partial writes")
	}
	if st := o.Stats(); st.Allocated != 4 {
		t.Fatalf("allocated %d clusters, want 4", st.Allocated)
	}
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	if fileHash(t, d.basePath) != d.baseHash {
		t.Fatal("the base changed")
	}
	o = openT(t, d.ovPath, d.basePath)
	defer o.Close()
	if got := readT(t, o, 0, o.Size()); !bytes.Equal(got, want) {
		t.Fatal("contents differ after reopening")
	}
}

func TestDiscardAndZero(t *testing.T) {
	const cs = 64 << 10
	d := newTestDisk(t, 512<<10, 0, cs)
	o := openT(t, d.ovPath, d.basePath)
	defer o.Close()
	want := clone(d.base)
	write := func(off, n int64) {
		p := bytes.Repeat([]byte{0xab}, int(n))
		if _, err := o.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	zero := func(fn func(off, n int64) error, off, n int64) {
		if err := fn(off, n); err != nil {
			t.Fatal(err)
		}
		clear(want[off : off+n])
	}
	write(0, 2*cs)
	if err := o.Sync(); err != nil { // cluster 0's mapping is durable
		t.Fatal(err)
	}
	zero(o.Punch, 0, cs)          // whole allocated cluster: zero flag, released
	zero(o.Zero, cs+512, 1024)    // part of an allocated cluster
	zero(o.Punch, 2*cs, cs)       // whole base cluster: zero flag, nothing allocated
	zero(o.Zero, 3*cs+4096, 4096) // part of a base cluster: copy on write
	zero(o.Punch, 5*cs-512, 1024) // parts of two base clusters
	write(2*cs+100, 50)           // write into a zero cluster
	if got := readT(t, o, 0, o.Size()); !bytes.Equal(got, want) {
		t.Fatal("contents differ")
	}
	st := o.Stats()
	// Allocated: 1 (written), 2 (zero, then written), 3, 4 and 5 (parts).
	if st.Allocated != 5 || st.Zero != 1 {
		t.Fatalf("allocated %d, zero %d; want 5, 1", st.Allocated, st.Zero)
	}
	// The released cluster, named by a durable slot, is reused only after
	// a Sync.
	if st.PendingFrees != 1 || st.FreeClusters != 0 {
		t.Fatalf("pending %d, free %d; want 1, 0", st.PendingFrees, st.FreeClusters)
	}
	if err := o.Sync(); err != nil {
		t.Fatal(err)
	}
	if st := o.Stats(); st.PendingFrees != 0 || st.FreeClusters != 1 {
		t.Fatalf("after sync: pending %d, free %d; want 0, 1", st.PendingFrees, st.FreeClusters)
	}
	write(7*cs, cs) // takes the free cluster
	if st := o.Stats(); st.FreeClusters != 0 || st.PhysClusters != 6 {
		t.Fatalf("after reuse: free %d, physical %d; want 0, 6", st.FreeClusters, st.PhysClusters)
	}
	if got := readT(t, o, 0, o.Size()); !bytes.Equal(got, want) {
		t.Fatal("contents differ after reuse")
	}
}

// A guest that writes and discards one cluster without flushing must not
// grow the file: a cluster never named by a durable slot is reused at once.
func TestDiscardLoopDoesNotGrow(t *testing.T) {
	d := newTestDisk(t, 64<<10, 0, 4096)
	o := openT(t, d.ovPath, d.basePath)
	defer o.Close()
	p := make([]byte, 4096)
	p[0] = 1
	for range 1000 {
		if _, err := o.WriteAt(p, 0); err != nil {
			t.Fatal(err)
		}
		if err := o.Punch(0, 4096); err != nil {
			t.Fatal(err)
		}
	}
	if st := o.Stats(); st.PhysClusters > 1 {
		t.Fatalf("%d physical clusters after a write/discard loop", st.PhysClusters)
	}
}

func TestTwoOverlaysOneBase(t *testing.T) {
	d := newTestDisk(t, 256<<10, 0, 64<<10)
	other := filepath.Join(d.dir, "vm2.cow")
	if err := Create(other, d.basePath, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	a, b := openT(t, d.ovPath, d.basePath), openT(t, other, d.basePath)
	pa, pb := bytes.Repeat([]byte{'a'}, 1000), bytes.Repeat([]byte{'b'}, 3000)
	a.WriteAt(pa, 5000)
	b.WriteAt(pb, 70000)
	wa, wb := clone(d.base), clone(d.base)
	copy(wa[5000:], pa)
	copy(wb[70000:], pb)
	for _, c := range []struct {
		o    *Overlay
		want []byte
	}{{a, wa}, {b, wb}} {
		if got := readT(t, c.o, 0, c.o.Size()); !bytes.Equal(got, c.want) {
			t.Fatal("one overlay sees the other's writes")
		}
		if err := c.o.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if fileHash(t, d.basePath) != d.baseHash {
		t.Fatal("the base changed")
	}
}

func TestOpenLocks(t *testing.T) {
	d := newTestDisk(t, 64<<10, 0, 4096)
	o := openT(t, d.ovPath, d.basePath)
	defer o.Close()
	if _, err := Open(d.ovPath, d.basePath, false); !errors.Is(err, ErrInUse) {
		t.Fatalf("second writer: %v, want ErrInUse", err)
	}
	if _, err := Open(d.ovPath, d.basePath, true); !errors.Is(err, ErrInUse) {
		t.Fatalf("reader while a writer: %v, want ErrInUse", err)
	}
}

func TestCreateRefusesExisting(t *testing.T) {
	d := newTestDisk(t, 64<<10, 0, 4096)
	if err := Create(d.ovPath, d.basePath, CreateOptions{}); err == nil {
		t.Fatal("Create over an existing overlay succeeded")
	}
	for _, opt := range []CreateOptions{{ClusterSize: 3000}, {ClusterSize: 4 << 20}, {Size: 1000}, {Size: 64<<10 + 100}} {
		if err := Create(filepath.Join(d.dir, "x.cow"), d.basePath, opt); err == nil {
			t.Errorf("Create with %+v succeeded", opt)
		}
	}
}

// TestConcurrent runs writers, readers, discards and syncs at once (run
// with -race); each goroutine owns its clusters and checks them.
func TestConcurrent(t *testing.T) {
	const cs, per = 4096, 8
	d := newTestDisk(t, 256<<10, 512<<10, cs)
	o := openT(t, d.ovPath, d.basePath)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 1))
			lo := int64(g*per) * cs
			want := make([]byte, per*cs)
			copy(want, d.base[min(lo, int64(len(d.base))):])
			for i := range 300 {
				off := rng.Int64N(per*cs - 512)
				n := 1 + rng.Int64N(min(per*cs-off, 3*cs))
				switch rng.IntN(5) {
				case 0:
					if err := o.Punch(lo+off, n); err != nil {
						t.Error(err)
						return
					}
					clear(want[off : off+n])
				case 1:
					if err := o.Sync(); err != nil {
						t.Error(err)
						return
					}
				default:
					p := bytes.Repeat([]byte{byte(g*16 + i)}, int(n))
					if _, err := o.WriteAt(p, lo+off); err != nil {
						t.Error(err)
						return
					}
					copy(want[off:], p)
				}
				got := make([]byte, per*cs)
				if _, err := o.ReadAt(got, lo); err != nil {
					t.Error(err)
					return
				}
				if !bytes.Equal(got, want) {
					t.Errorf("goroutine %d step %d: contents differ", g, i)
					return
				}
			}
		})
	}
	wg.Wait()
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(d.ovPath, d.basePath, false); err != nil {
		t.Fatalf("reopening: %v", err)
	}
}

// fixCRC recomputes the header checksum after a field was changed.
func fixCRC(b []byte) {
	binary.LittleEndian.PutUint32(b[crcOffset:], crc32.Checksum(b[:crcOffset], castagnoli()))
}

// TestCorruptRefused damages a valid overlay in one way each and checks
// that open names the problem.
func TestCorruptRefused(t *testing.T) {
	const cs = 4096
	d := newTestDisk(t, 64<<10, 0, cs)
	o := openT(t, d.ovPath, d.basePath)
	o.WriteAt(bytes.Repeat([]byte{1}, 3*cs), 0) // clusters 0..2 -> physical 2..4
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	good, err := os.ReadFile(d.ovPath)
	if err != nil {
		t.Fatal(err)
	}
	dataStart := uint32(2)
	pair := func(vc int) int { return HeaderSize + vc*pairSize }
	setSlot := func(b []byte, vc, which int, s slot) {
		encodeSlot(b[pair(vc)+which*slotSize:], uint64(vc), s)
	}
	le := binary.LittleEndian
	otherBase := filepath.Join(d.dir, "other.img")
	b2 := clone(d.base)
	b2[100] ^= 1
	os.WriteFile(otherBase, b2, 0o444)
	shortBase := filepath.Join(d.dir, "short.img")
	os.WriteFile(shortBase, d.base[:1000], 0o444)

	for _, c := range []struct {
		name   string
		damage func(b []byte) []byte
		base   string
		want   string
		is     error
	}{
		{"empty file", func(b []byte) []byte { return nil }, "", "bad magic", ErrCorrupt},
		{"bad magic", func(b []byte) []byte { b[0] = 'X'; return b }, "", "bad magic", ErrCorrupt},
		{"short header", func(b []byte) []byte { return b[:100] }, "", "truncated header", ErrCorrupt},
		{"header checksum", func(b []byte) []byte { b[20]++; return b }, "", "header checksum mismatch", ErrCorrupt},
		{"newer major", func(b []byte) []byte { le.PutUint16(b[8:], 2); fixCRC(b); return b }, "", "unsupported format version 2.0", ErrCorrupt},
		{"newer minor", func(b []byte) []byte { le.PutUint16(b[10:], 1); fixCRC(b); return b }, "", "unsupported format version 1.1", ErrCorrupt},
		{"cluster size", func(b []byte) []byte { le.PutUint32(b[12:], 30); fixCRC(b); return b }, "", "cluster size 2^30 out of range", ErrCorrupt},
		{"virtual size", func(b []byte) []byte { le.PutUint64(b[16:], 1000); fixCRC(b); return b }, "", "virtual size 1000", ErrCorrupt},
		{"huge virtual size", func(b []byte) []byte { le.PutUint64(b[16:], 1<<50); fixCRC(b); return b }, "", "above 16777216 clusters", ErrCorrupt},
		{"cluster count", func(b []byte) []byte { le.PutUint64(b[24:], 99); fixCRC(b); return b }, "", "cluster count 99", ErrCorrupt},
		{"table offset", func(b []byte) []byte { le.PutUint64(b[32:], 0); fixCRC(b); return b }, "", "table offset", ErrCorrupt},
		{"data offset", func(b []byte) []byte { le.PutUint64(b[40:], 0); fixCRC(b); return b }, "", "data offset", ErrCorrupt},
		{"base size", func(b []byte) []byte { le.PutUint64(b[48:], 1<<40); fixCRC(b); return b }, "", "base size", ErrCorrupt},
		{"hint length", func(b []byte) []byte { le.PutUint16(b[88:], 5000); fixCRC(b); return b }, "", "base path hint", ErrCorrupt},
		{"truncated table", func(b []byte) []byte { return b[:HeaderSize+100] }, "", "truncated", ErrCorrupt},
		{"both slots bad", func(b []byte) []byte { b[pair(1)+3]++; b[pair(1)+slotSize+3]++; return b }, "", "both slots of cluster 1 fail their checksum", ErrCorrupt},
		{"same seq", func(b []byte) []byte {
			setSlot(b, 1, 0, slot{seq: 7, val: dataStart + 1})
			setSlot(b, 1, 1, slot{seq: 7, val: valZero})
			return b
		}, "", "both slots of cluster 1 carry seq 7", ErrCorrupt},
		{"entry before data", func(b []byte) []byte { setSlot(b, 5, 0, slot{seq: 9, val: 1}); return b }, "", "cluster 5 maps physical cluster 1, outside the data area", ErrCorrupt},
		{"entry past data area", func(b []byte) []byte { setSlot(b, 5, 0, slot{seq: 9, val: 1000}); return b }, "", "outside the data area", ErrCorrupt},
		{"entry past EOF", func(b []byte) []byte { setSlot(b, 5, 0, slot{seq: 9, val: dataStart + 10}); return b }, "", "cluster 5 maps physical cluster 12, past the end of the file", ErrCorrupt},
		{"overlap", func(b []byte) []byte { setSlot(b, 5, 0, slot{seq: 9, val: dataStart + 1}); return b }, "", "clusters 1 and 5 both map physical cluster 3 (overlap)", ErrCorrupt},
		{"wrong base hash", func(b []byte) []byte { return b }, otherBase, "has SHA-256", ErrBaseMismatch},
		{"wrong base size", func(b []byte) []byte { return b }, shortBase, "is 1000 bytes", ErrBaseMismatch},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "bad.cow")
			if err := os.WriteFile(p, c.damage(clone(good)), 0o644); err != nil {
				t.Fatal(err)
			}
			base := c.base
			if base == "" {
				base = d.basePath
			}
			o, err := Open(p, base, false)
			if err == nil {
				o.Close()
				t.Fatal("opened")
			}
			if !strings.Contains(err.Error(), c.want) || !errors.Is(err, c.is) {
				t.Fatalf("error %q, want one containing %q and matching %v", err, c.want, c.is)
			}
		})
	}
}

// TestTornSlot: a torn write into the non-current slot leaves the previous
// entry in force.
func TestTornSlot(t *testing.T) {
	const cs = 4096
	d := newTestDisk(t, 64<<10, 0, cs)
	o := openT(t, d.ovPath, d.basePath)
	o.Punch(0, cs) // cluster 0: slot 0 zero
	o.Sync()
	o.WriteAt(bytes.Repeat([]byte{1}, cs), 0) // slot 1 mapped
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(d.ovPath)
	b[HeaderSize+slotSize+9] ^= 0xff // tear slot 1
	os.WriteFile(d.ovPath, b, 0o644)
	o = openT(t, d.ovPath, d.basePath)
	defer o.Close()
	if got := readT(t, o, 0, cs); !allZero(got) {
		t.Fatalf("cluster 0 reads %x..., want the previous entry: zeros", got[:8])
	}
	if st := o.Stats(); st.TornRepaired != 1 {
		t.Fatalf("torn slots %d, want 1", st.TornRepaired)
	}
}

// TestGolden opens a version 1.0 overlay made by an earlier build: a
// guard against format changes.
func TestGolden(t *testing.T) {
	base := filepath.Join("testdata", "golden-base.img")
	ov := filepath.Join("testdata", "golden-1.0.cow")
	if *updateGolden {
		os.Remove(ov)
		os.WriteFile(base, goldenBase(), 0o644)
		if err := Create(ov, base, CreateOptions{ClusterSize: 4096}); err != nil {
			t.Fatal(err)
		}
		o := openT(t, ov, base)
		o.WriteAt(bytes.Repeat([]byte{0xc0}, 5000), 3000)
		o.Punch(8192, 4096)
		o.Sync()
		o.WriteAt([]byte("second generation"), 3000)
		if err := o.Close(); err != nil {
			t.Fatal(err)
		}
		// The header's hint is this machine's path: make it relative.
		b, _ := os.ReadFile(ov)
		h, _ := decodeHeader(ov, b[:HeaderSize], int64(len(b)))
		h.baseHint = "golden-base.img"
		copy(b, h.encode())
		os.WriteFile(ov, b, 0o644)
	}
	tmp := t.TempDir()
	for _, f := range []string{base, ov} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(tmp, filepath.Base(f)), b, 0o644)
	}
	o, err := Open(filepath.Join(tmp, "golden-1.0.cow"), "", true)
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	want := make([]byte, 20480)
	copy(want, goldenBase())
	copy(want[3000:], bytes.Repeat([]byte{0xc0}, 5000))
	clear(want[8192:12288])
	copy(want[3000:], "second generation")
	if got := readT(t, o, 0, o.Size()); !bytes.Equal(got, want) {
		t.Fatal("golden overlay reads differently")
	}
}

func goldenBase() []byte {
	b := make([]byte, 20000)
	for i := range b {
		b[i] = byte(i * 7)
	}
	return b
}
