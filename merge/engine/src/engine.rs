//! The engine: decides what to digest, merge, reclaim and free; the host does the page work.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tracing::{debug, warn};

use crate::counters::{Counters, GuestCounters, RoundReport};
use crate::host::{
    DomainId, FrameId, Gfn, GuestId, HostError, MergeHost, MergeOp, MergeOutcome, OpKind,
    PageDigest, PageRun, UnmergeOutcome, ZeroOutcome, PAGE_SIZE,
};
use crate::index::{IdBuild, PageRef, UnstableTable};
use crate::knobs::{Advisor, KnobError, Knobs, KnobsUpdate, RunMode, MAX_PAGES_TO_SCAN};

/// Pages per host round trip when digesting a range.
const BATCH: usize = 1024;
/// Most pages a range batch may span (smart-scan skips included).
const SPAN: usize = 8 * BATCH;
/// A new isolated run is accepted near the end of the VMA budget only if it is this long.
const LONG_RUN: u32 = 4;

/// `PageMeta::map`: 0 = anonymous memory, `f + 1` = mapped onto pool frame `f`.
const ANON: u32 = 0;

mod st {
    pub const UNSCANNED: u8 = 0;
    pub const VOLATILE: u8 = 1;
    pub const UNIQUE: u8 = 2;
    pub const MERGED: u8 = 3;
    pub const ZERO: u8 = 4;
    pub const DEFERRED: u8 = 5;
    pub const PENDING: u8 = 6;
    pub const N: usize = 7;
}

const F_ZERO: u8 = 1;
const F_WATCH: u8 = 2;

/// Per guest page: 16 bytes.
#[derive(Clone, Copy, Default)]
struct PageMeta {
    /// Hash at the last digest (the checksum of KSM's volatility rule and the index key).
    hash: u64,
    /// The page's mapping (layout): `ANON` or frame + 1. Stays the frame after a split.
    map: u32,
    state: u8,
    /// Consecutive visits that did not merge (smart scan).
    fails: u8,
    flags: u8,
    /// The guest's dirty pass in which the page was last digested.
    pass: u8,
}

mod fs {
    pub const FREE: u8 = 0;
    /// Allocated in this batch, populate planned.
    pub const PENDING: u8 = 1;
    /// Populated, in the stable index.
    pub const LIVE: u8 = 2;
    /// Held by a failed guest whose populate outcome is unknown; not in the index.
    pub const ORPHAN: u8 = 3;
    /// Allocated in this batch, never populated; released without a host call.
    pub const CANCELLED: u8 = 4;
    /// Populated but not mapped; must be punched.
    pub const DOOMED: u8 = 5;
}

const NONE: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct FrameMeta {
    hash: u64,
    refs: u32,
    /// Next frame with the same hash in the stable index (a chain).
    next: u32,
    state: u8,
}

const FREE_FRAME: FrameMeta = FrameMeta {
    hash: 0,
    refs: 0,
    next: NONE,
    state: fs::FREE,
};

struct Domain {
    id: DomainId,
    /// The stable set: hash -> first frame of its chain.
    stable: HashMap<u64, u32, IdBuild>,
    /// Pool frames; `len()` is the pool's high-water mark.
    frames: Vec<FrameMeta>,
    nfree: u32,
    allocated: u64,
    cursor: u32,
    /// The unstable set.
    unstable: UnstableTable,
}

impl Domain {
    fn new(id: DomainId) -> Self {
        Domain {
            id,
            stable: HashMap::default(),
            frames: Vec::new(),
            nfree: 0,
            allocated: 0,
            cursor: 0,
            unstable: UnstableTable::default(),
        }
    }

    /// Allocates a frame: `pref` if free (extends the previous page's run), else a fresh
    /// one at the end of the pool, or a freed one when many are free.
    fn alloc(&mut self, pref: Option<u32>) -> u32 {
        let n = self.frames.len() as u32;
        let f = match pref {
            Some(p) if p < n && self.frames[p as usize].state == fs::FREE => Some(p),
            _ => None,
        };
        let f = f.or_else(|| {
            if u64::from(self.nfree) * 4 > u64::from(n) {
                (0..n)
                    .map(|k| (self.cursor + k) % n)
                    .find(|&i| self.frames[i as usize].state == fs::FREE)
            } else {
                None
            }
        });
        self.allocated += 1;
        match f {
            Some(f) => {
                self.nfree -= 1;
                self.cursor = f + 1;
                self.frames[f as usize].state = fs::PENDING;
                f
            }
            None => {
                self.frames.push(FrameMeta {
                    state: fs::PENDING,
                    ..FREE_FRAME
                });
                n
            }
        }
    }

    fn release(&mut self, f: u32) {
        debug_assert_ne!(self.frames[f as usize].state, fs::FREE);
        self.frames[f as usize] = FREE_FRAME;
        self.nfree += 1;
        self.allocated -= 1;
    }

    fn stable_insert(&mut self, f: u32) {
        let h = self.frames[f as usize].hash;
        let head = self.stable.insert(h, f).unwrap_or(NONE);
        self.frames[f as usize].next = head;
    }

    fn stable_remove(&mut self, f: u32) {
        let h = self.frames[f as usize].hash;
        let next = self.frames[f as usize].next;
        self.frames[f as usize].next = NONE;
        let Some(&head) = self.stable.get(&h) else {
            return;
        };
        if head == f {
            if next == NONE {
                self.stable.remove(&h);
            } else {
                self.stable.insert(h, next);
            }
            return;
        }
        let mut cur = head;
        while cur != NONE {
            let nx = self.frames[cur as usize].next;
            if nx == f {
                self.frames[cur as usize].next = next;
                return;
            }
            cur = nx;
        }
    }

    /// A frame of content `h` with room for another sharer.
    fn stable_find(&self, h: u64, max: u32) -> Option<u32> {
        let mut cur = *self.stable.get(&h)?;
        while cur != NONE {
            let fr = &self.frames[cur as usize];
            if (fr.state == fs::LIVE || fr.state == fs::PENDING) && fr.refs < max {
                return Some(cur);
            }
            cur = fr.next;
        }
        None
    }

    fn bytes(&self) -> usize {
        std::mem::size_of::<Domain>()
            + self.frames.capacity() * std::mem::size_of::<FrameMeta>()
            + self.stable.capacity() * 17
            + self.unstable.bytes()
    }
}

struct Guest {
    id: GuestId,
    domain: DomainId,
    dom: usize,
    pages: Vec<PageMeta>,
    budget: u32,
    vmas: u32,
    dirty_source: bool,
    first_pass_done: bool,
    in_pass: bool,
    failed: bool,
    /// Dirty-source guests: pages not yet candidates (volatile, deferred), re-tried
    /// without rehashing once the dirty source says they stayed unchanged.
    watch: Vec<u32>,
    pass: u8,
    counts: [u64; st::N],
}

impl Guest {
    fn set_state(&mut self, gfn: usize, s: u8) {
        let p = &mut self.pages[gfn];
        self.counts[p.state as usize] -= 1;
        self.counts[s as usize] += 1;
        p.state = s;
        if self.dirty_source && (s == st::VOLATILE || s == st::DEFERRED) && p.flags & F_WATCH == 0 {
            p.flags |= F_WATCH;
            self.watch.push(gfn as u32);
        }
    }

    fn bytes(&self) -> usize {
        std::mem::size_of::<Guest>()
            + self.pages.capacity() * std::mem::size_of::<PageMeta>()
            + self.watch.capacity() * 4
    }
}

fn brk(a: u32, b: u32) -> i64 {
    let joined = (a == ANON && b == ANON) || (a != ANON && b != ANON && b == a + 1);
    i64::from(!joined)
}

