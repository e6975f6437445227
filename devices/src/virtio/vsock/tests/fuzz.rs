//! Property test over queue contents: random descriptor tables on both queues (addresses
//! in and out of RAM, on the rings, lengths up to past the limit, any flags, loops) and
//! random headers, next to a real open connection. Whatever the guest puts there, the
//! device does not panic, changes guest RAM only inside writable descriptors the guest put
//! on the RX queue (and the used rings), and reports every byte it changed there.

use proptest::prelude::*;
use vm_memory::{Address, Bytes, GuestAddress};

use super::harness::*;
use crate::virtio::vsock::header::*;

#[derive(Clone, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..0x2_0000).prop_map(|o| TX_BUFS + o),
        4 => (0u64..0x4_0000).prop_map(|o| RX_BUFS + o),
        1 => 0x4000u64..0x8000,
        1 => (0u64..0x2000).prop_map(|o| RAM - o),
        1 => any::<u64>(),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => 0u32..128,
        3 => 0u32..8192,
        1 => 60_000u32..70_000,
        1 => any::<u32>(),
    ]
}

fn desc() -> impl Strategy<Value = Desc> {
    (addr(), len(), 0u16..8, 0u16..(QSIZE + 4)).prop_map(|(addr, len, flags, next)| Desc {
        addr,
        len,
        flags,
        next,
    })
}

fn header() -> impl Strategy<Value = Header> {
    (
        prop_oneof![Just(CID), any::<u64>()],
        prop_oneof![Just(HOST_CID), any::<u64>()],
        prop_oneof![Just(1234u32), 0u32..4],
        prop_oneof![Just(5000u32), 0u32..4],
        len(),
        0u16..4,
        0u16..10,
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(
            |(src_cid, dst_cid, src_port, dst_port, len, type_, op, flags, buf_alloc)| Header {
                src_cid,
                dst_cid,
                src_port,
                dst_port,
                len,
                type_,
                op,
                flags,
                buf_alloc,
                fwd_cnt: 0,
            },
        )
}

/// One step of the guest.
#[derive(Clone, Debug)]
enum Step {
    /// Put a header at a TX buffer offset.
    Header(u64, Header),
    /// Put a chain head and descriptors on the TX queue.
    Tx(u16, Vec<Desc>),
    /// Put a chain head and descriptors on the RX queue.
    Rx(u16, Vec<Desc>),
    /// The host program writes bytes.
    HostWrites(usize),
    /// Let the device run.
    Pump,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => ((0u64..4).prop_map(|s| TX_BUFS + s * 0x1000), header()).prop_map(|(a, h)| Step::Header(a, h)),
        3 => (0u16..QSIZE, prop::collection::vec(desc(), 1..4)).prop_map(|(h, d)| Step::Tx(h, d)),
        3 => (0u16..QSIZE, prop::collection::vec(desc(), 1..4)).prop_map(|(h, d)| Step::Rx(h, d)),
        1 => (0usize..20_000).prop_map(Step::HostWrites),
        2 => Just(Step::Pump),
    ]
}

fn place(descs: &[Desc], head: u16) -> Vec<(u16, virtio_queue::desc::RawDescriptor)> {
    let mut index = head;
    descs
        .iter()
        .map(|d| {
            let at = index % QSIZE;
            index = d.next;
            (at, raw(d.addr, d.len, d.flags, d.next))
        })
        .collect()
}

fn within(ranges: &[(u64, u64)], at: u64) -> bool {
    ranges.iter().any(|&(a, l)| at >= a && at - a < l)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_queue_contents_stay_within_the_guests_buffers(steps in prop::collection::vec(step(), 1..40)) {
        let mut g = MockGuest::new();
        let listener = std::os::unix::net::UnixListener::bind(g.port_path(5000)).unwrap();
        g.send(g.header(1234, 5000, OP_REQUEST), &[]);
        g.exchange();
        let (host, _) = listener.accept().unwrap();
        host.set_nonblocking(true).unwrap();
        let mut rx_writable: Vec<(u64, u64)> = Vec::new();
        let mut indirect = false;
        for s in steps {
            match s {
                Step::Header(a, h) => write_header(g.mem, a, &h),
                Step::Tx(head, d) => {
                    indirect |= d.iter().any(|d| d.flags & 4 != 0);
                    g.push_tx_descs(&place(&d, head), head % QSIZE)
                }
                Step::Rx(head, d) => {
                    indirect |= d.iter().any(|d| d.flags & 4 != 0);
                    let placed = place(&d, head);
                    g.push_rx_descs(&placed, head % QSIZE);
                }
                Step::HostWrites(n) => {
                    let _ = std::io::Write::write(&mut &host, &vec![9u8; n]);
                }
                Step::Pump => {
                    // The descriptor table as the device will see it: every writable one
                    // (chains may run through descriptors placed by other steps).
                    rx_writable.clear();
                    for i in 0..QSIZE {
                        let at = GuestAddress(u64::from(i) * 16);
                        let addr: u64 = g.mem.read_obj(at).unwrap();
                        let len: u32 = g.mem.read_obj(at.unchecked_add(8)).unwrap();
                        let flags: u16 = g.mem.read_obj(at.unchecked_add(12)).unwrap();
                        if flags & 2 != 0 {
                            rx_writable.push((addr, u64::from(len)));
                        }
                    }
                    let mut before = vec![0u8; RAM as usize];
                    g.mem.read_slice(&mut before, GuestAddress(0)).unwrap();
                    g.writes.0.lock().unwrap().clear();
                    g.pump();
                    let mut after = vec![0u8; RAM as usize];
                    g.mem.read_slice(&mut after, GuestAddress(0)).unwrap();
                    let reported = g.writes.0.lock().unwrap().clone();
                    let rings = g.used_rings();
                    if !indirect {
                        for &(a, l) in reported.iter().filter(|r| !rings.contains(r)) {
                            prop_assert!(within(&rx_writable, a) && within(&rx_writable, a + l - 1),
                                "reported write {a:#x}+{l} outside the RX buffers");
                        }
                    }
                    // Page by page (a memcmp), then byte by byte where a page changed.
                    for (p, (b, a)) in before.chunks(4096).zip(after.chunks(4096)).enumerate() {
                        if b == a {
                            continue;
                        }
                        for (j, (x, y)) in b.iter().zip(a).enumerate() {
                            let i = (p * 4096 + j) as u64;
                            if x != y && !within(&rings, i) {
                                prop_assert!(within(&reported, i), "unreported write at {i:#x}");
                            }
                        }
                    }
                }
            }
        }
        // Whatever happened, the device still serves the connection or reset it cleanly.
        g.pump();
    }
}
