// Package lz4block compresses data into the LZ4 block format (lz4's
// doc/lz4_Block_format.md), the format that github.com/pierrec/lz4/v4's
// UncompressBlock decodes.
//
// It exists for speed: snapshots and migration compress guest memory
// while the machine is paused, and there the encoder is most of the time
// taken. It is lz4's fast mode (one probe per position, a greedy parse, a
// skip that grows over incompressible data) with a position table that is
// never cleared (an earlier call's entries are too far back to be used),
// unchecked loads on its hot path, and one addition: after a match, when
// the next position finds none, the position after it is tried at the
// same offset, without a table lookup. Memory made of fixed-size records
// (arrays of words, structures, page tables) is mostly such matches, one
// byte apart. BenchmarkCompress, on 64 KiB blocks, measured here:
//
//	                         this package          pierrec/lz4 CompressBlock
//	workload guest pattern   1.44 GB/s, 0.500      680 MB/s, 0.502
//	executable (test binary) 409 MB/s, 0.613       349 MB/s, 0.610
//
// (speed, then compressed size per input byte). Without the same-offset
// try the pattern ran at 890 MB/s, and executables (QEMU's, libc) at the
// same speed, 0.5% larger; lz4's own C tool (lz4 -b1 -B4) ran the pattern
// at 750 MB/s.
// TestRatio keeps the size within 2% of pierrec/lz4's.
//
// The unchecked accesses read src and write dst only at offsets that the
// loop's invariants keep in range; each site says which. The tests and
// fuzz.FuzzLZ4Block decode every block with pierrec/lz4 and compare, and
// under -race (checkptr) any access outside src or dst fails.
package lz4block

import (
	"encoding/binary"
	"math/bits"
	"unsafe"
)

const (
	minMatch = 4
	// lastLiterals: the block's last 5 bytes are always literals.
	lastLiterals = 5
	// mfLimit: a match starts at least 12 bytes before the block's end.
	mfLimit   = 12
	maxOffset = 65535

	// tableBits: 4096 entries, 16 KiB, lz4's own default
	// (LZ4_MEMORY_USAGE 14): the table stays in L1. A 64 KiB table
	// (14 bits) compressed executables 1-3% smaller but 25-30% slower
	// here, and the workload guest's pattern 5% slower, to the same size.
	tableBits = 12
	// skipStrength: after 1<<skipStrength probes without a match the
	// search steps 2 bytes at a time, then 3, ...: incompressible data is
	// skipped over quickly.
	skipStrength = 6

	// MaxInputSize is the largest input Compress takes: lz4's own limit.
	MaxInputSize = 0x7E000000
)

// CompressBound returns the largest compressed size of n input bytes.
func CompressBound(n int) int { return n + n/255 + 16 }

// Compressor compresses blocks. Its zero value is ready to use; it holds
// a 16 KiB match table, so keep one per goroutine and reuse it. It is not
// safe for concurrent use.
type Compressor struct {
	// table[h] is base+i of the last position i of an input whose 4
	// bytes hash to h. base grows by more than maxOffset past each input,
	// so an entry of an earlier call is too far away to be used, and the
	// table needs no clearing.
	table [1 << tableBits]uint32
	base  uint32
}

func hash4(u uint32) uint32 { return (u * 2654435761) >> (32 - tableBits) }

// start returns the base of a new input of n bytes.
func (c *Compressor) start(n int) uint32 {
	if uint64(c.base)+uint64(n)+2*maxOffset+2 > 1<<32-1 {
		c.table = [1 << tableBits]uint32{}
		c.base = 0
	}
	b := c.base + maxOffset + 1
	c.base = b + uint32(n)
	return b
}

