//! Execution: the host calls of a planned batch, in order (reclaim zero pages, remap zero
//! pages under pool mappings, populate new frames from partners, join the visitor's pages),
//! and what each result does to the pages and frames; then the frames nobody maps go back
//! to the pool. Also unmerging a whole guest. A call whose outcome is unknown (host error,
//! wrong result count) marks its guest failed and counts its pages as merged where a frame
//! might be mapped (invariant 4).

use std::collections::BTreeMap;

use super::frames::{to_unique, FrameSt};
use super::pages::{apply_map, PageSt, ANON};
use super::plan::Plan;
use super::Engine;
use crate::counters::RoundReport;
use crate::host::{
    expect_results, Gfn, HostError, MergeHost, MergeOp, MergeOutcome, MergeResult, OpKind,
    UnmergeOutcome, ZeroOutcome,
};
use crate::index::PageRef;

/// Host ops for `(gfn, frame)` pairs in gfn order: consecutive pages onto consecutive
/// frames make one run.
fn runs_of(pairs: &[(u32, u32)], kind: OpKind) -> Vec<MergeOp> {
    let mut ops: Vec<MergeOp> = Vec::new();
    for &(gfn, f) in pairs {
        if let Some(last) = ops.last_mut() {
            if last.gfn + u64::from(last.len) == u64::from(gfn) && last.frame + last.len == f {
                last.len += 1;
                continue;
            }
        }
        ops.push(MergeOp {
            gfn: u64::from(gfn),
            len: 1,
            frame: f,
            kind,
        });
    }
    ops
}

/// The gfns of a batch, as the host takes them.
fn host_gfns(gfns: &[u32]) -> Vec<Gfn> {
    gfns.iter().map(|&g| u64::from(g)).collect()
}

impl Engine {
    /// Issues the batch's host calls and applies their results (the transitions planned
    /// as pending end here: zero, merged, or back to volatile, candidate or deferred).
    pub(super) fn execute(
        &mut self,
        slot: usize,
        mut plan: Plan,
        host: &mut impl MergeHost,
        rep: &mut RoundReport,
    ) {
        let di = self.guests.live(slot).dom;
        self.reclaim_zero_pages(slot, &plan.zero, host, rep);
        self.remap_zero_pages(slot, &plan.zero_remap, host, rep);
        self.populate_new_frames(slot, &mut plan, host, rep);
        let joins = self.select_joins(slot, &mut plan);
        self.join_frames(slot, &joins, &mut plan, host, rep);
        self.release_unused_frames(di, plan, host, rep);
    }

    /// Step 1 (candidate, all zero -> zero): the host drops zero pages on anonymous
    /// memory; a page that was not zero any more goes back to volatile.
    fn reclaim_zero_pages(
        &mut self,
        slot: usize,
        zero: &[u32],
        host: &mut impl MergeHost,
        rep: &mut RoundReport,
    ) {
        if zero.is_empty() {
            return;
        }
        let id = self.guests.live(slot).id;
        self.note_page_work(id, zero.iter().copied());
        let g = self.guests.live_mut(slot);
        let gfns = host_gfns(zero);
        let mut out = Vec::new();
        rep.host_calls += 1;
        let res = host
            .reclaim_zero(id, &gfns, &mut out)
            .and_then(|()| expect_results(id, "reclaim", out.len(), gfns.len()));
        let ok = res.is_ok();
        for (k, &gfn) in zero.iter().enumerate() {
            let gfn = gfn as usize;
            if ok && out[k] == ZeroOutcome::Reclaimed {
                g.pages[gfn].fails = 0;
                g.set_state(gfn, PageSt::Zero);
                rep.zero_reclaimed += 1;
            } else {
                g.set_state(gfn, PageSt::Volatile);
            }
        }
        if let Err(e) = res {
            self.fail_guest(slot, &e, Some(rep));
        }
    }

