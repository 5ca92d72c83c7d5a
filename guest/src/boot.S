/*
 * boot.S: PVH entry, static page tables, GDT/TSS/IDT, the switch to long
 * mode and the drop to CPL3, plus the AP (SMP) trampoline.
 *
 * Everything the CPU needs before CPL3 lives in the section .boot, which the
 * linker script places at exactly 0x100000 (BOOT_ABS). Tables whose entries
 * need bit-split addresses (page tables, IDT gates, the TSS descriptor) are
 * placed at fixed offsets with .org, so every address in them is an
 * assembler-time constant and the tables are plain static data: the CPL0
 * code never loops (under kvm-pvm every CPL0 instruction is emulated).
 *
 * Layout of .boot (offsets from 0x100000):
 *   0x0000 PML4            0x1000 PDPT         0x2000-0x5fff four PDs (4 GiB, 2 MiB pages)
 *   0x6000 heartbeat page  0x7000 IDT (256 gates)
 *   0x8000 GDT             0x8100 GDT pointer  0x8110 IDT pointer
 *   0x9000 exception stubs (256 x 16 bytes)
 *   0xa000 TSS with a full, all-zero I/O permission bitmap (up to 0xc068)
 *   0xd000 entry code
 *
 * Port I/O at CPL3: RFLAGS.IOPL=3 is set by the iretq, which is enough on
 * hardware KVM; kvm-pvm does not keep the virtual IOPL (the guest sees
 * IOPL=0 after its first exit) and emulates I/O instructions that fault at
 * CPL3 with KVM's emulator, which then consults the TSS I/O bitmap. So the
 * TSS carries a bitmap that allows every port.
 */

#define BOOT_ABS      0x100000
#define PML4_ABS      (BOOT_ABS + 0x0000)
#define PDPT_ABS      (BOOT_ABS + 0x1000)
#define PD_ABS        (BOOT_ABS + 0x2000)
#define HEARTBEAT_OFF 0x6000
#define IDT_OFF       0x7000
#define GDT_OFF       0x8000
#define GDTP_OFF      0x8100
#define IDTP_OFF      0x8110
#define STUBS_OFF     0x9000
#define TSS_OFF       0xa000
#define TSS_LIMIT     (104 + 8192)  /* header + I/O bitmap + 0xff terminator */
#define CODE_OFF      0xd000

#define SEL_KCODE64   0x08
#define SEL_KDATA     0x10
#define SEL_UDATA     0x18
#define SEL_UCODE64   0x20
#define SEL_TSS       0x28
#define SEL_KCODE32   0x38

#define PTE_2M        0x87   /* P | RW | US | PS */
#define PTE_2M_UC     0x9f   /* P | RW | US | PWT | PCD | PS */
#define PTE_TABLE     0x07   /* P | RW | US */

#define CR0_PE        0x00000001
#define CR0_MP        0x00000002
#define CR0_EM        0x00000004
#define CR0_NW        0x20000000
#define CR0_CD        0x40000000
#define CR0_PG        0x80000000
#define CR4_BITS      0x00000620   /* PAE | OSFXSR | OSXMMEXCPT */
#define MSR_EFER      0xc0000080
#define EFER_LME      0x00000100

#define RFLAGS_USER   0x00003002   /* IOPL=3, IF=0, reserved bit 1 */

/* ------------------------------------------------------------------------ */
/* Xen ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), 4-byte aligned (PT_NOTE).   */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4            /* namesz */
	.long 8            /* descsz */
	.long 18           /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.quad pvh_start32
	.balign 4

/* ------------------------------------------------------------------------ */
	.section .boot, "awx", @progbits
	.globl boot_base
boot_base:

/* Page tables: identity map of 0-4 GiB, 2 MiB pages, all user-accessible. */
	.org 0x0000
pml4:
	.quad PDPT_ABS + PTE_TABLE
	.fill 511, 8, 0

	.org 0x1000
