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
//!
//! Files: `guest.rs` (a guest's pages, mappings, VMA count, dirty bits), `pool.rs` (a
//! domain's frames), `content.rs` (page patterns), `race.rs` (injected guest writes),
//! `host.rs` (the [`MergeHost`] implementation), `concurrent.rs` (digests answered out of
//! order, late, and busy partners), `check.rs` ([`SimFleet::check`]).

mod check;
mod concurrent;
mod content;
mod guest;
mod host;
mod pool;
mod race;

pub use concurrent::SimConcurrency;

use std::collections::BTreeMap;

#[cfg(doc)]
use crate::host::MergeHost;
use crate::host::{DomainId, FrameId, Gfn, GuestId, HostError, PAGE_SIZE};

pub use content::pattern;
pub use race::{Race, RaceWhen};

use content::{fill_pattern, ZERO_PAGE};
use guest::{SimGuest, PRESENT, PRIVATE};
use pool::SimPool;

/// A page hash function.
pub type HashFn = fn(&[u8]) -> u64;

/// xxh3-64, the real agent's hash.
pub fn xxh3(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
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
    /// How digests started concurrently are answered.
    pub concurrency: SimConcurrency,
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
            concurrency: SimConcurrency::default(),
        }
    }

    /// Adds a guest with all-zero, anonymous, never-written RAM.
    pub fn add_guest(&mut self, s: SimGuestSpec) {
        self.pools.entry(s.domain).or_default();
        self.guests.insert(s.id, SimGuest::new(s, self.shadow));
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

    /// The guest's current view of a page.
    pub fn read(&self, id: GuestId, gfn: Gfn) -> &[u8] {
        let g = &self.guests[&id];
        g.page(&self.pools[&g.domain], gfn as usize)
    }

    /// A guest writes `data` at `offset` in page `gfn` (COW if the page maps a frame).
    pub fn write(&mut self, id: GuestId, gfn: Gfn, offset: usize, data: &[u8]) {
        let g = self.guests.get_mut(&id).expect("guest");
        let pool = self.pools.get_mut(&g.domain).expect("pool");
        g.write(pool, gfn as usize, offset, data);
    }

    /// A guest overwrites page `gfn` with `pattern(seed)`.
    pub fn fill(&mut self, id: GuestId, gfn: Gfn, seed: u64) {
        let mut buf = [0u8; PAGE_SIZE];
        fill_pattern(&mut buf, seed);
        self.write(id, gfn, 0, &buf);
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

    /// Mapping of a page: `Some((frame, holds_private_copy))` under a pool mapping.
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
}
