//! `tinyvmm merged`: the merge daemon (the user-space ksmd).
//!
//! Threads:
//! - the **scanner** (the caller's thread) owns the [`Engine`] and the [`Fleet`] of agent
//!   connections; it wakes every `sleep_millisecs` for one round, and between rounds
//!   applies commands from the channel: new registrations, and typed requests from the
//!   control API. Nothing else touches engine state.
//! - the **acceptor** reads each new connection's `Hello` (with a deadline), validates
//!   it, and hands the connection to the scanner.
//! - the control API (REST over a Unix socket) runs on its own thread and talks to the
//!   scanner through [`Control`].
//!
//! One daemon per run directory: it holds an exclusive `flock` on `merged.lock` for its
//! lifetime, so racing starts (two guests starting at once) leave exactly one daemon.

mod fleet;
mod rundir;

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use tinyvmm_merge::host::GuestId;
use tinyvmm_merge::{Counters, Engine, GuestCounters, GuestSpec, Knobs, KnobsUpdate};
use tinyvmm_merge_protocol::wire::{self, AgentMsg, DaemonMsg, Hello, PROTOCOL_VERSION};

pub use fleet::POOL_LEN;
use fleet::{Conn, Fleet};
pub use rundir::{default_api_socket, default_merge_socket, run_dir};
use tinyvmm_sys::process::ProcessWatch;

/// Largest guest the daemon registers (pages of 4 KiB: 4 TiB).
const MAX_GUEST_PAGES: u64 = 1 << 30;
/// How long a new connection has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon holds the lock.
    #[error("a merge daemon is already running for {0}")]
    AlreadyRunning(PathBuf),
    /// Setting up the run directory, lock or socket failed.
    #[error("{what} {path}: {source}")]
    Setup {
        /// The operation.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Bad knobs on the command line.
    #[error("invalid settings: {0}")]
    Knobs(#[from] tinyvmm_merge::KnobError),
}

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
    /// Its agent's statistics (write-protect stalls, VMAs).
    pub agent: tinyvmm_merge_protocol::AgentStats,
}

enum Cmd {
    Register(Box<UnixStream>, Hello),
    Snapshot(bool, Sender<Snapshot>),
    Update(KnobsUpdate, Sender<Result<Snapshot, String>>),
}

/// A handle to send typed commands to the scanner thread.
#[derive(Clone)]
pub struct Control {
    tx: Sender<Cmd>,
}

impl Control {
    /// The current state; `with_guests` adds every guest (and asks each agent for its
    /// statistics).
    pub fn snapshot(&self, with_guests: bool) -> Option<Snapshot> {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Cmd::Snapshot(with_guests, tx)).ok()?;
        rx.recv_timeout(Duration::from_secs(30)).ok()
    }

    /// Applies a knob update atomically; the error says what was refused.
    pub fn update(&self, upd: KnobsUpdate) -> Result<Snapshot, String> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Cmd::Update(upd, tx))
            .map_err(|_| "the daemon is stopping".to_string())?;
        rx.recv_timeout(Duration::from_secs(120))
            .map_err(|_| "the daemon did not answer".to_string())?
    }
}

/// Settings of one daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Where agents register.
    pub socket: PathBuf,
    /// Initial knobs.
    pub knobs: Knobs,
    /// How long an agent may take to answer one request before its guest is dropped.
    pub request_timeout: Duration,
}

/// A daemon that is set up (lock held, socket bound) but not yet scanning.
pub struct Daemon {
    cfg: DaemonConfig,
    _lock: std::fs::File,
    listener: UnixListener,
    rx: Receiver<Cmd>,
    tx: Sender<Cmd>,
}

fn setup<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> DaemonError + 'a {
    move |source| DaemonError::Setup {
        what,
        path: path.to_path_buf(),
        source,
    }
}

