//! The audit: every internal invariant of the engine rechecked from scratch (refcounts
//! against the pages merged onto each frame, state counts, VMA counts, stable and unstable
//! set membership, free lists). Used after every step by the tests and the simulator.

use super::frames::FrameSt;
use super::pages::{vma_count, PageSt, ANON};
use super::{Engine, PageState};
use crate::host::{DomainId, FrameId, GuestId};
use crate::index::PageRef;

/// The first internal inconsistency [`Engine::audit`] found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// A page was left planned (pending) after the engine returned.
    #[error("{guest} gfn {gfn} left pending")]
    PagePending {
        /// The guest.
        guest: GuestId,
        /// The page.
        gfn: u64,
    },
    /// A merged page has an anonymous mapping.
    #[error("{guest} gfn {gfn} merged but anonymous")]
    MergedAnonymous {
        /// The guest.
        guest: GuestId,
        /// The page.
        gfn: u64,
    },
    /// A merged page maps a frame that is free (or beyond the pool).
    #[error("{guest} gfn {gfn} merged onto free frame {frame}")]
    MergedOntoFreeFrame {
        /// The guest.
        guest: GuestId,
        /// The page.
        gfn: u64,
        /// The frame.
        frame: FrameId,
    },
    /// A reclaimed zero page is still under a pool mapping.
    #[error("{guest} gfn {gfn} zero under a pool mapping")]
    ZeroUnderPoolMapping {
        /// The guest.
        guest: GuestId,
        /// The page.
        gfn: u64,
    },
    /// A page is in the unstable set but not a candidate, or the other way round.
    #[error("{guest} gfn {gfn}: state {state:?} but in unstable set: {in_unstable_set}")]
    UnstableMembership {
        /// The guest.
        guest: GuestId,
        /// The page.
        gfn: u64,
        /// Its state.
        state: PageState,
        /// Whether the unstable set holds it.
        in_unstable_set: bool,
    },
    /// A failed guest still has candidates.
    #[error("{guest} failed but has candidates")]
    FailedWithCandidates {
        /// The guest.
        guest: GuestId,
    },
    /// A guest's per-state page counts differ from a recount.
    #[error("{guest} state counts {kept:?} != {recounted:?}")]
    StateCounts {
        /// The guest.
        guest: GuestId,
        /// Kept incrementally, per internal state.
        kept: Vec<u64>,
        /// Recounted from the pages.
        recounted: Vec<u64>,
    },
    /// A guest's VMA count differs from a recount of its layout.
    #[error("{guest} vmas {kept} != recount {recounted}")]
    VmaCount {
        /// The guest.
        guest: GuestId,
        /// Kept incrementally.
        kept: u32,
        /// Recounted from the layout.
        recounted: u32,
    },
    /// A frame was left in a state that only exists during a batch.
    #[error("domain {} frame {frame} left in state {state}", domain.0)]
    FrameLeftInState {
        /// The domain.
        domain: DomainId,
        /// The frame.
        frame: FrameId,
        /// The state (pending, cancelled or doomed).
        state: String,
    },
    /// A frame's refcount differs from the pages merged onto it.
    #[error("domain {} frame {frame}: refs {refs} but {merged} pages merged onto it", domain.0)]
    FrameRefs {
        /// The domain.
        domain: DomainId,
        /// The frame.
        frame: FrameId,
        /// Its refcount.
        refs: u32,
        /// Pages merged onto it.
        merged: u32,
    },
    /// An allocated frame has no sharers.
    #[error("domain {} frame {frame} allocated with no sharers", domain.0)]
    FrameWithoutSharers {
        /// The domain.
        domain: DomainId,
        /// The frame.
        frame: FrameId,
    },
    /// A live frame is not in the stable index.
    #[error("domain {} live frame {frame} missing from the stable index", domain.0)]
    LiveFrameNotIndexed {
        /// The domain.
        domain: DomainId,
        /// The frame.
        frame: FrameId,
    },
    /// A domain's free or allocated frame count differs from a recount.
    #[error("domain {} free/alloc counts wrong", domain.0)]
    FrameCounts {
        /// The domain.
        domain: DomainId,
    },
    /// A domain's unstable set length differs from its entries.
    #[error("domain {} unstable set length wrong", domain.0)]
    UnstableLength {
        /// The domain.
        domain: DomainId,
    },
    /// An unstable set entry belongs to another domain's guest or to a removed guest.
    #[error("domain {} unstable entry (slot {slot}, gfn {gfn}) from another domain or gone", domain.0)]
    StrayCandidate {
        /// The domain.
        domain: DomainId,
        /// The guest slot of the entry.
        slot: u32,
        /// The page of the entry.
        gfn: u32,
    },
}

