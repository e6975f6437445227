//! Concurrent rounds (`Engine::scan_round_concurrent`) on the simulated fleet: digests
//! answered out of order, late, partners refused as busy, and an agent that stalls. Every
//! round is cross-checked (`Fleet::check`).

mod common;

use common::{knobs, Fleet};
use tinyvmm_merge::sim::{xxh3, SimConcurrency};
use tinyvmm_merge::{GuestId, PageState};

const BIG: u32 = 1 << 20;

/// Guests `ids` with the same content (60 % shared pattern, 20 % zero, the rest their own).
fn fill(f: &mut Fleet, ids: &[GuestId], pages: u64) {
    for (k, &g) in ids.iter().enumerate() {
        for gfn in 0..pages {
            let seed = match gfn % 5 {
                0 => 0,
                1 => 1_000_000 * (k as u64 + 1) + gfn,
                _ => gfn + 1,
            };
            f.sim.fill(g, gfn, seed);
        }
    }
}

/// Rounds until `done` holds (at most `max`); returns how many ran.
fn rounds_until(f: &mut Fleet, max: usize, done: impl Fn(&Fleet) -> bool) -> usize {
    for i in 0..max {
        if done(f) {
            return i;
        }
        f.round();
    }
    panic!("not reached in {max} rounds: {:?}", f.counters());
}

#[test]
fn concurrent_rounds_merge_what_sequential_ones_merge() {
    let n = 300;
    let expect = |f: &Fleet, guests: u64| {
        let c = f.counters();
        c.pages_shared == 3 * n / 5
            && c.pages_sharing == (guests - 1) * 3 * n / 5
            && c.zero_pages == guests * n / 5
    };
    let mut seq = Fleet::new(knobs(500));
    let ids: Vec<_> = (0..4).map(|i| seq.add(i, n, 0, BIG, i % 2 == 0)).collect();
    fill(&mut seq, &ids, n);
    rounds_until(&mut seq, 400, |f| expect(f, 4));
    for seed in 1..=8u64 {
        let c = SimConcurrency::new(seed, 30, 30);
        let mut f = Fleet::concurrent(knobs(500), xxh3, c);
        let ids: Vec<_> = (0..4).map(|i| f.add(i, n, 0, BIG, i % 2 == 0)).collect();
        fill(&mut f, &ids, n);
        rounds_until(&mut f, 2000, |f| expect(f, 4));
        assert_eq!(f.counters().pages_shared, seq.counters().pages_shared);
        assert_eq!(f.counters().pages_sharing, seq.counters().pages_sharing);
    }
}

#[test]
fn a_stalled_agent_delays_only_its_own_guest() {
    let n = 200;
    let c = SimConcurrency::new(7, 10, 10);
    let mut f = Fleet::concurrent(knobs(300), xxh3, c);
    let ids: Vec<_> = (0..3).map(|i| f.add(i, n, 0, BIG, false)).collect();
    fill(&mut f, &ids, n);
    // Guest 2 answers nothing from the start: it is never digested, never a partner.
    f.sim.concurrency.stall(Some(ids[2]));
    rounds_until(&mut f, 2000, |f| {
        let c = f.counters();
        c.pages_sharing == 3 * n / 5 && c.zero_pages == 2 * n / 5
    });
    let scans = f.counters().full_scans;
    for _ in 0..50 {
        f.round();
    }
    assert!(f.counters().full_scans > scans, "full scans go on");
    let stalled = f.engine.guest_counters(ids[2]).unwrap();
    assert_eq!(stalled.merging_pages + stalled.zero_pages, 0);
    assert!(
        !stalled.failed,
        "not dropped: the host drops it at its deadline"
    );
    // It answers again: it catches up.
    f.sim.concurrency.stall(None);
    rounds_until(&mut f, 2000, |f| {
        let c = f.counters();
        c.pages_sharing == 2 * 3 * n / 5 && c.zero_pages == 3 * n / 5
    });
    assert!((0..n).all(|gfn| {
        let s = f.engine.page_info(ids[2], gfn).unwrap().state;
        s == PageState::Merged || s == PageState::Zero || gfn % 5 == 1
    }));
}

#[test]
fn a_stalled_partner_is_skipped_then_merged_once_it_answers() {
    // Guest 1 stalls after its pages became candidates: the others' merges with it are
    // refused as busy (its frames cancelled, nothing lost) until it answers again.
    let n = 100;
    let c = SimConcurrency::new(3, 0, 0);
    let mut f = Fleet::concurrent(knobs(1000), xxh3, c);
    let a = f.add(0, n, 0, BIG, false);
    let b = f.add(1, n, 0, BIG, false);
    fill(&mut f, &[a, b], n);
    // Two rounds: both guests digested twice, their pages candidates or merged.
    f.round();
    f.sim.concurrency.stall(Some(b));
    for _ in 0..30 {
        f.round();
    }
    f.sim.concurrency.stall(None);
    rounds_until(&mut f, 500, |f| f.counters().pages_sharing == 3 * n / 5);
}
