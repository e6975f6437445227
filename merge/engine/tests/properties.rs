//! Property tests: random interleavings of guest writes (to merged pages too), writes
//! racing with merges, scan rounds, knob changes (`run` 0/1/2), guests joining, failing,
//! opting out and leaving. After every step `Fleet::check` verifies: every guest reads
//! exactly what it last wrote; no frame was written while mapped or freed while read;
//! refcounts equal the pages merged onto each frame, and every page reading a frame is
//! counted; counters equal a recount; no cross-domain sharing; every guest within its VMA
//! budget, the engine's layout equal to the host's.

mod common;

use common::Fleet;
use proptest::prelude::*;
use tinyvmm_merge::sim::{xxh3, HashFn, Race, RaceWhen, SimConcurrency};
use tinyvmm_merge::{GuestId, Knobs, KnobsUpdate, RunMode};

const PAGES: u64 = 24;
const MAX_GUESTS: usize = 5;

#[derive(Clone, Debug)]
enum Step {
    Write {
        guest: usize,
        gfn: u64,
        seed: u64,
    },
    Poke {
        guest: usize,
        gfn: u64,
        off: usize,
        byte: u8,
    },
    Race {
        guest: usize,
        gfn: u64,
        after_map: bool,
        seed: u64,
    },
    Rounds(u8),
    Run(u8),
    PagesToScan(u32),
    MaxSharing(u32),
    SmartScan(bool),
    Join {
        domain: u32,
        dirty: bool,
        budget: u32,
    },
    Leave(usize),
    AgentDies(usize),
    OptOut(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..MAX_GUESTS, 0..PAGES, 0..6u64).prop_map(|(guest, gfn, seed)| Step::Write { guest, gfn, seed }),
        2 => (0..MAX_GUESTS, 0..PAGES, 0..4096usize, any::<u8>())
            .prop_map(|(guest, gfn, off, byte)| Step::Poke { guest, gfn, off, byte }),
        2 => (0..MAX_GUESTS, 0..PAGES, any::<bool>(), 0..6u64)
            .prop_map(|(guest, gfn, after_map, seed)| Step::Race { guest, gfn, after_map, seed }),
        10 => (1..4u8).prop_map(Step::Rounds),
        2 => prop_oneof![Just(0u8), Just(2), Just(1), Just(1), Just(1)].prop_map(Step::Run),
        1 => (1..80u32).prop_map(Step::PagesToScan),
        1 => (2..5u32).prop_map(Step::MaxSharing),
        1 => any::<bool>().prop_map(Step::SmartScan),
        2 => (0..2u32, any::<bool>(), prop_oneof![Just(1000u32), 3..12u32])
            .prop_map(|(domain, dirty, budget)| Step::Join { domain, dirty, budget }),
        1 => (0..MAX_GUESTS).prop_map(Step::Leave),
        1 => (0..MAX_GUESTS).prop_map(Step::AgentDies),
        1 => (0..MAX_GUESTS).prop_map(Step::OptOut),
    ]
}

fn collide(b: &[u8]) -> u64 {
    xxh3(b) & 1
}

struct World {
    f: Fleet,
    /// The common guest image: most pages of every guest start like this.
    image: Vec<u64>,
    /// Guests registered with the engine.
    live: Vec<GuestId>,
    /// Guests still running (registered or not).
    running: Vec<GuestId>,
    next_id: u32,
}

impl World {
    /// Boots a guest from the image (a few pages of its own) and registers it.
    fn boot(&mut self, id: u32, domain: u32, budget: u32, dirty: bool) -> GuestId {
        let g = self.f.boot(id, PAGES, domain, budget, dirty);
        for gfn in 0..PAGES {
            let seed = if (gfn + u64::from(id)) % 5 == 0 {
                1000 * u64::from(id + 1) + gfn
            } else {
                self.image[gfn as usize]
            };
            self.f.sim.fill(g, gfn, seed);
        }
        self.f.register(g, budget, dirty, domain, PAGES);
        g
    }

    fn pick(v: &[GuestId], i: usize) -> Option<GuestId> {
        (!v.is_empty()).then(|| v[i % v.len()])
    }

