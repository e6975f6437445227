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

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use tinyvmm_merge_protocol::{
    MergeOp, MergeOutcome, MergeResult, OpKind, PageDigest, PageRun, UnmergeOutcome, ZeroOutcome,
    PAGE_SIZE,
};
use userfaultfd::{FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use super::bitmap::Bitmap;

const PAGE: u64 = PAGE_SIZE as u64;
/// Most pages one write-protected batch covers: bounds how long a guest write can wait.
const PROTECT_CHUNK: u64 = 64;
/// UFFD_FEATURE_WP_HUGETLBFS_SHMEM: write-protect shmem (pool memfd) mappings too.
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// UFFD_FEATURE_WP_UNPOPULATED: protect pages that were never touched as well.
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const PM_PRESENT: u64 = 1 << 63;
const PM_FILE: u64 = 1 << 61;

/// Errors of the page mechanism. Any of them leaves guest memory content intact.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// userfaultfd could not be set up.
    #[error("userfaultfd: {0}")]
    Uffd(String),
    /// A userfaultfd operation on guest RAM (protect, unprotect, register) failed.
    #[error("{what} {hva:#x}+{len:#x}: {source}")]
    UffdOp {
        /// The operation.
        what: &'static str,
        /// First byte of the range.
        hva: u64,
        /// Bytes.
        len: u64,
        /// The error, with its errno.
        source: userfaultfd::Error,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// The call.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A request named pages outside guest RAM or frames outside the pool.
    #[error("request out of range: {0}")]
    Range(String),
    /// No pool yet.
    #[error("no pool: not registered with a merge daemon")]
    NoPool,
    /// The request failed after it had already remapped some of its pages: content is
    /// intact, but which pages map pool frames is no longer what the request's sender knows.
    #[error("{0} (after remapping part of the request)")]
    Incomplete(Box<PageError>),
}

impl PageError {
    /// The OS error number behind this error, where there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Os { source, .. } => source.raw_os_error(),
            Self::UffdOp { source, .. } => match source {
                userfaultfd::Error::SystemError(e)
                | userfaultfd::Error::CopyFailed(e)
                | userfaultfd::Error::ZeropageFailed(e) => Some(*e as i32),
                userfaultfd::Error::OpenDevUserfaultfd(e) => e.raw_os_error(),
                _ => None,
            },
            _ => None,
        }
    }

    /// A momentary shortage (EAGAIN, ENOMEM, EINTR, EBUSY) that stopped the request before
    /// it changed any mapping: the same request may be carried out again.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::EAGAIN | libc::ENOMEM | libc::EINTR | libc::EBUSY)
        )
    }
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> PageError {
    move |source| PageError::Os { what, source }
}

fn uffd_op(what: &'static str, hva: u64, len: u64) -> impl FnOnce(userfaultfd::Error) -> PageError {
    move |source| PageError::UffdOp {
        what,
        hva,
        len,
        source,
    }
}

fn last_os(what: &'static str) -> PageError {
    PageError::Os {
        what,
        source: std::io::Error::last_os_error(),
    }
}

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

/// Write-protect statistics: how long pages stayed protected per batch (an upper bound on
/// what a vCPU writing them waits).
#[derive(Debug, Default, Clone)]
pub struct ProtectStats {
    /// Nanoseconds each protected batch lasted.
    pub samples_ns: Vec<u64>,
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

/// A page's content hash (xxh3-64), as the engine and daemon expect it.
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

fn is_zero(page: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|b| *b == 0) && post.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0)
}

