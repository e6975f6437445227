//! The balloon's worker thread: serves the queues (inflate, deflate, statistics,
//! reporting), drops the pages the guest gives up, raises the configuration-change
//! interrupt when the VM API changes the target, and asks the driver for fresh statistics
//! every [`STATS_INTERVAL`].

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::config::{queue_role, QueueRole};
use super::discard::RamDiscard;
use super::requests::{check_ranges, pfn_ranges, read_stats, reported_ranges, Checked};
use super::state::Shared;
use crate::virtio::device::{ActivateContext, GuestWrites, VirtioInterrupt};
use crate::virtio::worker::{Command, WorkerInbox};

/// How often the device asks the driver for fresh statistics.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);

const TOKEN_INBOX: u64 = 1000;
const TOKEN_TARGET: u64 = 1001;

/// Warnings given once per worker (a driver that sends bad ranges keeps sending them).
#[derive(Default)]
struct Warned {
    bad_ranges: bool,
    discard: bool,
}

/// The worker's state while the driver runs.
struct Serving {
    mem: GuestMemoryMmap,
    queues: Vec<(QueueRole, u16, Queue, EventFd)>,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// The used rings are the only guest memory the device writes; reported so that
    /// memory sharing re-digests their pages.
    writes: Arc<dyn GuestWrites>,
    /// The statistics buffer the driver gave last, held until the next request.
    stats_head: Option<(usize, u16)>,
    last_stats_request: Instant,
}

/// The worker's body: waits for activation, serves, and goes back to waiting on reset.
pub(super) fn run(
    inbox: WorkerInbox<GuestMemoryMmap>,
    shared: Arc<Shared>,
    discard: Arc<dyn RamDiscard>,
) {
    let mut warned = Warned::default();
    inbox.run(|ctx| serve(&inbox, &shared, discard.as_ref(), ctx, &mut warned));
}

/// Serves the queues until a command comes (returned) or the device is gone (`None`).
fn serve(
    inbox: &WorkerInbox<GuestMemoryMmap>,
    shared: &Shared,
    discard: &dyn RamDiscard,
    ctx: ActivateContext<GuestMemoryMmap>,
    warned: &mut Warned,
) -> Option<Command<GuestMemoryMmap>> {
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("virtio-balloon: epoll: {e}; the device stops serving");
            return inbox.recv();
        }
    };
    let mut s = Serving {
        mem: ctx.mem,
        queues: Vec::new(),
        interrupt: ctx.interrupt,
        writes: ctx.writes,
        stats_head: None,
        last_stats_request: Instant::now(),
    };
    let add = |fd: i32, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    for (i, (index, queue, kick)) in ctx.queues.into_iter().enumerate() {
        let Some(role) = queue_role(index, ctx.acked_features) else {
            continue;
        };
        if let Err(e) = add(kick.as_raw_fd(), i as u64) {
            tracing::error!("virtio-balloon: epoll: {e}");
        }
        s.queues.push((role, index, queue, kick));
    }
    let _ = add(inbox.wake_fd().as_raw_fd(), TOKEN_INBOX);
    let _ = add(shared.target_changed.as_raw_fd(), TOKEN_TARGET);
    shared.active.store(true, Ordering::SeqCst);
    if shared.target_pages.load(Ordering::SeqCst) != 0 {
        let _ = s.interrupt.signal_config_change();
    }
    let mut events = vec![EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(STATS_INTERVAL.as_millis() as i32, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => {
                tracing::error!("virtio-balloon: epoll_wait: {e}; the device stops serving");
                shared.active.store(false, Ordering::SeqCst);
                return inbox.recv();
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_INBOX => {
                    if let Some(cmd) = inbox.try_recv() {
                        shared.active.store(false, Ordering::SeqCst);
                        return Some(cmd);
                    }
                }
                TOKEN_TARGET => {
                    let _ = shared.target_changed.read();
                    let _ = s.interrupt.signal_config_change();
                }
                q => {
                    let q = q as usize;
                    let _ = s.queues[q].3.read();
                    serve_queue(&mut s, q, shared, discard, warned);
                }
            }
        }
        request_stats_if_due(&mut s);
    }
}

