//! `GET /metrics`: the counters in the Prometheus text exposition format (0.0.4).
//!
//! Fleet-wide series are `tinyvmm_ksm_<name>` with the names of `GET /ksm`; per-guest
//! series are `tinyvmm_ksm_guest_<name>{guest="<id>",name="<name>",share_group="<group>",uid="<uid>"}`
//! (the VM's user: a share group is private to it unless the daemon's policy shares it).
//! Fields are taken from the serialized state, so a counter the engine adds later shows
//! up here too (as a gauge with a generic help text).

use std::fmt::Write;

use serde_json::{Map, Value};

use super::{GuestInfo, KsmState};

/// Known fleet-wide series: name, Prometheus type, help.
const FLEET: &[(&str, &str, &str)] = &[
    (
        "run",
        "gauge",
        "Scanner mode: 0 stopped, 1 running, 2 unmerging.",
    ),
    (
        "sleep_millisecs",
        "gauge",
        "Sleep between scanner wake-ups, milliseconds.",
    ),
    (
        "pages_to_scan",
        "gauge",
        "Pages visited per scanner wake-up.",
    ),
    (
        "max_page_sharing",
        "gauge",
        "Most guest pages mapped onto one frame.",
    ),
    (
        "smart_scan",
        "gauge",
        "1 when smart scan skips pages that keep failing to merge.",
    ),
    ("pages_shared", "gauge", "Frames in use (shared pages)."),
    (
        "pages_sharing",
        "gauge",
        "Guest pages mapped onto frames minus the frames: pages saved.",
    ),
    (
        "pages_unshared",
        "gauge",
        "Unique candidate pages (unstable set).",
    ),
    (
        "pages_volatile",
        "gauge",
        "Pages seen changing since their previous visit.",
    ),
    ("full_scans", "counter", "Completed passes over all guests."),
    ("pages_scanned", "counter", "Pages visited."),
    ("pages_skipped", "counter", "Pages skipped by smart scan."),
    (
        "zero_pages",
        "gauge",
        "Zero pages reclaimed without a frame.",
    ),
    (
        "general_profit",
        "gauge",
        "Bytes saved minus the engine's metadata.",
    ),
    (
        "stable_node_chains",
        "gauge",
        "Content hashes with more than one frame.",
    ),
    (
        "stable_node_dups",
        "gauge",
        "Frames that belong to such chains.",
    ),
    ("merges", "counter", "Pages merged."),
    ("splits", "counter", "Merged pages split by a guest write."),
    ("frames_freed", "counter", "Frames returned to the pool."),
    ("merge_mismatches", "counter", "Byte compares that failed."),
    (
        "pages_skipped_vma_budget",
        "counter",
        "Pages not merged for lack of VMA budget.",
    ),
    (
        "pool_frames",
        "gauge",
        "Frames in the pools' files (high-water marks).",
    ),
    ("guests", "gauge", "Guests registered."),
    ("guests_failed", "gauge", "Guests whose host failed."),
    (
        "metadata_bytes",
        "gauge",
        "Bytes of the engine's own metadata.",
    ),
    (
        "pool_bytes",
        "gauge",
        "Bytes of frames resident in all pools.",
    ),
    (
        "engine_metadata_bytes",
        "gauge",
        "Bytes of the engine's metadata.",
    ),
];

