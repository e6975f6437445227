//! Frames and the stable set: each domain's pool frames (states, refcounts, free list and
//! allocation in scan order) and the stable index (content hash -> chain of frames, KSM's
//! `stable_node_chain`). Invariants 1 and 4 of the crate doc live here: a frame is freed
//! (punched) only when its last counted sharer is gone.

use std::collections::HashMap;

use tracing::warn;

use super::{Engine, PageSt, Slots};
use crate::host::{DomainId, MergeHost};
use crate::index::{PageRef, UnstableTable};
use crate::keyed::{HashKey, KeyedBuild};

/// End of a stable chain.
pub(super) const NONE: u32 = u32::MAX;

/// A pool frame's state; one byte of [`FrameMeta`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FrameSt {
    /// Not allocated.
    Free,
    /// Allocated in this batch, populate planned.
    Pending,
    /// Populated, in the stable index.
    Live,
    /// Held by a failed guest whose populate outcome is unknown; not in the index.
    Orphan,
    /// Allocated in this batch, never populated; released without a host call.
    Cancelled,
    /// Populated but not mapped; must be punched.
    Doomed,
}

impl FrameSt {
    /// A page may join a frame in this state (it holds, or is about to hold, its content).
    fn joinable(self) -> bool {
        match self {
            FrameSt::Live | FrameSt::Pending => true,
            FrameSt::Free | FrameSt::Orphan | FrameSt::Cancelled | FrameSt::Doomed => false,
        }
    }

    /// A frame in this state with no sharers left is punched through the host.
    fn punchable(self) -> bool {
        match self {
            FrameSt::Live | FrameSt::Orphan | FrameSt::Doomed => true,
            FrameSt::Free | FrameSt::Pending | FrameSt::Cancelled => false,
        }
    }
}

/// Per pool frame: 24 bytes.
#[derive(Clone, Copy)]
pub(super) struct FrameMeta {
    pub(super) hash: u64,
    /// Pages that map it (merged pages, planned joins included during a batch).
    pub(super) refs: u32,
    /// Next frame with the same hash in the stable index (a chain).
    pub(super) next: u32,
    pub(super) state: FrameSt,
}

const _: () = assert!(std::mem::size_of::<FrameMeta>() == 24);

const FREE_FRAME: FrameMeta = FrameMeta {
    hash: 0,
    refs: 0,
    next: NONE,
    state: FrameSt::Free,
};

/// A share group: its pool, stable set and unstable set. Nothing is shared across domains.
pub(super) struct Domain {
    pub(super) id: DomainId,
    /// The stable set: hash -> first frame of its chain (placed by the keyed hash).
    pub(super) stable: HashMap<u64, u32, KeyedBuild>,
    /// Pool frames; `len()` is the pool's high-water mark.
    pub(super) frames: Vec<FrameMeta>,
    pub(super) nfree: u32,
    pub(super) allocated: u64,
    cursor: u32,
    /// The unstable set.
    pub(super) unstable: UnstableTable,
}

impl Domain {
    /// An empty domain whose indexes place their keys under `key`.
    pub(super) fn new(id: DomainId, key: HashKey) -> Self {
        Domain {
            id,
            stable: HashMap::with_hasher(KeyedBuild(key)),
            frames: Vec::new(),
            nfree: 0,
            allocated: 0,
            cursor: 0,
            unstable: UnstableTable::new(key),
        }
    }

    /// Allocates a frame: `pref` if free (extends the previous page's run), else a fresh
    /// one at the end of the pool, or a freed one when many are free.
    pub(super) fn alloc(&mut self, pref: Option<u32>) -> u32 {
        let n = self.frames.len() as u32;
        let f = match pref {
            Some(p) if p < n && self.frames[p as usize].state == FrameSt::Free => Some(p),
            _ => None,
        };
        let f = f.or_else(|| {
            if u64::from(self.nfree) * 4 > u64::from(n) {
                (0..n)
                    .map(|k| (self.cursor + k) % n)
                    .find(|&i| self.frames[i as usize].state == FrameSt::Free)
            } else {
                None
            }
        });
        self.allocated += 1;
        match f {
            Some(f) => {
                self.nfree -= 1;
                self.cursor = f + 1;
                self.frames[f as usize].state = FrameSt::Pending;
                f
            }
            None => {
                self.frames.push(FrameMeta {
                    state: FrameSt::Pending,
                    ..FREE_FRAME
                });
                n
            }
        }
    }