/// Mappings (VMAs) used by a layout: one plus the boundaries between pages that do not
/// coalesce (anonymous next to anonymous, frame f next to frame f + 1 coalesce).
fn vma_count(maps: impl Iterator<Item = u32>) -> u32 {
    let mut n = 1;
    let mut prev = None;
    for m in maps {
        if let Some(p) = prev {
            n += brk(p, m) as u32;
        }
        prev = Some(m);
    }
    n
}

/// What the engine knows about one page (for audits and debugging).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// Never digested.
    Unscanned,
    /// Changed since its previous visit.
    Volatile,
    /// Unchanged, no twin found yet: in the unstable set.
    Unique,
    /// Mapped onto a frame.
    Merged,
    /// Reclaimed zero page.
    Zero,
    /// Would merge, but the guest's VMA budget did not allow it.
    Deferred,
}

/// A page as the engine sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageInfo {
    /// Its state.
    pub state: PageState,
    /// The pool frame its mapping points at (it may hold a private copy if split).
    pub mapping: Option<FrameId>,
    /// Hash at the last digest.
    pub hash: u64,
}

/// A guest to register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestSpec {
    /// Its id (the daemon's name for the connection).
    pub id: GuestId,
    /// Pages of merge-eligible RAM (gfn 0..pages), at most 2^32.
    pub pages: u64,
    /// Its merge domain.
    pub domain: DomainId,
    /// Mappings (VMAs) its merged layout may use, >= 1 (the unmerged RAM is one).
    pub vma_budget: u32,
    /// The host can report written pages (KVM dirty log / PAGEMAP_SCAN).
    pub has_dirty_source: bool,
}

/// Engine errors (misuse by the caller; host failures are per guest, see [`HostError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The id is already registered.
    #[error("{0} is already registered")]
    DuplicateGuest(GuestId),
    /// No such guest.
    #[error("{0} is not registered")]
    NoSuchGuest(GuestId),
    /// Size or budget out of range.
    #[error("{0}: pages must be 1..=2^32 and vma_budget >= 1")]
    BadSpec(GuestId),
    /// Too many guests.
    #[error("at most 65534 guests")]
    TooManyGuests,
    /// The guest's host failed earlier; it can only be removed.
    #[error("{0} failed; remove it")]
    Failed(GuestId),
    /// Some pages could not be unmerged (no VMA budget for the remap).
    #[error("{0}: {1} pages are still merged")]
    StillMerged(GuestId, u64),
    /// The guest's host failed while unmerging; it was marked failed.
    #[error("{0}")]
    Host(#[from] HostError),
}

#[derive(Default, Clone, Copy)]
struct Cumulative {
    full_scans: u64,
    pages_scanned: u64,
    pages_skipped: u64,
    merges: u64,
    splits: u64,
    frames_freed: u64,
    mismatches: u64,
    skipped_vma: u64,
}

struct Seen {
    gfn: u32,
    d: PageDigest,
}

#[derive(Clone, Copy)]
struct Act {
    gfn: u32,
    frame: u32,
    partner: Option<PageRef>,
    ok: bool,
}

#[derive(Default)]
struct Plan {
    zero: Vec<u32>,
    zero_remap: Vec<u32>,
    acts: Vec<Act>,
    overlay: HashMap<(u32, u32), u32>,
    pend: HashMap<u32, i64>,
    maybe_free: Vec<u32>,
    cancelled: Vec<u32>,
    doomed: Vec<u32>,
}

/// The merge engine: KSM's scanner, stable and unstable sets, frame pool bookkeeping and
/// counters. No I/O, no threads: page work goes through a [`MergeHost`].
pub struct Engine {
    knobs: Knobs,
    guests: Vec<Option<Guest>>,
    ids: HashMap<GuestId, u32>,
    domains: Vec<Domain>,
    dom_ids: HashMap<DomainId, usize>,
    cursor_slot: usize,
    cursor_gfn: usize,
    stats: Cumulative,
    ns_per_page: f64,
    digests: Vec<PageDigest>,
    dirty: Vec<(Gfn, PageDigest)>,
}

fn tab_insert(guests: &[Option<Guest>], dom: &mut Domain, r: PageRef) {
    let hash_of = |x: PageRef| {
        guests[x.slot as usize]
            .as_ref()
            .map_or(0, |g| g.pages[x.gfn as usize].hash)
    };
    dom.unstable.insert(hash_of(r), r, hash_of);
}

/// Makes a page a candidate (in the unstable set), or volatile if its guest failed.
fn to_unique(guests: &mut [Option<Guest>], domains: &mut [Domain], r: PageRef) {
    let g = guests[r.slot as usize].as_mut().expect("live slot");
    if g.failed {
        g.set_state(r.gfn as usize, st::VOLATILE);
        return;
    }
    g.set_state(r.gfn as usize, st::UNIQUE);
    let dom = g.dom;
    tab_insert(guests, &mut domains[dom], r);
}

/// Maps a page (after the host did it) and keeps the guest's VMA count exact.
fn apply_map(g: &mut Guest, gfn: usize, new: u32) {
    let old = g.pages[gfn].map;
    let mut d = 0;
    if gfn > 0 {
        let l = g.pages[gfn - 1].map;
        d += brk(l, new) - brk(l, old);
    }
    if gfn + 1 < g.pages.len() {
        let r = g.pages[gfn + 1].map;
        d += brk(new, r) - brk(old, r);
    }
    g.pages[gfn].map = new;
    g.vmas = (i64::from(g.vmas) + d) as u32;
}

fn runs_of(acts: &[(u32, u32)], kind: OpKind) -> Vec<MergeOp> {
    let mut ops: Vec<MergeOp> = Vec::new();
    for &(gfn, f) in acts {
        if let Some(last) = ops.last_mut() {
            if last.gfn + u64::from(last.len) == u64::from(gfn) && last.frame + last.len == f {
                last.len += 1;
                continue;
            }
        }
        ops.push(MergeOp {
            gfn: u64::from(gfn),
            len: 1,
            frame: f,
            kind,
        });
    }
    ops
}

impl Engine {
    /// A new engine with `knobs` (validated) and no guests.
    pub fn new(knobs: Knobs) -> Result<Self, KnobError> {
        knobs.validate()?;
        Ok(Engine {
            knobs,
            guests: Vec::new(),
            ids: HashMap::new(),
            domains: Vec::new(),
            dom_ids: HashMap::new(),
            cursor_slot: 0,
            cursor_gfn: 0,
            stats: Cumulative::default(),
            ns_per_page: 0.0,
            digests: Vec::new(),
            dirty: Vec::new(),
        })
    }

    /// The current knobs.
    pub fn knobs(&self) -> Knobs {
        self.knobs
    }

    /// How long the daemon should sleep between [`Engine::scan_round`]s.
    pub fn sleep(&self) -> Duration {
        Duration::from_millis(u64::from(self.knobs.sleep_millisecs))
    }

