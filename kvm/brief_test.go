package kvm

import (
	"encoding/binary"
	"strings"
	"testing"
)

func TestBrief(t *testing.T) {
	s := &VCPUState{ID: 1, TSCKHz: 2_000_000}
	s.Regs.RIP, s.Regs.RFLAGS = 0xffffffff81a592eb, 0x246
	s.Sregs.CS.Selector = 0x10
	s.MPState.State = MPStateHalted
	put := func(off int, v uint32) { binary.LittleEndian.PutUint32(s.LAPIC.Regs[off:], v) }
	put(lapicIRR+0x10*7, 1<<4) // vector 228
	put(lapicIRR, 1<<3)        // vector 3, lower
	put(lapicISR+0x10*2, 1)    // vector 64
	put(lapicLVTT, 2<<17|0xec) // tsc-deadline, vector 236, unmasked
	s.MSRs = []MSR{{Index: MSRIA32TSC, Data: 10_000_000}, {Index: MSRIA32TSCDeadline, Data: 6_000_000}}
	s.Events = &VCPUEvents{NMIPending: 1}
	b := s.Brief()
	want := VCPUBrief{ID: 1, MPState: "halted", RIP: 0xffffffff81a592eb, RFLAGS: 0x246, IF: true, IRR: 228, ISR: 64,
		Pending: "NMI", Timer: "tsc-deadline", TimerVector: 0xec, TSC: 10_000_000, TSCDeadline: 6_000_000, DeadlineInUS: -2000}
	if b != want {
		t.Errorf("Brief =\n%+v, want\n%+v", b, want)
	}
	if str := b.String(); !strings.Contains(str, "vCPU 1 halted rip=0xffffffff81a592eb") || !strings.Contains(str, "(in -2000 us)") {
		t.Errorf("String = %s", str)
	}
	put(lapicLVTT, 1<<16|1<<17|0x30)
	put(lapicTMCCT, 77)
	s.Regs.RFLAGS = 0x2
	s.Sregs.CS.Selector = 0x33
	b = s.Brief()
	if b.Timer != "periodic" || !b.TimerMasked || b.TimerCount != 77 || b.IF || b.CPL != 3 || b.DeadlineInUS != 0 {
		t.Errorf("periodic, masked, count 77, IF clear, CPL 3: got %+v", b)
	}
}
