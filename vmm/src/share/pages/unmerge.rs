//! Unmerging: a run's current contents are copied into a new anonymous mapping, which
//! `mremap` then moves over the run — atomically, so no thread ever sees an empty page.

use tinyvmm_merge_protocol::UnmergeOutcome;

use super::error::{last_os, out_of_vmas_or, PageError};
use super::{mmap_anonymous, SharedRam, PAGE};

impl SharedRam {
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

    /// Unmerges the `n` pages from `first` at `hva` (one RAM range) under write protection:
    /// `Ok(false)` where the process has no mapping to spare and nothing changed.
    fn unmerge_run(&mut self, first: u64, n: u64, hva: u64) -> Result<bool, PageError> {
        let len = (n * PAGE) as usize;
        let start = std::time::Instant::now();
        self.protect(hva, n * PAGE)?;
        let res = (|| {
            let tmp = mmap_anonymous(len);
            if tmp == libc::MAP_FAILED {
                return out_of_vmas_or("mmap a bounce buffer", std::io::Error::last_os_error());
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
                let restored = self.put_back_after_failed_move(hva, tmp as u64, len);
                // SAFETY: `tmp` is still our mapping when mremap failed.
                unsafe { libc::munmap(tmp, len) };
                restored?;
                return out_of_vmas_or("mremap over guest RAM", e);
            }
            self.anonymous_again(hva, n * PAGE)?;
            Ok(true)
        })();
        let unprot = self.unprotect(hva, n * PAGE);
        self.record_protected(start);
        let ok = res?;
        unprot?;
        if ok {
            for p in first..first + n {
                self.set_file_mapped(p, false);
            }
        }
        Ok(ok)
    }

    /// After a failed `mremap(MREMAP_FIXED)` of the copy at `tmp` over `len` bytes of guest
    /// RAM at `hva`: the kernel unmaps the destination before it moves, so a failure late
    /// in the move can leave a hole where guest RAM was (a vCPU touching it would end the
    /// VM). If any page of the range is unmapped, a fresh anonymous mapping is put there
    /// (never over a mapping: `MAP_FIXED_NOREPLACE`) holding the copy, which the write
    /// protection kept equal to the guest's pages.
    pub(super) fn put_back_after_failed_move(
        &mut self,
        hva: u64,
        tmp: u64,
        len: usize,
    ) -> Result<(), PageError> {
        if range_is_mapped(hva, len) {
            return Ok(());
        }
        tracing::warn!(
            hva,
            len,
            "guest RAM was unmapped by a failed mremap; restoring it"
        );
        // Whatever is left of the range goes first, so that one mapping covers it all.
        // SAFETY: `hva..hva+len` is guest RAM (checked by the caller) that the failed move
        // left partly or wholly unmapped; its content is in `tmp`.
        unsafe { libc::munmap(hva as *mut libc::c_void, len) };
        // SAFETY: a new private anonymous mapping exactly where guest RAM was; with
        // MAP_FIXED_NOREPLACE it can replace nothing.
        let back = unsafe {
            libc::mmap(
                hva as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_NORESERVE
                    | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if back as u64 != hva {
            return Err(PageError::Incomplete(Box::new(last_os(
                "restore guest RAM after a failed mremap",
            ))));
        }
        // SAFETY: `tmp` holds `len` bytes of ours; `hva` is the fresh mapping above, which
        // no one else can reach yet (the guest's accesses to it fault until registered).
        unsafe { std::ptr::copy_nonoverlapping(tmp as *const u8, hva as *mut u8, len) };
        self.anonymous_again(hva, len as u64)
    }
}

/// Whether every page of `addr..addr+len` is mapped (`mincore` fails with ENOMEM where one
/// is not).
fn range_is_mapped(addr: u64, len: usize) -> bool {
    let mut vec = vec![0u8; len.div_ceil(PAGE as usize)];
    // SAFETY: `vec` has one byte per page of the range; mincore only reads the page tables.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    rc == 0
}
