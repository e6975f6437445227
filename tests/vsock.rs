//! virtio-vsock end to end: a real guest (the test guest's vsock driver and `workload=vsock`)
//! and real Unix sockets on the host side, Firecracker's convention: the guest connects to
//! host port P (the listener at `PATH_P` echoes), then echoes on its own port for a host
//! program that connected through `PATH` with `CONNECT <port>`.
//!
//! The guest also drives the device out of spec first (`vsock_bad=1`), and the echo that
//! follows shows the device unharmed.
//!
//! Timings are printed (messages per second, next to the same ping-pong over a host Unix
//! socket pair), never asserted.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::merge::Daemon;
use common::{scratch_dir, tinyvmm};

const T: Duration = Duration::from_secs(120);
const GUEST_MSGS: u64 = 2000;
const HOST_MSGS: usize = 2000;
const HOST_PORT: u32 = 5000;
const GUEST_PORT: u32 = 1234;

/// Echoes one connection accepted on `listener` until its peer closes; returns the bytes.
fn echo_once(listener: UnixListener) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("the guest connects");
        let mut buf = [0u8; 65536];
        let mut total = 0u64;
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => {
                    c.write_all(&buf[..n]).expect("echo");
                    total += n as u64;
                }
            }
        }
    })
}

/// Message `i` of the host's ping-pong: 1 to 300 bytes of a pattern.
fn message(i: usize) -> Vec<u8> {
    let len = 1 + (i * 37) % 300;
    (0..len).map(|j| (i * 131 + j * 7) as u8).collect()
}

