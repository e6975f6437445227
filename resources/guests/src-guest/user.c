// SPDX-License-Identifier: Apache-2.0
/*
 * tinyvmm test guest: the CPL3 part (runs at native speed, IOPL=3).
 *
 * Boot checks (e820, command line, initrd), the fill-area layout, and the
 * workloads: hello, fill, wait, verify, churn, serve, crash, pagefault, corrupt, free (and
 * acpi, in acpi.c; the balloon driver's mechanics are in balloon.c).
 * README.md documents every serial line printed here.
 *
 * One file although it is long: it is one freestanding program whose parts share the
 * parsed parameters, the fill-area layout and the page versions as file-scope state;
 * the page contents and layouts live apart in content.c.
 */
#include "guest.h"

#define MIB (1ULL << 20)
#define MAX_WORKLOADS 32
#define MAX_RANGES 64
#define MAX_FAIL_LINES 8

enum workload { W_HELLO, W_FILL, W_WAIT, W_VERIFY, W_CHURN, W_SERVE, W_CRASH, W_PAGEFAULT, W_CORRUPT, W_ACPI,
		W_DISK, W_DISKPREP, W_VSOCK, W_FREE };
static const char *const workload_names[] = { "hello", "fill",	"wait",	     "verify",	"churn", "serve",
					      "crash", "pagefault", "corrupt", "acpi", "disk", "diskprep",
					      "vsock", "free" };
#define N_WORKLOAD_NAMES (sizeof(workload_names) / sizeof(workload_names[0]))

static struct params {
	enum workload work[MAX_WORKLOADS];
	u32 nwork;
	u64 mib; /* 0: all free RAM */
	u64 shared_pct, zero_pct;
	u64 seed, guest_seed;
	u64 wait_ms, churn_per_ms, duration_ms, verify_every_ms, verify_loop;
	u64 churn_tick_ms, serve_poll_ms;
	u64 corrupt_page;
	u64 free_pct;
	u64 free_report;
	u64 mem_mib; /* 0: no check */
	enum layout_kind layout;
	u64 run;
	u64 disk_seed, disk0_sum, disk1_sum, diskprep_unique;
	u64 vsock_cid, vsock_port, vsock_msgs, vsock_size, vsock_listen, vsock_accepts, vsock_wait_ms,
	    vsock_bad;
} P;
/* RAM set aside for the disk workload (its rings and data buffer), 0 if none. */
static u64 disk_area;
static struct layout L;

static u64 tsc_khz;
static const char *tsc_source;
static u32 hv_max_leaf;
static int sleep_hlt;
static int failed;

struct range {
	u64 start, end;
};
/* Fill area: segments of contiguous pages, page index increasing with address. */
static struct seg {
	u64 gpa, first, n;
} segs[MAX_RANGES];
static u32 nsegs;
static u64 npages;
static u32 *versions;
static int filled;
/* Special versions: a page given back to the host (reported free, or deflated) reads zero
 * until the guest writes it; a page in the balloon is not the guest's to read. */
#define VERSION_FREED 0xffffffffU
#define VERSION_BALLOON 0xfffffffeU
/* A page released without telling the host (free_report=0): free memory whose content
 * nobody checks. */
#define VERSION_FREE_KEPT 0xfffffffdU
/* The version a rewrite gives a page: the next one, and 1 after a special version. */
static inline u32 next_version(u32 v)
{
	return v + 1 >= VERSION_FREE_KEPT || v + 1 == 0 ? 1 : v + 1;
}
static u32 balloon_pages; /* the last balloon_pages fill pages are in the balloon */

/* ---------------------------------------------------------------- time */

static inline u64 cycles_to_us(u64 c) { return c / tsc_khz * 1000 + c % tsc_khz * 1000 / tsc_khz; }
static inline u64 cycles_to_ns(u64 c)
{
	return c < (1ULL << 40) ? c * 1000000 / tsc_khz : cycles_to_us(c) * 1000;
}
static inline u64 cycles_to_ms(u64 c) { return c / tsc_khz; }

/*
 * Sleep until the TSC reaches deadline: LAPIC timer + hlt at CPL0, else pause.
 * With stop_on_input, also return as soon as the UART has received data.
 */
static void sleep_until_or_input(u64 deadline, int stop_on_input)
{
	for (;;) {
		u64 now = rdtsc();
		if (now >= deadline)
			return;
		u64 ns = cycles_to_ns(deadline - now);
		if (sleep_hlt && ns > 20000) {
			u64 r = syscall1(SYS_SLEEP_NS, ns);
			if (r == 1 && stop_on_input)
				return;
			if (r != (u64)-1)
				continue;
			sleep_hlt = 0;
		}
		if (stop_on_input && (inb(COM1_LSR) & 0x01))
			return;
		cpu_relax();
	}
}

static void sleep_until(u64 deadline) { sleep_until_or_input(deadline, 0); }

static void sleep_ms(u64 ms) { sleep_until(rdtsc() + ms * tsc_khz); }

/* TSC frequency: hypervisor timing leaf, else the PIT (channel 2, 20 ms). */
static void tsc_init(void)
{
	hv_max_leaf = boot_info.hv_max_leaf;
	if (boot_info.cpuid_tsc_khz) {
		tsc_khz = boot_info.cpuid_tsc_khz;
		tsc_source = "cpuid";
		return;
	}
	const u32 latch = 1193182 / 50; /* 20 ms */
	outb(0x61, (inb(0x61) & ~0x02) | 0x01);
	outb(0x43, 0xb0); /* channel 2, lobyte/hibyte, mode 0 */
	outb(0x42, latch & 0xff);
	outb(0x42, latch >> 8);
	u64 t0 = rdtsc(), t1 = t0;
	u32 polls = 0;
	while (!(inb(0x61) & 0x20) && ++polls < 10000000)
		t1 = rdtsc();
	t1 = rdtsc();
	if (polls < 10000000 && t1 > t0) {
		tsc_khz = (t1 - t0) / 20;
		tsc_source = "pit";
	} else {
		tsc_khz = 2000000;
		tsc_source = "default";
	}
}

