//! [`SimFleet::check`]: everything the fleet can verify on its own.

use std::collections::BTreeMap;

use super::guest::{joined, PRIVATE};
use super::SimFleet;
use crate::host::{DomainId, PAGE_SIZE};

impl SimFleet {
    /// Checks everything the fleet can check on its own: the violations recorded so far,
    /// every page against what its guest last wrote (with shadows), readers and mapping
    /// counts recounted, limits respected, no page reading a free frame or another
    /// domain's frame. Returns the problems found.
    pub fn check(&self) -> Vec<String> {
        let mut v = self.violations.clone();
        let mut readers: BTreeMap<DomainId, Vec<u32>> = self
            .pools
            .iter()
            .map(|(d, p)| (*d, vec![0; p.live.len()]))
            .collect();
        for (id, g) in &self.guests {
            let pool = &self.pools[&g.domain];
            let n = g.map.len();
            let mut vmas = 1;
            for i in 0..n {
                if i > 0 && !joined(g.map[i - 1], g.map[i]) {
                    vmas += 1;
                }
                let m = g.map[i];
                if m != 0 && g.flags[i] & PRIVATE == 0 {
                    let f = (m - 1) as usize;
                    readers.get_mut(&g.domain).expect("pool")[f] += 1;
                    if !pool.live[f] {
                        v.push(format!("{id} gfn {i} reads free frame {f}"));
                    }
                }
                if let Some(s) = &g.shadow {
                    if g.page(pool, i) != &s[i * PAGE_SIZE..(i + 1) * PAGE_SIZE] {
                        v.push(format!("{id} gfn {i} lost data (mapping {m})"));
                    }
                }
            }
            if vmas != g.vmas {
                v.push(format!("{id} vma count {} != recount {vmas}", g.vmas));
            }
            if g.vmas > g.vma_limit {
                v.push(format!(
                    "{id} uses {} mappings > limit {}",
                    g.vmas, g.vma_limit
                ));
            }
        }
        for (d, p) in &self.pools {
            if readers[d] != p.readers {
                v.push(format!("domain {} reader counts drifted", d.0));
            }
        }
        v
    }
}
