//! The page mechanism on this VM's own RAM: what the merge agent does when the daemon
//! orders it (see docs/design.md, "The page mechanism").
//!
//! - Write protection is userfaultfd write-protect over all guest RAM: a vCPU (or any VMM
//!   thread) that writes a protected page blocks in the kernel until the page is
//!   unprotected, then retries against whatever mapping is there by then.
//! - Merge: protect the run, byte-compare (Join) or copy (Populate) each page against its
//!   pool frame, `mmap(MAP_PRIVATE | MAP_FIXED)` the frames over the pages in runs, register
//!   the new mappings with userfaultfd again, unprotect. `mmap(MAP_FIXED)` replaces the
//!   pages atomically (under the mm's write lock): a woken writer finds the frame, whose
//!   content equals what it had, and the kernel's copy-on-write gives it a private copy.
//! - Zero pages: verify under protection, then `MADV_DONTNEED` (anonymous mappings read the
//!   zero page afterwards). A page whose mapping is a pool file would read its frame again,
//!   so such a page gets a fresh anonymous mapping instead.
//! - Unmerge: copy the run's current contents into a new anonymous mapping, then `mremap`
//!   that mapping over the run — atomic, so no thread ever sees an empty page.
//! - Discards (balloon): pages the guest gave up are dropped; one mapped from the pool gets
//!   a fresh anonymous mapping and is reported split, so its frame reference goes.
//! - Splits: a page mapped from the pool that the guest wrote is present and no longer a
//!   file page in `/proc/self/pagemap`.
//!
//! Nothing here ever writes a pool frame that is mapped: frames are written (with `pwrite`)
//! only while populating, before they are mapped anywhere.
//!
//! Reading guest RAM: no `&[u8]` is ever formed over a guest page, because a vCPU may write
//! it at any moment. A page read while the guest runs (digest) is first copied into a
//! local [`PageBuf`] with one raw-pointer copy and only the copy is hashed and checked for
//! zeros. A page read under userfaultfd write protection (merge, zero reclaim, unmerge)
//! has no writer until it is unprotected, and is read in place through raw pointers
//! (`memcmp`, `pwrite`, `copy_nonoverlapping`); see [`SharedRam::page_equals_frame`] for
//! the invariant.
//!
//! The parts, one file each: `error` ([`PageError`]); `read`, how guest RAM is read (the
//! copy for digests, the in-place compare under write protection and the argument that it
//! has no concurrent writer); `protect`, userfaultfd write protection and its statistics;
//! `digest`, `merge`, `zero`, `unmerge` and `splits`, the operations; and this file,
//! [`SharedRam`] itself, the pool it maps and the range checks every operation makes first.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use tinyvmm_merge_protocol::PAGE_SIZE;
use userfaultfd::Uffd;

use super::bitmap::Bitmap;

mod digest;
mod discard;
mod error;
mod merge;
mod protect;
mod read;
mod splits;
#[cfg(test)]
mod tests;
mod unmerge;
mod zero;

pub use error::PageError;
use error::{last_os, os};
pub use protect::ProtectStats;
pub use read::{page_hash, PageBuf};

const PAGE: u64 = PAGE_SIZE as u64;

/// One contiguous piece of guest RAM in the host's address space.
#[derive(Debug, Clone, Copy)]
pub struct RamRange {
    /// Host virtual address.
    pub hva: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub len: u64,
}

/// The pool memfd of our merge domain, mapped read-only for compares.
#[derive(Debug)]
struct Pool {
    file: File,
    base: *const u8,
    len: u64,
}

// SAFETY: the mapping is read-only and lives as long as `Pool`; only raw reads go through it.
unsafe impl Send for Pool {}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping created in `SharedRam::set_pool`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len as usize) };
    }
}