    /// Registers a guest (like `madvise(MADV_MERGEABLE)` on all its RAM). Its pages start
    /// unscanned, anonymous, one VMA.
    pub fn add_guest(&mut self, spec: GuestSpec) -> Result<GuestId, EngineError> {
        if self.ids.contains_key(&spec.id) {
            return Err(EngineError::DuplicateGuest(spec.id));
        }
        if spec.pages == 0 || spec.pages > 1 << 32 || spec.vma_budget == 0 {
            return Err(EngineError::BadSpec(spec.id));
        }
        let slot = match self.guests.iter().position(Option::is_none) {
            Some(s) => s,
            None if self.guests.len() < 0xfffe => {
                self.guests.push(None);
                self.guests.len() - 1
            }
            None => return Err(EngineError::TooManyGuests),
        };
        let dom = match self.dom_ids.get(&spec.domain) {
            Some(&d) => d,
            None => {
                self.domains.push(Domain::new(spec.domain));
                self.dom_ids.insert(spec.domain, self.domains.len() - 1);
                self.domains.len() - 1
            }
        };
        let mut counts = [0; st::N];
        counts[st::UNSCANNED as usize] = spec.pages;
        self.guests[slot] = Some(Guest {
            id: spec.id,
            domain: spec.domain,
            dom,
            pages: vec![PageMeta::default(); spec.pages as usize],
            budget: spec.vma_budget,
            vmas: 1,
            dirty_source: spec.has_dirty_source,
            first_pass_done: false,
            in_pass: false,
            failed: false,
            watch: Vec::new(),
            pass: 0,
            counts,
        });
        self.ids.insert(spec.id, slot as u32);
        debug!(guest = spec.id.0, pages = spec.pages, "guest registered");
        Ok(spec.id)
    }

    fn slot_of(&self, id: GuestId) -> Result<usize, EngineError> {
        self.ids
            .get(&id)
            .map(|&s| s as usize)
            .ok_or(EngineError::NoSuchGuest(id))
    }

    /// Forgets a guest (its process is gone, or it left after [`Engine::unmerge_guest`]):
    /// drops its references; frames left without sharers are freed through the host.
    pub fn remove_guest(
        &mut self,
        id: GuestId,
        host: &mut impl MergeHost,
    ) -> Result<(), EngineError> {
        let slot = self.slot_of(id)?;
        let g = self.guests[slot].as_ref().expect("live slot");
        let di = g.dom;
        let mut to_free = Vec::new();
        {
            let dom = &mut self.domains[di];
            for (gfn, p) in g.pages.iter().enumerate() {
                match p.state {
                    st::UNIQUE => {
                        dom.unstable.remove(
                            p.hash,
                            PageRef {
                                slot: slot as u32,
                                gfn: gfn as u32,
                            },
                        );
                    }
                    st::MERGED => {
                        let f = p.map - 1;
                        let fr = &mut dom.frames[f as usize];
                        fr.refs -= 1;
                        if fr.refs == 0 {
                            to_free.push(f);
                        }
                    }
                    _ => {}
                }
            }
        }
        self.guests[slot] = None;
        self.ids.remove(&id);
        if self.cursor_slot == slot {
            self.cursor_gfn = 0;
        }
        self.free_frames(di, to_free, host);
        debug!(guest = id.0, "guest removed");
        Ok(())
    }

    /// A guest opts out: gives its merged pages private copies again, then forgets it.
    /// A guest whose host failed, or that could not unmerge every page, stays registered
    /// (its pages may still map frames) and an error says why.
    pub fn unmerge_guest(
        &mut self,
        id: GuestId,
        host: &mut impl MergeHost,
    ) -> Result<(), EngineError> {
        let slot = self.slot_of(id)?;
        if self.guests[slot].as_ref().is_some_and(|g| g.failed) {
            return Err(EngineError::Failed(id));
        }
        self.unmerge_slot(slot, host)?;
        let left = self.guests[slot]
            .as_ref()
            .map_or(0, |g| g.counts[st::MERGED as usize]);
        if left > 0 {
            return Err(EngineError::StillMerged(id, left));
        }
        self.remove_guest(id, host)
    }

    /// Frees frames with no sharers (LIVE or ORPHAN) and DOOMED ones through the host.
    fn free_frames(&mut self, di: usize, mut frames: Vec<u32>, host: &mut impl MergeHost) {
        let dom = &mut self.domains[di];
        frames.sort_unstable();
        frames.dedup();
        frames.retain(|&f| {
            let fr = dom.frames[f as usize];
            fr.refs == 0 && matches!(fr.state, fs::LIVE | fs::ORPHAN | fs::DOOMED)
        });
        if frames.is_empty() {
            return;
        }
        for &f in &frames {
            if dom.frames[f as usize].state == fs::LIVE {
                dom.stable_remove(f);
            }
        }
        if let Err(e) = host.free_frames(dom.id, &frames) {
            // The frames' contents stay in the pool's file until reused; a later Populate
            // overwrites the whole frame, so reuse is still safe.
            warn!(error = %e, "cannot punch freed frames");
        }
        for &f in &frames {
            dom.release(f);
        }
        self.stats.frames_freed += frames.len() as u64;
    }

    /// Unmerges every page of a guest whose mapping is a frame; all its pages become
    /// unscanned. On a host error the guest is marked failed.
    fn unmerge_slot(&mut self, slot: usize, host: &mut impl MergeHost) -> Result<(), HostError> {
        let g = self.guests[slot].as_ref().expect("live slot");
        if g.failed {
            return Ok(());
        }
        let id = g.id;
        let di = g.dom;
        let gfns: Vec<Gfn> = g
            .pages
            .iter()
            .enumerate()
            .filter(|(_, p)| p.map != ANON)
            .map(|(i, _)| i as Gfn)
            .collect();
        let mut out = Vec::new();
        let res = if gfns.is_empty() {
            Ok(())
        } else {
            host.unmerge(id, &gfns, &mut out).and_then(|()| {
                if out.len() == gfns.len() {
                    Ok(())
                } else {
                    Err(HostError::Protocol {
                        guest: id,
                        reason: format!("{} unmerge results for {} pages", out.len(), gfns.len()),
                    })
                }
            })
        };
        if let Err(e) = res {
            self.fail_guest(slot, &e, None);
            return Err(e);
        }
        let mut to_free = Vec::new();
        let Engine {
            guests, domains, ..
        } = self;
        let g = guests[slot].as_mut().expect("live slot");
        let dom = &mut domains[di];
        for (&gfn, &o) in gfns.iter().zip(&out) {
            let gfn = gfn as usize;
            if o != UnmergeOutcome::Unmerged {
                continue;
            }
            let p = g.pages[gfn];
            if p.state == st::MERGED {
                let fr = &mut dom.frames[(p.map - 1) as usize];
                fr.refs -= 1;
                if fr.refs == 0 {
                    to_free.push(p.map - 1);
                }
                g.set_state(gfn, st::UNSCANNED);
            }
            apply_map(g, gfn, ANON);
        }
        for gfn in 0..g.pages.len() {
            let p = g.pages[gfn];
            match p.state {
                st::MERGED => continue, // could not be unmerged (no VMA budget)
                st::UNIQUE => {
                    dom.unstable.remove(
                        p.hash,
                        PageRef {
                            slot: slot as u32,
                            gfn: gfn as u32,
                        },
                    );
                }
                _ => {}
            }
            g.set_state(gfn, st::UNSCANNED);
            let p = &mut g.pages[gfn];
            p.fails = 0;
            p.flags = 0;
        }
        g.watch.clear();
        g.first_pass_done = false;
        g.in_pass = false;
        self.free_frames(di, to_free, host);
        Ok(())
    }

    /// Changes knobs (validated first; nothing changes on error). `run = 2` unmerges every
    /// guest through the host now; guests whose host fails are marked failed.
    pub fn set_knobs(
        &mut self,
        upd: KnobsUpdate,
        host: &mut impl MergeHost,
    ) -> Result<Knobs, KnobError> {
        let new = self.knobs.updated(&upd)?;
        self.knobs = new;
        if upd.run == Some(RunMode::Unmerge) {
            for slot in 0..self.guests.len() {
                if self.guests[slot].is_some() {
                    let _ = self.unmerge_slot(slot, host);
                }
            }
            self.cursor_slot = 0;
            self.cursor_gfn = 0;
        }
        Ok(new)
    }

