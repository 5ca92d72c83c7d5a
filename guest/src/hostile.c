/*
 * hostile.c: the hostile mode. For SECONDS, at CPL3, a xorshift PRNG seeded
 * with SEED feeds every device malformed input: port I/O to the serial
 * port, the RTC, the i8042 and unassigned ports; PCI configuration space
 * through 0xCF8/0xCFC (every function, BARs, the command register); the
 * virtio-blk device's registers (common, ISR, device, notify), queue
 * addresses inside and outside RAM, and descriptor tables with loops, huge
 * lengths, out-of-range indices, indirect tables and wrong directions,
 * available-index jumps and random notifies. Every ~100 ms it puts the
 * device back (PCI BAR and command register, reset, a proper init) and
 * checks it still works: a write of sector 0 and a read of it back (just
 * the read on a read-only disk). It prints a progress line about once a
 * second and at the end `hostile: done N operations, device recovered K
 * times` and exits 0.
 *
 *   hostile SECONDS SEED
 *
 * Exit codes: 0 done; 1 the device did not recover (or returned wrong
 * data); 2 bad arguments or too little RAM; 5 no virtio-blk device.
 *
 * The guest must not shoot itself: the device writes guest memory only
 * where descriptors and the used ring say, so DMA addresses follow rules
 * (README.md, "hostile"):
 *   - tables [32 MiB, 40 MiB): what the device reads as descriptors:
 *     descriptor tables (below 39 MiB: any table the device accepts, at
 *     most 1024 entries, stays inside) and indirect tables. Written only in
 *     16-byte records that obey: a record read as a descriptor with WRITE
 *     has addr >= 48 MiB; one with INDIRECT has addr in [32 MiB, 40 MiB -
 *     64 KiB), in the MMIO hole or beyond; else the address gets bit 63.
 *   - rings [40 MiB, 48 MiB): available rings, request headers, discard
 *     segments, buffers the device reads. Never named as a table.
  *   - zone B [48 MiB, ...): what the device may write: used rings, data
 *     buffers, status bytes. Nothing of ours lives above 48 MiB.
 *   - invalid addresses: the MMIO hole, beyond RAM, near 2^64.
 *   - below 1 MiB: zeroed at start; the queue addresses are set right after
 *     every reset, so the device never uses its reset value 0 for long.
 * Deny-list: the i8042 reset (commands 0xF0-0xFF with bit 0 clear, and an
 * output-port write with bit 0 clear), the debug-exit port 0xF4, the ports
 * of KVM's in-kernel PIC, PIT and speaker, the MSI-X message control word
 * and the MSI-X table and PBA (an MSI could be an NMI or an INIT), MMIO
 * to a BAR that is not in the PCI hole, and MMIO to any other function's
 * BAR (pvpanic's ends the VM): our BAR is used only while it overlaps none
 * (other functions' BARs may move; we track where their registers say).
 */
#include "guest.h"
#include "pci.h"

#define MiB (1ULL << 20)
#define ZONE_A     (32 * MiB)
#define ZONE_A_TBL (40 * MiB) /* end of the table part of A */
#define ZONE_RING  (40 * MiB) /* A's ring part: available rings, headers, data */
#define HDR_AREA   (44 * MiB)
#define SEG_AREA   (44 * MiB + 0x80000)
#define RBUF_AREA  (45 * MiB)
#define IND_MAX    (64 * 1024) /* > the largest indirect table (1024 * 16) */
#define ZONE_A_END (48 * MiB)
#define ZONE_B     (48 * MiB)
#define ZONE_B_END (64 * MiB)
#define PROPER     (16 * MiB)  /* the proper driver's rings and buffers */
#define HOLE_LO    0xc0000000ULL
#define HOLE_HI    0xfec00000ULL

/* virtio-pci */
#define VIRTIO_VENDOR 0x1af4
#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_ISR    3
#define CAP_DEVICE 4
#define PCI_CAP_ID_MSIX 0x11
#define COM_DFSELECT 0x00
#define COM_DF       0x04
#define COM_GFSELECT 0x08
#define COM_GF       0x0c
#define COM_MSIX     0x10
#define COM_NUMQ     0x12
#define COM_STATUS   0x14
#define COM_Q_SELECT 0x16
#define COM_Q_SIZE   0x18
#define COM_Q_MSIX   0x1a
#define COM_Q_ENABLE 0x1c
#define COM_Q_NOFF   0x1e
#define COM_Q_DESC   0x20
#define COM_Q_AVAIL  0x28
#define COM_Q_USED   0x30
#define COM_LEN      0x38
#define ST_ACK 1
#define ST_DRIVER 2
#define ST_DRIVER_OK 4
#define ST_FEATURES_OK 8
#define ST_NEEDS_RESET 64
#define F_RO        (1ULL << 5)
#define F_VERSION_1 (1ULL << 32)
#define D_NEXT 1
#define D_WRITE 2
#define D_INDIRECT 4
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WZ 13

#define EXIT_BROKEN 1
#define EXIT_USAGE 2
#define EXIT_NODEV 5

static inline u8 mr8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mr16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mr32(u64 a) { return *(volatile u32 *)a; }
static inline u64 mr64(u64 a) { return *(volatile u64 *)a; }
static inline void mw8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mw16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mw32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void mw64(u64 a, u64 v) { *(volatile u64 *)a = v; }
static inline void outw_(u16 p, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(p)); }
static inline u16 inw_(u16 p) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u32 inl_(u16 p) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline void mfence(void) { __asm__ volatile("mfence" ::: "memory"); }