    /// Returns a frame to the free list (its sharers are gone, it was punched or never
    /// populated).
    pub(super) fn release(&mut self, f: u32) {
        debug_assert_ne!(self.frames[f as usize].state, FrameSt::Free);
        self.frames[f as usize] = FREE_FRAME;
        self.nfree += 1;
        self.allocated -= 1;
    }

    /// Drops one sharer's reference to frame `f`; when none is left, queues `f` on
    /// `to_free`, which [`Engine::free_frames`] punches and releases at the end of the
    /// operation (the one place a frame is freed: invariants 1 and 4).
    pub(super) fn release_frame_ref(&mut self, f: u32, to_free: &mut Vec<u32>) {
        let fr = &mut self.frames[f as usize];
        fr.refs -= 1;
        if fr.refs == 0 {
            to_free.push(f);
        }
    }

    /// Takes frame `f` out of the stable index so that nobody joins it any more, and gives
    /// it `state` and `refs` (a cancelled, orphaned or doomed frame).
    pub(super) fn unlist(&mut self, f: u32, state: FrameSt, refs: u32) {
        self.stable_remove(f);
        let fr = &mut self.frames[f as usize];
        fr.state = state;
        fr.refs = refs;
    }

    /// Puts frame `f` at the head of its hash's chain.
    pub(super) fn stable_insert(&mut self, f: u32) {
        let h = self.frames[f as usize].hash;
        let head = self.stable.insert(h, f).unwrap_or(NONE);
        self.frames[f as usize].next = head;
    }

    /// Unlinks frame `f` from its hash's chain (if it is in it).
    pub(super) fn stable_remove(&mut self, f: u32) {
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

    /// The frames of hash `h`'s chain, head first.
    pub(super) fn chain(&self, h: u64) -> impl Iterator<Item = u32> + '_ {
        self.chain_from(self.stable.get(&h).copied().unwrap_or(NONE))
    }

    /// The frames of the chain that starts at `head`.
    pub(super) fn chain_from(&self, head: u32) -> impl Iterator<Item = u32> + '_ {
        let link = |f: u32| (f != NONE).then_some(f);
        std::iter::successors(link(head), move |&f| link(self.frames[f as usize].next))
    }

    /// A frame of content `h` with room for another sharer.
    pub(super) fn stable_find(&self, h: u64, max: u32) -> Option<u32> {
        self.chain(h).find(|&f| {
            let fr = &self.frames[f as usize];
            fr.state.joinable() && fr.refs < max
        })
    }

    /// Removes a candidate page from the unstable set.
    pub(super) fn forget_candidate(&mut self, hash: u64, slot: usize, gfn: usize) {
        self.unstable.remove(
            hash,
            PageRef {
                slot: slot as u32,
                gfn: gfn as u32,
            },
        );
    }

    pub(super) fn bytes(&self) -> usize {
        std::mem::size_of::<Domain>()
            + self.frames.capacity() * std::mem::size_of::<FrameMeta>()
            + self.stable.capacity() * 17
            + self.unstable.bytes()
    }
}

/// The domains that have guests, in reusable slots (a guest keeps its domain's slot
/// number while it is registered). A domain whose last guest leaves is dropped whole —
/// frames, stable and unstable set — so share groups that come and go (a loop of new
/// group names) leave nothing behind.
#[derive(Default)]
pub(super) struct Domains {
    slots: Vec<Option<Domain>>,
    ids: HashMap<DomainId, usize>,
}

