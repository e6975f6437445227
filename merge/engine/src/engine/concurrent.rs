//! Concurrent rounds: the scan of `scan.rs` with digests started on several guests at once
//! through a [`ConcurrentHost`] and processed as they complete, so every agent hashes in
//! its own process at the same time and one slow or stalled agent delays only its guest.
//!
//! Each guest keeps its own place (`pos`) and does one pass per full scan: its visits go
//! on from its place, one digest outstanding at a time, until its pass is done; then it is
//! *parked* until every other guest's pass is done too, which ends the full scan (ksmd's
//! cursor wrap: `full_scans` counts up, smart scan and the VMA back-off go by it). A digest
//! not answered within the host's patience is *late*: the round stops waiting for it, its
//! guest sits out the full scan and its reply is processed whenever it comes (a stalled
//! agent is dropped by the host at its deadline: the reply is then an error). A digest is
//! processed exactly as in a sequential visit; it may be older than merges other guests
//! did in between (a partner's page merged since, a candidate changed), which the
//! classification already handles: it is the same as a guest write racing a digest.

use std::collections::HashSet;

use super::pages::Seen;
use super::scan::{seen_of, RangePick, BATCH};
use super::{Engine, RunMode};
use crate::counters::RoundReport;
use crate::host::{
    ConcurrentHost, DigestDone, DigestReply, DigestRequest, GuestId, HostError, PageRun,
};

/// A digest started and not yet processed.
pub(super) struct Visit {
    slot: usize,
    kind: VisitKind,
    /// Pages of its round's budget it holds until it completes.
    reserved: u64,
    /// The concurrent round that started it.
    round: u64,
    /// Not answered within the host's patience: no round waits for it any more.
    late: bool,
    /// Its name with the host.
    ticket: u64,
    /// Pages of its guest that page work (merge, join, zero reclaim, unmerge) changed
    /// after it was started: its digest describes them as they were, so they are left out
    /// when it is processed (see [`Engine::note_page_work`]).
    touched: HashSet<u32>,
}

/// What a visit asked for.
enum VisitKind {
    /// A range of the guest's pages; `done`: the range ends its pass.
    Range {
        runs: Vec<PageRun>,
        taken: usize,
        done: bool,
    },
    /// At most `max` dirty pages.
    Dirty { max: u32 },
}

/// A concurrent round's budget.
struct Budget {
    /// Pages the round may still visit (`pages_to_scan` less the work processed).
    left: u64,
    /// Pages held by this round's outstanding visits.
    reserved: u64,
    /// Work processed since the last full scan ended.
    since_wrap: u64,
    /// A full scan ended without work, or no guest is left: start nothing more.
    stop: bool,
    /// A visit was processed or started in this round.
    progressed: bool,
}

/// What the next step of a round's dispatch found.
enum Dispatch {
    /// A visit was started (or a range with nothing to digest passed over).
    Started,
    /// Nothing to start now: every guest is parked, outstanding or failed.
    Nothing,
}

impl Engine {
    /// One wake-up of the scanner with concurrent digests: up to `pages_to_scan` pages are
    /// visited, digests started on every guest that has none outstanding and processed in
    /// the order they complete. The merge steps of each batch are the sequential ones
    /// ([`Engine::scan_round`]); a partner whose agent is busy defers its merges
    /// ([`HostError::Busy`]). Host failures mark the guest failed and the round goes on.
    pub fn scan_round_concurrent(&mut self, host: &mut impl ConcurrentHost) -> RoundReport {
        let mut rep = RoundReport::default();
        if self.knobs.run != RunMode::Run {
            return rep;
        }
        self.rounds += 1;
        let mut b = Budget {
            left: u64::from(self.knobs.pages_to_scan),
            reserved: 0,
            since_wrap: 0,
            stop: false,
            progressed: false,
        };
        loop {
            while let Some(done) = host.next_digest(false) {
                self.finish_visit(done, host, &mut b, &mut rep);
            }
            if !b.stop && b.left > b.reserved {
                if let Dispatch::Started = self.start_next_visit(host, &mut b, &mut rep) {
                    continue;
                }
            }
            if self.inflight.values().any(|v| !v.late) {
                match host.next_digest(true) {
                    Some(done) => self.finish_visit(done, host, &mut b, &mut rep),
                    None => self.inflight.values_mut().for_each(|v| v.late = true),
                }
                continue;
            }
            // Only late digests are outstanding: a round that did nothing waits once for
            // one of them, so the scanner never spins on a stalled agent.
            if !b.progressed && !self.inflight.is_empty() {
                if let Some(done) = host.next_digest(true) {
                    self.finish_visit(done, host, &mut b, &mut rep);
                }
            }
            break;
        }
        self.stats.pages_scanned += rep.pages_visited;
        self.stats.pages_skipped += rep.pages_skipped;
        rep
    }

