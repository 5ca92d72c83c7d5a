package kvm

import (
	"errors"
	"fmt"
	"runtime"
	"structs"
	"unsafe"
)

// This file holds the state ioctls that snapshots and migration need:
// the whole architectural state of a vCPU (VCPUState) and of the VM's
// in-kernel devices (VMState), read from a paused VM and written into a
// freshly created one, in the order api.rst and QEMU's
// kvm_arch_put_registers require.

// More capabilities the state code probes for.
const (
	CapXSave2 Cap = 208 // KVM_CAP_XSAVE2: the size of KVM_GET_XSAVE2's buffer
)

// Request numbers of the state ioctls (api.rst, include/uapi/linux/kvm.h).
var (
	kvmGetPIT2       = iorT[PITState2](0x9f)
	kvmSetPIT2       = iowT[PITState2](0xa0)
	kvmGetVCPUEvents = iorT[VCPUEvents](0x9f)
	kvmSetVCPUEvents = iowT[VCPUEvents](0xa0)
	kvmGetDebugRegs  = iorT[DebugRegs](0xa1)
	kvmSetDebugRegs  = iowT[DebugRegs](0xa2)
	kvmSetTSCKHz     = io(0xa2)
	kvmGetXSave      = ior(0xa4, xsaveSize)
	kvmSetXSave      = iow(0xa5, xsaveSize)
	kvmGetXSave2     = ior(0xcf, xsaveSize)
	kvmGetXCRs       = iorT[XCRs](0xa6)
	kvmSetXCRs       = iowT[XCRs](0xa7)
	kvmSetClock      = iowT[ClockData](0x7b)
	kvmGetClock      = iorT[ClockData](0x7c)
)

// xsaveSize is the size of struct kvm_xsave (KVM_GET_XSAVE); KVM_GET_XSAVE2
// may need more (KVM_CAP_XSAVE2).
const xsaveSize = 4096

// maxXSaveSize bounds an XSAVE area read from KVM or a snapshot.
const maxXSaveSize = 1 << 20

// MSR indices with restore-order constraints.
const (
	MSRIA32TSC         = 0x10
	MSRIA32TSCDeadline = 0x6e0
)

// VCPUEvents is struct kvm_vcpu_events: pending and injected exceptions,
// interrupts, NMIs and SMIs.
type VCPUEvents struct {
	_ structs.HostLayout
	// exception
	ExceptionInjected     uint8
	ExceptionNr           uint8
	ExceptionHasErrorCode uint8
	ExceptionPending      uint8
	ExceptionErrorCode    uint32
	// interrupt
	InterruptInjected uint8
	InterruptNr       uint8
	InterruptSoft     uint8
	InterruptShadow   uint8
	// nmi
	NMIInjected uint8
	NMIPending  uint8
	NMIMasked   uint8
	_           uint8

	SIPIVector uint32
	Flags      uint32
	// smi
	SMM          uint8
	SMIPending   uint8
	SMMInsideNMI uint8
	LatchedInit  uint8

	TripleFaultPending  uint8
	Reserved            [26]uint8
	ExceptionHasPayload uint8
	ExceptionPayload    uint64
}

// DebugRegs is struct kvm_debugregs.
type DebugRegs struct {
	_        structs.HostLayout
	DB       [4]uint64
	DR6      uint64
	DR7      uint64
	Flags    uint64
	Reserved [9]uint64
}

// XCR is struct kvm_xcr.
type XCR struct {
	_     structs.HostLayout
	XCR   uint32
	_     uint32
	Value uint64
}

// XCRs is struct kvm_xcrs: the extended control registers (XCR0).
type XCRs struct {
	_      structs.HostLayout
	NrXCRs uint32
	Flags  uint32
	XCRs   [16]XCR
	_      [16]uint64
}

// PITChannel is struct kvm_pit_channel_state.
type PITChannel struct {
	_             structs.HostLayout
	Count         uint32
	LatchedCount  uint16
	CountLatched  uint8
	StatusLatched uint8
	Status        uint8
	ReadState     uint8
	WriteState    uint8
	WriteLatch    uint8
	RWMode        uint8
	Mode          uint8
	BCD           uint8
	Gate          uint8
	CountLoadTime int64
}

