//! The connection table: routes the guest's packets to connections (opening the ones the
//! guest asks for), accepts host programs on the listening socket, and chooses what goes
//! into each RX buffer the guest gives.
//!
//! Everything a misbehaving guest or host can make the device hold is bounded: at most
//! [`MAX_CONNECTIONS`] connections (each with at most `BUF_ALLOC` bytes of guest data
//! waiting for its host socket), [`MAX_PENDING_CONNECTS`] host programs that have not sent
//! their `CONNECT` line, and [`MAX_RESETS`] resets owed for packets on no connection.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::connection::{Connection, Verdict};
use super::header::*;
use super::host::{ConnectLine, HostSide, PendingConnect};
use super::problems::{Problem, Problems};

/// The most connections at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// The most host programs that have not said which port they want.
pub const MAX_PENDING_CONNECTS: usize = 64;
/// The most resets owed for packets that belonged to no connection.
pub const MAX_RESETS: usize = 256;
/// How long the guest has to answer a host program's connection request (Firecracker's
/// figure); then the request is reset and the host program's socket closed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The first port the host side uses for connections host programs open.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A connection's key: (host port, guest port).
pub type Key = (u32, u32);

/// Registration changes the worker must make in its epoll set.
#[derive(Debug, PartialEq, Eq)]
pub enum FdChange {
    /// Watch a new connection's socket.
    AddConnection(RawFd),
    /// A pending host program became a connection (same descriptor, new role).
    Promote(RawFd),
    /// Watch a new pending host program.
    AddPending(RawFd),
    /// The descriptor is closed (its registration went with it).
    Gone(RawFd),
}

/// The connections of one device.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    conns: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    pending: HashMap<RawFd, PendingConnect>,
    ready: VecDeque<Key>,
    resets: VecDeque<Header>,
    next_local_port: u32,
    /// Problems seen (each logged once).
    pub problems: Problems,
    /// Registration changes since the worker last looked.
    pub fd_changes: Vec<FdChange>,
}

impl Muxer {
    /// An empty table for a guest with `guest_cid`.
    pub fn new(guest_cid: u64) -> Self {
        Muxer {
            guest_cid,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            ready: VecDeque::new(),
            resets: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            problems: Problems::default(),
            fd_changes: Vec::new(),
        }
    }

    /// The number of open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The connection with `key`, if open.
    pub fn connection(&self, key: Key) -> Option<&Connection> {
        self.conns.get(&key)
    }

    /// The sockets of the open connections.
    pub fn connection_fds(&self) -> Vec<RawFd> {
        self.by_fd.keys().copied().collect()
    }

    /// The sockets of host programs that have not sent their `CONNECT` line.
    pub fn pending_fds(&self) -> Vec<RawFd> {
        self.pending.keys().copied().collect()
    }

    /// The number of resets owed for packets on no connection.
    pub fn resets_owed(&self) -> usize {
        self.resets.len()
    }

    /// Handles one packet from the guest's TX queue.
    pub fn on_guest_packet<B: BitmapSlice>(
        &mut self,
        host: &HostSide,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            self.problems.note(Problem::WrongCid, hdr);
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.problems.note(Problem::UnknownType, hdr);
            self.owe_reset(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let Some(conn) = self.conns.get_mut(&key) else {
            self.on_unknown_connection(host, hdr);
            return;
        };
        match conn.on_guest_packet(hdr, data) {
            Verdict::Keep => self.mark_ready(key),
            Verdict::Forget => self.forget(key),
            Verdict::Reset(why) => {
                self.problems.note_reset(why, hdr);
                self.reset(key)
            }
            Verdict::Finished => self.reset(key),
        }
    }

    fn on_unknown_connection(&mut self, host: &HostSide, hdr: &Header) {
        match hdr.op {
            OP_RST => {}
            OP_REQUEST if self.conns.len() >= MAX_CONNECTIONS => {
                self.problems.note(Problem::TooManyConnections, hdr);
                self.owe_reset(hdr);
            }
            OP_REQUEST => match host.connect_port(hdr.dst_port) {
                Ok(stream) => {
                    let conn = Connection::from_guest(stream, hdr);
                    let fd = conn.stream.as_raw_fd();
                    let key = (conn.local_port, conn.peer_port);
                    self.conns.insert(key, conn);
                    self.by_fd.insert(fd, key);
                    self.fd_changes.push(FdChange::AddConnection(fd));
                    self.mark_ready(key);
                }
                Err(_) => self.owe_reset(hdr),
            },
            _ => {
                self.problems.note(Problem::UnknownConnection, hdr);
                self.owe_reset(hdr);
            }
        }
    }

    fn owe_reset(&mut self, hdr: &Header) {
        if hdr.op == OP_RST {
            return;
        }
        if self.resets.len() >= MAX_RESETS {
            self.problems.note(Problem::ResetsDropped, hdr);
            return;
        }
        self.resets.push_back(hdr.reset_reply());
    }

    /// Resets the connection towards the guest and forgets it.
    fn reset(&mut self, key: Key) {
        if self.resets.len() < MAX_RESETS {
            let hdr = Header::to_guest(self.guest_cid, key.0, key.1, OP_RST);
            self.resets.push_back(hdr);
        }
        self.forget(key);
    }

    fn forget(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_raw_fd();
            self.by_fd.remove(&fd);
            self.fd_changes.push(FdChange::Gone(fd));
        }
    }

