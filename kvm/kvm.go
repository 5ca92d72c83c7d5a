package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DevicePath is where the KVM device node lives.
const DevicePath = "/dev/kvm"

// apiVersion is the only KVM API version there has ever been.
const apiVersion = 12

// Cap is a KVM capability number (KVM_CAP_*).
type Cap uintptr

// Capabilities we rely on or probe for.
const (
	CapIRQChip        Cap = 0
	CapHLT            Cap = 1
	CapUserMemory     Cap = 3
	CapSetTSSAddr     Cap = 4
	CapExtCPUID       Cap = 7
	CapNRVCPUs        Cap = 9
	CapNRMemslots     Cap = 10
	CapPIT            Cap = 11
	CapMPState        Cap = 14
	CapSyncMMU        Cap = 16
	CapIRQRouting     Cap = 25
	CapIRQFD          Cap = 32
	CapPIT2           Cap = 33
	CapSetBootCPUID   Cap = 34
	CapPITState2      Cap = 35
	CapIOEventFD      Cap = 36
	CapSetIdentityMap Cap = 37
	CapAdjustClock    Cap = 39
	CapVCPUEvents     Cap = 41
	CapDebugRegs      Cap = 50
	CapXSave          Cap = 55
	CapXCRs           Cap = 56
	CapTSCControl     Cap = 60
	CapGetTSCKHz      Cap = 61
	CapMaxVCPUs       Cap = 66
	CapTSCDeadline    Cap = 72
	CapReadonlyMem    Cap = 81
	CapX2APICAPI      Cap = 129
	CapImmediateExit  Cap = 136
)

var capNames = map[Cap]string{
	CapIRQChip: "KVM_CAP_IRQCHIP", CapHLT: "KVM_CAP_HLT", CapUserMemory: "KVM_CAP_USER_MEMORY",
	CapSetTSSAddr: "KVM_CAP_SET_TSS_ADDR", CapExtCPUID: "KVM_CAP_EXT_CPUID", CapNRVCPUs: "KVM_CAP_NR_VCPUS",
	CapNRMemslots: "KVM_CAP_NR_MEMSLOTS", CapPIT: "KVM_CAP_PIT", CapMPState: "KVM_CAP_MP_STATE",
	CapSyncMMU: "KVM_CAP_SYNC_MMU", CapIRQRouting: "KVM_CAP_IRQ_ROUTING", CapIRQFD: "KVM_CAP_IRQFD",
	CapPIT2: "KVM_CAP_PIT2", CapSetBootCPUID: "KVM_CAP_SET_BOOT_CPU_ID", CapPITState2: "KVM_CAP_PIT_STATE2",
	CapIOEventFD: "KVM_CAP_IOEVENTFD", CapSetIdentityMap: "KVM_CAP_SET_IDENTITY_MAP_ADDR",
	CapAdjustClock: "KVM_CAP_ADJUST_CLOCK", CapVCPUEvents: "KVM_CAP_VCPU_EVENTS",
	CapDebugRegs: "KVM_CAP_DEBUGREGS", CapXSave: "KVM_CAP_XSAVE", CapXCRs: "KVM_CAP_XCRS",
	CapTSCControl: "KVM_CAP_TSC_CONTROL", CapGetTSCKHz: "KVM_CAP_GET_TSC_KHZ", CapMaxVCPUs: "KVM_CAP_MAX_VCPUS",
	CapReadonlyMem: "KVM_CAP_READONLY_MEM", CapX2APICAPI: "KVM_CAP_X2APIC_API",
	CapImmediateExit: "KVM_CAP_IMMEDIATE_EXIT",
}

func (c Cap) String() string {
	if n, ok := capNames[c]; ok {
		return n
	}
	return fmt.Sprintf("KVM_CAP(%d)", uintptr(c))
}

// required lists the capabilities a VM cannot run without.
var required = []Cap{
	CapIRQChip, CapUserMemory, CapSetTSSAddr, CapExtCPUID, CapPIT2,
	CapMPState, CapSetIdentityMap, CapImmediateExit,
}

// ErrNotSupported is matched by errors about a capability KVM lacks.
var ErrNotSupported = errors.New("kvm: not supported")

// CapError reports a capability this KVM does not offer.
type CapError struct{ Cap Cap }

func (e *CapError) Error() string { return fmt.Sprintf("kvm: %s not supported by this KVM", e.Cap) }

// Is reports whether target is ErrNotSupported.
func (e *CapError) Is(target error) bool { return target == ErrNotSupported }

// System is an open /dev/kvm whose API version and required capabilities
// were checked.
type System struct {
	fd       int
	mmapSize int

	mu    sync.Mutex
	caps  map[Cap]int // cached KVM_CHECK_EXTENSION results
	cpuid []CPUIDEntry
	msrs  []uint32 // +checklocks:mu; cached KVM_GET_MSR_INDEX_LIST
}

// Open opens /dev/kvm and checks the API version and every capability
// Collective relies on. Its errors are one line, fit for a user.
func Open() (*System, error) { return OpenPath(DevicePath) }

