//! A small blocking HTTP/1.1 client for both control sockets (hyper on a current-thread
//! runtime; one connection per request), with typed calls that return the server's own
//! types: [`ApiClient::ksm`] a [`KsmState`], [`ApiClient::guests`] [`GuestInfo`]s,
//! [`ApiClient::vm`] a [`VmInfo`], ... Used by `tinyvmm ksm`, the density benchmark and
//! the tests.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tinyvmm_merge::KnobsUpdate;

use crate::vm::{ActionBody, VmAction, VmInfo};
use crate::{GuestInfo, KsmState, JSON};

/// How long one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Which server a client talks to, for its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// The merge daemon (`tinyvmm merged`).
    Daemon,
    /// A VM process (`tinyvmm run --api-sock`).
    Vm,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Daemon => "the merge daemon",
            Server::Vm => "the VM",
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No merge daemon listens on the socket.
    #[error("no merge daemon is listening on {}: start one with `tinyvmm merged` or run a guest with --share-memory", .0.display())]
    NoDaemon(PathBuf),
    /// No VM listens on the socket.
    #[error("no VM is listening on {}: start one with `tinyvmm run --api-sock PATH`", .0.display())]
    NoVm(PathBuf),
    /// Connecting failed for another reason.
    #[error("cannot connect to {server} at {}: {source}{hint}", path.display())]
    Connect {
        /// Who.
        server: &'static str,
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// The I/O runtime could not be started.
    #[error("cannot start the I/O runtime: {0}")]
    Runtime(#[source] io::Error),
    /// The HTTP exchange failed.
    #[error("talking to {server} at {}: {msg}", path.display())]
    Http {
        /// Who.
        server: &'static str,
        /// The socket.
        path: PathBuf,
        /// What failed.
        msg: String,
    },
    /// The server refused the request (4xx, 5xx).
    #[error("{server} refused the request ({status}): {msg}")]
    Refused {
        /// Who.
        server: &'static str,
        /// The HTTP status.
        status: StatusCode,
        /// The server's `error` text.
        msg: String,
    },
    /// The server's answer is not what this client expects.
    #[error("unexpected answer from {server}: {msg}")]
    BadReply {
        /// Who.
        server: &'static str,
        /// What is wrong.
        msg: String,
    },
}

/// A client for one control socket; connects on each request.
pub struct ApiClient {
    socket: PathBuf,
    server: Server,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("socket", &self.socket)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// Percent-encodes one path segment (everything but RFC 3986's unreserved characters).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl ApiClient {
    /// A client for the merge daemon at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Result<Self, ClientError> {
        Self::for_server(socket, Server::Daemon)
    }

    /// A client for the VM API at `socket`.
    pub fn vm_client(socket: impl Into<PathBuf>) -> Result<Self, ClientError> {
        Self::for_server(socket, Server::Vm)
    }

    /// A client for `server` at `socket`.
    pub fn for_server(socket: impl Into<PathBuf>, server: Server) -> Result<Self, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(ApiClient {
            socket: socket.into(),
            server,
            rt,
        })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn http(&self, msg: String) -> ClientError {
        ClientError::Http {
            server: self.server.name(),
            path: self.socket.clone(),
            msg,
        }
    }

    /// One request; a body is sent with `Content-Type: application/json`. Returns the
    /// status and body whatever the status.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        self.request_with_type(method, path, body.map(|b| (JSON, b)))
    }

    /// One request with a body of the given `Content-Type`; returns the status and body
    /// whatever the status.
    pub fn request_with_type(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let exchange = async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|e| self.connect_error(e))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| self.http(e.to_string()))?;
            let conn = tokio::spawn(conn);
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header(HOST, "localhost");
            let body = match body {
                Some((content_type, b)) => {
                    req = req.header(CONTENT_TYPE, content_type);
                    b
                }
                None => Vec::new(),
            };
            let req = req
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| self.http(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| self.http(e.to_string()))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| self.http(e.to_string()))?
                .to_bytes();
            drop(sender);
            conn.abort();
            Ok((status, bytes))
        };
        self.rt.block_on(async {
            tokio::time::timeout(REQUEST_TIMEOUT, exchange)
                .await
                .unwrap_or_else(|_| {
                    Err(self.http(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())))
                })
        })
    }

    fn connect_error(&self, e: io::Error) -> ClientError {
        let absent = || match self.server {
            Server::Daemon => ClientError::NoDaemon(self.socket.clone()),
            Server::Vm => ClientError::NoVm(self.socket.clone()),
        };
        match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => absent(),
            _ if e.raw_os_error() == Some(libc::ENOTDIR) => absent(),
            io::ErrorKind::PermissionDenied => ClientError::Connect {
                server: self.server.name(),
                path: self.socket.clone(),
                source: e,
                hint: " (the socket is mode 0600: run as its owner)",
            },
            _ => ClientError::Connect {
                server: self.server.name(),
                path: self.socket.clone(),
                source: e,
                hint: "",
            },
        }
    }

    /// A request whose answer must be 2xx; returns the body.
    fn checked(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let (status, bytes) = self.request(method, path, body)?;
        if !status.is_success() {
            #[derive(serde::Deserialize)]
            struct ErrorBody {
                error: String,
            }
            let msg = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Refused {
                server: self.server.name(),
                status,
                msg,
            });
        }
        Ok(bytes)
    }

    /// A request whose answer must be 2xx JSON of type `T`.
    pub fn typed<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| self.http(format!("cannot encode the request: {e}")))?;
        let bytes = self.checked(method, path, body)?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadReply {
            server: self.server.name(),
            msg: format!("{path}: {e}"),
        })
    }

    /// A request whose answer must be 2xx JSON, of any shape.
    pub fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        self.typed(method, path, body)
    }

    /// `GET /ksm`: knobs and counters.
    pub fn ksm(&self) -> Result<KsmState, ClientError> {
        self.typed(Method::GET, "/ksm", None::<&()>)
    }

    /// `PATCH /ksm`: applies `upd` atomically; the new state.
    pub fn patch_ksm(&self, upd: &KnobsUpdate) -> Result<KsmState, ClientError> {
        self.typed(Method::PATCH, "/ksm", Some(upd))
    }

    /// `GET /ksm/{knob}`: one knob's value.
    pub fn knob(&self, knob: &str) -> Result<Value, ClientError> {
        self.typed(
            Method::GET,
            &format!("/ksm/{}", encode_segment(knob)),
            None::<&()>,
        )
    }

    /// `PUT /ksm/{knob}`: sets one knob; the new state.
    pub fn put_knob(&self, knob: &str, value: &impl Serialize) -> Result<KsmState, ClientError> {
        self.typed(
            Method::PUT,
            &format!("/ksm/{}", encode_segment(knob)),
            Some(value),
        )
    }

    /// `GET /guests`: every registered guest.
    pub fn guests(&self) -> Result<Vec<GuestInfo>, ClientError> {
        self.typed(Method::GET, "/guests", None::<&()>)
    }

    /// `GET /guests/{id}`: one guest, by id or name.
    pub fn guest(&self, id_or_name: &str) -> Result<GuestInfo, ClientError> {
        self.typed(
            Method::GET,
            &format!("/guests/{}", encode_segment(id_or_name)),
            None::<&()>,
        )
    }

    /// `GET /metrics`: the Prometheus text.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let bytes = self.checked(Method::GET, "/metrics", None)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| ClientError::BadReply {
            server: self.server.name(),
            msg: format!("/metrics: {e}"),
        })
    }

    /// `GET /vm`: the VM's state.
    pub fn vm(&self) -> Result<VmInfo, ClientError> {
        self.typed(Method::GET, "/vm", None::<&()>)
    }

    /// `PUT /vm/actions`: asks the VM to carry out `action`.
    pub fn vm_action(&self, action: VmAction) -> Result<(), ClientError> {
        let body = serde_json::to_vec(&ActionBody { action })
            .map_err(|e| self.http(format!("cannot encode the request: {e}")))?;
        self.checked(Method::PUT, "/vm/actions", Some(body))
            .map(|_| ())
    }
}
