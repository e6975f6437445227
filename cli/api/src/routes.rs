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
use crate::server::{ApiServer, Call, Caller, Routes};
use crate::{metrics, ApiConfig, ApiError, ControlPlane};

/// Every route the server answers, as `(path template, methods)`; the OpenAPI document
/// (`cli/api/openapi.yaml`) lists exactly these. Each knob has its own path (`/ksm/run`,
/// ...: [`KNOBS`], in that order), so that each can document its own body schema.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/ksm", &["GET", "PATCH"]),
    ("/ksm/run", &["GET", "PUT"]),
    ("/ksm/sleep_millisecs", &["GET", "PUT"]),
    ("/ksm/pages_to_scan", &["GET", "PUT"]),
    ("/ksm/max_page_sharing", &["GET", "PUT"]),
    ("/ksm/smart_scan", &["GET", "PUT"]),
    ("/ksm/advisor", &["GET", "PUT"]),
    ("/guests", &["GET"]),
    ("/guests/{id}", &["GET"]),
    ("/metrics", &["GET"]),
];

/// The index in [`ROUTES`] of the first knob path.
const FIRST_KNOB_ROUTE: usize = 1;

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

fn not_found(path: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no such resource: {path} (the API has /ksm, /ksm/{{knob}}, /guests, /guests/{{id}}, \
         /metrics)"
    ))
}

/// Decodes the percent-escapes (`%20`) of one path segment; `None` for a broken escape or
/// bytes that are not UTF-8.
pub fn percent_decode(seg: &str) -> Option<String> {
    if !seg.contains('%') {
        return Some(seg.to_string());
    }
    let b = seg.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Maps a request line to an endpoint: 404 for an unknown path, 405 (with `Allow`) for a
/// known path and a method it does not take. Path segments are percent-decoded
/// (`/guests/my%20vm` names the guest `my vm`); a broken escape is a 400.
pub fn resolve(method: &Method, path: &str) -> Result<Endpoint, ApiResponse> {
    resolve_endpoint(method, path).map_err(ApiResponse::from_api_error)
}

fn resolve_endpoint(method: &Method, path: &str) -> Result<Endpoint, ApiError> {
    let raw: Vec<&str> = match path.strip_prefix('/') {
        Some(rest) => rest.split('/').collect(),
        None => return Err(not_found(path)),
    };
    let mut segs = Vec::with_capacity(raw.len());
    for seg in raw {
        segs.push(percent_decode(seg).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "invalid percent-encoding in the path {path:?}: escapes are %XX of UTF-8 bytes"
            ))
        })?);
    }
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
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
            let Some(i) = KNOBS.iter().position(|k| k == knob) else {
                let msg = if knob.is_empty() {
                    "no knob named in the path: use /ksm/{knob}".to_string()
                } else {
                    format!(
                        "no knob {knob:?}: the knobs are {} (counters are read-only, in GET /ksm)",
                        KNOBS.join(", ")
                    )
                };
                return Err(ApiError::NotFound(msg));
            };
            let knob = KNOBS[i];
            (
                FIRST_KNOB_ROUTE + i,
                match *method {
                    Method::GET => Some(Endpoint::GetKnob(knob)),
                    Method::PUT => Some(Endpoint::PutKnob(knob)),
                    _ => None,
                },
            )
        }
        ["guests"] => (
            FIRST_KNOB_ROUTE + KNOBS.len(),
            (*method == Method::GET).then_some(Endpoint::ListGuests),
        ),
        ["guests", id] if !id.is_empty() => (
            FIRST_KNOB_ROUTE + KNOBS.len() + 1,
            (*method == Method::GET).then(|| Endpoint::GetGuest(id.to_string())),
        ),
        ["metrics"] => (
            FIRST_KNOB_ROUTE + KNOBS.len() + 2,
            (*method == Method::GET).then_some(Endpoint::Metrics),
        ),
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
    /// Every caller may read (a user sees only its own share groups' guests); only the
    /// administrator may change knobs.
    fn resolve(&self, method: &Method, path: &str, caller: Caller) -> Result<Call, ApiResponse> {
        let endpoint = resolve(method, path)?;
        if endpoint.takes_body() && caller != Caller::Admin {
            return Err(ApiResponse::from_api_error(ApiError::Forbidden(format!(
                "{method} {path}: only root or the daemon's own user may change the merge \
                 daemon's settings; other users may read them"
            ))));
        }
        let cp = self.cp.clone();
        Ok(Call {
            takes_body: endpoint.takes_body(),
            run: Box::new(move |body| execute_as(&endpoint, body, cp.as_ref(), caller)),
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

/// Why a `PATCH /ksm` body was refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// No body, or only whitespace.
    #[error(
        "empty body: PATCH /ksm takes a JSON object of knobs, e.g. {{\"pages_to_scan\": 1000}}"
    )]
    Empty,
    /// Not JSON.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// JSON, but not an object (`kind` says what it is: "an array", ...).
    #[error("PATCH /ksm takes a JSON object of knobs, not {kind}")]
    NotAnObject {
        /// What the body is.
        kind: &'static str,
    },
    /// An object, but an unknown field, a wrong type or a value out of the type's range.
    #[error("invalid knobs: {0}")]
    Knobs(#[source] KnobsShapeError),
}

/// Why a `PUT /ksm/{knob}` body was refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PutError {
    /// No body, or only whitespace.
    #[error("empty body: PUT /ksm/{knob} takes a bare JSON value, e.g. 1")]
    Empty {
        /// The knob.
        knob: &'static str,
    },
    /// Not JSON.
    #[error("invalid JSON for {knob}: {msg}")]
    Json {
        /// The knob.
        knob: &'static str,
        /// The parser's message.
        msg: String,
    },
    /// `null`, which would leave the knob unchanged.
    #[error("{knob} cannot be null")]
    Null {
        /// The knob.
        knob: &'static str,
    },
    /// JSON of the wrong type, or out of the type's range.
    #[error("invalid value for {knob}: {source}")]
    Value {
        /// The knob.
        knob: &'static str,
        /// What is wrong.
        source: KnobsShapeError,
    },
}

