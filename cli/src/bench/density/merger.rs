//! Each mode's merger: nothing, the kernel's KSM (knobs saved, set and restored), or a
//! tinyvmm merge daemon of its own in the run directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{DensityArgs, DensityError, Mode};
use crate::fleet::guest::GuestProc;
use crate::fleet::procfs::{self, KsmGuard, MapCountGuard};
use tinyvmm_api::client::ApiClient;
use tinyvmm_merge::{KnobsUpdate, RunMode};

fn kernel_knob(knob: &'static str, value: u64) -> Result<(), DensityError> {
    procfs::ksm_write(knob, value).map_err(|source| DensityError::KernelKnob { knob, source })
}

pub(super) fn mem_available() -> i64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |k: &str| -> i64 {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
            * 1024
    };
    get("MemTotal:") - get("MemAvailable:")
}

/// The merger of one mode.
pub(super) enum Merger {
    None,
    Kernel {
        _guard: KsmGuard,
        ksmd: Option<u32>,
        cpu0: Duration,
    },
    Tinyvmm {
        daemon: Child,
        api: ApiClient,
        socket: PathBuf,
        cpu0: Duration,
        /// The guests' mappings (VMAs) when merging was switched on.
        mappings0: u64,
        /// The host's `vm.max_map_count` for this run, and what it was before when the
        /// daemon raised it (restored by the guard, after the daemon and guests are gone).
        map_limit: MapLimit,
    },
}

/// `vm.max_map_count` during tinyvmm's run.
pub(super) struct MapLimit {
    /// The limit in force.
    pub now: u64,
    /// The value before the daemon raised it (restored on drop).
    pub raised_from: Option<u64>,
    _guard: Option<MapCountGuard>,
}

impl MapLimit {
    /// What `--max-map-count` asks of the daemon: the limit to raise to, if any. Raising
    /// needs root; without it the host's setting stays (and is reported).
    fn plan(a: &DensityArgs) -> (Option<u64>, Self) {
        let found = tinyvmm_sys::vm_limits::max_map_count()
            .unwrap_or(tinyvmm_sys::vm_limits::DEFAULT_MAX_MAP_COUNT);
        let want = a
            .max_map_count
            .unwrap_or(a.mem / 4096 + tinyvmm_sys::vm_limits::DEFAULT_MAX_MAP_COUNT);
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let keep = Self {
            now: found,
            raised_from: None,
            _guard: None,
        };
        if want <= found {
            return (None, keep);
        }
        if !root {
            eprintln!("  tinyvmm: not root: vm.max_map_count stays {found} (asked for {want})");
            return (None, keep);
        }
        match MapCountGuard::save() {
            Ok(g) => (
                Some(want),
                Self {
                    now: want,
                    raised_from: Some(g.saved()),
                    _guard: Some(g),
                },
            ),
            Err(e) => {
                eprintln!("  tinyvmm: {e}; vm.max_map_count stays {found}");
                (None, keep)
            }
        }
    }
}

