package kvm

import (
	"testing"
	"unsafe"
)

// TestIRQStructSizes checks the interrupt ioctl structs and request numbers
// against include/uapi/linux/kvm.h on x86-64.
func TestIRQStructSizes(t *testing.T) {
	for _, tc := range []struct {
		name      string
		got, want uintptr
	}{
		{"sizeof(kvm_irqfd)", unsafe.Sizeof(irqfd{}), 32},
		{"sizeof(kvm_ioeventfd)", unsafe.Sizeof(ioeventfd{}), 64},
		{"sizeof(kvm_msi)", unsafe.Sizeof(kvmMSI{}), 32},
		{"sizeof(kvm_irq_routing)", unsafe.Sizeof(irqRoutingHeader{}), 8},
		{"sizeof(kvm_irq_routing_entry)", unsafe.Sizeof(irqRoutingEntry{}), 48},
		{"offsetof(kvm_irq_routing_entry, u)", unsafe.Offsetof(irqRoutingEntry{}.U), 16},
		{"offsetof(kvm_ioeventfd, flags)", unsafe.Offsetof(ioeventfd{}.Flags), 24},
		{"KVM_SET_GSI_ROUTING", kvmSetGSIRouting, 0x4008AE6A},
		{"KVM_IRQFD", kvmIRQFD, 0x4020AE76},
		{"KVM_IOEVENTFD", kvmIOEventFD, 0x4040AE79},
		{"KVM_SIGNAL_MSI", kvmSignalMSI, 0x4020AEA5},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %#x, want %#x", tc.name, tc.got, tc.want)
		}
	}
}
