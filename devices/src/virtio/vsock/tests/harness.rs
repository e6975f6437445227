//! A mock guest driver over virtio-queue's `MockSplitQueue`: it places packets on the TX
//! queue, offers RX buffers and reads what the device put on the used ring, with the
//! device's queue processing and connection table driven by hand (no thread, no epoll).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::super::header::*;
use super::super::host::HostSide;
use super::super::muxer::Muxer;
use super::super::queues::VsockQueues;
use crate::virtio::GuestWrites;

/// Guest RAM of the mock guest.
pub const RAM: u64 = 4 << 20;
/// Queue size of both mock queues.
pub const QSIZE: u16 = 64;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x4000;
/// RX buffers: slot `s` at `RX_BUFS + s * RX_SLOT` (header + 4 KiB).
pub const RX_BUFS: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x2000;
/// The data part of an RX buffer.
pub const RX_DATA: u32 = 4096;
const RX_SLOTS: u16 = QSIZE / 2;
/// TX buffers: slot `s` at `TX_BUFS + s * TX_SLOT` (header + 64 KiB).
pub const TX_BUFS: u64 = 0x20_0000;
const TX_SLOT: u64 = 0x1_1000;
const TX_SLOTS: u64 = 16;
/// The guest's CID.
pub const CID: u64 = 3;

/// Every `GuestWrites::wrote` call.
#[derive(Default)]
pub struct Recorded(pub Mutex<Vec<(u64, u64)>>);

impl GuestWrites for Recorded {
    fn wrote(&self, gpa: u64, len: u64) {
        self.0.lock().unwrap().push((gpa, len));
    }
}

/// Writes a packet header at `addr`.
pub fn write_header(mem: &GuestMemoryMmap, addr: u64, h: &Header) {
    let a = |off: u64| GuestAddress(addr + off);
    mem.write_obj(h.src_cid.to_le(), a(0)).unwrap();
    mem.write_obj(h.dst_cid.to_le(), a(8)).unwrap();
    mem.write_obj(h.src_port.to_le(), a(16)).unwrap();
    mem.write_obj(h.dst_port.to_le(), a(20)).unwrap();
    mem.write_obj(h.len.to_le(), a(24)).unwrap();
    mem.write_obj(h.type_.to_le(), a(28)).unwrap();
    mem.write_obj(h.op.to_le(), a(30)).unwrap();
    mem.write_obj(h.flags.to_le(), a(32)).unwrap();
    mem.write_obj(h.buf_alloc.to_le(), a(36)).unwrap();
    mem.write_obj(h.fwd_cnt.to_le(), a(40)).unwrap();
}

/// Reads a packet header at `addr`.
pub fn read_header(mem: &GuestMemoryMmap, addr: u64) -> Header {
    let a = |off: u64| GuestAddress(addr + off);
    Header {
        src_cid: u64::from_le(mem.read_obj(a(0)).unwrap()),
        dst_cid: u64::from_le(mem.read_obj(a(8)).unwrap()),
        src_port: u32::from_le(mem.read_obj(a(16)).unwrap()),
        dst_port: u32::from_le(mem.read_obj(a(20)).unwrap()),
        len: u32::from_le(mem.read_obj(a(24)).unwrap()),
        type_: u16::from_le(mem.read_obj(a(28)).unwrap()),
        op: u16::from_le(mem.read_obj(a(30)).unwrap()),
        flags: u32::from_le(mem.read_obj(a(32)).unwrap()),
        buf_alloc: u32::from_le(mem.read_obj(a(36)).unwrap()),
        fwd_cnt: u32::from_le(mem.read_obj(a(40)).unwrap()),
    }
}

/// A fresh directory for sockets.
pub fn socket_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tvsock-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// How the mock guest lays out its RX buffers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RxLayout {
    /// Header and data in one descriptor (Linux 6.2 and later).
    OneDescriptor,
    /// A header descriptor, then a data descriptor.
    TwoDescriptors,
}

