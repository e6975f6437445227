//! `tinyvmm ksm`: the merge daemon's command-line client, over its REST control socket.
//!
//! ```text
//! tinyvmm ksm status [--json]                 # knobs and counters, like /sys/kernel/mm/ksm
//! tinyvmm ksm set --run 1 --pages-to-scan 2000 --sleep-ms 5
//! tinyvmm ksm watch [--interval-ms 1000] [--count N]
//! tinyvmm ksm guests [--json]                 # per guest, like /proc/PID/ksm_stat
//! ```

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value};

use tinyvmm_merged::default_api_socket;

const PAGE_SIZE: f64 = 4096.0;
const MIB: f64 = (1u64 << 20) as f64;
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `tinyvmm ksm`: inspect and tune the merge daemon (the user-space ksmd).
#[derive(Args, Debug)]
pub struct KsmArgs {
    /// The merge daemon's API socket [default: api.sock in $TINYVMM_RUN_DIR, else
    /// /run/tinyvmm (root), else $XDG_RUNTIME_DIR/tinyvmm, else /tmp/tinyvmm-$UID].
    #[arg(long, global = true, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    #[command(subcommand)]
    pub command: KsmCommand,
}

/// The `tinyvmm ksm` subcommands.
#[derive(Subcommand, Debug)]
pub enum KsmCommand {
    /// Knobs and counters (like /sys/kernel/mm/ksm), and the memory saved.
    Status(StatusArgs),
    /// Change knobs; all given values are validated and applied at once.
    Set(SetArgs),
    /// Live counters and rates, refreshed in place.
    Watch(WatchArgs),
    /// Per-guest counters (like /proc/PID/ksm_stat).
    Guests(GuestsArgs),
}

