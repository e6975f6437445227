//! Split detection: a page mapped from the pool that the guest wrote is present and no
//! longer a file page in `/proc/self/pagemap` (the kernel's copy-on-write gave it a private
//! copy).

use std::os::unix::fs::FileExt;

use super::error::{os, PageError};
use super::{SharedRam, PAGE};

const PM_PRESENT: u64 = 1 << 63;
const PM_FILE: u64 = 1 << 61;

/// Whether a pagemap entry of a pool-mapped page says the page was split: present, and no
/// longer a file page.
pub(super) fn is_split(entry: u64) -> bool {
    entry & PM_PRESENT != 0 && entry & PM_FILE == 0
}

impl SharedRam {
    /// Pagemap entries of `n` pages from `hva`.
    pub(super) fn pagemap(&self, hva: u64, n: u64) -> Result<Vec<u64>, PageError> {
        let mut buf = vec![0u8; (n * 8) as usize];
        self.pagemap
            .read_exact_at(&mut buf, (hva / PAGE) * 8)
            .map_err(os("read /proc/self/pagemap"))?;
        Ok(buf
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
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
                    if is_split(e) || self.discarded.get(f + k as u64) {
                        out.push(f + k as u64);
                    }
                }
            }
            p = first + n;
        }
        Ok(out)
    }
}
