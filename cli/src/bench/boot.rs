//! `tinyvmm bench boot`: time from `tinyvmm run` to the guest's first serial line and to its
//! boot checks, VMM memory overhead, and the guest's CPL3 fill speed against the same loop
//! on the host.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use tinyvmm_guests::content::{
    page_class, page_key, page_word, FillParams, PageClass, WORDS_PER_PAGE,
};

use super::median;
use crate::fleet::guest::{field, GuestError, GuestProc};
use crate::fleet::procfs;

/// Options of `bench boot`.
#[derive(Args, Debug)]
pub struct BootArgs {
    /// Boots to time.
    #[arg(long, default_value_t = 10)]
    pub runs: u32,
    /// Guest RAM for the fill measurement, MiB.
    #[arg(long, default_value_t = 256)]
    pub fill_mib: u64,
}

/// Why `bench boot` failed.
#[derive(Debug, thiserror::Error)]
pub enum BootBenchError {
    /// The benchmark runs this binary's `tinyvmm run`.
    #[error("cannot find the tinyvmm binary: {0}")]
    NoExe(#[source] std::io::Error),
    /// A guest process could not be started.
    #[error("cannot start a guest: {0}")]
    Spawn(#[source] std::io::Error),
    /// A guest did not boot or answer as expected.
    #[error(transparent)]
    Guest(#[from] GuestError),
}

fn exe() -> Result<PathBuf, BootBenchError> {
    std::env::current_exe().map_err(BootBenchError::NoExe)
}

/// The fill loop on the host: the guest's content functions over `pages` pages.
fn host_fill(buf: &mut [u64], pages: u64) -> Duration {
    let p = FillParams::default();
    let start = Instant::now();
    for (i, page) in buf
        .chunks_exact_mut(WORDS_PER_PAGE)
        .take(pages as usize)
        .enumerate()
    {
        let i = i as u64;
        let class = page_class(p.seed, i, p.shared_pct, p.zero_pct);
        if class == PageClass::Zero {
            page.fill(0);
            continue;
        }
        let key = page_key(p.seed, p.guest_seed, class, i, 0);
        for (j, w) in page.iter_mut().enumerate() {
            *w = page_word(key, j);
        }
    }
    std::hint::black_box(&buf);
    start.elapsed()
}

pub fn run(args: BootArgs) -> Result<(), BootBenchError> {
    let exe = exe()?;
    let mut first_line_ms = Vec::new();
    let mut ready_ms = Vec::new();
    for _ in 0..args.runs.max(1) {
        let cmdline = "console=ttyS0 reboot=k panic=-1 workload=hello".to_string();
        let mut g = GuestProc::spawn(
            &exe,
            &["--mem".into(), "64M".into(), "--cmdline".into(), cmdline],
            None,
        )
        .map_err(BootBenchError::Spawn)?;
        g.wait_line("TINYVMM TESTGUEST READY", Duration::from_secs(30))?;
        let first = g.first_line.unwrap_or_else(Instant::now) - g.started;
        g.wait_line("BOOTCHECK OK", Duration::from_secs(30))?;
        first_line_ms.push(first.as_secs_f64() * 1e3);
        ready_ms.push(g.started.elapsed().as_secs_f64() * 1e3);
        g.wait_line("DONE", Duration::from_secs(30))?;
        let _ = g.exit(Duration::from_secs(10));
    }

    // VMM overhead: RSS of the process minus the guest RAM it has touched. A serve guest
    // with a 16 MiB fill keeps running while we look.
    let mib = args.fill_mib.max(16);
    let cmdline = format!("console=ttyS0 workload=fill,serve mib={mib}");
    let mem = format!("{}M", mib + 32);
    let mut g = GuestProc::spawn(
        &exe,
        &["--mem".into(), mem, "--cmdline".into(), cmdline],
        None,
    )
    .map_err(BootBenchError::Spawn)?;
    let fill1 = g.wait_line("FILL done", Duration::from_secs(120))?;
    g.wait_line("SERVE ready", Duration::from_secs(30))?;
    let rss = procfs::rss_bytes(g.pid()).unwrap_or(0);
    let guest_rss = guest_ram_rss(g.pid()).unwrap_or(0);
    g.send("fill").map_err(|source| GuestError::Send {
        pid: g.pid(),
        source,
    })?;
    let fill2 = g.wait_line("FILL done", Duration::from_secs(120))?;
    g.wait_line("SERVE ready", Duration::from_secs(30))?;
    let _ = g.exit(Duration::from_secs(10));

    let pages = field(&fill2, "pages").unwrap_or(0);
    let guest_ms = field(&fill2, "ms").unwrap_or(0) as f64;
    let mut buf = vec![0u64; pages as usize * WORDS_PER_PAGE];
    host_fill(&mut buf, pages); // first touch
    let mut host_ms: Vec<f64> = (0..3)
        .map(|_| host_fill(&mut buf, pages).as_secs_f64() * 1e3)
        .collect();
    let host_ms = median(&mut host_ms);
    let bytes = pages as f64 * 4096.0;

    println!(
        "tinyvmm bench boot ({} runs of the hello guest, 64 MiB)",
        args.runs
    );
    println!(
        "  spawn → first serial line   median {:7.2} ms",
        median(&mut first_line_ms)
    );
    println!(
        "  spawn → BOOTCHECK OK        median {:7.2} ms   (CPL0 part emulated on this host)",
        median(&mut ready_ms)
    );
    println!(
        "  VMM RSS excluding guest RAM        {:7.2} MiB  (process RSS {:.1} MiB − guest RAM {:.1} MiB)",
        rss.saturating_sub(guest_rss) as f64 / 1048576.0,
        rss as f64 / 1048576.0,
        guest_rss as f64 / 1048576.0
    );
    println!(
        "  first fill (host page faults)      {:7} MB/s",
        field(&fill1, "mbps").unwrap_or(0)
    );
    println!(
        "  refill in guest (CPL3)             {:7.0} MB/s",
        bytes / (guest_ms / 1e3) / 1e6
    );
    println!(
        "  same loop on the host              {:7.0} MB/s",
        bytes / (host_ms / 1e3) / 1e6
    );
    println!(
        "  ratio guest/host                   {:7.2}",
        host_ms / guest_ms.max(1e-9)
    );
    Ok(())
}

/// RSS of the guest RAM mappings of a VMM process: the anonymous mappings of 4 MiB or
/// more (the VMM's own heap and stacks are smaller, its binary is file-backed).
fn guest_ram_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0;
    let mut big_anon = false;
    for line in s.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let mut it = line.split_whitespace();
            let range = it.next()?;
            let path = it.nth(4);
            let (a, b) = range.split_once('-')?;
            let len = u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?;
            big_anon = path.is_none() && len >= 4 << 20;
        } else if big_anon && line.starts_with("Rss:") {
            total += line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024;
        }
    }
    Some(total)
}
