package debugexit

import "fmt"

// StateVersion is the version of State that Save writes.
const StateVersion = 1

// State is the saved state of a DebugExit. The device has no state beyond
// its version.
type State struct {
	// Version is StateVersion.
	Version uint32
}

func (s *State) validate() error {
	if s.Version != StateVersion {
		return fmt.Errorf("debugexit: restore: state version %d, want version %d", s.Version, StateVersion)
	}
	return nil
}
