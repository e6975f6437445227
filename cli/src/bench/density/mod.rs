//! `tinyvmm bench density`: N guests with a chosen memory profile, run three times on the
//! same machine — no merging, the kernel's KSM (`MADV_MERGEABLE` + ksmd), and tinyvmm's
//! merge daemon — with the same `pages_to_scan` and `sleep_millisecs`, sampling host memory,
//! pages saved and merger CPU over time. Every guest verifies all its memory at the end: a
//! failed verify fails the benchmark.
//!
//! `mod.rs` holds the options, the errors and the loop over layouts, guest counts and
//! modes; `merger.rs` starts and stops each mode's merger (kernel KSM knobs saved and
//! restored, the daemon); `measure.rs` runs one mode on real guests and samples it;
//! `report.rs` prints the table and ratios and draws the plots; `limits.rs` measures what
//! the page mechanism's steps cost on this machine, printed next to the results.

mod limits;
mod measure;
mod merger;
mod report;

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use super::plot::{line_chart, PlotError, Series};
use crate::fleet::guest::GuestError;
use measure::run_mode;
pub use measure::{ModeResult, Sample};
use report::{mib, plots, report};
use tinyvmm_api::client::ClientError;
use tinyvmm_guests::content::Layout;

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
    /// vm.max_map_count for tinyvmm's run: as root, its daemon raises the host's limit to
    /// this (`tinyvmm merged --max-map-count`) and the benchmark restores the old value
    /// after the run; every mapping it makes is counted in tinyvmm's merger memory.
    /// Default: a guest's pages + 65 530 (every merged page its own mapping, the worst
    /// case); 0 leaves the host's setting.
    #[arg(long, value_name = "N")]
    pub max_map_count: Option<u64>,
    /// Pages per run of `--layout clustered`.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub run: u64,
    /// Each guest releases this % of its filled pages after the fill (the test guest's
    /// `free`). tinyvmm's guests report them through a virtio-balloon (free page reporting)
    /// and the host drops them; the none and kernel modes' guests release them without a
    /// balloon, so the host keeps them (what kernel KSM alone makes of freed memory).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=100))]
    pub free_pct: u64,
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
    let limits = match limits::Limits::measure() {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!("cannot measure this machine's page costs: {e}");
            None
        }
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
            report(&results, &a, limits.as_ref());
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