impl Merger {
    pub(super) fn start(mode: Mode, a: &DensityArgs, run_dir: &Path) -> Result<Self, DensityError> {
        match mode {
            Mode::None => Ok(Merger::None),
            Mode::Kernel => {
                let guard = KsmGuard::new().map_err(DensityError::NoKernelKsm)?;
                kernel_knob("run", 0)?;
                kernel_knob("pages_to_scan", u64::from(a.pages_to_scan))?;
                kernel_knob("sleep_millisecs", u64::from(a.sleep_ms))?;
                Ok(Merger::Kernel {
                    _guard: guard,
                    ksmd: procfs::ksmd_pid(),
                    cpu0: Duration::ZERO,
                })
            }
            Mode::Tinyvmm => {
                let _ = std::fs::remove_dir_all(run_dir);
                std::fs::create_dir_all(run_dir).map_err(|source| DensityError::Output {
                    path: run_dir.to_path_buf(),
                    source,
                })?;
                let socket = run_dir.join("merged.sock");
                let api = run_dir.join("api.sock");
                let exe = std::env::current_exe().map_err(DensityError::NoExe)?;
                let log_path = run_dir.join("merged.log");
                let log =
                    std::fs::File::create(&log_path).map_err(|source| DensityError::Output {
                        path: log_path,
                        source,
                    })?;
                let (raise, map_limit) = MapLimit::plan(a);
                let mut cmd = Command::new(exe);
                cmd.args(["merged", "--run", "0"]);
                if let Some(n) = raise {
                    cmd.arg("--max-map-count").arg(n.to_string());
                }
                let daemon = cmd
                    .env("TINYVMM_RUN_DIR", run_dir)
                    .arg("--socket")
                    .arg(&socket)
                    .arg("--api-sock")
                    .arg(&api)
                    .arg("--pages-to-scan")
                    .arg(a.pages_to_scan.to_string())
                    .arg("--sleep-ms")
                    .arg(a.sleep_ms.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .map_err(DensityError::StartDaemon)?;
                let deadline = Instant::now() + Duration::from_secs(10);
                while !(socket.exists() && api.exists()) {
                    if Instant::now() > deadline {
                        return Err(DensityError::DaemonDidNotStart);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(Merger::Tinyvmm {
                    daemon,
                    api: ApiClient::new(&api)?,
                    socket,
                    cpu0: Duration::ZERO,
                    mappings0: 0,
                    map_limit,
                })
            }
        }
    }

    pub(super) fn guest_args(&self) -> Vec<String> {
        match self {
            Merger::None => vec![],
            Merger::Kernel { .. } => vec!["--share-memory=kernel".into()],
            Merger::Tinyvmm { socket, .. } => vec![
                "--share-memory".into(),
                "--merge-socket".into(),
                socket.display().to_string(),
                "--no-daemon-autostart".into(),
            ],
        }
    }

    pub(super) fn cpu(&self, guests: &[GuestProc]) -> Duration {
        match self {
            Merger::None => Duration::ZERO,
            Merger::Kernel { ksmd, .. } => ksmd.and_then(procfs::process_cpu).unwrap_or_default(),
            Merger::Tinyvmm { daemon, .. } => {
                procfs::process_cpu(daemon.id()).unwrap_or_default()
                    + guests
                        .iter()
                        .map(|g| procfs::thread_cpu(g.pid(), "merge-agent"))
                        .sum::<Duration>()
            }
        }
    }

    pub(super) fn enable(&mut self, guests: &[GuestProc]) -> Result<(), DensityError> {
        let now = self.cpu(guests);
        match self {
            Merger::None => Ok(()),
            Merger::Kernel { cpu0, .. } => {
                *cpu0 = now;
                kernel_knob("run", 1)
            }
            Merger::Tinyvmm {
                api,
                cpu0,
                mappings0,
                ..
            } => {
                *cpu0 = now;
                *mappings0 = guest_mappings(guests);
                api.patch_ksm(&KnobsUpdate {
                    run: Some(RunMode::Run),
                    ..KnobsUpdate::default()
                })?;
                Ok(())
            }
        }
    }

    pub(super) fn cpu_since_enable(&self, guests: &[GuestProc]) -> f64 {
        let base = match self {
            Merger::None => Duration::ZERO,
            Merger::Kernel { cpu0, .. } | Merger::Tinyvmm { cpu0, .. } => *cpu0,
        };
        self.cpu(guests).saturating_sub(base).as_secs_f64()
    }

    /// Pages the merger reports saved (kernel: pages_sharing; tinyvmm: pages_sharing +
    /// zero_pages) and its completed passes over all guests (`full_scans`, `None` without
    /// a merger), from one reading of its counters.
    pub(super) fn progress(&self) -> (u64, Option<u64>) {
        match self {
            Merger::None => (0, None),
            Merger::Kernel { .. } => (
                procfs::ksm_read("pages_sharing").unwrap_or(0),
                procfs::ksm_read("full_scans"),
            ),
            // A sample the daemon cannot answer counts as nothing saved (and says so).
            Merger::Tinyvmm { api, .. } => match api.ksm() {
                Ok(s) => (
                    s.counters.pages_sharing + s.counters.zero_pages,
                    Some(s.counters.full_scans),
                ),
                Err(e) => {
                    eprintln!("  tinyvmm: no sample: {e}");
                    (0, None)
                }
            },
        }
    }

    /// Write-protection stalls reported by the agents: (median p50, max p99); `None` when
    /// no agent's statistics reached the daemon (they count their mappings in
    /// `/proc/self/maps`, which takes long with hundreds of thousands of them, and the
    /// daemon waits only so long for them).
    pub(super) fn protect_stalls(&self) -> Option<(u64, u64)> {
        let Merger::Tinyvmm { api, .. } = self else {
            return None;
        };
        let guests = match api.guests() {
            Ok(g) => g,
            Err(e) => {
                eprintln!("  tinyvmm: no write-protect statistics: {e}");
                return None;
            }
        };
        let guests: Vec<_> = guests
            .into_iter()
            .filter(|g| g.agent.protect_batches > 0)
            .collect();
        let mut p50: Vec<f64> = guests
            .iter()
            .map(|g| g.agent.protect_p50_ns as f64)
            .collect();
        let p99 = guests.iter().map(|g| g.agent.protect_p99_ns).max()?;
        Some((crate::bench::median(&mut p50) as u64, p99))
    }

    /// Memory the merger itself holds, bytes: for tinyvmm the daemon's Pss (engine
    /// metadata included; the caller adds the kernel memory of the mappings merging made,
    /// see [`Merger::merge_mappings`]), for the kernel KSM's own metadata (its rmap items).
    pub(super) fn overhead(&self) -> u64 {
        match self {
            Merger::None => 0,
            Merger::Kernel { .. } => procfs::ksm_metadata_bytes().unwrap_or(0),
            Merger::Tinyvmm { daemon, .. } => procfs::pss_bytes(daemon.id()).unwrap_or(0),
        }
    }

    /// Mappings (VMAs) that merging added to the guests' processes since it was switched
    /// on (tinyvmm only).
    pub(super) fn merge_mappings(&self, guests: &[GuestProc]) -> Option<u64> {
        match self {
            Merger::Tinyvmm { mappings0, .. } => {
                Some(guest_mappings(guests).saturating_sub(*mappings0))
            }
            _ => None,
        }
    }

    /// tinyvmm's `vm.max_map_count` for the run.
    pub(super) fn map_limit(&self) -> Option<&MapLimit> {
        match self {
            Merger::Tinyvmm { map_limit, .. } => Some(map_limit),
            _ => None,
        }
    }
}

fn guest_mappings(guests: &[GuestProc]) -> u64 {
    guests
        .iter()
        .map(|g| tinyvmm_sys::vm_limits::mappings(g.pid()))
        .sum()
}

impl Drop for Merger {
    fn drop(&mut self) {
        if let Merger::Tinyvmm { daemon, .. } = self {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}
