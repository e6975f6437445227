//! Per-page metadata and guests: the page states of "the life of a page" (crate doc), each
//! guest's per-state counts, and the VMA accounting of a guest's merged layout.

use super::PageState;
use crate::host::{DomainId, GuestId, PageDigest};

/// A visited page and its digest.
pub(super) struct Seen {
    pub(super) gfn: u32,
    pub(super) d: PageDigest,
}

/// `PageMeta::map`: 0 = anonymous memory, `f + 1` = mapped onto pool frame `f`.
pub(super) const ANON: u32 = 0;

/// `PageMeta::flags`: the last digest said the page is all zeros.
pub(super) const F_ZERO: u8 = 1;
/// `PageMeta::flags`: the page is on its guest's `watch` list.
pub(super) const F_WATCH: u8 = 2;

/// Where a page is in its life (crate doc, "The life of a page"); one byte of [`PageMeta`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum PageSt {
    /// Never digested.
    #[default]
    Unscanned = 0,
    /// Changed since its previous visit (KSM's checksum rule): not a candidate.
    Volatile = 1,
    /// A candidate: unchanged since its previous visit, in the unstable set.
    Unique = 2,
    /// Maps a frame, counted in the frame's `refs`.
    Merged = 3,
    /// All zeros, dropped by the host; no frame.
    Zero = 4,
    /// Would merge (or be remapped), but its guest's VMA budget did not allow it.
    Deferred = 5,
    /// Planned in the current batch (merge, join or zero); never seen between calls.
    Pending = 6,
}

impl PageSt {
    /// Number of states (the length of [`Guest::counts`]).
    pub(super) const N: usize = 7;

    /// Volatile and deferred pages of a dirty-source guest are watched: promoted to
    /// candidates without a rehash once a dirty pass shows them unwritten.
    pub(super) fn watched(self) -> bool {
        match self {
            PageSt::Volatile | PageSt::Deferred => true,
            PageSt::Unscanned
            | PageSt::Unique
            | PageSt::Merged
            | PageSt::Zero
            | PageSt::Pending => false,
        }
    }
}

impl From<PageSt> for PageState {
    fn from(s: PageSt) -> Self {
        match s {
            PageSt::Unscanned => PageState::Unscanned,
            PageSt::Volatile => PageState::Volatile,
            PageSt::Unique => PageState::Unique,
            PageSt::Merged => PageState::Merged,
            PageSt::Zero => PageState::Zero,
            // Pending only exists inside a batch; callers never observe it.
            PageSt::Deferred | PageSt::Pending => PageState::Deferred,
        }
    }
}

/// Per guest page: 16 bytes.
#[derive(Clone, Copy, Default)]
pub(super) struct PageMeta {
    /// Hash at the last digest (the checksum of KSM's volatility rule and the index key).
    pub(super) hash: u64,
    /// The page's mapping (layout): `ANON` or frame + 1. Stays the frame after a split.
    pub(super) map: u32,
    pub(super) state: PageSt,
    /// Consecutive visits that did not merge (smart scan).
    pub(super) fails: u8,
    /// `F_ZERO`, `F_WATCH`.
    pub(super) flags: u8,
    /// The guest's dirty pass in which the page was last digested.
    pub(super) pass: u8,
}

// The README's and the bench's metadata figures rest on this (16 bytes a page, well under
// the 32 bytes per tracked page that `metadata_per_page_within_32_bytes` asserts overall).
const _: () = assert!(std::mem::size_of::<PageMeta>() == 16);

impl PageMeta {
    /// The frame this page's mapping points at, if any.
    pub(super) fn frame(&self) -> Option<u32> {
        (self.map != ANON).then(|| self.map - 1)
    }

    /// Counts one more visit that did not merge (smart scan).
    pub(super) fn failed_visit(&mut self) {
        self.fails = self.fails.saturating_add(1);
    }
}

