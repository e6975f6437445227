//! The connection protocol through the mock guest: both directions of connection setup,
//! data, credit, shutdown and reset, with real Unix sockets on the host side.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use super::harness::*;
use crate::virtio::vsock::connection::BUF_ALLOC;
use crate::virtio::vsock::header::*;
use crate::virtio::vsock::problems::Problem;

fn ops(pkts: &[(Header, Vec<u8>)]) -> Vec<u16> {
    pkts.iter().map(|(h, _)| h.op).collect()
}

/// The guest connects to host port 5000, served by a listener at `PATH_5000`.
fn guest_connected(g: &mut MockGuest) -> (UnixStream, Header) {
    let listener = UnixListener::bind(g.port_path(5000)).unwrap();
    let req = g.header(1234, 5000, OP_REQUEST);
    g.send(req, &[]);
    let got = g.exchange();
    assert_eq!(ops(&got), [OP_RESPONSE]);
    let (h, _) = got[0];
    assert_eq!(
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (HOST_CID, CID, 5000, 1234)
    );
    assert_eq!(h.buf_alloc, BUF_ALLOC);
    let (host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (host, req)
}

#[test]
fn guest_connects_to_a_host_port_and_data_flows_both_ways() {
    for layout in [RxLayout::OneDescriptor, RxLayout::TwoDescriptors] {
        let mut g = MockGuest::new();
        g.layout = layout;
        let (mut host, _) = guest_connected(&mut g);
        g.send(g.header(1234, 5000, OP_RW), b"ping from guest");
        let mut buf = [0u8; 15];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping from guest");
        host.write_all(b"pong from host").unwrap();
        let got = g.exchange();
        assert_eq!(ops(&got), [OP_RW]);
        assert_eq!(got[0].1, b"pong from host");
        assert_eq!(got[0].0.dst_port, 1234);
    }
}

#[test]
fn guest_request_to_a_port_nobody_serves_is_reset() {
    let mut g = MockGuest::new();
    g.send(g.header(1234, 6000, OP_REQUEST), &[]);
    let got = g.exchange();
    assert_eq!(ops(&got), [OP_RST]);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (6000, 1234));
    assert_eq!(g.mux.connections(), 0);
}

/// A host program connects with `CONNECT 52`; returns it and the request the guest got.
fn host_connecting(g: &mut MockGuest) -> (UnixStream, Header) {
    let mut host = UnixStream::connect(g.dir.join("v.sock")).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let got = g.exchange();
    assert_eq!(ops(&got), [OP_REQUEST]);
    let req = got[0].0;
    assert_eq!(
        (req.dst_cid, req.dst_port, req.type_),
        (CID, 52, TYPE_STREAM)
    );
    (host, req)
}

#[test]
fn host_connect_is_answered_ok_once_the_guest_accepts() {
    let mut g = MockGuest::new();
    let (mut host, req) = host_connecting(&mut g);
    let mut resp = g.header(52, req.src_port, OP_RESPONSE);
    resp.buf_alloc = 64 * 1024;
    g.send(resp, &[]);
    let mut line = [0u8; 64];
    let n = host.read(&mut line).unwrap();
    assert_eq!(&line[..n], format!("OK {}\n", req.src_port).as_bytes());
    host.write_all(b"hello guest").unwrap();
    let got = g.exchange();
    assert_eq!(ops(&got), [OP_RW]);
    assert_eq!(got[0].1, b"hello guest");
    g.send(g.header(52, req.src_port, OP_RW), b"hello host");
    let n = host.read(&mut line).unwrap();
    assert_eq!(&line[..n], b"hello host");
}

#[test]
fn host_connect_to_a_port_the_guest_refuses_is_closed() {
    let mut g = MockGuest::new();
    let (mut host, req) = host_connecting(&mut g);
    g.send(req.reset_reply(), &[]);
    let mut buf = [0u8; 8];
    assert_eq!(
        host.read(&mut buf).unwrap(),
        0,
        "the host program sees end of file"
    );
    assert_eq!(g.mux.connections(), 0);
}

#[test]
fn a_request_the_guest_leaves_unanswered_is_reset_after_the_timeout() {
    use crate::virtio::vsock::muxer::CONNECT_TIMEOUT;
    use std::time::Instant;
    let mut g = MockGuest::new();
    let (mut host, req) = host_connecting(&mut g);
    assert!(g.mux.requests_pending());
    g.mux.expire_requests(Instant::now());
    assert_eq!(g.mux.connections(), 1, "not yet");
    g.mux
        .expire_requests(Instant::now() + CONNECT_TIMEOUT + Duration::from_millis(1));
    assert_eq!(g.mux.connections(), 0);
    assert!(!g.mux.requests_pending());
    assert_eq!(
        host.read(&mut [0u8; 8]).unwrap(),
        0,
        "the host program sees end of file"
    );
    let got = g.exchange();
    assert_eq!(ops(&got), [OP_RST], "the guest is told");
    assert_eq!(got[0].0.src_port, req.src_port);
}

