package virtio

import "collective/kvm/guestmem"

// Feature bits reserved for the transport and queues (virtio 1.2 section 6).
const (
	FIndirectDesc = 1 << 28 // VIRTIO_F_INDIRECT_DESC
	FEventIdx     = 1 << 29 // VIRTIO_F_EVENT_IDX
	FVersion1     = 1 << 32 // VIRTIO_F_VERSION_1
)

// transportFeatures are offered for every device.
const transportFeatures = FIndirectDesc | FEventIdx | FVersion1

// Device status bits (section 2.1).
const (
	StatusAcknowledge = 1
	StatusDriver      = 2
	StatusDriverOK    = 4
	StatusFeaturesOK  = 8
	StatusNeedsReset  = 64
	StatusFailed      = 128
)

// Device IDs (section 5).
const (
	TypeNet   = 1
	TypeBlock = 2
	TypeInput = 18
)

// Device is a virtio device type (block, net, input, ...) behind a
// transport. The transport owns feature negotiation, the status register,
// the queues' configuration and interrupts; the device owns its
// configuration space and what it does with the queues once activated.
type Device interface {
	// Type returns the virtio device ID.
	Type() uint16
	// Features returns the device-specific feature bits the device
	// offers. The transport adds VERSION_1, INDIRECT_DESC and EVENT_IDX.
	Features() uint64
	// QueueSizes returns the maximum size of each queue (powers of two,
	// at most MaxQueueSize); its length is the number of queues.
	QueueSizes() []uint16
	// ConfigSize returns the size of the device configuration space.
	ConfigSize() uint64
	// ReadConfig reads the device configuration space at off. The
	// transport clamps the access to ConfigSize.
	ReadConfig(off uint64, p []byte)
	// WriteConfig writes the device configuration space at off.
	WriteConfig(off uint64, p []byte)
	// Activate starts the device after the driver set DRIVER_OK, with the
	// negotiated features. queues has one entry per QueueSizes entry;
	// only enabled ones (Queue.Enabled) may be used. From now on the device
	// may read and write guest memory, until Reset returns. An error makes
	// the transport set DEVICE_NEEDS_RESET.
	Activate(mem *guestmem.Memory, queues []*Queue, irq Interrupt, features uint64) error
	// Reset stops an activated device: when it returns the device no
	// longer touches guest memory, the queues or irq. The transport then
	// returns the queues to their initial state.
	Reset()
}

// Quiescer is implemented by devices that process chains asynchronously.
// Quiesce stops taking new chains and waits until every chain taken is
// returned to the used ring; it reports whether this call quiesced the
// device (false: it was quiesced already, by a caller who will Resume it).
// Resume undoes it. The transport quiesces the device around Save so that
// no chain is lost in a snapshot, and resumes only a device it quiesced:
// resuming one the machine's Pause quiesced let it take chains while the
// paused machine's memory and disks were being saved.
type Quiescer interface {
	Quiesce() bool
	Resume()
}

// Interrupt is what an activated device signals through. Its methods are
// safe for concurrent use and never block on the guest.
type Interrupt interface {
	// SignalQueue raises the used-buffer interrupt of queue q (call it
	// when PushUsed reported that the driver wants one).
	SignalQueue(q int)
	// SignalConfig raises the configuration-change interrupt.
	SignalConfig()
	// NeedsReset reports a driver error the device cannot recover from
	// (a queue-fatal error): the transport sets DEVICE_NEEDS_RESET and
	// raises a configuration interrupt. The device should stop using the
	// queue.
	NeedsReset(err error)
}
