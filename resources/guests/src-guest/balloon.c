// SPDX-License-Identifier: Apache-2.0
/*
 * tinyvmm test guest: a virtio-balloon driver on virtio-mmio, run at CPL3 (the MMIO
 * window [3 GiB, 4 GiB) is user-accessible and uncached), polling used rings instead of
 * taking interrupts (every queue's avail ring says VIRTQ_AVAIL_F_NO_INTERRUPT).
 *
 * The device is found in the DSDT (acpi.c's acpi_virtio_mmio, shared with the virtio-blk
 * driver in virtio.c); the queues differ from virtio-blk's (four of them, requests of
 * several kinds), so they are set up here. The mechanics only: find and start the device, submit one request and wait for it.
 * Which pages to report, inflate or deflate is user.c's business (it knows the fill
 * area and the page versions).
 */
#include "guest.h"

#define VIRTIO_MMIO_SLOTS 11
#define VIRTIO_MAGIC 0x74726976
#define VIRTIO_ID_BALLOON 5

/* virtio-mmio registers (version 2). */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_STATUS 0x070
#define R_QUEUE_DESC_LO 0x080
#define R_QUEUE_DESC_HI 0x084
#define R_QUEUE_AVAIL_LO 0x090
#define R_QUEUE_AVAIL_HI 0x094
#define R_QUEUE_USED_LO 0x0a0
#define R_QUEUE_USED_HI 0x0a4
#define R_CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8

#define F_STATS_VQ 1
#define F_DEFLATE_ON_OOM 2
#define F_REPORTING 5
#define F_VERSION_1 32

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1

#define QSIZE 64
#define NQUEUES 4 /* inflate, deflate, stats, reporting */

struct desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

/* One page per queue: descriptors, then the avail ring, then the used ring. */
struct vq_page {
	struct desc desc[QSIZE];	  /* 1024 bytes */
	u16 avail[2 + QSIZE + 1];	  /* flags, idx, ring, used_event */
	u8 pad1[1024 - (2 + QSIZE + 1) * 2];
	u16 used_hdr[2];		  /* flags, idx */
	struct { u32 id, len; } used[QSIZE];
	u8 pad2[4096 - 2048 - 4 - QSIZE * 8];
} __attribute__((aligned(4096)));

static struct vq_page vqs[NQUEUES];
static u16 avail_idx[NQUEUES], used_seen[NQUEUES];
static u64 base;
static u64 acked;
static u32 pfn_buf[256] __attribute__((aligned(64)));
static u8 stats_buf[10 * 10] __attribute__((aligned(64)));
static int stats_outstanding;

static inline u32 rd(u32 off) { return *(volatile u32 *)(base + off); }
static inline void wr(u32 off, u32 v) { *(volatile u32 *)(base + off) = v; }
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

int balloon_present(void) { return base != 0; }

/* The balloon among the DSDT's virtio-mmio devices (found as Linux finds them, acpi.c). */
static int find_device(void)
{
	u64 bases[VIRTIO_MMIO_SLOTS];
	u32 gsis[VIRTIO_MMIO_SLOTS];
	u32 n = acpi_virtio_mmio(boot_info.boot_params, bases, gsis, VIRTIO_MMIO_SLOTS);
	for (u32 i = 0; i < n; i++) {
		u64 b = bases[i];
		if (*(volatile u32 *)(b + R_MAGIC) == VIRTIO_MAGIC && *(volatile u32 *)(b + R_VERSION) == 2 &&
		    *(volatile u32 *)(b + R_DEVICE_ID) == VIRTIO_ID_BALLOON) {
			base = b;
			return 1;
		}
	}
	return 0;
}

