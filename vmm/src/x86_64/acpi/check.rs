//! Reads the ACPI tables back out of guest memory the way a guest does, checking each
//! step: find the RSDP (scan the BIOS area on 16-byte boundaries, as Linux does, or take
//! the address the boot parameters give), check its signature, checksums and revision,
//! walk the XSDT, check every table's signature and checksum, follow the FADT to the
//! DSDT, and read the MADT's entries.
//!
//! The test guest does the same in C (`workload=acpi`); this copy lets unit tests check
//! the builder, including that corrupted tables are caught.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::x86_64::layout::{ACPI_END, ACPI_START};

const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
const RSDP_V1_LEN: usize = 20;
const RSDP_V2_LEN: usize = 36;
const HEADER_LEN: usize = 36;
const MADT_ENTRIES: usize = 44;
const FADT_FLAGS: usize = 112;
const FADT_X_DSDT: usize = 140;
const FADT_HW_REDUCED: u32 = 1 << 20;
/// Longer than any table the VMM writes: a corrupted length must not make us read GiBs.
const MAX_TABLE_LEN: u32 = 1 << 20;

/// What is wrong with the tables in guest memory.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// No RSDP with a valid checksum in the BIOS area.
    #[error("no valid RSDP between {ACPI_START:#x} and {ACPI_END:#x}")]
    NoRsdp,
    /// A structure's bytes do not sum to zero.
    #[error("{what} at {addr:#x}: bad checksum")]
    Checksum {
        /// The structure.
        what: String,
        /// Its address.
        addr: u64,
    },
    /// A signature other than expected.
    #[error("expected {expected} at {addr:#x}, found {found:?}")]
    Signature {
        /// The signature wanted.
        expected: &'static str,
        /// What is there.
        found: String,
        /// Where.
        addr: u64,
    },
    /// A length, revision or entry that cannot be right.
    #[error("{what} at {addr:#x}: {why}")]
    Malformed {
        /// The structure.
        what: String,
        /// Its address.
        addr: u64,
        /// Why.
        why: String,
    },
    /// A table the guest needs is not listed.
    #[error("no {0} table in the XSDT")]
    Missing(&'static str),
    /// A table lies outside guest memory.
    #[error("cannot read {len} bytes at {addr:#x}")]
    Unreadable {
        /// Where.
        addr: u64,
        /// How much.
        len: usize,
    },
}

/// What a guest learns from the tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiSummary {
    /// The RSDP's address.
    pub rsdp: u64,
    /// The signatures of the tables the XSDT lists, in order, then the DSDT.
    pub tables: Vec<String>,
    /// The APIC IDs of the enabled processor-local APIC entries, in order.
    pub lapic_ids: Vec<u8>,
    /// Each IOAPIC's (id, address, GSI base).
    pub ioapics: Vec<(u8, u32, u32)>,
    /// Each interrupt source override's (ISA IRQ, GSI).
    pub overrides: Vec<(u8, u32)>,
    /// The FADT's HW_REDUCED_ACPI flag.
    pub hw_reduced: bool,
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Result<Vec<u8>, TableError> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr))
        .map_err(|_| TableError::Unreadable { addr, len })?;
    Ok(v)
}

fn sums_to_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Checks the RSDP at `addr`: signature, checksum of the first 20 bytes, revision 2 or
/// later, and the extended checksum over its length. Returns the XSDT's address.
fn check_rsdp(mem: &GuestMemoryMmap, addr: u64) -> Result<u64, TableError> {
    let r = read(mem, addr, RSDP_V2_LEN)?;
    if &r[..8] != RSDP_SIGNATURE {
        return Err(TableError::Signature {
            expected: "RSD PTR ",
            found: String::from_utf8_lossy(&r[..8]).into_owned(),
            addr,
        });
    }
    let checksum = |what: &str| TableError::Checksum {
        what: what.into(),
        addr,
    };
    if !sums_to_zero(&r[..RSDP_V1_LEN]) {
        return Err(checksum("RSDP"));
    }
    if r[15] < 2 {
        return Err(TableError::Malformed {
            what: "RSDP".into(),
            addr,
            why: format!("revision {} has no XSDT", r[15]),
        });
    }
    let len = u32_at(&r, 20) as usize;
    if !(RSDP_V2_LEN..=4096).contains(&len) {
        return Err(TableError::Malformed {
            what: "RSDP".into(),
            addr,
            why: format!("length {len}"),
        });
    }
    if !sums_to_zero(&read(mem, addr, len)?) {
        return Err(checksum("RSDP (extended)"));
    }
    Ok(u64_at(&r, 24))
}

