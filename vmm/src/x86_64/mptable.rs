//! The Intel MultiProcessor Specification 1.4 table, so that a guest finds its
//! application processors and the IOAPIC without ACPI.
//!
//! Layout (in the EBDA): the 16-byte floating pointer structure, then the configuration
//! table: header, one processor entry per vCPU, the ISA bus, the IOAPIC, an I/O interrupt
//! entry per ISA IRQ, and the two local interrupt entries (ExtINT on LINT0, NMI on LINT1).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START};

/// The most vCPUs the table (1 KiB of EBDA) describes.
pub const MAX_SUPPORTED_CPUS: u8 = 32;
const ISA_IRQS: u8 = 16;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MPTABLE_END: u64 = 0xa0000;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many vCPUs for the table.
    #[error("the MP table describes at most {MAX_SUPPORTED_CPUS} vCPUs, not {0}")]
    TooManyCpus(u8),
    /// Guest memory does not cover the EBDA.
    #[error("cannot write the MP table: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the table image (pointer + configuration table) for `cpus` vCPUs at `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_SUPPORTED_CPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let table_addr = base + 16;
    let ioapic_id = cpus;

    let mut body = Vec::new();
    let mut entries: u16 = 0;
    for cpu in 0..cpus {
        body.push(0); // MP_PROCESSOR
        body.push(cpu);
        body.push(APIC_VERSION);
        body.push(if cpu == 0 { 0x3 } else { 0x1 }); // enabled, BSP
        body.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        body.extend_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        body.extend_from_slice(&[0; 8]);
        entries += 1;
    }
    body.extend_from_slice(&[1, 0]); // MP_BUS, id 0
    body.extend_from_slice(b"ISA   ");
    entries += 1;
    body.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]); // MP_IOAPIC, enabled
    body.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries += 1;
    for irq in 0..ISA_IRQS {
        // MP_INTSRC: INT, conforming polarity/trigger, ISA bus 0, irq → IOAPIC pin irq.
        body.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        entries += 1;
    }
    // MP_LINTSRC: ExtINT → LINT0 and NMI → LINT1 of every local APIC.
    body.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    body.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    entries += 2;

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + body.len()) as u16).to_le_bytes());
    header.push(4); // spec 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"TINYVMM ");
    header.extend_from_slice(b"000000000000");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&entries.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    let mut table = header;
    table.extend_from_slice(&body);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 paragraph, spec 1.4
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    if base + mpf.len() as u64 > MPTABLE_END {
        return Err(MptableError::TooManyCpus(cpus));
    }
    Ok(mpf)
}

/// Writes the MP table for `cpus` vCPUs into the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let image = build(cpus, EBDA_START)?;
    mem.write_slice(&image, GuestAddress(EBDA_START))
        .map_err(MptableError::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts_are_valid() {
        for cpus in [1u8, 2, 8, MAX_SUPPORTED_CPUS] {
            let img = build(cpus, EBDA_START).unwrap();
            assert_eq!(&img[0..4], b"_MP_");
            assert_eq!(img[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let t = &img[16..];
            assert_eq!(&t[0..4], b"PCMP");
            let len = u16::from_le_bytes([t[4], t[5]]) as usize;
            assert_eq!(len, t.len());
            assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let count = u16::from_le_bytes([t[34], t[35]]);
            assert_eq!(count, u16::from(cpus) + 2 + 16 + 2);
        }
        assert!(build(MAX_SUPPORTED_CPUS + 1, EBDA_START).is_err());
        assert!(build(0, EBDA_START).is_err());
    }
}
