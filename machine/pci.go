package machine

import (
	"errors"
	"fmt"
	"sync"

	"collective/devices/pci"
	"collective/devices/pvpanic"
	"collective/devices/virtio"
	"collective/devices/virtioblk"
	"collective/kvm"
	"collective/kvm/boot"
)

// The PCI MMIO window: from the start of the hole up to the IOAPIC.
const (
	pciWindowBase = 0xc000_0000
	pciWindowSize = 0xfec0_0000 - pciWindowBase
)

// virtioDev is a virtio device on the PCI bus with its doorbells.
type virtioDev struct {
	name      string
	transport *virtio.Transport
	closer    func() error

	mu       sync.Mutex     // guards barAddr and doorbell registration
	barAddr  uint64         // current address of the transport's BAR, or pci.Unmapped
	doorbell []*kvm.EventFD // one per queue
}

// barMapper moves BARs on the MMIO bus and keeps each virtio device's
// ioeventfd doorbells at its notify registers.
type barMapper struct {
	m    *Machine
	mmio pci.MMIOMapper
}

// MapBAR implements pci.BARMapper.MapBAR.
func (b *barMapper) MapBAR(info pci.BARInfo, oldAddr, newAddr uint64) error {
	if err := b.mmio.MapBAR(info, oldAddr, newAddr); err != nil {
		return err
	}
	for _, d := range b.m.virtio {
		if info.Dev == d.transport.BAR() {
			return d.moveDoorbells(b.m.vm, newAddr)
		}
	}
	return nil
}

// moveDoorbells registers the queue doorbells as ioeventfds at the BAR's
// new address (none when unmapped), so that a guest's notify wakes the
// device's goroutine without a trip through the vCPU loop.
func (d *virtioDev) moveDoorbells(vm *kvm.VM, addr uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	if d.barAddr != pci.Unmapped {
		for q, efd := range d.doorbell {
			errs = append(errs, vm.RemoveIOEventFD(d.barAddr+d.transport.NotifyOffset(q), 2, efd.FD(), false))
		}
	}
	d.barAddr = addr
	if addr != pci.Unmapped {
		for q, efd := range d.doorbell {
			errs = append(errs, vm.IOEventFD(addr+d.transport.NotifyOffset(q), 2, efd.FD(), false))
		}
	}
	return errors.Join(errs...)
}

// addFunction puts a PCI function on the bus with its INTA# wired to an
// IOAPIC pin (16-23 by slot, level-triggered as PCI interrupts are) and
// recorded for the MP table: the fallback for a guest without MSI-X.
func (m *Machine) addFunction(c *pci.Config) error {
	slot := len(m.pciIRQs) + 1 // slot 0 is the host bridge; slots fill in order
	gsi := uint8(16 + (slot-1)%8)
	if err := c.SetINTx(gsi, m.vm.IRQLine(uint32(gsi))); err != nil {
		return err
	}
	got, err := m.pci.Add(c)
	if err != nil {
		return err
	}
	if got != slot {
		return fmt.Errorf("machine: %s: PCI slot %d, expected %d", c.Name(), got, slot)
	}
	m.pciIRQs = append(m.pciIRQs, boot.PCIInterrupt{Device: uint8(slot), Pin: 0, IOAPICPin: gsi})
	return nil
}

// addPCI puts the PCI host bridge on ports 0xcf8-0xcff.
func (m *Machine) addPCI() error {
	m.msi = newMSIRouter(m.vm)
	m.pci = pci.NewBus(&barMapper{m: m, mmio: pci.MMIOMapper{Bus: &m.mmio}}, pci.Window{Base: pciWindowBase, Size: pciWindowSize})
	return m.pio.Insert("pci", pci.ConfigIOBase, pci.ConfigIOSize, m.pci)
}

// addDisk opens a --disk argument and attaches it as a virtio-blk device.
func (m *Machine) addDisk(arg string) error {
	spec, err := virtioblk.ParseDisk(arg)
	if err != nil {
		return badConfig("%v", err)
	}
	blk, err := virtioblk.Open(spec)
	if err != nil {
		return badConfig("%v", err)
	}
	name := fmt.Sprintf("virtio-blk%d", len(m.virtio))
	if err := m.addVirtio(name, blk, blk.Close); err != nil {
		blk.Close()
		return err
	}
	return nil
}

// addVirtio attaches a virtio device through a virtio-pci transport, with
// MSI-X delivered through GSI routes and irqfds and ioeventfd doorbells.
func (m *Machine) addVirtio(name string, dev virtio.Device, closer func() error) error {
	t, err := virtio.NewPCI(name, dev, m.mem, m.msi)
	if err != nil {
		return err
	}
	t.SetLogger(m.log)
	d := &virtioDev{name: name, transport: t, closer: closer, barAddr: pci.Unmapped}
	for q := 0; q < t.NumQueues(); q++ {
		efd, err := kvm.NewEventFD()
		if err != nil {
			return err
		}
		d.doorbell = append(d.doorbell, efd)
		go func() {
			for {
				if _, err := efd.Wait(); err != nil {
					return // closed
				}
				t.Notify(q)
			}
		}()
	}
	m.virtio = append(m.virtio, d)
	if err := m.addFunction(t.PCI()); err != nil {
		return fmt.Errorf("machine: %s: %w", name, err)
	}
	return nil
}

// closeVirtio stops the doorbell goroutines, resets every device (which
// waits for requests in flight: none may touch guest memory once it is
// unmapped) and closes the backends.
func (m *Machine) closeVirtio() error {
	var errs []error
	for _, d := range m.virtio {
		for _, efd := range d.doorbell {
			errs = append(errs, efd.Close())
		}
		d.transport.Device().Reset()
		if d.closer != nil {
			errs = append(errs, d.closer())
		}
	}
	m.virtio = nil
	return errors.Join(errs...)
}

// HoldDevices quiesces every virtio device that is not quiesced already
// (Pause quiesces them; pausing only the VM does not) and returns the
// function that resumes those it quiesced, and no other: a snapshot holds
// the devices still for as long as it reads memory and disks.
func (m *Machine) HoldDevices() (release func()) {
	var held []virtio.Quiescer
	for _, d := range m.virtio {
		if q, ok := d.transport.Device().(virtio.Quiescer); ok && q.Quiesce() {
			held = append(held, q)
		}
	}
	return func() {
		for _, q := range held {
			q.Resume()
		}
	}
}

// quiesceVirtio stops every asynchronous virtio device from taking new
// requests and waits for those in flight, so that guest memory and device
// state hold still while the machine is paused.
func (m *Machine) quiesceVirtio(stop bool) {
	for _, d := range m.virtio {
		if q, ok := d.transport.Device().(virtio.Quiescer); ok {
			if stop {
				q.Quiesce()
			} else {
				q.Resume()
			}
		}
	}
}

// addPVPanic attaches the pvpanic device: a guest kernel that panics
// reports it there (Linux's pvpanic-pci driver) before it resets, and the
// machine stops with ExitPanic.
func (m *Machine) addPVPanic() error {
	d, err := pvpanic.New(func(ev uint8) {
		if ev&pvpanic.Panicked != 0 {
			m.finish(Exit{Reason: ExitPanic})
		}
	})
	if err != nil {
		return err
	}
	m.pvpanic = d
	return m.addFunction(d.PCI())
}
