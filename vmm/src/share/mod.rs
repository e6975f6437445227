//! Memory sharing for this VM: the merge agent and the page mechanism it drives.
//!
//! With `--share-memory`, the VMM registers its guest RAM with the merge daemon and runs an
//! agent thread that does the page work the daemon orders on its own memory (see
//! [`pages`]). Guest writes are tracked with KVM's dirty log so that the daemon only
//! re-digests what changed; pages the VMM's virtio devices
//! write are reported by the devices themselves ([`device_writes`]) and count the same. The guest never depends on the daemon: if the daemon dies, the
//! agent keeps every mapping as it is (merged pages stay merged and still split on write)
//! and registers again when a daemon comes back.

pub mod agent;
pub mod bitmap;
pub mod device_writes;
pub mod errors;
pub mod pages;
pub mod ram_discard;

pub use agent::{
    first_connection, spawn_agent, AgentConfig, AgentStatus, AgentStatusHandle, DaemonLauncher,
    DirtySource, SharedRamHandle,
};
pub use device_writes::DeviceWrites;
pub use errors::{ConnectError, RequestError, SessionError};
pub use pages::{RamRange, SharedRam};
pub use ram_discard::SharedRamDiscard;
