//! Unmerging: a run's current contents are copied into a new anonymous mapping, which
//! `mremap` then moves over the run — atomically, so no thread ever sees an empty page.

use tinyvmm_merge_protocol::UnmergeOutcome;

use super::error::{out_of_vmas_or, PageError};
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
                // SAFETY: `tmp` is still our mapping when mremap failed.
                unsafe { libc::munmap(tmp, len) };
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
                self.file_mapped.set(p, false);
            }
        }
        Ok(ok)
    }
}
