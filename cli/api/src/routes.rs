//! The merge daemon's routing and endpoints, independent of the transport: [`resolve`]
//! maps a method and a path to an [`Endpoint`] (or a 404/405), [`execute`] runs it against
//! a [`ControlPlane`] with the request body already read. Both are synchronous and never
//! panic on any input, so they are tested directly (the proptest in `tests.rs`).
//! [`DaemonRoutes`] puts them behind the server's [`Routes`] trait.

use std::sync::Arc;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use tinyvmm_merge::KnobsUpdate;

use crate::response::{method_not_allowed, ApiResponse, PROMETHEUS_TEXT};
use crate::server::{ApiServer, Call, Routes};
use crate::{metrics, ApiConfig, ApiError, ControlPlane};

/// Every route the server answers, as `(path template, methods)`; the OpenAPI document
/// (`cli/api/openapi.yaml`) lists exactly these.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/ksm", &["GET", "PATCH"]),
    ("/ksm/{knob}", &["GET", "PUT"]),
    ("/guests", &["GET"]),
    ("/guests/{id}", &["GET"]),
    ("/metrics", &["GET"]),
];

/// The knobs of `/ksm/{knob}`: the writable fields of `KnobsUpdate`.
pub const KNOBS: &[&str] = &[
    "run",
    "sleep_millisecs",
    "pages_to_scan",
    "max_page_sharing",
    "smart_scan",
    "advisor",
];

/// A resolved request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /ksm`.
    GetKsm,
    /// `PATCH /ksm`.
    PatchKsm,
    /// `GET /ksm/{knob}` (the name is one of [`KNOBS`]).
    GetKnob(&'static str),
    /// `PUT /ksm/{knob}` (the name is one of [`KNOBS`]).
    PutKnob(&'static str),
    /// `GET /guests`.
    ListGuests,
    /// `GET /guests/{id}`.
    GetGuest(String),
    /// `GET /metrics`.
    Metrics,
}

impl Endpoint {
    /// Whether the endpoint reads a request body.
    pub fn takes_body(&self) -> bool {
        matches!(self, Endpoint::PatchKsm | Endpoint::PutKnob(_))
    }
}

fn not_found(path: &str) -> ApiResponse {
    let routes: Vec<&str> = ROUTES.iter().map(|(p, _)| *p).collect();
    ApiResponse::error(
        StatusCode::NOT_FOUND,
        format!(
            "no such resource: {path} (the API has {})",
            routes.join(", ")
        ),
    )
}

/// Maps a request line to an endpoint: 404 for an unknown path, 405 (with `Allow`) for a
/// known path and a method it does not take.
pub fn resolve(method: &Method, path: &str) -> Result<Endpoint, ApiResponse> {
    let segs: Vec<&str> = match path.strip_prefix('/') {
        Some(rest) => rest.split('/').collect(),
        None => return Err(not_found(path)),
    };
    let (route, endpoint): (usize, Option<Endpoint>) = match segs.as_slice() {
        ["ksm"] => (
            0,
            match *method {
                Method::GET => Some(Endpoint::GetKsm),
                Method::PATCH => Some(Endpoint::PatchKsm),
                _ => None,
            },
        ),
        ["ksm", knob] => {
            let Some(knob) = KNOBS.iter().copied().find(|k| k == knob) else {
                let msg = if knob.is_empty() {
                    "no knob named in the path: use /ksm/{knob}".to_string()
                } else {
                    format!(
                        "no knob {knob:?}: the knobs are {} (counters are read-only, in GET /ksm)",
                        KNOBS.join(", ")
                    )
                };
                return Err(ApiResponse::error(StatusCode::NOT_FOUND, msg));
            };
            (
                1,
                match *method {
                    Method::GET => Some(Endpoint::GetKnob(knob)),
                    Method::PUT => Some(Endpoint::PutKnob(knob)),
                    _ => None,
                },
            )
        }
        ["guests"] => (2, (*method == Method::GET).then_some(Endpoint::ListGuests)),
        ["guests", id] if !id.is_empty() => (
            3,
            (*method == Method::GET).then(|| Endpoint::GetGuest(id.to_string())),
        ),
        ["metrics"] => (4, (*method == Method::GET).then_some(Endpoint::Metrics)),
        _ => return Err(not_found(path)),
    };
    endpoint.ok_or_else(|| {
        let (template, methods) = ROUTES[route];
        method_not_allowed(method, template, methods)
    })
}

/// The merge daemon's API for the server: [`resolve`] and [`execute`] against a
/// [`ControlPlane`].
pub struct DaemonRoutes {
    cp: Arc<dyn ControlPlane>,
}

impl DaemonRoutes {
    /// The routes of the daemon behind `cp`.
    pub fn new(cp: Arc<dyn ControlPlane>) -> Self {
        DaemonRoutes { cp }
    }
}

impl Routes for DaemonRoutes {
    fn resolve(&self, method: &Method, path: &str) -> Result<Call, ApiResponse> {
        let endpoint = resolve(method, path)?;
        let cp = self.cp.clone();
        Ok(Call {
            takes_body: endpoint.takes_body(),
            run: Box::new(move |body| execute(&endpoint, body, cp.as_ref())),
        })
    }

    fn backend(&self) -> &'static str {
        "the merge daemon"
    }
}

