// SPDX-License-Identifier: Apache-2.0
/*
 * tinyvmm test guest: the virtio-mmio (version 2) transport the guest's virtio drivers
 * (virtio.c: blk, vsock.c: vsock) share: reset and feature negotiation, split queues in
 * three pages each, DRIVER_OK, notifications and configuration reads. CPL3; the MMIO gap is
 * mapped uncached and user-accessible.
 */
#include "guest.h"

u32 vmmio_rd(u64 base, u32 off) { return *(volatile u32 *)(base + off); }
void vmmio_wr(u64 base, u32 off, u32 v) { *(volatile u32 *)(base + off) = v; }

static u32 mr(u64 base, u32 off) { return vmmio_rd(base, off); }
static void mw(u64 base, u32 off, u32 v) { vmmio_wr(base, off, v); }

static void mw64(u64 base, u32 off, u64 v)
{
	mw(base, off, (u32)v);
	mw(base, off + 4, (u32)(v >> 32));
}

int vmmio_start(u64 base, u32 device_id, u32 want, u32 *got, const char **why)
{
	if (mr(base, MMIO_MAGIC) != 0x74726976 || mr(base, MMIO_VERSION) != 2) {
		*why = "no virtio-mmio v2 device";
		return 1;
	}
	if (mr(base, MMIO_DEVICE_ID) != device_id)
		return -1;
	mw(base, MMIO_STATUS, 0);
	mw(base, MMIO_STATUS, S_ACK);
	mw(base, MMIO_STATUS, S_ACK | S_DRIVER);
	mw(base, MMIO_DEVICE_FEATURES_SEL, 0);
	u32 lo = mr(base, MMIO_DEVICE_FEATURES) & want;
	mw(base, MMIO_DEVICE_FEATURES_SEL, 1);
	if (!(mr(base, MMIO_DEVICE_FEATURES) & 1)) {
		*why = "VERSION_1 not offered";
		return 1;
	}
	mw(base, MMIO_DRIVER_FEATURES_SEL, 0);
	mw(base, MMIO_DRIVER_FEATURES, lo);
	mw(base, MMIO_DRIVER_FEATURES_SEL, 1);
	mw(base, MMIO_DRIVER_FEATURES, 1);
	mw(base, MMIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	if (!(mr(base, MMIO_STATUS) & S_FEATURES_OK)) {
		*why = "features refused";
		return 1;
	}
	*got = lo;
	return 0;
}

int vmmio_queue(u64 base, u32 index, u16 size, u64 rings, struct virtq *q, const char **why)
{
	mw(base, MMIO_QUEUE_SEL, index);
	if (mr(base, MMIO_QUEUE_NUM_MAX) < size) {
		*why = "queue smaller than the driver needs";
		return 1;
	}
	memset((void *)rings, 0, VIRTQ_BYTES);
	q->desc = (volatile struct vq_desc *)rings;
	q->avail = (volatile u16 *)(rings + PAGE_SIZE);
	q->used = (volatile u16 *)(rings + 2 * PAGE_SIZE);
	q->size = size;
	q->avail_idx = q->used_seen = 0;
	mw(base, MMIO_QUEUE_NUM, size);
	mw64(base, MMIO_QUEUE_DESC, rings);
	mw64(base, MMIO_QUEUE_AVAIL, rings + PAGE_SIZE);
	mw64(base, MMIO_QUEUE_USED, rings + 2 * PAGE_SIZE);
	mw(base, MMIO_QUEUE_READY, 1);
	return 0;
}

int vmmio_live(u64 base, const char **why)
{
	mw(base, MMIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	u32 st = mr(base, MMIO_STATUS);
	if (!(st & S_DRIVER_OK) || (st & S_NEEDS_RESET)) {
		*why = "did not go live";
		return 1;
	}
	return 0;
}

void vmmio_reset(u64 base) { mw(base, MMIO_STATUS, 0); }

void vmmio_notify(u64 base, u32 queue) { mw(base, MMIO_QUEUE_NOTIFY, queue); }

u32 vmmio_interrupt_status(u64 base) { return mr(base, MMIO_INTERRUPT_STATUS); }

void vmmio_interrupt_ack(u64 base, u32 bits) { mw(base, MMIO_INTERRUPT_ACK, bits); }

u64 vmmio_config64(u64 base, u32 off)
{
	u32 gen, lo, hi;
	do {
		gen = mr(base, MMIO_CONFIG_GENERATION);
		lo = mr(base, MMIO_CONFIG + off);
		hi = mr(base, MMIO_CONFIG + off + 4);
	} while (gen != mr(base, MMIO_CONFIG_GENERATION));
	return (u64)hi << 32 | lo;
}

void virtq_publish(struct virtq *q, u16 head)
{
	q->avail[2 + q->avail_idx % q->size] = head;
	barrier();
	q->avail_idx++;
	q->avail[1] = q->avail_idx;
	barrier();
}
