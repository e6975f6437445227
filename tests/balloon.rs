//! virtio-balloon on real guests: free page reporting gives memory back to the host (its
//! RSS drops by what was reported) and the guest reads zeros there, or what it writes
//! later; the target set through `PUT /vm/balloon` is honoured and visible; ranges the
//! host must ignore lose nothing; and with a real merge daemon, merged pages the guests
//! report free give up their frames.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::merge::{u, Daemon, LONG};
use hyper::{Method, StatusCode};
use serde_json::Value;
use tinyvmm::fleet::guest::{field, GuestProc};
use tinyvmm::fleet::procfs::rss_bytes;
use tinyvmm::ksm_client::ApiClient;

const BIN: &str = env!("CARGO_BIN_EXE_tinyvmm");
const PAGE: u64 = 4096;

/// A `fill,serve` guest with a balloon and a VM API socket: `mib` MiB filled.
fn balloon_guest(
    dir: &Path,
    name: &str,
    mib: u64,
    cmdline_extra: &str,
    flags: &[&str],
) -> (GuestProc, PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let mut args: Vec<String> = vec![
        "--mem".into(),
        format!("{}M", mib + 16),
        "--balloon".into(),
        "--api-sock".into(),
        sock.display().to_string(),
        "--cmdline".into(),
        format!("console=ttyS0 workload=fill,serve mib={mib} seed=1 {cmdline_extra}"),
    ];
    args.extend(flags.iter().map(|s| s.to_string()));
    let log = dir.join(format!("{name}.log"));
    let mut g = GuestProc::spawn(Path::new(BIN), &args, Some(&log)).unwrap();
    let stderr = || std::fs::read_to_string(&log).unwrap_or_default();
    g.wait_line("BALLOON ready", LONG)
        .unwrap_or_else(|e| panic!("{e}\n--- stderr\n{}", stderr()));
    g.wait_line("SERVE ready", LONG)
        .unwrap_or_else(|e| panic!("{e}\n--- stderr\n{}", stderr()));
    (g, sock)
}

fn get(sock: &Path, path: &str) -> Value {
    ApiClient::new(sock)
        .unwrap()
        .json(Method::GET, path, None)
        .unwrap()
}

fn put_balloon(sock: &Path, body: &str) -> StatusCode {
    ApiClient::new(sock)
        .unwrap()
        .request(Method::PUT, "/vm/balloon", Some(body.as_bytes().to_vec()))
        .unwrap()
        .0
}

