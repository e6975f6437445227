//! The merge agent: registers this VM's RAM with the merge daemon and carries out the
//! daemon's requests on it.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tinyvmm_merge_protocol::{
    wire, AgentMsg, AgentStats, DaemonMsg, Hello, PageBytes, Reply, Request, PROTOCOL_VERSION,
};

use super::bitmap::Bitmap;
use super::errors::{ConnectError, RequestError, SessionError};
use super::pages::SharedRam;

/// Guest RAM as the agent and the balloon share it: the agent holds the lock for each
/// request it serves, the balloon for each range the guest gives up.
pub type SharedRamHandle = Arc<Mutex<SharedRam>>;

fn lock(ram: &SharedRamHandle) -> MutexGuard<'_, SharedRam> {
    ram.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where guest writes come from: KVM's dirty log.
pub trait DirtySource: Send {
    /// ORs the pages written since the last call into `into` (page index space).
    fn collect(&mut self, into: &mut Bitmap) -> std::io::Result<()>;
}

/// What the agent tells the rest of the VMM (the VM's own API) about its state.
#[derive(Debug, Clone, Default)]
pub struct AgentStatus {
    /// Registered with a daemon now.
    pub registered: bool,
    /// Our id at that daemon.
    pub guest_id: Option<u32>,
    /// Registrations so far (more than one after a daemon restart).
    pub registrations: u64,
    /// Requests served.
    pub requests: u64,
    /// Pages whose mapping is a pool frame (merged, or merged once and split since).
    pub pool_mapped_pages: u64,
    /// Pages of guest RAM.
    pub pages: u64,
    /// Write-protect and VMA statistics.
    pub stats: AgentStats,
}

/// A shared view of [`AgentStatus`].
pub type AgentStatusHandle = std::sync::Arc<std::sync::Mutex<AgentStatus>>;

/// Starts a merge daemon when none answers on the agent's socket. The binary hands one to
/// the agent: it alone knows how its daemon is started.
pub trait DaemonLauncher: Send + Sync {
    /// Starts a daemon that will listen on `socket`; returns its process id.
    fn launch(&self, socket: &Path) -> std::io::Result<u32>;
}

/// How the agent finds its daemon.
#[derive(Clone)]
pub struct AgentConfig {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// The share group to join.
    pub share_group: String,
    /// A name for the daemon's listings.
    pub name: String,
    /// Override of the VMA budget (default: what `vm.max_map_count` leaves, minus a margin).
    pub vma_budget: Option<u32>,
    /// Starts a daemon if none answers at first ([`first_connection`] only).
    pub autostart: Option<Arc<dyn DaemonLauncher>>,
    /// Connect again after losing the daemon (or never having had one). Off in a VMM
    /// that dropped its privileges: the run directory is no longer its own.
    pub reconnect: bool,
    /// The seccomp filters; the agent thread installs its kind's at its start.
    pub seccomp: Option<Arc<crate::seccomp::Filters>>,
    /// The user the VMM drops to after registering (`--uid`), named in the hello so that
    /// the daemon files the guest under that user's share groups.
    pub run_as_uid: Option<u32>,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("socket", &self.socket)
            .field("share_group", &self.share_group)
            .field("name", &self.name)
            .field("vma_budget", &self.vma_budget)
            .field("run_as_uid", &self.run_as_uid)
            .field("autostart", &self.autostart.is_some())
            .field("reconnect", &self.reconnect)
            .field("seccomp", &self.seccomp.is_some())
            .finish()
    }
}

/// Mappings left for merged runs: `vm.max_map_count` minus what the process uses, minus a
/// margin for the VMM's own needs (threads, libraries). Read at each registration, so a
/// limit the daemon raised at its start counts for the VMs that register after it.
fn default_vma_budget() -> u32 {
    use tinyvmm_sys::vm_limits;
    let max = vm_limits::max_map_count().unwrap_or(vm_limits::DEFAULT_MAX_MAP_COUNT);
    max.saturating_sub(vm_limits::own_mappings() + 1024)
        .min(u64::from(u32::MAX)) as u32
}

struct Agent {
    cfg: AgentConfig,
    ram: SharedRamHandle,
    dirty_source: Option<Box<dyn DirtySource>>,
    /// Pages written since their last digest (for pages never digested by this daemon:
    /// written since the previous harvest, i.e. recently).
    dirty: Bitmap,
    /// Pages the current daemon has digested at least once.
    digested: Bitmap,
    /// Scratch for one harvest of the dirty log.
    harvest: Bitmap,
    dirty_cursor: u64,
    blocked_writes: u64,
    protect_all: Vec<u64>,
    status: AgentStatusHandle,
}