    /// Feeds the advisor the CPU time the last round took; with `advisor = scan-time` it
    /// sets `pages_to_scan` for the target full-scan time under the CPU cap.
    pub fn advise(&mut self, round_cpu: Duration, report: &RoundReport) {
        let Advisor::ScanTime {
            target_scan_secs,
            max_cpu_pct,
        } = self.knobs.advisor
        else {
            return;
        };
        if report.pages_visited > 0 {
            let ns = round_cpu.as_nanos() as f64 / report.pages_visited as f64;
            self.ns_per_page = if self.ns_per_page == 0.0 {
                ns
            } else {
                0.7 * self.ns_per_page + 0.3 * ns
            };
        }
        let ns_pp = if self.ns_per_page > 0.0 {
            self.ns_per_page.max(10.0)
        } else {
            500.0
        };
        let total: u64 = self
            .guests
            .iter()
            .flatten()
            .filter(|g| !g.failed)
            .map(|g| g.pages.len() as u64)
            .sum();
        let sleep_ms = f64::from(self.knobs.sleep_millisecs.max(1));
        let rounds = (f64::from(target_scan_secs) * 1000.0 / sleep_ms).max(1.0);
        let needed = total as f64 / rounds;
        let cap = if max_cpu_pct >= 100 {
            f64::INFINITY
        } else {
            f64::from(max_cpu_pct) / f64::from(100 - max_cpu_pct) * sleep_ms * 1e6 / ns_pp
        };
        let p = needed.min(cap).clamp(1.0, f64::from(MAX_PAGES_TO_SCAN));
        self.knobs.pages_to_scan = p as u32;
    }

    /// One wake-up of the scanner: visits up to `pages_to_scan` pages, guests in turn from
    /// where the last round stopped, and merges what it can. Host failures mark the guest
    /// failed and the round goes on.
    pub fn scan_round(&mut self, host: &mut impl MergeHost) -> RoundReport {
        let mut rep = RoundReport::default();
        if self.knobs.run != RunMode::Run {
            return rep;
        }
        let mut budget = u64::from(self.knobs.pages_to_scan);
        let mut work_since_wrap = 0u64;
        while budget > 0 {
            if !self.guests.iter().flatten().any(|g| !g.failed) {
                break;
            }
            let slot = self.cursor_slot;
            if slot >= self.guests.len() {
                self.cursor_slot = 0;
                self.cursor_gfn = 0;
                self.stats.full_scans += 1;
                rep.full_scans += 1;
                if work_since_wrap == 0 {
                    break;
                }
                work_since_wrap = 0;
                continue;
            }
            let (active, dirty_mode) = match &self.guests[slot] {
                Some(g) if !g.failed => (true, g.dirty_source && g.first_pass_done),
                _ => (false, false),
            };
            if !active {
                self.next_slot();
                continue;
            }
            let (work, done) = if dirty_mode {
                self.visit_dirty(slot, budget, host, &mut rep)
            } else {
                self.visit_range(slot, budget, host, &mut rep)
            };
            budget = budget.saturating_sub(work);
            work_since_wrap += work;
            let failed = self.guests[slot].as_ref().is_none_or(|g| g.failed);
            if done || failed {
                self.next_slot();
            }
        }
        self.stats.pages_scanned += rep.pages_visited;
        self.stats.pages_skipped += rep.pages_skipped;
        rep
    }

    fn next_slot(&mut self) {
        self.cursor_slot += 1;
        self.cursor_gfn = 0;
    }

    fn smart_skip(&self, p: &PageMeta, gfn: usize) -> bool {
        if !self.knobs.smart_scan || p.fails < 2 {
            return false;
        }
        if !matches!(p.state, st::VOLATILE | st::UNIQUE) {
            return false;
        }
        let period = match p.fails {
            2..=3 => 2,
            4..=5 => 4,
            _ => 8,
        };
        !(self.stats.full_scans + gfn as u64).is_multiple_of(period)
    }

    fn visit_range(
        &mut self,
        slot: usize,
        budget: u64,
        host: &mut impl MergeHost,
        rep: &mut RoundReport,
    ) -> (u64, bool) {
        let g = self.guests[slot].as_ref().expect("live slot");
        let n = g.pages.len();
        let start = self.cursor_gfn.min(n);
        let want = (budget as usize).min(BATCH);
        let mut runs: Vec<PageRun> = Vec::new();
        let mut taken = 0usize;
        let mut gfn = start;
        while gfn < n && taken < want && gfn < start + SPAN {
            let p = &g.pages[gfn];
            if self.smart_skip(p, gfn) {
                rep.pages_skipped += 1;
            } else {
                match runs.last_mut() {
                    Some(r) if r.gfn + u64::from(r.len) == gfn as u64 => r.len += 1,
                    _ => runs.push(PageRun {
                        gfn: gfn as u64,
                        len: 1,
                    }),
                }
                taken += 1;
            }
            gfn += 1;
        }
        let end = gfn;
        let id = g.id;
        if taken > 0 {
            let mut digests = std::mem::take(&mut self.digests);
            rep.host_calls += 1;
            let res = host.digest(id, &runs, &mut digests).and_then(|()| {
                if digests.len() == taken {
                    Ok(())
                } else {
                    Err(HostError::Protocol {
                        guest: id,
                        reason: format!("{} digests for {taken} pages", digests.len()),
                    })
                }
            });
            if let Err(e) = res {
                self.digests = digests;
                self.fail_guest(slot, &e, Some(rep));
                return (taken as u64, true);
            }
            rep.pages_visited += taken as u64;
            let mut seen = Vec::with_capacity(taken);
            let mut it = digests.iter();
            for r in &runs {
                for k in 0..r.len {
                    seen.push(Seen {
                        gfn: r.gfn as u32 + k,
                        d: *it.next().expect("checked length"),
                    });
                }
            }
            self.digests = digests;
            self.process(slot, seen, host, rep);
        }
        self.cursor_gfn = end;
        let done = end >= n;
        if done {
            if let Some(g) = self.guests[slot].as_mut() {
                g.first_pass_done = true;
            }
        }
        (taken as u64, done)
    }

    fn visit_dirty(
        &mut self,
        slot: usize,
        budget: u64,
        host: &mut impl MergeHost,
        rep: &mut RoundReport,
    ) -> (u64, bool) {
        let g = self.guests[slot].as_mut().expect("live slot");
        if !g.in_pass {
            g.in_pass = true;
            g.pass = g.pass.wrapping_add(1);
        }
        let id = g.id;
        let n = g.pages.len() as u64;
        let max = (budget as usize).min(BATCH) as u32;
        let mut dirty = std::mem::take(&mut self.dirty);
        rep.host_calls += 1;
        let res = host.digest_dirty(id, max, &mut dirty).and_then(|more| {
            if dirty.len() > max as usize || dirty.iter().any(|(gfn, _)| *gfn >= n) {
                Err(HostError::Protocol {
                    guest: id,
                    reason: "dirty digests out of range".into(),
                })
            } else {
                Ok(more)
            }
        });
        let more = match res {
            Ok(m) => m,
            Err(e) => {
                self.dirty = dirty;
                self.fail_guest(slot, &e, Some(rep));
                return (0, true);
            }
        };
        let work = dirty.len() as u64;
        rep.pages_visited += work;
        let seen: Vec<Seen> = dirty
            .iter()
            .map(|&(gfn, d)| Seen { gfn: gfn as u32, d })
            .collect();
        self.dirty = dirty;
        if !seen.is_empty() {
            self.process(slot, seen, host, rep);
        }
        if more {
            return (work.max(1), false);
        }
        // The pass is complete: every page not reported dirty is unchanged since its last
        // digest, so watched pages become candidates without being rehashed.
        let Some(g) = self.guests[slot].as_mut().filter(|g| !g.failed) else {
            return (work, true);
        };
        g.in_pass = false;
        let old = std::mem::take(&mut g.watch);
        let mut seen = Vec::new();
        for gfn in old {
            let p = &mut g.pages[gfn as usize];
            p.flags &= !F_WATCH;
            if !matches!(p.state, st::VOLATILE | st::DEFERRED) {
                continue;
            }
            if p.pass == g.pass {
                p.flags |= F_WATCH;
                g.watch.push(gfn);
            } else {
                seen.push(Seen {
                    gfn,
                    d: PageDigest {
                        hash: p.hash,
                        zero: p.flags & F_ZERO != 0,
                        split: false,
                        dirty: Some(false),
                    },
                });
            }
        }
        rep.pages_promoted += seen.len() as u64;
        if !seen.is_empty() {
            self.process(slot, seen, host, rep);
        }
        (work, true)
    }

