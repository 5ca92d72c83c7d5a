// Package boot loads a guest kernel into guest memory and describes the
// CPU state it must be entered with.
//
// Two kernel formats are recognised from their bytes, never from a flag:
//
//   - a Linux bzImage, booted through the 64-bit boot protocol of
//     Documentation/arch/x86/boot.rst ("64-bit BOOT PROTOCOL"): the
//     protected-mode kernel is loaded high, a boot_params ("zero page")
//     holds a copy of the setup header and an e820 map, and the kernel is
//     entered in long mode at its load address + 0x200 with RSI pointing
//     at boot_params;
//   - an x86-64 ELF64 carrying a XEN_ELFNOTE_PHYS32_ENTRY note, booted
//     through the Xen PVH ABI (docs/misc/pvh.pandoc and
//     xen/include/public/arch-x86/hvm/start_info.h): the PT_LOAD segments
//     are loaded at their physical addresses, an hvm_start_info (version 1)
//     describes the command line, the initrd (module 0) and the memory map,
//     and the kernel is entered in 32-bit protected mode, paging off, with
//     EBX pointing at hvm_start_info. Debian's unpacked vmlinux and our own
//     workload guest (guest/) are such ELFs.
//
// For both, the loader writes an Intel MultiProcessor Specification 1.4
// table (floating pointer + configuration table) so that Linux finds and
// starts every vCPU without ACPI, a GDT laid out as entry.go documents, and,
// for the 64-bit entry, identity page tables for the first 4 GiB.
//
// # Layout
//
// Guest RAM is [0, min(size, 3 GiB)) plus, above 3 GiB of RAM, [4 GiB, ...)
// (RAMLayout); [MMIOHoleStart, MMIOHoleEnd) is the MMIO hole holding the
// IOAPIC at 0xFEC00000 and the local APIC at 0xFEE00000. The loaders use
// the first MiB of guest RAM as follows:
//
//	0x00000 +-----------------------------+
//	        | IVT / BDA, left zero        |  the TSS of entry.go has base 0
//	0x01000 +-----------------------------+ GDTAddr
//	        | GDT, 6 slots (limit 0x2f)   |  null, code32, code64, data, TSS
//	0x06000 +-----------------------------+ StartInfoAddr (PVH)
//	        | hvm_start_info (56 bytes)   |
//	0x06040 | hvm_modlist_entry[1]        |  module 0 = initrd
//	0x06080 | hvm_memmap_table_entry[128] |
//	0x07000 +-----------------------------+ BootParamsAddr (Linux)
//	        | boot_params (4 KiB)         |  setup header at +0x1f1,
//	        |                             |  e820 at +0x1e8/+0x2d0
//	0x09000 +-----------------------------+ PML4Addr (Linux)
//	        | PML4, PDPT, 4 PDs           |  2 MiB pages, identity 0..4 GiB
//	0x0f000 +-----------------------------+
//	        | free                        |
//	0x20000 +-----------------------------+ CmdlineAddr
//	        | command line, NUL-ended     |  at most CmdlineMax bytes
//	0x30000 +-----------------------------+
//	        | free                        |
//	0x9fc00 +-----------------------------+ MPFloatAddr   e820: reserved from here
//	        | MP floating pointer (16 B)  |
//	0x9fc10 | MP config table, <= 40 CPUs |
//	0xa0000 +-----------------------------+
//	        | legacy VGA / ROM area       |
//	0xf0000 | MP config table, > 40 CPUs  |  MPBIOSTableAddr
//	0x100000+-----------------------------+ HighMemStart  e820: usable again
//	        | kernel: bzImage at 0x100000 |
//	        | or pref_address, PVH ELF at |
//	        | its p_paddr                 |
//	        |            ...              |
//	        | initrd, page aligned, as    |
//	        | high as possible            |
//	        +-----------------------------+ top of low RAM
//
// The e820 map (boot_params) and the PVH memory map (hvm_start_info) are
// the same: [0, 0x9fc00) usable, [0x9fc00, 0x100000) reserved, the rest of
// RAM usable, the MMIO hole reserved.
//
// # Entering the kernel
//
// The VMM turns an Entry into vCPU registers. For both modes: interrupts
// off (RFLAGS = 0x2), CS/DS/ES/SS/FS/GS loaded from the GDT at Entry.GDT
// (flat, base 0, limit 4 GiB), TR = SelTSS (busy TSS, base 0, limit 0x67,
// as the descriptor in the GDT says), LDTR unusable, IDT limit 0.
//
//   - Protected32 (PVH): CR0 = PE (| ET), paging off, CR4 = 0, EFER = 0,
//     CS = SelCode32, data segments SelData, EIP = Entry.RIP,
//     EBX = Entry.RBX (hvm_start_info). No stack is given (ESP = 0).
//   - Long64 (Linux): CR0 = PE | PG (| ET), CR4 = PAE, EFER = LME | LMA,
//     CR3 = Entry.PageTable, CS = SelCode64 (L = 1), data segments SelData,
//     RIP = Entry.RIP, RSI = Entry.RSI (boot_params). No stack is given.
//
// Application processors start in real mode through INIT/SIPI as usual;
// the MP table lists them with APIC IDs 0..CPUs-1 (the BSP is 0) and the
// I/O APIC with ID CPUs. ISA IRQ n is wired to I/O APIC pin n, matching
// KVM's default GSI routing (its in-kernel PIT raises GSI 0 on pin 0).
//
// # Security
//
// The kernel and initrd files are untrusted input: every header field is
// checked before use, all offset and size arithmetic is overflow-checked,
// the number of ELF program headers and the size of note segments are
// capped, and nothing is allocated in proportion to a size read from the
// file. Every write into guest memory goes through guestmem, so it is
// bounds-checked and recorded as dirty. A kernel that is refused leaves
// guest memory in an unspecified state: the caller discards the VM.
package boot
