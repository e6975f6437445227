//! The density benchmark end to end, small: all three modes on real guests, the JSON and
//! plots written, every guest verified, and the kernel's KSM knobs and `vm.max_map_count`
//! left exactly as found. These are the only tests that touch /sys/kernel/mm/ksm and
//! `vm.max_map_count`: they run alone in their binary, one at a time ([`HOST_WIDE`]).

mod common;

use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use common::merge::{exit_all, guest, u, Daemon, Profile, LONG};
use tinyvmm::fleet::procfs::{self, MapCountGuard};
use tinyvmm_sys::vm_limits;

/// Host-wide settings: one test at a time changes them.
static HOST_WIDE: Mutex<()> = Mutex::new(());

fn host_wide() -> MutexGuard<'static, ()> {
    HOST_WIDE.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ksm_knobs() -> Option<(u64, u64, u64)> {
    Some((
        procfs::ksm_read("run")?,
        procfs::ksm_read("pages_to_scan")?,
        procfs::ksm_read("sleep_millisecs")?,
    ))
}

#[test]
fn density_bench_runs_all_modes_verifies_guests_and_restores_ksm() {
    require_kvm!();
    let _one = host_wide();
    let restore = MapCountGuard::save().unwrap();
    let out_dir = common::scratch_dir("bench");
    let before = ksm_knobs();
    let out = Command::new(env!("CARGO_BIN_EXE_tinyvmm"))
        .args([
            "bench",
            "density",
            "--guests",
            "2",
            "--mem",
            "48M",
            "--pages-to-scan",
            "5000",
            "--sleep-ms",
            "5",
            "--converge-s",
            "15",
            "--idle-s",
            "1",
            "--out",
        ])
        .arg(&out_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed\n{stdout}\n{stderr}");
    assert_eq!(ksm_knobs(), before, "kernel KSM knobs restored");
    assert_eq!(
        vm_limits::max_map_count().unwrap(),
        restore.saved(),
        "vm.max_map_count restored"
    );

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("density.json")).unwrap()).unwrap();
    let modes = json[0].as_array().unwrap();
    assert_eq!(modes.len(), 3);
    let by = |m: &str| modes.iter().find(|r| r["mode"] == m).unwrap();
    let none = by("none");
    let ours = by("tinyvmm");
    // 2 guests with 60 % shared content: merging must save memory, and every page of every
    // guest must have verified (48 MiB guests fill ~47 MiB each).
    assert!(
        ours["verified_pages"].as_u64().unwrap() > 2 * 11_000,
        "{ours:#}"
    );
    assert!(
        ours["final_pss"].as_u64().unwrap() < none["final_pss"].as_u64().unwrap() * 3 / 4,
        "tinyvmm saves memory: {ours:#} vs {none:#}"
    );
    assert!(ours["pages_saved"].as_u64().unwrap() > 10_000);
    // tinyvmm's run had room for every page to be its own mapping (raised as root), and
    // the mappings merging made are counted in its merger memory.
    let limit = ours["max_map_count"].as_u64().unwrap();
    if is_root() {
        assert!(
            limit >= 48 * 256 + vm_limits::DEFAULT_MAX_MAP_COUNT,
            "{ours:#}"
        );
    }
    let maps = ours["merge_mappings"].as_u64().unwrap();
    assert!(
        ours["merger_overhead_bytes"].as_u64().unwrap() >= maps * 192,
        "{ours:#}"
    );
    let kernel = by("kernel");
    if kernel["skipped"].is_null() {
        assert!(
            kernel["pages_saved"].as_u64().unwrap() > 10_000,
            "{kernel:#}"
        );
    } else {
        // Only acceptable without root.
        let euid = {
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() }
        };
        assert_ne!(euid, 0, "kernel mode skipped as root: {kernel:#}");
    }
    for f in ["memory-same.svg", "pages_saved-same.svg"] {
        let svg = std::fs::read_to_string(out_dir.join(f)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("tinyvmm"), "{f}");
    }
    assert!(stdout.contains("ratios tinyvmm/kernel") || !kernel["skipped"].is_null());
}

/// The other layouts: shared content scattered page by page at per-guest addresses, and in
/// runs of 8 pages at per-guest addresses. tinyvmm alone (the kernel's KSM is left alone
/// here); every guest verifies every page, and merging saves memory in both.
#[test]
fn density_bench_merges_shuffled_and_clustered_layouts() {
    require_kvm!();
    let _one = host_wide();
    let _restore = MapCountGuard::save().unwrap();
    let out_dir = common::scratch_dir("bench-layouts");
    let out = Command::new(env!("CARGO_BIN_EXE_tinyvmm"))
        .args([
            "bench",
            "density",
            "--modes",
            "none,tinyvmm",
            "--layout",
            "shuffled,clustered",
            "--run",
            "8",
            "--guests",
            "2",
            "--mem",
            "48M",
            "--pages-to-scan",
            "5000",
            "--sleep-ms",
            "5",
            "--converge-s",
            "20",
            "--idle-s",
            "1",
            "--out",
        ])
        .arg(&out_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed\n{stdout}\n{stderr}");
    assert!(stdout.contains("layout shuffled") && stdout.contains("layout clustered8"));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("density.json")).unwrap()).unwrap();
    let runs = json.as_array().unwrap();
    assert_eq!(runs.len(), 2, "one run per layout");
    for (run, layout) in runs.iter().zip(["shuffled", "clustered8"]) {
        let modes = run.as_array().unwrap();
        let by = |m: &str| modes.iter().find(|r| r["mode"] == m).unwrap();
        let (none, ours) = (by("none"), by("tinyvmm"));
        assert_eq!(ours["layout"], layout);
        assert!(
            ours["verified_pages"].as_u64().unwrap() > 2 * 11_000,
            "{ours:#}"
        );
        assert!(
            ours["final_pss"].as_u64().unwrap() < none["final_pss"].as_u64().unwrap() * 3 / 4,
            "tinyvmm saves memory with layout {layout}: {ours:#} vs {none:#}"
        );
        assert!(ours["pages_saved"].as_u64().unwrap() > 10_000, "{ours:#}");
    }
}

/// `tinyvmm merged --max-map-count N` raises the host's limit (root only) and VMs that
/// register afterwards get the larger mapping budget; the limit is restored by the test.
#[test]
fn daemon_raises_max_map_count_and_new_guests_get_the_budget() {
    require_kvm!();
    if !is_root() {
        eprintln!("skipped: raising vm.max_map_count needs root");
        return;
    }
    let _one = host_wide();
    let restore = MapCountGuard::save().unwrap();
    let want = restore.saved() + 100_000;
    let d = Daemon::start(
        "max-map-count",
        &[
            "--max-map-count",
            &want.to_string(),
            "--pages-to-scan",
            "20000",
            "--sleep-ms",
            "5",
        ],
    );
    assert_eq!(vm_limits::max_map_count().unwrap(), want);
    assert!(d.log().contains("raised vm.max_map_count"), "{}", d.log());
    let (g, _) = guest(&d, 70, &Profile::plain(16), &[]);
    d.wait_for("registered", LONG, |s| u(s, "guests") == 1);
    let gs = d.ksm_json(&["guests", "--json"]);
    let budget = gs[0]["vma_budget"].as_u64().unwrap();
    assert!(
        budget > restore.saved() && budget <= want,
        "the guest's budget follows the raised limit: {gs:#}"
    );
    exit_all(vec![g]);
}
