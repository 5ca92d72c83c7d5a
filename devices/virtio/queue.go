package virtio

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"collective/kvm/guestmem"
)

// Split virtqueue layout (virtio 1.2 section 2.7).
const (
	// MaxQueueSize is the largest queue any device here offers.
	MaxQueueSize = 1024

	descSize = 16 // struct virtq_desc

	DescFNext     = 1 // VIRTQ_DESC_F_NEXT
	DescFWrite    = 2 // VIRTQ_DESC_F_WRITE
	DescFIndirect = 4 // VIRTQ_DESC_F_INDIRECT

	AvailFNoInterrupt = 1 // VIRTQ_AVAIL_F_NO_INTERRUPT
	UsedFNoNotify     = 1 // VIRTQ_USED_F_NO_NOTIFY

	// Ring alignments (section 2.7, table "Virtqueue Part Alignment").
	DescAlign  = 16
	AvailAlign = 2
	UsedAlign  = 4

	// NoVector is VIRTIO_MSI_NO_VECTOR.
	NoVector = 0xffff
)

// Queue-fatal errors: the device should set DEVICE_NEEDS_RESET.
var (
	// ErrAvailIdx: the driver's available index ran more than the queue
	// size ahead of the device.
	ErrAvailIdx = errors.New("virtio: available index moved more than the queue size")
	// ErrHeadIndex: a ring entry names a descriptor beyond the queue.
	ErrHeadIndex = errors.New("virtio: available ring names a descriptor out of range")
	// ErrRingAccess: a ring lies outside guest memory.
	ErrRingAccess = errors.New("virtio: ring outside guest memory")
	// ErrNotReady: the queue is not enabled and activated.
	ErrNotReady = errors.New("virtio: queue not ready")
)

// Chain errors: only the request fails (ChainError wraps one of these).
var (
	ErrChainTooLong    = errors.New("virtio: descriptor chain longer than the queue (loop?)")
	ErrNextIndex       = errors.New("virtio: descriptor next index out of range")
	ErrBufferRange     = errors.New("virtio: buffer outside guest memory")
	ErrChainOrder      = errors.New("virtio: device-readable descriptor after a device-writable one")
	ErrIndirect        = errors.New("virtio: malformed indirect descriptor")
	ErrIndirectFeature = errors.New("virtio: indirect descriptor without VIRTIO_F_INDIRECT_DESC")
)

// ChainError is a malformed descriptor chain. The chain's head was taken
// from the available ring; the device returns it with PushUsed(Head, 0)
// (or a device-specific error) and goes on with the next one.
type ChainError struct {
	Queue int
	Head  uint16
	Desc  uint16 // index of the offending descriptor (in its table)
	Err   error
}

func (e *ChainError) Error() string {
	return fmt.Sprintf("virtio: queue %d chain %d descriptor %d: %v", e.Queue, e.Head, e.Desc, e.Err)
}

func (e *ChainError) Unwrap() error { return e.Err }

// Desc is one buffer of a chain, validated: [Addr, Addr+Len) lies in guest
// memory at the time of the pop.
type Desc struct {
	Addr  uint64
	Len   uint32
	Write bool // device-writable
}

// Chain is a descriptor chain taken from a queue: its device-readable
// buffers, then its device-writable ones. A Chain is reused across pops
// (its slice keeps its capacity): allocate one per worker with NewChain.
type Chain struct {
	Head        uint16
	Descs       []Desc
	NumReadable int
	ReadLen     uint64 // sum of readable lengths
	WriteLen    uint64 // sum of writable lengths
}

// NewChain returns a chain with room for the longest chain a queue accepts.
func NewChain() *Chain { return &Chain{Descs: make([]Desc, 0, MaxQueueSize)} }

// Readable returns the device-readable buffers.
func (c *Chain) Readable() []Desc { return c.Descs[:c.NumReadable] }

// Writable returns the device-writable buffers.
func (c *Chain) Writable() []Desc { return c.Descs[c.NumReadable:] }

func (c *Chain) reset(head uint16) {
	c.Head, c.Descs, c.NumReadable, c.ReadLen, c.WriteLen = head, c.Descs[:0], 0, 0, 0
}

