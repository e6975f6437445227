// SPDX-License-Identifier: Apache-2.0
/*
 * tinyvmm test guest: the `acpi` workload (CPL3; every page is user-accessible).
 *
 * Finds and checks the ACPI tables the way Linux does: the RSDP by scanning the BIOS
 * area 0xE0000-0xFFFFF on 16-byte boundaries (and, if boot_params.acpi_rsdp_addr is set,
 * it must be the same address); the RSDP's signature, checksum, revision 2 and extended
 * checksum; the XSDT and every table it lists (signature, length, checksum, not in usable
 * e820 RAM); FACP -> DSDT; the MADT's entries. Prints one line, ACPI OK ... or
 * ACPI FAIL <reason> (README.md).
 */
#include "guest.h"

#define BIOS_AREA_START 0xe0000ULL
#define BIOS_AREA_END 0x100000ULL
#define MMIO_GAP_START 0xc0000000ULL
#define MMIO_GAP_END 0x100000000ULL
#define HEADER_LEN 36
#define MAX_TABLE_LEN (1U << 20)
#define MAX_TABLES 16
#define MADT_ENTRIES 44
#define FADT_DSDT 40
#define FADT_X_DSDT 140

static u32 rd32(const u8 *p) { return p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24; }
static u64 rd64(const u8 *p) { return rd32(p) | (u64)rd32(p + 4) << 32; }

static int sums_to_zero(const u8 *p, u64 n)
{
	u8 s = 0;
	for (u64 i = 0; i < n; i++)
		s += p[i];
	return s == 0;
}

static int same(const u8 *p, const char *s, usize n)
{
	for (usize i = 0; i < n; i++)
		if (p[i] != (u8)s[i])
			return 0;
	return 1;
}

/* Mapped by the guest and not MMIO: [4 KiB, mapped_end) minus the 32-bit MMIO gap. */
static int readable(u64 addr, u64 len)
{
	u64 end = addr + len;
	return addr >= PAGE_SIZE && end >= addr && end <= boot_info.mapped_end &&
	       (end <= MMIO_GAP_START || addr >= MMIO_GAP_END);
}

/* Does [addr, addr+len) overlap usable e820 RAM (which the kernel would reuse)? */
static int in_usable_ram(u64 bp, u64 addr, u64 len)
{
	u32 n = bp_u8(bp, BP_E820_ENTRIES);
	if (n > E820_MAX_ENTRIES)
		n = E820_MAX_ENTRIES;
	for (u32 i = 0; i < n; i++) {
		u64 e = bp + BP_E820_TABLE + 20 * i;
		u64 start = *(volatile u64 *)e, size = *(volatile u64 *)(e + 8);
		if (*(volatile u32 *)(e + 16) == E820_RAM && addr < start + size && start < addr + len)
			return 1;
	}
	return 0;
}

static int fail(const char *what, u64 addr, const char *why)
{
	kprintf("ACPI FAIL %s at 0x%llx: %s\n", what, addr, why);
	return 1;
}

/* The first 16-byte boundary of the BIOS area with the RSDP signature and checksum. */
static u64 scan_rsdp(void)
{
	for (u64 a = BIOS_AREA_START; a < BIOS_AREA_END; a += 16) {
		const u8 *p = (const u8 *)a;
		if (same(p, "RSD PTR ", 8) && sums_to_zero(p, 20))
			return a;
	}
	return 0;
}

