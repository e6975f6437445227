//! One stream connection between a guest port and a host Unix socket: its state machine and
//! the credit accounting both ways.
//!
//! Credit (virtio 1.2, 5.10.6.3): each side announces `buf_alloc` (its receive buffer for
//! the connection) and `fwd_cnt` (bytes it has consumed from it, ever). A sender may have at
//! most `buf_alloc - (sent - fwd_cnt)` bytes in flight.
//! - Guest → host: the device's buffer is `tx_buf`, the guest's bytes the host socket did not
//!   take yet; it never holds more than [`BUF_ALLOC`] bytes, because a guest that sends past
//!   its credit is reset. `fwd_cnt` counts bytes handed to the socket.
//! - Host → guest: the device reads the socket only into an RX buffer the guest gave and only
//!   as much as the guest's credit allows, so a host flood waits in the socket (the host
//!   program blocks), never in VMM memory.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::header::*;
use super::host::ok_line;

/// The receive buffer the device announces per connection (guest → host bytes in flight).
pub const BUF_ALLOC: u32 = 256 * 1024;

/// Once this many consumed bytes are unannounced, the device sends a credit update.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The host asked (`CONNECT`), the request went to the guest; waiting for its answer.
    HostRequested,
    /// Both sides may exchange data.
    Established,
}

/// What the guest's packet means for the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The connection goes on.
    Keep,
    /// The guest reset it: forget it (closing the host socket).
    Forget,
    /// The packet was out of protocol or the host socket failed: reset it towards the guest
    /// and forget it.
    Reset(&'static str),
    /// Both sides are done (the guest shut both directions, its data is delivered): reset
    /// it towards the guest, as the protocol ends a connection, and forget it.
    Finished,
}

/// Control packets owed to the guest.
#[derive(Clone, Copy, Debug, Default)]
struct Owed {
    request: bool,
    response: bool,
    shutdown: bool,
    credit_update: bool,
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// The host side of the connection.
    pub stream: UnixStream,
    /// The host's port.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    state: State,
    owed: Owed,
    /// Guest bytes the socket has not taken yet.
    tx_buf: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    announced_fwd_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    /// The socket may have data (edge-triggered: cleared only when a read would block).
    readable: bool,
    /// The host program closed its end (or its writing half).
    host_eof: bool,
    /// `SHUTDOWN_*` flags the guest sent.
    peer_shutdown: u32,
    /// Our writing half of the socket is shut.
    host_write_shut: bool,
    /// A credit request went to the guest since its last credit news.
    credit_requested: bool,
    /// When the host program's request was made (until the guest answers).
    requested_at: Option<Instant>,
}

