//! `--share-memory` end to end: real guests in separate `tinyvmm run` processes, merged by a
//! real `tinyvmm merged` daemon over its Unix socket, controlled through the REST socket.
//! Every test ends with each guest verifying every page of its memory. The scaffolding
//! (daemon, guests) is in `common/merge.rs`; what remains here is one scenario per test.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::merge::{exit_all, guest, u, verify_all, Daemon, Profile, BIN, LONG};
use tinyvmm::fleet::guest::{field, GuestProc};
use tinyvmm::fleet::procfs;

fn converge(n: u64, mib: u64) {
    // The scanner starts stopped, so that the baseline below is the guests' memory before
    // any merging (with it running, the first guests would be merged before the last one
    // has filled, and the baseline would already be low).
    let d = Daemon::start(
        &format!("converge{n}"),
        &["--pages-to-scan", "20000", "--sleep-ms", "5", "--run", "0"],
    );
    let p = Profile {
        mib,
        extra: "shared_pct=60 zero_pct=20".into(),
    };
    let mut guests = Vec::new();
    let mut shared = 0;
    let mut zero = 0;
    let mut pages = 0;
    for i in 0..n {
        let (g, fill) = guest(&d, 10 + i as u32, &p, &[]);
        shared = field(&fill, "shared").unwrap();
        zero = field(&fill, "zero").unwrap();
        pages = field(&fill, "pages").unwrap();
        guests.push(g);
    }
    let pss_before: u64 = guests
        .iter()
        .map(|g| procfs::pss_bytes(g.pid()).unwrap())
        .sum();
    assert_eq!(
        u(&d.status(), "pages_sharing"),
        0,
        "nothing merged with run=0"
    );
    d.set(&["--run", "1"]);
    // Converged: pages_sharing covers (n-1) copies of every shared fill page.
    let want_sharing = (n - 1) * shared;
    let s = d.wait_for("convergence", LONG, |s| {
        u(s, "pages_sharing") >= want_sharing
            && u(s, "zero_pages") >= n * zero
            && u(s, "full_scans") >= 3
    });
    // Within 1 %: the guest kernels' own identical pages (image, tables) add a little.
    let shared_frames = u(&s, "pages_shared");
    assert!(
        shared_frames >= shared && (shared_frames as f64) <= shared as f64 * 1.01 + 64.0,
        "pages_shared {shared_frames} vs {shared} shared fill pages"
    );
    let sharing = u(&s, "pages_sharing");
    assert!(
        (sharing as f64) <= want_sharing as f64 * 1.01 + 64.0 * n as f64,
        "pages_sharing {sharing} vs {want_sharing}"
    );
    // Host memory: the guests' Pss now holds one copy of the shared pages, the unique
    // pages of each guest, and no zero pages.
    let pss_after: u64 = guests
        .iter()
        .map(|g| procfs::pss_bytes(g.pid()).unwrap())
        .sum();
    let unique = pages - shared - zero;
    let physical = (shared + n * unique) * 4096;
    assert!(
        (pss_after as f64) < physical as f64 * 1.15 + ((n * 8) << 20) as f64,
        "Pss {} MiB after merging vs {} MiB physical limit (before: {} MiB)",
        pss_after >> 20,
        physical >> 20,
        pss_before >> 20
    );
    assert!(pss_after < pss_before, "merging saves memory");
    let pool = u(&s, "pool_bytes");
    assert!(
        pool >= shared * 4096 && pool <= (shared_frames + 64) * 4096,
        "pool holds the shared frames: {pool} bytes for {shared_frames} frames"
    );
    verify_all(&mut guests, pages);
    // The guests' views are unchanged after verify; the counters too (nothing was written).
    exit_all(guests);
    // Their frames are released when they leave.
    d.wait_for("guests removed", LONG, |s| {
        u(s, "pages_shared") == 0 && u(s, "guests") == 0
    });
}

#[test]
fn two_guests_converge_and_verify() {
    require_kvm!();
    converge(2, 128);
}

