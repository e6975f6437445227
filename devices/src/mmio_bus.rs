//! The MMIO bus: a map from guest-physical ranges to devices, reached through
//! `KVM_EXIT_MMIO`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::bus::lock;
use crate::virtio::mmio::MmioDevice;

/// Errors building the bus.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MmioBusError {
    /// Two devices claim overlapping ranges, or a range is empty or wraps.
    #[error("MMIO range {base:#x}+{len:#x} is empty or overlaps an existing device")]
    Overlap {
        /// Start of the new range.
        base: u64,
        /// Length of the new range.
        len: u64,
    },
}

struct Range {
    len: u64,
    device: Arc<Mutex<dyn MmioDevice>>,
}

/// The MMIO devices of one VM. Accesses nobody claims read as all ones and are dropped.
#[derive(Default)]
pub struct MmioBus {
    ranges: BTreeMap<u64, Range>,
}

impl std::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.ranges.iter().map(|(b, r)| (*b, r.len)).collect();
        f.debug_struct("MmioBus").field("ranges", &ranges).finish()
    }
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `len` bytes from `base` for `device`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn MmioDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), MmioBusError> {
        let err = MmioBusError::Overlap { base, len };
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(err.clone())?;
        if let Some((b, r)) = self.ranges.range(..end).next_back() {
            if b + r.len > base {
                return Err(err);
            }
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Range)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        (addr - base < range.len).then_some((addr - base, range))
    }

    /// Dispatches a guest read at `addr`; returns whether a device claimed it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
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

    /// Dispatches a guest write at `addr`; returns whether a device claimed it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, range)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl MmioDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_offset_and_refuses_overlaps() {
        let mut bus = MmioBus::new();
        bus.insert(Arc::new(Mutex::new(Echo(1))), 0xd000_0000, 0x1000)
            .unwrap();
        bus.insert(Arc::new(Mutex::new(Echo(9))), 0xd000_1000, 0x1000)
            .unwrap();
        let mut b = [0u8; 4];
        assert!(bus.read(0xd000_0004, &mut b));
        assert_eq!(b, [5; 4]);
        assert!(bus.write(0xd000_1000, &[20]));
        assert!(bus.read(0xd000_1001, &mut b));
        assert_eq!(b, [21; 4]);
        assert!(!bus.read(0xd000_2000, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.read(0xcfff_ffff, &mut b));
        for (base, len) in [
            (0xd000_0800, 0x1000),
            (0xcfff_f001, 0x1000),
            (0x10, 0),
            (u64::MAX, 2),
        ] {
            assert!(bus
                .insert(Arc::new(Mutex::new(Echo(0))), base, len)
                .is_err());
        }
    }
}
