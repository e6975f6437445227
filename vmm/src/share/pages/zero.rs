//! Zero pages: verified all zero under write protection, then dropped (`MADV_DONTNEED`) so
//! that they read the zero page; a pool-mapped zero page gets a fresh anonymous mapping.

use tinyvmm_merge_protocol::{ZeroOutcome, PAGE_SIZE};

use super::error::{last_os, os, PageError};
use super::{SharedRam, PAGE};

impl SharedRam {
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
            let mut runs: Vec<(u64, usize)> = Vec::new();
            for &hva in &anon_zero {
                match runs.last_mut() {
                    Some((start, len)) if *start + *len as u64 == hva => *len += PAGE_SIZE,
                    _ => runs.push((hva, PAGE_SIZE)),
                }
            }
            if !runs.is_empty() {
                ram.remaps += runs.len() as u64;
                // SAFETY: guest RAM, private anonymous, each page verified all zero under
                // write protection: after MADV_DONTNEED it reads zero again.
                unsafe { tinyvmm_sys::dontneed::dont_need(&runs) }
                    .map_err(os("madvise(MADV_DONTNEED)"))?;
            }
            for (p, hva) in file_zero {
                // A fresh anonymous page reads zero, like the page does now.
                ram.fresh_anonymous(hva, PAGE)?;
                ram.set_file_mapped(p, false);
            }
            Ok(outcomes)
        })?;
        *out = outcomes;
        Ok(())
    }

    /// Replaces `len` bytes of guest RAM at `hva`, which read zero, with a fresh anonymous
    /// mapping (which reads zero too).
    pub(super) fn fresh_anonymous(&mut self, hva: u64, len: u64) -> Result<(), PageError> {
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
        self.anonymous_again(hva, len)
    }
}
