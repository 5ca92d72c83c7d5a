package pci

import (
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"

	"collective/devices/bus"
)

// Configuration mechanism 1 ports: CONFIG_ADDRESS at ConfigIOBase, and
// CONFIG_DATA at ConfigIOBase+4. A Bus is one device for the whole window.
const (
	ConfigIOBase = 0xcf8
	ConfigIOSize = 8
)

// NumSlots is the number of device numbers on a bus.
const NumSlots = 32

// Host bridge identity: the Q35 chipset's DRAM controller (8086:29c0).
const (
	HostBridgeVendor = 0x8086
	HostBridgeDevice = 0x29c0
	classHostBridge  = 0x060000
)

// Window is a range of guest-physical addresses Bus.Add assigns BARs from.
type Window struct {
	Base, Size uint64
}

// Bus is PCI bus 0 with configuration mechanism 1. Create it with NewBus.
type Bus struct {
	addr  atomic.Uint32                    // CONFIG_ADDRESS
	slots [NumSlots]atomic.Pointer[Config] // set once by Add

	mu     sync.Mutex // serialises Add
	mapper BARMapper  // immutable
	window Window     // immutable
	next   uint64     // +checklocks:mu; next free address in window
}

// NewBus returns a bus with the host bridge in slot 0. Bus.Add assigns BARs
// from window and maps them through mapper (nil: BARs are never mapped).
func NewBus(mapper BARMapper, window Window) *Bus {
	b := &Bus{mapper: mapper, window: window, next: window.Base}
	hb := NewConfig("pci-host", Identity{Vendor: HostBridgeVendor, Device: HostBridgeDevice, Class: classHostBridge,
		SubVendor: HostBridgeVendor, Subsystem: 0x1100})
	hb.onBus = true
	b.slots[0].Store(hb)
	return b
}

// Add puts the function c in the first free slot, assigns each of its BARs
// an address from the window (naturally aligned), enables memory decoding
// and maps the BARs, as firmware would. It returns the slot number.
func (b *Bus) Add(c *Config) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	slot := -1
	for i := range b.slots {
		if b.slots[i].Load() == nil {
			slot = i
			break
		}
	}
	if slot < 0 {
		return 0, fmt.Errorf("pci: %s: bus is full", c.name)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	if c.onBus {
		c.mu.Unlock()
		return 0, errOnBus
	}
	next := b.next
	var addrs [NumBARs]uint64
	for i := range c.bars {
		size := c.bars[i].size
		if size == 0 {
			continue
		}
		a := (next + size - 1) &^ (size - 1)
		if a < next || a+size < a || a+size > b.window.Base+b.window.Size {
			c.mu.Unlock()
			return 0, fmt.Errorf("pci: %s: BAR %d (%#x bytes) does not fit the window %#x+%#x", c.name, i, size, b.window.Base, b.window.Size)
		}
		addrs[i] = a
		next = a + size
	}
	for i := range c.bars {
		if c.bars[i].size != 0 {
			c.setBAR(i, addrs[i])
		}
	}
	cmd := binary.LittleEndian.Uint16(c.data[RegCommand:])
	binary.LittleEndian.PutUint16(c.data[RegCommand:], cmd|CommandMemory)
	c.onBus = true
	c.mapper = b.mapper
	var want [NumBARs]uint64
	c.decodedBARs(&want)
	c.mu.Unlock()
	c.remap(&want)
	for i := range c.bars {
		if c.bars[i].size != 0 && c.bars[i].mapped != want[i] {
			return 0, fmt.Errorf("pci: %s: BAR %d could not be mapped at %#x", c.name, i, want[i])
		}
	}
	b.next = next
	b.slots[slot].Store(c)
	return slot, nil
}

// Function returns the function in slot, or nil.
func (b *Bus) Function(slot int) *Config {
	if slot < 0 || slot >= NumSlots {
		return nil
	}
	return b.slots[slot].Load()
}

// target decodes CONFIG_ADDRESS: the function addressed and the register.
func (b *Bus) target() (*Config, uint64) {
	a := b.addr.Load()
	if a&0x8000_0000 == 0 || a>>16&0xff != 0 || a>>8&7 != 0 {
		return nil, 0
	}
	return b.slots[a>>11&0x1f].Load(), uint64(a & 0xfc)
}

// Read implements devices.Device.Read for ports ConfigIOBase+off.
func (b *Bus) Read(off uint64, p []byte) {
	switch {
	case off == 0 && len(p) == 4:
		binary.LittleEndian.PutUint32(p, b.addr.Load())
		return
	case off >= 4 && off < 8 && off-4+uint64(len(p)) <= 4:
		if c, reg := b.target(); c != nil {
			c.Read(reg+off-4, p)
			return
		}
	}
	for i := range p {
		p[i] = 0xff
	}
}

// Write implements devices.Device.Write for ports ConfigIOBase+off. Only
// 4-byte writes reach CONFIG_ADDRESS (bits 1:0 and 30:24 read as zero).
func (b *Bus) Write(off uint64, p []byte) {
	switch {
	case off == 0 && len(p) == 4:
		b.addr.Store(binary.LittleEndian.Uint32(p) & 0x80ff_fffc)
	case off >= 4 && off < 8 && off-4+uint64(len(p)) <= 4:
		if c, reg := b.target(); c != nil {
			c.Write(reg+off-4, p)
			// A BAR that moved or stopped decoding may have freed the
			// range another function's BAR was refused: as hardware
			// would, that BAR decodes again at once.
			for i := range b.slots {
				if o := b.slots[i].Load(); o != nil && o != c {
					o.retryUnmapped()
				}
			}
		}
	}
}

// MMIOMapper is a BARMapper that moves BAR windows on an MMIO bus.
type MMIOMapper struct {
	Bus *bus.Bus
}

// MapBAR implements BARMapper.MapBAR.
func (m MMIOMapper) MapBAR(b BARInfo, oldAddr, newAddr uint64) error {
	if oldAddr != Unmapped {
		if err := m.Bus.Remove(oldAddr); err != nil {
			return err
		}
	}
	if newAddr == Unmapped {
		return nil
	}
	return m.Bus.Insert(b.Name, newAddr, b.Size, b.Dev)
}