#[test]
fn a_bad_connect_line_closes_the_host_program() {
    let mut g = MockGuest::new();
    let mut host = UnixStream::connect(g.dir.join("v.sock")).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"HELLO 52\n").unwrap();
    assert!(g.exchange().is_empty());
    assert_eq!(host.read(&mut [0u8; 8]).unwrap(), 0);
    assert!(g.mux.pending_fds().is_empty());
}

#[test]
fn a_host_flood_waits_for_the_guests_credit() {
    let mut g = MockGuest::new();
    let (host, req) = host_connecting(&mut g);
    let mut resp = g.header(52, req.src_port, OP_RESPONSE);
    resp.buf_alloc = 10_000;
    g.send(resp, &[]);
    host.set_nonblocking(true).unwrap();
    // The host writes as much as its socket takes.
    let chunk = vec![7u8; 64 * 1024];
    let mut sent = 0usize;
    while let Ok(n) = (&host).write(&chunk) {
        sent += n;
    }
    assert!(sent > 20_000);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.extend(g.exchange());
    }
    let data: usize = got
        .iter()
        .filter(|(h, _)| h.op == OP_RW)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(
        data, 10_000,
        "no more than the guest's buf_alloc before it forwards"
    );
    assert_eq!(
        got.iter()
            .filter(|(h, _)| h.op == OP_CREDIT_REQUEST)
            .count(),
        1
    );
    // The guest consumed 4 000 bytes: 4 000 more may come.
    let mut update = g.header(52, req.src_port, OP_CREDIT_UPDATE);
    update.buf_alloc = 10_000;
    update.fwd_cnt = 4_000;
    g.send(update, &[]);
    let more: usize = g
        .exchange()
        .iter()
        .filter(|(h, _)| h.op == OP_RW)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(more, 4_000);
}

#[test]
fn a_guest_sending_past_its_credit_is_reset() {
    let mut g = MockGuest::new();
    let (_host, _) = guest_connected(&mut g);
    // The host program never reads: its socket fills, then the device's buffer.
    let chunk = vec![1u8; 64 * 1024];
    let mut reset = false;
    for _ in 0..64 {
        g.send(g.header(1234, 5000, OP_RW), &chunk);
        if g.mux.connections() == 0 {
            reset = true;
            break;
        }
        let buffered = g.mux.connection((5000, 1234)).unwrap().tx_buffered();
        assert!(buffered <= BUF_ALLOC as usize);
    }
    assert!(reset, "the connection was reset");
    assert!(ops(&g.exchange()).contains(&OP_RST));
    assert_eq!(g.mux.problems.count(Problem::ConnectionReset), 1);
}

#[test]
fn the_device_announces_credit_as_the_host_program_reads() {
    let mut g = MockGuest::new();
    let (mut host, _) = guest_connected(&mut g);
    let chunk = vec![2u8; 64 * 1024];
    let mut buf = vec![0u8; 64 * 1024];
    let mut announced = 0u32;
    for _ in 0..8 {
        g.send(g.header(1234, 5000, OP_RW), &chunk);
        host.read_exact(&mut buf).unwrap();
        g.pump();
        for (h, _) in g.exchange() {
            assert_eq!(h.op, OP_CREDIT_UPDATE);
            announced = h.fwd_cnt;
        }
    }
    assert!(
        announced >= 6 * 64 * 1024,
        "credit updates keep the guest going ({announced})"
    );
}

#[test]
fn guest_shutdown_closes_the_host_side_and_ends_with_a_reset() {
    let mut g = MockGuest::new();
    let (mut host, _) = guest_connected(&mut g);
    let mut sd = g.header(1234, 5000, OP_SHUTDOWN);
    sd.flags = SHUTDOWN_SEND;
    g.send(sd, &[]);
    assert_eq!(
        host.read(&mut [0u8; 8]).unwrap(),
        0,
        "the host program sees end of file"
    );
    assert_eq!(g.mux.connections(), 1, "the guest may still receive");
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(sd, &[]);
    assert_eq!(ops(&g.exchange()), [OP_RST]);
    assert_eq!(g.mux.connections(), 0);
}

