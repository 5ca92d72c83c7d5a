package virtioblk

import (
	"fmt"
)

// StateVersion is the version of State that Save writes.
const StateVersion = 1

// State is the saved state of a Block. The device's guest-visible state is
// its identity and configuration; queues and negotiation are saved by the
// virtio transport. Restore checks the disk is the same shape.
type State struct {
	// Version is StateVersion.
	Version  uint32
	Capacity uint64 // sectors
	ReadOnly bool
	Serial   [SerialLen]byte
	// QueueSize is the maximum queue size offered.
	QueueSize uint16
}

// Save returns the device's state.
func (b *Block) Save() State {
	return State{Version: StateVersion, Capacity: b.capacity, ReadOnly: b.ro, Serial: b.serial, QueueSize: b.qsize}
}

// Restore checks st against the device (built by New on the same disk):
// a snapshot must resume on a disk of the same capacity, mode and queue
// size. The serial is the guest's view of the disk's identity, so the
// restored device answers GET_ID with the saved one, whatever the new
// file is called. Restore the device before its transport.
func (b *Block) Restore(st State) error {
	switch {
	case st.Version != StateVersion:
		return fmt.Errorf("virtioblk: restore: state version %d, want %d", st.Version, StateVersion)
	case st.Capacity != b.capacity:
		return fmt.Errorf("virtioblk: restore: capacity %d sectors, disk has %d", st.Capacity, b.capacity)
	case st.ReadOnly != b.ro:
		return fmt.Errorf("virtioblk: restore: read-only %v, disk opened read-only %v", st.ReadOnly, b.ro)
	case st.QueueSize != b.qsize:
		return fmt.Errorf("virtioblk: restore: queue size %d, device offers %d", st.QueueSize, b.qsize)
	}
	b.serial = st.Serial
	return nil
}
