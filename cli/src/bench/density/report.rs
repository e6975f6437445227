//! The density benchmark's table, ratios and plots.

use std::path::Path;

use super::super::plot::{line_chart, PlotError, Series};
use super::limits::Limits;
use super::{DensityArgs, Mode, ModeResult};

pub(super) fn mib(b: u64) -> f64 {
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

pub(super) fn report(results: &[ModeResult], a: &DensityArgs, limits: Option<&Limits>) {
    let n = results.first().map_or(0, |r| r.guests);
    let layout = results.first().map_or("", |r| r.layout.as_str());
    println!(
        "\ntinyvmm bench density: {n} guests × {} MiB, layout {layout}, {}% shared, {}% zero, {}% freed, churn {} pages/ms, pages_to_scan {}, sleep {} ms",
        a.mem >> 20,
        a.shared_pct,
        a.zero_pct,
        a.free_pct,
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
    if let Some(ms) = results
        .iter()
        .filter_map(|r| r.pss_read_ms)
        .reduce(f64::max)
    {
        println!(
            "t90/t100: from the mergers' own counts of pages saved, read every 100 ms; the guests' Pss (MiB/guest) is read at most 1/{} of the time (one reading took up to {ms:.0} ms here, median per mode)",
            super::measure::PSS_SHARE
        );
    }
    for r in results {
        match (r.protect_p50_ns, r.protect_p99_ns) {
            (Some(p50), Some(p99)) => println!(
                "{}: pages write-protected per merge batch (a guest write waits at most this): p50 {:.1} µs, p99 {:.1} µs",
                r.mode.name(),
                p50 as f64 / 1e3,
                p99 as f64 / 1e3
            ),
            _ if r.mode == Mode::Tinyvmm => println!(
                "{}: write-protect statistics: none reached the daemon in time",
                r.mode.name()
            ),
            _ => {}
        }
    }
    for r in results {
        if let (Some(maps), Some(bytes), Some(limit)) =
            (r.merge_mappings, r.merge_mappings_bytes, r.max_map_count)
        {
            let raised = r.max_map_count_raised_from.map_or(String::new(), |old| {
                format!(", raised from {old} for this run")
            });
            println!(
                "{}: merging made {maps} mappings (VMAs) in the guests' processes, {:.1} MiB of kernel memory (counted in merger MiB); vm.max_map_count {limit}{raised}",
                r.mode.name(),
                mib(bytes),
            );
        }
    }
    let tinyvmm_limit = results
        .iter()
        .find(|r| r.mode == Mode::Tinyvmm)
        .map(|r| r.physical_limit_bytes);
    if let Some(limit) = tinyvmm_limit.or(results.first().map(|r| r.physical_limit_bytes)) {
        if a.free_pct > 0 {
            println!(
                "physical limit after each guest freed {}% (one copy of each shared page some guest still holds + unique pages not freed): {:.1} MiB total, {:.1} MiB per guest",
                a.free_pct,
                mib(limit),
                mib(limit) / f64::from(n.max(1))
            );
            println!(
                "  none and kernel: the guests free without a balloon (the host keeps those pages; kernel KSM alone); tinyvmm: free page reporting through virtio-balloon"
            );
        } else {
            println!(
                "physical limit (one copy of shared + all unique fill pages): {:.1} MiB total",
                mib(limit)
            );
        }
        for r in results.iter().filter(|r| r.skipped.is_none()) {
            println!(
                "  {:<8} {:.1} MiB per guest = {:.2} × the limit",
                r.mode.name(),
                mib(r.final_pss) / f64::from(r.guests.max(1)),
                r.final_pss as f64 / limit.max(1) as f64
            );
        }
    }
    if let Some(l) = limits {
        let (isolated, runs) = l.floor_us();
        println!(
            "this machine, one core, per page: hash {:.2} µs, compare {:.2} µs, mmap {:.2} µs isolated / {:.2} µs in 64-page runs, MADV_DONTNEED {:.2} µs; a merged page needs at least {:.2} µs (isolated) to {:.2} µs (long runs) of CPU",
            l.hash_us, l.compare_us, l.map_page_us, l.map_run_us, l.dontneed_us, isolated, runs
        );
    }
    let k = results
        .iter()
        .find(|r| r.mode == Mode::Kernel && r.skipped.is_none());
    let t = results.iter().find(|r| r.mode == Mode::Tinyvmm);
    if let (Some(k), Some(t)) = (k, t) {
        println!("ratios tinyvmm/kernel (measured in this run):");
        let with_merger = |r: &ModeResult| (r.final_pss + r.merger_overhead_bytes) as f64;
        println!(
            "  memory            {}   (guests' Pss + merger memory)",
            ratio(Some(with_merger(t)), Some(with_merger(k)))
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

pub(super) fn plots(results: &[ModeResult], out: &Path, layout: &str) -> Result<(), PlotError> {
    let mem: Vec<Series> = results
        .iter()
        .filter(|r| r.skipped.is_none())
        .map(|r| Series {
            name: r.mode.name(),
            points: r
                .samples
                .iter()
                .filter_map(|s| s.guests_pss.map(|b| (s.t, mib(b))))
                .collect(),
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