// PITState2 is struct kvm_pit_state2.
type PITState2 struct {
	_        structs.HostLayout
	Channels [3]PITChannel
	Flags    uint32
	_        [9]uint32
}

// ClockData is struct kvm_clock_data: the VM's kvmclock.
type ClockData struct {
	_        structs.HostLayout
	Clock    uint64
	Flags    uint32
	_        uint32
	Realtime uint64
	HostTSC  uint64
	_        [4]uint32
}

// VCPUState is the architectural state of one vCPU. Parts that this KVM
// does not offer (a capability it lacks) are nil and are not restored.
// It is plain data: it can be encoded and checked without a KVM.
type VCPUState struct {
	ID      int
	Regs    Regs
	Sregs   Sregs
	FPU     FPU    // only without XSave, which holds the same state
	XSave   []byte `json:",omitempty"` // struct kvm_xsave (or larger, KVM_CAP_XSAVE2); nil without XSAVE
	XCRs    *XCRs  `json:",omitempty"`
	MSRs    []MSR  // every readable MSR of KVM_GET_MSR_INDEX_LIST
	LAPIC   LAPIC
	MPState MPState
	Events  *VCPUEvents `json:",omitempty"`
	Debug   *DebugRegs  `json:",omitempty"`
	TSCKHz  uint32      // 0 when unknown
}

// Validate checks what the kernel would not: sizes and counts.
func (s *VCPUState) Validate() error {
	switch {
	case s.ID < 0 || s.ID > 255:
		return fmt.Errorf("kvm: vCPU state: APIC ID %d out of range", s.ID)
	case s.XSave != nil && (len(s.XSave) < xsaveSize || len(s.XSave) > maxXSaveSize || len(s.XSave)%4 != 0):
		return fmt.Errorf("kvm: vCPU %d state: XSAVE area of %d bytes", s.ID, len(s.XSave))
	case s.XCRs != nil && s.XCRs.NrXCRs > uint32(len(s.XCRs.XCRs)):
		return fmt.Errorf("kvm: vCPU %d state: %d XCRs", s.ID, s.XCRs.NrXCRs)
	case len(s.MSRs) > 16384:
		return fmt.Errorf("kvm: vCPU %d state: %d MSRs", s.ID, len(s.MSRs))
	case s.MPState.State > MPStateSIPIReceived && s.MPState.State != 5 && s.MPState.State != 6 && s.MPState.State != 7:
		return fmt.Errorf("kvm: vCPU %d state: MP state %d", s.ID, s.MPState.State)
	}
	return nil
}