pdpt:
	.quad PD_ABS + 0x0000 + PTE_TABLE
	.quad PD_ABS + 0x1000 + PTE_TABLE
	.quad PD_ABS + 0x2000 + PTE_TABLE
	.quad PD_ABS + 0x3000 + PTE_TABLE
	.fill 508, 8, 0

	.org 0x2000
pd:
	/* 0 .. 0xd0000000: write-back */
	.set pa, 0
	.rept 1664
	.quad pa + PTE_2M
	.set pa, pa + 0x200000
	.endr
	/* 0xd0000000 .. 4 GiB (MMIO window, LAPIC, IOAPIC): uncached */
	.rept 384
	.quad pa + PTE_2M_UC
	.set pa, pa + 0x200000
	.endr

/* Heartbeat page at 0x106000 (see README.md); written by C code. */
	.org HEARTBEAT_OFF
	.globl heartbeat
heartbeat:
	.fill 4096, 1, 0

/* IDT: 256 interrupt gates (DPL0, IST0) pointing at the fixed-size stubs. */
	.org IDT_OFF
idt:
	.set h, BOOT_ABS + STUBS_OFF
	.rept 256
	.word h & 0xffff
	.word SEL_KCODE64
	.byte 0
	.byte 0x8e
	.word (h >> 16) & 0xffff
	.long 0
	.long 0
	.set h, h + 16
	.endr

/* GDT */
	.org GDT_OFF
gdt:
	.quad 0                        /* 0x00 null */
	.quad 0x00af9a000000ffff       /* 0x08 kernel code, 64-bit */
	.quad 0x00cf92000000ffff       /* 0x10 kernel data (flat) */
	.quad 0x00cff2000000ffff       /* 0x18 user data, DPL3 */
	.quad 0x00affa000000ffff       /* 0x20 user code, 64-bit, DPL3 */
	/* 0x28 64-bit TSS descriptor (16 bytes), base BOOT_ABS+TSS_OFF */
	.word TSS_LIMIT
	.word (BOOT_ABS + TSS_OFF) & 0xffff
	.byte ((BOOT_ABS + TSS_OFF) >> 16) & 0xff
	.byte 0x89
	.byte 0x00
	.byte ((BOOT_ABS + TSS_OFF) >> 24) & 0xff
	.long 0
	.long 0
	.quad 0x00cf9a000000ffff       /* 0x38 kernel code, 32-bit (AP path) */
gdt_end:

	.org GDTP_OFF
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad BOOT_ABS + GDT_OFF

	.org IDTP_OFF
idt_ptr:
	.word 256 * 16 - 1
	.quad BOOT_ABS + IDT_OFF

/* Exception/interrupt stubs, 16 bytes each: push a dummy error code where the
 * CPU pushes none, push the vector, go to the common handler. */
	.code64
	.org STUBS_OFF
	.set v, 0
	.rept 256
	.org STUBS_OFF + v * 16
	.if (v == 8) || ((v >= 10) && (v <= 14)) || (v == 17) || (v == 21) || (v == 29) || (v == 30)
	.else
	pushq $0
	.endif
	pushq $v
	jmp isr_common
	.set v, v + 1
	.endr

/* 64-bit TSS: RSP0 and an I/O bitmap allowing all ports. */
	.org TSS_OFF
tss:
	.long 0
	.quad kstack_top               /* RSP0 */
	.quad 0, 0                     /* RSP1, RSP2 */
	.quad 0                        /* reserved */
	.quad 0, 0, 0, 0, 0, 0, 0      /* IST1-7 */
	.quad 0                        /* reserved */
	.word 0                        /* reserved */
	.word 104                      /* I/O map base: right after the header */
	.fill 8192, 1, 0               /* every port allowed */
	.byte 0xff                     /* terminator */

/* ------------------------------------------------------------------------ */
	.org CODE_OFF
isr_common:
	/* stack: vector, error, rip, cs, rflags, rsp, ss */
	movq %rsp, %rdi
	andq $-16, %rsp
	call trap_handler              /* prints, writes exit code 3, halts */
1:	cli
	hlt
	jmp 1b

