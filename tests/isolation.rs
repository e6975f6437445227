//! A VMM process may be hostile (a guest may own it): what it can do to the merge daemon
//! and to the other guests of its share group. Real guests, a real daemon, and a hostile
//! client built on the project's own protocol module.

mod common;

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::merge::{exit_all, guest, u, verify_all, Daemon, Profile, LONG};
use common::tenant::{as_uid, http_get, http_put, stat, Tenant};
use tinyvmm_merge_protocol::wire::{self, AgentMsg, DaemonMsg, Hello, PROTOCOL_VERSION};

/// Registers like an agent and returns the pool descriptor the daemon hands out, then
/// hangs up (so that the daemon drops this "guest" instead of waiting on it).
fn pool_fd_as_a_vm_gets_it(d: &Daemon) -> OwnedFd {
    let mut s = UnixStream::connect(d.socket()).unwrap();
    let hello = AgentMsg::Hello(Hello {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
        name: "hostile".into(),
        pages: 1024,
        share_group: "default".into(),
        vma_budget: 1000,
        dirty_source: false,
        run_as_uid: None,
    });
    wire::send(&mut s, &hello, None).unwrap();
    let (msg, fd) = wire::recv::<DaemonMsg>(&mut s).unwrap();
    assert!(matches!(msg, DaemonMsg::Welcome { .. }), "{msg:?}");
    fd.expect("the pool is attached to the welcome")
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// In a child that dropped to uid/gid 65534 (no `CAP_DAC_OVERRIDE`): whether reopening
/// `fd` through `/proc/self/fd` read-only works (0) and read-write is refused (errno).
fn reopen_as_nobody(fd: i32) -> (i32, i32) {
    let path = CString::new(format!("/proc/self/fd/{fd}")).unwrap();
    // SAFETY: the child only makes async-signal-safe calls (setgid, setuid, open, write,
    // _exit) before it exits; the parent waits for it.
    unsafe {
        let mut pipe = [0i32; 2];
        assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            let mut res = [-1i32, -1i32];
            if libc::setgid(65534) == 0 && libc::setuid(65534) == 0 {
                let ro = libc::open(path.as_ptr(), libc::O_RDONLY);
                res[0] = if ro >= 0 { 0 } else { errno() };
                let rw = libc::open(path.as_ptr(), libc::O_RDWR);
                res[1] = if rw >= 0 { 0 } else { errno() };
            }
            libc::write(pipe[1], res.as_ptr().cast(), 8);
            libc::_exit(0);
        }
        libc::close(pipe[1]);
        let mut res = [-1i32, -1i32];
        libc::read(pipe[0], res.as_mut_ptr().cast(), 8);
        libc::close(pipe[0]);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        (res[0], res[1])
    }
}

/// The pool a VM process receives is read-only: writing, punching, truncating, mapping
/// it writable-shared and reopening it writable (without `CAP_DAC_OVERRIDE`) all fail,
/// and the guests that map its frames keep verifying.
#[test]
fn the_pool_a_vm_receives_cannot_be_written_punched_truncated_or_reopened_writable() {
    require_kvm!();
    let d = Daemon::fast("isolation-pool");
    let p = Profile::plain(32);
    let mut guests: Vec<_> = (0..2).map(|i| guest(&d, 80 + i, &p, &[]).0).collect();
    let merged = d.wait_for("merging", LONG, |s| u(s, "pages_sharing") > 2000);
    let pool_before = u(&merged, "pool_bytes");
    assert!(pool_before > 0);

    let fd = pool_fd_as_a_vm_gets_it(&d);
    let raw = fd.as_raw_fd();
    let page = [0xeeu8; 4096];
    // SAFETY: system calls on a descriptor we own, with a local buffer; each is expected
    // to fail without touching anything.
    unsafe {
        assert_eq!(libc::pwrite(raw, page.as_ptr().cast(), 4096, 0), -1);
        assert_eq!(errno(), libc::EBADF, "pwrite");
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(libc::fallocate(raw, punch, 0, 64 << 20), -1);
        assert_eq!(errno(), libc::EBADF, "fallocate(PUNCH_HOLE)");
        assert_eq!(libc::ftruncate(raw, 0), -1, "ftruncate");
        let shared_rw = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            raw,
            0,
        );
        assert_eq!(shared_rw, libc::MAP_FAILED, "a writable shared mapping");
        let ro = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            raw,
            0,
        );
        assert_ne!(ro, libc::MAP_FAILED);
        assert_eq!(
            libc::mprotect(ro, 4096, libc::PROT_READ | libc::PROT_WRITE),
            -1
        );
        assert_eq!(errno(), libc::EACCES, "mprotect to writable");
        libc::munmap(ro, 4096);
        // The size is sealed, and the file is 0444.
        let seals = libc::fcntl(raw, libc::F_GET_SEALS);
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want, "seals {seals:#x}");
        let mut st: libc::stat = std::mem::zeroed();
        assert_eq!(libc::fstat(raw, &mut st), 0);
        assert_eq!(st.st_mode & 0o777, 0o444);
    }
    let (ro, rw) = reopen_as_nobody(raw);
    assert_eq!(
        ro, 0,
        "read-only reopen works (the check below is about the mode)"
    );
    assert_eq!(
        rw,
        libc::EACCES,
        "read-write reopen without CAP_DAC_OVERRIDE"
    );
    drop(fd);

    // Nothing of the above reached the frames the guests map.
    std::thread::sleep(Duration::from_millis(500));
    let s = d.status();
    assert!(
        u(&s, "pages_sharing") >= u(&merged, "pages_sharing") - 64,
        "{s:#}"
    );
    assert!(u(&s, "pool_bytes") >= pool_before - (64 << 12), "{s:#}");
    verify_all(&mut guests, 32 * 256);
    exit_all(guests);
}

