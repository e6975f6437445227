//! What the engine reports: fleet and per-guest counters (kept incrementally, and
//! recounted from the metadata for audits), metadata size, page and frame listings.

use super::frames::FrameSt;
use super::pages::{Guest, PageSt};
use super::{Engine, PageInfo};
use crate::counters::{Counters, GuestCounters};
use crate::host::{DomainId, FrameId, Gfn, GuestId, PAGE_SIZE};

use super::frames::Domain;

impl Engine {
    /// Fleet-wide counters (kept incrementally).
    pub fn counters(&self) -> Counters {
        let mut c = Counters {
            full_scans: self.stats.full_scans,
            pages_scanned: self.stats.pages_scanned,
            pages_skipped: self.stats.pages_skipped,
            merges: self.stats.merges,
            splits: self.stats.splits,
            frames_freed: self.stats.frames_freed,
            merge_mismatches: self.stats.mismatches,
            pages_skipped_vma_budget: self.stats.skipped_vma,
            ..Counters::default()
        };
        let mut merged = 0;
        for g in self.guests.iter().flatten() {
            merged += g.counts[PageSt::Merged as usize];
            c.zero_pages += g.counts[PageSt::Zero as usize];
            c.pages_unshared += g.counts[PageSt::Unique as usize];
            c.pages_volatile += g.counts[PageSt::Volatile as usize];
            c.guests += 1;
            c.guests_failed += u64::from(g.failed);
        }
        for d in self.domains.iter() {
            c.pages_shared += d.allocated;
            c.pool_frames += d.frames.len() as u64;
        }
        self.finish_counters(&mut c, merged);
        c
    }

    fn finish_counters(&self, c: &mut Counters, merged: u64) {
        c.pages_sharing = merged.saturating_sub(c.pages_shared);
        for d in self.domains.iter() {
            for &head in d.stable.values() {
                let k = d.chain_from(head).count() as u64;
                if k > 1 {
                    c.stable_node_chains += 1;
                    c.stable_node_dups += k;
                }
            }
        }
        c.metadata_bytes = self.metadata_bytes() as u64;
        c.general_profit =
            ((c.pages_sharing + c.zero_pages) * PAGE_SIZE as u64) as i64 - c.metadata_bytes as i64;
    }

    /// The same counters recounted from the per-page and per-frame metadata (audits).
    pub fn recount(&self) -> Counters {
        let mut c = self.counters();
        let (mut merged, mut zero, mut uniq, mut vol) = (0, 0, 0, 0);
        for g in self.guests.iter().flatten() {
            for p in &g.pages {
                match p.state {
                    PageSt::Merged => merged += 1,
                    PageSt::Zero => zero += 1,
                    PageSt::Unique => uniq += 1,
                    PageSt::Volatile => vol += 1,
                    PageSt::Unscanned | PageSt::Deferred | PageSt::Pending => {}
                }
            }
        }
        c.zero_pages = zero;
        c.pages_unshared = uniq;
        c.pages_volatile = vol;
        c.pages_shared = self
            .domains
            .iter()
            .flat_map(|d| d.frames.iter())
            .filter(|f| f.refs > 0)
            .count() as u64;
        c.stable_node_chains = 0;
        c.stable_node_dups = 0;
        self.finish_counters(&mut c, merged);
        c
    }

    /// Counters of one guest, like `/proc/PID/ksm_stat`.
    pub fn guest_counters(&self, id: GuestId) -> Option<GuestCounters> {
        let slot = *self.ids.get(&id)? as usize;
        let g = self.guests[slot].as_ref()?;
        let merging = g.counts[PageSt::Merged as usize];
        let zero = g.counts[PageSt::Zero as usize];
        Some(GuestCounters {
            id,
            domain: g.domain,
            pages: g.pages.len() as u64,
            merging_pages: merging,
            zero_pages: zero,
            unshared_pages: g.counts[PageSt::Unique as usize],
            volatile_pages: g.counts[PageSt::Volatile as usize],
            profit: ((merging + zero) * PAGE_SIZE as u64) as i64 - g.bytes() as i64,
            vma_mappings: g.vmas,
            vma_budget: g.budget,
            failed: g.failed,
        })
    }

    /// Counters of every guest.
    pub fn guests(&self) -> Vec<GuestCounters> {
        let mut ids: Vec<GuestId> = self.ids.keys().copied().collect();
        ids.sort();
        ids.into_iter()
            .filter_map(|id| self.guest_counters(id))
            .collect()
    }

    /// Bytes of the engine's own metadata (per-page records, indexes, frame records).
    pub fn metadata_bytes(&self) -> usize {
        std::mem::size_of::<Engine>()
            + self
                .guests
                .iter()
                .flatten()
                .map(Guest::bytes)
                .sum::<usize>()
            + self.domains.iter().map(Domain::bytes).sum::<usize>()
    }

    /// Domains whose state the engine holds: one per share group that has a registered
    /// guest (a domain is dropped with its last guest).
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Pages tracked (all registered guests).
    pub fn tracked_pages(&self) -> u64 {
        self.guests
            .iter()
            .flatten()
            .map(|g| g.pages.len() as u64)
            .sum()
    }

    /// What the engine knows about one page.
    pub fn page_info(&self, id: GuestId, gfn: Gfn) -> Option<PageInfo> {
        let g = self.guests[*self.ids.get(&id)? as usize].as_ref()?;
        let p = g.pages.get(gfn as usize)?;
        Some(PageInfo {
            state: p.state.into(),
            mapping: p.frame(),
            hash: p.hash,
        })
    }

    /// Frames in use: (domain, frame, sharers).
    pub fn frames(&self) -> Vec<(DomainId, FrameId, u32)> {
        self.domains
            .iter()
            .flat_map(|d| {
                d.frames
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| f.state != FrameSt::Free)
                    .map(move |(i, f)| (d.id, i as FrameId, f.refs))
            })
            .collect()
    }
}
