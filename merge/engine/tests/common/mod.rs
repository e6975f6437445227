//! A fleet = engine + simulated host, with the cross-checks every test runs.

#![allow(dead_code)]

use tinyvmm_merge::sim::{xxh3, HashFn, SimConcurrency, SimFleet, SimGuestSpec};
use tinyvmm_merge::{
    Counters, DomainId, Engine, GuestId, GuestSpec, HashKey, Knobs, KnobsUpdate, PageState,
    RoundReport,
};

pub struct Fleet {
    pub engine: Engine,
    pub sim: SimFleet,
    /// A guest's host failed at some point (outcomes the engine could not know).
    pub failures_seen: bool,
    /// Rounds are concurrent ([`Engine::scan_round_concurrent`]).
    pub concurrent: bool,
}

impl Fleet {
    pub fn new(knobs: Knobs) -> Self {
        Self::with_hash(knobs, xxh3)
    }

    pub fn with_hash(knobs: Knobs, hash: HashFn) -> Self {
        Fleet {
            // A fixed index key: every run of a test takes the same path.
            engine: Engine::with_hash_key(knobs, HashKey::fixed(0x7e57)).expect("valid knobs"),
            sim: SimFleet::new(hash, true),
            failures_seen: false,
            concurrent: false,
        }
    }

    /// Concurrent rounds, digests answered as `c` says.
    pub fn concurrent(knobs: Knobs, hash: HashFn, c: SimConcurrency) -> Self {
        let mut f = Self::with_hash(knobs, hash);
        f.sim.concurrency = c;
        f.concurrent = true;
        f
    }

    /// Adds a guest to the sim only (its content can be written before it registers).
    pub fn boot(&mut self, id: u32, pages: u64, domain: u32, budget: u32, dirty: bool) -> GuestId {
        let id = GuestId(id);
        self.sim.add_guest(SimGuestSpec {
            id,
            pages,
            domain: DomainId(domain),
            vma_limit: budget,
            dirty_source: dirty,
        });
        id
    }

    /// Registers a booted guest with the engine (dirty tracking starts now).
    pub fn register(&mut self, id: GuestId, budget: u32, dirty: bool, domain: u32, pages: u64) {
        self.sim.clear_dirty(id);
        self.engine
            .add_guest(GuestSpec {
                id,
                pages,
                domain: DomainId(domain),
                vma_budget: budget,
                has_dirty_source: dirty,
            })
            .expect("add guest");
    }

    pub fn add(&mut self, id: u32, pages: u64, domain: u32, budget: u32, dirty: bool) -> GuestId {
        let g = self.boot(id, pages, domain, budget, dirty);
        self.register(g, budget, dirty, domain, pages);
        g
    }

    pub fn round(&mut self) -> RoundReport {
        let r = if self.concurrent {
            self.engine.scan_round_concurrent(&mut self.sim)
        } else {
            self.engine.scan_round(&mut self.sim)
        };
        self.failures_seen |= !r.guests_failed.is_empty();
        self.check();
        r
    }

    /// Rounds until nothing changes for three full scans (or `max` rounds).
    pub fn converge(&mut self, max: usize) -> usize {
        let mut last = None;
        let mut quiet = 0;
        for i in 0..max {
            self.round();
            let c = self.engine.counters();
            let key = (
                c.pages_shared,
                c.pages_sharing,
                c.zero_pages,
                c.pages_unshared,
            );
            if Some(key) == last && c.full_scans >= 3 {
                quiet += 1;
                if quiet >= 3 {
                    return i;
                }
            } else {
                quiet = 0;
            }
            last = Some(key);
        }
        max
    }

    pub fn set(&mut self, upd: KnobsUpdate) {
        self.engine.set_knobs(upd, &mut self.sim).expect("knobs");
        self.failures_seen |= self.counters().guests_failed > 0;
        self.check();
    }

    pub fn counters(&self) -> Counters {
        self.engine.counters()
    }

    /// Every invariant, from both sides.
    pub fn check(&self) {
        let failures = self.failures_seen || self.counters().guests_failed > 0;
        assert!(
            failures || self.sim.stats.unpopulated_frees == 0,
            "a frame was freed twice or never populated"
        );
        let problems = self.sim.check();
        assert!(problems.is_empty(), "simulated fleet: {problems:?}");
        self.engine
            .audit()
            .unwrap_or_else(|e| panic!("engine audit: {e}"));
        let c = self.engine.counters();
        assert_eq!(c, self.engine.recount(), "counters differ from a recount");
        // Frames: populated in the pool => allocated in the engine. An allocated frame the
        // pool never populated may only be held by failed guests (an op whose outcome the
        // engine could not know counts as merged, so the frame is kept, never reused).
        let mut held_by_failed = std::collections::HashMap::new();
        for gc in self.engine.guests().into_iter().filter(|g| g.failed) {
            for gfn in 0..gc.pages {
                let info = self.engine.page_info(gc.id, gfn).expect("page");
                if let (PageState::Merged, Some(f)) = (info.state, info.mapping) {
                    *held_by_failed.entry((gc.domain, f)).or_insert(0u32) += 1;
                }
            }
        }
        let frames = self.engine.frames();
        let mut live_in_engine = 0;
        for &(d, f, refs) in &frames {
            assert!(refs >= 1);
            if self.sim.frame_live(d, f) {
                live_in_engine += 1;
            } else {
                assert_eq!(
                    held_by_failed.get(&(d, f)).copied(),
                    Some(refs),
                    "engine frame {f} of domain {} not populated in the pool",
                    d.0
                );
            }
        }
        assert_eq!(
            live_in_engine,
            self.sim.live_frames(),
            "populated frames leaked"
        );
        for gc in self.engine.guests() {
            let id = gc.id;
            if !self.sim.guest_ids().contains(&id) {
                continue;
            }
            assert!(self.sim.vma_count(id) <= gc.vma_budget, "{id} over budget");
            if !gc.failed {
                // A failed guest's outcomes are unknown to the engine (it assumes merged).
                assert_eq!(gc.vma_mappings, self.sim.vma_count(id), "{id} vma count");
            }
            for gfn in 0..gc.pages {
                let info = self.engine.page_info(id, gfn).expect("page");
                let sim_map = self.sim.mapping(id, gfn);
                if !gc.failed {
                    assert_eq!(
                        info.mapping,
                        sim_map.map(|(f, _)| f),
                        "{id} gfn {gfn}: engine and host disagree on the layout"
                    );
                }
                if let Some((f, false)) = sim_map {
                    assert_eq!(info.mapping, Some(f), "{id} gfn {gfn} frame");
                    // The page reads a frame: the engine must count it.
                    assert_eq!(
                        info.state,
                        PageState::Merged,
                        "{id} gfn {gfn} reads a frame the engine does not count"
                    );
                }
            }
        }
    }
}

pub fn knobs(pages_to_scan: u32) -> Knobs {
    Knobs {
        pages_to_scan,
        ..Knobs::default()
    }
}
