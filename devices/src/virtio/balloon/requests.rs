//! The balloon's requests as the driver puts them on its queues, read with `virtio-queue`
//! and checked before anything is dropped.
//!
//! - inflate / deflate: device-readable buffers of little-endian `u32` PFNs (4 KiB pages);
//! - reporting: each descriptor (the driver adds them device-writable, as Linux does) *is*
//!   a free range of guest RAM: its address and length;
//! - statistics: a device-readable buffer of packed `(u16 tag, u64 value)` entries.
//!
//! A range is dropped only if it is page aligned, non-empty, inside one RAM region and
//! overlaps no other range of the same request; anything else is counted as a bad range
//! and ignored (never dropped), so a confused or hostile driver loses at most the pages it
//! really gave.

use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::config::{BALLOON_PAGE, PFN_SHIFT, STAT_SIZE};
use super::discard::HostRange;
use super::state::GuestStats;

/// The most bytes read from one PFN or statistics buffer (a driver sends 256 PFNs = 1 KiB).
const MAX_BUFFER: u32 = 64 * 1024;

/// Ranges a request asks to drop, before the checks: (guest-physical start, bytes).
pub type RawRanges = Vec<(u64, u64)>;

/// A request's ranges after the checks.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Checked {
    /// What may be dropped, in address order, none overlapping.
    pub ranges: Vec<HostRange>,
    /// Ranges (or descriptors) ignored.
    pub bad: u64,
}

impl Checked {
    /// Pages the checked ranges cover.
    pub fn pages(&self) -> u64 {
        self.ranges.iter().map(|r| r.len / BALLOON_PAGE).sum()
    }
}

/// The PFNs of an inflate or deflate request, one page each (`check_ranges` joins
/// neighbours once each page is checked); a buffer
/// that is write-only, unreadable or too long counts as one bad range.
pub fn pfn_ranges(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> (RawRanges, u64) {
    let mut pfns = Vec::new();
    let mut bad = 0;
    for desc in chain {
        if desc.is_write_only() || desc.len() > MAX_BUFFER || !desc.len().is_multiple_of(4) {
            bad += 1;
            continue;
        }
        let mut buf = vec![0u8; desc.len() as usize];
        if mem.read_slice(&mut buf, desc.addr()).is_err() {
            bad += 1;
            continue;
        }
        pfns.extend(
            buf.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    pfns.sort_unstable();
    pfns.dedup();
    let ranges = pfns
        .into_iter()
        .map(|pfn| (u64::from(pfn) << PFN_SHIFT, BALLOON_PAGE))
        .collect();
    (ranges, bad)
}

/// The free ranges of a reporting request: one per descriptor.
pub fn reported_ranges(chain: DescriptorChain<&GuestMemoryMmap>) -> RawRanges {
    chain
        .map(|d| (d.addr().raw_value(), u64::from(d.len())))
        .collect()
}

/// Checks `raw` against guest RAM: each range must be page aligned, non-empty, inside one
/// RAM region, and overlap no other range of the request (both of two overlapping ranges
/// are ignored: the driver is confused about them).
pub fn check_ranges(mem: &GuestMemoryMmap, raw: &[(u64, u64)]) -> Checked {
    let mut out = Checked::default();
    let mut sorted: Vec<(u64, u64)> = Vec::with_capacity(raw.len());
    for &(gpa, len) in raw {
        let aligned =
            gpa.is_multiple_of(BALLOON_PAGE) && len.is_multiple_of(BALLOON_PAGE) && len > 0;
        if aligned && gpa.checked_add(len).is_some() {
            sorted.push((gpa, len));
        } else {
            out.bad += 1;
        }
    }
    sorted.sort_unstable();
    // Clusters of ranges linked by overlaps (in start order, a range joins the cluster if
    // it starts before the cluster's furthest end, so it overlaps the range that reaches
    // there): every range of a cluster of two or more overlaps another.
    let mut overlapping = vec![false; sorted.len()];
    let mut cluster_start = 0;
    let mut cluster_end = 0u64;
    for i in 0..sorted.len() {
        let (gpa, len) = sorted[i];
        if i > 0 && gpa < cluster_end {
            for o in &mut overlapping[cluster_start..=i] {
                *o = true;
            }
            cluster_end = cluster_end.max(gpa + len);
        } else {
            cluster_start = i;
            cluster_end = gpa + len;
        }
    }
    for (i, &(gpa, len)) in sorted.iter().enumerate() {
        match (!overlapping[i])
            .then(|| host_range(mem, gpa, len))
            .flatten()
        {
            // Neighbours in guest and host address space become one range.
            Some(r) => match out.ranges.last_mut() {
                Some(l) if l.gpa + l.len == r.gpa && l.hva + l.len == r.hva => l.len += r.len,
                _ => out.ranges.push(r),
            },
            None => out.bad += 1,
        }
    }
    out
}

/// The host address of `gpa..gpa+len` if it lies inside one RAM region.
fn host_range(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Option<HostRange> {
    let region = mem.find_region(GuestAddress(gpa))?;
    let start = region.start_addr().raw_value();
    if gpa + len > start.checked_add(region.len())? {
        return None;
    }
    let hva = mem.get_host_address(GuestAddress(gpa)).ok()? as u64;
    Some(HostRange { gpa, hva, len })
}

/// The statistics in a statistics request; `None` if the buffer is not readable.
pub fn read_stats(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Option<GuestStats> {
    let mut stats = GuestStats::default();
    for desc in chain {
        if desc.is_write_only() || desc.len() > MAX_BUFFER {
            return None;
        }
        let mut buf = vec![0u8; desc.len() as usize];
        mem.read_slice(&mut buf, desc.addr()).ok()?;
        for e in buf.chunks_exact(STAT_SIZE) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..10]);
            stats.set(tag, u64::from_le_bytes(v));
        }
    }
    Some(stats)
}
