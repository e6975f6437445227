//! Unit tests of the routing, the JSON layer, the metrics and the listener setup. The
//! HTTP-level suites (every endpoint over the socket, malformed requests, slow clients,
//! 50 pollers, the OpenAPI document) are in `tests/api.rs`.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::Arc;

use hyper::{Method, StatusCode};
use proptest::prelude::*;
use tinyvmm_merge::{Knobs, RunMode};

use super::routes::{execute, parse_patch, parse_put, resolve, Endpoint};
use super::testing::{FakeControlPlane, TempDir};
use super::*;

fn status_of(method: Method, path: &str, body: &[u8], cp: &FakeControlPlane) -> StatusCode {
    match resolve(&method, path) {
        Ok(e) => execute(&e, body, cp).status,
        Err(r) => r.status,
    }
}

#[test]
fn routes_resolve_to_endpoints_404_or_405() {
    let cases: &[(Method, &str, Result<Endpoint, u16>)] = &[
        (Method::GET, "/ksm", Ok(Endpoint::GetKsm)),
        (Method::PATCH, "/ksm", Ok(Endpoint::PatchKsm)),
        (Method::GET, "/ksm/run", Ok(Endpoint::GetKnob("run"))),
        (
            Method::PUT,
            "/ksm/pages_to_scan",
            Ok(Endpoint::PutKnob("pages_to_scan")),
        ),
        (Method::GET, "/guests", Ok(Endpoint::ListGuests)),
        (Method::GET, "/guests/3", Ok(Endpoint::GetGuest("3".into()))),
        (
            Method::GET,
            "/guests/my%20guest.elf",
            Ok(Endpoint::GetGuest("my guest.elf".into())),
        ),
        (
            Method::GET,
            "/guests/a%2Fb",
            Ok(Endpoint::GetGuest("a/b".into())),
        ),
        (Method::GET, "/ksm/r%75n", Ok(Endpoint::GetKnob("run"))),
        (Method::GET, "/guests/%zz", Err(400)),
        (Method::GET, "/guests/%ff", Err(400)),
        (Method::GET, "/guests/%4", Err(400)),
        (Method::GET, "/metrics", Ok(Endpoint::Metrics)),
        (Method::POST, "/ksm", Err(405)),
        (Method::DELETE, "/ksm/run", Err(405)),
        (Method::PATCH, "/ksm/run", Err(405)),
        (Method::PUT, "/guests", Err(405)),
        (Method::HEAD, "/metrics", Err(405)),
        (Method::GET, "/", Err(404)),
        (Method::GET, "", Err(404)),
        (Method::GET, "/ksm/", Err(404)),
        (Method::GET, "/ksm/pages_shared", Err(404)),
        (Method::PUT, "/ksm/bogus", Err(404)),
        (Method::GET, "/guests/", Err(404)),
        (Method::GET, "/guests/1/x", Err(404)),
        (Method::GET, "/KSM", Err(404)),
        (Method::GET, "//ksm", Err(404)),
    ];
    for (m, p, want) in cases {
        let got = resolve(m, p).map_err(|r| r.status.as_u16());
        assert_eq!(&got, want, "{m} {p}");
    }
}

#[test]
fn method_not_allowed_names_the_allowed_methods() {
    let r = resolve(&Method::DELETE, "/ksm").unwrap_err();
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.allow.as_deref(), Some("GET, PATCH"));
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert!(body["error"].as_str().unwrap().contains("DELETE"));
}

#[test]
fn put_body_is_a_bare_value_like_a_sysfs_write() {
    let upd = parse_put("run", b"1\n").unwrap();
    assert_eq!(upd.run, Some(RunMode::Run));
    assert_eq!(
        parse_put("smart_scan", b"false").unwrap().smart_scan,
        Some(false)
    );
    assert!(parse_put("run", b"null")
        .unwrap_err()
        .to_string()
        .contains("null"));
    assert!(parse_put("run", b"")
        .unwrap_err()
        .to_string()
        .contains("empty"));
    assert!(parse_put("run", b"\"1\"").is_err());
    assert!(parse_put("run", b"3")
        .unwrap_err()
        .to_string()
        .contains("0, 1 or 2"));
}

#[test]
fn patch_body_rejects_unknown_fields_and_wrong_types() {
    assert!(parse_patch(b"{\"bogus\": 1}")
        .unwrap_err()
        .to_string()
        .contains("unknown field"));
    assert!(parse_patch(b"{\"pages_to_scan\": \"5\"}")
        .unwrap_err()
        .to_string()
        .contains("invalid type"));
    assert!(parse_patch(b" ").unwrap_err().to_string().contains("empty"));
    assert_eq!(parse_patch(b"{}").unwrap(), KnobsUpdate::default());
}

