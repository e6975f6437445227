//! [`MergeHost`] for [`SimFleet`]: the agent's page work on the simulated guests and pools
//! (digest, digest of dirty pages, merge with write protection and injected races,
//! reclaim of zero pages, unmerge, freeing frames).

use super::content::is_zero;
use super::guest::{SimGuest, PRESENT, PRIVATE};
use super::race::RaceWhen;
use super::SimFleet;
use crate::host::{
    DomainId, FrameId, Gfn, GuestId, HostError, MergeHost, MergeOp, MergeOutcome, MergeResult,
    OpKind, PageDigest, PageRun, UnmergeOutcome, ZeroOutcome, PAGE_SIZE,
};

impl SimFleet {
    fn digest_one(&self, g: &SimGuest, i: usize) -> PageDigest {
        let pool = &self.pools[&g.domain];
        let m = g.map[i];
        let (hash, zero) = if m == 0 && g.flags[i] & PRESENT == 0 {
            (self.zero_hash, true)
        } else {
            let b = g.page(pool, i);
            ((self.hash)(b), is_zero(b))
        };
        PageDigest {
            hash,
            zero,
            split: m != 0 && g.flags[i] & PRIVATE != 0,
            dirty: g
                .dirty_source
                .then(|| g.dirty[i / 64] & (1 << (i % 64)) != 0),
        }
    }
}

impl MergeHost for SimFleet {
    fn digest(
        &mut self,
        guest: GuestId,
        runs: &[PageRun],
        out: &mut Vec<PageDigest>,
    ) -> Result<(), HostError> {
        out.clear();
        self.stats.calls += 1;
        let g = self.guest_ok(guest)?;
        for r in runs {
            for i in r.gfn as usize..r.gfn as usize + r.len as usize {
                if i >= g.map.len() {
                    return Err(HostError::Protocol {
                        guest,
                        reason: format!("gfn {i} out of range"),
                    });
                }
                out.push(self.digest_one(g, i));
            }
        }
        self.stats.pages_hashed += out.len() as u64;
        let g = self.guests.get_mut(&guest).expect("guest");
        if g.dirty_source {
            for r in runs {
                for i in r.gfn as usize..r.gfn as usize + r.len as usize {
                    g.clean(i);
                }
            }
        }
        Ok(())
    }

