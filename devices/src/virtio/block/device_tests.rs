//! The device behind the transport: driven through the registers as a driver does, kicked
//! through its eventfd as KVM's ioeventfd would, across a reset and a second activation.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Block, DiskConfig};
use crate::bus::BusDevice;
use crate::virtio::mmio::{MmioInterrupt, MmioTransport};
use crate::virtio::GuestWrites;

struct Nothing;
impl GuestWrites for Nothing {
    fn wrote(&self, _: u64, _: u64) {}
}

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x4000;
const STATUS: u64 = 0x4100;
const DATA: u64 = 0x5000;

fn w(t: &mut MmioTransport<GuestMemoryMmap>, off: u32, v: u32) {
    t.write(u64::from(off), &v.to_le_bytes());
}

fn r(t: &mut MmioTransport<GuestMemoryMmap>, off: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(off), &mut b);
    u32::from_le_bytes(b)
}

/// Negotiates, configures queue 0 (size 8) and sets DRIVER_OK.
fn start(t: &mut MmioTransport<GuestMemoryMmap>) {
    w(t, VIRTIO_MMIO_STATUS, 0);
    w(t, VIRTIO_MMIO_STATUS, 1);
    w(t, VIRTIO_MMIO_STATUS, 3);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    w(t, VIRTIO_MMIO_STATUS, 11);
    w(t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w(t, VIRTIO_MMIO_QUEUE_NUM, 8);
    w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, DESC as u32);
    w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
    w(t, VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
    w(t, VIRTIO_MMIO_QUEUE_READY, 1);
    w(t, VIRTIO_MMIO_STATUS, 15);
    assert_eq!(r(t, VIRTIO_MMIO_STATUS), 15);
}

/// Queues a one-sector read of `sector` as request number `n` (from 0 after each
/// activation), kicks, and waits for the used ring.
fn read_sector(mem: &GuestMemoryMmap, kick: &EventFd, n: u16, sector: u64) -> Vec<u8> {
    mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR)).unwrap();
    mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    let descs: [(u64, u32, u16, u16); 3] = [(HDR, 16, 1, 1), (DATA, 512, 3, 2), (STATUS, 1, 2, 0)];
    for (i, (a, l, f, nx)) in descs.into_iter().enumerate() {
        let d = GuestAddress(DESC + 16 * i as u64);
        mem.write_obj(a, d).unwrap();
        mem.write_obj(l, GuestAddress(d.0 + 8)).unwrap();
        mem.write_obj(f, GuestAddress(d.0 + 12)).unwrap();
        mem.write_obj(nx, GuestAddress(d.0 + 14)).unwrap();
    }
    mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(n % 8)))
        .unwrap();
    mem.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
    kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != n + 1 {
        assert!(
            Instant::now() < deadline,
            "request {n} (sector {sector}) not completed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK as u8
    );
    let mut v = vec![0u8; 512];
    mem.read_slice(&mut v, GuestAddress(DATA)).unwrap();
    v
}

#[test]
fn serves_requests_on_its_worker_across_a_reset_and_a_second_activation() {
    let path = std::env::temp_dir().join(format!("tinyvmm-blk-dev-{}.img", std::process::id()));
    let image: Vec<u8> = (0..4096u32).map(|i| (i / 512) as u8 + 1).collect();
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&image)
        .unwrap();
    let mut block = Block::new(&DiskConfig {
        path: path.clone(),
        read_only: true,
    })
    .unwrap();
    std::fs::remove_file(&path).unwrap();
    crate::virtio::VirtioDevice::<GuestMemoryMmap>::start_worker(&mut block, Box::new(|| {}))
        .unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(MmioInterrupt::new(irq.try_clone().unwrap()));
    let mut t =
        MmioTransport::new(Box::new(block), mem.clone(), interrupt, Arc::new(Nothing)).unwrap();
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 2);
    assert_eq!(r(&mut t, VIRTIO_MMIO_CONFIG), 8, "capacity in sectors");
    let kick = t.queue_kicks().next().unwrap().1.try_clone().unwrap();

    start(&mut t);
    assert_eq!(read_sector(&mem, &kick, 0, 3), vec![4u8; 512]);
    assert_eq!(read_sector(&mem, &kick, 1, 7), vec![8u8; 512]);
    assert!(irq.read().unwrap() >= 1, "the driver was interrupted");
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);

    // Reset: the worker lets go; a new driver starts from a clean queue.
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
    // As a driver does, the new one starts from zeroed rings (a stale available index
    // would hand the device the old driver's requests again).
    mem.write_slice(&[0u8; 0x3000], GuestAddress(DESC)).unwrap();
    start(&mut t);
    assert_eq!(read_sector(&mem, &kick, 0, 0), vec![1u8; 512]);
}