fn hello(pages: u64, group: &str) -> AgentMsg {
    AgentMsg::Hello(Hello {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
        name: "flood".into(),
        pages,
        share_group: group.into(),
        vma_budget: 1000,
        dirty_source: false,
        run_as_uid: None,
    })
}

fn daemon_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A VM process that floods the daemon: a hello declaring 2^30 pages, thousands of
/// register/close loops under new group names, two thousand idle connections, a client that
/// trickles its hello. The daemon's memory and descriptors stay bounded, its CPU idles
/// again, and the real guests keep merging and verifying.
#[test]
fn a_flooding_vm_process_cannot_exhaust_the_daemon() {
    use tinyvmm::fleet::procfs;
    require_kvm!();
    let d = Daemon::fast("isolation-flood");
    let p = Profile::plain(16);
    let mut guests: Vec<_> = (0..2).map(|i| guest(&d, 90 + i, &p, &[]).0).collect();
    let merged = d.wait_for("merging", LONG, |s| u(s, "pages_sharing") > 1000);
    let meta0 = u(&merged, "engine_metadata_bytes");
    let pid = d.pid();
    let rss0 = procfs::rss_bytes(pid).unwrap();
    let fds0 = daemon_fds(pid);

    // 2^30 declared pages (16 GiB of engine metadata if the daemon believed it).
    let mut s = UnixStream::connect(d.socket()).unwrap();
    wire::send(&mut s, &hello(1 << 30, "huge"), None).unwrap();
    let (msg, _) = wire::recv::<DaemonMsg>(&mut s).unwrap();
    assert!(
        matches!(&msg, DaemonMsg::Refused(why) if why.contains("limits")),
        "{msg:?}"
    );

    // Register and hang up, 10 000 times, each under a new group name.
    for i in 0..10_000 {
        let mut s = UnixStream::connect(d.socket()).unwrap();
        wire::send(&mut s, &hello(256, &format!("g{i}")), None).unwrap();
        let _ = wire::recv::<DaemonMsg>(&mut s);
    }

    // Two thousand connections that never say hello (more than the daemon's descriptor
    // limit may allow: it backs off), and one that trickles its hello.
    // SAFETY: raising this process's own descriptor limit to its hard limit.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    let idle: Vec<UnixStream> = (0..2000)
        .filter_map(|_| UnixStream::connect(d.socket()).ok())
        .collect();
    let mut trickle = UnixStream::connect(d.socket()).unwrap();
    let started = std::time::Instant::now();
    let mut cut_off = false;
    for _ in 0..12 {
        use std::io::Write;
        if trickle.write_all(&[1]).is_err() {
            cut_off = true;
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        cut_off,
        "a trickling hello is cut off (after {:?})",
        started.elapsed()
    );
    drop(idle);

    // Bounded, and idle again.
    let s = d.wait_for("the dead registrations dropped", LONG, |s| {
        u(s, "guests") == 2
    });
    let scans = u(&s, "full_scans");
    // 10 000 group names came and went: the engine keeps no state for any of them.
    let meta1 = u(&s, "engine_metadata_bytes");
    assert!(
        meta1 <= meta0 + (64 << 10),
        "engine metadata {meta0} -> {meta1} bytes after 10 000 short-lived groups"
    );
    std::thread::sleep(Duration::from_secs(2));
    let rss1 = procfs::rss_bytes(pid).unwrap();
    let fds1 = daemon_fds(pid);
    eprintln!(
        "daemon RSS {} -> {} KiB, fds {fds0} -> {fds1}",
        rss0 >> 10,
        rss1 >> 10
    );
    assert!(rss1 < rss0 + (64 << 20), "RSS {rss0} -> {rss1}");
    assert!(
        fds1 <= fds0 + 8,
        "descriptors {fds0} -> {fds1}: pools of empty groups closed"
    );
    let cpu0 = procfs::process_cpu(pid).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let cpu = procfs::process_cpu(pid).unwrap() - cpu0;
    assert!(
        cpu < Duration::from_millis(1500),
        "daemon CPU {cpu:?} in 3 s"
    );
    d.wait_for("scanning goes on", LONG, |s| u(s, "full_scans") > scans);
    verify_all(&mut guests, 16 * 256);
    exit_all(guests);
}

/// The lines of `/proc/PID/status` (or a task's) that start with `key:`, values only.
fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in {status}"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks that VMM `pid` runs as uid/gid 65534 with no capability in any set,
/// `no_new_privs` and a seccomp filter on every thread; returns the thread names.
fn assert_jailed(pid: u32) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(status_field(&status, "Uid"), "65534 65534 65534 65534");
    assert_eq!(status_field(&status, "Gid"), "65534 65534 65534 65534");
    assert_eq!(status_field(&status, "Groups"), "");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(&status, set), "0000000000000000", "{set}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let Ok(st) = std::fs::read_to_string(task.join("status")) else {
            continue; // a thread that just ended
        };
        let name = name.trim().to_string();
        assert_eq!(status_field(&st, "Seccomp"), "2", "thread {name}");
        assert_eq!(status_field(&st, "NoNewPrivs"), "1", "thread {name}");
        assert_eq!(
            status_field(&st, "CapEff"),
            "0000000000000000",
            "thread {name}"
        );
        assert_eq!(
            status_field(&st, "CapBnd"),
            "0000000000000000",
            "thread {name}"
        );
        names.push(name);
    }
    names
}

