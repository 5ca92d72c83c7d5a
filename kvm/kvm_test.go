package kvm

import (
	"encoding/binary"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"

	"collective/internal/testenv"
	"collective/kvm/guestmem"
)

func TestOpenErrorsAreOneLine(t *testing.T) {
	for _, tc := range []struct{ name, path, want string }{
		{"missing", filepath.Join(t.TempDir(), "kvm"), "does not exist"},
		{"not kvm", "/dev/null", "is not a KVM device"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := OpenPath(tc.path)
			if err == nil {
				s.Close()
				t.Fatal("OpenPath succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %q: want one line containing %q", err, tc.want)
			}
		})
	}
}

func TestCapError(t *testing.T) {
	err := error(&CapError{CapXSave})
	if !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "KVM_CAP_XSAVE") {
		t.Fatalf("%v", err)
	}
}

func openKVM(t *testing.T) *System {
	t.Helper()
	testenv.RequireKVM(t)
	s, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// TestVendor: KVM passes the host's vendor through, and it is one whose
// shutdown behaviour ResetsOnShutdown knows.
func TestVendor(t *testing.T) {
	s := openKVM(t)
	v := s.Vendor()
	switch v {
	case "GenuineIntel", "CentaurHauls", "  Shanghai  ", "ZhaoxinHost":
		if s.ResetsOnShutdown() {
			t.Errorf("%s: ResetsOnShutdown", v)
		}
	case "AuthenticAMD", "HygonGenuine":
		if !s.ResetsOnShutdown() {
			t.Errorf("%s: not ResetsOnShutdown", v)
		}
	default:
		t.Errorf("vendor %q", v)
	}
}

func TestCPUIDLeaves(t *testing.T) {
	s := openKVM(t)
	ents, err := s.CPUID(1, 2, 2600000)
	if err != nil {
		t.Fatal(err)
	}
	find := func(fn uint32) *CPUIDEntry {
		for i := range ents {
			if ents[i].Function == fn {
				return &ents[i]
			}
		}
		t.Fatalf("no CPUID leaf %#x", fn)
		return nil
	}
	if e := find(1); e.EBX>>24 != 1 || e.ECX&(1<<31) == 0 {
		t.Errorf("leaf 1: APIC ID %d, hypervisor bit %v", e.EBX>>24, e.ECX>>31)
	}
	if e := find(1); s.Has(CapTSCDeadline) != (e.ECX&(1<<24) != 0) {
		t.Errorf("leaf 1: TSC-deadline bit %v, KVM_CAP_TSC_DEADLINE_TIMER %v", e.ECX>>24&1, s.Has(CapTSCDeadline))
	}
	base := find(CPUIDLeafBase)
	var sig [12]byte
	binary.LittleEndian.PutUint32(sig[0:], base.EBX)
	binary.LittleEndian.PutUint32(sig[4:], base.ECX)
	binary.LittleEndian.PutUint32(sig[8:], base.EDX)
	if string(sig[:]) != HypervisorSignature || base.EAX != CPUIDLeafInfo {
		t.Errorf("leaf %#x: signature %q max %#x", CPUIDLeafBase, sig, base.EAX)
	}
	if e := find(CPUIDLeafInfo); e.EAX != 2600000 {
		t.Errorf("TSC kHz %d", e.EAX)
	}
	if e := find(0x40000000); e.EBX != 0x4b4d564b {
		t.Errorf("KVM's leaf 0x40000000 lost: %#x", e.EBX)
	}
}

func TestVMLifecycle(t *testing.T) {
	s := openKVM(t)
	for _, c := range required {
		if !s.Has(c) {
			t.Errorf("%v missing but Open succeeded", c)
		}
	}
	vm, err := s.NewVM([]guestmem.Range{{GPA: 0, Size: 16 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	if got := vm.Memory().Size(); got != 16<<20 {
		t.Errorf("memory size %d", got)
	}
	v, err := vm.NewVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := vm.NewVCPU(s.MaxVCPUs()); err == nil {
		t.Error("a vCPU beyond KVM_CAP_NR_VCPUS was created")
	}
	r, err := v.Regs()
	if err != nil {
		t.Fatal(err)
	}
	r.RAX = 0x1234
	if err := v.SetRegs(r); err != nil {
		t.Fatal(err)
	}
	if r2, _ := v.Regs(); r2.RAX != 0x1234 {
		t.Errorf("RAX %#x after SetRegs", r2.RAX)
	}
	if m, err := v.MPState(); err != nil || m.State != MPStateRunnable {
		t.Errorf("BSP MP state %d, %v", m.State, err)
	}
	msrs, err := s.MSRIndexList()
	if err != nil || len(msrs) == 0 {
		t.Fatalf("MSR index list: %d, %v", len(msrs), err)
	}
	if _, err := v.MSRs(msrs[:1]); err != nil {
		t.Error(err)
	}
	if _, err := vm.IRQChip(IRQChipIOAPIC); err != nil {
		t.Error(err)
	}
	if err := vm.SetDirtyLogging(0, true); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.DirtyLog(0); err != nil {
		t.Fatal(err)
	}
	if err := vm.SetDirtyLogging(5, true); err == nil {
		t.Error("dirty logging on a missing slot")
	}
	vm.Pause()
	if !vm.Paused() {
		t.Error("not paused")
	}
	vm.Resume()
	if err := vm.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Regs(); err == nil {
		t.Error("closed vCPU answered")
	}
}

// TestRAMAligned checks that every RAM region sits at a 2 MiB-aligned host
// address (KVM's huge mappings need host and guest addresses to agree
// modulo 2 MiB), that the whole of it is usable, and that it unmaps.
func TestRAMAligned(t *testing.T) {
	for range 4 {
		b, err := mmapRAM(6<<20 + 4096)
		if err != nil {
			t.Fatal(err)
		}
		if a := uintptr(unsafe.Pointer(&b[0])); a%hugeAlign != 0 {
			t.Errorf("RAM at %#x: not 2 MiB aligned", a)
		}
		b[0], b[len(b)-1] = 1, 2
		if err := munmapRAM(b); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := mmapRAM(0); err == nil {
		t.Error("mmapRAM(0) succeeded")
	}
}