/* PVH entry: 32-bit protected mode, paging off, EBX = &hvm_start_info. */
	.code32
	.globl pvh_start32
pvh_start32:
	cli
	movl %ebx, %esi                /* keep start_info in ESI */
	lgdtl BOOT_ABS + GDTP_OFF
	movl $CR4_BITS, %eax
	movl %eax, %cr4
	movl $PML4_ABS, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	movl $EFER_LME, %eax
	xorl %edx, %edx
	wrmsr
	movl %cr0, %eax
	andl $~(CR0_EM | CR0_CD | CR0_NW), %eax
	orl $(CR0_PE | CR0_MP | CR0_PG), %eax
	movl %eax, %cr0
	ljmpl $SEL_KCODE64, $bsp_start64

	.code64
bsp_start64:
	movw $SEL_KDATA, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	xorl %eax, %eax
	movw %ax, %fs
	movw %ax, %gs
	movw $SEL_TSS, %ax
	ltr %ax
	lidt BOOT_ABS + IDTP_OFF
	movq $kstack_top, %rsp
	/* iretq frame to CPL3 */
	pushq $(SEL_UDATA | 3)
	pushq $ustack_top
	pushq $RFLAGS_USER
	pushq $(SEL_UCODE64 | 3)
	pushq $user_start
	movl %esi, %edi                /* start_info (zero-extended) */
	iretq

/* AP path, reached from the real-mode trampoline in 32-bit protected mode. */
	.code32
	.globl ap_start32
ap_start32:
	movw $SEL_KDATA, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movl $CR4_BITS, %eax
	movl %eax, %cr4
	movl $PML4_ABS, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	movl $EFER_LME, %eax
	xorl %edx, %edx
	wrmsr
	movl %cr0, %eax
	andl $~(CR0_EM | CR0_CD | CR0_NW), %eax
	orl $(CR0_PE | CR0_MP | CR0_PG), %eax
	movl %eax, %cr0
	ljmpl $SEL_KCODE64, $ap_start64

	.code64
ap_start64:
	movw $SEL_KDATA, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	lidt BOOT_ABS + IDTP_OFF
	movl $1, %eax
	lock xaddl %eax, ap_count(%rip)
	andl $15, %eax
	incl %eax
	shll $10, %eax
	movq $ap_stacks, %rsp
	addq %rax, %rsp
1:	hlt
	jmp 1b

/* Real-mode trampoline: copied to AP_TRAMPOLINE (0x8000) by the C code; the
 * SIPI vector is 0x08, so it runs at CS=0x0800, IP=0. */
	.code16
	.globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
	cli
	movw %cs, %ax
	movw %ax, %ds
	lgdtl 0x20                     /* ap_tramp_gdtp, DS-relative */
	movl %cr0, %eax
	orl $CR0_PE, %eax
	movl %eax, %cr0
	ljmpl $SEL_KCODE32, $ap_start32
	.org ap_tramp_start + 0x20
ap_tramp_gdtp:
	.word gdt_end - gdt - 1
	.long BOOT_ABS + GDT_OFF
ap_tramp_end:

/* ------------------------------------------------------------------------ */
/* CPL3 entry: zero .bss, set up the FPU, call guest_main(start_info). */
	.code64
	.text
	.globl user_start
user_start:
	movq %rdi, %rbx
	cld
	movq $__bss_start, %rdi
	movq $__bss_end, %rcx
	subq %rdi, %rcx
	xorl %eax, %eax
	rep stosb
	fninit
	movq %rbx, %rdi
	call guest_main
	movl %eax, %edi
	call guest_exit
2:	pause
	jmp 2b

	.bss
	.balign 4096
	.globl ustack_top
ustack:
	.skip 65536
ustack_top:
	.balign 16
kstack:
	.skip 16384
kstack_top:
	.balign 16
	.globl ap_stacks, ap_count
ap_stacks:
	.skip 17 * 1024
	.balign 8
ap_count:
	.long 0

	.section .note.GNU-stack, "", @progbits
