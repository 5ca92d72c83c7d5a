package virtioblk

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"collective/devices/virtioblk/cow"
)

// TrackBlockSize is the granularity at which a Tracker records writes:
// the unit of a disk section in a snapshot file and of a disk frame in a
// migration stream.
const TrackBlockSize = 64 << 10

// Tracker is a Backend that records which blocks (TrackBlockSize bytes)
// were written, discarded or zeroed, in two bitmaps: dirty (since the last
// TakeDirty: incremental snapshots and migration rounds) and written
// (since the disk was opened: what a full snapshot must carry on top of
// the disk's origin). A block is marked after its operation completed, so
// that a reader who takes the bitmap and then reads the block sees every
// write marked in it, and a write that races the read is marked again in
// the next bitmap. Marking is lock-free (atomic OR); the bitmaps are
// fixed at open (one bit per block), never sized by the guest.
type Tracker struct {
	be      Backend
	nblocks int64

	dirty   []atomic.Uint64
	written []atomic.Uint64

	// origin caches the hash of blocks never written since open (raw
	// disks: their content is the origin's). Guarded by mu.
	mu          sync.Mutex
	origin      [][HashSize]byte
	originKnown []uint64
}

// HashSize is the size of a block's content hash (SHA-256 truncated).
const HashSize = 16

// NewTracker wraps be.
func NewTracker(be Backend) *Tracker {
	n := (be.Size() + TrackBlockSize - 1) / TrackBlockSize
	w := (n + 63) / 64
	return &Tracker{be: be, nblocks: n, dirty: make([]atomic.Uint64, w), written: make([]atomic.Uint64, w)}
}

// Inner returns the wrapped backend.
func (t *Tracker) Inner() Backend { return t.be }

// Blocks returns the number of blocks (the last may be partial).
func (t *Tracker) Blocks() int64 { return t.nblocks }

// BlockLen returns the length in bytes of block i.
func (t *Tracker) BlockLen(i int64) int64 {
	return min(TrackBlockSize, t.be.Size()-i*TrackBlockSize)
}

func (t *Tracker) mark(off, n int64) {
	if n <= 0 || off < 0 {
		return
	}
	first, last := off/TrackBlockSize, (off+n-1)/TrackBlockSize
	last = min(last, t.nblocks-1)
	for b := first; b <= last; b++ {
		bit := uint64(1) << (b % 64)
		t.dirty[b/64].Or(bit)
		t.written[b/64].Or(bit)
	}
}

// ReadAt implements io.ReaderAt.
func (t *Tracker) ReadAt(p []byte, off int64) (int, error) { return t.be.ReadAt(p, off) }

// WriteAt implements io.WriterAt; the blocks are marked even when the
// write fails (it may have written part).
func (t *Tracker) WriteAt(p []byte, off int64) (int, error) {
	n, err := t.be.WriteAt(p, off)
	t.mark(off, int64(len(p)))
	return n, err
}

// Punch implements Backend.Punch.
func (t *Tracker) Punch(off, n int64) error {
	err := t.be.Punch(off, n)
	t.mark(off, n)
	return err
}

// Zero implements Backend.Zero.
func (t *Tracker) Zero(off, n int64) error {
	err := t.be.Zero(off, n)
	t.mark(off, n)
	return err
}

// Sync implements Backend.Sync.
func (t *Tracker) Sync() error { return t.be.Sync() }

// Size implements Backend.Size.
func (t *Tracker) Size() int64 { return t.be.Size() }

// Close implements Backend.Close.
func (t *Tracker) Close() error { return t.be.Close() }

// TakeDirty returns the blocks marked since the last TakeDirty and clears
// that bitmap.
func (t *Tracker) TakeDirty() []uint64 {
	out := make([]uint64, len(t.dirty))
	for i := range t.dirty {
		out[i] = t.dirty[i].Swap(0)
	}
	return out
}

// GiveBack marks bm's blocks dirty again (a snapshot or a migration round
// that took them failed).
func (t *Tracker) GiveBack(bm []uint64) {
	for i := range min(len(bm), len(t.dirty)) {
		if bm[i] != 0 {
			t.dirty[i].Or(bm[i])
		}
	}
}

// Written returns the blocks marked since the disk was opened.
func (t *Tracker) Written() []uint64 {
	out := make([]uint64, len(t.written))
	for i := range t.written {
		out[i] = t.written[i].Load()
	}
	return out
}

// Overlay returns the copy-on-write overlay under t, or nil for a raw disk.
func (t *Tracker) Overlay() *cow.Overlay {
	o, _ := t.be.(*cow.Overlay)
	return o
}

// Changed returns the blocks that a full copy of the disk must carry on
// top of its origin: the blocks written since open and, for an overlay,
// every block the overlay holds (does not read from the base).
func (t *Tracker) Changed() []uint64 {
	bm := t.Written()
	if o := t.Overlay(); o != nil {
		o.Changed(func(off, n int64) { markBitmap(bm, off, n, t.nblocks) })
	}
	return bm
}

func markBitmap(bm []uint64, off, n, nblocks int64) {
	if n <= 0 {
		return
	}
	for b := off / TrackBlockSize; b <= (off+n-1)/TrackBlockSize && b < nblocks; b++ {
		bm[b/64] |= 1 << (b % 64)
	}
}

// ChangedBitmap returns, for an overlay, the blocks it holds (that do not
// read from the base); for a raw disk, nil.
func ChangedBitmap(be Backend) []uint64 {
	if tr, ok := be.(*Tracker); ok {
		be = tr.be
	}
	o, ok := be.(*cow.Overlay)
	if !ok {
		return nil
	}
	n := (be.Size() + TrackBlockSize - 1) / TrackBlockSize
	bm := make([]uint64, (n+63)/64)
	o.Changed(func(off, k int64) { markBitmap(bm, off, k, n) })
	return bm
}