/* -------------------------------------------------------------- parsing */

static int streq_n(const char *a, usize n, const char *b)
{
	usize i = 0;
	for (; i < n; i++)
		if (!b[i] || a[i] != b[i])
			return 0;
	return b[i] == 0;
}

/* Decimal or 0x-hex; returns 0 on a malformed number (and sets *ok = 0). */
static u64 parse_u64(const char *s, usize n, int *ok)
{
	u64 v = 0;
	usize i = 0;
	unsigned base = 10;
	if (n > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		i = 2;
	}
	if (i == n)
		*ok = 0;
	for (; i < n; i++) {
		char c = s[i];
		unsigned d;
		if (c >= '0' && c <= '9')
			d = c - '0';
		else if (base == 16 && c >= 'a' && c <= 'f')
			d = c - 'a' + 10;
		else if (base == 16 && c >= 'A' && c <= 'F')
			d = c - 'A' + 10;
		else {
			*ok = 0;
			return 0;
		}
		v = v * base + d;
	}
	return v;
}

static void check_fail(const char *what, const char *detail)
{
	kprintf("BOOTCHECK FAIL %s%s\n", what, detail ? detail : "");
	failed = 1;
}

static void parse_workloads(const char *v, usize n)
{
	P.nwork = 0;
	usize i = 0;
	while (i <= n) {
		usize j = i;
		while (j < n && v[j] != ',')
			j++;
		if (j > i) {
			u32 w;
			for (w = 0; w < N_WORKLOAD_NAMES; w++)
				if (streq_n(v + i, j - i, workload_names[w]))
					break;
			if (w == N_WORKLOAD_NAMES) {
				char name[64];
				usize len = j - i < 63 ? j - i : 63;
				memcpy(name, v + i, len);
				name[len] = 0;
				check_fail("unknown workload ", name);
			} else if (P.nwork < MAX_WORKLOADS) {
				P.work[P.nwork++] = (enum workload)w;
			} else {
				check_fail("too many workloads", NULL);
			}
		}
		i = j + 1;
	}
}

static void parse_cmdline(const char *s, usize len)
{
	P.nwork = 1;
	P.work[0] = W_HELLO;
	P.shared_pct = 60;
	P.zero_pct = 20;
	P.seed = 1;
	P.guest_seed = 2;
	P.churn_per_ms = 10;
	P.duration_ms = 1000;
	P.churn_tick_ms = 1;
	P.serve_poll_ms = 100;
	P.layout = LAYOUT_SAME;
	P.run = 16;
	P.vsock_msgs = 10000;
	P.vsock_size = 64;
	P.vsock_accepts = 1;
	P.vsock_wait_ms = 60000;
	P.free_report = 1;

	usize i = 0;
	while (i < len) {
		while (i < len && s[i] == ' ')
			i++;
		usize start = i;
		while (i < len && s[i] != ' ')
			i++;
		usize eq = start;
		while (eq < i && s[eq] != '=')
			eq++;
		if (eq == i)
			continue; /* not key=value */
		const char *k = s + start, *v = s + eq + 1;
		usize kn = eq - start, vn = i - eq - 1;
		static const struct {
			const char *name;
			u64 *dst;
		} nums[] = {
			{ "mib", &P.mib },
			{ "shared_pct", &P.shared_pct },
			{ "zero_pct", &P.zero_pct },
			{ "seed", &P.seed },
			{ "guest_seed", &P.guest_seed },
			{ "wait_ms", &P.wait_ms },
			{ "churn_per_ms", &P.churn_per_ms },
			{ "duration_ms", &P.duration_ms },
			{ "verify_every_ms", &P.verify_every_ms },
			{ "verify_loop", &P.verify_loop },
			{ "mem_mib", &P.mem_mib },
			{ "churn_tick_ms", &P.churn_tick_ms },
			{ "serve_poll_ms", &P.serve_poll_ms },
			{ "corrupt_page", &P.corrupt_page },
			{ "free_pct", &P.free_pct },
			{ "free_report", &P.free_report },
			{ "run", &P.run },
			{ "disk_seed", &P.disk_seed },
			{ "disk0_sum", &P.disk0_sum },
			{ "disk1_sum", &P.disk1_sum },
			{ "diskprep_unique", &P.diskprep_unique },
			{ "vsock_cid", &P.vsock_cid },
			{ "vsock_port", &P.vsock_port },
			{ "vsock_msgs", &P.vsock_msgs },
			{ "vsock_size", &P.vsock_size },
			{ "vsock_listen", &P.vsock_listen },
			{ "vsock_accepts", &P.vsock_accepts },
			{ "vsock_wait_ms", &P.vsock_wait_ms },
			{ "vsock_bad", &P.vsock_bad },
		};
		if (streq_n(k, kn, "workload")) {
			parse_workloads(v, vn);
			continue;
		}
		if (streq_n(k, kn, "layout")) {
			if (streq_n(v, vn, "same"))
				P.layout = LAYOUT_SAME;
			else if (streq_n(v, vn, "shuffled"))
				P.layout = LAYOUT_SHUFFLED;
			else if (streq_n(v, vn, "clustered"))
				P.layout = LAYOUT_CLUSTERED;
			else
				check_fail("bad layout (same, shuffled or clustered)", NULL);
			continue;
		}
		for (u32 n = 0; n < sizeof(nums) / sizeof(nums[0]); n++) {
			if (streq_n(k, kn, nums[n].name)) {
				int ok = 1;
				u64 x = parse_u64(v, vn, &ok);
				if (!ok)
					check_fail("bad number for ", nums[n].name);
				else
					*nums[n].dst = x;
			}
		}
	}
	if (!P.churn_tick_ms)
		P.churn_tick_ms = 1;
	if (!P.serve_poll_ms)
		P.serve_poll_ms = 1;
	if (P.shared_pct + P.zero_pct > 100)
		check_fail("shared_pct+zero_pct>100", NULL);
	if (!P.run)
		check_fail("run=0", NULL);
}