// State reads the vCPU's whole state. The VM must be paused (or the
// vCPU never run): a running vCPU's state would be torn.
func (v *VCPU) State(msrIndices []uint32) (*VCPUState, error) {
	st := &VCPUState{ID: v.id}
	sys := v.vm.sys
	err := v.call(func() error {
		get := func(name string, req uintptr, p unsafe.Pointer) error {
			if err := ioctlPtr(v.fd, req, p); err != nil {
				return fmt.Errorf("kvm: vCPU %d: %s: %w", v.id, name, err)
			}
			return nil
		}
		if err := get("KVM_GET_REGS", kvmGetRegs, unsafe.Pointer(&st.Regs)); err != nil {
			return err
		}
		if err := get("KVM_GET_SREGS", kvmGetSregs, unsafe.Pointer(&st.Sregs)); err != nil {
			return err
		}
		// The XSAVE area holds the x87 and SSE state too: KVM_GET_FPU
		// only without it (SetState sets one or the other).
		if !sys.Has(CapXSave) {
			if err := get("KVM_GET_FPU", kvmGetFPU, unsafe.Pointer(&st.FPU)); err != nil {
				return err
			}
		} else {
			size := max(xsaveSize, sys.Check(CapXSave2))
			if size > maxXSaveSize {
				return fmt.Errorf("kvm: vCPU %d: XSAVE area of %d bytes", v.id, size)
			}
			buf := make([]byte, size)
			req := kvmGetXSave
			if size > xsaveSize {
				req = kvmGetXSave2
			}
			if err := get("KVM_GET_XSAVE", req, unsafe.Pointer(&buf[0])); err != nil {
				return err
			}
			st.XSave = buf
		}
		if sys.Has(CapXCRs) {
			st.XCRs = new(XCRs)
			if err := get("KVM_GET_XCRS", kvmGetXCRs, unsafe.Pointer(st.XCRs)); err != nil {
				return err
			}
		}
		if err := get("KVM_GET_LAPIC", kvmGetLAPIC, unsafe.Pointer(&st.LAPIC)); err != nil {
			return err
		}
		if err := get("KVM_GET_MP_STATE", kvmGetMPState, unsafe.Pointer(&st.MPState)); err != nil {
			return err
		}
		if sys.Has(CapVCPUEvents) {
			st.Events = new(VCPUEvents)
			if err := get("KVM_GET_VCPU_EVENTS", kvmGetVCPUEvents, unsafe.Pointer(st.Events)); err != nil {
				return err
			}
		}
		if sys.Has(CapDebugRegs) {
			st.Debug = new(DebugRegs)
			if err := get("KVM_GET_DEBUGREGS", kvmGetDebugRegs, unsafe.Pointer(st.Debug)); err != nil {
				return err
			}
		}
		if sys.Has(CapGetTSCKHz) {
			if khz, err := ioctl(v.fd, kvmGetTSCKHz, 0); err == nil {
				st.TSCKHz = uint32(khz)
			}
		}
		msrs, err := v.readMSRs(msrIndices)
		if err != nil {
			return err
		}
		st.MSRs = msrs
		return nil
	})
	if err != nil {
		return nil, err
	}
	return st, nil
}

// readMSRs reads every MSR of indices that KVM lets it read (inside call).
// KVM_GET_MSRS stops at the first MSR it cannot read; that one is
// skipped and the rest read again.
func (v *VCPU) readMSRs(indices []uint32) ([]MSR, error) {
	var out []MSR
	for len(indices) > 0 {
		buf := make([]byte, 8+len(indices)*int(unsafe.Sizeof(MSR{})))
		*(*uint32)(unsafe.Pointer(&buf[0])) = uint32(len(indices))
		ents := unsafe.Slice((*MSR)(unsafe.Pointer(&buf[8])), len(indices))
		for i, idx := range indices {
			ents[i].Index = idx
		}
		n, err := ioctl(v.fd, kvmGetMSRs, uintptr(unsafe.Pointer(&buf[0])))
		runtime.KeepAlive(buf)
		if err != nil {
			return nil, fmt.Errorf("kvm: vCPU %d: KVM_GET_MSRS: %w", v.id, err)
		}
		out = append(out, ents[:n]...)
		if int(n) >= len(indices) {
			break
		}
		indices = indices[n+1:] // skip the unreadable one
	}
	return out, nil
}

// writeMSRs writes msrs (inside call); every one must be accepted.
func (v *VCPU) writeMSRs(msrs []MSR) error {
	if len(msrs) == 0 {
		return nil
	}
	buf := make([]byte, 8+len(msrs)*int(unsafe.Sizeof(MSR{})))
	*(*uint32)(unsafe.Pointer(&buf[0])) = uint32(len(msrs))
	copy(unsafe.Slice((*MSR)(unsafe.Pointer(&buf[8])), len(msrs)), msrs)
	n, err := ioctl(v.fd, kvmSetMSRs, uintptr(unsafe.Pointer(&buf[0])))
	runtime.KeepAlive(buf)
	if err != nil {
		return fmt.Errorf("kvm: vCPU %d: KVM_SET_MSRS: %w", v.id, err)
	}
	if int(n) != len(msrs) {
		return fmt.Errorf("kvm: vCPU %d: KVM_SET_MSRS: MSR %#x refused", v.id, msrs[n].Index)
	}
	return nil
}

