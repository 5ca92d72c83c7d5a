/*
 * virtio_blk.c: a polling virtio-blk driver at CPL3 and the blk mode.
 *
 * Written from the virtio 1.2 specification: 4.1 (virtio over PCI, modern
 * interface: vendor capabilities for the common, notify, ISR and device
 * configuration structures), 3.1 (device initialisation), 2.7 (split
 * virtqueues) and 5.2 (block device). No interrupts: MSI-X vectors are
 * VIRTIO_MSI_NO_VECTOR, the available ring asks for no interrupts, and the
 * driver polls the used ring. Several requests stay in flight (a queue
 * depth); the doorbell is skipped while the device says it is still
 * polling the ring (VIRTQ_USED_F_NO_NOTIFY).
 *
 *   blk verify [SECTORS] [SEED]  write patterns, flush, GET_ID, read back, verify
 *   blk bench [SECONDS] [SPAN]   seq 1M write/read (qd 4), random 4K read (qd 32)
 *
 * Exit codes: 0 ok, 1 mismatch or unexpected status, 2 bad arguments,
 * 4 a write failed with VIRTIO_BLK_S_IOERR (read-only disk), 5 no device or
 * initialisation failed, 6 a request timed out.
 */
#include "guest.h"
#include "pci.h"

/* ---- virtio constants ---- */

#define VIRTIO_VENDOR          0x1af4
#define VIRTIO_BLK_MODERN      0x1042 /* 0x1040 + device type 2 */
#define VIRTIO_BLK_TRANSITIONAL 0x1001

/* struct virtio_pci_cap cfg_type (4.1.4) */
#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_ISR    3
#define CAP_DEVICE 4

/* struct virtio_pci_common_cfg offsets (4.1.4.3) */
#define COM_DFSELECT   0x00
#define COM_DF         0x04
#define COM_GFSELECT   0x08
#define COM_GF         0x0c
#define COM_MSIX       0x10
#define COM_NUMQ       0x12
#define COM_STATUS     0x14
#define COM_CFGGEN     0x15
#define COM_Q_SELECT   0x16
#define COM_Q_SIZE     0x18
#define COM_Q_MSIX     0x1a
#define COM_Q_ENABLE   0x1c
#define COM_Q_NOFF     0x1e
#define COM_Q_DESCLO   0x20
#define COM_Q_DESCHI   0x24
#define COM_Q_AVAILLO  0x28
#define COM_Q_AVAILHI  0x2c
#define COM_Q_USEDLO   0x30
#define COM_Q_USEDHI   0x34

/* device status (2.1) */
#define ST_ACKNOWLEDGE 1
#define ST_DRIVER      2
#define ST_DRIVER_OK   4
#define ST_FEATURES_OK 8
#define ST_NEEDS_RESET 64
#define ST_FAILED      128

#define NO_VECTOR 0xffff

/* feature bits */
#define F_SEG_MAX   (1ULL << 2)
#define F_RO        (1ULL << 5)
#define F_BLK_SIZE  (1ULL << 6)
#define F_FLUSH     (1ULL << 9)
#define F_VERSION_1 (1ULL << 32)

/* block request types and status (5.2.6) */
#define T_IN    0
#define T_OUT   1
#define T_FLUSH 4
#define T_GET_ID 8
#define S_OK     0
#define S_IOERR  1
#define S_UNSUPP 2
#define S_PENDING 0xff /* our marker: the device has not written the status */

#define SECTOR 512ULL
#define SERIAL_LEN 20

/* split virtqueue (2.7) */
#define DESC_F_NEXT  1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1

struct vq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vq_avail {
	u16 flags;
	u16 idx;
	u16 ring[]; /* then used_event (unused: no EVENT_IDX) */
};

struct vq_used_elem {
	u32 id;
	u32 len;
};

struct vq_used {
	u16 flags;
	u16 idx;
	struct vq_used_elem ring[];
};

struct blk_req_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

/* ---- guest-physical layout (README.md) ---- */

