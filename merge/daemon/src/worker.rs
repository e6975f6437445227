//! Agent round trips: one request/reply exchange with an agent (the whole reply within a
//! deadline, transient failures asked again), and the worker thread of each agent
//! connection that runs the exchanges started ahead of time (digests, statistics) so that
//! several agents work at once while the scanner goes on with the others; a [`Lane`] is
//! the scanner's handle on one such worker.

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use tinyvmm_merge::host::GuestId;
use tinyvmm_merge_protocol::wire::{
    self, AgentError, AgentErrorKind, AgentMsg, DaemonMsg, Reply, Request,
};

/// How often a request an agent failed with [`AgentErrorKind::Transient`] is sent again
/// before the guest is dropped; the waits before the tries grow 1, 4, 16 ms.
pub const TRANSIENT_RETRIES: u32 = 3;

/// Why an exchange with an agent failed: each drops the guest.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The connection broke, or the reply did not come whole before the deadline.
    Gone(String),
    /// The agent answered something else than the reply to the request.
    OutOfTurn(String),
    /// The agent reported an error retries could not fix.
    Agent(AgentError),
}

/// Sends `request` to the agent on `stream` and returns its reply. An agent's
/// [`AgentErrorKind::Transient`] failure changed nothing, so the request is sent again (up
/// to [`TRANSIENT_RETRIES`] times, after a short wait); any other error reply, and a
/// transient one once retries are spent, is a [`Failure::Agent`]. `next_id` numbers the
/// requests of the connection.
pub(crate) fn exchange(
    stream: &mut UnixStream,
    guest: GuestId,
    next_id: &mut u64,
    mut request: Request,
    timeout: Duration,
) -> Result<Reply, Failure> {
    let mut tries = 0;
    loop {
        let (reply, req) = round_trip(stream, next_id, request, timeout)?;
        match reply {
            Reply::Error(e) if e.kind == AgentErrorKind::Transient && tries < TRANSIENT_RETRIES => {
                tries += 1;
                tracing::debug!(guest = guest.0, tries, "agent busy, asking again: {e}");
                std::thread::sleep(Duration::from_millis(1 << (2 * (tries - 1))));
                request = req;
            }
            Reply::Error(e) => return Err(Failure::Agent(e)),
            r => return Ok(r),
        }
    }
}

/// One request/reply exchange; gives the request back (for a retry) with the reply. The
/// whole reply must come within `timeout`: an agent that trickles bytes is cut off then,
/// not after a timeout per read.
fn round_trip(
    stream: &mut UnixStream,
    next_id: &mut u64,
    request: Request,
    timeout: Duration,
) -> Result<(Reply, Request), Failure> {
    let id = *next_id;
    *next_id += 1;
    let msg = DaemonMsg::Request { id, request };
    wire::send(stream, &msg, None).map_err(|e| Failure::Gone(e.to_string()))?;
    let DaemonMsg::Request { request, .. } = msg else {
        unreachable!("built as a request just above")
    };
    let deadline = Some(Instant::now() + timeout);
    match wire::recv_bounded::<AgentMsg>(stream, wire::MAX_FRAME, deadline) {
        Ok((AgentMsg::Reply { id: rid, reply }, None)) if rid == id => Ok((reply, request)),
        Ok((other, _)) => Err(Failure::OutOfTurn(other.summary())),
        Err(e) => Err(Failure::Gone(e.to_string())),
    }
}

/// An exchange a worker finished.
pub(crate) struct Done {
    /// Whose.
    pub guest: GuestId,
    /// The reply, or why there is none.
    pub result: Result<Reply, Failure>,
}

/// Starts the worker thread of `guest`'s connection (its own handle on the socket): it
/// runs the requests sent to the returned channel one after the other and sends each
/// outcome to `done`. It ends when the channel is dropped or after a failed exchange.
pub(crate) fn spawn(
    guest: GuestId,
    stream: UnixStream,
    next_id: u64,
    timeout: Duration,
    done: Sender<Done>,
) -> std::io::Result<Sender<Request>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("merged-agent-{}", guest.0))
        .spawn(move || work(guest, stream, next_id, timeout, rx, done))?;
    Ok(tx)
}

fn work(
    guest: GuestId,
    mut stream: UnixStream,
    mut next_id: u64,
    timeout: Duration,
    jobs: Receiver<Request>,
    done: Sender<Done>,
) {
    for request in jobs {
        let result = exchange(&mut stream, guest, &mut next_id, request, timeout);
        let failed = result.is_err();
        if done.send(Done { guest, result }).is_err() || failed {
            return;
        }
    }
}

/// One agent connection's worker and what it has been asked, in order.
#[derive(Debug)]
pub(crate) struct Lane {
    pub(crate) jobs: Sender<Request>,
    pub(crate) pending: VecDeque<Pending>,
    /// Someone gave up waiting for it; nobody waits for it again until it is idle.
    pub(crate) stuck: bool,
}

/// A request a lane runs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pending {
    /// The engine's digest `ticket` of `want` pages (at most, for dirty ones).
    Digest { ticket: u64, want: u64, dirty: bool },
    /// Statistics for the API.
    Stats,
}
