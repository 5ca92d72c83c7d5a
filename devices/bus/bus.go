// Package bus routes the guest's port-I/O and MMIO accesses to devices by
// address.
//
// A Bus holds non-overlapping address ranges, each owned by one device.
// Insert rejects a range that overlaps another. Lookups are a binary search
// over a copy-on-write sorted slice, so the hot path (Linux probes PCI
// config space tens of thousands of times at boot) takes no lock.
package bus

import (
	"fmt"
	"sort"
	"sync"
	"sync/atomic"

	"collective/devices"
)

type entry struct {
	base, size uint64
	name       string
	dev        devices.Device
}

// Bus is a port-I/O or MMIO bus. The zero value is an empty bus ready to use.
type Bus struct {
	mu      sync.Mutex              // serialises Insert and Remove
	entries atomic.Pointer[[]entry] // sorted by base; replaced, never mutated
}

// Insert attaches dev at [base, base+size). It fails if the range is empty,
// wraps the address space, or overlaps a range already on the bus.
func (b *Bus) Insert(name string, base, size uint64, dev devices.Device) error {
	if size == 0 || base+size < base {
		return fmt.Errorf("bus: %s: invalid range %#x+%#x", name, base, size)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	old := b.list()
	for _, e := range old {
		if base < e.base+e.size && e.base < base+size {
			return fmt.Errorf("bus: %s at %#x+%#x overlaps %s at %#x+%#x", name, base, size, e.name, e.base, e.size)
		}
	}
	next := append(append(make([]entry, 0, len(old)+1), old...), entry{base, size, name, dev})
	sort.Slice(next, func(i, j int) bool { return next[i].base < next[j].base })
	b.entries.Store(&next)
	return nil
}

// Remove detaches the device whose range starts at base.
func (b *Bus) Remove(base uint64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	old := b.list()
	for i, e := range old {
		if e.base == base {
			next := append(append(make([]entry, 0, len(old)-1), old[:i]...), old[i+1:]...)
			b.entries.Store(&next)
			return nil
		}
	}
	return fmt.Errorf("bus: no device at %#x", base)
}

func (b *Bus) list() []entry {
	if p := b.entries.Load(); p != nil {
		return *p
	}
	return nil
}

func (b *Bus) find(addr uint64) (entry, bool) {
	l := b.list()
	i := sort.Search(len(l), func(i int) bool { return l[i].base+l[i].size > addr })
	if i == len(l) || l[i].base > addr {
		return entry{}, false
	}
	return l[i], true
}

// Read dispatches a read of len(p) bytes at addr. It reports false, and
// fills p with 0xff as an unclaimed bus would, when no device claims addr.
func (b *Bus) Read(addr uint64, p []byte) bool {
	e, ok := b.find(addr)
	if !ok {
		for i := range p {
			p[i] = 0xff
		}
		return false
	}
	e.dev.Read(addr-e.base, p)
	return true
}

// Write dispatches a write of p at addr. It reports false when no device
// claims addr; the write is then dropped.
func (b *Bus) Write(addr uint64, p []byte) bool {
	e, ok := b.find(addr)
	if !ok {
		return false
	}
	e.dev.Write(addr-e.base, p)
	return true
}

// Range describes one device's window on a bus.
type Range struct {
	Name       string
	Base, Size uint64
}

// Ranges lists the windows on the bus in address order.
func (b *Bus) Ranges() []Range {
	var out []Range
	for _, e := range b.list() {
		out = append(out, Range{e.name, e.base, e.size})
	}
	return out
}
