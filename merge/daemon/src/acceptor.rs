//! Registration. The acceptor thread reads each new connection's `Hello` under a deadline
//! (one short-lived thread per connection, so a slow or hostile client holds up no one),
//! refuses a wrong protocol version or guest size, and hands the connection to the
//! scanner. The scanner then finishes the registration in [`register`]: the share group's
//! pool, the peer's real pid, the engine's guest, and the `Welcome` with the pool attached.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::Sender;
use std::time::Duration;

use tinyvmm_merge::host::GuestId;
use tinyvmm_merge::{Engine, GuestSpec};
use tinyvmm_merge_protocol::wire::{self, AgentMsg, DaemonMsg, Hello, PROTOCOL_VERSION};
use tinyvmm_sys::process::ProcessWatch;

use crate::control::Cmd;
use crate::fleet::{Conn, Fleet, POOL_LEN};

/// Largest guest the daemon registers (pages of 4 KiB: 4 TiB).
const MAX_GUEST_PAGES: u64 = 1 << 30;
/// How long a new connection has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The acceptor thread: validates each connection's hello and passes it to the scanner.
pub(crate) fn accept_loop(listener: UnixListener, tx: Sender<Cmd>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let tx = tx.clone();
        // A slow or hostile client must not hold up the next registration.
        let _ = std::thread::Builder::new()
            .name("merged-hello".into())
            .spawn(move || read_hello(stream, &tx));
    }
}

/// Reads and checks one connection's hello; a valid one goes to the scanner.
fn read_hello(mut stream: UnixStream, tx: &Sender<Cmd>) {
    let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
    match wire::recv::<AgentMsg>(&mut stream) {
        Ok((AgentMsg::Hello(h), None)) => match check_hello(&h) {
            Err(why) => {
                tracing::warn!("registration refused: {why}");
                let _ = wire::send(&mut stream, &DaemonMsg::Refused(why.to_string()), None);
            }
            Ok(()) => {
                let _ = tx.send(Cmd::Register(Box::new(stream), h));
            }
        },
        Ok((other, _)) => {
            tracing::warn!(
                "connection closed: expected a hello, got {}",
                other.summary()
            );
        }
        Err(e) => tracing::warn!("connection closed: bad hello: {e}"),
    }
}

/// Why a hello is refused before it reaches the scanner (sent to the agent as text).
#[derive(Debug, thiserror::Error)]
enum HelloRefusal {
    /// The agent speaks another protocol version.
    #[error("protocol version {0} not supported (daemon speaks {PROTOCOL_VERSION})")]
    Version(u32),
    /// The guest is empty or larger than the daemon registers.
    #[error("guest size of {0} pages is out of range")]
    Size(u64),
    /// A name longer than the daemon keeps (and logs).
    #[error("{field} of {len} bytes is longer than {MAX_NAME_BYTES}")]
    TooLong {
        /// `name` or `share_group`.
        field: &'static str,
        /// Its length.
        len: usize,
    },
}

/// Longest guest name and share group name a hello may carry.
const MAX_NAME_BYTES: usize = 256;

fn check_hello(h: &Hello) -> Result<(), HelloRefusal> {
    if h.version != PROTOCOL_VERSION {
        Err(HelloRefusal::Version(h.version))
    } else if h.pages == 0 || h.pages > MAX_GUEST_PAGES {
        Err(HelloRefusal::Size(h.pages))
    } else if h.name.len() > MAX_NAME_BYTES {
        Err(HelloRefusal::TooLong {
            field: "name",
            len: h.name.len(),
        })
    } else if h.share_group.len() > MAX_NAME_BYTES {
        Err(HelloRefusal::TooLong {
            field: "share_group",
            len: h.share_group.len(),
        })
    } else {
        Ok(())
    }
}

/// The scanner's half of a registration: adds the guest to the engine and welcomes it
/// with its domain's pool, or refuses it.
pub(crate) fn register(
    mut stream: UnixStream,
    hello: Hello,
    engine: &mut Engine,
    fleet: &mut Fleet,
) {
    let refuse = |stream: &mut UnixStream, why: String| {
        tracing::warn!(pid = hello.pid, "registration refused: {why}");
        let _ = wire::send(stream, &DaemonMsg::Refused(why), None);
    };
    let domain = match fleet.domain(&hello.share_group) {
        Ok(d) => d,
        Err(e) => return refuse(&mut stream, format!("cannot create the pool: {e}")),
    };
    // The VM process is who is on the other end of the socket, whatever `hello` says.
    let pid = match peer_pid(&stream) {
        Some(pid) => pid,
        None => return refuse(&mut stream, "cannot read the peer's credentials".into()),
    };
    let hello = Hello { pid, ..hello };
    let id = GuestId(next_guest_id());
    let spec = GuestSpec {
        id,
        pages: hello.pages,
        domain,
        vma_budget: hello.vma_budget.max(1),
        has_dirty_source: hello.dirty_source,
    };
    if let Err(e) = engine.add_guest(spec) {
        return refuse(&mut stream, e.to_string());
    }
    // Agents get the pool read-only: only the daemon writes frames.
    let pool_fd = fleet.pools[&domain].readonly.as_raw_fd();
    let welcome = DaemonMsg::Welcome {
        guest: id.0,
        pool_len: POOL_LEN,
    };
    if let Err(e) = wire::send(&mut stream, &welcome, Some(pool_fd)) {
        tracing::warn!(pid = hello.pid, "cannot welcome the agent: {e}");
        let _ = engine.remove_guest(id, fleet);
        return;
    }
    let _ = stream.set_read_timeout(Some(fleet.request_timeout));
    let _ = stream.set_write_timeout(Some(fleet.request_timeout));
    tracing::info!(
        guest = id.0,
        pid = hello.pid,
        pages = hello.pages,
        group = %hello.share_group,
        "guest registered"
    );
    fleet.conns.insert(
        id,
        Conn {
            stream,
            hello,
            process: ProcessWatch::new(pid),
        },
    );
}

/// The pid of the process at the other end of a Unix socket (SO_PEERCRED).
fn peer_pid(stream: &UnixStream) -> Option<u32> {
    tinyvmm_sys::socket::peer_cred(stream)
        .ok()
        .map(|c| c.pid)
        .filter(|&pid| pid > 0)
}

fn next_guest_id() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            pid: 1,
            name: "vm".into(),
            pages: 1024,
            share_group: "default".into(),
            vma_budget: 100,
            dirty_source: true,
        }
    }

    #[test]
    fn hellos_out_of_bounds_are_refused() {
        assert!(check_hello(&hello()).is_ok());
        let cases = [
            Hello {
                version: PROTOCOL_VERSION + 1,
                ..hello()
            },
            Hello {
                pages: 0,
                ..hello()
            },
            Hello {
                pages: MAX_GUEST_PAGES + 1,
                ..hello()
            },
            Hello {
                name: "n".repeat(MAX_NAME_BYTES + 1),
                ..hello()
            },
            Hello {
                share_group: "g".repeat(MAX_NAME_BYTES + 1),
                ..hello()
            },
        ];
        for h in cases {
            let why = check_hello(&h).unwrap_err().to_string();
            assert!(why.len() < 200, "{why}");
        }
    }
}