    /// Step 2 (split page, now all zero -> volatile, anonymous): a zero page under a pool
    /// mapping is remapped anonymous first (never `MADV_DONTNEED`ed there: invariant 4)
    /// and reclaimed on a later visit; without VMA budget on the host it is deferred.
    fn remap_zero_pages(
        &mut self,
        slot: usize,
        remap: &[u32],
        host: &mut impl MergeHost,
        rep: &mut RoundReport,
    ) {
        if remap.is_empty() {
            return;
        }
        let id = self.guests.live(slot).id;
        self.note_page_work(id, remap.iter().copied());
        let g = self.guests.live_mut(slot);
        let id = g.id;
        let gfns = host_gfns(remap);
        let mut out = Vec::new();
        // A guest failed in step 1 is not called again.
        let res = (!g.failed).then(|| {
            rep.host_calls += 1;
            host.unmerge(id, &gfns, &mut out)
                .and_then(|()| expect_results(id, "unmerge", out.len(), gfns.len()))
        });
        let ok = matches!(res, Some(Ok(())));
        for (k, &gfn) in remap.iter().enumerate() {
            let gfn = gfn as usize;
            if ok && out[k] == UnmergeOutcome::Unmerged {
                apply_map(g, gfn, ANON);
                g.set_state(gfn, PageSt::Volatile);
            } else if ok {
                g.set_state(gfn, PageSt::Deferred);
            } else {
                g.set_state(gfn, PageSt::Volatile);
            }
        }
        if let Some(Err(e)) = res {
            self.fail_guest(slot, &e, Some(rep));
        }
    }

    /// Step 3 (KSM's `try_to_merge_two_pages`, first half; partner candidate -> merged):
    /// new frames are populated from their partner pages, one host call per partner guest.
    /// If either guest has failed, the frames are cancelled and the partners go back to
    /// being candidates.
    fn populate_new_frames(
        &mut self,
        slot: usize,
        plan: &mut Plan,
        host: &mut impl MergeHost,
        rep: &mut RoundReport,
    ) {
        let di = self.guests.live(slot).dom;
        let mut by_partner: BTreeMap<u32, Vec<(PageRef, u32)>> = BTreeMap::new();
        for a in plan.acts.iter().filter(|a| a.ok) {
            if let Some(pr) = a.partner {
                by_partner.entry(pr.slot).or_default().push((pr, a.frame));
            }
        }
        let visitor_failed = self.guests.live(slot).failed;
        for (pslot, mut news) in by_partner {
            if visitor_failed || self.guests.live(pslot as usize).failed {
                for (pr, f) in news {
                    self.cancel_new_frame(di, f, pr, &mut plan.cancelled);
                }
                continue;
            }
            news.sort_unstable_by_key(|(pr, _)| pr.gfn);
            self.populate_from_partner(pslot as usize, di, &news, plan, host, rep);
        }
    }

    /// One populate call to partner guest `pslot` for its `(page, new frame)` pairs, and
    /// what each result does: populated -> the frame is live and the partner merged;
    /// mismatch or no VMA budget -> the frame is doomed (punched) and the partner goes
    /// back to volatile or candidate; unknown outcome -> the frame is orphaned, counted as
    /// mapped by the partner until its (now failed) guest is removed.
    fn populate_from_partner(
        &mut self,
        pslot: usize,
        di: usize,
        news: &[(PageRef, u32)],
        plan: &mut Plan,
        host: &mut impl MergeHost,
        rep: &mut RoundReport,
    ) {
        let pid = self.guests.live(pslot).id;
        let pairs: Vec<(u32, u32)> = news.iter().map(|&(pr, f)| (pr.gfn, f)).collect();
        let ops = runs_of(&pairs, OpKind::Populate);
        let mut out = Vec::new();
        rep.host_calls += 1;
        self.note_page_work(pid, pairs.iter().map(|&(gfn, _)| gfn));
        let res = host
            .merge(pid, &ops, &mut out)
            .and_then(|()| expect_results(pid, "populate", out.len(), pairs.len()));
        if let Err(HostError::Busy { .. }) = res {
            // The partner's agent is busy (a slow or stalled digest): nothing was done.
            // The frames are cancelled, the partners stay candidates and the visitor's
            // pages go back to being candidates: they meet again on a later visit.
            rep.partners_busy += news.len() as u64;
            for &(pr, f) in news {
                self.cancel_new_frame(di, f, pr, &mut plan.cancelled);
            }
            return;
        }
        for (k, &(pr, f)) in news.iter().enumerate() {
            match res.as_ref().map(|_| out[k]) {
                Err(_) => self.orphan_frame(di, f, pr),
                Ok(r) if r.outcome == MergeOutcome::Merged => {
                    self.frame_populated(di, f, pr, r, rep)
                }
                Ok(r) => {
                    self.domains[di].unlist(f, FrameSt::Doomed, 0);
                    plan.doomed.push(f);
                    if r.outcome == MergeOutcome::NoVmaBudget {
                        self.stats.count_vma_skip(rep);
                        to_unique(&mut self.guests, &mut self.domains, pr);
                    } else {
                        self.guests
                            .live_mut(pslot)
                            .set_state(pr.gfn as usize, PageSt::Volatile);
                    }
                }
            }
        }
        if let Err(e) = res {
            self.fail_guest(pslot, &e, Some(rep));
        }
    }