impl Engine {
    /// Checks the engine's internal invariants; describes the first one broken.
    pub fn audit(&self) -> Result<(), AuditError> {
        let mut refs: Vec<Option<Vec<u32>>> = self
            .domains
            .slots()
            .iter()
            .map(|d| d.as_ref().map(|d| vec![0; d.frames.len()]))
            .collect();
        for slot in 0..self.guests.len() {
            if self.guests[slot].is_some() {
                self.audit_guest(slot, &mut refs)?;
            }
        }
        for (di, merged) in refs.iter().enumerate() {
            if let Some(merged) = merged {
                self.audit_domain(di, merged)?;
            }
        }
        Ok(())
    }

    /// Checks one guest's pages and counts, adding its merged pages to `refs`.
    fn audit_guest(&self, slot: usize, refs: &mut [Option<Vec<u32>>]) -> Result<(), AuditError> {
        let g = self.guests.live(slot);
        let guest = g.id;
        let dom = &self.domains[g.dom];
        let refs = refs[g.dom].as_mut().expect("a live guest's domain is live");
        let mut counts = [0u64; PageSt::N];
        for (i, p) in g.pages.iter().enumerate() {
            let gfn = i as u64;
            counts[p.state as usize] += 1;
            match p.state {
                PageSt::Pending => return Err(AuditError::PagePending { guest, gfn }),
                PageSt::Merged => {
                    let Some(f) = p.frame() else {
                        return Err(AuditError::MergedAnonymous { guest, gfn });
                    };
                    let fi = f as usize;
                    if fi >= refs.len() || dom.frames[fi].state == FrameSt::Free {
                        return Err(AuditError::MergedOntoFreeFrame {
                            guest,
                            gfn,
                            frame: f,
                        });
                    }
                    refs[fi] += 1;
                }
                PageSt::Zero if p.map != ANON => {
                    return Err(AuditError::ZeroUnderPoolMapping { guest, gfn });
                }
                PageSt::Zero
                | PageSt::Unscanned
                | PageSt::Volatile
                | PageSt::Unique
                | PageSt::Deferred => {}
            }
            let r = PageRef {
                slot: slot as u32,
                gfn: i as u32,
            };
            let in_unstable_set = dom.unstable.contains(p.hash, r);
            if in_unstable_set != (p.state == PageSt::Unique) {
                return Err(AuditError::UnstableMembership {
                    guest,
                    gfn,
                    state: p.state.into(),
                    in_unstable_set,
                });
            }
            if p.state == PageSt::Unique && g.failed {
                return Err(AuditError::FailedWithCandidates { guest });
            }
        }
        if counts != g.counts {
            return Err(AuditError::StateCounts {
                guest,
                kept: g.counts.to_vec(),
                recounted: counts.to_vec(),
            });
        }
        let recounted = vma_count(g.pages.iter().map(|p| p.map));
        if recounted != g.vmas {
            return Err(AuditError::VmaCount {
                guest,
                kept: g.vmas,
                recounted,
            });
        }
        Ok(())
    }

    /// Checks one domain's frames against `refs` (pages merged onto each), its stable
    /// index, free/allocated counts and unstable set.
    fn audit_domain(&self, di: usize, refs: &[u32]) -> Result<(), AuditError> {
        let d = &self.domains[di];
        let domain = d.id;
        let mut nfree = 0;
        let mut alloc = 0;
        for (i, fr) in d.frames.iter().enumerate() {
            let frame = i as FrameId;
            match fr.state {
                FrameSt::Free => {
                    nfree += 1;
                    continue;
                }
                FrameSt::Live | FrameSt::Orphan => alloc += 1,
                FrameSt::Pending | FrameSt::Cancelled | FrameSt::Doomed => {
                    return Err(AuditError::FrameLeftInState {
                        domain,
                        frame,
                        state: format!("{:?}", fr.state),
                    })
                }
            }
            if fr.refs != refs[i] {
                return Err(AuditError::FrameRefs {
                    domain,
                    frame,
                    refs: fr.refs,
                    merged: refs[i],
                });
            }
            if fr.refs == 0 {
                return Err(AuditError::FrameWithoutSharers { domain, frame });
            }
            if fr.state == FrameSt::Live && !d.chain(fr.hash).any(|f| f == frame) {
                return Err(AuditError::LiveFrameNotIndexed { domain, frame });
            }
        }
        if nfree != d.nfree as usize || alloc != d.allocated as usize {
            return Err(AuditError::FrameCounts { domain });
        }
        if d.unstable.len() != d.unstable.entries().count() {
            return Err(AuditError::UnstableLength { domain });
        }
        for r in d.unstable.entries() {
            match &self.guests[r.slot as usize] {
                Some(g) if g.dom == di => {}
                _ => {
                    return Err(AuditError::StrayCandidate {
                        domain,
                        slot: r.slot,
                        gfn: r.gfn,
                    })
                }
            }
        }
        Ok(())
    }
}
