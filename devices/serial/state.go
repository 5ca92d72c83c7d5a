package serial

import "fmt"

// StateVersion is the version of State that Save writes.
const StateVersion = 1

// State is the saved state of a Serial: the guest-visible registers and the
// bytes waiting in the receive FIFO. It holds no host resources; the host
// writer, IRQ line and input channel are supplied again by New.
type State struct {
	// Version is StateVersion.
	Version uint32

	// IER is the Interrupt Enable Register (bits 3:0).
	IER uint8
	// FCR is the last programmed FIFO Control Register: bit 0 (FIFO
	// enable), bit 3 (DMA mode) and bits 7:6 (RX trigger level). The
	// self-clearing reset bits 1 and 2 are never stored.
	FCR uint8
	// LCR is the Line Control Register (bit 7 is DLAB).
	LCR uint8
	// MCR is the Modem Control Register (bits 4:0).
	MCR uint8
	// LSRErrors holds the sticky error bits of the Line Status Register
	// (OE, PE, FE, BI: bits 4:1), cleared when the guest reads LSR. DR,
	// THRE and TEMT are derived from the FIFOs.
	LSRErrors uint8
	// MSRDeltas holds the change bits of the Modem Status Register (bits
	// 3:0), cleared when the guest reads MSR. Bits 7:4 are derived from MCR.
	MSRDeltas uint8
	// SCR is the scratch register.
	SCR uint8
	// DLL and DLM are the divisor latch, low and high byte.
	DLL, DLM uint8
	// THREPending is true when a THR-empty interrupt is pending: THR
	// emptied (or IER bit 1 was set with THR empty) and neither an IIR read
	// reporting it nor a THR write has cleared it since.
	THREPending bool
	// RX holds the received bytes not yet read by the guest, oldest first:
	// at most FIFOSize with FIFOs enabled, at most 1 without.
	RX []byte
}

// validate checks that s could have been produced by Save.
func (s *State) validate() error {
	if s.Version != StateVersion {
		return fmt.Errorf("serial: restore: state version %d, want version %d", s.Version, StateVersion)
	}
	switch {
	case s.IER&^ierMask != 0:
		return fmt.Errorf("serial: restore: IER %#x has reserved bits set", s.IER)
	case s.FCR&^fcrStored != 0:
		return fmt.Errorf("serial: restore: FCR %#x has unstored bits set", s.FCR)
	case s.FCR&fcrEnable == 0 && s.FCR != 0:
		return fmt.Errorf("serial: restore: FCR %#x programs a disabled FIFO", s.FCR)
	case s.MCR&^mcrMask != 0:
		return fmt.Errorf("serial: restore: MCR %#x has reserved bits set", s.MCR)
	case s.LSRErrors&^lsrErrors != 0:
		return fmt.Errorf("serial: restore: LSR errors %#x has non-error bits set", s.LSRErrors)
	case s.MSRDeltas&^msrDeltas != 0:
		return fmt.Errorf("serial: restore: MSR deltas %#x has non-delta bits set", s.MSRDeltas)
	}
	limit := 1
	if s.FCR&fcrEnable != 0 {
		limit = FIFOSize
	}
	if len(s.RX) > limit {
		return fmt.Errorf("serial: restore: %d bytes in the receive buffer, limit %d", len(s.RX), limit)
	}
	return nil
}