/* --------------------------------------------------------- boot checks */

struct e820 {
	u64 addr, size;
	u32 type;
} __attribute__((packed));

static const struct e820 *e820_table(u64 bp, u32 *n)
{
	*n = bp_u8(bp, BP_E820_ENTRIES);
	if (*n > E820_MAX_ENTRIES)
		*n = E820_MAX_ENTRIES;
	return (const struct e820 *)(bp + BP_E820_TABLE);
}

/* Is [addr, addr+size) inside one usable RAM entry? */
static int in_ram(u64 bp, u64 addr, u64 size)
{
	u32 n;
	const struct e820 *e = e820_table(bp, &n);
	for (u32 i = 0; i < n; i++)
		if (e[i].type == E820_RAM && addr >= e[i].addr && addr + size >= addr &&
		    addr + size <= e[i].addr + e[i].size)
			return 1;
	return 0;
}

static u64 cmdline_addr, cmdline_len, initrd_addr, initrd_size;

static void boot_checks(void)
{
	u64 bp = boot_info.boot_params;
	u32 n;
	const struct e820 *e = e820_table(bp, &n);
	u64 ram = 0;
	for (u32 i = 0; i < n; i++)
		if (e[i].type == E820_RAM)
			ram += e[i].size;
	kprintf("E820 entries=%u ram_kib=%llu\n", n, ram >> 10);
	if (n == 0)
		check_fail("e820 table is empty", NULL);

	/* Command line: present, in RAM, NUL-terminated within cmdline_size, printable. */
	cmdline_addr = bp_u32(bp, BP_CMD_LINE_PTR) | ((u64)bp_u32(bp, BP_EXT_CMD_LINE_PTR) << 32);
	u64 max = bp_u32(bp, BP_CMDLINE_SIZE);
	if (max == 0 || max > 65536)
		max = 2047;
	const char *cl = (const char *)cmdline_addr;
	if (!cmdline_addr) {
		kprintf("CMDLINE \n");
		check_fail("cmdline missing (cmd_line_ptr=0)", NULL);
	} else if (!in_ram(bp, cmdline_addr, 1)) {
		kprintf("CMDLINE \n");
		check_fail("cmdline not in usable RAM", NULL);
	} else {
		while (cmdline_len <= max && cl[cmdline_len])
			cmdline_len++;
		kprintf("CMDLINE ");
		serial_write(cl, cmdline_len > max ? max : cmdline_len);
		serial_putc('\n');
		if (cmdline_len > max)
			check_fail("cmdline not NUL-terminated within cmdline_size", NULL);
		else if (!in_ram(bp, cmdline_addr, cmdline_len + 1))
			check_fail("cmdline not in usable RAM", NULL);
		for (u64 i = 0; i < cmdline_len && i <= max; i++) {
			if ((u8)cl[i] < 0x20 || (u8)cl[i] > 0x7e) {
				check_fail("cmdline has a non-printable byte", NULL);
				break;
			}
		}
		parse_cmdline(cl, cmdline_len > max ? max : cmdline_len);
	}
	if (!cmdline_addr || cmdline_len == 0)
		parse_cmdline("", 0);

	if (P.mem_mib) {
		u64 hi = P.mem_mib * MIB, lo = hi - MIB;
		if (ram < lo || ram > hi) {
			kprintf("BOOTCHECK FAIL e820 ram_kib=%llu not within [%llu, %llu] for mem_mib=%llu\n",
				ram >> 10, lo >> 10, hi >> 10, P.mem_mib);
			failed = 1;
		}
	}

	/* Initrd: inside usable RAM; FNV-1a 64 of its bytes. */
	initrd_addr = bp_u32(bp, BP_RAMDISK_IMAGE) | ((u64)bp_u32(bp, BP_EXT_RAMDISK_IMAGE) << 32);
	initrd_size = bp_u32(bp, BP_RAMDISK_SIZE) | ((u64)bp_u32(bp, BP_EXT_RAMDISK_SIZE) << 32);
	if (initrd_size) {
		if (!in_ram(bp, initrd_addr, initrd_size) || initrd_addr + initrd_size > boot_info.mapped_end) {
			kprintf("INITRD addr=0x%llx size=%llu sum=0x0\n", initrd_addr, initrd_size);
			check_fail("initrd not in usable RAM", NULL);
		} else {
			u64 h = 0xcbf29ce484222325ULL;
			const u8 *p = (const u8 *)initrd_addr;
			for (u64 i = 0; i < initrd_size; i++)
				h = (h ^ p[i]) * 0x100000001b3ULL;
			kprintf("INITRD addr=0x%llx size=%llu sum=0x%016llx\n", initrd_addr, initrd_size, h);
		}
	}
}

