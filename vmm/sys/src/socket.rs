//! Unix sockets that only their owner (or the users it names) may connect to.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Creates `path`'s directory (0700) if needed and binds a listening socket there with
/// mode 0600, set between `bind` and `listen` so that no client can connect before.
/// A stale socket file (nobody listening) is replaced; a live one is an error. The
/// listener is in blocking mode.
pub fn bind_unix_0600(path: &Path) -> io::Result<UnixListener> {
    bind_unix(path, &SocketAccess::default())
}

/// Who may connect to a socket: its permission bits (connecting needs write permission)
/// and, optionally, its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// The socket file's mode, e.g. 0o600 (its owner only), 0o660 (and its group), 0o666
    /// (every user).
    pub mode: u32,
    /// The socket file's group (`None`: the process's).
    pub group: Option<u32>,
}

impl Default for SocketAccess {
    /// Its owner only (0600).
    fn default() -> Self {
        SocketAccess {
            mode: 0o600,
            group: None,
        }
    }
}

impl SocketAccess {
    /// Whether users other than the owner may connect.
    pub fn shared(&self) -> bool {
        self.mode & 0o022 != 0
    }
}

/// [`bind_unix_0600`] with the mode and group of `access`, set between `bind` and
/// `listen`.
pub fn bind_unix(path: &Path, access: &SocketAccess) -> io::Result<UnixListener> {
    let ctx = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| ctx("cannot create the directory of", e))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("a server is already listening on {}", path.display()),
                ));
            }
            std::fs::remove_file(path).map_err(|e| ctx("cannot remove the stale socket", e))?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; not replacing it",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(ctx("cannot inspect", e)),
    }

    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = OsStr::as_bytes(path.as_os_str());
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is too long (at most {} bytes) or contains NUL",
                path.display(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket has no memory preconditions; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(ctx(
            "cannot create a socket for",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call, and `len` does not
    // exceed its size (checked above).
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(ctx("cannot bind", io::Error::last_os_error()));
    }
    if let Some(gid) = access.group {
        if let Err(e) = std::os::unix::fs::chown(path, None, Some(gid)) {
            let _ = std::fs::remove_file(path);
            return Err(ctx(&format!("cannot give group {gid}"), e));
        }
    }
    let mode = access.mode & 0o777;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        let _ = std::fs::remove_file(path);
        return Err(ctx(&format!("cannot set mode {mode:04o} on"), e));
    }
    // SAFETY: listen on a bound socket we own; the result is checked.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(ctx("cannot listen on", e));
    }
    Ok(UnixListener::from(fd))
}

/// The credentials of the process at the other end of a connected Unix socket, as the
/// kernel recorded them when it connected (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Its process id.
    pub pid: u32,
    /// Its effective user id.
    pub uid: u32,
    /// Its effective group id.
    pub gid: u32,
}

/// The credentials of `stream`'s peer.
pub fn peer_cred(stream: &UnixStream) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the fd is open for
    // the life of `stream`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid as u32,
        uid: cred.uid,
        gid: cred.gid,
    })
}
