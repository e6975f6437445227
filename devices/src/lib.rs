//! Legacy devices of tinyvmm and the port I/O bus they sit on.
//!
//! Everything here is emulated in the VMM process and reached through `KVM_EXIT_IO`:
//! - [`serial::SerialDevice`]: a 16550 UART (vm-superio) at COM1, guest output to a writer,
//!   host input (stdin) to the guest, interrupts through an irqfd;
//! - [`i8042::I8042`]: the keyboard controller, only so that the guest's CPU reset
//!   (`reboot=k`) ends the VMM cleanly;
//! - [`debug_exit::DebugExit`]: an isa-debug-exit style port for test guests;
//! - [`cmos::Cmos`]: the CMOS/RTC index and data ports with the wall-clock time;
//! - [`bus::PioBus`]: the address map, with unclaimed ports answered like a floating bus.
//!
//! Devices never touch guest memory and know nothing of KVM: the VMM dispatches exits to
//! them and learns of VMM-wide events (exit requests) through [`exit::ExitSignal`].

pub mod bus;
pub mod cmos;
pub mod debug_exit;
pub mod exit;
pub mod i8042;
pub mod serial;
pub mod virtio;

pub use bus::{BusDevice, PioBus};
pub use exit::{ExitReason, ExitSignal};