impl SharedRam {
    /// Takes over `ranges` (guest RAM, private anonymous): registers them with a new
    /// userfaultfd for write protection. `keepalive` owns the mappings (a clone of the
    /// guest memory handle) so that they outlive every access made here.
    pub fn new(
        ranges: Vec<RamRange>,
        keepalive: Box<dyn std::any::Any + Send>,
    ) -> Result<Self, PageError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(
                FeatureFlags::PAGEFAULT_FLAG_WP
                    | FeatureFlags::from_bits_retain(
                        UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED,
                    ),
            )
            .create()
            .map_err(|e| PageError::Uffd(e.to_string()))?;
        let mut starts = Vec::new();
        let mut pages = 0;
        for r in &ranges {
            starts.push(pages);
            pages += r.len / PAGE;
            uffd.register_with_mode(
                r.hva as *mut libc::c_void,
                r.len as usize,
                RegisterMode::WRITE_PROTECT,
            )
            .map_err(|e| PageError::Uffd(format!("register {:#x}+{:#x}: {e}", r.hva, r.len)))?;
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
            remaps: 0,
            pagemap,
            zero_hash: page_hash(&[0u8; PAGE_SIZE]),
            protect_stats: ProtectStats::default(),
        })
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

    /// Copies the guest page at `hva` into `buf`: the only way a page that a vCPU may be
    /// writing is read. `hva` must come from [`Self::hva`] or [`Self::pieces`].
    fn copy_page(&self, hva: u64, buf: &mut PageBuf) {
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
    fn page_equals_frame(&self, hva: u64, frame: u64) -> Result<bool, PageError> {
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
    fn protected_page_is_zero(&self, hva: u64) -> bool {
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

    /// The hash of a frame this request has just populated. Such a frame is mapped over
    /// no page yet and has no other writer (see [`Self::page_equals_frame`]), so it is
    /// hashed in place.
    fn populated_frame_hash(&self, frame: u64) -> Result<u64, PageError> {
        let pool = self.check_frames(frame, 1)?;
        // SAFETY: inside the pool's read-only mapping (checked above), which lives as long
        // as `self.pool`; the frame was written by our own `pwrite` and nobody writes it
        // while this slice lives (it is pool memory, not guest RAM).
        let bytes = unsafe {
            std::slice::from_raw_parts(pool.base.add((frame * PAGE) as usize), PAGE_SIZE)
        };
        Ok(page_hash(bytes))
    }

    fn protect(&self, hva: u64, len: u64) -> Result<(), PageError> {
        self.uffd
            .write_protect(hva as *mut libc::c_void, len as usize)
            .map_err(uffd_op("write-protect", hva, len))
    }

    fn unprotect(&self, hva: u64, len: u64) -> Result<(), PageError> {
        self.uffd
            .remove_write_protection(hva as *mut libc::c_void, len as usize, true)
            .map_err(uffd_op("unprotect", hva, len))
    }

    fn reregister(&self, hva: u64, len: u64) -> Result<(), PageError> {
        self.uffd
            .register_with_mode(
                hva as *mut libc::c_void,
                len as usize,
                RegisterMode::WRITE_PROTECT,
            )
            .map(|_| ())
            .map_err(uffd_op("register", hva, len))
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

    /// Pagemap entries of `n` pages from `hva`.
    fn pagemap(&self, hva: u64, n: u64) -> Result<Vec<u64>, PageError> {
        let mut buf = vec![0u8; (n * 8) as usize];
        self.pagemap
            .read_exact_at(&mut buf, (hva / PAGE) * 8)
            .map_err(os("read /proc/self/pagemap"))?;
        Ok(buf
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }

    /// Digests `runs`; `dirty` (if tracking) says which pages were written since their last
    /// digest, and is cleared for the pages digested — only once the whole request
    /// succeeded, so that a failed digest can be asked again without losing writes.
    ///
    /// The guest runs meanwhile: each page is copied into a local buffer first and the copy
    /// is hashed ([`Self::copy_page`]).
    pub fn digest(
        &self,
        runs: &[PageRun],
        dirty: Option<&mut Bitmap>,
        out: &mut Vec<PageDigest>,
    ) -> Result<(), PageError> {
        out.clear();
        // Check every run before any work: a bad request fails without side effects.
        let mut pieces = Vec::with_capacity(runs.len());
        for run in runs {
            pieces.extend(self.pieces(run.gfn, u64::from(run.len))?);
        }
        let mut buf = PageBuf::zeroed();
        for &(first, n, hva) in &pieces {
            let any_file = (first..first + n).any(|p| self.file_mapped.get(p));
            let pm = if any_file {
                Some(self.pagemap(hva, n)?)
            } else {
                None
            };
            for k in 0..n {
                let p = first + k;
                self.copy_page(hva + k * PAGE, &mut buf);
                let hash = page_hash(&buf.0);
                let zero = hash == self.zero_hash && is_zero(&buf.0);
                let split = match &pm {
                    Some(pm) if self.file_mapped.get(p) => {
                        let e = pm[k as usize];
                        e & PM_PRESENT != 0 && e & PM_FILE == 0
                    }
                    _ => false,
                };
                out.push(PageDigest {
                    hash,
                    zero,
                    split,
                    dirty: dirty.as_deref().map(|b| b.get(p)),
                });
            }
        }
        if let Some(b) = dirty {
            for &(first, n, _) in &pieces {
                for p in first..first + n {
                    b.set(p, false);
                }
            }
        }
        Ok(())
    }

    fn map_frames(&mut self, hva: u64, n: u64, frame: u64) -> Result<bool, PageError> {
        let pool = self.pool.as_ref().ok_or(PageError::NoPool)?;
        // SAFETY: replaces `n` pages of guest RAM (inside our ranges, checked by `pieces`)
        // with a private copy-on-write mapping of pool frames whose content was just
        // verified equal (or copied) under write protection, so guest-visible content is
        // unchanged.
        let r = unsafe {
            libc::mmap(
                hva as *mut libc::c_void,
                (n * PAGE) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                pool.file.as_raw_fd(),
                (frame * PAGE) as libc::off_t,
            )
        };
        if r == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOMEM) {
                return Ok(false);
            }
            return Err(PageError::Os {
                what: "mmap a pool frame",
                source: e,
            });
        }
        self.remaps += 1;
        // The caller registers the new mapping with userfaultfd (once per span).
        Ok(true)
    }

    /// Groups page pieces `(first page, pages, hva)` (in ascending order) into spans to
    /// write-protect with one call each: neighbours within one RAM range and at most
    /// `MAX_GAP` pages apart share a span. Protecting the small gaps too costs a writer
    /// there a short wait; it saves two system calls per piece.
    fn spans(&self, pieces: &[(u64, u64, u64)]) -> Vec<(u64, u64)> {
        const MAX_GAP: u64 = 64;
        let range_of = |p: u64| self.starts.partition_point(|s| *s <= p);
        let mut spans: Vec<(u64, u64, usize)> = Vec::new();
        for &(first, n, hva) in pieces {
            let r = range_of(first);
            match spans.last_mut() {
                Some((s_hva, s_len, s_r))
                    if *s_r == r
                        && hva >= *s_hva + *s_len
                        && hva - (*s_hva + *s_len) <= MAX_GAP * PAGE =>
                {
                    *s_len = hva + n * PAGE - *s_hva;
                }
                _ => spans.push((hva, n * PAGE, r)),
            }
        }
        spans.into_iter().map(|(h, l, _)| (h, l)).collect()
    }

    /// Runs `work` with `spans` write-protected, then unprotects them (whatever `work`
    /// returned) and records how long they stayed protected.
    fn protected<T>(
        &mut self,
        spans: &[(u64, u64)],
        work: impl FnOnce(&mut Self) -> Result<T, PageError>,
    ) -> Result<T, PageError> {
        let start = std::time::Instant::now();
        for (i, &(hva, len)) in spans.iter().enumerate() {
            if let Err(e) = self.protect(hva, len) {
                for &(h, l) in &spans[..i] {
                    let _ = self.unprotect(h, l);
                }
                return Err(e);
            }
        }
        let res = work(self);
        let mut unprot = Ok(());
        for &(hva, len) in spans {
            if let Err(e) = self.unprotect(hva, len) {
                // `work` failed between a remap and its registration: a mapping in the span
                // is not registered, so the kernel refused the whole call. Register it and
                // retry, then page by page: a page left protected would block a writing vCPU.
                tracing::warn!("unprotect {hva:#x}+{len:#x} failed ({e}); retrying");
                if self
                    .reregister(hva, len)
                    .and_then(|()| self.unprotect(hva, len))
                    .is_err()
                {
                    for off in (0..len).step_by(PAGE_SIZE) {
                        let _ = self.reregister(hva + off, PAGE);
                        let _ = self.unprotect(hva + off, PAGE);
                    }
                }
                unprot = Err(e);
            }
        }
        self.protect_stats
            .samples_ns
            .push(start.elapsed().as_nanos() as u64);
        let v = res?;
        unprot?;
        Ok(v)
    }

    /// Carries out merge runs (see `MergeHost::merge`): the whole request under one
    /// write protection, one `mmap` per run of accepted pages, one userfaultfd
    /// registration per protected span.
    pub fn merge(&mut self, ops: &[MergeOp], out: &mut Vec<MergeResult>) -> Result<(), PageError> {
        self.tracked(|ram| ram.merge_all(ops, out))
    }

    fn merge_all(&mut self, ops: &[MergeOp], out: &mut Vec<MergeResult>) -> Result<(), PageError> {
        out.clear();
        if self.pool.is_none() {
            return Err(PageError::NoPool);
        }
        let mut work = Vec::new();
        for op in ops {
            // Check every run before any work: a bad request fails without side effects.
            self.check_frames(u64::from(op.frame), u64::from(op.len))?;
            let mut frame = u64::from(op.frame);
            for (first, n, hva) in self.pieces(op.gfn, u64::from(op.len))? {
                work.push((op.kind, first, n, hva, frame));
                frame += n;
            }
        }
        // Chunks of at most PROTECT_CHUNK pages: few system calls per page, yet a guest write
        // that hits the batch waits for one chunk's work at most.
        let mut start = 0;
        while start < work.len() {
            let mut end = start;
            let mut pages = 0;
            while end < work.len() && (end == start || pages + work[end].2 <= PROTECT_CHUNK) {
                pages += work[end].2;
                end += 1;
            }
            let chunk = &work[start..end];
            let mut pieces: Vec<(u64, u64, u64)> = chunk.iter().map(|w| (w.1, w.2, w.3)).collect();
            pieces.sort_unstable_by_key(|p| p.2);
            let spans = self.spans(&pieces);
            self.protected(&spans, |ram| {
                for &(kind, first, n, hva, frame) in chunk {
                    ram.merge_protected(kind, first, n, hva, frame, out)?;
                }
                for &(hva, len) in &spans {
                    ram.reregister(hva, len)?;
                }
                Ok(())
            })?;
            start = end;
        }
        Ok(())
    }

    fn merge_protected(
        &mut self,
        kind: OpKind,
        first: u64,
        n: u64,
        hva: u64,
        frame: u64,
        out: &mut Vec<MergeResult>,
    ) -> Result<(), PageError> {
        let base = out.len();
        if kind == OpKind::Populate {
            // The run's pages are contiguous in guest RAM and its frames in the pool: one
            // write fills them all.
            let pool = self.check_frames(frame, n)?;
            debug_assert!(self.in_ram(hva, n));
            let mut done = 0usize;
            let len = (n * PAGE) as usize;
            while done < len {
                // SAFETY: pwrite reads `len - done` bytes from inside the `n` pages of guest
                // RAM at `hva` (checked by `pieces`, mapped while `self` lives), which the
                // caller write-protected, so no one writes them meanwhile (see
                // `page_equals_frame`); no Rust reference to them is formed. The target
                // frames are fresh: no page maps them yet.
                let w = unsafe {
                    libc::pwrite(
                        pool.file.as_raw_fd(),
                        (hva as *const u8).add(done).cast(),
                        len - done,
                        (frame * PAGE) as libc::off_t + done as libc::off_t,
                    )
                };
                if w < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(PageError::Os {
                        what: "write pool frames",
                        source: e,
                    });
                }
                if w == 0 {
                    return Err(PageError::Os {
                        what: "write pool frames",
                        source: std::io::ErrorKind::WriteZero.into(),
                    });
                }
                done += w as usize;
            }
        }
        // Decide page by page, then map maximal runs of accepted pages with one mmap each.
        for k in 0..n {
            match kind {
                OpKind::Populate => {
                    // The hash of the bytes copied: the frame's, read back from the pool.
                    out.push(MergeResult {
                        outcome: MergeOutcome::Merged,
                        hash: self.populated_frame_hash(frame + k)?,
                    });
                }
                OpKind::Join => {
                    let equal = self.page_equals_frame(hva + k * PAGE, frame + k)?;
                    out.push(MergeResult {
                        outcome: if equal {
                            MergeOutcome::Merged
                        } else {
                            MergeOutcome::Mismatch
                        },
                        hash: 0,
                    });
                }
            }
        }
        let mut k = 0;
        while k < n {
            if out[base + k as usize].outcome != MergeOutcome::Merged {
                k += 1;
                continue;
            }
            let run_start = k;
            while k < n && out[base + k as usize].outcome == MergeOutcome::Merged {
                k += 1;
            }
            let len = k - run_start;
            if self.map_frames(hva + run_start * PAGE, len, frame + run_start)? {
                for p in first + run_start..first + k {
                    self.file_mapped.set(p, true);
                }
            } else {
                for r in &mut out[base + run_start as usize..base + k as usize] {
                    r.outcome = MergeOutcome::NoVmaBudget;
                }
            }
        }
        Ok(())
    }

    /// Verifies and drops zero pages (see `MergeHost::reclaim_zero`), all under one write
    /// protection, one `madvise` per run of consecutive zero pages.
    pub fn reclaim_zero(
        &mut self,
        gfns: &[u64],
        out: &mut Vec<ZeroOutcome>,
    ) -> Result<(), PageError> {
        self.tracked(|ram| ram.reclaim_zero_all(gfns, out))
    }

    fn reclaim_zero_all(
        &mut self,
        gfns: &[u64],
        out: &mut Vec<ZeroOutcome>,
    ) -> Result<(), PageError> {
        out.clear();
        let mut pieces = Vec::with_capacity(gfns.len());
        for &p in gfns {
            pieces.push((p, 1, self.hva(p)?));
        }
        let mut order: Vec<(u64, u64, u64)> = pieces.clone();
        order.sort_unstable_by_key(|p| p.2);
        let spans = self.spans(&order);
        let outcomes = self.protected(&spans, |ram| {
            let mut outcomes = vec![ZeroOutcome::NotZero; pieces.len()];
            let mut file_zero = Vec::new();
            let mut anon_zero: Vec<u64> = Vec::new();
            for (i, &(p, _, hva)) in pieces.iter().enumerate() {
                if !ram.protected_page_is_zero(hva) {
                    continue;
                }
                outcomes[i] = ZeroOutcome::Reclaimed;
                if ram.file_mapped.get(p) {
                    file_zero.push((p, hva));
                } else {
                    anon_zero.push(hva);
                }
            }
            anon_zero.sort_unstable();
            let mut i = 0;
            while i < anon_zero.len() {
                let mut n = 1;
                while i + n < anon_zero.len() && anon_zero[i + n] == anon_zero[i] + n as u64 * PAGE
                {
                    n += 1;
                }
                // SAFETY: guest RAM, private anonymous, verified all zero under write
                // protection: after MADV_DONTNEED it reads zero again.
                let rc = unsafe {
                    libc::madvise(
                        anon_zero[i] as *mut libc::c_void,
                        n * PAGE_SIZE,
                        libc::MADV_DONTNEED,
                    )
                };
                if rc != 0 {
                    return Err(last_os("madvise(MADV_DONTNEED)"));
                }
                ram.remaps += 1;
                i += n;
            }
            for (p, hva) in file_zero {
                // A fresh anonymous page reads zero, like the page does now.
                ram.fresh_anonymous(hva, PAGE)?;
                ram.file_mapped.set(p, false);
            }
            Ok(outcomes)
        })?;
        *out = outcomes;
        Ok(())
    }

    fn fresh_anonymous(&mut self, hva: u64, len: u64) -> Result<(), PageError> {
        // SAFETY: replaces guest RAM at `hva` (checked by callers) with fresh anonymous
        // memory; callers only do so where the content is zero.
        let r = unsafe {
            libc::mmap(
                hva as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if r == libc::MAP_FAILED {
            return Err(last_os("mmap anonymous memory"));
        }
        self.remaps += 1;
        // SAFETY: as above, same range.
        unsafe {
            libc::madvise(
                hva as *mut libc::c_void,
                len as usize,
                libc::MADV_NOHUGEPAGE,
            )
        };
        self.reregister(hva, len)
    }

    /// Gives pages private anonymous memory again (see `MergeHost::unmerge`).
    pub fn unmerge(
        &mut self,
        gfns: &[u64],
        out: &mut Vec<UnmergeOutcome>,
    ) -> Result<(), PageError> {
        self.tracked(|ram| ram.unmerge_all(gfns, out))
    }

    fn unmerge_all(
        &mut self,
        gfns: &[u64],
        out: &mut Vec<UnmergeOutcome>,
    ) -> Result<(), PageError> {
        out.clear();
        // Check every page before any work (and before any bitmap lookup): a bad request
        // fails without side effects.
        for &p in gfns {
            self.hva(p)?;
        }
        let mut i = 0;
        while i < gfns.len() {
            // Group consecutive pages that are file-mapped into one run.
            let p = gfns[i];
            if !self.file_mapped.get(p) {
                out.push(UnmergeOutcome::Unmerged);
                i += 1;
                continue;
            }
            let mut n = 1;
            while i + n < gfns.len()
                && gfns[i + n] == p + n as u64
                && self.file_mapped.get(p + n as u64)
            {
                n += 1;
            }
            let mut done = 0u64;
            for (first, len, hva) in self.pieces(p, n as u64)? {
                let ok = self.unmerge_run(first, len, hva)?;
                let outcome = if ok {
                    UnmergeOutcome::Unmerged
                } else {
                    UnmergeOutcome::NoVmaBudget
                };
                out.extend(std::iter::repeat_n(outcome, len as usize));
                done += len;
            }
            debug_assert_eq!(done, n as u64);
            i += n;
        }
        Ok(())
    }

    fn unmerge_run(&mut self, first: u64, n: u64, hva: u64) -> Result<bool, PageError> {
        let len = (n * PAGE) as usize;
        let start = std::time::Instant::now();
        self.protect(hva, n * PAGE)?;
        let res = (|| {
            // SAFETY: a new private anonymous mapping at an address of the kernel's choosing.
            let tmp = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if tmp == libc::MAP_FAILED {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOMEM) {
                    return Ok(false);
                }
                return Err(PageError::Os {
                    what: "mmap a bounce buffer",
                    source: e,
                });
            }
            // SAFETY: `tmp` is `len` fresh bytes of our own; the source is `n` guest pages
            // (checked by `pieces`, mapped while `self` lives), write-protected just above,
            // so no one writes them during the copy (see `page_equals_frame`); the copy goes
            // through raw pointers and forms no reference to guest RAM.
            unsafe { std::ptr::copy_nonoverlapping(hva as *const u8, tmp as *mut u8, len) };
            // SAFETY: moves the anonymous copy over the guest pages in one step (under the
            // mm's write lock), so every later access sees the same content, privately.
            let r = unsafe {
                libc::mremap(
                    tmp,
                    len,
                    len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    hva as *mut libc::c_void,
                )
            };
            if r == libc::MAP_FAILED {
                let e = std::io::Error::last_os_error();
                // SAFETY: `tmp` is still our mapping when mremap failed.
                unsafe { libc::munmap(tmp, len) };
                if e.raw_os_error() == Some(libc::ENOMEM) {
                    return Ok(false);
                }
                return Err(PageError::Os {
                    what: "mremap over guest RAM",
                    source: e,
                });
            }
            self.remaps += 1;
            // SAFETY: same guest range, now anonymous.
            unsafe { libc::madvise(hva as *mut libc::c_void, len, libc::MADV_NOHUGEPAGE) };
            self.reregister(hva, n * PAGE)?;
            Ok(true)
        })();
        let unprot = self.unprotect(hva, n * PAGE);
        self.protect_stats
            .samples_ns
            .push(start.elapsed().as_nanos() as u64);
        let ok = res?;
        unprot?;
        if ok {
            for p in first..first + n {
                self.file_mapped.set(p, false);
            }
        }
        Ok(ok)
    }

    /// Pages whose mapping is a pool frame but which hold a private (COW) copy now.
    pub fn split_pages(&self) -> Result<Vec<u64>, PageError> {
        let mut out = Vec::new();
        let mut p = 0;
        while let Some(first) = self.file_mapped.next_set(p) {
            let mut n = 1;
            while first + n < self.pages && self.file_mapped.get(first + n) && n < 4096 {
                n += 1;
            }
            for (f, len, hva) in self.pieces(first, n)? {
                for (k, e) in self.pagemap(hva, len)?.into_iter().enumerate() {
                    if e & PM_PRESENT != 0 && e & PM_FILE == 0 {
                        out.push(f + k as u64);
                    }
                }
            }
            p = first + n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Anonymous memory standing in for guest RAM; unmapped on drop.
    struct TestRam {
        base: u64,
        len: usize,
    }

    // SAFETY: only an address and a length; the mapping is process-wide.
    unsafe impl Send for TestRam {}

    impl Drop for TestRam {
        fn drop(&mut self) {
            // SAFETY: exactly the mapping made in `ram`.
            unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
        }
    }

    /// `pages` of fresh RAM under a `SharedRam`, or `None` where userfaultfd write-protect
    /// is not available to this process (the test is then skipped).
    fn ram(pages: u64) -> Option<(SharedRam, u64)> {
        let len = (pages * PAGE) as usize;
        // SAFETY: a fresh private anonymous mapping at an address of the kernel's choosing.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base as u64;
        let keep = TestRam { base, len };
        match SharedRam::new(
            vec![RamRange {
                hva: base,
                len: len as u64,
            }],
            Box::new(keep),
        ) {
            Ok(r) => Some((r, base)),
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }

    fn fill(base: u64, page: u64, byte: u8) {
        // SAFETY: a page of the test's own RAM; no other thread touches it.
        unsafe { std::ptr::write_bytes((base + page * PAGE) as *mut u8, byte, PAGE_SIZE) };
    }

    fn with_pool(ram: &mut SharedRam, frames: u64) {
        let f = tinyvmm_sys::memfd::create("pages-test-pool", 0).unwrap();
        f.set_len(frames * PAGE).unwrap();
        ram.set_pool(OwnedFd::from(f), frames * PAGE).unwrap();
    }

    #[test]
    fn unmerge_out_of_range_is_refused_not_a_panic() {
        let Some((mut ram, _)) = ram(8) else { return };
        let mut out = Vec::new();
        for bad in [vec![8], vec![0, 1, 1 << 40], vec![u64::MAX]] {
            assert!(
                matches!(ram.unmerge(&bad, &mut out), Err(PageError::Range(_))),
                "{bad:?}"
            );
        }
        // Pages that were never merged are private already.
        ram.unmerge(&[0, 7], &mut out).unwrap();
        assert_eq!(out, vec![UnmergeOutcome::Unmerged; 2]);
    }

    #[test]
    fn digest_hashes_a_copy_of_each_page_and_keeps_dirty_bits_on_failure() {
        let Some((ram, base)) = ram(4) else { return };
        fill(base, 1, 0xab);
        let mut out = Vec::new();
        let mut dirty = Bitmap::new(4);
        dirty.set_all();
        ram.digest(&[PageRun { gfn: 0, len: 2 }], Some(&mut dirty), &mut out)
            .unwrap();
        assert_eq!(out.len(), 2);
        assert!(out[0].zero && out[0].hash == page_hash(&[0; PAGE_SIZE]));
        assert!(!out[1].zero && out[1].hash == page_hash(&[0xab; PAGE_SIZE]));
        assert_eq!(out[0].dirty, Some(true));
        assert!(!dirty.get(0) && !dirty.get(1) && dirty.get(2));
        // A request with a run outside RAM fails before it clears anything.
        let bad = [PageRun { gfn: 2, len: 1 }, PageRun { gfn: 3, len: 2 }];
        assert!(matches!(
            ram.digest(&bad, Some(&mut dirty), &mut out),
            Err(PageError::Range(_))
        ));
        assert!(dirty.get(2) && dirty.get(3));
    }

    #[test]
    fn populate_then_join_compares_in_place() {
        let Some((mut ram, base)) = ram(4) else {
            return;
        };
        let mut out = Vec::new();
        assert!(matches!(
            ram.merge(
                &[MergeOp {
                    gfn: 0,
                    len: 1,
                    frame: 0,
                    kind: OpKind::Populate
                }],
                &mut out
            ),
            Err(PageError::NoPool)
        ));
        with_pool(&mut ram, 16);
        for p in 0..3 {
            fill(base, p, 0x5a);
        }
        fill(base, 3, 0x5b);
        ram.merge(
            &[MergeOp {
                gfn: 0,
                len: 1,
                frame: 3,
                kind: OpKind::Populate,
            }],
            &mut out,
        )
        .unwrap();
        assert_eq!(
            out,
            vec![MergeResult {
                outcome: MergeOutcome::Merged,
                hash: page_hash(&[0x5a; PAGE_SIZE]),
            }]
        );
        let join = |gfn| MergeOp {
            gfn,
            len: 1,
            frame: 3,
            kind: OpKind::Join,
        };
        ram.merge(&[join(1), join(2), join(3)], &mut out).unwrap();
        let outcomes: Vec<_> = out.iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes,
            [
                MergeOutcome::Merged,
                MergeOutcome::Merged,
                MergeOutcome::Mismatch
            ]
        );
        assert_eq!(ram.pool_mapped_pages(), 3);
        // Frames beyond the pool are refused before anything is remapped.
        let far = MergeOp {
            gfn: 3,
            len: 1,
            frame: 16,
            kind: OpKind::Join,
        };
        assert!(matches!(
            ram.merge(&[join(3), far], &mut out),
            Err(PageError::Range(_))
        ));
        // Merged pages unmerge with their content.
        let mut unmerged = Vec::new();
        ram.unmerge(&[0, 1, 2], &mut unmerged).unwrap();
        assert_eq!(unmerged, vec![UnmergeOutcome::Unmerged; 3]);
        assert_eq!(ram.pool_mapped_pages(), 0);
        // SAFETY: a page of the test's own RAM.
        let b = unsafe { *((base + PAGE + 17) as *const u8) };
        assert_eq!(b, 0x5a);
    }

    /// The digest's cost per page, copy included, against hashing in place (what it did
    /// before it copied). `cargo test -p tinyvmm-vmm --release -- --ignored --nocapture
    /// digest_cost`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn digest_cost() {
        const PAGES: u64 = 16384;
        let Some((ram, base)) = ram(PAGES) else {
            return;
        };
        for p in 0..PAGES {
            fill(base, p, (p % 251) as u8 + 1);
        }
        let runs = [PageRun {
            gfn: 0,
            len: PAGES as u32,
        }];
        let mut out = Vec::new();
        let mut best_copy = f64::MAX;
        let mut best_in_place = f64::MAX;
        for _ in 0..20 {
            let t = std::time::Instant::now();
            ram.digest(&runs, None, &mut out).unwrap();
            best_copy = best_copy.min(t.elapsed().as_nanos() as f64 / PAGES as f64);
            let t = std::time::Instant::now();
            let mut x = 0u64;
            for p in 0..PAGES {
                // SAFETY: the test's own RAM, which nothing writes during the measurement.
                let page = unsafe {
                    std::slice::from_raw_parts((base + p * PAGE) as *const u8, PAGE_SIZE)
                };
                x ^= page_hash(page);
            }
            std::hint::black_box(x);
            best_in_place = best_in_place.min(t.elapsed().as_nanos() as f64 / PAGES as f64);
        }
        eprintln!(
            "digest (copy + hash + zero check): {best_copy:.0} ns/page; hash in place: {best_in_place:.0} ns/page"
        );
    }
}
