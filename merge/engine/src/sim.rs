//! A simulated fleet: guests with real 4 KiB page contents, per-domain pools of frames with
//! real bytes, and the real host semantics the agent implements on Linux. It implements
//! [`MergeHost`], so the engine can be driven and checked without KVM.
//!
//! Modelled faithfully (these are where data-loss bugs hide):
//! * each page has a *mapping* (anonymous, or pool frame `f`) separate from its *content*:
//!   a page mapped onto a frame reads the frame until the guest writes it, then the
//!   kernel's COW gives it a private copy and the mapping (VMA layout) does not change;
//! * `MADV_DONTNEED` on a page under a pool mapping makes it read the pool again (not
//!   zeros): [`MergeHost::reclaim_zero`] does exactly that, so an engine that reclaims such
//!   a page loses data and the checks see it;
//! * write protection: a guest write during an op either lands before the compare/copy or
//!   after the map ([`RaceWhen`] injects both);
//! * the mapping count of each guest, with `mmap` failing (ENOMEM) above its limit;
//! * dirty tracking (when the guest has a dirty-page source) and a pluggable hash, to force
//!   collisions.
//!
//! Anything an engine must never do (write a mapped frame, free a mapped frame, join a
//! free frame) is recorded as a violation, see [`SimFleet::check`].

use std::collections::BTreeMap;

use crate::host::{
    DomainId, FrameId, Gfn, GuestId, HostError, MergeHost, MergeOp, MergeOutcome, MergeResult,
    OpKind, PageDigest, PageRun, UnmergeOutcome, ZeroOutcome, PAGE_SIZE,
};

/// A page hash function.
pub type HashFn = fn(&[u8]) -> u64;

/// xxh3-64, the real agent's hash.
pub fn xxh3(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// The content pattern used by [`SimFleet::fill`]: `seed` 0 is the zero page.
pub fn pattern(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; PAGE_SIZE];
    fill_pattern(&mut v, seed);
    v
}

fn fill_pattern(dst: &mut [u8], seed: u64) {
    if seed == 0 {
        dst.fill(0);
        return;
    }
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in dst.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
}

fn is_zero(b: &[u8]) -> bool {
    b.chunks_exact(16)
        .all(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")) == 0)
}

/// A guest of the simulated fleet.
#[derive(Clone, Copy, Debug)]
pub struct SimGuestSpec {
    /// Its id (the same the engine uses).
    pub id: GuestId,
    /// Pages of RAM.
    pub pages: u64,
    /// Its domain (pool).
    pub domain: DomainId,
    /// `mmap` fails with ENOMEM beyond this many mappings.
    pub vma_limit: u32,
    /// The guest reports dirty pages.
    pub dirty_source: bool,
}

/// When an injected guest write lands during a merge op on its page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaceWhen {
    /// Before write protection takes hold, so before the compare or copy.
    BeforeCompare,
    /// After the map (the write was blocked by write protection until then): a COW split.
    AfterMap,
}

/// A guest write injected into the next merge op that touches its page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Race {
    /// The guest.
    pub guest: GuestId,
    /// The page.
    pub gfn: Gfn,
    /// When it lands.
    pub when: RaceWhen,
    /// The page's new content is `pattern(seed)`.
    pub seed: u64,
}

/// Work done by the simulated host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Round trips, all kinds.
    pub calls: u64,
    /// Pages hashed by digest calls.
    pub pages_hashed: u64,
    /// Pages byte-compared by joins.
    pub pages_compared: u64,
    /// Pages copied into frames.
    pub pages_copied: u64,
    /// Frames punched.
    pub frames_freed: u64,
    /// Races injected and fired.
    pub races_fired: u64,
    /// Frees of frames that were never populated (or already freed). Harmless for data
    /// (punching a hole twice), but a bookkeeping error unless the engine could not know
    /// whether a failed guest's populate happened.
    pub unpopulated_frees: u64,
}

const PRIVATE: u8 = 1; // under a pool mapping: holds its own (COW) copy
const PRESENT: u8 = 2; // anonymous: has data (else reads zeros)

struct SimGuest {
    domain: DomainId,
    mem: Vec<u8>,
    map: Vec<u32>,
    flags: Vec<u8>,
    dirty: Vec<u64>,
    dirty_source: bool,
    vma_limit: u32,
    vmas: u32,
    shadow: Option<Vec<u8>>,
    gone: bool,
}

