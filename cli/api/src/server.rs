//! The transport: listeners, hyper connections, body limits and deadlines. What is served
//! is a [`Routes`] trait object: the merge daemon's API (`routes.rs`) and a VM's own API
//! (`vm.rs`) are two implementations on the same machinery.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, watch, Semaphore};

use crate::response::{ApiResponse, JSON};
use crate::{ApiConfig, ApiError, Limits};

/// How long [`ApiServer::shutdown`] lets requests in flight finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// One API served by [`ApiServer`]: its routing and its endpoints, independent of the
/// transport. The merge daemon's API and a VM's own API are two implementations.
pub trait Routes: Send + Sync + 'static {
    /// Maps a request line from `caller` to a [`Call`], or answers it at once (404 for an
    /// unknown path; 405 with `Allow` for a known path and a method it does not take; 403
    /// for a change asked by a caller who may only read). Runs on the server's I/O thread,
    /// so it must not block.
    fn resolve(&self, method: &Method, path: &str, caller: Caller) -> Result<Call, ApiResponse>;

    /// Who answers the calls, for 5xx messages ("the merge daemon", "the VMM").
    fn backend(&self) -> &'static str;
}

/// Who sent a request, as the transport knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The administrator: over the Unix socket, root or the server's own user (its
    /// socket's peer credentials); over TCP, whoever has the bearer token. Sees and may
    /// change everything.
    Admin,
    /// Another user (uid) on a Unix socket opened to others (`tinyvmm merged
    /// --socket-mode`): may read, and sees only the guests of share groups it is a member
    /// of; may change nothing.
    User(u32),
}

impl Caller {
    /// The caller at the other end of a Unix socket whose peer has effective uid `uid`
    /// (`None`: unknown, who sees nothing), served by a process of effective uid `me`.
    pub fn from_peer_uid(uid: Option<u32>, me: u32) -> Caller {
        match uid {
            Some(0) => Caller::Admin,
            Some(u) if u == me => Caller::Admin,
            Some(u) => Caller::User(u),
            None => Caller::User(u32::MAX),
        }
    }

    /// Whether this caller may see `guest`: the administrator sees every guest, a user
    /// the guests of the share groups it is a member of.
    pub fn may_see(&self, guest: &crate::GuestInfo) -> bool {
        match self {
            Caller::Admin => true,
            Caller::User(uid) => guest.share_group_uids.contains(uid),
        }
    }
}

/// An endpoint bound to its backend, waiting for the request body.
pub type CallFn = Box<dyn FnOnce(&[u8]) -> ApiResponse + Send>;

/// A resolved request: run on tokio's blocking pool, with its body read, within
/// [`Limits::call_timeout`].
pub struct Call {
    /// Whether the endpoint reads a request body (others are run with an empty one and
    /// their body is never read).
    pub takes_body: bool,
    /// Runs the endpoint on the whole request body; may block.
    pub run: CallFn,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("takes_body", &self.takes_body)
            .finish_non_exhaustive()
    }
}

/// A running API server. Dropping it shuts it down and removes its socket file.
pub struct ApiServer {
    socket: PathBuf,
    /// Device and inode of the socket file we created: only that file is removed.
    socket_id: Option<(u64, u64)>,
    tcp_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

struct Ctx {
    routes: Arc<dyn Routes>,
    limits: Limits,
    /// The bearer token of requests over TCP.
    tcp_token: Option<String>,
}

/// Runs first on the API server's I/O thread, before it serves anything (a VMM installs
/// its seccomp filter there; the threads the server starts later inherit it).
pub type ThreadStart = Box<dyn FnOnce() + Send>;

/// An API server's listeners, bound but not served yet ([`ApiServer::bind`]): a process
/// that drops its privileges binds while it may, then starts serving. Dropping it removes
/// the socket file.
pub struct BoundApi {
    server: ApiServer,
    unix: std::os::unix::net::UnixListener,
    tcp: Option<std::net::TcpListener>,
    cfg: ApiConfig,
}

impl std::fmt::Debug for BoundApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundApi")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Serves `routes` as `cfg` says. Fails if another server listens on the socket, if the
    /// path is something other than a (stale) socket, or if the TCP address is not a
    /// loopback address.
    pub fn serve(cfg: ApiConfig, routes: Arc<dyn Routes>) -> io::Result<ApiServer> {
        Self::bind(cfg)?.start(routes, None)
    }

