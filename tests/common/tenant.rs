//! Another user on the same host: a fake agent built on the project's protocol module that
//! registers with the real daemon under another uid and claims to hold the real test
//! guests' shared pages, and raw HTTP requests to the control API under that uid.
//!
//! The uid is switched on one thread only (raw `setresuid`/`setresgid` system calls change
//! the calling thread's credentials; glibc's wrappers would change every thread's), so the
//! test process itself stays root. The kernel records a socket peer's credentials when it
//! connects, so everything that thread connects to sees the other uid.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use tinyvmm_guests::content::{page_class, page_contents, PageClass};
use tinyvmm_merge_protocol::wire::{
    self, AgentError, AgentErrorKind, AgentMsg, AgentStats, DaemonMsg, Hello, PageBytes, Reply,
    Request, PROTOCOL_VERSION,
};
use tinyvmm_merge_protocol::{page_hash, MergeOutcome, MergeResult, PageDigest};

/// The test guests' shared content (`seed=1`, the default 60 % shared / 20 % zero mix):
/// the first `n` shared pages, page by page, as bytes.
pub fn shared_pages(n: usize) -> Vec<Vec<u8>> {
    (0u64..)
        .filter(|&i| page_class(1, i, 60, 20) == PageClass::Shared)
        .take(n)
        .map(|i| {
            page_contents(1, 0, PageClass::Shared, i, 0)
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect()
        })
        .collect()
}

/// Runs `f` on a thread whose credentials are `uid`:`uid` with no supplementary groups.
pub fn as_uid<T: Send + 'static>(
    uid: u32,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        // SAFETY: raw credential system calls on this thread only, with valid arguments.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                0
            );
            assert_eq!(libc::syscall(libc::SYS_setresgid, uid, uid, uid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        f()
    })
}

/// What the fake agent saw and did.
#[derive(Debug, Default)]
pub struct TenantReport {
    /// Inode and resident 512-byte blocks of the pool it received, at registration and at
    /// the end.
    pub pool_ino: u64,
    pub pool_blocks_end: u64,
    /// `Merge` requests, the pages they joined to frames the fake agent never provided,
    /// and of those, frames that held exactly the page it claimed (a frame of another
    /// guest's content).
    pub merge_requests: u64,
    pub joins: u64,
    pub joins_equal: u64,
    /// `ReadPages` requests (the daemon populating frames from this agent's own pages).
    pub read_requests: u64,
}

/// A fake agent of another uid: registers in `group` with `pages` pages that claim the
/// test guests' shared content, and serves the daemon's requests (a join succeeds only
/// where the frame really holds the claimed bytes) until its connection is shut down
/// through the returned handle.
pub struct Tenant {
    pub thread: std::thread::JoinHandle<TenantReport>,
    /// A clone of its connection, to end it.
    pub conn: UnixStream,
    /// The pool it received.
    pub pool: OwnedFd,
    /// Its guest id at the daemon.
    pub guest: u32,
}

impl Tenant {
    /// Registers (on a thread of `uid`) and starts serving.
    pub fn register(uid: u32, socket: &Path, group: &str, pages: usize) -> Tenant {
        let (tx, rx) = mpsc::channel();
        let socket: PathBuf = socket.to_path_buf();
        let group = group.to_string();
        let thread = as_uid(uid, move || {
            let content = shared_pages(pages);
            let mut s = UnixStream::connect(&socket).expect("connect as the other uid");
            let hello = AgentMsg::Hello(Hello {
                version: PROTOCOL_VERSION,
                pid: std::process::id(),
                name: format!("tenant-{uid}"),
                pages: pages as u64,
                share_group: group,
                vma_budget: 100_000,
                dirty_source: false,
                run_as_uid: None,
            });
            wire::send(&mut s, &hello, None).unwrap();
            let (msg, fd) = wire::recv::<DaemonMsg>(&mut s).unwrap();
            let DaemonMsg::Welcome { guest, .. } = msg else {
                panic!("not welcomed: {msg:?}");
            };
            let pool = std::fs::File::from(fd.expect("a pool with the welcome"));
            let mut report = TenantReport {
                pool_ino: stat(&pool).0,
                ..Default::default()
            };
            tx.send((
                s.try_clone().unwrap(),
                pool.try_clone().unwrap().into(),
                guest,
            ))
            .unwrap();
            serve(&mut s, &pool, &content, &mut report);
            report.pool_blocks_end = stat(&pool).1;
            report
        });
        let (conn, pool, guest) = rx.recv().expect("the tenant registered");
        Tenant {
            thread,
            conn,
            pool,
            guest,
        }
    }