#[test]
fn patch_applies_atomically_or_not_at_all() {
    let cp = FakeControlPlane::new();
    let before = cp.knobs();
    // One valid and one invalid knob: nothing changes.
    let s = status_of(
        Method::PATCH,
        "/ksm",
        br#"{"sleep_millisecs": 5, "pages_to_scan": 0}"#,
        &cp,
    );
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(cp.knobs(), before);
    let r = execute(
        &Endpoint::PatchKsm,
        br#"{"sleep_millisecs": 5, "pages_to_scan": 2000}"#,
        &cp,
    );
    assert_eq!(r.status, StatusCode::OK);
    let state: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(state["sleep_millisecs"], 5);
    assert_eq!(state["pages_to_scan"], 2000);
    assert_eq!(cp.knobs().pages_to_scan, 2000);
}

#[test]
fn run_2_unmerges_and_reports_it() {
    let cp = FakeControlPlane::new();
    let r = execute(&Endpoint::PutKnob("run"), b"2", &cp);
    assert_eq!(r.status, StatusCode::OK);
    let state: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(state["run"], 2);
    assert_eq!(state["pages_sharing"], 0);
}

#[test]
fn get_ksm_has_every_kernel_name() {
    let cp = FakeControlPlane::new();
    let r = execute(&Endpoint::GetKsm, b"", &cp);
    let state: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
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
        "stable_node_chains",
        "stable_node_dups",
        "pool_bytes",
        "engine_metadata_bytes",
    ] {
        assert!(state.get(k).is_some(), "GET /ksm lacks {k}: {state}");
    }
}

