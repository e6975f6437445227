//! The scan: ksmd's cursor over guests (mm slots), rounds of `pages_to_scan` visits, which
//! pages a visit digests (a range, or a dirty pass), smart-scan skips, and guests whose host
//! failed. Each batch of digests goes to `process`: classify, budget, execute.

use tracing::warn;

use super::pages::{PageMeta, PageSt, Seen, F_WATCH, F_ZERO};
use super::plan::Plan;
use super::{Engine, RunMode};
use crate::counters::RoundReport;
use crate::host::{expect_results, HostError, MergeHost, PageDigest, PageRun};

/// Pages per host round trip when digesting a range.
pub(super) const BATCH: usize = 1024;
/// Most pages a range batch may span (smart-scan skips included).
const SPAN: usize = 8 * BATCH;

/// The pages a range visit digests.
pub(super) struct RangePick {
    /// The pages, as runs.
    pub(super) runs: Vec<PageRun>,
    /// Pages in `runs`.
    pub(super) taken: usize,
    /// Pages skipped (smart scan, VMA-budget back-off).
    pub(super) skipped: u64,
    /// Where the next visit of the guest starts.
    pub(super) end: usize,
}

/// The pages of `runs` with their digests, in order.
pub(super) fn seen_of(runs: &[PageRun], digests: &[PageDigest]) -> Vec<Seen> {
    let gfns = runs
        .iter()
        .flat_map(|r| (0..r.len).map(|k| r.gfn as u32 + k));
    gfns.zip(digests).map(|(gfn, &d)| Seen { gfn, d }).collect()
}

impl Engine {
    /// One wake-up of the scanner: visits up to `pages_to_scan` pages, guests in turn from
    /// where the last round stopped, and merges what it can. Host failures mark the guest
    /// failed and the round goes on.
    pub fn scan_round(&mut self, host: &mut impl MergeHost) -> RoundReport {
        let mut rep = RoundReport::default();
        if self.knobs.run != RunMode::Run {
            return rep;
        }
        let mut budget = u64::from(self.knobs.pages_to_scan);
        let mut work_since_wrap = 0u64;
        while budget > 0 {
            if !self.guests.iter().flatten().any(|g| !g.failed) {
                break;
            }
            let slot = self.cursor_slot;
            if slot >= self.guests.len() {
                self.cursor_slot = 0;
                self.cursor_gfn = 0;
                self.stats.full_scans += 1;
                rep.full_scans += 1;
                if work_since_wrap == 0 {
                    break;
                }
                work_since_wrap = 0;
                continue;
            }
            let (active, dirty_mode) = match &self.guests[slot] {
                Some(g) if !g.failed => (true, g.dirty_source && g.first_pass_done),
                _ => (false, false),
            };
            if !active {
                self.next_slot();
                continue;
            }
            // One host round trip at most per visit.
            let max = (budget as usize).min(BATCH);
            let (work, done) = if dirty_mode {
                self.visit_dirty(slot, max as u32, host, &mut rep)
            } else {
                self.visit_range(slot, host, &mut rep, max)
            };
            budget = budget.saturating_sub(work);
            work_since_wrap += work;
            let failed = self.guests[slot].as_ref().is_none_or(|g| g.failed);
            if done || failed {
                self.next_slot();
            }
        }
        self.stats.pages_scanned += rep.pages_visited;
        self.stats.pages_skipped += rep.pages_skipped;
        rep
    }

    pub(super) fn next_slot(&mut self) {
        self.cursor_slot += 1;
        self.cursor_gfn = 0;
    }

    /// Smart scan (KSM's `should_skip_rmap_item`): a volatile or candidate page that kept
    /// failing to merge is visited only every 2nd, 4th or 8th full scan.
    pub(super) fn smart_skip(&self, p: &PageMeta, gfn: usize) -> bool {
        if !self.knobs.smart_scan || p.fails < 2 {
            return false;
        }
        match p.state {
            PageSt::Volatile | PageSt::Unique => {}
            PageSt::Unscanned
            | PageSt::Merged
            | PageSt::Zero
            | PageSt::Deferred
            | PageSt::Pending => return false,
        }
        let period = match p.fails {
            2..=3 => 2,
            4..=5 => 4,
            _ => 8,
        };
        !(self.stats.full_scans + gfn as u64).is_multiple_of(period)
    }

