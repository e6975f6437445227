//! [`ConcurrentHost`] for [`SimFleet`]: digests are taken when they start and answered
//! later, in a seeded pseudo-random order, sometimes not within the patience (late), and a
//! partner's populate is sometimes refused as busy while its guest has a digest
//! outstanding, as a real fleet of agents working at once does. Deterministic for a seed.

use std::collections::VecDeque;

use super::SimFleet;
use crate::host::{
    ConcurrentHost, DigestDone, DigestReply, DigestRequest, GuestId, HostError, MergeHost,
};

/// How the simulated agents answer concurrent digests.
#[derive(Debug, Default)]
pub struct SimConcurrency {
    /// Digests started and not yet delivered, in start order.
    queue: VecDeque<DigestDone>,
    /// xorshift state (0: every reply in order, at once, no refusal).
    rng: u64,
    /// Percent of [`ConcurrentHost::next_digest`] calls that find nothing (in time).
    late_pct: u64,
    /// Percent of populates on a guest with a digest outstanding refused as busy.
    busy_pct: u64,
    /// A guest whose agent stalls: its digests are never answered, populates on it are
    /// refused while one is outstanding.
    stalled: Option<GuestId>,
}

impl SimConcurrency {
    /// Replies in a `seed`ed random order; `late_pct` % of waits time out and `busy_pct` %
    /// of populates on a busy partner are refused.
    pub fn new(seed: u64, late_pct: u64, busy_pct: u64) -> Self {
        SimConcurrency {
            queue: VecDeque::new(),
            rng: seed | 1,
            late_pct,
            busy_pct,
            stalled: None,
        }
    }

    /// Makes `guest`'s agent stall (or none).
    pub fn stall(&mut self, guest: Option<GuestId>) {
        self.stalled = guest;
    }

    fn next(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    fn chance(&mut self, pct: u64) -> bool {
        pct > 0 && self.next() % 100 < pct
    }

    /// Whether a populate on `guest` is refused now.
    pub(super) fn refuses(&mut self, guest: GuestId) -> bool {
        let pct = self.busy_pct;
        let outstanding = self.queue.iter().any(|(g, _, _)| *g == guest);
        outstanding && (self.stalled == Some(guest) || self.chance(pct))
    }
}

impl ConcurrentHost for SimFleet {
    fn start_digest(
        &mut self,
        guest: GuestId,
        ticket: u64,
        req: DigestRequest,
    ) -> Result<(), HostError> {
        self.guest_ok(guest)?;
        let res = match req {
            DigestRequest::Range(runs) => {
                let mut out = Vec::new();
                self.digest(guest, &runs, &mut out)
                    .map(|()| DigestReply::Range(out))
            }
            DigestRequest::Dirty(max) => {
                let mut out = Vec::new();
                self.digest_dirty(guest, max, &mut out)
                    .map(|more| DigestReply::Dirty(out, more))
            }
        };
        self.concurrency.queue.push_back((guest, ticket, res));
        Ok(())
    }

    fn next_digest(&mut self, wait: bool) -> Option<DigestDone> {
        let c = &mut self.concurrency;
        let stalled = c.stalled;
        let ready: Vec<usize> = (0..c.queue.len())
            .filter(|&i| Some(c.queue[i].0) != stalled)
            .collect();
        if ready.is_empty() || c.chance(if wait { c.late_pct / 2 } else { c.late_pct }) {
            return None;
        }
        let i = if c.rng == 0 {
            ready[0]
        } else {
            ready[(c.next() % ready.len() as u64) as usize]
        };
        c.queue.remove(i)
    }
}
