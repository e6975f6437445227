/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tinyvmm test guest: shared declarations.
 *
 * The guest is one static image linked at 0x100000. CPL0 code (kernel.c, head.S)
 * is kept tiny because it is instruction-emulated on some hosts; everything else
 * (user.c, content.c, lib.c) runs at CPL3 with IOPL=3.
 */
#ifndef TINYVMM_GUEST_H
#define TINYVMM_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;
typedef unsigned long usize;

#define NULL ((void *)0)
#define PAGE_SIZE 4096ULL
#define WORDS_PER_PAGE 512

/* Ports. */
#define COM1 0x3f8
#define COM1_LSR (COM1 + 5)
#define I8042_CMD 0x64
#define DEBUG_EXIT_PORT 0xf4

/* Debug-exit values: the VMM exits with (v << 1) | 1. */
#define EXIT_TEST_FAILED 1
#define EXIT_INTERNAL_ERROR 2

/* Vectors. */
#define VEC_TIMER 0x40
#define VEC_SERIAL 0x41
#define VEC_SYSCALL 0x80
#define VEC_SPURIOUS 0xff

/* Syscalls (int 0x80, rax = number, rdi = argument, result in rax). */
#define SYS_SLEEP_NS 0 /* arm the LAPIC timer for rdi ns, sti;hlt once; 0 = timer/other wake-up,
			* 1 = woken by a UART interrupt, -1 = no usable LAPIC */
#define SYS_CRASH 1    /* load a zero-limit IDT and ud2: triple fault */

/* LAPIC (xAPIC MMIO) and IOAPIC. */
#define LAPIC_BASE 0xfee00000ULL
#define IOAPIC_BASE 0xfec00000ULL
#define COM1_GSI 4

/* boot_params offsets (Linux arch/x86/include/uapi/asm/bootparam.h). */
#define BP_ACPI_RSDP_ADDR 0x070
#define BP_EXT_RAMDISK_IMAGE 0x0c0
#define BP_EXT_RAMDISK_SIZE 0x0c4
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_ENTRIES 0x1e8
#define BP_RAMDISK_IMAGE 0x218
#define BP_RAMDISK_SIZE 0x21c
#define BP_CMD_LINE_PTR 0x228
#define BP_CMDLINE_SIZE 0x238
#define BP_E820_TABLE 0x2d0
#define E820_MAX_ENTRIES 128
#define E820_RAM 1

static inline u8 bp_u8(u64 bp, u64 off) { return *(volatile u8 *)(bp + off); }
static inline u32 bp_u32(u64 bp, u64 off) { return *(volatile u32 *)(bp + off); }
static inline u64 bp_u64(u64 bp, u64 off) { return *(volatile u64 *)(bp + off); }

/* Port I/O and misc instructions. */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
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
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* Set up at CPL0 by kmain, read at CPL3 (all pages are user-accessible). */
struct boot_info {
	u64 boot_params;   /* address of the zero page */
	u64 image_end;     /* end of the guest's own memory (image + page tables), page aligned */
	u64 tsc_entry;     /* TSC at the 64-bit entry point */
	u64 tsc_user;      /* TSC just before the iretq to CPL3 */
	u64 max_ram_end;   /* highest end of an e820 RAM entry */
	u64 mapped_end;    /* end of the identity map */
	int lapic_ok;      /* the LAPIC timer is usable for sleeping */
	u32 hv_max_leaf;   /* CPUID 0x40000000 EAX, read at CPL0 */
	u32 cpuid_tsc_khz; /* CPUID 0x40000010 EAX if advertised, else 0 */
};
extern struct boot_info boot_info;

/* head.S */
extern char __image_start[], __image_end[], __bss_start[], __bss_end[];
extern u64 boot_pml4[], boot_pdpt[];
extern char user_stack_top[], kernel_stack_top[];
extern void *exception_stubs[32];
extern void isr_timer(void), isr_spurious(void), isr_syscall(void), isr_serial(void);
extern volatile int serial_wake; /* set by isr_serial, consumed by SYS_SLEEP_NS */
extern void load_gdt(void);
extern void enter_user(void (*entry)(void), void *stack) __attribute__((noreturn));
extern void crash_now(void) __attribute__((noreturn));
extern u64 gdt_tss_desc[2];

