//! The virtio-vsock device as `tinyvmm run --vsock CID,PATH` attaches it: its socket bound
//! and its thread started now, before the VM runs; the thread runs under its own seccomp
//! filter ([`ThreadKind::Vsock`]).

use std::path::Path;
use std::sync::Arc;

use tinyvmm_devices::virtio::vsock::Vsock;
pub use tinyvmm_devices::virtio::vsock::{VsockError, MIN_GUEST_CID};
use vm_memory::GuestMemoryMmap;

use crate::seccomp::{install_or_exit, Filters, ThreadKind};
use crate::virtio::BoxedDevice;

/// A virtio-vsock device for guest CID `cid`, reached by host programs through the Unix
/// socket at `path` (which must not exist yet; it is removed when the device goes).
pub fn vsock_device(
    cid: u64,
    path: &Path,
    filters: Option<Arc<Filters>>,
) -> Result<BoxedDevice, VsockError> {
    let on_start = Box::new(move || install_or_exit(filters.as_deref(), ThreadKind::Vsock));
    let device = Vsock::<GuestMemoryMmap>::new(cid, path, on_start)?;
    Ok(Box::new(device))
}
