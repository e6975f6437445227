//! Deterministic behaviours of the engine on the simulated fleet. Every test also runs the
//! full cross-check (`Fleet::check`) after every round. One file of many short tests, each
//! named after the behaviour it checks: the list reads as the engine's specification.

mod common;

use common::{knobs, Fleet};
use tinyvmm_merge::sim::{pattern, xxh3, Race, RaceWhen};
use tinyvmm_merge::{
    Advisor, DomainId, GuestId, KnobError, Knobs, KnobsUpdate, PageState, RunMode, PAGE_SIZE,
};

const BIG: u32 = 1 << 20;

/// Fills `g` with content seed `base + gfn` (never zero).
fn fill_unique(f: &mut Fleet, g: GuestId, pages: u64, base: u64) {
    for gfn in 0..pages {
        f.sim.fill(g, gfn, base + gfn + 1);
    }
}

#[test]
fn identical_guests_converge() {
    let n = 256;
    let mut f = Fleet::new(knobs(300));
    let ids: Vec<_> = (0..4).map(|i| f.add(i, n, 0, BIG, false)).collect();
    for &g in &ids {
        fill_unique(&mut f, g, n, 1000);
    }
    f.converge(200);
    let c = f.counters();
    assert_eq!(c.pages_shared, n, "one frame per unique content");
    assert_eq!(c.pages_sharing, 3 * n, "(N-1) x unique content saved");
    assert_eq!(c.pages_unshared, 0);
    for &g in &ids {
        let gc = f.engine.guest_counters(g).unwrap();
        assert_eq!(gc.merging_pages, n);
        assert_eq!(
            gc.vma_mappings, 1,
            "whole RAM is one run on consecutive frames"
        );
    }
    assert!(c.general_profit > 0);
}

#[test]
fn all_zero_guests_use_no_frames() {
    let n = 200;
    let mut f = Fleet::new(knobs(512));
    let a = f.add(0, n, 0, BIG, false);
    let b = f.add(1, n, 0, BIG, false);
    // a was written with zeros (present pages), b never touched.
    for gfn in 0..n {
        f.sim.fill(a, gfn, 0);
    }
    f.converge(100);
    let c = f.counters();
    assert_eq!(c.zero_pages, 2 * n);
    assert_eq!(c.pages_shared, 0);
    assert_eq!(c.pool_frames, 0, "no frame was ever allocated");
    assert_eq!(f.sim.live_frames(), 0);
    assert_eq!(f.engine.guest_counters(b).unwrap().zero_pages, n);
}

#[test]
fn zero_page_written_with_zeros_again_is_reclaimed_again() {
    // A guest that zeroes a buffer it had left zero (e.g. while it is still filling its
    // memory when the daemon first looks) allocates memory that reads zero: the engine must
    // drop it again, not trust its old ZERO state.
    let n = 64;
    let mut f = Fleet::new(knobs(512));
    let a = f.add(0, n, 0, BIG, true);
    for gfn in 0..n {
        f.sim.fill(a, gfn, 0);
    }
    f.converge(100);
    assert_eq!(f.counters().zero_pages, n);
    assert!((0..n).all(|g| !f.sim.present(a, g)), "zero pages dropped");
    for gfn in 0..n {
        f.sim.fill(a, gfn, 0);
    }
    assert!((0..n).all(|g| f.sim.present(a, g)));
    f.converge(100);
    assert_eq!(f.counters().zero_pages, n);
    assert!(
        (0..n).all(|g| !f.sim.present(a, g)),
        "pages rewritten with zeros are dropped again"
    );
}