// SetState writes a saved state into the vCPU, which must not be running.
// The order follows api.rst and QEMU's kvm_arch_put_registers: special
// registers first (CR4 and EFER shape what the rest may hold, and APIC_BASE
// must precede the LAPIC), the TSC frequency, general registers, the
// XSAVE area and XCRs, MSRs (TSC among them), the LAPIC, then the TSC
// deadline (which needs the LAPIC's timer mode), MP state, debug
// registers, and pending events last.
func (v *VCPU) SetState(st *VCPUState) error {
	if err := st.Validate(); err != nil {
		return err
	}
	if st.ID != v.id {
		return fmt.Errorf("kvm: vCPU %d: state of vCPU %d", v.id, st.ID)
	}
	sys := v.vm.sys
	for _, c := range []struct {
		have bool
		cap  Cap
	}{{st.XSave != nil, CapXSave}, {st.XCRs != nil, CapXCRs}, {st.Events != nil, CapVCPUEvents}, {st.Debug != nil, CapDebugRegs}} {
		if c.have && !sys.Has(c.cap) {
			return fmt.Errorf("kvm: vCPU %d: the state holds what %s saves, which this KVM lacks: %w", v.id, c.cap, ErrNotSupported)
		}
	}
	if st.XSave != nil {
		if need := max(xsaveSize, sys.Check(CapXSave2)); len(st.XSave) < need {
			// A shorter area from a host with fewer XSAVE features: pad.
			st.XSave = append(st.XSave, make([]byte, need-len(st.XSave))...)
		} else if len(st.XSave) > need {
			return fmt.Errorf("kvm: vCPU %d: XSAVE area of %d bytes, this KVM takes %d: %w", v.id, len(st.XSave), need, ErrNotSupported)
		}
	}
	var msrs, late []MSR
	for _, m := range st.MSRs {
		if m.Index == MSRIA32TSCDeadline {
			late = append(late, m)
		} else {
			msrs = append(msrs, m)
		}
	}
	return v.call(func() error {
		set := func(name string, req uintptr, p unsafe.Pointer) error {
			if err := ioctlPtr(v.fd, req, p); err != nil {
				return fmt.Errorf("kvm: vCPU %d: %s: %w", v.id, name, err)
			}
			return nil
		}
		if err := set("KVM_SET_SREGS", kvmSetSregs, unsafe.Pointer(&st.Sregs)); err != nil {
			return err
		}
		if st.TSCKHz != 0 && sys.Has(CapGetTSCKHz) {
			cur, err := ioctl(v.fd, kvmGetTSCKHz, 0)
			if err == nil && uint32(cur) != st.TSCKHz {
				if !sys.Has(CapTSCControl) {
					return fmt.Errorf("kvm: vCPU %d: TSC at %d kHz here, the state's at %d kHz, and this KVM cannot scale it: %w", v.id, cur, st.TSCKHz, ErrNotSupported)
				}
				if _, err := ioctl(v.fd, kvmSetTSCKHz, uintptr(st.TSCKHz)); err != nil {
					return fmt.Errorf("kvm: vCPU %d: KVM_SET_TSC_KHZ %d: %w", v.id, st.TSCKHz, err)
				}
			}
		}
		if err := set("KVM_SET_REGS", kvmSetRegs, unsafe.Pointer(&st.Regs)); err != nil {
			return err
		}
		if st.XSave != nil {
			if err := set("KVM_SET_XSAVE", kvmSetXSave, unsafe.Pointer(&st.XSave[0])); err != nil {
				return err
			}
		} else if err := set("KVM_SET_FPU", kvmSetFPU, unsafe.Pointer(&st.FPU)); err != nil {
			return err
		}
		if st.XCRs != nil {
			if err := set("KVM_SET_XCRS", kvmSetXCRs, unsafe.Pointer(st.XCRs)); err != nil {
				return err
			}
		}
		if err := v.writeMSRs(msrs); err != nil {
			return err
		}
		if err := set("KVM_SET_LAPIC", kvmSetLAPIC, unsafe.Pointer(&st.LAPIC)); err != nil {
			return err
		}
		if err := v.writeMSRs(late); err != nil {
			return err
		}
		if err := set("KVM_SET_MP_STATE", kvmSetMPState, unsafe.Pointer(&st.MPState)); err != nil {
			return err
		}
		if st.Debug != nil {
			d := *st.Debug
			d.Flags = 0 // api.rst: flags must be zero on set
			if err := set("KVM_SET_DEBUGREGS", kvmSetDebugRegs, unsafe.Pointer(&d)); err != nil {
				return err
			}
		}
		if st.Events != nil {
			ev := *st.Events
			// Set back what KVM_GET_VCPU_EVENTS reported valid; the SMM
			// and triple-fault parts only when KVM said they were.
			if err := set("KVM_SET_VCPU_EVENTS", kvmSetVCPUEvents, unsafe.Pointer(&ev)); err != nil {
				return err
			}
		}
		return nil
	})
}

