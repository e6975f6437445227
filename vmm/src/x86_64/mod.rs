//! x86_64 specifics: memory layout, boot-time registers, CPUID, MSRs, LAPIC, MP table, ACPI
//! tables.

pub mod acpi;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;
