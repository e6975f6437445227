//! Seccomp filters per kind of VMM thread, built with `seccompiler` as Firecracker does.
//!
//! Every thread of a VMM process runs under a filter for its kind ([`ThreadKind`]): the
//! event loop (the main thread), the vCPUs, the merge agent, the VM API (its I/O thread
//! and the blocking-call threads it starts, which inherit its filter) and each virtio
//! device's worker (one kind per device type). A call outside the
//! filter traps (`SECCOMP_RET_TRAP`): the `SIGSYS` handler of `tinyvmm_sys::sigsys`
//! names the call and the thread kind on stderr and ends the process with
//! [`BAD_SYSCALL_EXIT`].
//!
//! Each thread installs its own filter as the first thing it runs ([`Filters::install`]);
//! no filter is synchronised across threads (TSYNC), since kinds differ. Filters stack and
//! a thread inherits its creator's, so the order is: the main thread starts every other
//! thread while it has no filter (device workers, then vCPUs), and installs the event
//! loop's filter only after the last vCPU thread is started (in [`crate::Vmm::run`]). The API thread starts its pool
//! threads under its own filter, which allows exactly that.
//!
//! The programs are compiled once, before any thread starts ([`Filters::build`]); installing
//! one is two system calls (`no_new_privs`, then `seccomp`).

mod ioctls;
mod rules;

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use tinyvmm_sys::sigsys::BAD_SYSCALL_EXIT;

/// The kinds of thread a VMM process has, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread once the VM runs: the event loop (console, signals, exit requests).
    Main,
    /// A vCPU thread.
    Vcpu,
    /// The merge agent.
    Agent,
    /// The VM API's I/O thread and its blocking-call threads.
    Api,
    /// A virtio-blk device's worker: the request queue and the disk image.
    VirtioBlock,
    /// The virtio-vsock device's worker: its queues and the Unix sockets to host programs.
    VirtioVsock,
    /// The virtio-balloon's worker: its queues, and dropping the guest RAM it is given.
    VirtioBalloon,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Agent,
        ThreadKind::Api,
        ThreadKind::VirtioBlock,
        ThreadKind::VirtioVsock,
        ThreadKind::VirtioBalloon,
    ];

    /// The kind of a virtio device's worker thread, by virtio device ID.
    pub fn for_virtio_device(device_type: u32) -> Option<Self> {
        match device_type {
            virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK => Some(ThreadKind::VirtioBlock),
            virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK => Some(ThreadKind::VirtioVsock),
            virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON => Some(ThreadKind::VirtioBalloon),
            _ => None,
        }
    }

    /// The name used in reports of refused calls.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main (event loop)",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Agent => "merge-agent",
            ThreadKind::Api => "vm-api",
            ThreadKind::VirtioBlock => "virtio-blk",
            ThreadKind::VirtioVsock => "virtio-vsock",
            ThreadKind::VirtioBalloon => "virtio-balloon",
        }
    }
}

/// Why filters could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the rules or could not compile them.
    #[error("cannot build the seccomp filter of the {kind} threads: {source}")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// The compiler's error.
        source: seccompiler::Error,
    },
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter on a {kind} thread: {source}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// The error.
        source: seccompiler::Error,
    },
    /// The SIGSYS reporter could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// The compiled filter of every thread kind.
#[derive(Debug)]
pub struct Filters {
    programs: BTreeMap<ThreadKind, BpfProgram>,
    /// Test only: the kind of thread that makes a forbidden call right after installing
    /// its filter.
    test_violation: Option<ThreadKind>,
}

impl Filters {
    /// Compiles the filter of every kind (`kick`: the signal that stops vCPU threads) and
    /// installs the process's `SIGSYS` reporter.
    pub fn build(kick: libc::c_int) -> Result<Self, SeccompError> {
        let mut programs = BTreeMap::new();
        for kind in ThreadKind::ALL {
            let build = |source| SeccompError::Build {
                kind: kind.name(),
                source,
            };
            let filter = SeccompFilter::new(
                rules::rules(kind, kick),
                SeccompAction::Trap,
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .map_err(|e| build(seccompiler::Error::Backend(e)))?;
            let program: BpfProgram = filter
                .try_into()
                .map_err(|e| build(seccompiler::Error::Backend(e)))?;
            programs.insert(kind, program);
        }
        tinyvmm_sys::sigsys::install_sigsys_handler().map_err(SeccompError::Handler)?;
        Ok(Filters {
            programs,
            test_violation: None,
        })
    }

    /// Test only: after installing its filter, a thread of `kind` calls `getppid`, which no
    /// filter allows, so that the report and the exit status can be checked.
    pub fn with_test_violation(mut self, kind: ThreadKind) -> Self {
        self.test_violation = Some(kind);
        self
    }

    /// The number of system calls `kind`'s filter allows (with or without argument checks).
    pub fn allowed_calls(kind: ThreadKind) -> usize {
        rules::rules(kind, libc::SIGRTMIN()).len()
    }

    /// Installs `kind`'s filter on the calling thread (and sets `no_new_privs` on it, which
    /// a filter needs without `CAP_SYS_ADMIN`). Names the thread's kind for reports.
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        tinyvmm_sys::sigsys::set_thread_kind(kind.name());
        let program = &self.programs[&kind];
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
            kind: kind.name(),
            source,
        })?;
        if self.test_violation == Some(kind) {
            // SAFETY: getppid has no arguments and no effect; the filter refuses it.
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
        Ok(())
    }
}

/// Installs `kind`'s filter from `filters` if there are any; a thread that cannot be
/// filtered must not run, so a failure ends the process with a message.
pub fn install_or_exit(filters: Option<&Filters>, kind: ThreadKind) {
    if let Some(f) = filters {
        if let Err(e) = f.install(kind) {
            eprintln!("tinyvmm: error: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_and_keeps_what_the_sigsys_report_needs() {
        let f = Filters::build(libc::SIGRTMIN()).unwrap();
        for kind in ThreadKind::ALL {
            assert!(!f.programs[&kind].is_empty());
            let r = rules::rules(kind, libc::SIGRTMIN());
            for nr in [libc::SYS_write, libc::SYS_exit_group, libc::SYS_futex] {
                assert!(r.contains_key(&nr), "{kind:?} lacks {nr}");
            }
            assert!(!r.contains_key(&libc::SYS_getppid), "{kind:?}");
            assert!(!r.contains_key(&libc::SYS_execve), "{kind:?}");
            eprintln!("{}: {} calls", kind.name(), Filters::allowed_calls(kind));
        }
    }
}