#[derive(Default)]
struct SimPool {
    bytes: Vec<u8>,
    live: Vec<bool>,
    readers: Vec<u32>,
}

impl SimPool {
    fn ensure(&mut self, f: usize) {
        if f >= self.live.len() {
            self.live.resize(f + 1, false);
            self.readers.resize(f + 1, 0);
            self.bytes.resize((f + 1) * PAGE_SIZE, 0);
        }
    }
    fn frame(&self, f: usize) -> &[u8] {
        &self.bytes[f * PAGE_SIZE..(f + 1) * PAGE_SIZE]
    }
}

fn joined(a: u32, b: u32) -> bool {
    if a == 0 || b == 0 {
        a == b
    } else {
        b == a + 1
    }
}

/// The simulated fleet.
pub struct SimFleet {
    guests: BTreeMap<GuestId, SimGuest>,
    pools: BTreeMap<DomainId, SimPool>,
    hash: HashFn,
    zero_hash: u64,
    shadow: bool,
    races: Vec<Race>,
    violations: Vec<String>,
    /// Work counters.
    pub stats: SimStats,
}

impl SimFleet {
    /// An empty fleet hashing with `hash`; with `shadow`, every guest keeps a second copy
    /// of what it wrote so that [`SimFleet::check`] can verify every page.
    pub fn new(hash: HashFn, shadow: bool) -> Self {
        SimFleet {
            guests: BTreeMap::new(),
            pools: BTreeMap::new(),
            hash,
            zero_hash: hash(&ZERO_PAGE),
            shadow,
            races: Vec::new(),
            violations: Vec::new(),
            stats: SimStats::default(),
        }
    }

    /// Adds a guest with all-zero, anonymous, never-written RAM.
    pub fn add_guest(&mut self, s: SimGuestSpec) {
        let n = s.pages as usize;
        self.pools.entry(s.domain).or_default();
        self.guests.insert(
            s.id,
            SimGuest {
                domain: s.domain,
                mem: vec![0; n * PAGE_SIZE],
                map: vec![0; n],
                flags: vec![0; n],
                dirty: vec![0; n.div_ceil(64)],
                dirty_source: s.dirty_source,
                vma_limit: s.vma_limit,
                vmas: 1,
                shadow: self.shadow.then(|| vec![0; n * PAGE_SIZE]),
                gone: false,
            },
        );
    }

    /// The guest's process exits: its mappings go away.
    pub fn remove_guest(&mut self, id: GuestId) {
        if let Some(g) = self.guests.remove(&id) {
            let pool = self.pools.get_mut(&g.domain).expect("pool");
            for (i, &m) in g.map.iter().enumerate() {
                if m != 0 && g.flags[i] & PRIVATE == 0 {
                    pool.readers[(m - 1) as usize] -= 1;
                }
            }
        }
    }

    /// Makes every host call for `id` fail (its agent died) or work again.
    pub fn set_gone(&mut self, id: GuestId, gone: bool) {
        if let Some(g) = self.guests.get_mut(&id) {
            g.gone = gone;
        }
    }

    /// Clears the dirty state of every page (as if registration happened now).
    pub fn clear_dirty(&mut self, id: GuestId) {
        if let Some(g) = self.guests.get_mut(&id) {
            g.dirty.fill(0);
        }
    }

    /// Queues a racing write.
    pub fn inject(&mut self, r: Race) {
        self.races.push(r);
    }

    /// Drops races that did not fire.
    pub fn clear_races(&mut self) {
        self.races.clear();
    }

    /// The guest's current view of a page.
    pub fn read(&self, id: GuestId, gfn: Gfn) -> &[u8] {
        let g = &self.guests[&id];
        Self::page_of(g, &self.pools[&g.domain], gfn as usize)
    }

