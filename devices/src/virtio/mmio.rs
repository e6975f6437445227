//! The virtio-mmio transport (virtio 1.x, register layout version 2).
//!
//! One [`MmioTransport`] is the register file of one device: the driver negotiates
//! features, configures the queues and drives the device status through 32-bit registers
//! at fixed offsets, and reads the device's configuration space from offset `0x100`. The
//! transport validates what the driver configured (queue sizes against the device's
//! maxima, ring addresses against guest RAM with `virtio-queue`'s own check) and hands the
//! enabled queues to the device at `DRIVER_OK`. A driver that breaks the protocol gets
//! `DEVICE_NEEDS_RESET`, never a VMM failure.
//!
//! Queue notifications do not come through here: the VMM registers each queue's kick
//! eventfd ([`MmioTransport::queue_kicks`]) as a KVM ioeventfd on `QueueNotify` with the
//! queue index as datamatch, so a notification wakes the device's worker without leaving
//! the kernel. Interrupts go out through [`MmioInterrupt`] (an irqfd).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{ActivateContext, GuestWrites, VirtioDevice, VirtioInterrupt};
use crate::bus::BusDevice;

/// Bytes of MMIO space one transport decodes (registers and configuration space).
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
/// The register layout version of modern virtio-mmio.
const VERSION: u32 = 2;
/// The vendor ID the transport reports.
const VENDOR_ID: u32 = 0x554d_4551; // "QEMU", as most VMMs report

/// The interrupt line of one transport: the interrupt status register and the irqfd that
/// raises the device's GSI (edge-triggered).
#[derive(Debug)]
pub struct MmioInterrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl MmioInterrupt {
    /// An interrupt line that signals `irq` (an eventfd the VMM registered as an irqfd).
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
        }
    }

    fn raise(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq.write(1)
    }

    /// The current interrupt status (`VIRTIO_MMIO_INT_*` bits).
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn signal_used_queue(&self, _index: u16) -> std::io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_VRING)
    }

    fn signal_config_change(&self) -> std::io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_CONFIG)
    }
}

/// One queue's configuration as the driver wrote it, and its kick eventfd.
struct QueueSlot {
    queue: Queue,
    kick: EventFd,
    /// The driver wrote a size the queue refused (zero, above the maximum, not a power
    /// of two): enabling the device fails.
    bad_size: bool,
}

/// The virtio-mmio register file of one device.
pub struct MmioTransport<M> {
    device: Box<dyn VirtioDevice<M>>,
    mem: M,
    interrupt: Arc<MmioInterrupt>,
    writes: Arc<dyn GuestWrites>,
    queues: Vec<QueueSlot>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
}

