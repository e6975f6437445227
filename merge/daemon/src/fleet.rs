//! The daemon's side of `MergeHost`: each call is a request/reply round trip to one
//! guest's agent over its Unix socket; pool operations act on the domain's memfd. Digests
//! run concurrently on every agent's lane (`lanes.rs`, [`tinyvmm_merge::ConcurrentHost`]).

use std::collections::{HashMap, VecDeque};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use tinyvmm_sys::process::ProcessWatch;

use crate::policy::{GroupKey, SharePolicy};
pub use crate::pool::{Pool, POOL_LEN};

use crate::page_source::Sources;
use crate::worker::Lane;
use crate::worker::{self, Done, Failure};
use tinyvmm_merge::host::{
    DigestDone, DomainId, FrameId, Gfn, GuestId, HostError, MergeHost, MergeOp, MergeResult,
    OpKind, PageDigest, PageRun, UnmergeOutcome, ZeroOutcome, PAGE_SIZE,
};
use tinyvmm_merge::GuestCounters;
use tinyvmm_merge_protocol::page_hash;
use tinyvmm_merge_protocol::wire::{
    AgentErrorKind, AgentStats, Hello, PageBytes, Reply, Request, MAX_READ_PAGES,
};

pub use crate::worker::TRANSIENT_RETRIES;

/// One registered guest's connection.
#[derive(Debug)]
pub struct Conn {
    pub stream: UnixStream,
    pub hello: Hello,
    /// The VM process's user (from the socket's peer credentials).
    pub uid: u32,
    /// Its share group: the name it asked for, within its uid unless the policy shares
    /// it (`policy.rs`).
    pub group: GroupKey,
    /// Its group's merge domain.
    pub domain: DomainId,
    /// The VM process (from the socket's peer credentials, not from `hello`).
    pub process: ProcessWatch,
}

#[cfg(test)]
impl Conn {
    /// This very process as a guest of `pages` pages named `name`: uid 0, the default
    /// group, domain 0 — for the daemon's unit tests.
    pub(crate) fn of_this_process(stream: UnixStream, name: &str, pages: u64) -> Self {
        Conn {
            stream,
            uid: 0,
            group: GroupKey::Private {
                uid: 0,
                name: "default".into(),
            },
            domain: DomainId(0),
            hello: Hello {
                version: tinyvmm_merge_protocol::PROTOCOL_VERSION,
                pid: std::process::id(),
                name: name.into(),
                pages,
                share_group: "default".into(),
                vma_budget: 100,
                dirty_source: false,
                run_as_uid: None,
            },
            process: ProcessWatch::new(std::process::id()),
        }
    }
}

/// All guests and pools: the engine's host.
#[derive(Debug)]
pub struct Fleet {
    pub conns: HashMap<GuestId, Conn>,
    pub pools: HashMap<DomainId, Pool>,
    /// The domain of each share group that has guests (its pool is in `pools`).
    pub domains: HashMap<GroupKey, DomainId>,
    /// The next domain id to hand out: ids are not reused while the engine may remember
    /// them (the engine drops a domain with its last guest, as `close_unused_pools` does
    /// its pool).
    next_domain: u32,
    /// Which users' VMs may share a group.
    pub policy: SharePolicy,
    next_request: u64,
    /// Guests whose connection failed during a call; the daemon removes them after the
    /// round.
    pub dead: Vec<GuestId>,
    /// Latest statistics per agent.
    pub agent_stats: HashMap<GuestId, AgentStats>,
    /// Guests whose agent is gone but whose process still lives: the engine keeps their
    /// frame references until the process exits.
    pub orphans: Vec<(GuestId, ProcessWatch)>,
    /// How long an agent may take to answer one request.
    pub request_timeout: Duration,
    /// What one user may register.
    pub limits: UserLimits,
    /// Each connection's worker and its outstanding requests (`lanes.rs`).
    pub(crate) lanes: HashMap<GuestId, Lane>,
    /// Where workers report finished exchanges.
    pub(crate) done_tx: Sender<Done>,
    pub(crate) done_rx: Receiver<Done>,
    /// Finished digests not yet taken by the engine.
    pub(crate) ready: VecDeque<DigestDone>,
    /// Where each guest's pages to populate are read from (`direct.rs`).
    pub(crate) sources: Sources,
    /// The last page copies' buffer, reused.
    page_buf: Vec<u8>,
}

