/*
 * main.c: the CPL3 part of the Collective workload guest. Entered from
 * boot.S (user_start) with IOPL=3 and IF=0; everything here runs at native
 * speed under kvm-pvm. Modes are chosen by the first word of the PVH command
 * line: hello, spin, dirty, exits, smp, fault, echo, rtc, blk (virtio_blk.c).
 */
#include "guest.h"

/* ---- PVH start info (xen/include/public/arch-x86/hvm/start_info.h) ---- */

#define HVM_START_MAGIC 0x336ec578

struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr;
	u32 memmap_entries;
	u32 reserved;
};

struct hvm_memmap_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
};

#define CMDLINE_MAX 4096
#define MEMMAP_MAX 128

static char cmdline[CMDLINE_MAX];
static struct hvm_memmap_entry memmap[MEMMAP_MAX];
static u32 memmap_n;
char *argv[MAX_ARGS];
int argc;

extern u8 ap_tramp_start[], ap_tramp_end[];
extern volatile u32 ap_count;

/* ---- freestanding helpers (gcc may emit calls to these) ---- */

void *memset(void *d, int c, unsigned long n);
void *memcpy(void *d, const void *s, unsigned long n);
void *memmove(void *d, const void *s, unsigned long n);
int memcmp(const void *a, const void *b, unsigned long n);

void *memset(void *d, int c, unsigned long n)
{
	void *r = d;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return r;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
	void *r = d;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
	return r;
}

void *memmove(void *d, const void *s, unsigned long n)
{
	u8 *dp = d;
	const u8 *sp = s;
	if (dp <= sp || dp >= sp + n)
		return memcpy(d, s, n);
	while (n--)
		dp[n] = sp[n];
	return d;
}

