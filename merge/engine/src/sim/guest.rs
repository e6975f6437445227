//! A simulated guest's memory: each page's mapping (anonymous, or pool frame `f`) apart from
//! its content, the COW of a guest write, `mmap` of a run with the VMA count and its limit,
//! and the dirty bits.

use super::content::ZERO_PAGE;
use super::pool::SimPool;
use super::SimGuestSpec;
use crate::host::{DomainId, PAGE_SIZE};

pub(super) const PRIVATE: u8 = 1; // under a pool mapping: holds its own (COW) copy
pub(super) const PRESENT: u8 = 2; // anonymous: has data (else reads zeros)

pub(super) struct SimGuest {
    pub(super) domain: DomainId,
    pub(super) mem: Vec<u8>,
    /// Per page: 0 anonymous, `f + 1` under a mapping of pool frame `f`.
    pub(super) map: Vec<u32>,
    pub(super) flags: Vec<u8>,
    pub(super) dirty: Vec<u64>,
    pub(super) dirty_source: bool,
    pub(super) vma_limit: u32,
    pub(super) vmas: u32,
    pub(super) shadow: Option<Vec<u8>>,
    pub(super) gone: bool,
}

/// Whether two neighbouring mappings are one VMA.
pub(super) fn joined(a: u32, b: u32) -> bool {
    if a == 0 || b == 0 {
        a == b
    } else {
        b == a + 1
    }
}

impl SimGuest {
    /// All-zero, anonymous, never-written RAM in one mapping.
    pub(super) fn new(s: SimGuestSpec, shadow: bool) -> Self {
        let n = s.pages as usize;
        SimGuest {
            domain: s.domain,
            mem: vec![0; n * PAGE_SIZE],
            map: vec![0; n],
            flags: vec![0; n],
            dirty: vec![0; n.div_ceil(64)],
            dirty_source: s.dirty_source,
            vma_limit: s.vma_limit,
            vmas: 1,
            shadow: shadow.then(|| vec![0; n * PAGE_SIZE]),
            gone: false,
        }
    }

    /// The guest's current view of page `i` (`pool` is its domain's).
    pub(super) fn page<'a>(&'a self, pool: &'a SimPool, i: usize) -> &'a [u8] {
        let m = self.map[i];
        if m != 0 && self.flags[i] & PRIVATE == 0 {
            pool.frame((m - 1) as usize)
        } else if m == 0 && self.flags[i] & PRESENT == 0 {
            &ZERO_PAGE
        } else {
            &self.mem[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
        }
    }

    /// The guest writes `data` at `offset` in page `i` (COW if the page maps a frame).
    pub(super) fn write(&mut self, pool: &mut SimPool, i: usize, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= PAGE_SIZE);
        let m = self.map[i];
        let page = i * PAGE_SIZE;
        if m != 0 && self.flags[i] & PRIVATE == 0 {
            // Kernel COW: private copy of the frame; the frame is untouched.
            let f = (m - 1) as usize;
            self.mem[page..page + PAGE_SIZE].copy_from_slice(pool.frame(f));
            pool.readers[f] -= 1;
            self.flags[i] |= PRIVATE;
        } else if m == 0 && self.flags[i] & PRESENT == 0 {
            self.mem[page..page + PAGE_SIZE].fill(0);
            self.flags[i] |= PRESENT;
        }
        self.mem[page + offset..page + offset + data.len()].copy_from_slice(data);
        self.dirty[i / 64] |= 1 << (i % 64);
        if let Some(s) = self.shadow.as_mut() {
            s[page + offset..page + offset + data.len()].copy_from_slice(data);
        }
    }

    /// Changes the mappings of pages `start..start + news.len()` with one `mmap`, keeping
    /// readers and the VMA count; `false` (nothing changed) if the guest's mapping limit
    /// would be exceeded (ENOMEM).
    pub(super) fn remap_run(&mut self, pool: &mut SimPool, start: usize, news: &[u32]) -> bool {
        let end = start + news.len();
        let lo = start.saturating_sub(1);
        let hi = (end + 1).min(self.map.len());
        let new_at = |i: usize| {
            if (start..end).contains(&i) {
                news[i - start]
            } else {
                self.map[i]
            }
        };
        let before = (lo + 1..hi)
            .filter(|&i| !joined(self.map[i - 1], self.map[i]))
            .count() as i64;
        let after = (lo + 1..hi)
            .filter(|&i| !joined(new_at(i - 1), new_at(i)))
            .count() as i64;
        let v = i64::from(self.vmas) + after - before;
        if after > before && v > i64::from(self.vma_limit) {
            return false;
        }
        for (k, &new) in news.iter().enumerate() {
            let i = start + k;
            let old = self.map[i];
            if old != 0 && self.flags[i] & PRIVATE == 0 {
                pool.readers[(old - 1) as usize] -= 1;
            }
            self.map[i] = new;
            if new != 0 {
                pool.readers[(new - 1) as usize] += 1;
                self.flags[i] &= !PRIVATE;
            } else {
                self.flags[i] |= PRESENT;
            }
        }
        self.vmas = v as u32;
        true
    }

    /// Clears the dirty bit of page `i`.
    pub(super) fn clean(&mut self, i: usize) {
        self.dirty[i / 64] &= !(1 << (i % 64));
    }
}
