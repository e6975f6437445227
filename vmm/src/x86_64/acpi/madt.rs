//! The MADT ("APIC"): the interrupt controllers, and so the CPUs.
//!
//! One processor-local APIC entry per vCPU (ACPI processor UID = APIC ID = the vCPU's index,
//! which is the APIC ID KVM gives a vCPU created with that id), the IOAPIC at its usual
//! address with GSI base 0, an interrupt source override for each ISA IRQ a device uses,
//! and the local APIC NMI line (LINT1 on every CPU, as the VMM programs it).
//!
//! `acpi_tables` has the local APIC and IOAPIC entries; the override and NMI entries are
//! defined here the same way (packed, little-endian, appended with `add_structure`).

use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::{aml_as_bytes, Aml, AmlSink};
use zerocopy::byteorder::{LE, U16, U32};
use zerocopy::{Immutable, IntoBytes};

use super::{OEM_ID, OEM_REVISION};
use crate::x86_64::layout::{APIC_START, IOAPIC_START};

/// The IOAPIC's id in the MADT (KVM's IOAPIC resets its ID register to 0).
pub const IOAPIC_ID: u8 = 0;
/// MPS INTI flags: active high (bits 0–1 = 01), edge-triggered (bits 2–3 = 01).
const INTI_EDGE_ACTIVE_HIGH: u16 = 0b0101;
/// "All processors" in a local APIC NMI entry.
const ALL_PROCESSORS: u8 = 0xff;
/// The local APIC input the VMM wires to NMI.
const NMI_LINT: u8 = 1;

/// MADT entry type 2: an ISA IRQ delivered on another GSI, or with other flags.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32<LE>,
    flags: U16<LE>,
}

aml_as_bytes!(InterruptSourceOverride);

impl InterruptSourceOverride {
    /// ISA IRQ `irq` arrives on GSI `gsi`, edge-triggered, active high.
    fn isa(irq: u8, gsi: u32) -> Self {
        Self {
            r#type: 2,
            length: 10,
            bus: 0, // ISA
            source: irq,
            gsi: gsi.into(),
            flags: INTI_EDGE_ACTIVE_HIGH.into(),
        }
    }
}

/// MADT entry type 4: which local APIC input (LINT0/1) carries NMI.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: U16<LE>,
    lint: u8,
}

aml_as_bytes!(LocalApicNmi);

/// The MADT for `vcpus` vCPUs, with an interrupt source override for each of `isa_irqs`
/// (an ISA IRQ on the IOAPIC pin of the same number).
pub fn madt(vcpus: u8, isa_irqs: &[u8]) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"TINYMADT",
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for cpu in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(IOAPIC_ID, IOAPIC_START as u32, 0));
    for &irq in isa_irqs {
        madt.add_structure(InterruptSourceOverride::isa(irq, u32::from(irq)));
    }
    madt.add_structure(LocalApicNmi {
        r#type: 4,
        length: 6,
        processor_uid: ALL_PROCESSORS,
        flags: 0.into(), // conforms to the bus
        lint: NMI_LINT,
    });
    let mut bytes = Vec::new();
    madt.to_aml_bytes(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entries after the 44-byte header, as (type, bytes).
    fn entries(t: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut off = 44;
        while off < t.len() {
            let len = t[off + 1] as usize;
            out.push((t[off], &t[off..off + len]));
            off += len;
        }
        out
    }

    #[test]
    fn one_enabled_local_apic_per_vcpu_then_ioapic_overrides_and_nmi() {
        for vcpus in [1u8, 2, 8, 32] {
            let t = madt(vcpus, &[4]);
            assert_eq!(&t[..4], b"APIC");
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
            assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            assert_eq!(&t[36..40], &(APIC_START as u32).to_le_bytes());
            let e = entries(&t);
            let lapics: Vec<_> = e.iter().filter(|(ty, _)| *ty == 0).collect();
            assert_eq!(lapics.len(), usize::from(vcpus));
            for (i, (_, b)) in lapics.iter().enumerate() {
                assert_eq!((b[2], b[3]), (i as u8, i as u8), "uid and APIC id");
                assert_eq!(b[4] & 1, 1, "enabled");
            }
            let (_, io) = e.iter().find(|(ty, _)| *ty == 1).unwrap();
            assert_eq!(&io[4..8], &(IOAPIC_START as u32).to_le_bytes());
            assert_eq!(&io[8..12], &0u32.to_le_bytes(), "GSI base");
            let (_, iso) = e.iter().find(|(ty, _)| *ty == 2).unwrap();
            assert_eq!(iso, &[2, 10, 0, 4, 4, 0, 0, 0, 5, 0]);
            let (_, nmi) = e.iter().find(|(ty, _)| *ty == 4).unwrap();
            assert_eq!(nmi, &[4, 6, 0xff, 0, 0, 1]);
        }
    }
}
