/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tinyvmm test guest: entry point, static page tables, GDT, interrupt stubs.
 *
 * The image is linked at 0x100000. Offset 0 is the (unsupported) 32-bit entry;
 * the 64-bit entry of the Linux boot protocol is at offset 0x200, exactly where
 * a bzImage's protected-mode payload has its startup_64.
 */
	.code64

	.section .head.text, "ax"
	.globl startup_32
startup_32:
	/* 32-bit boot protocol entry: not supported. ud2 encodes the same in both modes. */
1:	ud2
	hlt
	jmp 1b

	.org 0x200, 0xcc
	.globl startup_64
startup_64:
	cli
	cld
	mov %rsi, %r12			/* boot_params */
	rdtsc
	shl $32, %rdx
	or %rax, %rdx
	mov %rdx, %r13			/* TSC at entry */
	lea kernel_stack_top(%rip), %rsp
	/* Zero .bss (small: the stacks live in .stack, which is not cleared). */
	lea __bss_start(%rip), %rdi
	lea __bss_end(%rip), %rcx
	sub %rdi, %rcx
	shr $3, %rcx
	xor %eax, %eax
	rep stosq
	mov %r12, %rdi
	mov %r13, %rsi
	call kmain
2:	hlt
	jmp 2b

	.text

/* void load_gdt(void): our GDT, CS=0x08 via lretq, data segments, TSS. */
	.globl load_gdt
load_gdt:
	lgdt gdt_ptr(%rip)
	pushq $0x08
	lea 1f(%rip), %rax
	push %rax
	lretq
1:	mov $0x10, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	xor %eax, %eax
	mov %eax, %fs
	mov %eax, %gs
	mov $0x28, %eax
	ltr %ax
	ret

/* void enter_user(void (*entry)(void), void *stack): iretq to CPL3, IOPL=3, IF=0. */
	.globl enter_user
enter_user:
	mov $0x1b, %eax
	mov %eax, %ds
	mov %eax, %es
	pushq $0x1b			/* SS: user data */
	push %rsi			/* RSP */
	pushq $0x3002			/* RFLAGS: IOPL=3, IF=0 */
	pushq $0x23			/* CS: user code */
	push %rdi			/* RIP */
	xor %eax, %eax
	xor %ebx, %ebx
	xor %ecx, %ecx
	xor %edx, %edx
	xor %esi, %esi
	xor %edi, %edi
	xor %ebp, %ebp
	iretq

/* void crash_now(void): zero-limit IDT, then ud2 -> #UD -> #GP -> #DF -> triple fault. */
	.globl crash_now
crash_now:
	lidt null_idt_ptr(%rip)
	ud2
1:	hlt
	jmp 1b

/*
 * Exception stubs: push a zero error code where the CPU pushes none, then the
 * vector, then all general registers; call exception_handler(frame).
 */
.macro EXC_NOERR vec
exc_stub_\vec:
	pushq $0
	pushq $\vec
	jmp exc_common
.endm
.macro EXC_ERR vec
exc_stub_\vec:
	pushq $\vec
	jmp exc_common
.endm

	EXC_NOERR 0
	EXC_NOERR 1
	EXC_NOERR 2
	EXC_NOERR 3
	EXC_NOERR 4
	EXC_NOERR 5
	EXC_NOERR 6
	EXC_NOERR 7
	EXC_ERR 8
	EXC_NOERR 9
	EXC_ERR 10
	EXC_ERR 11
	EXC_ERR 12
	EXC_ERR 13
	EXC_ERR 14
	EXC_NOERR 15
	EXC_NOERR 16
	EXC_ERR 17
	EXC_NOERR 18
	EXC_NOERR 19
	EXC_NOERR 20
	EXC_ERR 21
	EXC_NOERR 22
	EXC_NOERR 23
	EXC_NOERR 24
	EXC_NOERR 25
	EXC_NOERR 26
	EXC_NOERR 27
	EXC_NOERR 28
	EXC_ERR 29
	EXC_ERR 30
	EXC_NOERR 31