/* -------------------------------------------------------------- layout */

static struct range ranges[MAX_RANGES];
static u32 nranges;

static void range_subtract(u64 s, u64 e)
{
	if (e <= s)
		return;
	for (u32 i = 0; i < nranges; i++) {
		struct range r = ranges[i];
		if (e <= r.start || s >= r.end)
			continue;
		if (s <= r.start && e >= r.end) { /* remove */
			for (u32 j = i; j + 1 < nranges; j++)
				ranges[j] = ranges[j + 1];
			nranges--;
			i--;
		} else if (s > r.start && e < r.end) { /* split */
			if (nranges == MAX_RANGES) {
				ranges[i].end = s;
				continue;
			}
			for (u32 j = nranges; j > i + 1; j--)
				ranges[j] = ranges[j - 1];
			nranges++;
			ranges[i].end = s;
			ranges[i + 1].start = e;
			ranges[i + 1].end = r.end;
			i++;
		} else if (s <= r.start) {
			ranges[i].start = e;
		} else {
			ranges[i].end = s;
		}
	}
}

static void layout(void)
{
	u64 bp = boot_info.boot_params;
	u32 n;
	const struct e820 *e = e820_table(bp, &n);
	nranges = 0;
	for (u32 i = 0; i < n && nranges < MAX_RANGES; i++) {
		if (e[i].type != E820_RAM)
			continue;
		u64 s = e[i].addr, end = e[i].addr + e[i].size;
		if (s < MIB)
			s = MIB;
		if (end > boot_info.mapped_end)
			end = boot_info.mapped_end;
		s = (s + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
		end &= ~(PAGE_SIZE - 1);
		if (end <= s)
			continue;
		/* insertion sort by address */
		u32 j = nranges++;
		while (j > 0 && ranges[j - 1].start > s) {
			ranges[j] = ranges[j - 1];
			j--;
		}
		ranges[j].start = s;
		ranges[j].end = end;
	}
	u64 pd = ~(PAGE_SIZE - 1);
	range_subtract((u64)__image_start & pd, boot_info.image_end);
	range_subtract(initrd_addr & pd, (initrd_addr + initrd_size + PAGE_SIZE - 1) & pd);
	range_subtract(bp & pd, (bp & pd) + PAGE_SIZE);
	if (cmdline_addr)
		range_subtract(cmdline_addr & pd, (cmdline_addr + cmdline_len + PAGE_SIZE) & pd);

	/* The disk workload's area: at the end of the first range large enough. */
	for (u32 k = 0; k < P.nwork && !disk_area; k++) {
		if (P.work[k] != W_DISK && P.work[k] != W_DISKPREP)
			continue;
		for (u32 i = 0; i < nranges; i++) {
			if (ranges[i].end - ranges[i].start >= DISK_AREA_BYTES) {
				disk_area = ranges[i].end - DISK_AREA_BYTES;
				range_subtract(disk_area, ranges[i].end);
				break;
			}
		}
		if (!disk_area) {
			kprintf("BOOTCHECK FAIL no room for the disk workload's buffers\n");
			failed = 1;
			return;
		}
	}

	u64 avail = 0;
	for (u32 i = 0; i < nranges; i++)
		avail += (ranges[i].end - ranges[i].start) / PAGE_SIZE;
	u64 want = P.mib ? P.mib * (MIB / PAGE_SIZE) : avail;
	if (want > avail)
		want = avail;
	u64 meta_pages = (want * sizeof(u32) + PAGE_SIZE - 1) / PAGE_SIZE;
	/* Version array: in the first range large enough, at its start. */
	u64 meta = 0;
	for (u32 i = 0; i < nranges; i++) {
		if ((ranges[i].end - ranges[i].start) / PAGE_SIZE >= meta_pages) {
			meta = ranges[i].start;
			range_subtract(meta, meta + meta_pages * PAGE_SIZE);
			break;
		}
	}
	if (!meta && meta_pages) {
		kprintf("BOOTCHECK FAIL no room for the page version array (%llu pages)\n", meta_pages);
		failed = 1;
		return;
	}
	versions = (u32 *)meta;
	if (want > avail - meta_pages)
		want = avail - meta_pages;
	npages = 0;
	nsegs = 0;
	for (u32 i = 0; i < nranges && npages < want; i++) {
		u64 cnt = (ranges[i].end - ranges[i].start) / PAGE_SIZE;
		if (cnt > want - npages)
			cnt = want - npages;
		segs[nsegs].gpa = ranges[i].start;
		segs[nsegs].first = npages;
		segs[nsegs].n = cnt;
		nsegs++;
		npages += cnt;
	}
	L.kind = P.layout;
	L.run = P.layout == LAYOUT_CLUSTERED ? P.run : 1;
	L.npages = npages;
	L.key = P.guest_seed;
	static const char *const layout_names[] = { "same", "shuffled", "clustered" };
	kprintf("LAYOUT fill_pages=%llu fill_kib=%llu segments=%u first_gpa=0x%llx meta_gpa=0x%llx "
		"meta_pages=%llu image_end=0x%llx layout=%s run=%llu\n",
		npages, npages * 4, nsegs, nsegs ? segs[0].gpa : 0, meta, meta_pages,
		boot_info.image_end, layout_names[L.kind], L.run);
	if (P.mib && npages < P.mib * (MIB / PAGE_SIZE)) {
		kprintf("BOOTCHECK FAIL mib=%llu exceeds the free RAM (%llu KiB)\n", P.mib, npages * 4);
		failed = 1;
	}
}

static u64 page_gpa(u64 i)
{
	for (u32 s = 0; s < nsegs; s++)
		if (i - segs[s].first < segs[s].n)
			return segs[s].gpa + (i - segs[s].first) * PAGE_SIZE;
	return 0;
}

/* ----------------------------------------------------------- workloads */

static void do_fill(int bump)
{
	u64 counts[3] = { 0, 0, 0 }, sum = 0;
	u64 t0 = rdtsc();
	for (u32 s = 0; s < nsegs; s++) {
		volatile u64 *page = (volatile u64 *)segs[s].gpa;
		for (u64 i = segs[s].first; i < segs[s].first + segs[s].n; i++, page += WORDS_PER_PAGE) {
			u64 lp = layout_logical(&L, i);
			enum page_class cls = layout_class(&L, P.seed, lp, P.shared_pct, P.zero_pct);
			if (bump && versions[i] == VERSION_BALLOON)
				continue;
			u32 v = bump ? next_version(versions[i]) : 0;
			versions[i] = v;
			counts[cls]++;
			sum += page_write(page, cls, v, page_key(P.seed, P.guest_seed, cls, lp, v));
		}
	}
	u64 c = rdtsc() - t0;
	u64 us = cycles_to_us(c);
	if (!us)
		us = 1;
	filled = 1;
	kprintf("FILL done pages=%llu shared=%llu zero=%llu unique=%llu checksum=0x%016llx ms=%llu mbps=%llu\n",
		npages, counts[CLASS_SHARED], counts[CLASS_ZERO], counts[CLASS_UNIQUE], sum,
		cycles_to_ms(c), npages * PAGE_SIZE / us);
}

/* Check one page; returns the byte offset of the first bad word or -1. */
static i64 verify_page(u64 i, const volatile u64 *p, u64 *expected, u64 *got)
{
	u64 lp = layout_logical(&L, i);
	enum page_class cls = layout_class(&L, P.seed, lp, P.shared_pct, P.zero_pct);
	u32 v = versions[i];
	if (v == VERSION_BALLOON || v == VERSION_FREE_KEPT)
		return -1;
	if ((cls == CLASS_ZERO && v == 0) || v == VERSION_FREED) {
		for (u32 j = 0; j < WORDS_PER_PAGE; j++) {
			if (p[j]) {
				*expected = 0;
				*got = p[j];
				return j * 8;
			}
		}
		return -1;
	}
	u64 key = page_key(P.seed, P.guest_seed, cls, lp, v);
	for (u32 j = 0; j < WORDS_PER_PAGE; j++) {
		u64 w = page_word(key, j);
		if (p[j] != w) {
			*expected = w;
			*got = p[j];
			return j * 8;
		}
	}
	return -1;
}

static void verify_pass(void)
{
	u64 bad = 0;
	u64 t0 = rdtsc();
	for (u32 s = 0; s < nsegs; s++) {
		const volatile u64 *page = (const volatile u64 *)segs[s].gpa;
		for (u64 i = segs[s].first; i < segs[s].first + segs[s].n; i++, page += WORDS_PER_PAGE) {
			u64 exp, got;
			i64 off = verify_page(i, page, &exp, &got);
			if (off < 0)
				continue;
			if (bad < MAX_FAIL_LINES)
				kprintf("VERIFY FAIL page=%llu gpa=0x%llx expected=0x%016llx got=0x%016llx offset=%lld\n",
					i, (u64)page, exp, got, off);
			bad++;
		}
	}
	u64 ms = cycles_to_ms(rdtsc() - t0);
	if (bad) {
		kprintf("VERIFY FAILED mismatches=%llu pages=%llu ms=%llu\n", bad, npages, ms);
		failed = 1;
	} else {
		kprintf("VERIFY OK pages=%llu ms=%llu\n", npages, ms);
	}
}

/* Latency histogram: exact below 8 ns, then 4 buckets per power of two. */
#define HIST_BUCKETS 256
static u64 hist[HIST_BUCKETS];

static u32 hist_bucket(u64 ns)
{
	if (ns < 8)
		return (u32)ns;
	u32 msb = 63 - __builtin_clzll(ns);
	return (msb - 1) * 4 + ((ns >> (msb - 2)) & 3);
}

static u64 hist_upper(u32 b)
{
	if (b < 8)
		return b;
	u32 msb = b / 4 + 1, sub = b % 4;
	return ((4ULL + sub + 1) << (msb - 2)) - 1;
}

static u64 hist_percentile(u64 total, u64 permille, u64 max)
{
	u64 need = (total * permille + 999) / 1000, cum = 0;
	if (!need)
		need = 1;
	for (u32 b = 0; b < HIST_BUCKETS; b++) {
		cum += hist[b];
		if (cum >= need)
			return hist_upper(b) < max ? hist_upper(b) : max;
	}
	return max;
}

static u64 rng_state;
static inline u64 rng_next(void)
{
	u64 x = rng_state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	rng_state = x;
	return x * 0x2545f4914f6cdd1dULL;
}

/* Rewrite one random page with its next version; returns the first-store latency in cycles. */
static u64 churn_one(void)
{
	u64 i = (u64)(((unsigned __int128)rng_next() * npages) >> 64);
	if (i >= npages - balloon_pages)
		i -= balloon_pages;
	u64 lp = layout_logical(&L, i);
	enum page_class cls = layout_class(&L, P.seed, lp, P.shared_pct, P.zero_pct);
	u32 v = next_version(versions[i]);
	u64 key = page_key(P.seed, P.guest_seed, cls, lp, v);
	volatile u64 *p = (volatile u64 *)page_gpa(i);
	u64 w0 = page_word(key, 0);
	u32 lo, hi;
	__asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi)::"memory");
	u64 t0 = ((u64)hi << 32) | lo;
	p[0] = w0;
	__asm__ volatile("mfence; lfence; rdtsc" : "=a"(lo), "=d"(hi)::"memory");
	u64 t1 = ((u64)hi << 32) | lo;
	for (u32 j = 1; j < WORDS_PER_PAGE; j++)
		p[j] = page_word(key, j);
	versions[i] = v;
	return t1 - t0;
}