#[test]
fn volatile_page_never_merges() {
    let n = 32;
    // One full scan per round: every visit of page 5 sees new content.
    let mut f = Fleet::new(knobs(2 * n as u32));
    let a = f.add(0, n, 0, BIG, false);
    let b = f.add(1, n, 0, BIG, false);
    fill_unique(&mut f, a, n, 0);
    fill_unique(&mut f, b, n, 0);
    for r in 0..40u64 {
        // The same new content in both guests before every visit.
        f.sim.fill(a, 5, 10_000 + r);
        f.sim.fill(b, 5, 10_000 + r);
        f.round();
        assert_ne!(f.engine.page_info(a, 5).unwrap().state, PageState::Merged);
        assert_ne!(f.engine.page_info(b, 5).unwrap().state, PageState::Merged);
    }
    assert_eq!(f.engine.page_info(a, 5).unwrap().state, PageState::Volatile);
    assert!(f.counters().pages_volatile >= 2);
    assert_eq!(f.counters().pages_shared, n - 1, "everything else merged");
}

#[test]
fn write_to_merged_page_splits_only_that_guest() {
    let n = 64;
    let mut f = Fleet::new(knobs(1000));
    let ids: Vec<_> = (0..3).map(|i| f.add(i, n, 0, BIG, false)).collect();
    for &g in &ids {
        fill_unique(&mut f, g, n, 7);
    }
    f.converge(100);
    assert_eq!(f.counters().pages_sharing, 2 * n);
    let before = f.sim.read(ids[0], 7).to_vec();
    f.sim.write(ids[1], 7, 100, b"guest one was here");
    f.check();
    assert_eq!(f.sim.read(ids[0], 7), &before[..]);
    assert_eq!(f.sim.read(ids[2], 7), &before[..]);
    assert_eq!(&f.sim.read(ids[1], 7)[100..118], b"guest one was here");
    f.converge(100);
    let c = f.counters();
    assert_eq!(c.splits, 1);
    assert_eq!(c.pages_shared, n);
    assert_eq!(c.pages_sharing, 2 * n - 1);
    assert_eq!(
        f.engine.guest_counters(ids[1]).unwrap().merging_pages,
        n - 1
    );
    assert_eq!(f.engine.guest_counters(ids[0]).unwrap().merging_pages, n);
    assert_eq!(
        f.engine.page_info(ids[2], 7).unwrap().state,
        PageState::Merged
    );
    // The split page keeps its pool mapping (COW does not change the layout).
    assert!(f.engine.page_info(ids[1], 7).unwrap().mapping.is_some());
}

/// A hash with 2 bits: nearly every pair of pages collides.
fn tiny_hash(b: &[u8]) -> u64 {
    xxh3(b) & 3
}

#[test]
fn hash_collision_never_merges_different_pages() {
    let n = 64;
    let mut f = Fleet::with_hash(knobs(1000), tiny_hash);
    let a = f.add(0, n, 0, BIG, false);
    let b = f.add(1, n, 0, BIG, false);
    fill_unique(&mut f, a, n, 0);
    fill_unique(&mut f, b, n, 5000); // nothing in common
    f.sim.fill(b, 3, 4); // b:3 == a:3
    f.converge(200);
    let c = f.counters();
    assert!(c.merge_mismatches > 0, "collisions were tried and refused");
    // check() verified every page reads what its guest wrote; also no frame is shared by
    // different contents:
    for gfn in 0..n {
        for (g, h) in [(a, b), (b, a)] {
            if let Some(fa) = f.engine.page_info(g, gfn).unwrap().mapping {
                for gfn2 in 0..n {
                    if f.sim.mapping(h, gfn2) == Some((fa, false)) {
                        assert_eq!(f.sim.read(g, gfn), f.sim.read(h, gfn2));
                    }
                }
            }
        }
    }
}

#[test]
fn share_groups_never_share() {
    let n = 50;
    let mut f = Fleet::new(knobs(1000));
    let ids: Vec<_> = (0..4).map(|i| f.add(i, n, i / 2, BIG, false)).collect();
    for &g in &ids {
        fill_unique(&mut f, g, n, 99);
    }
    f.converge(100);
    let c = f.counters();
    assert_eq!(c.pages_shared, 2 * n, "one frame set per domain");
    assert_eq!(c.pages_sharing, 2 * n);
    let frames = f.engine.frames();
    assert_eq!(
        frames.iter().filter(|x| x.0 == DomainId(0)).count() as u64,
        n
    );
    assert_eq!(
        frames.iter().filter(|x| x.0 == DomainId(1)).count() as u64,
        n
    );
    assert!(
        frames.iter().all(|x| x.2 == 2),
        "each frame shared by its domain's two guests"
    );
    for &g in &ids {
        assert_eq!(
            f.engine.guest_counters(g).unwrap().domain,
            DomainId(g.0 / 2)
        );
    }
}

