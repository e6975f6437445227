//! A VMM process may be hostile (a guest may own it): what it can do to the merge daemon
//! and to the other guests of its share group. Real guests, a real daemon, and a hostile
//! client built on the project's own protocol module.

mod common;

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::merge::{exit_all, guest, u, verify_all, Daemon, Profile, LONG};
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
    })
}

fn daemon_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A VM process that floods the daemon: a hello declaring 2^30 pages, thousands of
/// register/close loops under new group names, a thousand idle connections, a client that
/// trickles its hello. The daemon's memory and descriptors stay bounded, its CPU idles
/// again, and the real guests keep merging and verifying.
#[test]
fn a_flooding_vm_process_cannot_exhaust_the_daemon() {
    use tinyvmm::fleet::procfs;
    require_kvm!();
    let d = Daemon::fast("isolation-flood");
    let p = Profile::plain(16);
    let mut guests: Vec<_> = (0..2).map(|i| guest(&d, 90 + i, &p, &[]).0).collect();
    d.wait_for("merging", LONG, |s| u(s, "pages_sharing") > 1000);
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

    // Register and hang up, 3 000 times, each under a new group name.
    for i in 0..3000 {
        let mut s = UnixStream::connect(d.socket()).unwrap();
        wire::send(&mut s, &hello(256, &format!("g{i}")), None).unwrap();
        let _ = wire::recv::<DaemonMsg>(&mut s);
    }

    // A thousand connections that never say hello, and one that trickles its hello.
    // SAFETY: raising this process's own descriptor limit to its hard limit.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    let idle: Vec<UnixStream> = (0..1000)
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
            "--concurrent-scan",
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
