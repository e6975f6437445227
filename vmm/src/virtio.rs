//! Virtio devices on the VM: each on its own virtio-mmio transport in the 32-bit MMIO gap,
//! with an IOAPIC pin, described in the DSDT so that a guest finds it without hints.
//!
//! Device `i` of the list gets slot `i`: MMIO base `VIRTIO_MMIO_START + i * 0x1000`, GSI
//! `VIRTIO_GSI_START + i` (edge-triggered, signalled through an irqfd, as Firecracker
//! does). Each queue's `QueueNotify` write (datamatch: the queue index) is a KVM
//! ioeventfd, so a notification signals the device's kick eventfd inside the kernel and
//! the vCPU does not leave KVM_RUN; only register accesses reach the transport through
//! `KVM_EXIT_MMIO` and the [`MmioBus`].

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use tinyvmm_devices::virtio::mmio::{MmioInterrupt, MmioTransport, TransportError, MMIO_SLOT_SIZE};
use tinyvmm_devices::virtio::{GuestWrites, VirtioDevice};
use tinyvmm_devices::MmioBus;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::x86_64::acpi::{DeviceDescription, HardwareId, Resource, Trigger};
use crate::x86_64::layout::{VIRTIO_GSI_END, VIRTIO_GSI_START, VIRTIO_MMIO_START};

pub use tinyvmm_devices::virtio::balloon;
pub use tinyvmm_devices::virtio::block::{Block, DiskConfig, DiskError};

/// A virtio device model the VMM can attach.
pub type BoxedDevice = Box<dyn VirtioDevice<GuestMemoryMmap>>;

/// Errors attaching virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// More devices than free interrupt lines.
    #[error("too many virtio devices: {0} (at most {max})", max = VIRTIO_GSI_END - VIRTIO_GSI_START + 1)]
    TooMany(usize),
    /// The transport refused the device.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// KVM refused an irqfd or ioeventfd.
    #[error("virtio device {device}: {what}: {source}")]
    Kvm {
        /// The device's name.
        device: &'static str,
        /// The operation.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be created.
    #[error("virtio device {device}: interrupt eventfd: {source}")]
    Eventfd {
        /// The device's name.
        device: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The MMIO range is taken.
    #[error(transparent)]
    Bus(#[from] tinyvmm_devices::bus::BusError),
}

/// Where one device sits: its MMIO window and its interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSlot {
    /// Guest-physical base of the transport's registers.
    pub base: u64,
    /// The IOAPIC pin.
    pub gsi: u32,
}

impl DeviceSlot {
    /// Slot `index`, or `None` past the last interrupt line.
    pub fn nth(index: usize) -> Option<Self> {
        let gsi = VIRTIO_GSI_START.checked_add(u32::try_from(index).ok()?)?;
        (gsi <= VIRTIO_GSI_END).then_some(Self {
            base: VIRTIO_MMIO_START + index as u64 * MMIO_SLOT_SIZE,
            gsi,
        })
    }

    /// The DSDT entry for a virtio-mmio transport at this slot (`LNRO0005`, as Linux's
    /// virtio_mmio driver matches).
    pub fn acpi_description(&self, index: usize) -> DeviceDescription {
        DeviceDescription {
            name: format!("VR{index:02X}"),
            hid: HardwareId::Text("LNRO0005".into()),
            uid: index as u32,
            resources: vec![
                Resource::Mmio {
                    base: self.base as u32,
                    len: MMIO_SLOT_SIZE as u32,
                },
                Resource::Interrupt {
                    gsi: self.gsi,
                    trigger: Trigger::EdgeHigh,
                },
            ],
        }
    }
}

/// The attached devices.
#[derive(Debug, Default)]
pub struct VirtioDevices {
    /// Each device's slot, in list order.
    pub slots: Vec<DeviceSlot>,
    /// Each transport, for inspection.
    pub transports: Vec<Arc<Mutex<MmioTransport<GuestMemoryMmap>>>>,
}

impl VirtioDevices {
    /// The DSDT entries of every device.
    pub fn acpi_descriptions(&self) -> Vec<DeviceDescription> {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| s.acpi_description(i))
            .collect()
    }

    /// The interrupt lines in use (for the MADT's interrupt overrides).
    pub fn gsis(&self) -> Vec<u8> {
        self.slots.iter().map(|s| s.gsi as u8).collect()
    }
}

/// Puts `devices` at consecutive slots: a transport on `bus` for each, its interrupt as an
/// irqfd, its queue notifications as ioeventfds.
pub fn attach(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    bus: &mut MmioBus,
    devices: Vec<BoxedDevice>,
    writes: Arc<dyn GuestWrites>,
) -> Result<VirtioDevices, VirtioError> {
    let count = devices.len();
    let mut out = VirtioDevices::default();
    for (index, device) in devices.into_iter().enumerate() {
        let slot = DeviceSlot::nth(index).ok_or(VirtioError::TooMany(count))?;
        let name = device.name();
        let kvm = |what| {
            move |source| VirtioError::Kvm {
                device: name,
                what,
                source,
            }
        };
        let irq = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
            VirtioError::Eventfd {
                device: name,
                source,
            }
        })?;
        vm.register_irqfd(&irq, slot.gsi)
            .map_err(kvm("KVM_IRQFD"))?;
        let interrupt = Arc::new(MmioInterrupt::new(irq));
        let transport = MmioTransport::new(device, mem.clone(), interrupt, writes.clone())?;
        let notify = IoEventAddress::Mmio(slot.base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
        for (queue, kick) in transport.queue_kicks() {
            vm.register_ioevent(kick, &notify, u32::from(queue))
                .map_err(kvm("KVM_IOEVENTFD"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(transport.clone(), slot.base, MMIO_SLOT_SIZE)?;
        tracing::info!(
            device = name,
            base = format_args!("{:#x}", slot.base),
            gsi = slot.gsi,
            "virtio-mmio device attached"
        );
        out.slots.push(slot);
        out.transports.push(transport);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_consecutive_pages_and_pins_until_the_last_isa_pin() {
        assert_eq!(
            DeviceSlot::nth(0),
            Some(DeviceSlot {
                base: 0xd000_0000,
                gsi: 5
            })
        );
        assert_eq!(DeviceSlot::nth(2).unwrap().base, 0xd000_2000);
        assert_eq!(DeviceSlot::nth(10).unwrap().gsi, 15);
        assert_eq!(DeviceSlot::nth(11), None);
        let d = DeviceSlot::nth(1).unwrap().acpi_description(1);
        assert_eq!(d.name, "VR01");
        crate::x86_64::acpi::dsdt::dsdt_aml(&[d]).unwrap();
    }
}