    /// Marks a guest failed: it is not scanned any more and keeps its frame references
    /// (its pages may still map them) until [`Engine::remove_guest`].
    fn fail_guest(&mut self, slot: usize, e: &HostError, rep: Option<&mut RoundReport>) {
        let Engine {
            guests, domains, ..
        } = self;
        let Some(g) = guests[slot].as_mut() else {
            return;
        };
        if g.failed {
            return;
        }
        warn!(guest = g.id.0, error = %e, "guest's host failed; it is no longer scanned");
        g.failed = true;
        let dom = &mut domains[g.dom];
        for gfn in 0..g.pages.len() {
            let p = g.pages[gfn];
            if p.state == st::UNIQUE {
                dom.unstable.remove(
                    p.hash,
                    PageRef {
                        slot: slot as u32,
                        gfn: gfn as u32,
                    },
                );
                g.set_state(gfn, st::VOLATILE);
            }
        }
        if let Some(rep) = rep {
            rep.guests_failed.push(g.id);
        }
    }

    fn process(
        &mut self,
        slot: usize,
        mut seen: Vec<Seen>,
        host: &mut impl MergeHost,
        rep: &mut RoundReport,
    ) {
        seen.sort_unstable_by_key(|s| s.gfn);
        let mut plan = Plan::default();
        for s in &seen {
            self.classify(slot, s, &mut plan, rep);
        }
        self.budget_pass(slot, &mut plan, rep);
        self.execute(slot, plan, host, rep);
    }

    /// KSM's `cmp_and_merge_page`, minus the host work: decides what to do with one page.
    fn classify(&mut self, slot: usize, s: &Seen, plan: &mut Plan, rep: &mut RoundReport) {
        let max = self.knobs.max_page_sharing;
        let Engine {
            guests,
            domains,
            stats,
            ..
        } = self;
        let gfn = s.gfn as usize;
        let me = PageRef {
            slot: slot as u32,
            gfn: s.gfn,
        };
        let g = guests[slot].as_mut().expect("live slot");
        let di = g.dom;
        let m = g.pages[gfn];
        let mut force = false;
        match m.state {
            st::PENDING => return,
            st::MERGED => {
                if !s.d.split {
                    g.pages[gfn].pass = g.pass;
                    return;
                }
                let f = m.map - 1;
                let fr = &mut domains[di].frames[f as usize];
                fr.refs -= 1;
                if fr.refs == 0 {
                    plan.maybe_free.push(f);
                }
                stats.splits += 1;
                rep.splits += 1;
                g.set_state(gfn, st::VOLATILE);
                force = true;
            }
            st::ZERO => {
                // Still zero and not written since it was dropped: nothing to do. Written
                // (even with zeros) it holds memory again and goes round once more.
                if s.d.zero && !s.d.split && s.d.dirty != Some(true) {
                    g.pages[gfn].pass = g.pass;
                    return;
                }
                force = true;
            }
            st::UNIQUE => {
                domains[di].unstable.remove(m.hash, me);
            }
            _ => {}
        }
        let changed = force
            || s.d.dirty == Some(true)
            || (m.state == st::UNSCANNED && s.d.dirty.is_none())
            || (m.state != st::UNSCANNED && m.hash != s.d.hash);
        let h = s.d.hash;
        {
            let p = &mut g.pages[gfn];
            p.hash = h;
            p.pass = g.pass;
            if s.d.zero {
                p.flags |= F_ZERO;
            } else {
                p.flags &= !F_ZERO;
            }
            if changed {
                p.fails = p.fails.saturating_add(1);
            }
        }
        if changed {
            g.set_state(gfn, st::VOLATILE);
            return;
        }
        if s.d.zero {
            if m.map == ANON {
                plan.zero.push(s.gfn);
            } else {
                plan.zero_remap.push(s.gfn);
            }
            g.set_state(gfn, st::PENDING);
            return;
        }
        let dom = &mut domains[di];
        if let Some(f) = dom.stable_find(h, max) {
            dom.frames[f as usize].refs += 1;
            plan.acts.push(Act {
                gfn: s.gfn,
                frame: f,
                partner: None,
                ok: true,
            });
            g.set_state(gfn, st::PENDING);
            return;
        }
        let pref = match plan.acts.last() {
            Some(a) if a.gfn + 1 == s.gfn => Some(a.frame + 1),
            _ if gfn > 0 && g.pages[gfn - 1].map != ANON => Some(g.pages[gfn - 1].map),
            _ => None,
        };
        let found = {
            let guests_ro: &[Option<Guest>] = guests;
            dom.unstable.find(h, |r| {
                r != me
                    && guests_ro[r.slot as usize].as_ref().is_some_and(|pg| {
                        let pp = &pg.pages[r.gfn as usize];
                        !pg.failed && pp.state == st::UNIQUE && pp.hash == h
                    })
            })
        };
        if let Some(pr) = found {
            dom.unstable.remove(h, pr);
            guests[pr.slot as usize]
                .as_mut()
                .expect("live slot")
                .set_state(pr.gfn as usize, st::PENDING);
            let f = dom.alloc(pref);
            let fr = &mut dom.frames[f as usize];
            fr.hash = h;
            fr.refs = 2;
            dom.stable_insert(f);
            plan.acts.push(Act {
                gfn: s.gfn,
                frame: f,
                partner: Some(pr),
                ok: true,
            });
            guests[slot]
                .as_mut()
                .expect("live slot")
                .set_state(gfn, st::PENDING);
            return;
        }
        let g = guests[slot].as_mut().expect("live slot");
        g.pages[gfn].fails = g.pages[gfn].fails.saturating_add(1);
        g.set_state(gfn, st::UNIQUE);
        tab_insert(guests, &mut domains[di], me);
    }

    /// Mapping delta of changing `(slot, gfn)` to `new`, given the planned changes.
    fn delta(&self, plan: &Plan, slot: u32, gfn: u32, new: u32) -> i64 {
        let g = self.guests[slot as usize].as_ref().expect("live slot");
        let get = |x: u32| {
            plan.overlay
                .get(&(slot, x))
                .copied()
                .unwrap_or(g.pages[x as usize].map)
        };
        let old = get(gfn);
        let mut d = 0;
        if gfn > 0 {
            let l = get(gfn - 1);
            d += brk(l, new) - brk(l, old);
        }
        if (gfn as usize) + 1 < g.pages.len() {
            let r = get(gfn + 1);
            d += brk(new, r) - brk(old, r);
        }
        d
    }

    fn room(&self, plan: &Plan, slot: u32) -> i64 {
        let g = self.guests[slot as usize].as_ref().expect("live slot");
        i64::from(g.budget) - i64::from(g.vmas) - plan.pend.get(&slot).copied().unwrap_or(0)
    }

