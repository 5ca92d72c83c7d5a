package kvm

import "structs"

// The structs below mirror include/uapi/linux/kvm.h and
// arch/x86/include/uapi/asm/kvm.h for x86-64; their sizes are checked
// against the C sizes in types_test.go.

type userspaceMemoryRegion struct {
	_             structs.HostLayout
	Slot          uint32
	Flags         uint32
	GuestPhysAddr uint64
	MemorySize    uint64
	UserspaceAddr uint64
}

type dirtyLog struct {
	_      structs.HostLayout
	Slot   uint32
	_      uint32
	Bitmap uint64 // user address of the bitmap
}

type irqLevel struct {
	_     structs.HostLayout
	IRQ   uint32
	Level uint32
}

type pitConfig struct {
	_     structs.HostLayout
	Flags uint32
	_     [15]uint32
}

// Regs is struct kvm_regs: the general-purpose registers of a vCPU.
type Regs struct {
	_                                      structs.HostLayout
	RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11, R12, R13, R14, R15   uint64
	RIP, RFLAGS                            uint64
}

// Segment is struct kvm_segment.
type Segment struct {
	_        structs.HostLayout
	Base     uint64
	Limit    uint32
	Selector uint16
	Type     uint8
	Present  uint8
	DPL      uint8
	DB       uint8
	S        uint8
	L        uint8
	G        uint8
	AVL      uint8
	Unusable uint8
	_        uint8
}

// DTable is struct kvm_dtable: a descriptor-table register (GDTR, IDTR).
type DTable struct {
	_     structs.HostLayout
	Base  uint64
	Limit uint16
	_     [3]uint16
}

// Sregs is struct kvm_sregs: segment and control registers of a vCPU.
type Sregs struct {
	_                               structs.HostLayout
	CS, DS, ES, FS, GS, SS, TR, LDT Segment
	GDT, IDT                        DTable
	CR0, CR2, CR3, CR4, CR8         uint64
	EFER                            uint64
	APICBase                        uint64
	InterruptBitmap                 [4]uint64
}

// FPU is struct kvm_fpu: the legacy x87/SSE state of a vCPU.
type FPU struct {
	_          structs.HostLayout
	FPR        [8][16]uint8
	FCW        uint16
	FSW        uint16
	FTWX       uint8
	_          uint8
	LastOpcode uint16
	LastIP     uint64
	LastDP     uint64
	XMM        [16][16]uint8
	MXCSR      uint32
	_          uint32
}

// LAPIC is struct kvm_lapic_state: the local APIC's register page.
type LAPIC struct {
	_    structs.HostLayout
	Regs [1024]uint8
}

// MPState is struct kvm_mp_state.
type MPState struct {
	_     structs.HostLayout
	State uint32
}

// MP states (KVM_GET_MP_STATE).
const (
	MPStateRunnable      = 0
	MPStateUninitialized = 1
	MPStateInitReceived  = 2
	MPStateHalted        = 3
	MPStateSIPIReceived  = 4
)

// IRQChip is struct kvm_irqchip: the state of one in-kernel PIC or the IOAPIC.
type IRQChip struct {
	_      structs.HostLayout
	ChipID uint32
	_      uint32
	Chip   [512]uint8
}

// IRQ chip identifiers for IRQChip.ChipID.
const (
	IRQChipPICMaster = 0
	IRQChipPICSlave  = 1
	IRQChipIOAPIC    = 2
)

// CPUIDEntry is struct kvm_cpuid_entry2.
type CPUIDEntry struct {
	_                  structs.HostLayout
	Function           uint32
	Index              uint32
	Flags              uint32
	EAX, EBX, ECX, EDX uint32
	_                  [3]uint32
}

// CPUID entry flags.
const cpuidFlagSignificantIndex = 1

// MSR is struct kvm_msr_entry.
type MSR struct {
	_     structs.HostLayout
	Index uint32
	_     uint32
	Data  uint64
}

// run is the fixed part of struct kvm_run, mmapped from the vCPU fd.
type run struct {
	_                          structs.HostLayout
	RequestInterruptWindow     uint8
	ImmediateExit              uint8
	_                          [6]uint8
	ExitReason                 uint32
	ReadyForInterruptInjection uint8
	IfFlag                     uint8
	Flags                      uint16
	CR8                        uint64
	APICBase                   uint64
	Exit                       [256]uint8 // the exit union
}

type ioExit struct {
	_          structs.HostLayout
	Direction  uint8
	Size       uint8
	Port       uint16
	Count      uint32
	DataOffset uint64
}

type mmioExit struct {
	_        structs.HostLayout
	PhysAddr uint64
	Data     [8]uint8
	Len      uint32
	IsWrite  uint8
	_        [3]uint8
}

type exitData struct {
	_     structs.HostLayout
	Type  uint32 // suberror for internal errors, event type for system events
	NData uint32
	Data  [16]uint64
}

// Exit reasons (KVM_EXIT_*).
const (
	exitUnknown       = 0
	exitException     = 1
	exitIO            = 2
	exitHypercall     = 3
	exitDebug         = 4
	exitHLT           = 5
	exitMMIO          = 6
	exitShutdown      = 8
	exitFailEntry     = 9
	exitIntr          = 10
	exitInternalError = 17
	exitSystemEvent   = 24
)

var exitNames = map[uint32]string{
	exitUnknown: "UNKNOWN", exitException: "EXCEPTION", exitIO: "IO", exitHypercall: "HYPERCALL",
	exitDebug: "DEBUG", exitHLT: "HLT", exitMMIO: "MMIO", exitShutdown: "SHUTDOWN",
	exitFailEntry: "FAIL_ENTRY", exitIntr: "INTR", exitInternalError: "INTERNAL_ERROR",
	exitSystemEvent: "SYSTEM_EVENT",
}

// System event types (KVM_SYSTEM_EVENT_*).
const (
	systemEventShutdown = 1
	systemEventReset    = 2
	systemEventCrash    = 3
)

// Memory region flags.
const (
	memLogDirtyPages = 1 << 0
	memReadonly      = 1 << 1
)
