//! The merge daemon's REST control API over a real Unix socket, against a test backend:
//! every endpoint, a table of malformed requests (each a 4xx with `{"error": ...}` and the
//! state unchanged), slow and half-open clients, 50 concurrent pollers, the OpenAPI
//! document against the server's routes, and the `tinyvmm ksm` client. Then a VM's own
//! API (`tinyvmm run --api-sock`) on the same server against a fake VM: `GET /vm`, the
//! shutdown action, bad requests, and its OpenAPI document (`tests/vm_api.rs` drives a
//! real guest).
//!
//! The API comes from `tinyvmm-api` (its `testing` feature gives the fake backends), the
//! client from the binary's library. One long file on purpose: most of it is the tables
//! of malformed requests and the OpenAPI checks, each table in one place next to the
//! server it drives.

use tinyvmm::ksm_client;
use tinyvmm_api as api;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use api::testing::{FakeControlPlane, FakeVm, TempDir};
use api::vm::{VmAction, VmEndpoint, VM_ROUTES};
use api::{ApiConfig, ApiError, ApiServer, ControlPlane, GuestInfo, KsmState, Limits};
use clap::Parser;
use hyper::{Method, StatusCode};
use ksm_client::{ApiClient, ClientError, KsmArgs, KsmError};
use serde_json::Value;

/// A server on a temp socket against a fresh [`FakeControlPlane`].
struct Fixture {
    server: ApiServer,
    cp: Arc<FakeControlPlane>,
    _dir: TempDir,
}

impl Fixture {
    fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Self {
        let dir = TempDir::new("srv");
        let cp = Arc::new(FakeControlPlane::new());
        let mut cfg = ApiConfig::new(dir.0.join("api.sock"));
        cfg.limits = limits;
        let server = ApiServer::start_daemon(cfg, cp.clone()).unwrap();
        Fixture {
            server,
            cp,
            _dir: dir,
        }
    }

    fn sock(&self) -> &Path {
        self.server.socket_path()
    }

    fn client(&self) -> ApiClient {
        ApiClient::new(self.sock()).unwrap()
    }

    /// `GET /ksm` as JSON.
    fn state(&self) -> Value {
        self.client().json(Method::GET, "/ksm", None).unwrap()
    }

    /// Runs `tinyvmm ksm <args>` against this server; returns what it printed.
    fn ksm(&self, args: &[&str]) -> Result<String, KsmError> {
        let mut argv = vec![
            "tinyvmm",
            "ksm",
            "--api-sock",
            self.sock().to_str().unwrap(),
        ];
        argv.extend_from_slice(args);
        let cli = TestCli::try_parse_from(argv).unwrap();
        let TestCommand::Ksm(ksm) = cli.command;
        let mut out = Vec::new();
        ksm_client::run_to(ksm, &mut out, true)?;
        Ok(String::from_utf8(out).unwrap())
    }
}

/// The `tinyvmm` command line as far as `ksm` goes (main.rs wires the same `KsmArgs`).
#[derive(Parser, Debug)]
struct TestCli {
    #[command(subcommand)]
    command: TestCommand,
}

#[derive(clap::Subcommand, Debug)]
enum TestCommand {
    Ksm(KsmArgs),
}

/// A response read off a raw socket.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Sends `bytes` as they are, reads until the server closes (or 5 s pass).
fn raw(sock: &Path, bytes: &[u8]) -> Raw {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The server may answer (413) and close before it read everything we send.
    let _ = s.write_all(bytes);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_raw(&buf)
}

fn parse_raw(buf: &[u8]) -> Raw {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    Raw {
        status,
        head,
        body: buf[end + 4..].to_vec(),
    }
}

/// A complete request with `Connection: close`.
fn req(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

// ---------------------------------------------------------------------------------------
// Every endpoint.

#[test]
fn get_ksm_returns_knobs_and_counters_with_kernel_names() {
    let f = Fixture::new();
    let s = f.state();
    for k in [
        "run",
        "sleep_millisecs",
        "pages_to_scan",
        "max_page_sharing",
        "pages_shared",
        "pages_sharing",
        "pages_unshared",
        "pages_volatile",
        "full_scans",
        "pages_scanned",
        "pages_skipped",
        "zero_pages",
        "general_profit",
        "smart_scan",
        "advisor",
        "pool_bytes",
        "engine_metadata_bytes",
    ] {
        assert!(s.get(k).is_some(), "GET /ksm lacks {k}: {s}");
    }
    assert_eq!(s["run"], 1);
    assert_eq!(s["pages_sharing"], 3000);
}

#[test]
fn patch_ksm_applies_and_returns_the_new_state() {
    let f = Fixture::new();
    let body =
        serde_json::json!({"pages_to_scan": 2000, "sleep_millisecs": 5, "smart_scan": false});
    let s = f.client().json(Method::PATCH, "/ksm", Some(&body)).unwrap();
    assert_eq!(
        (s["pages_to_scan"].clone(), s["sleep_millisecs"].clone()),
        (2000.into(), 5.into())
    );
    assert_eq!(s["smart_scan"], false);
    let k = f.cp.knobs();
    assert_eq!(
        (k.pages_to_scan, k.sleep_millisecs, k.smart_scan),
        (2000, 5, false)
    );
    assert_eq!(f.state()["pages_to_scan"], 2000);
}

#[test]
fn put_knob_mirrors_a_sysfs_write_and_get_knob_a_read() {
    let f = Fixture::new();
    let c = f.client();
    let (st, body) = c
        .request(Method::PUT, "/ksm/run", Some(b"0\n".to_vec()))
        .unwrap();
    assert_eq!(st, StatusCode::OK, "{body:?}");
    assert_eq!(c.json(Method::GET, "/ksm/run", None).unwrap(), 0);
    c.request(Method::PUT, "/ksm/pages_to_scan", Some(b"123".to_vec()))
        .unwrap();
    assert_eq!(
        c.json(Method::GET, "/ksm/pages_to_scan", None).unwrap(),
        123
    );
    c.request(Method::PUT, "/ksm/max_page_sharing", Some(b"64".to_vec()))
        .unwrap();
    c.request(Method::PUT, "/ksm/smart_scan", Some(b"false".to_vec()))
        .unwrap();
    c.request(Method::PUT, "/ksm/sleep_millisecs", Some(b"7".to_vec()))
        .unwrap();
    let advisor = br#"{"mode": "scan-time", "target_scan_secs": 60, "max_cpu_pct": 20}"#;
    let (st, _) = c
        .request(Method::PUT, "/ksm/advisor", Some(advisor.to_vec()))
        .unwrap();
    assert_eq!(st, StatusCode::OK);
    let s = f.state();
    assert_eq!(s["max_page_sharing"], 64);
    assert_eq!(s["smart_scan"], false);
    assert_eq!(s["sleep_millisecs"], 7);
    assert_eq!(s["advisor"]["mode"], "scan-time");
    // The advisor owns pages_to_scan now.
    let (st, body) = c
        .request(Method::PUT, "/ksm/pages_to_scan", Some(b"5".to_vec()))
        .unwrap();
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("advisor"));
}

#[test]
fn run_2_unmerges_everything() {
    let f = Fixture::new();
    let s = f
        .client()
        .json(Method::PUT, "/ksm/run", Some(&2.into()))
        .unwrap();
    assert_eq!(s["run"], 2);
    assert_eq!(s["pages_sharing"], 0);
    assert_eq!(s["pages_shared"], 0);
    let g = f.client().json(Method::GET, "/guests/1", None).unwrap();
    assert_eq!(g["merging_pages"], 0);
}