    /// Unknown populate outcome: assume the partner maps frame `f`, so it is kept until
    /// that guest is removed; nobody else joins it.
    fn orphan_frame(&mut self, di: usize, f: u32, pr: PageRef) {
        self.domains[di].unlist(f, FrameSt::Orphan, 1);
        self.guests
            .live_mut(pr.slot as usize)
            .mark_merged(pr.gfn as usize, f);
    }

    /// Frame `f` now holds partner `pr`'s content (the hash the host reports is what it
    /// copied) and is mapped over it: the frame is live, the partner merged.
    fn frame_populated(
        &mut self,
        di: usize,
        f: u32,
        pr: PageRef,
        r: MergeResult,
        rep: &mut RoundReport,
    ) {
        let dom = &mut self.domains[di];
        dom.frames[f as usize].state = FrameSt::Live;
        if dom.frames[f as usize].hash != r.hash {
            dom.stable_remove(f);
            dom.frames[f as usize].hash = r.hash;
            dom.stable_insert(f);
        }
        let pg = self.guests.live_mut(pr.slot as usize);
        pg.mark_merged(pr.gfn as usize, f);
        let p = &mut pg.pages[pr.gfn as usize];
        p.hash = r.hash;
        p.fails = 0;
        self.stats.count_merge(rep);
    }

    /// Before step 4: the visitor's planned merges whose frame is live are joined; the
    /// others (frame not populated, or the visitor failed) drop their reference and the
    /// page goes back to being a candidate. Returns the joins as `(gfn, frame)`.
    fn select_joins(&mut self, slot: usize, plan: &mut Plan) -> Vec<(u32, u32)> {
        let (visitor_failed, di) = {
            let g = self.guests.live(slot);
            (g.failed, g.dom)
        };
        let mut joins = Vec::new();
        for a in plan.acts.iter().filter(|a| a.ok) {
            let live = self.domains[di].frames[a.frame as usize].state == FrameSt::Live;
            if live && !visitor_failed {
                joins.push((a.gfn, a.frame));
                continue;
            }
            if live {
                self.domains[di].release_frame_ref(a.frame, &mut plan.maybe_free);
            }
            let me = PageRef {
                slot: slot as u32,
                gfn: a.gfn,
            };
            to_unique(&mut self.guests, &mut self.domains, me);
        }
        joins
    }

    /// Step 4 (KSM's `try_to_merge_with_ksm_page`; candidate -> merged): the visitor's
    /// pages join their frames in one call, each after a byte compare under write
    /// protection (invariant 2). Mismatch -> volatile, no VMA budget -> deferred, both
    /// dropping their reference; an unknown outcome counts as merged (invariant 4).
    fn join_frames(
        &mut self,
        slot: usize,
        joins: &[(u32, u32)],
        plan: &mut Plan,
        host: &mut impl MergeHost,
        rep: &mut RoundReport,
    ) {
        if joins.is_empty() {
            return;
        }
        let id = self.guests.live(slot).id;
        let ops = runs_of(joins, OpKind::Join);
        let mut out = Vec::new();
        rep.host_calls += 1;
        self.note_page_work(id, joins.iter().map(|&(gfn, _)| gfn));
        let res = host
            .merge(id, &ops, &mut out)
            .and_then(|()| expect_results(id, "join", out.len(), joins.len()));
        let Engine {
            guests,
            domains,
            stats,
            ..
        } = self;
        let g = guests.live_mut(slot);
        let dom = &mut domains[g.dom];
        for (k, &(gfn, f)) in joins.iter().enumerate() {
            let gfn = gfn as usize;
            // Unknown outcome: assume mapped (keeps the frame alive).
            let outcome = res
                .as_ref()
                .map_or(MergeOutcome::Merged, |_| out[k].outcome);
            match outcome {
                MergeOutcome::Merged => {
                    g.mark_merged(gfn, f);
                    g.pages[gfn].fails = 0;
                    if res.is_ok() {
                        stats.count_merge(rep);
                    }
                }
                MergeOutcome::Mismatch => {
                    dom.release_frame_ref(f, &mut plan.maybe_free);
                    stats.mismatches += 1;
                    rep.mismatches += 1;
                    g.pages[gfn].failed_visit();
                    g.set_state(gfn, PageSt::Volatile);
                }
                MergeOutcome::NoVmaBudget => {
                    dom.release_frame_ref(f, &mut plan.maybe_free);
                    stats.count_vma_skip(rep);
                    g.set_state(gfn, PageSt::Deferred);
                }
            }
        }
        if let Err(e) = res {
            self.fail_guest(slot, &e, Some(rep));
        }
    }

