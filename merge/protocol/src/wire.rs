//! The wire protocol between a VM process's merge agent and the merge daemon.
//!
//! A Unix stream socket carries frames: a little-endian `u32` length, then a postcard-encoded
//! message of at most [`MAX_FRAME`] bytes. The agent opens with [`AgentMsg::Hello`] (the
//! analogue of `madvise(MADV_SHAREABLE)` over its whole RAM); the daemon answers
//! [`DaemonMsg::Welcome`] with the domain's pool memfd attached (`SCM_RIGHTS`), or
//! [`DaemonMsg::Refused`]. From then on the daemon sends [`DaemonMsg::Request`]s and the agent
//! answers each with one [`AgentMsg::Reply`] carrying the same id; agents never speak
//! unprompted, so a readable socket between requests means the peer went away.
//! Anything malformed closes the connection.

use std::io::{Read, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::page::{Gfn, MergeOp, MergeResult, PageDigest, PageRun, UnmergeOutcome, ZeroOutcome};

/// Bumped on any incompatible change (2: [`Reply::Error`] carries a typed [`AgentError`];
/// 6: [`AgentStats::pages_reported`]).
pub const PROTOCOL_VERSION: u32 = 6;
/// Largest frame either side accepts (a digest batch of 64 Ki pages is ~1.5 MiB).
pub const MAX_FRAME: usize = 16 << 20;

/// What a VM process tells the daemon when it registers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the agent.
    pub version: u32,
    /// The VM process.
    pub pid: u32,
    /// A name for humans (the kernel path, or `--name`).
    pub name: String,
    /// Pages of merge-eligible guest RAM.
    pub pages: u64,
    /// The share group (merge domain) to join.
    pub share_group: String,
    /// Mappings this process may still create for merged runs.
    pub vma_budget: u32,
    /// Whether the agent tracks guest writes (KVM dirty log).
    pub dirty_source: bool,
    /// The user the VM process will run as, when it registers before dropping to it
    /// (`tinyvmm run --uid`): its share groups and limits are then that user's. The daemon
    /// takes this from a root peer only (root may become any user anyway) and refuses a
    /// registration in which another user claims a uid not its own.
    pub run_as_uid: Option<u32>,
}

/// Work the daemon asks of an agent: one batched round trip each (the merge engine's `MergeHost` calls).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Request {
    /// Digest these runs.
    Digest(Vec<PageRun>),
    /// Digest at most this many pages written since their last digest.
    DigestDirty(u32),
    /// Merge runs.
    Merge(Vec<MergeOp>),
    /// Reclaim these zero pages.
    ReclaimZero(Vec<Gfn>),
    /// Give these pages private memory again.
    Unmerge(Vec<Gfn>),
    /// Send a copy of these pages (at most [`MAX_READ_PAGES`] in all): the daemon writes new
    /// frames itself from them — an agent never writes the pool — and then asks the agent
    /// to join them, which byte-compares each page with its frame under write protection.
    ReadPages(Vec<PageRun>),
    /// Report the agent's statistics.
    Stats,
    /// Report where guest RAM is in the VM process ([`Reply::RamLayout`]), so that the
    /// daemon can read pages to populate straight from the process (`process_vm_readv`)
    /// instead of asking for copies. Only ever a hint: see the daemon's `direct.rs`.
    RamLayout,
}

/// Most pages one [`Request::ReadPages`] may ask for: 256 KiB of bytes, small enough that
/// neither side keeps large buffers around between requests (with 256 pages a batch, the
/// density bench's guests kept 0.7 MiB more each, for 5-10 % less merger CPU).
pub const MAX_READ_PAGES: u64 = 64;

/// Page contents on the wire: encoded as one byte string (not byte by byte).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageBytes(pub Vec<u8>);

