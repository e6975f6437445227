//! The `tinyvmm` front end as a library: what the binary wires together (the VM API's
//! backend, the daemon launcher, the exit status), the `tinyvmm ksm` client, and the
//! benchmarks with the guest-process harness they and the tests share.
//!
//! The merge daemon is `tinyvmm-merged`, the REST transport and types `tinyvmm-api`, the
//! VMM `tinyvmm-vmm`.

pub mod bench;
pub mod exit_status;
pub mod fleet;
pub mod ksm_client;
pub mod launcher;
pub mod size;
pub mod vm_control;
pub mod vsock_arg;
