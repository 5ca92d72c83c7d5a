package guestmem

import (
	"sync/atomic"
	"unsafe"
)

// Guest-shared words (virtqueue indices, flags) must be read and written
// in one access: a copy of two bytes is two one-byte moves, and a guest
// that changes an index from 0x01ff to 0x0200 between them is read as
// 0x02ff. Aligned words are accessed through sync/atomic on the aligned
// 32- or 64-bit word that holds them; anything else falls back to copy.

// word32 returns the aligned 32-bit word of host memory at gpa (4-byte
// aligned) when it lies in guest RAM and is aligned in host memory too.
func (m *Memory) word32(gpa uint64) (*uint32, bool) {
	r, off, ok := m.find(gpa)
	if !ok || off+4 > r.Size() {
		return nil, false
	}
	p := unsafe.Pointer(&r.Host[off])
	if uintptr(p)%4 != 0 {
		return nil, false
	}
	return (*uint32)(p), true
}

// load16 reads the little-endian uint16 at an even gpa in one access.
func (m *Memory) load16(gpa uint64) (uint16, bool) {
	w, ok := m.word32(gpa &^ 3)
	if !ok {
		return 0, false
	}
	return uint16(atomic.LoadUint32(w) >> (8 * (gpa & 2))), true
}

// store16 writes v at an even gpa in one access, leaving the other half
// of its 32-bit word as it is (even if a vCPU changes it meanwhile).
func (m *Memory) store16(gpa uint64, v uint16) bool {
	w, ok := m.word32(gpa &^ 3)
	if !ok {
		return false
	}
	shift := 8 * (gpa & 2)
	mask := uint32(0xffff) << shift
	for {
		old := atomic.LoadUint32(w)
		if atomic.CompareAndSwapUint32(w, old, old&^mask|uint32(v)<<shift) {
			break
		}
	}
	m.MarkDirty(gpa, 2)
	return true
}

func (m *Memory) load32(gpa uint64) (uint32, bool) {
	w, ok := m.word32(gpa)
	if !ok {
		return 0, false
	}
	return atomic.LoadUint32(w), true
}

func (m *Memory) store32(gpa uint64, v uint32) bool {
	w, ok := m.word32(gpa)
	if !ok {
		return false
	}
	atomic.StoreUint32(w, v)
	m.MarkDirty(gpa, 4)
	return true
}

// word64 is word32 for 8-byte words.
func (m *Memory) word64(gpa uint64) (*uint64, bool) {
	r, off, ok := m.find(gpa)
	if !ok || off+8 > r.Size() {
		return nil, false
	}
	p := unsafe.Pointer(&r.Host[off])
	if uintptr(p)%8 != 0 {
		return nil, false
	}
	return (*uint64)(p), true
}

func (m *Memory) load64(gpa uint64) (uint64, bool) {
	w, ok := m.word64(gpa)
	if !ok {
		return 0, false
	}
	return atomic.LoadUint64(w), true
}

func (m *Memory) store64(gpa uint64, v uint64) bool {
	w, ok := m.word64(gpa)
	if !ok {
		return false
	}
	atomic.StoreUint64(w, v)
	m.MarkDirty(gpa, 8)
	return true
}
