package cow

import (
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkDisk compares a raw file (what virtioblk.Raw does: pread and
// pwrite on it) with an overlay over the same bytes: sequential 1 MiB
// writes and reads, 4 KiB random reads. overlay-base reads clusters the
// overlay does not hold (through to the base); overlay reads and writes
// clusters it holds; overlay-new writes into a fresh overlay (every
// write allocates). Writes sync every 64 MiB.
func BenchmarkDisk(b *testing.B) {
	const size = 256 << 20
	dir := b.TempDir()
	basePath := filepath.Join(dir, "base.img")
	rawPath := filepath.Join(dir, "raw.img")
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i * 7)
	}
	for _, p := range []string{basePath, rawPath} {
		f, err := os.Create(p)
		if err != nil {
			b.Fatal(err)
		}
		for off := int64(0); off < size; off += int64(len(chunk)) {
			f.WriteAt(chunk, off)
		}
		f.Sync()
		f.Close()
	}
	raw, err := os.OpenFile(rawPath, os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer raw.Close()
	newOverlay := func(name string) *Overlay {
		p := filepath.Join(dir, name)
		os.Remove(p)
		if err := Create(p, basePath, CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		o, err := Open(p, basePath, false)
		if err != nil {
			b.Fatal(err)
		}
		return o
	}
	empty := newOverlay("empty.cow") // reads go to the base
	defer empty.Close()
	full := newOverlay("full.cow") // every cluster held
	defer full.Close()
	for off := int64(0); off < size; off += int64(len(chunk)) {
		full.WriteAt(chunk, off)
	}
	full.Sync()

	type disk interface {
		io.ReaderAt
		io.WriterAt
	}
	sync := func(d disk) {
		switch d := d.(type) {
		case *os.File:
			d.Sync()
		case *Overlay:
			d.Sync()
		}
	}
	seqWrite := func(b *testing.B, d disk, fresh func() disk) {
		b.SetBytes(1 << 20)
		b.ReportAllocs()
		off := int64(0)
		for b.Loop() {
			if off == size {
				off = 0
				sync(d)
				if fresh != nil {
					b.StopTimer()
					d = fresh()
					b.StartTimer()
				}
			}
			if _, err := d.WriteAt(chunk, off); err != nil {
				b.Fatal(err)
			}
			off += 1 << 20
			if off%(64<<20) == 0 {
				sync(d)
			}
		}
	}
	seqRead := func(b *testing.B, d disk) {
		buf := make([]byte, 1<<20)
		b.SetBytes(1 << 20)
		b.ReportAllocs()
		off := int64(0)
		for b.Loop() {
			if _, err := d.ReadAt(buf, off); err != nil {
				b.Fatal(err)
			}
			off = (off + 1<<20) % size
		}
	}
	randRead := func(b *testing.B, d disk) {
		buf := make([]byte, 4096)
		rng := rand.New(rand.NewPCG(1, 2))
		b.SetBytes(4096)
		b.ReportAllocs()
		for b.Loop() {
			if _, err := d.ReadAt(buf, rng.Int64N(size/4096)*4096); err != nil {
				b.Fatal(err)
			}
		}
	}
	var fresh *Overlay
	b.Run("seqwrite1M/raw", func(b *testing.B) { seqWrite(b, raw, nil) })
	b.Run("seqwrite1M/overlay", func(b *testing.B) { seqWrite(b, full, nil) })
	b.Run("seqwrite1M/overlay-new", func(b *testing.B) {
		mk := func() disk {
			if fresh != nil {
				fresh.Close()
			}
			fresh = newOverlay("fresh.cow")
			return fresh
		}
		seqWrite(b, mk(), mk)
	})
	if fresh != nil {
		fresh.Close()
	}
	b.Run("seqread1M/raw", func(b *testing.B) { seqRead(b, raw) })
	b.Run("seqread1M/overlay", func(b *testing.B) { seqRead(b, full) })
	b.Run("seqread1M/overlay-base", func(b *testing.B) { seqRead(b, empty) })
	b.Run("randread4K/raw", func(b *testing.B) { randRead(b, raw) })
	b.Run("randread4K/overlay", func(b *testing.B) { randRead(b, full) })
	b.Run("randread4K/overlay-base", func(b *testing.B) { randRead(b, empty) })
}