#define BLK_BASE    0x1000000ULL          /* 16 MiB */
#define DESC_GPA    (BLK_BASE + 0x0000)   /* 16 * 256 = 4 KiB, 16-aligned */
#define AVAIL_GPA   (BLK_BASE + 0x1000)   /* 2-aligned */
#define USED_GPA    (BLK_BASE + 0x2000)   /* 4-aligned */
#define HDR_GPA     (BLK_BASE + 0x3000)   /* 16 bytes per slot */
#define STATUS_GPA  (BLK_BASE + 0x4000)   /* 1 byte per slot */
#define DATA_GPA    (BLK_BASE + 0x100000) /* 17 MiB: slot data buffers */
#define DATA_MAX    (8ULL << 20)          /* room for data buffers */

#define QSIZE_WANT 256
#define MAX_SLOTS  64
#define TIMEOUT_MS 10000

#define EXIT_MISMATCH 1
#define EXIT_USAGE    2
#define EXIT_IOERR    4
#define EXIT_NODEV    5
#define EXIT_TIMEOUT  6

/* ---- MMIO ---- */

static inline u8 mr8(volatile u8 *b, u32 off) { return *(volatile u8 *)(b + off); }
static inline u16 mr16(volatile u8 *b, u32 off) { return *(volatile u16 *)(b + off); }
static inline u32 mr32(volatile u8 *b, u32 off) { return *(volatile u32 *)(b + off); }
static inline void mw8(volatile u8 *b, u32 off, u8 v) { *(volatile u8 *)(b + off) = v; }
static inline void mw16(volatile u8 *b, u32 off, u16 v) { *(volatile u16 *)(b + off) = v; }
static inline void mw32(volatile u8 *b, u32 off, u32 v) { *(volatile u32 *)(b + off) = v; }
static inline void mfence(void) { __asm__ volatile("mfence" ::: "memory"); }

/* ---- the device ---- */

struct slot {
	u16 head;     /* first descriptor (slot * per) */
	u8 busy;
	u32 type;
	u64 sector;
	u64 bytes;
	u64 data;     /* GPA of the data buffer */
	u64 issued;   /* rdtsc at submission */
};

static struct {
	struct pci_addr pci;
	u16 devid;
	volatile u8 *common, *isr, *devcfg;
	volatile u16 *notify; /* queue 0's doorbell */
	u64 bar_addr[6];
	u64 offered, features;
	u64 capacity; /* sectors */
	u32 blk_size, seg_max;
	u16 qsize;
	volatile struct vq_desc *desc;
	volatile struct vq_avail *avail;
	volatile struct vq_used *used;
	u16 avail_idx, used_idx;
	/* request slots */
	u32 qd, per; /* queue depth; descriptors per slot */
	u64 slot_bytes;
	u32 inflight;
	struct slot slots[MAX_SLOTS];
	u32 notify_mult;
	u64 kicks, kicks_skipped;
} vb;

static void die(const char *msg, int code)
{
	puts_("blk: ");
	puts_(msg);
	puts_("\n");
	if (vb.common && code == EXIT_NODEV)
		mw8(vb.common, COM_STATUS, (u8)(mr8(vb.common, COM_STATUS) | ST_FAILED));
	guest_exit(code);
}

static const char *status_name(u8 s)
{
	switch (s) {
	case S_OK: return "OK";
	case S_IOERR: return "IOERR";
	case S_UNSUPP: return "UNSUPP";
	case S_PENDING: return "none (not written)";
	}
	return "unknown";
}

/* Finds the virtio vendor capabilities and maps their structures. */
static void find_caps(void)
{
	int seen = 0;
	int steps = 0;
	for (u8 c = pci_cap_next(vb.pci, 0); c && steps < PCI_CAP_MAX; c = pci_cap_next(vb.pci, c), steps++) {
		if (pci_read8(vb.pci, c) != PCI_CAP_ID_VENDOR)
			continue;
		u8 len = pci_read8(vb.pci, (u8)(c + 2));
		u8 type = pci_read8(vb.pci, (u8)(c + 3));
		u8 bar = pci_read8(vb.pci, (u8)(c + 4));
		u32 off = pci_read32(vb.pci, (u8)(c + 8));
		u32 length = pci_read32(vb.pci, (u8)(c + 12));
		if (len < 16 || bar > 5 || type < CAP_COMMON || type > CAP_DEVICE)
			continue; /* e.g. the PCI configuration access capability */
		if (seen & (1 << type))
			continue; /* the first of each type is the preferred one */
		if (!vb.bar_addr[bar])
			vb.bar_addr[bar] = pci_bar_addr(vb.pci, bar);
		if (!vb.bar_addr[bar]) {
			puts_("blk: capability type ");
			putu(type);
			puts_(" in unusable BAR ");
			putu(bar);
			puts_("\n");
			continue;
		}
		volatile u8 *p = (volatile u8 *)(vb.bar_addr[bar] + off);
		switch (type) {
		case CAP_COMMON:
			if (length < 0x38)
				continue;
			vb.common = p;
			break;
		case CAP_NOTIFY: {
			if (len < 20)
				continue;
			u32 mult = pci_read32(vb.pci, (u8)(c + 16));
			vb.notify = (volatile u16 *)p; /* + queue_notify_off * mult below */
			vb.notify_mult = mult;
			break;
		}
		case CAP_ISR:
			vb.isr = p;
			break;
		case CAP_DEVICE:
			vb.devcfg = p;
			break;
		}
		seen |= 1 << type;
	}
	if (!vb.common || !vb.notify || !vb.devcfg)
		die("missing virtio capabilities (need common, notify and device)", EXIT_NODEV);
}