/* lib.c: string helpers and serial output (usable at CPL0 and CPL3). */
void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
usize strlen(const char *s);
void serial_putc(char c);
void serial_write(const char *s, usize n);
void serial_puts(const char *s);
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void debug_exit(u8 v) __attribute__((noreturn));

/* content.c: page classes and contents (see README.md "Content functions"). */
enum page_class { CLASS_SHARED = 0, CLASS_ZERO = 1, CLASS_UNIQUE = 2 };
/* splitmix64's finalizer. */
static inline u64 mix64(u64 z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}
enum page_class page_class(u64 seed, u64 index, u32 shared_pct, u32 zero_pct);

/*
 * Where content sits in guest-physical memory. Page i of the fill area holds the content
 * of *logical* page layout_logical(l, i): itself (`same`, every guest alike), a per-guest
 * permutation of all pages (`shuffled`, as page cache is), or a per-guest permutation of
 * blocks of `run` pages whose class is chosen per block (`clustered`: shared content in
 * runs of `run` pages, each run somewhere else in each guest).
 */
enum layout_kind { LAYOUT_SAME = 0, LAYOUT_SHUFFLED = 1, LAYOUT_CLUSTERED = 2 };
struct layout {
	enum layout_kind kind;
	u64 run;    /* pages per block (clustered); 1 otherwise */
	u64 npages; /* fill pages */
	u64 key;    /* the permutation's key (from guest_seed) */
};
u64 layout_logical(const struct layout *l, u64 i);
/* The class of logical page `lp` under layout `l`. */
enum page_class layout_class(const struct layout *l, u64 seed, u64 lp, u32 shared_pct, u32 zero_pct);
u64 page_key(u64 seed, u64 guest_seed, enum page_class cls, u64 index, u32 version);
/* Write page contents; returns the wrapping sum of the 512 words. */
u64 page_write(volatile u64 *page, enum page_class cls, u32 version, u64 key);
static inline u64 page_word(u64 key, u32 j) { return mix64(key + (u64)(j + 1) * 0x9e3779b97f4a7c15ULL); }

/* acpi.c: the `acpi` workload; prints ACPI OK/FAIL, returns 0 if the tables are valid. */
int acpi_check(u64 boot_params);

/* acpi.c: the guest-physical bases and GSIs (~0 if none) of the DSDT's virtio-mmio
 * devices (LNRO0005), in DSDT order; returns how many (at most max). */
u32 acpi_virtio_mmio(u64 boot_params, u64 *bases, u32 *gsis, u32 max);

/* virtio_mmio.c: the virtio-mmio (version 2) transport the drivers share. Registers: */
#define MMIO_MAGIC 0x000
#define MMIO_VERSION 0x004
#define MMIO_DEVICE_ID 0x008
#define MMIO_DEVICE_FEATURES 0x010
#define MMIO_DEVICE_FEATURES_SEL 0x014
#define MMIO_DRIVER_FEATURES 0x020
#define MMIO_DRIVER_FEATURES_SEL 0x024
#define MMIO_QUEUE_SEL 0x030
#define MMIO_QUEUE_NUM_MAX 0x034
#define MMIO_QUEUE_NUM 0x038
#define MMIO_QUEUE_READY 0x044
#define MMIO_QUEUE_NOTIFY 0x050
#define MMIO_INTERRUPT_STATUS 0x060
#define MMIO_INTERRUPT_ACK 0x064
#define MMIO_STATUS 0x070
#define MMIO_QUEUE_DESC 0x080
#define MMIO_QUEUE_AVAIL 0x090
#define MMIO_QUEUE_USED 0x0a0
#define MMIO_CONFIG_GENERATION 0x0fc
#define MMIO_CONFIG 0x100

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 64

/* A 32-bit register of the device at `base` (for drivers that must go out of spec). */
u32 vmmio_rd(u64 base, u32 off);
void vmmio_wr(u64 base, u32 off, u32 v);