/// `tinyvmm ksm status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print the daemon's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `tinyvmm ksm set`.
#[derive(Args, Debug, Default)]
pub struct SetArgs {
    /// 0 stops the scanner, 1 runs it, 2 stops it and unmerges every page.
    #[arg(long)]
    pub run: Option<u8>,
    /// Pages visited per wake-up, across all guests.
    #[arg(long)]
    pub pages_to_scan: Option<u32>,
    /// Sleep between wake-ups, milliseconds (sleep_millisecs).
    #[arg(long)]
    pub sleep_ms: Option<u32>,
    /// Most guest pages mapped onto one shared frame.
    #[arg(long)]
    pub max_page_sharing: Option<u32>,
    /// Skip pages that keep failing to merge (on/off, 1/0, true/false).
    #[arg(long, value_parser = clap::builder::BoolishValueParser::new())]
    pub smart_scan: Option<bool>,
    /// Print the new state as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `tinyvmm ksm watch`.
#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Time between refreshes, milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    pub interval_ms: u64,
    /// Stop after this many refreshes (default: until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

/// `tinyvmm ksm guests`.
#[derive(Args, Debug)]
pub struct GuestsArgs {
    /// Print the daemon's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Why a `tinyvmm ksm` command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("no merge daemon is listening on {}: start one with `tinyvmm merged` or run a guest with --share-memory", .0.display())]
    NoDaemon(PathBuf),
    /// Connecting failed for another reason.
    #[error("cannot connect to the merge daemon at {}: {source}{hint}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// The HTTP exchange failed.
    #[error("talking to the merge daemon at {}: {msg}", path.display())]
    Http {
        /// The socket.
        path: PathBuf,
        /// What failed.
        msg: String,
    },
    /// The daemon refused the request.
    #[error("the merge daemon refused the request ({status}): {msg}")]
    Refused {
        /// The HTTP status.
        status: StatusCode,
        /// The daemon's `error` text.
        msg: String,
    },
    /// The daemon's answer is not what this client expects.
    #[error("unexpected answer from the merge daemon: {0}")]
    BadReply(String),
    /// `set` without any knob.
    #[error("nothing to set: give at least one of --run, --pages-to-scan, --sleep-ms, --max-page-sharing, --smart-scan")]
    NothingToSet,
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
}

/// A small blocking HTTP/1.1 client for the control socket (hyper on a current-thread
/// runtime; one connection per request).
pub struct ApiClient {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl ApiClient {
    /// A client for the daemon at `socket`; connects on each request.
    pub fn new(socket: impl Into<PathBuf>) -> Result<Self, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Http {
                path: PathBuf::new(),
                msg: format!("cannot start the I/O runtime: {e}"),
            })?;
        Ok(ApiClient {
            socket: socket.into(),
            rt,
        })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// One request; returns the status and body whatever the status.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let http = |msg: String| ClientError::Http {
            path: self.socket.clone(),
            msg,
        };
        let exchange = async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|e| self.connect_error(e))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| http(e.to_string()))?;
            let conn = tokio::spawn(conn);
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header(HOST, "localhost");
            if body.is_some() {
                req = req.header(CONTENT_TYPE, "application/json");
            }
            let req = req
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| http(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| http(e.to_string()))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| http(e.to_string()))?
                .to_bytes();
            drop(sender);
            conn.abort();
            Ok((status, bytes))
        };
        self.rt.block_on(async {
            tokio::time::timeout(REQUEST_TIMEOUT, exchange)
                .await
                .unwrap_or_else(|_| {
                    Err(http(format!(
                        "no answer within {} s",
                        REQUEST_TIMEOUT.as_secs()
                    )))
                })
        })
    }

    fn connect_error(&self, e: io::Error) -> ClientError {
        match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ClientError::NoDaemon(self.socket.clone())
            }
            io::ErrorKind::PermissionDenied => ClientError::Connect {
                path: self.socket.clone(),
                source: e,
                hint: " (the socket is mode 0600: run as the daemon's user)",
            },
            _ if e.raw_os_error() == Some(libc::ENOTDIR) => {
                ClientError::NoDaemon(self.socket.clone())
            }
            _ => ClientError::Connect {
                path: self.socket.clone(),
                source: e,
                hint: "",
            },
        }
    }

    /// A request whose answer must be 2xx JSON.
    pub fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let body = body.map(|b| b.to_string().into_bytes());
        let (status, bytes) = self.request(method, path, body)?;
        let value: Result<Value, _> = serde_json::from_slice(&bytes);
        if !status.is_success() {
            let msg = value
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Refused { status, msg });
        }
        value.map_err(|e| ClientError::BadReply(format!("{path}: {e}")))
    }
}

