//! Compact content indexes: the unstable set's open-addressing table and a pass-through
//! hasher for maps keyed by content hashes.

use std::hash::{BuildHasherDefault, Hasher};

/// A `Hasher` for keys that already are good 64-bit hashes (xxh3 of page content).
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        // Mix once so that test hashes with few distinct bits still spread.
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (n >> 29);
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
}

pub(crate) type IdBuild = BuildHasherDefault<IdHasher>;

const EMPTY: u64 = 0;
const TOMB: u64 = 1;

/// A reference to a guest page: guest slot and gfn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PageRef {
    pub slot: u32,
    pub gfn: u32,
}

fn mix(h: u64) -> u64 {
    let h = h ^ (h >> 33);
    let h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

fn tag(h: u64) -> u64 {
    mix(h) >> 48
}

fn entry(h: u64, r: PageRef) -> u64 {
    debug_assert!(r.slot < 0xffff);
    tag(h) << 48 | u64::from(r.slot + 1) << 32 | u64::from(r.gfn)
}

fn page_of(e: u64) -> PageRef {
    PageRef {
        slot: ((e >> 32) & 0xffff) as u32 - 1,
        gfn: e as u32,
    }
}

/// The unstable set: candidate pages keyed by their recorded hash, one `u64` per entry
/// (16-bit hash tag, guest slot, gfn). The full hash lives in the page's metadata; the
/// caller keeps the invariant "a page is in the table iff it is a candidate, under the
/// hash its metadata records", so the table can always be rehashed from the metadata.
#[derive(Default)]
pub(crate) struct UnstableTable {
    slots: Vec<u64>,
    live: usize,
    tombs: usize,
}

impl UnstableTable {
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn bytes(&self) -> usize {
        self.slots.capacity() * 8
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// First valid entry for `h` accepted by `ok`.
    pub fn find(&self, h: u64, mut ok: impl FnMut(PageRef) -> bool) -> Option<PageRef> {
        if self.live == 0 {
            return None;
        }
        let t = tag(h);
        let mut i = mix(h) as usize & self.mask();
        loop {
            let e = self.slots[i];
            if e == EMPTY {
                return None;
            }
            if e != TOMB && e >> 48 == t {
                let r = page_of(e);
                if ok(r) {
                    return Some(r);
                }
            }
            i = (i + 1) & self.mask();
        }
    }

    /// Inserts `r` under `h`; `hash_of` gives the recorded hash of any entry (for rehashing).
    pub fn insert(&mut self, h: u64, r: PageRef, hash_of: impl Fn(PageRef) -> u64) {
        if (self.live + self.tombs + 1) * 8 > self.slots.len() * 7 {
            let cap = if (self.live + 1) * 2 > self.slots.len() {
                (self.slots.len() * 2).max(64)
            } else {
                self.slots.len()
            };
            self.rehash(cap, &hash_of);
        }
        let mut i = mix(h) as usize & self.mask();
        loop {
            let e = self.slots[i];
            if e == EMPTY || e == TOMB {
                if e == TOMB {
                    self.tombs -= 1;
                }
                self.slots[i] = entry(h, r);
                self.live += 1;
                return;
            }
            i = (i + 1) & self.mask();
        }
    }

    /// Removes `r`, recorded under `h`. Returns whether it was there.
    pub fn remove(&mut self, h: u64, r: PageRef) -> bool {
        if self.live == 0 {
            return false;
        }
        let want = entry(h, r);
        let mut i = mix(h) as usize & self.mask();
        loop {
            let e = self.slots[i];
            if e == EMPTY {
                return false;
            }
            if e == want {
                self.slots[i] = TOMB;
                self.live -= 1;
                self.tombs += 1;
                return true;
            }
            i = (i + 1) & self.mask();
        }
    }

    fn rehash(&mut self, cap: usize, hash_of: &impl Fn(PageRef) -> u64) {
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; cap]);
        self.live = 0;
        self.tombs = 0;
        for e in old {
            if e != EMPTY && e != TOMB {
                let r = page_of(e);
                let h = hash_of(r);
                let mut i = mix(h) as usize & self.mask();
                while self.slots[i] != EMPTY {
                    i = (i + 1) & self.mask();
                }
                self.slots[i] = entry(h, r);
                self.live += 1;
            }
        }
    }

    /// Every entry (for audits).
    pub fn entries(&self) -> impl Iterator<Item = PageRef> + '_ {
        self.slots
            .iter()
            .filter(|&&e| e != EMPTY && e != TOMB)
            .map(|&e| page_of(e))
    }

    /// Whether the entry for `r` sits where `h` would find it (for audits).
    pub fn contains(&self, h: u64, r: PageRef) -> bool {
        self.find(h, |x| x == r).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_insert_find_remove_and_grow() {
        let hash_of = |r: PageRef| u64::from(r.gfn) % 7; // heavy collisions
        let mut t = UnstableTable::default();
        for g in 0..1000u32 {
            t.insert(
                hash_of(PageRef { slot: 1, gfn: g }),
                PageRef { slot: 1, gfn: g },
                hash_of,
            );
        }
        assert_eq!(t.len(), 1000);
        for g in 0..1000u32 {
            let r = PageRef { slot: 1, gfn: g };
            assert!(t.contains(hash_of(r), r));
        }
        for g in (0..1000u32).step_by(2) {
            let r = PageRef { slot: 1, gfn: g };
            assert!(t.remove(hash_of(r), r));
            assert!(!t.remove(hash_of(r), r));
        }
        assert_eq!(t.len(), 500);
        assert_eq!(t.entries().count(), 500);
        assert!(t
            .find(3, |r| r.gfn % 2 == 1 && u64::from(r.gfn) % 7 == 3)
            .is_some());
    }
}
