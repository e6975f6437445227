//! The virtio-blk worker thread: waits for activation, then serves the request queue
//! whenever the driver kicks it, until a reset.

use std::os::fd::AsRawFd;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::request::{parse, Disk, ParseError, Request};
use crate::virtio::worker::{Command, WorkerInbox};
use crate::virtio::{ActivateContext, GuestWrites, VirtioInterrupt};

const KICK: u64 = 0;
const COMMAND: u64 = 1;

/// The worker's life: idle until activated, serving until reset, until the device is gone.
pub fn run<M: GuestMemory>(inbox: WorkerInbox<M>, mut disk: Disk) {
    inbox.run(|ctx| match serve(&inbox, ctx, &mut disk) {
        Ok(cmd) => cmd,
        Err(e) => {
            tracing::error!("virtio-blk: worker stopped serving: {e}");
            inbox.recv()
        }
    });
}

/// Serves the queue until a command arrives; returns it.
fn serve<M: GuestMemory>(
    inbox: &WorkerInbox<M>,
    ctx: ActivateContext<M>,
    disk: &mut Disk,
) -> std::io::Result<Option<Command<M>>> {
    let ActivateContext {
        mem,
        mut queues,
        interrupt,
        writes,
        ..
    } = ctx;
    let (_, mut queue, kick) = queues.remove(0);
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        kick.as_raw_fd(),
        EpollEvent::new(EventSet::IN, KICK),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        inbox.wake_fd().as_raw_fd(),
        EpollEvent::new(EventSet::IN, COMMAND),
    )?;
    let mut broken = false;
    // Requests the driver queued before its first kick reached us.
    process_queue(&mem, &mut queue, disk, &*interrupt, &*writes, &mut broken);
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            match ev.data() {
                COMMAND => {
                    if let Some(cmd) = inbox.try_recv() {
                        return Ok(Some(cmd));
                    }
                }
                _ => {
                    let _ = kick.read();
                    if !broken {
                        process_queue(&mem, &mut queue, disk, &*interrupt, &*writes, &mut broken);
                    }
                }
            }
        }
    }
}

/// Completes every request the driver made available; marks the queue broken (and stops
/// using it until a reset) when its available ring is out of spec.
pub fn process_queue<M: GuestMemory>(
    mem: &M,
    queue: &mut Queue,
    disk: &mut Disk,
    interrupt: &dyn VirtioInterrupt,
    writes: &dyn GuestWrites,
    broken: &mut bool,
) {
    let mut used = false;
    loop {
        let chain = match queue.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => {
                tracing::warn!("virtio-blk: queue out of spec, no longer served: {e}");
                *broken = true;
                break;
            }
        };
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        let written = match parse(chain) {
            Ok(req) => req.execute(mem, disk, writes).written,
            Err(ParseError::Malformed(status)) => Request::ioerr(mem, status, writes),
            Err(ParseError::NoStatus) => {
                tracing::debug!(head, "virtio-blk: request without a status byte");
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, written) {
            tracing::warn!("virtio-blk: queue out of spec, no longer served: {e}");
            *broken = true;
            break;
        }
        used = true;
    }
    if used {
        report_used_ring(queue, writes);
        if let Err(e) = interrupt.signal_used_queue(0) {
            tracing::warn!("virtio-blk: interrupt: {e}");
        }
    }
}

/// The used ring is guest RAM the device writes too.
fn report_used_ring(queue: &Queue, writes: &dyn GuestWrites) {
    // flags, idx, ring[size], avail_event.
    let len = 4 + 8 * u64::from(queue.size()) + 2;
    writes.wrote(queue.used_ring(), len);
}