// Compress compresses src into dst as one LZ4 block and returns its size,
// or 0 when the block would not fit in dst (callers then keep src as it
// is). With len(dst) >= CompressBound(len(src)) it always fits. A dst
// shorter than src makes Compress give up as soon as the output is
// known not to fit, which is quick for incompressible data.
func (c *Compressor) Compress(dst, src []byte) int {
	n := len(src)
	if n > MaxInputSize {
		return 0
	}
	base := c.start(n)
	sp := unsafe.Pointer(unsafe.SliceData(src))
	dp := unsafe.Pointer(unsafe.SliceData(dst))
	le := binary.LittleEndian
	di, anchor := 0, 0
	if n < mfLimit+1 {
		return lastRun(dst, di, src[anchor:])
	}
	last := n - mfLimit          // the last position a match may start at
	matchEnd := n - lastLiterals // matches end before this
	si := 1
	c.table[hash4(le.Uint32(src))] = base
	for {
		// Find a match: probe si, si+step, ... until one is at most
		// maxOffset back and its 4 bytes agree.
		var ref int
		probes := 1 << skipStrength
		for {
			if si > last {
				return lastRun(dst, di, src[anchor:])
			}
			// si <= last = n-12; a candidate is accepted only when it
			// is 1..maxOffset back and not before src (d <= si).
			seq := ld32(sp, si)
			h := hash4(seq)
			pos := base + uint32(si)
			d := pos - c.table[h]
			c.table[h] = pos
			if d-1 < maxOffset && int(d) <= si && ld32(sp, si-int(d)) == seq {
				ref = si - int(d)
				break
			}
			si += probes >> skipStrength
			probes++
		}
		// Extend it backwards into the pending literals.
		for si > anchor && ref > 0 && src[si-1] == src[ref-1] {
			si--
			ref--
		}
		for {
			// Extend it forwards, 8 bytes at a time (end+8 <=
			// matchEnd < n; the reference is behind end).
			end := si + minMatch
			for end+8 <= matchEnd {
				x := ld64(sp, end) ^ ld64(sp, end-(si-ref))
				if x != 0 {
					end += bits.TrailingZeros64(x) >> 3
					goto found
				}
				end += 8
			}
			for end < matchEnd && src[end] == src[end-(si-ref)] {
				end++
			}
		found:
			if ll, ml := si-anchor, end-si-minMatch; ll < 15 && ml < 15 && di+17 <= len(dst) {
				// The common short sequence, in place: the literals
				// go as one or two 8-byte copies, inside src (anchor+8
				// <= si+8 <= last+8 < n; a second copy only when ll > 8,
				// so anchor+16 < si+8); the slack in dst is overwritten
				// later.
				dst[di] = byte(ll<<4 | ml)
				*(*uint64)(unsafe.Add(dp, di+1)) = ld64(sp, anchor)
				if ll > 8 {
					*(*uint64)(unsafe.Add(dp, di+9)) = ld64(sp, anchor+8)
				}
				*(*uint16)(unsafe.Add(dp, di+1+ll)) = uint16(si - ref)
				di += 1 + ll + 2
			} else {
				var ok bool
				if di, ok = sequence(dst, di, src, anchor, si, si-ref, end-si); !ok {
					return 0
				}
			}
			off := si - ref // the match's offset, 1..maxOffset
			si, anchor = end, end
			if si > last {
				return lastRun(dst, di, src[anchor:])
			}
			// Index a position inside the match, then try the next
			// position straight away: runs of matches are common
			// (4 <= si <= last, as in the search above).
			c.table[hash4(ld32(sp, si-2))] = base + uint32(si-2)
			seq := ld32(sp, si)
			h := hash4(seq)
			pos := base + uint32(si)
			d := pos - c.table[h]
			c.table[h] = pos
			if !(d-1 < maxOffset && int(d) <= si && ld32(sp, si-int(d)) == seq) {
				// One literal, then the last match's offset again: the
				// common case in memory of fixed-size records (arrays
				// of words, structures, page tables), where a byte
				// that differs per record ends each match. It is
				// tried without a table lookup (si+1 <= last: the 4
				// bytes are in src; si-off is after the match's own
				// reference, so inside src).
				si++
				if si <= last && ld32(sp, si) == ld32(sp, si-off) {
					c.table[hash4(ld32(sp, si))] = base + uint32(si)
					ref = si - off
					continue
				}
				break
			}
			ref = si - int(d)
		}
	}
}

// sequence appends a sequence (the literals src[anchor:si], then a match
// of length ml at offset off) to dst at di, reporting false when it does
// not fit.
func sequence(dst []byte, di int, src []byte, anchor, si, off, ml int) (int, bool) {
	ll := si - anchor
	// token, literal length, literals, 8 bytes of slack for the short
	// copy, offset, match length.
	if di+1+ll>>7+1+ll+8+2+(ml-minMatch)>>7+1 > len(dst) { // x>>7 >= x/255
		return di, false
	}
	tok := di
	di++
	if ll >= 15 {
		dst[tok] = 15 << 4
		di = putLen(dst, di, ll-15)
	} else {
		dst[tok] = byte(ll) << 4
	}
	if ll <= 8 {
		// si+minMatch <= len(src): the 8 bytes at anchor are in src.
		binary.LittleEndian.PutUint64(dst[di:], binary.LittleEndian.Uint64(src[anchor:]))
	} else {
		copy(dst[di:], src[anchor:si])
	}
	di += ll
	binary.LittleEndian.PutUint16(dst[di:], uint16(off))
	di += 2
	if m := ml - minMatch; m >= 15 {
		dst[tok] |= 15
		di = putLen(dst, di, m-15)
	} else {
		dst[tok] |= byte(m)
	}
	return di, true
}

// lastRun appends the block's closing literals-only sequence and returns
// the block's size, or 0 when it does not fit.
func lastRun(dst []byte, di int, lit []byte) int {
	ll := len(lit)
	if di+1+ll/255+1+ll > len(dst) {
		return 0
	}
	if ll >= 15 {
		dst[di] = 15 << 4
		di = putLen(dst, di+1, ll-15)
	} else {
		dst[di] = byte(ll) << 4
		di++
	}
	di += copy(dst[di:], lit)
	return di
}

// putLen writes the continuation bytes of a length (255s, then the rest).
func putLen(dst []byte, di, v int) int {
	for ; v >= 255; v -= 255 {
		dst[di] = 255
		di++
	}
	dst[di] = byte(v)
	return di + 1
}

// ld32 and ld64 load 4 and 8 bytes at p+i, unchecked: the caller has
// proved i+4 (i+8) <= len of the slice p points into. x86-64 only needs
// no alignment; the package is built for little-endian machines.
func ld32(p unsafe.Pointer, i int) uint32 { return *(*uint32)(unsafe.Add(p, i)) }
func ld64(p unsafe.Pointer, i int) uint64 { return *(*uint64)(unsafe.Add(p, i)) }
