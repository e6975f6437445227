//! Chains a driver builds out of spec: each is returned unused (or dropped) and logged once,
//! never a panic, never a write outside the guest's buffers.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use super::harness::*;
use crate::virtio::vsock::header::*;
use crate::virtio::vsock::problems::Problem;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

fn tx_with(g: &mut MockGuest, hdr: Header, descs: &[(u16, virtio_queue::desc::RawDescriptor)]) {
    write_header(g.mem, TX_BUFS, &hdr);
    g.push_tx_descs(descs, descs[0].0);
    g.pump();
}

#[test]
fn a_header_outside_ram_is_dropped() {
    let mut g = MockGuest::new();
    g.push_tx_descs(&[(0, raw(RAM + 0x1000, PKT_LEN, 0, 0))], 0);
    g.push_tx_descs(&[(1, raw(RAM - 20, PKT_LEN, 0, 0))], 1);
    g.push_tx_descs(&[(2, raw(u64::MAX - 10, PKT_LEN, 0, 0))], 2);
    g.pump();
    assert_eq!(g.mux.problems.count(Problem::BadTxChain), 3);
    assert!(g.exchange().is_empty());
}

#[test]
fn a_len_larger_than_the_buffers_or_the_limit_is_dropped() {
    let mut g = MockGuest::new();
    let _l = std::os::unix::net::UnixListener::bind(g.port_path(5000)).unwrap();
    g.send(g.header(1, 5000, OP_REQUEST), &[]);
    let mut h = g.header(1, 5000, OP_RW);
    h.len = 1000;
    tx_with(
        &mut g,
        h,
        &[
            (0, raw(TX_BUFS, PKT_LEN, NEXT, 1)),
            (1, raw(TX_BUFS + 64, 10, 0, 0)),
        ],
    );
    h.len = 1 << 20;
    tx_with(
        &mut g,
        h,
        &[
            (0, raw(TX_BUFS, PKT_LEN, NEXT, 1)),
            (1, raw(TX_BUFS + 64, 1 << 20, 0, 0)),
        ],
    );
    // Data said to be there, but no data descriptor.
    h.len = 10;
    tx_with(&mut g, h, &[(0, raw(TX_BUFS, PKT_LEN, 0, 0))]);
    assert_eq!(g.mux.problems.count(Problem::BadTxChain), 3);
    assert_eq!(g.mux.connection((5000, 1)).unwrap().tx_buffered(), 0);
}

#[test]
fn a_descriptor_loop_ends() {
    let mut g = MockGuest::new();
    let mut h = g.header(1, 5000, OP_RW);
    h.len = 10;
    // 0 -> 1 -> 0 -> ...
    tx_with(
        &mut g,
        h,
        &[(0, raw(TX_BUFS, 8, NEXT, 1)), (1, raw(TX_BUFS, 8, NEXT, 0))],
    );
    // An RX chain that loops on itself.
    g.push_rx_descs(&[(0, raw(RX_BUFS, 8, WRITE | NEXT, 0))], 0);
    g.send(g.header(1, 7, OP_RW), b"x"); // owes a reset, so the RX chain is tried
    g.pump();
    assert!(g.mux.problems.count(Problem::BadTxChain) >= 1);
    assert_eq!(g.mux.problems.count(Problem::BadRxChain), 1);
}

#[test]
fn read_only_or_outside_ram_rx_buffers_are_returned_unused() {
    let mut g = MockGuest::new();
    g.send(g.header(1, 7, OP_RW), b"x"); // owes a reset
    g.push_rx_descs(&[(0, raw(RX_BUFS, 4096, 0, 0))], 0);
    g.push_rx_descs(&[(1, raw(RAM - 8, 4096, WRITE, 0))], 1);
    g.push_rx_descs(
        &[
            (2, raw(RX_BUFS, PKT_LEN, WRITE | NEXT, 3)),
            (3, raw(RAM + 4096, 4096, WRITE, 0)),
        ],
        2,
    );
    g.pump();
    assert_eq!(g.mux.problems.count(Problem::BadRxChain), 3);
    let rings = g.used_rings();
    assert!(
        g.writes.0.lock().unwrap().iter().all(|w| rings.contains(w)),
        "only the used rings were written"
    );
    assert_eq!(
        g.mux.resets_owed(),
        1,
        "the reset waits for a usable buffer"
    );
    assert_eq!(
        g.exchange().iter().map(|(h, _)| h.op).collect::<Vec<_>>(),
        [OP_RST]
    );
}