#[test]
fn run_2_unmerges_everything() {
    let n = 80;
    let mut f = Fleet::new(knobs(1000));
    let ids: Vec<_> = (0..3).map(|i| f.add(i, n, 0, BIG, false)).collect();
    for &g in &ids {
        fill_unique(&mut f, g, n, 3);
        f.sim.fill(g, 10, 0);
    }
    f.sim.write(ids[0], 20, 0, b"x"); // will split later
    f.converge(100);
    f.sim.write(ids[1], 30, 0, b"split before unmerge");
    f.set(KnobsUpdate {
        run: Some(RunMode::Unmerge),
        ..Default::default()
    });
    let c = f.counters();
    assert_eq!((c.pages_shared, c.pages_sharing, c.zero_pages), (0, 0, 0));
    assert_eq!(f.sim.pages_reading_frames(), 0);
    assert_eq!(f.sim.live_frames(), 0);
    for &g in &ids {
        assert_eq!(f.sim.vma_count(g), 1);
    }
    // Stopped: rounds do nothing.
    assert_eq!(f.round().pages_visited, 0);
    f.set(KnobsUpdate {
        run: Some(RunMode::Run),
        ..Default::default()
    });
    f.converge(100);
    assert!(f.counters().pages_sharing > 0);
}

#[test]
fn vma_budget_limits_mappings() {
    let n = 200;
    let budget = 21;
    let mut f = Fleet::new(knobs(1000));
    let a = f.add(0, n, 0, budget, false);
    let b = f.add(1, n, 0, budget, false);
    // Every other page shared: a fully merged layout would need ~2 mappings per page.
    for gfn in 0..n {
        let seed = if gfn % 2 == 0 { gfn + 1 } else { 100_000 + gfn };
        f.sim.fill(a, gfn, seed);
        let seed = if gfn % 2 == 0 { gfn + 1 } else { 200_000 + gfn };
        f.sim.fill(b, gfn, seed);
    }
    f.converge(100);
    let c = f.counters();
    for g in [a, b] {
        let gc = f.engine.guest_counters(g).unwrap();
        assert!(gc.vma_mappings <= budget);
        assert!(f.sim.vma_count(g) <= budget);
    }
    assert!(c.pages_skipped_vma_budget > 0);
    assert!(c.pages_sharing > 0 && c.pages_sharing < n / 2);
}

/// Pages that cannot be merged for lack of VMA budget back off (deferred pages sit out
/// 1, 3, 7, ... passes) instead of being planned and refused again on every pass: once the
/// budget is spent, an idle fleet's rounds refuse a small fraction of what they would
/// without the back-off, and nothing is lost.
#[test]
fn vma_budget_refusals_back_off_instead_of_spinning() {
    for dirty in [false, true] {
        let n = 400;
        let budget = 21;
        let mut f = Fleet::new(knobs(4 * n as u32));
        let a = f.boot(0, n, 0, budget, dirty);
        let b = f.boot(1, n, 0, budget, dirty);
        for gfn in 0..n {
            let seed = if gfn % 2 == 0 { gfn + 1 } else { 100_000 + gfn };
            f.sim.fill(a, gfn, seed);
            let seed = if gfn % 2 == 0 { gfn + 1 } else { 200_000 + gfn };
            f.sim.fill(b, gfn, seed);
        }
        f.register(a, budget, dirty, 0, n);
        f.register(b, budget, dirty, 0, n);
        for _ in 0..20 {
            f.round();
        }
        let sharing = f.counters().pages_sharing;
        assert!(sharing > 0 && sharing < n / 2, "budget-limited: {sharing}");
        // Nothing changes any more; every round would otherwise re-plan (and refuse) the
        // ~180 deferred pages of each guest.
        let rounds = 64;
        let refused: u64 = (0..rounds).map(|_| f.round().skipped_vma_budget).sum();
        let deferred = n / 2;
        assert!(
            refused < deferred * rounds / 8,
            "dirty={dirty}: {refused} refusals in {rounds} rounds, {deferred} deferred pages"
        );
        assert_eq!(f.counters().pages_sharing, sharing, "nothing lost");
        for g in [a, b] {
            assert!(f.engine.guest_counters(g).unwrap().vma_mappings <= budget);
        }
    }
}