/// Polls `GET path` until `done` holds.
fn wait_api(sock: &Path, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + LONG;
    loop {
        let v = get(sock, path);
        if done(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `free P` in a serve guest: the pages it reported.
fn free(g: &mut GuestProc, pct: u64) -> u64 {
    g.send(&format!("free {pct}")).unwrap();
    let line = g.wait_line("FREE done", LONG).unwrap();
    g.wait_line("SERVE ready", LONG).unwrap();
    eprintln!("{line}");
    field(&line, "pages").unwrap()
}

#[test]
fn reported_pages_leave_the_host_and_read_zero_then_the_guest_data() {
    require_kvm!();
    let dir = common::scratch_dir("balloon-report");
    let mib = 128;
    let (mut g, sock) = balloon_guest(&dir, "g", mib, "", &[]);
    let pages = mib * 256;
    assert_eq!(g.verify(LONG).unwrap(), pages);

    let before = rss_bytes(g.pid()).unwrap();
    let t = Instant::now();
    let reported = free(&mut g, 50);
    let after = rss_bytes(g.pid()).unwrap();
    eprintln!(
        "RSS {} -> {} MiB after reporting {} MiB (report round trip and RSS read: {:?})",
        before >> 20,
        after >> 20,
        (reported * PAGE) >> 20,
        t.elapsed()
    );
    // Exactly the pages of the documented pattern (guest_seed 2 is the guest's default).
    let expected = (0..pages)
        .filter(|&i| tinyvmm_guests::content::freed(2, i, 50))
        .count() as u64;
    assert_eq!(reported, expected);
    // Dropped before the device completed the request: the RSS read right after the guest
    // saw it completed is already down by (about) what was reported.
    assert!(
        before - after >= reported * PAGE * 9 / 10,
        "RSS {before} -> {after} for {reported} pages reported"
    );

    let b = get(&sock, "/vm/balloon");
    assert_eq!(b["reported_pages"], reported, "{b:#}");
    assert_eq!(b["bad_ranges"], 0, "{b:#}");
    assert_eq!(b["active"], true, "{b:#}");

    // The reported pages read zero, the others what they held.
    assert_eq!(g.verify(LONG).unwrap(), pages);
    // The guest writes every page again (reported ones included) and reads its own data.
    g.send("fill").unwrap();
    g.wait_line("FILL done", LONG).unwrap();
    assert_eq!(g.verify(LONG).unwrap(), pages);
    assert!(rss_bytes(g.pid()).unwrap() >= before - (8 << 20));
    assert!(g.exit(Duration::from_secs(30)).unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn balloon_target_is_honoured_and_visible_and_statistics_arrive() {
    require_kvm!();
    let dir = common::scratch_dir("balloon-target");
    let mib = 64;
    let (mut g, sock) = balloon_guest(&dir, "g", mib, "", &[]);
    let pages = mib * 256;
    let b = get(&sock, "/vm/balloon");
    assert_eq!(b["amount_mib"], 0, "{b:#}");
    assert_eq!(b["deflate_on_oom"], true, "{b:#}");

    let before = rss_bytes(g.pid()).unwrap();
    assert_eq!(
        put_balloon(&sock, r#"{"amount_mib": 16}"#),
        StatusCode::NO_CONTENT
    );
    let b = wait_api(&sock, "/vm/balloon", "the balloon at 16 MiB", |b| {
        b["actual_pages"] == 4096
    });
    assert_eq!(b["amount_mib"], 16, "{b:#}");
    assert_eq!(b["actual_mib"], 16, "{b:#}");
    assert_eq!(b["inflated_pages"], 4096, "{b:#}");
    let after = rss_bytes(g.pid()).unwrap();
    assert!(before - after >= (15 << 20), "RSS {before} -> {after}");
    // Pages in the balloon are skipped, every other page checks out.
    assert_eq!(g.verify(LONG).unwrap(), pages);

    let s = wait_api(&sock, "/vm/balloon/statistics", "statistics", |s| {
        s["total_memory"].is_u64()
    });
    assert_eq!(s["total_memory"], pages * PAGE, "{s:#}");
    assert_eq!(s["actual_pages"], 4096, "{s:#}");
    for k in [
        "free_memory",
        "available_memory",
        "major_faults",
        "minor_faults",
    ] {
        assert!(s[k].is_u64(), "{k} missing: {s:#}");
    }

    // Back to 0: the guest deflates and reads zeros in the pages it got back.
    assert_eq!(
        put_balloon(&sock, r#"{"amount_mib": 0}"#),
        StatusCode::NO_CONTENT
    );
    let b = wait_api(&sock, "/vm/balloon", "the balloon empty", |b| {
        b["actual_pages"] == 0
    });
    assert_eq!(b["deflated_pages"], 4096, "{b:#}");
    assert_eq!(g.verify(LONG).unwrap(), pages);

    // Bad bodies change nothing.
    for bad in [
        r#"{"amount_mib": -1}"#,
        r#"{"amount": 4}"#,
        "[]",
        r#"{"amount_mib": 99999999999}"#,
    ] {
        assert_eq!(put_balloon(&sock, bad), StatusCode::BAD_REQUEST, "{bad}");
    }
    assert_eq!(get(&sock, "/vm/balloon")["amount_mib"], 0);
    assert!(g.exit(Duration::from_secs(30)).unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ranges_outside_ram_unaligned_or_overlapping_are_ignored_and_nothing_is_lost() {
    require_kvm!();
    let dir = common::scratch_dir("balloon-bad");
    let (mut g, sock) = balloon_guest(&dir, "g", 16, "", &[]);
    for _ in 0..2 {
        g.send("badreport").unwrap();
        g.wait_line("BADREPORT done", LONG).unwrap();
    }
    let b = get(&sock, "/vm/balloon");
    assert_eq!(b["bad_ranges"], 8, "{b:#}");
    assert_eq!(b["reported_pages"], 0, "{b:#}");
    assert_eq!(b["reports"], 2, "{b:#}");
    assert_eq!(g.verify(LONG).unwrap(), 16 * 256);
    assert!(g.exit(Duration::from_secs(30)).unwrap().success());
    let log = std::fs::read_to_string(dir.join("g.log")).unwrap();
    assert!(
        log.matches("they are ignored (logged once)").count() <= 1,
        "logged more than once:\n{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_vm_without_a_balloon_answers_404() {
    require_kvm!();
    let dir = common::scratch_dir("balloon-none");
    let sock = dir.join("vm.sock");
    let args: Vec<String> = vec![
        "--mem".into(),
        "32M".into(),
        "--api-sock".into(),
        sock.display().to_string(),
        "--cmdline".into(),
        "console=ttyS0 workload=fill,serve mib=8".into(),
    ];
    let mut g = GuestProc::spawn(Path::new(BIN), &args, None).unwrap();
    g.wait_line("SERVE ready", LONG).unwrap();
    let c = ApiClient::new(&sock).unwrap();
    for path in ["/vm/balloon", "/vm/balloon/statistics"] {
        assert_eq!(
            c.request(Method::GET, path, None).unwrap().0,
            StatusCode::NOT_FOUND
        );
    }
    assert_eq!(
        put_balloon(&sock, r#"{"amount_mib": 1}"#),
        StatusCode::NOT_FOUND
    );
    // And the guest's free workload says why it cannot run.
    g.send("free 10").unwrap();
    g.wait_line("ERROR free needs a virtio-balloon", LONG)
        .unwrap();
    let _ = g.exit(Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The daemon's view of one guest (`GET /guests`).
fn daemon_guest(d: &Daemon, name: &str) -> Value {
    let v = d.ksm_json(&["guests", "--json"]);
    v.as_array()
        .or_else(|| v["guests"].as_array())
        .and_then(|a| a.iter().find(|g| g["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no guest {name} in {v:#}"))
}

#[test]
fn merged_pages_reported_free_release_their_frames() {
    require_kvm!();
    let d = Daemon::fast("balloon-merge");
    let mib = 32;
    let pages = mib * 256;
    let merge = d.socket().display().to_string();
    let flags = |name: &'static str| {
        vec![
            "--share-memory".to_string(),
            "--merge-socket".to_string(),
            merge.clone(),
            "--no-daemon-autostart".to_string(),
            "--name".to_string(),
            name.to_string(),
        ]
    };
    let fa = flags("a");
    let fb = flags("b");
    let fa: Vec<&str> = fa.iter().map(String::as_str).collect();
    let fb: Vec<&str> = fb.iter().map(String::as_str).collect();
    let (mut a, _) = balloon_guest(&d.dir, "a", mib, "guest_seed=2", &fa);
    let (mut b, _) = balloon_guest(&d.dir, "b", mib, "guest_seed=3", &fb);
    // 60 % of the pages are the same in both guests: wait until they are merged.
    let s = d.wait_for("the shared pages merged", LONG, |s| {
        u(s, "pages_sharing") + u(s, "pages_shared") >= pages * 2 * 55 / 100
    });
    assert!(u(&s, "pages_shared") > 0, "{s:#}");
    let pool_before = u(&s, "pool_bytes");
    let frames_before = pool_before / PAGE;
    let freed_before = u(&s, "frames_freed");
    assert!(frames_before > pages / 2, "{s:#}");

    // Guest a gives everything back: the frames stay (b still maps them).
    let ra = free(&mut a, 100);
    assert_eq!(a.verify(LONG).unwrap(), pages);
    d.wait_for("a's reported pages counted", LONG, |_| {
        daemon_guest(&d, "a")["pages_reported"].as_u64() == Some(ra)
    });
    // Only pages outside the fill area (the guest image, identical in both guests) may
    // stay merged; every fill page gave its frame reference up.
    let outside = pages / 2;
    d.wait_for("a's frame references gone", LONG, |_| {
        daemon_guest(&d, "a")["merging_pages"].as_u64().unwrap() < outside / 20
    });
    let s = d.status();
    assert!(
        u(&s, "pool_bytes") > pool_before * 9 / 10,
        "b still maps the frames: {s:#}"
    );

    // Then b: no guest maps those frames any more, and they are freed.
    let rb = free(&mut b, 100);
    assert_eq!(b.verify(LONG).unwrap(), pages);
    let s = d.wait_for("the frames freed", LONG, |s| {
        u(s, "pool_bytes") < pool_before / 20
    });
    eprintln!(
        "pool {} -> {} bytes resident, frames freed {} -> {}",
        pool_before,
        u(&s, "pool_bytes"),
        freed_before,
        u(&s, "frames_freed")
    );
    assert!(
        u(&s, "frames_freed") - freed_before >= frames_before * 9 / 10,
        "{s:#}"
    );
    assert_eq!(daemon_guest(&d, "b")["pages_reported"], rb);
    // The metrics carry the counter too.
    let m = ApiClient::new(d.api())
        .unwrap()
        .request(Method::GET, "/metrics", None)
        .unwrap();
    let text = String::from_utf8_lossy(&m.1).to_string();
    assert!(text.contains("pages_reported"), "{text}");

    // Both write everything again and read their own data back.
    for g in [&mut a, &mut b] {
        g.send("fill").unwrap();
        g.wait_line("FILL done", LONG).unwrap();
        assert_eq!(g.verify(LONG).unwrap(), pages);
    }
    for g in [a, b] {
        assert!(g.exit(Duration::from_secs(30)).unwrap().success());
    }
}

#[test]
fn reports_while_the_daemon_merges_lose_nothing() {
    require_kvm!();
    let d = Daemon::fast("balloon-race");
    let mib = 32;
    let pages = mib * 256;
    let merge = d.socket().display().to_string();
    let flags = [
        "--share-memory",
        "--merge-socket",
        merge.as_str(),
        "--no-daemon-autostart",
    ];
    let (mut a, _) = balloon_guest(&d.dir, "a", mib, "guest_seed=2", &flags);
    let (mut b, _) = balloon_guest(&d.dir, "b", mib, "guest_seed=3", &flags);
    // Free, verify, rewrite, verify — again and again while the daemon merges (and splits
    // what the rewrites touch): a discard serialises with the agent's page work.
    let mut reported = 0;
    for round in 0..4 {
        for g in [&mut a, &mut b] {
            reported += free(g, 20 + 10 * round);
            assert_eq!(g.verify(LONG).unwrap(), pages);
            g.send("fill").unwrap();
            g.wait_line("FILL done", LONG).unwrap();
            assert_eq!(g.verify(LONG).unwrap(), pages);
        }
    }
    let s = d.status();
    eprintln!("{reported} pages reported; daemon: {s:#}");
    assert!(u(&s, "merges") > 0, "{s:#}");
    for g in [a, b] {
        assert!(g.exit(Duration::from_secs(30)).unwrap().success());
    }
}