#[test]
fn guests_list_and_one_guest_by_id_or_name() {
    let f = Fixture::new();
    let c = f.client();
    let list = c.json(Method::GET, "/guests", None).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    for k in [
        "id",
        "domain",
        "pid",
        "name",
        "share_group",
        "merging_pages",
        "zero_pages",
        "profit",
        "vma_mappings",
        "vma_budget",
    ] {
        assert!(list[0].get(k).is_some(), "guest lacks {k}: {}", list[0]);
    }
    assert_eq!(
        c.json(Method::GET, "/guests/2", None).unwrap()["name"],
        "vm \"b\""
    );
    assert_eq!(c.json(Method::GET, "/guests/vm-a", None).unwrap()["id"], 1);
    match c.json(Method::GET, "/guests/77", None) {
        Err(ClientError::Refused { status, msg, .. }) => {
            assert_eq!(status, StatusCode::NOT_FOUND);
            assert!(msg.contains("77"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn metrics_are_prometheus_text() {
    let f = Fixture::new();
    let r = raw(f.sock(), &req("GET", "/metrics", b""));
    assert_eq!(r.status, 200);
    assert!(r
        .head
        .to_ascii_lowercase()
        .contains("content-type: text/plain; version=0.0.4"));
    let text = String::from_utf8(r.body).unwrap();
    assert!(text.contains("# TYPE tinyvmm_ksm_pages_shared gauge\ntinyvmm_ksm_pages_shared 1000\n"));
    assert!(text.contains("tinyvmm_ksm_guest_zero_pages{guest=\"2\","));
}

#[test]
fn daemon_unavailable_is_503_with_json() {
    let f = Fixture::new();
    f.cp.unavailable.store(true, Ordering::Relaxed);
    let r = raw(f.sock(), &req("GET", "/ksm", b""));
    assert_eq!(r.status, 503);
    assert!(r.json().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("stopping"));
}

/// A control plane that never answers in time.
struct Stuck;

impl ControlPlane for Stuck {
    fn ksm(&self) -> Result<KsmState, ApiError> {
        std::thread::sleep(Duration::from_secs(2));
        Err(ApiError::Unavailable("late".into()))
    }
    fn update_knobs(&self, _: tinyvmm_merge::KnobsUpdate) -> Result<KsmState, ApiError> {
        self.ksm()
    }
    fn guests(&self) -> Result<Vec<GuestInfo>, ApiError> {
        self.ksm().map(|_| Vec::new())
    }
}

#[test]
fn a_daemon_that_does_not_answer_is_503_after_the_call_timeout() {
    let dir = TempDir::new("stuck");
    let mut cfg = ApiConfig::new(dir.0.join("api.sock"));
    cfg.limits.call_timeout = Duration::from_millis(200);
    let server = ApiServer::start_daemon(cfg, Arc::new(Stuck)).unwrap();
    let t = Instant::now();
    let r = raw(server.socket_path(), &req("GET", "/ksm", b""));
    assert_eq!(r.status, 503);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    // Routing errors need no call.
    assert_eq!(
        raw(server.socket_path(), &req("GET", "/nope", b"")).status,
        404
    );
}

// ---------------------------------------------------------------------------------------
// Malformed requests.

struct Case {
    name: &'static str,
    request: Vec<u8>,
    status: u16,
    /// Whether the answer must be `{"error": ...}` (false for errors hyper answers at the
    /// HTTP level, before any route).
    json: bool,
}

fn case(name: &'static str, method: &str, path: &str, body: &[u8], status: u16) -> Case {
    Case {
        name,
        request: req(method, path, body),
        status,
        json: true,
    }
}

fn malformed_cases() -> Vec<Case> {
    let big = vec![b' '; 70 * 1024];
    let mut big_json = b"{\"run\": 1, \"pad\": \"".to_vec();
    big_json.extend(std::iter::repeat_n(b'x', 65 * 1024));
    big_json.extend_from_slice(b"\"}");
    let mut chunked = b"PATCH /ksm HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n", 4096).as_bytes());
        chunked.extend(std::iter::repeat_n(b' ', 4096));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let huge_header = format!(
        "GET /ksm HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    vec![
        // Malformed JSON.
        case("truncated object", "PATCH", "/ksm", b"{", 400),
        case("empty body", "PATCH", "/ksm", b"", 400),
        case("whitespace body", "PATCH", "/ksm", b"  \n", 400),
        case("trailing comma", "PATCH", "/ksm", br#"{"run": 1,}"#, 400),
        case("trailing garbage", "PATCH", "/ksm", br#"{"run": 1} x"#, 400),
        case("single quotes", "PATCH", "/ksm", b"{'run': 1}", 400),
        case("invalid utf-8", "PATCH", "/ksm", b"{\"run\": \"\xff\xfe\"}", 400),
        case("not an object: array", "PATCH", "/ksm", b"[1]", 400),
        case("not an object: positional array", "PATCH", "/ksm", b"[null, null, null, null, null, null]", 400),
        case("not an object: number", "PATCH", "/ksm", b"1", 400),
        case("not an object: null", "PATCH", "/ksm", b"null", 400),
        // Unknown fields.
        case("unknown field", "PATCH", "/ksm", br#"{"bogus": 1}"#, 400),
        case("counter is not a knob", "PATCH", "/ksm", br#"{"pages_shared": 0}"#, 400),
        case("case matters", "PATCH", "/ksm", br#"{"Run": 1}"#, 400),
        case("unknown advisor field", "PATCH", "/ksm", br#"{"advisor": {"mode": "none", "x": 1}}"#, 400),
        // Wrong types.
        case("run as string", "PATCH", "/ksm", br#"{"run": "1"}"#, 400),
        case("run as bool", "PATCH", "/ksm", br#"{"run": true}"#, 400),
        case("pages_to_scan negative", "PATCH", "/ksm", br#"{"pages_to_scan": -1}"#, 400),
        case("pages_to_scan fraction", "PATCH", "/ksm", br#"{"pages_to_scan": 1.5}"#, 400),
        case("smart_scan as string", "PATCH", "/ksm", br#"{"smart_scan": "yes"}"#, 400),
        case("advisor as string", "PATCH", "/ksm", br#"{"advisor": "none"}"#, 400),
        case("unknown advisor mode", "PATCH", "/ksm", br#"{"advisor": {"mode": "fast"}}"#, 400),
        // Out of range (the whole update is refused, valid fields too).
        case("run 3", "PATCH", "/ksm", br#"{"run": 3}"#, 400),
        case("run 256", "PATCH", "/ksm", br#"{"run": 256}"#, 400),
        case("pages_to_scan 0", "PATCH", "/ksm", br#"{"pages_to_scan": 0, "sleep_millisecs": 1}"#, 400),
        case("pages_to_scan above max", "PATCH", "/ksm", br#"{"pages_to_scan": 16777217}"#, 400),
        case("pages_to_scan above u32", "PATCH", "/ksm", br#"{"pages_to_scan": 4294967296}"#, 400),
        case("sleep above an hour", "PATCH", "/ksm", br#"{"sleep_millisecs": 3600001}"#, 400),
        case("max_page_sharing 1", "PATCH", "/ksm", br#"{"max_page_sharing": 1}"#, 400),
        case("advisor cpu 0", "PATCH", "/ksm", br#"{"advisor": {"mode": "scan-time", "target_scan_secs": 10, "max_cpu_pct": 0}}"#, 400),
        case("advisor cpu 101", "PATCH", "/ksm", br#"{"advisor": {"mode": "scan-time", "target_scan_secs": 10, "max_cpu_pct": 101}}"#, 400),
        // PUT of one knob.
        case("put run 3", "PUT", "/ksm/run", b"3", 400),
        case("put run string", "PUT", "/ksm/run", b"\"1\"", 400),
        case("put run empty", "PUT", "/ksm/run", b"", 400),
        case("put run null", "PUT", "/ksm/run", b"null", 400),
        case("put run object", "PUT", "/ksm/run", br#"{"run": 1}"#, 400),
        case("put pages_to_scan 0", "PUT", "/ksm/pages_to_scan", b"0", 400),
        case("put smart_scan 1", "PUT", "/ksm/smart_scan", b"1", 400),
        case("put advisor incomplete", "PUT", "/ksm/advisor", br#"{"mode": "scan-time"}"#, 400),
        // Unknown paths (404) and methods (405).
        case("put unknown knob", "PUT", "/ksm/bogus", b"1", 404),
        case("put a counter", "PUT", "/ksm/pages_shared", b"0", 404),
        case("get unknown knob", "GET", "/ksm/bogus", b"", 404),
        case("unknown path", "GET", "/nope", b"", 404),
        case("root", "GET", "/", b"", 404),
        case("trailing slash", "GET", "/ksm/", b"", 404),
        case("unknown guest", "GET", "/guests/999", b"", 404),
        case("below a guest", "GET", "/guests/1/stats", b"", 404),
        case("delete ksm", "DELETE", "/ksm", b"", 405),
        case("post ksm", "POST", "/ksm", br#"{"run": 1}"#, 405),
        case("put ksm", "PUT", "/ksm", br#"{"run": 1}"#, 405),
        case("patch knob", "PATCH", "/ksm/run", b"1", 405),
        case("post guests", "POST", "/guests", b"{}", 405),
        case("delete guest", "DELETE", "/guests/1", b"", 405),
        case("put metrics", "PUT", "/metrics", b"", 405),
        case("options", "OPTIONS", "/ksm", b"", 405),
        // Oversized bodies.
        case("body over 64 KiB", "PATCH", "/ksm", &big, 413),
        case("json over 64 KiB", "PUT", "/ksm/run", &big_json, 413),
        Case {
            name: "content-length over the limit, body not sent",
            request: b"PATCH /ksm HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 10000000\r\n\r\n{}".to_vec(),
            status: 413,
            json: true,
        },
        Case {
            name: "chunked body over 64 KiB",
            request: chunked,
            status: 413,
            json: true,
        },
        // Broken HTTP: hyper answers before any route.
        Case {
            name: "garbage request line",
            request: b"HELLO\r\n\r\n".to_vec(),
            status: 400,
            json: false,
        },
        Case {
            name: "headers over 16 KiB",
            request: huge_header.into_bytes(),
            status: 431,
            json: false,
        },
    ]
}

#[test]
fn malformed_requests_get_4xx_json_errors_and_change_nothing() {
    let f = Fixture::new();
    let before = f.state();
    let cases = malformed_cases();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for c in &cases {
        let r = raw(f.sock(), &c.request);
        let error = r
            .json()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string));
        if r.status != c.status {
            failures.push(format!(
                "{}: got {} want {} ({:?})",
                c.name, r.status, c.status, error
            ));
            continue;
        }
        if c.json && error.as_deref().is_none_or(str::is_empty) {
            failures.push(format!(
                "{}: no {{\"error\": ...}} body: {:?}",
                c.name,
                String::from_utf8_lossy(&r.body)
            ));
        }
        if r.status == 405 && !r.head.to_ascii_lowercase().contains("\nallow: ") {
            failures.push(format!("{}: 405 without Allow", c.name));
        }
        let after = f.state();
        if after != before {
            failures.push(format!("{}: state changed", c.name));
        }
        eprintln!("{:<48} {} {}", c.name, r.status, error.unwrap_or_default());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(f.cp.updates.load(Ordering::Relaxed), 0);
    // The server still serves.
    assert_eq!(f.state(), before);
}

// ---------------------------------------------------------------------------------------
// Slow and half-open clients.

#[test]
fn stalled_clients_do_not_block_others_and_are_dropped() {
    let f = Fixture::with_limits(Limits {
        header_read_timeout: Duration::from_millis(1500),
        body_read_timeout: Duration::from_millis(1500),
        ..Limits::default()
    });
    // Half a request line, half the headers, nothing at all, and half a body.
    let mut stalled = Vec::new();
    for i in 0..30 {
        let mut s = UnixStream::connect(f.sock()).unwrap();
        let part: &[u8] = match i % 3 {
            0 => b"GET /ks",
            1 => b"GET /ksm HTTP/1.1\r\nHost: loc",
            _ => b"",
        };
        s.write_all(part).unwrap();
        stalled.push(s);
    }
    let mut half_body = UnixStream::connect(f.sock()).unwrap();
    half_body
        .write_all(b"PATCH /ksm HTTP/1.1\r\nHost: localhost\r\nContent-Length: 20\r\n\r\n{\"run\"")
        .unwrap();
    // Others are served at once.
    let t = Instant::now();
    for _ in 0..20 {
        assert_eq!(f.state()["run"], 1);
    }
    // Well before the stalled clients' deadlines: nobody waited for them.
    assert!(
        t.elapsed() < Duration::from_millis(1200),
        "blocked: {:?}",
        t.elapsed()
    );
    // The stalled ones are closed after the deadlines; the half body gets a 408.
    half_body
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = Vec::new();
    let _ = half_body.read_to_end(&mut buf);
    let r = parse_raw(&buf);
    assert_eq!(r.status, 408);
    assert!(r.json().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("did not arrive"));
    for mut s in stalled {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t = Instant::now();
        let mut buf = Vec::new();
        let r = s.read_to_end(&mut buf);
        assert!(r.is_ok(), "not closed by the server: {r:?}");
        assert!(t.elapsed() < Duration::from_secs(4));
        if !buf.is_empty() {
            let r = parse_raw(&buf);
            assert!((400..500).contains(&r.status), "{}", r.head);
        }
    }
    assert_eq!(f.cp.updates.load(Ordering::Relaxed), 0);
    assert_eq!(f.state()["run"], 1);
}

#[test]
fn idle_keep_alive_connections_are_closed_after_the_header_deadline() {
    let f = Fixture::with_limits(Limits {
        header_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    });
    let mut s = UnixStream::connect(f.sock()).unwrap();
    s.write_all(b"GET /ksm/run HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    // The answer, then EOF once the connection has idled past the deadline.
    s.read_to_end(&mut buf).unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let r = parse_raw(&buf);
    assert_eq!(r.status, 200);
    assert!(
        r.body.ends_with(b"1"),
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
}

#[test]
fn connection_cap_holds_clients_back_until_slots_free() {
    let f = Fixture::with_limits(Limits {
        header_read_timeout: Duration::from_millis(300),
        max_connections: 4,
        ..Limits::default()
    });
    let stalled: Vec<UnixStream> = (0..4)
        .map(|_| {
            let mut s = UnixStream::connect(f.sock()).unwrap();
            s.write_all(b"GET").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    // The fifth waits in the backlog until a stalled one times out, then is served.
    let t = Instant::now();
    assert_eq!(f.state()["run"], 1);
    assert!(t.elapsed() < Duration::from_secs(3));
    drop(stalled);
}

// ---------------------------------------------------------------------------------------
// Concurrency.

#[test]
fn fifty_clients_polling_ksm_and_metrics_see_no_errors() {
    let f = Fixture::new();
    let stop = Arc::new(AtomicBool::new(false));
    let scanner = {
        let cp = f.cp.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                cp.tick(4096);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    const CLIENTS: usize = 50;
    const ROUNDS: usize = 20;
    let t = Instant::now();
    let pollers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let sock = f.sock().to_path_buf();
            std::thread::spawn(move || -> Result<u64, String> {
                let c = ApiClient::new(&sock).map_err(|e| e.to_string())?;
                let mut last = 0;
                for _ in 0..ROUNDS {
                    let s = c
                        .json(Method::GET, "/ksm", None)
                        .map_err(|e| e.to_string())?;
                    let scanned = s["pages_scanned"].as_u64().ok_or("no pages_scanned")?;
                    if scanned < last {
                        return Err(format!("pages_scanned went back: {scanned} < {last}"));
                    }
                    last = scanned;
                    let (st, body) = c
                        .request(Method::GET, "/metrics", None)
                        .map_err(|e| e.to_string())?;
                    if st != StatusCode::OK || !body.starts_with(b"# HELP tinyvmm_ksm_") {
                        return Err(format!("/metrics: {st}"));
                    }
                }
                Ok(last)
            })
        })
        .collect();
    let errors: Vec<String> = pollers
        .into_iter()
        .filter_map(|p| p.join().unwrap().err())
        .collect();
    let elapsed = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    scanner.join().unwrap();
    assert!(
        errors.is_empty(),
        "{} pollers failed: {:?}",
        errors.len(),
        errors
    );
    let requests = (CLIENTS * ROUNDS * 2) as f64;
    eprintln!(
        "{CLIENTS} pollers: {requests} requests in {:.2} s ({:.0} req/s)",
        elapsed.as_secs_f64(),
        requests / elapsed.as_secs_f64()
    );
}

/// A control plane shaped like the daemon's: every call is a command that a scanner
/// thread, busy with scan rounds at full rate, applies between rounds.
struct ScannerSim {
    tx: Mutex<mpsc::Sender<mpsc::Sender<KsmState>>>,
    inner: Arc<FakeControlPlane>,
}

impl ControlPlane for ScannerSim {
    fn ksm(&self) -> Result<KsmState, ApiError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .lock()
            .unwrap()
            .send(tx)
            .map_err(|_| ApiError::Unavailable("stopped".into()))?;
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| ApiError::Unavailable("no answer".into()))
    }
    fn update_knobs(&self, upd: tinyvmm_merge::KnobsUpdate) -> Result<KsmState, ApiError> {
        self.inner.update_knobs(upd)
    }
    fn guests(&self) -> Result<Vec<GuestInfo>, ApiError> {
        self.ksm()?;
        self.inner.guests()
    }
}

/// One scan round's worth of work: digest `pages` pages of 4 KiB.
fn scan_round(mem: &[u64], pages: usize, cursor: &mut usize) -> u64 {
    let words = 512;
    let mut h = 0u64;
    for _ in 0..pages {
        let page = &mem[*cursor * words..(*cursor + 1) * words];
        for w in page {
            h = (h ^ w).wrapping_mul(0x100_0000_01b3);
        }
        *cursor = (*cursor + 1) % (mem.len() / words);
    }
    h
}

/// CPU time (user + system) of this process's threads whose name starts with `prefix`.
fn threads_cpu(prefix: &str) -> Duration {
    let tick = 100.0; // USER_HZ
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
            .sum();
        total += ticks / tick;
    }
    Duration::from_secs_f64(total)
}

/// Scanner throughput at full rate with 50 pollers against without: the ratio is printed,
/// not asserted (timings never fail a test). `cargo test --test api -- --ignored --nocapture`.
#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn scanner_throughput_with_50_pollers() {
    let (tx, rx) = mpsc::channel::<mpsc::Sender<KsmState>>();
    let inner = Arc::new(FakeControlPlane::new());
    let cp = Arc::new(ScannerSim {
        tx: Mutex::new(tx),
        inner: inner.clone(),
    });
    let dir = TempDir::new("bench");
    let server = ApiServer::start_daemon(ApiConfig::new(dir.0.join("api.sock")), cp).unwrap();
    let pages = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let scanner = {
        let pages = pages.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mem: Vec<u64> = (0..(64u64 << 20) / 8).collect();
            let mut cursor = 0;
            let mut sink = 0u64;
            while !stop.load(Ordering::Relaxed) {
                sink ^= scan_round(&mem, 256, &mut cursor);
                pages.fetch_add(256, Ordering::Relaxed);
                while let Ok(reply) = rx.try_recv() {
                    let _ = reply.send(inner.ksm().unwrap());
                }
            }
            std::hint::black_box(sink);
        })
    };
    let rate = |d: Duration| {
        let p0 = pages.load(Ordering::Relaxed);
        let t = Instant::now();
        std::thread::sleep(d);
        (pages.load(Ordering::Relaxed) - p0) as f64 / t.elapsed().as_secs_f64()
    };
    let window = Duration::from_secs(2);
    std::thread::sleep(Duration::from_millis(300));
    let unpolled = rate(window);
    for (label, pause) in [
        ("hammering", Duration::ZERO),
        ("10 Hz each", Duration::from_millis(100)),
    ] {
        let polling = Arc::new(AtomicBool::new(true));
        let served = Arc::new(AtomicU64::new(0));
        let pollers: Vec<_> = (0..50)
            .map(|_| {
                let sock = server.socket_path().to_path_buf();
                let polling = polling.clone();
                let served = served.clone();
                std::thread::spawn(move || {
                    let c = ApiClient::new(&sock).unwrap();
                    while polling.load(Ordering::Relaxed) {
                        c.json(Method::GET, "/ksm", None).unwrap();
                        c.request(Method::GET, "/metrics", None).unwrap();
                        served.fetch_add(2, Ordering::Relaxed);
                        std::thread::sleep(pause);
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let s0 = served.load(Ordering::Relaxed);
        let cpu0 = threads_cpu("tinyvmm-api");
        let t = Instant::now();
        let polled = rate(window);
        let secs = t.elapsed().as_secs_f64();
        let requests = (served.load(Ordering::Relaxed) - s0) as f64;
        let server_cpu = (threads_cpu("tinyvmm-api") - cpu0).as_secs_f64();
        let req_rate = requests / secs;
        polling.store(false, Ordering::Relaxed);
        for p in pollers {
            p.join().unwrap();
        }
        eprintln!(
            "scanner: {unpolled:.0} pages/s unpolled, {polled:.0} pages/s with 50 pollers \
             ({label}, {req_rate:.0} req/s): ratio {:.3} ({} CPUs); API server threads: \
             {:.1}% of a CPU, {:.0} us CPU per request",
            polled / unpolled,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            100.0 * server_cpu / secs,
            1e6 * server_cpu / requests.max(1.0),
        );
    }
    stop.store(true, Ordering::Relaxed);
    scanner.join().unwrap();
}

// ---------------------------------------------------------------------------------------
// The OpenAPI document.

fn openapi() -> serde_norway::Value {
    openapi_doc("openapi.yaml")
}

fn openapi_doc(name: &str) -> serde_norway::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("api").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_norway::from_str(&text).unwrap()
}

/// Checks that the operations of `doc` are exactly those of `routes`, and that the server
/// on `sock` answers each of them (not 404/405) and 405 for every other method on those
/// paths. `concrete` turns a path template into a path; `body` gives a request body.
fn check_routes_agree(
    doc: &serde_norway::Value,
    routes: &[(&str, &[&str])],
    sock: &Path,
    concrete: impl Fn(&str) -> String,
    body: impl Fn(&str) -> &'static [u8],
) {
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let methods = [
        "get", "put", "post", "patch", "delete", "head", "options", "trace",
    ];
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        let path = path.as_str().unwrap();
        for (m, _) in item.as_mapping().unwrap() {
            let m = m.as_str().unwrap();
            if methods.contains(&m) {
                documented.insert((path.to_string(), m.to_ascii_uppercase()));
            }
        }
    }
    let served: BTreeSet<(String, String)> = routes
        .iter()
        .flat_map(|(p, ms)| ms.iter().map(|m| (p.to_string(), m.to_string())))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "served but not documented: {undocumented:?}; documented but not served: {unserved:?}"
    );

    // And the server really answers each documented operation (not 404/405), and
    // answers 405 for every other method on those paths.
    for (path, _) in routes {
        let concrete = concrete(path);
        for m in ["GET", "PUT", "POST", "PATCH", "DELETE"] {
            let r = raw(sock, &req(m, &concrete, body(m)));
            let is_served = served.contains(&(path.to_string(), m.to_string()));
            assert_eq!(r.status == 405, !is_served, "{m} {concrete}: {}", r.status);
            assert_ne!(r.status, 404, "{m} {concrete}");
        }
    }
}

#[test]
fn openapi_document_and_server_routes_agree() {
    let f = Fixture::new();
    check_routes_agree(
        &openapi(),
        api::ROUTES,
        f.sock(),
        |path| path.replace("{knob}", "run").replace("{id}", "1"),
        |m| if m == "PUT" { b"1" } else { b"{}" },
    );
}

#[test]
fn openapi_document_lists_the_knobs_and_every_state_field() {
    let doc = openapi();
    // One path per knob (`/ksm/run`, ...), each with its own body schema.
    let knobs: Vec<&str> = doc["paths"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter_map(|(p, _)| p.as_str().unwrap().strip_prefix("/ksm/"))
        .collect();
    assert_eq!(knobs, api::KNOBS);
    // The PATCH body schema has exactly the fields the server's KnobsUpdate takes.
    let documented: BTreeSet<String> = doc["components"]["schemas"]["KnobsUpdate"]["properties"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, _)| k.as_str().unwrap().to_string())
        .collect();
    let taken: BTreeSet<String> = serde_json::to_value(tinyvmm_merge::KnobsUpdate::default())
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(documented, taken);
    assert_eq!(taken, api::KNOBS.iter().map(|k| k.to_string()).collect());
    let schemas = &doc["components"]["schemas"];
    let mut fields: BTreeSet<String> = BTreeSet::new();
    for s in [&schemas["Knobs"], &schemas["KsmState"]["allOf"][1]] {
        for (k, _) in s["properties"].as_mapping().unwrap() {
            fields.insert(k.as_str().unwrap().to_string());
        }
    }
    let f = Fixture::new();
    for k in f.state().as_object().unwrap().keys() {
        assert!(
            fields.contains(k),
            "GET /ksm field {k} is not in the OpenAPI document"
        );
    }
    let guest_fields: BTreeSet<String> = schemas["GuestInfo"]["properties"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, _)| k.as_str().unwrap().to_string())
        .collect();
    let g = f.client().json(Method::GET, "/guests/1", None).unwrap();
    for k in g.as_object().unwrap().keys() {
        assert!(
            guest_fields.contains(k),
            "guest field {k} is not in the OpenAPI document"
        );
    }
}

// ---------------------------------------------------------------------------------------
// `tinyvmm ksm`.

#[test]
fn ksm_status_prints_a_table_with_memory_saved() {
    let f = Fixture::new();
    let out = f.ksm(&["status"]).unwrap();
    assert!(out.contains("pages_sharing"), "{out}");
    assert!(
        out.contains("run                        1 (scanning)"),
        "{out}"
    );
    // (3000 sharing + 2000 zero) pages of 4 KiB.
    assert!(out.contains("saved                      19.5 MiB"), "{out}");
    let json: Value = serde_json::from_str(&f.ksm(&["status", "--json"]).unwrap()).unwrap();
    assert_eq!(json, f.state());
}

#[test]
fn ksm_set_changes_knobs_atomically() {
    let f = Fixture::new();
    let out = f
        .ksm(&[
            "set",
            "--run",
            "0",
            "--pages-to-scan",
            "1234",
            "--sleep-ms",
            "7",
            "--max-page-sharing",
            "64",
            "--smart-scan",
            "off",
        ])
        .unwrap();
    assert!(out.contains("pages_to_scan              1234"), "{out}");
    let k = f.cp.knobs();
    assert_eq!(
        (
            u8::from(k.run),
            k.pages_to_scan,
            k.sleep_millisecs,
            k.max_page_sharing,
            k.smart_scan
        ),
        (0, 1234, 7, 64, false)
    );
    // One bad value: nothing changes, and the daemon's reason is shown.
    let e = f
        .ksm(&["set", "--sleep-ms", "1", "--pages-to-scan", "0"])
        .unwrap_err();
    assert!(e.to_string().contains("pages_to_scan must be"), "{e}");
    assert_eq!(f.cp.knobs(), k);
    assert!(matches!(f.ksm(&["set"]), Err(KsmError::NothingToSet)));
}

#[test]
fn ksm_watch_refreshes_in_place_count_times() {
    let f = Fixture::new();
    let out = f
        .ksm(&["watch", "--interval-ms", "20", "--count", "3"])
        .unwrap();
    assert_eq!(out.matches(ksm_client::CLEAR).count(), 3, "{out}");
    assert_eq!(out.matches("rates").count(), 2);
    assert!(out.contains("saved"));
}

#[test]
fn ksm_guests_prints_a_table_or_json() {
    let f = Fixture::new();
    let out = f.ksm(&["guests"]).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("ID  NAME"), "{out}");
    assert!(
        lines[1].contains("vm-a") && lines[1].contains("1001"),
        "{out}"
    );
    let json: Value = serde_json::from_str(&f.ksm(&["guests", "--json"]).unwrap()).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
}

#[test]
fn ksm_without_a_daemon_says_how_to_start_one() {
    let dir = TempDir::new("none");
    // No socket file at all, and a stale one nobody listens on.
    let stale = dir.0.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    for sock in [dir.0.join("missing.sock"), stale] {
        let cli = TestCli::try_parse_from([
            "tinyvmm",
            "ksm",
            "status",
            "--api-sock",
            sock.to_str().unwrap(),
        ])
        .unwrap();
        let TestCommand::Ksm(args) = cli.command;
        let e = ksm_client::run_to(args, &mut Vec::new(), true).unwrap_err();
        assert!(
            matches!(e, KsmError::Client(ClientError::NoDaemon(_))),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "no merge daemon is listening on {}: start one with `tinyvmm merged` or run a guest with --share-memory",
                sock.display()
            )
        );
    }
}

#[test]
fn ksm_api_sock_defaults_to_the_run_dir() {
    let cli = TestCli::try_parse_from(["tinyvmm", "ksm", "status"]).unwrap();
    let TestCommand::Ksm(args) = cli.command;
    assert_eq!(args.api_sock, None);
    assert!(tinyvmm_merged::default_api_socket().ends_with("api.sock"));
    assert!(TestCli::try_parse_from(["tinyvmm", "ksm", "watch", "--interval-ms", "0"]).is_err());
}

// ---------------------------------------------------------------------------------------
// The server serves any `Routes`.

/// A third API on the same transport: `GET /echo` answers its call count, `PUT /echo`
/// its body.
struct Echo(AtomicU64);

impl api::Routes for Echo {
    fn resolve(
        &self,
        method: &Method,
        path: &str,
        _caller: api::Caller,
    ) -> Result<api::Call, api::ApiResponse> {
        if path != "/echo" {
            return Err(api::ApiResponse::error(StatusCode::NOT_FOUND, "no"));
        }
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        let put = *method == Method::PUT;
        Ok(api::Call {
            takes_body: put,
            run: Box::new(move |body| {
                if put {
                    api::ApiResponse::json(StatusCode::OK, &String::from_utf8_lossy(body))
                } else {
                    api::ApiResponse::json(StatusCode::OK, &n)
                }
            }),
        })
    }

    fn backend(&self) -> &'static str {
        "the echo"
    }
}

#[test]
fn the_server_serves_any_routes_with_the_same_limits() {
    let dir = TempDir::new("routes");
    let mut cfg = ApiConfig::new(dir.0.join("echo.sock"));
    cfg.limits.max_body_bytes = 16;
    let server = ApiServer::serve(cfg, Arc::new(Echo(AtomicU64::new(0)))).unwrap();
    let r = raw(server.socket_path(), &req("GET", "/echo", b""));
    assert_eq!((r.status, r.json()), (200, Some(Value::from(0))));
    let r = raw(server.socket_path(), &req("PUT", "/echo", b"hello"));
    assert_eq!((r.status, r.json()), (200, Some(Value::from("hello"))));
    let r = raw(server.socket_path(), &req("PUT", "/echo", &[b'x'; 17]));
    assert_eq!(r.status, 413);
    assert!(r.json().unwrap()["error"].is_string());
    assert_eq!(
        raw(server.socket_path(), &req("GET", "/ksm", b"")).status,
        404
    );
    // The daemon's routes are one more implementation.
    let dir2 = TempDir::new("routes");
    let cp: Arc<dyn ControlPlane> = Arc::new(FakeControlPlane::new());
    let daemon = ApiServer::serve(
        ApiConfig::new(dir2.0.join("api.sock")),
        Arc::new(api::DaemonRoutes::new(cp)),
    )
    .unwrap();
    let r = raw(daemon.socket_path(), &req("GET", "/ksm/run", b""));
    assert_eq!((r.status, r.json()), (200, Some(Value::from(1))));
}

// ---------------------------------------------------------------------------------------
// A VM's own API, against a fake VM.

/// A VM API server on a temp socket against a fresh [`FakeVm`].
struct VmFixture {
    server: ApiServer,
    vm: Arc<FakeVm>,
    _dir: TempDir,
}

impl VmFixture {
    fn new() -> Self {
        let dir = TempDir::new("vm");
        let vm = Arc::new(FakeVm::new());
        let server = ApiServer::start_vm(dir.0.join("vm.sock"), vm.clone()).unwrap();
        VmFixture {
            server,
            vm,
            _dir: dir,
        }
    }

    fn sock(&self) -> &Path {
        self.server.socket_path()
    }

    fn client(&self) -> ApiClient {
        ApiClient::new(self.sock()).unwrap()
    }

    fn shutdowns(&self) -> u64 {
        self.vm.shutdowns.load(Ordering::Relaxed)
    }
}

#[test]
fn get_vm_reports_state_memory_and_merge_counters() {
    let f = VmFixture::new();
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(f.sock()).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let v = f.client().json(Method::GET, "/vm", None).unwrap();
    assert_eq!(v["state"], "running");
    assert_eq!(v["pid"], 4242);
    assert_eq!(v["vcpus"], 2);
    assert_eq!(v["mem_bytes"], 256u64 << 20);
    assert_eq!(v["kernel"], "builtin");
    assert_eq!(v["uptime_ms"], 1234);
    assert_eq!(v["share_memory"], "tinyvmm");
    let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "state",
            "pid",
            "vcpus",
            "mem_bytes",
            "kernel",
            "uptime_ms",
            "share_memory",
            "merge"
        ])
    );
    let m = &v["merge"];
    assert_eq!(m["registered"], true);
    assert_eq!(m["guest_id"], 7);
    assert_eq!(m["pool_mapped_pages"], 3000);
    assert_eq!(m["pages"], 65536);
    for k in [
        "registrations",
        "requests",
        "protect_p50_ns",
        "protect_p99_ns",
        "protect_max_ns",
        "blocked_writes",
        "vma_count",
    ] {
        assert!(m[k].is_u64(), "merge.{k} is not a count: {m}");
    }
    assert_eq!(m.as_object().unwrap().len(), 11, "{m}");
    assert_eq!(f.shutdowns(), 0);
}

#[test]
fn vm_merge_is_null_without_an_agent() {
    use api::vm::{ShareMemory, VmControl};
    use tinyvmm::vm_control::{LiveVm, VmDescription};
    let exit = tinyvmm_vmm::ExitSignal::new().unwrap();
    let vm = LiveVm::new(
        VmDescription {
            vcpus: 1,
            mem_bytes: 64 << 20,
            kernel: "builtin".into(),
            share_memory: ShareMemory::None,
        },
        exit.clone(),
        None,
    );
    let v = serde_json::to_value(vm.info().unwrap()).unwrap();
    assert_eq!(v["merge"], Value::Null);
    assert_eq!(v["share_memory"], "none");
    assert_eq!(v["pid"], std::process::id());
    assert_eq!(v["state"], "running");
    // The shutdown action is an exit request on the VMM's signal, nothing more.
    vm.act(VmAction::Shutdown).unwrap();
    assert_eq!(exit.reason(), Some(tinyvmm_vmm::ExitReason::Requested));
    assert_eq!(
        tinyvmm::exit_status::exit_status(&exit.reason().unwrap()),
        0
    );
    assert_eq!(
        serde_json::to_value(vm.info().unwrap()).unwrap()["state"],
        "stopping"
    );
}

#[test]
fn vm_shutdown_action_is_204_and_reaches_the_vmm() {
    let f = VmFixture::new();
    let r = raw(
        f.sock(),
        &req("PUT", "/vm/actions", br#"{"action": "shutdown"}"#),
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.body.is_empty());
    assert!(
        !r.head.to_ascii_lowercase().contains("content-type"),
        "{}",
        r.head
    );
    assert_eq!(f.shutdowns(), 1);
    // Through the client too; the VM now reports that it is stopping.
    let (status, _) = f
        .client()
        .request(
            Method::PUT,
            "/vm/actions",
            Some(br#"{"action":"shutdown"}"#.to_vec()),
        )
        .unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(f.shutdowns(), 2);
    let v = f.client().json(Method::GET, "/vm", None).unwrap();
    assert_eq!(v["state"], "stopping");
}

#[test]
fn vm_bad_requests_get_4xx_json_errors_and_do_nothing() {
    let f = VmFixture::new();
    let big = {
        let mut b = br#"{"action": "shutdown", "pad": ""#.to_vec();
        b.extend(std::iter::repeat_n(b'x', 65 * 1024));
        b.extend_from_slice(br#""}"#);
        b
    };
    let cases: Vec<Case> = vec![
        case(
            "unknown action",
            "PUT",
            "/vm/actions",
            br#"{"action": "reboot"}"#,
            400,
        ),
        case(
            "action in the wrong case",
            "PUT",
            "/vm/actions",
            br#"{"action": "Shutdown"}"#,
            400,
        ),
        case(
            "unknown field",
            "PUT",
            "/vm/actions",
            br#"{"action": "shutdown", "force": true}"#,
            400,
        ),
        case("no action", "PUT", "/vm/actions", b"{}", 400),
        case(
            "null action",
            "PUT",
            "/vm/actions",
            br#"{"action": null}"#,
            400,
        ),
        case(
            "numeric action",
            "PUT",
            "/vm/actions",
            br#"{"action": 1}"#,
            400,
        ),
        case(
            "action as an object",
            "PUT",
            "/vm/actions",
            br#"{"action": {"shutdown": 1}}"#,
            400,
        ),
        case("bare string", "PUT", "/vm/actions", br#""shutdown""#, 400),
        case("array", "PUT", "/vm/actions", br#"["shutdown"]"#, 400),
        case("null body", "PUT", "/vm/actions", b"null", 400),
        case("empty body", "PUT", "/vm/actions", b"", 400),
        case("whitespace body", "PUT", "/vm/actions", b" \n", 400),
        case(
            "truncated JSON",
            "PUT",
            "/vm/actions",
            br#"{"action": "shut"#,
            400,
        ),
        case("not JSON", "PUT", "/vm/actions", b"action=shutdown", 400),
        case(
            "trailing garbage",
            "PUT",
            "/vm/actions",
            br#"{"action": "shutdown"} x"#,
            400,
        ),
        case(
            "duplicate field",
            "PUT",
            "/vm/actions",
            br#"{"action": "shutdown", "action": "shutdown"}"#,
            400,
        ),
        case("oversized body", "PUT", "/vm/actions", &big, 413),
        case("GET actions", "GET", "/vm/actions", b"", 405),
        case(
            "POST actions",
            "POST",
            "/vm/actions",
            br#"{"action": "shutdown"}"#,
            405,
        ),
        case(
            "PATCH actions",
            "PATCH",
            "/vm/actions",
            br#"{"action": "shutdown"}"#,
            405,
        ),
        case("PUT vm", "PUT", "/vm", br#"{"action": "shutdown"}"#, 405),
        case("DELETE vm", "DELETE", "/vm", b"", 405),
        case("trailing slash", "GET", "/vm/", b"", 404),
        case(
            "unknown action path",
            "PUT",
            "/vm/actions/shutdown",
            b"",
            404,
        ),
        case("daemon path", "GET", "/ksm", b"", 404),
        case("root", "GET", "/", b"", 404),
        case("upper case", "GET", "/VM", b"", 404),
    ];
    let mut failures = Vec::new();
    for c in &cases {
        let r = raw(f.sock(), &c.request);
        let error = r
            .json()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string));
        if r.status != c.status {
            failures.push(format!(
                "{}: got {} want {} ({:?})",
                c.name, r.status, c.status, error
            ));
            continue;
        }
        if error.as_deref().is_none_or(str::is_empty) {
            failures.push(format!(
                "{}: no {{\"error\": ...}} body: {:?}",
                c.name,
                String::from_utf8_lossy(&r.body)
            ));
        }
        if r.status == 405 && !r.head.to_ascii_lowercase().contains("\nallow: ") {
            failures.push(format!("{}: 405 without Allow", c.name));
        }
        eprintln!("{:<32} {} {}", c.name, r.status, error.unwrap_or_default());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(f.shutdowns(), 0, "a refused request acted on the VM");
    // Allow names the methods of each path.
    let r = raw(f.sock(), &req("POST", "/vm", b""));
    assert!(
        r.head.to_ascii_lowercase().contains("\nallow: get"),
        "{}",
        r.head
    );
    let r = raw(f.sock(), &req("GET", "/vm/actions", b""));
    assert!(
        r.head.to_ascii_lowercase().contains("\nallow: put"),
        "{}",
        r.head
    );
    // The server still serves.
    let v = f.client().json(Method::GET, "/vm", None).unwrap();
    assert_eq!(v["state"], "running");
}

#[test]
fn vm_unknown_action_error_names_the_actions() {
    let f = VmFixture::new();
    let e = f
        .client()
        .json(
            Method::PUT,
            "/vm/actions",
            Some(&serde_json::json!({"action": "pause"})),
        )
        .unwrap_err();
    let ClientError::Refused { status, msg, .. } = e else {
        panic!("{e:?}")
    };
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(msg.contains("pause") && msg.contains("shutdown"), "{msg}");
}

#[test]
fn vm_routes_resolve_to_endpoints_404_or_405() {
    use api::vm::resolve_vm;
    let cases: &[(Method, &str, Result<VmEndpoint, u16>)] = &[
        (Method::GET, "/vm", Ok(VmEndpoint::GetVm)),
        (Method::PUT, "/vm/actions", Ok(VmEndpoint::PutAction)),
        (Method::HEAD, "/vm", Err(405)),
        (Method::PUT, "/vm", Err(405)),
        (Method::GET, "/vm/actions", Err(405)),
        (Method::GET, "", Err(404)),
        (Method::GET, "//vm", Err(404)),
        (Method::GET, "/vm/x", Err(404)),
        (Method::GET, "/guests", Err(404)),
        (Method::GET, "/vm/balloon", Ok(VmEndpoint::GetBalloon)),
        (Method::PUT, "/vm/balloon", Ok(VmEndpoint::PutBalloon)),
        (
            Method::GET,
            "/vm/balloon/statistics",
            Ok(VmEndpoint::GetBalloonStatistics),
        ),
        (Method::PATCH, "/vm/balloon", Err(405)),
        (Method::PUT, "/vm/balloon/statistics", Err(405)),
    ];
    for (m, p, want) in cases {
        let got = resolve_vm(m, p).map_err(|r| r.status.as_u16());
        assert_eq!(&got, want, "{m} {p}");
    }
}

#[test]
fn vm_openapi_document_and_server_routes_agree() {
    let f = VmFixture::new();
    check_routes_agree(
        &openapi_doc("vm-openapi.yaml"),
        VM_ROUTES,
        f.sock(),
        str::to_string,
        |_| br#"{"action": "shutdown"}"#,
    );
}

#[test]
fn vm_openapi_document_has_every_field_of_get_vm() {
    let doc = openapi_doc("vm-openapi.yaml");
    let schemas = &doc["components"]["schemas"];
    let fields = |schema: &serde_norway::Value| -> BTreeSet<String> {
        schema["properties"]
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_str().unwrap().to_string())
            .collect()
    };
    let f = VmFixture::new();
    let v = f.client().json(Method::GET, "/vm", None).unwrap();
    let keys = |v: &Value| -> BTreeSet<String> { v.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(fields(&schemas["VmInfo"]), keys(&v));
    assert_eq!(fields(&schemas["MergeInfo"]), keys(&v["merge"]));
    let actions: Vec<&str> = schemas["VmAction"]["properties"]["action"]["enum"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(actions, ["shutdown"]);
    let b = f.client().json(Method::GET, "/vm/balloon", None).unwrap();
    assert_eq!(fields(&schemas["BalloonInfo"]), keys(&b));
    let s = f
        .client()
        .json(Method::GET, "/vm/balloon/statistics", None)
        .unwrap();
    assert_eq!(fields(&schemas["BalloonStatistics"]), keys(&s));
}

mod vm_props {
    use super::*;
    use proptest::prelude::*;

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..48),
            "[{}\\[\\]\":, a-z_]{0,40}".prop_map(String::into_bytes),
            "(shutdown|reboot|pause|action|force|Shutdown| )"
                .prop_map(|w| format!("{{\"action\": \"{w}\"}}").into_bytes()),
            "(shutdown|reboot)".prop_map(|w| format!("[\"{w}\"]").into_bytes()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        /// Whatever the body of `PUT /vm/actions`: no panic, no 5xx, and only the one valid
        /// action acts on the VM.
        #[test]
        fn vm_action_bodies_never_5xx_and_refusals_do_nothing(body in body()) {
            let vm = FakeVm::new();
            let r = api::vm::execute_vm(VmEndpoint::PutAction, &body, &vm);
            let acted = vm.shutdowns.load(Ordering::Relaxed);
            prop_assert!(!r.status.is_server_error());
            if r.status == StatusCode::NO_CONTENT {
                prop_assert_eq!(acted, 1);
                let v: Value = serde_json::from_slice(&body).unwrap();
                prop_assert_eq!(v, serde_json::json!({"action": "shutdown"}));
            } else {
                prop_assert_eq!(r.status, StatusCode::BAD_REQUEST);
                prop_assert_eq!(acted, 0);
                let e: Value = serde_json::from_slice(&r.body).unwrap();
                prop_assert!(e["error"].as_str().is_some_and(|e| !e.is_empty()));
            }
        }
    }
}

#[test]
fn a_guest_name_in_the_path_is_percent_decoded() {
    let f = Fixture::new();
    let c = f.client();
    // Guest 2 is named `vm "b"`: raw, then through the typed client (which encodes it).
    let r = raw(f.sock(), &req("GET", "/guests/vm%20%22b%22", b""));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json().unwrap()["id"], 2);
    assert_eq!(c.guest("vm \"b\"").unwrap().counters.id.0, 2);
    assert_eq!(c.guest("1").unwrap().name, "vm-a");
    // A broken escape is a 400 that says so; an unknown name a 404.
    let r = raw(f.sock(), &req("GET", "/guests/vm%2", b""));
    assert_eq!(r.status, 400);
    assert!(r.json().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("percent-encoding"));
    let r = raw(f.sock(), &req("GET", "/guests/my%20guest.elf", b""));
    assert_eq!(r.status, 404);
    assert!(r.json().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("\"my guest.elf\""));
}

/// A request with `Content-Type: content_type` (none if empty) and `body`.
fn req_typed(method: &str, path: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let ct = if content_type.is_empty() {
        String::new()
    } else {
        format!("Content-Type: {content_type}\r\n")
    };
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{ct}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[test]
fn bodies_must_be_declared_as_json_else_415() {
    let f = Fixture::new();
    let before = f.state();
    for (method, path, body) in [
        ("PATCH", "/ksm", &br#"{"run": 0}"#[..]),
        ("PUT", "/ksm/run", b"0"),
    ] {
        for ct in [
            "",
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/jsonx",
        ] {
            let r = raw(f.sock(), &req_typed(method, path, ct, body));
            assert_eq!(r.status, 415, "{method} {path} with {ct:?}");
            let e = r.json().unwrap()["error"].as_str().unwrap().to_string();
            assert!(e.contains("application/json"), "{e}");
        }
        for ct in ["application/json; charset=utf-8", "Application/JSON"] {
            let r = raw(f.sock(), &req_typed(method, path, ct, body));
            assert_eq!(r.status, 200, "{method} {path} with {ct:?}");
        }
    }
    assert_eq!(f.cp.updates.load(Ordering::Relaxed), 4);
    assert_ne!(f.state(), before);
    // The VM API: a text/plain body does not shut the VM down.
    let vm = VmFixture::new();
    let action = br#"{"action": "shutdown"}"#;
    let r = raw(
        vm.sock(),
        &req_typed("PUT", "/vm/actions", "text/plain", action),
    );
    assert_eq!(r.status, 415);
    assert!(r.json().unwrap()["error"].is_string());
    assert_eq!(vm.shutdowns(), 0);
    // The typed client sends the header.
    vm.client().vm_action(VmAction::Shutdown).unwrap();
    assert_eq!(vm.shutdowns(), 1);
}

#[test]
fn vm_action_of_the_wrong_shape_says_invalid_action() {
    let f = VmFixture::new();
    for body in [&br#"{"action":1}"#[..], br#"{"action": null}"#, b"{}"] {
        let r = raw(f.sock(), &req("PUT", "/vm/actions", body));
        assert_eq!(r.status, 400);
        let e = r.json().unwrap()["error"].as_str().unwrap().to_string();
        assert!(e.starts_with("invalid action: "), "{e}");
        assert!(!e.contains("column"), "{e}");
    }
    assert_eq!(f.shutdowns(), 0);
}

#[test]
fn typed_client_calls_return_the_servers_types() {
    let f = Fixture::new();
    let c = f.client();
    let s = c.ksm().unwrap();
    assert_eq!(s.counters.pages_sharing, 3000);
    assert_eq!(s.engine_metadata_bytes, s.counters.metadata_bytes);
    let s = c
        .patch_ksm(&tinyvmm_merge::KnobsUpdate {
            pages_to_scan: Some(77),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(s.knobs.pages_to_scan, 77);
    assert_eq!(c.knob("pages_to_scan").unwrap(), 77);
    assert_eq!(
        c.put_knob("sleep_millisecs", &9)
            .unwrap()
            .knobs
            .sleep_millisecs,
        9
    );
    assert_eq!(c.guests().unwrap().len(), 2);
    assert!(c.metrics().unwrap().contains("tinyvmm_ksm_pages_sharing"));
    let e = c.put_knob("run", &3).unwrap_err();
    assert!(
        matches!(&e, ClientError::Refused { status, .. } if *status == StatusCode::BAD_REQUEST),
        "{e:?}"
    );
    let vm = VmFixture::new();
    let info = vm.client().vm().unwrap();
    assert_eq!(info.vcpus, 2);
    assert_eq!(info.merge.unwrap().guest_id, Some(7));
}

// ---------------------------------------------------------------------------------------
// The contract as an independent client sees it: schemathesis generates requests from each
// OpenAPI document (valid and invalid ones) and checks every answer against it (status
// documented, body schema, content type, 405 with Allow, valid data accepted, invalid
// data refused, no 5xx).

/// The schemathesis version `.ci/run` installs.
const SCHEMATHESIS_VERSION: &str = "4.32.5";
/// Fixed seed and bounded examples per operation: the run is reproducible and short.
const SCHEMATHESIS_SEED: &str = "20240611";
const SCHEMATHESIS_MAX_EXAMPLES: &str = "40";

/// The `schemathesis` command, or `None` (with the reason printed) where it is not
/// installed outside CI; under CI (`CI` set) a missing schemathesis fails the test.
fn schemathesis() -> Option<std::path::PathBuf> {
    let exe = std::env::var_os("SCHEMATHESIS").map_or_else(|| "schemathesis".into(), Into::into);
    match std::process::Command::new(&exe).arg("--version").output() {
        Ok(out) if out.status.success() => {
            eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
            Some(exe)
        }
        r => {
            let why = format!(
                "schemathesis is not installed ({r:?}): `pip install schemathesis=={SCHEMATHESIS_VERSION}` \
                 (.ci/run does), or point $SCHEMATHESIS at it"
            );
            let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
            assert!(!ci, "{why}");
            eprintln!("skipped: {why}");
            None
        }
    }
}

/// Runs schemathesis on the document `doc` against the server at `addr`; fails on any
/// violation, with schemathesis's report.
fn run_schemathesis(exe: &Path, doc: &str, addr: std::net::SocketAddr) {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("api").join(doc);
    let dir = TempDir::new("schemathesis");
    let args: Vec<String> = vec![
        "run".into(),
        doc.display().to_string(),
        "--url".into(),
        format!("http://{addr}"),
        "--checks".into(),
        "all".into(),
        "--seed".into(),
        SCHEMATHESIS_SEED.into(),
        "--max-examples".into(),
        SCHEMATHESIS_MAX_EXAMPLES.into(),
        "--phases".into(),
        "examples,coverage,fuzzing".into(),
        "--workers".into(),
        "1".into(),
        "--generation-database".into(),
        "none".into(),
        "--request-timeout".into(),
        "10".into(),
        "--no-color".into(),
        "--report".into(),
        "junit".into(),
        "--report-junit-path".into(),
        dir.0.join("junit.xml").display().to_string(),
        "--header".into(),
        format!("Authorization: Bearer {TCP_TOKEN}"),
    ];
    eprintln!("schemathesis {}", args.join(" "));
    let out = std::process::Command::new(exe)
        .args(&args)
        .current_dir(&dir.0)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    let junit = std::fs::read_to_string(dir.0.join("junit.xml")).unwrap_or_default();
    assert!(
        out.status.success(),
        "schemathesis found contract violations in {} ({}):\n{stdout}\n{stderr}",
        doc.display(),
        out.status
    );
    assert!(!junit.contains("<failure"), "{junit}");
}

/// The daemon's routes against the fake backend, but with no state kept between requests
/// (each request sees the default knobs): schemathesis does not know that a `scan-time`
/// advisor turned on by one request makes a later `pages_to_scan` a 400, a rule of the
/// state that no schema can express.
struct FreshEachTime;

impl ControlPlane for FreshEachTime {
    fn ksm(&self) -> Result<KsmState, ApiError> {
        FakeControlPlane::new().ksm()
    }
    fn update_knobs(&self, upd: tinyvmm_merge::KnobsUpdate) -> Result<KsmState, ApiError> {
        FakeControlPlane::new().update_knobs(upd)
    }
    fn guests(&self) -> Result<Vec<GuestInfo>, ApiError> {
        FakeControlPlane::new().guests()
    }
}

/// The bearer token of the loopback TCP listeners these tests make.
const TCP_TOKEN: &str = "test-token-5f1c";

fn loopback_config(dir: &TempDir, sock: &str) -> ApiConfig {
    let mut cfg = ApiConfig::new(dir.0.join(sock));
    cfg.tcp = Some("127.0.0.1:0".parse().unwrap());
    cfg.tcp_token = Some(TCP_TOKEN.into());
    cfg
}

/// One raw request over TCP; the status line's code.
fn tcp_status(addr: std::net::SocketAddr, head: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Over TCP every request needs the bearer token and a loopback `Host`; the Unix socket
/// needs neither; a TCP listener without a token is refused at start.
#[test]
fn tcp_requests_need_the_token_and_a_loopback_host() {
    let dir = TempDir::new("tcp-auth");
    let server = ApiServer::start_daemon(
        loopback_config(&dir, "api.sock"),
        Arc::new(FakeControlPlane::new()),
    )
    .unwrap();
    let addr = server.tcp_addr().unwrap();
    let get = |host: &str, auth: &str| {
        tcp_status(
            addr,
            &format!("GET /ksm HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"),
        )
    };
    let bearer = format!("Authorization: Bearer {TCP_TOKEN}\r\n");
    assert_eq!(get("127.0.0.1", &bearer), 200);
    assert_eq!(get(&format!("localhost:{}", addr.port()), &bearer), 200);
    assert_eq!(get("[::1]:80", &bearer), 200);
    assert_eq!(get("127.0.0.1", ""), 401, "no token");
    assert_eq!(get("127.0.0.1", "Authorization: Bearer wrong\r\n"), 401);
    assert_eq!(
        get(
            "127.0.0.1",
            &format!("Authorization: Basic {TCP_TOKEN}\r\n")
        ),
        401
    );
    assert_eq!(get("evil.example", &bearer), 403, "DNS rebinding");
    assert_eq!(get("127.0.0.1.evil.example", &bearer), 403);
    // The Unix socket: no token needed.
    let mut u = UnixStream::connect(dir.0.join("api.sock")).unwrap();
    u.write_all(b"GET /ksm HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    u.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    drop(server);
    // No token, no TCP listener.
    let mut cfg = loopback_config(&dir, "api2.sock");
    cfg.tcp_token = None;
    let e = ApiServer::start_daemon(cfg, Arc::new(FakeControlPlane::new())).unwrap_err();
    assert!(e.to_string().contains("token"), "{e}");
}

#[test]
fn schemathesis_finds_no_contract_violation_in_openapi_yaml() {
    let Some(exe) = schemathesis() else { return };
    let dir = TempDir::new("st-daemon");
    let server =
        ApiServer::start_daemon(loopback_config(&dir, "api.sock"), Arc::new(FreshEachTime))
            .unwrap();
    run_schemathesis(&exe, "openapi.yaml", server.tcp_addr().unwrap());
}

#[test]
fn schemathesis_finds_no_contract_violation_in_vm_openapi_yaml() {
    let Some(exe) = schemathesis() else { return };
    let dir = TempDir::new("st-vm");
    let vm = Arc::new(FakeVm::new());
    let server = ApiServer::serve(
        loopback_config(&dir, "vm.sock"),
        Arc::new(api::vm::VmRoutes::new(vm.clone())),
    )
    .unwrap();
    run_schemathesis(&exe, "vm-openapi.yaml", server.tcp_addr().unwrap());
    assert!(
        vm.shutdowns.load(Ordering::Relaxed) > 0,
        "no valid action was sent"
    );
}
