//! The REST control APIs: HTTP/1.1 with JSON over a Unix socket, as Firecracker and Cloud
//! Hypervisor serve theirs. One transport ([`ApiServer`], `server.rs`) serves any
//! [`Routes`]: the merge daemon's API (below, `routes.rs`) and each VM's own socket
//! (`tinyvmm run --api-sock`, [`vm`]).
//!
//! The merge daemon's API:
//!
//! | method | path | what |
//! |---|---|---|
//! | `GET` | `/ksm` | knobs and counters (`/sys/kernel/mm/ksm/*` names) |
//! | `PATCH` | `/ksm` | a [`KnobsUpdate`], validated and applied atomically; returns the new state |
//! | `GET`, `PUT` | `/ksm/{knob}` | one knob as a bare JSON value, like a sysfs read or write |
//! | `GET` | `/guests`, `/guests/{id}` | per-guest counters (like `/proc/PID/ksm_stat`) |
//! | `GET` | `/metrics` | Prometheus text format |
//!
//! The document of record is `cli/api/openapi.yaml`; a test checks that it and
//! [`ROUTES`] agree.
//!
//! # Threads and state
//! The server runs on its own thread with a current-thread tokio runtime and hyper. It
//! never touches engine state: every request that needs the daemon becomes one call on
//! the [`ControlPlane`] (implemented by the daemon's command channel, applied by the
//! scanner between rounds), made on tokio's blocking pool with a deadline, so neither a
//! slow client nor a busy scanner holds up other clients.
//!
//! # Errors
//! Every refused request gets a 4xx and a JSON body `{"error": "..."}` saying what is
//! wrong; the state is unchanged. Every error is an [`ApiError`] first, and
//! [`ApiResponse::from_api_error`] is the one place where its kind becomes a status:
//!
//! | [`ApiError`] | status |
//! |---|---|
//! | `BadRequest` (malformed JSON, wrong shape or value) | 400 |
//! | `NotFound` (unknown path, knob or guest) | 404 |
//! | `MethodNotAllowed` (known path, other method; with `Allow`) | 405 |
//! | `Timeout` (the body did not arrive in time) | 408 |
//! | `PayloadTooLarge` (body over [`Limits::max_body_bytes`]) | 413 |
//! | `UnsupportedMediaType` (a body without `Content-Type: application/json`) | 415 |
//! | `Internal` (the endpoint failed) | 500 |
//! | `Unavailable` (the daemon or VMM is busy, stopping, or did not answer in time) | 503 |
//!
//! Headers and bodies must arrive within a deadline (slow or half-open clients are
//! dropped), and connections are capped.
//!
//! # Client
//! [`client::ApiClient`] speaks both APIs over the Unix socket with the same types the
//! server sends ([`KsmState`], [`GuestInfo`], [`vm::VmInfo`], ...), which all implement
//! `Serialize` and `Deserialize`.

pub mod client;
mod metrics;
mod response;
mod routes;
mod server;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;
pub mod vm;
pub mod vm_balloon;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tinyvmm_merge::{Counters, GuestCounters, Knobs, KnobsUpdate};

pub use response::{status_of, ApiResponse, JSON, PROMETHEUS_TEXT};
pub use routes::{DaemonRoutes, KNOBS, ROUTES};
pub use server::{
    is_json_content_type, ApiServer, BoundApi, Call, CallFn, Caller, Routes, ThreadStart,
};

/// What the API needs from the daemon.
///
/// Implemented by the daemon's command channel: every call is a typed command the scanner
/// thread applies between rounds (the API thread never touches engine state itself). Calls
/// are made from a blocking thread pool and may block; the server gives up on one after
/// [`Limits::call_timeout`] and answers 503.
pub trait ControlPlane: Send + Sync + 'static {
    /// Knobs and counters.
    fn ksm(&self) -> Result<KsmState, ApiError>;
    /// Validates `upd` against the current knobs and applies it atomically; an invalid
    /// update changes nothing and is `ApiError::BadRequest` with the `KnobError` text.
    fn update_knobs(&self, upd: KnobsUpdate) -> Result<KsmState, ApiError>;
    /// Every registered guest (the API shows each caller only those it may see:
    /// [`Caller::may_see`]).
    fn guests(&self) -> Result<Vec<GuestInfo>, ApiError>;
}

