package machine

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"collective/devices/debugexit"
	"collective/devices/i8042"
	"collective/devices/pci"
	"collective/devices/pvpanic"
	"collective/devices/rtc"
	"collective/devices/serial"
	"collective/devices/virtio"
	"collective/devices/virtioblk"
	"collective/kvm"
)

// StateVersion is the semantic version of MachineState's format, which
// Save writes. Restore reads a state of the same major version and a minor
// version no newer than ours; it refuses anything else with a message
// naming both versions. Bump the minor version for an added optional field
// (older states decode with it zero), the major one for any change an
// older binary would misread.
const StateVersion = "1.1.0"

// MaxVCPUStates bounds the number of vCPU states a MachineState may hold.
const MaxVCPUStates = 256

// ErrVersion is matched by errors about an unsupported state or snapshot
// version.
var ErrVersion = errors.New("unsupported version")

// MachineState is everything of a machine except its guest RAM: the
// configuration that shapes it, every vCPU, the in-kernel interrupt
// controllers, PIT and kvmclock, and every device model's State. It is
// plain data (no handles, no pointers to live objects): snapshots encode
// it, migration sends it.
type MachineState struct {
	// Version is StateVersion when saved.
	Version string
	// MemSize and CPUs are the machine's configuration; a restore must
	// build the same.
	MemSize uint64
	CPUs    int
	// VCPUs holds one state per vCPU, in APIC ID order.
	VCPUs []*kvm.VCPUState
	// VM holds the PICs, IOAPIC, PIT and kvmclock.
	VM *kvm.VMState

	Serial    serial.State
	RTC       rtc.State
	I8042     i8042.State
	DebugExit debugexit.State

	// Virtio holds each virtio-pci device, in PCI slot order: its PCI
	// configuration, transport and queues, and the device's own state.
	// The restoring machine must be built with the same devices (the same
	// --disk arguments); their backends are reopened, not saved.
	Virtio []VirtioState `json:",omitempty"`

	// PVPanic is the pvpanic device and its PCI function (since 1.1.0;
	// absent in older states, which restore with the device as reset).
	PVPanic    *pvpanic.State   `json:",omitempty"`
	PVPanicPCI *pci.ConfigState `json:",omitempty"`
}

// VirtioState is the state of one virtio-pci device.
type VirtioState struct {
	Name      string
	Transport virtio.State
	Block     *virtioblk.State `json:",omitempty"`
}

// SaveState reads the machine's state.
//
// Preconditions: the VM is paused (m.VM().Pause()), so that vCPUs and
// devices are consistent with each other and with guest memory.
func (m *Machine) SaveState() (*MachineState, error) {
	if err := m.vm.CheckPaused(); err != nil {
		return nil, fmt.Errorf("machine: save state: %w", err)
	}
	msrs, err := m.sys.MSRIndexList()
	if err != nil {
		return nil, err
	}
	st := &MachineState{Version: StateVersion, MemSize: m.cfg.MemSize, CPUs: m.cfg.CPUs}
	for _, v := range m.vm.VCPUs() {
		vs, err := v.State(msrs)
		if err != nil {
			return nil, err
		}
		st.VCPUs = append(st.VCPUs, vs)
	}
	if st.VM, err = m.vm.State(); err != nil {
		return nil, err
	}
	st.Serial = m.Serial.Save()
	st.RTC = m.RTC.Save()
	st.I8042 = m.I8042.Save()
	st.DebugExit = m.DebugExit.Save()
	for _, d := range m.virtio {
		vs := VirtioState{Name: d.name, Transport: d.transport.Save()}
		if b, ok := d.transport.Device().(*virtioblk.Block); ok {
			bs := b.Save()
			vs.Block = &bs
		}
		st.Virtio = append(st.Virtio, vs)
	}
	if m.pvpanic != nil {
		ps, cs := m.pvpanic.Save(), m.pvpanic.PCI().Save()
		st.PVPanic, st.PVPanicPCI = &ps, &cs
	}
	return st, nil
}

// Validate checks a state's version and shape without a KVM. It does not
// check device states in depth: the devices' Restore does.
func (st *MachineState) Validate() error {
	if err := CheckVersion("machine state", st.Version, StateVersion); err != nil {
		return err
	}
	switch {
	case st.CPUs < 1 || st.CPUs > MaxVCPUStates:
		return fmt.Errorf("machine: state: %d vCPUs", st.CPUs)
	case len(st.VCPUs) != st.CPUs:
		return fmt.Errorf("machine: state: %d vCPU states for %d vCPUs", len(st.VCPUs), st.CPUs)
	case st.VM == nil:
		return errors.New("machine: state: no VM state")
	case st.MemSize < 16<<20 || st.MemSize%4096 != 0 || st.MemSize > 1<<46:
		return fmt.Errorf("machine: state: memory size %d", st.MemSize)
	}
	for i, v := range st.VCPUs {
		if v == nil || v.ID != i {
			return fmt.Errorf("machine: state: vCPU state %d missing or out of order", i)
		}
		if err := v.Validate(); err != nil {
			return err
		}
	}
	return nil
}

