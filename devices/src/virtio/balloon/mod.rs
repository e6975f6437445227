//! virtio-balloon: the guest gives memory back.
//!
//! Three ways, all offered:
//! - **inflate / deflate** (the classic balloon): the VM API sets a target
//!   ([`BalloonHandle::set_target_pages`]), the driver puts that many pages into the
//!   balloon (inflate queue; the host drops them) or takes them back (deflate queue);
//!   with `VIRTIO_BALLOON_F_DEFLATE_ON_OOM` the guest may deflate under memory pressure;
//! - **free page reporting** (`VIRTIO_BALLOON_F_REPORTING`): the guest's allocator reports
//!   ranges it holds free; the host drops them and completes the request, after which the
//!   guest may use the pages again (they read zero, or whatever the guest writes);
//! - **statistics** (`VIRTIO_BALLOON_F_STATS_VQ`): the guest's memory counters, asked for
//!   every [`worker::STATS_INTERVAL`] and shown by the VM API under Firecracker's names.
//!
//! Pages are dropped through a [`RamDiscard`] ([`DontNeed`] unless the VMM merges guest
//! memory, see [`discard`]). Every range is checked first ([`requests`]).
//!
//! Files: `config` (what the driver sees), `state` (what the VMM sees), `requests` (queue
//! contents to checked ranges), `discard`, `worker` (the serving thread), this file (the
//! device model).

pub mod config;
pub mod discard;
pub mod requests;
pub mod state;
#[cfg(test)]
mod tests;
pub mod worker;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use vm_memory::GuestMemoryMmap;

pub use config::{
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ,
};
pub use discard::{DiscardError, DontNeed, HostRange, RamDiscard};
pub use state::{BalloonCounters, BalloonHandle, BalloonStatus, GuestStats};

use super::device::ThreadStart;
use super::device::{ActivateContext, ActivateError, VirtioDevice};
use super::worker::{spawn_worker, WorkerControl};
use config::{queue_role, CONFIG_ACTUAL, CONFIG_NUM_PAGES, CONFIG_SIZE, QUEUE_SIZE};
use state::Shared;

const NAME: &str = "virtio-balloon";

/// The virtio-balloon device model.
#[derive(Debug)]
pub struct Balloon {
    shared: Arc<Shared>,
    /// Handed to the worker when it starts.
    discard: Option<Arc<dyn RamDiscard>>,
    worker: Option<WorkerControl<GuestMemoryMmap>>,
}

impl std::fmt::Debug for dyn RamDiscard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RamDiscard")
    }
}

impl Balloon {
    /// A balloon whose initial target is `target_pages` 4 KiB pages, dropping pages through
    /// `discard`; returns the device and the VMM's handle on it. Its worker thread starts
    /// with [`VirtioDevice::start_worker`].
    pub fn new(
        target_pages: u32,
        discard: Arc<dyn RamDiscard>,
    ) -> std::io::Result<(Self, BalloonHandle)> {
        let shared = Arc::new(Shared::new(target_pages)?);
        Ok((
            Self {
                shared: shared.clone(),
                discard: Some(discard),
                worker: None,
            },
            BalloonHandle(shared),
        ))
    }

    fn worker(&self) -> Result<&WorkerControl<GuestMemoryMmap>, ActivateError> {
        self.worker
            .as_ref()
            .ok_or_else(|| ActivateError::BadQueues {
                device: NAME,
                why: "the worker thread was never started".into(),
            })
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let target = self.shared.target_pages.load(Ordering::SeqCst);
        let actual = self.shared.actual_pages.load(Ordering::SeqCst);
        c[CONFIG_NUM_PAGES as usize..][..4].copy_from_slice(&target.to_le_bytes());
        c[CONFIG_ACTUAL as usize..][..4].copy_from_slice(&actual.to_le_bytes());
        c
    }
}

impl VirtioDevice<GuestMemoryMmap> for Balloon {
    fn name(&self) -> &'static str {
        NAME
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 4]
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BALLOON_F_STATS_VQ)
            | (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
            | (1 << VIRTIO_BALLOON_F_REPORTING)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| c.get(o + i).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's to write.
        let mut c = self.config_bytes();
        for (i, b) in data.iter().enumerate() {
            let at = offset as usize + i;
            if (CONFIG_ACTUAL as usize..CONFIG_ACTUAL as usize + 4).contains(&at) {
                c[at] = *b;
            }
        }
        let actual = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        self.shared.actual_pages.store(actual, Ordering::SeqCst);
    }

    fn start_worker(&mut self, start: ThreadStart) -> Result<(), ActivateError> {
        let Some(discard) = self.discard.take() else {
            return Ok(());
        };
        let shared = self.shared.clone();
        let worker = spawn_worker(NAME, start, move |inbox| {
            worker::run(inbox, shared, discard)
        })
        .map_err(|source| ActivateError::Host {
            device: NAME,
            what: "start the worker thread",
            source,
        })?;
        self.worker = Some(worker);
        Ok(())
    }

    fn activate(&mut self, ctx: ActivateContext<GuestMemoryMmap>) -> Result<(), ActivateError> {
        if let Some((index, _, _)) = ctx
            .queues
            .iter()
            .find(|(i, _, _)| queue_role(*i, ctx.acked_features).is_none())
        {
            return Err(ActivateError::BadQueues {
                device: NAME,
                why: format!("queue {index} has no role under the negotiated features"),
            });
        }
        self.shared
            .acked_features
            .store(ctx.acked_features, Ordering::SeqCst);
        self.worker()?
            .activate(ctx)
            .map_err(|source| ActivateError::Host {
                device: NAME,
                what: "hand the queues to the worker",
                source,
            })
    }

    fn reset(&mut self) -> bool {
        let ok = self.worker.as_ref().is_none_or(|w| w.reset());
        self.shared.active.store(false, Ordering::SeqCst);
        self.shared.actual_pages.store(0, Ordering::SeqCst);
        ok
    }
}
