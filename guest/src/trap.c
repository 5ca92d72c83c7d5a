/*
 * trap.c: the one C function that runs at CPL0. Every IDT vector lands here
 * (through the stubs in boot.S); it prints what happened on COM1 and exits
 * through the debug-exit port with code 3. Compiled with
 * -mgeneral-regs-only: under kvm-pvm this code is emulated.
 */
#include "guest.h"

struct trap_frame {
	u64 vector, error, rip, cs, rflags, rsp, ss;
};

static void tputs(const char *s)
{
	while (*s)
		serial_putc(*s++);
}

static void thex(u64 v)
{
	tputs("0x");
	for (int i = 60; i >= 0; i -= 4)
		serial_putc("0123456789abcdef"[(v >> i) & 15]);
}

void trap_handler(struct trap_frame *f);

void trap_handler(struct trap_frame *f)
{
	u64 cr2;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	/* A UART left in loopback or with DLAB set (hostile mode) would
	 * swallow the report: 8N1, no loopback first. */
	outb(COM1 + 3, 0x03);
	outb(COM1 + 4, 0x03);
	tputs("\ncollective-guest: EXCEPTION vector ");
	thex(f->vector);
	tputs(" error ");
	thex(f->error);
	tputs(" rip ");
	thex(f->rip);
	tputs(" cs ");
	thex(f->cs);
	tputs(" rflags ");
	thex(f->rflags);
	tputs(" rsp ");
	thex(f->rsp);
	tputs(" cr2 ");
	thex(cr2);
	tputs("\n");
	outl(EXIT_PORT, 3);
	for (;;)
		__asm__ volatile("cli; hlt");
}
