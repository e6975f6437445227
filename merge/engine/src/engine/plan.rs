//! Planning a batch: which of the merges `cmp_and_merge_page` found are carried out, so
//! that every guest stays within its VMA budget (invariant 6). Merges that extend runs of
//! consecutive frames cost no mapping; isolated ones are refused near the end of the budget
//! unless their run is long. A refused merge defers its page.

use std::collections::HashMap;

use super::frames::to_unique;
use super::frames::FrameSt;
use super::pages::{remap_delta, PageSt, ANON};
use super::Engine;
use crate::counters::RoundReport;
use crate::index::PageRef;

/// A new isolated run is accepted near the end of the VMA budget only if it is this long.
const LONG_RUN: u32 = 4;

/// A planned merge of the visited page `gfn` onto `frame`: a join onto a stable frame, or
/// (with `partner`) a new frame populated from the partner candidate, then joined.
#[derive(Clone, Copy)]
pub(super) struct Act {
    pub(super) gfn: u32,
    pub(super) frame: u32,
    pub(super) partner: Option<PageRef>,
    /// Still planned (not refused by the budget).
    pub(super) ok: bool,
}

/// What one batch will ask the host for.
#[derive(Default)]
pub(super) struct Plan {
    /// Zero pages on anonymous memory: reclaimed.
    pub(super) zero: Vec<u32>,
    /// Zero pages under a pool mapping: remapped anonymous first.
    pub(super) zero_remap: Vec<u32>,
    pub(super) acts: Vec<Act>,
    /// Planned mappings, (slot, gfn) -> map, over the guests' current layouts.
    overlay: HashMap<(u32, u32), u32>,
    /// Planned change of each guest's VMA count.
    pend: HashMap<u32, i64>,
    /// Frames that may have lost their last sharer.
    pub(super) maybe_free: Vec<u32>,
    /// New frames given up before their populate: back to the pool without a host call.
    pub(super) cancelled: Vec<u32>,
    /// Populated frames nobody maps: punched.
    pub(super) doomed: Vec<u32>,
}

impl Plan {
    /// Plans mapping `(slot, gfn)` to `new`, which changes the slot's VMA count by `d`.
    fn remap(&mut self, slot: u32, gfn: u32, new: u32, d: i64) {
        self.overlay.insert((slot, gfn), new);
        *self.pend.entry(slot).or_default() += d;
    }

    /// Undoes [`Plan::remap`].
    fn unremap(&mut self, slot: u32, gfn: u32, d: i64) {
        self.overlay.remove(&(slot, gfn));
        *self.pend.entry(slot).or_default() -= d;
    }
}

/// For each act, the length of the run of consecutive pages on consecutive frames it starts.
fn run_lengths(acts: &[Act]) -> Vec<u32> {
    let n = acts.len();
    let mut run = vec![1u32; n];
    for i in (0..n.saturating_sub(1)).rev() {
        let (a, b) = (acts[i], acts[i + 1]);
        if b.gfn == a.gfn + 1 && b.frame == a.frame + 1 {
            run[i] = run[i + 1] + 1;
        }
    }
    run
}

impl Engine {
    /// Mapping delta of changing `(slot, gfn)` to `new`, given the planned changes.
    fn delta(&self, plan: &Plan, slot: u32, gfn: u32, new: u32) -> i64 {
        let g = self.guests.live(slot as usize);
        remap_delta(g.pages.len(), gfn as usize, new, |x| {
            plan.overlay
                .get(&(slot, x as u32))
                .copied()
                .unwrap_or(g.pages[x].map)
        })
    }

    /// Mappings guest `slot` may still add, given the planned changes.
    fn room(&self, plan: &Plan, slot: u32) -> i64 {
        let g = self.guests.live(slot as usize);
        i64::from(g.budget) - i64::from(g.vmas) - plan.pend.get(&slot).copied().unwrap_or(0)
    }