/// What the VM processes of one user may register at once: bounds the daemon's memory
/// (engine metadata is 16 bytes per declared page) and its guest table against a user
/// who registers without end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserLimits {
    /// Guests registered at once.
    pub guests: usize,
    /// Pages of guest RAM registered at once, all guests together.
    pub pages: u64,
}

impl Default for UserLimits {
    /// 256 guests and 64 Mi pages (256 GiB of guest RAM, at most 1 GiB of engine metadata)
    /// per user.
    fn default() -> Self {
        UserLimits {
            guests: 256,
            pages: 1 << 26,
        }
    }
}

impl Fleet {
    /// No guests yet; agents get `request_timeout` to answer each request.
    pub fn new(request_timeout: Duration) -> Self {
        let (done_tx, done_rx) = mpsc::channel();
        Self {
            conns: HashMap::new(),
            pools: HashMap::new(),
            next_domain: 0,
            domains: HashMap::new(),
            next_request: 0,
            dead: Vec::new(),
            agent_stats: HashMap::new(),
            orphans: Vec::new(),
            request_timeout,
            limits: UserLimits::default(),
            policy: SharePolicy::none(),
            lanes: HashMap::new(),
            done_tx,
            done_rx,
            ready: VecDeque::new(),
            sources: Sources::new(),
            page_buf: Vec::new(),
        }
    }

    /// Closes the pools of share groups that no guest of the engine (`guests`) belongs to
    /// any more: their guests left, and with them every frame reference. A later guest of
    /// the group gets a fresh pool.
    pub fn close_unused_pools(&mut self, guests: &[GuestCounters]) {
        let used: std::collections::HashSet<DomainId> = guests.iter().map(|g| g.domain).collect();
        let unused: Vec<GroupKey> = self
            .domains
            .iter()
            .filter(|(_, d)| !used.contains(d))
            .map(|(key, _)| key.clone())
            .collect();
        for key in unused {
            if let Some(d) = self.domains.remove(&key) {
                self.pools.remove(&d);
                tracing::debug!(group = %key, "share group empty; pool closed");
            }
        }
    }

    /// Guests and pages that `uid`'s VM processes have registered now.
    pub fn registered_by(&self, uid: u32) -> (usize, u64) {
        self.conns
            .values()
            .filter(|c| c.uid == uid)
            .fold((0, 0), |(n, p), c| (n + 1, p + c.hello.pages))
    }

    /// The domain of a share group, created (with its pool) on first use. Groups are
    /// keyed by who shares them ([`GroupKey`]), never by the name a VM asked for alone.
    pub fn domain(&mut self, group: &GroupKey) -> std::io::Result<DomainId> {
        if let Some(d) = self.domains.get(group) {
            return Ok(*d);
        }
        // Skip ids still in use (only after 2^32 groups came and went).
        while self.pools.contains_key(&DomainId(self.next_domain)) {
            self.next_domain = self.next_domain.wrapping_add(1);
        }
        let id = DomainId(self.next_domain);
        self.pools.insert(id, Pool::create(&id.0.to_string())?);
        self.next_domain = self.next_domain.wrapping_add(1);
        self.domains.insert(group.clone(), id);
        Ok(id)
    }

    /// Sends `request` to `guest` and returns its reply, once its lane (`lanes.rs`) has
    /// nothing outstanding: the scanner makes the exchange itself. An agent's transient
    /// failure is asked again a few times (`worker::exchange`); any other failure drops the
    /// guest ([`Fleet::failed`]).
    pub fn call(&mut self, guest: GuestId, request: Request) -> Result<Reply, HostError> {
        if !self.wait_idle(guest, None) {
            return Err(self.failed(guest, Failure::Gone("its worker does not answer".into())));
        }
        let mut id = self.next_request;
        let conn = self
            .conns
            .get_mut(&guest)
            .ok_or(HostError::GuestGone { guest })?;
        let res = worker::exchange(
            &mut conn.stream,
            guest,
            &mut id,
            request,
            self.request_timeout,
        );
        self.next_request = id;
        res.map_err(|f| self.failed(guest, f))
    }

