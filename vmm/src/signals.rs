//! Termination signals and exit requests as events of the VMM's event loop.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use event_manager::{EventOps, Events, MutEventSubscriber};
use tinyvmm_devices::{ExitReason, ExitSignal};
use vmm_sys_util::epoll::EventSet;

/// Turns SIGINT/SIGTERM/SIGHUP into a clean exit request through a signalfd.
///
/// The signals are blocked in the calling thread before any vCPU thread starts, so every
/// thread inherits the mask and only the signalfd sees them.
pub struct SignalWatcher {
    fd: OwnedFd,
    exit: ExitSignal,
}

impl SignalWatcher {
    pub fn new(exit: ExitSignal) -> std::io::Result<Self> {
        tinyvmm_sys::signals::block_termination_signals()?;
        let set = tinyvmm_sys::signals::termination_set();
        // SAFETY: `set` is a valid, initialised sigset; signalfd has no other preconditions.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, exit })
    }
}

impl MutEventSubscriber for SignalWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // SAFETY: signalfd_siginfo is plain data; zero is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is valid for `size` bytes; the fd is ours.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n as usize == size {
            tracing::info!(signal = info.ssi_signo, "stopping the guest on signal");
            self.exit.request(ExitReason::Signal(info.ssi_signo as i32));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            tracing::error!("cannot watch signals: {e:?}");
        }
    }
}

/// Wakes the event loop when someone requests an exit.
pub struct ExitWatcher {
    exit: ExitSignal,
}

impl ExitWatcher {
    pub fn new(exit: ExitSignal) -> Self {
        Self { exit }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.eventfd().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.eventfd(), EventSet::IN)) {
            tracing::error!("cannot watch exit requests: {e:?}");
        }
    }
}
