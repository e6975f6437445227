//! Concurrent agent requests: the fleet's side of [`ConcurrentHost`]. Each agent
//! connection gets a *lane*: a worker thread (`worker.rs`) that runs the requests started
//! ahead — the engine's digests, statistics for the API — one after the other, while the
//! scanner goes on with other guests; their outcomes come back on one channel, in the order
//! they finish. Every other request is made by the scanner itself once the lane is idle
//! (a merge's page copies and joins need the reply before the engine goes on).
//!
//! Waiting is bounded so that one slow or stalled agent delays only its own guest: the
//! engine waits at most [`DIGEST_PATIENCE`] for the next digest, a partner's populate at
//! most [`PARTNER_PATIENCE`] for the partner's lane (else [`HostError::Busy`]: the engine
//! puts the merge off), the API's statistics at most [`STATS_PATIENCE`]. A lane that kept
//! anyone waiting that long is *stuck*: nobody waits for it again until it is idle. Its
//! worker still drops the guest at the request deadline, as before.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tinyvmm_merge::host::{
    ConcurrentHost, DigestDone, DigestReply, DigestRequest, GuestId, HostError,
};
use tinyvmm_merge_protocol::wire::{Reply, Request};

use crate::fleet::Fleet;
use crate::worker::{self, Done, Failure, Lane, Pending};

/// Longest wait of a round for the next digest while others are outstanding.
pub const DIGEST_PATIENCE: Duration = Duration::from_millis(200);
/// Longest wait of a partner's populate for the partner's lane to be idle (its digest is
/// usually a few ms from done; waiting is cheaper than putting the merge off).
pub const PARTNER_PATIENCE: Duration = Duration::from_secs(1);
/// Longest wait of `GET /guests` for the agents' statistics.
pub const STATS_PATIENCE: Duration = Duration::from_millis(250);

/// Request ids of lanes start here (the scanner's own requests count from 0; one request
/// at a time is on a connection either way).
const LANE_IDS: u64 = 1 << 62;

impl Fleet {
    /// Whether `guest`'s lane has requests outstanding.
    pub fn busy(&self, guest: GuestId) -> bool {
        self.lanes
            .get(&guest)
            .is_some_and(|l| !l.pending.is_empty())
    }

    /// Queues `request` on `guest`'s lane, starting its worker on first use.
    fn enqueue(&mut self, guest: GuestId, request: Request, p: Pending) -> Result<(), HostError> {
        if !self.lanes.contains_key(&guest) {
            let conn = self
                .conns
                .get(&guest)
                .ok_or(HostError::GuestGone { guest })?;
            let lane = conn
                .stream
                .try_clone()
                .and_then(|s| {
                    worker::spawn(
                        guest,
                        s,
                        LANE_IDS,
                        self.request_timeout,
                        self.done_tx.clone(),
                    )
                })
                .map_err(|e| self.failed(guest, Failure::Gone(e.to_string())))?;
            self.lanes.insert(
                guest,
                Lane {
                    jobs: lane,
                    pending: VecDeque::new(),
                    stuck: false,
                },
            );
        }
        let lane = self.lanes.get_mut(&guest).expect("inserted above");
        if lane.jobs.send(request).is_err() {
            return Err(self.failed(guest, Failure::Gone("its worker ended".into())));
        }
        lane.pending.push_back(p);
        Ok(())
    }

    /// Takes one finished exchange off the channel (waiting until `until`, or not at all
    /// if `None`) and files it: a digest for the engine, statistics for the API. `false`:
    /// none came.
    fn pump(&mut self, until: Option<Instant>) -> bool {
        let done = match until {
            None => self.done_rx.try_recv().ok(),
            Some(t) => self
                .done_rx
                .recv_timeout(t.saturating_duration_since(Instant::now()))
                .ok(),
        };
        let Some(done) = done else {
            return false;
        };
        self.file(done);
        true
    }

    fn file(&mut self, Done { guest, result }: Done) {
        let Some(lane) = self.lanes.get_mut(&guest) else {
            return; // it left meanwhile
        };
        let Some(p) = lane.pending.pop_front() else {
            return;
        };
        if lane.pending.is_empty() {
            lane.stuck = false;
        }
        match (p, result) {
            (Pending::Stats, Ok(Reply::Stats(s))) => {
                self.agent_stats.insert(guest, s);
            }
            (Pending::Stats, Ok(_)) => {
                self.mismatch(guest, "statistics reply does not match the request");
            }
            (Pending::Digest { ticket, .. }, Err(f)) => {
                let e = self.failed(guest, f);
                self.ready.push_back((guest, ticket, Err(e)));
            }
            (Pending::Stats, Err(f)) => {
                self.failed(guest, f);
            }
            (
                Pending::Digest {
                    ticket,
                    want,
                    dirty,
                },
                Ok(reply),
            ) => {
                let res = match reply {
                    Reply::Digests(d) if !dirty && d.len() as u64 == want => {
                        Ok(DigestReply::Range(d))
                    }
                    Reply::DirtyDigests(d, more) if dirty && d.len() as u64 <= want => {
                        Ok(DigestReply::Dirty(d, more))
                    }
                    _ => Err(self.mismatch(guest, "digest reply does not match the request")),
                };
                self.ready.push_back((guest, ticket, res));
            }
        }
    }

