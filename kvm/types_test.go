package kvm

import (
	"testing"
	"unsafe"
)

// TestStructSizes checks our ioctl structs against the sizes of the C
// structs of include/uapi/linux/kvm.h on x86-64.
func TestStructSizes(t *testing.T) {
	for _, tc := range []struct {
		name      string
		got, want uintptr
	}{
		{"kvm_userspace_memory_region", unsafe.Sizeof(userspaceMemoryRegion{}), 32},
		{"kvm_dirty_log", unsafe.Sizeof(dirtyLog{}), 16},
		{"kvm_irq_level", unsafe.Sizeof(irqLevel{}), 8},
		{"kvm_pit_config", unsafe.Sizeof(pitConfig{}), 64},
		{"kvm_regs", unsafe.Sizeof(Regs{}), 144},
		{"kvm_segment", unsafe.Sizeof(Segment{}), 24},
		{"kvm_dtable", unsafe.Sizeof(DTable{}), 16},
		{"kvm_sregs", unsafe.Sizeof(Sregs{}), 312},
		{"kvm_fpu", unsafe.Sizeof(FPU{}), 416},
		{"kvm_lapic_state", unsafe.Sizeof(LAPIC{}), 1024},
		{"kvm_irqchip", unsafe.Sizeof(IRQChip{}), 520},
		{"kvm_cpuid_entry2", unsafe.Sizeof(CPUIDEntry{}), 40},
		{"kvm_msr_entry", unsafe.Sizeof(MSR{}), 16},
		{"kvm_run header", unsafe.Offsetof(run{}.Exit), 32},
		{"kvm_run io", unsafe.Sizeof(ioExit{}), 16},
		{"kvm_run mmio", unsafe.Sizeof(mmioExit{}), 24},
	} {
		if tc.got != tc.want {
			t.Errorf("sizeof(%s) = %d, want %d", tc.name, tc.got, tc.want)
		}
	}
}

func TestIoctlNumbers(t *testing.T) {
	// Values from a C program including <linux/kvm.h> on x86-64.
	for _, tc := range []struct {
		name      string
		got, want uintptr
	}{
		{"KVM_GET_API_VERSION", kvmGetAPIVersion, 0xAE00},
		{"KVM_CREATE_VM", kvmCreateVM, 0xAE01},
		{"KVM_RUN", kvmRun, 0xAE80},
		{"KVM_GET_REGS", kvmGetRegs, 0x8090AE81},
		{"KVM_SET_REGS", kvmSetRegs, 0x4090AE82},
		{"KVM_GET_SREGS", kvmGetSregs, 0x8138AE83},
		{"KVM_SET_SREGS", kvmSetSregs, 0x4138AE84},
		{"KVM_SET_USER_MEMORY_REGION", kvmSetUserMemoryRegion, 0x4020AE46},
		{"KVM_GET_DIRTY_LOG", kvmGetDirtyLog, 0x4010AE42},
		{"KVM_IRQ_LINE", kvmIRQLine, 0x4008AE61},
		{"KVM_CREATE_PIT2", kvmCreatePIT2, 0x4040AE77},
		{"KVM_GET_SUPPORTED_CPUID", kvmGetSupportedCPUID, 0xC008AE05},
		{"KVM_SET_CPUID2", kvmSetCPUID2, 0x4008AE90},
		{"KVM_GET_LAPIC", kvmGetLAPIC, 0x8400AE8E},
		{"KVM_GET_IRQCHIP", kvmGetIRQChip, 0xC208AE62},
		{"KVM_SET_IRQCHIP", kvmSetIRQChip, 0x8208AE63},
		{"KVM_GET_MSRS", kvmGetMSRs, 0xC008AE88},
		{"KVM_SET_MSRS", kvmSetMSRs, 0x4008AE89},
		{"KVM_GET_FPU", kvmGetFPU, 0x81A0AE8C},
		{"KVM_GET_MP_STATE", kvmGetMPState, 0x8004AE98},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %#x, want %#x", tc.name, tc.got, tc.want)
		}
	}
}
