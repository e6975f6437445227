//! The unstable set's compact open-addressing table. Its keys are agent-reported page
//! hashes, so a key's place (home slot and tag) is its [`HashKey`] hash, never the value
//! itself: an agent cannot aim values at one probe cluster (see `keyed.rs`).

use crate::keyed::HashKey;

const EMPTY: u64 = 0;
const TOMB: u64 = 1;

/// A reference to a guest page: guest slot and gfn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PageRef {
    pub slot: u32,
    pub gfn: u32,
}

/// A key's keyed hash: its low bits give the home slot, its top 16 bits the tag.
#[derive(Clone, Copy)]
struct Placed(u64);

impl Placed {
    fn tag(self) -> u64 {
        self.0 >> 48
    }

    fn entry(self, r: PageRef) -> u64 {
        debug_assert!(r.slot < 0xffff);
        self.tag() << 48 | u64::from(r.slot + 1) << 32 | u64::from(r.gfn)
    }
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
/// Entries are placed by the keyed hash of their recorded hash (module doc).
pub(crate) struct UnstableTable {
    slots: Vec<u64>,
    live: usize,
    tombs: usize,
    key: HashKey,
}

impl UnstableTable {
    /// An empty table whose entries are placed under `key`.
    pub fn new(key: HashKey) -> Self {
        UnstableTable {
            slots: Vec::new(),
            live: 0,
            tombs: 0,
            key,
        }
    }

    fn place(&self, h: u64) -> Placed {
        Placed(self.key.hash(h))
    }

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
        let p = self.place(h);
        let t = p.tag();
        let mut i = p.0 as usize & self.mask();
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
        let p = self.place(h);
        let mut i = p.0 as usize & self.mask();
        loop {
            let e = self.slots[i];
            if e == EMPTY || e == TOMB {
                if e == TOMB {
                    self.tombs -= 1;
                }
                self.slots[i] = p.entry(r);
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
        let p = self.place(h);
        let want = p.entry(r);
        let mut i = p.0 as usize & self.mask();
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
                let p = self.place(hash_of(r));
                let mut i = p.0 as usize & self.mask();
                while self.slots[i] != EMPTY {
                    i = (i + 1) & self.mask();
                }
                self.slots[i] = p.entry(r);
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
        let mut t = UnstableTable::new(HashKey::fixed(1));
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

    /// Values an agent could aim at one home slot of the old fixed mixer (murmur's
    /// finalizer, invertible): under the keyed hash they scatter, so no probe cluster is
    /// longer than a table of random keys would have.
    #[test]
    fn values_aimed_at_one_slot_do_not_cluster() {
        fn inverse(m: u64) -> u64 {
            // Newton's iteration for the inverse of an odd number mod 2^64.
            let mut x = m;
            for _ in 0..6 {
                x = x.wrapping_mul(2u64.wrapping_sub(m.wrapping_mul(x)));
            }
            x
        }
        let unmix = |y: u64| {
            let y = y ^ (y >> 33);
            let y = y.wrapping_mul(inverse(0xff51_afd7_ed55_8ccd));
            y ^ (y >> 33)
        };
        let aimed: Vec<u64> = (1..=4096u64).map(|i| unmix(i << 20)).collect();
        let mut t = UnstableTable::new(HashKey::random());
        let hash_of = |r: PageRef| aimed[r.gfn as usize];
        for g in 0..aimed.len() as u32 {
            t.insert(aimed[g as usize], PageRef { slot: 0, gfn: g }, hash_of);
        }
        let mut longest = 0;
        let mut run = 0;
        for &e in t.slots.iter().chain(t.slots.iter()) {
            run = if e == EMPTY { 0 } else { run + 1 };
            longest = longest.max(run);
        }
        assert!(longest < 200, "a probe cluster of {longest} entries");
    }
}