int memcmp(const void *a, const void *b, unsigned long n)
{
	const u8 *x = a, *y = b;
	for (unsigned long i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

int streq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

/* ---- output ---- */

void puts_(const char *s)
{
	while (*s) {
		if (*s == '\n')
			serial_putc('\r');
		serial_putc(*s++);
	}
}

void putu(u64 v)
{
	char b[24];
	int i = 0;
	do {
		b[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i--)
		serial_putc(b[i]);
}

void puthex(u64 v)
{
	puts_("0x");
	int started = 0;
	for (int i = 60; i >= 0; i -= 4) {
		int d = (v >> i) & 15;
		if (d || started || i == 0) {
			serial_putc("0123456789abcdef"[d]);
			started = 1;
		}
	}
}

void guest_exit(int code);

void guest_exit(int code)
{
	outl(EXIT_PORT, (u32)code);
	/* No debug-exit device: nothing else to do at CPL3 but spin. */
	for (;;)
		cpu_relax();
}

static void fail(const char *msg, int code)
{
	puts_("collective-guest: ");
	puts_(msg);
	puts_("\n");
	guest_exit(code);
}

/* ---- heartbeat (fixed GPA 0x106000, see README.md) ---- */

struct heartbeat {
	u64 magic;   /* "CLVHBEAT" */
	u64 counter; /* monotonic, +1 per update */
	u64 tsc;     /* rdtsc at the update */
	u64 pass;    /* dirty: verified full passes */
	u64 tsc_khz;
	u64 mode;    /* 1 = dirty, 2 = spin */
};

#define HB ((volatile struct heartbeat *)HEARTBEAT_GPA)
#define HB_MAGIC 0x5441454248564c43ULL /* "CLVHBEAT" little-endian */

static void heartbeat_update(u64 pass)
{
	HB->tsc = rdtsc();
	HB->pass = pass;
	barrier();
	HB->counter = HB->counter + 1;
}

/* Mask both 8259 PICs: under kvm-pvm, CPL3 code runs with interrupts
 * effectively enabled, and firmware (SeaBIOS under -M pc) may have left the
 * PIT interrupt unmasked. */
static void pic_mask(void)
{
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
}

/* ---- time ---- */

u64 tsc_khz;

static void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* Calibrate against PIT channel 0: program mode 2 with the full 65536
 * count and follow the latched counter for ~20 ms (no dependency on port
 * 0x61, which QEMU microvm lacks). Interrupts from the PIT stay masked in
 * the PIC (see pic_mask). Returns 0 if there is no working PIT. */
static u16 pit_read0(void)
{
	outb(0x43, 0x00); /* latch channel 0 */
	u8 lo = inb(0x40);
	u8 hi = inb(0x40);
	return (u16)(lo | (hi << 8));
}

static u64 pit_calibrate(void)
{
	const u64 want = 1193182 / 50; /* 20 ms of PIT ticks */
	outb(0x43, 0x34);              /* channel 0, lo/hi byte, mode 2, binary */
	outb(0x40, 0);
	outb(0x40, 0);
	u16 prev = pit_read0();
	u64 t0 = rdtsc(), ticks = 0;
	int still = 0;
	while (ticks < want) {
		u16 cur = pit_read0();
		u16 d = (u16)(prev - cur); /* counts down, wraps at 65536 */
		prev = cur;
		if (d == 0) {
			if (++still > 1000)
				return 0; /* counter does not move: no PIT */
			continue;
		}
		still = 0;
		ticks += d;
	}
	u64 t1 = rdtsc();
	u64 khz = (t1 - t0) * 1193182 / ticks / 1000;
	if (khz < 100000 || khz > 20000000) /* outside 100 MHz .. 20 GHz */
		return 0;
	return khz;
}

void time_init(void)
{
	u32 a, b, c, d;
	const char *src;
	cpuid(0x40000100, &a, &b, &c, &d);
	if (b == 0x6c6c6f43 && c == 0x69746365 && d == 0x4d566576) {
		/* "Coll" "ecti" "veVM" (EAX, the highest leaf, is not checked) */
		cpuid(0x40000101, &a, &b, &c, &d);
		tsc_khz = a;
		src = "cpuid 0x40000101";
	} else {
		tsc_khz = pit_calibrate();
		src = "pit";
	}
	if (!tsc_khz) {
		cpuid(0, &a, &b, &c, &d);
		if (a >= 0x16) {
			cpuid(0x16, &a, &b, &c, &d);
			tsc_khz = (u64)(a & 0xffff) * 1000;
			src = "cpuid 0x16";
		}
	}
	if (!tsc_khz) {
		tsc_khz = 2000000;
		src = "guess";
	}
	HB->tsc_khz = tsc_khz;
	puts_("collective-guest: tsc ");
	putu(tsc_khz);
	puts_(" kHz (");
	puts_(src);
	puts_(")\n");
}

static u64 cycles_to_ns(u64 c) { return c * 1000000 / tsc_khz; }
static u64 ms_to_cycles(u64 ms) { return ms * tsc_khz; }

static void delay_us(u64 us)
{
	u64 end = rdtsc() + us * tsc_khz / 1000;
	while (rdtsc() < end)
		cpu_relax();
}

/* ---- argument parsing ---- */

int parse_u64(const char *s, u64 *out)
{
	u64 v = 0;
	if (!*s)
		return 0;
	for (; *s >= '0' && *s <= '9'; s++)
		v = v * 10 + (u64)(*s - '0');
	if (*s)
		return 0;
	*out = v;
	return 1;
}

/* SIZE: decimal with optional K, M or G suffix (powers of two). */
int parse_size(const char *s, u64 *out)
{
	u64 v = 0;
	int digits = 0;
	for (; *s >= '0' && *s <= '9'; s++, digits++)
		v = v * 10 + (u64)(*s - '0');
	if (!digits)
		return 0;
	switch (*s) {
	case 0:
		break;
	case 'k': case 'K': v <<= 10; s++; break;
	case 'm': case 'M': v <<= 20; s++; break;
	case 'g': case 'G': v <<= 30; s++; break;
	default: return 0;
	}
	if (*s == 'B' || *s == 'b')
		s++;
	if (*s)
		return 0;
	*out = v;
	return 1;
}

/* Split the command line into words; words with '=' (kernel-style
 * parameters a VMM may append) are ignored. */
static void split_cmdline(void)
{
	char *p = cmdline;
	while (*p && argc < MAX_ARGS) {
		while (*p == ' ' || *p == '\t' || *p == '\n')
			*p++ = 0;
		if (!*p)
			break;
		char *w = p;
		int has_eq = 0;
		while (*p && *p != ' ' && *p != '\t' && *p != '\n') {
			if (*p == '=')
				has_eq = 1;
			p++;
		}
		if (*p)
			*p++ = 0;
		if (!has_eq)
			argv[argc++] = w;
	}
}

/* ---- modes ---- */

static int mode_hello(void)
{
	puts_("collective-guest: hello\n");
	return 0;
}

/* spin [gaps]: with gaps, the TSC is calibrated and every pause of the
 * loop longer than 500 us (the vCPU not running: a migration's downtime,
 * or the host preempting it) is printed as "spin: gap N us", N measured
 * by the guest itself. A migration target's first such line is the
 * migration's downtime as the guest saw it, under any VMM. */
static int mode_spin(void)
{
	int gaps = argc > 1 && streq(argv[1], "gaps");
	if (gaps)
		time_init();
	HB->mode = 2;
	puts_("spin: looping at CPL3\n");
	u64 limit = gaps ? 500 * tsc_khz / 1000 : ~0ULL;
	u64 last = rdtsc();
	for (;;) {
		heartbeat_update(0);
		u64 now = HB->tsc;
		if (now - last > limit) {
			puts_("spin: gap ");
			putu((now - last) * 1000 / tsc_khz);
			puts_(" us\n");
			now = rdtsc();
		}
		last = now;
		for (int i = 0; i < 1000; i++)
			cpu_relax();
	}
	return 0;
}

static int mode_exits(void)
{
	u64 n = 1000;
	int mmio = 0;
	if (argc > 1 && !parse_u64(argv[1], &n))
		fail("exits: bad count (usage: exits N [port|mmio])", 2);
	if (argc > 2) {
		if (streq(argv[2], "mmio"))
			mmio = 1;
		else if (!streq(argv[2], "port"))
			fail("exits: kind must be port or mmio", 2);
	}
	time_init();
	volatile u32 *m = (volatile u32 *)EXITS_MMIO;
	u64 t0 = rdtsc();
	if (mmio) {
		for (u64 i = 0; i < n; i++)
			*m = (u32)i;
	} else {
		for (u64 i = 0; i < n; i++)
			outb(EXITS_PORT, (u8)i);
	}
	u64 t1 = rdtsc();
	u64 ns = cycles_to_ns(t1 - t0);
	puts_("exits: ");
	putu(n);
	puts_(mmio ? " mmio writes in " : " port writes in ");
	putu(ns);
	puts_(" ns, ");
	putu(n ? ns / n : 0);
	puts_(" ns/exit\n");
	return 0;
}

/* ---- dirty ---- */

#define PAGE 4096ULL
#define WORDS (PAGE / 8)
#define GEN_MIX 0x9e3779b97f4a7c15ULL

static inline u64 pattern(u64 gpa, u64 word, u32 gen)
{
	return (gpa + word * 8) ^ ((u64)gen * GEN_MIX) ^ 0x5a5a000000000000ULL;
}

/* Fill page i with generation gen; returns the sum of the words written. */
static u64 fill_page(u64 gpa, u32 gen)
{
	volatile u64 *p = (volatile u64 *)gpa;
	u64 sum = 0;
	for (u64 j = 0; j < WORDS; j++) {
		u64 w = pattern(gpa, j, gen);
		p[j] = w;
		sum += w;
	}
	return sum;
}

static void mismatch(u64 gpa, u64 pass, const char *what, u64 exp, u64 got)
{
	puts_("dirty: MISMATCH page GPA ");
	puthex(gpa);
	puts_(" pass ");
	putu(pass);
	puts_(" ");
	puts_(what);
	puts_(" expected ");
	puthex(exp);
	puts_(" got ");
	puthex(got);
	puts_("\n");
	guest_exit(1);
}

/* Check page contents against generation gen; returns the sum of words. */
static u64 check_page(u64 gpa, u32 gen, u64 pass)
{
	const volatile u64 *p = (const volatile u64 *)gpa;
	u64 sum = 0;
	for (u64 j = 0; j < WORDS; j++) {
		u64 w = p[j];
		u64 e = pattern(gpa, j, gen);
		if (w != e)
			mismatch(gpa, pass, "word", e, w);
		sum += w;
	}
	return sum;
}

/* Is [lo, hi) RAM according to the memmap? */
int is_ram(u64 lo, u64 hi)
{
	if (!memmap_n)
		return 1; /* no map (start_info v0): trust the user */
	u64 cur = lo;
	for (int again = 1; again && cur < hi;) {
		again = 0;
		for (u32 i = 0; i < memmap_n; i++) {
			struct hvm_memmap_entry *e = &memmap[i];
			if (e->type == 1 && e->addr <= cur && cur < e->addr + e->size) {
				cur = e->addr + e->size;
				again = 1;
			}
		}
	}
	return cur >= hi;
}

/* Prints bytes/cycles as MB/s (MB = 2^20 bytes). */
static void print_rate(u64 bytes, u64 cycles)
{
	u64 us = cycles * 1000 / tsc_khz;
	if (!us)
		us = 1;
	putu((bytes >> 10) * 1000000 / us >> 10);
	puts_(" MB/s");
}

static int mode_dirty(void)
{
	u64 size, rate = 0, secs = 0;
	if (argc < 2 || !parse_size(argv[1], &size) || size < PAGE)
		fail("dirty: usage: dirty SIZE RATE [SECONDS] (SIZE like 64M, RATE in MB/s)", 2);
	if (argc > 2 && !parse_u64(argv[2], &rate))
		fail("dirty: bad RATE", 2);
	if (argc > 3 && !parse_u64(argv[3], &secs))
		fail("dirty: bad SECONDS", 2);
	u64 npages = size / PAGE;
	u64 genbytes = (npages * 4 + PAGE - 1) & ~(PAGE - 1);
	u64 gens_gpa = DIRTY_BASE;
	u64 area = DIRTY_BASE + genbytes;
	u64 end = area + npages * PAGE;
	if (end > 0x100000000ULL || !is_ram(DIRTY_BASE, end))
		fail("dirty: area does not fit in RAM below 4 GiB (starts at 16 MiB)", 2);
	time_init();
	volatile u32 *gen = (volatile u32 *)gens_gpa;
	memset((void *)gens_gpa, 0, genbytes);
	HB->mode = 1;

	puts_("dirty: ");
	putu(npages);
	puts_(" pages at ");
	puthex(area);
	puts_(", generations at ");
	puthex(gens_gpa);
	puts_(", rate ");
	if (rate) {
		putu(rate);
		puts_(" MB/s");
	} else {
		puts_("max");
	}
	puts_(", ");
	putu(secs);
	puts_(" s\n");

	/* Throttle: cycles per page * 1024 = khz*1000*4096*1024 / (rate*2^20). */
	u64 cpp1024 = rate ? tsc_khz * 4000 / rate : 0;
	u64 start = rdtsc();
	u64 deadline = secs ? start + secs * 1000 * tsc_khz : 0;
	u64 last_print = 0;
	u64 pass = 0;
	for (;;) {
		pass++;
		u64 sum = 0, t0 = rdtsc();
		for (u64 i = 0; i < npages; i++) {
			if (rate) {
				u64 target = t0 + i * cpp1024 / 1024;
				while (rdtsc() < target)
					cpu_relax();
			}
			u32 g = gen[i];
			if (g != (u32)(pass - 1))
				mismatch(area + i * PAGE, pass, "generation", pass - 1, g);
			gen[i] = (u32)pass;
			sum += fill_page(area + i * PAGE, (u32)pass);
			if (deadline && rdtsc() >= deadline) {
				/* Final check: pages < i+1 hold pass, the rest pass-1. */
				u64 psum = 0;
				for (u64 k = 0; k < npages; k++) {
					u32 want = k <= i ? (u32)pass : (u32)(pass - 1);
					if (gen[k] != want)
						mismatch(area + k * PAGE, pass, "generation", want, gen[k]);
					if (want == 0)
						continue;
					u64 s = check_page(area + k * PAGE, want, pass);
					if (k <= i)
						psum += s;
				}
				if (psum != sum)
					mismatch(area, pass, "checksum", sum, psum);
				heartbeat_update(pass - 1);
				puts_("dirty: final verified after ");
				putu(secs);
				puts_(" s: ");
				putu(pass - 1);
				puts_(" full passes + ");
				putu(i + 1);
				puts_(" pages, ");
				print_rate((pass - 1) * npages * PAGE + (i + 1) * PAGE, rdtsc() - start);
				puts_(" overall\n");
				return 0;
			}
		}
		u64 t1 = rdtsc();
		u64 vsum = 0;
		for (u64 i = 0; i < npages; i++) {
			if (gen[i] != (u32)pass)
				mismatch(area + i * PAGE, pass, "generation", pass, gen[i]);
			vsum += check_page(area + i * PAGE, (u32)pass, pass);
		}
		if (vsum != sum)
			mismatch(area, pass, "checksum", sum, vsum);
		heartbeat_update(pass);
		u64 now = rdtsc();
		if (pass == 1 || now - last_print >= ms_to_cycles(1000)) {
			last_print = now;
			puts_("dirty: pass ");
			putu(pass);
			puts_(" verified, ");
			print_rate(npages * PAGE, t1 - t0);
			puts_(", checksum ");
			puthex(sum);
			puts_("\n");
		}
	}
}

/* ---- smp ---- */

#define LAPIC_ID 0x20
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310

static inline u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC_BASE + reg); }
static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }

static void lapic_ipi(u32 apic_id, u32 lo)
{
	lapic_write(LAPIC_ICR_HI, apic_id << 24);
	lapic_write(LAPIC_ICR_LO, lo);
	for (int i = 0; i < 100000 && (lapic_read(LAPIC_ICR_LO) & (1 << 12)); i++)
		cpu_relax();
}

static int mode_smp(void)
{
	u64 n = 8;
	if (argc > 1 && (!parse_u64(argv[1], &n) || n < 1 || n > 16))
		fail("smp: usage: smp [N] (1 <= N <= 16 cpus)", 2);
	time_init();
	u64 tsz = (u64)(ap_tramp_end - ap_tramp_start);
	memcpy((void *)AP_TRAMPOLINE, ap_tramp_start, tsz);
	u32 self = lapic_read(LAPIC_ID) >> 24;
	u32 tried = 0;
	for (u32 id = 0; tried < n - 1 && id < 16; id++) {
		if (id == self)
			continue;
		lapic_ipi(id, 0x4500); /* INIT, assert */
		tried++;
	}
	delay_us(10000);
	for (int round = 0; round < 2; round++) {
		tried = 0;
		for (u32 id = 0; tried < n - 1 && id < 16; id++) {
			if (id == self)
				continue;
			lapic_ipi(id, 0x4600 | (AP_TRAMPOLINE >> 12)); /* SIPI */
			tried++;
		}
		delay_us(200);
	}
	/* Wait until all answered, or 200 ms pass without a new arrival. */
	u64 start = rdtsc(), last = start;
	u32 seen = ap_count;
	while (seen < tried) {
		u64 now = rdtsc();
		if (now - last > ms_to_cycles(200) || now - start > ms_to_cycles(3000))
			break;
		u32 c = ap_count;
		if (c != seen) {
			seen = c;
			last = now;
		}
		cpu_relax();
	}
	seen = ap_count;
	puts_("smp: ");
	putu(seen + 1);
	puts_(" cpus up (tried ");
	putu(tried + 1);
	puts_(", ");
	putu(cycles_to_ns(rdtsc() - start) / 1000);
	puts_(" us after SIPI)\n");
	return 0;
}