static void do_churn(u64 per_ms, u64 duration_ms, u64 verify_every_ms)
{
	memset(hist, 0, sizeof(hist));
	if (!rng_state)
		rng_state = mix64(P.guest_seed ^ 0x636875726e000000ULL) | 1;
	u64 cpm = tsc_khz; /* cycles per ms */
	u64 tick = P.churn_tick_ms * cpm;
	u64 total = per_ms * duration_ms, done = 0, lat_max = 0;
	u64 start = rdtsc(), end = start + duration_ms * cpm;
	u64 vstep = verify_every_ms * cpm, next_verify = vstep ? start + vstep : ~0ULL;
	for (;;) {
		u64 now = rdtsc();
		u64 el = now - start;
		u64 due = now >= end ? total : el * per_ms / cpm;
		if (due > total)
			due = total;
		for (; done < due; done++) {
			u64 ns = cycles_to_ns(churn_one());
			hist[hist_bucket(ns)]++;
			if (ns > lat_max)
				lat_max = ns;
		}
		if (now >= end)
			break;
		if (vstep && rdtsc() >= next_verify) {
			verify_pass();
			next_verify += vstep;
			if (next_verify < rdtsc())
				next_verify = rdtsc() + vstep;
			continue;
		}
		/* Writes come in batches, one per tick (churn_tick_ms); sleep until the next. */
		u64 next = start + (el / tick + 1) * tick;
		if (next > end)
			next = end;
		if (next > next_verify)
			next = next_verify;
		sleep_until(next);
	}
	u64 ms = cycles_to_ms(rdtsc() - start);
	kprintf("CHURN done writes=%llu ms=%llu lat_p50_ns=%llu lat_p99_ns=%llu lat_max_ns=%llu\n", done,
		ms, hist_percentile(done, 500, lat_max), hist_percentile(done, 990, lat_max), lat_max);
}

