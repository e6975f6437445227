//! `tinyvmm`: the command-line front end.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tinyvmm::vm_control::{LiveVm, VmDescription};
use tinyvmm::{bench, exit_status, ksm_client, launcher, size};
use tinyvmm_api::vm::ShareMemory;
use tinyvmm_api::ApiServer;
use tinyvmm_merged as daemon;
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
    /// Run the merge daemon (the user-space ksmd) in the foreground.
    Merged(MergedArgs),
    /// Read and tune the merge daemon (knobs and counters of /sys/kernel/mm/ksm).
    Ksm(ksm_client::KsmArgs),
    /// Benchmarks.
    Bench(bench::BenchArgs),
}

#[derive(Args, Debug)]
struct MergedArgs {
    /// Socket that VM processes register on.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The REST control socket (HTTP/1.1 + JSON, mode 0600).
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Also serve the control API over TCP at this loopback address (e.g. 127.0.0.1:8742);
    /// any other address is refused. Off by default.
    #[arg(long, requires = "api_token_file")]
    api_tcp: Option<std::net::SocketAddr>,
    /// The bearer token that requests over `--api-tcp` must carry
    /// (`Authorization: Bearer <token>`), read from this file (surrounding whitespace
    /// trimmed). Required with `--api-tcp`.
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// Pages visited per wake-up, across all guests.
    #[arg(long)]
    pages_to_scan: Option<u32>,
    /// Sleep between wake-ups, ms.
    #[arg(long)]
    sleep_ms: Option<u32>,
    /// 0 stop, 1 run (default).
    #[arg(long)]
    run: Option<u8>,
    /// How long an agent may take to answer one request, ms; a VM whose agent does not
    /// answer is dropped from merging (its frames stay until its process exits).
    #[arg(long, default_value_t = 20_000)]
    request_timeout_ms: u64,
    /// Digest on every agent at once (concurrent scan rounds: a stalled agent delays only
    /// its own guest). Experimental, off by default: a churning guest lost a page under it
    /// in tests/share.rs (see docs/design.md).
    #[arg(long)]
    concurrent_scan: bool,
    /// Guests one user's VM processes may register at once.
    #[arg(long, default_value_t = tinyvmm_merged::UserLimits::default().guests)]
    max_guests_per_uid: usize,
    /// Pages (4 KiB) of guest RAM one user's VM processes may register at once, all guests
    /// together (the daemon keeps 16 bytes of metadata per page).
    #[arg(long, default_value_t = tinyvmm_merged::UserLimits::default().pages)]
    max_pages_per_uid: u64,
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
    /// The merge daemon's socket (default: the run directory's merged.sock).
    #[arg(long)]
    merge_socket: Option<PathBuf>,
    /// Share group (merge domain): guests in different groups never share a frame.
    #[arg(long, default_value = "default")]
    share_group: String,
    /// The guest's name at the merge daemon (`GET /guests/{name}`, `tinyvmm ksm guests`)
    /// [default: the --kernel argument].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Mappings (VMAs) merged runs may use in this process (default: what vm.max_map_count
    /// leaves).
    #[arg(long)]
    vma_budget: Option<u32>,
    /// Do not start a merge daemon when none is running.
    #[arg(long)]
    no_daemon_autostart: bool,
    /// Serve this VM's control API (HTTP/1.1 + JSON: `GET /vm`, `PUT /vm/actions`) on a
    /// Unix socket created with mode 0600.
    #[arg(long)]
    api_sock: Option<PathBuf>,
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
        Some(ShareMode::Tinyvmm) => MemoryPolicy::Shareable,
    };
    let share = args.share_memory == Some(ShareMode::Tinyvmm);
    let guest_name = args.name.clone().unwrap_or_else(|| args.kernel.clone());
    let mut description = VmDescription {
        vcpus: args.vcpus,
        mem_bytes: args.mem,
        kernel: args.kernel.clone(),
        share_memory: match args.share_memory {
            None => ShareMemory::None,
            Some(ShareMode::Tinyvmm) => ShareMemory::Tinyvmm,
            Some(ShareMode::Kernel) => ShareMemory::Kernel,
        },
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
        dirty_log: share,
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
    // Threads started from here on (the merge agent, the API server) inherit the mask, so
    // termination signals reach only the VMM's signalfd (`Vmm::run` blocks them too; a
    // signal that comes earlier waits, pending, and stops the guest cleanly then).
    if let Err(e) = tinyvmm_sys::signals::block_termination_signals() {
        eprintln!("tinyvmm: error: cannot block termination signals: {e}");
        return ExitCode::from(1);
    }
    let mut agent_status = None;
    if share {
        let agent = tinyvmm_vmm::share::AgentConfig {
            socket: args
                .merge_socket
                .clone()
                .unwrap_or_else(daemon::default_merge_socket),
            share_group: args.share_group.clone(),
            name: guest_name,
            vma_budget: args.vma_budget,
            autostart: if args.no_daemon_autostart {
                None
            } else {
                std::env::current_exe().ok().map(|exe| {
                    std::sync::Arc::new(launcher::MergedLauncher::new(exe))
                        as std::sync::Arc<dyn tinyvmm_vmm::share::DaemonLauncher>
                })
            },
        };
        let ram = match tinyvmm_vmm::share::SharedRam::new(
            vmm.ram_ranges(),
            Box::new(vmm.guest_memory().clone()),
        ) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("tinyvmm: error: cannot enrol guest memory for merging: {e}");
                return ExitCode::from(1);
            }
        };
        match tinyvmm_vmm::share::spawn_agent(agent, ram, Some(vmm.dirty_source())) {
            Ok((_thread, status)) => agent_status = Some(status),
            Err(e) => {
                eprintln!("tinyvmm: error: cannot start the merge agent: {e}");
                return ExitCode::from(1);
            }
        }
    }
    // Served until `run` returns (dropping it removes the socket).
    let _api = match &args.api_sock {
        Some(sock) => {
            description.mem_bytes = vmm.mem_size();
            let vm = LiveVm::new(description, vmm.exit_signal(), agent_status);
            match ApiServer::start_vm(sock, std::sync::Arc::new(vm)) {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!(
                        "tinyvmm: error: cannot serve the VM API on {}: {e}",
                        sock.display()
                    );
                    return ExitCode::from(1);
                }
            }
        }
        None => None,
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
            ExitCode::from(exit_status::exit_status(&reason))
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