/* Checks the table at addr (its signature if sig != NULL); NULL if it is bad. */
static const u8 *table(u64 bp, u64 addr, const char *sig)
{
	char name[5] = "????";
	if (!readable(addr, HEADER_LEN)) {
		fail(sig ? sig : "table", addr, "outside guest memory");
		return NULL;
	}
	const u8 *p = (const u8 *)addr;
	memcpy(name, p, 4);
	if (sig && !same(p, sig, 4)) {
		kprintf("ACPI FAIL expected %s at 0x%llx, found %s\n", sig, addr, name);
		return NULL;
	}
	u32 len = rd32(p + 4);
	if (len < HEADER_LEN || len > MAX_TABLE_LEN || !readable(addr, len)) {
		kprintf("ACPI FAIL %s at 0x%llx: length %u\n", name, addr, len);
		return NULL;
	}
	if (in_usable_ram(bp, addr, len)) {
		fail(name, addr, "lies in usable e820 RAM");
		return NULL;
	}
	if (!sums_to_zero(p, len)) {
		fail(name, addr, "bad checksum");
		return NULL;
	}
	return p;
}

/* Counts the MADT's enabled local APICs (APIC ids must be distinct) and finds the IOAPIC. */
static int walk_madt(const u8 *m, u64 addr, u32 *lapics, u32 *ioapic, u32 *overrides)
{
	u8 seen[32] = { 0 }; /* a bitmap of APIC ids */
	u32 len = rd32(m + 4), n_ioapic = 0;
	*lapics = *ioapic = *overrides = 0;
	for (u32 off = MADT_ENTRIES; off < len;) {
		const u8 *e = m + off;
		u32 elen = off + 1 < len ? e[1] : 0;
		if (elen < 2 || off + elen > len)
			return fail("APIC", addr, "an entry overruns the table");
		if (e[0] == 0 && elen == 8 && (rd32(e + 4) & 1)) {
			if (seen[e[3] / 8] & (1 << (e[3] % 8)))
				return fail("APIC", addr, "two local APICs with the same APIC id");
			seen[e[3] / 8] |= 1 << (e[3] % 8);
			(*lapics)++;
		} else if (e[0] == 1 && elen == 12) {
			if (rd32(e + 8) == 0)
				*ioapic = rd32(e + 4);
			n_ioapic++;
		} else if (e[0] == 2 && elen == 10) {
			(*overrides)++;
		}
		off += elen;
	}
	if (*lapics == 0)
		return fail("APIC", addr, "no enabled local APIC");
	if (!*ioapic)
		return fail("APIC", addr, "no IOAPIC with GSI base 0");
	return 0;
}

/* Does the DSDT describe a PNP0501 (16550 UART) at port 0x3F8? */
static int dsdt_has_com1(const u8 *d)
{
	static const u8 hid[] = { '_', 'H', 'I', 'D', 0x0c, 0x41, 0xd0, 0x05, 0x01 };
	static const u8 io[] = { 0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03 };
	u32 len = rd32(d + 4);
	int has_hid = 0, has_io = 0;
	for (u32 i = HEADER_LEN; i + sizeof(hid) <= len; i++) {
		has_hid |= same(d + i, (const char *)hid, sizeof(hid));
		has_io |= same(d + i, (const char *)io, sizeof(io));
	}
	return has_hid && has_io;
}

