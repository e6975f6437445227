//! The transport driven as a driver would, and out of spec.

use std::sync::Mutex;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::*;
use crate::virtio::device::ActivateError;

type Mem = GuestMemoryMmap;

#[derive(Default)]
struct Seen {
    activations: Vec<(Vec<(u16, u16)>, u64)>,
    resets: u32,
}

struct Dummy {
    seen: Arc<Mutex<Seen>>,
    resettable: bool,
}

impl VirtioDevice<Mem> for Dummy {
    fn name(&self) -> &'static str {
        "dummy"
    }
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | 0b101
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, ctx: ActivateContext<Mem>) -> Result<(), ActivateError> {
        let q = ctx.queues.iter().map(|(i, q, _)| (*i, q.size())).collect();
        self.seen
            .lock()
            .unwrap()
            .activations
            .push((q, ctx.acked_features));
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.seen.lock().unwrap().resets += 1;
        self.resettable
    }
}

struct NoWrites;
impl GuestWrites for NoWrites {
    fn wrote(&self, _gpa: u64, _len: u64) {}
}

fn transport(resettable: bool) -> (MmioTransport<Mem>, Arc<Mutex<Seen>>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(
        Box::new(Dummy {
            seen: seen.clone(),
            resettable,
        }),
        mem,
        Arc::new(MmioInterrupt::new(irq)),
        Arc::new(NoWrites),
    )
    .unwrap();
    (t, seen)
}

fn r(t: &mut MmioTransport<Mem>, off: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(off), &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport<Mem>, off: u32, v: u32) {
    t.write(u64::from(off), &v.to_le_bytes());
}

const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRV: u32 = ACK | VIRTIO_CONFIG_S_DRIVER;
const FOK: u32 = DRV | VIRTIO_CONFIG_S_FEATURES_OK;
const DOK: u32 = FOK | VIRTIO_CONFIG_S_DRIVER_OK;

/// Negotiates VERSION_1 | bit 0 and configures queue 0 with `size` at 0x1000.
fn negotiate(t: &mut MmioTransport<Mem>, size: u32) {
    w(t, VIRTIO_MMIO_STATUS, ACK);
    w(t, VIRTIO_MMIO_STATUS, DRV);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    w(t, VIRTIO_MMIO_STATUS, FOK);
    assert_eq!(r(t, VIRTIO_MMIO_STATUS), FOK);
    w(t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w(t, VIRTIO_MMIO_QUEUE_NUM, size);
    w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
    w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
    w(t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
    w(t, VIRTIO_MMIO_QUEUE_READY, 1);
}

#[test]
fn identifies_itself_and_its_features() {
    let (mut t, _) = transport(true);
    assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
    assert_eq!(r(&mut t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 42);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0b101);
    w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 7);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    let mut b = [0u8; 2];
    t.read(0x103, &mut b);
    assert_eq!(b, [3, 4]);
    // A byte read of a register reads zero.
    let mut one = [9u8; 1];
    t.read(0, &mut one);
    assert_eq!(one, [0]);
}

#[test]
fn activates_with_the_enabled_queues_and_the_accepted_features() {
    let (mut t, seen) = transport(true);
    negotiate(&mut t, 8);
    w(&mut t, VIRTIO_MMIO_STATUS, DOK);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), DOK);
    assert!(t.is_activated());
    let s = seen.lock().unwrap();
    assert_eq!(s.activations, vec![(vec![(0, 8)], (1 << 32) | 1)]);
}

#[test]
fn refuses_features_the_device_does_not_offer_or_without_version_1() {
    for (lo, hi) in [(0b10, 1), (1, 0)] {
        let (mut t, _) = transport(true);
        w(&mut t, VIRTIO_MMIO_STATUS, DRV);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, lo);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, hi);
        w(&mut t, VIRTIO_MMIO_STATUS, FOK);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), DRV);
        // DRIVER_OK without FEATURES_OK does nothing.
        w(&mut t, VIRTIO_MMIO_STATUS, DRV | VIRTIO_CONFIG_S_DRIVER_OK);
        assert!(!t.is_activated());
    }
}

#[test]
fn a_queue_larger_than_its_maximum_or_outside_ram_needs_a_reset() {
    for (size, desc) in [(32, 0x1000), (6, 0x1000), (8, 0xfff_fff0)] {
        let (mut t, seen) = transport(true);
        negotiate(&mut t, size);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, desc);
        w(&mut t, VIRTIO_MMIO_STATUS, DOK);
        assert!(!t.is_activated(), "size {size} desc {desc:#x}");
        assert_ne!(
            r(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        assert!(seen.lock().unwrap().activations.is_empty());
        // A reset recovers.
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
        negotiate(&mut t, 8);
        w(&mut t, VIRTIO_MMIO_STATUS, DOK);
        assert!(t.is_activated());
    }
}

#[test]
fn queue_registers_are_frozen_once_live_and_reset_clears_them() {
    let (mut t, seen) = transport(true);
    negotiate(&mut t, 8);
    w(&mut t, VIRTIO_MMIO_STATUS, DOK);
    w(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(seen.lock().unwrap().resets, 1);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    assert!(!t.is_activated());
}

#[test]
fn a_device_that_cannot_reset_needs_one_and_clearing_bits_is_out_of_spec() {
    let (mut t, _) = transport(false);
    negotiate(&mut t, 8);
    w(&mut t, VIRTIO_MMIO_STATUS, DOK);
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_ne!(
        r(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );

    let (mut t, _) = transport(true);
    negotiate(&mut t, 8);
    w(&mut t, VIRTIO_MMIO_STATUS, ACK);
    assert_ne!(
        r(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
}

#[test]
fn interrupts_set_status_bits_until_acknowledged() {
    let (mut t, _) = transport(true);
    t.interrupt.signal_used_queue(0).unwrap();
    t.interrupt.signal_config_change().unwrap();
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 3);
    w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 2);
    assert_eq!(t.interrupt.irq.read().unwrap(), 2);
}