static void set_status(u8 bits)
{
	mw8(vb.common, COM_STATUS, (u8)(mr8(vb.common, COM_STATUS) | bits));
}

/* Reads the 64-bit capacity consistently (config_generation, 4.1.4.3.1). */
static u64 read_capacity(void)
{
	for (int i = 0; i < 100; i++) {
		u8 g = mr8(vb.common, COM_CFGGEN);
		u64 lo = mr32(vb.devcfg, 0), hi = mr32(vb.devcfg, 4);
		if (mr8(vb.common, COM_CFGGEN) == g)
			return hi << 32 | lo;
	}
	die("device configuration keeps changing", EXIT_NODEV);
	return 0;
}

static void blk_init(void)
{
	if (pci_find(VIRTIO_VENDOR, VIRTIO_BLK_MODERN, &vb.pci))
		vb.devid = VIRTIO_BLK_MODERN;
	else if (pci_find(VIRTIO_VENDOR, VIRTIO_BLK_TRANSITIONAL, &vb.pci))
		vb.devid = VIRTIO_BLK_TRANSITIONAL;
	else
		die("no virtio-blk device on PCI bus 0", EXIT_NODEV);
	find_caps();

	/* 3.1.1: reset, and wait until the device reads back 0. */
	mw8(vb.common, COM_STATUS, 0);
	u64 t0 = rdtsc();
	while (mr8(vb.common, COM_STATUS) != 0) {
		if (rdtsc() - t0 > (u64)TIMEOUT_MS * tsc_khz)
			die("device does not reset", EXIT_NODEV);
		cpu_relax();
	}
	set_status(ST_ACKNOWLEDGE);
	set_status(ST_DRIVER);

	mw32(vb.common, COM_DFSELECT, 0);
	u64 lo = mr32(vb.common, COM_DF);
	mw32(vb.common, COM_DFSELECT, 1);
	u64 hi = mr32(vb.common, COM_DF);
	vb.offered = hi << 32 | lo;
	if (!(vb.offered & F_VERSION_1))
		die("device does not offer VIRTIO_F_VERSION_1", EXIT_NODEV);
	vb.features = vb.offered & (F_VERSION_1 | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_RO);
	mw32(vb.common, COM_GFSELECT, 0);
	mw32(vb.common, COM_GF, (u32)vb.features);
	mw32(vb.common, COM_GFSELECT, 1);
	mw32(vb.common, COM_GF, (u32)(vb.features >> 32));
	set_status(ST_FEATURES_OK);
	if (!(mr8(vb.common, COM_STATUS) & ST_FEATURES_OK))
		die("device refused our features (FEATURES_OK did not stick)", EXIT_NODEV);

	/* Queue 0 (requestq). */
	mw16(vb.common, COM_Q_SELECT, 0);
	u16 qmax = mr16(vb.common, COM_Q_SIZE);
	if (qmax == 0)
		die("queue 0 does not exist", EXIT_NODEV);
	if (mr16(vb.common, COM_Q_ENABLE))
		die("queue 0 enabled after reset", EXIT_NODEV);
	u16 qs = QSIZE_WANT;
	while (qs > qmax)
		qs >>= 1; /* split queues need not be powers of two, ours is */
	if (qs < 4)
		die("queue too small", EXIT_NODEV);
	vb.qsize = qs;
	mw16(vb.common, COM_Q_SIZE, qs);
	mw16(vb.common, COM_Q_MSIX, NO_VECTOR);
	mw16(vb.common, COM_MSIX, NO_VECTOR);
	memset((void *)DESC_GPA, 0, 0x5000);
	vb.desc = (volatile struct vq_desc *)DESC_GPA;
	vb.avail = (volatile struct vq_avail *)AVAIL_GPA;
	vb.used = (volatile struct vq_used *)USED_GPA;
	vb.avail->flags = AVAIL_F_NO_INTERRUPT;
	vb.avail_idx = vb.used_idx = 0;
	mw32(vb.common, COM_Q_DESCLO, (u32)DESC_GPA);
	mw32(vb.common, COM_Q_DESCHI, (u32)(DESC_GPA >> 32));
	mw32(vb.common, COM_Q_AVAILLO, (u32)AVAIL_GPA);
	mw32(vb.common, COM_Q_AVAILHI, (u32)(AVAIL_GPA >> 32));
	mw32(vb.common, COM_Q_USEDLO, (u32)USED_GPA);
	mw32(vb.common, COM_Q_USEDHI, (u32)(USED_GPA >> 32));
	u16 noff = mr16(vb.common, COM_Q_NOFF);
	vb.notify = (volatile u16 *)((volatile u8 *)vb.notify + (u32)noff * vb.notify_mult);
	mw16(vb.common, COM_Q_ENABLE, 1);

	vb.capacity = read_capacity();
	vb.blk_size = (vb.features & F_BLK_SIZE) ? mr32(vb.devcfg, 20) : 512;
	vb.seg_max = (vb.features & F_SEG_MAX) ? mr32(vb.devcfg, 12) : 0;
	set_status(ST_DRIVER_OK);
	u8 st = mr8(vb.common, COM_STATUS);
	if (st & (ST_NEEDS_RESET | ST_FAILED))
		die("device needs a reset after DRIVER_OK", EXIT_NODEV);

	puts_("blk: virtio-blk ");
	puthex(vb.devid);
	puts_(" at 00:");
	putu(vb.pci.dev);
	puts_(".");
	putu(vb.pci.fn);
	puts_(", common cfg ");
	puthex((u64)vb.common);
	puts_(", notify ");
	puthex((u64)vb.notify);
	puts_(", features ");
	puthex(vb.features);
	puts_(" of ");
	puthex(vb.offered);
	puts_(", queue ");
	putu(qs);
	puts_(" (max ");
	putu(qmax);
	puts_("), capacity ");
	putu(vb.capacity);
	puts_(" sectors, blk_size ");
	putu(vb.blk_size);
	puts_(", seg_max ");
	putu(vb.seg_max);
	puts_(vb.features & F_RO ? ", read-only\n" : "\n");
}

