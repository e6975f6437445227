//! What the balloon shares with the rest of the VMM: the target the VM API sets, the size
//! the driver reports, the guest's latest statistics and the device's counters.
//!
//! The API thread only stores a new target and signals an eventfd; the balloon's worker
//! thread then raises the configuration-change interrupt, so that the API thread never
//! touches the transport or guest memory.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::STAT_TAGS;

/// The guest's memory statistics, by the tags of the virtio specification (see
/// [`STAT_TAGS`]); a tag the guest did not send is `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestStats {
    values: [Option<u64>; STAT_TAGS.len()],
}

impl GuestStats {
    /// Records `value` for `tag`; unknown tags are ignored (`false`).
    pub fn set(&mut self, tag: u16, value: u64) -> bool {
        match self.values.get_mut(usize::from(tag)) {
            Some(v) => {
                *v = Some(value);
                true
            }
            None => false,
        }
    }

    /// The value of the statistic named `name` (Firecracker's names: `free_memory`, ...).
    pub fn get(&self, name: &str) -> Option<u64> {
        STAT_TAGS
            .iter()
            .position(|(_, n)| *n == name)
            .and_then(|i| self.values[i])
    }
}

/// What the device counted since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonCounters {
    /// Pages the guest put into the balloon (inflate queue), each dropped from the host.
    pub inflated_pages: u64,
    /// Pages the guest took back (deflate queue).
    pub deflated_pages: u64,
    /// Pages of free ranges the guest reported (reporting queue), each dropped from the host.
    pub reported_pages: u64,
    /// Reporting requests served.
    pub reports: u64,
    /// Ranges ignored as invalid (outside RAM, unaligned, overlapping another of the same
    /// request, or a descriptor of the wrong direction).
    pub bad_ranges: u64,
    /// Ranges the host failed to drop (left as they were: nothing lost).
    pub discard_failures: u64,
}

/// The balloon's state as the VM API shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonStatus {
    /// The target size in 4 KiB pages (what the host asks for).
    pub target_pages: u32,
    /// The balloon's size in 4 KiB pages as the driver last reported it.
    pub actual_pages: u32,
    /// Whether the driver accepted deflate-on-OOM.
    pub deflate_on_oom: bool,
    /// Whether the driver is running (it set `DRIVER_OK`).
    pub active: bool,
    /// The device's counters.
    pub counters: BalloonCounters,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) target_pages: AtomicU32,
    pub(super) actual_pages: AtomicU32,
    pub(super) acked_features: AtomicU64,
    pub(super) active: std::sync::atomic::AtomicBool,
    pub(super) counters: Mutex<BalloonCounters>,
    pub(super) stats: Mutex<Option<(GuestStats, Instant)>>,
    /// Signalled when the target changes; the worker raises the config interrupt.
    pub(super) target_changed: EventFd,
}

impl Shared {
    pub(super) fn new(target_pages: u32) -> std::io::Result<Self> {
        Ok(Self {
            target_pages: AtomicU32::new(target_pages),
            actual_pages: AtomicU32::new(0),
            acked_features: AtomicU64::new(0),
            active: std::sync::atomic::AtomicBool::new(false),
            counters: Mutex::new(BalloonCounters::default()),
            stats: Mutex::new(None),
            target_changed: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    pub(super) fn count(&self, f: impl FnOnce(&mut BalloonCounters)) {
        f(&mut self.counters.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// The VMM's handle on its balloon (for the VM API): cheap to clone.
#[derive(Debug, Clone)]
pub struct BalloonHandle(pub(super) Arc<Shared>);

impl BalloonHandle {
    /// Asks the guest for a balloon of `pages` 4 KiB pages: the driver is told through a
    /// configuration-change interrupt (raised by the device's worker thread).
    pub fn set_target_pages(&self, pages: u32) -> std::io::Result<()> {
        self.0.target_pages.store(pages, Ordering::SeqCst);
        self.0.target_changed.write(1)
    }

    /// The balloon's state now.
    pub fn status(&self) -> BalloonStatus {
        let acked = self.0.acked_features.load(Ordering::SeqCst);
        BalloonStatus {
            target_pages: self.0.target_pages.load(Ordering::SeqCst),
            actual_pages: self.0.actual_pages.load(Ordering::SeqCst),
            deflate_on_oom: acked & (1 << super::config::VIRTIO_BALLOON_F_DEFLATE_ON_OOM) != 0,
            active: self.0.active.load(Ordering::SeqCst),
            counters: *self.0.counters.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// The guest's latest statistics and when they came, if it sent any.
    pub fn statistics(&self) -> Option<(GuestStats, Instant)> {
        *self.0.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}