impl Daemon {
    /// Takes the lock and binds the socket (mode 0600).
    pub fn bind(cfg: DaemonConfig) -> Result<Self, DaemonError> {
        cfg.knobs.validate()?;
        let dir = cfg
            .socket
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        std::fs::create_dir_all(&dir).map_err(setup("cannot create", &dir))?;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        let lock_path = cfg.socket.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(setup("cannot open", &lock_path))?;
        // SAFETY: flock on a file we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(DaemonError::AlreadyRunning(cfg.socket.clone()));
        }
        // We hold the lock: any socket file left there is stale.
        let _ = std::fs::remove_file(&cfg.socket);
        let listener = tinyvmm_sys::socket::bind_unix_0600(&cfg.socket)
            .map_err(setup("cannot listen on", &cfg.socket))?;
        let (tx, rx) = mpsc::channel();
        Ok(Self {
            cfg,
            _lock: lock,
            listener,
            rx,
            tx,
        })
    }

    /// A handle for the control API.
    pub fn control(&self) -> Control {
        Control {
            tx: self.tx.clone(),
        }
    }

    /// Runs until `stop` returns true (checked between rounds).
    pub fn run(self, stop: &dyn Fn() -> bool) -> Result<(), DaemonError> {
        let listener = self
            .listener
            .try_clone()
            .map_err(setup("cannot clone", &self.cfg.socket))?;
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name("merged-accept".into())
            .spawn(move || accept_loop(listener, tx))
            .map_err(setup("cannot start acceptor for", &self.cfg.socket))?;
        let mut engine = Engine::new(self.cfg.knobs)?;
        let mut fleet = Fleet::new(self.cfg.request_timeout);
        let mut next_round = Instant::now();
        let mut rounds: u64 = 0;
        let mut budget_warned: Option<Instant> = None;
        let mut idle_streak: u32 = 0;
        tracing::info!(socket = %self.cfg.socket.display(), "merge daemon ready");
        while !stop() {
            let now = Instant::now();
            let wait = next_round
                .saturating_duration_since(now)
                .min(Duration::from_millis(200));
            match self.rx.recv_timeout(wait) {
                Ok(cmd) => {
                    if handle(cmd, &mut engine, &mut fleet) {
                        // Knobs changed: wake up now, without idle back-off.
                        idle_streak = 0;
                        next_round = Instant::now();
                    }
                    // Fall through: rounds stay on time however many requests arrive.
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() < next_round {
                continue;
            }
            reap(&mut engine, &mut fleet);
            let start = cpu_time();
            let report = engine.scan_round(&mut fleet);
            let cpu = cpu_time().saturating_sub(start);
            engine.advise(cpu, &report);
            rounds += 1;
            if report.pages_visited > 0 || report.merges > 0 || report.splits > 0 {
                tracing::debug!(round = rounds, ?report, "merge round");
            }
            if report.skipped_vma_budget > 0
                && budget_warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10))
            {
                budget_warned = Some(Instant::now());
                let short: Vec<u32> = engine
                    .guests()
                    .iter()
                    .filter(|g| g.vma_mappings + 2 >= g.vma_budget)
                    .map(|g| g.id.0)
                    .collect();
                tracing::warn!(
                    skipped = report.skipped_vma_budget,
                    guests = ?short,
                    "VMA budget exhausted: pages left unmerged (raise vm.max_map_count or --vma-budget)"
                );
            }
            remove_dead(&mut engine, &mut fleet);
            // Idle back-off: a round that found nothing to do (every guest tracked by its
            // dirty log, at most a handful of pages written — an idle kernel's stack and
            // timer state — and nothing merged, split or reclaimed) doubles the next sleep,
            // up to 32 × the knob (at least 200 ms, at most 1 s). Writes are still all
            // caught — the dirty log keeps them — just noticed later. Any work resets it.
            const IDLE_PAGES: u64 = 64;
            let idle = report.pages_visited <= IDLE_PAGES
                && report.merges == 0
                && report.splits == 0
                && report.zero_reclaimed == 0;
            idle_streak = if idle { (idle_streak + 1).min(5) } else { 0 };
            let sleep = engine.sleep();
            let delay = if idle_streak == 0 {
                sleep
            } else {
                let cap = (sleep * 32).clamp(Duration::from_millis(200), Duration::from_secs(1));
                (sleep.max(Duration::from_millis(1)) * (1 << idle_streak)).min(cap)
            };
            next_round = Instant::now() + delay;
        }
        Ok(())
    }
}

