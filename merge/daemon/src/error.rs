//! The daemon's errors, one enum per operation: starting the daemon ([`DaemonError`]),
//! and the control API's two calls into the scanner ([`SnapshotError`], [`UpdateError`]).

use std::path::PathBuf;
use std::time::Duration;

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon holds the lock.
    #[error("a merge daemon is already running for {0}")]
    AlreadyRunning(PathBuf),
    /// Setting up the run directory, lock or socket failed.
    #[error("{what} {path}: {source}")]
    Setup {
        /// The operation.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Bad knobs on the command line.
    #[error("invalid settings: {0}")]
    Knobs(#[from] tinyvmm_merge::KnobError),
    /// The run directory is not private to this user (or cannot be created).
    #[error("run directory: {0}")]
    RunDir(#[from] tinyvmm_sys::dir::PrivateDirError),
    /// `vm.max_map_count` could not be raised to what `--max-map-count` asks.
    #[error("mapping limit: {0}")]
    MapCount(#[from] tinyvmm_sys::vm_limits::MapCountError),
}

/// Why the daemon's state could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The scanner has stopped (or is stopping) and takes no more commands.
    #[error("the daemon is stopping")]
    Stopping,
    /// The scanner did not answer in time (busy with a long round).
    #[error("the daemon did not answer within {0:?}")]
    Busy(Duration),
}

/// Why a knob update was not applied. In every case nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The update is invalid (a value out of range, or one the current knobs rule out).
    #[error("{0}")]
    Invalid(#[from] tinyvmm_merge::KnobError),
    /// The scanner has stopped (or is stopping) and takes no more commands.
    #[error("the daemon is stopping")]
    Stopping,
    /// The scanner did not answer in time (busy unmerging, or with a long round); the
    /// update may still be applied when it gets to it.
    #[error("the daemon did not answer within {0:?}")]
    Busy(Duration),
}

impl From<SnapshotError> for tinyvmm_api::ApiError {
    fn from(e: SnapshotError) -> Self {
        tinyvmm_api::ApiError::Unavailable(e.to_string())
    }
}

impl From<UpdateError> for tinyvmm_api::ApiError {
    fn from(e: UpdateError) -> Self {
        match e {
            UpdateError::Invalid(_) => tinyvmm_api::ApiError::BadRequest(e.to_string()),
            UpdateError::Stopping | UpdateError::Busy(_) => {
                tinyvmm_api::ApiError::Unavailable(e.to_string())
            }
        }
    }
}
