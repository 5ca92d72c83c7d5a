package boot

import (
	"fmt"

	"collective/kvm/guestmem"
)

// GDT descriptors for the selectors of entry.go (Intel SDM vol. 3A, 3.4.5
// and 7.2.3): flat 4 GiB segments, base 0, limit 0xFFFFF with 4 KiB
// granularity.
const (
	gdtCode32 = 0x00CF_9B00_0000_FFFF // P, DPL0, code execute/read accessed, D=1, G=1
	gdtCode64 = 0x00AF_9B00_0000_FFFF // same with L=1, D=0
	gdtData   = 0x00CF_9300_0000_FFFF // P, DPL0, data read/write accessed, B=1, G=1
	// gdtTSS is the low half of a busy TSS descriptor (type 0xB, as
	// the PVH ABI's "32-bit TSS (active)" and VM entry require of TR),
	// base 0, limit 0x67; the high half (base 63:32) is zero.
	gdtTSS = 0x0000_8B00_0000_0067

	gdtSlots = 6 // null, code32, code64, data, TSS (two slots)
	gdtLimit = gdtSlots*8 - 1
)

// writeGDT writes the GDT described in entry.go at GDTAddr.
func writeGDT(mem *guestmem.Memory) error {
	var g [gdtSlots * 8]byte
	le.PutUint64(g[SelCode32:], gdtCode32)
	le.PutUint64(g[SelCode64:], gdtCode64)
	le.PutUint64(g[SelData:], gdtData)
	le.PutUint64(g[SelTSS:], gdtTSS)
	if _, err := mem.WriteAt(g[:], GDTAddr); err != nil {
		return fmt.Errorf("boot: writing GDT: %w", err)
	}
	return nil
}

// Page table entry bits (Intel SDM vol. 3A, 4.5).
const (
	ptePresent  = 1 << 0
	pteWritable = 1 << 1
	pteHuge     = 1 << 7 // PS: a 2 MiB page in a page directory entry
)

// writePageTables writes identity page tables for [0, 4 GiB) with 2 MiB
// pages: the PML4 at PML4Addr, one PDPT, four page directories.
func writePageTables(mem *guestmem.Memory) error {
	var t [ptEnd - PML4Addr]byte
	le.PutUint64(t[0:], pdptAddr|ptePresent|pteWritable)
	for gib := uint64(0); gib < 4; gib++ {
		pd := pdAddr + gib*0x1000
		le.PutUint64(t[pdptAddr-PML4Addr+gib*8:], pd|ptePresent|pteWritable)
		for i := uint64(0); i < 512; i++ {
			phys := gib<<30 | i<<21
			le.PutUint64(t[pd-PML4Addr+i*8:], phys|ptePresent|pteWritable|pteHuge)
		}
	}
	if _, err := mem.WriteAt(t[:], PML4Addr); err != nil {
		return fmt.Errorf("boot: writing page tables: %w", err)
	}
	return nil
}
