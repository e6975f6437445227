//! virtio devices: what a device model provides ([`device::VirtioDevice`]) and what the
//! transport hands it when the driver starts it ([`device::ActivateContext`]).
//!
//! The transport (virtio-mmio) owns the register file, feature negotiation and the queues'
//! configuration; a device owns its configuration space and, once activated, its queues:
//! it serves them on its own worker thread (never on a vCPU thread), woken by the queues'
//! kick eventfds (ioeventfds) and signalling the driver through [`device::VirtioInterrupt`]
//! (an irqfd). Descriptor chains are walked with `virtio-queue`; guest memory is reached
//! only through `vm-memory`.
//!
//! - [`block`]: virtio-blk on a disk image;
//! - [`mmio`]: the virtio-mmio transport (register layout version 2);
//! - [`vsock`]: the virtio-vsock device;
//! - [`worker`]: a device's worker thread, started with the device (before the seccomp
//!   filters) and handed its queues on activation.

pub mod balloon;
pub mod block;
pub mod device;
pub mod mmio;
pub mod vsock;
pub mod worker;

pub use device::{ActivateContext, ActivateError, GuestWrites, VirtioDevice, VirtioInterrupt};
