package boot

// Mode is the processor mode a kernel expects at its entry point.
type Mode int

const (
	// Protected32 is 32-bit protected mode with paging off (PVH entry).
	Protected32 Mode = iota
	// Long64 is 64-bit long mode with identity-mapped paging (the 64-bit
	// entry of the Linux boot protocol).
	Long64
)

func (m Mode) String() string {
	switch m {
	case Protected32:
		return "protected32"
	case Long64:
		return "long64"
	}
	return "unknown"
}

// GDT selectors written by the loaders. The GDT at Entry.GDT holds:
// 0x00 null, 0x08 flat 32-bit code, 0x10 flat 64-bit code, 0x18 flat data,
// 0x20 a 64-bit TSS descriptor (two slots) for a TSS of 0x68 bytes at base 0.
const (
	SelCode32 = 0x08
	SelCode64 = 0x10
	SelData   = 0x18
	SelTSS    = 0x20
)

// Entry is the CPU state a loaded kernel expects on the boot vCPU. The
// VMM turns it into registers; this package knows nothing of KVM.
type Entry struct {
	Mode      Mode
	RIP       uint64 // entry point
	RSP       uint64 // stack pointer (0 when the protocol sets none)
	RSI       uint64 // Long64: guest-physical address of boot_params
	RBX       uint64 // Protected32: guest-physical address of hvm_start_info
	PageTable uint64 // Long64: CR3, an identity map of the first 4 GiB
	GDT       uint64 // guest-physical base of the GDT described above
	GDTLimit  uint16 // limit of that GDT
}
