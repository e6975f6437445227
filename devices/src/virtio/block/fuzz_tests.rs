//! The request path fuzzed over arbitrary queue contents (proptest, with virtio-queue's
//! mock split queue): whatever the descriptor table, the available ring and the request
//! headers hold, serving the queue does not panic, writes guest RAM only inside
//! device-writable descriptors the driver gave (and the used ring), reports every byte it
//! changed through `GuestWrites`, and never changes a read-only image.

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use proptest::prelude::*;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::config::DiskConfig;
use super::worker::process_queue;
use crate::virtio::{GuestWrites, VirtioInterrupt};

const QUEUE_LEN: u16 = 16;
/// RAM: two regions with a hole between them.
const REGIONS: [(u64, u64); 2] = [(0, 0x1_0000), (0x2_0000, 0x1_0000)];
/// Where the crafted request headers sit.
const HEADERS: u64 = 0x1000;
const DISK_BYTES: usize = 64 * 1024;

#[derive(Default)]
struct Recorded(Mutex<Vec<(u64, u64)>>);
impl GuestWrites for Recorded {
    fn wrote(&self, gpa: u64, len: u64) {
        self.0.lock().unwrap().push((gpa, len));
    }
}

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn signal_used_queue(&self, _: u16) -> std::io::Result<()> {
        Ok(())
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0u64..4).prop_map(|k| HEADERS + 16 * k),
        0x2000u64..0x3_0000,
        0x1_0000u64..0x2_0000,
        any::<u64>(),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(16u32),
        Just(1u32),
        Just(512u32),
        Just(4096u32),
        0u32..0x3000,
        any::<u32>()
    ]
}

/// A descriptor: address, length, flags (NEXT and WRITE; no indirect tables), next.
fn desc() -> impl Strategy<Value = (u64, u32, u16, u16)> {
    (addr(), len(), 0u16..4, 0u16..QUEUE_LEN + 4)
}

/// A request header: type and sector.
fn header() -> impl Strategy<Value = (u32, u64)> {
    (
        prop_oneof![Just(0u32), Just(1), Just(4), Just(8), any::<u32>()],
        prop_oneof![0u64..140, any::<u64>()],
    )
}

static CASE: AtomicU32 = AtomicU32::new(0);

fn snapshot(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
    REGIONS
        .iter()
        .map(|&(a, l)| {
            let mut v = vec![0u8; l as usize];
            mem.read_slice(&mut v, GuestAddress(a)).unwrap();
            v
        })
        .collect()
}

fn covered(ranges: &[(u64, u64)], a: u64) -> bool {
    ranges.iter().any(|&(s, l)| a >= s && (a - s) < l)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_queues_never_panic_or_write_outside_the_drivers_buffers(
        descs in prop::collection::vec(desc(), 1..QUEUE_LEN as usize),
        heads in prop::collection::vec(prop_oneof![2 => Just(0u16), 1 => 0u16..QUEUE_LEN + 4], 0..8),
        avail_idx in prop_oneof![4 => Just(None), 1 => any::<u16>().prop_map(Some)],
        headers in prop::collection::vec(header(), 4),
        read_only in any::<bool>(),
        linked in prop::collection::vec(any::<bool>(), QUEUE_LEN as usize),
        wellformed in prop::option::of((0u64..4, 0x2000u64..0x3_0000, 0u32..16, any::<bool>())),
    ) {
        // Mostly chain-shaped: descriptor i often continues at i + 1.
        let descs: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f, n))| {
                if linked[i] && i + 1 < descs.len() {
                    (a, l, f | 1, i as u16 + 1)
                } else {
                    (a, l, f, n)
                }
            })
            .collect();
        // Often a well-formed request at the head: header, data, status.
        let mut descs = descs;
        if let Some((k, data, sectors, dev_writes)) = wellformed {
            descs.resize(descs.len().max(3), (0, 0, 0, 0));
            descs[0] = (HEADERS + 16 * k, 16, 1, 1);
            descs[1] = (data, sectors * 512, 1 | if dev_writes { 2 } else { 0 }, 2);
            descs[2] = (HEADERS + 0x100, 1, 2, 0);
        }
        let mem = GuestMemoryMmap::from_ranges(
            &REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l as usize)).collect::<Vec<_>>(),
        ).unwrap();
        for &(a, l) in &REGIONS {
            mem.write_slice(&vec![0xaa; l as usize], GuestAddress(a)).unwrap();
        }
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_LEN);
        for (i, &(a, l, f, n)) in descs.iter().enumerate() {
            mock.desc_table()
                .store(i as u16, RawDescriptor::from(Descriptor::new(a, l, f, n)))
                .unwrap();
        }
        for (k, &(t, s)) in headers.iter().enumerate() {
            let h = GuestAddress(HEADERS + 16 * k as u64);
            mem.write_obj(t, h).unwrap();
            mem.write_obj(s, GuestAddress(h.0 + 8)).unwrap();
        }
        for (i, &h) in heads.iter().enumerate() {
            mock.avail().ring().ref_at(i).unwrap().store(h);
        }
        mock.avail().idx().store(avail_idx.unwrap_or(heads.len() as u16));
        let mut queue: Queue = mock.create_queue().unwrap();
        let used = (mock.used_addr().0, 4 + 8 * u64::from(QUEUE_LEN) + 2);

        let n = CASE.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir()
            .join(format!("tinyvmm-blk-fuzz-{}-{n}.img", std::process::id()));
        let image: Vec<u8> = (0..DISK_BYTES).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::File::create(&path).unwrap().write_all(&image).unwrap();
        let mut disk = DiskConfig { path: path.clone(), read_only }.open().unwrap();

        let before = snapshot(&mem);
        let writes = Recorded::default();
        let mut broken = false;
        process_queue(&mem, &mut queue, &mut disk, &NoIrq, &writes, &mut broken);
        let after = snapshot(&mem);
        drop(disk);
        let image_after = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();

        // Where the device may write: device-writable descriptors, and the used ring.
        let mut allowed: Vec<(u64, u64)> = descs
            .iter()
            .filter(|d| d.2 & 2 != 0)
            .map(|d| (d.0, u64::from(d.1)))
            .collect();
        allowed.push(used);
        let reported = writes.0.lock().unwrap().clone();
        for &(s, l) in &reported {
            prop_assert!(l == 0 || (covered(&allowed, s) && covered(&allowed, s + l - 1)),
                "reported write {s:#x}+{l:#x} outside the driver's buffers");
        }
        for (r, (b, a)) in REGIONS.iter().zip(before.iter().zip(&after)) {
            for (off, (x, y)) in b.iter().zip(a).enumerate() {
                if x != y {
                    let gpa = r.0 + off as u64;
                    prop_assert!(covered(&allowed, gpa), "byte {gpa:#x} written outside the driver's buffers");
                    prop_assert!(covered(&reported, gpa), "byte {gpa:#x} written but not reported");
                }
            }
        }
        if read_only {
            prop_assert!(image_after == image, "a read-only image changed");
        }
    }
}