// OpenPath is Open for a KVM device node at another path.
func OpenPath(path string) (*System, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		switch {
		case errors.Is(err, unix.ENOENT):
			return nil, fmt.Errorf("kvm: %s does not exist: this host has no KVM (load kvm_intel or kvm_amd, or enable virtualisation)", path)
		case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
			return nil, fmt.Errorf("kvm: %s: permission denied (add yourself to the kvm group or run as root)", path)
		}
		return nil, fmt.Errorf("kvm: open %s: %w", path, err)
	}
	s := &System{fd: fd, caps: map[Cap]int{}}
	v, err := ioctl(fd, kvmGetAPIVersion, 0)
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("kvm: %s is not a KVM device (KVM_GET_API_VERSION: %v)", path, err)
	}
	if v != apiVersion {
		s.Close()
		return nil, fmt.Errorf("kvm: API version %d, want %d", v, apiVersion)
	}
	for _, c := range required {
		if s.Check(c) <= 0 {
			s.Close()
			return nil, &CapError{c}
		}
	}
	n, err := ioctl(fd, kvmGetVCPUMmapSize, 0)
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("kvm: KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	s.mmapSize = int(n)
	return s, nil
}

// Close closes /dev/kvm. VMs created from s stay valid.
func (s *System) Close() error { return unix.Close(s.fd) }

// Check returns KVM_CHECK_EXTENSION for c: 0 when absent, otherwise a
// positive value whose meaning depends on c. Results are cached.
func (s *System) Check(c Cap) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if v, ok := s.caps[c]; ok {
		return v
	}
	r, err := ioctl(s.fd, kvmCheckExtension, uintptr(c))
	v := int(r)
	if err != nil {
		v = 0
	}
	s.caps[c] = v
	return v
}

// Has reports whether KVM offers capability c.
func (s *System) Has(c Cap) bool { return s.Check(c) > 0 }

// MaxVCPUs returns the number of vCPUs a VM may have (KVM_CAP_NR_VCPUS,
// the recommended maximum).
func (s *System) MaxVCPUs() int {
	if n := s.Check(CapNRVCPUs); n > 0 {
		return n
	}
	return 4 // api.rst: assume 4 when the capability is absent
}

// Vendor returns the CPU vendor string that KVM passes through in CPUID
// leaf 0 ("GenuineIntel", "AuthenticAMD", ...), or "" when it has none.
func (s *System) Vendor() string {
	ents, err := s.SupportedCPUID()
	if err != nil {
		return ""
	}
	for _, e := range ents {
		if e.Function == 0 {
			var b [12]byte
			binary.LittleEndian.PutUint32(b[0:], e.EBX)
			binary.LittleEndian.PutUint32(b[4:], e.EDX)
			binary.LittleEndian.PutUint32(b[8:], e.ECX)
			return string(b[:])
		}
	}
	return ""
}

// ResetsOnShutdown reports whether KVM resets a vCPU before it reports a
// triple fault (KVM_EXIT_SHUTDOWN): it does on AMD and Hygon (SVM), whose
// VMCB is undefined after a shutdown, so no register of the fault is left
// to read; on Intel (VMX) the state stays as it was.
func (s *System) ResetsOnShutdown() bool {
	v := s.Vendor()
	return v == "AuthenticAMD" || v == "HygonGenuine"
}

// SupportedCPUID returns KVM_GET_SUPPORTED_CPUID. The slice is shared;
// callers copy before changing it.
func (s *System) SupportedCPUID() ([]CPUIDEntry, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cpuid != nil {
		return s.cpuid, nil
	}
	for n := 64; n <= 4096; n *= 2 {
		buf := make([]byte, 8+n*int(unsafe.Sizeof(CPUIDEntry{})))
		*(*uint32)(unsafe.Pointer(&buf[0])) = uint32(n)
		err := ioctlPtr(s.fd, kvmGetSupportedCPUID, unsafe.Pointer(&buf[0]))
		if errors.Is(err, unix.E2BIG) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("kvm: KVM_GET_SUPPORTED_CPUID: %w", err)
		}
		got := *(*uint32)(unsafe.Pointer(&buf[0]))
		ents := unsafe.Slice((*CPUIDEntry)(unsafe.Pointer(&buf[8])), got)
		s.cpuid = append([]CPUIDEntry(nil), ents...)
		return s.cpuid, nil
	}
	return nil, fmt.Errorf("kvm: KVM_GET_SUPPORTED_CPUID: more than 4096 entries")
}

// MSRIndexList returns KVM_GET_MSR_INDEX_LIST: the MSRs a snapshot saves.
// The list is the host's: it is read once (a snapshot or a migration's
// stop phase would otherwise pay the ioctl, up to 0.2 ms here, while the
// guest is paused) and the caller gets its own copy.
func (s *System) MSRIndexList() ([]uint32, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.msrs == nil {
		l, err := s.readMSRIndexList()
		if err != nil {
			return nil, err
		}
		s.msrs = l
	}
	return append([]uint32(nil), s.msrs...), nil
}

func (s *System) readMSRIndexList() ([]uint32, error) {
	for n := 256; n <= 16384; n *= 2 {
		buf := make([]uint32, 1+n)
		buf[0] = uint32(n)
		err := ioctlPtr(s.fd, kvmGetMSRIndexList, unsafe.Pointer(&buf[0]))
		if errors.Is(err, unix.E2BIG) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("kvm: KVM_GET_MSR_INDEX_LIST: %w", err)
		}
		return append([]uint32(nil), buf[1:1+buf[0]]...), nil
	}
	return nil, fmt.Errorf("kvm: KVM_GET_MSR_INDEX_LIST: too many MSRs")
}

// Available reports whether /dev/kvm exists and can be opened, with the
// reason when it cannot; tests use it to decide whether to skip.
func Available() error {
	f, err := os.OpenFile(DevicePath, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	return f.Close()
}
