//! The system calls each kind of VMM thread may make, with the argument checks that are
//! cheap and meaningful (ioctl numbers, `socket` domains, `prctl` options, signals sent).
//!
//! Derived from the real workloads under `strace -f` (boot, `fill,serve`, verify, churn
//! under merging, zero reclaim, unmerge, daemon restarts, the per-VM API, every shutdown
//! path), then widened where a path the traces did not take needs a call (a panic's
//! `abort`, allocator growth in any thread, the agent's `/proc/self/maps` read for
//! statistics). Correctness comes first: a call a legitimate path needs is allowed even
//! where its arguments cannot be checked (`clone3` takes a structure).

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::ioctls;
use super::ThreadKind;

/// Syscall number -> the rules under which it is allowed (none: always).
pub(super) type RuleMap = BTreeMap<i64, Vec<SeccompRule>>;

/// Calls every thread makes: memory (the allocator, thread stacks), locks, time, writing
/// logs, signal delivery and return, ending the thread or the process.
const COMMON: &[libc::c_long] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_time,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The event loop (the main thread once the vCPUs run): epoll, reading the console,
/// eventfds and the signalfd, kicking and joining vCPU threads, removing the API socket.
const MAIN: &[libc::c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_lstat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_fcntl,
];

/// The merge agent: its daemon connection (messages with descriptors), reading guest RAM
/// state (`/proc/self/pagemap`, `mincore`), remapping guest RAM, userfaultfd events,
/// `/proc/self/maps` for its statistics, and reconnecting after a daemon restart.
const AGENT: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_connect,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_geteuid,
    libc::SYS_mincore,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_lstat,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// The VM API's I/O thread and its blocking-call threads (tokio): accepting and serving
/// HTTP on the Unix socket, starting and naming the blocking-pool threads.
const API: &[libc::c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // Who the caller is: its peer credentials against the server's own uid.
    libc::SYS_geteuid,
    libc::SYS_fcntl,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
];

/// A virtio-blk worker: epoll on its kick and command eventfds, reading and writing the
/// image at an offset, flushing it.
const VIRTIO_BLOCK: &[libc::c_long] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_read,
    libc::SYS_lseek,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
];

/// The virtio-vsock worker: its epoll set (made at each activation), the queues'
/// kick eventfds, accepting host programs on the listening socket, connecting to the
/// `PATH_<port>` listeners, reading and writing the connections, shutting their write half.
const VIRTIO_VSOCK: &[libc::c_long] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
];

/// The virtio-balloon worker: waiting on its queues' kick eventfds (epoll), reading them,
/// dropping guest RAM (`madvise`, `mmap` — both in COMMON) and registering remapped RAM
/// with the merge agent's userfaultfd (`ioctl`, below).
const VIRTIO_BALLOON: &[libc::c_long] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
];

fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, len, op, value).expect("argument index below 6")
}

/// A rule: argument `arg` (32 bits) equals `value`.
fn arg_is(arg: u8, value: u64) -> SeccompRule {
    SeccompRule::new(vec![cond(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )])
    .expect("one condition")
}

/// `process_madvise` on the calling process itself (`PIDFD_SELF_THREAD_GROUP`), advice
/// `MADV_DONTNEED` only.
fn own_dontneed() -> SeccompRule {
    let pidfd = tinyvmm_sys::dontneed::PIDFD_SELF_THREAD_GROUP as u32;
    SeccompRule::new(vec![
        cond(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            u64::from(pidfd),
        ),
        cond(
            3,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::MADV_DONTNEED as u64,
        ),
    ])
    .expect("two conditions")
}

fn allow(map: &mut RuleMap, calls: &[libc::c_long]) {
    for &nr in calls {
        map.insert(nr, Vec::new());
    }
}

/// Allows `nr` when argument `arg` is one of `values` (added to any values already allowed).
fn allow_args(map: &mut RuleMap, nr: libc::c_long, arg: u8, values: &[u64]) {
    let rules = map.entry(nr).or_default();
    rules.extend(values.iter().map(|&v| arg_is(arg, v)));
}