/// A VMM run with `--uid 65534 --gid 65534` (and seccomp, on by default) fills, merges
/// with another guest through the daemon, serves its API and verifies: while it runs it
/// has the new ids, no capability in any set, `no_new_privs`, and seccomp on every thread.
#[test]
fn a_jailed_vmm_runs_its_guest_fully_with_no_privileges_and_seccomp_on_every_thread() {
    require_kvm!();
    let d = Daemon::fast("isolation-jail");
    let p = Profile::plain(32);
    let api = d.dir.join("jailed-vm.sock");
    let api_arg = api.display().to_string();
    // A disk too: its worker thread starts after the privilege drop, under its own filter.
    let disk = d.dir.join("jailed.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = disk.display().to_string();
    let jailed = guest(
        &d,
        70,
        &p,
        &[
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--api-sock",
            &api_arg,
            "--disk",
            &disk_arg,
        ],
    )
    .0;
    // Its share groups are those of the uid it drops to (named in its hello, taken from a
    // root peer): a second VMM jailed to the same uid shares with it.
    let other = guest(&d, 71, &p, &["--uid", "65534", "--gid", "65534"]).0;
    let s = d.wait_for("merging", LONG, |s| u(s, "pages_sharing") > 2000);
    let gs = d.ksm_json(&["guests", "--json"]);
    let mine = gs
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["pid"].as_u64() == Some(u64::from(jailed.pid())))
        .unwrap_or_else(|| panic!("the jailed guest is registered: {gs:#}"));
    for g in gs.as_array().unwrap() {
        assert_eq!(g["uid"], 65534, "filed under the jailed uid: {g:#}");
    }
    assert!(
        mine["merging_pages"].as_u64().unwrap() + mine["zero_pages"].as_u64().unwrap() > 1000,
        "the jailed guest's pages merge: {mine:#}"
    );

    let names = assert_jailed(jailed.pid());
    eprintln!("jailed VMM threads: {names:?}");
    for kind in ["vcpu0", "merge-agent", "tinyvmm-api", "virtio-blk"] {
        assert!(names.iter().any(|n| n == kind), "{kind} in {names:?}");
    }
    // Its API answers (and a call starts a blocking-pool thread, under the API's filter).
    let out = std::process::Command::new("curl")
        .args(["-s", "--unix-socket", &api_arg, "http://localhost/vm"])
        .output();
    match out {
        Ok(out) => {
            let vm: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("GET /vm: {e}: {:?}", out));
            assert_eq!(vm["merge"]["registered"], true, "GET /vm: {vm:#}");
        }
        Err(e) => eprintln!("SKIP of the API check: no curl ({e})"),
    }
    assert_jailed(jailed.pid());

    let mut guests = vec![jailed, other];
    verify_all(&mut guests, 32 * 256);
    // Churn splits merged pages (userfaultfd, remaps) in the jailed guest; merging goes on.
    let scans = u(&s, "full_scans");
    guests[0].send("churn 20 1000").unwrap();
    d.wait_for("more scans", LONG, |s| u(s, "full_scans") > scans + 2);
    verify_all(&mut guests, 32 * 256);
    assert_jailed(guests[0].pid());
    exit_all(guests);
}

