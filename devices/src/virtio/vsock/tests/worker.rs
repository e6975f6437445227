//! The device as the transport drives it: activated with kick eventfds and an interrupt,
//! served by its own thread, reset and activated again.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::harness::*;
use crate::virtio::vsock::header::*;
use crate::virtio::vsock::Vsock;
use crate::virtio::{ActivateContext, VirtioDevice, VirtioInterrupt};

#[derive(Default)]
struct CountingInterrupt(AtomicUsize);

impl VirtioInterrupt for CountingInterrupt {
    fn signal_used_queue(&self, _index: u16) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn the_worker_thread_serves_both_directions_and_stops_on_reset() {
    type Mem = GuestMemoryMmap;
    let mem: &'static Mem = Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap(),
    ));
    let rxq = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
    let txq = MockSplitQueue::create(mem, GuestAddress(0x4000), QSIZE);
    let evq = MockSplitQueue::create(mem, GuestAddress(0x8000), QSIZE);
    let dir = socket_dir();
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let mut dev = Vsock::<Mem>::new(CID, &dir.join("v.sock")).unwrap();
    <Vsock<Mem> as VirtioDevice<Mem>>::start_worker(
        &mut dev,
        Box::new(move || {
            s.fetch_add(1, Ordering::SeqCst);
        }),
    )
    .unwrap();
    let irq = Arc::new(CountingInterrupt::default());
    let rx_kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let tx_kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let ctx = ActivateContext {
        mem: mem.clone(),
        queues: vec![
            (0, queue_of(&rxq), rx_kick.try_clone().unwrap()),
            (1, queue_of(&txq), tx_kick.try_clone().unwrap()),
            (2, queue_of(&evq), EventFd::new(0).unwrap()),
        ],
        interrupt: irq.clone(),
        writes: Arc::new(Recorded::default()),
        acked_features: 1 << 32,
    };
    <Vsock<Mem> as VirtioDevice<Mem>>::activate(&mut dev, ctx).unwrap();

    // RX buffers: 8 one-descriptor chains.
    for i in 0..8u16 {
        let d = raw(
            RX_BUFS + u64::from(i) * 0x2000,
            PKT_LEN + RX_DATA,
            VRING_DESC_F_WRITE as u16,
            0,
        );
        rxq.desc_table().store(i, d).unwrap();
        rxq.avail().ring().ref_at(i as usize).unwrap().store(i);
    }
    rxq.avail().idx().store(8);
    rx_kick.write(1).unwrap();

    // The host connects to guest port 52.
    let mut host = UnixStream::connect(dir.join("v.sock")).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    wait_for("the request", || used_idx(mem, &rxq) == 1);
    let req = read_header(mem, RX_BUFS);
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 52));

    // The guest accepts, then sends data, in one kick.
    let mut resp = Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: 52,
        dst_port: req.src_port,
        type_: TYPE_STREAM,
        op: OP_RESPONSE,
        buf_alloc: 1 << 20,
        ..Header::default()
    };
    write_header(mem, TX_BUFS, &resp);
    resp.op = OP_RW;
    resp.len = 5;
    write_header(mem, TX_BUFS + 0x1000, &resp);
    mem.write_slice(b"hello", GuestAddress(TX_BUFS + 0x1100))
        .unwrap();
    txq.desc_table()
        .store(0, raw(TX_BUFS, PKT_LEN, 0, 0))
        .unwrap();
    txq.desc_table()
        .store(
            1,
            raw(TX_BUFS + 0x1000, PKT_LEN, VRING_DESC_F_NEXT as u16, 2),
        )
        .unwrap();
    txq.desc_table()
        .store(2, raw(TX_BUFS + 0x1100, 5, 0, 0))
        .unwrap();
    txq.avail().ring().ref_at(0).unwrap().store(0);
    txq.avail().ring().ref_at(1).unwrap().store(1);
    txq.avail().idx().store(2);
    tx_kick.write(1).unwrap();
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.ends_with(b"hello") {
        let n = host.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, format!("OK {}\nhello", req.src_port).as_bytes());
    wait_for("TX used", || used_idx(mem, &txq) == 2);

    // Host to guest, noticed through epoll.
    host.write_all(b"world").unwrap();
    wait_for("the data", || used_idx(mem, &rxq) == 2);
    let h = read_header(mem, RX_BUFS + 0x2000);
    assert_eq!((h.op, h.len), (OP_RW, 5));
    let mut data = [0u8; 5];
    mem.read_slice(&mut data, GuestAddress(RX_BUFS + 0x2000 + 44))
        .unwrap();
    assert_eq!(&data, b"world");
    assert!(irq.0.load(Ordering::SeqCst) >= 2);
    assert_eq!(
        started.load(Ordering::SeqCst),
        1,
        "the start hook ran on the thread"
    );

    // Reset: the thread stops and the connection closes; the socket stays for the next
    // activation.
    assert!(<Vsock<Mem> as VirtioDevice<Mem>>::reset(&mut dev));
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    assert!(dir.join("v.sock").exists());
    // Activated again, it serves new queues (here: a request already waiting).
    let rxq2 = MockSplitQueue::create(mem, GuestAddress(0x8000), QSIZE);
    let txq2 = MockSplitQueue::create(mem, GuestAddress(0xc000), QSIZE);
    let req2 = Header {
        op: OP_REQUEST,
        src_port: 9,
        dst_port: 7,
        len: 0,
        ..resp
    };
    write_header(mem, TX_BUFS, &req2);
    txq2.desc_table()
        .store(0, raw(TX_BUFS, PKT_LEN, 0, 0))
        .unwrap();
    txq2.avail().ring().ref_at(0).unwrap().store(0);
    txq2.avail().idx().store(1);
    rxq2.desc_table()
        .store(
            0,
            raw(RX_BUFS, PKT_LEN + RX_DATA, VRING_DESC_F_WRITE as u16, 0),
        )
        .unwrap();
    rxq2.avail().ring().ref_at(0).unwrap().store(0);
    rxq2.avail().idx().store(1);
    let ctx = ActivateContext {
        mem: mem.clone(),
        queues: vec![
            (0, queue_of(&rxq2), EventFd::new(0).unwrap()),
            (1, queue_of(&txq2), EventFd::new(0).unwrap()),
        ],
        interrupt: irq.clone(),
        writes: Arc::new(Recorded::default()),
        acked_features: 1 << 32,
    };
    <Vsock<Mem> as VirtioDevice<Mem>>::activate(&mut dev, ctx).unwrap();
    wait_for("the reset of the second activation", || {
        used_idx(mem, &rxq2) == 1
    });
    assert_eq!(
        read_header(mem, RX_BUFS).op,
        OP_RST,
        "nobody serves host port 7"
    );
    drop(dev);
    assert!(!dir.join("v.sock").exists());
    let _ = UnixListener::bind(dir.join("v.sock")).unwrap();
}
