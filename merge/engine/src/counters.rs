//! Counters, with the kernel's names and meanings (`/sys/kernel/mm/ksm/*`,
//! `/proc/PID/ksm_stat`), plus the engine's own.

use crate::host::{DomainId, GuestId};
use serde::Serialize;

/// Fleet-wide counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Counters {
    /// Frames in use (shared pages), like the kernel's `pages_shared`.
    pub pages_shared: u64,
    /// Guest pages mapped onto frames minus the frames: pages saved.
    pub pages_sharing: u64,
    /// Pages visited, unchanged, and unique so far (candidates in the unstable set).
    pub pages_unshared: u64,
    /// Pages seen changing since their previous visit.
    pub pages_volatile: u64,
    /// Completed passes over all guests.
    pub full_scans: u64,
    /// Pages digested (visited), cumulative.
    pub pages_scanned: u64,
    /// Pages skipped by smart scan, cumulative.
    pub pages_skipped: u64,
    /// Zero pages reclaimed without a frame, now.
    pub zero_pages: u64,
    /// Bytes saved (`(pages_sharing + zero_pages) * 4096`) minus the engine's metadata.
    pub general_profit: i64,
    /// Content hashes that have more than one frame (max_page_sharing reached, or
    /// hash collisions), like `stable_node_chains`.
    pub stable_node_chains: u64,
    /// Frames that belong to such chains, like `stable_node_dups`.
    pub stable_node_dups: u64,
    /// Pages merged (populated or joined), cumulative.
    pub merges: u64,
    /// Merged pages seen split by a guest write, cumulative.
    pub splits: u64,
    /// Frames returned to the pool, cumulative.
    pub frames_freed: u64,
    /// Byte compares that failed (content changed or hash collision), cumulative.
    pub merge_mismatches: u64,
    /// Pages not merged (now) for lack of VMA budget, cumulative.
    pub pages_skipped_vma_budget: u64,
    /// Frames in the pools' files (high-water marks, all domains).
    pub pool_frames: u64,
    /// Guests registered (failed ones included).
    pub guests: u64,
    /// Guests whose host failed; they are no longer scanned and keep their frames until
    /// removed.
    pub guests_failed: u64,
    /// Bytes of the engine's own metadata.
    pub metadata_bytes: u64,
}

/// Per-guest counters, like `/proc/PID/ksm_stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct GuestCounters {
    /// The guest.
    pub id: GuestId,
    /// Its merge domain.
    pub domain: DomainId,
    /// Pages of merge-eligible RAM.
    pub pages: u64,
    /// Pages mapped onto frames (`ksm_merging_pages`).
    pub merging_pages: u64,
    /// Zero pages reclaimed (`ksm_zero_pages`).
    pub zero_pages: u64,
    /// Unique candidates.
    pub unshared_pages: u64,
    /// Volatile pages.
    pub volatile_pages: u64,
    /// `(merging_pages + zero_pages) * 4096` minus this guest's metadata (`ksm_process_profit`).
    pub profit: i64,
    /// Mappings (VMAs) the merged layout uses now.
    pub vma_mappings: u32,
    /// Mappings allowed.
    pub vma_budget: u32,
    /// Its host failed.
    pub failed: bool,
}

/// What one wake-up ([`crate::Engine::scan_round`]) did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RoundReport {
    /// Pages digested.
    pub pages_visited: u64,
    /// Pages whose known digest was reused (dirty source says unchanged).
    pub pages_promoted: u64,
    /// Pages skipped by smart scan.
    pub pages_skipped: u64,
    /// Pages merged.
    pub merges: u64,
    /// Splits seen.
    pub splits: u64,
    /// Zero pages reclaimed.
    pub zero_reclaimed: u64,
    /// Failed byte compares.
    pub mismatches: u64,
    /// Pages not merged for lack of VMA budget.
    pub skipped_vma_budget: u64,
    /// Host round trips.
    pub host_calls: u64,
    /// Concurrent rounds: merges put off because the partner's agent was busy.
    pub partners_busy: u64,
    /// Full scans completed in this round.
    pub full_scans: u64,
    /// Guests whose host failed in this round.
    pub guests_failed: Vec<GuestId>,
}
