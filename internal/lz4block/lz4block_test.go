package lz4block

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"testing"

	"github.com/pierrec/lz4/v4"
)

// roundTrip compresses src with a dst of size bound, checks that
// pierrec/lz4 decodes the block back to src, and returns the size (0 when
// it did not fit).
func roundTrip(t testing.TB, c *Compressor, src []byte, bound int) int {
	t.Helper()
	dst := make([]byte, bound)
	n := c.Compress(dst, src)
	if n == 0 {
		if bound >= CompressBound(len(src)) {
			t.Fatalf("%d bytes did not fit in CompressBound %d", len(src), bound)
		}
		return 0
	}
	if n > bound {
		t.Fatalf("size %d > dst %d", n, bound)
	}
	out := make([]byte, len(src))
	k, err := lz4.UncompressBlock(dst[:n], out)
	if err != nil || k != len(src) || !bytes.Equal(out, src) {
		t.Fatalf("%d bytes: decoded %d bytes, err %v, equal %v", len(src), k, err, bytes.Equal(out[:max(k, 0)], src[:max(k, 0)]))
	}
	return n
}

// pattern is the workload guest's memory pattern (guest/src/main.c):
// address ^ generation mix ^ tag, per 8 bytes.
func pattern(n int, gen uint64) []byte {
	b := make([]byte, n)
	for off := 0; off < n; off += 8 {
		binary.LittleEndian.PutUint64(b[off:], uint64(off)^(gen*0x9e3779b97f4a7c15)^0x5a5a000000000000)
	}
	return b
}

func TestRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var c Compressor
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	text := bytes.Repeat([]byte("the guest is hostile; every byte is checked. "), 2000)
	inputs := map[string][]byte{
		"empty":   {},
		"one":     {7},
		"short":   []byte("abcabcabcab"),
		"13":      []byte("aaaaaaaaaaaaa"),
		"zeros":   make([]byte, 65536),
		"random":  random(65536),
		"pattern": pattern(65536, 3),
		"text":    text,
		"256KiB":  pattern(256<<10, 5),
		"1MiB":    append(random(300<<10), make([]byte, 700<<10)...),
	}
	// Matches longer than the 64 KiB window, and offsets at its edge.
	edge := random(70000)
	copy(edge[65535:], edge[:4000])
	inputs["edge"] = edge
	for name, src := range inputs {
		n := roundTrip(t, &c, src, CompressBound(len(src)))
		t.Logf("%s: %d -> %d", name, len(src), n)
		// Every shorter dst either fits (and decodes) or gives 0.
		for _, b := range []int{0, 1, n - 1, n / 2, len(src) * 7 / 8} {
			if b >= 0 {
				roundTrip(t, &c, src, b)
			}
		}
	}
	if n := roundTrip(t, &c, inputs["zeros"], 1<<20); n > 300 {
		t.Errorf("64 KiB of zeros compress to %d bytes", n)
	}
	if n := roundTrip(t, &c, inputs["random"], len(inputs["random"])); n != 0 {
		t.Errorf("random data fit in its own size: %d", n)
	}
}

// TestSameOffset checks the same-offset try after a match: records whose
// first byte differs compress to about half, every length near the
// block's end (where the try must stop) round-trips, and so do records
// whose repeat breaks off at random.
func TestSameOffset(t *testing.T) {
	var c Compressor
	src := pattern(65536, 7)
	if n := roundTrip(t, &c, src, CompressBound(len(src))); n > len(src)*51/100 {
		t.Errorf("the pattern compresses to %d of %d bytes", n, len(src))
	}
	for n := 0; n <= 80; n++ {
		roundTrip(t, &c, src[:n], CompressBound(n))
		roundTrip(t, &c, src[:len(src)-n], CompressBound(len(src)-n))
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for range 50 {
		b := pattern(4096, rng.Uint64())
		for range 40 {
			b[rng.IntN(len(b))] = byte(rng.Uint32())
		}
		roundTrip(t, &c, b, CompressBound(len(b)))
	}
}

// TestTableReset runs the compressor past the point where its positions
// wrap, so that it clears its table, and checks every block on the way.
func TestTableReset(t *testing.T) {
	var c Compressor
	c.base = 1<<32 - 3*maxOffset
	src := pattern(65536, 1)
	for range 4 {
		roundTrip(t, &c, src, CompressBound(len(src)))
	}
	if c.base > 1<<20 {
		t.Errorf("base %#x: the table was not reset", c.base)
	}
}

// TestRatio: on the guest's pattern and on text, the size is within 2% of
// pierrec/lz4's.
func TestRatio(t *testing.T) {
	var c Compressor
	var pc lz4.Compressor
	for name, src := range map[string][]byte{"pattern": pattern(65536, 3), "text": bytes.Repeat([]byte("snapshot, restore, migrate; "), 2300)} {
		ours := roundTrip(t, &c, src, CompressBound(len(src)))
		dst := make([]byte, lz4.CompressBlockBound(len(src)))
		theirs, err := pc.CompressBlock(src, dst)
		if err != nil {
			t.Fatal(err)
		}
		if float64(ours) > 1.02*float64(theirs) {
			t.Errorf("%s: %d bytes, pierrec/lz4 %d", name, ours, theirs)
		}
	}
}

// BenchmarkCompress compares the two encoders on 64 KiB blocks of the
// workload guest's pattern, of incompressible data and of an executable
// (the test binary: code and data, as in a guest's memory), and reports
// the compressed size per input byte.
func BenchmarkCompress(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 2))
	random := make([]byte, 64<<10)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	exe, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	code, err := os.ReadFile(exe)
	if err != nil {
		b.Fatal(err)
	}
	code = code[:min(len(code), 4<<20)/blockSize*blockSize]
	for _, in := range []struct {
		name string
		src  []byte
	}{{"pattern", pattern(64<<10, 3)}, {"random", random}, {"executable", code}} {
		dst := make([]byte, CompressBound(blockSize))
		b.Run(in.name+"/lz4block", func(b *testing.B) {
			var c Compressor
			b.SetBytes(int64(len(in.src)))
			n := 0
			for range b.N {
				n = 0
				for off := 0; off < len(in.src); off += blockSize {
					n += c.Compress(dst, in.src[off:off+blockSize])
				}
			}
			b.ReportMetric(float64(n)/float64(len(in.src)), "size/byte")
		})
		b.Run(in.name+"/pierrec", func(b *testing.B) {
			var c lz4.Compressor
			b.SetBytes(int64(len(in.src)))
			n := 0
			for range b.N {
				n = 0
				for off := 0; off < len(in.src); off += blockSize {
					k, _ := c.CompressBlock(in.src[off:off+blockSize], dst)
					n += k
				}
			}
			b.ReportMetric(float64(n)/float64(len(in.src)), "size/byte")
		})
	}
}

// blockSize is the benchmark's block: a snapshot's page group.
const blockSize = 64 << 10