/// The mock guest and the device's processing.
pub struct MockGuest {
    /// Guest RAM (leaked: the mock queues borrow it for the test's duration).
    pub mem: &'static GuestMemoryMmap,
    rxq: MockSplitQueue<'static, GuestMemoryMmap>,
    txq: MockSplitQueue<'static, GuestMemoryMmap>,
    rx_avail: u16,
    rx_used_seen: u16,
    tx_avail: u16,
    tx_sent: u64,
    free_rx: Vec<u16>,
    /// RX layout.
    pub layout: RxLayout,
    /// The device's queues.
    pub queues: VsockQueues<GuestMemoryMmap>,
    /// The device's connection table.
    pub mux: Muxer,
    /// The device's host side.
    pub host: HostSide,
    /// The socket directory.
    pub dir: PathBuf,
    /// Writes the device reported.
    pub writes: Arc<Recorded>,
}

impl MockGuest {
    /// A guest with empty queues and the device's socket at `dir/v.sock`.
    pub fn new() -> Self {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap(),
        ));
        let rxq = MockSplitQueue::create(mem, GuestAddress(RX_RING), QSIZE);
        let txq = MockSplitQueue::create(mem, GuestAddress(TX_RING), QSIZE);
        let writes = Arc::new(Recorded::default());
        let queues = VsockQueues {
            mem: mem.clone(),
            rx: queue_of(&rxq),
            tx: queue_of(&txq),
            writes: writes.clone(),
        };
        let dir = socket_dir();
        let host = HostSide::bind(&dir.join("v.sock")).unwrap();
        MockGuest {
            mem,
            rxq,
            txq,
            rx_avail: 0,
            rx_used_seen: 0,
            tx_avail: 0,
            tx_sent: 0,
            free_rx: (0..RX_SLOTS).rev().collect(),
            layout: RxLayout::OneDescriptor,
            queues,
            mux: Muxer::new(CID),
            host,
            dir,
            writes,
        }
    }

    /// The host-side path for host port `port`.
    pub fn port_path(&self, port: u32) -> PathBuf {
        self.dir.join(format!("v.sock_{port}"))
    }

    /// Places raw descriptors (a whole chain, `head` first) at table index `at` and makes
    /// `head` available on the TX queue.
    pub fn push_tx_descs(&mut self, descs: &[(u16, RawDescriptor)], head: u16) {
        for (i, d) in descs {
            self.txq.desc_table().store(*i, *d).unwrap();
        }
        let slot = self.tx_avail % QSIZE;
        self.txq
            .avail()
            .ring()
            .ref_at(slot as usize)
            .unwrap()
            .store(head.to_le());
        self.tx_avail = self.tx_avail.wrapping_add(1);
        self.txq.avail().idx().store(self.tx_avail.to_le());
    }

    /// Places raw descriptors on the RX queue the same way.
    pub fn push_rx_descs(&mut self, descs: &[(u16, RawDescriptor)], head: u16) {
        for (i, d) in descs {
            self.rxq.desc_table().store(*i, *d).unwrap();
        }
        let slot = self.rx_avail % QSIZE;
        self.rxq
            .avail()
            .ring()
            .ref_at(slot as usize)
            .unwrap()
            .store(head.to_le());
        self.rx_avail = self.rx_avail.wrapping_add(1);
        self.rxq.avail().idx().store(self.rx_avail.to_le());
    }

    /// The used rings (the only guest memory outside the RX buffers the device writes).
    pub fn used_rings(&self) -> [(u64, u64); 2] {
        let len = 6 + 8 * u64::from(QSIZE);
        [(used_addr(&self.rxq), len), (used_addr(&self.txq), len)]
    }

    /// Sends one packet (header, then data in a second descriptor) and lets the device
    /// process the TX queue.
    pub fn send(&mut self, hdr: Header, data: &[u8]) {
        let slot = self.tx_sent % TX_SLOTS;
        self.tx_sent += 1;
        let base = TX_BUFS + slot * TX_SLOT;
        let mut hdr = hdr;
        hdr.len = data.len() as u32;
        write_header(self.mem, base, &hdr);
        let d0 = (2 * slot) as u16;
        if data.is_empty() {
            self.push_tx_descs(&[(d0, raw(base, PKT_LEN, 0, 0))], d0);
        } else {
            self.mem.write_slice(data, GuestAddress(base + 64)).unwrap();
            let descs = [
                (d0, raw(base, PKT_LEN, VRING_DESC_F_NEXT as u16, d0 + 1)),
                (d0 + 1, raw(base + 64, data.len() as u32, 0, 0)),
            ];
            self.push_tx_descs(&descs, d0);
        }
        self.queues.process_tx(&mut self.mux, &self.host);
    }

    /// A packet from the guest's `src_port` to host port `dst_port`.
    pub fn header(&self, src_port: u32, dst_port: u32, op: u16) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1 << 20,
            ..Header::default()
        }
    }

    /// Offers up to `n` RX buffers.
    pub fn offer_rx(&mut self, n: usize) {
        for _ in 0..n {
            let Some(slot) = self.free_rx.pop() else {
                return;
            };
            let base = RX_BUFS + u64::from(slot) * RX_SLOT;
            let d0 = 2 * slot;
            let w = VRING_DESC_F_WRITE as u16;
            match self.layout {
                RxLayout::OneDescriptor => {
                    self.push_rx_descs(&[(d0, raw(base, PKT_LEN + RX_DATA, w, 0))], d0)
                }
                RxLayout::TwoDescriptors => {
                    let descs = [
                        (d0, raw(base, PKT_LEN, w | VRING_DESC_F_NEXT as u16, d0 + 1)),
                        (d0 + 1, raw(base + 64, RX_DATA, w, 0)),
                    ];
                    self.push_rx_descs(&descs, d0)
                }
            }
        }
    }

    /// Tells the device every connection's socket may be readable and writable (the worker
    /// learns it from epoll), accepts host programs, and processes both queues.
    pub fn pump(&mut self) {
        self.mux.accept_host(&self.host);
        for fd in self.mux.connection_fds() {
            self.mux.on_connection_event(fd, true, true);
        }
        for fd in self.mux.pending_fds() {
            self.mux.on_pending_readable(fd);
        }
        self.mux.fd_changes.clear();
        self.queues.process_tx(&mut self.mux, &self.host);
        self.queues.process_rx(&mut self.mux);
    }

    /// The packets the device put on the RX used ring since the last call (buffers freed).
    pub fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let used = used_idx(self.mem, &self.rxq);
        while self.rx_used_seen != used {
            let e = used_elem(self.mem, &self.rxq, self.rx_used_seen);
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
            if e.1 == 0 {
                // A chain the device refused (a test's raw chain): not one of the slots.
                continue;
            }
            let slot = (e.0 / 2) as u16;
            self.free_rx.push(slot);
            let base = RX_BUFS + u64::from(slot) * RX_SLOT;
            let hdr = read_header(self.mem, base);
            let data_at = match self.layout {
                RxLayout::OneDescriptor => base + PKT_LEN as u64,
                RxLayout::TwoDescriptors => base + 64,
            };
            assert_eq!(e.1, PKT_LEN + hdr.len, "used length is header + payload");
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(data_at))
                .unwrap();
            out.push((hdr, data));
        }
        out
    }

    /// Pumps and returns what arrived.
    pub fn exchange(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.offer_rx(RX_SLOTS as usize);
        self.pump();
        self.received()
    }
}