    fn page_of<'a>(g: &'a SimGuest, pool: &'a SimPool, i: usize) -> &'a [u8] {
        let m = g.map[i];
        if m != 0 && g.flags[i] & PRIVATE == 0 {
            pool.frame((m - 1) as usize)
        } else if m == 0 && g.flags[i] & PRESENT == 0 {
            &ZERO_PAGE
        } else {
            &g.mem[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
        }
    }

    /// A guest writes `data` at `offset` in page `gfn` (COW if the page maps a frame).
    pub fn write(&mut self, id: GuestId, gfn: Gfn, offset: usize, data: &[u8]) {
        let g = self.guests.get_mut(&id).expect("guest");
        let pool = self.pools.get_mut(&g.domain).expect("pool");
        Self::write_in(g, pool, gfn as usize, offset, data);
    }

    fn write_in(g: &mut SimGuest, pool: &mut SimPool, i: usize, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= PAGE_SIZE);
        let m = g.map[i];
        let page = i * PAGE_SIZE;
        if m != 0 && g.flags[i] & PRIVATE == 0 {
            // Kernel COW: private copy of the frame; the frame is untouched.
            let f = (m - 1) as usize;
            g.mem[page..page + PAGE_SIZE].copy_from_slice(pool.frame(f));
            pool.readers[f] -= 1;
            g.flags[i] |= PRIVATE;
        } else if m == 0 && g.flags[i] & PRESENT == 0 {
            g.mem[page..page + PAGE_SIZE].fill(0);
            g.flags[i] |= PRESENT;
        }
        g.mem[page + offset..page + offset + data.len()].copy_from_slice(data);
        g.dirty[i / 64] |= 1 << (i % 64);
        if let Some(s) = g.shadow.as_mut() {
            s[page + offset..page + offset + data.len()].copy_from_slice(data);
        }
    }

    /// A guest overwrites page `gfn` with `pattern(seed)`.
    pub fn fill(&mut self, id: GuestId, gfn: Gfn, seed: u64) {
        let mut buf = [0u8; PAGE_SIZE];
        fill_pattern(&mut buf, seed);
        self.write(id, gfn, 0, &buf);
    }

    fn fire(&mut self, id: GuestId, gfn: usize, when: RaceWhen) {
        if self.races.is_empty() {
            return;
        }
        if let Some(k) = self
            .races
            .iter()
            .position(|r| r.guest == id && r.gfn == gfn as u64 && r.when == when)
        {
            let r = self.races.swap_remove(k);
            self.fill(id, r.gfn, r.seed);
            self.stats.races_fired += 1;
        }
    }

    /// Changes the mappings of pages `start..start + news.len()` with one `mmap`, keeping
    /// readers and the VMA count; `false` (nothing changed) if the guest's mapping limit
    /// would be exceeded (ENOMEM).
    fn remap_run(g: &mut SimGuest, pool: &mut SimPool, start: usize, news: &[u32]) -> bool {
        let end = start + news.len();
        let lo = start.saturating_sub(1);
        let hi = (end + 1).min(g.map.len());
        let new_at = |i: usize| {
            if (start..end).contains(&i) {
                news[i - start]
            } else {
                g.map[i]
            }
        };
        let before = (lo + 1..hi)
            .filter(|&i| !joined(g.map[i - 1], g.map[i]))
            .count() as i64;
        let after = (lo + 1..hi)
            .filter(|&i| !joined(new_at(i - 1), new_at(i)))
            .count() as i64;
        let v = i64::from(g.vmas) + after - before;
        if after > before && v > i64::from(g.vma_limit) {
            return false;
        }
        for (k, &new) in news.iter().enumerate() {
            let i = start + k;
            let old = g.map[i];
            if old != 0 && g.flags[i] & PRIVATE == 0 {
                pool.readers[(old - 1) as usize] -= 1;
            }
            g.map[i] = new;
            if new != 0 {
                pool.readers[(new - 1) as usize] += 1;
                g.flags[i] &= !PRIVATE;
            } else {
                g.flags[i] |= PRESENT;
            }
        }
        g.vmas = v as u32;
        true
    }