/* ---- PRNG ---- */

static u64 rs;
static u64 rnd(void)
{
	rs ^= rs << 13;
	rs ^= rs >> 7;
	rs ^= rs << 17;
	return rs;
}
static u64 below(u64 n) { return n ? rnd() % n : 0; }
static int chance(u32 k) { return below(k) == 0; } /* 1 in k */

/* ---- state ---- */

struct msix_deny {
	u8 dev, fn, cap;
};

/* The memory BARs of every other function: we never touch their windows
 * (pvpanic's ends the VM, like debug-exit), and our MMIO goes to the
 * device's BAR only while it overlaps none of them. */
struct other_bar {
	struct pci_addr a;
	u8 reg, is64;
	u16 cmd;
	u32 lo, hi;       /* as the VMM assigned them */
	u64 size, cur;    /* size; address its registers hold now */
};

static struct {
	struct pci_addr pci;
	struct other_bar others[32];
	int nothers;
	u32 bar_lo, bar_hi; /* BAR 0/1 as the VMM assigned them */
	u16 cmd;
	u64 bar;            /* where the BAR holding the structures is now (0: unusable) */
	u64 barsize;
	u8 barno;
	u32 common, notify, isr, devcfg, notify_mult, msix_lo; /* offsets in the BAR */
	u64 offered;
	u16 qmax, numq;
	int ro;
	struct msix_deny deny[32];
	int ndeny;
	u32 cf8;            /* last CONFIG_ADDRESS we wrote */
	u8 i8042_pending;   /* last i8042 command was 0xD1 (write output port) */
	/* queue 0 as the hostile round set it up */
	u16 qsize;
	u64 desc, avail, used;
	u16 avail_idx;
	/* counters */
	u64 ops, rounds, recovered, needs_reset, port_ops, pci_ops, mmio_ops, chains, notifies;
} h;

/* ---- memory rules ---- */

static int in_hole_or_beyond(u64 a) { return (a >= HOLE_LO && a < (1ULL << 32)) || a >= (1ULL << 40); }

/* a_record stores a 16-byte record at gpa (16-aligned, in zone A) after
 * making it safe to read as a descriptor; flags go in last-but-one so that
 * a reader racing us never sees new flags with an old address. */
static void a_record(u64 gpa, u64 w0, u64 w1)
{
	u16 fl = (u16)(w1 >> 32);
	if ((fl & D_WRITE) && w0 < ZONE_B)
		w0 |= 1ULL << 63;
	if ((fl & D_INDIRECT) && !(w0 >= ZONE_A && w0 < ZONE_A_TBL - IND_MAX) && !in_hole_or_beyond(w0))
		w0 |= 1ULL << 63;
	mw64(gpa + 8, w1 & ~((u64)(D_WRITE | D_INDIRECT) << 32));
	mw64(gpa, w0);
	mw64(gpa + 8, w1);
}

static u64 invalid_addr(void)
{
	switch (below(5)) {
	case 0: return HOLE_LO + (below(HOLE_HI - HOLE_LO) & ~0xfULL);
	case 1: return (1ULL << 40) + (rnd() & 0xffffffff0ULL);
	case 2: return 0xfffffffffffff000ULL + (below(0x1000) & ~0xfULL);
	case 3: return rnd() | (1ULL << 63);
	default: {
		u64 a = 0x10000000ULL + (below(0xb0000000ULL) & ~0xfULL); /* 256 MiB .. 3 GiB */
		return is_ram(a, a + 1) ? (1ULL << 41) : a;
	}
	}
}

/* Addresses the device may write to: zone B (near its start mostly) or invalid. */
static u64 write_addr(void)
{
	if (chance(6))
		return invalid_addr();
	u64 span = chance(4) ? ZONE_B_END - ZONE_B : 0x10000;
	u64 a = ZONE_B + below(span);
	return chance(4) ? a : a & ~0x1ffULL;
}

/* Addresses the device reads structures from: zone A's table part or invalid. */
static u64 table_addr(void)
{
	if (chance(8))
		return invalid_addr();
	u64 a = ZONE_A + below(chance(4) ? ZONE_A_TBL - ZONE_A - 0x100000 : 0x20000);
	return a & ~0xfULL;
}

/* Addresses of device-readable buffers: anywhere (reading our code is harmless). */
static u64 read_addr(void)
{
	switch (below(6)) {
	case 0: return invalid_addr();
	case 1: return 0x100000 + below(0x40000); /* our own image: the device only reads it */
	case 2: return write_addr();
	default: return ZONE_A + below(ZONE_A_END - ZONE_A - 0x1000); /* A: the device reads it */
	}
}

static u32 rand_len(void)
{
	switch (below(8)) {
	case 0: return 0;
	case 1: return 0xffffffffu;
	case 2: return 0x80000000u + (u32)below(0x80000000u);
	case 3: return (u32)rnd();
	case 4: return 16;
	case 5: return 1;
	default: return (u32)(below(17) * 512 + (chance(4) ? below(512) : 0));
	}
}

/* ---- PCI ---- */

static void cf8(u32 v)
{
	h.cf8 = v;
	outl(PCI_CONFIG_ADDR, v);
}

static int msix_denied(u32 addr, u32 off, u32 n)
{
	if (!(addr & 0x80000000u) || (addr >> 16 & 0xff))
		return 0;
	u8 dev = addr >> 11 & 31, fn = addr >> 8 & 7;
	u32 reg = (addr & 0xfc) + off;
	for (int i = 0; i < h.ndeny; i++) {
		struct msix_deny *d = &h.deny[i];
		if (d->dev == dev && d->fn == fn && reg < (u32)d->cap + 4 && reg + n > (u32)d->cap + 2)
			return 1;
	}
	return 0;
}

