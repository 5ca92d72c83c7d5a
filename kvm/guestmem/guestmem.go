// Package guestmem is the one way the VMM reaches guest memory.
//
// A Memory is a set of non-overlapping regions of guest-physical address
// space, each backed by host memory (an anonymous mapping in a real VM, a Go
// slice in tests). Every access is bounds-checked against the regions with
// overflow-checked arithmetic, and every write the VMM makes is recorded in a
// per-region dirty bitmap, because KVM's dirty log only sees the writes of
// vCPUs (design brief, fact 1): an incremental snapshot or a migration that
// merged only KVM's log would silently lose what devices wrote.
//
// # Security
//
// Guest addresses and lengths are untrusted. No method panics on any
// address or length; accesses outside guest RAM return an *AccessError.
// Host slices returned by Slice alias guest memory that vCPUs may change at
// any moment: callers copy what they validate (single fetch).
//
// # Concurrency
//
// All methods are safe for concurrent use. The region list is immutable
// after New; dirty bits are set and taken with atomic operations.
package guestmem

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"sort"
	"sync/atomic"
)

// PageSize is the granularity of dirty tracking.
const PageSize = 4096

// ErrOutOfRange is the sentinel matched by every *AccessError.
var ErrOutOfRange = errors.New("guestmem: access outside guest memory")

// AccessError reports an access to guest-physical addresses that are not
// fully backed by guest RAM.
type AccessError struct {
	GPA uint64 // first guest-physical address of the access
	Len uint64 // length of the access
}

func (e *AccessError) Error() string {
	return fmt.Sprintf("guestmem: access outside guest memory at %#x (+%#x)", e.GPA, e.Len)
}

// Is reports whether target is ErrOutOfRange.
func (e *AccessError) Is(target error) bool { return target == ErrOutOfRange }

// AddLength returns gpa+n and whether the sum did not overflow.
func AddLength(gpa, n uint64) (end uint64, ok bool) {
	end, carry := bits.Add64(gpa, n, 0)
	return end, carry == 0
}

// Range is a span of guest-physical address space.
type Range struct {
	GPA  uint64 // first address
	Size uint64 // length in bytes
}

// End returns the first address after r (saturating at 2^64-1).
func (r Range) End() uint64 {
	end, ok := AddLength(r.GPA, r.Size)
	if !ok {
		return ^uint64(0)
	}
	return end
}

// Region is one contiguous block of guest RAM and its host backing.
type Region struct {
	GPA  uint64 // guest-physical base, page aligned
	Host []byte // host backing; len(Host) is the region's size, a multiple of PageSize

	dirty []atomic.Uint64 // VMM write log, one bit per page
}

// Size returns the length of the region in bytes.
func (r *Region) Size() uint64 { return uint64(len(r.Host)) }

// Memory is the guest-physical memory of one VM.
type Memory struct {
	regions []*Region // sorted by GPA, non-overlapping; immutable after New
}

// New returns a Memory over the given regions. Regions must be page aligned
// in address and size and must not overlap.
func New(regions ...Region) (*Memory, error) {
	m := &Memory{}
	for i := range regions {
		r := regions[i]
		size := uint64(len(r.Host))
		if r.GPA%PageSize != 0 || size%PageSize != 0 || size == 0 {
			return nil, fmt.Errorf("guestmem: region at %#x size %#x: not page aligned", r.GPA, size)
		}
		if _, ok := AddLength(r.GPA, size); !ok {
			return nil, fmt.Errorf("guestmem: region at %#x size %#x: wraps the address space", r.GPA, size)
		}
		r.dirty = make([]atomic.Uint64, (size/PageSize+63)/64)
		m.regions = append(m.regions, &r)
	}
	sort.Slice(m.regions, func(i, j int) bool { return m.regions[i].GPA < m.regions[j].GPA })
	for i := 1; i < len(m.regions); i++ {
		prev, cur := m.regions[i-1], m.regions[i]
		if prev.GPA+prev.Size() > cur.GPA {
			return nil, fmt.Errorf("guestmem: regions at %#x and %#x overlap", prev.GPA, cur.GPA)
		}
	}
	return m, nil
}

