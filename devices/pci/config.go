package pci

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"sync"

	"collective/devices"
)

// ConfigSize is the size of a function's configuration space.
const ConfigSize = 256

// Type 0 configuration header offsets (PCI 3.0 figure 6-1).
const (
	RegVendor      = 0x00
	RegDevice      = 0x02
	RegCommand     = 0x04
	RegStatus      = 0x06
	RegRevision    = 0x08
	RegClass       = 0x09 // programming interface, subclass, base class
	RegCacheLine   = 0x0c
	RegLatency     = 0x0d
	RegHeaderType  = 0x0e
	RegBAR0        = 0x10
	RegSubVendor   = 0x2c
	RegSubsystem   = 0x2e
	RegROM         = 0x30
	RegCapPtr      = 0x34
	RegInterruptLn = 0x3c
	RegInterruptPn = 0x3d

	capStart = 0x40 // first byte after the header
)

// Command and status register bits.
const (
	CommandIO          = 1 << 0
	CommandMemory      = 1 << 1
	CommandBusMaster   = 1 << 2
	CommandParity      = 1 << 6
	CommandSERR        = 1 << 8
	CommandINTxDisable = 1 << 10
	commandWritable    = CommandIO | CommandMemory | CommandBusMaster | CommandParity | CommandSERR | CommandINTxDisable
	StatusINTx         = 1 << 3
	StatusCapList      = 1 << 4
	statusW1C          = 0xf900 // parity, signalled/received aborts, SERR, detected parity
)

// Capability IDs (PCI Code and ID Assignment Specification).
const (
	CapVendor = 0x09
	CapMSIX   = 0x11
)

// NumBARs is the number of base address registers of a type 0 header.
const NumBARs = 6

// BARKind is the type of a memory BAR.
type BARKind uint8

// BAR kinds.
const (
	BARMem32 BARKind = iota // 32-bit memory BAR
	BARMem64                // 64-bit memory BAR (occupies two registers)
)

// Unmapped is the address BARMapper sees for a BAR that is not decoded.
const Unmapped = ^uint64(0)

// BARMapper moves BAR windows on the MMIO bus. A Config calls MapBAR when a
// BAR's decoded address changes, in two steps: MapBAR(b, old, Unmapped) to
// take the window down, then MapBAR(b, Unmapped, new) to put it up (so two
// BARs can trade places in one configuration write). An error from the
// second call leaves the BAR unmapped (the guest put it on top of something
// else); the Config tries again on the next configuration write.
type BARMapper interface {
	MapBAR(b BARInfo, oldAddr, newAddr uint64) error
}

// BARInfo describes one BAR for a BARMapper.
type BARInfo struct {
	Name  string         // the function's name and BAR index, for logs and the bus
	Index int            // register index, 0-5
	Size  uint64         // a power of two, at least 16
	Dev   devices.Device // the BAR's register window; offsets are from the BAR's base
}

// Identity is the read-only identification of a function.
type Identity struct {
	Vendor, Device       uint16
	Revision             uint8
	Class                uint32 // base class<<16 | subclass<<8 | programming interface
	SubVendor, Subsystem uint16
}

type bar struct {
	size     uint64 // 0: not implemented
	kind     BARKind
	prefetch bool
	dev      devices.Device
	mapped   uint64 // address MapBAR last succeeded with, or Unmapped
}

// Config is the configuration space of one PCI function. Create it with
// NewConfig, add BARs and capabilities, then put it on a Bus with Add.
type Config struct {
	name string // immutable

	wmu    sync.Mutex // serialises writes; held across BARMapper calls
	mapper BARMapper  // set by Bus.Add; +checklocks:wmu

	mu      sync.Mutex
	data    [ConfigSize]byte // +checklocks:mu
	wmask   [ConfigSize]byte // immutable once on a bus
	w1c     [ConfigSize]byte // immutable once on a bus
	bars    [NumBARs]bar     // sizes/kinds immutable once on a bus; mapped: +checklocks:wmu
	lastCap uint8            // offset of the last capability, 0 if none
	nextCap int              // first free byte for capabilities
	onBus   bool

	msix    *MSIX // nil without an MSI-X capability; immutable once on a bus
	msixCap uint8

	intxLine  devices.IRQLine // may be nil; immutable once on a bus
	intxLevel bool            // the device's INTx output; +checklocks:mu
	intxOut   bool            // the level last driven on intxLine; +checklocks:mu
}