struct vq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};
#define VQ_DESC_F_NEXT 1
#define VQ_DESC_F_WRITE 2
/* A split queue in three pages: descriptors, avail ring, used ring. */
#define VIRTQ_BYTES (3 * PAGE_SIZE)
struct virtq {
	volatile struct vq_desc *desc;
	volatile u16 *avail; /* flags, idx, ring[size] */
	volatile u16 *used;  /* flags, idx, then (id u32, len u32)[size] */
	u16 size, avail_idx, used_seen;
};
/* Resets the device at `base` and negotiates VERSION_1 plus the low feature bits in `want`
 * it offers (*got). 0: FEATURES_OK; -1: another device type; 1: failed (*why). */
int vmmio_start(u64 base, u32 device_id, u32 want, u32 *got, const char **why);
/* Sets up queue `index` with `size` entries in the VIRTQ_BYTES at `rings`. 0 or 1 (*why). */
int vmmio_queue(u64 base, u32 index, u16 size, u64 rings, struct virtq *q, const char **why);
/* DRIVER_OK; 0, or 1 (*why) if the device did not accept it. */
int vmmio_live(u64 base, const char **why);
void vmmio_reset(u64 base);
void vmmio_notify(u64 base, u32 queue);
/* InterruptStatus, and acknowledging bits of it. */
u32 vmmio_interrupt_status(u64 base);
void vmmio_interrupt_ack(u64 base, u32 bits);
/* 64 bits of configuration space at `off`, read consistently (generation counter). */
u64 vmmio_config64(u64 base, u32 off);
/* Puts chain `head` on the avail ring. */
void virtq_publish(struct virtq *q, u16 head);

/* balloon.c: a virtio-balloon driver on virtio-mmio, polled (see balloon.c). */
int balloon_init(void);
int balloon_present(void);
void balloon_report(const u64 *gpa, const u64 *len, u32 n);
void balloon_pfns(int deflate, const u32 *pfns, u32 n);
u32 balloon_target(void);
void balloon_set_actual(u32 pages);
int balloon_stats(const u16 *tags, const u64 *vals, u32 n);
#define BALLOON_MAX_RANGES 64

/* virtio.c: the `disk` workload (README.md). */
#define DISK_CHUNK (1ULL << 20)          /* bytes per request */
#define DISK_RINGS_BYTES (12 * PAGE_SIZE) /* queue rings of up to 4 disks */
#define DISK_AREA_BYTES (DISK_RINGS_BYTES + DISK_CHUNK)
struct disk_params {
	u64 area;    /* DISK_AREA_BYTES of RAM reserved for the workload, page aligned */
	u64 tsc_khz;
	u64 seed;    /* disk i gets word w = mix64(seed + i + w) written */
	u64 sums[2]; /* the host's read checksums of disks 0 and 1 (0: not checked) */
};
int disk_workload(u64 boot_params, const struct disk_params *p);
/* Fills the data buffer with 256 identical pages, or 256 different ones (merging tests). */
void disk_prepare(u64 area, int unique);

/* vsock.c: the `vsock` workload (README.md). */
struct vsock_params {
	u64 tsc_khz;
	u64 cid;        /* the CID the device must report (0: not checked) */
	u64 port;       /* host port to connect to and ping-pong with (0: skip) */
	u64 msgs, size; /* messages and bytes per message of the ping-pong */
	u64 listen;     /* guest port to echo on (0: skip) */
	u64 accepts;    /* connections to serve on it before finishing */
	u64 timeout_ms; /* how long to wait for them */
	u64 bad;        /* first drive the device out of spec */
};
int vsock_workload(u64 boot_params, const struct vsock_params *p);

/* user.c */
void umain(void) __attribute__((noreturn));

/* The one system call of CPL3 code into the guest kernel (kernel.c's int 0x80 handler). */
static inline u64 syscall1(u64 nr, u64 arg)
{
	u64 ret;
	__asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "D"(arg) : "memory");
	return ret;
}

/* Sleeps up to ns (one LAPIC timer shot and hlt); 1 if an interrupt on VEC_SERIAL woke
 * it, 0 otherwise, -1 if the LAPIC timer is unusable. */
static inline int sleep_ns_or_wake(u64 ns) { return (int)(i64)syscall1(SYS_SLEEP_NS, ns); }

#endif
