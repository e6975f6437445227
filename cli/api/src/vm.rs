//! A VM's own control socket (`tinyvmm run --api-sock PATH`): the same transport as the
//! merge daemon's API ([`ApiServer`]), with two routes.
//!
//! | method | path | what |
//! |---|---|---|
//! | `GET` | `/vm` | a [`VmInfo`]: state, memory, and this guest's merge counters |
//! | `PUT` | `/vm/actions` | `{"action": "shutdown"}`: stops the VM cleanly (204) |
//! | `GET`, `PUT` | `/vm/balloon` | the balloon's target and state (see [`crate::vm_balloon`]) |
//! | `GET` | `/vm/balloon/statistics` | the guest's memory statistics |
//!
//! The document of record is `cli/api/vm-openapi.yaml`; a test checks that it and
//! [`VM_ROUTES`] agree. As with the daemon, the API thread only parses and validates: it
//! hands a typed [`VmAction`] to a [`VmControl`] (for a real VM, the binary's, which records
//! an exit request that the VMM's event loop acts on) and never touches VM state itself.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::response::{method_not_allowed, ApiResponse};
use crate::server::{BoundApi, Call, Caller, Routes, ThreadStart};
use crate::vm_balloon::{
    no_balloon, parse_balloon_update, BalloonInfo, BalloonStatistics, BalloonUpdate,
};
use crate::{ApiConfig, ApiError, ApiServer};

/// Every route of the VM API, as `(path template, methods)`; the OpenAPI document
/// (`cli/api/vm-openapi.yaml`) lists exactly these.
pub const VM_ROUTES: &[(&str, &[&str])] = &[
    ("/vm", &["GET"]),
    ("/vm/actions", &["PUT"]),
    ("/vm/balloon", &["GET", "PUT"]),
    ("/vm/balloon/statistics", &["GET"]),
];

/// What the VM API needs from the VMM. Calls are made from a blocking thread pool.
pub trait VmControl: Send + Sync + 'static {
    /// The VM's state now.
    fn info(&self) -> Result<VmInfo, ApiError>;
    /// Carries out `action` (or starts to: a shutdown completes after the call returns).
    fn act(&self, action: VmAction) -> Result<(), ApiError>;
    /// The balloon's state (404 without one).
    fn balloon(&self) -> Result<BalloonInfo, ApiError> {
        Err(no_balloon())
    }
    /// Sets the balloon's target (404 without one).
    fn set_balloon(&self, update: BalloonUpdate) -> Result<(), ApiError> {
        let _ = update;
        Err(no_balloon())
    }
    /// The guest's latest memory statistics (404 without a balloon).
    fn balloon_statistics(&self) -> Result<BalloonStatistics, ApiError> {
        Err(no_balloon())
    }
}

/// The body of `GET /vm`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VmInfo {
    /// Running, or stopping once an exit was requested.
    pub state: VmState,
    /// The VMM process.
    pub pid: u32,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// The kernel as given to `--kernel` (`builtin` for the built-in test guest).
    pub kernel: String,
    /// Time since the guest was started, ms.
    pub uptime_ms: u64,
    /// How guest RAM is offered for merging.
    pub share_memory: ShareMemory,
    /// This guest's merge agent (`--share-memory` with tinyvmm's daemon only).
    pub merge: Option<MergeInfo>,
}

/// The VM's life-cycle state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The guest runs.
    Running,
    /// An exit was requested; the VMM is stopping the guest.
    Stopping,
}

/// `--share-memory`, as `GET /vm` reports it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ShareMemory {
    /// Private memory, never merged.
    None,
    /// Enrolled with tinyvmm's merge daemon.
    Tinyvmm,
    /// `MADV_MERGEABLE`, for the host kernel's ksmd.
    Kernel,
}

/// This guest's merge agent: its registration and what it has done.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MergeInfo {
    /// Registered with a daemon now.
    pub registered: bool,
    /// Our id at that daemon.
    pub guest_id: Option<u32>,
    /// Registrations so far (more than one after a daemon restart).
    pub registrations: u64,
    /// Daemon requests served.
    pub requests: u64,
    /// Pages whose mapping is a pool frame (merged, or merged once and split since).
    pub pool_mapped_pages: u64,
    /// Pages of guest RAM.
    pub pages: u64,
    /// Median time a batch stayed write-protected, ns.
    pub protect_p50_ns: u64,
    /// 99th percentile of the same, ns.
    pub protect_p99_ns: u64,
    /// Longest, ns.
    pub protect_max_ns: u64,
    /// Guest writes that hit a write-protected page and waited.
    pub blocked_writes: u64,
    /// Mappings (VMAs) of the VM process.
    pub vma_count: u32,
}

/// An action of `PUT /vm/actions`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmAction {
    /// Stop the guest and end the VMM process with status 0.
    Shutdown,
}

/// The body of `PUT /vm/actions`: `{"action": "shutdown"}`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    /// What to do.
    pub action: VmAction,
}

/// Why a `PUT /vm/actions` body was refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// No body, or only whitespace.
    #[error("empty body: PUT /vm/actions takes a JSON object, e.g. {{\"action\": \"shutdown\"}}")]
    Empty,
    /// Not JSON.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// Well-formed JSON, but not an object.
    #[error("PUT /vm/actions takes a JSON object, e.g. {{\"action\": \"shutdown\"}}")]
    NotAnObject,
    /// An object of the wrong shape: no action, an unknown one, an unknown field.
    #[error("invalid action: {0}")]
    Action(String),
}