/// A system call outside a vCPU thread's filter (the hidden test hook makes one right
/// after the filter is installed) ends the VMM with status 148 and a line naming the call
/// and the kind of thread (so does one on the API thread or the event loop); with
/// `--no-seccomp` the same run boots.
#[test]
fn a_vcpu_system_call_outside_the_filter_ends_the_vmm_naming_it() {
    require_kvm!();
    let cmdline = "console=ttyS0 reboot=k panic=-1 workload=fill mib=8";
    let run = |extra: &[&str]| {
        let mut args = vec!["--mem", "24M", "--cmdline", cmdline];
        args.extend_from_slice(extra);
        common::run_vm(&args, LONG)
    };
    let o = run(&["--seccomp-test-violation", "vcpu"]);
    assert_eq!(o.code(), Some(148), "stderr: {}", o.stderr);
    assert!(
        o.stderr
            .contains("bad system call 110 (getppid) on a vcpu thread"),
        "stderr: {}",
        o.stderr
    );
    assert!(o.line("DONE").is_none(), "the guest did not finish");

    // The other kinds report theirs the same way.
    let dir = common::scratch_dir("isolation-seccomp");
    let sock = dir.join("vm.sock").display().to_string();
    for (kind, name) in [("api", "vm-api"), ("main", "main (event loop)")] {
        let o = run(&["--api-sock", &sock, "--seccomp-test-violation", kind]);
        assert_eq!(o.code(), Some(148), "{kind}: {}", o.stderr);
        let want = format!("bad system call 110 (getppid) on a {name} thread");
        assert!(o.stderr.contains(&want), "{kind}: {}", o.stderr);
        let _ = std::fs::remove_file(&sock);
    }

    // A virtio device's worker too (the balloon's, started before the guest runs).
    let o = run(&["--balloon", "--seccomp-test-violation", "virtio-balloon"]);
    assert_eq!(o.code(), Some(148), "balloon: {}", o.stderr);
    assert!(
        o.stderr
            .contains("bad system call 110 (getppid) on a virtio-balloon thread"),
        "balloon: {}",
        o.stderr
    );

    let o = run(&["--seccomp-test-violation", "vcpu", "--no-seccomp"]);
    o.assert_ok();
    assert!(o.line("DONE").is_some(), "{}", o.stdout);
}

