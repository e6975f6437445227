//! The i8042 keyboard controller, present so that a guest CPU reset ends the VMM.

use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};
use vm_superio::{I8042Device, Trigger};

/// Base port of the i8042 (data at 0x60, command/status at 0x64).
pub const I8042_BASE: u16 = 0x60;
/// Ports claimed from the base.
pub const I8042_LEN: u16 = 5;

/// Turns the i8042's reset line into a clean VMM exit.
#[derive(Debug, Clone)]
pub struct ResetTrigger(ExitSignal);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::GuestReset);
        Ok(())
    }
}

/// The i8042 on the port bus.
pub struct I8042(I8042Device<ResetTrigger>);

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("I8042")
    }
}

impl I8042 {
    /// An i8042 whose CPU reset command requests a clean exit.
    pub fn new(exit: ExitSignal) -> Self {
        Self(I8042Device::new(ResetTrigger(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = self.0.read(offset as u8);
        data.fill(v);
    }
    fn write(&mut self, offset: u16, data: &[u8]) {
        if let Some(v) = data.first() {
            // Infallible.
            let _ = self.0.write(offset as u8, *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_reset_command_requests_clean_exit() {
        let exit = ExitSignal::new().unwrap();
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[0xfe]);
        assert_eq!(exit.reason(), None);
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }
}
