//! `cargo bench -p tinyvmm-merge`: engine throughput on the simulated fleet against the
//! physical limit (xxh3 over the same bytes), and rescan cost of a converged fleet with and
//! without a dirty-page source. Ratios are against baselines measured in the same run.
//!
//! Environment: `MERGE_BENCH_GUEST_MIB` (default 1024) sets the guest size; 4 guests.

use std::time::{Duration, Instant};

use tinyvmm_merge::sim::{xxh3, SimFleet, SimGuestSpec};
use tinyvmm_merge::{
    DomainId, Engine, FrameId, Gfn, GuestId, GuestSpec, HostError, Knobs, MergeHost, MergeOp,
    MergeResult, PageDigest, PageRun, UnmergeOutcome, ZeroOutcome, PAGE_SIZE,
};

/// Times the host side (the simulated agents' page work) apart from the engine.
struct Timed<'a> {
    sim: &'a mut SimFleet,
    host: Duration,
}

impl Timed<'_> {
    fn time<T>(&mut self, f: impl FnOnce(&mut SimFleet) -> T) -> T {
        let t = Instant::now();
        let r = f(self.sim);
        self.host += t.elapsed();
        r
    }
}

impl MergeHost for Timed<'_> {
    fn digest(
        &mut self,
        g: GuestId,
        runs: &[PageRun],
        out: &mut Vec<PageDigest>,
    ) -> Result<(), HostError> {
        self.time(|s| s.digest(g, runs, out))
    }
    fn digest_dirty(
        &mut self,
        g: GuestId,
        max: u32,
        out: &mut Vec<(Gfn, PageDigest)>,
    ) -> Result<bool, HostError> {
        self.time(|s| s.digest_dirty(g, max, out))
    }
    fn merge(
        &mut self,
        g: GuestId,
        ops: &[MergeOp],
        out: &mut Vec<MergeResult>,
    ) -> Result<(), HostError> {
        self.time(|s| s.merge(g, ops, out))
    }
    fn reclaim_zero(
        &mut self,
        g: GuestId,
        gfns: &[Gfn],
        out: &mut Vec<ZeroOutcome>,
    ) -> Result<(), HostError> {
        self.time(|s| s.reclaim_zero(g, gfns, out))
    }
    fn unmerge(
        &mut self,
        g: GuestId,
        gfns: &[Gfn],
        out: &mut Vec<UnmergeOutcome>,
    ) -> Result<(), HostError> {
        self.time(|s| s.unmerge(g, gfns, out))
    }
    fn free_frames(&mut self, d: DomainId, frames: &[FrameId]) -> Result<(), HostError> {
        self.time(|s| s.free_frames(d, frames))
    }
}

const GUESTS: u32 = 4;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// 20% zero, 50% the same in every guest, 30% unique to the guest.
fn seed(guest: u32, gfn: u64) -> u64 {
    match gfn % 10 {
        0 | 1 => 0,
        2..=6 => gfn + 1,
        _ => (u64::from(guest) + 1) << 40 | gfn,
    }
}

struct Bench {
    engine: Engine,
    sim: SimFleet,
    pages: u64,
}

fn build(pages: u64, dirty: bool) -> Bench {
    let mut sim = SimFleet::new(xxh3, false);
    let mut engine = Engine::new(Knobs {
        pages_to_scan: 1 << 16,
        ..Knobs::default()
    })
    .expect("knobs");
    for g in 0..GUESTS {
        let id = GuestId(g);
        sim.add_guest(SimGuestSpec {
            id,
            pages,
            domain: DomainId(0),
            vma_limit: 65530,
            dirty_source: dirty,
        });
        for gfn in 0..pages {
            let s = seed(g, gfn);
            if s != 0 || gfn % 20 == 0 {
                // Half of the zero pages were written with zeros, half never touched.
                sim.fill(id, gfn, s);
            }
        }
        sim.clear_dirty(id);
        engine
            .add_guest(GuestSpec {
                id,
                pages,
                domain: DomainId(0),
                vma_budget: 65530,
                has_dirty_source: dirty,
            })
            .expect("guest");
    }
    Bench { engine, sim, pages }
}

/// xxh3 over every guest page, as the agent would read them: pages per second.
fn physical_limit(b: &Bench) -> f64 {
    let start = Instant::now();
    let mut acc = 0u64;
    for g in 0..GUESTS {
        for gfn in 0..b.pages {
            acc ^= xxh3(b.sim.read(GuestId(g), gfn));
        }
    }
    let t = start.elapsed();
    std::hint::black_box(acc);
    (u64::from(GUESTS) * b.pages) as f64 / t.as_secs_f64()
}