// Queue is the device side of a split virtqueue.
//
// The transport configures it (size, ring addresses, enable) while the
// device is stopped. Once activated, one goroutine pops (Pop, EnableNotify,
// DisableNotify) and any goroutine may complete chains (PushUsed,
// NeedsInterrupt), serialised by the queue's used-ring lock.
//
// Memory ordering: the guest shares the rings. On amd64 loads are not
// reordered with loads nor stores with stores; the places where the
// protocol needs more (reading the event index or flags after publishing
// the used index, re-reading the available index after publishing the
// avail event) get a full fence from an atomic read-modify-write, and the
// compiler does not move guest-memory accesses (calls into guestmem)
// across atomic operations.
type Queue struct {
	index   int    // immutable
	maxSize uint16 // immutable
	bell    chan struct{}

	// Configuration: written by the transport while the queue is not
	// activated, then read-only.
	size              uint16
	enabled           bool
	desc, avail, used uint64

	// Set by activate.
	mem      *guestmem.Memory
	eventIdx bool
	indirect bool
	active   bool

	// Available side: owned by the popping goroutine.
	nextAvail uint16

	usedMu        sync.Mutex
	nextUsed      uint16 // +checklocks:usedMu
	signalledUsed uint16 // +checklocks:usedMu
	signalled     bool   // +checklocks:usedMu; signalledUsed is valid

	vector atomic.Uint32 // MSI-X vector, written by the transport
	fence  atomic.Uint32
}

func newQueue(index int, maxSize uint16) *Queue {
	q := &Queue{index: index, maxSize: maxSize, bell: make(chan struct{}, 1)}
	q.reset()
	return q
}

// reset returns the queue to its state after a device reset.
func (q *Queue) reset() {
	q.size, q.enabled, q.desc, q.avail, q.used = q.maxSize, false, 0, 0, 0
	q.mem, q.eventIdx, q.indirect, q.active = nil, false, false, false
	q.nextAvail = 0
	q.usedMu.Lock()
	q.nextUsed, q.signalledUsed, q.signalled = 0, 0, false
	q.usedMu.Unlock()
	q.vector.Store(NoVector)
	select {
	case <-q.bell:
	default:
	}
}

// Index returns the queue's index in its device.
func (q *Queue) Index() int { return q.index }

// Size returns the queue size the driver chose.
func (q *Queue) Size() uint16 { return q.size }

// Enabled reports whether the driver enabled the queue.
func (q *Queue) Enabled() bool { return q.enabled }

// Doorbell returns a channel that receives a value when the driver
// notifies the queue (coalesced: one value may stand for many notifies).
func (q *Queue) Doorbell() <-chan struct{} { return q.bell }

// Notify rings the doorbell: what the transport does on a notify write, or
// the machine's ioeventfd goroutine on an eventfd wakeup.
func (q *Queue) Notify() {
	select {
	case q.bell <- struct{}{}:
	default:
	}
}

func (q *Queue) fullFence() { q.fence.Add(1) }

// check validates the configuration the driver wrote against mem.
func (q *Queue) check(mem *guestmem.Memory) error {
	s := uint64(q.size)
	switch {
	case q.size == 0 || q.size&(q.size-1) != 0 || q.size > q.maxSize:
		return fmt.Errorf("virtio: queue %d: size %d: need a power of two <= %d", q.index, q.size, q.maxSize)
	case q.desc%DescAlign != 0 || q.avail%AvailAlign != 0 || q.used%UsedAlign != 0:
		return fmt.Errorf("virtio: queue %d: misaligned rings: desc %#x avail %#x used %#x", q.index, q.desc, q.avail, q.used)
	case !mem.Contains(q.desc, descSize*s):
		return fmt.Errorf("virtio: queue %d: descriptor table %#x+%#x: %w", q.index, q.desc, descSize*s, ErrRingAccess)
	case !mem.Contains(q.avail, 6+2*s):
		return fmt.Errorf("virtio: queue %d: available ring %#x+%#x: %w", q.index, q.avail, 6+2*s, ErrRingAccess)
	case !mem.Contains(q.used, 6+8*s):
		return fmt.Errorf("virtio: queue %d: used ring %#x+%#x: %w", q.index, q.used, 6+8*s, ErrRingAccess)
	}
	return nil
}

