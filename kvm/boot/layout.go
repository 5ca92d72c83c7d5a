package boot

import (
	"fmt"
	"sort"

	"collective/kvm/guestmem"
)

// Guest-physical address space shared by the VMM and the loaders.
const (
	// MMIOHoleStart is the first address of the MMIO hole below 4 GiB;
	// guest RAM beyond it is mapped from MMIOHoleEnd up.
	MMIOHoleStart = 0xC000_0000
	// MMIOHoleEnd is the first address after the MMIO hole (4 GiB).
	MMIOHoleEnd = 1 << 32
	// IOAPICAddr is the base of the I/O APIC's registers.
	IOAPICAddr = 0xFEC0_0000
	// LAPICAddr is the base of the local APICs' registers.
	LAPICAddr = 0xFEE0_0000
)

// Low-memory addresses used by the loaders (see Layout in the package doc).
const (
	// GDTAddr is the guest-physical address of the GDT.
	GDTAddr = 0x1000
	// StartInfoAddr is where the PVH loader writes hvm_start_info.
	StartInfoAddr = 0x6000
	modlistAddr   = StartInfoAddr + 0x40
	memmapAddr    = StartInfoAddr + 0x80
	// BootParamsAddr is where the Linux loader writes boot_params.
	BootParamsAddr = 0x7000
	// PML4Addr is the root of the identity page tables (CR3).
	PML4Addr = 0x9000
	pdptAddr = PML4Addr + 0x1000
	pdAddr   = PML4Addr + 0x2000 // four page directories, one per GiB
	ptEnd    = pdAddr + 4*0x1000
	// CmdlineAddr is where the kernel command line is written.
	CmdlineAddr = 0x20000
	// CmdlineMax is the size of the command line area, terminating NUL
	// included.
	CmdlineMax = 0x10000
	// MPFloatAddr is the MP floating pointer, in the last KiB of base
	// memory where Linux looks for it.
	MPFloatAddr = 0x9FC00
	// MPBIOSTableAddr holds the MP configuration table when it is too large
	// for the last KiB of base memory (more than 40 CPUs).
	MPBIOSTableAddr = 0xF0000
	// HighMemStart is the end of the area reserved for the loader's own
	// structures and the BIOS; kernels and initrds are loaded above it.
	HighMemStart = 0x100000
)

// maxMapEntries caps the e820 and PVH memory maps: the zero page has room
// for 128 e820 entries (E820_MAX_ENTRIES_ZEROPAGE), and so has the PVH
// memmap area.
const maxMapEntries = 128

// RAMLayout returns the guest RAM ranges of a VM with size bytes of RAM:
// [0, min(size, MMIOHoleStart)) and, when size exceeds MMIOHoleStart, the
// rest at [MMIOHoleEnd, ...). It returns nil for size 0.
func RAMLayout(size uint64) []guestmem.Range {
	if size == 0 {
		return nil
	}
	r := []guestmem.Range{{GPA: 0, Size: min(size, MMIOHoleStart)}}
	if size > MMIOHoleStart {
		r = append(r, guestmem.Range{GPA: MMIOHoleEnd, Size: size - MMIOHoleStart})
	}
	return r
}

// MemType is the type of a memory map entry; the values are shared by
// e820 (boot.rst, struct boot_e820_entry) and the PVH memory map
// (XEN_HVM_MEMMAP_TYPE_*).
type MemType uint32

// Memory map entry types.
const (
	MemRAM      MemType = 1 // usable RAM
	MemReserved MemType = 2 // reserved: BIOS area, MMIO
)

// MapEntry is one entry of the guest's physical memory map.
type MapEntry struct {
	Addr uint64
	Size uint64
	Type MemType
}

// MemoryMap returns the memory map the loaders hand to the kernel for the
// given RAM ranges: RAM usable except [MPFloatAddr, HighMemStart) (EBDA, MP
// table, legacy VGA and BIOS areas), which is reserved, and the MMIO hole
// reserved. Entries are sorted by address, adjacent entries of one type
// merged.
func MemoryMap(ram []guestmem.Range) []MapEntry {
	cuts := []uint64{MPFloatAddr, HighMemStart, MMIOHoleStart, MMIOHoleEnd}
	var out []MapEntry
	for _, r := range ram {
		lo, hi := r.GPA, r.End()
		for lo < hi {
			next := hi
			for _, c := range cuts {
				if c > lo && c < next {
					next = c
				}
			}
			switch {
			case lo >= MPFloatAddr && lo < HighMemStart:
				// Covered by the reserved BIOS entry below.
			case lo >= MMIOHoleStart && lo < MMIOHoleEnd:
				// Covered by the reserved hole entry below.
			default:
				out = append(out, MapEntry{Addr: lo, Size: next - lo, Type: MemRAM})
			}
			lo = next
		}
	}
	out = append(out,
		MapEntry{Addr: MPFloatAddr, Size: HighMemStart - MPFloatAddr, Type: MemReserved},
		MapEntry{Addr: MMIOHoleStart, Size: MMIOHoleEnd - MMIOHoleStart, Type: MemReserved})
	sort.Slice(out, func(i, j int) bool { return out[i].Addr < out[j].Addr })
	merged := out[:1]
	for _, e := range out[1:] {
		last := &merged[len(merged)-1]
		if last.Type == e.Type && last.Addr+last.Size == e.Addr {
			last.Size += e.Size
			continue
		}
		merged = append(merged, e)
	}
	return merged
}

// ranges returns the RAM ranges of mem.
func ranges(mem *guestmem.Memory) []guestmem.Range {
	var out []guestmem.Range
	for _, r := range mem.Regions() {
		out = append(out, guestmem.Range{GPA: r.GPA, Size: r.Size()})
	}
	return out
}

// guestMap returns the memory map for mem, checked against maxMapEntries.
func guestMap(mem *guestmem.Memory) ([]MapEntry, error) {
	m := MemoryMap(ranges(mem))
	if len(m) > maxMapEntries {
		return nil, fmt.Errorf("boot: memory map has %d entries, more than %d", len(m), maxMapEntries)
	}
	return m, nil
}

// lowRAMTop returns the end of the RAM contiguous from address 0, capped
// at the MMIO hole: the region where 32-bit structures (initrd) may go.
func lowRAMTop(mem *guestmem.Memory) uint64 {
	var top uint64
	for _, r := range mem.Regions() {
		if r.GPA > top {
			break
		}
		if end := r.GPA + r.Size(); end > top {
			top = end
		}
	}
	return min(top, MMIOHoleStart)
}
