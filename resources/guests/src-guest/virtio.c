// SPDX-License-Identifier: Apache-2.0
/*
 * tinyvmm test guest: a polling virtio-blk driver on the shared virtio-mmio transport
 * (virtio_mmio.c), and the `disk` workload (CPL3; the MMIO gap is mapped uncached and
 * user-accessible).
 *
 * Devices are found the way Linux finds them without command-line hints: in the DSDT,
 * as `LNRO0005` devices with a Memory32Fixed window (acpi.c). Requests are synchronous:
 * one three-descriptor chain (header, data, status) at a time, notified through
 * QueueNotify and completed by polling the used ring (no interrupts).
 */
#include "guest.h"

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

/* Raw register access, for the out-of-spec driver checks. */
static u32 mr(const struct blk *d, u32 off) { return vmmio_rd(d->mmio, off); }
static void mw(const struct blk *d, u32 off, u32 v) { vmmio_wr(d->mmio, off, v); }
static void mw64(const struct blk *d, u32 off, u64 v)
{
	mw(d, off, (u32)v);
	mw(d, off + 4, (u32)(v >> 32));
}

/* Reset, negotiate, set up queue 0 at `rings` (3 pages); 0 on success. */
static int blk_init(struct blk *d, u64 mmio, u64 rings)
{
	const char *why = NULL;
	u32 lo = 0;
	struct virtq q;
	d->mmio = mmio;
	int r = vmmio_start(mmio, VIRTIO_ID_BLOCK, BLK_F_RO | BLK_F_FLUSH | BLK_F_SEG_MAX | BLK_F_SIZE_MAX,
			    &lo, &why);
	if (r < 0)
		return -1; /* another kind of device: skipped */
	if (!r)
		r = vmmio_queue(mmio, 0, VQ_SIZE, rings, &q, &why);
	if (!r)
		r = vmmio_live(mmio, &why);
	if (r) {
		kprintf("DISK FAIL device at 0x%llx: %s\n", mmio, why);
		return 1;
	}
	d->ro = !!(lo & BLK_F_RO);
	d->desc = q.desc;
	d->avail = q.avail;
	d->used = q.used;
	d->hdr = (volatile u8 *)(rings + 1024);
	d->status = (volatile u8 *)(rings + 1024 + 64);
	d->avail_idx = 0;
	d->sectors = vmmio_config64(mmio, 0);
	return 0;
}

/* Publishes the chain at descriptor 0 and polls the used ring; -1 on timeout. */
static int blk_submit(struct blk *d, u32 *used_len)
{
	d->avail[2 + d->avail_idx % VQ_SIZE] = 0;
	barrier();
	d->avail_idx++;
	d->avail[1] = d->avail_idx;
	barrier();
	vmmio_notify(d->mmio, 0);
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
	return 0;
}

static void set_desc(struct blk *d, u32 i, u64 addr, u32 len, u16 flags, u16 next)
{
	d->desc[i].addr = addr;
	d->desc[i].len = len;
	d->desc[i].flags = flags;
	d->desc[i].next = next;
}

static void set_header(struct blk *d, u32 type, u64 sector)
{
	*(volatile u32 *)d->hdr = type;
	*(volatile u32 *)(d->hdr + 4) = 0;
	*(volatile u64 *)(d->hdr + 8) = sector;
	*d->status = 0xff;
}

/*
 * One request: header, optional data buffer, status. Returns the status byte, or -1 if
 * the device did not complete it in time. `*used_len` gets the used element's length.
 */
