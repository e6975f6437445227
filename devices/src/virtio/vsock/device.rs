//! The virtio-vsock device model: its identity, features and configuration space (the
//! guest's CID), and activation, which hands the queues to the device's thread.

use std::path::Path;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use vm_memory::GuestMemory;

use super::host::{HostSide, HostSideError};
use super::worker::{self, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::virtio::device::ThreadStart;
use crate::virtio::worker::WorkerControl;
use crate::virtio::{ActivateContext, ActivateError, VirtioDevice};

/// The size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// CIDs 0-2 are reserved (hypervisor, local, host); a guest's is at least 3.
pub const MIN_GUEST_CID: u64 = 3;

/// Why a vsock device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved.
    #[error("vsock guest CID {0} is reserved: use 3 or more")]
    ReservedCid(u64),
    /// The host socket cannot be bound.
    #[error(transparent)]
    HostSide(#[from] HostSideError),
}

/// A virtio-vsock device (stream sockets) with Firecracker's host-side convention.
pub struct Vsock<M> {
    guest_cid: u64,
    host: Arc<HostSide>,
    worker: Option<WorkerControl<M>>,
}

impl<M: GuestMemory + Send + 'static> Vsock<M> {
    /// A device for the guest CID `guest_cid`, host programs reaching it through the Unix
    /// socket at `path` (bound now). Its thread starts with [`VirtioDevice::start_worker`].
    pub fn new(guest_cid: u64, path: &Path) -> Result<Self, VsockError> {
        if !(MIN_GUEST_CID..=u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::ReservedCid(guest_cid));
        }
        Ok(Vsock {
            guest_cid,
            host: Arc::new(HostSide::bind(path)?),
            worker: None,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The host side's socket path.
    pub fn path(&self) -> &Path {
        self.host.path()
    }
}

impl<M> Drop for Vsock<M> {
    /// Removes the host side's socket: host programs can no longer reach the guest. (The
    /// device's thread may outlive the device, idle, until the process ends.)
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.host.path());
    }
}

impl<M: GuestMemory + Send + 'static> VirtioDevice<M> for Vsock<M> {
    fn name(&self) -> &'static str {
        "virtio-vsock"
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| config.get(at).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn start_worker(&mut self, start: ThreadStart) -> Result<(), ActivateError> {
        if self.worker.is_none() {
            let w = worker::spawn(self.guest_cid, self.host.clone(), start).map_err(|source| {
                ActivateError::Host {
                    device: "virtio-vsock",
                    what: "starting its thread",
                    source,
                }
            })?;
            self.worker = Some(w);
        }
        Ok(())
    }

    fn activate(&mut self, ctx: ActivateContext<M>) -> Result<(), ActivateError> {
        let bad = |why: &str| ActivateError::BadQueues {
            device: "virtio-vsock",
            why: why.to_string(),
        };
        let indices: Vec<u16> = ctx.queues.iter().map(|(i, _, _)| *i).collect();
        if indices.iter().any(|&i| i > EVENT_QUEUE) {
            return Err(bad("more than three queues"));
        }
        if !indices.contains(&RX_QUEUE) || !indices.contains(&TX_QUEUE) {
            return Err(bad("the RX and TX queues must both be enabled"));
        }
        let Some(worker) = &self.worker else {
            return Err(bad("the device's thread was never started"));
        };
        worker.activate(ctx).map_err(|source| ActivateError::Host {
            device: "virtio-vsock",
            what: "handing the queues to its thread",
            source,
        })
    }

    fn reset(&mut self) -> bool {
        self.worker.as_ref().is_none_or(WorkerControl::reset)
    }
}
