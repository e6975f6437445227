//! A fixed-size bitmap over guest pages.

/// One bit per page.
#[derive(Debug, Clone, Default)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    /// `len` bits, all clear.
    pub fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap has no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bit `i`.
    pub fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i` to `v`.
    pub fn set(&mut self, i: u64, v: bool) {
        let w = &mut self.words[(i / 64) as usize];
        if v {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }

    /// Sets every bit.
    pub fn set_all(&mut self) {
        self.words.fill(!0);
        let tail = self.len % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last = (1u64 << tail) - 1;
            }
        }
    }

    /// ORs `word` into the 64 bits starting at `first` (a multiple of 64).
    pub fn or_word(&mut self, first: u64, word: u64) {
        debug_assert_eq!(first % 64, 0);
        if let Some(w) = self.words.get_mut((first / 64) as usize) {
            *w |= word;
        }
    }

    /// ORs `bits` (bit k = page `first + k`) into the bitmap; `first` need not be aligned.
    pub fn or_bits(&mut self, first: u64, bits: &[u64]) {
        if first.is_multiple_of(64) {
            for (k, w) in bits.iter().enumerate() {
                self.or_word(first + k as u64 * 64, *w);
            }
            return;
        }
        for (k, w) in bits.iter().enumerate() {
            let mut w = *w;
            while w != 0 {
                let b = w.trailing_zeros() as u64;
                let i = first + k as u64 * 64 + b;
                if i < self.len {
                    self.set(i, true);
                }
                w &= w - 1;
            }
        }
    }

    /// Folds in a fresh harvest of written pages: pages in `seen` keep what they had and
    /// gain `fresh`; pages not in `seen` take `fresh` alone.
    pub fn fold_harvest(&mut self, seen: &Bitmap, fresh: &Bitmap) {
        for ((d, s), f) in self.words.iter_mut().zip(&seen.words).zip(&fresh.words) {
            *d = (*d & *s) | *f;
        }
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// The first set bit at or after `from`, if any.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let mut w = self.words[wi] & (!0u64 << (from % 64));
        loop {
            if w != 0 {
                let i = wi as u64 * 64 + w.trailing_zeros() as u64;
                return (i < self.len).then_some(i);
            }
            wi += 1;
            if wi >= self.words.len() {
                return None;
            }
            w = self.words[wi];
        }
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_next_and_unaligned_or() {
        let mut b = Bitmap::new(130);
        assert_eq!(b.next_set(0), None);
        b.set(3, true);
        b.set(129, true);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(4), Some(129));
        assert_eq!(b.count(), 2);
        b.set(3, false);
        assert_eq!(b.next_set(0), Some(129));
        let mut c = Bitmap::new(200);
        c.or_bits(10, &[0b101, 1]);
        assert!(c.get(10) && c.get(12) && c.get(74) && !c.get(11));
        c.set_all();
        assert_eq!(c.count(), 200);
        let mut seen = Bitmap::new(200);
        seen.set(5, true);
        let mut fresh = Bitmap::new(200);
        fresh.set(7, true);
        c.fold_harvest(&seen, &fresh);
        assert_eq!(c.count(), 2);
        assert!(c.get(5) && c.get(7));
    }
}