int acpi_check(u64 bp)
{
	u64 rsdp = scan_rsdp();
	u64 bp_rsdp = bp_u64(bp, BP_ACPI_RSDP_ADDR);
	if (!rsdp)
		return fail("RSDP", BIOS_AREA_START, "no signature with a valid checksum in the BIOS area");
	if (bp_rsdp && bp_rsdp != rsdp)
		return fail("RSDP", bp_rsdp, "boot_params.acpi_rsdp_addr is not where the scan found it");
	const u8 *r = (const u8 *)rsdp;
	if (r[15] < 2)
		return fail("RSDP", rsdp, "revision below 2 (no XSDT)");
	u32 rlen = rd32(r + 20);
	if (rlen < 36 || rlen > 4096 || !sums_to_zero(r, rlen))
		return fail("RSDP", rsdp, "bad length or extended checksum");
	if (in_usable_ram(bp, rsdp, rlen))
		return fail("RSDP", rsdp, "lies in usable e820 RAM");

	u64 xsdt_addr = rd64(r + 24);
	const u8 *x = table(bp, xsdt_addr, "XSDT");
	if (!x)
		return 1;
	u32 xlen = rd32(x + 4);
	if ((xlen - HEADER_LEN) % 8 || (xlen - HEADER_LEN) / 8 > MAX_TABLES)
		return fail("XSDT", xsdt_addr, "bad number of entries");

	char names[5 * (MAX_TABLES + 1)];
	usize nn = 0;
	const u8 *fadt = NULL, *madt = NULL;
	u64 madt_addr = 0, fadt_addr = 0;
	for (u32 off = HEADER_LEN; off < xlen; off += 8) {
		u64 a = rd64(x + off);
		const u8 *t = table(bp, a, NULL);
		if (!t)
			return 1;
		if (same(t, "FACP", 4))
			fadt = t, fadt_addr = a;
		if (same(t, "APIC", 4))
			madt = t, madt_addr = a;
		memcpy(names + nn, t, 4);
		names[nn + 4] = ',';
		nn += 5;
	}
	if (!fadt)
		return fail("XSDT", xsdt_addr, "no FACP");
	if (!madt)
		return fail("XSDT", xsdt_addr, "no APIC (MADT)");
	if (rd32(fadt + 4) < FADT_X_DSDT + 8)
		return fail("FACP", fadt_addr, "too short for X_DSDT");
	u64 dsdt_addr = rd64(fadt + FADT_X_DSDT);
	if (!dsdt_addr)
		dsdt_addr = rd32(fadt + FADT_DSDT);
	const u8 *dsdt = table(bp, dsdt_addr, "DSDT");
	if (!dsdt)
		return 1;
	memcpy(names + nn, "DSDT", 4);
	names[nn + 4] = 0;

	u32 lapics, ioapic, overrides;
	if (walk_madt(madt, madt_addr, &lapics, &ioapic, &overrides))
		return 1;
	kprintf("ACPI OK rsdp=0x%llx bp_rsdp=0x%llx tables=%s lapics=%u ioapic=0x%x overrides=%u com1=%d\n",
		rsdp, bp_rsdp, names, lapics, ioapic, overrides, dsdt_has_com1(dsdt));
	return 0;
}

/* The DSDT through RSDP -> XSDT -> FACP, or NULL. */
static const u8 *find_dsdt(u64 bp)
{
	u64 rsdp = scan_rsdp();
	if (!rsdp)
		return NULL;
	const u8 *x = table(bp, rd64((const u8 *)rsdp + 24), "XSDT");
	if (!x)
		return NULL;
	u32 xlen = rd32(x + 4);
	for (u32 off = HEADER_LEN; off + 8 <= xlen; off += 8) {
		const u8 *t = table(bp, rd64(x + off), NULL);
		if (t && same(t, "FACP", 4) && rd32(t + 4) >= FADT_X_DSDT + 8) {
			u64 d = rd64(t + FADT_X_DSDT);
			return table(bp, d ? d : rd32(t + FADT_DSDT), "DSDT");
		}
	}
	return NULL;
}

u32 acpi_virtio_mmio(u64 bp, u64 *bases, u32 max)
{
	static const char hid[] = "LNRO0005";
	const u8 *d = find_dsdt(bp);
	if (!d)
		return 0;
	u32 len = rd32(d + 4), n = 0;
	for (u32 i = HEADER_LEN; i + sizeof(hid) <= len && n < max; i++) {
		if (!same(d + i, hid, sizeof(hid)))
			continue;
		/* The device's _CRS follows its _HID: the first Memory32Fixed descriptor. */
		for (u32 j = i + sizeof(hid); j + 12 <= len && j < i + 96; j++) {
			if (d[j] == 0x86 && d[j + 1] == 0x09 && d[j + 2] == 0x00) {
				bases[n++] = rd32(d + j + 4);
				break;
			}
		}
	}
	return n;
}