// NewConfig returns the configuration space of a function with the given
// identity, header type 0, no BARs and no capabilities. Name labels the
// function in logs and on the MMIO bus.
func NewConfig(name string, id Identity) *Config {
	c := &Config{name: name, nextCap: capStart}
	le := binary.LittleEndian
	le.PutUint16(c.data[RegVendor:], id.Vendor)
	le.PutUint16(c.data[RegDevice:], id.Device)
	c.data[RegRevision] = id.Revision
	c.data[RegClass] = uint8(id.Class)
	c.data[RegClass+1] = uint8(id.Class >> 8)
	c.data[RegClass+2] = uint8(id.Class >> 16)
	le.PutUint16(c.data[RegSubVendor:], id.SubVendor)
	le.PutUint16(c.data[RegSubsystem:], id.Subsystem)
	le.PutUint16(c.wmask[RegCommand:], commandWritable)
	le.PutUint16(c.w1c[RegStatus:], statusW1C)
	c.wmask[RegCacheLine] = 0xff
	c.wmask[RegLatency] = 0xff
	c.wmask[RegInterruptLn] = 0xff
	for i := range c.bars {
		c.bars[i].mapped = Unmapped
	}
	return c
}

// Name returns the name the function was created with.
func (c *Config) Name() string { return c.name }

var errOnBus = errors.New("pci: function is already on a bus")

// AddBAR implements BAR i as a memory BAR of the given kind and size (a
// power of two, at least 16 bytes; at most 2 GiB for a 32-bit BAR) whose
// accesses go to dev. A 64-bit BAR also takes register i+1.
func (c *Config) AddBAR(i int, kind BARKind, size uint64, prefetchable bool, dev devices.Device) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.onBus:
		return errOnBus
	case i < 0 || i >= NumBARs || (kind == BARMem64 && i == NumBARs-1):
		return fmt.Errorf("pci: %s: BAR %d out of range", c.name, i)
	case size < 16 || size&(size-1) != 0:
		return fmt.Errorf("pci: %s: BAR %d size %#x is not a power of two >= 16", c.name, i, size)
	case kind == BARMem32 && size > 1<<31:
		return fmt.Errorf("pci: %s: 32-bit BAR %d size %#x too large", c.name, i, size)
	case kind != BARMem32 && kind != BARMem64:
		return fmt.Errorf("pci: %s: BAR %d: unknown kind %d", c.name, i, kind)
	case c.bars[i].size != 0 || c.used(i) || (kind == BARMem64 && c.bars[i+1].size != 0):
		return fmt.Errorf("pci: %s: BAR %d already in use", c.name, i)
	}
	c.bars[i] = bar{size: size, kind: kind, prefetch: prefetchable, dev: dev, mapped: Unmapped}
	var flags uint32
	if kind == BARMem64 {
		flags |= 0x4
	}
	if prefetchable {
		flags |= 0x8
	}
	binary.LittleEndian.PutUint32(c.data[RegBAR0+4*i:], flags)
	binary.LittleEndian.PutUint32(c.wmask[RegBAR0+4*i:], 0xffffffff)
	if kind == BARMem64 {
		binary.LittleEndian.PutUint32(c.wmask[RegBAR0+4*i+4:], 0xffffffff)
	}
	return nil
}

// used reports whether register i is the upper half of a 64-bit BAR.
// +checklocks:c.mu
func (c *Config) used(i int) bool {
	return i > 0 && c.bars[i-1].size != 0 && c.bars[i-1].kind == BARMem64
}

// AddCapability appends a capability with the given ID to the list. body is
// the capability after its ID and next-pointer bytes; wmask (nil, or as
// long as body) marks its guest-writable bits. It returns the capability's
// offset in configuration space.
func (c *Config) AddCapability(id uint8, body, wmask []byte) (uint8, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.addCapability(id, body, wmask)
}

