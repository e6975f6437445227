//! The virtio-vsock device model: its identity, features and configuration space (the
//! guest's CID), and activation, which hands the queues to the worker thread.

use std::path::Path;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use vm_memory::GuestAddressSpace;

use super::host::{HostSide, HostSideError};
use super::queues::VsockQueues;
use super::worker::{
    self, ThreadStart, WorkerHandle, WorkerSetup, EVENT_QUEUE, RX_QUEUE, TX_QUEUE,
};
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
pub struct Vsock {
    guest_cid: u64,
    host: Arc<HostSide>,
    on_start: Option<ThreadStart>,
    worker: Option<WorkerHandle>,
}

impl Vsock {
    /// A device for the guest CID `guest_cid`, host programs reaching it through the Unix
    /// socket at `path` (bound now). `on_start` runs first on the device's thread.
    pub fn new(
        guest_cid: u64,
        path: &Path,
        on_start: Option<ThreadStart>,
    ) -> Result<Self, VsockError> {
        if guest_cid < MIN_GUEST_CID || guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::ReservedCid(guest_cid));
        }
        Ok(Vsock {
            guest_cid,
            host: Arc::new(HostSide::bind(path)?),
            on_start,
            worker: None,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }
}

impl<M: GuestAddressSpace + Send + 'static> VirtioDevice<M> for Vsock {
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

    fn activate(&mut self, ctx: ActivateContext<M>) -> Result<(), ActivateError> {
        let bad = |why: &str| ActivateError::BadQueues {
            device: "virtio-vsock",
            why: why.to_string(),
        };
        let mut rx = None;
        let mut tx = None;
        let mut kicks = [None, None, None];
        for (index, queue, kick) in ctx.queues {
            match index {
                RX_QUEUE => rx = Some(queue),
                TX_QUEUE => tx = Some(queue),
                EVENT_QUEUE => {}
                _ => return Err(bad("more than three queues")),
            }
            kicks[usize::from(index)] = Some(kick);
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            return Err(bad("the RX and TX queues must both be enabled"));
        };
        if let Some(mut old) = self.worker.take() {
            old.stop();
        }
        let setup = WorkerSetup {
            queues: VsockQueues {
                mem: ctx.mem,
                rx,
                tx,
                writes: ctx.writes,
            },
            kicks,
            interrupt: ctx.interrupt,
            host: self.host.clone(),
            guest_cid: self.guest_cid,
        };
        self.worker = Some(worker::spawn(setup, self.on_start.clone())?);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        true
    }
}