// activate makes an enabled, checked queue usable with the negotiated
// features.
func (q *Queue) activate(mem *guestmem.Memory, features uint64) {
	q.mem = mem
	q.eventIdx = features&FEventIdx != 0
	q.indirect = features&FIndirectDesc != 0
	q.active = true
}

// availIdx reads avail->idx.
func (q *Queue) availIdx() (uint16, error) {
	v, err := q.mem.Uint16(q.avail + 2)
	if err != nil {
		return 0, ErrRingAccess
	}
	return v, nil
}

// Pending returns how many chains the driver has made available and the
// device has not popped.
func (q *Queue) Pending() (uint16, error) {
	if !q.active {
		return 0, ErrNotReady
	}
	idx, err := q.availIdx()
	if err != nil {
		return 0, err
	}
	n := idx - q.nextAvail // uint16 wrap-around
	if n > q.size {
		return 0, ErrAvailIdx
	}
	return n, nil
}

// Pop takes the next available chain into c. It reports false when the
// ring is empty. A *ChainError means the chain was taken but is malformed:
// c holds only its Head, which the device must still return with PushUsed.
// Any other error is queue-fatal (the device should ask for a reset).
func (q *Queue) Pop(c *Chain) (bool, error) {
	n, err := q.Pending()
	if err != nil || n == 0 {
		c.reset(0)
		return false, err
	}
	// Acquire: the ring entry and descriptors are read after avail->idx.
	q.fullFence()
	head, err := q.mem.Uint16(q.avail + 4 + 2*uint64(q.nextAvail&(q.size-1)))
	if err != nil {
		c.reset(0)
		return false, ErrRingAccess
	}
	if head >= q.size {
		c.reset(0)
		return false, ErrHeadIndex
	}
	q.nextAvail++
	if err := q.walk(c, head); err != nil {
		return true, err
	}
	return true, nil
}

// Unpop gives back the chain Pop returned last, so that the next Pop
// returns it again (a device that could not take it now).
func (q *Queue) Unpop() { q.nextAvail-- }

// walk follows the chain at head, validating every descriptor.
func (q *Queue) walk(c *Chain, head uint16) error {
	c.reset(head)
	table, tableLen := q.desc, uint64(q.size)
	idx := head
	ttl := int(q.size) // total descriptors a chain may have
	indirect := false
	fail := func(e error) error {
		c.reset(head)
		return &ChainError{Queue: q.index, Head: head, Desc: idx, Err: e}
	}
	var raw [descSize]byte
	for {
		if ttl == 0 {
			return fail(ErrChainTooLong)
		}
		ttl--
		// Single fetch: the descriptor is copied once, then checked.
		if _, err := q.mem.ReadAt(raw[:], table+descSize*uint64(idx)); err != nil {
			return fail(ErrBufferRange)
		}
		addr := binary.LittleEndian.Uint64(raw[0:])
		length := binary.LittleEndian.Uint32(raw[8:])
		flags := binary.LittleEndian.Uint16(raw[12:])
		next := binary.LittleEndian.Uint16(raw[14:])

		if flags&DescFIndirect != 0 {
			switch {
			case !q.indirect:
				return fail(ErrIndirectFeature)
			case indirect || flags&DescFNext != 0 || length == 0 || length%descSize != 0 || uint64(length/descSize) > uint64(q.size):
				return fail(ErrIndirect)
			case !q.mem.Contains(addr, uint64(length)):
				return fail(ErrBufferRange)
			}
			// The table replaces the rest of the chain; the write
			// flag of the indirect descriptor itself is ignored.
			table, tableLen, idx, indirect = addr, uint64(length/descSize), 0, true
			ttl = min(ttl+1, int(tableLen))
			continue
		}
		if length > 0 && !q.mem.Contains(addr, uint64(length)) {
			return fail(ErrBufferRange)
		}
		w := flags&DescFWrite != 0
		if !w && len(c.Descs) > c.NumReadable {
			return fail(ErrChainOrder)
		}
		c.Descs = append(c.Descs, Desc{Addr: addr, Len: length, Write: w})
		if w {
			c.WriteLen += uint64(length) // at most 2048 * 4 GiB: no overflow
		} else {
			c.NumReadable++
			c.ReadLen += uint64(length)
		}
		if flags&DescFNext == 0 {
			return nil
		}
		if uint64(next) >= tableLen {
			return fail(ErrNextIndex)
		}
		idx = next
	}
}

