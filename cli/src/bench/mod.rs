//! `tinyvmm bench`: benchmarks that print ratios against a baseline measured in the same
//! run. Nothing here asserts on timings; the density benchmark fails only when a guest's
//! memory is wrong afterwards (a failed `verify`).

pub mod boot;
pub mod density;
mod plot;

use clap::{Args, Subcommand};

/// `tinyvmm bench ...`
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: Which,
}

/// The benchmarks.
#[derive(Subcommand, Debug)]
pub enum Which {
    /// Boot time to the first serial line, VMM overhead, and CPL3 fill speed vs the host.
    Boot(boot::BootArgs),
    /// Many guests: host memory and merger CPU with no merging, kernel KSM, and tinyvmm.
    Density(density::DensityArgs),
}

/// Why a benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// `bench boot`.
    #[error(transparent)]
    Boot(#[from] boot::BootBenchError),
    /// `bench density`.
    #[error(transparent)]
    Density(#[from] density::DensityError),
}

/// Runs a benchmark.
pub fn run(args: BenchArgs) -> std::process::ExitCode {
    crate::fleet::install_termination_flag();
    let r: Result<(), BenchError> = match args.which {
        Which::Boot(a) => boot::run(a).map_err(Into::into),
        Which::Density(a) => density::run(a).map_err(Into::into),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tinyvmm bench: error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// Median of `v` (sorted in place).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