struct Converge {
    secs: f64,
    visited: u64,
    merges: u64,
    full_scans: u64,
}

fn converge(b: &mut Bench) -> Converge {
    let start = Instant::now();
    let (mut visited, mut merges) = (0, 0);
    // Converged: two full scans in a row without a merge or a zero page reclaimed.
    let mut quiet_since = None;
    loop {
        let r = b.engine.scan_round(&mut b.sim);
        visited += r.pages_visited;
        merges += r.merges;
        let scans = b.engine.counters().full_scans;
        if r.merges == 0 && r.zero_reclaimed == 0 {
            let since = *quiet_since.get_or_insert(scans);
            if scans >= since + 2 {
                break;
            }
        } else {
            quiet_since = None;
        }
    }
    Converge {
        secs: start.elapsed().as_secs_f64(),
        visited,
        merges,
        full_scans: b.engine.counters().full_scans,
    }
}

/// Dirties 1% of the pages (half of them merged pages), then times one full pass.
fn rescan(b: &mut Bench, round: u64) -> (Duration, u64, Duration) {
    let total = u64::from(GUESTS) * b.pages;
    let n = total / 100;
    let mut x = 0x1234_5678_9abc_def0u64 ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for k in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let g = GuestId((x % u64::from(GUESTS)) as u32);
        let gfn = (x >> 8) % b.pages;
        let v = (round << 32 | k).to_le_bytes();
        b.sim.write(g, gfn, (k as usize * 8) % PAGE_SIZE, &v);
    }
    let hashed = b.sim.stats.pages_hashed;
    let start = Instant::now();
    let mut host = Timed {
        sim: &mut b.sim,
        host: Duration::ZERO,
    };
    // One full pass over every guest.
    while b.engine.scan_round(&mut host).full_scans == 0 {}
    let host = host.host;
    (start.elapsed(), b.sim.stats.pages_hashed - hashed, host)
}

/// The old fixed mixer of the stable set's map (before the indexes were keyed), kept
/// here only as the baseline of [`index_lookup_cost`].
#[derive(Default)]
struct FixedMix(u64);

impl std::hash::Hasher for FixedMix {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("u64 keys only")
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (n >> 29);
    }
}

/// The engine's keyed placement, through its public key.
struct Keyed(tinyvmm_merge::HashKey);

impl std::hash::BuildHasher for Keyed {
    type Hasher = KeyedOne;
    fn build_hasher(&self) -> KeyedOne {
        KeyedOne(self.0, 0)
    }
}

struct KeyedOne(tinyvmm_merge::HashKey, u64);

impl std::hash::Hasher for KeyedOne {
    fn finish(&self) -> u64 {
        self.1
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("u64 keys only")
    }
    fn write_u64(&mut self, n: u64) {
        self.1 = self.0.hash(n);
    }
}

