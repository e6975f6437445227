// SPDX-License-Identifier: Apache-2.0
/*
 * tinyvmm test guest: the CPL0 part.
 *
 * Everything here may be instruction-emulated at about one million instructions
 * per second, so it does the minimum: GDT/TSS, IDT, page tables for RAM above
 * 4 GiB (the first 4 GiB are static, in head.S), CR3, the LAPIC, then iretq to
 * CPL3 (umain in user.c), where all checks and workloads run at native speed.
 */
#include "guest.h"

struct boot_info boot_info;
volatile int serial_wake;

struct idt_entry {
	u64 lo, hi;
};
static struct idt_entry idt[256] __attribute__((aligned(16)));

/*
 * The TSS, with an I/O permission bitmap that allows every port at CPL3: some
 * hypervisors (kvm_pvm) do not honour RFLAGS.IOPL=3 for user mode but do emulate
 * the TSS bitmap check. In .data, so that no CPL0 time is spent clearing it.
 */
struct tss {
	u32 reserved0;
	u64 rsp0, rsp1, rsp2;
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
	u8 iomap[8192];
	u8 iomap_end; /* 0xff: the bitmap must end with a byte of ones */
} __attribute__((packed));
static struct tss tss __attribute__((section(".data"), aligned(16))) = {
	.iomap_base = __builtin_offsetof(struct tss, iomap),
	.iomap_end = 0xff,
};

static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }
static inline u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC_BASE + reg); }

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

static void set_gate(int vec, void *handler, int dpl)
{
	u64 a = (u64)handler;
	idt[vec].lo = (a & 0xffff) | (0x08ULL << 16) | ((u64)(0x8e | (dpl << 5)) << 40) |
		      (((a >> 16) & 0xffff) << 48);
	idt[vec].hi = a >> 32;
}

/*
 * Page directories for RAM above 4 GiB (only when the e820 map has some).
 * Allocated right after the image; returns the new end of the guest's memory.
 */
static u64 map_high_ram(u64 alloc, u64 ram_end)
{
	u64 gib = (ram_end + (1ULL << 30) - 1) >> 30;
	if (gib > 512)
		gib = 512; /* one PDPT: 512 GiB is plenty for a test guest */
	for (u64 g = 4; g < gib; g++) {
		u64 *pd = (u64 *)alloc;
		u64 base = g << 30;
		for (u64 k = 0; k < 512; k++)
			pd[k] = (base + (k << 21)) | 0x87;
		boot_pdpt[g] = alloc | 0x7;
		alloc += PAGE_SIZE;
	}
	boot_info.mapped_end = gib << 30;
	return alloc;
}

