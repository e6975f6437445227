//! The VM API's balloon resources (`tinyvmm run --balloon`), after Firecracker's:
//!
//! | method | path | what |
//! |---|---|---|
//! | `GET` | `/vm/balloon` | a [`BalloonInfo`]: target, actual size, what the device did |
//! | `PUT` | `/vm/balloon` | a [`BalloonUpdate`], `{"amount_mib": N}`: the new target (204) |
//! | `GET` | `/vm/balloon/statistics` | a [`BalloonStatistics`]: the guest's memory counters |
//!
//! A VM without a balloon answers 404 on all three.

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// The body of `GET /vm/balloon`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BalloonInfo {
    /// The target size, MiB (what `PUT /vm/balloon` set, or `--balloon`).
    pub amount_mib: u64,
    /// The target size in 4 KiB pages.
    pub target_pages: u32,
    /// The balloon's size in 4 KiB pages, as the driver last reported it.
    pub actual_pages: u32,
    /// The same in MiB (rounded down).
    pub actual_mib: u64,
    /// Whether the driver accepted deflate-on-OOM.
    pub deflate_on_oom: bool,
    /// Whether the guest's driver runs.
    pub active: bool,
    /// Pages the guest put into the balloon, dropped from the host.
    pub inflated_pages: u64,
    /// Pages the guest took back.
    pub deflated_pages: u64,
    /// Pages of free ranges the guest reported, dropped from the host.
    pub reported_pages: u64,
    /// Free page reports served.
    pub reports: u64,
    /// Ranges ignored as invalid (outside RAM, unaligned, overlapping).
    pub bad_ranges: u64,
    /// Ranges the host failed to drop (kept as they were).
    pub discard_failures: u64,
}

/// The body of `PUT /vm/balloon`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// The new target size, MiB.
    pub amount_mib: u64,
}

/// The body of `GET /vm/balloon/statistics` (Firecracker's field names; a statistic the
/// guest did not send is left out).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonStatistics {
    /// The target size in 4 KiB pages.
    pub target_pages: u32,
    /// The balloon's size in 4 KiB pages.
    pub actual_pages: u32,
    /// The target, MiB.
    pub target_mib: u64,
    /// The balloon's size, MiB.
    pub actual_mib: u64,
    /// Milliseconds since the guest sent these statistics.
    pub age_ms: u64,
    /// Memory swapped in, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    /// Memory swapped out, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    /// Major page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Minor page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Memory not in use, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    /// Memory the guest has, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    /// Memory available for new work without swapping, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    /// Memory in the page cache that can be reclaimed, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    /// Successful hugetlb page allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb page allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
}

/// Parses a `PUT /vm/balloon` body: a JSON object `{"amount_mib": N}` (an integral number
/// such as `64.0` counts, as in JSON Schema).
pub fn parse_balloon_update(body: &[u8]) -> Result<BalloonUpdate, ApiError> {
    let bad = |why: String| {
        ApiError::BadRequest(format!(
            "PUT /vm/balloon takes {{\"amount_mib\": N}}: {why}"
        ))
    };
    let mut value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    // Checked first: serde would also take the struct from an array (`[64]`).
    if !value.is_object() {
        return Err(bad("not an object".into()));
    }
    crate::routes::integral_numbers(&mut value);
    let u: BalloonUpdate = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    // The target is a u32 count of 4 KiB pages in the device's configuration space.
    if u.amount_mib > u64::from(u32::MAX) / 256 {
        return Err(bad(format!("amount_mib {} is too large", u.amount_mib)));
    }
    Ok(u)
}

/// The 404 of a VM without a balloon.
pub fn no_balloon() -> ApiError {
    ApiError::NotFound("this VM has no balloon (start it with --balloon)".into())
}