#[test]
fn host_close_is_a_shutdown_and_the_guests_reset_forgets_the_connection() {
    let mut g = MockGuest::new();
    let (mut host, _) = guest_connected(&mut g);
    host.write_all(b"last words").unwrap();
    drop(host);
    let got = g.exchange();
    assert_eq!(ops(&got), [OP_RW, OP_SHUTDOWN]);
    assert_eq!(got[0].1, b"last words");
    assert_eq!(got[1].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    g.send(g.header(1234, 5000, OP_RST), &[]);
    assert_eq!(g.mux.connections(), 0);
    assert!(g.exchange().is_empty(), "a reset is not answered");
}

#[test]
fn credit_request_is_answered_with_an_update() {
    let mut g = MockGuest::new();
    let _conn = guest_connected(&mut g);
    g.send(g.header(1234, 5000, OP_CREDIT_REQUEST), &[]);
    let got = g.exchange();
    assert_eq!(ops(&got), [OP_CREDIT_UPDATE]);
    assert_eq!(got[0].0.buf_alloc, BUF_ALLOC);
}

#[test]
fn out_of_protocol_packets_are_reset_or_dropped() {
    let mut g = MockGuest::new();
    let _conn = guest_connected(&mut g);
    // Data on no connection: reset.
    g.send(g.header(999, 5000, OP_RW), b"x");
    assert_eq!(ops(&g.exchange()), [OP_RST]);
    // A reset on no connection: nothing.
    g.send(g.header(999, 5000, OP_RST), &[]);
    assert!(g.exchange().is_empty());
    // Wrong source CID: dropped.
    let mut h = g.header(1234, 5000, OP_RW);
    h.src_cid = 77;
    g.send(h, b"x");
    assert!(g.exchange().is_empty());
    // Datagram type: reset.
    let mut h = g.header(1234, 5000, OP_REQUEST);
    h.type_ = 2;
    g.send(h, &[]);
    assert_eq!(ops(&g.exchange()), [OP_RST]);
    // Unknown op on an open connection: reset, connection gone.
    g.send(g.header(1234, 5000, 99), &[]);
    assert_eq!(ops(&g.exchange()), [OP_RST]);
    assert_eq!(g.mux.connections(), 0);
    assert_eq!(g.mux.problems.count(Problem::WrongCid), 1);
    assert_eq!(g.mux.problems.count(Problem::UnknownType), 1);
    assert_eq!(g.mux.problems.count(Problem::UnknownConnection), 1);
}

#[test]
fn a_second_request_on_an_open_connection_resets_it() {
    let mut g = MockGuest::new();
    let (mut host, req) = guest_connected(&mut g);
    g.send(req, &[]);
    assert_eq!(ops(&g.exchange()), [OP_RST]);
    assert_eq!(host.read(&mut [0u8; 8]).unwrap(), 0);
}

#[test]
fn resets_owed_to_a_guest_without_rx_buffers_are_bounded() {
    let mut g = MockGuest::new();
    for port in 0..2000 {
        g.send(g.header(port, 5000, OP_RW), b"x");
    }
    assert!(g.mux.resets_owed() <= crate::virtio::vsock::muxer::MAX_RESETS);
    assert!(g.mux.problems.count(Problem::ResetsDropped) > 0);
}

#[test]
fn rx_writes_are_reported_where_they_landed() {
    for layout in [RxLayout::OneDescriptor, RxLayout::TwoDescriptors] {
        let mut g = MockGuest::new();
        g.layout = layout;
        let (mut host, _) = guest_connected(&mut g);
        g.writes.0.lock().unwrap().clear();
        host.write_all(&[5u8; 100]).unwrap();
        let got = g.exchange();
        assert_eq!(ops(&got), [OP_RW]);
        let rings = g.used_rings();
        let w: Vec<(u64, u64)> = g.writes.0.lock().unwrap().clone();
        // The used ring's write is reported too.
        assert!(w.contains(&rings[0]), "{w:x?}");
        let w: Vec<(u64, u64)> = w.into_iter().filter(|r| !rings.contains(r)).collect();
        // The buffer's slot: RX buffers start at RX_BUFS, 0x2000 apart.
        let base = w[0].0;
        assert_eq!((base - RX_BUFS) % 0x2000, 0, "{w:x?}");
        match layout {
            RxLayout::OneDescriptor => assert_eq!(w, [(base, 144)]),
            RxLayout::TwoDescriptors => assert_eq!(w, [(base, 44), (base + 64, 100)]),
        }
    }
}

#[test]
fn config_space_is_the_guest_cid_and_reserved_cids_are_refused() {
    use crate::virtio::vsock::{Vsock, VsockError};
    use crate::virtio::VirtioDevice;
    type Mem = vm_memory::GuestMemoryMmap;
    let dir = socket_dir();
    assert!(matches!(
        Vsock::<Mem>::new(2, &dir.join("a.sock")),
        Err(VsockError::ReservedCid(2))
    ));
    let dev = Vsock::<Mem>::new(0x1_0000_0003, &dir.join("a.sock"));
    assert!(matches!(dev, Err(VsockError::ReservedCid(_))));
    let dev = Vsock::<Mem>::new(42, &dir.join("a.sock")).unwrap();
    let mut cfg = [0xffu8; 12];
    <Vsock<Mem> as VirtioDevice<Mem>>::read_config(&dev, 0, &mut cfg);
    assert_eq!(cfg, [42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    <Vsock<Mem> as VirtioDevice<Mem>>::read_config(&dev, u64::MAX, &mut cfg[..4]);
    assert_eq!(&cfg[..4], [0; 4]);
    assert_eq!(<Vsock<Mem> as VirtioDevice<Mem>>::device_type(&dev), 19);
    let err = Vsock::<Mem>::new(42, &dir.join("a.sock")).err().unwrap();
    assert!(err.to_string().contains("cannot bind"), "{err}");
    drop(dev);
    assert!(
        !dir.join("a.sock").exists(),
        "the socket is removed with the device"
    );
}
