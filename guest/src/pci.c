/*
 * pci.c: PCI configuration mechanism 1 at CPL3 (PCI Local Bus 3.0, 3.2.2.3.2):
 * a 32-bit write of 0x80000000 | bus<<16 | dev<<11 | fn<<8 | (off & 0xfc)
 * to 0xCF8 selects a dword, which 0xCFC..0xCFF then read or write.
 */
#include "pci.h"

static void pci_select(struct pci_addr a, u8 off)
{
	outl(PCI_CONFIG_ADDR, 0x80000000u | (u32)a.bus << 16 | (u32)(a.dev & 31) << 11 |
				      (u32)(a.fn & 7) << 8 | (off & 0xfc));
}

u32 pci_read32(struct pci_addr a, u8 off)
{
	pci_select(a, off);
	return inl(PCI_CONFIG_DATA);
}

u16 pci_read16(struct pci_addr a, u8 off)
{
	pci_select(a, off);
	return inw((u16)(PCI_CONFIG_DATA + (off & 2)));
}

u8 pci_read8(struct pci_addr a, u8 off)
{
	pci_select(a, off);
	return inb((u16)(PCI_CONFIG_DATA + (off & 3)));
}

void pci_write32(struct pci_addr a, u8 off, u32 v)
{
	pci_select(a, off);
	outl(PCI_CONFIG_DATA, v);
}

void pci_write16(struct pci_addr a, u8 off, u16 v)
{
	pci_select(a, off);
	outw((u16)(PCI_CONFIG_DATA + (off & 2)), v);
}

int pci_find(u16 vendor, u16 device, struct pci_addr *out)
{
	for (u8 dev = 0; dev < 32; dev++) {
		struct pci_addr a = {0, dev, 0};
		u32 id = pci_read32(a, PCI_VENDOR_ID);
		if ((id & 0xffff) == 0xffff)
			continue; /* no device: the host bridge answers all-ones */
		int nfn = (pci_read8(a, PCI_HEADER_TYPE) & 0x80) ? 8 : 1;
		for (u8 fn = 0; fn < nfn; fn++) {
			a.fn = fn;
			id = pci_read32(a, PCI_VENDOR_ID);
			if ((id & 0xffff) == vendor && (id >> 16) == device) {
				*out = a;
				return 1;
			}
		}
	}
	return 0;
}

u8 pci_cap_next(struct pci_addr a, u8 prev)
{
	u8 next;
	if (prev == 0) {
		if (!(pci_read16(a, PCI_STATUS) & PCI_STATUS_CAP_LIST))
			return 0;
		next = pci_read8(a, PCI_CAP_PTR);
	} else {
		next = pci_read8(a, (u8)(prev + 1));
	}
	next &= 0xfc; /* the bottom two bits are reserved */
	/* Capabilities live after the 64-byte header, in any order. */
	if (next < 0x40)
		return 0;
	return next;
}

/* Bump allocator for BARs we assign ourselves. */
static u64 bar_next = 0xe0000000ULL;
#define BAR_LIMIT 0xf0000000ULL

u64 pci_bar_addr(struct pci_addr a, int bar)
{
	if (bar < 0 || bar > 5)
		return 0;
	u8 off = (u8)(PCI_BAR0 + 4 * bar);
	u32 lo = pci_read32(a, off);
	if (lo & 1)
		return 0; /* I/O BAR: virtio structures must be in memory */
	int is64 = ((lo >> 1) & 3) == 2;
	if (is64 && bar == 5)
		return 0;
	u64 addr = lo & ~0xfULL;
	if (is64)
		addr |= (u64)pci_read32(a, (u8)(off + 4)) << 32;
	u16 cmd = pci_read16(a, PCI_COMMAND);
	if (addr == 0 || addr >= 0x100000000ULL) {
		/* Size it with memory decode off (PCI 3.0, 6.2.5.1). */
		pci_write16(a, PCI_COMMAND, (u16)(cmd & ~PCI_CMD_MEM));
		pci_write32(a, off, 0xffffffffu);
		u32 m = pci_read32(a, off) & ~0xfu;
		u64 size = (u64)(~m) + 1;
		if (is64) {
			pci_write32(a, (u8)(off + 4), 0xffffffffu);
			u32 mh = pci_read32(a, (u8)(off + 4));
			/* Sizes of 4 GiB or more do not fit our window anyway. */
			if (mh != 0xffffffffu)
				size = 0;
			size &= 0xffffffffULL;
		}
		if (m == 0 || size == 0) {
			pci_write32(a, off, lo);
			return 0;
		}
		addr = (bar_next + size - 1) & ~(size - 1);
		if (addr + size > BAR_LIMIT) {
			pci_write32(a, off, lo);
			return 0;
		}
		bar_next = addr + size;
		pci_write32(a, off, (u32)addr | (lo & 0xf));
		if (is64)
			pci_write32(a, (u8)(off + 4), 0);
	}
	pci_write16(a, PCI_COMMAND, (u16)(cmd | PCI_CMD_MEM | PCI_CMD_BUS_MASTER));
	return addr;
}