/// The rules of a thread of kind `kind`. `kick` is the signal that stops vCPUs.
pub(super) fn rules(kind: ThreadKind, kick: libc::c_int) -> RuleMap {
    let mut map = RuleMap::new();
    allow(&mut map, COMMON);
    // Any thread may abort (a double panic): raise(SIGABRT) is tgkill on itself.
    allow_args(&mut map, libc::SYS_tgkill, 2, &[libc::SIGABRT as u64]);
    match kind {
        ThreadKind::Main => {
            allow(&mut map, MAIN);
            allow_args(&mut map, libc::SYS_tgkill, 2, &[kick as u64]);
        }
        ThreadKind::Vcpu => {
            // KVM_RUN and what an exit's device emulation does (console output, eventfd
            // writes for interrupts and exit requests, the CMOS clock) is all COMMON.
            allow_args(&mut map, libc::SYS_ioctl, 1, ioctls::VCPU);
            // Debug builds of the standard library check that a descriptor is open
            // (`fcntl(F_GETFD)`) when a thread closes one, as a vCPU thread does at exit.
            // A virtio device's activation (the driver's DRIVER_OK write) hands the device
            // a duplicate of each queue's kick eventfd (`fcntl(F_DUPFD_CLOEXEC)`).
            allow_args(
                &mut map,
                libc::SYS_fcntl,
                1,
                &[libc::F_GETFD as u64, libc::F_DUPFD_CLOEXEC as u64],
            );
        }
        ThreadKind::Agent => {
            allow(&mut map, AGENT);
            allow_args(&mut map, libc::SYS_ioctl, 1, ioctls::AGENT);
            allow_args(&mut map, libc::SYS_socket, 0, &[libc::AF_UNIX as u64]);
            // Reading /proc files: read-only, never creating.
            let ro = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64;
            let rule = SeccompRule::new(vec![cond(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(ro),
                libc::O_RDONLY as u64,
            )])
            .expect("one condition");
            map.insert(libc::SYS_openat, vec![rule]);
            // Dropping zero pages in batches: MADV_DONTNEED on this process only.
            map.insert(libc::SYS_process_madvise, vec![own_dontneed()]);
        }
        ThreadKind::VirtioBlock => {
            allow(&mut map, VIRTIO_BLOCK);
            // Debug builds check a descriptor is open when closing it (at thread exit).
            allow_args(&mut map, libc::SYS_fcntl, 1, &[libc::F_GETFD as u64]);
        }
        ThreadKind::VirtioBalloon => {
            allow(&mut map, VIRTIO_BALLOON);
            allow_args(&mut map, libc::SYS_ioctl, 1, ioctls::AGENT);
            // Debug builds check a descriptor is open when they close one (the epoll fd).
            allow_args(&mut map, libc::SYS_fcntl, 1, &[libc::F_GETFD as u64]);
        }
        ThreadKind::Api => {
            allow(&mut map, API);
            allow_args(&mut map, libc::SYS_ioctl, 1, ioctls::API);
            // Blocking-pool threads are threads of this process, named at their start.
            let thread = libc::CLONE_THREAD as u64;
            let rule = SeccompRule::new(vec![cond(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(thread),
                thread,
            )])
            .expect("one condition");
            map.insert(libc::SYS_clone, vec![rule]);
            allow_args(&mut map, libc::SYS_prctl, 0, &[libc::PR_SET_NAME as u64]);
        }
        ThreadKind::VirtioVsock => {
            allow(&mut map, VIRTIO_VSOCK);
            allow_args(&mut map, libc::SYS_socket, 0, &[libc::AF_UNIX as u64]);
            allow_args(&mut map, libc::SYS_ioctl, 1, ioctls::VSOCK);
            // Debug builds check a descriptor is open (`F_GETFD`) when closing it.
            let fcntl = [libc::F_GETFD, libc::F_GETFL, libc::F_SETFL];
            allow_args(&mut map, libc::SYS_fcntl, 1, &fcntl.map(|c| c as u64));
        }
    }
    map
}
