// SPDX-License-Identifier: Apache-2.0
/*
 * tinyvmm test guest: a virtio-mmio (version 2) transport driver, a polling virtio-blk
 * driver on it, and the `disk` workload (CPL3; the MMIO gap is mapped uncached and
 * user-accessible).
 *
 * Devices are found the way Linux finds them without command-line hints: in the DSDT,
 * as `LNRO0005` devices with a Memory32Fixed window (acpi.c). Requests are synchronous:
 * one three-descriptor chain (header, data, status) at a time, notified through
 * QueueNotify and completed by polling the used ring (no interrupts).
 */
#include "guest.h"

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

#define VIRTIO_ID_BLOCK 2
#define BLK_F_SIZE_MAX (1u << 1)
#define BLK_F_SEG_MAX (1u << 2)
#define BLK_F_RO (1u << 5)
#define BLK_F_FLUSH (1u << 9)
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define BLK_S_UNSUPP 2
#define SECTOR 512ULL

#define VQ_SIZE 16
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define MAX_DISKS 4
#define TIMEOUT_MS 10000

struct vq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct blk {
	u64 mmio;
	volatile struct vq_desc *desc;
	volatile u16 *avail; /* flags, idx, ring[VQ_SIZE] */
	volatile u16 *used;  /* flags, idx, then (id u32, len u32)[VQ_SIZE] */
	volatile u8 *hdr;
	volatile u8 *status;
	u16 avail_idx;
	u64 sectors;
	int ro;
};

static u64 tsc_khz;

static u32 mr(const struct blk *d, u32 off) { return *(volatile u32 *)(d->mmio + off); }
static void mw(const struct blk *d, u32 off, u32 v) { *(volatile u32 *)(d->mmio + off) = v; }

static void mw64(const struct blk *d, u32 off, u64 v)
{
	mw(d, off, (u32)v);
	mw(d, off + 4, (u32)(v >> 32));
}