/// Known per-guest series: name, Prometheus type, help.
const GUEST: &[(&str, &str, &str)] = &[
    ("pages", "gauge", "Pages of merge-eligible guest RAM."),
    ("merging_pages", "gauge", "Guest pages mapped onto frames."),
    ("zero_pages", "gauge", "Zero pages reclaimed."),
    ("unshared_pages", "gauge", "Unique candidate pages."),
    ("volatile_pages", "gauge", "Volatile pages."),
    (
        "profit",
        "gauge",
        "Bytes saved minus this guest's metadata.",
    ),
    (
        "vma_mappings",
        "gauge",
        "Mappings (VMAs) the merged layout uses.",
    ),
    ("vma_budget", "gauge", "Mappings (VMAs) allowed."),
    ("failed", "gauge", "1 when the guest's host failed."),
    (
        "protect_batches",
        "counter",
        "Write-protected batches the agent ran.",
    ),
    (
        "protect_p50_ns",
        "gauge",
        "Median time a batch stayed write-protected, ns.",
    ),
    (
        "protect_p99_ns",
        "gauge",
        "99th percentile of the time a batch stayed write-protected, ns.",
    ),
    (
        "protect_max_ns",
        "gauge",
        "Longest time a batch stayed write-protected, ns.",
    ),
    (
        "blocked_writes",
        "counter",
        "Guest writes that hit a write-protected page and waited.",
    ),
    ("vma_count", "gauge", "Mappings of the VM process."),
    (
        "pages_reported",
        "counter",
        "Pages the guest gave up through its balloon (reported free or inflated) and the VMM dropped.",
    ),
];

/// Fields that are labels or not numbers, never series.
const NOT_SERIES: &[&str] = &[
    "id",
    "domain",
    "pid",
    "name",
    "share_group",
    "uid",
    "share_group_uids",
    "advisor",
];

/// A JSON scalar as a sample value; `None` for anything else.
fn sample(v: &Value) -> Option<String> {
    match v {
        Value::Bool(b) => Some(u8::from(*b).to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The numeric fields of `obj`, known ones first in the order of `known`.
fn series<'a>(
    obj: &'a Map<String, Value>,
    known: &'static [(&'static str, &'static str, &'static str)],
) -> Vec<(&'a str, &'static str, &'static str, &'a Value)> {
    let mut out = Vec::new();
    for (name, kind, help) in known {
        if let Some((k, v)) = obj.get_key_value(*name) {
            out.push((k.as_str(), *kind, *help, v));
        }
    }
    for (k, v) in obj {
        let is_known = known.iter().any(|(n, _, _)| n == k);
        if !is_known && !NOT_SERIES.contains(&k.as_str()) {
            out.push((k.as_str(), "gauge", "Reported by the merge engine.", v));
        }
    }
    out.retain(|(_, _, _, v)| sample(v).is_some());
    out
}

/// A label value, escaped as the format requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the state and guests.
pub fn render(state: &KsmState, guests: &[GuestInfo]) -> String {
    let mut out = String::new();
    if let Ok(Value::Object(obj)) = serde_json::to_value(state) {
        for (name, kind, help, v) in series(&obj, FLEET) {
            let v = sample(v).unwrap_or_default();
            let _ = writeln!(out, "# HELP tinyvmm_ksm_{name} {help}");
            let _ = writeln!(out, "# TYPE tinyvmm_ksm_{name} {kind}");
            let _ = writeln!(out, "tinyvmm_ksm_{name} {v}");
        }
    }
    let guests: Vec<(String, Map<String, Value>)> = guests
        .iter()
        .filter_map(|g| match serde_json::to_value(g) {
            Ok(Value::Object(obj)) => Some((
                format!(
                    "guest=\"{}\",name=\"{}\",share_group=\"{}\",uid=\"{}\"",
                    g.counters.id.0,
                    label(&g.name),
                    label(&g.share_group),
                    g.uid
                ),
                obj,
            )),
            _ => None,
        })
        .collect();
    let Some((_, first)) = guests.first() else {
        return out;
    };
    for (name, kind, help, _) in series(first, GUEST) {
        let _ = writeln!(out, "# HELP tinyvmm_ksm_guest_{name} {help}");
        let _ = writeln!(out, "# TYPE tinyvmm_ksm_guest_{name} {kind}");
        for (labels, obj) in &guests {
            if let Some(v) = obj.get(name).and_then(sample) {
                let _ = writeln!(out, "tinyvmm_ksm_guest_{name}{{{labels}}} {v}");
            }
        }
    }
    out
}
