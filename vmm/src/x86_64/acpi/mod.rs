//! ACPI tables, so that a stock kernel finds its CPUs, interrupt controllers and devices
//! the way it does on a PC: through the RSDP in the BIOS area.
//!
//! The tables (built with rust-vmm's `acpi_tables`) and where they go, all inside the BIOS
//! area `[ACPI_START, ACPI_END)` = `[0xE0000, 0x100000)`, which the e820 map reserves:
//!
//! | table | contents |
//! |---|---|
//! | RSDP (at 0xE0000) | revision 2, points to the XSDT (no RSDT) |
//! | XSDT | the FADT and the MADT |
//! | FADT ("FACP") | hardware-reduced ACPI (no PM1/GPE blocks, no SCI, no FACS, no sleep registers), power and sleep buttons as control-method devices, 8042 and legacy ISA devices present, no VGA, points to the DSDT (`X_DSDT`) |
//! | MADT ("APIC") | see [`madt`] |
//! | DSDT | the devices of [`AcpiConfig::devices`], see [`dsdt`] |
//!
//! Each table starts on a 16-byte boundary, in that order. Linux finds the RSDP by
//! scanning 0xE0000–0xFFFFF on 16-byte boundaries, or through `boot_params.acpi_rsdp_addr`
//! (boot protocol 2.14+), which the loader also sets. [`check`] validates what was written
//! the way a guest reads it.

pub mod check;
pub mod dsdt;
pub mod madt;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use dsdt::{DeviceDescription, HardwareId, Resource, Trigger};

use super::layout::{ACPI_END, ACPI_START};

/// The OEM id in every table.
pub const OEM_ID: [u8; 6] = *b"TINYVM";
/// The OEM revision of every table.
pub const OEM_REVISION: u32 = 1;
/// The FADT's hypervisor vendor identity.
const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"TINYVMM ";
/// DSDT revision 2: integers are 64 bits.
const DSDT_REVISION: u8 = 2;
const HEADER_LEN: usize = 36;
const TABLE_ALIGN: usize = 16;

/// IA-PC boot architecture flags (FADT `IAPC_BOOT_ARCH`).
mod iapc {
    /// Legacy (ISA/LPC) devices are present: the UART, the RTC, the i8042.
    pub const LEGACY_DEVICES: u16 = 1 << 0;
    /// An 8042 keyboard controller is present (the VMM's i8042, used for reset).
    pub const I8042: u16 = 1 << 1;
    /// No VGA: the guest must not probe for one.
    pub const VGA_NOT_PRESENT: u16 = 1 << 2;
    /// The OS must not enable PCIe ASPM.
    pub const PCIE_ASPM_CONTROLS: u16 = 1 << 4;
}

/// What the tables describe.
#[derive(Debug, Clone, Copy)]
pub struct AcpiConfig<'a> {
    /// Number of vCPUs; vCPU `i` has APIC ID `i`.
    pub vcpus: u8,
    /// The devices the DSDT describes.
    pub devices: &'a [DeviceDescription],
    /// ISA IRQs wired to the IOAPIC pin of the same number, edge-triggered and active high;
    /// each gets an interrupt source override (a hardware-reduced Linux has no legacy PIC
    /// and assumes no ISA identity mapping of its own).
    pub isa_irqs: &'a [u8],
}

/// Errors building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// No vCPUs, or more than an MADT entry's 8-bit APIC ID can name.
    #[error("cannot describe {0} vCPUs in the MADT")]
    VcpuCount(u8),
    /// A device description the DSDT cannot encode.
    #[error("ACPI device {name:?}: {why}")]
    BadDevice {
        /// The device's name.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// The tables do not fit in the BIOS area.
    #[error("the ACPI tables need {size} bytes but the BIOS area has {room}")]
    TooLarge {
        /// Bytes needed.
        size: usize,
        /// Bytes available.
        room: usize,
    },
    /// Guest memory does not cover the BIOS area.
    #[error("cannot write the ACPI tables: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

/// The tables, laid out from [`ACPI_START`].
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// The image, to be written at [`ACPI_START`].
    pub image: Vec<u8>,
    /// Each table's signature and guest-physical address, RSDP first.
    pub tables: Vec<([u8; 4], u64)>,
}

impl AcpiTables {
    /// Where the RSDP is.
    pub fn rsdp_addr(&self) -> u64 {
        ACPI_START
    }
}

fn align(n: usize) -> usize {
    n.div_ceil(TABLE_ALIGN) * TABLE_ALIGN
}

fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// The FADT of a hardware-reduced platform whose DSDT is at `dsdt`.
fn fadt(dsdt: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, *b"TINYFACP", OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.iapc_boot_arch =
        (iapc::LEGACY_DEVICES | iapc::I8042 | iapc::VGA_NOT_PRESENT | iapc::PCIE_ASPM_CONTROLS)
            .into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    aml_bytes(&b.finalize())
}

