//! The physical limits of the page mechanism on this machine, measured at the start of a
//! benchmark so that each result can be read next to them: what hashing and comparing a
//! page cost on one core (from DRAM, as a scan sees guest RAM), what a merge's `mmap` costs
//! for an isolated page and per page of a long run, and what `MADV_DONTNEED` (zero pages)
//! costs. A merged page needs at least a hash in each guest, a compare and its share of a
//! mapping; the floor printed is that sum.

use std::os::fd::AsRawFd;
use std::time::Instant;

use serde::Serialize;

use tinyvmm_merge_protocol::{page_hash, PAGE_SIZE};

/// Pages per buffer: 64 MiB, larger than the last-level cache.
const PAGES: usize = 16 * 1024;
/// Pages per run for the run-mapping measurement.
const RUN: usize = 64;

/// What one core does per 4 KiB page here, µs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Limits {
    /// xxh3-64 of a page, from DRAM.
    pub hash_us: f64,
    /// `memcmp` of two equal pages, from DRAM.
    pub compare_us: f64,
    /// `mmap(MAP_FIXED)` of one pool page over anonymous memory (an isolated merge).
    pub map_page_us: f64,
    /// The same per page of a 64-page run.
    pub map_run_us: f64,
    /// `MADV_DONTNEED` per page, 64-page batches (zero pages).
    pub dontneed_us: f64,
}

impl Limits {
    /// The least CPU a merged page costs with isolated pages (two hashes, a compare, one
    /// mapping) and with long runs.
    pub fn floor_us(&self) -> (f64, f64) {
        let base = 2.0 * self.hash_us + self.compare_us;
        (base + self.map_page_us, base + self.map_run_us)
    }

    /// Measures on the calling thread (about a second).
    pub fn measure() -> std::io::Result<Self> {
        let mut a = Anon::new(PAGES)?;
        let mut b = Anon::new(PAGES)?;
        for (i, p) in a.pages_mut().chunks_mut(PAGE_SIZE).enumerate() {
            p.fill((i % 251) as u8 + 1);
        }
        let src = a.pages().to_vec();
        b.pages_mut().copy_from_slice(&src);
        drop(src);

        let t = Instant::now();
        let mut acc = 0u64;
        for p in a.pages().chunks(PAGE_SIZE) {
            acc = acc.wrapping_add(page_hash(p));
        }
        let hash_us = per_page(t, PAGES);
        std::hint::black_box(acc);

        let t = Instant::now();
        let equal = a
            .pages()
            .chunks(PAGE_SIZE)
            .zip(b.pages().chunks(PAGE_SIZE))
            .filter(|(x, y)| std::hint::black_box(x) == std::hint::black_box(y))
            .count();
        let compare_us = per_page(t, PAGES);
        std::hint::black_box(equal);

        let pool = tinyvmm_sys::memfd::create("tinyvmm-limits", 0)?;
        pool.set_len((PAGES * PAGE_SIZE) as u64)?;
        // Isolated pages: every other page, so no two mappings coalesce.
        let n = PAGES / 2;
        let t = Instant::now();
        for i in 0..n {
            a.map_pool(2 * i, 1, &pool, i)?;
        }
        let map_page_us = per_page(t, n);
        let t = Instant::now();
        for r in 0..PAGES / RUN {
            b.map_pool(r * RUN, RUN, &pool, r * RUN)?;
        }
        let map_run_us = per_page(t, PAGES);

        let mut c = Anon::new(PAGES)?;
        c.pages_mut().fill(1);
        let t = Instant::now();
        for r in 0..PAGES / RUN {
            c.dontneed(r * RUN, RUN)?;
        }
        let dontneed_us = per_page(t, PAGES);
        Ok(Limits {
            hash_us,
            compare_us,
            map_page_us,
            map_run_us,
            dontneed_us,
        })
    }
}

fn per_page(t: Instant, pages: usize) -> f64 {
    t.elapsed().as_secs_f64() * 1e6 / pages as f64
}

/// Private anonymous memory, unmapped on drop.
struct Anon {
    base: *mut u8,
    len: usize,
}

impl Anon {
    fn new(pages: usize) -> std::io::Result<Self> {
        let len = pages * PAGE_SIZE;
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Anon {
            base: p.cast(),
            len,
        })
    }

    fn pages(&self) -> &[u8] {
        // SAFETY: `base..base+len` is our mapping, readable for our lifetime.
        unsafe { std::slice::from_raw_parts(self.base, self.len) }
    }

    fn pages_mut(&mut self) -> &mut [u8] {
        // SAFETY: `base..base+len` is our mapping, writable, borrowed mutably through us.
        unsafe { std::slice::from_raw_parts_mut(self.base, self.len) }
    }

    /// Maps `n` pages of `pool` from frame `frame` over our pages from `page` on.
    fn map_pool(
        &self,
        page: usize,
        n: usize,
        pool: &std::fs::File,
        frame: usize,
    ) -> std::io::Result<()> {
        assert!(page + n <= self.len / PAGE_SIZE);
        // SAFETY: MAP_FIXED over pages of our own mapping, which nothing else references
        // (the slices handed out above do not outlive their calls).
        let p = unsafe {
            libc::mmap(
                self.base.add(page * PAGE_SIZE).cast(),
                n * PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                pool.as_raw_fd(),
                (frame * PAGE_SIZE) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Drops `n` pages from `page` on (they read as zero afterwards).
    fn dontneed(&self, page: usize, n: usize) -> std::io::Result<()> {
        assert!(page + n <= self.len / PAGE_SIZE);
        // SAFETY: within our own mapping.
        let r = unsafe {
            libc::madvise(
                self.base.add(page * PAGE_SIZE).cast(),
                n * PAGE_SIZE,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}