/// Guest RAM of this process, as pages 0..N in slot order, and the mechanism above.
pub struct SharedRam {
    /// Keeps guest RAM mapped for as long as we may touch it (the VMM may be torn down
    /// while the agent thread is still mid-request).
    _keepalive: Box<dyn std::any::Any + Send>,
    ranges: Vec<RamRange>,
    /// First page index of each range.
    starts: Vec<u64>,
    pages: u64,
    uffd: Uffd,
    pool: Option<Pool>,
    /// The page's mapping is a pool file mapping (merged now, or merged once and split).
    file_mapped: Bitmap,
    /// Pages the guest gave up (balloon) while mapped from the pool: they now have a fresh
    /// anonymous mapping, which the next digests report as a split (see [`discard`]).
    discarded: Bitmap,
    /// Pages the guest gave up since the agent last collected them (they count as written).
    given_up: Bitmap,
    /// Pages given up so far (balloon: reported free or inflated).
    pages_reported: u64,
    /// Mapping changes made so far (frames mapped, pages dropped or remapped): a request
    /// that fails after this moved was carried out in part ([`PageError::Incomplete`]).
    remaps: u64,
    pagemap: File,
    zero_hash: u64,
    /// Protection durations since the last `take_protect_stats`.
    pub protect_stats: ProtectStats,
}

impl std::fmt::Debug for SharedRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRam")
            .field("ranges", &self.ranges)
            .field("pages", &self.pages)
            .finish()
    }
}

impl SharedRam {
    /// Takes over `ranges` (guest RAM, private anonymous): registers them with a new
    /// userfaultfd for write protection. `keepalive` owns the mappings (a clone of the
    /// guest memory handle) so that they outlive every access made here.
    pub fn new(
        ranges: Vec<RamRange>,
        keepalive: Box<dyn std::any::Any + Send>,
    ) -> Result<Self, PageError> {
        let uffd = protect::register_ram(&ranges)?;
        let mut starts = Vec::new();
        let mut pages = 0;
        for r in &ranges {
            starts.push(pages);
            pages += r.len / PAGE;
        }
        let pagemap = File::open("/proc/self/pagemap").map_err(os("open /proc/self/pagemap"))?;
        Ok(Self {
            _keepalive: keepalive,
            ranges,
            starts,
            pages,
            uffd,
            pool: None,
            file_mapped: Bitmap::new(pages),
            discarded: Bitmap::new(pages),
            given_up: Bitmap::new(pages),
            pages_reported: 0,
            remaps: 0,
            pagemap,
            zero_hash: page_hash(&[0u8; PAGE_SIZE]),
            protect_stats: ProtectStats::default(),
        })
    }

