//! Digests: each page's hash, whether it is zero, whether it was split, and whether it was
//! written since its last digest — read while the guest runs, from a copy of the page.

use tinyvmm_merge_protocol::{PageDigest, PageRun};

use super::error::PageError;
use super::read::{is_zero, page_hash, PageBuf};
use super::splits::is_split;
use super::{SharedRam, PAGE};
use crate::share::bitmap::Bitmap;

impl SharedRam {
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
                        self.discarded.get(p) || is_split(pm[k as usize])
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
}