/// Where the used ring of a mock queue really is. The mock places it right after the
/// avail ring's first `size` bytes (not its `2 * size`), over the avail ring's second half;
/// these tests keep it 4 KiB after the descriptor table's start instead.
pub fn used_addr<M: vm_memory::GuestMemory>(q: &MockSplitQueue<'_, M>) -> u64 {
    q.desc_table_addr().0 + 0x1000
}

/// A `Queue` over a mock queue's descriptor table and avail ring, with the used ring at
/// [`used_addr`].
pub fn queue_of<M: vm_memory::GuestMemory>(q: &MockSplitQueue<'_, M>) -> Queue {
    use virtio_queue::QueueT;
    let mut queue = q.create_queue::<Queue>().unwrap();
    let used = used_addr(q);
    queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    queue
}

/// The used ring's index.
pub fn used_idx<M: vm_memory::GuestMemory>(mem: &M, q: &MockSplitQueue<'_, M>) -> u16 {
    u16::from_le(mem.read_obj(GuestAddress(used_addr(q) + 2)).unwrap())
}

/// Used ring entry `i` (modulo the size): (head index, length).
pub fn used_elem<M: vm_memory::GuestMemory>(
    mem: &M,
    q: &MockSplitQueue<'_, M>,
    i: u16,
) -> (u32, u32) {
    let at = used_addr(q) + 4 + 8 * u64::from(i % QSIZE);
    let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
    let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
    (u32::from_le(id), u32::from_le(len))
}

/// The packet header's size.
pub const PKT_LEN: u32 = 44;

/// A raw split descriptor.
pub fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}