/* Finds every MSI-X capability on bus 0 (their control words are denied). */
static void scan_msix(void)
{
	for (u8 dev = 0; dev < 32; dev++)
		for (u8 fn = 0; fn < 8; fn++) {
			struct pci_addr a = {0, dev, fn};
			if ((pci_read32(a, 0) & 0xffff) == 0xffff)
				continue;
			int steps = 0;
			for (u8 c = pci_cap_next(a, 0); c && steps < PCI_CAP_MAX; c = pci_cap_next(a, c), steps++)
				if (pci_read8(a, c) == PCI_CAP_ID_MSIX && h.ndeny < 32)
					h.deny[h.ndeny++] = (struct msix_deny){dev, fn, c};
		}
}

/* Sizes and records every memory BAR of every function but ours. */
static void scan_others(void)
{
	for (u8 dev = 0; dev < 32; dev++)
		for (u8 fn = 0; fn < 8; fn++) {
			struct pci_addr a = {0, dev, fn};
			if ((pci_read32(a, 0) & 0xffff) == 0xffff || (dev == h.pci.dev && fn == h.pci.fn))
				continue;
			u16 cmd = pci_read16(a, PCI_COMMAND);
			for (u8 i = 0; i < 6 && h.nothers < 32; i++) {
				u8 reg = (u8)(PCI_BAR0 + 4 * i);
				u32 lo = pci_read32(a, reg);
				if (lo & 1)
					continue;
				int is64 = (lo >> 1 & 3) == 2;
				pci_write16(a, PCI_COMMAND, (u16)(cmd & ~PCI_CMD_MEM));
				pci_write32(a, reg, 0xffffffffu);
				u32 m = pci_read32(a, reg) & ~0xfu;
				pci_write32(a, reg, lo);
				pci_write16(a, PCI_COMMAND, cmd);
				if (!m)
					continue;
				struct other_bar *o = &h.others[h.nothers++];
				*o = (struct other_bar){a, reg, (u8)is64, cmd, lo, is64 ? pci_read32(a, (u8)(reg + 4)) : 0,
							(u64)(~m) + 1, 0};
				if (is64)
					i++;
			}
		}
}

static void update_others(void)
{
	for (int i = 0; i < h.nothers; i++) {
		struct other_bar *o = &h.others[i];
		o->cur = pci_read32(o->a, o->reg) & ~0xfULL;
		if (o->is64)
			o->cur |= (u64)pci_read32(o->a, (u8)(o->reg + 4)) << 32;
	}
}

/* Where the structures' BAR is now, as its registers say; 0 when we must
 * not touch it (decoding off, outside the PCI hole, on top of another
 * function's BAR). */
static void update_bar(void)
{
	u8 off = (u8)(PCI_BAR0 + 4 * h.barno);
	u64 a = pci_read32(h.pci, off) & ~0xfULL;
	a |= (u64)pci_read32(h.pci, (u8)(off + 4)) << 32;
	u16 cmd = pci_read16(h.pci, PCI_COMMAND);
	/* (a + size could wrap: a 64-bit BAR may hold anything) */
	h.bar = (cmd & PCI_CMD_MEM) && a >= HOLE_LO && a <= HOLE_HI - h.barsize ? a : 0;
	for (int i = 0; i < h.nothers; i++) {
		struct other_bar *o = &h.others[i];
		if (o->cur < a + h.barsize && a < o->cur + o->size)
			h.bar = 0;
	}
}

static void pci_op(void)
{
	h.pci_ops++;
	u32 addr;
	switch (below(6)) {
	case 0: /* anything, even disabled or another bus */
		addr = (u32)rnd();
		break;
	case 1: case 2: /* the virtio function's header: BARs, command */
		addr = 0x80000000u | (u32)h.pci.dev << 11 | (u32)below(0x40);
		break;
	default:
		addr = 0x80000000u | (u32)below(chance(2) ? 4 : 32) << 11 | (u32)(chance(4) ? below(8) : 0) << 8 |
		       (u32)below(256);
	}
	cf8(addr & ~3u);
	u32 off = (u32)below(4), n = 1u << below(3);
	if (off + n > 4)
		off = 0;
	u16 port = (u16)(PCI_CONFIG_DATA + off);
	if (chance(3)) {
		if (n == 1) inb(port); else if (n == 2) inw_(port); else inl_(port);
	} else if (!msix_denied(h.cf8, off, n)) {
		u32 v = (u32)rnd();
		if (chance(3))
			v = chance(2) ? 0xffffffffu : 0;
		if (n == 1) outb(port, (u8)v); else if (n == 2) outw_(port, (u16)v); else outl(port, v);
	}
	if (chance(16)) /* raw accesses to CONFIG_ADDRESS itself, odd sizes */
		chance(2) ? outb((u16)(PCI_CONFIG_ADDR + below(4)), (u8)rnd()) : (void)inw_((u16)(PCI_CONFIG_ADDR + 2 * below(2)));
	update_others();
	update_bar();
}

/* ---- ports ---- */

