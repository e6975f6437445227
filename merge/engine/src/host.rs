//! The host interface: the page work the engine asks a guest's agent to do.
//!
//! Every method is one round trip to one guest's agent (or, for [`MergeHost::free_frames`],
//! one operation on one domain's pool) and carries a whole batch of pages. The exact
//! semantics below are what the real agent implements with userfaultfd write-protect,
//! `memcmp`, `mmap(MAP_FIXED)` of the pool memfd and `MADV_DONTNEED`, and what
//! [`crate::sim`] models. The data types are those of the agent ⇄ daemon protocol
//! (`tinyvmm_merge_protocol::page`), re-exported here.

pub use tinyvmm_merge_protocol::page::{
    DomainId, FrameId, Gfn, GuestId, MergeOp, MergeOutcome, MergeResult, OpKind, PageDigest,
    PageRun, UnmergeOutcome, ZeroOutcome, PAGE_SIZE,
};

/// A host operation failed. For a guest this means its agent is gone or misbehaved: the
/// engine marks that guest failed and carries on with the others.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// The guest's agent no longer answers (its VM process exited or the socket closed).
    #[error("{guest}: its agent is gone")]
    GuestGone {
        /// The guest.
        guest: GuestId,
    },
    /// The agent answered something that does not fit the request.
    #[error("{guest}: agent protocol error: {reason}")]
    Protocol {
        /// The guest.
        guest: GuestId,
        /// What was wrong.
        reason: String,
    },
    /// The guest's agent is still busy with an earlier request (a digest started with
    /// [`ConcurrentHost::start_digest`]) and did not get free in time: nothing was done,
    /// the engine may ask again later. Only a partner's populate gets this answer.
    #[error("{guest}: its agent is busy")]
    Busy {
        /// The guest.
        guest: GuestId,
    },
    /// An operation on a domain's pool (punching a hole) failed.
    #[error("pool of domain {}: {reason}", domain.0)]
    Pool {
        /// The domain.
        domain: DomainId,
        /// What failed.
        reason: String,
    },
}

/// The page work, carried out on guests' memory by their agents.
///
/// Each call is one batched round trip. Results are appended to `out` (cleared by the
/// callee first), one per page, in request order.
pub trait MergeHost {
    /// Digests every page of `runs` of `guest` (see [`PageDigest`]); clears the dirty state
    /// of the pages digested.
    fn digest(
        &mut self,
        guest: GuestId,
        runs: &[PageRun],
        out: &mut Vec<PageDigest>,
    ) -> Result<(), HostError>;

    /// With a dirty-page source: digests of at most `max` pages written since their last
    /// digest (split pages included, they were written), in ascending gfn order, clearing
    /// their dirty state. Returns `true` if more dirty pages remain.
    fn digest_dirty(
        &mut self,
        guest: GuestId,
        max: u32,
        out: &mut Vec<(Gfn, PageDigest)>,
    ) -> Result<bool, HostError>;

    /// Carries out merge runs on `guest` (see [`OpKind`]); one [`MergeResult`] per page.
    fn merge(
        &mut self,
        guest: GuestId,
        ops: &[MergeOp],
        out: &mut Vec<MergeResult>,
    ) -> Result<(), HostError>;

    /// Verifies each page is all zero under write protection, then `MADV_DONTNEED`s it.
    /// CAUTION: a page whose mapping is a pool frame (merged once, split since) then reads
    /// that pool offset again, not zeros: the engine only sends anonymously mapped pages.
    fn reclaim_zero(
        &mut self,
        guest: GuestId,
        gfns: &[Gfn],
        out: &mut Vec<ZeroOutcome>,
    ) -> Result<(), HostError>;

    /// Gives pages private anonymous memory again with their current content (copy out,
    /// remap anonymous, copy back, under write protection).
    fn unmerge(
        &mut self,
        guest: GuestId,
        gfns: &[Gfn],
        out: &mut Vec<UnmergeOutcome>,
    ) -> Result<(), HostError>;

    /// Releases frames of `domain`'s pool (`fallocate(PUNCH_HOLE)`); no page maps them.
    /// Their indices may be reused by later `Populate` ops.
    fn free_frames(&mut self, domain: DomainId, frames: &[FrameId]) -> Result<(), HostError>;
}

/// A digest the engine starts ahead of processing it (see [`ConcurrentHost`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DigestRequest {
    /// [`MergeHost::digest`] of these runs.
    Range(Vec<PageRun>),
    /// [`MergeHost::digest_dirty`] of at most this many pages.
    Dirty(u32),
}

/// The answer to a [`DigestRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DigestReply {
    /// One digest per page of the runs, in order.
    Range(Vec<PageDigest>),
    /// Dirty pages' digests, and whether more dirty pages remain.
    Dirty(Vec<(Gfn, PageDigest)>, bool),
}

/// A completed digest: guest, ticket, reply.
pub type DigestDone = (GuestId, u64, Result<DigestReply, HostError>);

/// A host whose guests digest concurrently: digests are started on several guests at
/// once (each guest's agent hashes in its own process) and their replies collected as they
/// come, so one slow guest delays only itself. At most one digest per guest is
/// outstanding; every other call of [`MergeHost`] waits for that guest's outstanding digest
/// first (except a partner's populate, which may answer [`HostError::Busy`]).
pub trait ConcurrentHost: MergeHost {
    /// Starts a digest of `guest`, named `ticket` (the engine's, unique). An error means
    /// the guest's agent is gone.
    fn start_digest(
        &mut self,
        guest: GuestId,
        ticket: u64,
        req: DigestRequest,
    ) -> Result<(), HostError>;

    /// A digest that completed (in completion order): its guest, its ticket and its reply;
    /// `wait`: block until one completes, for at most the host's patience. `None`: none
    /// completed (in time). A reply's size has not been checked against its request yet.
    fn next_digest(&mut self, wait: bool) -> Option<DigestDone>;
}

/// `Ok` if the host gave `want` results for `what`, else a protocol error of `guest`.
pub(crate) fn expect_results(
    guest: GuestId,
    what: &str,
    got: usize,
    want: usize,
) -> Result<(), HostError> {
    if got == want {
        Ok(())
    } else {
        Err(HostError::Protocol {
            guest,
            reason: format!("wrong number of {what} results: {got} for {want} pages"),
        })
    }
}
