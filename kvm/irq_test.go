package kvm_test

import (
	"testing"
	"time"

	"collective/internal/testenv"
	"collective/kvm"
	"collective/kvm/guestmem"
)

func newTestVM(t *testing.T) *kvm.VM {
	t.Helper()
	testenv.RequireKVM(t)
	sys, err := kvm.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sys.Close() })
	vm, err := sys.NewVM([]guestmem.Range{{GPA: 0, Size: 2 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	return vm
}

func TestDefaultGSIRoutes(t *testing.T) {
	r := kvm.DefaultGSIRoutes()
	if len(r) != kvm.NumPICPins+kvm.NumIOAPICPins {
		t.Fatalf("%d default routes", len(r))
	}
	pic, ioapic := 0, 0
	for _, e := range r {
		switch e.Chip {
		case kvm.IRQChipPICMaster, kvm.IRQChipPICSlave:
			pic++
			if e.GSI >= 16 || e.Pin != e.GSI%8 || (e.GSI >= 8) != (e.Chip == kvm.IRQChipPICSlave) {
				t.Errorf("bad PIC route %+v", e)
			}
		case kvm.IRQChipIOAPIC:
			ioapic++
			if e.Pin != e.GSI {
				t.Errorf("bad IOAPIC route %+v", e)
			}
		}
	}
	if pic != 16 || ioapic != 24 {
		t.Errorf("%d PIC and %d IOAPIC routes", pic, ioapic)
	}
}

func TestIRQIoctls(t *testing.T) {
	vm := newTestVM(t)
	sys := vm.System()
	for _, c := range []kvm.Cap{kvm.CapIRQFD, kvm.CapIOEventFD, kvm.CapIRQRouting, kvm.CapSignalMSI} {
		if !sys.Has(c) {
			t.Logf("KVM lacks %v", c)
		}
	}
	if err := vm.SetGSIRouting(kvm.DefaultGSIRoutes()); err != nil {
		t.Fatal(err)
	}
	r := kvm.NewGSIRouter(vm)
	gsi, err := r.Alloc()
	if err != nil || gsi != kvm.NumIOAPICPins {
		t.Fatalf("Alloc = %d, %v", gsi, err)
	}
	if err := r.SetMSI(gsi, 0xfee0_0000, 0x4041); err != nil {
		t.Fatal(err)
	}
	if err := r.SetMSI(3, 0xfee0_0000, 0x41); err == nil {
		t.Error("SetMSI on an irqchip GSI succeeded")
	}

	efd, err := kvm.NewEventFD()
	if err != nil {
		t.Fatal(err)
	}
	defer efd.Close()
	if err := vm.IRQFD(efd.FD(), gsi); err != nil {
		t.Fatal(err)
	}
	if err := efd.Signal(); err != nil { // raises the MSI: the guest is not running, KVM just queues it
		t.Fatal(err)
	}
	if err := vm.RemoveIRQFD(efd.FD(), gsi); err != nil {
		t.Fatal(err)
	}
	if err := r.Release(gsi); err != nil {
		t.Fatal(err)
	}

	doorbell, err := kvm.NewEventFD()
	if err != nil {
		t.Fatal(err)
	}
	defer doorbell.Close()
	if err := vm.IOEventFD(0xd000_3000, 2, doorbell.FD(), false); err != nil {
		t.Fatal(err)
	}
	if err := vm.IOEventFD(0xd000_3004, 2, doorbell.FD(), false, 1); err != nil {
		t.Fatal(err)
	}
	if err := vm.IOEventFD(0x510, 4, doorbell.FD(), true); err != nil {
		t.Fatal(err)
	}
	if err := vm.IOEventFD(0xd000_3000, 2, doorbell.FD(), false); err == nil {
		t.Error("a second identical ioeventfd was accepted")
	}
	for _, e := range []struct {
		addr uint64
		pio  bool
		dm   []uint64
		l    uint32
	}{{0xd000_3000, false, nil, 2}, {0xd000_3004, false, []uint64{1}, 2}, {0x510, true, nil, 4}} {
		if err := vm.RemoveIOEventFD(e.addr, e.l, doorbell.FD(), e.pio, e.dm...); err != nil {
			t.Error(err)
		}
	}
	if err := vm.IOEventFD(0, 2, doorbell.FD(), false, 1, 2); err == nil {
		t.Error("two datamatch values accepted")
	}

	if !sys.Has(kvm.CapSignalMSI) {
		t.Skip("no KVM_CAP_SIGNAL_MSI")
	}
	// KVM_SIGNAL_MSI fails (EPERM) when no vCPU matches the destination.
	if err := vm.SignalMSI(0xfee0_0000, 0x41); err == nil {
		t.Error("MSI to a VM without vCPUs delivered")
	}
	if _, err := vm.NewVCPU(0); err != nil {
		t.Fatal(err)
	}
	if err := vm.SignalMSI(0xfee0_0000, 0x41); err != nil {
		t.Error(err)
	}
}

func TestEventFDWaitClose(t *testing.T) {
	e, err := kvm.NewEventFD()
	if err != nil {
		t.Fatal(err)
	}
	e.Signal()
	e.Signal()
	if n, err := e.Wait(); n != 2 || err != nil {
		t.Errorf("Wait = %d, %v", n, err)
	}
	done := make(chan error)
	go func() { _, err := e.Wait(); done <- err }()
	time.Sleep(10 * time.Millisecond)
	e.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Error("Wait after Close returned no error")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not wake Wait")
	}
}