    /// Visits the next range of a guest from the cursor (KSM's `scan_get_next_rmap_item`):
    /// one digest call for up to `want` pages, smart-scan skips left out. Every page of a
    /// guest is first digested here (unscanned -> volatile, or candidate with a dirty
    /// source). Returns (pages visited, guest done).
    fn visit_range(
        &mut self,
        slot: usize,
        host: &mut impl MergeHost,
        rep: &mut RoundReport,
        want: usize,
    ) -> (u64, bool) {
        let pick = self.range_pick(slot, self.cursor_gfn, want);
        rep.pages_skipped += pick.skipped;
        let RangePick {
            runs, taken, end, ..
        } = pick;
        let g = self.guests.live(slot);
        let n = g.pages.len();
        let id = g.id;
        if taken > 0 {
            let mut digests = std::mem::take(&mut self.digests);
            rep.host_calls += 1;
            let res = host
                .digest(id, &runs, &mut digests)
                .and_then(|()| expect_results(id, "digest", digests.len(), taken));
            if let Err(e) = res {
                self.digests = digests;
                self.fail_guest(slot, &e, Some(rep));
                return (taken as u64, true);
            }
            rep.pages_visited += taken as u64;
            let seen = seen_of(&runs, &digests);
            self.digests = digests;
            self.process(slot, seen, host, rep);
        }
        self.cursor_gfn = end;
        let done = end >= n;
        if done {
            if let Some(g) = self.guests[slot].as_mut() {
                g.first_pass_done = true;
                g.end_pass_backoff();
            }
        }
        (taken as u64, done)
    }

    /// The pages of a range visit of guest `slot` from `start`: at most `want` pages to
    /// digest within [`SPAN`] pages, smart-scan skips and held deferred pages left out.
    pub(super) fn range_pick(&self, slot: usize, start: usize, want: usize) -> RangePick {
        let g = self.guests.live(slot);
        let n = g.pages.len();
        let start = start.min(n);
        let mut runs: Vec<PageRun> = Vec::new();
        let mut taken = 0usize;
        let mut skipped = 0u64;
        let mut gfn = start;
        let hold = g.holds_deferred();
        while gfn < n && taken < want && gfn < start + SPAN {
            let p = &g.pages[gfn];
            if (hold && p.state == PageSt::Deferred) || self.smart_skip(p, gfn) {
                skipped += 1;
            } else {
                match runs.last_mut() {
                    Some(r) if r.gfn + u64::from(r.len) == gfn as u64 => r.len += 1,
                    _ => runs.push(PageRun {
                        gfn: gfn as u64,
                        len: 1,
                    }),
                }
                taken += 1;
            }
            gfn += 1;
        }
        RangePick {
            runs,
            taken,
            skipped,
            end: gfn,
        }
    }

    /// Visits up to `max` pages a dirty-source guest wrote since their last digest (one
    /// `digest_dirty` call); at the end of the pass, promotes the watched pages that were
    /// not written. Returns (pages visited, pass done).
    fn visit_dirty(
        &mut self,
        slot: usize,
        max: u32,
        host: &mut impl MergeHost,
        rep: &mut RoundReport,
    ) -> (u64, bool) {
        let g = self.guests.live_mut(slot);
        if !g.in_pass {
            g.in_pass = true;
            g.pass = g.pass.wrapping_add(1);
        }
        let id = g.id;
        let n = g.pages.len() as u64;
        let mut dirty = std::mem::take(&mut self.dirty);
        rep.host_calls += 1;
        let res = host.digest_dirty(id, max, &mut dirty).and_then(|more| {
            if dirty.len() > max as usize || dirty.iter().any(|(gfn, _)| *gfn >= n) {
                Err(HostError::Protocol {
                    guest: id,
                    reason: "dirty digests out of range".into(),
                })
            } else {
                Ok(more)
            }
        });
        let more = match res {
            Ok(m) => m,
            Err(e) => {
                self.dirty = dirty;
                self.fail_guest(slot, &e, Some(rep));
                return (0, true);
            }
        };
        let work = dirty.len() as u64;
        rep.pages_visited += work;
        let seen: Vec<Seen> = dirty
            .iter()
            .map(|&(gfn, d)| Seen { gfn: gfn as u32, d })
            .collect();
        self.dirty = dirty;
        if !seen.is_empty() {
            self.process(slot, seen, host, rep);
        }
        if more {
            return (work.max(1), false);
        }
        self.promote_unwritten(slot, host, rep);
        (work, true)
    }