static int blk_request(struct blk *d, u32 type, u64 sector, u64 buf, u32 len, u32 *used_len)
{
	set_header(d, type, sector);
	int dev_writes = type == BLK_T_IN || type == BLK_T_GET_ID;
	set_desc(d, 0, (u64)d->hdr, 16, DESC_F_NEXT, len ? 1 : 2);
	set_desc(d, 1, buf, len, DESC_F_NEXT | (dev_writes ? DESC_F_WRITE : 0), 2);
	set_desc(d, 2, (u64)d->status, 1, DESC_F_WRITE, 0);
	if (blk_submit(d, used_len))
		return -1;
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

/*
 * The interrupt path: routes the device's GSI (from the DSDT) through the IOAPIC to the
 * vector the UART uses (edge, active high), completes a request and sleeps until the
 * interrupt wakes the CPU; InterruptStatus must say "used buffer" until acknowledged.
 */
static int irq_check(struct blk *d, u32 dev, u32 gsi, u64 buf)
{
	volatile u32 *sel = (volatile u32 *)IOAPIC_BASE, *win = (volatile u32 *)(IOAPIC_BASE + 0x10);
	u32 apic_id = *(volatile u32 *)(LAPIC_BASE + 0x20) >> 24;
	if (gsi > 23) {
		kprintf("DISK FAIL dev=%u has no interrupt in the DSDT\n", dev);
		return 1;
	}
	if (sleep_ns_or_wake(1) < 0) {
		kprintf("DISK irq dev=%u gsi=%u skipped (no LAPIC timer)\n", dev, gsi);
		return 0;
	}
	vmmio_interrupt_ack(d->mmio, vmmio_interrupt_status(d->mmio));
	*sel = 0x10 + 2 * gsi + 1;
	*win = apic_id << 24;
	*sel = 0x10 + 2 * gsi;
	*win = VEC_SERIAL;
	u32 ul;
	int bad = expect(blk_request(d, BLK_T_IN, 0, buf, SECTOR, &ul), BLK_S_OK, "read (irq)", dev);
	u64 deadline = rdtsc() + 2000 * tsc_khz;
	int woken = 0;
	while (!woken && rdtsc() < deadline)
		woken = sleep_ns_or_wake(10000000) == 1;
	u32 is = vmmio_interrupt_status(d->mmio);
	vmmio_interrupt_ack(d->mmio, is);
	u32 after = vmmio_interrupt_status(d->mmio);
	*sel = 0x10 + 2 * gsi;
	*win = 0x10000;
	if (!woken || !(is & 1) || after) {
		kprintf("DISK FAIL dev=%u irq: woken=%d status=0x%x after ack=0x%x\n", dev, woken, is, after);
		return 1;
	}
	kprintf("DISK irq dev=%u gsi=%u ok\n", dev, gsi);
	return bad;
}

/*
 * A driver out of spec, on a live device: a data buffer in the MMIO gap (IOERR), a
 * descriptor loop (completed with nothing written), then a queue larger than the device's
 * maximum (DEVICE_NEEDS_RESET at DRIVER_OK) and a reset that recovers.
 */
static int out_of_spec(struct blk *d, u32 dev, u64 rings, u64 buf)
{
	u32 ul;
	int bad = expect(blk_request(d, BLK_T_IN, 0, 0xd0000000ULL, SECTOR, &ul), BLK_S_IOERR,
			 "read into the MMIO gap", dev);
	set_header(d, BLK_T_IN, 0);
	set_desc(d, 0, (u64)d->hdr, 16, DESC_F_NEXT, 1);
	set_desc(d, 1, buf, SECTOR, DESC_F_NEXT | DESC_F_WRITE, 0);
	ul = 99;
	if (blk_submit(d, &ul) || ul != 0 || *d->status != 0xff) {
		kprintf("DISK FAIL dev=%u descriptor loop: used len %u status 0x%x\n", dev, ul, *d->status);
		bad = 1;
	}
	/* A queue larger than the maximum. */
	mw(d, MMIO_STATUS, 0);
	mw(d, MMIO_STATUS, S_ACK | S_DRIVER);
	mw(d, MMIO_DRIVER_FEATURES_SEL, 1);
	mw(d, MMIO_DRIVER_FEATURES, 1);
	mw(d, MMIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	mw(d, MMIO_QUEUE_SEL, 0);
	mw(d, MMIO_QUEUE_NUM, mr(d, MMIO_QUEUE_NUM_MAX) * 2);
	mw64(d, MMIO_QUEUE_DESC, (u64)d->desc);
	mw64(d, MMIO_QUEUE_AVAIL, (u64)d->avail);
	mw64(d, MMIO_QUEUE_USED, (u64)d->used);
	mw(d, MMIO_QUEUE_READY, 1);
	mw(d, MMIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	u32 st = mr(d, MMIO_STATUS);
	if (!(st & S_NEEDS_RESET)) {
		kprintf("DISK FAIL dev=%u oversized queue accepted (status 0x%x)\n", dev, st);
		bad = 1;
	}
	/* A reset recovers. */
	if (blk_init(d, d->mmio, rings)) {
		kprintf("DISK FAIL dev=%u no recovery after a reset\n", dev);
		return 1;
	}
	bad |= expect(blk_request(d, BLK_T_IN, 0, buf, SECTOR, &ul), BLK_S_OK, "read after reset", dev);
	if (!bad)
		kprintf("DISK out-of-spec dev=%u ok needs_reset_status=0x%x\n", dev, st);
	return bad;
}

void disk_prepare(u64 area, int unique)
{
	/* Identical pages (the merge daemon can merge them before the disk reads into them),
	 * or pages all different from each other. */
	volatile u64 *w = (volatile u64 *)(area + DISK_RINGS_BYTES);
	for (u64 i = 0; i < DISK_CHUNK / 8; i++)
		w[i] = mix64(0xd15c + (unique ? i : i % WORDS_PER_PAGE));
	kprintf("DISKPREP pages=%llu unique=%d\n", DISK_CHUNK / PAGE_SIZE, unique);
}

int disk_workload(u64 bp, const struct disk_params *p)
{
	tsc_khz = p->tsc_khz;
	u64 bases[MAX_DISKS];
	u32 gsis[MAX_DISKS];
	u32 n = acpi_virtio_mmio(bp, bases, gsis, MAX_DISKS);
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
		bad |= irq_check(&d, dev, gsis[i], buf);
		bad |= out_of_spec(&d, dev, rings, buf);
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
		vmmio_reset(d.mmio);
	}
	if (!disks) {
		kprintf("DISK FAIL no virtio-blk device in the DSDT (%u virtio-mmio devices)\n", n);
		return 1;
	}
	kprintf(bad ? "DISK FAILED disks=%u\n" : "DISK OK disks=%u\n", disks);
	return bad;
}