// NewFake returns a Memory backed by zeroed Go slices laid out as ranges.
// It is meant for tests and fuzzing, where no VM exists.
func NewFake(ranges ...Range) (*Memory, error) {
	regs := make([]Region, len(ranges))
	for i, r := range ranges {
		regs[i] = Region{GPA: r.GPA, Host: make([]byte, r.Size)}
	}
	return New(regs...)
}

// Regions returns the regions of m in ascending address order. The caller
// must not modify the returned slice.
func (m *Memory) Regions() []*Region { return m.regions }

// Size returns the total number of bytes of guest RAM.
func (m *Memory) Size() uint64 {
	var n uint64
	for _, r := range m.regions {
		n += r.Size()
	}
	return n
}

// find returns the region holding gpa and the offset of gpa in it.
func (m *Memory) find(gpa uint64) (*Region, uint64, bool) {
	i := sort.Search(len(m.regions), func(i int) bool {
		return m.regions[i].GPA+m.regions[i].Size() > gpa
	})
	if i == len(m.regions) || m.regions[i].GPA > gpa {
		return nil, 0, false
	}
	return m.regions[i], gpa - m.regions[i].GPA, true
}

// Contains reports whether [gpa, gpa+n) lies entirely in guest RAM
// (possibly across adjacent regions).
func (m *Memory) Contains(gpa, n uint64) bool {
	end, ok := AddLength(gpa, n)
	if !ok {
		return false
	}
	for gpa < end {
		r, off, ok := m.find(gpa)
		if !ok {
			return false
		}
		gpa += r.Size() - off
	}
	return true
}

// Slice returns the host bytes backing [gpa, gpa+n), which must lie in a
// single region. The slice aliases guest memory: the guest can change it
// at any time (validate copies, not the slice), and writes through it are
// not recorded as dirty; use WriteSlice for that.
func (m *Memory) Slice(gpa, n uint64) ([]byte, error) {
	end, ok := AddLength(gpa, n)
	r, off, found := m.find(gpa)
	if !ok || !found || end-r.GPA > r.Size() {
		return nil, &AccessError{GPA: gpa, Len: n}
	}
	return r.Host[off : off+n : off+n], nil
}

// WriteSlice is Slice for a caller that will write into the returned bytes:
// the range is marked dirty before it returns. Callers must finish writing
// before the next TakeDirty of a migration round, or call MarkDirty once
// the data is there (as virtio-blk does after a read).
func (m *Memory) WriteSlice(gpa, n uint64) ([]byte, error) {
	s, err := m.Slice(gpa, n)
	if err != nil {
		return nil, err
	}
	m.MarkDirty(gpa, n)
	return s, nil
}

// ReadAt copies len(p) bytes at gpa into p. It returns the number of bytes
// copied and, when fewer than len(p), an *AccessError.
func (m *Memory) ReadAt(p []byte, gpa uint64) (int, error) {
	return m.copy(p, gpa, false)
}

// WriteAt copies p into guest memory at gpa and records the pages written
// as dirty. It returns the number of bytes copied and, when fewer than
// len(p), an *AccessError; the bytes before the error are written.
func (m *Memory) WriteAt(p []byte, gpa uint64) (int, error) {
	return m.copy(p, gpa, true)
}

func (m *Memory) copy(p []byte, gpa uint64, write bool) (int, error) {
	done := 0
	for done < len(p) {
		cur, ok := AddLength(gpa, uint64(done))
		if !ok {
			return done, &AccessError{GPA: gpa, Len: uint64(len(p))}
		}
		r, off, found := m.find(cur)
		if !found {
			return done, &AccessError{GPA: gpa, Len: uint64(len(p))}
		}
		var n int
		if write {
			n = copy(r.Host[off:], p[done:])
			r.markDirty(off, uint64(n))
		} else {
			n = copy(p[done:], r.Host[off:])
		}
		done += n
	}
	return done, nil
}

