//! The device's thread. It is started with the device, before the VM runs: the driver
//! activates a device from a vCPU thread, whose seccomp filter allows no new threads. The
//! thread runs its start hook first (the VMM installs the thread's filter there), then
//! waits for the transport's commands; while activated it serves one epoll set over the
//! queues' kick eventfds, the command eventfd, the listening socket, the host programs and
//! the connections' sockets (edge-triggered), and after each batch of events drains TX,
//! fills RX and interrupts the driver for the queues it used.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::GuestMemory;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::host::HostSide;
use super::muxer::{FdChange, Muxer};
use super::problems::Problem;
use super::queues::VsockQueues;
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

/// How long a reset waits for the thread to let go of its queues.
const RESET_TIMEOUT: Duration = Duration::from_secs(2);

/// Run first on the device's thread (the VMM installs the thread's seccomp filter there).
pub type ThreadStart = Box<dyn FnOnce() + Send>;

/// What the thread is told.
enum Command<M> {
    /// Serve these queues.
    Activate(ActivateContext<M>),
    /// Forget the queues and the connections; confirm.
    Reset,
}

/// The device's end of its thread: commands, and the thread's handle (stopped and joined
/// when dropped).
pub struct WorkerControl<M> {
    tx: Option<mpsc::Sender<Command<M>>>,
    wake: EventFd,
    done: mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl<M> WorkerControl<M> {
    /// Hands the thread its queues.
    pub fn activate(&self, ctx: ActivateContext<M>) -> std::io::Result<()> {
        self.send(Command::Activate(ctx))
    }

    /// Takes the queues away and closes every connection; `false` if the thread did not
    /// confirm in time.
    pub fn reset(&self) -> bool {
        while self.done.try_recv().is_ok() {}
        self.send(Command::Reset).is_ok() && self.done.recv_timeout(RESET_TIMEOUT).is_ok()
    }

    fn send(&self, c: Command<M>) -> std::io::Result<()> {
        let gone = || std::io::Error::other("the vsock device's thread is gone");
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send(c)
            .map_err(|_| gone())?;
        self.wake.write(1)
    }
}

impl<M> Drop for WorkerControl<M> {
    fn drop(&mut self) {
        self.tx = None;
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the device's thread (`on_start` first) for a guest with `guest_cid`.
pub fn spawn<M: GuestMemory + Send + 'static>(
    guest_cid: u64,
    host: Arc<HostSide>,
    on_start: Option<ThreadStart>,
) -> std::io::Result<WorkerControl<M>> {
    let (tx, rx) = mpsc::channel();
    let (done_tx, done) = mpsc::channel();
    let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
    let inbox = Inbox {
        rx,
        wake: wake.try_clone()?,
        done: done_tx,
    };
    let thread = std::thread::Builder::new()
        .name("virtio-vsock".into())
        .spawn(move || {
            if let Some(f) = on_start {
                f();
            }
            run(&inbox, guest_cid, &host);
        })?;
    Ok(WorkerControl {
        tx: Some(tx),
        wake,
        done,
        thread: Some(thread),
    })
}

struct Inbox<M> {
    rx: mpsc::Receiver<Command<M>>,
    wake: EventFd,
    done: mpsc::Sender<()>,
}

/// What the thread does next.
enum Next<M> {
    Serve(ActivateContext<M>),
    Idle,
    Exit,
}

fn run<M: GuestMemory>(inbox: &Inbox<M>, guest_cid: u64, host: &Arc<HostSide>) {
    let mut next = Next::Idle;
    loop {
        next = match next {
            Next::Exit => return,
            Next::Idle => {
                let c = inbox.rx.recv();
                let _ = inbox.wake.read();
                match c {
                    Ok(Command::Activate(ctx)) => Next::Serve(ctx),
                    Ok(Command::Reset) => {
                        let _ = inbox.done.send(());
                        Next::Idle
                    }
                    Err(_) => Next::Exit,
                }
            }
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

struct Worker<M> {
    queues: VsockQueues<M>,
    kicks: [Option<vmm_sys_util::eventfd::EventFd>; 3],
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
        inbox: &Inbox<M>,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(inbox.wake.as_raw_fd(), TOKEN_COMMAND)?;
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
    fn serve(mut self, inbox: &Inbox<M>) -> Next<M> {
        let mut events = vec![EpollEvent::default(); 64];
        // Buffers and packets may have been queued before activation.
        self.pump();
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-vsock: epoll_wait: {e}; the device stops");
                    return Next::Exit;
                }
            };
            for ev in &events[..n] {
                if ev.data() == TOKEN_COMMAND {
                    let _ = inbox.wake.read();
                    match inbox.rx.try_recv() {
                        Ok(Command::Activate(ctx)) => return Next::Serve(ctx),
                        Ok(Command::Reset) => {
                            drop(self);
                            let _ = inbox.done.send(());
                            return Next::Idle;
                        }
                        Err(TryRecvError::Empty) => {}
                        Err(TryRecvError::Disconnected) => return Next::Exit,
                    }
                } else {
                    self.on_event(ev.data(), ev.event_set());
                }
            }
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