    /// Marks `guest` for removal after the round because an exchange with its agent failed
    /// (its frames stay until its process exits; its agent registers again as a new guest).
    pub(crate) fn failed(&mut self, guest: GuestId, f: Failure) -> HostError {
        self.dead.push(guest);
        match f {
            Failure::Gone(e) => {
                tracing::warn!(guest = guest.0, "agent connection failed: {e}");
                HostError::GuestGone { guest }
            }
            Failure::OutOfTurn(what) => {
                tracing::warn!(guest = guest.0, "agent answered out of turn: {what}");
                HostError::Protocol {
                    guest,
                    reason: "unexpected message".into(),
                }
            }
            Failure::Agent(e) => {
                match e.kind {
                    AgentErrorKind::Transient => tracing::warn!(
                        guest = guest.0,
                        "agent still failing after {TRANSIENT_RETRIES} retries: {}; dropping the guest",
                        e.detail
                    ),
                    AgentErrorKind::BadRequest => tracing::warn!(
                        guest = guest.0,
                        "agent refused a request as out of range: {}; our view of the guest \
                         is wrong, dropping it",
                        e.detail
                    ),
                    AgentErrorKind::Fatal => tracing::warn!(
                        guest = guest.0,
                        "agent could not do the work: {}; dropping the guest",
                        e.detail
                    ),
                }
                HostError::Protocol {
                    guest,
                    reason: e.to_string(),
                }
            }
        }
    }

    /// The daemon's half of the Populate ops among `ops`: copies of their pages from the
    /// agent (at most [`MAX_READ_PAGES`] a request), written into their fresh frames, and
    /// the hash of each page written recorded at its index in `hashes`.
    fn populate_frames(
        &mut self,
        guest: GuestId,
        ops: &[MergeOp],
        hashes: &mut [Option<u64>],
    ) -> Result<(), HostError> {
        // (index of the run's first page in the request, first page, frame, pages)
        let mut runs: Vec<(usize, Gfn, FrameId, u32)> = Vec::new();
        let mut at = 0usize;
        for op in ops {
            if op.kind == OpKind::Populate {
                // Long runs go in pieces that fit one request.
                let mut k = 0;
                while k < op.len {
                    let n = (op.len - k).min(MAX_READ_PAGES as u32);
                    runs.push((at + k as usize, op.gfn + u64::from(k), op.frame + k, n));
                    k += n;
                }
            }
            at += op.len as usize;
        }
        if runs.is_empty() {
            return Ok(());
        }
        let Some(domain) = self.conns.get(&guest).map(|c| c.domain) else {
            return Err(HostError::GuestGone { guest });
        };
        let mut i = 0;
        while i < runs.len() {
            let mut pages = 0u64;
            let mut j = i;
            while j < runs.len() && pages + u64::from(runs[j].3) <= MAX_READ_PAGES {
                pages += u64::from(runs[j].3);
                j += 1;
            }
            let batch = &runs[i..j];
            let want: Vec<PageRun> = batch
                .iter()
                .map(|&(_, gfn, _, len)| PageRun { gfn, len })
                .collect();
            // Straight from the VM process where the daemon may (`direct.rs`), else copies
            // from the agent.
            let mut bytes = std::mem::take(&mut self.page_buf);
            if !self.read_direct(guest, &want, &mut bytes) {
                bytes = match self.call(guest, Request::ReadPages(want))? {
                    Reply::Pages(PageBytes(b)) if b.len() as u64 == pages * PAGE_SIZE as u64 => b,
                    _ => return Err(self.mismatch(guest, "page copies do not match the request")),
                };
            }
            let pool = &self.pools[&domain];
            let mut off = 0usize;
            for &(index, _, frame, len) in batch {
                let data = &bytes[off..off + len as usize * PAGE_SIZE];
                pool.write_frames(frame, data)
                    .map_err(|e| HostError::Pool {
                        domain,
                        reason: format!("cannot write frames: {e}"),
                    })?;
                for (k, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
                    hashes[index + k] = Some(page_hash(page));
                }
                off += data.len();
            }
            self.page_buf = bytes;
            i = j;
        }
        Ok(())
    }

