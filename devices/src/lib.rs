//! Devices of tinyvmm: legacy devices on the port I/O bus, virtio devices on the MMIO bus.
//!
//! Everything here is emulated in the VMM process and reached through `KVM_EXIT_IO`:
//! - [`serial::SerialDevice`]: a 16550 UART (vm-superio) at COM1, guest output to a writer,
//!   host input (stdin) to the guest, interrupts through an irqfd;
//! - [`i8042::I8042`]: the keyboard controller, only so that the guest's CPU reset
//!   (`reboot=k`) ends the VMM cleanly;
//! - [`debug_exit::DebugExit`]: an isa-debug-exit style port for test guests;
//! - [`cmos::Cmos`]: the CMOS/RTC index and data ports with the wall-clock time;
//! - [`bus::PioBus`]: the address map, with unclaimed ports answered like a floating bus;
//! - [`virtio`]: the virtio device contract, the virtio-mmio transport and the device
//!   models, reached through `KVM_EXIT_MMIO` on [`mmio_bus::MmioBus`].
//!
//! Devices know nothing of KVM: the VMM dispatches exits to them, wires their interrupts
//! (irqfds) and queue notifications (ioeventfds), and learns of VMM-wide events (exit
//! requests) through [`exit::ExitSignal`]. Legacy devices never touch guest memory; virtio
//! devices do, only through `vm-memory` and only within the buffers the driver gave, and
//! report every range they write (`GuestWrites`) so memory sharing sees those pages change.

pub mod bus;
pub mod cmos;
pub mod debug_exit;
pub mod exit;
pub mod i8042;
pub mod mmio_bus;
pub mod serial;
pub mod virtio;

pub use bus::{BusDevice, PioBus};
pub use exit::{ExitReason, ExitSignal};
pub use mmio_bus::MmioBus;