#[test]
fn guest_by_id_or_name_and_404() {
    let cp = FakeControlPlane::new();
    let r = execute(&Endpoint::GetGuest("2".into()), b"", &cp);
    assert_eq!(r.status, StatusCode::OK);
    let g: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(g["id"], 2);
    assert_eq!(g["pid"], 1002);
    let r = execute(&Endpoint::GetGuest("vm-a".into()), b"", &cp);
    assert_eq!(r.status, StatusCode::OK);
    let r = execute(&Endpoint::GetGuest("9".into()), b"", &cp);
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// Over a Unix socket opened to other users, a user sees only the guests of the share
/// groups it is a member of and cannot change a knob; root and the daemon's own user are
/// the administrator.
#[test]
fn other_users_see_only_their_groups_and_change_nothing() {
    let cp = Arc::new(FakeControlPlane::new());
    cp.set_guest_owner(2, 1000, vec![1000, 1001]);
    let routes = DaemonRoutes::new(cp.clone());
    let call = |caller: Caller, method: Method, path: &str, body: &[u8]| match Routes::resolve(
        &routes, &method, path, caller,
    ) {
        Ok(c) => (c.run)(body),
        Err(r) => r,
    };
    let ids = |caller: Caller| -> Vec<u64> {
        let r = call(caller, Method::GET, "/guests", b"");
        assert_eq!(r.status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|g| g["id"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(ids(Caller::Admin), vec![1, 2]);
    assert_eq!(ids(Caller::User(1000)), vec![2]);
    assert_eq!(ids(Caller::User(1001)), vec![2]);
    assert_eq!(ids(Caller::User(7)), Vec::<u64>::new());
    let get = |caller, path: &str| call(caller, Method::GET, path, b"").status;
    assert_eq!(get(Caller::User(1000), "/guests/2"), StatusCode::OK);
    assert_eq!(get(Caller::User(1000), "/guests/1"), StatusCode::NOT_FOUND);
    assert_eq!(
        get(Caller::User(1000), "/guests/vm-a"),
        StatusCode::NOT_FOUND
    );
    assert_eq!(get(Caller::User(7), "/ksm"), StatusCode::OK);
    let metrics = call(Caller::User(7), Method::GET, "/metrics", b"");
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(text.contains("tinyvmm_ksm_pages_shared"), "{text}");
    assert!(!text.contains("tinyvmm_ksm_guest_"), "{text}");
    let metrics = call(Caller::User(1000), Method::GET, "/metrics", b"");
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(text.contains("guest=\"2\""), "{text}");
    assert!(!text.contains("guest=\"1\""), "{text}");
    for (method, path, body) in [
        (Method::PUT, "/ksm/run", &b"2"[..]),
        (Method::PATCH, "/ksm", &b"{\"run\": 2}"[..]),
    ] {
        let r = call(Caller::User(1000), method.clone(), path, body);
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{method} {path}");
    }
    assert_eq!(cp.knobs(), Knobs::default(), "nothing changed");
    let r = call(Caller::Admin, Method::PUT, "/ksm/run", b"0");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(Caller::from_peer_uid(Some(0), 5), Caller::Admin);
    assert_eq!(Caller::from_peer_uid(Some(5), 5), Caller::Admin);
    assert_eq!(Caller::from_peer_uid(Some(6), 5), Caller::User(6));
    assert_eq!(Caller::from_peer_uid(None, 5), Caller::User(u32::MAX));
}

#[test]
fn unavailable_daemon_is_503() {
    let cp = FakeControlPlane::new();
    cp.unavailable
        .store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        status_of(Method::GET, "/ksm", b"", &cp),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        status_of(Method::GET, "/metrics", b"", &cp),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[test]
fn metrics_have_help_type_and_guest_labels() {
    let cp = FakeControlPlane::new();
    let text = String::from_utf8(execute(&Endpoint::Metrics, b"", &cp).body.to_vec()).unwrap();
    assert!(text.contains("# HELP tinyvmm_ksm_pages_sharing "));
    assert!(
        text.contains("# TYPE tinyvmm_ksm_pages_sharing gauge\ntinyvmm_ksm_pages_sharing 3000\n")
    );
    assert!(text.contains("# TYPE tinyvmm_ksm_full_scans counter\n"));
    assert!(text.contains("tinyvmm_ksm_smart_scan 1\n"));
    assert!(text.contains(
        "tinyvmm_ksm_guest_merging_pages{guest=\"1\",name=\"vm-a\",share_group=\"default\",uid=\"0\"} 2000\n"
    ));
    // Label values are escaped.
    assert!(text.contains("name=\"vm \\\"b\\\"\""));
    // Every line is a comment or `name{labels} value` with a numeric value.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        assert!(series.starts_with("tinyvmm_ksm_"), "{line}");
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    // Every fleet counter of the engine is exported.
    let counters = serde_json::to_value(tinyvmm_merge::Counters::default()).unwrap();
    for k in counters.as_object().unwrap().keys() {
        assert!(
            text.contains(&format!("\ntinyvmm_ksm_{k} ")),
            "no series for {k}"
        );
    }
}

#[test]
fn socket_is_0600_replaces_stale_refuses_live_and_is_removed_on_drop() {
    let dir = TempDir::new("sock");
    let path = dir.0.join("sub").join("api.sock");
    // A stale socket file (nobody listening) is replaced.
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let cp: Arc<dyn ControlPlane> = Arc::new(FakeControlPlane::new());
    let server = ApiServer::start_daemon(ApiConfig::new(&path), cp.clone()).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // A live one is not.
    let e = ApiServer::start_daemon(ApiConfig::new(&path), cp.clone()).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    drop(server);
    assert!(!path.exists(), "socket file left behind");
    // A regular file is never replaced.
    std::fs::write(&path, b"x").unwrap();
    let e = ApiServer::start_daemon(ApiConfig::new(&path), cp).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"x");
}

#[test]
fn created_run_dir_is_0700() {
    let dir = TempDir::new("dir");
    let path = dir.0.join("run").join("api.sock");
    let cp: Arc<dyn ControlPlane> = Arc::new(FakeControlPlane::new());
    let _server = ApiServer::start_daemon(ApiConfig::new(&path), cp).unwrap();
    let mode = std::fs::metadata(dir.0.join("run"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn tcp_listener_only_on_loopback() {
    let dir = TempDir::new("tcp");
    let cp: Arc<dyn ControlPlane> = Arc::new(FakeControlPlane::new());
    let mut cfg = ApiConfig::new(dir.0.join("api.sock"));
    cfg.tcp = Some("0.0.0.0:0".parse().unwrap());
    cfg.tcp_token = Some("t0ken".into());
    let e = ApiServer::start_daemon(cfg.clone(), cp.clone()).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("loopback"), "{e}");
    assert!(
        !cfg.socket.exists(),
        "a refused start must not leave a socket"
    );
    cfg.tcp = Some("127.0.0.1:0".parse().unwrap());
    let server = ApiServer::start_daemon(cfg, cp).unwrap();
    let addr = server.tcp_addr().unwrap();
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(
        b"GET /ksm/run HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer t0ken\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with("\r\n\r\n1"), "{reply}");
}

fn knob_name() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(super::KNOBS.to_vec())
}

/// JSON-ish bodies: valid objects with any knob names and values, and raw bytes.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)),
        (0u32..4).prop_map(serde_json::Value::from),
        "[a-z_-]{0,12}".prop_map(serde_json::Value::from),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    knob_name().prop_map(str::to_string),
                    Just("mode".to_string()),
                    Just("target_scan_secs".to_string()),
                    Just("max_cpu_pct".to_string()),
                    "[a-z_]{1,8}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![
        value.prop_map(|v| v.to_string().into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..64),
        "[{}\\[\\]\":,0-9a-z_ .-]{0,40}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The JSON layer never panics and never answers 5xx; whatever it refuses leaves the
    /// knobs unchanged, whatever it accepts is valid.
    #[test]
    fn json_layer_never_5xx_and_refusals_change_nothing(
        knob in knob_name(),
        put in any::<bool>(),
        body in body(),
    ) {
        let cp = FakeControlPlane::new();
        let before = cp.knobs();
        let endpoint = if put { Endpoint::PutKnob(knob) } else { Endpoint::PatchKsm };
        let r = execute(&endpoint, &body, &cp);
        prop_assert!(!r.status.is_server_error(), "{} for {:?}", r.status, String::from_utf8_lossy(&body));
        let parsed: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        if r.status == StatusCode::OK {
            prop_assert!(cp.knobs().validate().is_ok());
        } else {
            prop_assert_eq!(r.status, StatusCode::BAD_REQUEST);
            prop_assert!(parsed["error"].as_str().is_some_and(|e| !e.is_empty()));
            prop_assert_eq!(cp.knobs(), before);
        }
    }

    /// Any path and method: a route, a 404 or a 405, never a panic.
    #[test]
    fn any_path_resolves_or_is_404_405(path in "(/[a-z_{}0-9]{0,10}){0,4}", m in 0usize..6) {
        let method = [Method::GET, Method::PUT, Method::PATCH, Method::POST, Method::DELETE, Method::OPTIONS][m].clone();
        if let Err(r) = resolve(&method, &path) {
            prop_assert!(r.status == StatusCode::NOT_FOUND || r.status == StatusCode::METHOD_NOT_ALLOWED);
        }
    }
}

#[test]
fn knobs_default_is_valid() {
    assert!(Knobs::default().validate().is_ok());
}

#[test]
fn every_error_kind_has_one_status() {
    use super::response::status_of;
    let cases = [
        (ApiError::BadRequest("x".into()), 400, None),
        (ApiError::NotFound("x".into()), 404, None),
        (
            ApiError::MethodNotAllowed {
                msg: "x".into(),
                allow: "GET".into(),
            },
            405,
            Some("GET"),
        ),
        (ApiError::Timeout("x".into()), 408, None),
        (ApiError::PayloadTooLarge("x".into()), 413, None),
        (ApiError::UnsupportedMediaType("x".into()), 415, None),
        (ApiError::Internal("x".into()), 500, None),
        (ApiError::Unavailable("x".into()), 503, None),
    ];
    for (e, status, allow) in cases {
        assert_eq!(status_of(&e).as_u16(), status, "{e:?}");
        let r = ApiResponse::from_api_error(e);
        assert_eq!(r.status.as_u16(), status);
        assert_eq!(r.allow.as_deref(), allow);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"], "x");
    }
}

#[test]
fn unavailable_backend_is_503_on_every_endpoint() {
    let cp = FakeControlPlane::new();
    cp.unavailable
        .store(true, std::sync::atomic::Ordering::Relaxed);
    for (m, p, body) in [
        (Method::GET, "/ksm", &b""[..]),
        (Method::PATCH, "/ksm", b"{\"run\": 1}"),
        (Method::GET, "/ksm/run", b""),
        (Method::PUT, "/ksm/run", b"1"),
        (Method::GET, "/guests", b""),
        (Method::GET, "/guests/1", b""),
        (Method::GET, "/metrics", b""),
    ] {
        assert_eq!(
            status_of(m.clone(), p, body, &cp),
            StatusCode::SERVICE_UNAVAILABLE,
            "{m} {p}"
        );
    }
}

#[test]
fn json_content_types() {
    for ok in [
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        " application/json ;charset=UTF-8",
    ] {
        assert!(is_json_content_type(ok), "{ok}");
    }
    for bad in [
        "text/plain",
        "application/jsonx",
        "",
        "application/x-www-form-urlencoded",
    ] {
        assert!(!is_json_content_type(bad), "{bad}");
    }
}

#[test]
fn parse_errors_are_typed_with_the_same_texts() {
    use super::routes::{PatchError, PutError};
    assert_eq!(parse_patch(b"").unwrap_err(), PatchError::Empty);
    assert_eq!(
        parse_patch(b"[1]").unwrap_err().to_string(),
        "PATCH /ksm takes a JSON object of knobs, not an array"
    );
    assert!(matches!(
        parse_put("run", b"null").unwrap_err(),
        PutError::Null { knob: "run" }
    ));
    assert_eq!(
        parse_put("run", b"").unwrap_err().to_string(),
        "empty body: PUT /ksm/run takes a bare JSON value, e.g. 1"
    );
}

#[test]
fn vm_action_of_the_wrong_shape_is_an_invalid_action_not_invalid_json() {
    use super::vm::{parse_action, ActionError, VmAction};
    assert_eq!(
        parse_action(br#"{"action": "shutdown"}"#).unwrap(),
        VmAction::Shutdown
    );
    for body in [
        &br#"{"action":1}"#[..],
        br#"{"action": null}"#,
        br#"{"action": {"shutdown": 1}}"#,
        br#"{"action": "reboot"}"#,
        b"{}",
    ] {
        let e = parse_action(body).unwrap_err();
        assert!(
            matches!(e, ActionError::Action(_)),
            "{}: {e:?}",
            String::from_utf8_lossy(body)
        );
        assert!(e.to_string().starts_with("invalid action: "), "{e}");
        assert!(!e.to_string().contains("column"), "{e}");
    }
    assert!(matches!(
        parse_action(br#"{"action": "shutdown", "action": "shutdown"}"#).unwrap_err(),
        ActionError::Action(_)
    ));
    assert!(matches!(
        parse_action(br#"{"action": "shut"#).unwrap_err(),
        ActionError::Json(_)
    ));
    assert_eq!(parse_action(b"[1]").unwrap_err(), ActionError::NotAnObject);
}

#[test]
fn shared_types_round_trip_through_json() {
    use super::vm::{VmAction, VmControl};
    let cp = FakeControlPlane::new();
    let s = cp.ksm().unwrap();
    let v = serde_json::to_value(&s).unwrap();
    // Both names of the metadata size are in the documented body.
    assert_eq!(v["metadata_bytes"], v["engine_metadata_bytes"]);
    assert_eq!(serde_json::from_value::<KsmState>(v).unwrap(), s);
    let g = cp.guests().unwrap();
    let v = serde_json::to_value(&g).unwrap();
    assert_eq!(serde_json::from_value::<Vec<GuestInfo>>(v).unwrap(), g);
    let vm = super::testing::FakeVm::new();
    let info = vm.info().unwrap();
    let v = serde_json::to_value(&info).unwrap();
    assert_eq!(
        serde_json::from_value::<super::vm::VmInfo>(v).unwrap(),
        info
    );
    assert_eq!(
        serde_json::to_value(VmAction::Shutdown).unwrap(),
        serde_json::json!("shutdown")
    );
}

#[test]
fn path_segments_are_percent_encoded_and_decoded() {
    use super::client::encode_segment;
    use super::routes::percent_decode;
    for s in ["vm-a", "my guest.elf", "a/b", "vm \"b\"", "é%", ""] {
        assert_eq!(percent_decode(&encode_segment(s)).as_deref(), Some(s));
    }
    assert_eq!(encode_segment("my guest"), "my%20guest");
    assert_eq!(percent_decode("%"), None);
}

#[test]
fn integral_numbers_are_integers_as_in_json_schema() {
    assert_eq!(
        parse_put("pages_to_scan", b"272.0").unwrap().pages_to_scan,
        Some(272)
    );
    assert_eq!(parse_put("run", b"1.0").unwrap().run, Some(RunMode::Run));
    assert_eq!(parse_put("run", b"1e0").unwrap().run, Some(RunMode::Run));
    let upd = parse_patch(
        br#"{"advisor": {"mode": "scan-time", "target_scan_secs": 60.0, "max_cpu_pct": 2e1}}"#,
    )
    .unwrap();
    assert_eq!(
        upd.advisor,
        Some(tinyvmm_merge::Advisor::ScanTime {
            target_scan_secs: 60,
            max_cpu_pct: 20
        })
    );
    for bad in [&b"1.5"[..], b"-1.0", b"4294967296.0", b"1e300"] {
        assert!(parse_put("pages_to_scan", bad).is_err(), "{bad:?}");
    }
}
