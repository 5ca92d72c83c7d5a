/* guest.h: shared definitions for the Collective workload guest. */
#ifndef COLLECTIVE_GUEST_H
#define COLLECTIVE_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define COM1            0x3f8
#define EXIT_PORT       0xf4        /* 32-bit write: exit with that code */
#define EXITS_PORT      0xf0        /* "exits port" benchmark target */
#define EXITS_MMIO      0xd0000000ULL
#define LAPIC_BASE      0xfee00000ULL
#define AP_TRAMPOLINE   0x8000
#define HEARTBEAT_GPA   0x106000
#define DIRTY_BASE      0x1000000ULL /* 16 MiB */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static inline void serial_putc(char c)
{
	/* Wait for THRE (LSR bit 5); bounded so a missing UART cannot hang us. */
	for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
		;
	outb(COM1, (u8)c);
}

/* ---- main.c services other files use ---- */
#define MAX_ARGS 16
extern char *argv[MAX_ARGS];
extern int argc;
extern u64 tsc_khz;                 /* set by time_init */
void *memset(void *d, int c, unsigned long n);
void *memcpy(void *d, const void *s, unsigned long n);
int streq(const char *a, const char *b);
void puts_(const char *s);          /* '\n' becomes "\r\n" */
void putu(u64 v);
void puthex(u64 v);
void guest_exit(int code);
void time_init(void);
int parse_u64(const char *s, u64 *out);
int parse_size(const char *s, u64 *out);
int is_ram(u64 lo, u64 hi);         /* [lo, hi) is RAM in the PVH memmap */

/* ---- modes in other files ---- */
int mode_blk(void);                 /* virtio_blk.c */
int mode_hostile(void);             /* hostile.c */

#endif