/// Finds the RSDP as Linux does without a hint: the first 16-byte boundary in the BIOS
/// area holding the signature and a valid checksum.
pub fn find_rsdp(mem: &GuestMemoryMmap) -> Option<u64> {
    (ACPI_START..ACPI_END).step_by(16).find(|&a| {
        read(mem, a, RSDP_V1_LEN)
            .map(|r| &r[..8] == RSDP_SIGNATURE && sums_to_zero(&r))
            .unwrap_or(false)
    })
}

/// Reads the table at `addr` whole, checking its length and checksum (and its
/// signature, if `expected` is given).
fn read_table(
    mem: &GuestMemoryMmap,
    addr: u64,
    expected: Option<&'static str>,
) -> Result<Vec<u8>, TableError> {
    let h = read(mem, addr, HEADER_LEN)?;
    let sig = String::from_utf8_lossy(&h[..4]).into_owned();
    if let Some(e) = expected {
        if sig != e {
            return Err(TableError::Signature {
                expected: e,
                found: sig,
                addr,
            });
        }
    }
    let len = u32_at(&h, 4);
    if (len as usize) < HEADER_LEN || len > MAX_TABLE_LEN {
        return Err(TableError::Malformed {
            what: sig,
            addr,
            why: format!("length {len}"),
        });
    }
    let t = read(mem, addr, len as usize)?;
    if !sums_to_zero(&t) {
        return Err(TableError::Checksum { what: sig, addr });
    }
    Ok(t)
}

type MadtEntries = (Vec<u8>, Vec<(u8, u32, u32)>, Vec<(u8, u32)>);

/// The MADT's enabled local APIC ids, IOAPICs and interrupt source overrides.
fn madt_entries(t: &[u8], addr: u64) -> Result<MadtEntries, TableError> {
    let (mut lapics, mut ioapics, mut overrides) = (Vec::new(), Vec::new(), Vec::new());
    let mut off = MADT_ENTRIES;
    while off < t.len() {
        let len = t.get(off + 1).copied().unwrap_or(0) as usize;
        if len < 2 || off + len > t.len() {
            return Err(TableError::Malformed {
                what: "APIC".into(),
                addr,
                why: format!("entry at offset {off} has length {len}"),
            });
        }
        let e = &t[off..off + len];
        match (e[0], len) {
            (0, 8) if u32_at(e, 4) & 1 == 1 => lapics.push(e[3]),
            (1, 12) => ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8))),
            (2, 10) => overrides.push((e[3], u32_at(e, 4))),
            (0..=2, _) => {
                return Err(TableError::Malformed {
                    what: "APIC".into(),
                    addr,
                    why: format!("entry type {} with length {len}", e[0]),
                })
            }
            _ => {}
        }
        off += len;
    }
    Ok((lapics, ioapics, overrides))
}