// VMState is the state of the VM's in-kernel devices: both PICs, the
// IOAPIC, the PIT and kvmclock. Parts this KVM lacks are nil.
type VMState struct {
	PICMaster IRQChip
	PICSlave  IRQChip
	IOAPIC    IRQChip
	PIT       *PITState2 `json:",omitempty"`
	Clock     *ClockData `json:",omitempty"`
}

// State reads the in-kernel devices' state. The VM must be paused.
func (vm *VM) State() (*VMState, error) {
	st := &VMState{}
	var err error
	for _, c := range []struct {
		id  uint32
		dst *IRQChip
	}{{IRQChipPICMaster, &st.PICMaster}, {IRQChipPICSlave, &st.PICSlave}, {IRQChipIOAPIC, &st.IOAPIC}} {
		if *c.dst, err = vm.IRQChip(c.id); err != nil {
			return nil, err
		}
	}
	if vm.sys.Has(CapPITState2) {
		st.PIT = new(PITState2)
		if err := ioctlPtr(vm.fd, kvmGetPIT2, unsafe.Pointer(st.PIT)); err != nil {
			return nil, fmt.Errorf("kvm: KVM_GET_PIT2: %w", err)
		}
	}
	if vm.sys.Has(CapAdjustClock) {
		st.Clock = new(ClockData)
		if err := ioctlPtr(vm.fd, kvmGetClock, unsafe.Pointer(st.Clock)); err != nil {
			return nil, fmt.Errorf("kvm: KVM_GET_CLOCK: %w", err)
		}
	}
	return st, nil
}

// SetDevicesState restores the irqchips and the PIT (before the vCPUs).
func (vm *VM) SetDevicesState(st *VMState) error {
	for i, c := range []IRQChip{st.PICMaster, st.PICSlave, st.IOAPIC} {
		if c.ChipID != uint32(i) {
			return fmt.Errorf("kvm: irqchip state %d has chip id %d", i, c.ChipID)
		}
		if err := vm.SetIRQChip(c); err != nil {
			return err
		}
	}
	if st.PIT != nil {
		if !vm.sys.Has(CapPITState2) {
			return &CapError{CapPITState2}
		}
		p := *st.PIT
		if err := ioctlPtr(vm.fd, kvmSetPIT2, unsafe.Pointer(&p)); err != nil {
			return fmt.Errorf("kvm: KVM_SET_PIT2: %w", err)
		}
	}
	return nil
}

// SetClockState restores kvmclock (after the vCPUs, just before they run).
// The clock continues from the saved value: the guest sees no time pass
// while it was saved, consistently with its restored TSC.
func (vm *VM) SetClockState(st *VMState) error {
	if st.Clock == nil {
		return nil
	}
	if !vm.sys.Has(CapAdjustClock) {
		return &CapError{CapAdjustClock}
	}
	c := ClockData{Clock: st.Clock.Clock}
	if err := ioctlPtr(vm.fd, kvmSetClock, unsafe.Pointer(&c)); err != nil {
		return fmt.Errorf("kvm: KVM_SET_CLOCK: %w", err)
	}
	return nil
}

// errNotPaused is returned by state reads of a running VM.
var errNotPaused = errors.New("kvm: the VM is running: pause it first")

// CheckPaused returns an error unless the VM is paused.
func (vm *VM) CheckPaused() error {
	if !vm.Paused() {
		return errNotPaused
	}
	return nil
}