static int need_fill(const char *what)
{
	if (filled && npages)
		return 1;
	kprintf("ERROR %s needs a fill first (fill_pages=%llu)\n", what, npages);
	failed = 1;
	return 0;
}

static void do_verify_workload(int after_wait, int last)
{
	if (P.wait_ms && !after_wait) {
		sleep_ms(P.wait_ms);
	}
	if (!need_fill("verify"))
		return;
	u64 start = rdtsc();
	verify_pass();
	if (last && P.verify_loop && P.duration_ms) {
		while (rdtsc() - start < P.duration_ms * tsc_khz)
			verify_pass();
	}
}


/* ------------------------------------------------------------- balloon */

/* Whether fill page i is among the free_pct % that `free` releases (a fixed pattern of
 * guest_seed, so that verify and the host's tests know it). */
static int free_pick(u64 i, u64 pct)
{
	return mix64(P.guest_seed ^ 0x6672656570616765ULL ^ i) % 100 < pct;
}

static int balloon_ready(void)
{
	if (balloon_present())
		return 1;
	if (balloon_init() == 0) {
		kprintf("BALLOON ready target=%u\n", balloon_target());
		return 1;
	}
	return 0;
}

/* `free`: releases pct % of the fill pages and reports them to the host (free page
 * reporting) in runs of consecutive pages; they must read zero afterwards. */
static void do_free(u64 pct)
{
	if (!need_fill("free"))
		return;
	if (!P.free_report) {
		/* Released inside the guest only: the host keeps the pages. */
		u64 kept = 0;
		for (u64 i = 0; i < npages - balloon_pages; i++) {
			if (versions[i] != VERSION_FREED && versions[i] != VERSION_FREE_KEPT && free_pick(i, pct)) {
				versions[i] = VERSION_FREE_KEPT;
				kept++;
			}
		}
		kprintf("FREE done pages=%llu runs=0 requests=0 us=0\n", kept);
		return;
	}
	if (!balloon_ready()) {
		kprintf("ERROR free needs a virtio-balloon (tinyvmm run --balloon)\n");
		failed = 1;
		return;
	}
	static u64 gpa[BALLOON_MAX_RANGES], len[BALLOON_MAX_RANGES];
	u32 n = 0;
	u64 pages = 0, runs = 0, requests = 0;
	u64 t0 = rdtsc();
	u64 last = npages - balloon_pages;
	for (u32 s = 0; s < nsegs; s++) {
		for (u64 k = 0; k < segs[s].n; k++) {
			u64 i = segs[s].first + k;
			if (i >= last || versions[i] == VERSION_FREED || versions[i] == VERSION_FREE_KEPT ||
			    !free_pick(i, pct))
				continue;
			versions[i] = VERSION_FREED;
			u64 g = segs[s].gpa + k * PAGE_SIZE;
			pages++;
			if (n && gpa[n - 1] + len[n - 1] == g) {
				len[n - 1] += PAGE_SIZE;
				continue;
			}
			if (n == BALLOON_MAX_RANGES) {
				balloon_report(gpa, len, n);
				requests++;
				n = 0;
			}
			gpa[n] = g;
			len[n] = PAGE_SIZE;
			n++;
			runs++;
		}
	}
	if (n) {
		balloon_report(gpa, len, n);
		requests++;
	}
	u64 c = rdtsc() - t0;
	kprintf("FREE done pages=%llu runs=%llu requests=%llu us=%llu\n", pages, runs, requests, cycles_to_us(c));
}

