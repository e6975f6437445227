//! Reading guest RAM without forming references to it: the copy into a [`PageBuf`] that
//! digests hash, the in-place `memcmp` under write protection (and why it has no concurrent
//! writer), and the page hash.

pub use tinyvmm_merge_protocol::page_hash;
use tinyvmm_merge_protocol::{PageRun, MAX_READ_PAGES, PAGE_SIZE};

use super::error::PageError;
use super::{SharedRam, PAGE};

/// One page's bytes, copied out of guest RAM (cache-line aligned, so that the copy and the
/// hash run at full speed).
#[repr(C, align(64))]
pub struct PageBuf(pub [u8; PAGE_SIZE]);

impl PageBuf {
    /// A zeroed buffer.
    pub const fn zeroed() -> Self {
        Self([0; PAGE_SIZE])
    }
}

/// What a zero page is compared against.
static ZERO_PAGE: PageBuf = PageBuf::zeroed();

/// Whether `page` (a copy, never guest RAM itself) is all zeros.
pub(super) fn is_zero(page: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|b| *b == 0) && post.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0)
}

impl SharedRam {
    /// Copies the guest page at `hva` into `buf`: the only way a page that a vCPU may be
    /// writing is read. `hva` must come from [`Self::hva`] or [`Self::pieces`].
    pub(super) fn copy_page(&self, hva: u64, buf: &mut PageBuf) {
        debug_assert!(self.in_ram(hva, 1));
        // SAFETY: `hva..hva+PAGE_SIZE` is one page of guest RAM (checked by the callers
        // through `hva`/`pieces`), mapped readable for as long as `_keepalive` lives, i.e. as
        // long as `self`; `buf` is our own memory, so the two do not overlap. A vCPU may
        // write the page during the copy: guest RAM is memory shared with the guest, outside
        // what the compiler may assume about Rust memory, so it is read exactly once through
        // raw pointers (as vm-memory's `VolatileSlice::copy_to` does for anything longer
        // than a word) and no reference to it is formed. Everything after works on the copy;
        // a torn copy only makes the digest describe bytes the page never held at once,
        // which the byte compare under write protection catches before any merge.
        unsafe {
            std::ptr::copy_nonoverlapping(hva as *const u8, buf.0.as_mut_ptr(), PAGE_SIZE);
        }
    }

    /// Whether the guest page at `hva` holds the same bytes as pool frame `frame`,
    /// compared in place. Call only while the page is write-protected (inside
    /// [`Self::protected`]) and with a frame checked by [`Self::check_frames`].
    ///
    /// Why there is no concurrent writer of either side, so that reading in place is sound:
    /// - the page: from the moment `UFFDIO_WRITEPROTECT` returns until it is lifted, every
    ///   write to it — by a vCPU (KVM resolves guest writes through `get_user_pages`, which
    ///   faults), by another VMM thread, or by the kernel on the process's behalf
    ///   (`copy_to_user`) — waits in the kernel's userfault handler; the agent thread, the
    ///   only caller, does not write guest RAM.
    /// - the frame: pool frames are written only by `pwrite` while populating, by the one
    ///   agent whose op allocated that frame, before any page maps it; a frame named in a
    ///   Join is already mapped by a merged page (the engine holds its reference for the
    ///   whole op), so it is never written again, and the daemon punches only frames no
    ///   page references.
    pub(super) fn page_equals_frame(&self, hva: u64, frame: u64) -> Result<bool, PageError> {
        let pool = self.check_frames(frame, 1)?;
        debug_assert!(self.in_ram(hva, 1));
        // SAFETY: both pointers are valid for PAGE_SIZE bytes: the page by `in_ram` (callers
        // pass hva from `pieces`) and `_keepalive`, the frame by `check_frames` and the pool
        // mapping, which lives as long as `self.pool`. Neither has a writer while we read
        // (see above), and memcmp forms no Rust reference to either.
        let rc = unsafe {
            libc::memcmp(
                hva as *const libc::c_void,
                pool.base.add((frame * PAGE) as usize).cast(),
                PAGE_SIZE,
            )
        };
        Ok(rc == 0)
    }

    /// Whether the write-protected guest page at `hva` is all zeros, compared in place
    /// (same rules as [`Self::page_equals_frame`]: only under write protection).
    pub(super) fn protected_page_is_zero(&self, hva: u64) -> bool {
        debug_assert!(self.in_ram(hva, 1));
        // SAFETY: `hva` is a page of guest RAM (from `hva`/`pieces`), mapped while `self`
        // lives, and write-protected by the caller, so it has no writer while memcmp reads
        // it; ZERO_PAGE is a static of PAGE_SIZE bytes.
        let rc = unsafe {
            libc::memcmp(
                hva as *const libc::c_void,
                ZERO_PAGE.0.as_ptr().cast(),
                PAGE_SIZE,
            )
        };
        rc == 0
    }

    /// Appends a copy of every page of `runs` to `out` (4096 bytes a page, in order), for
    /// the daemon to write new frames from. The pages are not write-protected: a guest
    /// write during the copy only makes the frame differ from the page, which the join
    /// that follows (a byte compare under write protection) finds before any merge.
    pub fn read_pages(&self, runs: &[PageRun], out: &mut Vec<u8>) -> Result<(), PageError> {
        let total: u64 = runs.iter().map(|r| u64::from(r.len)).sum();
        if total > MAX_READ_PAGES {
            return Err(PageError::Range(format!(
                "{total} pages asked for, at most {MAX_READ_PAGES} per request"
            )));
        }
        let mut pieces = Vec::new();
        for r in runs {
            pieces.extend(self.pieces(r.gfn, u64::from(r.len))?);
        }
        out.clear();
        out.resize((total * PAGE) as usize, 0);
        let mut at = 0usize;
        for (_, n, hva) in pieces {
            let len = (n * PAGE) as usize;
            debug_assert!(self.in_ram(hva, n));
            // SAFETY: `hva..hva+len` is guest RAM (checked by `pieces`), mapped readable
            // while `self` lives; `out[at..at+len]` is our own buffer (sized just above), so
            // the two do not overlap. As in `copy_page`, the guest may write the pages
            // during the copy: they are read once through raw pointers, no reference to
            // them is formed, and the join that follows compares under write protection.
            unsafe {
                std::ptr::copy_nonoverlapping(hva as *const u8, out[at..].as_mut_ptr(), len);
            }
            at += len;
        }
        Ok(())
    }
}