    /// Guest RAM's ranges, in page order: (host virtual address, bytes).
    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.ranges.iter().map(|r| (r.hva, r.len)).collect()
    }

    /// Number of guest pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The userfaultfd, whose fault events the agent drains.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Maps the domain's pool (received from the daemon) read-only, `len` bytes.
    pub fn set_pool(&mut self, fd: OwnedFd, len: u64) -> Result<(), PageError> {
        // SAFETY: a fresh shared read-only mapping of a file we own; nothing else is mapped
        // at the address the kernel picks.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(last_os("mmap the pool"));
        }
        // Mappings of the previous pool (a restarted daemon's predecessor) stay valid: the
        // kernel keeps that file alive for as long as guest pages map it.
        self.pool = Some(Pool {
            file: File::from(fd),
            base: base as *const u8,
            len,
        });
        Ok(())
    }

    /// Forgets the pool (daemon gone). Existing merged pages keep their mappings.
    pub fn drop_pool(&mut self) {
        self.pool = None;
    }

    /// Pages whose mapping is a pool file mapping.
    pub fn pool_mapped_pages(&self) -> u64 {
        self.file_mapped.count()
    }

    /// Whether page `p`'s mapping is a pool file mapping.
    pub fn is_file_mapped(&self, p: u64) -> bool {
        self.file_mapped.get(p)
    }

    /// Records whether page `p`'s mapping is a pool file mapping; a page merged again or
    /// given private memory again is no longer a discarded one.
    fn set_file_mapped(&mut self, p: u64, mapped: bool) {
        self.file_mapped.set(p, mapped);
        self.discarded.set(p, false);
    }

    /// Host address of page `p`.
    fn hva(&self, p: u64) -> Result<u64, PageError> {
        if p >= self.pages {
            return Err(PageError::Range(format!("page {p} of {}", self.pages)));
        }
        let i = self.starts.partition_point(|s| *s <= p) - 1;
        Ok(self.ranges[i].hva + (p - self.starts[i]) * PAGE)
    }

    /// Splits the run `p..p+len` at RAM range boundaries: (first page, pages, hva).
    fn pieces(&self, p: u64, len: u64) -> Result<Vec<(u64, u64, u64)>, PageError> {
        if len == 0 || p.checked_add(len).is_none_or(|e| e > self.pages) {
            return Err(PageError::Range(format!(
                "pages {p}+{len} of {}",
                self.pages
            )));
        }
        let mut out = Vec::new();
        let mut cur = p;
        while cur < p + len {
            let i = self.starts.partition_point(|s| *s <= cur) - 1;
            let range_end = self.starts[i] + self.ranges[i].len / PAGE;
            let n = (p + len).min(range_end) - cur;
            out.push((cur, n, self.ranges[i].hva + (cur - self.starts[i]) * PAGE));
            cur += n;
        }
        Ok(out)
    }

    /// Whether `n` pages from `hva` lie inside one RAM range.
    fn in_ram(&self, hva: u64, n: u64) -> bool {
        self.ranges
            .iter()
            .any(|r| hva >= r.hva && hva + n * PAGE <= r.hva + r.len)
    }

    /// Checks that frames `frame..frame+n` lie inside the pool.
    fn check_frames(&self, frame: u64, n: u64) -> Result<&Pool, PageError> {
        let pool = self.pool.as_ref().ok_or(PageError::NoPool)?;
        if frame
            .checked_add(n)
            .and_then(|e| e.checked_mul(PAGE))
            .is_none_or(|end| end > pool.len)
        {
            return Err(PageError::Range(format!(
                "frames {frame}+{n} beyond the pool"
            )));
        }
        Ok(pool)
    }

    /// Runs `op`; if it fails after changing some mapping, the error says so
    /// ([`PageError::Incomplete`]).
    fn tracked<T>(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<T, PageError>,
    ) -> Result<T, PageError> {
        let before = self.remaps;
        op(self).map_err(|e| {
            if self.remaps != before && !matches!(e, PageError::Incomplete(_)) {
                PageError::Incomplete(Box::new(e))
            } else {
                e
            }
        })
    }

    /// Bookkeeping after `len` bytes of guest RAM at `hva` got a new private anonymous
    /// mapping: counts the remap, keeps the range out of transparent huge pages (as guest
    /// RAM is) and registers the new mapping for write protection.
    fn anonymous_again(&mut self, hva: u64, len: u64) -> Result<(), PageError> {
        self.remaps += 1;
        // SAFETY: `hva..hva+len` is guest RAM (checked by the callers) that a new anonymous
        // mapping has just replaced; MADV_NOHUGEPAGE only changes how the kernel backs it,
        // never its content.
        unsafe {
            libc::madvise(
                hva as *mut libc::c_void,
                len as usize,
                libc::MADV_NOHUGEPAGE,
            )
        };
        self.reregister(hva, len)
    }
}

/// A new private anonymous read-write mapping of `len` bytes at an address of the kernel's
/// choosing; `MAP_FAILED` (with errno set) where there is none.
fn mmap_anonymous(len: usize) -> *mut libc::c_void {
    // SAFETY: a new private anonymous mapping at an address of the kernel's choosing: it
    // replaces nothing.
    unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    }
}
