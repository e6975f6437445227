//! Where the daemon gets the bytes of a guest's pages to write new frames from: straight
//! from the VM process (`direct.rs`) or, where that is not permitted, from its agent.

use std::collections::HashMap;

use tinyvmm_merge::host::GuestId;

/// How the daemon gets a guest's pages to populate.
#[derive(Debug)]
pub(crate) enum Source {
    /// Straight from the VM process: guest RAM's ranges (address, bytes) in page order.
    Direct(Vec<(u64, u64)>),
    /// From the agent (`ReadPages`).
    Agent,
}

/// Per guest, once asked.
pub(crate) type Sources = HashMap<GuestId, Source>;
