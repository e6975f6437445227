//! How the balloon drops guest RAM in a VMM that may merge it: through the merge agent's
//! [`SharedRam`] (under its lock) once memory sharing is set up, else `MADV_DONTNEED`.
//!
//! Before sharing is set up no page is mapped from a pool, so `MADV_DONTNEED` is right;
//! [`SharedRamDiscard::share`] is called before the vCPUs start, so a guest can give pages
//! up only after it.

use std::sync::{Arc, OnceLock};

use tinyvmm_devices::virtio::balloon::{DiscardError, DontNeed, HostRange, RamDiscard};

use super::agent::SharedRamHandle;

/// The balloon's [`RamDiscard`] in this VMM.
#[derive(Debug, Default)]
pub struct SharedRamDiscard {
    ram: OnceLock<SharedRamHandle>,
}

impl SharedRamDiscard {
    /// Drops pages with `MADV_DONTNEED` until [`Self::share`] is called.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// From now on, drops pages through the merge agent's RAM (see
    /// `share::pages`'s discard: a page mapped from the pool gets a fresh anonymous mapping
    /// and is reported split, so its frame reference goes).
    pub fn share(&self, ram: SharedRamHandle) {
        let _ = self.ram.set(ram);
    }
}

impl RamDiscard for SharedRamDiscard {
    fn discard(&self, r: HostRange) -> Result<(), DiscardError> {
        let Some(ram) = self.ram.get() else {
            return DontNeed.discard(r);
        };
        let mut ram = ram.lock().unwrap_or_else(|e| e.into_inner());
        ram.discard(r.hva, r.len)
            .map(|_| ())
            .map_err(|e| DiscardError::Host {
                gpa: r.gpa,
                len: r.len,
                source: std::io::Error::other(e.to_string()),
            })
    }
}