/// A registered guest: its pages, VMA budget and dirty-pass state.
pub(super) struct Guest {
    pub(super) id: GuestId,
    pub(super) domain: DomainId,
    /// Index of its domain in `Engine::domains`.
    pub(super) dom: usize,
    pub(super) pages: Vec<PageMeta>,
    pub(super) budget: u32,
    pub(super) vmas: u32,
    pub(super) dirty_source: bool,
    pub(super) first_pass_done: bool,
    pub(super) in_pass: bool,
    pub(super) failed: bool,
    /// Dirty-source guests: pages not yet candidates (volatile, deferred), re-tried
    /// without rehashing once the dirty source says they stayed unchanged.
    pub(super) watch: Vec<u32>,
    pub(super) pass: u8,
    /// Pages per state, kept incrementally by [`Guest::set_state`].
    pub(super) counts: [u64; PageSt::N],
    /// VMA-budget back-off (the scanner must not spin on pages it cannot map): set when a
    /// merge of this guest is refused for lack of VMA budget during a pass.
    pub(super) refused_in_pass: bool,
    /// Concurrent rounds: where the guest's next range visit starts (each guest keeps its
    /// own place, as several are visited at once).
    pub(super) pos: usize,
    /// Concurrent rounds: its pass of the current full scan is done; it waits for the
    /// others before the next.
    pub(super) parked: bool,
    /// Consecutive refusing passes, at most [`MAX_DEFER_BACKOFF`].
    pub(super) defer_backoff: u8,
    /// Passes its deferred pages still sit out (2^backoff - 1 after a refusing pass).
    pub(super) defer_hold: u8,
}

/// Deferred pages sit out at most 2^7 - 1 passes after a pass in which merges were refused
/// for lack of VMA budget, like smart scan's skipping of pages that keep failing.
pub(super) const MAX_DEFER_BACKOFF: u8 = 7;

impl Guest {
    /// Moves a page to state `s`, keeping the counts and the watch list.
    pub(super) fn set_state(&mut self, gfn: usize, s: PageSt) {
        let p = &mut self.pages[gfn];
        self.counts[p.state as usize] -= 1;
        self.counts[s as usize] += 1;
        p.state = s;
        if self.dirty_source && s.watched() && p.flags & F_WATCH == 0 {
            p.flags |= F_WATCH;
            self.watch.push(gfn as u32);
        }
    }

    /// The host mapped frame `f` over the page: merged.
    pub(super) fn mark_merged(&mut self, gfn: usize, f: u32) {
        apply_map(self, gfn, f + 1);
        self.set_state(gfn, PageSt::Merged);
    }

    /// Whether deferred pages sit out this pass (VMA-budget back-off).
    pub(super) fn holds_deferred(&self) -> bool {
        self.defer_hold > 0
    }

    /// The end of a pass over the guest (deferred -> deferred, held): after a pass that
    /// refused merges for lack of VMA budget, its deferred pages sit out 1, 3, 7, ...,
    /// 127 passes (doubling with each refusing pass) instead of being planned and refused
    /// again every pass; a pass that refused nothing resets the back-off. Pages the guest
    /// writes are digested as usual meanwhile.
    pub(super) fn end_pass_backoff(&mut self) {
        if self.defer_hold > 0 {
            self.defer_hold -= 1;
        } else if self.refused_in_pass {
            self.defer_backoff = (self.defer_backoff + 1).min(MAX_DEFER_BACKOFF);
            self.defer_hold = (1u8 << self.defer_backoff) - 1;
        } else {
            self.defer_backoff = 0;
        }
        self.refused_in_pass = false;
    }

    pub(super) fn bytes(&self) -> usize {
        std::mem::size_of::<Guest>()
            + self.pages.capacity() * std::mem::size_of::<PageMeta>()
            + self.watch.capacity() * 4
    }
}

/// 1 if mappings `a` and `b` of neighbouring pages need two VMAs, else 0.
pub(super) fn brk(a: u32, b: u32) -> i64 {
    let joined = (a == ANON && b == ANON) || (a != ANON && b != ANON && b == a + 1);
    i64::from(!joined)
}

/// Mappings (VMAs) used by a layout: one plus the boundaries between pages that do not
/// coalesce (anonymous next to anonymous, frame f next to frame f + 1 coalesce).
pub(super) fn vma_count(maps: impl Iterator<Item = u32>) -> u32 {
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

/// Change in a layout's VMA count when page `gfn` of `len` pages, whose mappings `map_of`
/// gives, is remapped to `new`.
pub(super) fn remap_delta(len: usize, gfn: usize, new: u32, map_of: impl Fn(usize) -> u32) -> i64 {
    let old = map_of(gfn);
    let mut d = 0;
    if gfn > 0 {
        let l = map_of(gfn - 1);
        d += brk(l, new) - brk(l, old);
    }
    if gfn + 1 < len {
        let r = map_of(gfn + 1);
        d += brk(new, r) - brk(old, r);
    }
    d
}

/// Maps a page (after the host did it) and keeps the guest's VMA count exact.
pub(super) fn apply_map(g: &mut Guest, gfn: usize, new: u32) {
    let d = remap_delta(g.pages.len(), gfn, new, |i| g.pages[i].map);
    g.pages[gfn].map = new;
    g.vmas = (i64::from(g.vmas) + d) as u32;
}