    /// Keeps every guest within its VMA budget, preferring long runs when it runs low.
    fn budget_pass(&mut self, slot: usize, plan: &mut Plan, rep: &mut RoundReport) {
        let s32 = slot as u32;
        let (budget, di) = {
            let g = self.guests[slot].as_ref().expect("live slot");
            (i64::from(g.budget), g.dom)
        };
        let low = (budget / 16).max(4);
        // Zero pages under a pool mapping need an anonymous remap.
        let remaps = std::mem::take(&mut plan.zero_remap);
        for gfn in remaps {
            let d = self.delta(plan, s32, gfn, ANON);
            if d <= self.room(plan, s32) {
                plan.overlay.insert((s32, gfn), ANON);
                *plan.pend.entry(s32).or_default() += d;
                plan.zero_remap.push(gfn);
            } else {
                self.stats.skipped_vma += 1;
                rep.skipped_vma_budget += 1;
                let g = self.guests[slot].as_mut().expect("live slot");
                g.set_state(gfn as usize, st::DEFERRED);
            }
        }
        let n = plan.acts.len();
        let mut run = vec![1u32; n];
        for i in (0..n.saturating_sub(1)).rev() {
            let (a, b) = (plan.acts[i], plan.acts[i + 1]);
            if b.gfn == a.gfn + 1 && b.frame == a.frame + 1 {
                run[i] = run[i + 1] + 1;
            }
        }
        for (i, &run_len) in run.iter().enumerate() {
            let a = plan.acts[i];
            let fstate = self.domains[di].frames[a.frame as usize].state;
            if fstate == fs::CANCELLED {
                plan.acts[i].ok = false;
                to_unique(
                    &mut self.guests,
                    &mut self.domains,
                    PageRef {
                        slot: s32,
                        gfn: a.gfn,
                    },
                );
                continue;
            }
            let new = a.frame + 1;
            let mut ok = true;
            if let Some(pr) = a.partner {
                let dp = self.delta(plan, pr.slot, pr.gfn, new);
                if dp > self.room(plan, pr.slot) {
                    ok = false;
                } else {
                    plan.overlay.insert((pr.slot, pr.gfn), new);
                    *plan.pend.entry(pr.slot).or_default() += dp;
                    let dv = self.delta(plan, s32, a.gfn, new);
                    let room = self.room(plan, s32);
                    if dv > room || (dv > 0 && room - dv < low && run_len < LONG_RUN) {
                        ok = false;
                        plan.overlay.remove(&(pr.slot, pr.gfn));
                        *plan.pend.entry(pr.slot).or_default() -= dp;
                    } else {
                        plan.overlay.insert((s32, a.gfn), new);
                        *plan.pend.entry(s32).or_default() += dv;
                    }
                }
            } else {
                let dv = self.delta(plan, s32, a.gfn, new);
                let room = self.room(plan, s32);
                if dv > room || (dv > 0 && room - dv < low && run_len < LONG_RUN) {
                    ok = false;
                } else {
                    plan.overlay.insert((s32, a.gfn), new);
                    *plan.pend.entry(s32).or_default() += dv;
                }
            }
            if ok {
                continue;
            }
            plan.acts[i].ok = false;
            self.stats.skipped_vma += 1;
            rep.skipped_vma_budget += 1;
            self.guests[slot]
                .as_mut()
                .expect("live slot")
                .set_state(a.gfn as usize, st::DEFERRED);
            let dom = &mut self.domains[di];
            if let Some(pr) = a.partner {
                dom.stable_remove(a.frame);
                dom.frames[a.frame as usize].state = fs::CANCELLED;
                dom.frames[a.frame as usize].refs = 0;
                plan.cancelled.push(a.frame);
                to_unique(&mut self.guests, &mut self.domains, pr);
            } else {
                let fr = &mut dom.frames[a.frame as usize];
                fr.refs -= 1;
                if fr.refs == 0 {
                    plan.maybe_free.push(a.frame);
                }
            }
        }
    }