#[test]
fn four_guests_converge_and_verify() {
    require_kvm!();
    converge(4, 128);
}

/// Two guests rewrite pages (and verify them every 2 s) for 30 s while a daemon with
/// `flags` merges as fast as it can: no write is lost, merged pages split and frames whose
/// last sharer split are freed.
fn churn_while_merging(name: &str, flags: &[&str]) {
    let mut all = vec!["--pages-to-scan", "50000", "--sleep-ms", "0"];
    all.extend_from_slice(flags);
    let d = Daemon::start(name, &all);
    let p = Profile {
        mib: 64,
        extra: "shared_pct=60 zero_pct=20 churn_tick_ms=5".into(),
    };
    let mut guests: Vec<GuestProc> = (0..2).map(|i| guest(&d, 20 + i, &p, &[]).0).collect();
    d.wait_for("first merges", LONG, |s| u(s, "pages_sharing") > 1000);
    for g in guests.iter_mut() {
        g.send("churn 20 30000").unwrap();
    }
    for g in guests.iter_mut() {
        // 30 s of guest time; far longer on a loaded host.
        let line = g.wait_line("CHURN done", Duration::from_secs(300)).unwrap();
        assert!(field(&line, "writes").unwrap() > 100_000, "{line}");
        g.wait_line("SERVE ready", LONG).unwrap();
    }
    let s = d.status();
    assert!(
        u(&s, "splits") > 0,
        "guest writes split merged pages: {s:#}"
    );
    assert!(
        u(&s, "frames_freed") > 0,
        "frames freed when the last sharer split: {s:#}"
    );
    let pages = 64 * 256;
    verify_all(&mut guests, pages);
    exit_all(guests);
}

#[test]
fn churning_guests_lose_no_write_while_merging_aggressively() {
    require_kvm!();
    churn_while_merging("churn", &[]);
}

/// The same with the sequential scanner (`--sequential-scan`); the default, concurrent
/// rounds, can answer a digest while other page work changes its guest's pages (those
/// pages are then left out of it: without that, this test lost pages 3 times in 3).
#[test]
fn churning_guests_lose_no_write_with_the_sequential_scanner() {
    require_kvm!();
    churn_while_merging("churn-sequential", &["--sequential-scan"]);
}

#[test]
fn share_groups_never_share_frames() {
    require_kvm!();
    let d = Daemon::fast("groups");
    let p = Profile {
        mib: 32,
        extra: "shared_pct=90 zero_pct=0".into(),
    };
    let (a, fill) = guest(&d, 30, &p, &["--share-group", "red"]);
    let (b, _) = guest(&d, 31, &p, &["--share-group", "blue"]);
    let shared = field(&fill, "shared").unwrap();
    // Identical content, but one guest per group: nothing to share with.
    std::thread::sleep(Duration::from_secs(3));
    let s = d.wait_for("two full scans", LONG, |s| u(s, "full_scans") >= 3);
    assert!(u(&s, "pages_sharing") < 64, "no cross-group sharing: {s:#}");
    // A second guest in group red shares with the first.
    let (c, _) = guest(&d, 32, &p, &["--share-group", "red"]);
    let s = d.wait_for("red converges", LONG, |s| u(s, "pages_sharing") >= shared);
    assert!(u(&s, "pages_sharing") < shared + 128, "{s:#}");
    let groups = d.ksm_json(&["guests", "--json"]);
    let groups: Vec<&str> = groups
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["share_group"].as_str().unwrap())
        .collect();
    assert_eq!(groups.iter().filter(|g| **g == "red").count(), 2);
    let mut guests = vec![a, b, c];
    verify_all(&mut guests, 32 * 256);
    exit_all(guests);
}

