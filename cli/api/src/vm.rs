//! A VM's own control socket (`tinyvmm run --api-sock PATH`): the same transport as the
//! merge daemon's API ([`ApiServer`]), with two routes.
//!
//! | method | path | what |
//! |---|---|---|
//! | `GET` | `/vm` | a [`VmInfo`]: state, memory, and this guest's merge counters |
//! | `PUT` | `/vm/actions` | `{"action": "shutdown"}`: stops the VM cleanly (204) |
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
use crate::server::{Call, Routes};
use crate::{ApiConfig, ApiError, ApiServer};

/// Every route of the VM API, as `(path template, methods)`; the OpenAPI document
/// (`cli/api/vm-openapi.yaml`) lists exactly these.
pub const VM_ROUTES: &[(&str, &[&str])] = &[("/vm", &["GET"]), ("/vm/actions", &["PUT"])];

/// What the VM API needs from the VMM. Calls are made from a blocking thread pool.
pub trait VmControl: Send + Sync + 'static {
    /// The VM's state now.
    fn info(&self) -> Result<VmInfo, ApiError>;
    /// Carries out `action` (or starts to: a shutdown completes after the call returns).
    fn act(&self, action: VmAction) -> Result<(), ApiError>;
}

/// The body of `GET /vm`.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
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
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The guest runs.
    Running,
    /// An exit was requested; the VMM is stopping the guest.
    Stopping,
}

/// `--share-memory`, as `GET /vm` reports it.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
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
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
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
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmAction {
    /// Stop the guest and end the VMM process with status 0.
    Shutdown,
}

/// The body of `PUT /vm/actions`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action: VmAction,
}

/// A resolved VM API request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEndpoint {
    /// `GET /vm`.
    GetVm,
    /// `PUT /vm/actions`.
    PutAction,
}

/// Maps a request line to an endpoint: 404 for an unknown path, 405 (with `Allow`) for a
/// known path and a method it does not take.
pub fn resolve_vm(method: &Method, path: &str) -> Result<VmEndpoint, ApiResponse> {
    let (route, endpoint) = match path {
        "/vm" => (0, (*method == Method::GET).then_some(VmEndpoint::GetVm)),
        "/vm/actions" => (1, (*method == Method::PUT).then_some(VmEndpoint::PutAction)),
        _ => {
            let routes: Vec<&str> = VM_ROUTES.iter().map(|(p, _)| *p).collect();
            return Err(ApiResponse::error(
                StatusCode::NOT_FOUND,
                format!(
                    "no such resource: {path} (the VM API has {})",
                    routes.join(", ")
                ),
            ));
        }
    };
    endpoint.ok_or_else(|| {
        let (template, methods) = VM_ROUTES[route];
        method_not_allowed(method, template, methods)
    })
}

/// Parses a `PUT /vm/actions` body: `{"action": "shutdown"}`.
pub fn parse_action(body: &[u8]) -> Result<VmAction, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(
            "empty body: PUT /vm/actions takes a JSON object, e.g. {\"action\": \"shutdown\"}"
                .into(),
        );
    }
    // Checked first: serde would also take the struct from an array (`["shutdown"]`).
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Err(e) => format!("invalid JSON: {e}"),
                Ok(_) => {
                    "PUT /vm/actions takes a JSON object, e.g. {\"action\": \"shutdown\"}".into()
                }
            },
        );
    }
    serde_json::from_slice::<ActionBody>(body)
        .map(|b| b.action)
        .map_err(|e| match e.classify() {
            serde_json::error::Category::Data => format!("invalid action: {e}"),
            _ => format!("invalid JSON: {e}"),
        })
}

/// Runs an endpoint. `body` is the whole request body (ignored by `GET /vm`).
pub fn execute_vm(endpoint: VmEndpoint, body: &[u8], vm: &dyn VmControl) -> ApiResponse {
    let result = match endpoint {
        VmEndpoint::GetVm => vm.info().map(|i| ApiResponse::json(StatusCode::OK, &i)),
        VmEndpoint::PutAction => match parse_action(body) {
            Ok(action) => vm
                .act(action)
                .map(|()| ApiResponse::empty(StatusCode::NO_CONTENT)),
            Err(msg) => Err(ApiError::BadRequest(msg)),
        },
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
    fn resolve(&self, method: &Method, path: &str) -> Result<Call, ApiResponse> {
        let endpoint = resolve_vm(method, path)?;
        let vm = self.vm.clone();
        Ok(Call {
            takes_body: endpoint == VmEndpoint::PutAction,
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
}