#[test]
fn dirty_source_avoids_rehash() {
    let n = 512;
    let mut f = Fleet::new(knobs(4096));
    let ids: Vec<_> = (0..3).map(|i| f.boot(i, n, 0, BIG, true)).collect();
    for &g in &ids {
        fill_unique(&mut f, g, n, 1);
        f.register(g, BIG, true, 0, n);
    }
    // First pass already merges: the dirty source says nothing was written.
    f.round();
    assert_eq!(f.counters().pages_sharing, 2 * n);
    let hashed = f.sim.stats.pages_hashed;
    for _ in 0..5 {
        f.round();
    }
    assert_eq!(
        f.sim.stats.pages_hashed, hashed,
        "an idle converged fleet hashes nothing"
    );
    f.sim.write(ids[0], 9, 0, b"one");
    f.sim.fill(ids[1], 77, 123_456);
    f.round();
    assert_eq!(
        f.sim.stats.pages_hashed,
        hashed + 2,
        "only the written pages"
    );
    assert_eq!(f.counters().splits, 2);
    // The rewritten page stays unique until it is unchanged for a pass, no rehash needed.
    f.sim.fill(ids[2], 77, 123_456);
    f.converge(50);
    assert_eq!(
        f.engine.page_info(ids[2], 77).unwrap().state,
        PageState::Merged
    );
    assert_eq!(
        f.engine.page_info(ids[1], 77).unwrap().state,
        PageState::Merged
    );
}

#[test]
fn frames_allocated_in_scan_order_coalesce() {
    let n = 300;
    let mut f = Fleet::new(knobs(777));
    let ids: Vec<_> = (0..4).map(|i| f.add(i, n, 0, BIG, false)).collect();
    let zeros = [17u64, 18, 150, 299];
    for &g in &ids {
        fill_unique(&mut f, g, n, 42);
        for &z in &zeros {
            f.sim.fill(g, z, 0);
        }
    }
    f.converge(100);
    // Runs: [0,17) 0-zero [19,150) zero [151,299) zero -> 3 file runs, 3 gaps.
    for &g in &ids {
        let gc = f.engine.guest_counters(g).unwrap();
        assert_eq!(gc.merging_pages, n - zeros.len() as u64);
        assert_eq!(
            gc.vma_mappings, 6,
            "3 file runs + anonymous gaps, each run one VMA"
        );
    }
    let c = f.counters();
    assert_eq!(c.pool_frames, n - zeros.len() as u64, "no frame wasted");
}

#[test]
fn max_page_sharing_respected() {
    let n = 40;
    let k = Knobs {
        max_page_sharing: 2,
        ..knobs(1000)
    };
    let mut f = Fleet::new(k);
    let ids: Vec<_> = (0..5).map(|i| f.add(i, n, 0, BIG, false)).collect();
    for &g in &ids {
        fill_unique(&mut f, g, n, 11);
    }
    f.converge(100);
    let frames = f.engine.frames();
    assert!(frames.iter().all(|x| x.2 <= 2));
    let c = f.counters();
    assert_eq!(c.pages_shared, 2 * n);
    assert_eq!(c.pages_sharing, 2 * n);
    assert_eq!(c.stable_node_chains, n);
    assert_eq!(c.stable_node_dups, 2 * n);
}