/* Finds and starts the balloon; returns 0, or -1 (no device, or it refused us). */
int balloon_init(void)
{
	if (base)
		return 0;
	if (!find_device())
		return -1;
	wr(R_STATUS, 0);
	wr(R_STATUS, S_ACKNOWLEDGE);
	wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
	wr(R_DEVICE_FEATURES_SEL, 0);
	u64 dev = rd(R_DEVICE_FEATURES);
	wr(R_DEVICE_FEATURES_SEL, 1);
	dev |= (u64)rd(R_DEVICE_FEATURES) << 32;
	u64 want = (1ULL << F_VERSION_1) | (1ULL << F_STATS_VQ) | (1ULL << F_DEFLATE_ON_OOM) | (1ULL << F_REPORTING);
	acked = dev & want;
	if (!(acked & (1ULL << F_VERSION_1)) || !(acked & (1ULL << F_STATS_VQ)) || !(acked & (1ULL << F_REPORTING))) {
		kprintf("ERROR balloon: device features 0x%llx lack what the driver needs\n", dev);
		base = 0;
		return -1;
	}
	wr(R_DRIVER_FEATURES_SEL, 0);
	wr(R_DRIVER_FEATURES, (u32)acked);
	wr(R_DRIVER_FEATURES_SEL, 1);
	wr(R_DRIVER_FEATURES, (u32)(acked >> 32));
	wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	if (!(rd(R_STATUS) & S_FEATURES_OK)) {
		kprintf("ERROR balloon: FEATURES_OK refused\n");
		base = 0;
		return -1;
	}
	for (u32 q = 0; q < NQUEUES; q++) {
		memset(&vqs[q], 0, sizeof(vqs[q]));
		vqs[q].avail[0] = AVAIL_F_NO_INTERRUPT;
		avail_idx[q] = used_seen[q] = 0;
		wr(R_QUEUE_SEL, q);
		if (rd(R_QUEUE_NUM_MAX) < QSIZE) {
			kprintf("ERROR balloon: queue %u too small\n", q);
			base = 0;
			return -1;
		}
		wr(R_QUEUE_NUM, QSIZE);
		u64 d = (u64)vqs[q].desc, a = (u64)vqs[q].avail, u = (u64)vqs[q].used_hdr;
		wr(R_QUEUE_DESC_LO, (u32)d);
		wr(R_QUEUE_DESC_HI, (u32)(d >> 32));
		wr(R_QUEUE_AVAIL_LO, (u32)a);
		wr(R_QUEUE_AVAIL_HI, (u32)(a >> 32));
		wr(R_QUEUE_USED_LO, (u32)u);
		wr(R_QUEUE_USED_HI, (u32)(u >> 32));
		wr(R_QUEUE_READY, 1);
	}
	wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	stats_outstanding = 0;
	return 0;
}

/* Makes descriptors 0..n-1 of queue q one chain and offers it. */
static void submit(u32 q, u32 n)
{
	for (u32 i = 0; i + 1 < n; i++) {
		vqs[q].desc[i].flags |= DESC_F_NEXT;
		vqs[q].desc[i].next = (u16)(i + 1);
	}
	vqs[q].avail[2 + avail_idx[q] % QSIZE] = 0;
	mb();
	avail_idx[q]++;
	*(volatile u16 *)&vqs[q].avail[1] = avail_idx[q];
	mb();
	wr(R_QUEUE_NOTIFY, q);
}

/* Whether the device returned a buffer on queue q since the last call. */
static int used_one(u32 q)
{
	u16 idx = *(volatile u16 *)&vqs[q].used_hdr[1];
	if (idx == used_seen[q])
		return 0;
	used_seen[q]++;
	return 1;
}

static void wait_used(u32 q)
{
	while (!used_one(q))
		cpu_relax();
}

/* Reports n free ranges (one chain, device-writable, as Linux does); waits until the
 * device has dropped them. n <= QSIZE. */
void balloon_report(const u64 *gpa, const u64 *len, u32 n)
{
	for (u32 i = 0; i < n; i++) {
		vqs[3].desc[i].addr = gpa[i];
		vqs[3].desc[i].len = (u32)len[i];
		vqs[3].desc[i].flags = DESC_F_WRITE;
	}
	submit(3, n);
	wait_used(3);
}

/* Sends n PFNs (n <= 256) on the inflate (deflate = 0) or deflate queue; waits. */
void balloon_pfns(int deflate, const u32 *pfns, u32 n)
{
	u32 q = deflate ? 1 : 0;
	memcpy(pfn_buf, pfns, n * sizeof(u32));
	vqs[q].desc[0].addr = (u64)pfn_buf;
	vqs[q].desc[0].len = n * sizeof(u32);
	vqs[q].desc[0].flags = 0;
	submit(q, 1);
	wait_used(q);
}

/* The target the host asks for, in 4 KiB pages. */
u32 balloon_target(void) { return rd(R_CONFIG + 0); }

/* Tells the host the balloon's size, in 4 KiB pages. */
void balloon_set_actual(u32 pages) { wr(R_CONFIG + 4, pages); }

/* Sends statistics (tag, value) x n when the device asked for them (or the first time);
 * returns 1 if sent. */
int balloon_stats(const u16 *tags, const u64 *vals, u32 n)
{
	if (stats_outstanding && !used_one(2))
		return 0;
	for (u32 i = 0; i < n && i < 10; i++) {
		u8 *e = stats_buf + i * 10;
		e[0] = (u8)tags[i];
		e[1] = (u8)(tags[i] >> 8);
		for (u32 b = 0; b < 8; b++)
			e[2 + b] = (u8)(vals[i] >> (8 * b));
	}
	vqs[2].desc[0].addr = (u64)stats_buf;
	vqs[2].desc[0].len = n * 10;
	vqs[2].desc[0].flags = 0;
	submit(2, 1);
	stats_outstanding = 1;
	return 1;
}
