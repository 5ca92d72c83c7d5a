package kvm

import (
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"collective/kvm/guestmem"
)

func TestStateStructSizes(t *testing.T) {
	for _, tc := range []struct {
		name      string
		got, want uintptr
	}{
		{"kvm_vcpu_events", unsafe.Sizeof(VCPUEvents{}), 64},
		{"kvm_debugregs", unsafe.Sizeof(DebugRegs{}), 128},
		{"kvm_xcrs", unsafe.Sizeof(XCRs{}), 392},
		{"kvm_pit_channel_state", unsafe.Sizeof(PITChannel{}), 24},
		{"kvm_pit_state2", unsafe.Sizeof(PITState2{}), 112},
		{"kvm_clock_data", unsafe.Sizeof(ClockData{}), 48},
		{"kvm_vcpu_events.exception_payload", unsafe.Offsetof(VCPUEvents{}.ExceptionPayload), 56},
	} {
		if tc.got != tc.want {
			t.Errorf("sizeof(%s) = %d, want %d", tc.name, tc.got, tc.want)
		}
	}
	for _, tc := range []struct {
		name      string
		got, want uintptr
	}{
		{"KVM_GET_VCPU_EVENTS", kvmGetVCPUEvents, 0x8040AE9F},
		{"KVM_SET_VCPU_EVENTS", kvmSetVCPUEvents, 0x4040AEA0},
		{"KVM_GET_DEBUGREGS", kvmGetDebugRegs, 0x8080AEA1},
		{"KVM_SET_DEBUGREGS", kvmSetDebugRegs, 0x4080AEA2},
		{"KVM_GET_XSAVE", kvmGetXSave, 0x9000AEA4},
		{"KVM_SET_XSAVE", kvmSetXSave, 0x5000AEA5},
		{"KVM_GET_XSAVE2", kvmGetXSave2, 0x9000AECF},
		{"KVM_GET_XCRS", kvmGetXCRs, 0x8188AEA6},
		{"KVM_SET_XCRS", kvmSetXCRs, 0x4188AEA7},
		{"KVM_GET_PIT2", kvmGetPIT2, 0x8070AE9F},
		{"KVM_SET_PIT2", kvmSetPIT2, 0x4070AEA0},
		{"KVM_GET_CLOCK", kvmGetClock, 0x8030AE7C},
		{"KVM_SET_CLOCK", kvmSetClock, 0x4030AE7B},
		{"KVM_SET_TSC_KHZ", kvmSetTSCKHz, 0xAEA2},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %#x, want %#x", tc.name, tc.got, tc.want)
		}
	}
}

// TestStateRoundTrip saves a fresh vCPU's and VM's state, changes the
// registers, restores the saved state into a second VM and reads it back.
func TestStateRoundTrip(t *testing.T) {
	s := openKVM(t)
	mk := func() (*VM, *VCPU) {
		vm, err := s.NewVM([]guestmem.Range{{GPA: 0, Size: 16 << 20}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { vm.Close() })
		v, err := vm.NewVCPU(0)
		if err != nil {
			t.Fatal(err)
		}
		ids, err := s.CPUID(0, 1, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := v.SetCPUID(ids); err != nil {
			t.Fatal(err)
		}
		return vm, v
	}
	msrs, err := s.MSRIndexList()
	if err != nil {
		t.Fatal(err)
	}
	vm1, v1 := mk()
	r := Regs{RIP: 0x1234, RAX: 42, RFLAGS: 2, RSP: 0x8000}
	if err := v1.SetRegs(r); err != nil {
		t.Fatal(err)
	}
	st, err := v1.State(msrs)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.MSRs) == 0 {
		t.Error("no MSR saved")
	}
	vst, err := vm1.State()
	if err != nil {
		t.Fatal(err)
	}
	vm2, v2 := mk()
	if err := vm2.SetDevicesState(vst); err != nil {
		t.Fatal(err)
	}
	if err := v2.SetState(st); err != nil {
		t.Fatal(err)
	}
	if err := vm2.SetClockState(vst); err != nil {
		t.Fatal(err)
	}
	got, err := v2.Regs()
	if err != nil {
		t.Fatal(err)
	}
	if got.RIP != 0x1234 || got.RAX != 42 {
		t.Fatalf("restored regs rip %#x rax %d", got.RIP, got.RAX)
	}
	st.ID = 1
	if err := v2.SetState(st); err == nil {
		t.Error("SetState accepted another vCPU's state")
	}
	st.ID, st.XSave = 0, make([]byte, 3)
	if err := v2.SetState(st); err == nil {
		t.Error("SetState accepted a 3-byte XSAVE area")
	}
}

// TestMapFile backs a slot with a file: the VM sees its bytes, writes stay
// private.
func TestMapFile(t *testing.T) {
	s := openKVM(t)
	vm, err := s.NewVM([]guestmem.Range{{GPA: 0, Size: 16 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	p := filepath.Join(t.TempDir(), "mem")
	data := make([]byte, 16<<20)
	copy(data[4096:], "snapshot")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := vm.MapFile(0, f, 0); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 8)
	vm.Memory().ReadAt(b, 4096)
	if string(b) != "snapshot" {
		t.Fatalf("read %q through the mapping", b)
	}
	vm.Memory().WriteAt([]byte("changed!"), 4096)
	disk, _ := os.ReadFile(p)
	if string(disk[4096:4104]) != "snapshot" {
		t.Fatal("a guest write reached the file")
	}
	if err := vm.MapFile(0, f, 4096); err == nil {
		t.Error("MapFile accepted a file too short for the slot")
	}
	if err := vm.MapFile(0, f, 1); err == nil {
		t.Error("MapFile accepted an unaligned offset")
	}
}
