//! A domain's pool: frames with real bytes, whether each is populated, and how many guest
//! pages read it (map it and hold no private copy).

use crate::host::PAGE_SIZE;

#[derive(Default)]
pub(super) struct SimPool {
    pub(super) bytes: Vec<u8>,
    pub(super) live: Vec<bool>,
    pub(super) readers: Vec<u32>,
}

impl SimPool {
    /// Grows the pool so that frame `f` exists.
    pub(super) fn ensure(&mut self, f: usize) {
        if f >= self.live.len() {
            self.live.resize(f + 1, false);
            self.readers.resize(f + 1, 0);
            self.bytes.resize((f + 1) * PAGE_SIZE, 0);
        }
    }

    pub(super) fn frame(&self, f: usize) -> &[u8] {
        &self.bytes[f * PAGE_SIZE..(f + 1) * PAGE_SIZE]
    }
}