// +checklocks:c.mu
func (c *Config) addCapability(id uint8, body, wmask []byte) (uint8, error) {
	if c.onBus {
		return 0, errOnBus
	}
	if wmask != nil && len(wmask) != len(body) {
		return 0, fmt.Errorf("pci: %s: capability %#x: write mask length %d, body %d", c.name, id, len(wmask), len(body))
	}
	off := c.nextCap
	end := off + 2 + len(body)
	if end > ConfigSize {
		return 0, fmt.Errorf("pci: %s: no room for capability %#x (%d bytes)", c.name, id, len(body)+2)
	}
	c.data[off] = id
	copy(c.data[off+2:], body)
	if wmask != nil {
		copy(c.wmask[off+2:], wmask)
	}
	if c.lastCap == 0 {
		c.data[RegCapPtr] = uint8(off)
		binary.LittleEndian.PutUint16(c.data[RegStatus:], binary.LittleEndian.Uint16(c.data[RegStatus:])|StatusCapList)
	} else {
		c.data[c.lastCap+1] = uint8(off)
	}
	c.lastCap = uint8(off)
	c.nextCap = (end + 3) &^ 3
	return uint8(off), nil
}

// SetINTx connects the function's INTA# output to line and sets the
// Interrupt Line register to gsi (what the guest reads to find its IRQ).
func (c *Config) SetINTx(gsi uint8, line devices.IRQLine) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.onBus {
		return errOnBus
	}
	c.intxLine = line
	c.data[RegInterruptLn] = gsi
	c.data[RegInterruptPn] = 1 // INTA#
	return nil
}

// SetIRQLevel sets the function's INTx output. The line is driven while the
// level is high and the command register's Interrupt Disable bit is clear;
// the status register's Interrupt Status bit follows the level.
func (c *Config) SetIRQLevel(high bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.intxLevel = high
	st := binary.LittleEndian.Uint16(c.data[RegStatus:]) &^ StatusINTx
	if high {
		st |= StatusINTx
	}
	binary.LittleEndian.PutUint16(c.data[RegStatus:], st)
	c.driveINTx()
}

// +checklocks:c.mu
func (c *Config) driveINTx() {
	out := c.intxLevel && binary.LittleEndian.Uint16(c.data[RegCommand:])&CommandINTxDisable == 0
	if out != c.intxOut {
		c.intxOut = out
		if c.intxLine != nil {
			c.intxLine.SetLevel(out)
		}
	}
}

// MSIX returns the function's MSI-X capability, or nil.
func (c *Config) MSIX() *MSIX { return c.msix }

// Read implements devices.Device.Read for configuration space: off is the
// register offset. Accesses beyond the 256 bytes read as all ones.
func (c *Config) Read(off uint64, p []byte) {
	if off >= ConfigSize || uint64(len(p)) > ConfigSize-off {
		for i := range p {
			p[i] = 0xff
		}
		return
	}
	c.mu.Lock()
	copy(p, c.data[off:])
	c.mu.Unlock()
}