// Restore builds a machine from a saved state: the VM, devices and vCPUs
// as NewBare builds them, then every device's and vCPU's saved state. It
// does not touch guest RAM: the caller fills it (m.Memory(), or
// m.VM().MapFile) before the machine runs. cfg supplies the host side
// (console, log); its MemSize and CPUs may be zero, or must match the
// state's. On error nothing is left running.
func Restore(cfg Config, st *MachineState) (*Machine, error) {
	if err := st.Validate(); err != nil {
		return nil, err
	}
	if cfg.MemSize != 0 && cfg.MemSize != st.MemSize {
		return nil, badConfig("machine: restore: memory size %d, the state has %d", cfg.MemSize, st.MemSize)
	}
	if cfg.CPUs != 0 && cfg.CPUs != st.CPUs {
		return nil, badConfig("machine: restore: %d vCPUs, the state has %d", cfg.CPUs, st.CPUs)
	}
	cfg.MemSize, cfg.CPUs = st.MemSize, st.CPUs
	m, err := NewBare(cfg)
	if err != nil {
		return nil, err
	}
	if err := m.restore(st); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

func (m *Machine) restore(st *MachineState) error {
	// Device models first: they validate and are cheap to refuse.
	if err := m.Serial.Restore(st.Serial); err != nil {
		return err
	}
	if err := m.RTC.Restore(st.RTC); err != nil {
		return err
	}
	if err := m.I8042.Restore(st.I8042); err != nil {
		return err
	}
	if err := m.DebugExit.Restore(st.DebugExit); err != nil {
		return err
	}
	if len(st.Virtio) != len(m.virtio) {
		return badConfig("machine: restore: the state has %d virtio devices, the machine %d (give the same --disk arguments)", len(st.Virtio), len(m.virtio))
	}
	for i, d := range m.virtio {
		vs := st.Virtio[i]
		if vs.Name != d.name {
			return badConfig("machine: restore: virtio device %d is %q in the state, %q here", i, vs.Name, d.name)
		}
		if b, ok := d.transport.Device().(*virtioblk.Block); ok {
			if vs.Block == nil {
				return fmt.Errorf("machine: restore: %s: no block device state", d.name)
			}
			if err := b.Restore(*vs.Block); err != nil {
				return err
			}
		}
		if err := d.transport.Restore(vs.Transport); err != nil {
			return err
		}
	}
	if st.PVPanic != nil && st.PVPanicPCI != nil && m.pvpanic != nil {
		if err := m.pvpanic.Restore(*st.PVPanic); err != nil {
			return err
		}
		if err := m.pvpanic.PCI().Restore(*st.PVPanicPCI); err != nil {
			return err
		}
	}
	if err := m.vm.SetDevicesState(st.VM); err != nil {
		return err
	}
	vcpus := m.vm.VCPUs()
	if len(vcpus) != len(st.VCPUs) {
		return fmt.Errorf("machine: restore: %d vCPUs built, %d saved", len(vcpus), len(st.VCPUs))
	}
	for i, v := range vcpus {
		if err := v.SetState(st.VCPUs[i]); err != nil {
			return err
		}
	}
	return m.vm.SetClockState(st.VM)
}

// CheckVersion checks that a saved format version have can be read by
// code that writes version want: same major version, minor no newer. The
// error names both versions and matches ErrVersion.
func CheckVersion(what, have, want string) error {
	h, err := parseVersion(have)
	if err != nil {
		return fmt.Errorf("%s: version %q: %w (this binary reads %s)", what, have, ErrVersion, want)
	}
	w, err := parseVersion(want)
	if err != nil {
		panic(err) // our own constant
	}
	switch {
	case h[0] != w[0]:
		return fmt.Errorf("%s: format version %s, this binary reads %d.x (up to %s): %w", what, have, w[0], want, ErrVersion)
	case h[1] > w[1]:
		return fmt.Errorf("%s: format version %s is newer than this binary's %s: %w", what, have, want, ErrVersion)
	}
	return nil
}

func parseVersion(s string) ([3]int, error) {
	var v [3]int
	parts := strings.Split(s, ".")
	if len(parts) != 3 {
		return v, errors.New("not MAJOR.MINOR.PATCH")
	}
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 || n > 1<<16 || (len(p) > 1 && p[0] == '0') {
			return v, errors.New("not MAJOR.MINOR.PATCH")
		}
		v[i] = n
	}
	return v, nil
}

// VCPUBriefs summarises every vCPU for the post-mortem of a guest that
// stopped making progress: it pauses the vCPUs if they run (which kicks
// halted ones out of KVM_RUN), reads their state and resumes them.
func (m *Machine) VCPUBriefs() ([]kvm.VCPUBrief, error) {
	if !m.vm.Paused() {
		m.vm.Pause()
		defer m.vm.Resume()
	}
	msrs, err := m.sys.MSRIndexList()
	if err != nil {
		return nil, err
	}
	var out []kvm.VCPUBrief
	for _, v := range m.vm.VCPUs() {
		vs, err := v.State(msrs)
		if err != nil {
			return nil, err
		}
		out = append(out, vs.Brief())
	}
	return out, nil
}