fn dsdt(devices: &[DeviceDescription]) -> Result<Vec<u8>, AcpiError> {
    let mut t = Sdt::new(
        *b"DSDT",
        HEADER_LEN as u32,
        DSDT_REVISION,
        OEM_ID,
        *b"TINYDSDT",
        OEM_REVISION,
    );
    t.append_slice(&dsdt::dsdt_aml(devices)?);
    Ok(t.as_slice().to_vec())
}

/// Builds every table for `cfg`, laid out from [`ACPI_START`].
pub fn build(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    if cfg.vcpus == 0 || cfg.vcpus == u8::MAX {
        return Err(AcpiError::VcpuCount(cfg.vcpus));
    }
    // The tables without pointers to others come first; their sizes fix the layout.
    let madt = madt::madt(cfg.vcpus, cfg.isa_irqs);
    let dsdt = dsdt(cfg.devices)?;
    let rsdp_off = 0;
    let xsdt_off = align(rsdp_off + Rsdp::len());
    let fadt_off = align(xsdt_off + HEADER_LEN + 2 * 8);
    let madt_off = align(fadt_off + acpi_tables::fadt::FADT::len());
    let dsdt_off = align(madt_off + madt.len());
    let size = dsdt_off + dsdt.len();
    let room = (ACPI_END - ACPI_START) as usize;
    if size > room {
        return Err(AcpiError::TooLarge { size, room });
    }
    let addr = |off: usize| ACPI_START + off as u64;

    let fadt = fadt(addr(dsdt_off));
    let mut xsdt = XSDT::new(OEM_ID, *b"TINYXSDT", OEM_REVISION);
    xsdt.add_entry(addr(fadt_off));
    xsdt.add_entry(addr(madt_off));
    let xsdt = aml_bytes(&xsdt);
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, addr(xsdt_off)));

    let mut image = vec![0u8; size];
    let mut tables = Vec::new();
    for (sig, off, bytes) in [
        (*b"RSD ", rsdp_off, &rsdp),
        (*b"XSDT", xsdt_off, &xsdt),
        (*b"FACP", fadt_off, &fadt),
        (*b"APIC", madt_off, &madt),
        (*b"DSDT", dsdt_off, &dsdt),
    ] {
        image[off..off + bytes.len()].copy_from_slice(bytes);
        tables.push((sig, addr(off)));
    }
    Ok(AcpiTables { image, tables })
}

/// Builds the tables for `cfg` and writes them into the BIOS area of `mem`; returns where
/// they went (the RSDP is at [`ACPI_START`]).
pub fn setup_acpi(mem: &GuestMemoryMmap, cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    let tables = build(cfg)?;
    mem.write_slice(&tables.image, GuestAddress(ACPI_START))
        .map_err(AcpiError::Memory)?;
    Ok(tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn com1() -> Vec<DeviceDescription> {
        vec![DeviceDescription::uart("COM1", 0, 0x3f8, 4)]
    }

    #[test]
    fn tables_are_aligned_in_the_bios_area_rsdp_first() {
        let devices = com1();
        let t = build(&AcpiConfig {
            vcpus: 4,
            devices: &devices,
            isa_irqs: &[4],
        })
        .unwrap();
        assert_eq!(t.tables[0], (*b"RSD ", ACPI_START));
        assert_eq!(&t.image[..8], b"RSD PTR ");
        for (_, a) in &t.tables {
            assert_eq!(a % TABLE_ALIGN as u64, 0);
            assert!(*a >= ACPI_START && *a < ACPI_END);
        }
        assert!(ACPI_START + t.image.len() as u64 <= ACPI_END);
    }

    #[test]
    fn fadt_is_hardware_reduced_and_points_to_the_dsdt() {
        let f = fadt(0xe_1230);
        assert_eq!(&f[..4], b"FACP");
        assert_eq!(f.len(), 276, "ACPI 6.x FADT");
        assert_eq!(f[8], 6, "major revision");
        assert_eq!(f.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let flags = u32::from_le_bytes(f[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(&f[40..44], &[0; 4], "32-bit DSDT unused");
        assert_eq!(
            u64::from_le_bytes(f[140..148].try_into().unwrap()),
            0xe_1230
        );
        // No FACS, no PM1 event/control blocks, no sleep registers.
        assert_eq!(&f[36..40], &[0; 4]);
        assert_eq!(&f[56..64], &[0; 8]);
        assert_eq!(&f[244..268], &[0; 24]);
        let iapc = u16::from_le_bytes([f[109], f[110]]);
        assert_eq!(iapc & iapc::I8042, iapc::I8042);
    }

    #[test]
    fn vcpu_counts_out_of_range_are_refused() {
        for vcpus in [0u8, 255] {
            let r = build(&AcpiConfig {
                vcpus,
                devices: &[],
                isa_irqs: &[],
            });
            assert!(matches!(r, Err(AcpiError::VcpuCount(_))));
        }
    }
}