static void port_op(void)
{
	h.port_ops++;
	u16 port;
	switch (below(8)) {
	case 0: case 1: case 2: port = (u16)(COM1 + below(8)); break;
	case 3: port = (u16)(0x70 + below(2)); break;
	case 4: case 5: port = chance(2) ? 0x60 : 0x64; break;
	case 6: port = 0x80; break;
	default: port = (u16)(0x100 + below(0x3f8 - 0x100)); break; /* nothing there */
	}
	u32 v = (u32)rnd();
	int n = chance(6) ? (chance(2) ? 2 : 4) : 1;
	if (chance(3)) {
		if (n == 1) inb(port); else if (n == 2) inw_(port); else inl_(port);
		return;
	}
	/* The controller takes only 1-byte writes: only those change what
	 * it waits for (a 2-byte write after 0xD1 leaves 0xD1 pending). */
	if (port == 0x64) {
		if ((v & 0xff) >= 0xf0)
			v |= 1; /* a pulse with bit 0 clear resets the machine */
		if (n == 1)
			h.i8042_pending = (v & 0xff) == 0xd1;
	} else if (port == 0x60 && h.i8042_pending) {
		v |= 1; /* output port bit 0 clear: reset */
		if (n == 1)
			h.i8042_pending = 0;
	}
	if (port == COM1 && chance(2))
		v = '.'; /* keep the console mostly printable */
	if (n == 1) outb(port, (u8)v); else if (n == 2) outw_(port, (u16)v); else outl(port, v);
}

/* Back to a console we can print on. */
static void serial_sane(void)
{
	outb(COM1 + 3, 0x03); /* 8N1, DLAB off */
	outb(COM1 + 1, 0x00); /* no interrupts */
	outb(COM1 + 4, 0x03); /* DTR, RTS, no loopback */
	outb(COM1 + 2, 0x07); /* FIFOs on and cleared */
}

/* ---- virtio registers ---- */

static void set_queue_addrs(void)
{
	/* Full 64-bit values, so no half-written address is ever enabled. */
	/* Available rings in A after the tables: [40 MiB, 40.5 MiB). */
	u64 d = table_addr(), a = chance(8) ? invalid_addr() : (ZONE_A_TBL + below(0x80000)) & ~1ULL;
	u64 u = write_addr() & ~3ULL;
	if (chance(16)) { d |= 8; a |= 1; u |= 2; } /* misaligned: refused at enable */
	if (!h.bar)
		return;
	u64 c = h.bar + h.common;
	if (chance(2)) {
		mw64(c + COM_Q_DESC, d);
		mw64(c + COM_Q_AVAIL, a);
		mw64(c + COM_Q_USED, u);
	} else {
		mw32(c + COM_Q_DESC, (u32)d);
		mw32(c + COM_Q_DESC + 4, (u32)(d >> 32));
		mw32(c + COM_Q_AVAIL, (u32)a);
		mw32(c + COM_Q_AVAIL + 4, (u32)(a >> 32));
		mw32(c + COM_Q_USED, (u32)u);
		mw32(c + COM_Q_USED + 4, (u32)(u >> 32));
	}
	h.desc = d;
	h.avail = a;
	h.used = u;
}

static void mmio_op(void)
{
	if (!h.bar)
		return;
	h.mmio_ops++;
	u64 off;
	switch (below(10)) {
	case 0: case 1: case 2: case 3: case 4: off = h.common + below(COM_LEN + 4); break;
	case 5: case 6: off = h.notify + below(16); break;
	case 7: off = h.isr + below(8); break;
	case 8: off = h.devcfg + below(64); break;
	default: off = below(h.msix_lo); break;
	}
	u32 n = 1u << below(4);
	off &= ~(u64)(chance(4) ? 0 : n - 1);
	if (off + n > h.msix_lo)
		return; /* never the MSI-X table or PBA */
	u64 a = h.bar + off;
	if (chance(3)) {
		if (n == 1) mr8(a); else if (n == 2) mr16(a); else if (n == 4) mr32(a); else mr64(a);
		return;
	}
	u64 rel = off - h.common;
	if (off >= h.common && rel < COM_LEN && rel + n > COM_Q_DESC && rel < COM_Q_USED + 8) {
		set_queue_addrs(); /* addresses only from our generator */
		return;
	}
	u64 v = rnd();
	if (chance(3))
		v = below(4) == 0 ? 0 : (chance(2) ? ~0ULL : below(16));
	if (n == 1) mw8(a, (u8)v); else if (n == 2) mw16(a, (u16)v); else if (n == 4) mw32(a, (u32)v); else mw64(a, v);
	if (off >= h.common && rel <= COM_STATUS && rel + n > COM_STATUS)
		set_queue_addrs(); /* it may have been a reset: never leave the addresses at 0 */
	if (off >= h.notify && off < h.notify + 16)
		h.notifies++;
}

/* ---- descriptor chains ---- */

static u64 capacity; /* sectors, from the device configuration */

/* plausible_chain writes a well-formed virtio-blk chain at head with one
 * thing wrong now and then (type, sector beyond the disk, lengths, a
 * direction, a missing status), so that requests reach the device's
 * request parser rather than failing in the chain walk. */