/// CPU time of this thread.
fn cpu_time() -> Duration {
    // SAFETY: a zeroed timespec is valid; clock_gettime writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The state for the API; `with_guests` also asks every agent for its statistics (one
/// round trip each), which `GET /ksm` does not need. Agents found gone on the way are
/// removed by the next round.
fn snapshot(engine: &Engine, fleet: &mut Fleet, with_guests: bool) -> Snapshot {
    let guests = if with_guests {
        let ids: Vec<GuestId> = fleet.conns.keys().copied().collect();
        for id in ids {
            fleet.refresh_stats(id);
        }
        engine
            .guests()
            .into_iter()
            .filter_map(|c| {
                let conn = fleet.conns.get(&c.id)?;
                Some(GuestSnapshot {
                    counters: c,
                    hello: conn.hello.clone(),
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

/// Applies one command; returns whether the scanner should wake up now.
fn handle(cmd: Cmd, engine: &mut Engine, fleet: &mut Fleet) -> bool {
    match cmd {
        Cmd::Register(stream, hello) => {
            register(*stream, hello, engine, fleet);
            true
        }
        Cmd::Snapshot(with_guests, reply) => {
            let _ = reply.send(snapshot(engine, fleet, with_guests));
            false
        }
        Cmd::Update(upd, reply) => {
            let res = engine.set_knobs(upd, fleet).map_err(|e| e.to_string());
            remove_dead(engine, fleet);
            let _ = reply.send(res.map(|_| snapshot(engine, fleet, false)));
            true
        }
    }
}

fn register(mut stream: UnixStream, hello: Hello, engine: &mut Engine, fleet: &mut Fleet) {
    let refuse = |stream: &mut UnixStream, why: String| {
        tracing::warn!(pid = hello.pid, "registration refused: {why}");
        let _ = wire::send(stream, &DaemonMsg::Refused(why), None);
    };
    let domain = match fleet.domain(&hello.share_group) {
        Ok(d) => d,
        Err(e) => return refuse(&mut stream, format!("cannot create the pool: {e}")),
    };
    // The VM process is who is on the other end of the socket, whatever `hello` says.
    let pid = match peer_pid(&stream) {
        Some(pid) => pid,
        None => return refuse(&mut stream, "cannot read the peer's credentials".into()),
    };
    let hello = Hello { pid, ..hello };
    let id = GuestId(next_guest_id());
    let spec = GuestSpec {
        id,
        pages: hello.pages,
        domain,
        vma_budget: hello.vma_budget.max(1),
        has_dirty_source: hello.dirty_source,
    };
    if let Err(e) = engine.add_guest(spec) {
        return refuse(&mut stream, e.to_string());
    }
    let pool_fd = fleet.pools[&domain].file.as_raw_fd();
    let welcome = DaemonMsg::Welcome {
        guest: id.0,
        pool_len: POOL_LEN,
    };
    if let Err(e) = wire::send(&mut stream, &welcome, Some(pool_fd)) {
        tracing::warn!(pid = hello.pid, "cannot welcome the agent: {e}");
        let _ = engine.remove_guest(id, fleet);
        return;
    }
    let _ = stream.set_read_timeout(Some(fleet.request_timeout));
    let _ = stream.set_write_timeout(Some(fleet.request_timeout));
    tracing::info!(
        guest = id.0,
        pid = hello.pid,
        pages = hello.pages,
        group = %hello.share_group,
        "guest registered"
    );
    fleet.conns.insert(
        id,
        Conn {
            stream,
            hello,
            process: ProcessWatch::new(pid),
        },
    );
}

/// The pid of the process at the other end of a Unix socket (SO_PEERCRED).
fn peer_pid(stream: &UnixStream) -> Option<u32> {
    // SAFETY: ucred is plain data; zero is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`; the fd is a live socket.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

fn next_guest_id() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Finds agents that hung up while idle: agents only speak when asked, so a readable (or
/// hung-up) socket between requests means the VM process is gone.
fn reap(engine: &mut Engine, fleet: &mut Fleet) {
    for (id, conn) in &fleet.conns {
        let mut pfd = libc::pollfd {
            fd: conn.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n > 0 && pfd.revents != 0 {
            fleet.dead.push(*id);
        }
    }
    remove_dead(engine, fleet);
}

fn remove_dead(engine: &mut Engine, fleet: &mut Fleet) {
    let mut dead = std::mem::take(&mut fleet.dead);
    dead.sort_unstable();
    dead.dedup();
    for id in dead {
        fleet.agent_stats.remove(&id);
        let Some(conn) = fleet.conns.remove(&id) else {
            continue;
        };
        if conn.process.exited() {
            tracing::info!(
                guest = id.0,
                pid = conn.process.pid(),
                "guest left; dropping its references"
            );
            let _ = engine.remove_guest(id, fleet);
        } else {
            // Its agent is gone but the VM lives, and its pages may still map our frames:
            // keep them (the engine has the guest failed, or will on its next call) until
            // the process exits. A new registration from it is a new guest.
            tracing::warn!(
                guest = id.0,
                pid = conn.process.pid(),
                "agent connection lost while the VM process lives; its frames stay until it exits"
            );
            fleet.orphans.push((id, conn.process));
        }
    }
    let (gone, alive): (Vec<_>, Vec<_>) = std::mem::take(&mut fleet.orphans)
        .into_iter()
        .partition(|(_, p)| p.exited());
    fleet.orphans = alive;
    for (id, p) in gone {
        tracing::info!(
            guest = id.0,
            pid = p.pid(),
            "VM process exited; dropping its references"
        );
        let _ = engine.remove_guest(id, fleet);
    }
}

fn accept_loop(listener: UnixListener, tx: Sender<Cmd>) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let tx = tx.clone();
        // A slow or hostile client must not hold up the next registration.
        let _ = std::thread::Builder::new()
            .name("merged-hello".into())
            .spawn(move || {
                let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
                match wire::recv::<AgentMsg>(&mut stream) {
                    Ok((AgentMsg::Hello(h), None)) => {
                        if h.version != PROTOCOL_VERSION {
                            let why = format!(
                                "protocol version {} not supported (daemon speaks {PROTOCOL_VERSION})",
                                h.version
                            );
                            tracing::warn!("registration refused: {why}");
                            let _ = wire::send(&mut stream, &DaemonMsg::Refused(why), None);
                        } else if h.pages == 0 || h.pages > MAX_GUEST_PAGES {
                            let why = format!("guest size of {} pages is out of range", h.pages);
                            tracing::warn!("registration refused: {why}");
                            let _ = wire::send(&mut stream, &DaemonMsg::Refused(why), None);
                        } else {
                            let _ = tx.send(Cmd::Register(Box::new(stream), h));
                        }
                    }
                    Ok((other, _)) => {
                        tracing::warn!("connection closed: expected a hello, got {other:?}");
                    }
                    Err(e) => tracing::warn!("connection closed: bad hello: {e}"),
                }
            });
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

impl tinyvmm_api::ControlPlane for Control {
    fn ksm(&self) -> Result<tinyvmm_api::KsmState, tinyvmm_api::ApiError> {
        self.snapshot(false)
            .map(|s| s.ksm_state())
            .ok_or_else(|| tinyvmm_api::ApiError::Unavailable("the daemon is stopping".into()))
    }

    fn update_knobs(
        &self,
        upd: KnobsUpdate,
    ) -> Result<tinyvmm_api::KsmState, tinyvmm_api::ApiError> {
        self.update(upd)
            .map(|s| s.ksm_state())
            .map_err(tinyvmm_api::ApiError::BadRequest)
    }

    fn guests(&self) -> Result<Vec<tinyvmm_api::GuestInfo>, tinyvmm_api::ApiError> {
        let s = self
            .snapshot(true)
            .ok_or_else(|| tinyvmm_api::ApiError::Unavailable("the daemon is stopping".into()))?;
        Ok(s.guests
            .into_iter()
            .map(|g| tinyvmm_api::GuestInfo {
                counters: g.counters,
                pid: g.hello.pid,
                name: g.hello.name,
                share_group: g.hello.share_group,
                agent: g.agent,
            })
            .collect())
    }
}
