//! userfaultfd write protection of guest RAM: registering it, protecting and unprotecting
//! page spans (unprotecting wakes the writers that waited), batching pieces into spans, and
//! how long each batch stayed protected.

use tinyvmm_merge_protocol::PAGE_SIZE;
use userfaultfd::{FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use super::error::{uffd_op, PageError};
use super::{RamRange, SharedRam, PAGE};

/// UFFD_FEATURE_WP_HUGETLBFS_SHMEM: write-protect shmem (pool memfd) mappings too.
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// UFFD_FEATURE_WP_UNPOPULATED: protect pages that were never touched as well.
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;

/// Write-protect statistics: how long pages stayed protected per batch (an upper bound on
/// what a vCPU writing them waits).
#[derive(Debug, Default, Clone)]
pub struct ProtectStats {
    /// Nanoseconds each protected batch lasted.
    pub samples_ns: Vec<u64>,
}

/// A new userfaultfd with every range of guest RAM registered for write protection.
pub(super) fn register_ram(ranges: &[RamRange]) -> Result<Uffd, PageError> {
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
    for r in ranges {
        uffd.register_with_mode(
            r.hva as *mut libc::c_void,
            r.len as usize,
            RegisterMode::WRITE_PROTECT,
        )
        .map_err(|e| PageError::Uffd(format!("register {:#x}+{:#x}: {e}", r.hva, r.len)))?;
    }
    Ok(uffd)
}

impl SharedRam {
    /// Write-protects `len` bytes of guest RAM from `hva`.
    pub(super) fn protect(&self, hva: u64, len: u64) -> Result<(), PageError> {
        self.uffd
            .write_protect(hva as *mut libc::c_void, len as usize)
            .map_err(uffd_op("write-protect", hva, len))
    }

    /// Lifts write protection from `len` bytes from `hva` and wakes the writers that waited.
    pub(super) fn unprotect(&self, hva: u64, len: u64) -> Result<(), PageError> {
        self.uffd
            .remove_write_protection(hva as *mut libc::c_void, len as usize, true)
            .map_err(uffd_op("unprotect", hva, len))
    }

    /// Registers a new mapping over `len` bytes from `hva` for write protection again.
    pub(super) fn reregister(&self, hva: u64, len: u64) -> Result<(), PageError> {
        self.uffd
            .register_with_mode(
                hva as *mut libc::c_void,
                len as usize,
                RegisterMode::WRITE_PROTECT,
            )
            .map(|_| ())
            .map_err(uffd_op("register", hva, len))
    }

    /// Groups page pieces `(first page, pages, hva)` (in ascending order) into spans to
    /// write-protect with one call each: neighbours within one RAM range and at most
    /// `MAX_GAP` pages apart share a span. Protecting the small gaps too costs a writer
    /// there a short wait; it saves two system calls per piece.
    pub(super) fn spans(&self, pieces: &[(u64, u64, u64)]) -> Vec<(u64, u64)> {
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
    pub(super) fn protected<T>(
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
        self.record_protected(start);
        let v = res?;
        unprot?;
        Ok(v)
    }

    /// Records that a batch protected at `start` is unprotected now.
    pub(super) fn record_protected(&mut self, start: std::time::Instant) {
        self.protect_stats
            .samples_ns
            .push(start.elapsed().as_nanos() as u64);
    }
}