impl From<ActionError> for ApiError {
    fn from(e: ActionError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

/// A resolved VM API request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEndpoint {
    /// `GET /vm`.
    GetVm,
    /// `PUT /vm/actions`.
    PutAction,
    /// `GET /vm/balloon`.
    GetBalloon,
    /// `PUT /vm/balloon`.
    PutBalloon,
    /// `GET /vm/balloon/statistics`.
    GetBalloonStatistics,
}

/// Maps a request line to an endpoint: 404 for an unknown path, 405 (with `Allow`) for a
/// known path and a method it does not take.
pub fn resolve_vm(method: &Method, path: &str) -> Result<VmEndpoint, ApiResponse> {
    let (route, endpoint) = match path {
        "/vm" => (0, (*method == Method::GET).then_some(VmEndpoint::GetVm)),
        "/vm/actions" => (1, (*method == Method::PUT).then_some(VmEndpoint::PutAction)),
        "/vm/balloon" => (
            2,
            match *method {
                Method::GET => Some(VmEndpoint::GetBalloon),
                Method::PUT => Some(VmEndpoint::PutBalloon),
                _ => None,
            },
        ),
        "/vm/balloon/statistics" => (
            3,
            (*method == Method::GET).then_some(VmEndpoint::GetBalloonStatistics),
        ),
        _ => {
            let routes: Vec<&str> = VM_ROUTES.iter().map(|(p, _)| *p).collect();
            return Err(ApiResponse::from_api_error(ApiError::NotFound(format!(
                "no such resource: {path} (the VM API has {})",
                routes.join(", ")
            ))));
        }
    };
    endpoint.ok_or_else(|| {
        let (template, methods) = VM_ROUTES[route];
        ApiResponse::from_api_error(method_not_allowed(method, template, methods))
    })
}

/// Parses a `PUT /vm/actions` body: `{"action": "shutdown"}`. Malformed JSON is
/// "invalid JSON"; well-formed JSON of the wrong shape is "not an object" or "invalid
/// action".
pub fn parse_action(body: &[u8]) -> Result<VmAction, ActionError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ActionError::Empty);
    }
    // Syntax first, on its own: serde reports some shape errors (a number where an enum
    // goes) as syntax errors.
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ActionError::Json(e.to_string()))?;
    // Checked first: serde would also take the struct from an array (`["shutdown"]`).
    if !value.is_object() {
        return Err(ActionError::NotAnObject);
    }
    // From the bytes (the `Value` has dropped duplicate fields); the message from the
    // `Value`, which names the type found rather than a column.
    serde_json::from_slice::<ActionBody>(body)
        .map(|b| b.action)
        .map_err(|e| match serde_json::from_value::<ActionBody>(value) {
            Err(v) => ActionError::Action(v.to_string()),
            Ok(_) => ActionError::Action(e.to_string()),
        })
}

/// Runs an endpoint. `body` is the whole request body (ignored by `GET /vm`).
pub fn execute_vm(endpoint: VmEndpoint, body: &[u8], vm: &dyn VmControl) -> ApiResponse {
    let result = match endpoint {
        VmEndpoint::GetVm => vm.info().map(|i| ApiResponse::json(StatusCode::OK, &i)),
        VmEndpoint::PutAction => parse_action(body)
            .map_err(ApiError::from)
            .and_then(|action| vm.act(action))
            .map(|()| ApiResponse::empty(StatusCode::NO_CONTENT)),
        VmEndpoint::GetBalloon => vm.balloon().map(|b| ApiResponse::json(StatusCode::OK, &b)),
        VmEndpoint::PutBalloon => parse_balloon_update(body)
            .and_then(|u| vm.set_balloon(u))
            .map(|()| ApiResponse::empty(StatusCode::NO_CONTENT)),
        VmEndpoint::GetBalloonStatistics => vm
            .balloon_statistics()
            .map(|s| ApiResponse::json(StatusCode::OK, &s)),
    };
    result.unwrap_or_else(ApiResponse::from_api_error)
}

/// The VM API for the server: [`resolve_vm`] and [`execute_vm`] against a [`VmControl`].
pub struct VmRoutes {
    vm: Arc<dyn VmControl>,
}

impl VmRoutes {
    /// The routes of the VM behind `vm`.
    pub fn new(vm: Arc<dyn VmControl>) -> Self {
        VmRoutes { vm }
    }
}

impl Routes for VmRoutes {
    /// A VM's socket is its owner's alone (mode 0600): every caller is served alike.
    fn resolve(&self, method: &Method, path: &str, _caller: Caller) -> Result<Call, ApiResponse> {
        let endpoint = resolve_vm(method, path)?;
        let vm = self.vm.clone();
        Ok(Call {
            takes_body: matches!(endpoint, VmEndpoint::PutAction | VmEndpoint::PutBalloon),
            run: Box::new(move |body| execute_vm(endpoint, body, vm.as_ref())),
        })
    }

    fn backend(&self) -> &'static str {
        "the VMM"
    }
}

impl ApiServer {
    /// Serves the VM API of `vm` on the Unix socket `socket` (mode 0600), default limits.
    pub fn start_vm(socket: impl Into<PathBuf>, vm: Arc<dyn VmControl>) -> io::Result<ApiServer> {
        Self::serve(ApiConfig::new(socket), Arc::new(VmRoutes::new(vm)))
    }

    /// Binds the VM API's Unix socket `socket` (mode 0600) without serving it yet: see
    /// [`BoundApi::start_vm`].
    pub fn bind_vm(socket: impl Into<PathBuf>) -> io::Result<BoundApi> {
        Self::bind(ApiConfig::new(socket))
    }
}

impl BoundApi {
    /// Serves the VM API of `vm` on these listeners; the I/O thread runs `on_start` first.
    pub fn start_vm(
        self,
        vm: Arc<dyn VmControl>,
        on_start: Option<ThreadStart>,
    ) -> io::Result<ApiServer> {
        self.start(Arc::new(VmRoutes::new(vm)), on_start)
    }
}
