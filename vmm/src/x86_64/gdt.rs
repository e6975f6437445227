//! Segment descriptors for the boot GDT.

use kvm_bindings::kvm_segment;

/// Packs a segment descriptor from its flags (the 12 bits of access byte + flags nibble,
/// e.g. 0xa09b for 64-bit code), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn get_base(entry: u64) -> u64 {
    (((entry) & 0xFF00_0000_0000_0000) >> 32)
        | (((entry) & 0x0000_00FF_0000_0000) >> 16)
        | (((entry) & 0x0000_0000_FFFF_0000) >> 16)
}

fn get_limit(entry: u64) -> u32 {
    let limit: u32 =
        ((((entry) & 0x000F_0000_0000_0000) >> 32) | ((entry) & 0x0000_0000_0000_FFFF)) as u32;
    // Scale by the granularity bit.
    if (entry & 0x0080_0000_0000_0000) != 0 {
        (limit << 12) | 0xfff
    } else {
        limit
    }
}

/// The KVM view of descriptor `entry` at GDT index `table_index`.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    kvm_segment {
        base: get_base(entry),
        limit: get_limit(entry),
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 0x1) as u8,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 0x1) as u8,
        s: ((entry >> 44) & 0x1) as u8,
        l: ((entry >> 53) & 0x1) as u8,
        g: ((entry >> 55) & 0x1) as u8,
        avl: ((entry >> 52) & 0x1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 0x1) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_round_trips() {
        let e = gdt_entry(0xa09b, 0, 0xfffff);
        let s = kvm_segment_from_gdt(e, 1);
        assert_eq!(s.selector, 8);
        assert_eq!(s.l, 1);
        assert_eq!(s.present, 1);
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.base, 0);
        let t = kvm_segment_from_gdt(gdt_entry(0x008b, 0x1234_5678, 0x67), 3);
        assert_eq!(t.base, 0x1234_5678);
        assert_eq!(t.limit, 0x67);
        assert_eq!(t.s, 0);
    }
}
