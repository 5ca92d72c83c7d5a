package pci

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"
)

// MSI-X message control bits and table layout (PCI 3.0 section 6.8.2).
const (
	msixEnable   = 1 << 15
	msixFuncMask = 1 << 14

	// MSIXEntrySize is the size of one MSI-X table entry.
	MSIXEntrySize = 16
	// MaxMSIXVectors is the largest table the capability can describe.
	MaxMSIXVectors = 2048

	entryMasked = 1 // vector control bit 0
)

// MSIXSink delivers MSI messages to the platform's interrupt controller.
// *kvm.VM implements it (KVM_SIGNAL_MSI); a machine that prefers irqfds
// can implement it over GSI routes.
type MSIXSink interface {
	SignalMSI(addr uint64, data uint32) error
}

// MSIX is a function's MSI-X capability state: the vector table, the
// pending-bit array, the enable and function-mask bits. Create it with
// Config.AddMSIX.
type MSIX struct {
	sink MSIXSink // immutable

	mu       sync.Mutex
	table    [][MSIXEntrySize]byte // +checklocks:mu; fixed length
	pba      []uint64              // +checklocks:mu; fixed length
	enabled  bool                  // +checklocks:mu
	funcMask bool                  // +checklocks:mu

	// Errors counts messages the sink failed to deliver.
	Errors atomic.Uint64
}

// AddMSIX adds an MSI-X capability with n vectors whose table is at
// tableOff and PBA at pbaOff (both 8-byte aligned) in BAR bar. All vectors
// start masked and the capability disabled, as after reset. The device must
// route its BAR accesses at those offsets to the MSIX.
func (c *Config) AddMSIX(n int, bar int, tableOff, pbaOff uint32, sink MSIXSink) (*MSIX, error) {
	if n < 1 || n > MaxMSIXVectors || bar < 0 || bar >= NumBARs || tableOff%8 != 0 || pbaOff%8 != 0 {
		return nil, fmt.Errorf("pci: %s: bad MSI-X layout: %d vectors, BAR %d, table %#x, PBA %#x", c.name, n, bar, tableOff, pbaOff)
	}
	var body [10]byte
	binary.LittleEndian.PutUint16(body[0:], uint16(n-1))
	binary.LittleEndian.PutUint32(body[2:], tableOff|uint32(bar))
	binary.LittleEndian.PutUint32(body[6:], pbaOff|uint32(bar))
	wmask := make([]byte, len(body))
	wmask[1] = (msixEnable | msixFuncMask) >> 8
	m := &MSIX{sink: sink, table: make([][MSIXEntrySize]byte, n), pba: make([]uint64, (n+63)/64)}
	for i := range m.table {
		m.table[i][12] = entryMasked
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.msix != nil {
		return nil, fmt.Errorf("pci: %s: MSI-X capability already present", c.name)
	}
	off, err := c.addCapability(CapMSIX, body[:], wmask)
	if err != nil {
		return nil, err
	}
	c.msix, c.msixCap = m, off
	return m, nil
}

// Vectors returns the number of vectors.
func (m *MSIX) Vectors() int { return len(m.table) }

// TableSize returns the size of the vector table in bytes.
func (m *MSIX) TableSize() uint64 { return uint64(len(m.table)) * MSIXEntrySize }

// PBASize returns the size of the pending-bit array in bytes.
func (m *MSIX) PBASize() uint64 { return uint64(len(m.pba)) * 8 }

// Enabled reports whether the guest enabled MSI-X (then INTx must not be
// used).
func (m *MSIX) Enabled() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.enabled
}

// Signal raises vector v. It reports false when MSI-X is disabled, in which
// case the caller should use INTx. A masked vector (or a masked function)
// gets its pending bit set and is delivered when unmasked. Vectors beyond
// the table are dropped.
func (m *MSIX) Signal(v uint16) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.enabled {
		return false
	}
	if int(v) >= len(m.table) {
		return true
	}
	if m.funcMask || m.table[v][12]&entryMasked != 0 {
		m.pba[v/64] |= 1 << (v % 64)
		return true
	}
	m.deliver(int(v))
	return true
}

// +checklocks:m.mu
func (m *MSIX) deliver(v int) {
	e := &m.table[v]
	addr := binary.LittleEndian.Uint64(e[0:])
	data := binary.LittleEndian.Uint32(e[8:])
	if m.sink == nil {
		return
	}
	if err := m.sink.SignalMSI(addr, data); err != nil {
		m.Errors.Add(1)
	}
}

// deliverPending sends every pending vector that is no longer masked.
// +checklocks:m.mu
func (m *MSIX) deliverPending() {
	if !m.enabled || m.funcMask {
		return
	}
	for w := range m.pba {
		for set := m.pba[w]; set != 0; {
			bit := bits.TrailingZeros64(set)
			set &^= 1 << bit
			v := w*64 + bit
			if m.table[v][12]&entryMasked == 0 {
				m.pba[w] &^= 1 << bit
				m.deliver(v)
			}
		}
	}
}

func (m *MSIX) setControl(enabled, funcMask bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.enabled, m.funcMask = enabled, funcMask
	m.deliverPending()
}

// ReadTable reads the vector table at offset off from its start. Accesses
// must be 4 bytes, or 8 bytes at an entry's address or data half, aligned;
// others read as zero.
func (m *MSIX) ReadTable(off uint64, p []byte) {
	clear(p)
	if !tableAccessOK(off, len(p)) || off >= m.TableSize() {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	e := &m.table[off/MSIXEntrySize]
	copy(p, e[off%MSIXEntrySize:])
}

// WriteTable writes the vector table; in vector control only the mask bit
// is writable. Unmasking a vector delivers it if pending.
func (m *MSIX) WriteTable(off uint64, p []byte) {
	if !tableAccessOK(off, len(p)) || off >= m.TableSize() {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	v := off / MSIXEntrySize
	e := &m.table[v]
	for i, b := range p {
		r := off%MSIXEntrySize + uint64(i)
		switch {
		case r == 12:
			e[r] = b & entryMasked
		case r > 12:
			// reserved bits of vector control
		default:
			e[r] = b
		}
	}
	if e[12]&entryMasked == 0 && m.pba[v/64]&(1<<(v%64)) != 0 && m.enabled && !m.funcMask {
		m.pba[v/64] &^= 1 << (v % 64)
		m.deliver(int(v))
	}
}

func tableAccessOK(off uint64, n int) bool {
	switch n {
	case 4:
		return off%4 == 0
	case 8:
		return off%8 == 0
	}
	return false
}

// ReadPBA reads the pending-bit array at offset off from its start.
func (m *MSIX) ReadPBA(off uint64, p []byte) {
	clear(p)
	if !tableAccessOK(off, len(p)) || off >= m.PBASize() {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], m.pba[off/8])
	copy(p, b[off%8:])
}

// WritePBA ignores the write: the PBA is read-only.
func (m *MSIX) WritePBA(uint64, []byte) {}

// Pending reports whether vector v's pending bit is set.
func (m *MSIX) Pending(v uint16) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return int(v) < len(m.table) && m.pba[v/64]&(1<<(v%64)) != 0
}
