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

use clap::{Args, Subcommand};
use serde_json::{Map, Value};
use tinyvmm_api::{GuestInfo, KsmState};
use tinyvmm_merge::{KnobError, KnobsUpdate, RunMode};

pub use tinyvmm_api::client::{ApiClient, ClientError};
use tinyvmm_merged::default_api_socket;

const PAGE_SIZE: f64 = 4096.0;
const MIB: f64 = (1u64 << 20) as f64;

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
pub enum KsmError {
    /// Talking to the daemon failed, or it refused the request.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `set` without any knob.
    #[error("nothing to set: give at least one of --run, --pages-to-scan, --sleep-ms, --max-page-sharing, --smart-scan")]
    NothingToSet,
    /// `set --run` with a value other than 0, 1, 2.
    #[error("invalid --run: {0}")]
    Run(#[source] KnobError),
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
}

/// Runs `tinyvmm ksm`; errors go to stderr with exit status 1.
pub fn run(args: KsmArgs) -> ExitCode {
    let mut out = io::stdout().lock();
    match run_to(args, &mut out, true) {
        Ok(()) => ExitCode::SUCCESS,
        Err(KsmError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            let _ = out.flush();
            eprintln!("tinyvmm: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs `tinyvmm ksm`, writing to `out`. `clear`: `watch` clears the screen (ANSI) before
/// each refresh.
pub fn run_to(args: KsmArgs, out: &mut dyn Write, clear: bool) -> Result<(), KsmError> {
    let socket = args.api_sock.unwrap_or_else(default_api_socket);
    let client = ApiClient::new(socket)?;
    match args.command {
        KsmCommand::Status(a) => {
            let state = client.ksm()?;
            if a.json {
                writeln!(out, "{}", pretty(&state))?;
            } else {
                write_status(out, client.socket(), &state)?;
            }
        }
        KsmCommand::Set(a) => {
            let update = set_body(&a)?;
            let state = client.patch_ksm(&update)?;
            if a.json {
                writeln!(out, "{}", pretty(&state))?;
            } else {
                write_status(out, client.socket(), &state)?;
            }
        }
        KsmCommand::Watch(a) => watch(&client, &a, out, clear)?,
        KsmCommand::Guests(a) => {
            let guests = client.guests()?;
            if a.json {
                writeln!(out, "{}", pretty(&guests))?;
            } else {
                write_guests(out, &guests)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

fn pretty(v: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// The `PATCH /ksm` body of `tinyvmm ksm set`.
pub fn set_body(a: &SetArgs) -> Result<KnobsUpdate, KsmError> {
    let update = KnobsUpdate {
        run: a
            .run
            .map(RunMode::try_from)
            .transpose()
            .map_err(KsmError::Run)?,
        pages_to_scan: a.pages_to_scan,
        sleep_millisecs: a.sleep_ms,
        max_page_sharing: a.max_page_sharing,
        smart_scan: a.smart_scan,
        advisor: None,
    };
    if update == KnobsUpdate::default() {
        return Err(KsmError::NothingToSet);
    }
    Ok(update)
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

fn mib(bytes: f64) -> f64 {
    bytes / MIB
}

/// Bytes saved: pages no longer backed by a private copy.
pub fn saved_mib(state: &KsmState) -> f64 {
    (state.counters.pages_sharing + state.counters.zero_pages) as f64 * PAGE_SIZE / MIB
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

/// The `tinyvmm ksm status` table: every field of `state` under its API name, then the
/// memory saved.
pub fn write_status(out: &mut dyn Write, socket: &Path, state: &KsmState) -> io::Result<()> {
    // The fields by their API names, in the order of the kernel's files.
    let fields = match serde_json::to_value(state) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    writeln!(out, "merge daemon at {}", socket.display())?;
    writeln!(out, "knobs")?;
    for k in KNOB_KEYS {
        if let Some(v) = fields.get(*k) {
            writeln!(out, "  {k:<26} {}", show(k, v))?;
        }
    }
    writeln!(out, "counters")?;
    for k in COUNTER_KEYS {
        if let Some(v) = fields.get(*k) {
            writeln!(out, "  {k:<26} {}", show(k, v))?;
        }
    }
    for (k, v) in &fields {
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
        mib(state.counters.general_profit as f64)
    )?;
    writeln!(
        out,
        "  {:<26} {:.1} MiB",
        "shared frames (pool)",
        mib(state.pool_bytes as f64)
    )?;
    writeln!(
        out,
        "  {:<26} {:.1} MiB",
        "engine metadata",
        mib(state.engine_metadata_bytes as f64)
    )?;
    Ok(())
}

/// The `tinyvmm ksm guests` table.
pub fn write_guests(out: &mut dyn Write, guests: &[GuestInfo]) -> io::Result<()> {
    if guests.is_empty() {
        return writeln!(out, "no guests registered with the merge daemon");
    }
    let header = [
        "ID",
        "NAME",
        "PID",
        "UID",
        "GROUP",
        "PAGES",
        "MERGING",
        "ZERO",
        "SAVED_MIB",
        "PROFIT_MIB",
        "VMAS",
        "STATE",
    ];
    let rows: Vec<Vec<String>> = guests
        .iter()
        .map(|g| {
            let c = &g.counters;
            let saved = (c.merging_pages + c.zero_pages) as f64 * PAGE_SIZE / MIB;
            vec![
                c.id.0.to_string(),
                g.name.clone(),
                g.pid.to_string(),
                g.uid.to_string(),
                g.share_group.clone(),
                c.pages.to_string(),
                c.merging_pages.to_string(),
                c.zero_pages.to_string(),
                format!("{saved:.1}"),
                format!("{:.1}", mib(c.profit as f64)),
                format!("{}/{}", c.vma_mappings, c.vma_budget),
                if c.failed { "failed" } else { "ok" }.into(),
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
) -> Result<(), KsmError> {
    let interval = Duration::from_millis(a.interval_ms);
    let mut prev: Option<(Instant, KsmState)> = None;
    let mut n = 0u64;
    loop {
        let state = client.ksm()?;
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
            let (c, b) = (&state.counters, &before.counters);
            for (k, now, was) in [
                ("pages_scanned", c.pages_scanned, b.pages_scanned),
                ("merges", c.merges, b.merges),
                ("splits", c.splits, b.splits),
                ("full_scans", c.full_scans, b.full_scans),
            ] {
                let rate = now.saturating_sub(was) as f64 / secs;
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
