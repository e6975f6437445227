//! Host OS helpers that more than one tinyvmm crate needs, each in one place: which
//! signals end a process and how they are masked ([`signals`]), Unix sockets only their
//! owner may connect to and the credentials of a socket's peer ([`socket`]), directories
//! only their owner may change ([`dir`]), dropping many scattered memory ranges at once
//! ([`dontneed`]), anonymous memory files ([`memfd`]), watching another process for its
//! exit ([`process`]), dropping to another user with no capabilities ([`jail`]), reporting
//! a system call a seccomp filter refused ([`sigsys`]) and the host's mapping limit
//! ([`vm_limits`]).
//!
//! Everything here is a thin, documented wrapper around one or two system calls; the
//! policy (which thread blocks what, which directory a socket lives in) stays with the
//! callers.

pub mod dir;
pub mod dontneed;
pub mod jail;
pub mod memfd;
pub mod process;
pub mod signals;
pub mod sigsys;
pub mod socket;
mod syscall_names;
pub mod vm_limits;