    pub(crate) fn mismatch(&mut self, guest: GuestId, what: &str) -> HostError {
        tracing::warn!(guest = guest.0, "agent protocol error: {what}");
        self.dead.push(guest);
        HostError::Protocol {
            guest,
            reason: what.to_string(),
        }
    }

    /// Forgets `guest`'s connection: shuts the socket down (its worker, if it is waiting
    /// for the agent, stops now) and drops its lane.
    pub fn disconnect(&mut self, guest: GuestId) -> Option<Conn> {
        let conn = self.conns.remove(&guest)?;
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        self.drop_lane(guest);
        self.sources.remove(&guest);
        Some(conn)
    }
}

impl MergeHost for Fleet {
    fn digest(
        &mut self,
        guest: GuestId,
        runs: &[PageRun],
        out: &mut Vec<PageDigest>,
    ) -> Result<(), HostError> {
        out.clear();
        let want: u64 = runs.iter().map(|r| u64::from(r.len)).sum();
        match self.call(guest, Request::Digest(runs.to_vec()))? {
            Reply::Digests(d) if d.len() as u64 == want => {
                *out = d;
                Ok(())
            }
            _ => Err(self.mismatch(guest, "digest reply does not match the request")),
        }
    }

    fn digest_dirty(
        &mut self,
        guest: GuestId,
        max: u32,
        out: &mut Vec<(Gfn, PageDigest)>,
    ) -> Result<bool, HostError> {
        out.clear();
        match self.call(guest, Request::DigestDirty(max))? {
            Reply::DirtyDigests(d, more) if d.len() <= max as usize => {
                *out = d;
                Ok(more)
            }
            _ => Err(self.mismatch(guest, "dirty digest reply does not match the request")),
        }
    }

    /// Populate ops are the daemon's own work: it asks the agent for copies of the pages
    /// (`ReadPages`), writes the new frames itself and hashes what it wrote; then every op
    /// goes to the agent as a Join, which byte-compares each page with its frame under
    /// write protection and maps the equal ones. A page written since its copy stays
    /// private (a mismatch), and its fresh frame is released by the engine.
    fn merge(
        &mut self,
        guest: GuestId,
        ops: &[MergeOp],
        out: &mut Vec<MergeResult>,
    ) -> Result<(), HostError> {
        out.clear();
        if ops.iter().any(|o| o.kind == OpKind::Populate) {
            // A partner: one busy with a slow digest does not hold the others up.
            self.partner_ready(guest)?;
        }
        let want: u64 = ops.iter().map(|o| u64::from(o.len)).sum();
        let mut hashes = vec![None; want as usize];
        self.populate_frames(guest, ops, &mut hashes)?;
        let joins = ops
            .iter()
            .map(|o| MergeOp {
                kind: OpKind::Join,
                ..*o
            })
            .collect();
        match self.call(guest, Request::Merge(joins))? {
            Reply::Merged(mut r) if r.len() as u64 == want => {
                for (res, hash) in r.iter_mut().zip(hashes) {
                    if let Some(h) = hash {
                        res.hash = h;
                    }
                }
                *out = r;
                Ok(())
            }
            _ => Err(self.mismatch(guest, "merge reply does not match the request")),
        }
    }

    fn reclaim_zero(
        &mut self,
        guest: GuestId,
        gfns: &[Gfn],
        out: &mut Vec<ZeroOutcome>,
    ) -> Result<(), HostError> {
        out.clear();
        match self.call(guest, Request::ReclaimZero(gfns.to_vec()))? {
            Reply::Zero(r) if r.len() == gfns.len() => {
                *out = r;
                Ok(())
            }
            _ => Err(self.mismatch(guest, "zero reply does not match the request")),
        }
    }

