//! The port I/O bus: a map from port ranges to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through port I/O.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` from the device's base port.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Writes `data` at `offset` from the device's base port.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// Errors building the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// Two devices claim overlapping ports.
    #[error("port range {base:#x}+{len} overlaps an existing device")]
    Overlap {
        /// First port of the new range.
        base: u16,
        /// Length of the new range.
        len: u16,
    },
    /// An empty range.
    #[error("port range {base:#x} has length 0")]
    Empty {
        /// First port of the range.
        base: u16,
    },
}

struct Range {
    len: u16,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// The port I/O address space of one VM.
///
/// Reads of unclaimed ports return all ones (a floating ISA bus), writes to them are
/// dropped: Linux probes many legacy ports and must see "nothing there", quickly.
#[derive(Default)]
pub struct PioBus {
    ranges: BTreeMap<u16, Range>,
}

impl std::fmt::Debug for PioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.ranges.iter().map(|(b, r)| (*b, r.len)).collect();
        f.debug_struct("PioBus").field("ranges", &ranges).finish()
    }
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `len` ports from `base` for `device`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u16,
        len: u16,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty { base });
        }
        let end = u32::from(base) + u32::from(len);
        if let Some((b, r)) = self.ranges.range(..end as u16).next_back() {
            if u32::from(*b) + u32::from(r.len) > u32::from(base) {
                return Err(BusError::Overlap { base, len });
            }
        }
        if end > 0x1_0000 {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(u16, &Range)> {
        let (base, range) = self.ranges.range(..=port).next_back()?;
        (u32::from(port) < u32::from(*base) + u32::from(range.len)).then_some((port - base, range))
    }

    /// Dispatches a guest `in` to the device at `port`; returns whether one claimed it.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some((offset, range)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a guest `out` to the device at `port`; returns whether one claimed it.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some((offset, range)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device's state is plain registers,
/// and a panic elsewhere must not take the whole I/O path down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A device that accepts every access and does nothing (port 0x80 POST codes and the like).
#[derive(Debug, Default)]
pub struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u16, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u16, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_offset() {
        let mut bus = PioBus::new();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x3f8, 8)
            .unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 12);
        assert!(bus.write(0x3f8, &[20]));
        assert!(bus.read(0x3ff, &mut b));
        assert_eq!(b[0], 27);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(!bus.read(0x3f7, &mut b));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = PioBus::new();
        bus.insert(Arc::new(Mutex::new(Sink)), 0x60, 5).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Sink)), 0x64, 1).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Sink)), 0x5c, 5).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Sink)), 0x5b, 5).is_ok());
        assert!(bus.insert(Arc::new(Mutex::new(Sink)), 0x70, 0).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Sink)), 0xffff, 2).is_err());
    }
}