    /// Binds the listeners `cfg` asks for, failing as [`ApiServer::serve`] does; nothing is
    /// served until [`BoundApi::start`].
    pub fn bind(cfg: ApiConfig) -> io::Result<BoundApi> {
        if let Some(addr) = cfg.tcp {
            if cfg.tcp_token.as_deref().is_none_or(str::is_empty) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "refusing to serve the control API on {addr} without a bearer token \
                         (--api-token-file): any local user, or a web page through DNS \
                         rebinding, could reach it"
                    ),
                ));
            }
            if !addr.ip().is_loopback() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "refusing to serve the control API on {addr}: TCP is only allowed on a \
                         loopback address (127.0.0.1 or ::1); use the Unix socket"
                    ),
                ));
            }
        }
        let unix = tinyvmm_sys::socket::bind_unix(&cfg.socket, &cfg.socket_access)?;
        unix.set_nonblocking(true)?;
        let socket_id = std::fs::symlink_metadata(&cfg.socket)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let tcp = match cfg.tcp {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr).map_err(|e| {
                    let _ = std::fs::remove_file(&cfg.socket);
                    io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
                })?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        let tcp_addr = tcp.as_ref().map(|l| l.local_addr()).transpose()?;
        let server = ApiServer {
            socket: cfg.socket.clone(),
            socket_id,
            tcp_addr,
            stop: None,
            thread: None,
        };
        Ok(BoundApi {
            server,
            unix,
            tcp,
            cfg,
        })
    }
}