static void plausible_chain(u64 tbl, u16 qs, u16 head, u64 hdr)
{
	static const u32 types[] = {T_IN, T_IN, T_IN, T_OUT, T_OUT, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WZ, 2, 0x7fffffffu};
	u32 type = types[below(12)];
	u64 sector;
	switch (below(4)) {
	case 0: sector = capacity - below(4); break;      /* at or near the end */
	case 1: sector = capacity + below(1 << 20); break; /* beyond it */
	case 2: sector = chance(2) ? rnd() : ~0ULL - below(8);
		break;
	default: sector = below(capacity ? capacity : 1);
	}
	mw64(hdr, type | (u64)(chance(16) ? rnd() : 0) << 32);
	mw64(hdr + 8, sector);
	int data_write = type == T_IN || type == T_GET_ID;
	if (chance(10))
		data_write = !data_write; /* wrong direction: write into a read-only buffer or the reverse */
	u32 pieces = (type == T_FLUSH && !chance(4)) ? 0 : 1 + (u32)below(3);
	u64 seg = SEG_AREA + (below(0x1000) & ~0xfULL);
	if (type == T_DISCARD || type == T_WZ) { /* one segment: sector, count, flags */
		mw64(seg, sector);
		mw64(seg + 8, (chance(2) ? below(64) : rnd() & 0xffffffff) | (chance(4) ? rnd() : 0) << 32);
	}
	u16 idx = head;
	u16 n = 0;
	a_record(tbl + 16ULL * idx, hdr, (chance(16) ? rand_len() : 16) | (u64)D_NEXT << 32 | (u64)((idx + 1) % qs) << 48);
	idx = (u16)((idx + 1) % qs);
	n++;
	u64 buf = (data_write ? ZONE_B : RBUF_AREA) + (below(0x10000) & ~0x1ffULL);
	for (u32 i = 0; i < pieces && n + 1 < qs; i++, n++) {
		u32 len = (type == T_DISCARD || type == T_WZ) && !chance(4) ? 16 : (u32)(below(9) * 512);
		if (chance(8))
			len += (u32)below(512); /* not a whole sector */
		if (chance(16))
			len = rand_len();
		u64 addr = (type == T_DISCARD || type == T_WZ) ? seg : buf;
		if (chance(16))
			addr = invalid_addr();
		u16 fl = (u16)(D_NEXT | (data_write ? D_WRITE : 0));
		a_record(tbl + 16ULL * idx, addr, len | (u64)fl << 32 | (u64)((idx + 1) % qs) << 48);
		buf += len & ~0x1ffULL;
		idx = (u16)((idx + 1) % qs);
	}
	/* Status: one writable byte, or not quite. */
	u32 slen = chance(10) ? (u32)below(3) : 1;
	u16 sfl = chance(12) ? 0 : D_WRITE;
	a_record(tbl + 16ULL * idx, chance(12) ? invalid_addr() : ZONE_B + 0x20000 + below(0x1000), slen | (u64)sfl << 32);
}

static void ring_op(void)
{
	u16 qs = h.qsize ? h.qsize : 8;
	/* The table we write to: the queue's, or another one in A. */
	u64 tbl = (h.desc >= ZONE_A && h.desc < ZONE_A_TBL && !chance(8)) ? h.desc : ZONE_A + (below(0x10000) & ~0xfULL);
	u32 n = 1 + (u32)below(chance(4) ? 2 * qs : 6);
	u16 head = (u16)below(qs);
	u16 idx = head;
	/* A request header for the chain's first descriptor. */
	u64 hdr = HDR_AREA + (below(0x1000) & ~0xfULL);
	static const u32 types[] = {T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WZ, 2, 0xffffffffu};
	u64 sector = chance(2) ? below(64) : rnd();
	mw64(hdr, types[below(8)] | (u64)(chance(8) ? rnd() : 0) << 32);
	mw64(hdr + 8, sector);
	if (!chance(6))
		plausible_chain(tbl, qs, head, hdr);
	else
	for (u32 i = 0; i < n; i++) {
		u16 fl = (u16)(i + 1 < n ? D_NEXT : 0);
		if (chance(3) && i > 0)
			fl |= D_WRITE;
		if (chance(12))
			fl = (u16)rnd();
		if (chance(10) || (n == 1 && chance(3)))
			fl |= D_INDIRECT;
		u64 addr;
		if (i == 0 && !chance(6))
			addr = hdr;
		else if (fl & D_INDIRECT)
			addr = chance(6) ? invalid_addr() : (ZONE_A + 0x400000 + below(0x100000)) & ~0xfULL; /* 36 MiB */
		else
			addr = (fl & D_WRITE) ? write_addr() : read_addr();
		u32 len = i == 0 && addr == hdr && !chance(6) ? 16 : rand_len();
		if (fl & D_INDIRECT) {
			/* Fill the indirect table it names, if that is ours. */
			len = chance(4) ? rand_len() : 16 * (1 + (u32)below(8));
			if (addr >= ZONE_A && addr < ZONE_A_TBL - IND_MAX)
				for (u32 k = 0; k < 8; k++) {
					u16 f2 = (u16)((chance(2) ? D_NEXT : 0) | (chance(2) ? D_WRITE : 0) | (chance(16) ? D_INDIRECT : 0));
					u64 a2 = (f2 & D_WRITE) ? write_addr() : (k == 0 ? hdr : read_addr());
					a_record(addr + 16 * k, a2, rand_len() | (u64)f2 << 32 | (u64)(chance(4) ? rnd() : k + 1) << 48);
				}
		}
		u16 next;
		switch (below(8)) {
		case 0: next = idx; break;                 /* self loop */
		case 1: next = head; break;                /* back to the head */
		case 2: next = (u16)rnd(); break;          /* out of range, mostly */
		default: next = (u16)((idx + 1 + below(3)) % qs);
		}
		a_record(tbl + 16ULL * idx, addr, len | (u64)fl << 32 | (u64)next << 48);
		idx = next < qs ? next : (u16)((idx + 1) % qs);
	}
	h.chains++;
	/* Publish: the ring entry, then the index (sometimes a jump). */
	if (h.avail >= ZONE_RING && h.avail < ZONE_A_END - 6 - 2 * (u64)qs) {
		u16 newidx = (u16)(h.avail_idx + 1);
		if (chance(16))
			newidx = (u16)(h.avail_idx + below(3 * (u64)qs));
		if (chance(32))
			newidx = (u16)rnd();
		if (chance(8))
			mw16(h.avail, (u16)rnd()); /* flags */
		mw16(h.avail + 4 + 2 * (u64)(h.avail_idx % qs), chance(8) ? (u16)rnd() : head);
		mfence();
		mw16(h.avail + 2, newidx);
		h.avail_idx = newidx;
	}
	mfence();
	if (h.bar && !chance(5)) {
		mw16(h.bar + h.notify + (chance(8) ? 4 * below(4) : 0), (u16)(chance(8) ? rnd() : 0));
		h.notifies++;
	}
}

