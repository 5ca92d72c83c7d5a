package rtc

import "fmt"

// StateVersion is the version of State that Save writes.
const StateVersion = 1

// maxOffset bounds the guest clock's offset from the host's, in seconds:
// more than the registers can express (year 25599).
const maxOffset = 1 << 40

// State is the saved state of an RTC.
type State struct {
	// Version is StateVersion.
	Version uint32
	// Index is the selected CMOS byte (0-127).
	Index uint8
	// NMIMasked is bit 7 of the last index write.
	NMIMasked bool
	// CMOS holds the 128 bytes of the chip. Registers A and B keep their
	// writable bits (A's UIP reads live and is stored as 0); registers C
	// and D are read-only and stored as 0. The time registers hold the
	// values last frozen by SET; while SET is clear they are read from the
	// clock instead.
	CMOS [128]uint8
	// OffsetSeconds is the guest's clock minus the host's UTC clock.
	OffsetSeconds int64
}

func (s *State) validate() error {
	switch {
	case s.Version != StateVersion:
		return fmt.Errorf("rtc: restore: state version %d, want version %d", s.Version, StateVersion)
	case s.Index >= 128:
		return fmt.Errorf("rtc: restore: index %#x out of range", s.Index)
	case s.CMOS[regA]&aUIP != 0:
		return fmt.Errorf("rtc: restore: register A %#x has UIP set", s.CMOS[regA])
	case s.CMOS[regC] != 0 || s.CMOS[regD] != 0:
		return fmt.Errorf("rtc: restore: registers C and D (%#x, %#x) are not stored", s.CMOS[regC], s.CMOS[regD])
	case s.OffsetSeconds > maxOffset || s.OffsetSeconds < -maxOffset:
		return fmt.Errorf("rtc: restore: clock offset %d s out of range", s.OffsetSeconds)
	}
	return nil
}