impl BoundApi {
    /// Serves `routes` on the bound listeners from a new I/O thread, which runs `on_start`
    /// first if given.
    pub fn start(
        self,
        routes: Arc<dyn Routes>,
        on_start: Option<ThreadStart>,
    ) -> io::Result<ApiServer> {
        let BoundApi {
            server,
            unix,
            tcp,
            cfg,
        } = self;
        // From here on, dropping `server` removes the socket file on any error.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(16)
            .thread_name("tinyvmm-api-call")
            .build()?;
        let (unix, tcp) = {
            let _guard = rt.enter();
            let unix = tokio::net::UnixListener::from_std(unix)?;
            let tcp = tcp.map(tokio::net::TcpListener::from_std).transpose()?;
            (unix, tcp)
        };
        let ctx = Arc::new(Ctx {
            routes,
            limits: cfg.limits,
            tcp_token: cfg.tcp_token.clone(),
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let mut server = server;
        server.stop = Some(stop_tx);
        let thread = std::thread::Builder::new()
            .name("tinyvmm-api".into())
            .spawn(move || {
                if let Some(f) = on_start {
                    f();
                }
                rt.block_on(serve(unix, tcp, ctx, stop_rx));
                rt.shutdown_timeout(SHUTDOWN_GRACE);
            })?;
        server.thread = Some(thread);
        tracing::info!(socket = %server.socket.display(), tcp = ?server.tcp_addr, "control API listening");
        Ok(server)
    }
}

impl ApiServer {
    /// The Unix socket served.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The TCP address served (with the port the system chose for port 0), if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// Stops accepting, lets requests in flight finish (up to a second), and removes the
    /// socket file. Idempotent.
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(id) = self.socket_id.take() {
            // Only our own file: a newer daemon may have replaced it.
            let ours = std::fs::symlink_metadata(&self.socket)
                .map(|m| (m.dev(), m.ino()) == id)
                .unwrap_or(false);
            if ours {
                let _ = std::fs::remove_file(&self.socket);
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("socket", &self.socket)
            .field("tcp_addr", &self.tcp_addr)
            .finish_non_exhaustive()
    }
}

/// Accepts on both listeners until `stop` fires; then closes idle connections, lets
/// requests in flight finish (up to [`SHUTDOWN_GRACE`]) and returns.
async fn serve(
    unix: tokio::net::UnixListener,
    tcp: Option<tokio::net::TcpListener>,
    ctx: Arc<Ctx>,
    mut stop: oneshot::Receiver<()>,
) {
    let max = ctx.limits.max_connections;
    let slots = Arc::new(Semaphore::new(max));
    let (closing_tx, closing) = watch::channel(false);
    loop {
        // Wait for a free slot first: further clients wait in the listen backlog.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut stop => break,
        };
        tokio::select! {
            r = unix.accept() => match r {
                Ok((stream, _)) => {
                    // SAFETY: geteuid has no preconditions and cannot fail.
                    let me = unsafe { libc::geteuid() };
                    let peer = stream.peer_cred().ok().map(|c| c.uid());
                    let caller = Caller::from_peer_uid(peer, me);
                    spawn_connection(stream, ctx.clone(), permit, closing.clone(), Transport::Unix(caller))
                }
                Err(e) => accept_failed(e).await,
            },
            r = async {
                match &tcp {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            } => match r {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    spawn_connection(stream, ctx.clone(), permit, closing.clone(), Transport::Tcp)
                }
                Err(e) => accept_failed(e).await,
            },
            _ = &mut stop => break,
        }
    }
    // Every connection gives its slot back once it has closed: wait for all of them.
    let _ = closing_tx.send(true);
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, slots.acquire_many(all)).await;
}

async fn accept_failed(e: io::Error) {
    // EMFILE and friends: back off instead of spinning.
    tracing::warn!("control API: accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Serves one connection; when `closing` turns true, finishes the request in flight (if
/// any) and closes.
fn spawn_connection<S>(
    stream: S,
    ctx: Arc<Ctx>,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut closing: watch::Receiver<bool>,
    transport: Transport,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = ctx.limits;
    let service = service_fn(move |req| handle(req, ctx.clone(), transport));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .serve_connection(TokioIo::new(stream), service);
    tokio::spawn(async move {
        let mut conn = std::pin::pin!(conn);
        let ended = tokio::select! {
            r = conn.as_mut() => r,
            _ = async { closing.wait_for(|c| *c).await.map(|_| ()) } => {
                conn.as_mut().graceful_shutdown();
                conn.as_mut().await
            }
        };
        if let Err(e) = ended {
            tracing::debug!("control API connection ended: {e}");
        }
        drop(permit);
    });
}

/// Reads the whole body within the limits.
async fn read_body(req: Request<Incoming>, limits: &Limits) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "request body too large: the limit is {} bytes",
            limits.max_body_bytes
        ))
    };
    if let Some(len) = req.headers().get(CONTENT_LENGTH) {
        let len = len.to_str().ok().and_then(|s| s.parse::<u64>().ok());
        if len.is_some_and(|n| n > limits.max_body_bytes as u64) {
            return Err(too_large());
        }
    }
    let body = Limited::new(req.into_body(), limits.max_body_bytes);
    match tokio::time::timeout(limits.body_read_timeout, body.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::BadRequest(format!(
            "cannot read the request body: {e}"
        ))),
        Err(_) => Err(ApiError::Timeout(format!(
            "the request body did not arrive within {} ms",
            limits.body_read_timeout.as_millis()
        ))),
    }
}

/// Whether a `Content-Type` value is JSON: `application/json`, any case, parameters
/// (`; charset=utf-8`) allowed.
pub fn is_json_content_type(value: &str) -> bool {
    let media = value.split(';').next().unwrap_or("").trim();
    media.eq_ignore_ascii_case(JSON)
}

