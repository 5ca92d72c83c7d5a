package machine

import (
	"encoding/binary"
	"fmt"

	"collective/kvm"
	"collective/kvm/boot"
)

// Control-register and EFER bits used at entry.
const (
	cr0PE   = 1 << 0
	cr0ET   = 1 << 4
	cr0PG   = 1 << 31
	cr4PAE  = 1 << 5
	eferLME = 1 << 8
	eferLMA = 1 << 10
)

func flatSegment(sel uint16, typ uint8, long bool) kvm.Segment {
	s := kvm.Segment{Base: 0, Limit: 0xffffffff, Selector: sel, Type: typ, Present: 1, S: 1, G: 1, DB: 1}
	if long {
		s.L, s.DB = 1, 0
	}
	return s
}

// setEntry puts the boot vCPU in the state a loaded kernel expects
// (Linux boot.rst "64-bit Boot Protocol", or the PVH start state).
func setEntry(v *kvm.VCPU, e *boot.Entry) error {
	s, err := v.Sregs()
	if err != nil {
		return err
	}
	data := flatSegment(boot.SelData, 0x3, false) // read/write, accessed
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	s.TR = kvm.Segment{Selector: boot.SelTSS, Limit: 0x67, Type: 0xb, Present: 1} // busy TSS
	s.GDT = kvm.DTable{Base: e.GDT, Limit: e.GDTLimit}
	s.IDT = kvm.DTable{}
	regs := kvm.Regs{RIP: e.RIP, RSP: e.RSP, RFLAGS: 2}
	switch e.Mode {
	case boot.Protected32:
		s.CS = flatSegment(boot.SelCode32, 0xb, false) // execute/read, accessed
		s.CR0 = cr0PE | cr0ET
		s.CR3, s.CR4, s.EFER = 0, 0, 0
		regs.RBX = e.RBX
	case boot.Long64:
		s.CS = flatSegment(boot.SelCode64, 0xb, true)
		s.CR0 = cr0PE | cr0ET | cr0PG
		s.CR3 = e.PageTable
		s.CR4 = cr4PAE
		s.EFER = eferLME | eferLMA
		regs.RSI = e.RSI
	default:
		return fmt.Errorf("machine: unknown entry mode %v", e.Mode)
	}
	if err := v.SetSregs(s); err != nil {
		return err
	}
	return v.SetRegs(regs)
}

// LAPIC register offsets and values for the firmware's "virtual wire"
// set-up that PC firmware leaves behind (MP spec 3.6.2.2): the LAPIC
// software-enabled, LINT0 in ExtINT mode (the 8259 PIC), LINT1 in NMI mode.
const (
	lapicSVR  = 0xf0
	lapicLVT0 = 0x350
	lapicLVT1 = 0x360

	svrEnable   = 1 << 8
	lvtExtINT   = 0x7 << 8
	lvtNMI      = 0x4 << 8
	spuriousVec = 0xff
)

// setVirtualWire programs v's LAPIC the way PC firmware leaves it.
func setVirtualWire(v *kvm.VCPU) error {
	l, err := v.LAPIC()
	if err != nil {
		return err
	}
	put := func(off int, val uint32) {
		binary.LittleEndian.PutUint32(l.Regs[off:], val)
	}
	put(lapicSVR, svrEnable|spuriousVec)
	put(lapicLVT0, lvtExtINT)
	put(lapicLVT1, lvtNMI)
	return v.SetLAPIC(l)
}