/// The body of `GET /ksm`: the knobs and counters with the kernel's names, flattened into
/// one object, plus what only the daemon knows. (`metadata_bytes`, among the counters, and
/// `engine_metadata_bytes` carry the same value; both are part of the documented API.)
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct KsmState {
    /// The scanner's settings.
    #[serde(flatten)]
    pub knobs: Knobs,
    /// Fleet-wide counters.
    #[serde(flatten)]
    pub counters: Counters,
    /// Bytes of frames resident in all pools.
    pub pool_bytes: u64,
    /// Bytes of the engine's metadata (index, refcounts, page states).
    pub engine_metadata_bytes: u64,
}

/// One guest, for `GET /guests`: its counters (like `/proc/PID/ksm_stat`) and identity.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GuestInfo {
    /// Engine counters (`id`, `domain`, `merging_pages`, ...).
    #[serde(flatten)]
    pub counters: GuestCounters,
    /// The VM process.
    pub pid: u32,
    /// The VM's name.
    pub name: String,
    /// The share group it asked for. A group is private to the VM's user (`uid`) unless
    /// the daemon's share policy lets several users share it: `share_group_uids` says who
    /// shares it.
    pub share_group: String,
    /// The VM process's user (from its socket's peer credentials).
    pub uid: u32,
    /// The users whose VMs share its group (and who may see it over the control API):
    /// `[uid]`, or the uids the daemon's share policy lists for the group.
    pub share_group_uids: Vec<u32>,
    /// Its agent's page-work statistics: how long pages stayed write-protected (the
    /// longest a guest write could wait), writes that did wait, the VM's mapping count.
    #[serde(flatten)]
    pub agent: tinyvmm_merge_protocol::AgentStats,
}

/// A request failed: refused by the transport, the routing, the parsing of its body, or
/// the backend. [`ApiResponse::from_api_error`] turns each kind into its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The request is invalid (400); nothing was changed.
    #[error("{0}")]
    BadRequest(String),
    /// The thing asked for does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The path exists but does not take this method (405, with `Allow: allow`).
    #[error("{msg}")]
    MethodNotAllowed {
        /// What is wrong.
        msg: String,
        /// The methods the path takes, e.g. `GET, PUT`.
        allow: String,
    },
    /// The request body did not arrive in time (408).
    #[error("{0}")]
    Timeout(String),
    /// The request body is over the limit (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request body is not declared as JSON (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A request over TCP without the right bearer token (401).
    #[error("{0}")]
    Unauthorized(String),
    /// A request over TCP naming a host that is not this machine's loopback (403): what a
    /// web page's script sends after rebinding its DNS name to 127.0.0.1; or a change
    /// asked by a user who may only read (another user on a shared Unix socket).
    #[error("{0}")]
    Forbidden(String),
    /// The endpoint failed inside the server (500).
    #[error("{0}")]
    Internal(String),
    /// The daemon (or VMM) cannot answer now: busy, stopping, or too slow (503).
    #[error("{0}")]
    Unavailable(String),
}

/// Limits that protect the server from clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body (413 beyond).
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers; hyper answers 431 beyond).
    pub max_header_bytes: usize,
    /// Time a client has to send a complete request head; the connection is closed after.
    pub header_read_timeout: Duration,
    /// Time a client has to send its body once the head is in (408 after).
    pub body_read_timeout: Duration,
    /// Time the daemon has to answer one control-plane call (503 after).
    pub call_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 << 10,
            max_header_bytes: 16 << 10,
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(30),
            max_connections: 256,
        }
    }
}

/// Where and how to serve the API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The Unix socket (created with mode 0600, its directory 0700 if created).
    pub socket: PathBuf,
    /// Also listen on TCP at this address; refused unless it is a loopback address, and
    /// unless [`ApiConfig::tcp_token`] is set. Off unless asked for explicitly.
    pub tcp: Option<SocketAddr>,
    /// The bearer token every request over TCP must carry (`Authorization: Bearer ...`);
    /// requests over TCP must also name a loopback host (`Host: 127.0.0.1:PORT`,
    /// `localhost:PORT` or `[::1]:PORT`). The Unix socket needs neither: the caller is
    /// known by its peer credentials ([`Caller`]).
    pub tcp_token: Option<String>,
    /// Who may connect to the Unix socket (by default its owner only, 0600).
    pub socket_access: tinyvmm_sys::socket::SocketAccess,
    /// Protection against clients.
    pub limits: Limits,
}

impl ApiConfig {
    /// The Unix socket only, default limits.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ApiConfig {
            socket: socket.into(),
            tcp: None,
            tcp_token: None,
            socket_access: tinyvmm_sys::socket::SocketAccess::default(),
            limits: Limits::default(),
        }
    }
}