    /// Ends the connection and returns what the fake agent saw.
    pub fn finish(self) -> TenantReport {
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        self.thread.join().expect("tenant thread")
    }
}

/// Inode and 512-byte blocks of a file.
pub fn stat(f: &impl AsRawFd) -> (u64, u64) {
    // SAFETY: fstat on an open descriptor into a zeroed stat.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        assert_eq!(libc::fstat(f.as_raw_fd(), &mut st), 0);
        (st.st_ino, st.st_blocks as u64)
    }
}

fn serve(s: &mut UnixStream, pool: &std::fs::File, content: &[Vec<u8>], r: &mut TenantReport) {
    while let Ok((DaemonMsg::Request { id, request }, _)) = wire::recv::<DaemonMsg>(s) {
        let page = |g: u64| content.get(g as usize);
        let reply = match request {
            Request::Digest(runs) => Reply::Digests(
                runs.iter()
                    .flat_map(|r| r.gfn..r.gfn + u64::from(r.len))
                    .map(|g| PageDigest {
                        hash: page(g).map_or(0, |p| page_hash(p)),
                        zero: false,
                        split: false,
                        dirty: None,
                    })
                    .collect(),
            ),
            Request::Merge(ops) => {
                r.merge_requests += 1;
                let mut out = Vec::new();
                for op in ops {
                    for k in 0..op.len {
                        r.joins += 1;
                        let mut frame = vec![0u8; 4096];
                        let at = u64::from(op.frame + k) * 4096;
                        let equal = pool.read_exact_at(&mut frame, at).is_ok()
                            && page(op.gfn + u64::from(k)) == Some(&frame);
                        r.joins_equal += u64::from(equal);
                        out.push(MergeResult {
                            outcome: if equal {
                                MergeOutcome::Merged
                            } else {
                                MergeOutcome::Mismatch
                            },
                            hash: 0,
                        });
                    }
                }
                Reply::Merged(out)
            }
            Request::ReadPages(runs) => {
                r.read_requests += 1;
                let mut bytes = Vec::new();
                for g in runs.iter().flat_map(|r| r.gfn..r.gfn + u64::from(r.len)) {
                    bytes.extend_from_slice(page(g).map_or(&[0u8; 4096][..], |p| p));
                }
                Reply::Pages(PageBytes(bytes))
            }
            Request::Stats => Reply::Stats(AgentStats::default()),
            other => Reply::Error(AgentError::new(
                AgentErrorKind::BadRequest,
                format!("the fake agent does not do {other:?}"),
            )),
        };
        if wire::send(s, &AgentMsg::Reply { id, reply }, None).is_err() {
            break;
        }
    }
}

/// `GET path` on the control API's Unix socket as the calling thread's user; the status
/// and the body parsed as JSON (or `Null`).
pub fn http_get(api: &Path, path: &str) -> (u16, serde_json::Value) {
    let mut s = UnixStream::connect(api).expect("connect to the API");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or_default())
}

/// `PUT path` with a JSON body on the control API's Unix socket as the calling thread's
/// user; the status. (A server that refuses the request before reading its body may close
/// the connection under the body: the answer is read whatever the write said.)
pub fn http_put(api: &Path, path: &str, body: &str) -> u16 {
    let mut s = UnixStream::connect(api).expect("connect to the API");
    let req = format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(req.as_bytes());
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}
