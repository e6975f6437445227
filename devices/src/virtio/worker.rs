//! A device's worker thread, started with the device, before the VM runs.
//!
//! The driver activates and resets a device from a vCPU thread (its `DRIVER_OK` and
//! status-0 writes), and a vCPU thread runs under a seccomp filter that does not allow
//! starting threads; a thread also inherits its creator's filter. So a device starts its
//! worker when it is built (while the VMM's main thread is still unfiltered), the worker
//! installs its own filter first ([`ThreadStart`](super::device::ThreadStart)) and then waits for [`Command`]s: the
//! transport's activation hands it the queues, a reset takes them away again.
//!
//! The worker's serving loop polls [`WorkerInbox::wake_fd`] next to its queues' kick
//! eventfds and calls [`WorkerInbox::try_recv`] when it is readable; it confirms a reset
//! with [`WorkerInbox::reset_done`], and [`WorkerControl::reset`] waits for that so that
//! after a reset no thread touches the old queues.

use std::sync::mpsc;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK, EFD_SEMAPHORE};

use super::device::{ActivateContext, ThreadStart};

/// How long a reset waits for the worker to let go of its queues.
const RESET_TIMEOUT: Duration = Duration::from_secs(2);

/// What a worker is told.
pub enum Command<M> {
    /// Serve these queues.
    Activate(ActivateContext<M>),
    /// Stop serving and forget the queues; confirm with [`WorkerInbox::reset_done`].
    Reset,
}

/// The device's end: sends commands to its worker.
pub struct WorkerControl<M> {
    tx: mpsc::Sender<Command<M>>,
    wake: EventFd,
    done: mpsc::Receiver<()>,
}

impl<M> std::fmt::Debug for WorkerControl<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerControl").finish()
    }
}

/// The worker's end: receives commands.
pub struct WorkerInbox<M> {
    rx: mpsc::Receiver<Command<M>>,
    wake: EventFd,
    done: mpsc::Sender<()>,
}

impl<M> WorkerInbox<M> {
    /// Blocks until the next command; `None` once the device is gone.
    pub fn recv(&self) -> Option<Command<M>> {
        let c = self.rx.recv().ok();
        let _ = self.wake.read();
        c
    }

    /// The next command if one is waiting.
    pub fn try_recv(&self) -> Option<Command<M>> {
        let _ = self.wake.read();
        self.rx.try_recv().ok()
    }

    /// Readable when a command is waiting (for the worker's epoll set).
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Confirms a [`Command::Reset`]: the worker holds no queue any more.
    pub fn reset_done(&self) {
        let _ = self.done.send(());
    }

    /// A worker's life: idle until activated, then `serve` until it returns the command
    /// that ended its service (a reset: confirmed, idle again; a new activation: served;
    /// `None`: the device is gone), until the device is gone.
    pub fn run(&self, mut serve: impl FnMut(ActivateContext<M>) -> Option<Command<M>>) {
        let mut next = self.recv();
        loop {
            match next {
                None => return,
                Some(Command::Reset) => {
                    self.reset_done();
                    next = self.recv();
                }
                Some(Command::Activate(ctx)) => next = serve(ctx),
            }
        }
    }
}

impl<M> WorkerControl<M> {
    /// Hands the worker its queues.
    pub fn activate(&self, ctx: ActivateContext<M>) -> std::io::Result<()> {
        self.tx
            .send(Command::Activate(ctx))
            .map_err(|_| std::io::Error::other("the device's worker thread is gone"))?;
        self.wake.write(1)
    }

    /// Takes the queues away; `false` if the worker did not confirm in time.
    pub fn reset(&self) -> bool {
        while self.done.try_recv().is_ok() {}
        if self.tx.send(Command::Reset).is_err() || self.wake.write(1).is_err() {
            return false;
        }
        self.done.recv_timeout(RESET_TIMEOUT).is_ok()
    }
}

/// Starts a worker thread named `name` that runs `start` and then `body`.
pub fn spawn_worker<M, F>(
    name: &str,
    start: ThreadStart,
    body: F,
) -> std::io::Result<WorkerControl<M>>
where
    M: Send + 'static,
    F: FnOnce(WorkerInbox<M>) + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let (done_tx, done) = mpsc::channel();
    // One token per command (a semaphore eventfd), so that taking one command never
    // hides another that is waiting.
    let wake = EventFd::new(EFD_NONBLOCK | EFD_SEMAPHORE | libc::EFD_CLOEXEC)?;
    let inbox = WorkerInbox {
        rx,
        wake: wake.try_clone()?,
        done: done_tx,
    };
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            start();
            body(inbox)
        })?;
    Ok(WorkerControl { tx, wake, done })
}
