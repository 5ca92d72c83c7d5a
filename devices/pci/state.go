package pci

import (
	"encoding/binary"
	"fmt"
)

// StateVersion is the version of ConfigState that Save writes.
const StateVersion = 1

// ConfigState is the saved state of a function's configuration space and
// MSI-X capability. It holds no host resources.
type ConfigState struct {
	// Version is StateVersion.
	Version uint32
	// Data is the configuration space as the guest sees it.
	Data [ConfigSize]byte
	// INTxLevel is the device's INTx output.
	INTxLevel bool
	// MSIXTable is the MSI-X vector table (nil without MSI-X).
	MSIXTable [][MSIXEntrySize]byte
	// MSIXPending is the pending-bit array (nil without MSI-X).
	MSIXPending []uint64
}

// Save returns the function's state.
func (c *Config) Save() ConfigState {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	st := ConfigState{Version: StateVersion, Data: c.data, INTxLevel: c.intxLevel}
	c.mu.Unlock()
	if m := c.msix; m != nil {
		m.mu.Lock()
		st.MSIXTable = append([][MSIXEntrySize]byte(nil), m.table...)
		st.MSIXPending = append([]uint64(nil), m.pba...)
		m.mu.Unlock()
	}
	return st
}

// Restore replaces the function's state with st after checking that st
// belongs to a function built like this one: every read-only bit equal,
// the same MSI-X table size. It drives the INTx line to match and moves
// the BARs to their saved addresses. On error the function is unchanged.
func (c *Config) Restore(st ConfigState) error {
	if st.Version != StateVersion {
		return fmt.Errorf("pci: %s: restore: state version %d, want %d", c.name, st.Version, StateVersion)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	for r := range ConfigSize {
		ro := ^c.wmask[r]
		if r == RegStatus || r == RegStatus+1 {
			ro &^= c.w1c[r]
			if r == RegStatus {
				ro &^= StatusINTx
			}
		}
		if (st.Data[r]^c.data[r])&ro != 0 {
			c.mu.Unlock()
			return fmt.Errorf("pci: %s: restore: read-only byte %#x is %#x, want %#x", c.name, r, st.Data[r], c.data[r])
		}
	}
	if st.Data[RegStatus]&StatusINTx != 0 != st.INTxLevel {
		c.mu.Unlock()
		return fmt.Errorf("pci: %s: restore: interrupt status bit disagrees with the INTx level", c.name)
	}
	m := c.msix
	if m == nil && (st.MSIXTable != nil || st.MSIXPending != nil) {
		c.mu.Unlock()
		return fmt.Errorf("pci: %s: restore: MSI-X state for a function without MSI-X", c.name)
	}
	if m != nil && (len(st.MSIXTable) != len(m.table) || len(st.MSIXPending) != len(m.pba)) {
		c.mu.Unlock()
		return fmt.Errorf("pci: %s: restore: MSI-X table of %d vectors, want %d", c.name, len(st.MSIXTable), len(m.table))
	}
	if m != nil {
		for i, e := range st.MSIXTable {
			if e[12]&^entryMasked != 0 || e[13] != 0 || e[14] != 0 || e[15] != 0 {
				c.mu.Unlock()
				return fmt.Errorf("pci: %s: restore: MSI-X vector %d has reserved control bits set", c.name, i)
			}
		}
		if n := len(m.table) % 64; n != 0 && st.MSIXPending[len(st.MSIXPending)-1]>>n != 0 {
			c.mu.Unlock()
			return fmt.Errorf("pci: %s: restore: MSI-X pending bits beyond the table", c.name)
		}
	}
	c.data = st.Data
	c.canonBARs()
	c.intxLevel = st.INTxLevel
	c.driveINTx()
	var ctl uint16
	if m != nil {
		ctl = binary.LittleEndian.Uint16(c.data[c.msixCap+2:])
	}
	var want [NumBARs]uint64
	c.decodedBARs(&want)
	c.mu.Unlock()
	if m != nil {
		m.mu.Lock()
		copy(m.table, st.MSIXTable)
		copy(m.pba, st.MSIXPending)
		m.mu.Unlock()
		m.setControl(ctl&msixEnable != 0, ctl&msixFuncMask != 0)
	}
	c.remap(&want)
	return nil
}
