//! One mode on real guests: boot and fill them, switch merging on, sample memory, pages
//! saved and merger CPU until convergence, measure the idle merger and the guests' write
//! latency, then verify every page of every guest.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::merger::{mem_available, Merger};
use super::{layout_name, DensityArgs, DensityError, Mode};
use crate::fleet::guest::{field, GuestError, GuestProc};
use crate::fleet::procfs;
use crate::fleet::sleep_unless_terminating;
use tinyvmm_guests::content::Layout;

fn send(g: &mut GuestProc, cmd: &str) -> Result<(), GuestError> {
    g.send(cmd).map_err(|source| GuestError::Send {
        pid: g.pid(),
        source,
    })
}

/// How often the merger's counters, its CPU and the host's free memory are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Most of one core that reading the guests' Pss may take: `smaps_rollup` walks every
/// page table entry of a guest (tens of ms per GiB), and on this 2-core machine a sampler
/// taking more would slow a merger that works on both cores (tinyvmm's daemon and agents)
/// more than one that works on one (ksmd), so the guests' Pss is read at most this often
/// relative to its cost, and at least every 250 ms.
pub(super) const PSS_SHARE: u32 = 20;

/// One sample of a mode's run, `t` seconds after merging was switched on.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t: f64,
    /// Sum of the guests' Pss, bytes (only in the samples where it was read: see
    /// [`PSS_SHARE`]).
    pub guests_pss: Option<u64>,
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
    /// Time to 90 % (t100: 99.5 %) of the pages the merger reports saved at the end.
    pub t90_s: Option<f64>,
    pub t100_s: Option<f64>,
    /// What one reading of every guest's Pss took (the sampler's own cost), ms, median.
    pub pss_read_ms: Option<f64>,
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
    /// Memory of the merger itself: tinyvmm: the daemon's Pss (engine metadata included)
    /// plus the kernel memory of the mappings merging made; kernel: KSM's rmap items.
    pub merger_overhead_bytes: u64,
    /// tinyvmm: mappings (VMAs) merging added to the guests' processes.
    pub merge_mappings: Option<u64>,
    /// tinyvmm: the kernel memory those mappings hold, bytes (in `merger_overhead_bytes`).
    pub merge_mappings_bytes: Option<u64>,
    /// tinyvmm: the host's `vm.max_map_count` during the run.
    pub max_map_count: Option<u64>,
    /// tinyvmm: what `vm.max_map_count` was before its daemon raised it for the run.
    pub max_map_count_raised_from: Option<u64>,
    /// One copy of the shared pages plus every guest's unique pages, bytes (the fill only).
    pub physical_limit_bytes: u64,
    pub verified_pages: u64,
    pub skipped: Option<String>,
}

/// How long a guest may take to fill or verify all its RAM: 2 minutes plus 2 minutes per
/// GiB, enough on a busy 2-core host (fills ran at 19 MB/s under a load of 14).
fn per_guest_wait(mem: u64) -> Duration {
    Duration::from_secs(120 + 120 * mem.div_ceil(1 << 30))
}

fn pss_sum(guests: &[GuestProc]) -> u64 {
    guests
        .iter()
        .filter_map(|g| procfs::pss_bytes(g.pid()))
        .sum()
}