// Zero writes n zero bytes at gpa, recording them as dirty.
func (m *Memory) Zero(gpa, n uint64) error {
	if !m.Contains(gpa, n) {
		return &AccessError{GPA: gpa, Len: n}
	}
	for n > 0 {
		r, off, _ := m.find(gpa)
		k := min(n, r.Size()-off)
		clear(r.Host[off : off+k])
		r.markDirty(off, k)
		gpa += k
		n -= k
	}
	return nil
}

// Uint16 reads a little-endian uint16 at gpa. At an even address it is
// one access, never torn by a concurrent guest write.
func (m *Memory) Uint16(gpa uint64) (uint16, error) {
	if gpa%2 == 0 {
		if v, ok := m.load16(gpa); ok {
			return v, nil
		}
	}
	var b [2]byte
	_, err := m.ReadAt(b[:], gpa)
	return binary.LittleEndian.Uint16(b[:]), err
}

// Uint32 reads a little-endian uint32 at gpa; aligned, in one access.
func (m *Memory) Uint32(gpa uint64) (uint32, error) {
	if gpa%4 == 0 {
		if v, ok := m.load32(gpa); ok {
			return v, nil
		}
	}
	var b [4]byte
	_, err := m.ReadAt(b[:], gpa)
	return binary.LittleEndian.Uint32(b[:]), err
}

// Uint64 reads a little-endian uint64 at gpa; aligned, in one access.
func (m *Memory) Uint64(gpa uint64) (uint64, error) {
	if gpa%8 == 0 {
		if v, ok := m.load64(gpa); ok {
			return v, nil
		}
	}
	var b [8]byte
	_, err := m.ReadAt(b[:], gpa)
	return binary.LittleEndian.Uint64(b[:]), err
}

// PutUint16 writes v little-endian at gpa. At an even address it is one
// access, never seen torn by the guest.
func (m *Memory) PutUint16(gpa uint64, v uint16) error {
	if gpa%2 == 0 && m.store16(gpa, v) {
		return nil
	}
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], v)
	_, err := m.WriteAt(b[:], gpa)
	return err
}

// PutUint32 writes v little-endian at gpa; aligned, in one access.
func (m *Memory) PutUint32(gpa uint64, v uint32) error {
	if gpa%4 == 0 && m.store32(gpa, v) {
		return nil
	}
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	_, err := m.WriteAt(b[:], gpa)
	return err
}

// PutUint64 writes v little-endian at gpa; aligned, in one access.
func (m *Memory) PutUint64(gpa uint64, v uint64) error {
	if gpa%8 == 0 && m.store64(gpa, v) {
		return nil
	}
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	_, err := m.WriteAt(b[:], gpa)
	return err
}

// MarkDirty records [gpa, gpa+n) as written by the VMM. Parts outside
// guest RAM are ignored.
func (m *Memory) MarkDirty(gpa, n uint64) {
	end, ok := AddLength(gpa, n)
	if !ok {
		end = ^uint64(0)
	}
	for _, r := range m.regions {
		lo, hi := max(gpa, r.GPA), min(end, r.GPA+r.Size())
		if lo < hi {
			r.markDirty(lo-r.GPA, hi-lo)
		}
	}
}

func (r *Region) markDirty(off, n uint64) {
	if n == 0 {
		return
	}
	for p := off / PageSize; p <= (off+n-1)/PageSize; p++ {
		r.dirty[p/64].Or(1 << (p % 64))
	}
}

// TakeDirty returns the pages of r the VMM wrote since the previous
// TakeDirty, as a bitmap with one bit per page (bit i of word i/64 is the
// page at GPA+i*PageSize), and clears the log.
func (r *Region) TakeDirty() []uint64 {
	out := make([]uint64, len(r.dirty))
	for i := range r.dirty {
		out[i] = r.dirty[i].Swap(0)
	}
	return out
}