/* ---- hostile rounds ---- */

static void reset_device(void)
{
	if (!h.bar)
		return;
	mw8(h.bar + h.common + COM_STATUS, 0);
	for (int i = 0; i < 1000 && mr8(h.bar + h.common + COM_STATUS) != 0; i++)
		cpu_relax();
}

/* A mostly proper init with random deviations, so that chains reach a
 * running queue. */
static void hostile_init(void)
{
	u64 c = h.bar + h.common;
	reset_device();
	set_queue_addrs();
	h.avail_idx = 0;
	if (chance(8))
		return;
	mw8(c + COM_STATUS, ST_ACK);
	mw8(c + COM_STATUS, ST_ACK | ST_DRIVER);
	u64 f = h.offered & rnd();
	if (!chance(8))
		f |= F_VERSION_1;
	if (chance(8))
		f = rnd();
	mw32(c + COM_GFSELECT, 0);
	mw32(c + COM_GF, (u32)f);
	mw32(c + COM_GFSELECT, 1);
	mw32(c + COM_GF, (u32)(f >> 32));
	mw8(c + COM_STATUS, chance(16) ? (u8)rnd() : ST_ACK | ST_DRIVER | ST_FEATURES_OK);
	mw16(c + COM_Q_SELECT, chance(8) ? (u16)below(4) : 0);
	u16 qs = (u16)(1u << below(10));
	if (chance(8))
		qs = (u16)rnd();
	mw16(c + COM_Q_SIZE, qs);
	h.qsize = qs;
	mw16(c + COM_Q_MSIX, chance(4) ? (u16)rnd() : 0xffff);
	set_queue_addrs();
	/* Zero the start of the used ring and the available ring's head, so
	 * indices start near 0 (the device's job is to cope if not). */
	if (h.avail >= ZONE_RING && h.avail < ZONE_A_END - 32 && !chance(4))
		mw32(h.avail, 0);
	if (!chance(8))
		mw16(c + COM_Q_ENABLE, chance(8) ? (u16)rnd() : 1);
	mw8(c + COM_STATUS, chance(16) ? (u8)rnd() : ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
}

static void hostile_round(u32 ops)
{
	h.rounds++;
	hostile_init();
	for (u32 i = 0; i < ops; i++) {
		switch (below(16)) {
		case 0: case 1: port_op(); break;
		case 2: pci_op(); break;
		case 3: case 4: case 5: case 6: mmio_op(); break;
		default: ring_op(); break;
		}
		h.ops++;
	}
	if (h.bar && (mr8(h.bar + h.common + COM_STATUS) & ST_NEEDS_RESET))
		h.needs_reset++;
}

/* ---- proper driver (recovery) ---- */

#define P_DESC   (PROPER + 0x0000)
#define P_AVAIL  (PROPER + 0x1000)
#define P_USED   (PROPER + 0x2000)
#define P_HDR    (PROPER + 0x3000)
#define P_STATUS (PROPER + 0x3100)
#define P_DATA   (PROPER + 0x4000)
#define P_QSIZE  8

static u16 p_avail, p_used;

static void broken(const char *what)
{
	serial_sane();
	puts_("\r\nhostile: device did not recover: ");
	puts_(what);
	puts_(" (after ");
	putu(h.ops);
	puts_(" operations, ");
	putu(h.recovered);
	puts_(" recoveries)\n");
	guest_exit(EXIT_BROKEN);
}

/* Puts the PCI functions back as the VMM left them: the others first (a
 * BAR that one of them holds would leave ours unmapped), then ours. */
static void pci_restore(void)
{
	for (int i = 0; i < h.nothers; i++) {
		struct other_bar *o = &h.others[i];
		pci_write16(o->a, PCI_COMMAND, 0);
		pci_write32(o->a, o->reg, o->lo);
		if (o->is64)
			pci_write32(o->a, (u8)(o->reg + 4), o->hi);
	}
	u8 off = (u8)(PCI_BAR0 + 4 * h.barno);
	pci_write16(h.pci, PCI_COMMAND, 0);
	pci_write32(h.pci, off, h.bar_lo);
	pci_write32(h.pci, (u8)(off + 4), h.bar_hi);
	pci_write16(h.pci, PCI_COMMAND, (u16)(h.cmd | PCI_CMD_MEM | PCI_CMD_BUS_MASTER));
	pci_write16(h.pci, PCI_STATUS, 0xffff); /* clear write-1-to-clear bits */
	for (int i = 0; i < h.nothers; i++)
		pci_write16(h.others[i].a, PCI_COMMAND, h.others[i].cmd);
	update_others();
	update_bar();
	if (!h.bar)
		broken("BAR not back in the PCI hole");
}

static void proper_init(void)
{
	u64 c = h.bar + h.common;
	mw8(c + COM_STATUS, 0);
	u64 t0 = rdtsc();
	while (mr8(c + COM_STATUS) != 0)
		if (rdtsc() - t0 > 2000 * tsc_khz)
			broken("status does not read 0 after reset");
	mw8(c + COM_STATUS, ST_ACK);
	mw8(c + COM_STATUS, ST_ACK | ST_DRIVER);
	mw32(c + COM_GFSELECT, 0);
	mw32(c + COM_GF, (u32)(h.offered & F_RO));
	mw32(c + COM_GFSELECT, 1);
	mw32(c + COM_GF, 1); /* VERSION_1 */
	mw8(c + COM_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK);
	if (!(mr8(c + COM_STATUS) & ST_FEATURES_OK))
		broken("FEATURES_OK refused");
	mw16(c + COM_Q_SELECT, 0);
	mw16(c + COM_Q_SIZE, P_QSIZE);
	mw16(c + COM_Q_MSIX, 0xffff);
	mw16(c + COM_MSIX, 0xffff);
	memset((void *)PROPER, 0, 0x5000);
	mw16(P_AVAIL, 1); /* NO_INTERRUPT */
	mw64(c + COM_Q_DESC, P_DESC);
	mw64(c + COM_Q_AVAIL, P_AVAIL);
	mw64(c + COM_Q_USED, P_USED);
	mw16(c + COM_Q_ENABLE, 1);
	mw8(c + COM_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
	if (mr8(c + COM_STATUS) != (ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK))
		broken("DRIVER_OK did not stick");
	p_avail = p_used = 0;
}

/* One request: header, 512 bytes of data, status. Returns the status. */
static u8 proper_req(u32 type, u64 sector)
{
	volatile u64 *hd = (volatile u64 *)P_HDR;
	hd[0] = type;
	hd[1] = sector;
	mw8(P_STATUS, 0xff);
	volatile u64 *d = (volatile u64 *)P_DESC;
	d[0] = P_HDR;
	d[1] = 16 | (u64)D_NEXT << 32 | 1ULL << 48;
	d[2] = P_DATA;
	d[3] = 512 | (u64)(D_NEXT | (type == T_IN ? D_WRITE : 0)) << 32 | 2ULL << 48;
	d[4] = P_STATUS;
	d[5] = 1 | (u64)D_WRITE << 32;
	mw16(P_AVAIL + 4 + 2 * (p_avail % P_QSIZE), 0);
	barrier();
	p_avail++;
	mw16(P_AVAIL + 2, p_avail);
	mfence();
	mw16(h.bar + h.notify, 0);
	u64 t0 = rdtsc();
	while (mr16(P_USED + 2) == p_used)
		if (rdtsc() - t0 > 5000 * tsc_khz)
			broken("request timed out");
	p_used++;
	u32 len = mr32(P_USED + 4 + 8 * ((p_used - 1) % P_QSIZE) + 4);
	u8 st = mr8(P_STATUS);
	if (st == 0 && type == T_IN && len != 513)
		broken("read used length is not 513");
	return st;
}

static void recover(void)
{
	serial_sane();
	pci_restore();
	proper_init();
	u64 *buf = (u64 *)P_DATA;
	u64 tag = rnd();
	if (!h.ro) {
		for (int i = 0; i < 64; i++)
			buf[i] = tag ^ (u64)i * 0x9e3779b97f4a7c15ULL;
		if (proper_req(T_OUT, 0) != 0)
			broken("write of sector 0 failed");
	}
	for (int i = 0; i < 64; i++)
		buf[i] = 0;
	if (proper_req(T_IN, 0) != 0)
		broken("read of sector 0 failed");
	if (!h.ro)
		for (int i = 0; i < 64; i++)
			if (buf[i] != (tag ^ (u64)i * 0x9e3779b97f4a7c15ULL))
				broken("sector 0 read back wrong");
	h.recovered++;
}

/* Finds the device, its structures and what the VMM assigned. */
static void find_device(void)
{
	if (!pci_find(VIRTIO_VENDOR, 0x1042, &h.pci) && !pci_find(VIRTIO_VENDOR, 0x1001, &h.pci)) {
		puts_("hostile: no virtio-blk device on PCI bus 0\n");
		guest_exit(EXIT_NODEV);
	}
	int seen = 0, steps = 0;
	for (u8 c = pci_cap_next(h.pci, 0); c && steps < PCI_CAP_MAX; c = pci_cap_next(h.pci, c), steps++) {
		u8 id = pci_read8(h.pci, c);
		if (id == PCI_CAP_ID_MSIX) {
			u32 t = pci_read32(h.pci, (u8)(c + 4)), p = pci_read32(h.pci, (u8)(c + 8));
			u32 lo = (t & ~7u) < (p & ~7u) ? (t & ~7u) : (p & ~7u);
			if (!h.msix_lo || lo < h.msix_lo)
				h.msix_lo = lo;
			continue;
		}
		if (id != PCI_CAP_ID_VENDOR)
			continue;
		u8 type = pci_read8(h.pci, (u8)(c + 3)), bar = pci_read8(h.pci, (u8)(c + 4));
		u32 off = pci_read32(h.pci, (u8)(c + 8));
		if (type < CAP_COMMON || type > CAP_DEVICE || (seen & (1 << type)))
			continue;
		seen |= 1 << type;
		h.barno = bar;
		switch (type) {
		case CAP_COMMON: h.common = off; break;
		case CAP_NOTIFY: h.notify = off; h.notify_mult = pci_read32(h.pci, (u8)(c + 16)); break;
		case CAP_ISR: h.isr = off; break;
		case CAP_DEVICE: h.devcfg = off; break;
		}
	}
	if (seen != 0x1e || h.barno > 4) {
		puts_("hostile: virtio capabilities missing\n");
		guest_exit(EXIT_NODEV);
	}
	if (!h.msix_lo)
		h.msix_lo = 0x4000;
	u8 off = (u8)(PCI_BAR0 + 4 * h.barno);
	h.bar_lo = pci_read32(h.pci, off);
	h.bar_hi = pci_read32(h.pci, (u8)(off + 4));
	h.cmd = pci_read16(h.pci, PCI_COMMAND);
	pci_write16(h.pci, PCI_COMMAND, (u16)(h.cmd & ~PCI_CMD_MEM));
	pci_write32(h.pci, off, 0xffffffffu);
	h.barsize = (u64)(~(pci_read32(h.pci, off) & ~0xfu)) + 1;
	pci_write32(h.pci, off, h.bar_lo);
	pci_write16(h.pci, PCI_COMMAND, h.cmd);
	if (h.barsize < 0x1000 || h.barsize > (1ULL << 30))
		h.barsize = 1ULL << 30; /* odd: be careful */
	scan_others();
	update_others();
	update_bar();
	if (!h.bar) {
		puts_("hostile: the device's BAR is not in the PCI hole\n");
		guest_exit(EXIT_NODEV);
	}
	u64 c = h.bar + h.common;
	mw32(c + COM_DFSELECT, 0);
	u64 lo = mr32(c + COM_DF);
	mw32(c + COM_DFSELECT, 1);
	h.offered = (u64)mr32(c + COM_DF) << 32 | lo;
	h.ro = (h.offered & F_RO) != 0;
	h.numq = mr16(c + COM_NUMQ);
	mw16(c + COM_Q_SELECT, 0);
	h.qmax = mr16(c + COM_Q_SIZE);
	capacity = (u64)mr32(h.bar + h.devcfg + 4) << 32 | mr32(h.bar + h.devcfg);
	scan_msix();
}

static void zero_low_memory(void)
{
	/* Below 1 MiB only start_info and the memmap lived: copied already. */
	u64 n = is_ram(0, 0x9f000) ? 0x9f000 / 8 : 0;
	u64 d = 0;
	__asm__ volatile("rep stosq" : "+D"(d), "+c"(n) : "a"(0ULL) : "memory");
}

static void progress(const char *what, u64 ms)
{
	serial_sane();
	puts_("\r\nhostile: ");
	puts_(what);
	putu(ms / 1000);
	puts_(" s: ");
	putu(h.ops);
	puts_(" operations (ports ");
	putu(h.port_ops);
	puts_(", pci ");
	putu(h.pci_ops);
	puts_(", mmio ");
	putu(h.mmio_ops);
	puts_(", chains ");
	putu(h.chains);
	puts_(", notifies ");
	putu(h.notifies);
	puts_("), rounds ");
	putu(h.rounds);
	puts_(", device needed reset ");
	putu(h.needs_reset);
	puts_(", recovered ");
	putu(h.recovered);
	puts_("\n");
}

int mode_hostile(void)
{
	u64 secs, seed;
	if (argc != 3 || !parse_u64(argv[1], &secs) || !parse_u64(argv[2], &seed) || secs == 0) {
		puts_("hostile: usage: hostile SECONDS SEED\n");
		return EXIT_USAGE;
	}
	if (!is_ram(PROPER, ZONE_B_END)) {
		puts_("hostile: needs RAM from 16 MiB to 64 MiB\n");
		return EXIT_USAGE;
	}
	rs = seed * 0x9e3779b97f4a7c15ULL + 0x2545f4914f6cdd1dULL;
	if (!rs)
		rs = 1;
	time_init();
	zero_low_memory();
	find_device();
	puts_("hostile: virtio-blk at 00:");
	putu(h.pci.dev);
	puts_(".");
	putu(h.pci.fn);
	puts_(", BAR ");
	puthex(h.bar);
	puts_(", features ");
	puthex(h.offered);
	puts_(", queue max ");
	putu(h.qmax);
	puts_(", capacity ");
	putu(capacity);
	puts_(", ");
	putu(h.ndeny);
	puts_(" MSI-X capabilities denied, ");
	putu(h.nothers);
	puts_(" other BARs avoided; seed ");
	putu(seed);
	puts_(", ");
	putu(secs);
	puts_(" s\n");
	recover(); /* works before we start */
	h.recovered = 0;

	u64 t0 = rdtsc(), end = t0 + secs * 1000 * tsc_khz;
	u64 next_print = t0 + 1000 * tsc_khz, next_recover = t0 + 100 * tsc_khz;
	for (;;) {
		u64 now = rdtsc();
		if (now >= end)
			break;
		hostile_round(8 + (u32)below(120));
		if (rdtsc() >= next_recover) {
			recover();
			next_recover = rdtsc() + 100 * tsc_khz;
		}
		if (rdtsc() >= next_print) {
			progress("", (rdtsc() - t0) / tsc_khz);
			next_print += 1000 * tsc_khz;
		}
	}
	recover();
	progress("final after ", (rdtsc() - t0) / tsc_khz);
	puts_("hostile: done ");
	putu(h.ops);
	puts_(" operations, device recovered ");
	putu(h.recovered);
	puts_(" times\n");
	return 0;
}
