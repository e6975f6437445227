//! An isa-debug-exit style port: a guest write of `v` ends the VMM with status `(v << 1) | 1`.
//!
//! Test guests use it to report failure through the exit status (0 stays reserved for a
//! clean guest reset), exactly like QEMU's `isa-debug-exit` device.

use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// The conventional port of the device.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// The debug exit device.
#[derive(Debug)]
pub struct DebugExit {
    exit: ExitSignal,
}

impl DebugExit {
    /// A device that reports to `exit`.
    pub fn new(exit: ExitSignal) -> Self {
        Self { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u16, data: &[u8]) {
        if let Some(v) = data.first() {
            self.exit.request(ExitReason::DebugExit(*v));
        }
    }
}
