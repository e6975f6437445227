//! `tinyvmm`: the command-line front end.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tinyvmm::vm_control::{LiveVm, VmDescription};
use tinyvmm::{bench, exit_status, ksm_client, launcher, size, vsock_arg};
use tinyvmm_api::vm::ShareMemory;
use tinyvmm_api::ApiServer;
use tinyvmm_merged as daemon;
use tinyvmm_vmm::seccomp::{Filters, ThreadKind};
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
#[command(after_help = MERGED_HELP)]
struct MergedArgs {
    /// Socket that VM processes register on.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The REST control socket (HTTP/1.1 + JSON; mode 0600 unless --socket-mode).
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Which users' VMs may share which share group: a JSON file such as
    /// {"groups": [{"name": "ci", "uids": [1000, 1001]}]}. Without it, every group is
    /// private to the uid of the VMs that ask for it (root's too). Checked at start: a
    /// malformed file is an error.
    #[arg(long, value_name = "FILE")]
    share_policy: Option<PathBuf>,
    /// Mode of the agents' and the control API's sockets, octal: 600 (default: this user
    /// and root only), 660 (and the sockets' group), 666 (every user). With access for
    /// others, the run directory is made 0711. Other users' VMs then register (each in
    /// its own uid's groups), and other users read the control API (their own groups'
    /// guests only) but cannot change it.
    #[arg(long, value_name = "MODE", default_value = "600", value_parser = parse_socket_mode)]
    socket_mode: u32,
    /// Group (numeric gid) of the sockets, for --socket-mode 660.
    #[arg(long, value_name = "GID")]
    socket_group: Option<u32>,
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
    /// Make agent requests one at a time (the scanner before concurrent rounds: a stalled
    /// agent then delays every guest by up to --request-timeout-ms per request). By default
    /// digests run on every agent at once and a stalled agent delays only its own guest.
    #[arg(long)]
    sequential_scan: bool,
    /// Guests one user's VM processes may register at once.
    #[arg(long, default_value_t = tinyvmm_merged::UserLimits::default().guests)]
    max_guests_per_uid: usize,
    /// Pages (4 KiB) of guest RAM one user's VM processes may register at once, all guests
    /// together (the daemon keeps 16 bytes of metadata per page).
    #[arg(long, default_value_t = tinyvmm_merged::UserLimits::default().pages)]
    max_pages_per_uid: u64,
    /// Raise the host's vm.max_map_count to at least this at start (root only; never
    /// lowered, not restored at exit). Each merged run of guest pages is a mapping of its
    /// VM process, so the default 65 530 caps how much of a guest with scattered duplicates
    /// can be merged; each mapping made costs about 256 bytes of kernel memory. VMs that
    /// register after the change get the larger budget.
    #[arg(long, value_name = "N")]
    max_map_count: Option<u64>,
}

/// The share-group rules, at the end of `tinyvmm merged --help`.
const MERGED_HELP: &str = "\
Share groups: a VM names its group (tinyvmm run --share-group NAME, default \"default\"), but
the name is only a label within the VM process's user: VMs of different uids never share
a group (a merge domain and its pool) unless --share-policy lists both uids for that group
name. Root is just another user: its VMs share with root's VMs only, unless a policy group
lists uid 0. Over the control API, root and the daemon's own user see every guest and may
change the knobs; other users (see --socket-mode) see only the guests of their own groups
and may only read; a request over --api-tcp with the token is the administrator's.";

