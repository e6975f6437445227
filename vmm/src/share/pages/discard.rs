//! Pages the guest gave up (virtio-balloon: reported free, or inflated), dropped from the
//! host without leaving a frame reference behind.
//!
//! An anonymous page is dropped with `MADV_DONTNEED` and reads zero afterwards. A page
//! mapped from the pool must not be: `MADV_DONTNEED` on a private file mapping brings back
//! the *frame's* content. It gets a fresh anonymous mapping instead (reads zero, holds no
//! memory) and is marked discarded: from then on it is reported as split — exactly what a
//! copy-on-write split looks like to the engine (the page's mapping was a frame and it now
//! holds private memory) — so the engine drops the page's reference to the frame (and
//! frees the frame when no guest maps it any more), and finds the page zero on its next
//! visit. Every given-up page also counts as written, so the next dirty digest visits it.
//!
//! The agent owns [`SharedRam`] and the balloon reaches it under the same lock the agent
//! holds for each request, so a discard never lands between the steps of a merge (write
//! protect, compare, map): either the merge sees the zeroed page (and does not merge it:
//! it no longer equals the frame), or the discard replaces the frame mapping it made.

use super::error::{last_os, PageError};
use super::{SharedRam, PAGE};
use crate::share::bitmap::Bitmap;

impl SharedRam {
    /// Drops the `len` bytes of guest RAM at `hva` (page aligned, inside one RAM range):
    /// afterwards they read zero and hold no host memory. Returns the pages dropped.
    pub fn discard(&mut self, hva: u64, len: u64) -> Result<u64, PageError> {
        self.tracked(|ram| ram.discard_range(hva, len))
    }

    fn discard_range(&mut self, hva: u64, len: u64) -> Result<u64, PageError> {
        let n = len / PAGE;
        if len == 0
            || !len.is_multiple_of(PAGE)
            || !hva.is_multiple_of(PAGE)
            || !self.in_ram(hva, n)
        {
            return Err(PageError::Range(format!("discard {hva:#x}+{len:#x}")));
        }
        let first = self.page_at(hva)?;
        let mut p = first;
        while p < first + n {
            let file = self.file_mapped.get(p);
            let mut k = 1;
            while p + k < first + n && self.file_mapped.get(p + k) == file {
                k += 1;
            }
            let at = hva + (p - first) * PAGE;
            if file {
                self.fresh_anonymous(at, k * PAGE)?;
                for q in p..p + k {
                    self.discarded.set(q, true);
                }
            } else {
                drop_anonymous(at, k * PAGE)?;
                self.remaps += 1;
            }
            for q in p..p + k {
                self.given_up.set(q, true);
            }
            p += k;
        }
        self.pages_reported += n;
        Ok(n)
    }

    /// The page index of host address `hva` (inside guest RAM).
    fn page_at(&self, hva: u64) -> Result<u64, PageError> {
        self.ranges
            .iter()
            .zip(&self.starts)
            .find(|(r, _)| hva >= r.hva && hva < r.hva + r.len)
            .map(|(r, s)| s + (hva - r.hva) / PAGE)
            .ok_or_else(|| PageError::Range(format!("{hva:#x} is not guest RAM")))
    }

    /// Moves the pages given up since the last call into `into` (as written pages).
    pub fn take_given_up(&mut self, into: &mut Bitmap) {
        let mut p = 0;
        while let Some(i) = self.given_up.next_set(p) {
            into.set(i, true);
            p = i + 1;
        }
        self.given_up.clear();
    }

    /// Pages given up so far (balloon).
    pub fn pages_reported(&self) -> u64 {
        self.pages_reported
    }
}

/// `MADV_DONTNEED` on `len` bytes of private anonymous guest RAM at `hva`.
fn drop_anonymous(hva: u64, len: u64) -> Result<(), PageError> {
    // SAFETY: `hva..hva+len` is guest RAM (checked by the caller), private anonymous: after
    // MADV_DONTNEED it reads zero, which is what the guest that gave it up expects.
    let rc = unsafe { libc::madvise(hva as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(last_os("madvise(MADV_DONTNEED)"));
    }
    Ok(())
}