/// A request body must be declared as JSON (415 otherwise). An empty body needs no
/// `Content-Type`: the endpoint refuses it with a 400 that says what it takes.
fn check_content_type(headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    if body.is_empty() {
        return Ok(());
    }
    match headers.get(CONTENT_TYPE).map(|v| v.to_str()) {
        Some(Ok(v)) if is_json_content_type(v) => Ok(()),
        Some(Ok(v)) => Err(ApiError::UnsupportedMediaType(format!(
            "unsupported Content-Type {v:?}: request bodies are JSON, sent with \
             Content-Type: application/json"
        ))),
        Some(Err(_)) => Err(ApiError::UnsupportedMediaType(
            "unreadable Content-Type: request bodies are JSON, sent with \
             Content-Type: application/json"
                .into(),
        )),
        None => Err(ApiError::UnsupportedMediaType(
            "no Content-Type: request bodies are JSON, sent with Content-Type: application/json"
                .into(),
        )),
    }
}

/// Where a connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// The Unix socket, and who is at the other end (by its peer credentials).
    Unix(Caller),
    /// Loopback TCP: every local user, and web pages, can connect.
    Tcp,
}

/// A request over TCP must name a loopback host and carry the bearer token.
fn check_tcp_request(req: &Request<Incoming>, ctx: &Ctx) -> Result<(), ApiError> {
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    if !matches!(name, "127.0.0.1" | "localhost" | "::1") {
        return Err(ApiError::Forbidden(format!(
            "Host {host:?} is not this machine's loopback: use 127.0.0.1, localhost or [::1]"
        )));
    }
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let want = ctx.tcp_token.as_deref().unwrap_or("");
    if want.is_empty() || !constant_time_eq(given.as_bytes(), want.as_bytes()) {
        return Err(ApiError::Unauthorized(
            "the control API over TCP needs `Authorization: Bearer <token>` with the daemon's token"
                .into(),
        ));
    }
    Ok(())
}

/// Compares without stopping at the first difference (no timing hint about the token).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One request: check its origin, resolve, read the body, run the endpoint on the
/// blocking pool.
async fn handle(
    req: Request<Incoming>,
    ctx: Arc<Ctx>,
    transport: Transport,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // Over TCP, whoever has the token is the administrator.
    let checked = match transport {
        Transport::Unix(caller) => Ok(caller),
        Transport::Tcp => check_tcp_request(&req, &ctx).map(|()| Caller::Admin),
    };
    let resp = match checked.map(|caller| ctx.routes.resolve(&method, &path, caller)) {
        Err(e) => ApiResponse::from_api_error(e),
        Ok(Err(r)) => r,
        Ok(Ok(call)) => match run_call(req, call, &ctx).await {
            Ok(r) => r,
            Err(e) => ApiResponse::from_api_error(e),
        },
    };
    match &resp.error {
        Some(err) if resp.status.is_server_error() => {
            tracing::error!(%method, %path, status = resp.status.as_u16(), "control API: {err}")
        }
        Some(err) => {
            tracing::warn!(%method, %path, status = resp.status.as_u16(), "control API: rejected request: {err}")
        }
        None => tracing::debug!(%method, %path, status = resp.status.as_u16(), "control API"),
    }
    Ok(into_response(resp))
}

/// Reads the body (if the endpoint takes one), checks its type, and runs the call within
/// the deadline.
async fn run_call(req: Request<Incoming>, call: Call, ctx: &Ctx) -> Result<ApiResponse, ApiError> {
    let body = if call.takes_body {
        let headers = req.headers().clone();
        let body = read_body(req, &ctx.limits).await?;
        check_content_type(&headers, &body)?;
        body
    } else {
        Bytes::new()
    };
    let run = call.run;
    let call = tokio::task::spawn_blocking(move || run(&body));
    let backend = ctx.routes.backend();
    match tokio::time::timeout(ctx.limits.call_timeout, call).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(ApiError::Internal(format!(
            "the request failed inside {backend}: {e}"
        ))),
        Err(_) => Err(ApiError::Unavailable(format!(
            "{backend} did not answer within {} s",
            ctx.limits.call_timeout.as_secs()
        ))),
    }
}

fn into_response(r: ApiResponse) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(r.body));
    *resp.status_mut() = r.status;
    if !r.content_type.is_empty() {
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(r.content_type));
    }
    if let Some(allow) = r.allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
        resp.headers_mut().insert(ALLOW, allow);
    }
    resp
}