/* ---- requests ---- */

/* slots_setup divides the queue into qd slots of slot_bytes of data. */
static void slots_setup(u32 qd, u64 slot_bytes)
{
	if (qd > MAX_SLOTS || qd * 3 > vb.qsize)
		die("queue depth too large for the queue", EXIT_USAGE);
	if (qd * slot_bytes > DATA_MAX)
		die("data buffers do not fit", EXIT_USAGE);
	if (!is_ram(BLK_BASE, DATA_GPA + qd * slot_bytes))
		die("needs RAM from 16 MiB to 25 MiB", EXIT_USAGE);
	vb.qd = qd;
	vb.per = vb.qsize / qd;
	vb.slot_bytes = slot_bytes;
	vb.inflight = 0;
	for (u32 i = 0; i < qd; i++) {
		vb.slots[i].head = (u16)(i * vb.per);
		vb.slots[i].busy = 0;
		vb.slots[i].data = DATA_GPA + i * slot_bytes;
	}
}

static volatile struct blk_req_hdr *slot_hdr(u32 i) { return (volatile struct blk_req_hdr *)(HDR_GPA + 16ULL * i); }
static volatile u8 *slot_status(u32 i) { return (volatile u8 *)(STATUS_GPA + i); }

/* submit queues a request in slot i: header, the data split into pieces
 * of at most seglen bytes (0: one piece), status. It does not notify. */
