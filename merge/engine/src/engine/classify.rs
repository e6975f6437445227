//! What a digest means for a page: KSM's `cmp_and_merge_page`, minus the host work. Each
//! visited page leaves its previous state (a merged page may have been split), is checked
//! against its last hash (volatile or not), and is then planned as a zero page, a join onto
//! a stable frame, or a new frame shared with a twin candidate; or it becomes a candidate.

use super::frames::tab_insert;
use super::pages::{PageMeta, PageSt, Seen, ANON, F_ZERO};
use super::plan::{Act, Plan};
use super::{Engine, Slots};
use crate::counters::RoundReport;
use crate::index::PageRef;

impl Engine {
    /// KSM's `cmp_and_merge_page`, minus the host work: decides what happens to one
    /// visited page and records it in `plan` (planned pages are pending until `execute`).
    /// Transitions: merged -> split -> volatile; any -> volatile (changed); unchanged ->
    /// zero (planned), merged (planned join or populate) or candidate.
    pub(super) fn cmp_and_merge_page(
        &mut self,
        slot: usize,
        s: &Seen,
        plan: &mut Plan,
        rep: &mut RoundReport,
    ) {
        let before = self.guests.live(slot).pages[s.gfn as usize];
        let Some(force) = self.leave_state(slot, s, before, plan, rep) else {
            return;
        };
        let changed = force
            || s.d.dirty == Some(true)
            || (before.state == PageSt::Unscanned && s.d.dirty.is_none())
            || (before.state != PageSt::Unscanned && before.hash != s.d.hash);
        self.record_digest(slot, s, changed);
        let gfn = s.gfn as usize;
        if changed {
            self.guests.live_mut(slot).set_state(gfn, PageSt::Volatile);
        } else if s.d.zero {
            if before.map == ANON {
                plan.zero.push(s.gfn);
            } else {
                plan.zero_remap.push(s.gfn);
            }
            self.guests.live_mut(slot).set_state(gfn, PageSt::Pending);
        } else if !self.stable_tree_search(slot, s.gfn, s.d.hash, plan) {
            self.unstable_tree_search_insert(slot, s.gfn, s.d.hash, plan);
        }
    }

    /// The page's previous state as the digest finds it. `None`: nothing more to do (in
    /// this batch's plan already, merged and not split, zero and untouched). Else whether
    /// the page counts as changed whatever its hash: a split merged page (merged -> split:
    /// the guest wrote, the kernel COWed; its sharer reference is dropped, the frame freed
    /// when none is left) or a zero page that was written. A candidate leaves the unstable
    /// set here, to be re-inserted if still unmatched.
    fn leave_state(
        &mut self,
        slot: usize,
        s: &Seen,
        before: PageMeta,
        plan: &mut Plan,
        rep: &mut RoundReport,
    ) -> Option<bool> {
        let Engine {
            guests,
            domains,
            stats,
            ..
        } = self;
        let gfn = s.gfn as usize;
        let g = guests.live_mut(slot);
        let dom = &mut domains[g.dom];
        match before.state {
            PageSt::Pending => None,
            PageSt::Merged if !s.d.split => {
                g.pages[gfn].pass = g.pass;
                None
            }
            PageSt::Merged => {
                dom.release_frame_ref(before.map - 1, &mut plan.maybe_free);
                stats.splits += 1;
                rep.splits += 1;
                g.set_state(gfn, PageSt::Volatile);
                Some(true)
            }
            // Still zero and not written since it was dropped: nothing to do. Written
            // (even with zeros) it holds memory again and goes round once more.
            PageSt::Zero if s.d.zero && !s.d.split && s.d.dirty != Some(true) => {
                g.pages[gfn].pass = g.pass;
                None
            }
            PageSt::Zero => Some(true),
            PageSt::Unique => {
                dom.forget_candidate(before.hash, slot, gfn);
                Some(false)
            }
            PageSt::Unscanned | PageSt::Volatile | PageSt::Deferred => Some(false),
        }
    }

    /// Records the digest in the page's metadata (KSM's checksum) and counts a visit that
    /// did not merge if the page changed.
    fn record_digest(&mut self, slot: usize, s: &Seen, changed: bool) {
        let g = self.guests.live_mut(slot);
        let pass = g.pass;
        let p = &mut g.pages[s.gfn as usize];
        p.hash = s.d.hash;
        p.pass = pass;
        if s.d.zero {
            p.flags |= F_ZERO;
        } else {
            p.flags &= !F_ZERO;
        }
        if changed {
            p.failed_visit();
        }
    }

    /// KSM's `stable_tree_search`: a stable frame of content `h` with room for another
    /// sharer. If there is one, the page's join is planned (-> merged, pending the byte
    /// compare) and its reference counted now.
    fn stable_tree_search(&mut self, slot: usize, gfn: u32, h: u64, plan: &mut Plan) -> bool {
        let max = self.knobs.max_page_sharing;
        let g = self.guests.live_mut(slot);
        let dom = &mut self.domains[g.dom];
        let Some(f) = dom.stable_find(h, max) else {
            return false;
        };
        dom.frames[f as usize].refs += 1;
        plan.acts.push(Act {
            gfn,
            frame: f,
            partner: None,
            ok: true,
        });
        g.set_state(gfn as usize, PageSt::Pending);
        true
    }

    /// KSM's `unstable_tree_search_insert`: a twin candidate (same hash, another page) is
    /// taken out of the unstable set and a new frame allocated for both (the partner is
    /// populated into it, then the page joins: candidate -> merged, pending); without a
    /// twin the page becomes a candidate itself (volatile/unscanned -> candidate).
    fn unstable_tree_search_insert(&mut self, slot: usize, gfn: u32, h: u64, plan: &mut Plan) {
        let Engine {
            guests, domains, ..
        } = self;
        let me = PageRef {
            slot: slot as u32,
            gfn,
        };
        let g = guests.live(slot);
        let di = g.dom;
        let prev = (gfn as usize).checked_sub(1).map(|p| g.pages[p].map);
        // Frames in scan order: extend the run of the batch's previous act, or of the
        // previous page's frame.
        let pref = match plan.acts.last() {
            Some(a) if a.gfn + 1 == gfn => Some(a.frame + 1),
            _ => prev.filter(|&m| m != ANON),
        };
        let dom = &mut domains[di];
        let found = {
            let guests_ro: &Slots = guests;
            dom.unstable.find(h, |r| {
                r != me
                    && guests_ro[r.slot as usize].as_ref().is_some_and(|pg| {
                        let pp = &pg.pages[r.gfn as usize];
                        !pg.failed && pp.state == PageSt::Unique && pp.hash == h
                    })
            })
        };
        let Some(pr) = found else {
            let g = guests.live_mut(slot);
            g.pages[gfn as usize].failed_visit();
            g.set_state(gfn as usize, PageSt::Unique);
            tab_insert(guests, dom, me);
            return;
        };
        dom.unstable.remove(h, pr);
        guests
            .live_mut(pr.slot as usize)
            .set_state(pr.gfn as usize, PageSt::Pending);
        let f = dom.alloc(pref);
        let fr = &mut dom.frames[f as usize];
        fr.hash = h;
        fr.refs = 2;
        dom.stable_insert(f);
        plan.acts.push(Act {
            gfn,
            frame: f,
            partner: Some(pr),
            ok: true,
        });
        guests
            .live_mut(slot)
            .set_state(gfn as usize, PageSt::Pending);
    }
}
