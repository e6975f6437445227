//! Termination signals: SIGINT, SIGTERM and SIGHUP.
//!
//! A VMM process blocks them in every thread and reads them from a signalfd (so that a
//! signal never interrupts a vCPU or the agent in the middle of page work); a process
//! that it starts must not inherit that mask, or it could never be stopped; tools that
//! poll instead (the daemon's scanner, the benchmarks) use a flag set by a handler.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The signals that ask a tinyvmm process to stop cleanly.
pub const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// A set of the [`TERMINATION_SIGNALS`].
pub fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise the local set and
    // cannot fail for valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in TERMINATION_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn change_mask(how: libc::c_int, set: &libc::sigset_t) -> std::io::Result<()> {
    // SAFETY: `set` is a valid, initialised sigset; the old set is not asked for.
    let rc = unsafe { libc::pthread_sigmask(how, set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Blocks the termination signals in the calling thread, and so in every thread it starts
/// afterwards.
pub fn block_termination_signals() -> std::io::Result<()> {
    change_mask(libc::SIG_BLOCK, &termination_set())
}

/// Unblocks the termination signals in the calling thread (a parent may have left them
/// blocked: signal masks survive `fork` and `exec`).
pub fn unblock_termination_signals() -> std::io::Result<()> {
    change_mask(libc::SIG_UNBLOCK, &termination_set())
}

/// Makes `cmd`'s child a session leader with an empty signal mask, so that it outlives
/// its parent's terminal and can be stopped by SIGTERM whatever its parent blocked.
pub fn detach_with_clear_mask(cmd: &mut std::process::Command) {
    // SAFETY: the closure runs between fork and exec and calls only setsid and
    // sigprocmask, which are async-signal-safe, on a local set.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            libc::setsid();
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_termination_signal(_: libc::c_int) {
    TERMINATE.store(true, Ordering::Relaxed);
}

/// Unblocks SIGINT and SIGTERM and makes them set the flag read by [`terminating`]
/// (once per process; later calls do nothing).
pub fn install_termination_flag() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = unblock_termination_signals();
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            unsafe {
                libc::signal(
                    sig,
                    on_termination_signal as *const () as libc::sighandler_t,
                )
            };
        }
    });
}

/// Whether SIGINT or SIGTERM arrived since [`install_termination_flag`].
pub fn terminating() -> bool {
    TERMINATE.load(Ordering::Relaxed)
}

/// A termination signal arrived while waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted by a termination signal")
    }
}

impl std::error::Error for Interrupted {}

/// Sleeps for `d`, waking early (with [`Interrupted`]) when a termination signal arrives.
pub fn sleep_unless_terminating(d: Duration) -> Result<(), Interrupted> {
    let end = Instant::now() + d;
    loop {
        if terminating() {
            return Err(Interrupted);
        }
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(100)));
    }
}
