//! Dropping guest RAM from the host: what the balloon does with inflated pages and reported
//! free ranges.
//!
//! The device finds the host address of each validated range and hands it to a
//! [`RamDiscard`]. Guest RAM is private anonymous memory, so [`DontNeed`]
//! (`MADV_DONTNEED`) is enough on its own: the pages go back to the host and read zero
//! afterwards. A VMM that merges guest pages maps some of them from a shared pool file,
//! where `MADV_DONTNEED` would bring back the frame's content instead of zeros; it gives
//! the balloon its own [`RamDiscard`], which does the work under the merge agent's lock
//! and tells the merge engine.

/// A range of guest RAM, page aligned, inside one RAM region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRange {
    /// Guest-physical start.
    pub gpa: u64,
    /// Host virtual address of the start.
    pub hva: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub len: u64,
}

/// Why a range could not be dropped (it is left as it was).
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// The host refused (`madvise`, `mmap`).
    #[error("cannot drop guest RAM at {gpa:#x}+{len:#x}: {source}")]
    Host {
        /// Guest-physical start.
        gpa: u64,
        /// Bytes.
        len: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// The range is not guest RAM the discarder knows.
    #[error("{gpa:#x}+{len:#x} is not guest RAM")]
    NotRam {
        /// Guest-physical start.
        gpa: u64,
        /// Bytes.
        len: u64,
    },
}

/// Drops ranges of guest RAM from the host; afterwards they read zero.
pub trait RamDiscard: Send + Sync {
    /// Drops `range`. Called from the balloon's worker thread.
    fn discard(&self, range: HostRange) -> Result<(), DiscardError>;
}

/// `MADV_DONTNEED` on private anonymous guest RAM.
#[derive(Debug, Default, Clone, Copy)]
pub struct DontNeed;

impl RamDiscard for DontNeed {
    fn discard(&self, r: HostRange) -> Result<(), DiscardError> {
        // SAFETY: `r` is guest RAM, private anonymous memory that the VMM keeps mapped (the
        // device checked the range against the guest memory it holds); MADV_DONTNEED
        // replaces its pages with zero-fill-on-demand ones, which only the guest, which
        // gave the pages up, could notice.
        let rc = unsafe {
            libc::madvise(
                r.hva as *mut libc::c_void,
                r.len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(DiscardError::Host {
                gpa: r.gpa,
                len: r.len,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}
