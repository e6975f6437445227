//! The `tinyvmm` front end as a library: the merge daemon, its REST control API and client,
//! the benchmarks, and helpers that drive real guests (used by the binary and the tests).

pub mod api;
pub mod bench;
pub mod daemon;
pub mod fleet;
pub mod ksm_client;
pub mod size;
