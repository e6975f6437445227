//! `tinyvmm bench density`: N guests with a chosen memory profile, run three times on the
//! same machine — no merging, the kernel's KSM (`MADV_MERGEABLE` + ksmd), and tinyvmm's
//! merge daemon — with the same `pages_to_scan` and `sleep_millisecs`, sampling host memory,
//! pages saved and merger CPU over time. Every guest verifies all its memory at the end: a
//! failed verify fails the benchmark.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use super::plot::{line_chart, PlotError, Series};
use crate::fleet::guest::{field, GuestError, GuestProc};
use crate::fleet::procfs::{self, KsmGuard};
use crate::fleet::sleep_unless_terminating;
use tinyvmm_api::client::{ApiClient, ClientError};
use tinyvmm_guests::content::Layout;
use tinyvmm_merge::{KnobsUpdate, RunMode};

/// Why `bench density` failed.
#[derive(Debug, thiserror::Error)]
pub enum DensityError {
    /// Kernel KSM cannot be driven here (the kernel mode is skipped).
    #[error("kernel KSM needs root and /sys/kernel/mm/ksm ({0}); skipped")]
    NoKernelKsm(#[source] std::io::Error),
    /// A kernel KSM knob could not be written.
    #[error("cannot set /sys/kernel/mm/ksm/{knob}: {source}")]
    KernelKnob {
        /// The knob.
        knob: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The output or run directory, or a file in it, could not be written.
    #[error("{}: {source}", path.display())]
    Output {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The benchmark runs this binary's `tinyvmm run` and `tinyvmm merged`.
    #[error("cannot find the tinyvmm binary: {0}")]
    NoExe(#[source] std::io::Error),
    /// The merge daemon could not be started.
    #[error("cannot start the merge daemon: {0}")]
    StartDaemon(#[source] std::io::Error),
    /// The merge daemon's sockets did not appear.
    #[error("the merge daemon did not come up")]
    DaemonDidNotStart,
    /// The merge daemon's API failed or refused a request.
    #[error(transparent)]
    Api(#[from] ClientError),
    /// A guest process could not be started.
    #[error("cannot start a guest: {0}")]
    SpawnGuest(#[source] std::io::Error),
    /// A guest did not answer as expected, or its memory failed to verify.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// A guest process ended with a failure status.
    #[error("a guest exited with {0}")]
    GuestExit(std::process::ExitStatus),
    /// SIGINT/SIGTERM.
    #[error("interrupted")]
    Interrupted,
    /// A chart could not be drawn.
    #[error(transparent)]
    Plot(#[from] PlotError),
    /// The samples could not be encoded.
    #[error("cannot encode the samples: {0}")]
    Encode(#[from] serde_json::Error),
}

impl From<tinyvmm_sys::signals::Interrupted> for DensityError {
    fn from(_: tinyvmm_sys::signals::Interrupted) -> Self {
        DensityError::Interrupted
    }
}

fn kernel_knob(knob: &'static str, value: u64) -> Result<(), DensityError> {
    procfs::ksm_write(knob, value).map_err(|source| DensityError::KernelKnob { knob, source })
}

fn send(g: &mut GuestProc, cmd: &str) -> Result<(), GuestError> {
    g.send(cmd).map_err(|source| GuestError::Send {
        pid: g.pid(),
        source,
    })
}

/// Options of `bench density`.
#[derive(Args, Debug, Clone)]
pub struct DensityArgs {
    /// Guests per mode.
    #[arg(long, default_value_t = 4)]
    pub guests: u32,
    /// RAM per guest (the fill covers all of it but the guest kernel's own pages).
    #[arg(long, default_value = "128M", value_parser = crate::size::parse_size)]
    pub mem: u64,
    /// Percent of pages identical across guests.
    #[arg(long, default_value_t = 60)]
    pub shared_pct: u32,
    /// Percent of zero pages.
    #[arg(long, default_value_t = 20)]
    pub zero_pct: u32,
    /// Pages per ms each guest rewrites while merging runs (0: none).
    #[arg(long, default_value_t = 0)]
    pub churn: u32,
    /// Scanner pages per wake-up, for both ksmd and tinyvmm.
    #[arg(long, default_value_t = 1000)]
    pub pages_to_scan: u32,
    /// Scanner sleep between wake-ups, ms, for both.
    #[arg(long, default_value_t = 20)]
    pub sleep_ms: u32,
    /// Longest wait for convergence per mode, seconds.
    #[arg(long, default_value_t = 20)]
    pub converge_s: u64,
    /// Idle window after convergence over which the merger's CPU is measured, seconds.
    #[arg(long, default_value_t = 5)]
    pub idle_s: u64,
    /// Modes to run, in order.
    #[arg(long, value_delimiter = ',', default_value = "none,kernel,tinyvmm")]
    pub modes: Vec<Mode>,
    /// Where the JSON and SVG files go.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Guest kernel (default: the built-in test guest; its workloads drive the benchmark).
    #[arg(long, default_value = "builtin")]
    pub kernel: String,
    /// Repeat for 1, 2, 4, 8, 16 guests and plot memory per guest against N.
    #[arg(long)]
    pub sweep: bool,
    /// Where the shared content sits in each guest, one run per layout given: `same`
    /// (the same address in every guest, the kindest layout), `shuffled` (a per-guest
    /// permutation of pages, as page cache is), `clustered` (runs of `--run` pages, each
    /// at a per-guest address).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "same")]
    pub layout: Vec<LayoutArg>,
    /// Pages per run of `--layout clustered`.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub run: u64,
}

/// `--layout`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutArg {
    /// Shared content at the same guest-physical address in every guest.
    Same,
    /// Shared content at a per-guest permutation of page addresses.
    Shuffled,
    /// Shared content in runs of `--run` pages, each run at a per-guest address.
    Clustered,
}

impl LayoutArg {
    fn layout(self, run: u64) -> Layout {
        match self {
            LayoutArg::Same => Layout::Same,
            LayoutArg::Shuffled => Layout::Shuffled,
            LayoutArg::Clustered => Layout::Clustered { run },
        }
    }
}

/// A layout's name in reports and file names: `same`, `shuffled`, `clustered16`.
fn layout_name(l: Layout) -> String {
    match l {
        Layout::Same => "same".into(),
        Layout::Shuffled => "shuffled".into(),
        Layout::Clustered { run } => format!("clustered{run}"),
    }
}

/// A merging mode.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No merging.
    None,
    /// The kernel's KSM.
    Kernel,
    /// tinyvmm's merge daemon.
    Tinyvmm,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Kernel => "kernel",
            Mode::Tinyvmm => "tinyvmm",
        }
    }
}

/// One sample of a mode's run, `t` seconds after merging was switched on.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t: f64,
    /// Sum of the guests' Pss, bytes.
    pub guests_pss: u64,
    /// MemTotal − MemAvailable, minus the same before the guests started, bytes.
    pub host_used: i64,
    /// Pages the merger reports saved (kernel: pages_sharing; tinyvmm: pages_sharing +
    /// zero_pages).
    pub pages_saved: u64,
    /// Merger CPU seconds since merging was switched on.
    pub merger_cpu_s: f64,
}

/// What one mode measured.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub mode: Mode,
    /// Where the shared content sits (`same`, `shuffled`, `clustered16`, ...).
    pub layout: String,
    pub guests: u32,
    pub samples: Vec<Sample>,
    pub start_pss: u64,
    pub final_pss: u64,
    pub t90_s: Option<f64>,
    pub t100_s: Option<f64>,
    pub converge_cpu_s: f64,
    pub pages_saved: u64,
    pub cpu_us_per_saved_page: Option<f64>,
    pub idle_cpu_pct: f64,
    pub write_p50_ns: Option<u64>,
    pub write_p99_ns: Option<u64>,
    /// tinyvmm: how long the agents kept pages write-protected per batch (the longest a
    /// guest write could wait), median of the guests' medians and the worst p99.
    pub protect_p50_ns: Option<u64>,
    pub protect_p99_ns: Option<u64>,
    /// Memory of the merger itself (tinyvmm: the daemon's Pss, engine metadata included).
    pub merger_overhead_bytes: u64,
    /// One copy of the shared pages plus every guest's unique pages, bytes (the fill only).
    pub physical_limit_bytes: u64,
    pub verified_pages: u64,
    pub skipped: Option<String>,
}

fn mem_available() -> i64 {
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
enum Merger {
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
    },
}

impl Merger {
    fn start(mode: Mode, a: &DensityArgs, run_dir: &Path) -> Result<Self, DensityError> {
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
                let daemon = Command::new(exe)
                    .env("TINYVMM_RUN_DIR", run_dir)
                    .args(["merged", "--run", "0"])
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
                })
            }
        }
    }

    fn guest_args(&self) -> Vec<String> {
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

    fn cpu(&self, guests: &[GuestProc]) -> Duration {
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

    fn enable(&mut self, guests: &[GuestProc]) -> Result<(), DensityError> {
        let now = self.cpu(guests);
        match self {
            Merger::None => Ok(()),
            Merger::Kernel { cpu0, .. } => {
                *cpu0 = now;
                kernel_knob("run", 1)
            }
            Merger::Tinyvmm { api, cpu0, .. } => {
                *cpu0 = now;
                api.patch_ksm(&KnobsUpdate {
                    run: Some(RunMode::Run),
                    ..KnobsUpdate::default()
                })?;
                Ok(())
            }
        }
    }

    fn cpu_since_enable(&self, guests: &[GuestProc]) -> f64 {
        let base = match self {
            Merger::None => Duration::ZERO,
            Merger::Kernel { cpu0, .. } | Merger::Tinyvmm { cpu0, .. } => *cpu0,
        };
        self.cpu(guests).saturating_sub(base).as_secs_f64()
    }

    fn pages_saved(&self) -> u64 {
        match self {
            Merger::None => 0,
            Merger::Kernel { .. } => procfs::ksm_read("pages_sharing").unwrap_or(0),
            // A sample the daemon cannot answer counts as nothing saved (and says so).
            Merger::Tinyvmm { api, .. } => match api.ksm() {
                Ok(s) => s.counters.pages_sharing + s.counters.zero_pages,
                Err(e) => {
                    eprintln!("  tinyvmm: no sample: {e}");
                    0
                }
            },
        }
    }

    /// Write-protection stalls reported by the agents: (median p50, max p99).
    fn protect_stalls(&self) -> Option<(u64, u64)> {
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
        let mut p50: Vec<f64> = guests
            .iter()
            .map(|g| g.agent.protect_p50_ns as f64)
            .collect();
        let p99 = guests.iter().map(|g| g.agent.protect_p99_ns).max()?;
        Some((super::median(&mut p50) as u64, p99))
    }

    fn overhead(&self) -> u64 {
        match self {
            Merger::Tinyvmm { daemon, .. } => procfs::pss_bytes(daemon.id()).unwrap_or(0),
            _ => 0,
        }
    }
}

impl Drop for Merger {
    fn drop(&mut self) {
        if let Merger::Tinyvmm { daemon, .. } = self {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}

fn pss_sum(guests: &[GuestProc]) -> u64 {
    guests
        .iter()
        .filter_map(|g| procfs::pss_bytes(g.pid()))
        .sum()
}

fn run_mode(
    mode: Mode,
    a: &DensityArgs,
    n: u32,
    layout: Layout,
) -> Result<ModeResult, DensityError> {
    let run_dir = a
        .out
        .join(format!("run-{}-{}-{n}", mode.name(), layout_name(layout)));
    let mut result = ModeResult {
        mode,
        layout: layout_name(layout),
        guests: n,
        samples: vec![],
        start_pss: 0,
        final_pss: 0,
        t90_s: None,
        t100_s: None,
        converge_cpu_s: 0.0,
        pages_saved: 0,
        cpu_us_per_saved_page: None,
        idle_cpu_pct: 0.0,
        write_p50_ns: None,
        write_p99_ns: None,
        protect_p50_ns: None,
        protect_p99_ns: None,
        merger_overhead_bytes: 0,
        physical_limit_bytes: 0,
        verified_pages: 0,
        skipped: None,
    };
    let mut merger = match Merger::start(mode, a, &run_dir) {
        Ok(m) => m,
        Err(e) if mode == Mode::Kernel => {
            eprintln!("  kernel: {e}");
            result.skipped = Some(e.to_string());
            return Ok(result);
        }
        Err(e) => return Err(e),
    };
    let base_used = mem_available();
    let exe = std::env::current_exe().map_err(DensityError::NoExe)?;
    let mut guests = Vec::new();
    for i in 0..n {
        let cmdline = format!(
            "console=ttyS0 reboot=k panic=-1 workload=fill,serve seed=1 guest_seed={} shared_pct={} zero_pct={} {}",
            1000 + i,
            a.shared_pct,
            a.zero_pct,
            layout.cmdline()
        );
        let mut args = vec![
            "--kernel".to_string(),
            a.kernel.clone(),
            "--mem".into(),
            format!("{}K", a.mem / 1024),
            "--cmdline".into(),
            cmdline,
        ];
        args.extend(merger.guest_args());
        let log = run_dir.join(format!("guest{i}.log"));
        let _ = std::fs::create_dir_all(&run_dir);
        guests.push(GuestProc::spawn(&exe, &args, Some(&log)).map_err(DensityError::SpawnGuest)?);
    }
    let (mut shared, mut unique) = (0u64, 0u64);
    for g in guests.iter_mut() {
        let line = g.wait_line("FILL done", Duration::from_secs(300))?;
        shared = field(&line, "shared").unwrap_or(0);
        unique += field(&line, "unique").unwrap_or(0);
        g.wait_line("SERVE ready", Duration::from_secs(60))?;
    }
    result.physical_limit_bytes = (shared + unique) * 4096;

    // Merging on.
    result.start_pss = pss_sum(&guests);
    merger.enable(&guests)?;
    let t0 = Instant::now();
    if a.churn > 0 {
        for g in guests.iter_mut() {
            send(g, &format!("churn {} {}", a.churn, a.converge_s * 1000))?;
        }
    }
    let mut last_change = Instant::now();
    let mut last_saved = 0;
    loop {
        sleep_unless_terminating(Duration::from_millis(250))?;
        let saved = merger.pages_saved();
        let s = Sample {
            t: t0.elapsed().as_secs_f64(),
            guests_pss: pss_sum(&guests),
            host_used: mem_available() - base_used,
            pages_saved: saved,
            merger_cpu_s: merger.cpu_since_enable(&guests),
        };
        result.samples.push(s);
        if saved != last_saved {
            last_saved = saved;
            last_change = Instant::now();
        }
        let quiet = last_change.elapsed() > Duration::from_secs(3);
        let timeout = t0.elapsed() > Duration::from_secs(a.converge_s);
        if (mode == Mode::None && t0.elapsed() > Duration::from_secs(2))
            || (quiet && saved > 0 && a.churn == 0)
            || timeout
        {
            break;
        }
    }
    if a.churn > 0 {
        for g in guests.iter_mut() {
            g.wait_line("CHURN done", Duration::from_secs(a.converge_s + 60))?;
            g.wait_line("SERVE ready", Duration::from_secs(30))?;
        }
    }
    let last = result.samples.last().cloned();
    result.final_pss = last.as_ref().map_or(0, |s| s.guests_pss);
    result.pages_saved = last.as_ref().map_or(0, |s| s.pages_saved);
    let final_savings = result.start_pss.saturating_sub(result.final_pss) as f64;
    let first_reaching = |frac: f64| {
        result
            .samples
            .iter()
            .find(|s| result.start_pss.saturating_sub(s.guests_pss) as f64 >= frac * final_savings)
            .map(|s| s.t)
    };
    if final_savings > 0.0 && mode != Mode::None {
        result.t90_s = first_reaching(0.9);
        result.t100_s = first_reaching(0.995);
    }
    // Merger CPU until convergence (the last sample when it did not converge).
    let converged_at = result.t100_s.or(last.as_ref().map(|s| s.t));
    result.converge_cpu_s = converged_at
        .and_then(|t| result.samples.iter().find(|s| s.t >= t))
        .map_or(0.0, |s| s.merger_cpu_s);
    if result.pages_saved > 0 {
        result.cpu_us_per_saved_page =
            Some(result.converge_cpu_s * 1e6 / result.pages_saved as f64);
    }

    // Idle window: nobody writes, the merger keeps running.
    let c0 = merger.cpu_since_enable(&guests);
    let w0 = Instant::now();
    sleep_unless_terminating(Duration::from_secs(a.idle_s))?;
    let idle = merger.cpu_since_enable(&guests) - c0;
    result.idle_cpu_pct = 100.0 * idle / w0.elapsed().as_secs_f64();
    result.merger_overhead_bytes = merger.overhead();
    if let Some((p50, p99)) = merger.protect_stalls() {
        result.protect_p50_ns = Some(p50);
        result.protect_p99_ns = Some(p99);
    }

    // Guest-visible latency of first writes after merging (most pages are merged now).
    let (mut p50s, mut p99) = (Vec::new(), 0u64);
    for g in guests.iter_mut() {
        send(g, "churn 2 200")?;
    }
    for g in guests.iter_mut() {
        let line = g.wait_line("CHURN done", Duration::from_secs(60))?;
        g.wait_line("SERVE ready", Duration::from_secs(30))?;
        if let Some(v) = field(&line, "lat_p50_ns") {
            p50s.push(v as f64);
        }
        p99 = p99.max(field(&line, "lat_p99_ns").unwrap_or(0));
    }
    result.write_p50_ns = (!p50s.is_empty()).then(|| super::median(&mut p50s) as u64);
    result.write_p99_ns = Some(p99);

    // Every guest checks every page.
    for g in guests.iter_mut() {
        result.verified_pages += g.verify(Duration::from_secs(120))?;
    }
    for g in guests {
        let st = g.exit(Duration::from_secs(20))?;
        if !st.success() {
            return Err(DensityError::GuestExit(st));
        }
    }
    drop(merger);
    Ok(result)
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}{unit}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
        _ => "-".into(),
    }
}

fn report(results: &[ModeResult], a: &DensityArgs) {
    let n = results.first().map_or(0, |r| r.guests);
    let layout = results.first().map_or("", |r| r.layout.as_str());
    println!(
        "\ntinyvmm bench density: {n} guests × {} MiB, layout {layout}, {}% shared, {}% zero, churn {} pages/ms, pages_to_scan {}, sleep {} ms",
        a.mem >> 20,
        a.shared_pct,
        a.zero_pct,
        a.churn,
        a.pages_to_scan,
        a.sleep_ms
    );
    let none_pss = results
        .iter()
        .find(|r| r.mode == Mode::None)
        .map(|r| r.final_pss);
    println!(
        "{:<8} {:>12} {:>9} {:>8} {:>8} {:>9} {:>11} {:>9} {:>10} {:>10} {:>12}",
        "mode",
        "MiB/guest",
        "savings",
        "t90 s",
        "t100 s",
        "CPU s",
        "µs/page",
        "idle CPU",
        "write p50",
        "write p99",
        "merger MiB"
    );
    for r in results {
        if let Some(why) = &r.skipped {
            println!("{:<8} skipped: {why}", r.mode.name());
            continue;
        }
        let savings = none_pss
            .filter(|b| *b > 0)
            .map(|b| 100.0 * (1.0 - r.final_pss as f64 / b as f64));
        println!(
            "{:<8} {:>12.1} {:>9} {:>8} {:>8} {:>9.2} {:>11} {:>8.2}% {:>8}ns {:>8}ns {:>12.1}",
            r.mode.name(),
            mib(r.final_pss) / f64::from(r.guests.max(1)),
            opt(savings, "%"),
            opt(r.t90_s, ""),
            opt(r.t100_s, ""),
            r.converge_cpu_s,
            opt(r.cpu_us_per_saved_page, ""),
            r.idle_cpu_pct,
            r.write_p50_ns.unwrap_or(0),
            r.write_p99_ns.unwrap_or(0),
            mib(r.merger_overhead_bytes),
        );
    }
    for r in results {
        if let (Some(p50), Some(p99)) = (r.protect_p50_ns, r.protect_p99_ns) {
            println!(
                "{}: pages write-protected per merge batch (a guest write waits at most this): p50 {:.1} µs, p99 {:.1} µs",
                r.mode.name(),
                p50 as f64 / 1e3,
                p99 as f64 / 1e3
            );
        }
    }
    if let Some(limit) = results.first().map(|r| r.physical_limit_bytes) {
        println!(
            "physical limit (one copy of shared + all unique fill pages): {:.1} MiB total",
            mib(limit)
        );
    }
    let k = results
        .iter()
        .find(|r| r.mode == Mode::Kernel && r.skipped.is_none());
    let t = results.iter().find(|r| r.mode == Mode::Tinyvmm);
    if let (Some(k), Some(t)) = (k, t) {
        println!("ratios tinyvmm/kernel (measured in this run):");
        println!(
            "  memory            {}",
            ratio(Some(t.final_pss as f64), Some(k.final_pss as f64))
        );
        println!(
            "  pages saved       {}",
            ratio(Some(t.pages_saved as f64), Some(k.pages_saved as f64))
        );
        println!("  time to 90%       {}", ratio(t.t90_s, k.t90_s));
        println!(
            "  CPU per page      {}",
            ratio(t.cpu_us_per_saved_page, k.cpu_us_per_saved_page)
        );
        println!(
            "  idle CPU          {}",
            ratio(Some(t.idle_cpu_pct), Some(k.idle_cpu_pct))
        );
    }
}

fn plots(results: &[ModeResult], out: &Path, layout: &str) -> Result<(), PlotError> {
    let mem: Vec<Series> = results
        .iter()
        .filter(|r| r.skipped.is_none())
        .map(|r| Series {
            name: r.mode.name(),
            points: r.samples.iter().map(|s| (s.t, mib(s.guests_pss))).collect(),
        })
        .collect();
    line_chart(
        &out.join(format!("memory-{layout}.svg")),
        &format!("Guest memory on the host (sum of Pss), layout {layout}"),
        "seconds since merging started",
        "MiB",
        &mem,
    )?;
    let saved: Vec<Series> = results
        .iter()
        .filter(|r| r.skipped.is_none() && r.mode != Mode::None)
        .map(|r| Series {
            name: r.mode.name(),
            points: r
                .samples
                .iter()
                .map(|s| (s.t, s.pages_saved as f64))
                .collect(),
        })
        .collect();
    line_chart(
        &out.join(format!("pages_saved-{layout}.svg")),
        &format!("Pages saved (pages_sharing, + zero_pages for tinyvmm), layout {layout}"),
        "seconds since merging started",
        "pages",
        &saved,
    )
}

pub fn run(a: DensityArgs) -> Result<(), DensityError> {
    std::fs::create_dir_all(&a.out).map_err(|source| DensityError::Output {
        path: a.out.clone(),
        source,
    })?;
    let counts: Vec<u32> = if a.sweep {
        vec![1, 2, 4, 8, 16]
    } else {
        vec![a.guests]
    };
    let mut all = Vec::new();
    for layout in a.layout.iter().map(|l| l.layout(a.run)) {
        let mut per_layout = Vec::new();
        for &n in &counts {
            let mut results = Vec::new();
            for &mode in &a.modes {
                eprintln!(
                    "== {} guests, layout {}, mode {}",
                    n,
                    layout_name(layout),
                    mode.name()
                );
                results.push(run_mode(mode, &a, n, layout)?);
            }
            report(&results, &a);
            if n == *counts.last().unwrap_or(&n) || !a.sweep {
                plots(&results, &a.out, &layout_name(layout))?;
            }
            per_layout.push(results);
        }
        if a.sweep {
            let mut series = Vec::new();
            for &mode in &a.modes {
                let points: Vec<(f64, f64)> = per_layout
                    .iter()
                    .flatten()
                    .filter(|r| r.mode == mode && r.skipped.is_none())
                    .map(|r| (f64::from(r.guests), mib(r.final_pss) / f64::from(r.guests)))
                    .collect();
                series.push(Series {
                    name: mode.name(),
                    points,
                });
            }
            line_chart(
                &a.out.join(format!("density-{}.svg", layout_name(layout))),
                &format!(
                    "Host memory per guest vs number of guests (layout {})",
                    layout_name(layout)
                ),
                "guests",
                "MiB per guest",
                &series,
            )?;
        }
        all.extend(per_layout);
    }
    let json = serde_json::to_string_pretty(&all)?;
    let path = a.out.join("density.json");
    std::fs::write(&path, json).map_err(|source| DensityError::Output { path, source })?;
    println!(
        "samples: {}/density.json, plots: {}/*.svg",
        a.out.display(),
        a.out.display()
    );
    Ok(())
}
