//! The VM's buses: maps from address ranges to devices. One type serves both address
//! spaces: port I/O ([`PioBus`], 16-bit ports, `KVM_EXIT_IO`) and memory-mapped I/O
//! ([`MmioBus`], guest-physical addresses, `KVM_EXIT_MMIO`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus whose addresses are of type `A` (`u16` ports or `u64` guest-physical
/// addresses).
pub trait BusDevice<A = u16>: Send {
    /// Reads `data.len()` bytes at `offset` from the device's base address.
    fn read(&mut self, offset: A, data: &mut [u8]);
    /// Writes `data` at `offset` from the device's base address.
    fn write(&mut self, offset: A, data: &[u8]);
}

/// An address on a bus: a port or a guest-physical address.
pub trait BusAddress: Copy + Ord + Into<u64> + TryFrom<u64> + std::fmt::Debug {
    /// One past the last address of the space (`None`: the whole of `u64`).
    const SPACE_END: Option<u64>;
}

impl BusAddress for u16 {
    const SPACE_END: Option<u64> = Some(0x1_0000);
}

impl BusAddress for u64 {
    const SPACE_END: Option<u64> = None;
}

/// Errors building a bus.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// Two devices claim overlapping ranges, or a range runs past the address space.
    #[error("range {base:#x}+{len:#x} overlaps an existing device or leaves the address space")]
    Overlap {
        /// First address of the new range.
        base: u64,
        /// Length of the new range.
        len: u64,
    },
    /// An empty range.
    #[error("range {base:#x} has length 0")]
    Empty {
        /// First address of the range.
        base: u64,
    },
}

struct Range<A> {
    len: u64,
    device: Arc<Mutex<dyn BusDevice<A>>>,
}

/// One address space of one VM.
///
/// Reads nobody claims return all ones (a floating bus; Linux probes many legacy ports
/// and must see "nothing there", quickly), writes to them are dropped.
pub struct Bus<A> {
    ranges: BTreeMap<u64, Range<A>>,
}

/// The port I/O space.
pub type PioBus = Bus<u16>;
/// The memory-mapped I/O space.
pub type MmioBus = Bus<u64>;

impl<A> Default for Bus<A> {
    fn default() -> Self {
        Bus {
            ranges: BTreeMap::new(),
        }
    }
}

impl<A> std::fmt::Debug for Bus<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.ranges.iter().map(|(b, r)| (*b, r.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl<A: BusAddress> Bus<A> {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `len` addresses from `base` for `device`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice<A>>>,
        base: A,
        len: A,
    ) -> Result<(), BusError> {
        let (base, len): (u64, u64) = (base.into(), len.into());
        if len == 0 {
            return Err(BusError::Empty { base });
        }
        let overlap = BusError::Overlap { base, len };
        let end = base.checked_add(len).ok_or(overlap.clone())?;
        if A::SPACE_END.is_some_and(|space| end > space) {
            return Err(overlap);
        }
        if let Some((b, r)) = self.ranges.range(..end).next_back() {
            if b + r.len > base {
                return Err(overlap);
            }
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: A) -> Option<(A, &Range<A>)> {
        let addr: u64 = addr.into();
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        if offset >= range.len {
            return None;
        }
        Some((A::try_from(offset).ok()?, range))
    }

    /// Dispatches a guest read at `addr`; returns whether a device claimed it.
    pub fn read(&self, addr: A, data: &mut [u8]) -> bool {
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
    pub fn write(&self, addr: A, data: &[u8]) -> bool {
        match self.find(addr) {
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
    impl<A: BusAddress> BusDevice<A> for Echo {
        fn read(&mut self, offset: A, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset.into() as u8));
        }
        fn write(&mut self, _offset: A, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn ports_dispatch_by_range_and_offset() {
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
    fn ports_refuse_overlaps_empty_ranges_and_the_end_of_the_space() {
        let mut bus = PioBus::new();
        bus.insert(Arc::new(Mutex::new(Sink)), 0x60, 5).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Sink)), 0x64, 1).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Sink)), 0x5c, 5).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Sink)), 0x5b, 5).is_ok());
        assert!(bus.insert(Arc::new(Mutex::new(Sink)), 0x70, 0).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Sink)), 0xffff, 2).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Sink)), 0xffff, 1).is_ok());
    }

    #[test]
    fn mmio_dispatches_by_range_and_offset_and_refuses_overlaps() {
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