#[test]
fn daemon_killed_mid_merge_then_guest_killed_then_restart_loses_nothing() {
    require_kvm!();
    let mut d = Daemon::start("kill", &["--pages-to-scan", "2000", "--sleep-ms", "1"]);
    let p = Profile::plain(64);
    let mut guests: Vec<GuestProc> = (0..3).map(|i| guest(&d, 40 + i, &p, &[]).0).collect();
    d.wait_for("merging under way", LONG, |s| u(s, "pages_sharing") > 2000);
    d.kill9();
    // Guests keep running with their merged pages: they still verify, and still split.
    for g in guests.iter_mut() {
        g.send("churn 5 500").unwrap();
        g.wait_line("CHURN done", LONG).unwrap();
        g.wait_line("SERVE ready", LONG).unwrap();
    }
    verify_all(&mut guests, 64 * 256);
    // A guest killed while the daemon is down.
    let victim = guests.pop().unwrap();
    drop(victim);
    // A new daemon: the survivors register again (they retry every second) and merge anew.
    d.spawn(&["--pages-to-scan", "20000", "--sleep-ms", "5"]);
    let s = d.wait_for("re-registration", LONG, |s| {
        u(s, "guests") == 2 && u(s, "pages_sharing") > 5000
    });
    assert!(u(&s, "guests_failed") == 0, "{s:#}");
    verify_all(&mut guests, 64 * 256);
    let pid = d.pid();
    assert!(procfs::pss_bytes(pid).is_some());
    exit_all(guests);
}

#[test]
fn tiny_vma_budget_merges_what_fits_and_reports_the_rest() {
    require_kvm!();
    let d = Daemon::fast("budget");
    let p = Profile::plain(32);
    let (a, _) = guest(&d, 50, &p, &["--vma-budget", "40"]);
    let (b, _) = guest(&d, 51, &p, &["--vma-budget", "40"]);
    let s = d.wait_for("budget exhausted", LONG, |s| {
        u(s, "pages_skipped_vma_budget") > 0 && u(s, "full_scans") >= 3
    });
    assert!(u(&s, "pages_sharing") > 0, "what fits is merged: {s:#}");
    let gs = d.ksm_json(&["guests", "--json"]);
    for g in gs.as_array().unwrap() {
        assert!(
            g["vma_mappings"].as_u64().unwrap() <= 40,
            "budget respected: {g:#}"
        );
    }
    let mut guests = vec![a, b];
    verify_all(&mut guests, 32 * 256);
    exit_all(guests);
}

#[test]
fn run_2_unmerges_everything_and_frees_the_pool() {
    require_kvm!();
    let d = Daemon::fast("unmerge");
    let p = Profile::plain(32);
    let mut guests: Vec<GuestProc> = (0..2).map(|i| guest(&d, 60 + i, &p, &[]).0).collect();
    d.wait_for("merged", LONG, |s| u(s, "pages_sharing") > 3000);
    d.set(&["--run", "2"]);
    let s = d.wait_for("unmerged", LONG, |s| {
        u(s, "pages_sharing") == 0 && u(s, "pages_shared") == 0
    });
    assert_eq!(s["run"].as_u64(), Some(2));
    assert!(u(&s, "pool_bytes") < 64 * 4096, "pool freed: {s:#}");
    verify_all(&mut guests, 32 * 256);
    // Nothing merges while run=2 ... and run=1 merges again.
    d.set(&["--run", "1"]);
    d.wait_for("merged again", LONG, |s| u(s, "pages_sharing") > 3000);
    verify_all(&mut guests, 32 * 256);
    exit_all(guests);
}