/// Checks the tables in `mem`, starting from the RSDP at `rsdp` (or found by scanning).
pub fn check_tables(mem: &GuestMemoryMmap, rsdp: Option<u64>) -> Result<AcpiSummary, TableError> {
    let rsdp = match rsdp {
        Some(a) => a,
        None => find_rsdp(mem).ok_or(TableError::NoRsdp)?,
    };
    let xsdt_addr = check_rsdp(mem, rsdp)?;
    let xsdt = read_table(mem, xsdt_addr, Some("XSDT"))?;
    if (xsdt.len() - HEADER_LEN) & 7 != 0 {
        return Err(TableError::Malformed {
            what: "XSDT".into(),
            addr: xsdt_addr,
            why: format!("length {} is not a header plus 8-byte entries", xsdt.len()),
        });
    }
    let mut summary = AcpiSummary {
        rsdp,
        tables: Vec::new(),
        lapic_ids: Vec::new(),
        ioapics: Vec::new(),
        overrides: Vec::new(),
        hw_reduced: false,
    };
    let (mut fadt, mut madt) = (None, None);
    for off in (HEADER_LEN..xsdt.len()).step_by(8) {
        let addr = u64_at(&xsdt, off);
        let t = read_table(mem, addr, None)?;
        let sig = String::from_utf8_lossy(&t[..4]).into_owned();
        match sig.as_str() {
            "FACP" => fadt = Some((addr, t)),
            "APIC" => madt = Some((addr, t)),
            _ => {}
        }
        summary.tables.push(sig);
    }
    let (fadt_addr, fadt) = fadt.ok_or(TableError::Missing("FACP"))?;
    if fadt.len() < FADT_X_DSDT + 8 {
        return Err(TableError::Malformed {
            what: "FACP".into(),
            addr: fadt_addr,
            why: format!("length {} has no X_DSDT", fadt.len()),
        });
    }
    summary.hw_reduced = u32_at(&fadt, FADT_FLAGS) & FADT_HW_REDUCED != 0;
    let dsdt_addr = match u64_at(&fadt, FADT_X_DSDT) {
        0 => u64::from(u32_at(&fadt, 40)),
        a => a,
    };
    read_table(mem, dsdt_addr, Some("DSDT"))?;
    summary.tables.push("DSDT".into());
    let (madt_addr, madt) = madt.ok_or(TableError::Missing("APIC"))?;
    (summary.lapic_ids, summary.ioapics, summary.overrides) = madt_entries(&madt, madt_addr)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::super::{setup_acpi, AcpiConfig, AcpiTables, DeviceDescription};
    use super::*;
    use crate::memory::ram_ranges;
    use crate::x86_64::layout::IOAPIC_START;

    fn guest(vcpus: u8) -> (GuestMemoryMmap, AcpiTables) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&ram_ranges(16 << 20)).unwrap();
        let devices = [DeviceDescription::uart("COM1", 0, 0x3f8, 4)];
        let t = setup_acpi(
            &mem,
            &AcpiConfig {
                vcpus,
                devices: &devices,
                isa_irqs: &[4],
            },
        )
        .unwrap();
        (mem, t)
    }

    fn addr_of(t: &AcpiTables, sig: &[u8; 4]) -> u64 {
        t.tables.iter().find(|(s, _)| s == sig).unwrap().1
    }

    fn flip(mem: &GuestMemoryMmap, addr: u64) {
        let b: u8 = mem.read_obj(GuestAddress(addr)).unwrap();
        mem.write_obj(b ^ 0x5a, GuestAddress(addr)).unwrap();
    }

    #[test]
    fn written_tables_read_back_as_a_guest_sees_them() {
        for vcpus in [1u8, 2, 4, 8, 32] {
            let (mem, t) = guest(vcpus);
            assert_eq!(find_rsdp(&mem), Some(t.rsdp_addr()));
            let s = check_tables(&mem, None).unwrap();
            assert_eq!(s, check_tables(&mem, Some(t.rsdp_addr())).unwrap());
            assert_eq!(s.rsdp, ACPI_START);
            assert_eq!(s.tables, ["FACP", "APIC", "DSDT"]);
            assert_eq!(s.lapic_ids, (0..vcpus).collect::<Vec<_>>());
            assert_eq!(s.ioapics, [(0, IOAPIC_START as u32, 0)]);
            assert_eq!(s.overrides, [(4, 4)]);
            assert!(s.hw_reduced);
        }
    }

    #[test]
    fn a_corrupted_table_fails_its_checksum() {
        for sig in [b"XSDT", b"FACP", b"APIC", b"DSDT"] {
            let (mem, t) = guest(2);
            let addr = addr_of(&t, sig);
            flip(&mem, addr + HEADER_LEN as u64);
            let e = check_tables(&mem, None).unwrap_err();
            assert_eq!(
                e,
                TableError::Checksum {
                    what: String::from_utf8_lossy(sig).into_owned(),
                    addr
                },
                "{}",
                String::from_utf8_lossy(sig)
            );
        }
    }

    #[test]
    fn a_corrupted_rsdp_is_not_found_or_is_refused() {
        // The first 20 bytes: a scan no longer finds it.
        let (mem, t) = guest(1);
        flip(&mem, t.rsdp_addr() + 9);
        assert_eq!(check_tables(&mem, None), Err(TableError::NoRsdp));
        assert!(matches!(
            check_tables(&mem, Some(t.rsdp_addr())),
            Err(TableError::Checksum { .. })
        ));
        // The extended part (the XSDT address): the extended checksum catches it.
        let (mem, t) = guest(1);
        flip(&mem, t.rsdp_addr() + 24);
        assert_eq!(
            check_tables(&mem, None),
            Err(TableError::Checksum {
                what: "RSDP (extended)".into(),
                addr: t.rsdp_addr()
            })
        );
    }

    #[test]
    fn a_wrong_signature_or_length_is_refused() {
        let (mem, t) = guest(1);
        let dsdt = addr_of(&t, b"DSDT");
        mem.write_slice(b"SSDT", GuestAddress(dsdt)).unwrap();
        assert!(matches!(
            check_tables(&mem, None),
            Err(TableError::Signature {
                expected: "DSDT",
                ..
            })
        ));
        let (mem, t) = guest(1);
        let madt = addr_of(&t, b"APIC");
        mem.write_obj(u32::MAX, GuestAddress(madt + 4)).unwrap();
        assert!(matches!(
            check_tables(&mem, None),
            Err(TableError::Malformed { .. })
        ));
    }
}
