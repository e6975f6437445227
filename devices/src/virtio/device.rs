//! The contract between the virtio transport and a device model.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Run first on a device's worker thread, before anything else (installs its seccomp
/// filter).
pub type ThreadStart = Box<dyn FnOnce() + Send>;

/// How a device raises an interrupt towards the driver.
pub trait VirtioInterrupt: Send + Sync {
    /// The device put buffers on the used ring of queue `index`.
    fn signal_used_queue(&self, index: u16) -> std::io::Result<()>;
    /// The device changed its configuration space.
    fn signal_config_change(&self) -> std::io::Result<()>;
}

/// Writes the VMM makes into guest RAM outside the guest's own execution (a disk read
/// landing in a guest buffer, a received vsock packet). KVM's dirty log does not see them,
/// so a device reports every range it wrote here; the memory-sharing agent treats those
/// pages as changed (re-digested, never assumed to hold what they held before).
pub trait GuestWrites: Send + Sync {
    /// `len` bytes from guest-physical address `gpa` were written by the VMM.
    fn wrote(&self, gpa: u64, len: u64);
}

/// What the transport hands a device when the driver sets `DRIVER_OK`.
pub struct ActivateContext<M> {
    /// Guest memory, as the device may access it.
    pub mem: M,
    /// The queues the driver configured and enabled, in index order, with the eventfd the
    /// driver's notification (a write to `QueueNotify`) signals for each.
    pub queues: Vec<(u16, virtio_queue::Queue, EventFd)>,
    /// Interrupts towards the driver.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Ranges of guest RAM the device writes.
    pub writes: Arc<dyn GuestWrites>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver enabled a set of queues the device cannot serve.
    #[error("virtio device {device}: {why}")]
    BadQueues {
        /// The device's name.
        device: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The host refused a resource (thread, eventfd, epoll).
    #[error("virtio device {device}: {what}: {source}")]
    Host {
        /// The device's name.
        device: &'static str,
        /// What failed.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A virtio device model (virtio 1.x, "modern" only).
pub trait VirtioDevice<M>: Send {
    /// A short name for logs and errors ("virtio-blk").
    fn name(&self) -> &'static str;
    /// The virtio device ID (`VIRTIO_ID_*` in virtio-bindings).
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's queues, in queue-index order.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers (including `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// Reads the device configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space at `offset` (most devices ignore writes).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device's worker thread, once, before the VM runs: the VMM calls it while
    /// no seccomp filter is installed yet and after privileges are dropped, and `start`
    /// runs first on the new thread (it installs the thread's filter). Activation and reset
    /// come later from vCPU threads, which may not start threads (see
    /// [`super::worker`]). Devices without a worker keep the default.
    fn start_worker(&mut self, start: ThreadStart) -> Result<(), ActivateError> {
        drop(start);
        Ok(())
    }
    /// Starts serving the queues (on the device's own thread).
    fn activate(&mut self, ctx: ActivateContext<M>) -> Result<(), ActivateError>;
    /// Stops serving the queues and forgets them (the driver wrote status 0); `false` if
    /// the device cannot be reset, in which case the transport marks it `DEVICE_NEEDS_RESET`.
    fn reset(&mut self) -> bool;
}
