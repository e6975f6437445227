//! The page work's vocabulary: guest pages, pool frames, runs, digests, and the outcome of
//! each operation an agent carries out on its guest's RAM. The merge engine plans with
//! these types and the agent answers in them; the wire carries them unchanged.

use serde::{Deserialize, Serialize};

/// Size of a guest page and of a pool frame.
pub const PAGE_SIZE: usize = 4096;

/// The content hash of a page (xxh3-64), as the agent reports it in digests and the
/// daemon computes it for the frames it writes: both sides must agree on it.
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// Guest frame number: the page's index in the guest's merge-eligible RAM.
pub type Gfn = u64;

/// Index of a frame in a domain's pool (byte offset `frame * PAGE_SIZE` in the pool memfd).
pub type FrameId = u32;

/// Identifies a guest (one VM process) to the engine and to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GuestId(pub u32);

impl std::fmt::Display for GuestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "guest {}", self.0)
    }
}

/// A merge domain (share group). Pages are never merged across domains; each domain has
/// its own pool of frames.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct DomainId(pub u32);

/// A run of consecutive guest pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// First page of the run.
    pub gfn: Gfn,
    /// Number of pages.
    pub len: u32,
}

/// What the host reports about one page when asked for its digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PageDigest {
    /// xxh3-64 (or the host's hash) of the page's current 4 KiB content.
    pub hash: u64,
    /// The page reads as all zeros.
    pub zero: bool,
    /// The page's mapping is a pool frame, but the page holds a private copy: it was merged
    /// and the guest has since written it (kernel COW). Reported for as long as it is true;
    /// the engine acts on it once.
    pub split: bool,
    /// With a dirty-page source: whether the page was written since it was last digested
    /// (for the first digest: since the guest registered). `None` without a dirty source.
    pub dirty: Option<bool>,
}

/// How a [`MergeOp`] maps pool frames over guest pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpKind {
    /// For each page: write-protect it, copy its bytes into the fresh (never mapped) pool
    /// frame, map the frame over the page (`MAP_PRIVATE`, copy-on-write), unprotect.
    /// The result carries the hash of the bytes copied.
    Populate,
    /// Write-protect the run, byte-compare each page with its frame, map the frames over
    /// the equal pages (one `mmap` per run of equal pages), unprotect.
    Join,
}

/// One run of a merge request: pages `gfn..gfn+len` onto frames `frame..frame+len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeOp {
    /// First guest page.
    pub gfn: Gfn,
    /// Number of pages; page `gfn + k` maps frame `frame + k`.
    pub len: u32,
    /// Pool frame of the first page.
    pub frame: FrameId,
    /// Populate new frames or join existing ones.
    pub kind: OpKind,
}

/// Outcome for one page of a [`MergeOp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MergeOutcome {
    /// The frame is now mapped over the page.
    Merged,
    /// The page's content differs from the frame (it changed, or a hash collision): the page
    /// stays private and untouched.
    Mismatch,
    /// `mmap` failed with ENOMEM (the process's mapping limit): the page stays private,
    /// nothing lost.
    NoVmaBudget,
}

/// Result for one page of a [`MergeOp`], in op order, page by page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeResult {
    /// What happened to the page.
    pub outcome: MergeOutcome,
    /// For `Populate`: the hash of the bytes copied into the frame (the page's content at
    /// the time of the copy). Zero for `Join`.
    pub hash: u64,
}

/// Outcome for one page of a zero-page reclaim (`Request::ReclaimZero`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ZeroOutcome {
    /// Verified zero under write protection and dropped with `MADV_DONTNEED`.
    Reclaimed,
    /// Not zero any more: left alone.
    NotZero,
}

/// Outcome for one page of an unmerge (`Request::Unmerge`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnmergeOutcome {
    /// The page is private anonymous memory again, with its content.
    Unmerged,
    /// The anonymous remap failed with ENOMEM: the page is as it was.
    NoVmaBudget,
}