    /// End of a dirty pass (volatile or deferred -> candidate without a rehash): every page
    /// not reported dirty is unchanged since its last digest, so the watched pages not
    /// digested in this pass are classified again with their recorded hash, as unwritten.
    pub(super) fn promote_unwritten(
        &mut self,
        slot: usize,
        host: &mut impl MergeHost,
        rep: &mut RoundReport,
    ) {
        let Some(g) = self.guests[slot].as_mut().filter(|g| !g.failed) else {
            return;
        };
        g.in_pass = false;
        let hold = g.holds_deferred();
        let old = std::mem::take(&mut g.watch);
        let mut seen = Vec::new();
        for gfn in old {
            let p = &mut g.pages[gfn as usize];
            p.flags &= !F_WATCH;
            if !p.state.watched() {
                continue;
            }
            if p.pass == g.pass || (hold && p.state == PageSt::Deferred) {
                p.flags |= F_WATCH;
                g.watch.push(gfn);
            } else {
                seen.push(Seen {
                    gfn,
                    d: PageDigest {
                        hash: p.hash,
                        zero: p.flags & F_ZERO != 0,
                        split: false,
                        dirty: Some(false),
                    },
                });
            }
        }
        rep.pages_promoted += seen.len() as u64;
        if !seen.is_empty() {
            self.process(slot, seen, host, rep);
        }
        if let Some(g) = self.guests[slot].as_mut() {
            g.end_pass_backoff();
        }
    }

    /// Marks a guest failed: it is not scanned any more and keeps its frame references
    /// (its pages may still map them) until [`Engine::remove_guest`]. Its candidates leave
    /// the unstable set (candidate -> volatile).
    pub(super) fn fail_guest(&mut self, slot: usize, e: &HostError, rep: Option<&mut RoundReport>) {
        let Engine {
            guests,
            domains,
            inflight,
            ..
        } = self;
        let Some(g) = guests[slot].as_mut() else {
            return;
        };
        if g.failed {
            return;
        }
        // A digest it still has outstanding is not waited for.
        inflight.remove(&g.id);
        warn!(guest = g.id.0, error = %e, "guest's host failed; it is no longer scanned");
        g.failed = true;
        let dom = &mut domains[g.dom];
        for gfn in 0..g.pages.len() {
            let p = g.pages[gfn];
            if p.state == PageSt::Unique {
                dom.forget_candidate(p.hash, slot, gfn);
                g.set_state(gfn, PageSt::Volatile);
            }
        }
        if let Some(rep) = rep {
            rep.guests_failed.push(g.id);
        }
    }

    /// One batch of digests of guest `slot`: classify each page, keep the planned merges
    /// within the VMA budgets, then carry the plan out through the host.
    pub(super) fn process(
        &mut self,
        slot: usize,
        mut seen: Vec<Seen>,
        host: &mut impl MergeHost,
        rep: &mut RoundReport,
    ) {
        seen.sort_unstable_by_key(|s| s.gfn);
        let mut plan = Plan::default();
        for s in &seen {
            self.cmp_and_merge_page(slot, s, &mut plan, rep);
        }
        let refused = rep.skipped_vma_budget;
        self.budget_pass(slot, &mut plan, rep);
        self.execute(slot, plan, host, rep);
        if rep.skipped_vma_budget > refused {
            if let Some(g) = self.guests[slot].as_mut() {
                g.refused_in_pass = true;
            }
        }
    }
}