fn merged(args: MergedArgs) -> ExitCode {
    let mut knobs = tinyvmm_merge::Knobs::default();
    let upd = tinyvmm_merge::KnobsUpdate {
        pages_to_scan: args.pages_to_scan,
        sleep_millisecs: args.sleep_ms,
        run: match args.run.map(tinyvmm_merge::RunMode::try_from) {
            None => None,
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                eprintln!("tinyvmm: error: {e}");
                return ExitCode::from(2);
            }
        },
        ..Default::default()
    };
    knobs = match knobs.updated(&upd) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("tinyvmm: error: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = daemon::DaemonConfig {
        socket: args.socket.unwrap_or_else(daemon::default_merge_socket),
        knobs,
        request_timeout: std::time::Duration::from_millis(args.request_timeout_ms.max(1)),
        concurrent_scan: args.concurrent_scan,
        user_limits: tinyvmm_merged::UserLimits {
            guests: args.max_guests_per_uid,
            pages: args.max_pages_per_uid,
        },
    };
    let d = match daemon::Daemon::bind(cfg) {
        Ok(d) => d,
        Err(e @ daemon::DaemonError::AlreadyRunning(_)) => {
            eprintln!("tinyvmm: {e}");
            return ExitCode::from(0);
        }
        Err(e) => {
            eprintln!("tinyvmm: error: {e}");
            return ExitCode::from(1);
        }
    };
    let api_sock = args.api_sock.unwrap_or_else(daemon::default_api_socket);
    let mut api_cfg = tinyvmm_api::ApiConfig::new(&api_sock);
    api_cfg.tcp = args.api_tcp;
    if let Some(path) = &args.api_token_file {
        match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => api_cfg.tcp_token = Some(t.trim().to_string()),
            Ok(_) => {
                eprintln!("tinyvmm: error: the token file {} is empty", path.display());
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!(
                    "tinyvmm: error: cannot read the token file {}: {e}",
                    path.display()
                );
                return ExitCode::from(2);
            }
        }
    }
    let _api = match ApiServer::start_daemon(api_cfg, std::sync::Arc::new(d.control())) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "tinyvmm: error: cannot serve the control API on {}: {e}",
                api_sock.display()
            );
            return ExitCode::from(1);
        }
    };
    tinyvmm_sys::signals::install_termination_flag();
    match d.run(&tinyvmm_sys::signals::terminating) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tinyvmm: error: {e}");
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
        Command::Merged(args) => merged(args),
        Command::Ksm(args) => ksm_client::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