/* fault: touch an unmapped address (above the 4 GiB identity map), so the
 * #PF handler at CPL0 reports vector 0xe and exits with code 3. Tests that
 * exception delivery works. */
static int mode_fault(void)
{
	puts_("fault: reading 0x100000000 (unmapped)\n");
	volatile u64 *p = (volatile u64 *)0x100000000ULL;
	(void)*p;
	puts_("fault: no fault taken\n");
	return 1;
}

/* ---- echo: serial input ---- */

/* echo reads lines from COM1 and prints each back as "echo: LINE"; the line
 * "quit" ends it with exit code 0. It tests host input to the serial port.
 * RTS and IER bit 0 tell the UART we listen (Collective's UART only takes
 * host input then); OUT2 stays clear so no interrupt reaches the masked PIC. */
static int mode_echo(void)
{
	char line[128];
	int n = 0;
	outb(COM1 + 2, 0x07); /* FCR: enable and reset the FIFOs */
	outb(COM1 + 4, 0x03); /* MCR: DTR and RTS, the port is open (OUT2 clear) */
	outb(COM1 + 1, 0x01); /* IER: received data available (after the reset) */
	puts_("echo: ready\n");
	for (;;) {
		while (!(inb(COM1 + 5) & 0x01))
			cpu_relax();
		char c = (char)inb(COM1);
		if (c == '\r' || c == '\n') {
			line[n] = 0;
			if (n == 0)
				continue;
			if (streq(line, "quit")) {
				puts_("echo: bye\n");
				return 0;
			}
			puts_("echo: ");
			puts_(line);
			puts_("\n");
			n = 0;
		} else if (n < (int)sizeof(line) - 1) {
			line[n++] = c;
		}
	}
}

