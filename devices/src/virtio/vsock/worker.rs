//! The device's thread, on the devices' worker helper ([`crate::virtio::worker`]): started
//! with the device, its start hook first (the VMM installs the thread's seccomp filter
//! there), then it waits for the transport's commands; while activated it serves one epoll
//! set over the queues' kick eventfds, the command eventfd, the listening socket, the host
//! programs and the connections' sockets (edge-triggered), and after each batch of events
//! drains TX, fills RX and interrupts the driver for the queues it used.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use vm_memory::GuestMemory;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::host::HostSide;
use super::muxer::{FdChange, Muxer};
use super::problems::Problem;
use super::queues::VsockQueues;
use crate::virtio::device::ThreadStart;
use crate::virtio::worker::{spawn_worker, Command, WorkerControl, WorkerInbox};
use crate::virtio::{ActivateContext, VirtioInterrupt};

const TOKEN_COMMAND: u64 = 0;
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

/// Starts the device's thread (`on_start` first) for a guest with `guest_cid`.
pub fn spawn<M: GuestMemory + Send + 'static>(
    guest_cid: u64,
    host: Arc<HostSide>,
    on_start: ThreadStart,
) -> std::io::Result<WorkerControl<M>> {
    spawn_worker("virtio-vsock", on_start, move |inbox| {
        run(&inbox, guest_cid, &host)
    })
}

/// What the thread does next.
enum Next<M> {
    Serve(ActivateContext<M>),
    Idle,
    Exit,
}

fn run<M: GuestMemory>(inbox: &WorkerInbox<M>, guest_cid: u64, host: &Arc<HostSide>) {
    let idle_set = match idle_epoll(inbox, host) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("virtio-vsock: epoll: {e}; the device stops");
            return;
        }
    };
    let mut next = Next::Idle;
    loop {
        next = match next {
            Next::Exit => return,
            Next::Idle => idle(inbox, host, &idle_set),
            Next::Serve(ctx) => match Worker::new(ctx, guest_cid, host.clone(), inbox) {
                Ok(w) => w.serve(inbox),
                Err(e) => {
                    tracing::error!("virtio-vsock: cannot serve the queues: {e}");
                    Next::Idle
                }
            },
        }
    }
}

/// The epoll set of an idle thread: the command eventfd and the listening socket.
fn idle_epoll<M>(inbox: &WorkerInbox<M>, host: &HostSide) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    for (fd, token) in [
        (inbox.wake_fd().as_raw_fd(), TOKEN_COMMAND),
        (host.listener().as_raw_fd(), TOKEN_LISTENER),
    ] {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    Ok(epoll)
}

/// Waits for the transport's next command. Host programs that connect meanwhile are
/// closed at once: no driver runs the device, so no guest port can answer.
fn idle<M>(inbox: &WorkerInbox<M>, host: &HostSide, epoll: &Epoll) -> Next<M> {
    let mut events = [EpollEvent::default(); 2];
    loop {
        match inbox.try_recv() {
            Some(Command::Activate(ctx)) => return Next::Serve(ctx),
            Some(Command::Reset) => {
                inbox.reset_done();
                continue;
            }
            None => {}
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => {
                tracing::error!("virtio-vsock: epoll_wait: {e}; the device stops");
                return Next::Exit;
            }
        };
        // A command first: a host program that connected right after an activation is
        // the activated device's to serve.
        if events[..n].iter().any(|e| e.data() == TOKEN_COMMAND) {
            continue;
        }
        while let Ok((refused, _)) = host.listener().accept() {
            drop(refused);
        }
    }
}

struct Worker<M> {
    queues: VsockQueues<M>,
    kicks: [Option<EventFd>; 3],
    interrupt: Arc<dyn VirtioInterrupt>,
    host: Arc<HostSide>,
    mux: Muxer,
    epoll: Epoll,
}