    /// Step 5: frames nobody maps go back to the pool (cancelled ones without a host
    /// call; doomed ones and those whose last sharer left are punched).
    fn release_unused_frames(
        &mut self,
        di: usize,
        mut plan: Plan,
        host: &mut impl MergeHost,
        rep: &mut RoundReport,
    ) {
        for f in plan.cancelled.drain(..) {
            self.domains[di].release(f);
        }
        let mut to_free = std::mem::take(&mut plan.maybe_free);
        to_free.append(&mut plan.doomed);
        if !to_free.is_empty() {
            rep.host_calls += 1;
            self.free_frames(di, to_free, host);
        }
    }

    /// Unmerges every page of a guest whose mapping is a frame (merged or split -> anonymous,
    /// unscanned); all its pages become unscanned. Pages the host could not remap (no VMA
    /// budget) stay merged. On a host error the guest is marked failed.
    pub(super) fn unmerge_slot(
        &mut self,
        slot: usize,
        host: &mut impl MergeHost,
    ) -> Result<(), HostError> {
        let g = self.guests.live(slot);
        if g.failed {
            return Ok(());
        }
        let id = g.id;
        let di = g.dom;
        let gfns: Vec<Gfn> = g
            .pages
            .iter()
            .enumerate()
            .filter(|(_, p)| p.map != ANON)
            .map(|(i, _)| i as Gfn)
            .collect();
        let mut out = Vec::new();
        let res = if gfns.is_empty() {
            Ok(())
        } else {
            host.unmerge(id, &gfns, &mut out)
                .and_then(|()| expect_results(id, "unmerge", out.len(), gfns.len()))
        };
        if let Err(e) = res {
            self.fail_guest(slot, &e, None);
            return Err(e);
        }
        let mut to_free = Vec::new();
        let Engine {
            guests, domains, ..
        } = self;
        let g = guests.live_mut(slot);
        let dom = &mut domains[di];
        for (&gfn, &o) in gfns.iter().zip(&out) {
            let gfn = gfn as usize;
            if o != UnmergeOutcome::Unmerged {
                continue;
            }
            let p = g.pages[gfn];
            if p.state == PageSt::Merged {
                dom.release_frame_ref(p.map - 1, &mut to_free);
                g.set_state(gfn, PageSt::Unscanned);
            }
            apply_map(g, gfn, ANON);
        }
        for gfn in 0..g.pages.len() {
            let p = g.pages[gfn];
            match p.state {
                PageSt::Merged => continue, // could not be unmerged (no VMA budget)
                PageSt::Unique => dom.forget_candidate(p.hash, slot, gfn),
                PageSt::Unscanned
                | PageSt::Volatile
                | PageSt::Zero
                | PageSt::Deferred
                | PageSt::Pending => {}
            }
            g.set_state(gfn, PageSt::Unscanned);
            let p = &mut g.pages[gfn];
            p.fails = 0;
            p.flags = 0;
        }
        g.watch.clear();
        g.first_pass_done = false;
        g.in_pass = false;
        g.pos = 0;
        g.parked = false;
        // A digest still outstanding describes the guest before this: it is not used.
        let id = g.id;
        self.inflight.remove(&id);
        self.free_frames(di, to_free, host);
        Ok(())
    }
}
