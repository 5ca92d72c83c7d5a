package fuzz

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/pierrec/lz4/v4"

	"collective/internal/lz4block"
)

// FuzzLZ4Block compresses arbitrary data, which is what guest memory is
// to the snapshot and migration encoders, with internal/lz4block (whose
// hot path loads and stores unchecked) into a dst of an arbitrary size.
//
// Invariants: no panic; the size is 0 or at most len(dst), and it is 0
// only when dst is shorter than lz4block.CompressBound; pierrec/lz4
// decodes the block back to exactly the input; the same input compresses
// to the same bytes again on the same Compressor (its table carries
// entries from earlier calls, which must never be used). Run with -race
// for checkptr's bounds checks of the unchecked accesses.
func FuzzLZ4Block(f *testing.F) {
	pattern := make([]byte, 4096)
	for off := 0; off < len(pattern); off += 8 {
		binary.LittleEndian.PutUint64(pattern[off:], uint64(off)^0x5a5a0000deadbeef)
	}
	f.Add([]byte{}, uint32(16))
	f.Add([]byte("abcabcabcabcabcabc"), uint32(10))
	f.Add(bytes.Repeat([]byte{0}, 70000), uint32(1<<20))
	f.Add(pattern, uint32(2100))
	f.Add(pattern, uint32(4096))
	var c lz4block.Compressor
	f.Fuzz(func(t *testing.T, src []byte, dstLen uint32) {
		dst := make([]byte, int(dstLen%(1<<20)))
		n := c.Compress(dst, src)
		bound := lz4block.CompressBound(len(src))
		switch {
		case n < 0 || n > len(dst):
			t.Fatalf("size %d, dst %d", n, len(dst))
		case n == 0 && len(dst) >= bound:
			t.Fatalf("%d bytes did not fit in %d >= CompressBound %d", len(src), len(dst), bound)
		case n == 0:
			return
		}
		out := make([]byte, len(src))
		k, err := lz4.UncompressBlock(dst[:n], out)
		if err != nil || k != len(src) || !bytes.Equal(out, src) {
			t.Fatalf("%d bytes -> %d: decoded %d, %v", len(src), n, k, err)
		}
		again := make([]byte, len(dst))
		if m := c.Compress(again, src); m != n || !bytes.Equal(again[:m], dst[:n]) {
			t.Fatalf("compressed again: %d bytes, first time %d (or different bytes)", m, n)
		}
	})
}
