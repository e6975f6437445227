//! Merging: Join byte-compares pages with pool frames under write protection, and the
//! equal pages then map their frames (`mmap(MAP_PRIVATE | MAP_FIXED)`). New frames are
//! written by the daemon alone (from copies it asks for with `ReadPages`): an agent holds
//! the pool read-only, so a Populate op is refused.

use std::os::fd::AsRawFd;

use tinyvmm_merge_protocol::{MergeOp, MergeOutcome, MergeResult, OpKind};

use super::error::{out_of_vmas_or, PageError};
use super::{SharedRam, PAGE};

/// Most pages one write-protected batch covers: bounds how long a guest write can wait.
const PROTECT_CHUNK: u64 = 64;
/// Most separate runs one batch covers: each costs an `mmap` that splits a mapping
/// (8–15 µs) and a userfaultfd registration, so a batch of scattered pages is cut shorter
/// than one of long runs.
const PROTECT_RUNS: usize = 16;

impl SharedRam {
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
            if op.kind == OpKind::Populate {
                return Err(PageError::Refused(
                    "populating frames is the daemon's work; the agent's pool is read-only",
                ));
            }
            self.check_frames(u64::from(op.frame), u64::from(op.len))?;
            let mut frame = u64::from(op.frame);
            for (first, n, hva) in self.pieces(op.gfn, u64::from(op.len))? {
                work.push((op.kind, first, n, hva, frame));
                frame += n;
            }
        }
        // Chunks of at most PROTECT_CHUNK pages in at most PROTECT_RUNS runs: few system
        // calls per page, yet a guest write that hits the batch waits for one chunk's work
        // at most.
        let mut start = 0;
        while start < work.len() {
            let mut end = start;
            let mut pages = 0;
            while end < work.len()
                && (end == start
                    || (pages + work[end].2 <= PROTECT_CHUNK && end - start < PROTECT_RUNS))
            {
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
        debug_assert_eq!(
            kind,
            OpKind::Join,
            "Populate ops are refused before any work"
        );
        // Decide page by page, then map maximal runs of accepted pages with one mmap each.
        for k in 0..n {
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
                    self.set_file_mapped(p, true);
                }
            } else {
                for r in &mut out[base + run_start as usize..base + k as usize] {
                    r.outcome = MergeOutcome::NoVmaBudget;
                }
            }
        }
        Ok(())
    }

    /// Maps pool frames from `frame` over the `n` verified pages at `hva`: `Ok(false)` where
    /// the process has no mapping to spare (ENOMEM) and nothing changed.
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
            return out_of_vmas_or("mmap a pool frame", std::io::Error::last_os_error());
        }
        self.remaps += 1;
        // The caller registers the new mapping with userfaultfd (once per span).
        Ok(true)
    }
}