/// `--socket-mode`: an octal mode that leaves the owner read and write access.
fn parse_socket_mode(s: &str) -> Result<u32, String> {
    let digits = s.trim_start_matches("0o");
    let mode = u32::from_str_radix(digits, 8)
        .map_err(|_| format!("{s:?} is not an octal mode such as 600, 660 or 666"))?;
    if mode > 0o777 || mode & 0o600 != 0o600 {
        return Err(format!(
            "{s:?}: the mode must be at most 777 and give the owner read and write (600, 660, 666)"
        ));
    }
    Ok(mode)
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
    /// A disk for the guest, as a virtio-blk device: an image file (or block device),
    /// `,ro` to refuse guest writes. Repeat for more disks (at most 11 virtio devices).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<tinyvmm_vmm::virtio::DiskConfig>,
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
    /// Share group (merge domain): guests in different groups never share a frame. The
    /// name is within this user: other users' VMs of the same group name share with it
    /// only where the daemon's --share-policy says so.
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
    /// Run as this user once /dev/kvm, the images, the API socket and the merge daemon
    /// connection are open (a daemon is started first if needed): no supplementary groups,
    /// no capabilities (the bounding set dropped too), no_new_privs. Needs root; a jailed
    /// VMM cannot reconnect to a restarted merge daemon. Numeric ids only.
    #[arg(long, requires = "gid", value_parser = clap::value_parser!(u32).range(0..i64::from(u32::MAX)))]
    uid: Option<u32>,
    /// The group to run as, with --uid.
    #[arg(long, requires = "uid", value_parser = clap::value_parser!(u32).range(0..i64::from(u32::MAX)))]
    gid: Option<u32>,
    /// A virtio-vsock device: the guest's context ID (3 or more) and a Unix socket path
    /// (created; must not exist). A host program connects to PATH and writes
    /// `CONNECT <port>\n` to reach the guest's port (answered `OK <host_port>\n`); a guest
    /// connecting to host port P reaches the program listening on `PATH_P`.
    #[arg(long, value_name = "CID,PATH", value_parser = vsock_arg::parse_vsock)]
    vsock: Option<vsock_arg::VsockArg>,
    /// Turn off the seccomp filters that every VMM thread (vCPUs, merge agent, API, event
    /// loop, devices) runs under by default. For debugging only: a call a filter refuses ends the
    /// VMM with exit status 148 and a "bad system call" line naming it.
    #[arg(long)]
    no_seccomp: bool,
    /// Add a virtio-balloon (statistics, deflate-on-OOM, free page reporting) whose
    /// initial target is SIZE (default 0): pages the guest reports free or puts into the
    /// balloon are given back to the host. `PUT /vm/balloon` changes the target.
    #[arg(long, value_name = "SIZE", num_args = 0..=1, default_missing_value = "0", require_equals = true, value_parser = size::parse_size)]
    balloon: Option<u64>,
    /// Test hook: a thread of this kind makes a system call outside its filter.
    #[arg(long, hide = true, value_enum)]
    seccomp_test_violation: Option<TestViolation>,
}

/// Thread kinds for the hidden seccomp test hook.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum TestViolation {
    Vcpu,
    Agent,
    Api,
    Main,
    VirtioBlk,
    VirtioVsock,
    VirtioBalloon,
}