/* `badreport` (serve): reports ranges the host must ignore, all over pages the guest still
 * uses: outside RAM, unaligned, and two that overlap. A following verify shows nothing was
 * dropped. */
static void do_bad_report(void)
{
	if (!need_fill("badreport") || !balloon_ready() || npages < 8)
		return;
	u64 gpa[4] = { 1ULL << 40, page_gpa(5) + 8, page_gpa(1), page_gpa(2) };
	u64 len[4] = { PAGE_SIZE, PAGE_SIZE, 2 * PAGE_SIZE, 2 * PAGE_SIZE };
	balloon_report(gpa, len, 4);
	kprintf("BADREPORT done ranges=4\n");
}

/* Moves pages between the guest and the balloon until it holds the host's target (at most
 * half the fill area); prints BALLOON when the size changed. */
static void balloon_follow_target(void)
{
	if (!filled || !npages)
		return;
	u32 target = balloon_target();
	if (target > npages / 2)
		target = (u32)(npages / 2);
	if (target == balloon_pages)
		return;
	static u32 pfns[256];
	while (balloon_pages != target) {
		int deflate = target < balloon_pages;
		u32 want = deflate ? balloon_pages - target : target - balloon_pages;
		u32 n = want < 256 ? want : 256;
		for (u32 j = 0; j < n; j++) {
			/* The balloon grows down from the last fill page. */
			u64 i = deflate ? npages - balloon_pages + j : npages - balloon_pages - 1 - j;
			pfns[j] = (u32)(page_gpa(i) >> 12);
			if (!deflate)
				versions[i] = VERSION_BALLOON;
		}
		balloon_pfns(deflate, pfns, n);
		for (u32 j = 0; deflate && j < n; j++)
			versions[npages - balloon_pages + j] = VERSION_FREED;
		balloon_pages = deflate ? balloon_pages - n : balloon_pages + n;
	}
	balloon_set_actual(balloon_pages);
	kprintf("BALLOON actual=%u target=%u\n", balloon_pages, balloon_target());
}

/* Statistics when the device asks for them: memory the guest does not use is what it
 * freed and what the balloon holds. */
static void balloon_send_stats(void)
{
	u64 freed = 0;
	for (u64 i = 0; filled && i < npages; i++)
		freed += versions[i] == VERSION_FREED;
	static const u16 tags[] = { 0, 1, 2, 3, 4, 5, 6, 7 };
	u64 vals[] = { 0, 0, 0, 0, freed * PAGE_SIZE, npages * PAGE_SIZE, freed * PAGE_SIZE, 0 };
	balloon_stats(tags, vals, 8);
}

/* Called while serve waits for input. */
static void balloon_service(void)
{
	if (!balloon_present())
		return;
	balloon_follow_target();
	balloon_send_stats();
}

/*
 * UART receive interrupt on or off: IER bit 0, MCR OUT2, IOAPIC pin 4 -> VEC_SERIAL
 * on this CPU. The interrupt only wakes the sleep syscall; data is read by polling.
 */
static void serial_irq(int on)
{
	volatile u32 *sel = (volatile u32 *)IOAPIC_BASE, *win = (volatile u32 *)(IOAPIC_BASE + 0x10);
	u32 apic_id = *(volatile u32 *)(LAPIC_BASE + 0x20) >> 24;
	*sel = 0x10 + 2 * COM1_GSI + 1;
	*win = apic_id << 24;
	*sel = 0x10 + 2 * COM1_GSI;
	*win = on ? VEC_SERIAL : 0x10000;
	outb(COM1 + 4, inb(COM1 + 4) | 0x08);
	outb(COM1 + 1, on ? 0x01 : 0x00);
}

/* Read one line from the UART (LSR bit 0); while it is empty, sleep until input or serve_poll_ms. */
static usize read_line(char *buf, usize cap)
{
	usize n = 0;
	for (;;) {
		if (!(inb(COM1_LSR) & 0x01)) {
			balloon_service();
			sleep_until_or_input(rdtsc() + P.serve_poll_ms * tsc_khz, 1);
			continue;
		}
		char c = (char)inb(COM1);
		if (c == '\r' || c == '\n') {
			if (n)
				break;
			continue;
		}
		if (n < cap - 1)
			buf[n++] = c;
	}
	buf[n] = 0;
	return n;
}

static const char *next_word(const char *s, const char **w, usize *n)
{
	while (*s == ' ' || *s == '\t')
		s++;
	*w = s;
	while (*s && *s != ' ' && *s != '\t')
		s++;
	*n = (usize)(s - *w);
	return s;
}

static void do_disk(void)
{
	struct disk_params dp = {
		.area = disk_area,
		.tsc_khz = tsc_khz,
		.seed = P.disk_seed,
		.sums = { P.disk0_sum, P.disk1_sum },
	};
	if (!disk_area) {
		kprintf("ERROR disk: no disk area (disk is not on the workload list)\n");
		failed = 1;
		return;
	}
	if (disk_workload(boot_info.boot_params, &dp))
		failed = 1;
}