/// Runs `tinyvmm ksm`; errors go to stderr with exit status 1.
pub fn run(args: KsmArgs) -> ExitCode {
    let mut out = io::stdout().lock();
    match run_to(args, &mut out, true) {
        Ok(()) => ExitCode::SUCCESS,
        Err(ClientError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            let _ = out.flush();
            eprintln!("tinyvmm: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs `tinyvmm ksm`, writing to `out`. `clear`: `watch` clears the screen (ANSI) before
/// each refresh.
pub fn run_to(args: KsmArgs, out: &mut dyn Write, clear: bool) -> Result<(), ClientError> {
    let socket = args.api_sock.unwrap_or_else(default_api_socket);
    let client = ApiClient::new(socket)?;
    match args.command {
        KsmCommand::Status(a) => {
            let state = client.json(Method::GET, "/ksm", None)?;
            if a.json {
                writeln!(out, "{}", pretty(&state))?;
            } else {
                write_status(out, client.socket(), &state)?;
            }
        }
        KsmCommand::Set(a) => {
            let update = set_body(&a)?;
            let state = client.json(Method::PATCH, "/ksm", Some(&update))?;
            if a.json {
                writeln!(out, "{}", pretty(&state))?;
            } else {
                write_status(out, client.socket(), &state)?;
            }
        }
        KsmCommand::Watch(a) => watch(&client, &a, out, clear)?,
        KsmCommand::Guests(a) => {
            let guests = client.json(Method::GET, "/guests", None)?;
            if a.json {
                writeln!(out, "{}", pretty(&guests))?;
            } else {
                let list = guests
                    .as_array()
                    .ok_or_else(|| ClientError::BadReply("/guests is not a list".into()))?;
                write_guests(out, list)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// The `PATCH /ksm` body of `tinyvmm ksm set`.
pub fn set_body(a: &SetArgs) -> Result<Value, ClientError> {
    let mut m = Map::new();
    if let Some(v) = a.run {
        m.insert("run".into(), v.into());
    }
    if let Some(v) = a.pages_to_scan {
        m.insert("pages_to_scan".into(), v.into());
    }
    if let Some(v) = a.sleep_ms {
        m.insert("sleep_millisecs".into(), v.into());
    }
    if let Some(v) = a.max_page_sharing {
        m.insert("max_page_sharing".into(), v.into());
    }
    if let Some(v) = a.smart_scan {
        m.insert("smart_scan".into(), v.into());
    }
    if m.is_empty() {
        return Err(ClientError::NothingToSet);
    }
    Ok(Value::Object(m))
}

/// Knobs in the kernel's order: the API's writable knobs.
const KNOB_KEYS: &[&str] = tinyvmm_api::KNOBS;
/// Counters in the kernel's order, then ours.
const COUNTER_KEYS: &[&str] = &[
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "full_scans",
    "pages_scanned",
    "pages_skipped",
    "zero_pages",
    "general_profit",
    "stable_node_chains",
    "stable_node_dups",
    "merges",
    "splits",
    "frames_freed",
    "merge_mismatches",
    "pages_skipped_vma_budget",
    "pool_frames",
    "guests",
    "guests_failed",
    "metadata_bytes",
];
const MEMORY_KEYS: &[&str] = &["pool_bytes", "engine_metadata_bytes"];

fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

/// Bytes saved: pages no longer backed by a private copy.
pub fn saved_mib(state: &Value) -> f64 {
    (num(state, "pages_sharing") + num(state, "zero_pages")) * PAGE_SIZE / MIB
}

fn show(key: &str, v: &Value) -> String {
    match (key, v) {
        ("run", Value::Number(n)) => {
            let what = match n.as_u64() {
                Some(0) => " (stopped)",
                Some(1) => " (scanning)",
                Some(2) => " (unmerging)",
                _ => "",
            };
            format!("{n}{what}")
        }
        ("advisor", Value::Object(a)) => match a.get("mode").and_then(Value::as_str) {
            Some("scan-time") => format!(
                "scan-time (full scan in {} s, at most {}% CPU)",
                a.get("target_scan_secs").unwrap_or(&Value::Null),
                a.get("max_cpu_pct").unwrap_or(&Value::Null)
            ),
            Some(mode) => mode.to_string(),
            None => v.to_string(),
        },
        (_, Value::Bool(b)) => if *b { "on" } else { "off" }.to_string(),
        (_, Value::String(s)) => s.clone(),
        _ => v.to_string(),
    }
}

/// The `tinyvmm ksm status` table.
pub fn write_status(out: &mut dyn Write, socket: &Path, state: &Value) -> io::Result<()> {
    let empty = Map::new();
    let obj = state.as_object().unwrap_or(&empty);
    writeln!(out, "merge daemon at {}", socket.display())?;
    writeln!(out, "knobs")?;
    for k in KNOB_KEYS {
        if let Some(v) = obj.get(*k) {
            writeln!(out, "  {k:<26} {}", show(k, v))?;
        }
    }
    writeln!(out, "counters")?;
    for k in COUNTER_KEYS {
        if let Some(v) = obj.get(*k) {
            writeln!(out, "  {k:<26} {}", show(k, v))?;
        }
    }
    for (k, v) in obj {
        let listed = KNOB_KEYS.contains(&k.as_str())
            || COUNTER_KEYS.contains(&k.as_str())
            || MEMORY_KEYS.contains(&k.as_str());
        if !listed {
            writeln!(out, "  {k:<26} {}", show(k, v))?;
        }
    }
    writeln!(out, "memory")?;
    writeln!(
        out,
        "  {:<26} {:.1} MiB  ((pages_sharing + zero_pages) x 4 KiB)",
        "saved",
        saved_mib(state)
    )?;
    writeln!(
        out,
        "  {:<26} {:.1} MiB",
        "general_profit",
        num(state, "general_profit") / MIB
    )?;
    writeln!(
        out,
        "  {:<26} {:.1} MiB",
        "shared frames (pool)",
        num(state, "pool_bytes") / MIB
    )?;
    writeln!(
        out,
        "  {:<26} {:.1} MiB",
        "engine metadata",
        num(state, "engine_metadata_bytes") / MIB
    )?;
    Ok(())
}

/// The `tinyvmm ksm guests` table.
pub fn write_guests(out: &mut dyn Write, guests: &[Value]) -> io::Result<()> {
    if guests.is_empty() {
        return writeln!(out, "no guests registered with the merge daemon");
    }
    let header = [
        "ID",
        "NAME",
        "PID",
        "GROUP",
        "PAGES",
        "MERGING",
        "ZERO",
        "SAVED_MIB",
        "PROFIT_MIB",
        "VMAS",
        "STATE",
    ];
    let text = |g: &Value, k: &str| match g.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "-".into(),
    };
    let rows: Vec<Vec<String>> = guests
        .iter()
        .map(|g| {
            let saved = (num(g, "merging_pages") + num(g, "zero_pages")) * PAGE_SIZE / MIB;
            vec![
                text(g, "id"),
                text(g, "name"),
                text(g, "pid"),
                text(g, "share_group"),
                text(g, "pages"),
                text(g, "merging_pages"),
                text(g, "zero_pages"),
                format!("{saved:.1}"),
                format!("{:.1}", num(g, "profit") / MIB),
                format!("{}/{}", text(g, "vma_mappings"), text(g, "vma_budget")),
                if g.get("failed").and_then(Value::as_bool) == Some(true) {
                    "failed".into()
                } else {
                    "ok".into()
                },
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: &[String]| -> io::Result<()> {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            // Text columns left, numbers right.
            if matches!(i, 1 | 3 | 10) {
                s.push_str(&format!("{c:<w$}"));
            } else {
                s.push_str(&format!("{c:>w$}"));
            }
        }
        writeln!(out, "{}", s.trim_end())
    };
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    line(out, &header)?;
    for r in &rows {
        line(out, r)?;
    }
    Ok(())
}

/// ANSI: cursor home, clear screen.
pub const CLEAR: &str = "\x1b[H\x1b[2J";

fn watch(
    client: &ApiClient,
    a: &WatchArgs,
    out: &mut dyn Write,
    clear: bool,
) -> Result<(), ClientError> {
    let interval = Duration::from_millis(a.interval_ms);
    let mut prev: Option<(Instant, Value)> = None;
    let mut n = 0u64;
    loop {
        let state = client.json(Method::GET, "/ksm", None)?;
        let now = Instant::now();
        if clear {
            write!(out, "{CLEAR}")?;
        }
        writeln!(
            out,
            "tinyvmm ksm watch: every {} ms (Ctrl-C to stop)",
            a.interval_ms
        )?;
        write_status(out, client.socket(), &state)?;
        if let Some((then, before)) = &prev {
            let secs = now.duration_since(*then).as_secs_f64().max(1e-3);
            writeln!(out, "rates")?;
            for k in ["pages_scanned", "merges", "splits", "full_scans"] {
                let rate = (num(&state, k) - num(before, k)) / secs;
                writeln!(out, "  {:<26} {rate:.1}/s", k)?;
            }
        }
        out.flush()?;
        n += 1;
        if a.count.is_some_and(|c| n >= c) {
            return Ok(());
        }
        prev = Some((now, state));
        std::thread::sleep(interval);
    }
}
