//! The engine: decides what to digest, merge, reclaim and free; the host does the page work.
//!
//! The algorithm, its invariants and the life of a page are described once, in the crate
//! doc (`src/lib.rs`); each step function below names the transition of that life it
//! implements. One file per concern:
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`Engine`], its public types, registering and removing guests, knobs |
//! | `pages.rs` | per-page metadata (`PageSt`, `PageMeta`), guests, VMA accounting |
//! | `frames.rs` | pool frames (`FrameSt`, refcounts, free list) and the stable set |
//! | `scan.rs` | the scan cursor and rounds: which pages are digested, dirty passes |
//! | `classify.rs` | what a digest means for a page: KSM's `cmp_and_merge_page` |
//! | `plan.rs` | which merges fit each guest's VMA budget |
//! | `execute.rs` | the host calls of a batch and what their results do |
//! | `report.rs` | counters, per-guest counters, page and frame listings |
//! | `audit.rs` | [`Engine::audit`]: every internal invariant rechecked from scratch |

mod audit;
mod classify;
mod concurrent;
mod execute;
mod frames;
mod pages;
mod plan;
mod report;
mod scan;

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use tracing::debug;

use crate::counters::RoundReport;
use crate::host::{DomainId, FrameId, Gfn, GuestId, HostError, MergeHost, PageDigest};
use crate::knobs::{Advisor, KnobError, Knobs, KnobsUpdate, RunMode, MAX_PAGES_TO_SCAN};

use crate::keyed::HashKey;
pub use audit::AuditError;
use frames::Domains;
use pages::{Guest, PageMeta, PageSt};

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

/// Cumulative event counts (the counters that are not recounted from metadata).
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

impl Cumulative {
    /// A page was merged (and the host said so).
    fn count_merge(&mut self, rep: &mut RoundReport) {
        self.merges += 1;
        rep.merges += 1;
    }

    /// A merge or remap was not done for lack of VMA budget.
    fn count_vma_skip(&mut self, rep: &mut RoundReport) {
        self.skipped_vma += 1;
        rep.skipped_vma_budget += 1;
    }
}

/// Guest slots (`None`: vacant, reusable). A slot number is stable while its guest is
/// registered; a guest leaves its slot only through [`Engine::remove_guest`] or
/// [`Engine::unmerge_guest`], never during a scan round, and a failed guest keeps it.
#[derive(Default)]
struct Slots(Vec<Option<Guest>>);

impl Deref for Slots {
    type Target = Vec<Option<Guest>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Slots {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Slots {
    /// The guest in `slot`, which must be registered. The engine only holds slot numbers
    /// of registered guests: the cursor's slot once checked, a page's slot while the page
    /// is in the unstable set or a batch's plan (both are emptied of a guest's pages
    /// before it leaves its slot). A vacant slot here is an engine bug, hence the panic.
    #[track_caller]
    fn live(&self, slot: usize) -> &Guest {
        self.0[slot].as_ref().expect("live slot")
    }

    /// [`Slots::live`], mutable.
    #[track_caller]
    fn live_mut(&mut self, slot: usize) -> &mut Guest {
        self.0[slot].as_mut().expect("live slot")
    }
}

/// The merge engine: KSM's scanner, stable and unstable sets, frame pool bookkeeping and
/// counters. No I/O, no threads: page work goes through a [`MergeHost`].
pub struct Engine {
    knobs: Knobs,
    guests: Slots,
    ids: HashMap<GuestId, u32>,
    domains: Domains,
    /// The secret key of every index keyed by agent-reported hashes.
    hash_key: HashKey,
    cursor_slot: usize,
    cursor_gfn: usize,
    stats: Cumulative,
    ns_per_page: f64,
    digests: Vec<PageDigest>,
    dirty: Vec<(Gfn, PageDigest)>,
    /// Concurrent rounds: the digests started and not yet processed, by guest.
    inflight: HashMap<GuestId, concurrent::Visit>,
    /// Concurrent rounds run so far.
    rounds: u64,
    /// Digests started so far (each one's ticket).
    tickets: u64,
}

impl Engine {
    /// A new engine with `knobs` (validated) and no guests; its indexes are keyed by a
    /// random secret ([`HashKey::random`]), so agents cannot aim their reported hashes at
    /// one bucket.
    pub fn new(knobs: Knobs) -> Result<Self, KnobError> {
        Self::with_hash_key(knobs, HashKey::random())
    }

    /// [`Engine::new`] with the given index key: [`HashKey::fixed`] makes a simulation
    /// replay exactly (the order in which equal-hash candidates are found depends on the
    /// key).
    pub fn with_hash_key(knobs: Knobs, hash_key: HashKey) -> Result<Self, KnobError> {
        knobs.validate()?;
        Ok(Engine {
            knobs,
            guests: Slots::default(),
            ids: HashMap::new(),
            domains: Domains::default(),
            hash_key,
            cursor_slot: 0,
            cursor_gfn: 0,
            stats: Cumulative::default(),
            ns_per_page: 0.0,
            digests: Vec::new(),
            dirty: Vec::new(),
            inflight: HashMap::new(),
            rounds: 0,
            tickets: 0,
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
        let dom = self.domains.slot_for(spec.domain, self.hash_key);
        let mut counts = [0; PageSt::N];
        counts[PageSt::Unscanned as usize] = spec.pages;
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
            refused_in_pass: false,
            pos: 0,
            parked: false,
            defer_backoff: 0,
            defer_hold: 0,
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
    /// drops its references; frames left without sharers are freed through the host. When
    /// it was its domain's last guest, the domain's state (frames, stable and unstable
    /// set) is dropped too: the host may close the domain's pool, and a later guest of the
    /// same domain starts afresh.
    pub fn remove_guest(
        &mut self,
        id: GuestId,
        host: &mut impl MergeHost,
    ) -> Result<(), EngineError> {
        let slot = self.slot_of(id)?;
        let di = self.guests.live(slot).dom;
        let to_free = self.drop_guest_refs(slot);
        self.guests[slot] = None;
        self.ids.remove(&id);
        self.inflight.remove(&id);
        if self.cursor_slot == slot {
            self.cursor_gfn = 0;
        }
        self.free_frames(di, to_free, host);
        if !self.guests.iter().flatten().any(|g| g.dom == di) {
            debug!(
                domain = self.domains[di].id.0,
                "last guest left; domain dropped"
            );
            self.domains.drop_slot(di);
        }
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
            .map_or(0, |g| g.counts[PageSt::Merged as usize]);
        if left > 0 {
            return Err(EngineError::StillMerged(id, left));
        }
        self.remove_guest(id, host)
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
}