impl Serialize for PageBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for PageBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = PageBytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("page bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<PageBytes, E> {
                Ok(PageBytes(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<PageBytes, E> {
                Ok(PageBytes(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// Statistics an agent keeps about its page work.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentStats {
    /// Write-protected batches since registration.
    pub protect_batches: u64,
    /// Median time a batch stayed write-protected, ns.
    pub protect_p50_ns: u64,
    /// 99th percentile of the same, ns.
    pub protect_p99_ns: u64,
    /// Longest, ns.
    pub protect_max_ns: u64,
    /// Guest writes that hit a write-protected page and waited (userfaultfd events).
    pub blocked_writes: u64,
    /// Mappings (lines of /proc/self/maps) of the VM process now.
    pub vma_count: u32,
    /// Pages the guest gave up through its balloon (free page reporting, inflation) and the
    /// agent dropped: they read zero and hold neither host memory nor a frame reference.
    pub pages_reported: u64,
}

/// An agent's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Reply {
    /// For `Digest`: one per page.
    Digests(Vec<PageDigest>),
    /// For `DigestDirty`: (page, digest) pairs, and whether more dirty pages remain.
    DirtyDigests(Vec<(Gfn, PageDigest)>, bool),
    /// For `Merge`: one per page.
    Merged(Vec<MergeResult>),
    /// For `ReclaimZero`: one per page.
    Zero(Vec<ZeroOutcome>),
    /// For `Unmerge`: one per page.
    Unmerged(Vec<UnmergeOutcome>),
    /// For `ReadPages`: the pages' bytes, 4096 per page, in request order.
    Pages(PageBytes),
    /// For `Stats`.
    Stats(AgentStats),
    /// The request could not be carried out; guest memory content is intact. What else
    /// holds, and what the daemon should do, depends on the error's kind.
    Error(AgentError),
    /// For `RamLayout`: guest RAM's ranges in the VM process, in page order, as (host
    /// virtual address, length in bytes).
    RamLayout(Vec<(u64, u64)>),
}

/// Why an agent could not carry out a request: a kind the daemon acts on, and a detail
/// for the log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {}", clip(detail))]
pub struct AgentError {
    /// What went wrong, in terms the daemon can act on.
    pub kind: AgentErrorKind,
    /// What failed (the system call and its error, or the page out of range), for humans.
    pub detail: String,
}

impl AgentError {
    /// An error of `kind` with `detail`.
    pub fn new(kind: AgentErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
}

/// The kinds of [`AgentError`], and what each promises about the guest's state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub enum AgentErrorKind {
    /// The request itself was wrong: it named pages outside the guest's RAM or frames
    /// outside the pool, or page work before a pool was sent. Nothing was changed. The
    /// daemon's view of this guest is wrong (or the daemon misbehaves): it drops the guest.
    BadRequest,
    /// A momentary shortage (EAGAIN, ENOMEM, EINTR, EBUSY) stopped the request before it
    /// changed anything: every page is mapped as before and the same request may be sent
    /// again. The daemon retries it a few times before giving up on the guest.
    Transient,
    /// The agent failed for good, or part-way through a request after it had already
    /// remapped some pages, so the daemon no longer knows which pages map which frames.
    /// The daemon drops the guest (its frames stay until its process exits); the agent
    /// registers again as a new guest.
    Fatal,
}

impl std::fmt::Display for AgentErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::BadRequest => "bad request",
            Self::Transient => "transient failure",
            Self::Fatal => "fatal failure",
        })
    }
}

/// At most this many bytes of a peer's text reach a log line.
pub const MAX_LOGGED_TEXT: usize = 256;

/// `text` cut to [`MAX_LOGGED_TEXT`] bytes (at a character boundary), so that a peer's
/// message never floods the log.
pub fn clip(text: &str) -> &str {
    if text.len() <= MAX_LOGGED_TEXT {
        return text;
    }
    let mut end = MAX_LOGGED_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl Reply {
    /// A one-line description for logs: the variant and how many results it carries, never
    /// the results themselves.
    pub fn summary(&self) -> String {
        match self {
            Reply::Digests(v) => format!("{} digests", v.len()),
            Reply::DirtyDigests(v, more) => format!("{} dirty digests (more: {more})", v.len()),
            Reply::Merged(v) => format!("{} merge results", v.len()),
            Reply::Zero(v) => format!("{} zero results", v.len()),
            Reply::Unmerged(v) => format!("{} unmerge results", v.len()),
            Reply::Pages(b) => format!("{} bytes of pages", b.0.len()),
            Reply::Stats(_) => "stats".into(),
            Reply::Error(e) => format!("error ({e})"),
            Reply::RamLayout(r) => format!("RAM layout of {} ranges", r.len()),
        }
    }
}

impl AgentMsg {
    /// A one-line description for logs, bounded whatever the message holds.
    pub fn summary(&self) -> String {
        match self {
            AgentMsg::Hello(h) => format!(
                "hello (pid {}, {} pages, group {:?})",
                h.pid,
                h.pages,
                clip(&h.share_group)
            ),
            AgentMsg::Reply { id, reply } => format!("reply to {id}: {}", reply.summary()),
        }
    }
}

/// Agent → daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum AgentMsg {
    /// Registration.
    Hello(Hello),
    /// The answer to request `id`.
    Reply {
        /// The request's id.
        id: u64,
        /// The answer.
        reply: Reply,
    },
}