/// Share groups that come and go (a VM process registering under a new group name each
/// time) leave no state behind: a domain is dropped with its last guest.
#[test]
fn domains_that_empty_leave_no_engine_state() {
    let n = 64;
    let mut f = Fleet::new(knobs(1000));
    let keep_a = f.add(0, n, 0, BIG, false);
    let keep_b = f.add(1, n, 0, BIG, false);
    fill_unique(&mut f, keep_a, n, 5);
    fill_unique(&mut f, keep_b, n, 5);
    f.converge(100);
    let (bytes0, domains0) = (f.engine.metadata_bytes(), f.engine.domain_count());
    assert_eq!(domains0, 1);
    for i in 0..500u32 {
        let (x, y) = (2 + 2 * i, 3 + 2 * i);
        let a = f.add(x, n, 1 + i, BIG, false);
        let b = f.add(y, n, 1 + i, BIG, false);
        fill_unique(&mut f, a, n, 1000);
        fill_unique(&mut f, b, n, 1000);
        f.round();
        f.round();
        assert_eq!(f.engine.domain_count(), 2);
        for g in [a, b] {
            f.sim.remove_guest(g);
            f.engine.remove_guest(g, &mut f.sim).unwrap();
        }
        f.check();
    }
    assert_eq!(f.engine.domain_count(), domains0);
    let bytes1 = f.engine.metadata_bytes();
    assert!(
        bytes1 <= bytes0 + 4096,
        "engine metadata {bytes0} -> {bytes1} bytes after 500 groups came and went"
    );
    assert_eq!(
        f.counters().pages_shared,
        n,
        "the lasting group keeps its frames"
    );
}

#[test]
fn guest_removal_frees_frames() {
    let n = 60;
    let mut f = Fleet::new(knobs(1000));
    let a = f.add(0, n, 0, BIG, false);
    let b = f.add(1, n, 0, BIG, false);
    fill_unique(&mut f, a, n, 5);
    fill_unique(&mut f, b, n, 5);
    f.converge(100);
    assert_eq!(f.counters().pages_shared, n);
    f.sim.remove_guest(b);
    f.engine.remove_guest(b, &mut f.sim).unwrap();
    f.check();
    assert_eq!(f.counters().pages_sharing, 0);
    assert_eq!(f.counters().pages_shared, n, "a still maps every frame");
    f.sim.remove_guest(a);
    f.engine.remove_guest(a, &mut f.sim).unwrap();
    f.check();
    let c = f.counters();
    assert_eq!(c.pages_shared, 0);
    assert_eq!(c.frames_freed, n);
    assert_eq!(f.sim.live_frames(), 0);
}

#[test]
fn metadata_per_page_within_32_bytes() {
    // 4 guests x 64 MiB: 20% zero, 50% shared across guests, 30% unique.
    let n = 16384u64;
    let mut f = Fleet::new(knobs(1 << 16));
    f.sim = tinyvmm_merge::sim::SimFleet::new(xxh3, false);
    let ids: Vec<_> = (0..4).map(|i| f.add(i, n, 0, BIG, false)).collect();
    for (gi, &g) in ids.iter().enumerate() {
        for gfn in 0..n {
            let seed = match gfn % 10 {
                0 | 1 => 0,
                2..=6 => gfn + 1,
                _ => (gi as u64 + 1) << 32 | gfn,
            };
            f.sim.fill(g, gfn, seed);
        }
    }
    f.converge(100);
    let c = f.counters();
    assert_eq!(c.pages_shared, n / 2);
    let per_page = f.engine.metadata_bytes() as f64 / f.engine.tracked_pages() as f64;
    println!("metadata: {per_page:.1} bytes per tracked page");
    assert!(per_page <= 32.0, "{per_page} bytes per page");
}