impl<M: GuestMemory> Worker<M> {
    fn new(
        ctx: ActivateContext<M>,
        guest_cid: u64,
        host: Arc<HostSide>,
        inbox: &WorkerInbox<M>,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(inbox.wake_fd().as_raw_fd(), TOKEN_COMMAND)?;
        add(host.listener().as_raw_fd(), TOKEN_LISTENER)?;
        let mut rx = None;
        let mut tx = None;
        let mut kicks = [None, None, None];
        for (index, queue, kick) in ctx.queues {
            match index {
                RX_QUEUE => rx = Some(queue),
                TX_QUEUE => tx = Some(queue),
                _ => {}
            }
            if let Some(slot) = kicks.get_mut(usize::from(index)) {
                add(kick.as_raw_fd(), TOKEN_RX + u64::from(index))?;
                *slot = Some(kick);
            }
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            return Err(std::io::Error::other("RX or TX queue missing"));
        };
        Ok(Worker {
            queues: VsockQueues {
                mem: ctx.mem,
                rx,
                tx,
                writes: ctx.writes,
            },
            kicks,
            interrupt: ctx.interrupt,
            host,
            mux: Muxer::new(guest_cid),
            epoll,
        })
    }

    /// Serves until the transport says otherwise.
    fn serve(mut self, inbox: &WorkerInbox<M>) -> Next<M> {
        let mut events = vec![EpollEvent::default(); 64];
        // Buffers and packets may have been queued before activation.
        self.pump();
        loop {
            // While a host program waits for the guest's answer, wake up to time it out.
            let timeout_ms = if self.mux.requests_pending() { 500 } else { -1 };
            let n = match self.epoll.wait(timeout_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-vsock: epoll_wait: {e}; the device stops");
                    return Next::Exit;
                }
            };
            for ev in &events[..n] {
                if ev.data() == TOKEN_COMMAND {
                    match inbox.try_recv() {
                        Some(Command::Activate(ctx)) => return Next::Serve(ctx),
                        Some(Command::Reset) => {
                            drop(self);
                            inbox.reset_done();
                            return Next::Idle;
                        }
                        None => {}
                    }
                } else {
                    self.on_event(ev.data(), ev.event_set());
                }
            }
            self.mux.expire_requests(Instant::now());
            self.pump();
        }
    }

    fn on_event(&mut self, token: u64, set: EventSet) {
        match token {
            TOKEN_RX | TOKEN_TX | TOKEN_EVENT => {
                if let Some(k) = &self.kicks[(token - TOKEN_RX) as usize] {
                    let _ = k.read();
                }
            }
            TOKEN_LISTENER => self.mux.accept_host(&self.host),
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
    }

    /// Drains TX, fills RX, applies the table's descriptor changes, interrupts.
    fn pump(&mut self) {
        let tx_used = self.queues.process_tx(&mut self.mux, &self.host);
        self.apply_fd_changes();
        let rx_used = self.queues.process_rx(&mut self.mux);
        self.apply_fd_changes();
        for (used, index) in [(rx_used, RX_QUEUE), (tx_used, TX_QUEUE)] {
            if used {
                if let Err(e) = self.interrupt.signal_used_queue(index) {
                    self.mux.problems.note_error(Problem::Host, &e);
                }
            }
        }
    }

    fn apply_fd_changes(&mut self) {
        let stream_events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        for change in std::mem::take(&mut self.mux.fd_changes) {
            let (op, fd, events, tag) = match change {
                FdChange::AddConnection(fd) => {
                    (ControlOperation::Add, fd, stream_events, TAG_CONNECTION)
                }
                FdChange::Promote(fd) => {
                    (ControlOperation::Modify, fd, stream_events, TAG_CONNECTION)
                }
                FdChange::AddPending(fd) => (
                    ControlOperation::Add,
                    fd,
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    TAG_PENDING,
                ),
                // Closing the descriptor removed it from the set.
                FdChange::Gone(_) => continue,
            };
            let r = self
                .epoll
                .ctl(op, fd, EpollEvent::new(events, tag | fd as u64));
            if let Err(e) = r {
                self.mux.problems.note_error(Problem::Host, &e);
            }
        }
    }
}
