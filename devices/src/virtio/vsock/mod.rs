//! virtio-vsock: stream sockets between the guest and host programs.
//!
//! The guest's driver speaks the virtio-vsock packet protocol on three queues (RX, TX,
//! event); the host side follows Firecracker's convention (see [`host`]): a host program
//! connects to the Unix socket at `PATH` and writes `CONNECT <port>\n` to reach a guest
//! port; a guest connecting to host port `P` reaches whoever listens on `PATH_P`.
//!
//! - [`device`]: the [`Vsock`] device model (configuration space: the guest's CID);
//! - [`worker`]: its thread, an epoll loop over the queues' kicks and the sockets;
//! - [`queues`]: chains to and from packets, with `virtio-vsock`'s `VsockPacket`;
//! - [`muxer`]: the connection table and what goes into the guest's RX buffers;
//! - [`connection`]: one connection's states and credit accounting;
//! - [`header`]: the packet header's fields and constants;
//! - [`problems`]: out-of-spec input, counted and logged once.
//!
//! A guest that drives the device out of spec gets its connection reset or its packet
//! dropped, never a panic and never a write outside the buffers it gave; what the device
//! holds for a guest or a host program is bounded (see [`muxer`] and [`connection`]).

pub mod connection;
pub mod device;
pub mod header;
pub mod host;
pub mod muxer;
pub mod problems;
pub mod queues;
pub mod worker;

#[cfg(test)]
mod tests;

pub use device::{Vsock, VsockError, MIN_GUEST_CID};
