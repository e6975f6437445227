//! Registration. The acceptor thread reads each new connection's `Hello` under a deadline
//! (one short-lived thread per connection, so a slow or hostile client holds up no one),
//! refuses a wrong protocol version or guest size, and hands the connection to the
//! scanner. The scanner then finishes the registration in [`register`]: the share group's
//! pool, the peer's real pid, the engine's guest, and the `Welcome` with the pool attached.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tinyvmm_merge::host::GuestId;
use tinyvmm_merge::{Engine, GuestSpec};
use tinyvmm_merge_protocol::wire::{self, AgentMsg, DaemonMsg, Hello, PROTOCOL_VERSION};
use tinyvmm_sys::process::ProcessWatch;

use crate::control::Cmd;
use crate::fleet::{Conn, Fleet, POOL_LEN};

/// Largest guest the daemon registers (pages of 4 KiB: 4 TiB).
const MAX_GUEST_PAGES: u64 = 1 << 30;
/// How long a new connection has to send its whole hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest hello frame (its names are at most [`MAX_NAME_BYTES`] each).
const MAX_HELLO_BYTES: usize = 4096;
/// Connections whose hello is being read at once; more are closed at once.
const MAX_PENDING_HELLOS: usize = 64;

/// The acceptor thread: validates each connection's hello and passes it to the scanner.
/// Every connection's hello is read on a short-lived thread of its own, at most
/// [`MAX_PENDING_HELLOS`] at once; out of descriptors, it waits before accepting again
/// instead of spinning.
pub(crate) fn accept_loop(listener: UnixListener, tx: Sender<Cmd>) {
    let pending = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                tracing::warn!("cannot accept a connection: {e}; waiting");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(_) => continue,
        };
        if pending.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING_HELLOS {
            pending.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!("too many connections saying hello; closing one");
            continue;
        }
        let tx = tx.clone();
        let done = pending.clone();
        // A slow or hostile client must not hold up the next registration.
        let spawned = std::thread::Builder::new()
            .name("merged-hello".into())
            .spawn(move || {
                read_hello(stream, &tx);
                done.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Reads and checks one connection's hello (all of it within [`HELLO_TIMEOUT`]); a
/// valid one goes to the scanner.
fn read_hello(mut stream: UnixStream, tx: &Sender<Cmd>) {
    let deadline = Some(Instant::now() + HELLO_TIMEOUT);
    match wire::recv_bounded::<AgentMsg>(&mut stream, MAX_HELLO_BYTES, deadline) {
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
const MAX_NAME_BYTES: usize = crate::policy::MAX_GROUP_NAME_BYTES;

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
    // The VM process is who is on the other end of the socket, whatever `hello` says.
    let Some(peer) = tinyvmm_sys::socket::peer_cred(&stream)
        .ok()
        .filter(|c| c.pid > 0)
    else {
        return refuse(&mut stream, "cannot read the peer's credentials".into());
    };
    let pid = peer.pid;
    let uid = match tenant_uid(peer.uid, hello.run_as_uid) {
        Ok(uid) => uid,
        Err(why) => return refuse(&mut stream, why),
    };
    let (guests, pages) = fleet.registered_by(uid);
    if guests >= fleet.limits.guests || pages + hello.pages > fleet.limits.pages {
        return refuse(
            &mut stream,
            format!(
                "uid {uid} has {guests} guests of {pages} pages registered; the limits are {} guests and {} pages",
                fleet.limits.guests, fleet.limits.pages
            ),
        );
    }
    // The group is the daemon's to decide: the name asked for, within the VM's uid,
    // unless the share policy lets this uid share the group of that name.
    let group = fleet.policy.group_of(uid, &hello.share_group);
    let domain = match fleet.domain(&group) {
        Ok(d) => d,
        Err(e) => return refuse(&mut stream, format!("cannot create the pool: {e}")),
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
        refuse(&mut stream, e.to_string());
        // Its group's pool may have been made for it alone.
        fleet.close_unused_pools(&engine.guests());
        return;
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
        fleet.close_unused_pools(&engine.guests());
        return;
    }
    let _ = stream.set_read_timeout(Some(fleet.request_timeout));
    let _ = stream.set_write_timeout(Some(fleet.request_timeout));
    tracing::info!(
        guest = id.0,
        pid = hello.pid,
        uid,
        pages = hello.pages,
        %group,
        domain = domain.0,
        "guest registered"
    );
    fleet.conns.insert(
        id,
        Conn {
            stream,
            hello,
            uid,
            group,
            domain,
            process: ProcessWatch::new(pid),
        },
    );
}

/// The user a registration counts for: the peer's own uid, or the uid a root peer says its
/// VM process will drop to (`tinyvmm run --uid` registers before it drops). Another user
/// naming a uid not its own is refused: it could otherwise join any tenant's groups.
fn tenant_uid(peer_uid: u32, claimed: Option<u32>) -> Result<u32, String> {
    match claimed {
        None => Ok(peer_uid),
        Some(u) if u == peer_uid || peer_uid == 0 => Ok(u),
        Some(u) => Err(format!(
            "uid {peer_uid} may not register a VM for uid {u} (only root may, for a VMM that \
             drops to that uid)"
        )),
    }
}

fn next_guest_id() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_registers_for_another_uid() {
        assert_eq!(tenant_uid(1000, None), Ok(1000));
        assert_eq!(tenant_uid(1000, Some(1000)), Ok(1000));
        assert_eq!(tenant_uid(0, Some(65534)), Ok(65534));
        assert_eq!(tenant_uid(0, None), Ok(0));
        let e = tenant_uid(1000, Some(0)).unwrap_err();
        assert!(e.contains("may not register a VM for uid 0"), "{e}");
    }

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            pid: 1,
            name: "vm".into(),
            pages: 1024,
            share_group: "default".into(),
            vma_budget: 100,
            dirty_source: true,
            run_as_uid: None,
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
