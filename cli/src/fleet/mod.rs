//! Driving real guests and reading what they cost the host: used by `tinyvmm bench` and by
//! the integration tests.
//!
//! - [`guest::GuestProc`]: a `tinyvmm run` child process whose serial console is read line by
//!   line and whose stdin accepts commands (the test guest's `serve` workload).
//! - [`procfs`]: memory (Pss from `smaps_rollup`) and CPU time of processes and threads, and
//!   the kernel's KSM knobs and counters, saved and restored.

pub mod guest;
pub mod procfs;

pub use tinyvmm_sys::signals::{install_termination_flag, sleep_unless_terminating, terminating};