#[test]
fn zero_page_under_pool_mapping_is_not_dropped_blindly() {
    let n = 16;
    let mut f = Fleet::new(knobs(1000));
    let a = f.add(0, n, 0, BIG, false);
    let b = f.add(1, n, 0, BIG, false);
    fill_unique(&mut f, a, n, 3);
    fill_unique(&mut f, b, n, 3);
    f.converge(100);
    // a zeroes a merged page in the middle of its run: it splits, then reads zero.
    f.sim.write(a, 8, 0, &[0u8; PAGE_SIZE]);
    f.converge(100);
    assert_eq!(f.sim.read(a, 8), &[0u8; PAGE_SIZE][..]);
    assert_eq!(f.engine.page_info(a, 8).unwrap().state, PageState::Zero);
    assert_eq!(f.engine.page_info(b, 8).unwrap().state, PageState::Merged);
    assert_eq!(f.engine.guest_counters(a).unwrap().vma_mappings, 3);
}

#[test]
fn write_racing_with_merge_is_never_lost() {
    let n = 32;
    let mut f = Fleet::new(knobs(1000));
    let a = f.add(0, n, 0, BIG, false);
    let b = f.add(1, n, 0, BIG, false);
    fill_unique(&mut f, a, n, 3);
    fill_unique(&mut f, b, n, 3);
    for gfn in 0..n {
        let when = if gfn % 2 == 0 {
            RaceWhen::BeforeCompare
        } else {
            RaceWhen::AfterMap
        };
        for g in [a, b] {
            f.sim.inject(Race {
                guest: g,
                gfn,
                when,
                seed: 77_000 + gfn,
            });
        }
    }
    f.converge(100);
    assert!(f.sim.stats.races_fired > 0);
    assert!(f.counters().merge_mismatches > 0 || f.counters().splits > 0);
    // Every page holds its racing write (check() compared all pages with the shadow).
    for gfn in 0..n {
        assert_eq!(f.sim.read(a, gfn), &pattern(77_000 + gfn)[..]);
    }
}

#[test]
fn failed_guest_keeps_its_frames_and_the_round_goes_on() {
    let n = 40;
    let mut f = Fleet::new(knobs(1000));
    let ids: Vec<_> = (0..3).map(|i| f.add(i, n, 0, BIG, false)).collect();
    for &g in &ids {
        fill_unique(&mut f, g, n, 8);
    }
    f.converge(100);
    f.sim.set_gone(ids[1], true);
    f.sim.write(ids[0], 3, 0, b"z");
    let mut failed = Vec::new();
    for _ in 0..10 {
        failed.extend(f.round().guests_failed);
    }
    assert_eq!(failed, vec![ids[1]]);
    assert!(f.engine.guest_counters(ids[1]).unwrap().failed);
    assert_eq!(f.counters().guests_failed, 1);
    assert_eq!(f.counters().splits, 1, "the others are still scanned");
    // Its process exits; only then are its references dropped.
    f.sim.remove_guest(ids[1]);
    f.engine.remove_guest(ids[1], &mut f.sim).unwrap();
    f.check();
    assert_eq!(f.counters().pages_sharing, n - 1);
}

#[test]
fn guest_opt_out_unmerges_its_pages() {
    let n = 30;
    let mut f = Fleet::new(knobs(1000));
    let a = f.add(0, n, 0, BIG, false);
    let b = f.add(1, n, 0, BIG, false);
    fill_unique(&mut f, a, n, 8);
    fill_unique(&mut f, b, n, 8);
    f.converge(100);
    f.engine.unmerge_guest(a, &mut f.sim).unwrap();
    assert_eq!(f.sim.vma_count(a), 1);
    assert_eq!(f.sim.pages_reading_frames(), n, "only b still reads frames");
    f.check();
}

