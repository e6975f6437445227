//! The device against a mock guest driver (virtio-queue's `MockSplitQueue`) and real Unix
//! sockets on the host side.

mod chains;
mod fuzz;
mod harness;
mod protocol;
mod worker;