    /// Keeps every guest within its VMA budget, preferring long runs when it runs low:
    /// refused zero remaps and merges leave their pages deferred.
    pub(super) fn budget_pass(&mut self, slot: usize, plan: &mut Plan, rep: &mut RoundReport) {
        let s32 = slot as u32;
        let (budget, di) = {
            let g = self.guests.live(slot);
            (i64::from(g.budget), g.dom)
        };
        let low = (budget / 16).max(4);
        self.plan_zero_remaps(slot, plan, rep);
        let run = run_lengths(&plan.acts);
        for (i, &run_len) in run.iter().enumerate() {
            let a = plan.acts[i];
            if self.domains[di].frames[a.frame as usize].state == FrameSt::Cancelled {
                // Its frame was given up earlier in this batch: the page stays a candidate.
                plan.acts[i].ok = false;
                to_unique(
                    &mut self.guests,
                    &mut self.domains,
                    PageRef {
                        slot: s32,
                        gfn: a.gfn,
                    },
                );
                continue;
            }
            if !self.admit_merge(plan, s32, a, run_len, low) {
                plan.acts[i].ok = false;
                self.defer_merge(slot, di, a, plan, rep);
            }
        }
    }

    /// Zero pages under a pool mapping need an anonymous remap (one more mapping at most):
    /// kept if the budget has room, else deferred.
    fn plan_zero_remaps(&mut self, slot: usize, plan: &mut Plan, rep: &mut RoundReport) {
        let s32 = slot as u32;
        let remaps = std::mem::take(&mut plan.zero_remap);
        for gfn in remaps {
            let d = self.delta(plan, s32, gfn, ANON);
            if d <= self.room(plan, s32) {
                plan.remap(s32, gfn, ANON, d);
                plan.zero_remap.push(gfn);
            } else {
                self.stats.count_vma_skip(rep);
                self.guests
                    .live_mut(slot)
                    .set_state(gfn as usize, PageSt::Deferred);
            }
        }
    }

    /// Whether merge `a` (its partner's mapping first, then the visitor's) fits the VMA
    /// budgets; if so its mappings are planned. `run_len` and `low`: near the end of the
    /// visitor's budget only long runs are admitted.
    fn admit_merge(&self, plan: &mut Plan, s32: u32, a: Act, run_len: u32, low: i64) -> bool {
        let new = a.frame + 1;
        let partner = match a.partner {
            Some(pr) => {
                let dp = self.delta(plan, pr.slot, pr.gfn, new);
                if dp > self.room(plan, pr.slot) {
                    return false;
                }
                plan.remap(pr.slot, pr.gfn, new, dp);
                Some((pr, dp))
            }
            None => None,
        };
        let dv = self.delta(plan, s32, a.gfn, new);
        let room = self.room(plan, s32);
        if dv > room || (dv > 0 && room - dv < low && run_len < LONG_RUN) {
            if let Some((pr, dp)) = partner {
                plan.unremap(pr.slot, pr.gfn, dp);
            }
            return false;
        }
        plan.remap(s32, a.gfn, new, dv);
        true
    }

    /// A merge refused for lack of VMA budget (-> deferred): the visited page is deferred;
    /// a new frame is cancelled and its partner goes back to the unstable set, a join's
    /// reference is dropped.
    fn defer_merge(
        &mut self,
        slot: usize,
        di: usize,
        a: Act,
        plan: &mut Plan,
        rep: &mut RoundReport,
    ) {
        self.stats.count_vma_skip(rep);
        self.guests
            .live_mut(slot)
            .set_state(a.gfn as usize, PageSt::Deferred);
        match a.partner {
            Some(pr) => self.cancel_new_frame(di, a.frame, pr, &mut plan.cancelled),
            None => self.domains[di].release_frame_ref(a.frame, &mut plan.maybe_free),
        }
    }

    /// Gives up a new frame before its populate: out of the stable index, cancelled
    /// (released at the end of the batch without a host call); its partner page goes back
    /// to being a candidate.
    pub(super) fn cancel_new_frame(
        &mut self,
        di: usize,
        f: u32,
        partner: PageRef,
        cancelled: &mut Vec<u32>,
    ) {
        self.domains[di].unlist(f, FrameSt::Cancelled, 0);
        cancelled.push(f);
        to_unique(&mut self.guests, &mut self.domains, partner);
    }
}