impl Agent {
    fn publish(&mut self, f: impl FnOnce(&mut AgentStatus)) {
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut st);
    }

    fn hello(&self) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            name: self.cfg.name.clone(),
            pages: lock(&self.ram).pages(),
            share_group: self.cfg.share_group.clone(),
            vma_budget: self.cfg.vma_budget.unwrap_or_else(default_vma_budget),
            dirty_source: self.dirty_source.is_some(),
            run_as_uid: self.cfg.run_as_uid,
        }
    }

    /// Harvests KVM's dirty log. A page digested before accumulates writes until its next
    /// digest (KSM's "unchanged since the last visit"); a page never digested counts as
    /// dirty only if written since the previous harvest, so that a page at rest is a
    /// candidate on its very first visit instead of a full pass later.
    ///
    /// Whatever was harvested is kept even if the harvest failed part-way (KVM has already
    /// cleared those bits), so that a failed request can be asked again without losing
    /// writes.
    fn collect_dirty(&mut self) -> Result<(), RequestError> {
        if let Some(src) = self.dirty_source.as_mut() {
            self.harvest.clear();
            let res = src.collect(&mut self.harvest);
            // Pages the guest gave up (balloon) changed too.
            lock(&self.ram).take_given_up(&mut self.harvest);
            self.dirty.fold_harvest(&self.digested, &self.harvest);
            res.map_err(RequestError::DirtyLog)?;
        }
        Ok(())
    }

    fn mark_digested(&mut self, runs: &[tinyvmm_merge_protocol::PageRun]) {
        for r in runs {
            for p in r.gfn..r.gfn + u64::from(r.len) {
                if p < self.digested.len() {
                    self.digested.set(p, true);
                }
            }
        }
    }

    fn drain_fault_events(&mut self) {
        let ram = lock(&self.ram);
        while let Ok(Some(_)) = ram.uffd().read_event() {
            self.blocked_writes += 1;
        }
    }

    fn stats(&mut self) -> AgentStats {
        let (mut s, pages_reported) = {
            let mut ram = lock(&self.ram);
            (
                std::mem::take(&mut ram.protect_stats.samples_ns),
                ram.pages_reported(),
            )
        };
        self.protect_all.append(&mut s);
        // Bound memory: keep the most recent 100k samples.
        if self.protect_all.len() > 100_000 {
            let cut = self.protect_all.len() - 100_000;
            self.protect_all.drain(..cut);
        }
        let mut v = self.protect_all.clone();
        v.sort_unstable();
        let pct = |p: f64| -> u64 {
            if v.is_empty() {
                0
            } else {
                v[((v.len() - 1) as f64 * p) as usize]
            }
        };
        AgentStats {
            protect_batches: v.len() as u64,
            protect_p50_ns: pct(0.5),
            protect_p99_ns: pct(0.99),
            protect_max_ns: v.last().copied().unwrap_or(0),
            blocked_writes: self.blocked_writes,
            vma_count: tinyvmm_sys::vm_limits::own_mappings() as u32,
            pages_reported,
        }
    }

    fn serve(&mut self, req: Request) -> Reply {
        let r = self.carry_out(req);
        self.drain_fault_events();
        r.unwrap_or_else(|e| {
            tracing::warn!(kind = %e.kind(), "merge request failed: {e}");
            Reply::Error(e.into())
        })
    }

    fn carry_out(&mut self, req: Request) -> Result<Reply, RequestError> {
        Ok(match req {
            Request::Digest(runs) => {
                self.collect_dirty()?;
                let mut out = Vec::new();
                let dirty = self.dirty_source.is_some().then_some(&mut self.dirty);
                lock(&self.ram).digest(&runs, dirty, &mut out)?;
                self.mark_digested(&runs);
                Reply::Digests(out)
            }
            Request::DigestDirty(max) => {
                self.collect_dirty()?;
                self.digest_dirty(max)?
            }
            Request::Merge(ops) => {
                let mut out = Vec::new();
                lock(&self.ram).merge(&ops, &mut out)?;
                Reply::Merged(out)
            }
            Request::ReclaimZero(gfns) => {
                let mut out = Vec::new();
                lock(&self.ram).reclaim_zero(&gfns, &mut out)?;
                Reply::Zero(out)
            }
            Request::Unmerge(gfns) => {
                let mut out = Vec::new();
                lock(&self.ram).unmerge(&gfns, &mut out)?;
                Reply::Unmerged(out)
            }
            Request::ReadPages(runs) => {
                let mut out = Vec::new();
                lock(&self.ram).read_pages(&runs, &mut out)?;
                Reply::Pages(PageBytes(out))
            }
            Request::Stats => Reply::Stats(self.stats()),
            Request::RamLayout => Reply::RamLayout(lock(&self.ram).layout()),
        })
    }

    fn digest_dirty(&mut self, max: u32) -> Result<Reply, RequestError> {
        // Dirty pages from the cursor to the end, then from the start: fair across rounds.
        let total = lock(&self.ram).pages();
        let start = self.dirty_cursor.min(total);
        let mut pages = Vec::new();
        for (from, to) in [(start, total), (0, start)] {
            let mut q = from;
            while pages.len() < max as usize {
                match self.dirty.next_set(q) {
                    Some(i) if i < to => {
                        pages.push(i);
                        q = i + 1;
                    }
                    _ => break,
                }
            }
        }
        self.dirty_cursor = pages.last().map_or(0, |l| l + 1);
        pages.sort_unstable();
        let runs: Vec<_> = pages
            .iter()
            .map(|&g| tinyvmm_merge_protocol::PageRun { gfn: g, len: 1 })
            .collect();
        let mut digests = Vec::new();
        lock(&self.ram).digest(&runs, Some(&mut self.dirty), &mut digests)?;
        self.mark_digested(&runs);
        let more = self.dirty.next_set(0).is_some();
        Ok(Reply::DirtyDigests(
            pages.into_iter().zip(digests).collect(),
            more,
        ))
    }

    /// One registration: hello, welcome, then requests until the daemon goes away.
    fn session(&mut self, mut stream: UnixStream) -> Result<(), SessionError> {
        wire::send(&mut stream, &AgentMsg::Hello(self.hello()), None)
            .map_err(SessionError::Hello)?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let (msg, fd) = wire::recv::<DaemonMsg>(&mut stream).map_err(SessionError::NoWelcome)?;
        match (msg, fd) {
            (DaemonMsg::Welcome { guest, pool_len }, Some(fd)) => {
                // A new daemon has digested nothing: start the dirty state afresh.
                self.digested.clear();
                self.dirty.set_all();
                self.dirty_cursor = 0;
                lock(&self.ram)
                    .set_pool(fd, pool_len)
                    .map_err(SessionError::Pool)?;
                tracing::info!(guest, "registered with the merge daemon");
                self.publish(|st| {
                    st.registered = true;
                    st.guest_id = Some(guest);
                    st.registrations += 1;
                });
            }
            (DaemonMsg::Refused(why), _) => return Err(SessionError::Refused(why)),
            (other, fd) => {
                return Err(SessionError::UnexpectedWelcome(format!(
                    "{other:?}{}",
                    if fd.is_none() { " without a pool" } else { "" }
                )))
            }
        }
        let _ = stream.set_read_timeout(None);
        loop {
            let (msg, _) = wire::recv::<DaemonMsg>(&mut stream).map_err(SessionError::Lost)?;
            let DaemonMsg::Request { id, request } = msg else {
                return Err(SessionError::OutOfTurn);
            };
            let is_stats = matches!(request, Request::Stats);
            let reply = self.serve(request);
            let stats = match &reply {
                Reply::Stats(s) => Some(s.clone()),
                _ => None,
            };
            wire::send(&mut stream, &AgentMsg::Reply { id, reply }, None)
                .map_err(SessionError::Lost)?;
            let mapped = lock(&self.ram).pool_mapped_pages();
            self.publish(|st| {
                st.requests += 1;
                st.pool_mapped_pages = mapped;
                if is_stats {
                    if let Some(s) = stats {
                        st.stats = s;
                    }
                }
            });
        }
    }

    /// Serves registrations until the process ends: `first` (made before the thread
    /// started), then new connections after each loss if the config allows reconnecting.
    fn run(mut self, first: Option<UnixStream>) {
        crate::seccomp::install_or_exit(
            self.cfg.seccomp.as_deref(),
            crate::seccomp::ThreadKind::Agent,
        );
        let mut next = first;
        let mut warned = false;
        loop {
            let stream = match next.take() {
                Some(s) => s,
                None if !self.cfg.reconnect => {
                    tracing::warn!(
                        socket = %self.cfg.socket.display(),
                        "no merge daemon connection, and this VMM dropped its privileges \
                         (--uid) so it cannot connect again: guest runs unmerged"
                    );
                    return;
                }
                None => match connect(&self.cfg.socket) {
                    Ok(s) => s,
                    Err(e) => {
                        if !warned {
                            if e.untrusted() {
                                tracing::error!(
                                    socket = %self.cfg.socket.display(),
                                    "refusing the merge daemon: {e}; guest runs unmerged"
                                );
                            } else {
                                tracing::warn!(
                                    socket = %self.cfg.socket.display(),
                                    "no merge daemon: {e}; guest runs unmerged, retrying"
                                );
                            }
                            warned = true;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            warned = false;
            match self.session(stream) {
                Ok(()) => {}
                Err(e) => tracing::warn!("merge daemon connection ended: {e}"),
            }
            // Merged pages keep their mappings of the old pool; the next daemon starts a new one.
            lock(&self.ram).drop_pool();
            self.publish(|st| {
                st.registered = false;
                st.guest_id = None;
            });
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// Connects to the daemon at `socket`, if it is one this VM may trust: its run directory
/// is owned by this user or by root (a root daemon serving several users) and is not a
/// symlink nor group/world-writable — else another user could have put a fake daemon's
/// socket there — and the process at the other end runs as root or as this user.
fn connect(socket: &Path) -> Result<UnixStream, ConnectError> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        if dir.exists() {
            tinyvmm_sys::dir::check_trusted_dir(dir)?;
        }
    }
    let stream = UnixStream::connect(socket).map_err(ConnectError::NoDaemon)?;
    let peer = tinyvmm_sys::socket::peer_cred(&stream).map_err(ConnectError::NoDaemon)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if peer.uid != 0 && peer.uid != me {
        return Err(ConnectError::ForeignDaemon {
            pid: peer.pid,
            uid: peer.uid,
        });
    }
    Ok(stream)
}

/// The agent's first connection to its daemon, made by the caller before it drops
/// privileges or installs seccomp filters: starting a daemon (`cfg.autostart`, when none
/// answers) forks and execs, which no filter allows and which must not hand a filter or
/// a dropped uid to the daemon. Waits up to 5 s for a daemon it started. `None` when no
/// (trusted) daemon answers; the agent then keeps trying if `cfg.reconnect` allows.
pub fn first_connection(cfg: &AgentConfig) -> Option<UnixStream> {
    match connect(&cfg.socket) {
        Ok(s) => Some(s),
        Err(e) if e.untrusted() => {
            // Never registered with, nor started there.
            tracing::error!(
                socket = %cfg.socket.display(),
                "refusing the merge daemon: {e}; guest runs unmerged"
            );
            None
        }
        Err(e) => {
            let launcher = cfg.autostart.as_ref()?;
            match launcher.launch(&cfg.socket) {
                Ok(pid) => tracing::info!(pid, "started a merge daemon"),
                Err(le) => {
                    tracing::warn!("no merge daemon ({e}) and cannot start one: {le}");
                    return None;
                }
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                if let Ok(s) = connect(&cfg.socket) {
                    return Some(s);
                }
            }
            None
        }
    }
}

/// Starts the agent thread for `ram` (shared with the balloon, see [`SharedRamHandle`]),
/// serving `first` (see [`first_connection`]) first.
/// It runs for the life of the process, under the agent's seccomp filter if `cfg` has
/// filters. Returns the thread and a view of its status.
pub fn spawn_agent(
    cfg: AgentConfig,
    ram: SharedRamHandle,
    dirty_source: Option<Box<dyn DirtySource>>,
    first: Option<UnixStream>,
) -> std::io::Result<(JoinHandle<()>, AgentStatusHandle)> {
    let pages = lock(&ram).pages();
    let status = AgentStatusHandle::default();
    status.lock().unwrap_or_else(|e| e.into_inner()).pages = pages;
    let mut dirty = Bitmap::new(pages);
    // Everything counts as written before registration (the loader wrote the kernel); the
    // first harvest narrows that down to what is being written now.
    dirty.set_all();
    let agent = Agent {
        cfg,
        ram,
        dirty_source,
        dirty,
        digested: Bitmap::new(pages),
        harvest: Bitmap::new(pages),
        dirty_cursor: 0,
        blocked_writes: 0,
        protect_all: Vec::new(),
        status: status.clone(),
    };
    let t = std::thread::Builder::new()
        .name("merge-agent".into())
        .spawn(move || agent.run(first))?;
    Ok((t, status))
}