    fn apply(&mut self, s: &Step) {
        self.f.failures_seen |= self.f.counters().guests_failed > 0;
        match *s {
            Step::Write { guest, gfn, seed } => {
                if let Some(g) = Self::pick(&self.running, guest) {
                    self.f.sim.fill(g, gfn, seed);
                }
            }
            Step::Poke {
                guest,
                gfn,
                off,
                byte,
            } => {
                if let Some(g) = Self::pick(&self.running, guest) {
                    self.f.sim.write(g, gfn, off, &[byte]);
                }
            }
            Step::Race {
                guest,
                gfn,
                after_map,
                seed,
            } => {
                if let Some(g) = Self::pick(&self.running, guest) {
                    self.f.sim.inject(Race {
                        guest: g,
                        gfn,
                        when: if after_map {
                            RaceWhen::AfterMap
                        } else {
                            RaceWhen::BeforeCompare
                        },
                        seed,
                    });
                }
            }
            Step::Rounds(n) => {
                for _ in 0..n {
                    self.f.round();
                }
                self.f.sim.clear_races();
            }
            Step::Run(r) => self.f.set(KnobsUpdate {
                run: Some(RunMode::try_from(r).unwrap()),
                ..Default::default()
            }),
            Step::PagesToScan(p) => self.f.set(KnobsUpdate {
                pages_to_scan: Some(p),
                ..Default::default()
            }),
            Step::MaxSharing(m) => self.f.set(KnobsUpdate {
                max_page_sharing: Some(m),
                ..Default::default()
            }),
            Step::SmartScan(b) => self.f.set(KnobsUpdate {
                smart_scan: Some(b),
                ..Default::default()
            }),
            Step::Join {
                domain,
                dirty,
                budget,
            } => {
                if self.live.len() < MAX_GUESTS {
                    let id = self.next_id;
                    self.next_id += 1;
                    let g = self.boot(id, domain, budget, dirty);
                    self.live.push(g);
                    self.running.push(g);
                }
            }
            Step::Leave(i) => {
                if let Some(g) = Self::pick(&self.live, i) {
                    // The process exits, then the daemon forgets it.
                    self.f.sim.remove_guest(g);
                    self.f.engine.remove_guest(g, &mut self.f.sim).unwrap();
                    self.live.retain(|&x| x != g);
                    self.running.retain(|&x| x != g);
                }
            }
            Step::AgentDies(i) => {
                if let Some(g) = Self::pick(&self.live, i) {
                    self.f.sim.set_gone(g, true);
                }
            }
            Step::OptOut(i) => {
                if let Some(g) = Self::pick(&self.live, i) {
                    let failed = self.f.engine.guest_counters(g).unwrap().failed;
                    let gone = self.f.engine.unmerge_guest(g, &mut self.f.sim);
                    self.f.failures_seen |= self.f.counters().guests_failed > 0;
                    if !failed && gone.is_ok() {
                        // Still running, no longer merged.
                        self.live.retain(|&x| x != g);
                    } else if failed {
                        // unmerge_guest refuses to drop a failed guest's frames.
                        assert!(gone.is_err());
                    }
                }
            }
        }
        self.f.check();
    }
}

/// Runs `steps` on three guests, then `run=2`: every guest not failed is whole again.
fn run_steps(f: Fleet, image: Vec<u64>, dirty0: bool, steps: &[Step]) -> Result<(), TestCaseError> {
    let mut w = World {
        f,
        image,
        live: vec![],
        running: vec![],
        next_id: 0,
    };
    for (i, d) in [(0, dirty0), (1, !dirty0), (2, dirty0)] {
        let g = w.boot(i, 0, 1000, d);
        w.live.push(g);
        w.running.push(g);
    }
    w.next_id = 3;
    for s in steps {
        w.apply(s);
    }
    // Finally: run=2 restores every layout and frees every frame not held by a
    // failed guest.
    w.f.set(KnobsUpdate {
        run: Some(RunMode::Unmerge),
        ..Default::default()
    });
    for g in w.live.clone() {
        let gc = w.f.engine.guest_counters(g).unwrap();
        if !gc.failed {
            prop_assert_eq!(gc.merging_pages, 0);
            prop_assert_eq!(w.f.sim.vma_count(g), 1);
        }
    }
    Ok(())
}

fn hash_of(collisions: bool) -> HashFn {
    if collisions {
        collide
    } else {
        xxh3
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_step_ever_loses_data_or_breaks_an_invariant(
        collisions in any::<bool>(),
        dirty0 in any::<bool>(),
        image in prop::collection::vec(0..8u64, PAGES as usize),
        steps in prop::collection::vec(step(), 1..100),
    ) {
        let knobs = Knobs { pages_to_scan: 32, ..Knobs::default() };
        run_steps(Fleet::with_hash(knobs, hash_of(collisions)), image, dirty0, &steps)?;
    }

    /// The same with concurrent rounds: digests answered out of order, some late, and
    /// partners' populates refused as busy.
    #[test]
    fn concurrent_rounds_never_lose_data_or_break_an_invariant(
        collisions in any::<bool>(),
        dirty0 in any::<bool>(),
        seed in any::<u64>(),
        late_pct in 0..60u64,
        busy_pct in 0..60u64,
        image in prop::collection::vec(0..8u64, PAGES as usize),
        steps in prop::collection::vec(step(), 1..100),
    ) {
        let knobs = Knobs { pages_to_scan: 32, ..Knobs::default() };
        let c = SimConcurrency::new(seed, late_pct, busy_pct);
        run_steps(Fleet::concurrent(knobs, hash_of(collisions), c), image, dirty0, &steps)?;
    }
}

/// A case the random search finds about once in 10 000: guest 2's page 10 was merged, the
/// guest wrote it (the kernel's COW: a private copy under the frame's mapping), and the
/// page was merged again onto a new frame while a digest of guest 2 taken before that
/// merge was still outstanding. That digest says "split" (true when it was taken); processed
/// as is, it dropped the new frame's reference while the page mapped it, and the frame
/// could be freed under the guest. The engine leaves pages its own page work changed out of
/// a digest in flight (`note_page_work`); without that this case fails.
#[test]
fn a_digest_taken_before_a_merge_does_not_unshare_the_page_after_it() {
    use Step::*;
    let image = vec![
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0,
    ];
    let steps = [
        Rounds(2),
        Rounds(3),
        Rounds(1),
        AgentDies(1),
        Rounds(3),
        Rounds(1),
        Join {
            domain: 0,
            dirty: false,
            budget: 1000,
        },
        Rounds(1),
        Write {
            guest: 2,
            gfn: 10,
            seed: 3,
        },
        Rounds(1),
        PagesToScan(39),
        SmartScan(false),
        Rounds(3),
        Write {
            guest: 4,
            gfn: 0,
            seed: 3,
        },
        Rounds(3),
    ];
    let knobs = Knobs {
        pages_to_scan: 32,
        ..Knobs::default()
    };
    let c = SimConcurrency::new(1_810_775_370_517_332_076, 45, 0);
    run_steps(Fleet::concurrent(knobs, xxh3, c), image, false, &steps).unwrap();
}