    fn digest_dirty(
        &mut self,
        guest: GuestId,
        max: u32,
        out: &mut Vec<(Gfn, PageDigest)>,
    ) -> Result<bool, HostError> {
        out.clear();
        self.stats.calls += 1;
        let g = self.guest_ok(guest)?;
        if !g.dirty_source {
            return Err(HostError::Protocol {
                guest,
                reason: "no dirty-page source".into(),
            });
        }
        let mut gfns = Vec::new();
        let mut more = false;
        'words: for (w, &bits) in g.dirty.iter().enumerate() {
            let mut b = bits;
            while b != 0 {
                if gfns.len() == max as usize {
                    more = true;
                    break 'words;
                }
                let k = b.trailing_zeros() as usize;
                b &= b - 1;
                gfns.push(w * 64 + k);
            }
        }
        for &i in &gfns {
            out.push((i as Gfn, self.digest_one(g, i)));
        }
        self.stats.pages_hashed += out.len() as u64;
        let g = self.guests.get_mut(&guest).expect("guest");
        for &i in &gfns {
            g.clean(i);
        }
        Ok(more)
    }

    fn merge(
        &mut self,
        guest: GuestId,
        ops: &[MergeOp],
        out: &mut Vec<MergeResult>,
    ) -> Result<(), HostError> {
        out.clear();
        if ops.iter().any(|o| o.kind == OpKind::Populate) && self.concurrency.refuses(guest) {
            return Err(HostError::Busy { guest });
        }
        self.stats.calls += 1;
        let domain = self.guest_ok(guest)?.domain;
        let n = self.guests[&guest].map.len();
        for op in ops {
            if op.gfn as usize + op.len as usize > n {
                return Err(HostError::Protocol {
                    guest,
                    reason: format!("run at gfn {} out of range", op.gfn),
                });
            }
        }
        for op in ops {
            // Write-protect the run; compare (Join) or copy (Populate) page by page.
            let base = out.len();
            let mut equal = Vec::with_capacity(op.len as usize);
            for k in 0..op.len as usize {
                let i = op.gfn as usize + k;
                let f = op.frame as usize + k;
                self.fire(guest, i, RaceWhen::BeforeCompare);
                let g = self.guests.get_mut(&guest).expect("guest");
                let pool = self.pools.get_mut(&domain).expect("pool");
                pool.ensure(f);
                let (eq, hash) = match op.kind {
                    OpKind::Populate => {
                        if pool.live[f] || pool.readers[f] != 0 {
                            self.violations.push(format!(
                                "populate of {guest} gfn {i} into frame {f} in use (written while mapped)"
                            ));
                            (false, 0)
                        } else {
                            let src = g.page(pool, i).to_vec();
                            pool.bytes[f * PAGE_SIZE..(f + 1) * PAGE_SIZE].copy_from_slice(&src);
                            pool.live[f] = true;
                            self.stats.pages_copied += 1;
                            (true, (self.hash)(&src))
                        }
                    }
                    OpKind::Join => {
                        self.stats.pages_compared += 1;
                        if !pool.live[f] {
                            self.violations
                                .push(format!("join of {guest} gfn {i} onto free frame {f}"));
                            (false, 0)
                        } else {
                            (g.page(pool, i) == pool.frame(f), 0)
                        }
                    }
                };
                equal.push(eq);
                out.push(MergeResult {
                    outcome: MergeOutcome::Mismatch,
                    hash,
                });
            }
            // Map each run of equal pages with one mmap.
            let g = self.guests.get_mut(&guest).expect("guest");
            let pool = self.pools.get_mut(&domain).expect("pool");
            let mut k = 0;
            while k < equal.len() {
                if !equal[k] {
                    k += 1;
                    continue;
                }
                let mut e = k;
                while e < equal.len() && equal[e] {
                    e += 1;
                }
                let news: Vec<u32> = (k..e).map(|j| op.frame + j as u32 + 1).collect();
                let outcome = if g.remap_run(pool, op.gfn as usize + k, &news) {
                    MergeOutcome::Merged
                } else {
                    MergeOutcome::NoVmaBudget
                };
                for r in &mut out[base + k..base + e] {
                    r.outcome = outcome;
                }
                k = e;
            }
            // Unprotect: writes that were blocked land now (COW on merged pages).
            for k in 0..op.len as usize {
                if out[base + k].outcome == MergeOutcome::Merged {
                    self.fire(guest, op.gfn as usize + k, RaceWhen::AfterMap);
                }
            }
        }
        Ok(())
    }

    fn reclaim_zero(
        &mut self,
        guest: GuestId,
        gfns: &[Gfn],
        out: &mut Vec<ZeroOutcome>,
    ) -> Result<(), HostError> {
        out.clear();
        self.stats.calls += 1;
        let (g, pool) = self.guest_and_pool(guest)?;
        for &gfn in gfns {
            let i = gfn as usize;
            if i >= g.map.len() {
                return Err(HostError::Protocol {
                    guest,
                    reason: format!("gfn {i} out of range"),
                });
            }
            if !is_zero(g.page(pool, i)) {
                out.push(ZeroOutcome::NotZero);
                continue;
            }
            let m = g.map[i];
            if m == 0 {
                g.flags[i] &= !PRESENT;
            } else if g.flags[i] & PRIVATE != 0 {
                // MADV_DONTNEED under a file mapping: the page reads the pool again.
                g.flags[i] &= !PRIVATE;
                pool.readers[(m - 1) as usize] += 1;
            }
            out.push(ZeroOutcome::Reclaimed);
        }
        Ok(())
    }

    fn unmerge(
        &mut self,
        guest: GuestId,
        gfns: &[Gfn],
        out: &mut Vec<UnmergeOutcome>,
    ) -> Result<(), HostError> {
        out.clear();
        self.stats.calls += 1;
        let (g, pool) = self.guest_and_pool(guest)?;
        if gfns.iter().any(|&x| x as usize >= g.map.len()) {
            return Err(HostError::Protocol {
                guest,
                reason: "gfn out of range".into(),
            });
        }
        // One anonymous mmap per run of consecutive pages.
        let mut k = 0;
        while k < gfns.len() {
            let mut e = k + 1;
            while e < gfns.len() && gfns[e] == gfns[e - 1] + 1 {
                e += 1;
            }
            let start = gfns[k] as usize;
            let contents: Vec<Vec<u8>> = (start..start + e - k)
                .map(|i| g.page(pool, i).to_vec())
                .collect();
            if g.remap_run(pool, start, &vec![0; e - k]) {
                for (j, c) in contents.iter().enumerate() {
                    let i = start + j;
                    g.mem[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(c);
                }
                out.extend(std::iter::repeat_n(UnmergeOutcome::Unmerged, e - k));
            } else {
                out.extend(std::iter::repeat_n(UnmergeOutcome::NoVmaBudget, e - k));
            }
            k = e;
        }
        Ok(())
    }

    fn free_frames(&mut self, domain: DomainId, frames: &[FrameId]) -> Result<(), HostError> {
        self.stats.calls += 1;
        let Some(pool) = self.pools.get_mut(&domain) else {
            return Err(HostError::Pool {
                domain,
                reason: "no such pool".into(),
            });
        };
        let mut bad = Vec::new();
        for &f in frames {
            let f = f as usize;
            pool.ensure(f);
            if !pool.live[f] {
                self.stats.unpopulated_frees += 1;
            }
            if pool.readers[f] != 0 {
                bad.push(format!(
                    "free of frame {f} in domain {} while {} pages read it",
                    domain.0, pool.readers[f]
                ));
            }
            pool.live[f] = false;
            pool.bytes[f * PAGE_SIZE..(f + 1) * PAGE_SIZE].fill(0);
            self.stats.frames_freed += 1;
        }
        for b in bad {
            self.violation(b);
        }
        Ok(())
    }
}