/// A VMM that cannot drop to `--uid` (here: root without CAP_SETUID) stops before the
/// guest runs, with the failed step named, and leaves no API socket behind.
#[test]
fn a_vmm_that_cannot_drop_its_privileges_does_not_run() {
    use std::os::unix::process::CommandExt;
    const CAP_SETUID: libc::c_ulong = 7;
    require_kvm!();
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("SKIP: needs root (the test removes CAP_SETUID from a root child)");
        return;
    }
    let dir = common::scratch_dir("isolation-nodrop");
    let sock = dir.join("vm.sock");
    let mut cmd = common::tinyvmm();
    cmd.args(["run", "--mem", "24M", "--uid", "1234", "--gid", "1234"])
        .arg("--api-sock")
        .arg(&sock)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            // Root keeps every capability across exec except those not in the bounding set.
            if libc::prctl(libc::PR_CAPBSET_DROP, CAP_SETUID, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = common::wait_with_timeout(cmd.spawn().unwrap(), LONG);
    assert_eq!(o.code(), Some(1), "stderr: {}", o.stderr);
    assert!(
        o.stderr.contains("cannot run as uid 1234 gid 1234") && o.stderr.contains("set the uid"),
        "stderr: {}",
        o.stderr
    );
    assert!(
        o.line("BOOTCHECK").is_none(),
        "the guest never ran: {}",
        o.stdout
    );
    assert!(!sock.exists(), "the API socket is removed");

    // A uid without a gid, or -1, is refused before anything starts.
    let o = common::run_vm(&["--uid", "1234"], LONG);
    assert_eq!(o.code(), Some(2), "{}", o.stderr);
    let o = common::run_vm(&["--uid", "4294967295", "--gid", "1"], LONG);
    assert_eq!(o.code(), Some(2), "{}", o.stderr);
}

/// Another tenant's uid (no account needed: only its credentials matter).
const OTHER_UID: u32 = 4242;

/// A daemon that other users may reach (`--socket-mode 666`), with `extra` flags.
fn multi_tenant_daemon(name: &str, extra: &[&str]) -> Daemon {
    let mut flags = vec![
        "--pages-to-scan",
        "20000",
        "--sleep-ms",
        "5",
        "--socket-mode",
        "666",
    ];
    flags.extend_from_slice(extra);
    Daemon::start(name, &flags)
}

/// The guests `uid` sees in `GET /guests`: (status, each guest's `domain`, `uid` and
/// `unshared_pages`).
fn guests_seen_by(uid: u32, d: &Daemon) -> (u16, Vec<(u64, u64, u64)>) {
    let api = d.api();
    let (status, v) = as_uid(uid, move || http_get(&api, "/guests"))
        .join()
        .unwrap();
    let seen = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|g| (u(g, "domain"), u(g, "uid"), u(g, "unshared_pages")))
                .collect()
        })
        .unwrap_or_default();
    (status, seen)
}

/// A VM process of another uid that names the real guests' share group gets a group of
/// its own: another pool (which stays empty while the guests merge), merge requests that
/// never join it to their frames although it claims their shared pages, and a control
/// API that does not show it their guests (nor lets it change a knob).
#[test]
fn another_uid_naming_the_guests_group_gets_a_group_of_its_own() {
    require_kvm!();
    let d = multi_tenant_daemon("isolation-tenant", &[]);
    let p = Profile::plain(16);
    let mut guests: Vec<_> = (0..2).map(|i| guest(&d, 100 + i, &p, &[]).0).collect();
    d.wait_for("merging", LONG, |s| u(s, "pages_sharing") > 1000);
    // Root's own registration in "default" gets the guests' pool: the reference.
    let theirs = pool_fd_as_a_vm_gets_it(&d);
    let (their_ino, their_blocks) = stat(&theirs);
    assert!(their_blocks > 0);

    let t = Tenant::register(OTHER_UID, &d.socket(), "default", 1024);
    assert_ne!(
        stat(&t.pool).0,
        their_ino,
        "another uid's \"default\" is another pool"
    );
    // Several full scans with the tenant registered: it is digested and, in the guests'
    // group, would have been asked to join their frames.
    let scans = u(&d.status(), "full_scans");
    d.wait_for("three full scans", LONG, |s| {
        u(s, "full_scans") >= scans + 3
    });
    let (status, seen) = guests_seen_by(OTHER_UID, &d);
    assert_eq!(status, 200);
    assert_eq!(
        seen.len(),
        1,
        "the other uid sees its own guest only: {seen:?}"
    );
    assert_eq!(seen[0].1, u64::from(OTHER_UID));
    // Digested: its pages are candidates in its own group, with no twin there.
    assert!(
        seen[0].2 >= 1000,
        "the tenant's pages were digested: {seen:?}"
    );
    let (_, all) = guests_seen_by(0, &d);
    assert_eq!(all.len(), 3, "root sees every guest: {all:?}");
    assert!(
        all.iter().filter(|g| g.1 == 0).all(|g| g.0 != seen[0].0),
        "different domains: {all:?}"
    );
    let api = d.api();
    let put = as_uid(OTHER_UID, move || http_put(&api, "/ksm/run", "2"))
        .join()
        .unwrap();
    assert_eq!(put, 403, "another uid cannot change the knobs");
    let r = t.finish();
    eprintln!("tenant of uid {OTHER_UID}: {r:?}");
    assert_eq!(r.merge_requests, 0, "never asked to join a frame: {r:?}");
    assert_eq!(r.joins_equal, 0, "{r:?}");
    assert_eq!(
        r.pool_blocks_end, 0,
        "its pool holds nothing of theirs: {r:?}"
    );
    assert_eq!(u(&d.status(), "run"), 1);
    verify_all(&mut guests, 16 * 256);
    exit_all(guests);
}