    fn unmerge(
        &mut self,
        guest: GuestId,
        gfns: &[Gfn],
        out: &mut Vec<UnmergeOutcome>,
    ) -> Result<(), HostError> {
        out.clear();
        match self.call(guest, Request::Unmerge(gfns.to_vec()))? {
            Reply::Unmerged(r) if r.len() == gfns.len() => {
                *out = r;
                Ok(())
            }
            _ => Err(self.mismatch(guest, "unmerge reply does not match the request")),
        }
    }

    fn free_frames(&mut self, domain: DomainId, frames: &[FrameId]) -> Result<(), HostError> {
        let pool = self.pools.get(&domain).ok_or_else(|| HostError::Pool {
            domain,
            reason: "no such pool".into(),
        })?;
        pool.punch(frames).map_err(|e| HostError::Pool {
            domain,
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tinyvmm_merge_protocol::wire::{self, AgentError, AgentMsg, DaemonMsg};

    /// A fleet with one guest whose "agent" answers request after request from `script`
    /// (an error of that kind, or `None` for a good answer); returns the fleet, the guest
    /// and the agent thread (which returns how many requests it saw).
    fn fleet_with_agent(
        script: Vec<Option<AgentErrorKind>>,
    ) -> (Fleet, GuestId, std::thread::JoinHandle<usize>) {
        let (daemon_end, mut agent_end) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || {
            let mut seen = 0;
            for step in script {
                let Ok((DaemonMsg::Request { id, .. }, _)) = wire::recv(&mut agent_end) else {
                    break;
                };
                seen += 1;
                let reply = match step {
                    Some(kind) => Reply::Error(AgentError::new(kind, "page 9 of 8")),
                    None => Reply::Stats(AgentStats::default()),
                };
                wire::send(&mut agent_end, &AgentMsg::Reply { id, reply }, None).unwrap();
            }
            seen
        });
        let mut fleet = Fleet::new(Duration::from_secs(5));
        let guest = GuestId(1);
        fleet
            .conns
            .insert(guest, Conn::of_this_process(daemon_end, "test", 8));
        (fleet, guest, agent)
    }

    #[test]
    fn transient_failures_are_retried_and_the_guest_kept() {
        use AgentErrorKind::Transient;
        let (mut fleet, guest, agent) =
            fleet_with_agent(vec![Some(Transient), Some(Transient), None]);
        assert!(matches!(
            fleet.call(guest, Request::Stats),
            Ok(Reply::Stats(_))
        ));
        assert!(fleet.dead.is_empty());
        drop(fleet);
        assert_eq!(agent.join().unwrap(), 3);
    }

    #[test]
    fn transient_failures_past_the_retries_drop_the_guest() {
        let script = vec![Some(AgentErrorKind::Transient); TRANSIENT_RETRIES as usize + 1];
        let (mut fleet, guest, agent) = fleet_with_agent(script);
        assert!(matches!(
            fleet.call(guest, Request::Stats),
            Err(HostError::Protocol { .. })
        ));
        assert_eq!(fleet.dead, vec![guest]);
        drop(fleet);
        assert_eq!(agent.join().unwrap(), TRANSIENT_RETRIES as usize + 1);
    }

    #[test]
    fn bad_requests_and_fatal_failures_drop_the_guest_at_once() {
        for kind in [AgentErrorKind::BadRequest, AgentErrorKind::Fatal] {
            let (mut fleet, guest, agent) = fleet_with_agent(vec![Some(kind), None]);
            match fleet.call(guest, Request::Stats) {
                Err(HostError::Protocol { reason, .. }) => assert!(reason.contains("page 9 of 8")),
                other => panic!("{kind}: {other:?}"),
            }
            assert_eq!(fleet.dead, vec![guest]);
            drop(fleet);
            assert_eq!(agent.join().unwrap(), 1, "{kind}: not retried");
        }
    }
}
