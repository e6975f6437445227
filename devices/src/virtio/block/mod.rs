//! virtio-blk: a disk image as a virtio block device.
//!
//! One request queue; requests are served on the device's own worker thread ([`worker`]),
//! woken by the queue's kick eventfd (a KVM ioeventfd), and completed with an interrupt
//! through the transport. Offered features: `VERSION_1`, `SEG_MAX`, `SIZE_MAX`, `FLUSH`,
//! and `RO` for a read-only disk, whose writes fail with `VIRTIO_BLK_S_IOERR`. Requests:
//! `IN`, `OUT`, `FLUSH`, `GET_ID`; anything else is `VIRTIO_BLK_S_UNSUPP`. Parsing and
//! execution are in [`request`].

pub mod config;
pub mod request;
pub mod worker;

#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod request_tests;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use vm_memory::GuestMemory;

pub use config::{DiskConfig, DiskError};
pub use request::Disk;

use super::device::ThreadStart;
use super::device::{ActivateContext, ActivateError, VirtioDevice};
use super::worker::{spawn_worker, WorkerControl};

/// The request queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// The most data segments in one request (the queue, less header and status).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The largest data segment.
pub const SIZE_MAX: u32 = 1 << 20;

/// A virtio-blk device.
pub struct Block<M> {
    /// The image until the worker takes it.
    disk: Option<Disk>,
    sectors: u64,
    read_only: bool,
    config: [u8; 16],
    worker: Option<WorkerControl<M>>,
}

impl<M> std::fmt::Debug for Block<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("sectors", &self.sectors)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl<M> Block<M> {
    /// A device for `cfg`'s image; opening it is the only thing that can fail.
    pub fn new(cfg: &DiskConfig) -> Result<Self, DiskError> {
        let disk = cfg.open()?;
        let mut config = [0u8; 16];
        // struct virtio_blk_config: capacity (le64), size_max (le32), seg_max (le32).
        config[0..8].copy_from_slice(&disk.sectors.to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Ok(Self {
            sectors: disk.sectors,
            read_only: disk.read_only,
            disk: Some(disk),
            config,
            worker: None,
        })
    }

    /// The disk's size in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }
}

impl<M: GuestMemory + Send + 'static> VirtioDevice<M> for Block<M> {
    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| self.config.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "virtio-blk: config write ignored");
    }

    fn start_worker(&mut self, start: ThreadStart) -> Result<(), ActivateError> {
        let Some(disk) = self.disk.take() else {
            return Ok(());
        };
        let control = spawn_worker("virtio-blk", start, move |inbox| worker::run(inbox, disk))
            .map_err(|source| ActivateError::Host {
                device: "virtio-blk",
                what: "start the worker thread",
                source,
            })?;
        self.worker = Some(control);
        Ok(())
    }

    fn activate(&mut self, ctx: ActivateContext<M>) -> Result<(), ActivateError> {
        if ctx.queues.len() != 1 || ctx.queues[0].0 != 0 {
            return Err(ActivateError::BadQueues {
                device: "virtio-blk",
                why: "the driver must enable exactly queue 0".into(),
            });
        }
        let Some(worker) = &self.worker else {
            return Err(ActivateError::Host {
                device: "virtio-blk",
                what: "activate",
                source: std::io::Error::other("the worker thread was never started"),
            });
        };
        worker.activate(ctx).map_err(|source| ActivateError::Host {
            device: "virtio-blk",
            what: "hand the queue to the worker",
            source,
        })
    }

    fn reset(&mut self) -> bool {
        self.worker.as_ref().is_none_or(|w| w.reset())
    }
}