/// A share policy that lists both uids for a group makes their VMs share it: the other
/// uid's registration gets the guests' pool, is asked to join their frames, finds in them
/// exactly the pages it holds, and its pages count as merging; it sees the guests of the
/// group it shares.
#[test]
fn a_share_policy_lets_two_uids_share_a_group() {
    require_kvm!();
    let dir = common::scratch_dir("isolation-policy-file");
    let policy = dir.join("policy.json");
    std::fs::write(
        &policy,
        format!(r#"{{"groups": [{{"name": "default", "uids": [0, {OTHER_UID}]}}]}}"#),
    )
    .unwrap();
    let d = multi_tenant_daemon(
        "isolation-policy",
        &["--share-policy", policy.to_str().unwrap()],
    );
    let p = Profile::plain(16);
    let mut guests: Vec<_> = (0..2).map(|i| guest(&d, 110 + i, &p, &[]).0).collect();
    d.wait_for("merging", LONG, |s| u(s, "pages_sharing") > 1000);
    let theirs = pool_fd_as_a_vm_gets_it(&d);
    let t = Tenant::register(OTHER_UID, &d.socket(), "default", 1024);
    assert_eq!(stat(&t.pool).0, stat(&theirs).0, "the same pool");
    let id = t.guest;
    d.wait_for("the other uid's pages merging", LONG, |_| {
        let g = d.ksm_json(&["guests", "--json"]);
        g.as_array().is_some_and(|a| {
            a.iter()
                .any(|g| u(g, "id") == u64::from(id) && u(g, "merging_pages") > 500)
        })
    });
    let (_, seen) = guests_seen_by(OTHER_UID, &d);
    assert_eq!(
        seen.len(),
        3,
        "the group's members see its guests: {seen:?}"
    );
    assert!(
        seen.iter().all(|g| g.0 == seen[0].0),
        "one domain: {seen:?}"
    );
    let r = t.finish();
    eprintln!("tenant of uid {OTHER_UID}: {r:?}");
    assert!(r.joins_equal > 500, "joined the guests' frames: {r:?}");
    verify_all(&mut guests, 16 * 256);
    exit_all(guests);
    let _ = std::fs::remove_dir_all(dir);
}

/// `tinyvmm merged` refuses a malformed share policy at start, saying what is wrong.
#[test]
fn a_malformed_share_policy_stops_the_daemon_at_start() {
    let dir = common::scratch_dir("isolation-bad-policy");
    let policy = dir.join("policy.json");
    std::fs::write(&policy, r#"{"groups": [{"name": "ci", "uids": []}]}"#).unwrap();
    let out = common::tinyvmm()
        .env("TINYVMM_RUN_DIR", &dir)
        .args(["merged", "--share-policy"])
        .arg(&policy)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lists no uids"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Only root may register a VM for another uid (a VMM that registers, then drops to
/// `--uid`): another user who names a uid not its own — to join that tenant's groups — is
/// refused with the reason, and nothing is registered.
#[test]
fn a_user_cannot_register_a_vm_for_another_uid() {
    require_kvm!();
    let d = multi_tenant_daemon("isolation-claim", &[]);
    let socket = d.socket();
    let reply = as_uid(OTHER_UID, move || {
        let mut s = UnixStream::connect(&socket).unwrap();
        let hello = AgentMsg::Hello(Hello {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            name: "claims-root".into(),
            pages: 64,
            share_group: "default".into(),
            vma_budget: 1000,
            dirty_source: false,
            run_as_uid: Some(0),
        });
        wire::send(&mut s, &hello, None).unwrap();
        wire::recv::<DaemonMsg>(&mut s).unwrap().0
    })
    .join()
    .unwrap();
    match reply {
        DaemonMsg::Refused(why) => {
            assert!(why.contains("may not register a VM for uid 0"), "{why}")
        }
        other => panic!("registered for root: {other:?}"),
    }
    assert_eq!(u(&d.status(), "guests"), 0);
}
/// Registers a hostile "agent" of `pages` pages in the default group; returns its socket.
fn register(d: &Daemon, name: &str, pages: u64) -> UnixStream {
    let mut s = UnixStream::connect(d.socket()).unwrap();
    let hello = AgentMsg::Hello(Hello {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
        name: name.into(),
        pages,
        share_group: "default".into(),
        vma_budget: 1000,
        dirty_source: false,
        run_as_uid: None,
    });
    wire::send(&mut s, &hello, None).unwrap();
    let (msg, _) = wire::recv::<DaemonMsg>(&mut s).unwrap();
    assert!(matches!(msg, DaemonMsg::Welcome { .. }), "{msg:?}");
    s
}

/// Agents that answer nothing, or trickle their answer a byte a second, under a daemon
/// that gives agents ten minutes per request: the real guests are scanned and merged all
/// along (`full_scans` grows, `pages_sharing` reaches every shared fill page), `GET
/// /guests` answers, and the stalled agents are still registered — nobody waited for them.
#[test]
fn a_stalled_agent_delays_only_its_own_guest() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tinyvmm::fleet::guest::field;
    require_kvm!();
    let d = Daemon::start(
        "isolation-stall",
        &[
            "--pages-to-scan",
            "20000",
            "--sleep-ms",
            "5",
            "--request-timeout-ms",
            "600000",
        ],
    );
    // The silent one: its first request (a digest) is never answered.
    let mut silent = register(&d, "silent", 4096);
    let (first, _) = wire::recv::<DaemonMsg>(&mut silent).unwrap();
    assert!(matches!(first, DaemonMsg::Request { .. }), "{first:?}");
    // The trickler: reads each request and answers a byte a second.
    let mut trickler = register(&d, "trickler", 4096);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let trickle = std::thread::spawn(move || {
        let Ok((DaemonMsg::Request { id, .. }, _)) = wire::recv::<DaemonMsg>(&mut trickler) else {
            return 0;
        };
        let reply = AgentMsg::Reply {
            id,
            reply: wire::Reply::Stats(Default::default()),
        };
        // The reply's bytes as the protocol module frames them.
        let (mut w, mut r) = UnixStream::pair().unwrap();
        wire::send(&mut w, &reply, None).unwrap();
        drop(w);
        let mut frame = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut frame).unwrap();
        let mut sent = 0;
        for b in frame {
            if stop2.load(Ordering::Relaxed) || trickler.write_all(&[b]).is_err() {
                break;
            }
            sent += 1;
            std::thread::sleep(Duration::from_secs(1));
        }
        sent
    });

    let p = Profile {
        mib: 16,
        extra: "shared_pct=60 zero_pct=20".into(),
    };
    let (a, fill) = guest(&d, 60, &p, &[]);
    let (b, _) = guest(&d, 61, &p, &[]);
    let shared: u64 = field(&fill, "shared").unwrap();
    let s = d.wait_for("the real guests merged", LONG, |s| {
        u(s, "pages_sharing") >= shared && u(s, "full_scans") >= 3
    });
    let scans = u(&s, "full_scans");
    d.wait_for("scanning goes on", LONG, |s| u(s, "full_scans") > scans + 2);
    let listed = d.ksm_json(&["guests", "--json"]);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "{listed:#}");
    assert!(
        names.contains(&"silent") && names.contains(&"trickler"),
        "{names:?}"
    );
    assert_eq!(u(&d.status(), "guests_failed"), 0, "nobody dropped yet");
    let mut guests = vec![a, b];
    verify_all(&mut guests, 16 * 256);
    stop.store(true, Ordering::Relaxed);
    drop(silent);
    let sent = trickle.join().unwrap();
    assert!(sent > 0, "the trickler was asked something");
    exit_all(guests);
}
