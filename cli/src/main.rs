//! `tinyvmm`: the command-line front end.

mod size;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tinyvmm_vmm::{BootSpec, ExitReason, KernelSource, MemoryPolicy, VmConfig, Vmm};

#[derive(Parser, Debug)]
#[command(
    name = "tinyvmm",
    version,
    about = "A small KVM hypervisor that merges identical guest pages across VMs"
)]
struct Cli {
    /// Log more (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a Linux kernel (bzImage or ELF vmlinux) with a serial console.
    Run(RunArgs),
    /// Write the built-in test guest kernel to a file.
    GuestImage(GuestImageArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Kernel image: a bzImage or ELF vmlinux; `builtin` (or omitted) boots the built-in
    /// test guest (ELF), `builtin-bzimage` the same guest as a bzImage.
    #[arg(long, default_value = "builtin")]
    kernel: String,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = tinyvmm_vmm::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest RAM: 512M, 2G, ... (a bare number is MiB).
    #[arg(long, default_value = "256M", value_parser = size::parse_size)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=i64::from(tinyvmm_vmm::MAX_VCPUS)))]
    vcpus: u8,
    /// Offer guest RAM for merging: `--share-memory` enrols it with tinyvmm's merge
    /// daemon, `--share-memory=kernel` marks it MADV_MERGEABLE for the host's ksmd.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "tinyvmm", require_equals = true)]
    share_memory: Option<ShareMode>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum ShareMode {
    /// tinyvmm's own merge daemon.
    Tinyvmm,
    /// The host kernel's KSM (madvise MADV_MERGEABLE).
    Kernel,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum GuestFormat {
    Elf,
    Bzimage,
}

#[derive(Args, Debug)]
struct GuestImageArgs {
    /// Image format.
    #[arg(long, value_enum, default_value = "elf")]
    format: GuestFormat,
    /// Output file.
    #[arg(short, long)]
    output: PathBuf,
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn kernel_source(arg: &str) -> KernelSource {
    match arg {
        "builtin" => KernelSource::Embedded {
            name: "test guest (ELF)",
            bytes: tinyvmm_guests::TEST_GUEST_ELF,
        },
        "builtin-bzimage" => KernelSource::Embedded {
            name: "test guest (bzImage)",
            bytes: tinyvmm_guests::TEST_GUEST_BZIMAGE,
        },
        path => KernelSource::File(PathBuf::from(path)),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let policy = match args.share_memory {
        None => MemoryPolicy::Private,
        Some(ShareMode::Kernel) => MemoryPolicy::KernelMergeable,
        Some(ShareMode::Tinyvmm) => {
            eprintln!("tinyvmm: error: --share-memory (the tinyvmm merge daemon) is not available in this build yet; use --share-memory=kernel");
            return ExitCode::from(2);
        }
    };
    let cfg = VmConfig {
        boot: BootSpec {
            kernel: kernel_source(&args.kernel),
            initrd: args.initrd,
            cmdline: args.cmdline,
        },
        mem_size: args.mem,
        vcpus: args.vcpus,
        memory_policy: policy,
        dirty_log: false,
        serial_out: Box::new(tinyvmm_vmm::SerialStdout),
        serial_in: Some(libc::STDIN_FILENO),
    };
    let vmm = match Vmm::new(cfg) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("tinyvmm: error: {e}");
            return ExitCode::from(1);
        }
    };
    match vmm.run(Vec::new()) {
        Ok(reason) => {
            match &reason {
                ExitReason::VcpuFault(msg) => eprintln!("tinyvmm: guest stopped: {msg}"),
                ExitReason::DebugExit(v) => {
                    tracing::info!("guest wrote {v:#x} to the debug exit port")
                }
                ExitReason::Signal(s) => tracing::info!("stopped by signal {s}"),
                ExitReason::GuestReset | ExitReason::Requested => {}
            }
            ExitCode::from(reason.exit_code() as u8)
        }
        Err(e) => {
            eprintln!("tinyvmm: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn guest_image(args: GuestImageArgs) -> ExitCode {
    let bytes = match args.format {
        GuestFormat::Elf => tinyvmm_guests::TEST_GUEST_ELF,
        GuestFormat::Bzimage => tinyvmm_guests::TEST_GUEST_BZIMAGE,
    };
    match std::fs::write(&args.output, bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "tinyvmm: error: cannot write {}: {e}",
                args.output.display()
            );
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match cli.command {
        Command::Run(args) => run(args),
        Command::GuestImage(args) => guest_image(args),
    }
}