    fn mark_ready(&mut self, key: Key) {
        if self.conns.get(&key).is_some_and(|c| c.wants_rx()) && !self.ready.contains(&key) {
            self.ready.push_back(key);
        }
    }

    /// Accepts every host program waiting on the listening socket.
    pub fn accept_host(&mut self, host: &HostSide) {
        while let Ok((stream, _)) = host.listener().accept() {
            if self.pending.len() >= MAX_PENDING_CONNECTS || self.conns.len() >= MAX_CONNECTIONS {
                self.problems
                    .note(Problem::TooManyConnections, &Header::default());
                continue;
            }
            if let Ok(p) = PendingConnect::new(stream) {
                let fd = p.stream.as_raw_fd();
                self.pending.insert(fd, p);
                self.fd_changes.push(FdChange::AddPending(fd));
                self.on_pending_readable(fd);
            }
        }
    }

    /// A host program that has not yet sent its `CONNECT` line sent something.
    pub fn on_pending_readable(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        match p.read_line() {
            ConnectLine::NeedMore => {}
            ConnectLine::Bad => {
                self.pending.remove(&fd);
                self.fd_changes.push(FdChange::Gone(fd));
            }
            ConnectLine::Port(peer_port) => {
                let p = self.pending.remove(&fd).unwrap_or_else(|| unreachable!());
                let local_port = self.allocate_local_port(peer_port);
                let key = (local_port, peer_port);
                self.conns
                    .insert(key, Connection::from_host(p.stream, local_port, peer_port));
                self.by_fd.insert(fd, key);
                self.fd_changes.push(FdChange::Promote(fd));
                self.mark_ready(key);
            }
        }
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    /// A connection's socket is readable (or hung up) and/or writable.
    pub fn on_connection_event(&mut self, fd: RawFd, readable: bool, writable: bool) {
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if readable {
            conn.on_readable();
        }
        if writable {
            match conn.on_writable() {
                Verdict::Keep => {}
                Verdict::Reset(why) => {
                    self.problems.note_reset(why, &Header::default());
                    return self.reset(key);
                }
                Verdict::Finished | Verdict::Forget => return self.reset(key),
            }
        }
        self.mark_ready(key);
    }

    /// Whether some host program waits for the guest's answer (the worker then wakes up
    /// periodically to [`Muxer::expire_requests`]).
    pub fn requests_pending(&self) -> bool {
        self.conns
            .values()
            .any(|c| c.state() == super::connection::State::HostRequested)
    }

    /// Resets the host programs' requests the guest left unanswered for
    /// [`CONNECT_TIMEOUT`] (as of `now`): the guest is told, the socket closed.
    pub fn expire_requests(&mut self, now: Instant) {
        let Some(cutoff) = now.checked_sub(CONNECT_TIMEOUT) else {
            return;
        };
        let expired: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.request_expired(cutoff))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.problems
                .note(Problem::ConnectTimeout, &Header::default());
            self.reset(key);
        }
    }

    /// Whether some connection may have something for the guest.
    pub fn has_rx(&self) -> bool {
        !self.resets.is_empty() || !self.ready.is_empty()
    }

    /// Chooses the next packet for the guest and writes its payload into `buf`: its header,
    /// or `None` if nothing is owed after all.
    pub fn next_rx<B: BitmapSlice>(
        &mut self,
        buf: Option<&VolatileSlice<'_, B>>,
    ) -> Option<Header> {
        if let Some(hdr) = self.resets.pop_front() {
            return Some(hdr);
        }
        for _ in 0..self.ready.len() {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            match conn.next_rx(self.guest_cid, buf) {
                Ok(Some(hdr)) => {
                    self.mark_ready(key);
                    return Some(hdr);
                }
                Ok(None) => self.mark_ready(key),
                Err(why) => {
                    self.problems.note_reset(why, &Header::default());
                    self.reset(key);
                    return self.resets.pop_front();
                }
            }
        }
        None
    }
}
