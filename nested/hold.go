package nested

import (
	"context"
	"fmt"

	"collective/kvm"
	"collective/kvm/guestmem"
)

// HoldFlag is the collective nested flag with which L1's init runs
// HoldKVM in the background for L1's whole life.
const HoldFlag = "--hold-kvm"

// HoldKVM keeps one idle VM open, with its in-kernel irqchip and one vCPU
// that never runs, until ctx ends. It runs inside L1 (the nested host's
// init starts it before it reports ready).
//
// Why: KVM flips static keys when the first VM of a host appears and when
// the last one goes away (preempt_notifier_key, patched into __schedule),
// and when a vCPU's local APIC is created or enabled (apic_sw_disabled).
// Flipping a static key rewrites kernel text on every CPU. Under QEMU's
// multi-threaded TCG that cross-vCPU code patching now and then
// livelocked L1: the post-mortem (diagnose.go) found both L1 vCPUs
// spinning at __schedule+0x2ab, which L1's __jump_table names as the
// preempt_notifier_key site. With one VM and one software-disabled APIC
// held for L1's life, those keys never return to zero, so booting and
// ending L2 machines patches no text.
func HoldKVM(ctx context.Context) error {
	sys, err := kvm.Open()
	if err != nil {
		return fmt.Errorf("nested: hold KVM: %w", err)
	}
	defer sys.Close()
	vm, err := sys.NewVM([]guestmem.Range{{GPA: 0, Size: 2 << 20}})
	if err != nil {
		return fmt.Errorf("nested: hold KVM: %w", err)
	}
	defer vm.Close()
	if _, err := vm.NewVCPU(0); err != nil {
		return fmt.Errorf("nested: hold KVM: %w", err)
	}
	<-ctx.Done()
	return nil
}
