//! The control API's way into the scanner: a typed command channel. [`Control`] is the
//! API thread's handle (and the daemon's `tinyvmm_api::ControlPlane`); the scanner applies
//! each [`Cmd`] between rounds with [`handle`], so engine state has one owner.

use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::Duration;

use tinyvmm_merge::{Counters, Engine, GuestCounters, Knobs, KnobsUpdate};
use tinyvmm_merge_protocol::wire::Hello;

use crate::error::{SnapshotError, UpdateError};
use crate::fleet::Fleet;

/// How long the API waits for a snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the API waits for a knob update (`run=2` unmerges every guest first).
const UPDATE_TIMEOUT: Duration = Duration::from_secs(120);

/// A snapshot of the daemon's state, for the control API.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The knobs.
    pub knobs: Knobs,
    /// Fleet-wide counters.
    pub counters: Counters,
    /// Bytes of frames resident in all pools.
    pub pool_bytes: u64,
    /// Per guest.
    pub guests: Vec<GuestSnapshot>,
}

/// One guest, for the control API.
#[derive(Debug, Clone)]
pub struct GuestSnapshot {
    /// Engine counters.
    pub counters: GuestCounters,
    /// From its registration.
    pub hello: Hello,
    /// The VM process's user.
    pub uid: u32,
    /// The users whose VMs share its group (`policy.rs`).
    pub share_group_uids: Vec<u32>,
    /// Its agent's statistics (write-protect stalls, VMAs).
    pub agent: tinyvmm_merge_protocol::AgentStats,
}

/// A command to the scanner thread.
pub(crate) enum Cmd {
    /// A connection whose hello the acceptor validated.
    Register(Box<UnixStream>, Hello),
    /// Read the state (with every guest if true).
    Snapshot(bool, Sender<Snapshot>),
    /// Apply a knob update atomically.
    Update(
        KnobsUpdate,
        Sender<Result<Snapshot, tinyvmm_merge::KnobError>>,
    ),
}

/// A handle to send typed commands to the scanner thread.
#[derive(Clone)]
pub struct Control {
    pub(crate) tx: Sender<Cmd>,
}

impl Control {
    /// The current state; `with_guests` adds every guest (and asks each agent for its
    /// statistics).
    pub fn snapshot(&self, with_guests: bool) -> Result<Snapshot, SnapshotError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Cmd::Snapshot(with_guests, tx))
            .map_err(|_| SnapshotError::Stopping)?;
        rx.recv_timeout(SNAPSHOT_TIMEOUT).map_err(|e| match e {
            RecvTimeoutError::Timeout => SnapshotError::Busy(SNAPSHOT_TIMEOUT),
            RecvTimeoutError::Disconnected => SnapshotError::Stopping,
        })
    }

    /// Applies a knob update atomically; the error says what was refused, or why the
    /// scanner could not be asked.
    pub fn update(&self, upd: KnobsUpdate) -> Result<Snapshot, UpdateError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Cmd::Update(upd, tx))
            .map_err(|_| UpdateError::Stopping)?;
        match rx.recv_timeout(UPDATE_TIMEOUT) {
            Ok(res) => Ok(res?),
            Err(RecvTimeoutError::Timeout) => Err(UpdateError::Busy(UPDATE_TIMEOUT)),
            Err(RecvTimeoutError::Disconnected) => Err(UpdateError::Stopping),
        }
    }
}

/// The state for the API; `with_guests` also asks every agent for its statistics (all at
/// once, for a bounded time: a stalled agent keeps its last ones), which `GET /ksm` does
/// not need. Agents found gone on the way are
/// removed by the next round.
pub(crate) fn snapshot(engine: &Engine, fleet: &mut Fleet, with_guests: bool) -> Snapshot {
    let guests = if with_guests {
        fleet.refresh_all_stats();
        engine
            .guests()
            .into_iter()
            .filter_map(|c| {
                let conn = fleet.conns.get(&c.id)?;
                Some(GuestSnapshot {
                    counters: c,
                    hello: conn.hello.clone(),
                    uid: conn.uid,
                    share_group_uids: fleet.policy.members(&conn.group),
                    agent: fleet.agent_stats.get(&c.id).cloned().unwrap_or_default(),
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    Snapshot {
        knobs: engine.knobs(),
        counters: engine.counters(),
        pool_bytes: fleet.pools.values().map(|p| p.resident_bytes()).sum(),
        guests,
    }
}

impl Snapshot {
    fn ksm_state(&self) -> tinyvmm_api::KsmState {
        tinyvmm_api::KsmState {
            knobs: self.knobs,
            counters: self.counters,
            pool_bytes: self.pool_bytes,
            engine_metadata_bytes: self.counters.metadata_bytes,
        }
    }
}

/// The control API's calls: an invalid knob update is `BadRequest` (400); a scanner that
/// is stopping or does not answer in time is `Unavailable` (503), whichever call asked.
impl tinyvmm_api::ControlPlane for Control {
    fn ksm(&self) -> Result<tinyvmm_api::KsmState, tinyvmm_api::ApiError> {
        Ok(self.snapshot(false)?.ksm_state())
    }

    fn update_knobs(
        &self,
        upd: KnobsUpdate,
    ) -> Result<tinyvmm_api::KsmState, tinyvmm_api::ApiError> {
        Ok(self.update(upd)?.ksm_state())
    }

    fn guests(&self) -> Result<Vec<tinyvmm_api::GuestInfo>, tinyvmm_api::ApiError> {
        let s = self.snapshot(true)?;
        Ok(s.guests
            .into_iter()
            .map(|g| tinyvmm_api::GuestInfo {
                counters: g.counters,
                pid: g.hello.pid,
                name: g.hello.name,
                share_group: g.hello.share_group,
                uid: g.uid,
                share_group_uids: g.share_group_uids,
                agent: g.agent,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tinyvmm_api::{ApiError, ControlPlane};

    #[test]
    fn a_stopped_scanner_is_unavailable_for_every_call() {
        let (tx, rx) = mpsc::channel();
        drop(rx);
        let c = Control { tx };
        assert!(matches!(c.ksm(), Err(ApiError::Unavailable(_))));
        assert!(matches!(c.guests(), Err(ApiError::Unavailable(_))));
        assert!(matches!(
            c.update_knobs(KnobsUpdate::default()),
            Err(ApiError::Unavailable(_))
        ));
    }

    #[test]
    fn a_scanner_that_drops_the_command_is_stopping_and_a_refused_update_is_a_bad_request() {
        let (tx, rx) = mpsc::channel::<Cmd>();
        let scanner = std::thread::spawn(move || {
            // Drops the first command unanswered (as a scanner that stops does), refuses the
            // second.
            drop(rx.recv().unwrap());
            match rx.recv().unwrap() {
                Cmd::Update(_, reply) => {
                    let _ = reply.send(Err(tinyvmm_merge::KnobError::Run(7)));
                }
                _ => panic!("expected an update"),
            }
        });
        let c = Control { tx };
        assert!(matches!(
            c.update_knobs(KnobsUpdate::default()),
            Err(ApiError::Unavailable(_))
        ));
        assert!(matches!(
            c.update_knobs(KnobsUpdate::default()),
            Err(ApiError::BadRequest(_))
        ));
        scanner.join().unwrap();
    }
}
