//! Guest physical memory layout for x86_64 boot.

/// The GDT the VMM hands to the kernel at entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT, right after the GDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux "zero page" (struct boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer at kernel entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table (PML4).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory: 512 × 2 MiB entries identity-map the first GiB.
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we pass (the kernel's own `cmdline_size` may lower it).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the Extended BIOS Data Area, where the MP table goes; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI tables: the RSDP at the start of the BIOS area (0xE0000–0xFFFFF, where Linux
/// scans for it on 16-byte boundaries), the other tables right after it.
pub const ACPI_START: u64 = 0xe_0000;
/// End of the ACPI area (the end of the BIOS area).
pub const ACPI_END: u64 = HIMEM_START;
/// First address above the legacy hole: where kernels load.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (LAPIC, IOAPIC, KVM's TSS); RAM resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// KVM's three-page TSS region, inside the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// The first virtio-mmio transport, at the bottom of the MMIO gap; device `i` sits at
/// `VIRTIO_MMIO_START + i * 0x1000`.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// The IOAPIC pin (GSI) of the first virtio-mmio transport; device `i` uses
/// `VIRTIO_GSI_START + i`. Pins below 16 are ISA-style (edge, active high) and COM1 has 4.
pub const VIRTIO_GSI_START: u32 = 5;
/// The last GSI a virtio-mmio transport may use.
pub const VIRTIO_GSI_END: u32 = 15;
