//! The scanner: the daemon's main thread. It owns the [`Engine`] and the [`Fleet`], runs
//! one merge round every `sleep_millisecs` (backing off while rounds find nothing to do),
//! applies commands (registrations, control API requests) between rounds, and removes
//! guests whose agents are gone.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use tinyvmm_merge::{Engine, Knobs};

use crate::acceptor::{accept_loop, register};
use crate::control::{snapshot, Cmd, Control};
use crate::error::DaemonError;
use crate::fleet::{Fleet, UserLimits};
use crate::policy::SharePolicy;
use tinyvmm_sys::socket::SocketAccess;

/// Settings of one daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Where agents register.
    pub socket: PathBuf,
    /// Initial knobs.
    pub knobs: Knobs,
    /// How long an agent may take to answer one request before its guest is dropped.
    pub request_timeout: Duration,
    /// What one user's VM processes may register at once.
    pub user_limits: UserLimits,
    /// Raise the host's `vm.max_map_count` to at least this at start (root only), so that
    /// guests with scattered duplicates can be merged beyond the default 65 530 mappings
    /// per VM process. Never lowered, not restored at exit (running VMs' mappings count
    /// against it).
    pub max_map_count: Option<u64>,
    /// Which users' VMs may share which group (by default, none: every group is private
    /// to its uid).
    pub share_policy: SharePolicy,
    /// Who may connect to the agents' socket (by default its owner only, 0600); with
    /// access for others, the run directory is made 0711 so that they can reach it.
    pub socket_access: SocketAccess,
    /// Concurrent scan rounds (`Engine::scan_round_concurrent`) instead of one agent
    /// request at a time.
    pub concurrent_scan: bool,
}

/// A daemon that is set up (lock held, socket bound) but not yet scanning.
pub struct Daemon {
    cfg: DaemonConfig,
    _lock: std::fs::File,
    listener: UnixListener,
    rx: Receiver<Cmd>,
    tx: Sender<Cmd>,
}

/// Raises `vm.max_map_count` to `want` (if lower) and says what it did: the setting is
/// host-wide, so it is logged at info level with the old value.
fn raise_map_limit(want: u64) -> Result<(), DaemonError> {
    use tinyvmm_sys::vm_limits;
    match vm_limits::raise_max_map_count(want)? {
        Some(old) => tracing::info!(
            "raised vm.max_map_count from {old} to {want} (host-wide; each mapping a merge \
             creates costs about 256 bytes of kernel memory)"
        ),
        None => tracing::info!(
            "vm.max_map_count is {}, at least the {want} asked for",
            vm_limits::max_map_count()?
        ),
    }
    Ok(())
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
    /// Takes the lock and binds the socket (mode 0600, or as `socket_access` says).
    pub fn bind(cfg: DaemonConfig) -> Result<Self, DaemonError> {
        cfg.knobs.validate()?;
        let dir = cfg
            .socket
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let dir_mode = if cfg.socket_access.shared() {
            0o711
        } else {
            0o700
        };
        tinyvmm_sys::dir::ensure_private_dir_mode(&dir, dir_mode)?;
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
        if let Some(want) = cfg.max_map_count {
            raise_map_limit(want)?;
        }
        // We hold the lock: any socket file left there is stale.
        let _ = std::fs::remove_file(&cfg.socket);
        let listener = tinyvmm_sys::socket::bind_unix(&cfg.socket, &cfg.socket_access)
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
        fleet.limits = self.cfg.user_limits;
        fleet.policy = self.cfg.share_policy.clone();
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
            let report = if self.cfg.concurrent_scan {
                engine.scan_round_concurrent(&mut fleet)
            } else {
                engine.scan_round(&mut fleet)
            };
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
            // up to 32 × the knob (at least 200 ms, at most 1 s; from 1 ms with the knob
            // at 0, so 8 doublings reach 200 ms). Writes are still all caught — the dirty
            // log keeps them — just noticed later. Any work resets it.
            const IDLE_PAGES: u64 = 64;
            let idle = report.pages_visited <= IDLE_PAGES
                && report.merges == 0
                && report.splits == 0
                && report.zero_reclaimed == 0;
            idle_streak = if idle { (idle_streak + 1).min(8) } else { 0 };
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

/// Finds agents that hung up while idle: agents only speak when asked, so a readable (or
/// hung-up) socket between requests means the VM process is gone.
fn reap(engine: &mut Engine, fleet: &mut Fleet) {
    for (id, conn) in &fleet.conns {
        if fleet.busy(*id) {
            continue; // its worker is in an exchange: the socket is not idle
        }
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

pub(crate) fn remove_dead(engine: &mut Engine, fleet: &mut Fleet) {
    let mut dead = std::mem::take(&mut fleet.dead);
    dead.sort_unstable();
    dead.dedup();
    let mut removed = false;
    for id in dead {
        fleet.agent_stats.remove(&id);
        let Some(conn) = fleet.disconnect(id) else {
            continue;
        };
        let holds_frames = engine
            .guest_counters(id)
            .is_some_and(|g| g.merging_pages > 0);
        if conn.process.exited() || !holds_frames {
            // Gone, or no page of it maps a frame of ours: nothing to keep for it (a VM
            // process that registers and hangs up over and over leaves nothing behind).
            tracing::info!(
                guest = id.0,
                pid = conn.process.pid(),
                "guest left; dropping its references"
            );
            let _ = engine.remove_guest(id, fleet);
            removed = true;
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
        removed = true;
    }
    // Only a guest leaving can empty a share group: no work after rounds where none did.
    if removed {
        fleet.close_unused_pools(&engine.guests());
    }
}

/// Applies one command on the scanner thread; returns whether the scanner should wake up
/// now.
pub(crate) fn handle(cmd: Cmd, engine: &mut Engine, fleet: &mut Fleet) -> bool {
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
            let res = engine.set_knobs(upd, fleet);
            remove_dead(engine, fleet);
            let _ = reply.send(res.map(|_| snapshot(engine, fleet, false)));
            true
        }
    }
}
