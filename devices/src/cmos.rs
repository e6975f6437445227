//! The CMOS RTC's index/data ports (0x70/0x71), enough for a guest to read the wall clock.
//!
//! Time registers are served in BCD, 24-hour mode, from the host's UTC clock at the moment
//! of the read; "update in progress" is never set. Other registers read as written (zero
//! initially), so NVRAM probes see a quiet, consistent device.

use crate::bus::BusDevice;

/// Base port of the CMOS (index at 0x70, data at 0x71).
pub const CMOS_BASE: u16 = 0x70;
/// Ports claimed from the base.
pub const CMOS_LEN: u16 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// The CMOS device.
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

fn bcd(v: i32) -> u8 {
    let v = v.rem_euclid(100) as u8;
    ((v / 10) << 4) | (v % 10)
}

fn utc_now() -> libc::tm {
    // SAFETY: `time(NULL)` has no preconditions.
    let now = unsafe { libc::time(std::ptr::null_mut()) };
    // SAFETY: an all-zero `tm` is a valid value of this plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call; gmtime_r is reentrant.
    unsafe { libc::gmtime_r(&now, &mut tm) };
    tm
}

impl Cmos {
    /// A CMOS with zeroed NVRAM.
    pub fn new() -> Self {
        Self {
            index: 0,
            nvram: [0; 128],
        }
    }

    fn read_register(&self, reg: u8) -> u8 {
        let tm = || utc_now();
        match reg {
            REG_SECONDS => bcd(tm().tm_sec),
            REG_MINUTES => bcd(tm().tm_min),
            REG_HOURS => bcd(tm().tm_hour),
            REG_WEEKDAY => bcd(tm().tm_wday + 1),
            REG_DAY => bcd(tm().tm_mday),
            REG_MONTH => bcd(tm().tm_mon + 1),
            REG_YEAR => bcd(tm().tm_year),
            REG_CENTURY => bcd((tm().tm_year + 1900) / 100),
            REG_STATUS_A => 0x26, // 32.768 kHz time base, 1024 Hz rate, no update in progress.
            REG_STATUS_B => 0x02, // 24-hour mode, BCD, no interrupts enabled.
            REG_STATUS_C => 0x00,
            REG_STATUS_D => 0x80, // Valid RAM and time.
            r => self.nvram[usize::from(r & 0x7f)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = match offset {
            0 => self.index,
            _ => self.read_register(self.index),
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask; ignore it.
            0 => self.index = v & 0x7f,
            _ => self.nvram[usize::from(self.index)] = v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_bcd_time_and_nvram() {
        let mut c = Cmos::new();
        let mut b = [0u8];
        c.write(0, &[0x80 | REG_STATUS_B]);
        c.read(1, &mut b);
        assert_eq!(b[0], 0x02);
        c.write(0, &[REG_MONTH]);
        c.read(1, &mut b);
        assert!((0x01..=0x12).contains(&b[0]) && b[0] & 0x0f <= 9);
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        c.read(1, &mut b);
        assert_eq!(b[0], 0x5a);
        assert_eq!(bcd(2026 / 100), 0x20);
        assert_eq!(bcd(59), 0x59);
    }
}