/// Sends `n` messages over `s`, each waiting for its echo, byte-exact; messages/s.
fn ping_pong(s: &mut UnixStream, n: usize) -> f64 {
    let start = Instant::now();
    let mut back = vec![0u8; 300];
    for i in 0..n {
        let m = message(i);
        s.write_all(&m).unwrap();
        s.read_exact(&mut back[..m.len()]).unwrap();
        assert_eq!(&back[..m.len()], &m[..], "echo of message {i}");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Connects to the device's socket and asks for guest port `port`. A device that closes
/// the connection at once (no driver) may do so before the request is written: the write
/// then fails with EPIPE and the answer reads empty.
fn connect(path: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(path).expect("connect to the vsock socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    if let Err(e) = writeln!(s, "CONNECT {port}") {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    s
}

/// Reads the device's answer line (`OK <port>`), or "" if it closed the connection.
fn answer(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap_or(0) == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

/// The guest's console, line by line, with everything kept for the failure message.
struct Console {
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Console {
    fn of(child: &mut Child) -> Self {
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Console {
            lines: rx,
            seen: Vec::new(),
        }
    }

    fn wait(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    assert!(
                        !l.starts_with("VSOCK FAIL"),
                        "guest failed:\n{}",
                        self.seen.join("\n")
                    );
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(_) => panic!("no '{prefix}' line; console:\n{}", self.seen.join("\n")),
            }
        }
    }
}

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// Echo both ways with a guest whose VMM gets `extra` arguments; returns (guest→host
/// msgs/s measured by the guest, host→guest msgs/s measured here).
fn echo_both_ways(dir: &Path, extra: &[String]) -> (u64, f64) {
    let path = dir.join("v.sock");
    let host_listener = UnixListener::bind(dir.join(format!("v.sock_{HOST_PORT}"))).unwrap();
    let echo = echo_once(host_listener);
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 workload=vsock vsock_cid=3 vsock_port={HOST_PORT} \
         vsock_msgs={GUEST_MSGS} vsock_size=64 vsock_listen={GUEST_PORT} vsock_bad=1"
    );
    let mut child = tinyvmm()
        .args(["run", "--mem", "64M", "--cmdline", &cmdline, "--vsock"])
        .arg(format!("3,{}", path.display()))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut console = Console::of(&mut child);

    // The guest first drives the device out of spec (a header in the MMIO gap, a payload
    // longer than its buffer or outside RAM, a descriptor loop, an unknown operation):
    // dropped or reset, and the device goes on.
    let bad = console.wait("VSOCK BAD");
    assert_eq!(field(&bad, "resets"), 2, "{bad}");

    let connected = console.wait("VSOCK CONNECT");
    let guest_rate = field(&connected, "msgs_per_s");
    assert_eq!(field(&connected, "msgs"), GUEST_MSGS);
    assert_eq!(
        echo.join().unwrap(),
        GUEST_MSGS * 64,
        "the host echoed every byte"
    );

    console.wait("VSOCK LISTEN");
    // Nobody listens on guest port 999: the guest resets, the device closes the socket.
    let mut refused = connect(&path, 999);
    assert_eq!(answer(&mut refused), "", "a refused connection is closed");
    let mut s = connect(&path, GUEST_PORT);
    let ok = answer(&mut s);
    assert!(ok.starts_with("OK ") && ok.ends_with('\n'), "{ok:?}");
    let host_rate = ping_pong(&mut s, HOST_MSGS);
    drop(s);

    let served = console.wait("VSOCK SERVED");
    assert_eq!(field(&served, "conns"), 1);
    assert_eq!(field(&served, "refused"), 1);
    console.wait("VSOCK OK");
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the VMM did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "exit {status}; stderr:\n{stderr}");
    assert!(!path.exists(), "the socket is removed when the VMM exits");
    (guest_rate, host_rate)
}

/// The same ping-pong over a Unix socket pair on the host, one echo thread: msgs/s.
fn host_baseline() -> f64 {
    let (mut a, b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut b = b;
        let mut buf = [0u8; 4096];
        while let Ok(n) = b.read(&mut buf) {
            if n == 0 || b.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let rate = ping_pong(&mut a, HOST_MSGS * 5);
    drop(a);
    echo.join().unwrap();
    rate
}

#[test]
fn vsock_echoes_both_ways_byte_for_byte() {
    require_kvm!();
    let dir = scratch_dir("vsock");
    let (guest_rate, host_rate) = echo_both_ways(&dir, &[]);
    let baseline = host_baseline();
    eprintln!(
        "vsock ping-pong: guest->host {guest_rate} msgs/s (64 B, measured in the guest), \
         host->guest {host_rate:.0} msgs/s (1-300 B), host Unix socket pair {baseline:.0} msgs/s"
    );
}

/// The same with all three virtio devices on one VM (three MMIO slots, three interrupt
/// pins in the DSDT) and its RAM merged by a real daemon.
#[test]
fn vsock_echoes_with_shared_memory_next_to_a_disk_and_a_balloon() {
    require_kvm!();
    let dir = scratch_dir("vsock-share");
    let d = Daemon::fast("vsock-merged");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let extra: Vec<String> = [
        "--share-memory",
        "--no-daemon-autostart",
        "--merge-socket",
        &d.socket().display().to_string(),
        "--disk",
        &disk.display().to_string(),
        "--balloon",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    echo_both_ways(&dir, &extra);
}

fn run_args(args: &[&str]) -> (Option<i32>, String) {
    let out = tinyvmm()
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_vsock_arguments_are_refused_with_a_clear_message() {
    let dir = scratch_dir("vsock-args");
    let taken = dir.join("taken.sock");
    let _holder = UnixListener::bind(&taken).unwrap();
    let missing_dir: PathBuf = dir.join("no/such/dir/v.sock");
    for (arg, want) in [
        ("3".to_string(), "expected CID,PATH"),
        ("abc,/tmp/x".to_string(), "expected a number"),
        ("2,/tmp/x".to_string(), "reserved"),
        ("0,/tmp/x".to_string(), "reserved"),
        (format!("3,/{}", "a".repeat(120)), "longer than"),
        (
            format!("3,{}", taken.display()),
            "cannot bind the vsock socket",
        ),
        (
            format!("3,{}", missing_dir.display()),
            "cannot bind the vsock socket",
        ),
    ] {
        let (code, stderr) = run_args(&["--vsock", &arg, "--cmdline", "workload=hello"]);
        assert!(code.is_some_and(|c| c != 0), "--vsock {arg}: exit {code:?}");
        assert!(stderr.contains(want), "--vsock {arg}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert!(taken.exists(), "a socket that was there is left alone");
}

/// The device's thread runs under its own filter: a call outside it (the hidden test hook
/// makes one right after the filter is installed) ends the VMM naming the thread kind.
#[test]
fn the_vsock_thread_runs_under_its_own_seccomp_filter() {
    require_kvm!();
    let dir = scratch_dir("vsock-seccomp");
    let vsock = format!("3,{}", dir.join("v.sock").display());
    let (code, stderr) = run_args(&[
        "--mem",
        "24M",
        "--vsock",
        &vsock,
        "--cmdline",
        "console=ttyS0 reboot=k panic=-1 workload=hello",
        "--seccomp-test-violation",
        "virtio-vsock",
    ]);
    assert_eq!(code, Some(148), "{stderr}");
    assert!(
        stderr.contains("bad system call 110 (getppid) on a virtio-vsock thread"),
        "{stderr}"
    );
}

/// A guest that never drives the device (no vsock driver): a host program that connects
/// is closed at once, not left waiting (once a driver runs the device, a request the guest
/// leaves unanswered is reset after 2 s; see the device's unit tests).
#[test]
fn a_connect_to_a_guest_without_a_driver_is_closed_at_once() {
    require_kvm!();
    let dir = scratch_dir("vsock-nodriver");
    let path = dir.join("v.sock");
    let mut child = tinyvmm()
        .args([
            "run",
            "--mem",
            "24M",
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1 workload=wait wait_ms=8000",
            "--vsock",
        ])
        .arg(format!("3,{}", path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut console = Console::of(&mut child);
    console.wait("BOOTCHECK OK");
    let mut s = connect(&path, 52);
    assert_eq!(answer(&mut s), "", "closed without an OK");
    console.wait("WAIT done");
    let _ = child.wait();
}
