//! How a VM starts the merge daemon when none is running: this binary, `merged`.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tinyvmm_vmm::share::DaemonLauncher;

/// Starts `EXE merged --socket SOCKET` detached from the VM (its own session, an empty
/// signal mask), logging to the socket's `.log` file next to it.
#[derive(Debug, Clone)]
pub struct MergedLauncher {
    exe: PathBuf,
}

impl MergedLauncher {
    /// A launcher of the daemon in `exe` (this binary).
    pub fn new(exe: PathBuf) -> Self {
        MergedLauncher { exe }
    }
}

impl DaemonLauncher for MergedLauncher {
    fn launch(&self, socket: &Path) -> std::io::Result<u32> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("merged")
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // Keep the daemon's log where users find it; never through a symbolic link that
        // someone left in its place.
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(socket.with_extension("log"))
        {
            Ok(f) => cmd.stderr(f),
            Err(_) => cmd.stderr(Stdio::null()),
        };
        // The daemon outlives this VM and our terminal's signals, and must not inherit the
        // VMM's blocked termination signals.
        tinyvmm_sys::signals::detach_with_clear_mask(&mut cmd);
        cmd.spawn().map(|child| child.id())
    }
}