    fn digest_one(&self, g: &SimGuest, i: usize) -> PageDigest {
        let pool = &self.pools[&g.domain];
        let m = g.map[i];
        let (hash, zero) = if m == 0 && g.flags[i] & PRESENT == 0 {
            (self.zero_hash, true)
        } else {
            let b = Self::page_of(g, pool, i);
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

    /// A live guest's memory and its domain's pool.
    fn guest_and_pool(&mut self, id: GuestId) -> Result<(&mut SimGuest, &mut SimPool), HostError> {
        let domain = self.guest_ok(id)?.domain;
        let g = self.guests.get_mut(&id).expect("guest");
        let pool = self.pools.get_mut(&domain).expect("pool");
        Ok((g, pool))
    }

    fn guest_ok(&self, id: GuestId) -> Result<&SimGuest, HostError> {
        match self.guests.get(&id) {
            Some(g) if !g.gone => Ok(g),
            _ => Err(HostError::GuestGone { guest: id }),
        }
    }

    fn violation(&mut self, s: String) {
        self.violations.push(s);
    }

    /// Mapping of a page: `Some((frame, holds_private_copy))` under a pool mapping.
    /// Whether the page holds memory of its own (an anonymous page the guest wrote, or a
    /// private copy), as opposed to nothing (never written, or dropped as a zero page) or
    /// a shared frame.
    pub fn present(&self, id: GuestId, gfn: Gfn) -> bool {
        let g = &self.guests[&id];
        let i = gfn as usize;
        if g.map[i] == 0 {
            g.flags[i] & PRESENT != 0
        } else {
            g.flags[i] & PRIVATE != 0
        }
    }

    pub fn mapping(&self, id: GuestId, gfn: Gfn) -> Option<(FrameId, bool)> {
        let g = &self.guests[&id];
        let i = gfn as usize;
        (g.map[i] != 0).then(|| (g.map[i] - 1, g.flags[i] & PRIVATE != 0))
    }

    /// Mappings (VMAs) the guest's layout uses.
    pub fn vma_count(&self, id: GuestId) -> u32 {
        self.guests[&id].vmas
    }

    /// Whether frame `f` of `domain` holds populated content.
    pub fn frame_live(&self, domain: DomainId, f: FrameId) -> bool {
        self.pools
            .get(&domain)
            .and_then(|p| p.live.get(f as usize).copied())
            .unwrap_or(false)
    }

    /// Frames populated and not freed, all domains.
    pub fn live_frames(&self) -> u64 {
        self.pools
            .values()
            .map(|p| p.live.iter().filter(|&&l| l).count() as u64)
            .sum()
    }

    /// Pages that read a frame (merged and not split), all guests.
    pub fn pages_reading_frames(&self) -> u64 {
        self.pools
            .values()
            .map(|p| p.readers.iter().map(|&r| u64::from(r)).sum::<u64>())
            .sum()
    }

    /// Guest ids.
    pub fn guest_ids(&self) -> Vec<GuestId> {
        self.guests.keys().copied().collect()
    }

    /// Checks everything the fleet can check on its own: the violations recorded so far,
    /// every page against what its guest last wrote (with shadows), readers and mapping
    /// counts recounted, limits respected, no page reading a free frame or another
    /// domain's frame. Returns the problems found.
    pub fn check(&self) -> Vec<String> {
        let mut v = self.violations.clone();
        let mut readers: BTreeMap<DomainId, Vec<u32>> = self
            .pools
            .iter()
            .map(|(d, p)| (*d, vec![0; p.live.len()]))
            .collect();
        for (id, g) in &self.guests {
            let pool = &self.pools[&g.domain];
            let n = g.map.len();
            let mut vmas = 1;
            for i in 0..n {
                if i > 0 && !joined(g.map[i - 1], g.map[i]) {
                    vmas += 1;
                }
                let m = g.map[i];
                if m != 0 && g.flags[i] & PRIVATE == 0 {
                    let f = (m - 1) as usize;
                    readers.get_mut(&g.domain).expect("pool")[f] += 1;
                    if !pool.live[f] {
                        v.push(format!("{id} gfn {i} reads free frame {f}"));
                    }
                }
                if let Some(s) = &g.shadow {
                    if Self::page_of(g, pool, i) != &s[i * PAGE_SIZE..(i + 1) * PAGE_SIZE] {
                        v.push(format!("{id} gfn {i} lost data (mapping {m})"));
                    }
                }
            }
            if vmas != g.vmas {
                v.push(format!("{id} vma count {} != recount {vmas}", g.vmas));
            }
            if g.vmas > g.vma_limit {
                v.push(format!(
                    "{id} uses {} mappings > limit {}",
                    g.vmas, g.vma_limit
                ));
            }
        }
        for (d, p) in &self.pools {
            if readers[d] != p.readers {
                v.push(format!("domain {} reader counts drifted", d.0));
            }
        }
        v
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
                    g.dirty[i / 64] &= !(1 << (i % 64));
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
            g.dirty[i / 64] &= !(1 << (i % 64));
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
                            let src = Self::page_of(g, pool, i).to_vec();
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
                            (Self::page_of(g, pool, i) == pool.frame(f), 0)
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
                let outcome = if Self::remap_run(g, pool, op.gfn as usize + k, &news) {
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
            if !is_zero(Self::page_of(g, pool, i)) {
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
                .map(|i| Self::page_of(g, pool, i).to_vec())
                .collect();
            if Self::remap_run(g, pool, start, &vec![0; e - k]) {
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
