//! The virtio-vsock device as `tinyvmm run --vsock CID,PATH` attaches it: its socket is
//! bound now; its thread starts with the other device workers, under its own seccomp
//! filter (`ThreadKind::VirtioVsock`).

use std::path::Path;

use tinyvmm_devices::virtio::vsock::Vsock;
pub use tinyvmm_devices::virtio::vsock::{VsockError, MIN_GUEST_CID};
use vm_memory::GuestMemoryMmap;

use crate::virtio::BoxedDevice;

/// A virtio-vsock device for guest CID `cid`, reached by host programs through the Unix
/// socket at `path` (which must not exist yet; it is removed when the device goes).
pub fn vsock_device(cid: u64, path: &Path) -> Result<BoxedDevice, VsockError> {
    Ok(Box::new(Vsock::<GuestMemoryMmap>::new(cid, path)?))
}
