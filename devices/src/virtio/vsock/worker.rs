//! The device's thread: one epoll set over the queues' kick eventfds, the listening socket,
//! the host programs and the connections' sockets (edge-triggered); after each batch of
//! events it drains TX, fills RX and interrupts the driver for the queues it used.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::host::HostSide;
use super::muxer::{FdChange, Muxer};
use super::problems::Problem;
use super::queues::VsockQueues;
use crate::virtio::{ActivateError, VirtioInterrupt};

const TOKEN_STOP: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_EVENT: u64 = 3;
const TOKEN_LISTENER: u64 = 4;
const TAG_CONNECTION: u64 = 1 << 32;
const TAG_PENDING: u64 = 2 << 32;

/// Queue indices (virtio 1.2, 5.10.2).
pub const RX_QUEUE: u16 = 0;
/// The TX queue's index.
pub const TX_QUEUE: u16 = 1;
/// The event queue's index (the device never sends events).
pub const EVENT_QUEUE: u16 = 2;

/// A function run first on the device's thread (the VMM installs the thread's seccomp
/// filter there).
pub type ThreadStart = Arc<dyn Fn() + Send + Sync>;

/// What the worker serves.
pub struct WorkerSetup<M> {
    /// The queues.
    pub queues: VsockQueues<M>,
    /// Kick eventfds of RX, TX and (if configured) the event queue.
    pub kicks: [Option<EventFd>; 3],
    /// Interrupts towards the driver.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The host side's listening socket.
    pub host: Arc<HostSide>,
    /// The guest's CID.
    pub guest_cid: u64,
}

/// A running worker: stopped (and joined) by [`WorkerHandle::stop`] or when dropped.
pub struct WorkerHandle {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Stops the thread and waits for it; its connections close.
    pub fn stop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the worker thread.
pub fn spawn<M: GuestAddressSpace + Send + 'static>(
    setup: WorkerSetup<M>,
    on_start: Option<ThreadStart>,
) -> Result<WorkerHandle, ActivateError> {
    let host_err = |what, source| ActivateError::Host {
        device: "virtio-vsock",
        what,
        source,
    };
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| host_err("eventfd", e))?;
    let epoll = Epoll::new().map_err(|e| host_err("epoll", e))?;
    let add = |fd: RawFd, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    add(stop.as_raw_fd(), TOKEN_STOP).map_err(|e| host_err("epoll_ctl", e))?;
    add(setup.host.listener().as_raw_fd(), TOKEN_LISTENER).map_err(|e| host_err("epoll_ctl", e))?;
    for (i, kick) in setup.kicks.iter().enumerate() {
        if let Some(k) = kick {
            add(k.as_raw_fd(), TOKEN_RX + i as u64).map_err(|e| host_err("epoll_ctl", e))?;
        }
    }
    let stop_worker = stop.try_clone().map_err(|e| host_err("eventfd", e))?;
    let thread = std::thread::Builder::new()
        .name("virtio-vsock".into())
        .spawn(move || {
            if let Some(f) = on_start {
                f();
            }
            Worker {
                mux: Muxer::new(setup.guest_cid),
                setup,
                epoll,
                _stop: stop_worker,
            }
            .run();
        })
        .map_err(|e| host_err("thread", e))?;
    Ok(WorkerHandle {
        stop,
        thread: Some(thread),
    })
}

struct Worker<M> {
    setup: WorkerSetup<M>,
    mux: Muxer,
    epoll: Epoll,
    _stop: EventFd,
}

impl<M: GuestAddressSpace> Worker<M> {
    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-vsock: epoll_wait: {e}; the device stops");
                    return;
                }
            };
            for ev in &events[..n] {
                if !self.on_event(ev.data(), ev.event_set()) {
                    return;
                }
            }
            self.pump();
        }
    }

    /// Handles one event; `false` when told to stop.
    fn on_event(&mut self, token: u64, set: EventSet) -> bool {
        match token {
            TOKEN_STOP => return false,
            TOKEN_RX | TOKEN_TX | TOKEN_EVENT => {
                if let Some(k) = &self.setup.kicks[(token - TOKEN_RX) as usize] {
                    let _ = k.read();
                }
            }
            TOKEN_LISTENER => self.mux.accept_host(&self.setup.host),
            t if t & TAG_PENDING != 0 => self.mux.on_pending_readable(t as u32 as RawFd),
            t if t & TAG_CONNECTION != 0 => {
                let readable = set.intersects(
                    EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                );
                let writable = set.intersects(EventSet::OUT | EventSet::ERROR);
                self.mux
                    .on_connection_event(t as u32 as RawFd, readable, writable);
            }
            _ => {}
        }
        true
    }

    /// Drains TX, fills RX, applies the table's descriptor changes, interrupts.
    fn pump(&mut self) {
        let q = &mut self.setup.queues;
        let tx_used = q.process_tx(&mut self.mux, &self.setup.host);
        self.apply_fd_changes();
        let rx_used = self.setup.queues.process_rx(&mut self.mux);
        self.apply_fd_changes();
        for (used, index) in [(rx_used, RX_QUEUE), (tx_used, TX_QUEUE)] {
            if used {
                if let Err(e) = self.setup.interrupt.signal_used_queue(index) {
                    self.mux.problems.note_error(Problem::BadQueue, &e);
                }
            }
        }
    }

    fn apply_fd_changes(&mut self) {
        let stream_events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        for change in std::mem::take(&mut self.mux.fd_changes) {
            let r = match change {
                FdChange::AddConnection(fd) => self.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(stream_events, TAG_CONNECTION | fd as u64),
                ),
                FdChange::Promote(fd) => self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(stream_events, TAG_CONNECTION | fd as u64),
                ),
                FdChange::AddPending(fd) => self.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(
                        EventSet::IN | EventSet::EDGE_TRIGGERED,
                        TAG_PENDING | fd as u64,
                    ),
                ),
                // Closing the descriptor removed it from the set.
                FdChange::Gone(_) => Ok(()),
            };
            if let Err(e) = r {
                self.mux.problems.note_error(Problem::BadQueue, &e);
            }
        }
    }
}
