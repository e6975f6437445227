//! The CPUID a guest sees: what KVM supports, with per-vCPU topology, the hypervisor bit,
//! and the hypervisor timing leaf (TSC frequency) that tiny guests use instead of
//! calibrating against the PIT.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Leaf with the hypervisor signature and the highest hypervisor leaf.
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;
/// Hypervisor timing leaf: EAX = TSC kHz, EBX = local APIC bus kHz.
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's local APIC timer ticks at 1 GHz unless told otherwise.
const APIC_BUS_KHZ: u32 = 1_000_000;

/// What one vCPU's CPUID depends on.
#[derive(Debug, Clone, Copy)]
pub struct CpuidContext {
    /// This vCPU's index (its APIC ID).
    pub cpu_index: u8,
    /// Number of vCPUs in the VM.
    pub cpu_count: u8,
    /// The TSC frequency in kHz, if KVM told us.
    pub tsc_khz: Option<u32>,
}

/// Adjusts KVM's supported CPUID for one vCPU.
pub fn filter_cpuid(supported: &CpuId, ctx: CpuidContext) -> CpuId {
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    let mut has_timing = false;
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                // Hypervisor present; initial APIC ID, logical processor count, clflush size.
                e.ecx |= 1 << 31;
                e.ebx = (u32::from(ctx.cpu_index) << 24)
                    | (u32::from(ctx.cpu_count) << 16)
                    | (8 << 8)
                    | (e.ebx & 0xff);
                if ctx.cpu_count > 1 {
                    e.edx |= 1 << 28; // HTT: the count in EBX[23:16] is valid.
                }
            }
            0xb | 0x1f => {
                // Extended topology: one thread per core, all cores in one package.
                e.edx = u32::from(ctx.cpu_index);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 0x100; // SMT level
                    }
                    1 => {
                        e.eax = 8u32.min(u32::BITS - u32::from(ctx.cpu_count).leading_zeros());
                        e.ebx = u32::from(ctx.cpu_count);
                        e.ecx = 0x201; // Core level
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            HYPERVISOR_LEAF if ctx.tsc_khz.is_some() => {
                e.eax = e.eax.max(TIMING_LEAF);
            }
            TIMING_LEAF => has_timing = true,
            _ => {}
        }
    }
    if let (Some(khz), false) = (ctx.tsc_khz, has_timing) {
        entries.push(kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            index: 0,
            flags: 0,
            eax: khz,
            ebx: APIC_BUS_KHZ,
            ..Default::default()
        });
    }
    for e in entries.iter_mut() {
        if e.function == TIMING_LEAF {
            e.eax = ctx.tsc_khz.unwrap_or(e.eax);
            e.ebx = APIC_BUS_KHZ;
        }
        if matches!(e.function, 0xb | 0x1f) {
            e.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        }
    }
    // Infallible in practice: we add at most one entry to what KVM returned.
    CpuId::from_entries(&entries).unwrap_or_else(|_| supported.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: HYPERVISOR_LEAF,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    #[test]
    fn adds_timing_leaf_and_apic_id() {
        let c = filter_cpuid(
            &base(),
            CpuidContext {
                cpu_index: 2,
                cpu_count: 4,
                tsc_khz: Some(2_000_000),
            },
        );
        let e: Vec<_> = c.as_slice().to_vec();
        let l1 = e.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 2);
        assert_ne!(l1.ecx & (1 << 31), 0);
        let hv = e.iter().find(|e| e.function == HYPERVISOR_LEAF).unwrap();
        assert_eq!(hv.eax, TIMING_LEAF);
        let t = e.iter().find(|e| e.function == TIMING_LEAF).unwrap();
        assert_eq!(t.eax, 2_000_000);
    }
}
