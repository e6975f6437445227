//! `tinyvmm merged`: the merge daemon (the user-space ksmd).
//!
//! Threads, and what each owns:
//! - the **scanner** (`scanner.rs`, the caller's thread in [`Daemon::run`]) owns the merge
//!   engine and the fleet (`fleet.rs`) of agent connections and pools; it wakes every
//!   `sleep_millisecs` for one round (backing off while rounds find nothing to do), and
//!   between rounds applies commands from its channel: new registrations, and typed
//!   requests from the control API. Nothing else touches engine state.
//! - one **worker per agent connection** (`worker.rs`, driven from `lanes.rs`) runs the
//!   digests the engine starts on every guest at once (and the API's statistics requests)
//!   and reports each as it finishes; the scanner makes every other request itself once
//!   that connection is idle, and waits a bounded time for any one agent, so a slow or
//!   stalled agent delays only its own guest. New frames' pages are read straight from the
//!   VM process where the daemon may (`direct.rs`).
//! - the **acceptor** (`acceptor.rs`) reads each new connection's `Hello` with a deadline,
//!   validates it, and hands the connection to the scanner, which welcomes it.
//! - the **control API** (REST over a Unix socket, served by `tinyvmm-api`) runs on its
//!   own thread and talks to the scanner only through [`Control`] (`control.rs`), whose
//!   errors (`error.rs`) tell an invalid request (400) from a scanner that cannot answer
//!   (503).
//!
//! Lifecycle: [`Daemon::bind`] takes an exclusive `flock` on `merged.lock` in the run
//! directory (`rundir.rs`) for the daemon's lifetime — racing starts (two guests starting
//! at once) leave exactly one daemon — and binds the agents' socket (0600);
//! [`Daemon::run`] starts the acceptor and scans until told to stop. A guest leaves when
//! its agent's connection fails or its agent reports a failure that retries cannot fix
//! (`Fleet::failed` in `fleet.rs`); its frames are released only once its VM process has
//! exited.

mod acceptor;
mod control;
mod direct;
mod error;
mod fleet;
mod lanes;
mod page_source;
mod policy;
mod pool;
mod rundir;
mod scanner;
mod worker;

pub use control::{Control, GuestSnapshot, Snapshot};
pub use error::{DaemonError, SnapshotError, UpdateError};
pub use fleet::{UserLimits, POOL_LEN};
pub use policy::{GroupKey, PolicyError, SharePolicy, MAX_GROUP_NAME_BYTES};
pub use rundir::{default_api_socket, default_merge_socket, run_dir};
pub use scanner::{Daemon, DaemonConfig};