impl Domains {
    /// The slot of domain `id`, created empty (under `key`) if it has none.
    pub(super) fn slot_for(&mut self, id: DomainId, key: HashKey) -> usize {
        if let Some(&di) = self.ids.get(&id) {
            return di;
        }
        let dom = Some(Domain::new(id, key));
        let di = match self.slots.iter().position(Option::is_none) {
            Some(di) => {
                self.slots[di] = dom;
                di
            }
            None => {
                self.slots.push(dom);
                self.slots.len() - 1
            }
        };
        self.ids.insert(id, di);
        di
    }

    /// Drops the domain in slot `di` (its last guest left).
    pub(super) fn drop_slot(&mut self, di: usize) {
        if let Some(d) = self.slots[di].take() {
            self.ids.remove(&d.id);
        }
    }

    /// Every domain.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Domain> + '_ {
        self.slots.iter().flatten()
    }

    /// Every slot, vacant ones as `None` (for audits indexed by slot).
    pub(super) fn slots(&self) -> &[Option<Domain>] {
        &self.slots
    }

    /// Domains held.
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }
}

impl std::ops::Index<usize> for Domains {
    type Output = Domain;
    /// The domain in slot `di`, which a registered guest's `dom` names: a vacant slot here
    /// is an engine bug, hence the panic.
    #[track_caller]
    fn index(&self, di: usize) -> &Domain {
        self.slots[di].as_ref().expect("live domain")
    }
}

impl std::ops::IndexMut<usize> for Domains {
    #[track_caller]
    fn index_mut(&mut self, di: usize) -> &mut Domain {
        self.slots[di].as_mut().expect("live domain")
    }
}

impl Engine {
    /// Frees frames with no sharers (live, orphaned or doomed) through the host: punched,
    /// then back on the free list.
    pub(super) fn free_frames(
        &mut self,
        di: usize,
        mut frames: Vec<u32>,
        host: &mut impl MergeHost,
    ) {
        let dom = &mut self.domains[di];
        frames.sort_unstable();
        frames.dedup();
        frames.retain(|&f| {
            let fr = dom.frames[f as usize];
            fr.refs == 0 && fr.state.punchable()
        });
        if frames.is_empty() {
            return;
        }
        for &f in &frames {
            if dom.frames[f as usize].state == FrameSt::Live {
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

    /// Drops the references of every merged page of guest `slot` and forgets its
    /// candidates; returns the frames left without sharers (for [`Engine::free_frames`]).
    pub(super) fn drop_guest_refs(&mut self, slot: usize) -> Vec<u32> {
        let g = self.guests.live(slot);
        let dom = &mut self.domains[g.dom];
        let mut to_free = Vec::new();
        for (gfn, p) in g.pages.iter().enumerate() {
            match p.state {
                PageSt::Unique => dom.forget_candidate(p.hash, slot, gfn),
                PageSt::Merged => dom.release_frame_ref(p.map - 1, &mut to_free),
                PageSt::Unscanned
                | PageSt::Volatile
                | PageSt::Zero
                | PageSt::Deferred
                | PageSt::Pending => {}
            }
        }
        to_free
    }
}

/// Inserts page `r` into its domain's unstable set, keyed by its recorded hash.
pub(super) fn tab_insert(guests: &Slots, dom: &mut Domain, r: PageRef) {
    let hash_of = |x: PageRef| {
        guests[x.slot as usize]
            .as_ref()
            .map_or(0, |g| g.pages[x.gfn as usize].hash)
    };
    dom.unstable.insert(hash_of(r), r, hash_of);
}

/// Makes page `r` a candidate (-> candidate: into the unstable set), or volatile if its
/// guest failed (a failed guest has no candidates).
pub(super) fn to_unique(guests: &mut Slots, domains: &mut Domains, r: PageRef) {
    let g = guests.live_mut(r.slot as usize);
    if g.failed {
        g.set_state(r.gfn as usize, PageSt::Volatile);
        return;
    }
    g.set_state(r.gfn as usize, PageSt::Unique);
    let dom = g.dom;
    tab_insert(guests, &mut domains[dom], r);
}