/// A knobs object that does not have the shape of a `KnobsUpdate`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KnobsShapeError {
    /// A wrong type, an out-of-range value or an unknown field, as serde reports it.
    #[error("{0}")]
    Serde(String),
    /// A field that deserializing would drop silently (e.g. `advisor.x`).
    #[error("unknown field `{0}`")]
    UnknownField(String),
}

impl From<PatchError> for ApiError {
    fn from(e: PatchError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<PutError> for ApiError {
    fn from(e: PutError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

/// Parses a `PATCH /ksm` body.
pub fn parse_patch(body: &[u8]) -> Result<KnobsUpdate, PatchError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(PatchError::Empty);
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| PatchError::Json(e.to_string()))?;
    if !value.is_object() {
        return Err(PatchError::NotAnObject {
            kind: kind_of(&value),
        });
    }
    knobs_update(value).map_err(PatchError::Knobs)
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
fn knobs_update(mut value: serde_json::Value) -> Result<KnobsUpdate, KnobsShapeError> {
    integral_numbers(&mut value);
    let upd: KnobsUpdate =
        serde_json::from_value(value.clone()).map_err(|e| KnobsShapeError::Serde(e.to_string()))?;
    let back = serde_json::to_value(upd).map_err(|e| KnobsShapeError::Serde(e.to_string()))?;
    match first_unknown_key(&value, &back, "") {
        Some(path) => Err(KnobsShapeError::UnknownField(path)),
        None => Ok(upd),
    }
}

/// Writes every integral number (`272.0`) as an integer (`272`): JSON has one number
/// type, and JSON Schema's `integer` (the OpenAPI document's) includes `272.0`. Fractions
/// and numbers out of the 64-bit range stay as they are (and are refused as the wrong
/// type).
pub(crate) fn integral_numbers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Number(n) if n.is_f64() => {
            let Some(f) = n.as_f64() else { return };
            if f.fract() != 0.0 {
                return;
            }
            // 2^64 and -2^63 are exact as f64; the casts cannot saturate inside the range.
            if (0.0..18_446_744_073_709_551_616.0).contains(&f) {
                *n = serde_json::Number::from(f as u64);
            } else if (-9_223_372_036_854_775_808.0..0.0).contains(&f) {
                *n = serde_json::Number::from(f as i64);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(integral_numbers),
        serde_json::Value::Object(o) => o.values_mut().for_each(integral_numbers),
        _ => {}
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
pub fn parse_put(knob: &'static str, body: &[u8]) -> Result<KnobsUpdate, PutError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(PutError::Empty { knob });
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| PutError::Json {
        knob,
        msg: e.to_string(),
    })?;
    if value.is_null() {
        return Err(PutError::Null { knob });
    }
    let mut obj = serde_json::Map::new();
    obj.insert(knob.to_string(), value);
    knobs_update(serde_json::Value::Object(obj)).map_err(|source| PutError::Value { knob, source })
}

/// Runs an endpoint for the administrator. `body` is the whole request body (ignored by
/// endpoints that take none).
#[cfg(test)]
pub fn execute(endpoint: &Endpoint, body: &[u8], cp: &dyn ControlPlane) -> ApiResponse {
    execute_as(endpoint, body, cp, Caller::Admin)
}

/// The guests `caller` may see.
fn visible_guests(
    cp: &dyn ControlPlane,
    caller: Caller,
) -> Result<Vec<crate::GuestInfo>, ApiError> {
    let mut guests = cp.guests()?;
    guests.retain(|g| caller.may_see(g));
    Ok(guests)
}

/// Runs an endpoint for `caller`: guests (in `/guests` and `/metrics`) are those it may
/// see ([`Caller::may_see`]); a guest it may not see is answered as one that does not
/// exist.
pub fn execute_as(
    endpoint: &Endpoint,
    body: &[u8],
    cp: &dyn ControlPlane,
    caller: Caller,
) -> ApiResponse {
    let result = match endpoint {
        Endpoint::GetKsm => cp.ksm().map(|s| ApiResponse::json(StatusCode::OK, &s)),
        Endpoint::PatchKsm => parse_patch(body)
            .map_err(ApiError::from)
            .and_then(|upd| cp.update_knobs(upd))
            .map(|s| ApiResponse::json(StatusCode::OK, &s)),
        Endpoint::PutKnob(knob) => parse_put(knob, body)
            .map_err(ApiError::from)
            .and_then(|upd| cp.update_knobs(upd))
            .map(|s| ApiResponse::json(StatusCode::OK, &s)),
        Endpoint::GetKnob(knob) => cp.ksm().and_then(|s| {
            let v = serde_json::to_value(&s)
                .ok()
                .and_then(|v| v.get(*knob).cloned())
                .ok_or_else(|| ApiError::NotFound(format!("the daemon reports no {knob}")))?;
            Ok(ApiResponse::json(StatusCode::OK, &v))
        }),
        Endpoint::ListGuests => {
            visible_guests(cp, caller).map(|g| ApiResponse::json(StatusCode::OK, &g))
        }
        Endpoint::GetGuest(id) => visible_guests(cp, caller).and_then(|guests| {
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
            let guests = visible_guests(cp, caller)?;
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