/* ---- rtc: the CMOS clock ---- */

static u8 cmos(u8 reg)
{
	outb(0x70, reg);
	return inb(0x71);
}

static void put2(u32 v)
{
	serial_putc((char)('0' + v / 10 % 10));
	serial_putc((char)('0' + v % 10));
}

/* rtc prints the CMOS date and time as "rtc: YYYY-MM-DD HH:MM:SS", read
 * the way Linux reads it: wait for UIP to clear, then read the registers,
 * decoding BCD unless register B says binary. */
static int mode_rtc(void)
{
	for (int i = 0; i < 1000000 && (cmos(0x0a) & 0x80); i++)
		cpu_relax();
	u8 r[7] = {cmos(0x00), cmos(0x02), cmos(0x04), cmos(0x07), cmos(0x08), cmos(0x09), cmos(0x32)};
	u8 b = cmos(0x0b);
	for (int i = 0; i < 7; i++)
		if (!(b & 0x04))
			r[i] = (u8)((r[i] >> 4) * 10 + (r[i] & 15));
	puts_("rtc: ");
	put2(r[6]);
	put2(r[5]);
	serial_putc('-');
	put2(r[4]);
	serial_putc('-');
	put2(r[3]);
	serial_putc(' ');
	put2(r[2]);
	serial_putc(':');
	put2(r[1]);
	serial_putc(':');
	put2(r[0]);
	puts_("\n");
	return 0;
}

