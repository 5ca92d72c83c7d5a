package i8042

import "fmt"

// StateVersion is the version of State that Save writes.
const StateVersion = 1

// OutByte is one byte waiting in the output buffer.
type OutByte struct {
	// Data is the byte.
	Data uint8
	// Aux is true for a byte from the aux (mouse) port.
	Aux bool
}

// State is the saved state of an I8042.
type State struct {
	// Version is StateVersion.
	Version uint32
	// CommandByte is the controller's command (configuration) byte.
	CommandByte uint8
	// OutputPort is the controller's output port (bit 0 reset line, bit 1
	// A20 gate).
	OutputPort uint8
	// Pending is the command waiting for its data byte on port 0x60
	// (0x60-0x7F, 0xD1-0xD4), or 0 for none.
	Pending uint8
	// LastWasCommand is the A2 status bit: the last write went to port 0x64.
	LastWasCommand bool
	// Out holds the bytes in the output buffer, oldest first.
	Out []OutByte
}

func (s *State) validate() error {
	switch {
	case s.Version != StateVersion:
		return fmt.Errorf("i8042: restore: state version %d, want version %d", s.Version, StateVersion)
	case s.Pending != 0 && !takesData(s.Pending):
		return fmt.Errorf("i8042: restore: pending command %#x takes no data", s.Pending)
	case len(s.Out) > QueueSize:
		return fmt.Errorf("i8042: restore: %d bytes in the output buffer, limit %d", len(s.Out), QueueSize)
	case s.OutputPort&outReset == 0:
		return fmt.Errorf("i8042: restore: output port %#x holds the CPU in reset", s.OutputPort)
	}
	return nil
}
