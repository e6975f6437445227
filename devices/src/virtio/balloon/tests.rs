//! Queue contents to checked ranges, over arbitrary descriptors (virtio-queue's
//! `MockSplitQueue`): nothing outside RAM, unaligned or overlapping is ever dropped.

use proptest::prelude::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::requests::{check_ranges, pfn_ranges, reported_ranges};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;

const RAM: u64 = 16 << 20;

fn mem() -> GuestMemoryMmap {
    // Two regions with a hole between them: [0, 8 MiB) and [12 MiB, 20 MiB).
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 8 << 20),
        (GuestAddress(12 << 20), 8 << 20),
    ])
    .unwrap()
}

fn in_ram(gpa: u64, len: u64) -> bool {
    (gpa + len <= 8 << 20) || (gpa >= 12 << 20 && gpa + len <= 20 << 20)
}

#[test]
fn bad_ranges_are_ignored_and_good_ones_kept() {
    let m = mem();
    let raw = [
        (0x1000, 0x2000),           // good
        (0x10_0000, 0x1000),        // overlaps the next
        (0x10_0000, 0x3000),        // overlaps the previous
        (0x20_0001, 0x1000),        // unaligned
        (7 << 20, 2 << 20),         // crosses into the hole
        (30 << 20, 0x1000),         // outside RAM
        (12 << 20, 0x1000),         // good, second region
        (0x5000, 0),                // empty
        (u64::MAX - 0xfff, 0x1000), // wraps
    ];
    let c = check_ranges(&m, &raw);
    let kept: Vec<_> = c.ranges.iter().map(|r| (r.gpa, r.len)).collect();
    assert_eq!(kept, vec![(0x1000, 0x2000), (12 << 20, 0x1000)]);
    assert_eq!(c.bad, 7);
    assert_eq!(c.pages(), 3);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn reported_descriptors_yield_only_ram_aligned_disjoint_ranges(
        descs in prop::collection::vec((0u64..(24 << 20), 0u32..(3 << 20), any::<bool>(), any::<bool>()), 1..12)
    ) {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(addr, len, align, write)| {
                let (addr, len) = if align { (addr & !0xfff, len & !0xfff) } else { (addr, len) };
                let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(addr + RAM / 2, len, flags, 0))
            })
            .collect();
        let Ok(chain) = q.build_desc_chain(&raw) else { return Ok(()) };
        let wanted = reported_ranges(chain);
        let c = check_ranges(&m, &wanted);
        prop_assert!(c.ranges.len() as u64 + c.bad <= wanted.len() as u64);
        let mut end = 0;
        for r in &c.ranges {
            prop_assert!(r.gpa % 4096 == 0 && r.len % 4096 == 0 && r.len > 0);
            prop_assert!(in_ram(r.gpa, r.len), "{:#x}+{:#x}", r.gpa, r.len);
            prop_assert!(r.gpa >= end, "overlap at {:#x}", r.gpa);
            // Made of whole ranges the driver gave.
            prop_assert!(wanted.iter().any(|&(g, _)| g == r.gpa));
            end = r.gpa + r.len;
        }
    }

    #[test]
    fn inflated_pfns_become_ram_pages_once(pfns in prop::collection::vec(0u32..6000, 0..300)) {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let buf = GuestAddress(0x40_0000);
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        vm_memory::Bytes::write_slice(&m, &bytes, buf).unwrap();
        let d = RawDescriptor::from(SplitDescriptor::new(buf.0, bytes.len() as u32, 0, 0));
        let chain = q.build_desc_chain(&[d]).unwrap();
        let (raw, bad) = pfn_ranges(&m, chain);
        prop_assert_eq!(bad, 0);
        let c = check_ranges(&m, &raw);
        let mut want: Vec<u64> = pfns.iter().map(|&p| u64::from(p) << 12).filter(|&g| in_ram(g, 4096)).collect();
        want.sort_unstable();
        want.dedup();
        let got: Vec<u64> = c.ranges.iter().flat_map(|r| (0..r.len / 4096).map(move |k| r.gpa + k * 4096)).collect();
        prop_assert_eq!(got, want);
    }
}
