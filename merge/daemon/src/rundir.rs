//! The run directory: where the daemon's sockets, lock and log live.

use std::path::PathBuf;

/// The directory of the daemon's sockets: `$TINYVMM_RUN_DIR`, else `/run/tinyvmm` for
/// root, else `$XDG_RUNTIME_DIR/tinyvmm`, else `/tmp/tinyvmm-$UID`.
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TINYVMM_RUN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/tinyvmm");
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("tinyvmm");
    }
    PathBuf::from(format!("/tmp/tinyvmm-{uid}"))
}

/// The merge daemon's default API socket: [`run_dir`]`/api.sock`.
pub fn default_api_socket() -> PathBuf {
    run_dir().join("api.sock")
}

/// The default socket agents register on: [`run_dir`]`/merged.sock`.
pub fn default_merge_socket() -> PathBuf {
    run_dir().join("merged.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_sockets_are_in_the_run_dir() {
        assert_eq!(default_api_socket(), run_dir().join("api.sock"));
        assert_eq!(default_merge_socket(), run_dir().join("merged.sock"));
    }
}