static void do_serve(void)
{
	char line[128];
	serial_irq(1);
	if (balloon_ready())
		balloon_service();
	for (;;) {
		kprintf("SERVE ready\n");
		read_line(line, sizeof(line));
		const char *w;
		usize wn;
		const char *rest = next_word(line, &w, &wn);
		if (streq_n(w, wn, "exit")) {
			serial_irq(0);
			kprintf("SERVE exit\n");
			return;
		} else if (streq_n(w, wn, "verify")) {
			if (need_fill("verify"))
				verify_pass();
		} else if (streq_n(w, wn, "fill")) {
			do_fill(filled);
		} else if (streq_n(w, wn, "free")) {
			const char *a;
			usize an;
			int ok = 1;
			next_word(rest, &a, &an);
			u64 pct = an ? parse_u64(a, an, &ok) : P.free_pct;
			if (!ok || pct > 100)
				kprintf("SERVE error usage: free P (0-100)\n");
			else
				do_free(pct);
		} else if (streq_n(w, wn, "badreport")) {
			do_bad_report();
		} else if (streq_n(w, wn, "hello")) {
			kprintf("HELLO from tinyvmm test guest\n");
		} else if (streq_n(w, wn, "disk")) {
			do_disk();
		} else if (streq_n(w, wn, "churn")) {
			const char *a, *b;
			usize an, bn;
			int ok = 1;
			rest = next_word(rest, &a, &an);
			next_word(rest, &b, &bn);
			u64 k = an ? parse_u64(a, an, &ok) : P.churn_per_ms;
			u64 d = bn ? parse_u64(b, bn, &ok) : P.duration_ms;
			if (!ok)
				kprintf("SERVE error usage: churn K D\n");
			else if (need_fill("churn"))
				do_churn(k, d, 0);
		} else if (wn) {
			kprintf("SERVE error unknown command '%s'\n", w);
		}
	}
}

__attribute__((noreturn)) static void finish(void)
{
	if (failed) {
		kprintf("DONE failed\n");
		debug_exit(EXIT_TEST_FAILED);
	}
	kprintf("DONE\n");
	outb(I8042_CMD, 0xfe);
	/* The VMM should be gone by now. */
	sleep_ms(1000);
	kprintf("GUEST PANIC: i8042 reset did not stop the VM\n");
	debug_exit(EXIT_INTERNAL_ERROR);
}

void umain(void)
{
	u64 t_user = rdtsc();
	tsc_init();
	sleep_hlt = boot_info.lapic_ok;
	kprintf("INFO tsc_khz=%llu tsc_source=%s hv_max_leaf=0x%x sleep=%s cpl0_us=%llu\n", tsc_khz,
		tsc_source, hv_max_leaf, sleep_hlt ? "hlt" : "pause",
		cycles_to_us(t_user - boot_info.tsc_entry));

	boot_checks();
	if (!failed)
		layout();
	if (failed)
		debug_exit(EXIT_TEST_FAILED);
	kprintf("BOOTCHECK OK\n");

	for (u32 k = 0; k < P.nwork; k++) {
		switch (P.work[k]) {
		case W_HELLO:
			kprintf("HELLO from tinyvmm test guest\n");
			break;
		case W_ACPI:
			if (acpi_check(boot_info.boot_params))
				failed = 1;
			break;
		case W_VSOCK: {
			struct vsock_params vp = {
				.tsc_khz = tsc_khz,
				.cid = P.vsock_cid,
				.port = P.vsock_port,
				.msgs = P.vsock_msgs,
				.size = P.vsock_size,
				.listen = P.vsock_listen,
				.accepts = P.vsock_accepts,
				.timeout_ms = P.vsock_wait_ms,
				.bad = P.vsock_bad,
			};
			if (vsock_workload(boot_info.boot_params, &vp))
				failed = 1;
			break;
		}
		case W_FILL:
			do_fill(0);
			break;
		case W_DISK:
			do_disk();
			break;
		case W_DISKPREP:
			disk_prepare(disk_area, P.diskprep_unique != 0);
			break;
		case W_WAIT: {
			u64 t0 = rdtsc();
			sleep_ms(P.wait_ms);
			kprintf("WAIT done ms=%llu\n", cycles_to_ms(rdtsc() - t0));
			break;
		}
		case W_VERIFY:
			do_verify_workload(k > 0 && P.work[k - 1] == W_WAIT, k + 1 == P.nwork);
			break;
		case W_CHURN:
			if (need_fill("churn"))
				do_churn(P.churn_per_ms, P.duration_ms, P.verify_every_ms);
			break;
		case W_SERVE:
			do_serve();
			break;
		case W_CRASH:
			kprintf("CRASH now\n");
			syscall1(SYS_CRASH, 0);
			kprintf("ERROR crash syscall returned\n");
			failed = 1;
			break;
		case W_FREE:
			do_free(P.free_pct);
			break;
		case W_CORRUPT:
			if (need_fill("corrupt")) {
				u64 i = P.corrupt_page < npages ? P.corrupt_page : npages - 1;
				volatile u64 *p = (volatile u64 *)page_gpa(i);
				p[3] = ~p[3];
				kprintf("CORRUPT page=%llu gpa=0x%llx offset=24\n", i, (u64)p);
			}
			break;
		case W_PAGEFAULT: {
			volatile u64 *bad = (volatile u64 *)0x7fffdead0000ULL;
			kprintf("PAGEFAULT addr=0x%llx\n", (u64)bad);
			(void)*bad;
			kprintf("ERROR pagefault did not fault\n");
			failed = 1;
			break;
		}
		}
	}
	finish();
}
