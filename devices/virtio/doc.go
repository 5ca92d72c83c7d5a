// Package virtio implements the device side of virtio 1.2 (OASIS, "Virtual
// I/O Device (VIRTIO) Version 1.2"): split virtqueues (section 2.7) and the
// virtio-pci modern transport (section 4.1), shared by every virtio device
// type (block in devices/virtioblk; net and input later).
//
// # Queues
//
// A Queue reads the descriptor table and available ring and writes the used
// ring in guest memory, only through *guestmem.Memory (bounds-checked, VMM
// writes recorded as dirty). Pop walks one chain with the checks of
// Firecracker's queue.rs: head and next indices below the queue size, a TTL
// of the queue size (loops end), indirect tables one level deep with a
// length that is a nonzero multiple of 16 and at most the queue size, every
// buffer inside guest memory, device-readable buffers before
// device-writable ones, lengths summed without overflow. Each descriptor is
// copied once, then checked (single fetch). A malformed chain fails only
// that request (*ChainError, the head is returned to the driver); an
// available index more than the queue size ahead, a head out of range or a
// ring outside memory are queue-fatal and the device asks for a reset
// (Interrupt.NeedsReset). Ring indices are uint16 and wrap explicitly.
// EVENT_IDX (used_event / avail_event) and the NO_INTERRUPT / NO_NOTIFY
// flags suppress interrupts and notifications.
//
// # Transport
//
// NewPCI wraps a Device in a PCI function (vendor 0x1af4, device
// 0x1040+type, revision 1) with one 64-bit memory BAR of BARSize bytes:
//
//	0x0000  common configuration (struct virtio_pci_common_cfg, 0x38 bytes)
//	0x1000  ISR status
//	0x2000  device configuration (the Device's)
//	0x3000  notify: queue q's doorbell at 0x3000 + 4*q (notify_off_multiplier 4)
//	0x4000  MSI-X table (one vector per queue, plus one for configuration)
//	0x6000  MSI-X pending-bit array
//
// Feature negotiation offers the device's features plus VERSION_1,
// INDIRECT_DESC and EVENT_IDX, drops what the driver acknowledges beyond
// the offer, and refuses FEATURES_OK without VERSION_1. The status register
// moves only along the transition table (validStatus); writing 0 resets the
// device and returns every queue to its initial state. A driver error the
// device cannot survive sets DEVICE_NEEDS_RESET and raises a configuration
// interrupt; nothing the guest writes panics.
//
// Interrupts go through MSI-X (a pci.MSIXSink) when the driver enabled it,
// else through the ISR and the function's INTx line.
//
// # Wiring (for the machine)
//
//	t, err := virtio.NewPCI("virtio-blk0", dev, mem, vm)  // vm: *kvm.VM is a pci.MSIXSink
//	t.PCI().SetINTx(gsi, vm.IRQLine(gsi))                 // optional INTx fallback
//	slot, err := pciBus.Add(t.PCI())                      // assigns and maps BAR 0
//
// Notifications arrive either as MMIO writes to BAR 0 (the bus calls the
// BAR window, which rings the queue's doorbell), or through an ioeventfd the
// machine registers at t.PCI().BAR(0) + t.NotifyOffset(q) (length 2) and
// whose waiting goroutine calls t.Notify(q); the vCPU then never leaves
// KVM_RUN for a doorbell. When the guest moves BAR 0 (pci.BARMapper sees a
// BARInfo whose Dev is t.BAR()), the machine moves the ioeventfds too.
//
// # Snapshots
//
// Transport.Save returns a plain State (PCI function, negotiation, queues);
// devices that process chains asynchronously implement Quiescer so that no
// taken chain is in flight during Save. Restore validates everything (queue
// sizes and alignment, rings in memory, acked ⊆ offered, a reachable
// status) before it changes anything, then activates the device again.
//
// # Concurrency
//
// Lock order:
//
//	Transport.mu (registers, negotiation, queue configuration)
//	  Device.Activate / Device.Reset (called with mu held)
//	  Transport.isrMu, pci.MSIX.mu (interrupt delivery)
//	    pci.Config.mu (INTx level)
//	Queue.usedMu (used ring), taken by device goroutines, never with
//	Transport.mu held except in Save/Restore
//	Transport.warnMu (last)
//
// Device goroutines never take Transport.mu: Interrupt's methods use
// atomics and the interrupt locks only, so Reset may wait for them.
//
// # Security
//
// Everything in guest memory and every register write is untrusted; see
// the checks above. The device never allocates in proportion to a
// guest-supplied size (chains are bounded by the queue size).
package virtio