    /// Whether the guest in `slot` may start a visit now.
    fn may_visit(&self, slot: usize) -> bool {
        match &self.guests[slot] {
            Some(g) => !g.failed && !g.parked && !self.inflight.contains_key(&g.id),
            None => false,
        }
    }

    /// Starts the next guest's visit, guests in turn from the cursor. With none to visit
    /// and none outstanding in time, the full scan ends: every guest unparks and
    /// `full_scans` counts up (a full scan without work stops the round, as ksmd's).
    fn start_next_visit(
        &mut self,
        host: &mut impl ConcurrentHost,
        b: &mut Budget,
        rep: &mut RoundReport,
    ) -> Dispatch {
        let n = self.guests.len();
        if let Some(slot) = (0..n)
            .map(|k| (self.cursor_slot + k) % n)
            .find(|&s| self.may_visit(s))
        {
            self.cursor_slot = slot + 1;
            self.start_visit(slot, host, b, rep);
            return Dispatch::Started;
        }
        let active = self.guests.iter().flatten().filter(|g| !g.failed);
        let mut any = false;
        for g in active {
            any = true;
            if self.inflight.get(&g.id).is_some_and(|v| !v.late) {
                // Its pass goes on when its digest comes back.
                return Dispatch::Nothing;
            }
        }
        if !any {
            b.stop = true;
            return Dispatch::Nothing;
        }
        self.stats.full_scans += 1;
        rep.full_scans += 1;
        for g in self.guests.iter_mut().flatten() {
            g.parked = false;
        }
        if b.since_wrap == 0 {
            b.stop = true;
            return Dispatch::Nothing;
        }
        b.since_wrap = 0;
        Dispatch::Started
    }

    /// Starts one visit of `slot`: a range from its place, or (a dirty-source guest past
    /// its first pass) its written pages.
    fn start_visit(
        &mut self,
        slot: usize,
        host: &mut impl ConcurrentHost,
        b: &mut Budget,
        rep: &mut RoundReport,
    ) {
        b.progressed = true;
        let want = (b.left - b.reserved).min(BATCH as u64);
        let g = self.guests.live_mut(slot);
        let id = g.id;
        let (kind, req, reserved) = if g.dirty_source && g.first_pass_done {
            if !g.in_pass {
                g.in_pass = true;
                g.pass = g.pass.wrapping_add(1);
            }
            let max = want as u32;
            (VisitKind::Dirty { max }, DigestRequest::Dirty(max), want)
        } else {
            let pos = g.pos;
            let n = g.pages.len();
            let RangePick {
                runs,
                taken,
                skipped,
                end,
            } = self.range_pick(slot, pos, want as usize);
            rep.pages_skipped += skipped;
            let done = end >= n;
            self.guests.live_mut(slot).pos = end;
            if taken == 0 {
                if done {
                    self.end_range_pass(slot);
                }
                return;
            }
            let req = DigestRequest::Range(runs.clone());
            let kind = VisitKind::Range { runs, taken, done };
            (kind, req, taken as u64)
        };
        rep.host_calls += 1;
        self.tickets += 1;
        let ticket = self.tickets;
        if let Err(e) = host.start_digest(id, ticket, req) {
            self.fail_guest(slot, &e, Some(rep));
            return;
        }
        b.reserved += reserved;
        let round = self.rounds;
        self.inflight.insert(
            id,
            Visit {
                slot,
                kind,
                reserved,
                round,
                late: false,
                ticket,
                touched: HashSet::new(),
            },
        );
    }

