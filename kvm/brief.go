package kvm

import (
	"encoding/binary"
	"fmt"
	"strings"
)

// VCPUBrief is what a post-mortem of a stuck guest asks first of each
// vCPU (QEMU's "info registers" and "info lapic" in one line): where it
// runs, whether it can take interrupts, what it waits for and when its
// LAPIC timer fires.
type VCPUBrief struct {
	ID      int    `json:"id"`
	MPState string `json:"mp_state"` // runnable, halted, ...
	RIP     uint64 `json:"rip"`
	RSP     uint64 `json:"rsp"`
	RFLAGS  uint64 `json:"rflags"`
	CPL     int    `json:"cpl"`
	CR0     uint64 `json:"cr0"`
	CR3     uint64 `json:"cr3"`
	CR4     uint64 `json:"cr4"`
	// Interrupts: IF, the highest vector in the LAPIC's IRR and ISR (-1:
	// none), the task priority, and an event KVM holds for injection.
	IF      bool   `json:"if"`
	IRR     int    `json:"irr"`
	ISR     int    `json:"isr"`
	TPR     uint32 `json:"tpr"`
	Pending string `json:"pending,omitempty"`
	// Timer: the LAPIC timer's mode (one-shot, periodic, tsc-deadline),
	// vector and mask; for tsc-deadline the armed deadline's distance from
	// the vCPU's TSC in microseconds (negative: overdue), otherwise the
	// current count.
	Timer        string `json:"timer"`
	TimerMasked  bool   `json:"timer_masked"`
	TimerVector  uint8  `json:"timer_vector"`
	TimerCount   uint32 `json:"timer_count,omitempty"`
	TSC          uint64 `json:"tsc"`
	TSCDeadline  uint64 `json:"tsc_deadline,omitempty"`
	DeadlineInUS int64  `json:"deadline_in_us,omitempty"`
}

// LAPIC register offsets (Intel SDM vol. 3, table 11-1).
const (
	lapicTPR   = 0x80
	lapicISR   = 0x100
	lapicIRR   = 0x200
	lapicLVTT  = 0x320
	lapicTMCCT = 0x390
)

// Brief summarises s.
func (s *VCPUState) Brief() VCPUBrief {
	b := VCPUBrief{
		ID: s.ID, MPState: mpStateName(s.MPState.State),
		RIP: s.Regs.RIP, RSP: s.Regs.RSP, RFLAGS: s.Regs.RFLAGS, IF: s.Regs.RFLAGS&(1<<9) != 0,
		CPL: int(s.Sregs.CS.Selector & 3), CR0: s.Sregs.CR0, CR3: s.Sregs.CR3, CR4: s.Sregs.CR4,
	}
	reg := func(off int) uint32 { return binary.LittleEndian.Uint32(s.LAPIC.Regs[off:]) }
	highest := func(base int) int {
		for i := 7; i >= 0; i-- {
			if v := reg(base + 0x10*i); v != 0 {
				for bit := 31; bit >= 0; bit-- {
					if v&(1<<bit) != 0 {
						return 32*i + bit
					}
				}
			}
		}
		return -1
	}
	b.IRR, b.ISR, b.TPR = highest(lapicIRR), highest(lapicISR), reg(lapicTPR)
	if e := s.Events; e != nil {
		var p []string
		if e.ExceptionPending != 0 || e.ExceptionInjected != 0 {
			p = append(p, fmt.Sprintf("exception %d", e.ExceptionNr))
		}
		if e.InterruptInjected != 0 {
			p = append(p, fmt.Sprintf("interrupt %d", e.InterruptNr))
		}
		if e.NMIPending != 0 || e.NMIInjected != 0 {
			p = append(p, "NMI")
		}
		if e.InterruptShadow != 0 {
			p = append(p, "interrupt shadow")
		}
		b.Pending = strings.Join(p, ", ")
	}
	lvtt := reg(lapicLVTT)
	b.TimerVector, b.TimerMasked = uint8(lvtt), lvtt&(1<<16) != 0
	b.Timer = [4]string{"one-shot", "periodic", "tsc-deadline", "reserved"}[lvtt>>17&3]
	for _, m := range s.MSRs {
		switch m.Index {
		case MSRIA32TSC:
			b.TSC = m.Data
		case MSRIA32TSCDeadline:
			b.TSCDeadline = m.Data
		}
	}
	if b.Timer == "tsc-deadline" {
		if b.TSCDeadline != 0 && s.TSCKHz != 0 {
			b.DeadlineInUS = int64(b.TSCDeadline-b.TSC) * 1000 / int64(s.TSCKHz)
		}
	} else {
		b.TimerCount = reg(lapicTMCCT)
	}
	return b
}

func mpStateName(s uint32) string {
	switch s {
	case MPStateRunnable:
		return "runnable"
	case MPStateUninitialized:
		return "uninitialized"
	case MPStateInitReceived:
		return "init-received"
	case MPStateHalted:
		return "halted"
	case MPStateSIPIReceived:
		return "sipi-received"
	}
	return fmt.Sprintf("mp-state-%d", s)
}

// String formats b on one line.
func (b VCPUBrief) String() string {
	var t strings.Builder
	fmt.Fprintf(&t, "vCPU %d %s rip=%#x rsp=%#x cpl=%d rflags=%#x if=%v cr3=%#x irr=%d isr=%d tpr=%#x",
		b.ID, b.MPState, b.RIP, b.RSP, b.CPL, b.RFLAGS, b.IF, b.CR3, b.IRR, b.ISR, b.TPR)
	if b.Pending != "" {
		fmt.Fprintf(&t, " pending=[%s]", b.Pending)
	}
	fmt.Fprintf(&t, " timer=%s vector=%d masked=%v", b.Timer, b.TimerVector, b.TimerMasked)
	switch {
	case b.Timer == "tsc-deadline" && b.TSCDeadline == 0:
		fmt.Fprintf(&t, " tsc=%d deadline=none", b.TSC)
	case b.Timer == "tsc-deadline":
		fmt.Fprintf(&t, " tsc=%d deadline=%d (in %d us)", b.TSC, b.TSCDeadline, b.DeadlineInUS)
	default:
		fmt.Fprintf(&t, " count=%d", b.TimerCount)
	}
	return t.String()
}