exc_common:
	push %rax
	push %rbx
	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %rbp
	push %r8
	push %r9
	push %r10
	push %r11
	push %r12
	push %r13
	push %r14
	push %r15
	mov %rsp, %rdi
	mov %rsp, %rbx
	and $-16, %rsp
	call exception_handler		/* returns only if it handled the event */
	mov %rbx, %rsp
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rbp
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	pop %rbx
	pop %rax
	add $16, %rsp			/* vector, error code */
	iretq

/* LAPIC timer: EOI and return. Kept to a handful of instructions (CPL0 is emulated). */
	.globl isr_timer
isr_timer:
	push %rax
	mov $0xfee000b0, %eax
	movl $0, (%rax)
	pop %rax
	iretq

/* UART (IOAPIC pin 4): note it for the sleep syscall, EOI, return. */
	.globl isr_serial
isr_serial:
	push %rax
	movl $1, serial_wake(%rip)
	mov $0xfee000b0, %eax
	movl $0, (%rax)
	pop %rax
	iretq

/* LAPIC spurious vector: no EOI. */
	.globl isr_spurious
isr_spurious:
	iretq

/* int 0x80 (DPL 3): rax = number, rdi = argument; result in rax. */
	.globl isr_syscall
isr_syscall:
	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %r8
	push %r9
	push %r10
	push %r11
	sub $8, %rsp
	mov %rdi, %rsi
	mov %rax, %rdi
	call syscall_dispatch
	add $8, %rsp
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	iretq

	.section .rodata
	.balign 8
	.globl exception_stubs
exception_stubs:
	.irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad exc_stub_\vec
	.endr

	.section .data
	.balign 16
	.globl gdt
gdt:
	.quad 0				/* 0x00 null */
	.quad 0x00af9a000000ffff	/* 0x08 kernel code, 64-bit */
	.quad 0x00cf92000000ffff	/* 0x10 kernel data */
	.quad 0x00cff2000000ffff	/* 0x18 user data (selector 0x1b) */
	.quad 0x00affa000000ffff	/* 0x20 user code, 64-bit (selector 0x23) */
	.globl gdt_tss_desc
gdt_tss_desc:
	.quad 0, 0			/* 0x28 TSS, filled in by kmain */
gdt_end:

	.balign 16
	.word 0, 0, 0
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt

	.balign 16
	.word 0, 0, 0
null_idt_ptr:
	.word 0
	.quad 0

/*
 * Static page tables: identity map of the first 4 GiB, all pages user-accessible.
 * [0, 2 MiB) uses 4 KiB pages with page 0 not present (catches null pointers);
 * the rest uses 2 MiB pages; [3 GiB, 4 GiB) (the MMIO gap: IOAPIC, LAPIC) is
 * uncached. kmain adds page directories for RAM above 4 GiB at run time.
 */
	.section .data.pagetables, "aw"
	.balign 4096
	.globl boot_pml4
boot_pml4:
	.quad boot_pdpt + 0x7
	.fill 511, 8, 0
	.globl boot_pdpt
boot_pdpt:
	.quad boot_pd0 + 0x7
	.quad boot_pd1 + 0x7
	.quad boot_pd2 + 0x7
	.quad boot_pd3 + 0x7
	.fill 508, 8, 0
boot_pd0:
	.quad boot_pt0 + 0x7
	.set addr, 0x200000
	.rept 511
	.quad addr + 0x87
	.set addr, addr + 0x200000
	.endr
boot_pd1:
	.set addr, 0x40000000
	.rept 512
	.quad addr + 0x87
	.set addr, addr + 0x200000
	.endr
boot_pd2:
	.set addr, 0x80000000
	.rept 512
	.quad addr + 0x87
	.set addr, addr + 0x200000
	.endr
boot_pd3:
	.set addr, 0xc0000000
	.rept 512
	.quad addr + 0x9f		/* PCD | PWT */
	.set addr, addr + 0x200000
	.endr
boot_pt0:
	.quad 0
	.set addr, 0x1000
	.rept 511
	.quad addr + 0x7
	.set addr, addr + 0x1000
	.endr

/* Stacks: not part of .bss so that startup_64 does not spend time clearing them. */
	.section .stack, "aw", @nobits
	.balign 4096
	.space 16384
	.globl kernel_stack_top
kernel_stack_top:
	.space 65536
	.globl user_stack_top
user_stack_top:

	.section .note.GNU-stack, "", @progbits