/* ---- entry ---- */

int guest_main(struct hvm_start_info *si);

int guest_main(struct hvm_start_info *si)
{
	/* Copy what we need out of start_info first: memory below 1 MiB
	 * (the AP trampoline) is reused later. */
	if (si && si->magic == HVM_START_MAGIC) {
		if (si->cmdline_paddr) {
			const char *c = (const char *)si->cmdline_paddr;
			for (int i = 0; i < CMDLINE_MAX - 1 && c[i]; i++)
				cmdline[i] = c[i];
		}
		if (si->version >= 1 && si->memmap_paddr) {
			memmap_n = si->memmap_entries < MEMMAP_MAX ? si->memmap_entries : MEMMAP_MAX;
			memcpy(memmap, (void *)si->memmap_paddr, memmap_n * sizeof(memmap[0]));
		}
	} else {
		fail("bad hvm_start_info magic", 2);
	}
	HB->magic = HB_MAGIC;
	pic_mask();
	split_cmdline();
	if (argc == 0)
		fail("no mode on the command line (hello, spin, dirty, exits, smp, fault, echo, rtc, blk, hostile)", 2);
	const char *m = argv[0];
	if (streq(m, "hello"))
		return mode_hello();
	if (streq(m, "spin"))
		return mode_spin();
	if (streq(m, "exits"))
		return mode_exits();
	if (streq(m, "dirty"))
		return mode_dirty();
	if (streq(m, "smp"))
		return mode_smp();
	if (streq(m, "fault"))
		return mode_fault();
	if (streq(m, "echo"))
		return mode_echo();
	if (streq(m, "rtc"))
		return mode_rtc();
	if (streq(m, "blk"))
		return mode_blk();
	if (streq(m, "hostile"))
		return mode_hostile();
	puts_("collective-guest: unknown mode ");
	puts_(m);
	puts_(" (hello, spin, dirty, exits, smp, fault, echo, rtc, blk, hostile)\n");
	return 2;
}
