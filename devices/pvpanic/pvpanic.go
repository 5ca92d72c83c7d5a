// Package pvpanic is the paravirtual panic device, compatible with QEMU's
// pvpanic-pci (docs/specs/pvpanic.rst in QEMU; Linux's
// drivers/misc/pvpanic/pvpanic-pci.c): a PCI function 1b36:0011 whose
// memory BAR 0 holds one register. Reading it returns the events the
// device supports; the guest kernel writes PANICKED (bit 0) to it from its
// panic notifier, after the panic message is on the console, and
// CRASH_LOADED (bit 1) when a crash kernel takes over.
//
// The VMM turns PANICKED into a non-zero exit, so that a guest kernel panic
// is a failure rather than the reset that panic=-1 performs next.
//
// # Security
//
// The guest writes any value at any offset and size; unknown bits and
// offsets are ignored.
package pvpanic

import (
	"fmt"
	"sync"

	"collective/devices/pci"
)

// Event bits of the register.
const (
	Panicked    = 1 << 0
	CrashLoaded = 1 << 1

	supported = Panicked | CrashLoaded
)

// PCI identity of QEMU's pvpanic-pci.
const (
	VendorRedHat = 0x1b36
	DeviceID     = 0x0011
	classSystem  = 0x088000 // base class 0x08 (system peripheral), other
	barSize      = 16       // the smallest memory BAR; the register is at offset 0
)

// StateVersion is the version of State that Save writes.
const StateVersion = 1

// State is the device's saved state: the events the guest reported.
type State struct {
	Version uint32
	Events  uint8
}

// Device is a pvpanic device.
type Device struct {
	cfg    *pci.Config
	notify func(events uint8)

	mu     sync.Mutex
	events uint8 // events reported so far (sticky); guarded by mu
}

// New returns a pvpanic device that calls notify with the event bits each
// time the guest reports PANICKED or CRASH_LOADED. notify must not block.
func New(notify func(events uint8)) (*Device, error) {
	d := &Device{notify: notify}
	d.cfg = pci.NewConfig("pvpanic", pci.Identity{
		Vendor: VendorRedHat, Device: DeviceID, Class: classSystem,
		SubVendor: VendorRedHat, Subsystem: DeviceID,
	})
	if err := d.cfg.AddBAR(0, pci.BARMem32, barSize, false, (*register)(d)); err != nil {
		return nil, err
	}
	return d, nil
}

// PCI returns the device's configuration space, for pci.Bus.Add.
func (d *Device) PCI() *pci.Config { return d.cfg }

// Events returns the events the guest reported so far.
func (d *Device) Events() uint8 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.events
}

// Save returns the device's state.
func (d *Device) Save() State {
	d.mu.Lock()
	defer d.mu.Unlock()
	return State{Version: StateVersion, Events: d.events}
}

// Restore sets the device's state.
func (d *Device) Restore(st State) error {
	if st.Version != StateVersion {
		return fmt.Errorf("pvpanic: state version %d, this binary reads %d", st.Version, StateVersion)
	}
	if st.Events&^supported != 0 {
		return fmt.Errorf("pvpanic: state has unknown events %#x", st.Events)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.events = st.Events
	return nil
}

// register is the BAR window.
type register Device

// Read implements devices.Device.Read: offset 0 reads the supported events.
func (r *register) Read(off uint64, p []byte) {
	clear(p)
	if off == 0 && len(p) > 0 {
		p[0] = supported
	}
}

// Write implements devices.Device.Write: offset 0 takes the events.
func (r *register) Write(off uint64, p []byte) {
	if off != 0 || len(p) == 0 {
		return
	}
	ev := p[0] & supported
	if ev == 0 {
		return
	}
	d := (*Device)(r)
	d.mu.Lock()
	d.events |= ev
	d.mu.Unlock()
	d.notify(ev)
}
