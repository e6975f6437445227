//! How devices and vCPUs ask the VMM to stop.

use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stops. The first reason recorded wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the CPU through the i8042 (`reboot=k`): a clean shutdown.
    GuestReset,
    /// The guest wrote `code` to the debug exit port.
    DebugExit(u8),
    /// The VMM received a termination signal (SIGINT, SIGTERM).
    Signal(i32),
    /// A shutdown asked for through the API.
    Requested,
    /// A vCPU stopped on an exit the VMM cannot handle; the message says which.
    VcpuFault(String),
}

/// A one-shot "stop the VM" signal shared by devices, vCPUs and the event loop.
#[derive(Debug, Clone)]
pub struct ExitSignal {
    reason: Arc<Mutex<Option<ExitReason>>>,
    evt: Arc<EventFd>,
}

impl ExitSignal {
    /// A new signal with its eventfd (readable once an exit is requested).
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Arc::new(Mutex::new(None)),
            evt: Arc::new(EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?),
        })
    }

    /// Records `reason` unless another was recorded first, and wakes the event loop.
    pub fn request(&self, reason: ExitReason) {
        let mut r = crate::bus::lock(&self.reason);
        if r.is_none() {
            tracing::debug!(?reason, "exit requested");
            *r = Some(reason);
        }
        drop(r);
        // An eventfd write only fails on counter overflow, which a one-shot cannot reach.
        let _ = self.evt.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        crate::bus::lock(&self.reason).clone()
    }

    /// The eventfd to poll.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.request(ExitReason::DebugExit(1));
        s.request(ExitReason::GuestReset);
        assert_eq!(s.reason(), Some(ExitReason::DebugExit(1)));
        assert_eq!(s.eventfd().read().unwrap(), 2);
    }
}