#[test]
fn share_memory_autostarts_one_daemon_for_concurrent_guests() {
    require_kvm!();
    let dir = common::scratch_dir("autostart");
    let sock = dir.join("merged.sock");
    let cmdline = "console=ttyS0 reboot=k panic=-1 workload=fill,serve mib=16";
    let spawn = || {
        Command::new(BIN)
            .env("TINYVMM_RUN_DIR", &dir)
            .args([
                "run",
                "--mem",
                "32M",
                "--share-memory",
                "--cmdline",
                cmdline,
            ])
            .arg("--merge-socket")
            .arg(&sock)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut a = spawn();
    let mut b = spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no daemon was started");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    let daemons: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.contains(" merged ") && cmd.contains(sock.to_str()?)).then_some(pid)
        })
        .collect();
    assert_eq!(daemons.len(), 1, "exactly one daemon: {daemons:?}");
    // It inherits none of the VMM's descriptors: every eventfd, userfaultfd and KVM fd of
    // the VMs is close-on-exec, and the daemon holds no KVM or userfaultfd fd.
    let fds_of = |pid: u32| -> Vec<(String, String)> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let link = std::fs::read_link(e.path()).ok()?;
                let info = std::fs::read_to_string(format!(
                    "/proc/{pid}/fdinfo/{}",
                    e.file_name().to_string_lossy()
                ))
                .ok()?;
                Some((link.to_string_lossy().into_owned(), info))
            })
            .collect()
    };
    for vm in [a.id(), b.id()] {
        for (link, info) in fds_of(vm) {
            if ["eventfd", "userfaultfd", "kvm"]
                .iter()
                .any(|k| link.contains(k))
            {
                let flags = info
                    .lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                    .unwrap();
                assert_ne!(flags & 0o2000000, 0, "VM fd {link} is not close-on-exec");
            }
        }
    }
    let daemon_fds = fds_of(daemons[0]);
    assert!(
        !daemon_fds
            .iter()
            .any(|(l, _)| l.contains("userfaultfd") || l.contains("kvm")),
        "the daemon inherited a VM descriptor: {daemon_fds:?}"
    );
    let mode = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    for c in [&mut a, &mut b] {
        let _ = c.kill();
        let _ = c.wait();
    }
    // SIGTERM stops it (it must not inherit the VMM's blocked signals).
    // SAFETY: signalling the daemon we made.
    unsafe { libc::kill(daemons[0] as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{}", daemons[0])).exists()
        && !std::fs::read_to_string(format!("/proc/{}/stat", daemons[0]))
            .unwrap_or_default()
            .contains(") Z ")
    {
        assert!(Instant::now() < deadline, "the daemon ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Another user could pre-create a world-writable run directory and put a fake daemon's
/// socket in it: the VM refuses that directory with a clear message, never connects, and
/// its guest runs unmerged and loses nothing.
#[test]
fn fake_daemon_in_a_world_writable_run_dir_is_refused() {
    require_kvm!();
    let dir = common::scratch_dir("fake-daemon");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let sock = dir.join("merged.sock");
    let fake = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    fake.set_nonblocking(true).unwrap();
    let out = Command::new(BIN)
        .env("TINYVMM_RUN_DIR", &dir)
        .args([
            "run",
            "--mem",
            "32M",
            "--share-memory",
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1 workload=fill,wait,verify mib=16 wait_ms=1500",
        ])
        .arg("--merge-socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("VERIFY OK"), "{stdout}");
    assert!(
        stderr.contains("refusing the merge daemon")
            && stderr.contains("writable by group or others"),
        "{stderr}"
    );
    assert!(
        matches!(fake.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the VM connected to the fake daemon"
    );
}

#[test]
fn hostile_messages_on_the_daemon_socket_are_rejected() {
    require_kvm!();
    use std::io::Write;
    let d = Daemon::fast("hostile");
    let p = Profile::plain(16);
    let (mut g, _) = guest(&d, 70, &p, &[]);
    for junk in [
        &b"\xff\xff\xff\xff"[..],
        b"\x04\x00\x00\x00\x09\x09\x09\x09",
        b"GET / HTTP/1.1\r\n\r\n",
        b"",
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
        let _ = s.write_all(junk);
        drop(s);
    }
    // A client that connects and says nothing.
    let _silent = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let s = d.status();
    assert_eq!(u(&s, "guests"), 1, "{s:#}");
    assert_eq!(g.verify(LONG).unwrap(), 16 * 256);
    let log = d.log();
    assert!(
        log.contains("bad hello") || log.contains("expected a hello"),
        "{log}"
    );
    exit_all(vec![g]);
}

#[test]
fn kernel_ksm_mode_marks_guest_ram_mergeable() {
    require_kvm!();
    let dir = common::scratch_dir("kernelksm");
    let args: Vec<String> = [
        "--mem",
        "64M",
        "--share-memory=kernel",
        "--cmdline",
        "console=ttyS0 workload=fill,serve mib=16",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut g = GuestProc::spawn(Path::new(BIN), &args, Some(&dir.join("g.log"))).unwrap();
    g.wait_line("SERVE ready", LONG).unwrap();
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", g.pid())).unwrap();
    let mergeable = smaps
        .lines()
        .filter(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "mg"))
        .count();
    assert!(mergeable >= 1, "guest RAM is MADV_MERGEABLE");
    assert_eq!(g.verify(LONG).unwrap(), 16 * 256);
    exit_all(vec![g]);
}

#[test]
fn knobs_steer_the_scanner_run_0_stops_and_pages_to_scan_sets_the_rate() {
    require_kvm!();
    let d = Daemon::start(
        "knobs",
        &["--pages-to-scan", "100", "--sleep-ms", "20", "--run", "0"],
    );
    let p = Profile::plain(128);
    let mut guests: Vec<GuestProc> = (0..2).map(|i| guest(&d, 80 + i, &p, &[]).0).collect();
    // run=0: nothing is scanned.
    std::thread::sleep(Duration::from_secs(1));
    let s = d.status();
    assert_eq!(u(&s, "run"), 0);
    assert_eq!(u(&s, "pages_scanned"), 0, "{s:#}");
    // run=1 at 100 pages per 20 ms: at most ~5000 pages/s.
    d.set(&["--run", "1"]);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let slow = u(&d.status(), "pages_scanned") as f64 / t0.elapsed().as_secs_f64();
    assert!(
        slow > 0.0 && slow <= 5000.0 * 1.2,
        "slow rate {slow} pages/s"
    );
    // pages_to_scan 20000: the first pass (65 k pages, still under way) speeds up, as far as
    // the merge work of each round allows.
    d.set(&["--pages-to-scan", "20000"]);
    let before = u(&d.status(), "pages_scanned");
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_millis(400));
    let fast = (u(&d.status(), "pages_scanned") - before) as f64 / t1.elapsed().as_secs_f64();
    assert!(fast > slow * 2.5, "fast rate {fast} vs slow {slow} pages/s");
    // run=0 again: progress stops, merged pages stay merged.
    let merged = d.wait_for("merges", LONG, |s| u(s, "pages_sharing") > 1000);
    d.set(&["--run", "0"]);
    std::thread::sleep(Duration::from_millis(300));
    let a = u(&d.status(), "pages_scanned");
    std::thread::sleep(Duration::from_secs(1));
    let s = d.status();
    assert_eq!(u(&s, "pages_scanned"), a, "run=0 stops the scanner");
    assert!(u(&s, "pages_sharing") >= u(&merged, "pages_sharing"));
    // Bad values are refused and change nothing.
    let out = Command::new(BIN)
        .args(["ksm", "set", "--pages-to-scan", "0", "--api-sock"])
        .arg(d.api())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(u(&d.status(), "pages_to_scan"), 20000);
    verify_all(&mut guests, 128 * 256);
    exit_all(guests);
}

#[test]
fn control_api_over_loopback_tcp_only_when_asked() {
    use std::io::{Read, Write};
    let port = 20000 + (std::process::id() % 20000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let tokens = common::scratch_dir("tcp-token");
    let token_file = tokens.join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let d = Daemon::start(
        "tcp",
        &[
            "--api-tcp",
            &addr,
            "--api-token-file",
            token_file.to_str().unwrap(),
        ],
    );
    let get = |auth: &str| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(
            format!("GET /ksm HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        resp
    };
    let resp = get("Authorization: Bearer s3cret-token\r\n");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"pages_to_scan\""), "{resp}");
    let resp = get("");
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    drop(d);
    // --api-tcp without a token file is refused by the command line.
    let out = Command::new(BIN)
        .args(["merged", "--api-tcp", &addr])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--api-token-file"));
    // A non-loopback address is refused with a clear error, and no daemon keeps running.
    let dir = common::scratch_dir("tcp-refused");
    let out = Command::new(BIN)
        .env("TINYVMM_RUN_DIR", &dir)
        .args(["merged", "--api-tcp", "0.0.0.0:1", "--api-token-file"])
        .arg(&token_file)
        .arg("--socket")
        .arg(dir.join("merged.sock"))
        .arg("--api-sock")
        .arg(dir.join("api.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loopback"), "{err}");
}

#[test]
fn guests_with_ram_above_4g_merge_across_both_ram_ranges() {
    require_kvm!();
    let d = Daemon::fast("highmem");
    // 3.25 GiB: 3 GiB below the MMIO gap, 256 MiB above 4 GiB — two RAM slots, one page
    // index space for the agent and the engine.
    let p = Profile {
        mib: 64,
        extra: String::new(),
    };
    let mut guests = Vec::new();
    let mut shared = 0;
    for seed in [90, 91] {
        let cmdline = format!(
            "console=ttyS0 reboot=k panic=-1 workload=fill,serve mib={} seed=1 guest_seed={seed}",
            p.mib
        );
        let args: Vec<String> = [
            "--mem",
            "3328M",
            "--cmdline",
            &cmdline,
            "--share-memory",
            "--no-daemon-autostart",
            "--merge-socket",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([d.socket().display().to_string()])
        .collect();
        let mut g = GuestProc::spawn(
            Path::new(BIN),
            &args,
            Some(&d.dir.join(format!("g{seed}.log"))),
        )
        .unwrap();
        let fill = g.wait_line("FILL done", LONG).unwrap();
        shared = field(&fill, "shared").unwrap();
        g.wait_line("SERVE ready", LONG).unwrap();
        guests.push(g);
    }
    let pages_per_guest = 3328 * 256;
    // Every untouched page (most of both ranges) is a zero page; the fill's shared pages merge.
    let s = d.wait_for("both ranges scanned", LONG, |s| {
        u(s, "pages_sharing") >= shared && u(s, "zero_pages") >= 2 * (pages_per_guest - 64 * 256)
    });
    assert!(u(&s, "guests_failed") == 0, "{s:#}");
    verify_all(&mut guests, 64 * 256);
    exit_all(guests);
}

#[test]
fn agent_that_stops_answering_keeps_its_frames_while_its_vm_lives() {
    require_kvm!();
    let d = Daemon::start(
        "stalled",
        &[
            "--pages-to-scan",
            "20000",
            "--sleep-ms",
            "5",
            "--request-timeout-ms",
            "1500",
        ],
    );
    let p = Profile::plain(32);
    let mut guests: Vec<GuestProc> = (0..2).map(|i| guest(&d, 100 + i, &p, &[]).0).collect();
    let merged = d.wait_for("merged", LONG, |s| u(s, "pages_sharing") > 3000);
    // The second VM leaves: the first is now the only one mapping the shared frames.
    exit_all(guests.split_off(1));
    d.wait_for("second guest gone", LONG, |s| u(s, "guests") == 1);
    // Freeze the first VM: its agent stops answering and the daemon drops it after the
    // timeout. Its pages still map the frames, so they must stay while the VM lives.
    let frozen = guests[0].pid() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(frozen, libc::SIGSTOP) };
    d.wait_for("the frozen agent dropped", LONG, |s| {
        u(s, "guests_failed") >= 1 || u(s, "guests") == 0
    });
    std::thread::sleep(Duration::from_secs(1));
    let s = d.status();
    assert!(
        u(&s, "pool_bytes") >= u(&merged, "pages_shared") * 4096 * 9 / 10,
        "frames kept while the frozen VM lives: {s:#}"
    );
    // SAFETY: as above.
    unsafe { libc::kill(frozen, libc::SIGCONT) };
    // Thawed, it reads back everything it wrote, and registers again.
    verify_all(&mut guests, 32 * 256);
    exit_all(guests);
    d.wait_for("all frames released", LONG, |s| {
        u(s, "pages_shared") == 0 && u(s, "pool_bytes") == 0 && u(s, "guests") == 0
    });
}
