//! Watching another process for its exit.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Another process, watched with a pidfd where the kernel has them (else probed with
/// signal 0, which a recycled pid can fool).
#[derive(Debug)]
pub struct ProcessWatch {
    pid: u32,
    pidfd: Option<OwnedFd>,
}

impl ProcessWatch {
    /// Starts watching `pid`.
    pub fn new(pid: u32) -> Self {
        // SAFETY: pidfd_open takes a pid and flags; it returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        let pidfd = (fd >= 0).then(|| {
            // SAFETY: a new descriptor that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(fd as i32) }
        });
        Self { pid, pidfd }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process has exited.
    pub fn exited(&self) -> bool {
        match &self.pidfd {
            Some(fd) => {
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, zero timeout.
                unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
            }
            None => {
                // SAFETY: signal 0 only checks for existence.
                let rc = unsafe { libc::kill(self.pid as libc::pid_t, 0) };
                rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
            }
        }
    }
}
