//! A VM's own control socket end to end: a real `tinyvmm run --api-sock` process with the
//! built-in guest, `GET /vm` over the socket, the socket's mode, the shutdown action ending
//! the process with status 0; and with `--share-memory`, the guest's merge counters as a
//! real `tinyvmm merged` daemon merges its pages.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::Value;
use tinyvmm::fleet::guest::GuestProc;
use tinyvmm::ksm_client::ApiClient;

const BIN: &str = env!("CARGO_BIN_EXE_tinyvmm");
const BOOT: Duration = Duration::from_secs(120);
const CMDLINE: &str = "console=ttyS0 workload=fill,serve mib=16";

/// `tinyvmm run --mem 64M --api-sock <sock> --cmdline <cmdline> <extra>`, up and serving.
fn start_guest(sock: &Path, cmdline: &str, extra: &[&str], log: &Path) -> GuestProc {
    let mut args: Vec<String> = vec![
        "--mem".into(),
        "64M".into(),
        "--api-sock".into(),
        sock.display().to_string(),
        "--cmdline".into(),
        cmdline.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut g = GuestProc::spawn(Path::new(BIN), &args, Some(log)).unwrap();
    let stderr = || std::fs::read_to_string(log).unwrap_or_default();
    g.wait_line("SERVE ready", BOOT)
        .unwrap_or_else(|e| panic!("{e}\n--- stderr\n{}", stderr()));
    g
}

/// `GET /vm`.
fn get_vm(sock: &Path) -> Value {
    ApiClient::new(sock)
        .unwrap()
        .json(Method::GET, "/vm", None)
        .unwrap()
}

/// `PUT /vm/actions` with `body`; the status.
fn put_action(sock: &Path, body: &str) -> StatusCode {
    let (status, _) = ApiClient::new(sock)
        .unwrap()
        .request(Method::PUT, "/vm/actions", Some(body.as_bytes().to_vec()))
        .unwrap();
    status
}

/// Waits at most `timeout` for the guest process to end.
fn wait_exit(g: &mut GuestProc, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = g.child.try_wait().unwrap() {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "tinyvmm did not exit within {timeout:?} of the shutdown action"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `GET /vm` until `done` holds; returns that answer.
fn wait_vm(sock: &Path, what: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = get_vm(sock);
        if done(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last GET /vm: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn get_vm_then_shutdown_action_ends_the_vmm_with_status_0() {
    require_kvm!();
    let dir = common::scratch_dir("vm-api");
    let sock = dir.join("vm.sock");
    let mut g = start_guest(&sock, CMDLINE, &[], &dir.join("guest.log"));

    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "the VM socket must be mode 0600"
    );

    let v = get_vm(&sock);
    assert_eq!(v["state"], "running", "{v:#}");
    assert_eq!(v["pid"], g.pid(), "{v:#}");
    assert_eq!(v["vcpus"], 1);
    assert_eq!(v["mem_bytes"], 64u64 << 20);
    assert_eq!(v["kernel"], "builtin");
    assert_eq!(v["share_memory"], "none");
    assert_eq!(v["merge"], Value::Null);
    let up = v["uptime_ms"].as_u64().unwrap();
    assert!(up > 0, "{v:#}");
    std::thread::sleep(Duration::from_millis(50));
    assert!(get_vm(&sock)["uptime_ms"].as_u64().unwrap() > up);

    // A refused action changes nothing.
    assert_eq!(
        put_action(&sock, r#"{"action": "reboot"}"#),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(get_vm(&sock)["state"], "running");
    // Well-formed JSON of the wrong shape is an invalid action, not invalid JSON.
    let client = ApiClient::vm_client(&sock).unwrap();
    let (status, body) = client
        .request(
            Method::PUT,
            "/vm/actions",
            Some(br#"{"action":1}"#.to_vec()),
        )
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        String::from_utf8_lossy(&body).contains("invalid action: "),
        "{body:?}"
    );
    // A body not declared as JSON is refused (415) and does not stop the VM.
    let (status, _) = client
        .request_with_type(
            Method::PUT,
            "/vm/actions",
            Some(("text/plain", br#"{"action": "shutdown"}"#.to_vec())),
        )
        .unwrap();
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let info = client.vm().unwrap();
    assert_eq!(info.state, tinyvmm_api::vm::VmState::Running);
    assert_eq!(info.pid, g.pid());

    let t = Instant::now();
    assert_eq!(
        put_action(&sock, r#"{"action": "shutdown"}"#),
        StatusCode::NO_CONTENT
    );
    let st = wait_exit(&mut g, Duration::from_secs(5));
    assert_eq!(
        st.code(),
        Some(0),
        "exit status {st}; stderr:\n{}",
        std::fs::read_to_string(dir.join("guest.log")).unwrap_or_default()
    );
    eprintln!("shutdown took {:?}", t.elapsed());
    assert!(!sock.exists(), "the VM socket is removed when the VM stops");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_still_stops_a_vm_with_an_api_socket_cleanly() {
    require_kvm!();
    let dir = common::scratch_dir("vm-api-sigterm");
    let sock = dir.join("vm.sock");
    let mut g = start_guest(&sock, CMDLINE, &[], &dir.join("guest.log"));
    assert_eq!(get_vm(&sock)["state"], "running");
    // The API thread must not take the signal (its default action would kill the process).
    for _ in 0..3 {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(g.pid() as i32, libc::SIGTERM) };
    }
    let st = wait_exit(&mut g, Duration::from_secs(5));
    assert_eq!(st.code(), Some(0), "exit status {st}");
    assert!(!sock.exists(), "the VM socket is removed when the VM stops");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn api_sock_bind_failure_is_a_one_line_error_and_status_1() {
    require_kvm!();
    let dir = common::scratch_dir("vm-api-bind");
    // A regular file where the socket should go is never replaced.
    let sock = dir.join("vm.sock");
    std::fs::write(&sock, b"keep").unwrap();
    let out = common::run_vm(
        &[
            "--mem",
            "64M",
            "--api-sock",
            sock.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{:?}", out.stderr);
    assert!(
        lines[0].starts_with("tinyvmm: error: cannot serve the VM API on ")
            && lines[0].contains("not a socket"),
        "{}",
        lines[0]
    );
    assert!(
        !out.stdout.contains("TINYVMM TESTGUEST READY"),
        "the guest must not run"
    );
    assert_eq!(std::fs::read(&sock).unwrap(), b"keep");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A merge daemon in its own run directory, killed on drop.
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    fn start(dir: &Path) -> Self {
        let log = std::fs::File::create(dir.join("merged.log")).unwrap();
        let child = Command::new(BIN)
            .env("TINYVMM_RUN_DIR", dir)
            .arg("merged")
            .arg("--socket")
            .arg(dir.join("merged.sock"))
            .arg("--api-sock")
            .arg(dir.join("api.sock"))
            .args(["--pages-to-scan", "20000", "--sleep-ms", "5"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(dir.join("merged.sock")).is_err()
            || std::os::unix::net::UnixStream::connect(dir.join("api.sock")).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "daemon did not come up: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("merged.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn get_vm_reports_registration_and_merged_pages_with_share_memory() {
    require_kvm!();
    let dir = common::scratch_dir("vm-api-share");
    let daemon = Daemon::start(&dir);
    let merge_sock = dir.join("merged.sock").display().to_string();
    let share = [
        "--share-memory",
        "--merge-socket",
        merge_sock.as_str(),
        "--no-daemon-autostart",
    ];
    // Two guests with the same page classes: their shared pages merge into pool frames.
    let socks = [dir.join("vm-a.sock"), dir.join("vm-b.sock")];
    let mut guests = Vec::new();
    // The first is named with --name (a space in it: the API path is percent-encoded);
    // the second keeps the default name, its --kernel argument.
    for (i, sock) in socks.iter().enumerate() {
        let cmdline = format!("{CMDLINE} seed=1 guest_seed={}", 10 + i);
        let log = dir.join(format!("guest-{i}.log"));
        let mut extra = share.to_vec();
        if i == 0 {
            extra.extend(["--name", "vm a"]);
        }
        guests.push(start_guest(sock, &cmdline, &extra, &log));
    }

    let v = get_vm(&socks[0]);
    assert_eq!(v["share_memory"], "tinyvmm", "{v:#}");
    assert!(v["merge"].is_object(), "{v:#}");
    assert_eq!(v["merge"]["pages"], (64u64 << 20) / 4096, "{v:#}");

    let v = wait_vm(&socks[0], "registration", Duration::from_secs(30), |v| {
        v["merge"]["registered"] == true
    });
    assert!(v["merge"]["guest_id"].is_u64(), "{v:#}");
    // The daemon knows the guest by the name given with --name.
    let api = ApiClient::new(dir.join("api.sock")).unwrap();
    let named = api.guest("vm a").unwrap();
    assert_eq!(named.name, "vm a");
    assert_eq!(
        Some(named.counters.id.0),
        v["merge"]["guest_id"].as_u64().map(|i| i as u32)
    );
    assert_eq!(named.pid, guests[0].pid());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !api
        .guests()
        .unwrap()
        .iter()
        .any(|g| g.pid == guests[1].pid())
    {
        assert!(Instant::now() < deadline, "guest b did not register");
        std::thread::sleep(Duration::from_millis(100));
    }
    let other = api.guests().unwrap();
    let other = other.iter().find(|g| g.pid == guests[1].pid()).unwrap();
    assert_eq!(
        other.name, "builtin",
        "the default name is the --kernel argument"
    );
    assert!(v["merge"]["registrations"].as_u64().unwrap() >= 1, "{v:#}");
    let first = v["merge"]["pool_mapped_pages"].as_u64().unwrap();
    // A fresh VM maps no pool frame; FILL reports ~60 % of the 4096 fill pages as shared
    // between the two guests: far more than 1000 merge.
    let v = wait_vm(&socks[0], "merged pages", BOOT, |v| {
        v["merge"]["pool_mapped_pages"].as_u64().unwrap() >= 1000
    });
    let m = &v["merge"];
    assert!(m["pool_mapped_pages"].as_u64().unwrap() >= first, "{v:#}");
    assert!(m["requests"].as_u64().unwrap() > 0, "{v:#}");
    eprintln!("GET /vm after merging: {v:#}");

    for (g, sock) in guests.iter_mut().zip(&socks) {
        assert_eq!(
            g.verify(BOOT).unwrap(),
            4096,
            "every page verified after merging"
        );
        assert_eq!(
            put_action(sock, r#"{"action": "shutdown"}"#),
            StatusCode::NO_CONTENT
        );
        let st = wait_exit(g, Duration::from_secs(10));
        assert_eq!(
            st.code(),
            Some(0),
            "exit status {st}; daemon log:\n{}",
            daemon.log()
        );
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
