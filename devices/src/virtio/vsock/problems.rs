//! Out-of-spec input, counted, and logged once per kind so that a misbehaving guest or host
//! program cannot flood the VMM's log.

use super::header::Header;

/// The kinds of bad input the device answers with a reset or a drop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// A TX chain `virtio-vsock` could not parse (bad descriptors, `len` over the limit or
    /// over the buffer, memory outside RAM): dropped.
    BadTxChain,
    /// An RX chain it could not use: returned empty.
    BadRxChain,
    /// A packet with a source CID that is not the guest's, or a destination that is not
    /// the host: dropped.
    WrongCid,
    /// A socket type other than stream: reset.
    UnknownType,
    /// A packet for no open connection: reset.
    UnknownConnection,
    /// A connection reset for being out of protocol (see the log line).
    ConnectionReset,
    /// A connection refused: too many open.
    TooManyConnections,
    /// Resets owed to the guest beyond the bound: dropped.
    ResetsDropped,
    /// A queue the device could not read or write (bad ring addresses).
    BadQueue,
    /// The host refused something (an epoll registration, an interrupt).
    Host,
    /// The guest did not answer a host program's connection request in time: reset.
    ConnectTimeout,
}

impl Problem {
    const ALL: usize = 11;

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// How often each problem happened; each kind is logged the first time only.
#[derive(Debug, Default)]
pub struct Problems {
    seen: u32,
    counts: [u64; Problem::ALL],
}

impl Problems {
    /// Records one occurrence of `p` (about the packet `hdr`).
    pub fn note(&mut self, p: Problem, hdr: &Header) {
        self.record(p, || format!("{p:?}: {hdr:?}"));
    }

    /// Records a reset of a connection, saying why.
    pub fn note_reset(&mut self, why: &'static str, hdr: &Header) {
        self.record(Problem::ConnectionReset, || format!("{why}: {hdr:?}"));
    }

    /// Records a chain or queue problem with the error that describes it.
    pub fn note_error(&mut self, p: Problem, err: &dyn std::fmt::Display) {
        self.record(p, || format!("{p:?}: {err}"));
    }

    fn record(&mut self, p: Problem, what: impl FnOnce() -> String) {
        self.counts[p as usize] += 1;
        if self.seen & p.bit() == 0 {
            self.seen |= p.bit();
            tracing::warn!("virtio-vsock: {} (further ones not logged)", what());
        }
    }

    /// How often `p` happened.
    pub fn count(&self, p: Problem) -> u64 {
        self.counts[p as usize]
    }
}