/* Reset, negotiate, set up queue 0 at `rings` (3 pages); 0 on success. */
static int blk_init(struct blk *d, u64 mmio, u64 rings)
{
	d->mmio = mmio;
	if (mr(d, MMIO_MAGIC) != 0x74726976 || mr(d, MMIO_VERSION) != 2) {
		kprintf("DISK FAIL no virtio-mmio v2 device at 0x%llx\n", mmio);
		return 1;
	}
	if (mr(d, MMIO_DEVICE_ID) != VIRTIO_ID_BLOCK)
		return -1; /* another kind of device: skipped */
	mw(d, MMIO_STATUS, 0);
	mw(d, MMIO_STATUS, S_ACK);
	mw(d, MMIO_STATUS, S_ACK | S_DRIVER);
	mw(d, MMIO_DEVICE_FEATURES_SEL, 0);
	u32 lo = mr(d, MMIO_DEVICE_FEATURES);
	mw(d, MMIO_DEVICE_FEATURES_SEL, 1);
	u32 hi = mr(d, MMIO_DEVICE_FEATURES);
	if (!(hi & 1)) {
		kprintf("DISK FAIL device at 0x%llx does not offer VERSION_1\n", mmio);
		return 1;
	}
	lo &= BLK_F_RO | BLK_F_FLUSH | BLK_F_SEG_MAX | BLK_F_SIZE_MAX;
	mw(d, MMIO_DRIVER_FEATURES_SEL, 0);
	mw(d, MMIO_DRIVER_FEATURES, lo);
	mw(d, MMIO_DRIVER_FEATURES_SEL, 1);
	mw(d, MMIO_DRIVER_FEATURES, 1);
	mw(d, MMIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	if (!(mr(d, MMIO_STATUS) & S_FEATURES_OK)) {
		kprintf("DISK FAIL device at 0x%llx refused features 0x%x\n", mmio, lo);
		return 1;
	}
	d->ro = !!(lo & BLK_F_RO);
	mw(d, MMIO_QUEUE_SEL, 0);
	if (mr(d, MMIO_QUEUE_NUM_MAX) < VQ_SIZE) {
		kprintf("DISK FAIL queue max %u\n", mr(d, MMIO_QUEUE_NUM_MAX));
		return 1;
	}
	memset((void *)rings, 0, 3 * PAGE_SIZE);
	d->desc = (volatile struct vq_desc *)rings;
	d->avail = (volatile u16 *)(rings + PAGE_SIZE);
	d->used = (volatile u16 *)(rings + 2 * PAGE_SIZE);
	d->hdr = (volatile u8 *)(rings + 1024);
	d->status = (volatile u8 *)(rings + 1024 + 64);
	d->avail_idx = 0;
	mw(d, MMIO_QUEUE_NUM, VQ_SIZE);
	mw64(d, MMIO_QUEUE_DESC, (u64)d->desc);
	mw64(d, MMIO_QUEUE_AVAIL, (u64)d->avail);
	mw64(d, MMIO_QUEUE_USED, (u64)d->used);
	mw(d, MMIO_QUEUE_READY, 1);
	mw(d, MMIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	u32 st = mr(d, MMIO_STATUS);
	if (!(st & S_DRIVER_OK) || (st & S_NEEDS_RESET)) {
		kprintf("DISK FAIL device at 0x%llx did not go live (status 0x%x)\n", mmio, st);
		return 1;
	}
	u32 gen, c0, c1;
	do {
		gen = mr(d, MMIO_CONFIG_GENERATION);
		c0 = mr(d, MMIO_CONFIG);
		c1 = mr(d, MMIO_CONFIG + 4);
	} while (gen != mr(d, MMIO_CONFIG_GENERATION));
	d->sectors = (u64)c1 << 32 | c0;
	return 0;
}

/*
 * One request: header, optional data buffer, status. Returns the status byte, or -1 if
 * the device did not complete it in time. `*used_len` gets the used element's length.
 */
static int blk_request(struct blk *d, u32 type, u64 sector, u64 buf, u32 len, u32 *used_len)
{
	*(volatile u32 *)d->hdr = type;
	*(volatile u32 *)(d->hdr + 4) = 0;
	*(volatile u64 *)(d->hdr + 8) = sector;
	*d->status = 0xff;
	int dev_writes = type == BLK_T_IN || type == BLK_T_GET_ID;
	d->desc[0].addr = (u64)d->hdr;
	d->desc[0].len = 16;
	d->desc[0].flags = DESC_F_NEXT;
	d->desc[0].next = len ? 1 : 2;
	d->desc[1].addr = buf;
	d->desc[1].len = len;
	d->desc[1].flags = DESC_F_NEXT | (dev_writes ? DESC_F_WRITE : 0);
	d->desc[1].next = 2;
	d->desc[2].addr = (u64)d->status;
	d->desc[2].len = 1;
	d->desc[2].flags = DESC_F_WRITE;
	d->desc[2].next = 0;
	d->avail[2 + d->avail_idx % VQ_SIZE] = 0;
	barrier();
	d->avail_idx++;
	d->avail[1] = d->avail_idx;
	barrier();
	mw(d, MMIO_QUEUE_NOTIFY, 0);
	u64 deadline = rdtsc() + TIMEOUT_MS * tsc_khz;
	while (d->used[1] != d->avail_idx) {
		if (rdtsc() > deadline)
			return -1;
		cpu_relax();
	}
	barrier();
	volatile u32 *elem = (volatile u32 *)(d->used + 2) + 2 * ((d->avail_idx - 1) % VQ_SIZE);
	if (used_len)
		*used_len = elem[1];
	return *d->status;
}

/* The read checksum: wrapping sum over the disk's 8-byte words w_i of mix64(w_i + i). */
static u64 sum_words(const volatile u64 *p, u64 n, u64 first)
{
	u64 s = 0;
	for (u64 i = 0; i < n; i++)
		s += mix64(p[i] + first + i);
	return s;
}

/* The pattern the workload writes: word i of the disk is mix64(seed + i). */
static u64 pattern(u64 seed, u64 i) { return mix64(seed + i); }

/* MiB/s for `bytes` in `cycles` (bytes up to 4 TiB). */
static u64 mib_s(u64 bytes, u64 cycles)
{
	return cycles ? (bytes >> 10) * tsc_khz / cycles * 1000 >> 10 : 0;
}

static int expect(int got, int want, const char *what, u32 dev)
{
	if (got == want)
		return 0;
	kprintf("DISK FAIL dev=%u %s: status %d, expected %d\n", dev, what, got, want);
	return 1;
}

/* Reads the whole disk in chunks into buf; returns its checksum and the cycles spent. */
static int read_all(struct blk *d, u32 dev, u64 buf, u64 *sum, u64 *cycles)
{
	*sum = 0;
	*cycles = 0;
	u64 total = d->sectors * SECTOR;
	for (u64 off = 0; off < total; off += DISK_CHUNK) {
		u64 n = total - off < DISK_CHUNK ? total - off : DISK_CHUNK;
		u32 ul = 0;
		u64 t0 = rdtsc();
		int st = blk_request(d, BLK_T_IN, off / SECTOR, buf, (u32)n, &ul);
		*cycles += rdtsc() - t0;
		if (expect(st, BLK_S_OK, "read", dev))
			return 1;
		if (ul != n + 1) {
			kprintf("DISK FAIL dev=%u read used len %u, expected %llu\n", dev, ul, n + 1);
			return 1;
		}
		*sum += sum_words((const volatile u64 *)buf, n / 8, off / 8);
	}
	return 0;
}

/* Writes the pattern over the whole disk, flushes, reads it back and checks it. */
static int write_flush_verify(struct blk *d, u32 dev, u64 buf, u64 seed)
{
	u64 total = d->sectors * SECTOR, wcyc = 0, rcyc = 0;
	volatile u64 *w = (volatile u64 *)buf;
	for (u64 off = 0; off < total; off += DISK_CHUNK) {
		u64 n = total - off < DISK_CHUNK ? total - off : DISK_CHUNK;
		for (u64 i = 0; i < n / 8; i++)
			w[i] = pattern(seed, off / 8 + i);
		u32 ul;
		u64 t0 = rdtsc();
		int st = blk_request(d, BLK_T_OUT, off / SECTOR, buf, (u32)n, &ul);
		wcyc += rdtsc() - t0;
		if (expect(st, BLK_S_OK, "write", dev))
			return 1;
	}
	u32 ul;
	u64 t0 = rdtsc();
	int st = blk_request(d, BLK_T_FLUSH, 0, 0, 0, &ul);
	u64 fcyc = rdtsc() - t0;
	if (expect(st, BLK_S_OK, "flush", dev))
		return 1;
	for (u64 off = 0; off < total; off += DISK_CHUNK) {
		u64 n = total - off < DISK_CHUNK ? total - off : DISK_CHUNK;
		u64 t1 = rdtsc();
		st = blk_request(d, BLK_T_IN, off / SECTOR, buf, (u32)n, &ul);
		rcyc += rdtsc() - t1;
		if (expect(st, BLK_S_OK, "read back", dev))
			return 1;
		for (u64 i = 0; i < n / 8; i++) {
			if (w[i] != pattern(seed, off / 8 + i)) {
				kprintf("DISK FAIL dev=%u read back word %llu: 0x%llx, expected 0x%llx\n", dev,
					off / 8 + i, w[i], pattern(seed, off / 8 + i));
				return 1;
			}
		}
	}
	kprintf("DISK write dev=%u bytes=%llu write_mib_s=%llu flush_us=%llu readback_mib_s=%llu\n", dev,
		total, mib_s(total, wcyc), fcyc * 1000 / tsc_khz, mib_s(total, rcyc));
	return 0;
}

/* Requests the device must refuse: past the end, unknown type, (read-only) a write. */
static int refusals(struct blk *d, u32 dev, u64 buf)
{
	u32 ul;
	int bad = 0;
	bad |= expect(blk_request(d, BLK_T_IN, d->sectors, buf, SECTOR, &ul), BLK_S_IOERR,
		      "read past the end", dev);
	bad |= expect(blk_request(d, BLK_T_IN, ~0ULL, buf, SECTOR, &ul), BLK_S_IOERR,
		      "read at sector 2^64-1", dev);
	bad |= expect(blk_request(d, 99, 0, 0, 0, &ul), BLK_S_UNSUPP, "unknown request type", dev);
	bad |= expect(blk_request(d, BLK_T_IN, 0, buf, 100, &ul), BLK_S_IOERR, "partial sector read",
		      dev);
	if (d->ro) {
		volatile u8 *b = (volatile u8 *)buf;
		for (u32 i = 0; i < SECTOR; i++)
			b[i] = 0xee;
		bad |= expect(blk_request(d, BLK_T_OUT, 0, buf, SECTOR, &ul), BLK_S_IOERR,
			      "write to a read-only disk", dev);
		bad |= expect(blk_request(d, BLK_T_FLUSH, 0, 0, 0, &ul), BLK_S_OK,
			      "flush of a read-only disk", dev);
	}
	return bad;
}

void disk_prepare(u64 area)
{
	/* Identical pages: the merge daemon can merge them before the disk reads into them. */
	volatile u64 *w = (volatile u64 *)(area + DISK_RINGS_BYTES);
	for (u64 i = 0; i < DISK_CHUNK / 8; i++)
		w[i] = mix64(0xd15c + i % WORDS_PER_PAGE);
	kprintf("DISKPREP pages=%llu\n", DISK_CHUNK / PAGE_SIZE);
}

int disk_workload(u64 bp, const struct disk_params *p)
{
	tsc_khz = p->tsc_khz;
	u64 bases[MAX_DISKS];
	u32 n = acpi_virtio_mmio(bp, bases, MAX_DISKS);
	u64 buf = p->area + DISK_RINGS_BYTES;
	u32 disks = 0;
	int bad = 0;
	for (u32 i = 0; i < n; i++) {
		struct blk d;
		u64 rings = p->area + (u64)disks * 3 * PAGE_SIZE;
		int r = blk_init(&d, bases[i], rings);
		if (r < 0)
			continue;
		if (r > 0) {
			bad = 1;
			continue;
		}
		u32 dev = disks++;
		char id[21];
		u32 ul = 0;
		volatile char *idbuf = (volatile char *)(rings + 2048);
		int st = blk_request(&d, BLK_T_GET_ID, 0, (u64)idbuf, 20, &ul);
		for (u32 k = 0; k < 20; k++)
			id[k] = idbuf[k];
		id[20] = 0;
		bad |= expect(st, BLK_S_OK, "get id", dev);
		kprintf("DISK dev=%u mmio=0x%llx sectors=%llu ro=%d id=%s\n", dev, bases[i], d.sectors,
			d.ro, id);
		u64 sum, cyc;
		if (read_all(&d, dev, buf, &sum, &cyc)) {
			bad = 1;
			continue;
		}
		kprintf("DISK read dev=%u bytes=%llu sum=0x%016llx read_mib_s=%llu\n", dev,
			d.sectors * SECTOR, sum, mib_s(d.sectors * SECTOR, cyc));
		if (dev < 2 && p->sums[dev] && p->sums[dev] != sum) {
			kprintf("DISK FAIL dev=%u sum 0x%016llx, host says 0x%016llx\n", dev, sum,
				p->sums[dev]);
			bad = 1;
		}
		bad |= refusals(&d, dev, buf);
		if (!d.ro && write_flush_verify(&d, dev, buf, p->seed + dev))
			bad = 1;
		if (d.ro) {
			/* The refused write changed nothing. */
			u64 again;
			if (read_all(&d, dev, buf, &again, &cyc) || again != sum) {
				kprintf("DISK FAIL dev=%u read-only disk changed\n", dev);
				bad = 1;
			}
		}
		mw(&d, MMIO_STATUS, 0);
	}
	if (!disks) {
		kprintf("DISK FAIL no virtio-blk device in the DSDT (%u virtio-mmio devices)\n", n);
		return 1;
	}
	kprintf(bad ? "DISK FAILED disks=%u\n" : "DISK OK disks=%u\n", disks);
	return bad;
}
