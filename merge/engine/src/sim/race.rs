//! Race injection: a guest write queued to land during the next merge op on its page,
//! before write protection takes hold or after the map.

use super::SimFleet;
use crate::host::{Gfn, GuestId};

/// When an injected guest write lands during a merge op on its page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaceWhen {
    /// Before write protection takes hold, so before the compare or copy.
    BeforeCompare,
    /// After the map (the write was blocked by write protection until then): a COW split.
    AfterMap,
}

/// A guest write injected into the next merge op that touches its page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Race {
    /// The guest.
    pub guest: GuestId,
    /// The page.
    pub gfn: Gfn,
    /// When it lands.
    pub when: RaceWhen,
    /// The page's new content is `pattern(seed)`.
    pub seed: u64,
}

impl SimFleet {
    /// Queues a racing write.
    pub fn inject(&mut self, r: Race) {
        self.races.push(r);
    }

    /// Drops races that did not fire.
    pub fn clear_races(&mut self) {
        self.races.clear();
    }

    /// Lands the queued race on (`id`, `gfn`) at `when`, if there is one.
    pub(super) fn fire(&mut self, id: GuestId, gfn: usize, when: RaceWhen) {
        if self.races.is_empty() {
            return;
        }
        if let Some(k) = self
            .races
            .iter()
            .position(|r| r.guest == id && r.gfn == gfn as u64 && r.when == when)
        {
            let r = self.races.swap_remove(k);
            self.fill(id, r.gfn, r.seed);
            self.stats.races_fired += 1;
        }
    }
}
