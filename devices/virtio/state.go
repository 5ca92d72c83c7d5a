package virtio

import (
	"fmt"

	"collective/devices/pci"
)

// StateVersion is the version of State that Save writes.
const StateVersion = 1

// QueueState is the saved state of one virtqueue.
type QueueState struct {
	Size       uint16 // queue_size as the driver set it
	Enabled    bool
	Desc       uint64 // descriptor table
	Driver     uint64 // available ring
	Device     uint64 // used ring
	MSIXVector uint16
	// NextAvail is the next available-ring entry the device will take.
	NextAvail uint16
	// NextUsed is the used index the device last published.
	NextUsed uint16
	// SignalledUsed and Signalled are the event-index state: the used
	// index at the last interrupt decision, and whether it is valid.
	SignalledUsed uint16
	Signalled     bool
}

// State is the saved state of a virtio-pci transport: the PCI function,
// negotiation, status and queues. The device's own state is saved by the
// device; restore the device first, then the transport (which activates
// the device again when the driver had set DRIVER_OK).
type State struct {
	// Version is StateVersion.
	Version uint32
	// DeviceType is the virtio device ID, checked on restore.
	DeviceType uint16
	// PCI is the PCI function's configuration space and MSI-X table.
	PCI pci.ConfigState

	DeviceFeatureSelect uint32
	DriverFeatureSelect uint32
	// Offered and Acked are the feature bits offered and acknowledged.
	Offered, Acked uint64
	// Status is device_status without DEVICE_NEEDS_RESET.
	Status     uint8
	NeedsReset bool
	ConfigGen  uint8
	QueueSel   uint16
	// ConfigVector is config_msix_vector.
	ConfigVector uint16
	// ISR is the interrupt status not yet read by the driver.
	ISR    uint8
	Queues []QueueState
}

// Save returns the transport's state. A device that implements Quiescer
// is quiesced first, so that every chain it took is back in the used ring.
func (t *Transport) Save() State {
	if qz, ok := t.dev.(Quiescer); ok && qz.Quiesce() {
		defer qz.Resume()
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	st := State{
		Version: StateVersion, DeviceType: t.dev.Type(), PCI: t.cfg.Save(),
		DeviceFeatureSelect: t.devSel, DriverFeatureSelect: t.drvSel,
		Offered: t.offered, Acked: t.acked, Status: t.status, NeedsReset: t.needsReset.Load(),
		ConfigGen: t.gen, QueueSel: t.queueSel, ConfigVector: uint16(t.configVector.Load()),
	}
	t.isrMu.Lock()
	st.ISR = t.isr
	t.isrMu.Unlock()
	for _, q := range t.queues {
		q.usedMu.Lock()
		st.Queues = append(st.Queues, QueueState{
			Size: q.size, Enabled: q.enabled, Desc: q.desc, Driver: q.avail, Device: q.used,
			MSIXVector: uint16(q.vector.Load()), NextAvail: q.nextAvail, NextUsed: q.nextUsed,
			SignalledUsed: q.signalledUsed, Signalled: q.signalled,
		})
		q.usedMu.Unlock()
	}
	return st
}

// reachable lists the status values (without FAILED) a driver can reach.
var reachable = map[uint8]bool{
	0: true, StatusAcknowledge: true, StatusAcknowledge | StatusDriver: true,
	StatusAcknowledge | StatusDriver | StatusFeaturesOK:                  true,
	StatusAcknowledge | StatusDriver | StatusFeaturesOK | StatusDriverOK: true,
}

// validate checks st against the transport as built: everything Save
// could not have produced is refused (a broken or hostile snapshot).
func (t *Transport) validate(st *State) error {
	switch {
	case st.Version != StateVersion:
		return fmt.Errorf("virtio: restore: state version %d, want %d", st.Version, StateVersion)
	case st.DeviceType != t.dev.Type():
		return fmt.Errorf("virtio: restore: device type %d, want %d", st.DeviceType, t.dev.Type())
	case st.Offered != t.offered:
		return fmt.Errorf("virtio: restore: offered features %#x, this device offers %#x", st.Offered, t.offered)
	case st.Acked&^st.Offered != 0:
		return fmt.Errorf("virtio: restore: acknowledged features %#x not offered", st.Acked&^st.Offered)
	case !reachable[st.Status&^StatusFailed]:
		return fmt.Errorf("virtio: restore: status %#x unreachable", st.Status)
	case st.Status&StatusFeaturesOK != 0 && st.Acked&FVersion1 == 0:
		return fmt.Errorf("virtio: restore: FEATURES_OK without VERSION_1")
	case len(st.Queues) != len(t.queues):
		return fmt.Errorf("virtio: restore: %d queues, want %d", len(st.Queues), len(t.queues))
	case st.ISR&^(isrQueue|isrConfig) != 0:
		return fmt.Errorf("virtio: restore: ISR %#x", st.ISR)
	case st.ConfigVector != NoVector && int(st.ConfigVector) >= t.msix.Vectors():
		return fmt.Errorf("virtio: restore: configuration vector %d", st.ConfigVector)
	}
	for i, qs := range st.Queues {
		q := &Queue{index: i, maxSize: t.queues[i].maxSize, size: qs.Size, desc: qs.Desc, avail: qs.Driver, used: qs.Device}
		if qs.MSIXVector != NoVector && int(qs.MSIXVector) >= t.msix.Vectors() {
			return fmt.Errorf("virtio: restore: queue %d vector %d", i, qs.MSIXVector)
		}
		if !qs.Enabled {
			if qs.NextAvail != 0 || qs.NextUsed != 0 {
				return fmt.Errorf("virtio: restore: disabled queue %d has indices", i)
			}
			continue
		}
		if err := q.check(t.mem); err != nil {
			return fmt.Errorf("virtio: restore: %w", err)
		}
	}
	return nil
}

// Restore replaces the transport's state with st after validating it
// (sizes, alignment, rings in guest memory, acked ⊆ offered, reachable
// status), restores the PCI function (moving its BAR), and activates the
// device if the driver had set DRIVER_OK. The transport must be freshly
// built or reset; on a validation error it is unchanged.
func (t *Transport) Restore(st State) error {
	if err := t.validate(&st); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.active {
		t.dev.Reset()
		t.active = false
	}
	if err := t.cfg.Restore(st.PCI); err != nil {
		return err
	}
	t.devSel, t.drvSel, t.acked, t.status = st.DeviceFeatureSelect, st.DriverFeatureSelect, st.Acked, st.Status
	t.gen, t.queueSel = st.ConfigGen, st.QueueSel
	t.configVector.Store(uint32(st.ConfigVector))
	t.needsReset.Store(st.NeedsReset)
	t.isrMu.Lock()
	t.isr = st.ISR
	t.isrMu.Unlock()
	for i, qs := range st.Queues {
		q := t.queues[i]
		q.reset()
		q.size, q.enabled, q.desc, q.avail, q.used = qs.Size, qs.Enabled, qs.Desc, qs.Driver, qs.Device
		q.vector.Store(uint32(qs.MSIXVector))
		q.nextAvail = qs.NextAvail
		q.usedMu.Lock()
		q.nextUsed, q.signalledUsed, q.signalled = qs.NextUsed, qs.SignalledUsed, qs.Signalled
		q.usedMu.Unlock()
	}
	if t.status&StatusDriverOK != 0 && t.status&StatusFailed == 0 {
		t.activate()
	}
	return nil
}