    /// Issues the batch's host calls and applies their results.
    fn execute(
        &mut self,
        slot: usize,
        mut plan: Plan,
        host: &mut impl MergeHost,
        rep: &mut RoundReport,
    ) {
        let s32 = slot as u32;
        let (id, di) = {
            let g = self.guests[slot].as_ref().expect("live slot");
            (g.id, g.dom)
        };
        // 1. Zero pages: reclaimed without a frame.
        if !plan.zero.is_empty() {
            let gfns: Vec<Gfn> = plan.zero.iter().map(|&g| u64::from(g)).collect();
            let mut out = Vec::new();
            rep.host_calls += 1;
            let res = host.reclaim_zero(id, &gfns, &mut out);
            let ok = res.is_ok() && out.len() == gfns.len();
            let g = self.guests[slot].as_mut().expect("live slot");
            for (k, &gfn) in plan.zero.iter().enumerate() {
                let gfn = gfn as usize;
                if ok && out[k] == ZeroOutcome::Reclaimed {
                    g.pages[gfn].fails = 0;
                    g.set_state(gfn, st::ZERO);
                    rep.zero_reclaimed += 1;
                } else {
                    g.set_state(gfn, st::VOLATILE);
                }
            }
            if !ok {
                let e = res.err().unwrap_or(HostError::Protocol {
                    guest: id,
                    reason: "wrong number of reclaim results".into(),
                });
                self.fail_guest(slot, &e, Some(rep));
            }
        }
        // 2. Zero pages under a pool mapping: remapped anonymous first (reclaimed next visit).
        if !plan.zero_remap.is_empty() {
            let failed = self.guests[slot].as_ref().expect("live slot").failed;
            let gfns: Vec<Gfn> = plan.zero_remap.iter().map(|&g| u64::from(g)).collect();
            let mut out = Vec::new();
            let res = if failed {
                Ok(())
            } else {
                rep.host_calls += 1;
                host.unmerge(id, &gfns, &mut out)
            };
            let ok = !failed && res.is_ok() && out.len() == gfns.len();
            let g = self.guests[slot].as_mut().expect("live slot");
            for (k, &gfn) in plan.zero_remap.iter().enumerate() {
                let gfn = gfn as usize;
                if ok && out[k] == UnmergeOutcome::Unmerged {
                    apply_map(g, gfn, ANON);
                    g.set_state(gfn, st::VOLATILE);
                } else if ok {
                    g.set_state(gfn, st::DEFERRED);
                } else {
                    g.set_state(gfn, st::VOLATILE);
                }
            }
            if !failed && !ok {
                let e = res.err().unwrap_or(HostError::Protocol {
                    guest: id,
                    reason: "wrong number of unmerge results".into(),
                });
                self.fail_guest(slot, &e, Some(rep));
            }
        }
        // 3. New frames, populated from the partner pages, one call per partner guest.
        let mut by_partner: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, a) in plan.acts.iter().enumerate() {
            if let (true, Some(pr)) = (a.ok, a.partner) {
                by_partner.entry(pr.slot).or_default().push(i);
            }
        }
        let visitor_failed = self.guests[slot].as_ref().expect("live slot").failed;
        for (pslot, mut idxs) in by_partner {
            let pg = self.guests[pslot as usize].as_ref().expect("live slot");
            let pid = pg.id;
            if visitor_failed || pg.failed {
                for &i in &idxs {
                    let a = plan.acts[i];
                    let dom = &mut self.domains[di];
                    dom.stable_remove(a.frame);
                    dom.frames[a.frame as usize].state = fs::CANCELLED;
                    dom.frames[a.frame as usize].refs = 0;
                    plan.cancelled.push(a.frame);
                    to_unique(
                        &mut self.guests,
                        &mut self.domains,
                        a.partner.expect("pair"),
                    );
                }
                continue;
            }
            idxs.sort_unstable_by_key(|&i| plan.acts[i].partner.expect("pair").gfn);
            let pairs: Vec<(u32, u32)> = idxs
                .iter()
                .map(|&i| (plan.acts[i].partner.expect("pair").gfn, plan.acts[i].frame))
                .collect();
            let ops = runs_of(&pairs, OpKind::Populate);
            let mut out = Vec::new();
            rep.host_calls += 1;
            let res = host.merge(pid, &ops, &mut out);
            let ok = res.is_ok() && out.len() == pairs.len();
            for (k, &i) in idxs.iter().enumerate() {
                let a = plan.acts[i];
                let pr = a.partner.expect("pair");
                let f = a.frame;
                if !ok {
                    // Unknown outcome: assume the partner maps the frame, so it is kept
                    // until that guest is removed; nobody else joins it.
                    let dom = &mut self.domains[di];
                    dom.stable_remove(f);
                    dom.frames[f as usize].state = fs::ORPHAN;
                    dom.frames[f as usize].refs = 1;
                    let pg = self.guests[pslot as usize].as_mut().expect("live slot");
                    apply_map(pg, pr.gfn as usize, f + 1);
                    pg.set_state(pr.gfn as usize, st::MERGED);
                    continue;
                }
                let r = out[k];
                match r.outcome {
                    MergeOutcome::Merged => {
                        let dom = &mut self.domains[di];
                        dom.frames[f as usize].state = fs::LIVE;
                        if dom.frames[f as usize].hash != r.hash {
                            dom.stable_remove(f);
                            dom.frames[f as usize].hash = r.hash;
                            dom.stable_insert(f);
                        }
                        let pg = self.guests[pslot as usize].as_mut().expect("live slot");
                        apply_map(pg, pr.gfn as usize, f + 1);
                        let p = &mut pg.pages[pr.gfn as usize];
                        p.hash = r.hash;
                        p.fails = 0;
                        pg.set_state(pr.gfn as usize, st::MERGED);
                        self.stats.merges += 1;
                        rep.merges += 1;
                    }
                    other => {
                        let dom = &mut self.domains[di];
                        dom.stable_remove(f);
                        dom.frames[f as usize].state = fs::DOOMED;
                        dom.frames[f as usize].refs = 0;
                        plan.doomed.push(f);
                        if other == MergeOutcome::NoVmaBudget {
                            self.stats.skipped_vma += 1;
                            rep.skipped_vma_budget += 1;
                            to_unique(&mut self.guests, &mut self.domains, pr);
                        } else {
                            self.guests[pslot as usize]
                                .as_mut()
                                .expect("live slot")
                                .set_state(pr.gfn as usize, st::VOLATILE);
                        }
                    }
                }
            }
            if !ok {
                let e = res.err().unwrap_or(HostError::Protocol {
                    guest: pid,
                    reason: "wrong number of populate results".into(),
                });
                self.fail_guest(pslot as usize, &e, Some(rep));
            }
        }
        // 4. The visitor's pages join their frames in one call.
        let visitor_failed = self.guests[slot].as_ref().expect("live slot").failed;
        let mut joins: Vec<usize> = Vec::new();
        for i in 0..plan.acts.len() {
            let a = plan.acts[i];
            if !a.ok {
                continue;
            }
            let fstate = self.domains[di].frames[a.frame as usize].state;
            if fstate != fs::LIVE || visitor_failed {
                if fstate == fs::LIVE {
                    let fr = &mut self.domains[di].frames[a.frame as usize];
                    fr.refs -= 1;
                    if fr.refs == 0 {
                        plan.maybe_free.push(a.frame);
                    }
                }
                to_unique(
                    &mut self.guests,
                    &mut self.domains,
                    PageRef {
                        slot: s32,
                        gfn: a.gfn,
                    },
                );
                continue;
            }
            joins.push(i);
        }
        if !joins.is_empty() {
            let pairs: Vec<(u32, u32)> = joins
                .iter()
                .map(|&i| (plan.acts[i].gfn, plan.acts[i].frame))
                .collect();
            let ops = runs_of(&pairs, OpKind::Join);
            let mut out = Vec::new();
            rep.host_calls += 1;
            let res = host.merge(id, &ops, &mut out);
            let ok = res.is_ok() && out.len() == pairs.len();
            let g = self.guests[slot].as_mut().expect("live slot");
            let dom = &mut self.domains[di];
            for (k, &(gfn, f)) in pairs.iter().enumerate() {
                let gfn = gfn as usize;
                let outcome = if ok {
                    out[k].outcome
                } else {
                    // Unknown outcome: assume mapped (keeps the frame alive).
                    MergeOutcome::Merged
                };
                match outcome {
                    MergeOutcome::Merged => {
                        apply_map(g, gfn, f + 1);
                        g.pages[gfn].fails = 0;
                        g.set_state(gfn, st::MERGED);
                        if ok {
                            self.stats.merges += 1;
                            rep.merges += 1;
                        }
                    }
                    MergeOutcome::Mismatch | MergeOutcome::NoVmaBudget => {
                        let fr = &mut dom.frames[f as usize];
                        fr.refs -= 1;
                        if fr.refs == 0 {
                            plan.maybe_free.push(f);
                        }
                        if outcome == MergeOutcome::Mismatch {
                            self.stats.mismatches += 1;
                            rep.mismatches += 1;
                            let p = &mut g.pages[gfn];
                            p.fails = p.fails.saturating_add(1);
                            g.set_state(gfn, st::VOLATILE);
                        } else {
                            self.stats.skipped_vma += 1;
                            rep.skipped_vma_budget += 1;
                            g.set_state(gfn, st::DEFERRED);
                        }
                    }
                }
            }
            if !ok {
                let e = res.err().unwrap_or(HostError::Protocol {
                    guest: id,
                    reason: "wrong number of join results".into(),
                });
                self.fail_guest(slot, &e, Some(rep));
            }
        }
        // 5. Frames nobody maps go back to the pool.
        for f in plan.cancelled.drain(..) {
            self.domains[di].release(f);
        }
        let mut to_free = std::mem::take(&mut plan.maybe_free);
        to_free.append(&mut plan.doomed);
        if !to_free.is_empty() {
            rep.host_calls += 1;
            self.free_frames(di, to_free, host);
        }
    }

    /// Fleet-wide counters (kept incrementally).
    pub fn counters(&self) -> Counters {
        let mut c = Counters {
            full_scans: self.stats.full_scans,
            pages_scanned: self.stats.pages_scanned,
            pages_skipped: self.stats.pages_skipped,
            merges: self.stats.merges,
            splits: self.stats.splits,
            frames_freed: self.stats.frames_freed,
            merge_mismatches: self.stats.mismatches,
            pages_skipped_vma_budget: self.stats.skipped_vma,
            ..Counters::default()
        };
        let mut merged = 0;
        for g in self.guests.iter().flatten() {
            merged += g.counts[st::MERGED as usize];
            c.zero_pages += g.counts[st::ZERO as usize];
            c.pages_unshared += g.counts[st::UNIQUE as usize];
            c.pages_volatile += g.counts[st::VOLATILE as usize];
            c.guests += 1;
            c.guests_failed += u64::from(g.failed);
        }
        for d in &self.domains {
            c.pages_shared += d.allocated;
            c.pool_frames += d.frames.len() as u64;
        }
        self.finish_counters(&mut c, merged);
        c
    }

    fn finish_counters(&self, c: &mut Counters, merged: u64) {
        c.pages_sharing = merged.saturating_sub(c.pages_shared);
        for d in &self.domains {
            for &head in d.stable.values() {
                let mut k = 0;
                let mut cur = head;
                while cur != NONE {
                    k += 1;
                    cur = d.frames[cur as usize].next;
                }
                if k > 1 {
                    c.stable_node_chains += 1;
                    c.stable_node_dups += k;
                }
            }
        }
        c.metadata_bytes = self.metadata_bytes() as u64;
        c.general_profit =
            ((c.pages_sharing + c.zero_pages) * PAGE_SIZE as u64) as i64 - c.metadata_bytes as i64;
    }

    /// The same counters recounted from the per-page and per-frame metadata (audits).
    pub fn recount(&self) -> Counters {
        let mut c = self.counters();
        let (mut merged, mut zero, mut uniq, mut vol) = (0, 0, 0, 0);
        for g in self.guests.iter().flatten() {
            for p in &g.pages {
                match p.state {
                    st::MERGED => merged += 1,
                    st::ZERO => zero += 1,
                    st::UNIQUE => uniq += 1,
                    st::VOLATILE => vol += 1,
                    _ => {}
                }
            }
        }
        c.zero_pages = zero;
        c.pages_unshared = uniq;
        c.pages_volatile = vol;
        c.pages_shared = self
            .domains
            .iter()
            .flat_map(|d| d.frames.iter())
            .filter(|f| f.refs > 0)
            .count() as u64;
        c.stable_node_chains = 0;
        c.stable_node_dups = 0;
        self.finish_counters(&mut c, merged);
        c
    }

    /// Counters of one guest, like `/proc/PID/ksm_stat`.
    pub fn guest_counters(&self, id: GuestId) -> Option<GuestCounters> {
        let slot = *self.ids.get(&id)? as usize;
        let g = self.guests[slot].as_ref()?;
        let merging = g.counts[st::MERGED as usize];
        let zero = g.counts[st::ZERO as usize];
        Some(GuestCounters {
            id,
            domain: g.domain,
            pages: g.pages.len() as u64,
            merging_pages: merging,
            zero_pages: zero,
            unshared_pages: g.counts[st::UNIQUE as usize],
            volatile_pages: g.counts[st::VOLATILE as usize],
            profit: ((merging + zero) * PAGE_SIZE as u64) as i64 - g.bytes() as i64,
            vma_mappings: g.vmas,
            vma_budget: g.budget,
            failed: g.failed,
        })
    }

    /// Counters of every guest.
    pub fn guests(&self) -> Vec<GuestCounters> {
        let mut ids: Vec<GuestId> = self.ids.keys().copied().collect();
        ids.sort();
        ids.into_iter()
            .filter_map(|id| self.guest_counters(id))
            .collect()
    }

    /// Bytes of the engine's own metadata (per-page records, indexes, frame records).
    pub fn metadata_bytes(&self) -> usize {
        std::mem::size_of::<Engine>()
            + self
                .guests
                .iter()
                .flatten()
                .map(Guest::bytes)
                .sum::<usize>()
            + self.domains.iter().map(Domain::bytes).sum::<usize>()
    }

    /// Pages tracked (all registered guests).
    pub fn tracked_pages(&self) -> u64 {
        self.guests
            .iter()
            .flatten()
            .map(|g| g.pages.len() as u64)
            .sum()
    }

    /// What the engine knows about one page.
    pub fn page_info(&self, id: GuestId, gfn: Gfn) -> Option<PageInfo> {
        let g = self.guests[*self.ids.get(&id)? as usize].as_ref()?;
        let p = g.pages.get(gfn as usize)?;
        let state = match p.state {
            st::UNSCANNED => PageState::Unscanned,
            st::VOLATILE => PageState::Volatile,
            st::UNIQUE => PageState::Unique,
            st::MERGED => PageState::Merged,
            st::ZERO => PageState::Zero,
            _ => PageState::Deferred,
        };
        Some(PageInfo {
            state,
            mapping: (p.map != ANON).then(|| p.map - 1),
            hash: p.hash,
        })
    }

    /// Frames in use: (domain, frame, sharers).
    pub fn frames(&self) -> Vec<(DomainId, FrameId, u32)> {
        self.domains
            .iter()
            .flat_map(|d| {
                d.frames
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| f.state != fs::FREE)
                    .map(move |(i, f)| (d.id, i as FrameId, f.refs))
            })
            .collect()
    }

    /// Checks the engine's internal invariants; describes the first one broken.
    pub fn audit(&self) -> Result<(), String> {
        let mut refs: Vec<Vec<u32>> = self
            .domains
            .iter()
            .map(|d| vec![0; d.frames.len()])
            .collect();
        for (slot, g) in self.guests.iter().enumerate() {
            let Some(g) = g else { continue };
            let mut counts = [0u64; st::N];
            for (gfn, p) in g.pages.iter().enumerate() {
                counts[p.state as usize] += 1;
                if p.state == st::PENDING {
                    return Err(format!("{} gfn {gfn} left pending", g.id));
                }
                if p.state == st::MERGED {
                    if p.map == ANON {
                        return Err(format!("{} gfn {gfn} merged but anonymous", g.id));
                    }
                    let f = (p.map - 1) as usize;
                    if f >= refs[g.dom].len() || self.domains[g.dom].frames[f].state == fs::FREE {
                        return Err(format!("{} gfn {gfn} merged onto free frame {f}", g.id));
                    }
                    refs[g.dom][f] += 1;
                }
                if p.state == st::ZERO && p.map != ANON {
                    return Err(format!("{} gfn {gfn} zero under a pool mapping", g.id));
                }
                let r = PageRef {
                    slot: slot as u32,
                    gfn: gfn as u32,
                };
                let in_table = self.domains[g.dom].unstable.contains(p.hash, r);
                if in_table != (p.state == st::UNIQUE) {
                    return Err(format!(
                        "{} gfn {gfn}: state {} but in unstable set: {in_table}",
                        g.id, p.state
                    ));
                }
                if p.state == st::UNIQUE && g.failed {
                    return Err(format!("{} failed but has candidates", g.id));
                }
            }
            if counts != g.counts {
                return Err(format!(
                    "{} state counts {:?} != {:?}",
                    g.id, g.counts, counts
                ));
            }
            let v = vma_count(g.pages.iter().map(|p| p.map));
            if v != g.vmas {
                return Err(format!("{} vmas {} != recount {v}", g.id, g.vmas));
            }
        }
        for (di, d) in self.domains.iter().enumerate() {
            let mut nfree = 0;
            let mut alloc = 0;
            for (f, fr) in d.frames.iter().enumerate() {
                match fr.state {
                    fs::FREE => nfree += 1,
                    fs::LIVE | fs::ORPHAN => alloc += 1,
                    s => return Err(format!("frame {f} left in state {s}")),
                }
                if fr.state != fs::FREE && fr.refs != refs[di][f] {
                    return Err(format!(
                        "domain {} frame {f}: refs {} but {} pages merged onto it",
                        d.id.0, fr.refs, refs[di][f]
                    ));
                }
                if fr.state != fs::FREE && fr.refs == 0 {
                    return Err(format!(
                        "domain {} frame {f} allocated with no sharers",
                        d.id.0
                    ));
                }
                if fr.state == fs::LIVE {
                    let mut cur = d.stable.get(&fr.hash).copied().unwrap_or(NONE);
                    let mut found = false;
                    while cur != NONE {
                        found |= cur as usize == f;
                        cur = d.frames[cur as usize].next;
                    }
                    if !found {
                        return Err(format!("live frame {f} missing from the stable index"));
                    }
                }
            }
            if nfree != d.nfree as usize || alloc != d.allocated as usize {
                return Err(format!("domain {} free/alloc counts wrong", d.id.0));
            }
            if d.unstable.len() != d.unstable.entries().count() {
                return Err("unstable set length wrong".into());
            }
            for r in d.unstable.entries() {
                match &self.guests[r.slot as usize] {
                    Some(g) if g.dom == di => {}
                    _ => return Err(format!("unstable entry {r:?} from another domain or gone")),
                }
            }
        }
        Ok(())
    }
}