impl<M> std::fmt::Debug for MmioTransport<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.device.name())
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish()
    }
}

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The device asks for a queue size `virtio-queue` cannot make.
    #[error("virtio device {device}: queue {index} maximum size {size} is invalid")]
    QueueSize {
        /// The device's name.
        device: &'static str,
        /// The queue index.
        index: usize,
        /// The size asked for.
        size: u16,
    },
    /// A kick eventfd could not be created.
    #[error("virtio device {device}: kick eventfd: {source}")]
    Kick {
        /// The device's name.
        device: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

impl<M: GuestMemory + Clone> MmioTransport<M> {
    /// A transport for `device`, with guest memory `mem`, interrupts through `interrupt`
    /// and device writes into guest RAM reported to `writes`.
    pub fn new(
        device: Box<dyn VirtioDevice<M>>,
        mem: M,
        interrupt: Arc<MmioInterrupt>,
        writes: Arc<dyn GuestWrites>,
    ) -> Result<Self, TransportError> {
        let name = device.name();
        let mut queues = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            let queue = Queue::new(size).map_err(|_| TransportError::QueueSize {
                device: name,
                index,
                size,
            })?;
            let kick = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
                TransportError::Kick {
                    device: name,
                    source,
                }
            })?;
            queues.push(QueueSlot {
                queue,
                kick,
                bad_size: false,
            });
        }
        Ok(Self {
            device,
            mem,
            interrupt,
            writes,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            activated: false,
        })
    }

    /// The kick eventfd of each queue, in index order, for the VMM to register as
    /// ioeventfds on `QueueNotify` (datamatch: the queue index).
    pub fn queue_kicks(&self) -> impl Iterator<Item = (u16, &EventFd)> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| (i as u16, &q.kick))
    }

    /// The device's name.
    pub fn device_name(&self) -> &'static str {
        self.device.name()
    }

    /// The device's virtio ID.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Starts the device's worker thread (see [`VirtioDevice::start_worker`]).
    pub fn start_device_worker(
        &mut self,
        start: super::device::ThreadStart,
    ) -> Result<(), super::device::ActivateError> {
        self.device.start_worker(start)
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device was handed its queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn selected_queue(&mut self) -> Option<&mut QueueSlot> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Whether the driver may change the queues now: features negotiated, not yet live.
    fn queue_config_open(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) == 0
    }

    /// Whether the driver may write features now: it set DRIVER, not yet FEATURES_OK.
    fn features_open(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER != 0
            && self.status & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED) == 0
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .selected_queue()
                .map_or(0, |q| u32::from(q.queue.max_size())),
            VIRTIO_MMIO_QUEUE_READY => self
                .selected_queue()
                .map_or(0, |q| u32::from(q.queue.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            // No device changes its configuration space once built.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            // Shared memory regions: none (a length of all ones says "no such region").
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES if self.features_open() => {
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM if self.queue_config_open() => {
                if let Some(q) = self.selected_queue() {
                    let ok =
                        value <= u32::from(u16::MAX) && q.queue.try_set_size(value as u16).is_ok();
                    q.bad_size = !ok;
                }
            }
            VIRTIO_MMIO_QUEUE_READY if self.queue_config_open() => {
                if let Some(q) = self.selected_queue() {
                    q.queue.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH
                if self.queue_config_open() =>
            {
                if let Some(q) = self.selected_queue() {
                    set_queue_address(&mut q.queue, offset, value);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            _ => tracing::debug!(
                device = self.device.name(),
                offset,
                value,
                status = self.status,
                "ignored virtio-mmio register write"
            ),
        }
    }

    /// The driver wrote the device status: reset on 0, otherwise one step forward.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits; anything else is out of spec.
        if value & self.status != self.status {
            self.fail("the driver cleared status bits without a reset");
            return;
        }
        let new = value & !self.status;
        if new & VIRTIO_CONFIG_S_FAILED != 0 {
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        if new & VIRTIO_CONFIG_S_ACKNOWLEDGE != 0 {
            self.status |= VIRTIO_CONFIG_S_ACKNOWLEDGE;
        }
        if new & VIRTIO_CONFIG_S_DRIVER != 0 && self.status & VIRTIO_CONFIG_S_ACKNOWLEDGE != 0 {
            self.status |= VIRTIO_CONFIG_S_DRIVER;
        }
        if new & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.features_open() {
            if self.features_acceptable() {
                self.status |= VIRTIO_CONFIG_S_FEATURES_OK;
            } else {
                // Left clear: the driver reads the status back and gives up.
                tracing::warn!(
                    device = self.device.name(),
                    features = format_args!("{:#x}", self.driver_features),
                    "the driver accepted features the device does not offer, or not VERSION_1"
                );
            }
        }
        if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.queue_config_open() {
            self.status |= VIRTIO_CONFIG_S_DRIVER_OK;
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.avail_features();
        self.driver_features & !offered == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    /// Hands the enabled queues to the device, or marks it broken if they are not valid.
    fn activate(&mut self) {
        let mut queues = Vec::new();
        for (index, slot) in self.queues.iter().enumerate() {
            if !slot.queue.ready() {
                continue;
            }
            if slot.bad_size {
                let max = slot.queue.max_size();
                self.fail(&format!(
                    "the driver gave queue {index} a size that is zero, not a power of two or above its maximum {max}"
                ));
                return;
            }
            if !slot.queue.is_valid(&self.mem) {
                self.fail(&format!(
                    "queue {index}'s rings lie outside guest RAM or are misaligned"
                ));
                return;
            }
            // The device gets its own copy of the queue; the transport keeps the registers.
            let queue = match Queue::try_from(slot.queue.state()) {
                Ok(q) => q,
                Err(e) => {
                    self.fail(&format!("queue {index}: {e}"));
                    return;
                }
            };
            let kick = match slot.kick.try_clone() {
                Ok(k) => k,
                Err(e) => {
                    self.fail(&format!("cannot duplicate the kick eventfd: {e}"));
                    return;
                }
            };
            queues.push((index as u16, queue, kick));
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            writes: self.writes.clone(),
            acked_features: self.driver_features,
        };
        match self.device.activate(ctx) {
            Ok(()) => {
                self.activated = true;
                tracing::debug!(device = self.device.name(), "virtio device activated");
            }
            Err(e) => self.fail(&e.to_string()),
        }
    }

    /// Marks the device `DEVICE_NEEDS_RESET` and tells the driver (a configuration-change
    /// interrupt), as the spec asks of a device that hit an error it cannot recover from.
    fn fail(&mut self, why: &str) {
        tracing::warn!(
            device = self.device.name(),
            "virtio device needs a reset: {why}"
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        let _ = self.interrupt.signal_config_change();
    }

    /// The driver wrote status 0: stop the device and forget the negotiation and queues.
    fn reset(&mut self) {
        if self.activated && !self.device.reset() {
            self.fail("the device cannot be reset");
            return;
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.queue.reset();
            q.bad_size = false;
        }
        self.interrupt.clear();
    }
}

fn set_queue_address(q: &mut Queue, offset: u32, value: u32) {
    match offset {
        VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
        VIRTIO_MMIO_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
        VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(value), None),
        VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(value)),
        VIRTIO_MMIO_QUEUE_USED_LOW => q.set_used_ring_address(Some(value), None),
        VIRTIO_MMIO_QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(value)),
        _ => {}
    }
}

impl<M: GuestMemory + Clone + Send> BusDevice<u64> for MmioTransport<M> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            // Registers are 32 bits wide and aligned; anything else reads as zero.
            data.fill(0);
            return;
        }
        let v = self.read_register(offset as u32);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_register(offset as u32, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
