//! tinyvmm-merge: merging identical guest pages across VMs, done by the VMM.
//!
//! This is the 2009 KSM algorithm (Linux `mm/ksm.c`) moved out of the kernel. The engine
//! ([`Engine`]) holds the content indexes, the frame refcounts, the scan cursor and the
//! counters; it does no I/O. The page work on a guest's RAM is done by that guest's
//! *agent* inside its VM process, reached through the [`MergeHost`] trait: every call is
//! one batched round trip (digest many pages, merge many runs, reclaim many zero pages).
//! [`sim`] is a simulated fleet that implements the same trait with real bytes.
//!
//! # The algorithm
//!
//! A guest registers its RAM (like `madvise(MADV_MERGEABLE)`). Scan rounds visit
//! `pages_to_scan` pages per wake-up, guests in turn from a cursor (ksmd's mm slots); with a
//! [`ConcurrentHost`], digests run on every guest at once and each guest keeps its own place
//! within the full scan ([`Engine::scan_round_concurrent`]). Each
//! visited page is *digested* by the host: a 64-bit content hash (xxh3), whether it is
//! zero, whether it was split, and (with a dirty-page source) whether it was written.
//!
//! * The **stable set** holds the *frames*: pages of a per-domain pool memfd, populated
//!   once from a guest page and then mapped copy-on-write into every guest page that has
//!   the same content. It is looked up by content hash; a hash with several frames (a
//!   collision, or `max_page_sharing` reached) forms a chain, like KSM's
//!   `stable_node_chain`.
//! * The **unstable set** holds *candidates*: pages seen unchanged since their previous
//!   visit and not yet matched. When a visited page finds a candidate with the same hash,
//!   a new frame is populated from the candidate and the visited page joins it. KSM
//!   empties its unstable tree every full scan because the tree is ordered by page
//!   contents that change under it, which corrupts it. Ours is a hash table keyed by the
//!   hash recorded at the visit, so a page changing cannot corrupt it: an entry is removed
//!   when its page is next seen changed, and a stale entry meanwhile costs one failed byte
//!   compare, never a wrong merge.
//! * **Hashes only find candidates and filter volatile pages.** A page whose hash changed
//!   since its last visit is *volatile* and is not a candidate (KSM's checksum rule). With
//!   a dirty-page source the engine knows which pages were written, so pages not written
//!   since their last visit are not rehashed at all and a converged idle fleet costs about
//!   nothing; and the very first pass can already merge pages the dirty source reports
//!   untouched.
//! * **Zero pages** get no frame: the host drops them (`MADV_DONTNEED`), they read zeros.
//! * **Frames are allocated in scan order** (the frame after the previous page's frame
//!   when possible), so identical guests end up with runs of consecutive pages on
//!   consecutive frames, which the host maps as one VMA each. Every guest has a **VMA
//!   budget**: the engine tracks the mappings its merged layout needs and never plans a
//!   merge beyond it, preferring merges that extend runs and long runs when it runs low.
//! * **Share groups**: each guest is in a domain; each domain has its own pool and its own
//!   indexes, so nothing is ever shared across domains. A domain's state is dropped with
//!   its last guest.
//! * **Agents may lie**, so the indexes never trust where a reported hash would put itself:
//!   every key is placed by a secret-keyed hash ([`HashKey`], SipHash-1-3 under a random
//!   key per engine), and a new frame is indexed under the hash the host reports for the
//!   bytes it wrote into it (the daemon hashes them itself).
//! * **Smart scan**: pages that keep failing to merge are visited less and less often.
//!
//! # Invariants
//!
//! 1. **A frame is never written while any page maps it.** It is written once, by
//!    `Populate`, while it is fresh; mapped pages are `MAP_PRIVATE`, so a guest write
//!    copies (COW). A frame is reused only after its last sharer is gone and it was
//!    punched.
//! 2. **A page is merged only after a byte compare under write protection** (`Join`), or
//!    by copying it into a fresh frame under write protection (`Populate`). A hash match
//!    alone never merges anything; a collision ends in a mismatch.
//! 3. **A split never loses a write.** A guest write to a merged page either lands before
//!    the compare (mismatch: the page stays private) or after the map (the kernel COWs it:
//!    the write goes to the guest's private copy). The engine then only drops the
//!    sharer's reference, and frees the frame when no sharer is left.
//! 4. **No page reads a frame the engine does not count.** Refcounts equal the pages the
//!    engine believes merged; a host failure with an unknown outcome counts the page as
//!    merged, so its frame is not freed under it. A page under a pool mapping is never
//!    dropped with `MADV_DONTNEED` (it would read the pool again); it is remapped
//!    anonymous instead.
//! 5. **No cross-domain sharing**: indexes and pools are per domain.
//! 6. **Every guest stays within its VMA budget.**
//!
//! # The life of a page
//!
//! ```text
//!  unscanned --digest--> volatile --unchanged at next visit (or dirty source: not written)-->
//!  candidate (unstable set) --twin found, compared equal--> merged (maps a frame)
//!  merged --guest write, kernel COW--> split --> volatile --> ...
//!  candidate/volatile, all zero and unchanged --> zero (dropped, no frame)
//!  would merge but no VMA budget --> deferred (retried later)
//! ```
//!
//! `run = 2` gives every merged page a private anonymous copy again and forgets all
//! state; removing a guest drops its references.
//!
//! # Example
//!
//! Two identical guests on the simulated fleet converge onto one set of frames:
//!
//! ```
//! use tinyvmm_merge::sim::{xxh3, SimFleet, SimGuestSpec};
//! use tinyvmm_merge::{DomainId, Engine, GuestId, GuestSpec, Knobs};
//!
//! let mut host = SimFleet::new(xxh3, false);
//! let mut engine = Engine::new(Knobs::default()).unwrap();
//! for id in [GuestId(1), GuestId(2)] {
//!     let (pages, domain, vma_budget) = (64, DomainId(0), 1000);
//!     host.add_guest(SimGuestSpec { id, pages, domain, vma_limit: vma_budget, dirty_source: false });
//!     for gfn in 0..pages {
//!         host.fill(id, gfn, gfn + 1); // same content in both guests
//!     }
//!     engine
//!         .add_guest(GuestSpec { id, pages, domain, vma_budget, has_dirty_source: false })
//!         .unwrap();
//! }
//! for _ in 0..3 {
//!     engine.scan_round(&mut host); // the daemon sleeps engine.sleep() in between
//! }
//! let c = engine.counters();
//! assert_eq!((c.pages_shared, c.pages_sharing), (64, 64));
//! ```

pub mod counters;
mod engine;
pub mod host;
mod index;
mod keyed;
pub mod knobs;
#[cfg(feature = "sim")]
pub mod sim;

pub use counters::{Counters, GuestCounters, RoundReport};
pub use engine::{AuditError, Engine, EngineError, GuestSpec, PageInfo, PageState};
pub use host::{
    ConcurrentHost, DigestDone, DigestReply, DigestRequest, DomainId, FrameId, Gfn, GuestId,
    HostError, MergeHost, MergeOp, MergeOutcome, MergeResult, OpKind, PageDigest, PageRun,
    UnmergeOutcome, ZeroOutcome, PAGE_SIZE,
};
pub use keyed::HashKey;
pub use knobs::{Advisor, KnobError, Knobs, KnobsUpdate, RunMode, MAX_PAGES_TO_SCAN};