// PushUsed returns chain head to the driver with n bytes written, and
// reports whether the driver wants an interrupt now (event index or
// NO_INTERRUPT flag). Safe for concurrent use.
func (q *Queue) PushUsed(head uint16, n uint32) (bool, error) {
	u := [1]Used{{Head: head, Len: n}}
	return q.PushUsedBatch(u[:])
}

// Used is one element of the used ring: a chain's head and the bytes the
// device wrote into it.
type Used struct {
	Head uint16
	Len  uint32
}

// PushUsedBatch returns several chains to the driver at once: their
// elements first, then one used index update, so that the driver sees
// them together (a driver that polls then resubmits them together). It
// reports whether the driver wants an interrupt now, like PushUsed. Safe
// for concurrent use.
func (q *Queue) PushUsedBatch(used []Used) (bool, error) {
	q.usedMu.Lock()
	defer q.usedMu.Unlock()
	if !q.active {
		return false, ErrNotReady
	}
	var elem [8]byte
	for _, u := range used {
		binary.LittleEndian.PutUint32(elem[0:], uint32(u.Head))
		binary.LittleEndian.PutUint32(elem[4:], u.Len)
		if _, err := q.mem.WriteAt(elem[:], q.used+4+8*uint64(q.nextUsed&(q.size-1))); err != nil {
			return false, ErrRingAccess
		}
		q.nextUsed++
	}
	// Release: the elements (and the buffers) before the index.
	q.fullFence()
	if err := q.mem.PutUint16(q.used+2, q.nextUsed); err != nil {
		return false, ErrRingAccess
	}
	// The used index must be visible before the driver's suppression
	// state is read, or a notification can be lost.
	q.fullFence()
	return q.needsInterrupt()
}

// +checklocks:q.usedMu
func (q *Queue) needsInterrupt() (bool, error) {
	if !q.eventIdx {
		flags, err := q.mem.Uint16(q.avail)
		if err != nil {
			return false, ErrRingAccess
		}
		return flags&AvailFNoInterrupt == 0, nil
	}
	event, err := q.mem.Uint16(q.avail + 4 + 2*uint64(q.size)) // used_event
	if err != nil {
		return false, ErrRingAccess
	}
	old, valid := q.signalledUsed, q.signalled
	q.signalledUsed, q.signalled = q.nextUsed, true
	if !valid {
		return true, nil
	}
	// vring_need_event: uint16 wrap-around throughout.
	return q.nextUsed-event-1 < q.nextUsed-old, nil
}

// DisableNotify asks the driver not to notify (a hint): the device is
// about to drain the ring. With EVENT_IDX it leaves avail_event behind.
func (q *Queue) DisableNotify() error {
	if !q.active {
		return ErrNotReady
	}
	if q.eventIdx {
		return nil
	}
	if err := q.mem.PutUint16(q.used, UsedFNoNotify); err != nil {
		return ErrRingAccess
	}
	return nil
}

// EnableNotify asks the driver to notify on the next available chain and
// reports whether chains arrived meanwhile (then the device pops again
// instead of waiting for the doorbell).
func (q *Queue) EnableNotify() (bool, error) {
	if !q.active {
		return false, ErrNotReady
	}
	var err error
	if q.eventIdx {
		err = q.mem.PutUint16(q.used+4+8*uint64(q.size), q.nextAvail) // avail_event
	} else {
		err = q.mem.PutUint16(q.used, 0)
	}
	if err != nil {
		return false, ErrRingAccess
	}
	q.fullFence()
	n, err := q.Pending()
	return n > 0, err
}