impl From<TestViolation> for ThreadKind {
    fn from(v: TestViolation) -> Self {
        match v {
            TestViolation::Vcpu => ThreadKind::Vcpu,
            TestViolation::Agent => ThreadKind::Agent,
            TestViolation::Api => ThreadKind::Api,
            TestViolation::Main => ThreadKind::Main,
            TestViolation::VirtioBalloon => ThreadKind::VirtioBalloon,
            TestViolation::VirtioBlk => ThreadKind::VirtioBlock,
            TestViolation::VirtioVsock => ThreadKind::VirtioVsock,
        }
    }
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

/// The seccomp filters of a `run`, unless `--no-seccomp`.
fn seccomp_filters(args: &RunArgs) -> Result<Option<Arc<Filters>>, ExitCode> {
    if args.no_seccomp {
        tracing::warn!("seccomp filters are off (--no-seccomp)");
        return Ok(None);
    }
    match Filters::build(tinyvmm_vmm::vcpu::kick_signal()) {
        Ok(f) => Ok(Some(Arc::new(match args.seccomp_test_violation {
            Some(kind) => f.with_test_violation(kind.into()),
            None => f,
        }))),
        Err(e) => {
            eprintln!("tinyvmm: error: {e}");
            Err(ExitCode::from(1))
        }
    }
}

/// Drops to `--uid`/`--gid` if given (else only sets no_new_privs), while the process has
/// one thread: every thread started afterwards inherits the result.
fn jail(args: &RunArgs) -> Result<(), ExitCode> {
    let res = match (args.uid, args.gid) {
        (Some(uid), Some(gid)) => tinyvmm_sys::jail::drop_privileges(uid, gid)
            .map(|()| tracing::info!(uid, gid, "dropped privileges"))
            .map_err(|e| format!("cannot run as uid {uid} gid {gid}: {e}")),
        _ => tinyvmm_sys::jail::set_no_new_privs()
            .map_err(|e| format!("cannot set no_new_privs: {e}")),
    };
    res.map_err(|msg| {
        eprintln!("tinyvmm: error: {msg}");
        ExitCode::from(1)
    })
}

/// The merge agent of a `--share-memory` VM, ready to start: its config, guest RAM, and
/// the first daemon connection (made before privileges are dropped).
struct AgentParts {
    cfg: tinyvmm_vmm::share::AgentConfig,
    ram: tinyvmm_vmm::share::SharedRamHandle,
    first: Option<std::os::unix::net::UnixStream>,
}

fn prepare_agent(
    args: &RunArgs,
    vmm: &Vmm,
    seccomp: Option<Arc<Filters>>,
) -> Result<AgentParts, ExitCode> {
    let cfg = tinyvmm_vmm::share::AgentConfig {
        socket: args
            .merge_socket
            .clone()
            .unwrap_or_else(daemon::default_merge_socket),
        share_group: args.share_group.clone(),
        name: args.name.clone().unwrap_or_else(|| args.kernel.clone()),
        vma_budget: args.vma_budget,
        autostart: if args.no_daemon_autostart {
            None
        } else {
            std::env::current_exe().ok().map(|exe| {
                Arc::new(launcher::MergedLauncher::new(exe))
                    as Arc<dyn tinyvmm_vmm::share::DaemonLauncher>
            })
        },
        reconnect: args.uid.is_none(),
        seccomp,
        run_as_uid: args.uid,
    };
    let ram =
        tinyvmm_vmm::share::SharedRam::new(vmm.ram_ranges(), Box::new(vmm.guest_memory().clone()))
            .map_err(|e| {
                eprintln!("tinyvmm: error: cannot enrol guest memory for merging: {e}");
                ExitCode::from(1)
            })?;
    let first = tinyvmm_vmm::share::first_connection(&cfg);
    Ok(AgentParts {
        cfg,
        ram: Arc::new(std::sync::Mutex::new(ram)),
        first,
    })
}

/// The balloon of `--balloon=SIZE`: the device, the VM API's handle, and its discarder
/// (shared with the merge agent once there is one). The VMM starts its worker thread.
fn balloon_device(
    size: u64,
) -> Result<
    (
        tinyvmm_vmm::virtio::balloon::Balloon,
        (
            tinyvmm_vmm::virtio::balloon::BalloonHandle,
            Arc<tinyvmm_vmm::share::SharedRamDiscard>,
        ),
    ),
    ExitCode,
> {
    let pages = u32::try_from(size / 4096).map_err(|_| {
        eprintln!("tinyvmm: error: --balloon {size} is too large");
        ExitCode::from(2)
    })?;
    let discard = tinyvmm_vmm::share::SharedRamDiscard::new();
    let (device, handle) = tinyvmm_vmm::virtio::balloon::Balloon::new(pages, discard.clone())
        .map_err(|e| {
            eprintln!("tinyvmm: error: cannot create the balloon: {e}");
            ExitCode::from(1)
        })?;
    Ok((device, (handle, discard)))
}

/// The virtio devices `args` ask for, in slot order; an image that cannot be opened is
/// an error before anything starts.
fn virtio_devices(args: &RunArgs) -> Result<Vec<tinyvmm_vmm::virtio::BoxedDevice>, ExitCode> {
    let mut devices: Vec<tinyvmm_vmm::virtio::BoxedDevice> = Vec::new();
    for disk in &args.disks {
        let block = tinyvmm_vmm::virtio::Block::new(disk).map_err(|e| {
            eprintln!("tinyvmm: error: {e}");
            ExitCode::from(1)
        })?;
        devices.push(Box::new(block));
    }
    if let Some(v) = &args.vsock {
        let vsock = tinyvmm_vmm::vsock::vsock_device(v.cid, &v.path).map_err(|e| {
            eprintln!("tinyvmm: error: {e}");
            ExitCode::from(1)
        })?;
        devices.push(vsock);
    }
    Ok(devices)
}

fn run(args: RunArgs) -> ExitCode {
    match run_vm(args) {
        Ok(code) | Err(code) => code,
    }
}

/// `tinyvmm run`: everything that needs privileges first (KVM, images, guest RAM's
/// userfaultfd, the merge daemon connection, the API socket), then the drop, then the
/// threads, each under its seccomp filter.
fn run_vm(args: RunArgs) -> Result<ExitCode, ExitCode> {
    let policy = match args.share_memory {
        None => MemoryPolicy::Private,
        Some(ShareMode::Kernel) => MemoryPolicy::KernelMergeable,
        Some(ShareMode::Tinyvmm) => MemoryPolicy::Shareable,
    };
    let share = args.share_memory == Some(ShareMode::Tinyvmm);
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
    let seccomp = seccomp_filters(&args)?;
    let mut virtio_devices = virtio_devices(&args)?;
    let balloon = match args.balloon {
        Some(size) => {
            let (device, balloon) = balloon_device(size)?;
            virtio_devices.push(Box::new(device));
            Some(balloon)
        }
        None => None,
    };
    let cfg = VmConfig {
        boot: BootSpec {
            kernel: kernel_source(&args.kernel),
            initrd: args.initrd.clone(),
            cmdline: args.cmdline.clone(),
        },
        mem_size: args.mem,
        vcpus: args.vcpus,
        memory_policy: policy,
        dirty_log: share,
        serial_out: Box::new(tinyvmm_vmm::SerialStdout),
        serial_in: Some(libc::STDIN_FILENO),
        virtio_devices,
        seccomp: seccomp.clone(),
    };
    let vmm = Vmm::new(cfg).map_err(|e| {
        eprintln!("tinyvmm: error: {e}");
        ExitCode::from(1)
    })?;
    // Threads started from here on (the merge agent, the API server) inherit the mask, so
    // termination signals reach only the VMM's signalfd (`Vmm::run` blocks them too; a
    // signal that comes earlier waits, pending, and stops the guest cleanly then).
    if let Err(e) = tinyvmm_sys::signals::block_termination_signals() {
        eprintln!("tinyvmm: error: cannot block termination signals: {e}");
        return Err(ExitCode::from(1));
    }
    let agent = if share {
        Some(prepare_agent(&args, &vmm, seccomp.clone())?)
    } else {
        None
    };
    // The balloon drops pages through the agent's RAM from now on (before any vCPU runs).
    if let (Some((_, discard)), Some(parts)) = (&balloon, &agent) {
        discard.share(parts.ram.clone());
    }
    let bound_api = match &args.api_sock {
        Some(sock) => Some(ApiServer::bind_vm(sock).map_err(|e| {
            eprintln!(
                "tinyvmm: error: cannot serve the VM API on {}: {e}",
                sock.display()
            );
            ExitCode::from(1)
        })?),
        None => None,
    };
    // Still one thread here: what the jail sets is inherited by every thread below.
    jail(&args)?;
    let agent_status = match agent {
        Some(AgentParts { cfg, ram, first }) => {
            match tinyvmm_vmm::share::spawn_agent(cfg, ram, Some(vmm.dirty_source()), first) {
                Ok((_thread, status)) => Some(status),
                Err(e) => {
                    eprintln!("tinyvmm: error: cannot start the merge agent: {e}");
                    return Err(ExitCode::from(1));
                }
            }
        }
        None => None,
    };
    // Served until `run` returns (dropping it removes the socket).
    let _api = match bound_api {
        Some(bound) => {
            description.mem_bytes = vmm.mem_size();
            let mut vm = LiveVm::new(description, vmm.exit_signal(), agent_status);
            if let Some((handle, _)) = &balloon {
                vm = vm.with_balloon(handle.clone());
            }
            let filters = seccomp.clone();
            let on_start: tinyvmm_api::ThreadStart = Box::new(move || {
                tinyvmm_vmm::seccomp::install_or_exit(filters.as_deref(), ThreadKind::Api)
            });
            Some(bound.start_vm(Arc::new(vm), Some(on_start)).map_err(|e| {
                eprintln!("tinyvmm: error: cannot serve the VM API: {e}");
                ExitCode::from(1)
            })?)
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
            Ok(ExitCode::from(exit_status::exit_status(&reason)))
        }
        Err(e) => {
            eprintln!("tinyvmm: error: {e}");
            Err(ExitCode::from(1))
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
    let share_policy = match &args.share_policy {
        None => daemon::SharePolicy::none(),
        Some(path) => match daemon::SharePolicy::load(path) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("tinyvmm: error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let socket_access = tinyvmm_sys::socket::SocketAccess {
        mode: args.socket_mode,
        group: args.socket_group,
    };
    let cfg = daemon::DaemonConfig {
        socket: args.socket.unwrap_or_else(daemon::default_merge_socket),
        knobs,
        request_timeout: std::time::Duration::from_millis(args.request_timeout_ms.max(1)),
        concurrent_scan: !args.sequential_scan,
        user_limits: tinyvmm_merged::UserLimits {
            guests: args.max_guests_per_uid,
            pages: args.max_pages_per_uid,
        },
        max_map_count: args.max_map_count,
        share_policy,
        socket_access,
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
    api_cfg.socket_access = socket_access;
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