impl Connection {
    /// A connection the host program asked for: a request is owed to the guest.
    pub fn from_host(stream: UnixStream, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, State::HostRequested);
        c.owed.request = true;
        c.requested_at = Some(Instant::now());
        c
    }

    /// A connection the guest asked for (`hdr`, its request) and the host program took: a
    /// response is owed to the guest.
    pub fn from_guest(stream: UnixStream, hdr: &Header) -> Self {
        let mut c = Self::new(stream, hdr.dst_port, hdr.src_port, State::Established);
        c.owed.response = true;
        c.note_peer_credit(hdr);
        c
    }

    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            owed: Owed::default(),
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            announced_fwd_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            readable: false,
            host_eof: false,
            peer_shutdown: 0,
            host_write_shut: false,
            credit_requested: false,
            requested_at: None,
        }
    }

    /// Whether the guest left the host program's request unanswered since before `cutoff`.
    pub fn request_expired(&self, cutoff: Instant) -> bool {
        self.state == State::HostRequested && self.requested_at.is_some_and(|t| t < cutoff)
    }

    /// The connection's state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Bytes the guest may still send to us.
    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// How many bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn note_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Handles a packet the guest sent on this connection (`data`: its payload, `hdr.len`
    /// bytes, present for `OP_RW`).
    pub fn on_guest_packet<B: BitmapSlice>(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Verdict {
        self.note_peer_credit(hdr);
        match hdr.op {
            OP_RST => Verdict::Forget,
            OP_REQUEST => Verdict::Reset("request on an open connection"),
            OP_RESPONSE => self.on_response(),
            OP_RW => self.on_data(data),
            OP_SHUTDOWN => self.on_shutdown(hdr.flags),
            OP_CREDIT_UPDATE => Verdict::Keep,
            OP_CREDIT_REQUEST => {
                self.owed.credit_update = true;
                Verdict::Keep
            }
            _ => Verdict::Reset("unknown operation"),
        }
    }

    fn on_response(&mut self) -> Verdict {
        if self.state != State::HostRequested {
            return Verdict::Reset("response without a request");
        }
        self.state = State::Established;
        // The line is a few bytes into a fresh socket's empty buffer; if even that does
        // not fit, the host program is gone.
        match (&self.stream).write(ok_line(self.local_port).as_bytes()) {
            Ok(n) if n == ok_line(self.local_port).len() => Verdict::Keep,
            _ => Verdict::Reset("host program gone before OK"),
        }
    }

    fn on_data<B: BitmapSlice>(&mut self, data: Option<&VolatileSlice<'_, B>>) -> Verdict {
        if self.state != State::Established || self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return Verdict::Reset("data on a connection not open for it");
        }
        let Some(data) = data else {
            return Verdict::Keep;
        };
        if self.tx_buf.len() + data.len() > BUF_ALLOC as usize {
            return Verdict::Reset("guest sent past its credit");
        }
        let was_waiting = !self.tx_buf.is_empty();
        let mut written = 0;
        if !was_waiting {
            match (&self.stream).write_volatile(data) {
                Ok(n) => written = n,
                Err(e) if io_kind(&e) == Some(io::ErrorKind::WouldBlock) => {}
                Err(_) => return Verdict::Reset("host socket write failed"),
            }
        }
        if written < data.len() {
            let mut rest = vec![0u8; data.len() - written];
            // The subslice lies within `data`, whose length we just measured.
            if let Ok(tail) = data.subslice(written, rest.len()) {
                tail.copy_to(&mut rest[..]);
            }
            self.tx_buf.extend(rest);
        }
        self.forwarded(written);
        if was_waiting {
            // Older bytes wait for the socket: it may have room by now.
            return self.on_writable();
        }
        Verdict::Keep
    }

    fn on_shutdown(&mut self, flags: u32) -> Verdict {
        self.peer_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        self.after_flush()
    }

    /// The socket can take data again: writes what the guest sent before.
    pub fn on_writable(&mut self) -> Verdict {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match (&self.stream).write(front) {
                Ok(0) => return Verdict::Reset("host socket closed"),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.forwarded(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Verdict::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Verdict::Reset("host socket write failed"),
            }
        }
        self.after_flush()
    }

    /// Once the guest's bytes are all written: honour its shutdown.
    fn after_flush(&mut self) -> Verdict {
        if !self.tx_buf.is_empty() {
            return Verdict::Keep;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.host_write_shut = true;
        }
        if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            return Verdict::Finished;
        }
        Verdict::Keep
    }

    fn forwarded(&mut self, n: usize) {
        self.fwd_cnt += n as u32;
        if (self.fwd_cnt - self.announced_fwd_cnt).0 >= CREDIT_UPDATE_THRESHOLD {
            self.owed.credit_update = true;
        }
    }

    /// The socket has data (or news: end of file, an error) to read.
    pub fn on_readable(&mut self) {
        self.readable = true;
    }

    /// Whether the connection has something for the guest's RX queue.
    pub fn wants_rx(&self) -> bool {
        let o = &self.owed;
        o.request
            || o.response
            || o.shutdown
            || o.credit_update
            || self.may_read_host()
            || self.blocked_on_credit()
    }

    /// Host data waits, the guest has no room and was not asked yet.
    fn blocked_on_credit(&self) -> bool {
        self.readable && self.may_send_data() && self.peer_credit() == 0 && !self.credit_requested
    }

    fn may_send_data(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    fn may_read_host(&self) -> bool {
        self.readable && self.may_send_data() && self.peer_credit() > 0
    }

    /// Fills one RX packet for the guest (`buf`: the packet's data buffer, if any): the
    /// header in `hdr` and the payload length, or `None` if there was nothing to send after
    /// all (the socket had no data).
    pub fn next_rx<B: BitmapSlice>(
        &mut self,
        guest_cid: u64,
        buf: Option<&VolatileSlice<'_, B>>,
    ) -> Result<Option<Header>, &'static str> {
        let op = if self.owed.request {
            self.owed.request = false;
            OP_REQUEST
        } else if self.owed.response {
            self.owed.response = false;
            OP_RESPONSE
        } else {
            if let Some(b) = buf.filter(|b| !b.is_empty() && self.may_read_host()) {
                let n = self.read_host(b)?;
                if n > 0 {
                    let mut hdr = self.header(guest_cid, OP_RW);
                    hdr.len = n;
                    self.rx_cnt += n;
                    return Ok(Some(hdr));
                }
            }
            if self.owed.shutdown {
                self.owed.shutdown = false;
                OP_SHUTDOWN
            } else if self.owed.credit_update {
                OP_CREDIT_UPDATE
            } else if self.blocked_on_credit() {
                // Ask once, then wait for the guest's news.
                self.credit_requested = true;
                OP_CREDIT_REQUEST
            } else {
                return Ok(None);
            }
        };
        let mut hdr = self.header(guest_cid, op);
        if op == OP_SHUTDOWN {
            hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        }
        Ok(Some(hdr))
    }

    /// A header from this connection, announcing our credit.
    fn header(&mut self, guest_cid: u64, op: u16) -> Header {
        self.owed.credit_update = false;
        self.announced_fwd_cnt = self.fwd_cnt;
        let mut hdr = Header::to_guest(guest_cid, self.local_port, self.peer_port, op);
        hdr.buf_alloc = BUF_ALLOC;
        hdr.fwd_cnt = self.fwd_cnt.0;
        hdr
    }

    /// Reads host data into `buf`, at most the guest's credit; 0 if none was there. At end
    /// of file a shutdown is owed instead.
    fn read_host<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<'_, B>,
    ) -> Result<u32, &'static str> {
        let n = (buf.len() as u32).min(self.peer_credit()) as usize;
        let mut dst = buf.subslice(0, n).map_err(|_| "rx buffer")?;
        loop {
            match (&self.stream).read_volatile(&mut dst) {
                Ok(0) => {
                    self.host_eof = true;
                    self.owed.shutdown = true;
                    return Ok(0);
                }
                Ok(k) => return Ok(k as u32),
                Err(e) if io_kind(&e) == Some(io::ErrorKind::WouldBlock) => {
                    self.readable = false;
                    return Ok(0);
                }
                Err(e) if io_kind(&e) == Some(io::ErrorKind::Interrupted) => {}
                Err(_) => return Err("host socket read failed"),
            }
        }
    }
}

/// The kind of an I/O error behind a volatile access error.
fn io_kind(e: &VolatileMemoryError) -> Option<io::ErrorKind> {
    match e {
        VolatileMemoryError::IOError(io) => Some(io.kind()),
        _ => None,
    }
}