#[test]
fn knobs_are_validated_and_strict() {
    let mut f = Fleet::new(Knobs::default());
    let bad = [
        KnobsUpdate {
            pages_to_scan: Some(0),
            ..Default::default()
        },
        KnobsUpdate {
            max_page_sharing: Some(1),
            ..Default::default()
        },
        KnobsUpdate {
            advisor: Some(Advisor::ScanTime {
                target_scan_secs: 0,
                max_cpu_pct: 10,
            }),
            ..Default::default()
        },
    ];
    for u in bad {
        assert!(f.engine.set_knobs(u, &mut f.sim).is_err());
    }
    assert_eq!(f.engine.knobs(), Knobs::default(), "nothing changed");
    let u: KnobsUpdate = serde_json::from_str(r#"{"run": 2, "pages_to_scan": 100}"#).unwrap();
    assert_eq!(u.run, Some(RunMode::Unmerge));
    assert!(serde_json::from_str::<KnobsUpdate>(r#"{"run": 3}"#).is_err());
    assert!(serde_json::from_str::<KnobsUpdate>(r#"{"pages": 3}"#).is_err());
    assert!(
        serde_json::from_str::<Knobs>(r#"{"run": 1}"#).is_err(),
        "full knobs need every field"
    );
    let a: KnobsUpdate = serde_json::from_str(
        r#"{"advisor": {"mode": "scan-time", "target_scan_secs": 10, "max_cpu_pct": 20}}"#,
    )
    .unwrap();
    f.engine.set_knobs(a, &mut f.sim).unwrap();
    assert_eq!(
        f.engine.set_knobs(
            KnobsUpdate {
                pages_to_scan: Some(5),
                ..Default::default()
            },
            &mut f.sim
        ),
        Err(KnobError::AdvisorOwnsPagesToScan)
    );
}

#[test]
fn advisor_sets_pages_to_scan_for_the_target_scan_time() {
    let mut f = Fleet::new(Knobs::default());
    f.add(0, 100_000, 0, BIG, false);
    f.set(KnobsUpdate {
        advisor: Some(Advisor::ScanTime {
            target_scan_secs: 10,
            max_cpu_pct: 100,
        }),
        sleep_millisecs: Some(20),
        ..Default::default()
    });
    let rep = f.round();
    f.engine
        .advise(std::time::Duration::from_micros(rep.pages_visited), &rep);
    // 500 wake-ups in 10 s: 100_000 / 500 pages each.
    assert_eq!(f.engine.knobs().pages_to_scan, 200);
    f.set(KnobsUpdate {
        advisor: Some(Advisor::ScanTime {
            target_scan_secs: 1,
            max_cpu_pct: 10,
        }),
        ..Default::default()
    });
    // 1 us per page, 10% of 20 ms -> at most ~2222 pages per wake-up.
    f.engine
        .advise(std::time::Duration::from_micros(rep.pages_visited), &rep);
    let p = f.engine.knobs().pages_to_scan;
    assert!((2000..=2300).contains(&p), "{p}");
}

#[test]
fn freed_frames_are_reused_in_runs() {
    let n = 100;
    let mut f = Fleet::new(knobs(1000));
    // A guest that stays keeps the domain (a domain is dropped with its last guest).
    let keep = f.add(9, 1, 0, BIG, false);
    f.sim.fill(keep, 0, 1_000_000);
    let a = f.add(0, n, 0, BIG, false);
    let b = f.add(1, n, 0, BIG, false);
    fill_unique(&mut f, a, n, 1);
    fill_unique(&mut f, b, n, 1);
    f.converge(100);
    for g in [a, b] {
        f.sim.remove_guest(g);
        f.engine.remove_guest(g, &mut f.sim).unwrap();
    }
    assert_eq!(f.counters().pool_frames, n);
    assert_eq!(f.counters().pages_shared, 0);
    // New guests with other content reuse the freed frames, still in runs.
    let c = f.add(2, n, 0, BIG, false);
    let d = f.add(3, n, 0, BIG, false);
    fill_unique(&mut f, c, n, 500);
    fill_unique(&mut f, d, n, 500);
    f.converge(100);
    assert_eq!(f.counters().pool_frames, n, "no new frames");
    assert_eq!(f.counters().pages_shared, n);
    for g in [c, d] {
        assert_eq!(f.engine.guest_counters(g).unwrap().vma_mappings, 1);
    }
}
