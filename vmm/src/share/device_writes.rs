//! Pages the VMM's own devices wrote into guest RAM.
//!
//! KVM's dirty log only sees writes made by the guest's vCPUs. A virtio device writes guest
//! RAM from its worker thread (a disk read landing in a guest buffer), through the same
//! host mapping but outside KVM. Those pages changed just as much, so each device reports
//! every range it wrote ([`GuestWrites`]) and [`DeviceWrites`] keeps them in an atomic page
//! bitmap (in the merge agent's page-index order) that the agent drains together with the
//! dirty log at every harvest: a device-written page is re-digested like a guest-written one.
//!
//! A write into a page that is merged (mapped from the pool) needs nothing more: the mapping
//! is `MAP_PRIVATE`, so the device thread's store (or the kernel's copy for a `read(2)`
//! into it) takes the kernel's copy-on-write fault like a guest write does, the page gets a
//! private copy, and the agent's pagemap check ([`super::pages::SharedRam::split_pages`])
//! reports it split. A write into a page under userfaultfd write protection (being merged)
//! waits for the agent to lift the protection, exactly as a vCPU would.
//!
//! Without memory sharing nobody drains the bitmap: [`DeviceWrites::disabled`] records
//! nothing.

use std::sync::atomic::{AtomicU64, Ordering};

use tinyvmm_devices::virtio::GuestWrites;

use super::bitmap::Bitmap;

const PAGE: u64 = 4096;

/// One RAM slot: guest-physical start, length, index of its first page.
#[derive(Debug, Clone, Copy)]
struct Slot {
    gpa: u64,
    len: u64,
    first: u64,
}

/// The pages devices wrote since the last harvest.
#[derive(Debug)]
pub struct DeviceWrites {
    slots: Vec<Slot>,
    words: Vec<AtomicU64>,
}

impl DeviceWrites {
    /// Records writes into RAM made of `slots` (guest-physical start and length, in
    /// page-index order, as the agent numbers pages).
    pub fn new(slots: &[(u64, u64)]) -> Self {
        let mut first = 0;
        let slots: Vec<Slot> = slots
            .iter()
            .map(|&(gpa, len)| {
                let s = Slot { gpa, len, first };
                first += len / PAGE;
                s
            })
            .collect();
        let words = (0..first.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self { slots, words }
    }

    /// Records nothing (no memory sharing).
    pub fn disabled() -> Self {
        Self {
            slots: Vec::new(),
            words: Vec::new(),
        }
    }

    fn mark_page(&self, page: u64) {
        if let Some(w) = self.words.get((page / 64) as usize) {
            w.fetch_or(1 << (page % 64), Ordering::Release);
        }
    }

    /// Moves the recorded pages into `into` (bit k = page k) and forgets them.
    pub fn drain_into(&self, into: &mut Bitmap) {
        for (k, w) in self.words.iter().enumerate() {
            let bits = w.swap(0, Ordering::AcqRel);
            if bits != 0 {
                into.or_word(k as u64 * 64, bits);
            }
        }
    }
}

impl GuestWrites for DeviceWrites {
    fn wrote(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let Some(end) = gpa.checked_add(len) else {
            return;
        };
        for s in &self.slots {
            let lo = gpa.max(s.gpa);
            let hi = end.min(s.gpa + s.len);
            if lo >= hi {
                continue;
            }
            for p in (lo - s.gpa) / PAGE..=(hi - 1 - s.gpa) / PAGE {
                self.mark_page(s.first + p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(w: &DeviceWrites, pages: u64) -> Vec<u64> {
        let mut b = Bitmap::new(pages);
        w.drain_into(&mut b);
        (0..pages).filter(|&p| b.get(p)).collect()
    }

    #[test]
    fn marks_every_page_a_range_touches_in_agent_page_order() {
        // Two slots: [0, 16 KiB) and [4 GiB, 4 GiB + 8 KiB), pages 0-3 and 4-5.
        let w = DeviceWrites::new(&[(0, 4 * PAGE), (1 << 32, 2 * PAGE)]);
        w.wrote(PAGE - 1, 2);
        w.wrote((1 << 32) + PAGE + 5, 1);
        w.wrote(3 * PAGE, PAGE);
        assert_eq!(drained(&w, 6), vec![0, 1, 3, 5]);
        assert_eq!(drained(&w, 6), Vec::<u64>::new(), "drained once");
        // Outside RAM, empty or wrapping: nothing.
        w.wrote(4 * PAGE, PAGE);
        w.wrote(PAGE, 0);
        w.wrote(u64::MAX - 1, 4);
        assert_eq!(drained(&w, 6), Vec::<u64>::new());
    }

    #[test]
    fn disabled_records_nothing() {
        let w = DeviceWrites::disabled();
        w.wrote(0, 1 << 20);
        assert_eq!(drained(&w, 256), Vec::<u64>::new());
    }
}