    /// Waits until `guest`'s lane is idle, at most until `until` (`None`: however long its
    /// worker takes; it ends each exchange by the request deadline). On a timeout the
    /// lane is stuck and `false` returned.
    pub(crate) fn wait_idle(&mut self, guest: GuestId, until: Option<Instant>) -> bool {
        // A worker answers within twice the request timeout (send, then the reply).
        let limit = until.unwrap_or_else(|| Instant::now() + 2 * self.request_timeout);
        while self.busy(guest) {
            if !self.pump(Some(limit)) {
                if let Some(l) = self.lanes.get_mut(&guest) {
                    l.stuck = true;
                }
                return false;
            }
        }
        true
    }

    /// A partner's lane before its populate: idle, or idle within [`PARTNER_PATIENCE`];
    /// else [`HostError::Busy`] (nothing was sent).
    pub(crate) fn partner_ready(&mut self, guest: GuestId) -> Result<(), HostError> {
        if !self.busy(guest) {
            return Ok(());
        }
        let stuck = self.lanes.get(&guest).is_some_and(|l| l.stuck);
        if stuck || !self.wait_idle(guest, Some(Instant::now() + PARTNER_PATIENCE)) {
            return Err(HostError::Busy { guest });
        }
        Ok(())
    }

    /// Refreshes every agent's statistics, waiting at most [`STATS_PATIENCE`]; a stuck
    /// agent keeps its last statistics.
    pub fn refresh_all_stats(&mut self) {
        let ids: Vec<GuestId> = self.conns.keys().copied().collect();
        let mut asked = Vec::new();
        for id in ids {
            if self.lanes.get(&id).is_some_and(|l| l.stuck) {
                continue;
            }
            if self.enqueue(id, Request::Stats, Pending::Stats).is_ok() {
                asked.push(id);
            }
        }
        let until = Instant::now() + STATS_PATIENCE;
        for id in asked {
            if !self.wait_idle(id, Some(until)) {
                tracing::debug!(guest = id.0, "agent slow to report statistics");
            }
        }
    }

    /// Forgets `guest`'s lane: its worker ends after the exchange it is in (at once if the
    /// connection was shut down). Digests it finished stay for the engine.
    pub(crate) fn drop_lane(&mut self, guest: GuestId) {
        self.lanes.remove(&guest);
    }
}

impl ConcurrentHost for Fleet {
    fn start_digest(
        &mut self,
        guest: GuestId,
        ticket: u64,
        req: DigestRequest,
    ) -> Result<(), HostError> {
        let (request, p) = match req {
            DigestRequest::Range(runs) => {
                let want = runs.iter().map(|r| u64::from(r.len)).sum();
                let p = Pending::Digest {
                    ticket,
                    want,
                    dirty: false,
                };
                (Request::Digest(runs), p)
            }
            DigestRequest::Dirty(max) => {
                let p = Pending::Digest {
                    ticket,
                    want: u64::from(max),
                    dirty: true,
                };
                (Request::DigestDirty(max), p)
            }
        };
        self.enqueue(guest, request, p)
    }

    fn next_digest(&mut self, wait: bool) -> Option<DigestDone> {
        while self.ready.is_empty() && self.pump(None) {}
        if !wait {
            return self.ready.pop_front();
        }
        let until = Instant::now() + DIGEST_PATIENCE;
        while self.ready.is_empty() {
            if !self.pump(Some(until)) {
                // Whoever is still busy kept the round waiting: nobody waits for it again
                // until it is idle.
                for lane in self.lanes.values_mut() {
                    if !lane.pending.is_empty() {
                        lane.stuck = true;
                    }
                }
                return None;
            }
        }
        self.ready.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Conn;
    use std::os::unix::net::UnixStream;
    use tinyvmm_merge::host::PageRun;
    use tinyvmm_merge_protocol::wire::{self, AgentMsg, DaemonMsg};

    fn add(fleet: &mut Fleet, id: u32) -> UnixStream {
        let (daemon_end, agent_end) = UnixStream::pair().unwrap();
        fleet.conns.insert(
            GuestId(id),
            Conn::of_this_process(daemon_end, &format!("g{id}"), 8),
        );
        agent_end
    }

    #[test]
    fn a_silent_agent_keeps_nobody_waiting_twice() {
        let mut fleet = Fleet::new(Duration::from_secs(600));
        let _silent = add(&mut fleet, 1);
        let mut good = add(&mut fleet, 2);
        let agent = std::thread::spawn(move || {
            let Ok((DaemonMsg::Request { id, .. }, _)) = wire::recv::<DaemonMsg>(&mut good) else {
                return;
            };
            let reply = Reply::Digests(vec![Default::default(); 2]);
            wire::send(&mut good, &AgentMsg::Reply { id, reply }, None).unwrap();
        });
        let runs = vec![PageRun { gfn: 0, len: 2 }];
        fleet
            .start_digest(GuestId(1), 1, DigestRequest::Range(runs.clone()))
            .unwrap();
        fleet
            .start_digest(GuestId(2), 2, DigestRequest::Range(runs))
            .unwrap();
        // The good agent's digest comes; the silent one's does not, within the patience.
        let (g, t, res) = fleet.next_digest(true).expect("the good agent answers");
        assert_eq!((g, t), (GuestId(2), 2));
        assert!(matches!(res, Ok(DigestReply::Range(d)) if d.len() == 2));
        assert!(fleet.next_digest(true).is_none());
        // Stuck now: a populate on it is put off at once, without waiting again.
        let t0 = Instant::now();
        assert!(matches!(
            fleet.partner_ready(GuestId(1)),
            Err(HostError::Busy { .. })
        ));
        assert!(t0.elapsed() < PARTNER_PATIENCE);
        assert!(fleet.partner_ready(GuestId(2)).is_ok());
        assert!(fleet.dead.is_empty(), "nobody dropped before the deadline");
        agent.join().unwrap();
    }
}