pub(super) fn run_mode(
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
        pss_read_ms: None,
        converge_cpu_s: 0.0,
        pages_saved: 0,
        cpu_us_per_saved_page: None,
        idle_cpu_pct: 0.0,
        write_p50_ns: None,
        write_p99_ns: None,
        protect_p50_ns: None,
        protect_p99_ns: None,
        merger_overhead_bytes: 0,
        merge_mappings: None,
        merge_mappings_bytes: None,
        max_map_count: None,
        max_map_count_raised_from: None,
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
    // With --free-pct, the guests release pages after the fill: tinyvmm's report them
    // through a balloon, the other modes' keep them on the host.
    let report_free = mode == Mode::Tinyvmm;
    let free = if a.free_pct > 0 {
        format!(
            "workload=fill,free,serve free_pct={} free_report={}",
            a.free_pct,
            u8::from(report_free)
        )
    } else {
        "workload=fill,serve".to_string()
    };
    for i in 0..n {
        let cmdline = format!(
            "console=ttyS0 reboot=k panic=-1 {free} seed=1 guest_seed={} shared_pct={} zero_pct={} {}",
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
        if a.free_pct > 0 && report_free {
            args.push("--balloon".into());
        }
        let log = run_dir.join(format!("guest{i}.log"));
        let _ = std::fs::create_dir_all(&run_dir);
        guests.push(GuestProc::spawn(&exe, &args, Some(&log)).map_err(DensityError::SpawnGuest)?);
    }
    let (mut shared, mut unique, mut fill_pages) = (0u64, 0u64, 0u64);
    for g in guests.iter_mut() {
        let line = g.wait_line("FILL done", per_guest_wait(a.mem))?;
        shared = field(&line, "shared").unwrap_or(0);
        unique += field(&line, "unique").unwrap_or(0);
        fill_pages = field(&line, "pages").unwrap_or(0);
        if a.free_pct > 0 {
            g.wait_line("FREE done", per_guest_wait(a.mem))?;
        }
        g.wait_line("SERVE ready", Duration::from_secs(60))?;
    }
    result.physical_limit_bytes = if a.free_pct > 0 {
        let p = tinyvmm_guests::content::FillParams {
            seed: 1,
            guest_seed: 1000,
            shared_pct: u64::from(a.shared_pct),
            zero_pct: u64::from(a.zero_pct),
            layout,
        };
        let seeds: Vec<u64> = (0..u64::from(n)).map(|i| 1000 + i).collect();
        tinyvmm_guests::content::pages_needed_after_free(&p, &seeds, fill_pages, a.free_pct) * 4096
    } else {
        (shared + unique) * 4096
    };

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
    let mut scans_at_change = merger.progress().1;
    let mut pss_costs = Vec::new();
    let mut pss_due = Instant::now();
    loop {
        sleep_unless_terminating(SAMPLE_EVERY)?;
        let (saved, scans) = merger.progress();
        let t = t0.elapsed().as_secs_f64();
        let merger_cpu_s = merger.cpu_since_enable(&guests);
        let host_used = mem_available() - base_used;
        let guests_pss = (Instant::now() >= pss_due).then(|| {
            let r = Instant::now();
            let pss = pss_sum(&guests);
            let cost = r.elapsed();
            pss_costs.push(cost.as_secs_f64() * 1e3);
            pss_due = Instant::now() + (cost * PSS_SHARE).max(Duration::from_millis(250));
            pss
        });
        result.samples.push(Sample {
            t,
            guests_pss,
            host_used,
            pages_saved: saved,
            merger_cpu_s,
        });
        if saved != last_saved {
            last_saved = saved;
            last_change = Instant::now();
            scans_at_change = scans;
        }
        // Converged: nothing new saved for 3 s and over two whole passes of the scanner
        // (ksmd merges a page only on the pass after the one that found its checksum
        // stable, so a pause within a pass is not convergence).
        let quiet = last_change.elapsed() > Duration::from_secs(3)
            && scans.is_none_or(|n| n >= scans_at_change.unwrap_or(0) + 2);
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
    // The final memory is read once more, after convergence.
    let last = result.samples.last().cloned();
    result.final_pss = pss_sum(&guests);
    result.pss_read_ms = (!pss_costs.is_empty()).then(|| crate::bench::median(&mut pss_costs));
    result.pages_saved = last.as_ref().map_or(0, |s| s.pages_saved);
    // Times to 90 % and 99.5 % of the final savings, from the merger's own count (read
    // every 100 ms at no cost to the merger, where the Pss is read far less often); the
    // memory the savings stand for is the final Pss, read from the kernel.
    let first_reaching = |frac: f64| {
        result
            .samples
            .iter()
            .find(|s| s.pages_saved as f64 >= frac * result.pages_saved as f64)
            .map(|s| s.t)
    };
    if result.pages_saved > 0 && mode != Mode::None {
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
    result.merge_mappings = merger.merge_mappings(&guests);
    result.merge_mappings_bytes = result
        .merge_mappings
        .map(|m| m * procfs::vma_kernel_bytes());
    result.merger_overhead_bytes = merger.overhead() + result.merge_mappings_bytes.unwrap_or(0);
    if let Some(l) = merger.map_limit() {
        result.max_map_count = Some(l.now);
        result.max_map_count_raised_from = l.raised_from;
    }
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
    result.write_p50_ns = (!p50s.is_empty()).then(|| crate::bench::median(&mut p50s) as u64);
    result.write_p99_ns = Some(p99);

    // Every guest checks every page.
    for g in guests.iter_mut() {
        result.verified_pages += g.verify(per_guest_wait(a.mem))?;
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