/// Daemon → agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum DaemonMsg {
    /// Registered; the pool memfd (`pool_len` bytes) is attached.
    Welcome {
        /// The guest's id at the daemon.
        guest: u32,
        /// Size of the pool file the agent should map.
        pool_len: u64,
    },
    /// Registration refused.
    Refused(String),
    /// Work to do.
    Request {
        /// Echoed in the reply.
        id: u64,
        /// The work.
        request: Request,
    },
}

/// Errors on the wire.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed or closed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// A frame over [`MAX_FRAME`].
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// Undecodable bytes.
    #[error("malformed message: {0}")]
    Decode(String),
}

/// Sends `msg`, with `fd` attached if given.
pub fn send<T: Serialize>(
    stream: &mut UnixStream,
    msg: &T,
    fd: Option<RawFd>,
) -> Result<(), WireError> {
    // The length prefix is patched in after the body is encoded behind it: one buffer,
    // one copy of the message.
    let frame =
        postcard::to_extend(msg, vec![0u8; 4]).map_err(|e| WireError::Decode(e.to_string()))?;
    let mut frame = frame;
    let len = frame.len() - 4;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
    match fd {
        Some(fd) => {
            let sent = stream
                .send_with_fd(&frame[..], fd)
                .map_err(|e| WireError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
            stream.write_all(&frame[sent..])?;
        }
        None => stream.write_all(&frame)?,
    }
    Ok(())
}

/// Receives one message, and the fd attached to it if any.
pub fn recv<T: for<'de> Deserialize<'de>>(
    stream: &mut UnixStream,
) -> Result<(T, Option<OwnedFd>), WireError> {
    recv_bounded(stream, MAX_FRAME, None)
}

/// Receives one message of at most `max` bytes, all of it before `deadline` if one is
/// given: a peer that trickles bytes is cut off when the deadline passes, whatever the
/// socket's per-read timeout (which this sets, and leaves set, as it goes).
pub fn recv_bounded<T: for<'de> Deserialize<'de>>(
    stream: &mut UnixStream,
    max: usize,
    deadline: Option<Instant>,
) -> Result<(T, Option<OwnedFd>), WireError> {
    let mut len = [0u8; 4];
    set_timeout_until(stream, deadline)?;
    let (n, fd) = stream
        .recv_with_fd(&mut len)
        .map_err(|e| WireError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    let fd = fd.map(OwnedFd::from);
    if n == 0 {
        return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    read_all_before(stream, &mut len[n..], deadline)?;
    let size = u32::from_le_bytes(len) as usize;
    if size > max {
        return Err(WireError::TooLarge(size));
    }
    let mut body = vec![0u8; size];
    read_all_before(stream, &mut body, deadline)?;
    let msg = postcard::from_bytes(&body).map_err(|e| WireError::Decode(e.to_string()))?;
    Ok((msg, fd))
}

/// Sets the socket's read timeout to what is left until `deadline` (an error once it has
/// passed); without a deadline, leaves it as it is.
fn set_timeout_until(stream: &UnixStream, deadline: Option<Instant>) -> std::io::Result<()> {
    let Some(d) = deadline else { return Ok(()) };
    let left = d.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::ErrorKind::TimedOut.into());
    }
    stream.set_read_timeout(Some(left))
}

/// `read_exact`, with the deadline checked before every read.
fn read_all_before(
    stream: &mut UnixStream,
    mut buf: &mut [u8],
    deadline: Option<Instant>,
) -> std::io::Result<()> {
    while !buf.is_empty() {
        set_timeout_until(stream, deadline)?;
        match stream.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::{MergeOutcome, OpKind};

    #[test]
    fn messages_round_trip_with_an_fd() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let hello = AgentMsg::Hello(Hello {
            version: PROTOCOL_VERSION,
            pid: 42,
            name: "g".into(),
            pages: 65536,
            share_group: "default".into(),
            vma_budget: 60000,
            dirty_source: true,
            run_as_uid: None,
        });
        send(&mut a, &hello, None).unwrap();
        let (got, fd): (AgentMsg, _) = recv(&mut b).unwrap();
        assert_eq!(got, hello);
        assert!(fd.is_none());

        let file = std::fs::File::open("/proc/self/stat").unwrap();
        let welcome = DaemonMsg::Welcome {
            guest: 7,
            pool_len: 1 << 30,
        };
        send(
            &mut b,
            &welcome,
            Some(std::os::fd::AsRawFd::as_raw_fd(&file)),
        )
        .unwrap();
        let (got, fd): (DaemonMsg, _) = recv(&mut a).unwrap();
        assert_eq!(got, welcome);
        assert!(fd.is_some());

        let req = DaemonMsg::Request {
            id: 9,
            request: Request::Merge(vec![MergeOp {
                gfn: 10,
                len: 3,
                frame: 5,
                kind: OpKind::Join,
            }]),
        };
        send(&mut b, &req, None).unwrap();
        assert_eq!(recv::<DaemonMsg>(&mut a).unwrap().0, req);
        let rep = AgentMsg::Reply {
            id: 9,
            reply: Reply::Merged(vec![MergeResult {
                outcome: MergeOutcome::Merged,
                hash: 0,
            }]),
        };
        send(&mut a, &rep, None).unwrap();
        assert_eq!(recv::<AgentMsg>(&mut b).unwrap().0, rep);

        for kind in [
            AgentErrorKind::BadRequest,
            AgentErrorKind::Transient,
            AgentErrorKind::Fatal,
        ] {
            let rep = AgentMsg::Reply {
                id: 10,
                reply: Reply::Error(AgentError::new(kind, "page 9 of 8")),
            };
            send(&mut a, &rep, None).unwrap();
            assert_eq!(recv::<AgentMsg>(&mut b).unwrap().0, rep);
        }
    }

    #[test]
    fn log_summaries_are_bounded_whatever_the_peer_sends() {
        let huge = "é".repeat(1 << 20);
        let e = AgentError::new(AgentErrorKind::Fatal, huge.clone());
        assert!(e.to_string().len() < MAX_LOGGED_TEXT + 32);
        let msg = AgentMsg::Reply {
            id: 1,
            reply: Reply::Merged(vec![
                MergeResult {
                    outcome: MergeOutcome::Merged,
                    hash: 0,
                };
                1 << 16
            ]),
        };
        assert_eq!(msg.summary(), "reply to 1: 65536 merge results");
        let hello = AgentMsg::Hello(Hello {
            version: PROTOCOL_VERSION,
            pid: 1,
            name: huge.clone(),
            pages: 1,
            share_group: huge,
            vma_budget: 1,
            dirty_source: false,
            run_as_uid: None,
        });
        assert!(hello.summary().len() < MAX_LOGGED_TEXT + 64);
    }

    #[test]
    fn a_trickling_peer_is_cut_off_at_the_deadline() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            // A length of 8, then one byte every 50 ms.
            let _ = a.write_all(&8u32.to_le_bytes());
            for _ in 0..8 {
                std::thread::sleep(std::time::Duration::from_millis(50));
                if a.write_all(&[0]).is_err() {
                    break;
                }
            }
        });
        let start = Instant::now();
        let deadline = start + std::time::Duration::from_millis(120);
        let r = recv_bounded::<AgentMsg>(&mut b, 64, Some(deadline));
        assert!(
            matches!(r, Err(WireError::Io(ref e)) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)),
            "{r:?}"
        );
        assert!(start.elapsed() < std::time::Duration::from_millis(400));
        drop(b);
        t.join().unwrap();
        // A frame over the bound is refused before its body is read.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&4096u32.to_le_bytes()).unwrap();
        assert!(matches!(
            recv_bounded::<AgentMsg>(&mut b, 1024, None),
            Err(WireError::TooLarge(4096))
        ));
    }

    #[test]
    fn oversized_and_garbage_frames_are_rejected() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&(MAX_FRAME as u32 + 1).to_le_bytes()).unwrap();
        assert!(matches!(
            recv::<AgentMsg>(&mut b),
            Err(WireError::TooLarge(_))
        ));
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&3u32.to_le_bytes()).unwrap();
        a.write_all(&[0xff, 0xff, 0xff]).unwrap();
        assert!(matches!(
            recv::<AgentMsg>(&mut b),
            Err(WireError::Decode(_))
        ));
        drop(a);
        assert!(recv::<AgentMsg>(&mut b).is_err());
    }
}