/// Takes every request off queue `q` and completes it.
fn serve_queue(
    s: &mut Serving,
    q: usize,
    shared: &Shared,
    discard: &dyn RamDiscard,
    warned: &mut Warned,
) {
    let role = s.queues[q].0;
    let mut used = false;
    while let Some(chain) = s.queues[q].2.pop_descriptor_chain(&s.mem) {
        let head = chain.head_index();
        match role {
            QueueRole::Inflate | QueueRole::Deflate => {
                let (raw, bad_bufs) = pfn_ranges(&s.mem, chain);
                let mut checked = check_ranges(&s.mem, &raw);
                checked.bad += bad_bufs;
                if role == QueueRole::Inflate {
                    let dropped = drop_ranges(&checked, discard, shared, warned);
                    shared.count(|c| c.inflated_pages += dropped);
                } else {
                    shared.count(|c| c.deflated_pages += checked.pages());
                }
                note_bad(&checked, shared, warned);
            }
            QueueRole::Reporting => {
                let raw = reported_ranges(chain);
                let checked = check_ranges(&s.mem, &raw);
                let dropped = drop_ranges(&checked, discard, shared, warned);
                shared.count(|c| {
                    c.reported_pages += dropped;
                    c.reports += 1;
                });
                note_bad(&checked, shared, warned);
            }
            QueueRole::Stats => {
                match read_stats(&s.mem, chain) {
                    Some(stats) => {
                        *shared.stats.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some((stats, Instant::now()));
                    }
                    None => shared.count(|c| c.bad_ranges += 1),
                }
                // Held until the next statistics request (the driver refills it then).
                if let Some((qi, old)) = s.stats_head.replace((q, head)) {
                    let _ = s.queues[qi].2.add_used(&s.mem, old, 0);
                    used = true;
                }
                continue;
            }
        }
        if s.queues[q].2.add_used(&s.mem, head, 0).is_ok() {
            used = true;
        }
    }
    if used {
        let (_, index, queue, _) = &mut s.queues[q];
        s.writes.wrote(queue.used_ring(), used_ring_bytes(queue));
        if queue.needs_notification(&s.mem).unwrap_or(true) {
            let _ = s.interrupt.signal_used_queue(*index);
        }
    }
}

/// Drops each checked range; returns the pages dropped. A failure leaves its range as it
/// was (nothing is lost, the host just keeps the memory) and is logged once.
fn drop_ranges(
    checked: &Checked,
    discard: &dyn RamDiscard,
    shared: &Shared,
    warned: &mut Warned,
) -> u64 {
    let mut dropped = 0;
    for r in &checked.ranges {
        match discard.discard(*r) {
            Ok(()) => dropped += r.len / super::config::BALLOON_PAGE,
            Err(e) => {
                shared.count(|c| c.discard_failures += 1);
                if !std::mem::replace(&mut warned.discard, true) {
                    tracing::warn!("virtio-balloon: {e} (logged once)");
                }
            }
        }
    }
    dropped
}

fn note_bad(checked: &Checked, shared: &Shared, warned: &mut Warned) {
    if checked.bad == 0 {
        return;
    }
    shared.count(|c| c.bad_ranges += checked.bad);
    if !std::mem::replace(&mut warned.bad_ranges, true) {
        tracing::warn!(
            bad = checked.bad,
            "virtio-balloon: the driver gave ranges outside RAM, unaligned or overlapping; \
             they are ignored (logged once)"
        );
    }
}

/// Returns the held statistics buffer (asking the driver for fresh numbers) once
/// [`STATS_INTERVAL`] has passed since the last request.
fn request_stats_if_due(s: &mut Serving) {
    if s.last_stats_request.elapsed() < STATS_INTERVAL {
        return;
    }
    if let Some((q, head)) = s.stats_head.take() {
        s.last_stats_request = Instant::now();
        let (_, index, queue, _) = &mut s.queues[q];
        if queue.add_used(&s.mem, head, 0).is_ok() {
            s.writes.wrote(queue.used_ring(), used_ring_bytes(queue));
            let _ = s.interrupt.signal_used_queue(*index);
        }
    }
}

/// Bytes of a split queue's used ring: flags, index, the elements, `avail_event`.
fn used_ring_bytes(queue: &Queue) -> u64 {
    6 + 8 * u64::from(queue.size())
}