/// Cost of one stable-set lookup (a `HashMap<u64, u32>` of 1 Mi page hashes, half the
/// lookups hits) with the old fixed mixer and with the secret-keyed SipHash-1-3 the
/// engine now uses: ns per lookup, median of 5 runs of each, interleaved (so that a busy
/// machine weighs on both alike).
fn index_lookup_cost() {
    fn table<S: std::hash::BuildHasher>(
        hasher: S,
        n: u64,
    ) -> std::collections::HashMap<u64, u32, S> {
        let mut m = std::collections::HashMap::with_capacity_and_hasher(n as usize, hasher);
        for i in 0..n {
            m.insert(xxh3(&i.to_le_bytes()), i as u32);
        }
        m
    }
    fn time<S: std::hash::BuildHasher>(
        m: &std::collections::HashMap<u64, u32, S>,
        probes: &[u64],
    ) -> f64 {
        let t = Instant::now();
        let mut hits = 0u64;
        for p in probes {
            hits += u64::from(m.contains_key(std::hint::black_box(p)));
        }
        std::hint::black_box(hits);
        t.elapsed().as_nanos() as f64 / probes.len() as f64
    }
    let n = 1u64 << 20;
    let fixed = table(std::hash::BuildHasherDefault::<FixedMix>::default(), n);
    let keyed = table(Keyed(tinyvmm_merge::HashKey::random()), n);
    let probes: Vec<u64> = (0..4 * n)
        .map(|i| xxh3(&(i % (2 * n)).to_le_bytes()))
        .collect();
    let (mut tf, mut tk) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        tf.push(time(&fixed, &probes));
        tk.push(time(&keyed, &probes));
    }
    let (f, k) = (median(tf), median(tk));
    let key = tinyvmm_merge::HashKey::random();
    let t = Instant::now();
    let mut acc = 0u64;
    for i in 0..10_000_000u64 {
        acc ^= key.hash(std::hint::black_box(i));
    }
    std::hint::black_box(acc);
    println!(
        "index lookup (1 Mi entries): fixed mixer {f:.1} ns, keyed SipHash-1-3 {k:.1} ns \
         (+{:.1} ns); the keyed hash alone {:.1} ns",
        k - f,
        t.elapsed().as_nanos() as f64 / 1e7
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    index_lookup_cost();
    if std::env::var("MERGE_BENCH_ONLY_INDEX").is_ok() {
        return;
    }
    let mib: u64 = std::env::var("MERGE_BENCH_GUEST_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let pages = mib * 1024 * 1024 / PAGE_SIZE as u64;
    println!(
        "merge engine bench: {GUESTS} guests x {mib} MiB, 20% zero, 50% shared, 30% unique; xxh3 AVX2 compiled in: {}",
        cfg!(target_feature = "avx2")
    );
    // xxh3 on one page that stays in L1: the compute-bound rate (where SIMD width shows).
    let page = tinyvmm_merge::sim::pattern(7);
    let t = Instant::now();
    let mut acc = 0u64;
    for k in 0..1_000_000u64 {
        acc ^= xxh3(std::hint::black_box(&page)) ^ k;
    }
    std::hint::black_box(acc);
    println!(
        "xxh3 in cache: {:.1} GB/s",
        1e6 * PAGE_SIZE as f64 / t.elapsed().as_secs_f64() / 1e9
    );
    let mut rescans = Vec::new();
    let only_dirty = std::env::var("MERGE_BENCH_ONLY_DIRTY").is_ok();
    let rounds: u64 = if only_dirty { 60 } else { 5 };
    for dirty in [false, true] {
        if only_dirty && !dirty {
            rescans.push((1.0, 1.0));
            continue;
        }
        let t = Instant::now();
        let mut b = build(pages, dirty);
        let fill = t.elapsed();
        let limits: Vec<f64> = (0..3).map(|_| physical_limit(&b)).collect();
        let limit = median(limits);
        let c = converge(&mut b);
        let k = b.engine.counters();
        let visited_ps = c.visited as f64 / c.secs;
        let merges_ps = c.merges as f64 / c.secs;
        println!(
            "\n[dirty source: {dirty}] fill {:.1}s; converged in {:.2}s over {} full scans: pages_shared {} pages_sharing {} zero_pages {}",
            fill.as_secs_f64(), c.secs, c.full_scans, k.pages_shared, k.pages_sharing, k.zero_pages
        );
        println!(
            "  physical limit (xxh3 over the same pages, median of 3): {:.2} M pages/s ({:.1} GB/s)",
            limit / 1e6,
            limit * PAGE_SIZE as f64 / 1e9
        );
        println!(
            "  engine+sim, one core: {:.2} M pages visited/s = {:.2} of the limit; {:.2} M merges/s",
            visited_ps / 1e6,
            visited_ps / limit,
            merges_ps / 1e6
        );
        println!(
            "  metadata {:.1} bytes/page; general_profit {:.0} MiB",
            b.engine.metadata_bytes() as f64 / b.engine.tracked_pages() as f64,
            k.general_profit as f64 / (1 << 20) as f64
        );
        let mut times = Vec::new();
        let mut hashed = Vec::new();
        let mut host = Vec::new();
        for r in 0..rounds {
            let (t, h, ht) = rescan(&mut b, r);
            times.push(t.as_secs_f64());
            hashed.push(h as f64);
            host.push(ht.as_secs_f64());
        }
        let (t, h, ht) = (median(times), median(hashed), median(host));
        println!(
            "  rescan after dirtying 1%: median {:.2} ms per full pass ({:.2} ms host work, {:.2} ms engine), {:.0} pages hashed",
            t * 1e3,
            ht * 1e3,
            (t - ht) * 1e3,
            h
        );
        rescans.push((t, h));
    }
    let (full, dirty) = (rescans[0], rescans[1]);
    println!(
        "\nrescan of a converged fleet, 1% dirtied: without/with dirty source = {:.1}x less time, {:.1}x fewer pages hashed (goal >= 20x)",
        full.0 / dirty.0,
        full.1 / dirty.1.max(1.0)
    );
}