void kmain(u64 bp, u64 tsc_entry)
{
	serial_puts("TINYVMM TESTGUEST READY\n");
	boot_info.boot_params = bp;
	boot_info.tsc_entry = tsc_entry;

	/* CR4: no SMEP/SMAP (every page is a user page), no TSD (rdtsc at CPL3). */
	u64 cr4;
	__asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
	cr4 &= ~((1ULL << 20) | (1ULL << 21) | (1ULL << 2));
	__asm__ volatile("mov %0, %%cr4" ::"r"(cr4));

	/* Highest RAM address: decides whether page tables beyond 4 GiB are needed. */
	u64 ram_end = 0;
	u32 n = bp_u8(bp, BP_E820_ENTRIES);
	if (n > E820_MAX_ENTRIES)
		n = E820_MAX_ENTRIES;
	for (u32 i = 0; i < n; i++) {
		u64 e = bp + BP_E820_TABLE + 20 * i;
		if (*(volatile u32 *)(e + 16) == E820_RAM) {
			u64 end = *(volatile u64 *)e + *(volatile u64 *)(e + 8);
			if (end > ram_end)
				ram_end = end;
		}
	}
	boot_info.max_ram_end = ram_end;
	boot_info.mapped_end = 1ULL << 32;
	u64 alloc = (u64)__image_end;
	/* Keep our page tables clear of an initrd loaded right after the image. */
	u64 rd = bp_u32(bp, BP_RAMDISK_IMAGE) | ((u64)bp_u32(bp, BP_EXT_RAMDISK_IMAGE) << 32);
	u64 rd_size = bp_u32(bp, BP_RAMDISK_SIZE) | ((u64)bp_u32(bp, BP_EXT_RAMDISK_SIZE) << 32);
	if (ram_end > (1ULL << 32)) {
		u64 need = ((ram_end >> 30) + 1) * PAGE_SIZE;
		if (rd_size && rd < alloc + need && rd + rd_size > alloc)
			alloc = (rd + rd_size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
		alloc = map_high_ram(alloc, ram_end);
	}
	boot_info.image_end = alloc;

	/* GDT with user segments and a TSS (rsp0 = our stack top). */
	u64 t = (u64)&tss;
	tss.rsp0 = (u64)kernel_stack_top;
	gdt_tss_desc[0] = (sizeof(tss) - 1) | ((t & 0xffffff) << 16) | (0x89ULL << 40) |
			  (((t >> 24) & 0xff) << 56);
	gdt_tss_desc[1] = t >> 32;
	load_gdt();

	/* Our page tables. */
	__asm__ volatile("mov %0, %%cr3" ::"r"((u64)boot_pml4) : "memory");

	/* IDT: exceptions, LAPIC timer, spurious, the sleep syscall (DPL 3). */
	for (int v = 0; v < 32; v++)
		set_gate(v, exception_stubs[v], 0);
	set_gate(VEC_TIMER, isr_timer, 0);
	set_gate(VEC_SERIAL, isr_serial, 0);
	set_gate(VEC_SPURIOUS, isr_spurious, 0);
	set_gate(VEC_SYSCALL, isr_syscall, 3);
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" ::"m"(idtr));

	/* Legacy PIC: mask everything (its reset vector base collides with exceptions). */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);

	/* LAPIC: enabled, xAPIC mode, one-shot timer on VEC_TIMER, divide by 1. */
	u64 apic_base = rdmsr(0x1b);
	if (!(apic_base & (1ULL << 10))) {
		if (!(apic_base & (1ULL << 11)))
			wrmsr(0x1b, apic_base | (1ULL << 11));
		u32 ver = lapic_read(0x30);
		if (ver != 0 && ver != 0xffffffff) {
			lapic_write(0xf0, 0x100 | VEC_SPURIOUS);
			lapic_write(0x80, 0);
			lapic_write(0x3e0, 0xb);
			/* Is the timer counting? (masked one-shot, then read the current count) */
			lapic_write(0x320, 0x10000 | VEC_TIMER);
			lapic_write(0x380, 0xffffffff);
			u32 c1 = lapic_read(0x390);
			u32 c2 = lapic_read(0x390);
			lapic_write(0x380, 0);
			lapic_write(0x320, VEC_TIMER);
			boot_info.lapic_ok = c1 != 0 && (c2 < c1 || c1 != 0xffffffff);
		}
	}

	/*
	 * The hypervisor timing leaf, read here: at CPL3 some hypervisors (kvm_pvm
	 * without CPUID faulting) run CPUID natively and show the host's leaves.
	 */
	u32 a, b, c, d;
	cpuid(0x40000000, 0, &a, &b, &c, &d);
	boot_info.hv_max_leaf = a;
	if (a >= 0x40000010 && a < 0x40010000) {
		cpuid(0x40000010, 0, &a, &b, &c, &d);
		boot_info.cpuid_tsc_khz = a;
	}

	boot_info.tsc_user = rdtsc();
	enter_user(umain, user_stack_top);
}

/* int 0x80 from CPL3. */
u64 syscall_dispatch(u64 nr, u64 arg)
{
	switch (nr) {
	case SYS_SLEEP_NS:
		if (!boot_info.lapic_ok)
			return (u64)-1;
		/* One timer shot, one hlt; the caller loops until its deadline. */
		if (!serial_wake) {
			lapic_write(0x380, arg > 0xffffffffULL ? 0xffffffffU : (arg ? (u32)arg : 1));
			__asm__ volatile("sti; hlt; cli" ::: "memory");
		}
		if (serial_wake) {
			serial_wake = 0;
			return 1;
		}
		return 0;
	case SYS_CRASH:
		crash_now();
	default:
		return (u64)-1;
	}
}

struct exc_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, err, rip, cs, rflags, rsp, ss;
};

void exception_handler(struct exc_frame *f)
{
	/*
	 * `int 0x80` from CPL3 that the hypervisor turned into #UD or #GP instead
	 * of using our DPL-3 gate (kvm_pvm does): run the syscall from here.
	 */
	if ((f->vector == 6 || f->vector == 13) && (f->cs & 3) == 3 &&
	    *(volatile u16 *)f->rip == 0x80cd) {
		f->rax = syscall_dispatch(f->rax, f->rdi);
		f->rip += 2;
		return;
	}
	u64 cr2;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	kprintf("GUEST PANIC: exception %llu rip=0x%llx err=0x%llx cr2=0x%llx cs=0x%llx rsp=0x%llx rflags=0x%llx\n",
		f->vector, f->rip, f->err, cr2, f->cs, f->rsp, f->rflags);
	debug_exit(EXIT_INTERNAL_ERROR);
}
