//! The host side of the device, Firecracker's convention: one Unix socket at `PATH` that host
//! programs connect to, writing `CONNECT <port>\n` to reach the guest's port and reading
//! `OK <host_port>\n` once the guest accepted; and, for connections the guest opens to host
//! port `P`, the Unix socket `PATH_P` that a host program listens on.

use std::io::{self, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The longest `CONNECT <port>\n` line accepted (with room for spaces).
const MAX_CONNECT_LINE: usize = 32;

/// Why the host side cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum HostSideError {
    /// The listening socket could not be created at the path.
    #[error("cannot bind the vsock socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// The listening Unix socket at `PATH` (the device removes the file when it goes).
#[derive(Debug)]
pub struct HostSide {
    path: PathBuf,
    listener: UnixListener,
}

impl HostSide {
    /// Binds the socket at `path` (which must not exist) in non-blocking mode.
    pub fn bind(path: &Path) -> Result<Self, HostSideError> {
        let bind_err = |source| HostSideError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(HostSide {
            path: path.to_path_buf(),
            listener,
        })
    }

    /// The listening socket.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connects to the host program serving host port `port`: `PATH_<port>`. The
    /// connection is made non-blocking from the start, so a listener whose backlog is full
    /// is a refusal (`EAGAIN`), never a wait on the device's thread.
    pub fn connect_port(&self, port: u32) -> io::Result<UnixStream> {
        let mut name = self.path.clone().into_os_string();
        name.push(format!("_{port}"));
        connect_nonblocking(Path::new(&name))
    }
}

/// A non-blocking Unix stream connected to `path`; a Unix connect completes at once or
/// fails (`EAGAIN` when the listener's backlog is full).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we just created and own; the stream closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un that outlives the call; len is its size.
    let r = unsafe { libc::connect(fd, std::ptr::addr_of!(addr).cast(), len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// What reading a host connection's first line gave.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectLine {
    /// `CONNECT <port>`: the host program wants the guest's port.
    Port(u32),
    /// The line is not complete yet.
    NeedMore,
    /// Not a `CONNECT` line, too long, data after it, or the program went away.
    Bad,
}

/// A host connection that has not yet said which guest port it wants.
#[derive(Debug)]
pub struct PendingConnect {
    /// The connection.
    pub stream: UnixStream,
    line: Vec<u8>,
}

impl PendingConnect {
    /// A freshly accepted connection (made non-blocking).
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(PendingConnect {
            stream,
            line: Vec::with_capacity(MAX_CONNECT_LINE),
        })
    }

    /// Reads what the program sent so far and parses the line once it is complete.
    pub fn read_line(&mut self) -> ConnectLine {
        let mut buf = [0u8; MAX_CONNECT_LINE];
        loop {
            let room = MAX_CONNECT_LINE - self.line.len();
            if room == 0 {
                return ConnectLine::Bad;
            }
            match self.stream.read(&mut buf[..room]) {
                Ok(0) => return ConnectLine::Bad,
                Ok(n) => {
                    self.line.extend_from_slice(&buf[..n]);
                    if let Some(end) = self.line.iter().position(|&b| b == b'\n') {
                        if end + 1 != self.line.len() {
                            return ConnectLine::Bad;
                        }
                        return parse_connect(&self.line[..end])
                            .map_or(ConnectLine::Bad, ConnectLine::Port);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ConnectLine::NeedMore,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ConnectLine::Bad,
            }
        }
    }
}

/// Parses `CONNECT <port>` (without the newline).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let mut words = text.split_ascii_whitespace();
    if words.next()? != "CONNECT" {
        return None;
    }
    let port = words.next()?.parse().ok()?;
    words.next().is_none().then_some(port)
}

/// The answer a host program reads once the guest accepted: `OK <host_port>\n`.
pub fn ok_line(local_port: u32) -> String {
    format!("OK {local_port}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse_strictly() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT  4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT 1 2"), None);
        assert_eq!(parse_connect(b"connect 1"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }

    #[test]
    fn a_listener_with_a_full_backlog_refuses_at_once() {
        let dir = std::env::temp_dir().join(format!("tvsock-backlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let host = HostSide::bind(&dir.join("v.sock")).unwrap();
        let _listener = UnixListener::bind(dir.join("v.sock_9")).unwrap();
        let mut held = Vec::new();
        let err = loop {
            match host.connect_port(9) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 10_000, "the backlog never filled");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        assert!(host.connect_port(10).is_err(), "nobody listens on port 10");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_connect_line_is_read_across_partial_writes() {
        use std::io::Write;
        let (mut host, vmm) = UnixStream::pair().unwrap();
        let mut p = PendingConnect::new(vmm).unwrap();
        assert_eq!(p.read_line(), ConnectLine::NeedMore);
        host.write_all(b"CONN").unwrap();
        assert_eq!(p.read_line(), ConnectLine::NeedMore);
        host.write_all(b"ECT 1234\n").unwrap();
        assert_eq!(p.read_line(), ConnectLine::Port(1234));
    }

    #[test]
    fn an_endless_line_or_trailing_data_is_refused() {
        use std::io::Write;
        let (mut host, vmm) = UnixStream::pair().unwrap();
        let mut p = PendingConnect::new(vmm).unwrap();
        host.write_all(&[b'A'; 100]).unwrap();
        assert_eq!(p.read_line(), ConnectLine::Bad);
        let (mut host, vmm) = UnixStream::pair().unwrap();
        let mut p = PendingConnect::new(vmm).unwrap();
        host.write_all(b"CONNECT 1\nhello").unwrap();
        assert_eq!(p.read_line(), ConnectLine::Bad);
    }
}
