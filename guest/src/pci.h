/* pci.h: PCI configuration space through mechanism 1 (ports 0xCF8/0xCFC),
 * used from CPL3 (IOPL=3, TSS I/O bitmap allows every port). */
#ifndef COLLECTIVE_PCI_H
#define COLLECTIVE_PCI_H

#include "guest.h"

#define PCI_CONFIG_ADDR 0xcf8
#define PCI_CONFIG_DATA 0xcfc

/* Configuration header offsets (type 0). */
#define PCI_VENDOR_ID   0x00
#define PCI_DEVICE_ID   0x02
#define PCI_COMMAND     0x04
#define PCI_STATUS      0x06
#define PCI_HEADER_TYPE 0x0e
#define PCI_BAR0        0x10
#define PCI_CAP_PTR     0x34

#define PCI_CMD_IO          0x1
#define PCI_CMD_MEM         0x2
#define PCI_CMD_BUS_MASTER  0x4
#define PCI_STATUS_CAP_LIST 0x10

#define PCI_CAP_ID_VENDOR 0x09

/* A device address: bus 0..255, device 0..31, function 0..7. */
struct pci_addr {
	u8 bus, dev, fn;
};

static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline u16 inw(u16 port)
{
	u16 v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u32 inl(u16 port)
{
	u32 v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

u32 pci_read32(struct pci_addr a, u8 off);
u16 pci_read16(struct pci_addr a, u8 off);
u8 pci_read8(struct pci_addr a, u8 off);
void pci_write32(struct pci_addr a, u8 off, u32 v);
void pci_write16(struct pci_addr a, u8 off, u16 v);

/* pci_find scans bus 0 (every device, every function of multi-function
 * devices) for vendor:device; returns 1 and the address if found. */
int pci_find(u16 vendor, u16 device, struct pci_addr *out);

/* pci_bar_addr returns the guest-physical address of memory BAR bar (a
 * 32- or 64-bit memory BAR; 0 for an I/O BAR or a bad index). When the BAR
 * is unassigned (0) or above the 4 GiB the guest maps, it sizes the BAR and
 * assigns it an aligned address in [0xE0000000, 0xF0000000). It enables
 * memory decode and bus mastering. */
u64 pci_bar_addr(struct pci_addr a, int bar);

/* pci_cap_next walks the capability list: pass 0 to get the first
 * capability's offset; returns 0 at the end. The list may run in any
 * order: callers bound their walk (PCI_CAP_MAX steps) against loops. */
#define PCI_CAP_MAX 48
u8 pci_cap_next(struct pci_addr a, u8 prev);

#endif