    /// A range pass over the guest in `slot` is done (as at the end of a sequential one):
    /// it parks until the full scan ends.
    fn end_range_pass(&mut self, slot: usize) {
        if let Some(g) = self.guests[slot].as_mut() {
            g.first_pass_done = true;
            g.end_pass_backoff();
            g.pos = 0;
            g.parked = true;
        }
    }

    /// Page work is about to change the mappings of `gfns` of guest `id`. A digest of that
    /// guest started earlier (in flight, or answered and not yet processed) describes those
    /// pages as they were before: processed as is, a page written before its digest and
    /// merged after it would read as split from the frame it now maps, and the frame could
    /// be freed under it. So those pages are left out of that digest; a write after the
    /// work shows up in a later one.
    pub(super) fn note_page_work(&mut self, id: GuestId, gfns: impl IntoIterator<Item = u32>) {
        if let Some(v) = self.inflight.get_mut(&id) {
            v.touched.extend(gfns);
        }
    }

    /// Processes a completed digest, if the engine still waits for it (not if its guest
    /// left, failed or unmerged since).
    fn finish_visit(
        &mut self,
        (id, ticket, res): DigestDone,
        host: &mut impl ConcurrentHost,
        b: &mut Budget,
        rep: &mut RoundReport,
    ) {
        if self.inflight.get(&id).is_none_or(|v| v.ticket != ticket) {
            return;
        }
        let Some(v) = self.inflight.remove(&id) else {
            return;
        };
        if v.round == self.rounds {
            b.reserved -= v.reserved;
        }
        let slot = v.slot;
        if self.guests[slot]
            .as_ref()
            .is_none_or(|g| g.failed || g.id != id)
        {
            return;
        }
        b.progressed = true;
        let n = self.guests.live(slot).pages.len() as u64;
        let work = match (v.kind, res) {
            (_, Err(e)) => {
                self.fail_guest(slot, &e, Some(rep));
                return;
            }
            (VisitKind::Range { runs, taken, done }, Ok(DigestReply::Range(d)))
                if d.len() == taken =>
            {
                rep.pages_visited += taken as u64;
                let mut seen = seen_of(&runs, &d);
                seen.retain(|s| !v.touched.contains(&s.gfn));
                self.process(slot, seen, host, rep);
                if done {
                    self.end_range_pass(slot);
                }
                taken as u64
            }
            (VisitKind::Dirty { max }, Ok(DigestReply::Dirty(d, more)))
                if d.len() <= max as usize && d.iter().all(|(gfn, _)| *gfn < n) =>
            {
                let work = d.len() as u64;
                rep.pages_visited += work;
                let seen: Vec<Seen> = d
                    .iter()
                    .map(|&(gfn, d)| Seen { gfn: gfn as u32, d })
                    .filter(|s| !v.touched.contains(&s.gfn))
                    .collect();
                if !seen.is_empty() {
                    self.process(slot, seen, host, rep);
                }
                if more {
                    work.max(1)
                } else {
                    self.promote_unwritten(slot, host, rep);
                    if let Some(g) = self.guests[slot].as_mut() {
                        g.parked = true;
                    }
                    work
                }
            }
            _ => {
                let e = HostError::Protocol {
                    guest: id,
                    reason: "digest reply does not match the request".into(),
                };
                self.fail_guest(slot, &e, Some(rep));
                return;
            }
        };
        b.left = b.left.saturating_sub(work);
        b.since_wrap += work;
    }
}