static void submit(u32 i, u32 type, u64 sector, u64 data, u64 bytes, u64 seglen)
{
	struct slot *s = &vb.slots[i];
	u32 maxseg = vb.per - 2;
	if (vb.seg_max && vb.seg_max < maxseg)
		maxseg = vb.seg_max;
	if (!seglen || seglen > bytes)
		seglen = bytes ? bytes : 1;
	if (bytes && (bytes + seglen - 1) / seglen > maxseg) {
		seglen = (bytes + maxseg - 1) / maxseg;
		seglen = (seglen + SECTOR - 1) & ~(SECTOR - 1);
	}
	volatile struct blk_req_hdr *h = slot_hdr(i);
	h->type = type;
	h->reserved = 0;
	h->sector = sector;
	*slot_status(i) = S_PENDING;

	u16 d = s->head;
	u16 dw = (type == T_IN || type == T_GET_ID) ? DESC_F_WRITE : 0;
	vb.desc[d].addr = (u64)h;
	vb.desc[d].len = 16;
	vb.desc[d].flags = DESC_F_NEXT;
	vb.desc[d].next = (u16)(d + 1);
	d++;
	for (u64 off = 0; off < bytes; off += seglen) {
		u64 n = bytes - off < seglen ? bytes - off : seglen;
		vb.desc[d].addr = data + off;
		vb.desc[d].len = (u32)n;
		vb.desc[d].flags = (u16)(DESC_F_NEXT | dw);
		vb.desc[d].next = (u16)(d + 1);
		d++;
	}
	vb.desc[d].addr = (u64)slot_status(i);
	vb.desc[d].len = 1;
	vb.desc[d].flags = DESC_F_WRITE;
	vb.desc[d].next = 0;

	s->busy = 1;
	s->type = type;
	s->sector = sector;
	s->bytes = bytes;
	s->issued = rdtsc();
	vb.inflight++;
	vb.avail->ring[vb.avail_idx % vb.qsize] = s->head;
	barrier(); /* the ring entry before the index (x86 keeps store order) */
	vb.avail_idx++;
	vb.avail->idx = vb.avail_idx;
}

/* kick notifies the device unless it asked not to be (2.7.10.1): the
 * available index must be visible before we read used->flags. */
static void kick(void)
{
	mfence();
	if (vb.used->flags & USED_F_NO_NOTIFY) {
		vb.kicks_skipped++;
		return;
	}
	*vb.notify = 0; /* queue index 0 */
	vb.kicks++;
}

/* reap returns the slot of the next completed request, or -1 if none. */
static int reap(u32 *len)
{
	/* Only 1..inflight new entries are possible: anything else is a torn
	 * read of an index the device writes byte by byte; read it again. */
	u16 n = (u16)(vb.used->idx - vb.used_idx);
	if (n == 0 || n > vb.inflight)
		return -1;
	barrier(); /* read the entry after the index (x86 keeps load order) */
	volatile struct vq_used_elem *e = &vb.used->ring[vb.used_idx % vb.qsize];
	u32 id = e->id;
	*len = e->len;
	vb.used_idx++;
	if (id >= vb.qsize || id % vb.per || id / vb.per >= vb.qd || !vb.slots[id / vb.per].busy) {
		puts_("blk: used ring names descriptor ");
		putu(id);
		puts_(", not a request head in flight\n");
		guest_exit(EXIT_MISMATCH);
	}
	u32 i = id / vb.per;
	vb.slots[i].busy = 0;
	vb.inflight--;
	return (int)i;
}

/* wait_one polls until a request completes and returns its slot. */
static u32 wait_one(u32 *len)
{
	u64 t0 = rdtsc();
	for (u32 spins = 0;; spins++) {
		int i = reap(len);
		if (i >= 0)
			return (u32)i;
		if ((spins & 1023) == 1023) {
			if (rdtsc() - t0 > (u64)TIMEOUT_MS * tsc_khz) {
				puts_("blk: request timed out; device status ");
				puthex(mr8(vb.common, COM_STATUS));
				puts_(", used idx ");
				putu(vb.used->idx);
				puts_(", ours ");
				putu(vb.used_idx);
				puts_("\n");
				guest_exit(EXIT_TIMEOUT);
			}
		}
		cpu_relax();
	}
}

