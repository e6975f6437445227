//! Driving real guests and reading what they cost the host: used by `tinyvmm bench` and by
//! the integration tests.
//!
//! - [`guest::GuestProc`]: a `tinyvmm run` child process whose serial console is read line by
//!   line and whose stdin accepts commands (the test guest's `serve` workload).
//! - [`procfs`]: memory (Pss from `smaps_rollup`) and CPU time of processes and threads, and
//!   the kernel's KSM knobs and counters, saved and restored.

pub mod guest;
pub mod procfs;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_termination_signal(_: libc::c_int) {
    TERMINATE.store(true, Ordering::Relaxed);
}

/// Turns SIGINT and SIGTERM into a flag that long-running loops check (the daemon between
/// rounds, the benchmarks while waiting), so that they stop through their normal exit
/// path and every destructor runs: guests are stopped, kernel KSM knobs restored.
pub fn install_termination_flag() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // A parent may have left them blocked (signal masks survive fork and exec).
        // SAFETY: sigset operations on a local set; pthread_sigmask with valid pointers.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
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

/// Sleeps for `d`, waking early (with an error) when a termination signal arrives.
pub fn sleep_unless_terminating(d: std::time::Duration) -> Result<(), String> {
    let end = std::time::Instant::now() + d;
    loop {
        if terminating() {
            return Err("interrupted".into());
        }
        let now = std::time::Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(std::time::Duration::from_millis(100)));
    }
}