// Write implements devices.Device.Write for configuration space. Read-only
// bits keep their value; write-1-to-clear bits are cleared by ones. A change
// of a BAR's address or of memory decoding moves the BAR through the
// BARMapper; a change of the MSI-X control word reaches the MSIX.
func (c *Config) Write(off uint64, p []byte) {
	if off >= ConfigSize || uint64(len(p)) > ConfigSize-off {
		return
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	oldCmd := binary.LittleEndian.Uint16(c.data[RegCommand:])
	for i, v := range p {
		r := int(off) + i
		c.data[r] = c.data[r]&^c.wmask[r] | v&c.wmask[r]
		c.data[r] &^= v & c.w1c[r]
	}
	if off < RegBAR0+4*NumBARs && off+uint64(len(p)) > RegBAR0 {
		c.canonBARs()
	}
	cmd := binary.LittleEndian.Uint16(c.data[RegCommand:])
	if (cmd^oldCmd)&CommandINTxDisable != 0 {
		c.driveINTx()
	}
	var msixCtl uint16
	touchesMSIX := c.msix != nil && off <= uint64(c.msixCap)+3 && off+uint64(len(p)) > uint64(c.msixCap)+2
	if touchesMSIX {
		msixCtl = binary.LittleEndian.Uint16(c.data[c.msixCap+2:])
	}
	var want [NumBARs]uint64
	c.decodedBARs(&want)
	c.mu.Unlock()

	if touchesMSIX {
		c.msix.setControl(msixCtl&msixEnable != 0, msixCtl&msixFuncMask != 0)
	}
	c.remap(&want)
}

// canonBARs rewrites the BAR registers so that address bits below a BAR's
// size read as zero and the type bits read as implemented.
// +checklocks:c.mu
func (c *Config) canonBARs() {
	le := binary.LittleEndian
	for i := range NumBARs {
		b := &c.bars[i]
		if b.size == 0 {
			continue
		}
		r := RegBAR0 + 4*i
		lo := le.Uint32(c.data[r:]) & 0xfffffff0 & uint32(^(b.size - 1))
		if b.kind == BARMem64 {
			lo |= 0x4
		}
		if b.prefetch {
			lo |= 0x8
		}
		le.PutUint32(c.data[r:], lo)
		if b.kind == BARMem64 {
			hi := le.Uint32(c.data[r+4:]) & uint32(^(b.size-1)>>32)
			le.PutUint32(c.data[r+4:], hi)
		}
	}
}

// decodedBARs fills want with each BAR's decoded address (Unmapped when
// memory decoding is off, the BAR is absent, or its window would wrap).
// +checklocks:c.mu
func (c *Config) decodedBARs(want *[NumBARs]uint64) {
	le := binary.LittleEndian
	memOn := le.Uint16(c.data[RegCommand:])&CommandMemory != 0
	for i := range NumBARs {
		want[i] = Unmapped
		b := &c.bars[i]
		if b.size == 0 || !memOn {
			continue
		}
		r := RegBAR0 + 4*i
		addr := uint64(le.Uint32(c.data[r:]) & 0xfffffff0)
		if b.kind == BARMem64 {
			addr |= uint64(le.Uint32(c.data[r+4:])) << 32
		}
		if _, carry := bits.Add64(addr, b.size, 0); carry != 0 {
			continue
		}
		want[i] = addr
	}
}

// remap calls the mapper for every BAR whose decoded address changed:
// first it unmaps every BAR that moves, then it maps them at their new
// addresses, so BARs may trade places in one write.
// +checklocks:c.wmu
// retryUnmapped maps again the BARs that are decoded but were left unmapped
// because another window was in the way, once that window may have moved.
func (c *Config) retryUnmapped() {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	var want [NumBARs]uint64
	c.decodedBARs(&want)
	c.mu.Unlock()
	c.remap(&want)
}

func (c *Config) remap(want *[NumBARs]uint64) {
	if c.mapper == nil {
		return
	}
	for i := range NumBARs {
		b := &c.bars[i]
		if b.size == 0 || b.mapped == want[i] || b.mapped == Unmapped {
			continue
		}
		// An unmap error means the window is already gone.
		_ = c.mapper.MapBAR(c.barInfo(i), b.mapped, Unmapped)
		b.mapped = Unmapped
	}
	for i := range NumBARs {
		b := &c.bars[i]
		if b.size == 0 || b.mapped == want[i] {
			continue
		}
		if err := c.mapper.MapBAR(c.barInfo(i), Unmapped, want[i]); err != nil {
			// The guest put the BAR on top of something else: it
			// stays unmapped, and is retried on the next write.
			continue
		}
		b.mapped = want[i]
	}
}

func (c *Config) barInfo(i int) BARInfo {
	return BARInfo{Name: c.name + "-bar" + string(rune('0'+i)), Index: i, Size: c.bars[i].size, Dev: c.bars[i].dev}
}

// BAR returns the address BAR i is mapped at, or Unmapped.
func (c *Config) BAR(i int) uint64 {
	if i < 0 || i >= NumBARs {
		return Unmapped
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.bars[i].mapped
}

// setBAR programs BAR i with addr (firmware role; used by Bus.Add).
// +checklocks:c.mu
func (c *Config) setBAR(i int, addr uint64) {
	r := RegBAR0 + 4*i
	binary.LittleEndian.PutUint32(c.data[r:], uint32(addr))
	if c.bars[i].kind == BARMem64 {
		binary.LittleEndian.PutUint32(c.data[r+4:], uint32(addr>>32))
	}
	c.canonBARs()
}
