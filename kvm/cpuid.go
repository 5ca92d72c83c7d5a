package kvm

import (
	"encoding/binary"
	"fmt"
)

// Collective's own hypervisor CPUID leaves. KVM's leaves stay at
// 0x40000000 so that Linux finds its paravirtual features (kvmclock);
// ours sit at the next base Linux scans.
const (
	// CPUIDLeafBase returns the highest leaf in EAX and "CollectiveVM" in
	// EBX, ECX, EDX.
	CPUIDLeafBase = 0x40000100
	// CPUIDLeafInfo returns the TSC frequency in kHz in EAX and the
	// interface version in EBX.
	CPUIDLeafInfo = 0x40000101

	// HypervisorSignature is the signature of CPUIDLeafBase.
	HypervisorSignature   = "CollectiveVM"
	cpuidInterfaceVersion = 1
)

// CPUID returns the CPUID table for vCPU apicID of a VM with ncpus vCPUs:
// what KVM supports, with the APIC ID and topology filled in, the
// hypervisor bit set, the TSC-deadline timer offered when KVM emulates it
// (KVM_GET_SUPPORTED_CPUID leaves that bit to us, api.rst) and Collective's
// leaves added.
func (s *System) CPUID(apicID, ncpus int, tscKHz uint32) ([]CPUIDEntry, error) {
	sup, err := s.SupportedCPUID()
	if err != nil {
		return nil, err
	}
	if apicID > 255 || ncpus > 255 {
		return nil, fmt.Errorf("kvm: CPUID: APIC ID %d or %d vCPUs beyond xAPIC", apicID, ncpus)
	}
	// With the TSC-deadline timer Linux programs the LAPIC timer by one
	// MSR write per event and skips calibrating it against the PIT, which
	// under a slow or loaded host fails ("APIC timer disabled due to
	// verification failure") and leaves the guest on the PIT's periodic
	// tick.
	deadline := s.Has(CapTSCDeadline)
	out := make([]CPUIDEntry, 0, len(sup)+2)
	for _, e := range sup {
		switch e.Function {
		case 1:
			// EBX: APIC ID in 31:24, logical processor count in 23:16,
			// CLFLUSH line size (8 x 8 bytes) in 15:8.
			e.EBX = uint32(apicID)<<24 | uint32(ncpus)<<16 | 8<<8
			e.ECX |= 1 << 31 // hypervisor present
			if deadline {
				e.ECX |= 1 << 24 // TSC-deadline
			}
			if ncpus > 1 {
				e.EDX |= 1 << 28 // HTT: the count in EBX is valid
			}
		case 0xb, 0x1f:
			e.EDX = uint32(apicID)
		case CPUIDLeafBase, CPUIDLeafInfo:
			continue
		}
		out = append(out, e)
	}
	sig := []byte(HypervisorSignature)
	out = append(out,
		CPUIDEntry{
			Function: CPUIDLeafBase,
			EAX:      CPUIDLeafInfo,
			EBX:      binary.LittleEndian.Uint32(sig[0:4]),
			ECX:      binary.LittleEndian.Uint32(sig[4:8]),
			EDX:      binary.LittleEndian.Uint32(sig[8:12]),
		},
		CPUIDEntry{Function: CPUIDLeafInfo, EAX: tscKHz, EBX: cpuidInterfaceVersion},
	)
	return out, nil
}