impl ApiServer {
    /// Serves the merge daemon's API of `cp` as `cfg` says. Fails as [`ApiServer::serve`]
    /// does.
    pub fn start_daemon(cfg: ApiConfig, cp: Arc<dyn ControlPlane>) -> std::io::Result<ApiServer> {
        Self::serve(cfg, Arc::new(DaemonRoutes::new(cp)))
    }
}

/// Parses a `PATCH /ksm` body.
pub fn parse_patch(body: &[u8]) -> Result<KnobsUpdate, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(
            "empty body: PATCH /ksm takes a JSON object of knobs, e.g. {\"pages_to_scan\": 1000}"
                .into(),
        );
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    if !value.is_object() {
        return Err(format!(
            "PATCH /ksm takes a JSON object of knobs, not {}",
            kind_of(&value)
        ));
    }
    knobs_update(value).map_err(|e| format!("invalid knobs: {e}"))
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Deserializes a `KnobsUpdate` and refuses any field it would drop silently (serde's
/// `deny_unknown_fields` does not cover every shape, e.g. `{"mode": "none", "x": 1}` for
/// the advisor), by comparing the input's keys with the update serialized back.
fn knobs_update(value: serde_json::Value) -> Result<KnobsUpdate, String> {
    let upd: KnobsUpdate = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(upd).map_err(|e| e.to_string())?;
    match first_unknown_key(&value, &back, "") {
        Some(path) => Err(format!("unknown field `{path}`")),
        None => Ok(upd),
    }
}

/// The first key path present in `input` but not in `known`.
fn first_unknown_key(
    input: &serde_json::Value,
    known: &serde_json::Value,
    prefix: &str,
) -> Option<String> {
    let (serde_json::Value::Object(input), serde_json::Value::Object(known)) = (input, known)
    else {
        return None;
    };
    for (k, v) in input {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match known.get(k) {
            None => return Some(path),
            Some(kv) => {
                if let Some(p) = first_unknown_key(v, kv, &path) {
                    return Some(p);
                }
            }
        }
    }
    None
}

/// Parses a `PUT /ksm/{knob}` body: one bare JSON value, as written to a sysfs file.
pub fn parse_put(knob: &str, body: &[u8]) -> Result<KnobsUpdate, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(format!(
            "empty body: PUT /ksm/{knob} takes a bare JSON value, e.g. 1"
        ));
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON for {knob}: {e}"))?;
    if value.is_null() {
        return Err(format!("{knob} cannot be null"));
    }
    let mut obj = serde_json::Map::new();
    obj.insert(knob.to_string(), value);
    knobs_update(serde_json::Value::Object(obj))
        .map_err(|e| format!("invalid value for {knob}: {e}"))
}

/// Runs an endpoint. `body` is the whole request body (ignored by endpoints that take none).
pub fn execute(endpoint: &Endpoint, body: &[u8], cp: &dyn ControlPlane) -> ApiResponse {
    let result = match endpoint {
        Endpoint::GetKsm => cp.ksm().map(|s| ApiResponse::json(StatusCode::OK, &s)),
        Endpoint::PatchKsm => match parse_patch(body) {
            Ok(upd) => cp
                .update_knobs(upd)
                .map(|s| ApiResponse::json(StatusCode::OK, &s)),
            Err(msg) => Err(ApiError::BadRequest(msg)),
        },
        Endpoint::PutKnob(knob) => match parse_put(knob, body) {
            Ok(upd) => cp
                .update_knobs(upd)
                .map(|s| ApiResponse::json(StatusCode::OK, &s)),
            Err(msg) => Err(ApiError::BadRequest(msg)),
        },
        Endpoint::GetKnob(knob) => cp.ksm().and_then(|s| {
            let v = serde_json::to_value(&s)
                .ok()
                .and_then(|v| v.get(*knob).cloned())
                .ok_or_else(|| ApiError::NotFound(format!("the daemon reports no {knob}")))?;
            Ok(ApiResponse::json(StatusCode::OK, &v))
        }),
        Endpoint::ListGuests => cp.guests().map(|g| ApiResponse::json(StatusCode::OK, &g)),
        Endpoint::GetGuest(id) => cp.guests().and_then(|guests| {
            let by_id = id.parse::<u32>().ok();
            guests
                .iter()
                .find(|g| Some(g.counters.id.0) == by_id)
                .or_else(|| guests.iter().find(|g| g.name == *id))
                .map(|g| ApiResponse::json(StatusCode::OK, g))
                .ok_or_else(|| {
                    ApiError::NotFound(format!(
                        "no guest {id:?} (GET /guests lists their ids and names)"
                    ))
                })
        }),
        Endpoint::Metrics => cp.ksm().and_then(|s| {
            let guests = cp.guests()?;
            Ok(ApiResponse {
                status: StatusCode::OK,
                content_type: PROMETHEUS_TEXT,
                body: Bytes::from(metrics::render(&s, &guests)),
                allow: None,
                error: None,
            })
        }),
    };
    result.unwrap_or_else(ApiResponse::from_api_error)
}