// BlockHash is the content hash of a block.
func BlockHash(p []byte) [HashSize]byte {
	s := sha256.Sum256(p)
	var h [HashSize]byte
	copy(h[:], s[:HashSize])
	return h
}

// OriginDigest returns the digest of the disk's content over every block
// not in exclude, which must include every block written since open: the
// content of those blocks is then the disk's content at open, and block
// hashes are cached across calls. Preconditions: no write is in flight
// (the machine is paused).
func (t *Tracker) OriginDigest(exclude []uint64) ([32]byte, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.origin == nil {
		t.origin = make([][HashSize]byte, t.nblocks)
		t.originKnown = make([]uint64, (t.nblocks+63)/64)
	}
	buf := make([]byte, TrackBlockSize)
	for b := int64(0); b < t.nblocks; b++ {
		if bitSet(exclude, b) || bitSet(t.originKnown, b) {
			continue
		}
		p := buf[:t.BlockLen(b)]
		if _, err := readFullAt(t.be, p, b*TrackBlockSize); err != nil {
			return [32]byte{}, fmt.Errorf("virtioblk: hashing block %d: %w", b, err)
		}
		t.origin[b] = BlockHash(p)
		t.originKnown[b/64] |= 1 << (b % 64)
	}
	return digestOf(t.nblocks, exclude, func(b int64) [HashSize]byte { return t.origin[b] }), nil
}

// OriginDigestOf computes OriginDigest's value for any disk r of size
// bytes (a disk a snapshot is restored into), reading every block not in
// exclude.
func OriginDigestOf(r io.ReaderAt, size int64, exclude []uint64) ([32]byte, error) {
	n := (size + TrackBlockSize - 1) / TrackBlockSize
	buf := make([]byte, TrackBlockSize)
	d := sha256.New()
	var rec [8 + HashSize]byte
	for b := int64(0); b < n; b++ {
		if bitSet(exclude, b) {
			continue
		}
		p := buf[:min(TrackBlockSize, size-b*TrackBlockSize)]
		if _, err := readFullAt(r, p, b*TrackBlockSize); err != nil {
			return [32]byte{}, fmt.Errorf("virtioblk: hashing block %d: %w", b, err)
		}
		h := BlockHash(p)
		binary.LittleEndian.PutUint64(rec[:], uint64(b))
		copy(rec[8:], h[:])
		d.Write(rec[:])
	}
	var out [32]byte
	d.Sum(out[:0])
	return out, nil
}

func digestOf(n int64, exclude []uint64, hash func(int64) [HashSize]byte) [32]byte {
	d := sha256.New()
	var rec [8 + HashSize]byte
	for b := int64(0); b < n; b++ {
		if bitSet(exclude, b) {
			continue
		}
		h := hash(b)
		binary.LittleEndian.PutUint64(rec[:], uint64(b))
		copy(rec[8:], h[:])
		d.Write(rec[:])
	}
	var out [32]byte
	d.Sum(out[:0])
	return out
}

func bitSet(bm []uint64, b int64) bool {
	return b/64 < int64(len(bm)) && bm[b/64]&(1<<(b%64)) != 0
}

func readFullAt(r io.ReaderAt, p []byte, off int64) (int, error) {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return n, nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// IsZero reports whether p is all zeros.
func IsZero(p []byte) bool {
	for len(p) >= len(zeros) {
		if !bytes.Equal(p[:len(zeros)], zeros[:]) {
			return false
		}
		p = p[len(zeros):]
	}
	return bytes.Equal(p, zeros[:len(p)])
}

// VectorWriter returns the wrapped backend's VectorWriter, if it has one,
// wrapped so that a write's blocks are marked, as WriteAt marks them.
func (t *Tracker) VectorWriter() VectorWriter {
	v, ok := t.be.(interface{ VectorWriter() VectorWriter })
	if !ok {
		return nil
	}
	if w := v.VectorWriter(); w != nil {
		return trackedWriter{t: t, w: w}
	}
	return nil
}

type trackedWriter struct {
	t *Tracker
	w VectorWriter
}

// WritevAt implements VectorWriter; the blocks are marked even when the
// write fails (it may have written part).
func (tw trackedWriter) WritevAt(bufs [][]byte, off int64) (int64, error) {
	n, err := tw.w.WritevAt(bufs, off)
	var total int64
	for _, p := range bufs {
		total += int64(len(p))
	}
	tw.t.mark(off, total)
	return n, err
}

// Async returns the wrapped backend's Submitter, if it has one, wrapped so
// that a write's blocks are marked when it completes, as WriteAt marks
// them.
func (t *Tracker) Async() Submitter {
	a, ok := t.be.(interface{ Async() Submitter })
	if !ok {
		return nil
	}
	s := a.Async()
	if s == nil {
		return nil
	}
	return trackedSubmitter{t: t, s: s}
}

type trackedSubmitter struct {
	t *Tracker
	s Submitter
}

// Submit implements Submitter.
func (ts trackedSubmitter) Submit(write bool, iov [][]byte, off int64, done func(int64, error)) bool {
	if !write {
		return ts.s.Submit(false, iov, off, done)
	}
	var n int64
	for _, p := range iov {
		n += int64(len(p))
	}
	return ts.s.Submit(true, iov, off, func(moved int64, err error) {
		ts.t.mark(off, n)
		done(moved, err)
	})
}