/* sync_req runs one request in slot 0 and returns its status. */
static u8 sync_req(u32 type, u64 sector, u64 data, u64 bytes, u32 *len)
{
	submit(0, type, sector, data, bytes, 0);
	kick();
	u32 l;
	wait_one(&l);
	if (len)
		*len = l;
	return *slot_status(0);
}

/* ---- patterns ---- */

/* Word w (0..63) of sector s under seed: splitmix64 of a unique input.
 * guest_blk_test.go in machine/ recomputes it on the host. */
static inline u64 pat(u64 seed, u64 s, u64 w)
{
	u64 z = (seed ^ 0x5851f42d4c957f2dULL) + (s * 64 + w + 1) * 0x9e3779b97f4a7c15ULL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static void fill(u64 gpa, u64 seed, u64 sector, u64 n)
{
	u64 *p = (u64 *)gpa;
	for (u64 s = 0; s < n; s++)
		for (u64 w = 0; w < 64; w++)
			*p++ = pat(seed, sector + s, w);
}

static void check(u64 gpa, u64 seed, u64 sector, u64 n)
{
	const u64 *p = (const u64 *)gpa;
	for (u64 s = 0; s < n; s++)
		for (u64 w = 0; w < 64; w++, p++) {
			u64 e = pat(seed, sector + s, w);
			if (*p != e) {
				puts_("blk: MISMATCH sector ");
				putu(sector + s);
				puts_(" word ");
				putu(w);
				puts_(" expected ");
				puthex(e);
				puts_(" got ");
				puthex(*p);
				puts_("\n");
				guest_exit(EXIT_MISMATCH);
			}
		}
}

/* ---- verify ---- */

/* Request sizes (sectors) and segment sizes cycle through these, so that
 * chains have one or many data descriptors, odd lengths, and reads cross
 * the writes' boundaries. */
static const u32 wsizes[] = {128, 1, 7, 256, 64, 255, 8};
static const u32 rsizes[] = {256, 3, 100, 32, 129};
static const u32 seglens[] = {4096, 0, 1536, 512, 65536};

#define VERIFY_QD 8
#define VERIFY_SLOT (256 * SECTOR)

static void report_fail(const char *what, u64 sector, u8 st)
{
	puts_("blk: ");
	puts_(what);
	puts_(" at sector ");
	putu(sector);
	puts_(" failed: status ");
	putu(st);
	puts_(" (");
	puts_(status_name(st));
	puts_(")\n");
}

/* pass writes (or reads and checks) sectors [0, total). */
static void verify_pass(int write, u64 seed, u64 total)
{
	const u32 *sizes = write ? wsizes : rsizes;
	u32 nsizes = write ? sizeof(wsizes) / sizeof(wsizes[0]) : sizeof(rsizes) / sizeof(rsizes[0]);
	u64 next = 0, k = 0;
	while (next < total || vb.inflight) {
		int queued = 0;
		for (u32 i = 0; i < vb.qd && next < total; i++) {
			if (vb.slots[i].busy)
				continue;
			u64 n = sizes[k % nsizes];
			if (n > total - next)
				n = total - next;
			if (write)
				fill(vb.slots[i].data, seed, next, n);
			submit(i, write ? T_OUT : T_IN, next, vb.slots[i].data, n * SECTOR, seglens[k % 5]);
			next += n;
			k++;
			queued = 1;
		}
		if (queued)
			kick();
		u32 len;
		u32 i = wait_one(&len);
		struct slot *s = &vb.slots[i];
		u8 st = *slot_status(i);
		if (st != S_OK) {
			report_fail(write ? "write" : "read", s->sector, st);
			if (write && st == S_IOERR) {
				/* Drain, then show the device still serves reads. */
				while (vb.inflight)
					wait_one(&len);
				u8 r = sync_req(T_IN, 0, vb.slots[0].data, SECTOR, 0);
				puts_("blk: device still answers: read of sector 0 status ");
				puts_(status_name(r));
				puts_("\n");
				guest_exit(EXIT_IOERR);
			}
			guest_exit(EXIT_MISMATCH);
		}
		if (!write) {
			if (len != s->bytes + 1) {
				puts_("blk: read used length ");
				putu(len);
				puts_(", want ");
				putu(s->bytes + 1);
				puts_("\n");
				guest_exit(EXIT_MISMATCH);
			}
			check(s->data, seed, s->sector, s->bytes / SECTOR);
		}
	}
}

static void expect_status(const char *what, u8 got, u8 want)
{
	puts_("blk: ");
	puts_(what);
	puts_(": status ");
	puts_(status_name(got));
	if (got != want) {
		puts_(", want ");
		puts_(status_name(want));
		puts_("\n");
		guest_exit(EXIT_MISMATCH);
	}
	puts_(" (as expected)\n");
}

static int blk_verify(void)
{
	u64 total = vb.capacity, seed = 0xc011ec7e;
	if (argc > 2 && !parse_u64(argv[2], &total))
		die("usage: blk verify [SECTORS] [SEED]", EXIT_USAGE);
	if (argc > 3 && !parse_u64(argv[3], &seed))
		die("usage: blk verify [SECTORS] [SEED]", EXIT_USAGE);
	if (total == 0 || total > vb.capacity)
		die("SECTORS must be 1 .. the capacity", EXIT_USAGE);
	slots_setup(VERIFY_QD, VERIFY_SLOT);

	/* GET_ID: up to 20 bytes, NUL-terminated only when shorter. */
	char serial[SERIAL_LEN + 1];
	u64 idbuf = vb.slots[0].data;
	memset((void *)idbuf, 0, SERIAL_LEN);
	u32 len;
	u8 st = sync_req(T_GET_ID, 0, idbuf, SERIAL_LEN, &len);
	if (st != S_OK && st != S_UNSUPP) {
		report_fail("GET_ID", 0, st);
		guest_exit(EXIT_MISMATCH);
	}
	memcpy(serial, (void *)idbuf, SERIAL_LEN);
	serial[SERIAL_LEN] = 0;
	for (int i = 0; serial[i]; i++)
		if (serial[i] < 32 || serial[i] > 126)
			serial[i] = '?';
	puts_("blk: serial \"");
	puts_(st == S_OK ? serial : "");
	puts_(st == S_OK ? "\"\n" : "\" (GET_ID unsupported)\n");

	u64 t0 = rdtsc();
	verify_pass(1, seed, total);
	u64 t1 = rdtsc();
	if (vb.features & F_FLUSH) {
		st = sync_req(T_FLUSH, 0, 0, 0, 0);
		if (st != S_OK) {
			report_fail("FLUSH", 0, st);
			guest_exit(EXIT_MISMATCH);
		}
		puts_("blk: flushed\n");
	}
	u64 t2 = rdtsc();
	verify_pass(0, seed, total);
	u64 t3 = rdtsc();

	/* The device must refuse what it cannot do, and stay usable. */
	expect_status("read past the end", sync_req(T_IN, vb.capacity, vb.slots[0].data, SECTOR, 0), S_IOERR);
	expect_status("unknown request type", sync_req(0xff, 0, vb.slots[0].data, SECTOR, 0), S_UNSUPP);

	puts_("blk: wrote in ");
	putu((t1 - t0) * 1000 / tsc_khz);
	puts_(" us, flushed in ");
	putu((t2 - t1) * 1000 / tsc_khz);
	puts_(" us, read and checked in ");
	putu((t3 - t2) * 1000 / tsc_khz);
	puts_(" us; ");
	putu(vb.kicks);
	puts_(" notifies, ");
	putu(vb.kicks_skipped);
	puts_(" suppressed\n");
	puts_("blk: verified ");
	putu(total);
	puts_(" sectors\n");
	return 0;
}

/* ---- bench ---- */

static u64 rng = 0x2545f4914f6cdd1dULL;
static u64 xorshift(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

/* Prints v/10 with one decimal. */
static void put_tenths(u64 v)
{
	putu(v / 10);
	serial_putc('.');
	serial_putc((char)('0' + v % 10));
}

/* bench_run keeps qd requests of bs bytes in flight for secs seconds:
 * sequential over [0, span) or random bs-aligned offsets in it. */
static void bench_run(const char *name, u32 type, int random, u64 bs, u32 qd, u64 secs, u64 span)
{
	slots_setup(qd, bs);
	if (type == T_OUT)
		for (u32 i = 0; i < qd; i++)
			fill(vb.slots[i].data, 0xbe4c, i * (bs / SECTOR), bs / SECTOR);
	u64 nblocks = span / bs, next = 0, ops = 0, errors = 0;
	u64 kicks0 = vb.kicks, skipped0 = vb.kicks_skipped;
	if (nblocks == 0)
		die("bench: disk smaller than a block", EXIT_USAGE);
	u64 t0 = rdtsc(), deadline = t0 + secs * 1000 * tsc_khz;
	for (u32 i = 0; i < qd; i++) {
		u64 b = random ? xorshift() % nblocks : next++ % nblocks;
		submit(i, type, b * (bs / SECTOR), vb.slots[i].data, bs, 0);
	}
	kick();
	int running = 1;
	while (vb.inflight) {
		u32 len;
		u32 i = wait_one(&len);
		if (*slot_status(i) != S_OK)
			errors++;
		ops++;
		if (running && rdtsc() >= deadline)
			running = 0;
		if (running) {
			/* Resubmit this slot and every other one that completed
			 * meanwhile, then notify once. */
			int j;
			do {
				u64 b = random ? xorshift() % nblocks : next++ % nblocks;
				submit(i, type, b * (bs / SECTOR), vb.slots[i].data, bs, 0);
				j = reap(&len);
				if (j >= 0) {
					i = (u32)j;
					if (*slot_status(i) != S_OK)
						errors++;
					ops++;
				}
			} while (j >= 0);
			kick();
		}
	}
	u64 t1 = rdtsc();
	u64 us = (t1 - t0) * 1000 / tsc_khz;
	if (!us)
		us = 1;
	u64 bytes = ops * bs;
	puts_("blk-bench: ");
	puts_(name);
	if (bs >= (1 << 20)) {
		puts_(" MBps ");
		put_tenths((bytes >> 10) * 10000000 / us >> 10);
	} else {
		puts_(" IOPS ");
		put_tenths(ops * 10000000 / us);
	}
	puts_(" ops ");
	putu(ops);
	puts_(" us ");
	putu(us);
	puts_(" notifies ");
	putu(vb.kicks - kicks0);
	puts_(" suppressed ");
	putu(vb.kicks_skipped - skipped0);
	puts_(" errors ");
	putu(errors);
	puts_("\n");
	if (errors)
		guest_exit(type == T_OUT ? EXIT_IOERR : EXIT_MISMATCH);
}

static int blk_bench(void)
{
	u64 secs = 3, span = vb.capacity * SECTOR;
	if (argc > 2 && (!parse_u64(argv[2], &secs) || secs == 0))
		die("usage: blk bench [SECONDS] [SPAN] (SPAN like 256M: the part of the disk used)", EXIT_USAGE);
	if (argc > 3 && !parse_size(argv[3], &span))
		die("usage: blk bench [SECONDS] [SPAN] (SPAN like 256M: the part of the disk used)", EXIT_USAGE);
	if (span > vb.capacity * SECTOR)
		span = vb.capacity * SECTOR;
	puts_("blk-bench: span ");
	putu(span >> 20);
	puts_(" MiB, ");
	putu(secs);
	puts_(" s per test\n");
	bench_run("seqwrite 1M qd4", T_OUT, 0, 1 << 20, 4, secs, span);
	if (vb.features & F_FLUSH) {
		u64 t0 = rdtsc();
		u8 st = sync_req(T_FLUSH, 0, 0, 0, 0);
		puts_("blk-bench: flush after seqwrite status ");
		puts_(status_name(st));
		puts_(" in ");
		putu((rdtsc() - t0) * 1000 / tsc_khz);
		puts_(" us\n");
	}
	bench_run("seqread 1M qd4", T_IN, 0, 1 << 20, 4, secs, span);
	bench_run("randread 4K qd32", T_IN, 1, 4096, 32, secs, span);
	return 0;
}

int mode_blk(void)
{
	if (argc < 2 || !(streq(argv[1], "verify") || streq(argv[1], "bench")))
		die("usage: blk verify [SECTORS] [SEED] | blk bench [SECONDS] [SPAN]", EXIT_USAGE);
	if (!is_ram(BLK_BASE, DATA_GPA + DATA_MAX))
		die("needs RAM from 16 MiB to 25 MiB", EXIT_USAGE);
	time_init();
	blk_init();
	if (streq(argv[1], "verify"))
		return blk_verify();
	return blk_bench();
}
