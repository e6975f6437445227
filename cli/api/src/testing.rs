//! Backends for tests. [`FakeControlPlane`]: knobs and counters in memory, with the
//! engine's validation (`Knobs::updated`), two guests, and `run = 2` unmerging everything.
//! [`FakeVm`]: a VM for the VM API.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use tinyvmm_merge::host::{DomainId, GuestId};
use tinyvmm_merge::{Counters, GuestCounters, Knobs, KnobsUpdate, RunMode};

use crate::vm::{MergeInfo, ShareMemory, VmAction, VmControl, VmInfo, VmState};
use crate::vm_balloon::{BalloonInfo, BalloonStatistics, BalloonUpdate};
use crate::{ApiError, ControlPlane, GuestInfo, KsmState};

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// A fresh directory whose name has `tag`, this process's id and a counter.
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "tinyvmm-api-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The test backend.
#[derive(Debug)]
pub struct FakeControlPlane {
    state: Mutex<FakeState>,
    /// Updates applied (accepted ones only).
    pub updates: AtomicU64,
    /// Calls of any kind.
    pub calls: AtomicU64,
    /// While set, every call answers `Unavailable`.
    pub unavailable: AtomicBool,
}

#[derive(Debug, Clone)]
struct FakeState {
    knobs: Knobs,
    counters: Counters,
    guests: Vec<GuestInfo>,
}

fn guest(id: u32, name: &str, group: &str, merging: u64, zero: u64) -> GuestInfo {
    GuestInfo {
        counters: GuestCounters {
            id: GuestId(id),
            domain: DomainId(u32::from(group != "default")),
            pages: 65536,
            merging_pages: merging,
            zero_pages: zero,
            unshared_pages: 100,
            volatile_pages: 7,
            profit: ((merging + zero) * 4096) as i64 - 8192,
            vma_mappings: 12,
            vma_budget: 30000,
            failed: false,
        },
        pid: 1000 + id,
        name: name.to_string(),
        share_group: group.to_string(),
        uid: 0,
        share_group_uids: vec![0],
        agent: tinyvmm_merge_protocol::AgentStats {
            protect_batches: 40,
            protect_p50_ns: 90_000,
            protect_p99_ns: 900_000,
            protect_max_ns: 1_200_000,
            blocked_writes: 3,
            vma_count: 140,
            pages_reported: 0,
        },
    }
}

impl Default for FakeControlPlane {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeControlPlane {
    /// Default knobs, some merged pages, guests 1 ("vm-a") and 2 ("vm \"b\"").
    pub fn new() -> Self {
        let counters = Counters {
            pages_shared: 1000,
            pages_sharing: 3000,
            pages_unshared: 200,
            pages_volatile: 14,
            full_scans: 5,
            pages_scanned: 655360,
            zero_pages: 2000,
            general_profit: 5000 * 4096 - 16384,
            merges: 4000,
            pool_frames: 1000,
            guests: 2,
            metadata_bytes: 16384,
            ..Counters::default()
        };
        FakeControlPlane {
            state: Mutex::new(FakeState {
                knobs: Knobs::default(),
                counters,
                guests: vec![
                    guest(1, "vm-a", "default", 2000, 1000),
                    guest(2, "vm \"b\"", "default", 2000, 1000),
                ],
            }),
            updates: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            unavailable: AtomicBool::new(false),
        }
    }

    /// Makes guest `id` a VM of `uid` whose share group `members` share.
    pub fn set_guest_owner(&self, id: u32, uid: u32, members: Vec<u32>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for g in st.guests.iter_mut().filter(|g| g.counters.id.0 == id) {
            g.uid = uid;
            g.share_group_uids = members.clone();
        }
    }

    /// The knobs now.
    pub fn knobs(&self) -> Knobs {
        self.lock().knobs
    }

    /// Advances the counters as a scan round would.
    pub fn tick(&self, pages: u64) {
        let mut s = self.lock();
        s.counters.pages_scanned += pages;
        s.counters.full_scans += 1;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self) -> Result<(), ApiError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.unavailable.load(Ordering::Relaxed) {
            return Err(ApiError::Unavailable("the daemon is stopping".into()));
        }
        Ok(())
    }

    fn state_of(s: &FakeState) -> KsmState {
        KsmState {
            knobs: s.knobs,
            counters: s.counters,
            pool_bytes: s.counters.pages_shared * 4096,
            engine_metadata_bytes: s.counters.metadata_bytes,
        }
    }
}

impl ControlPlane for FakeControlPlane {
    fn ksm(&self) -> Result<KsmState, ApiError> {
        self.check()?;
        Ok(Self::state_of(&self.lock()))
    }

    fn update_knobs(&self, upd: KnobsUpdate) -> Result<KsmState, ApiError> {
        self.check()?;
        let mut s = self.lock();
        let knobs = s
            .knobs
            .updated(&upd)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        s.knobs = knobs;
        if knobs.run == RunMode::Unmerge {
            s.counters.pages_shared = 0;
            s.counters.pages_sharing = 0;
            s.counters.zero_pages = 0;
            s.counters.general_profit = 0;
            for g in &mut s.guests {
                g.counters.merging_pages = 0;
                g.counters.zero_pages = 0;
                g.counters.profit = 0;
            }
        }
        self.updates.fetch_add(1, Ordering::Relaxed);
        Ok(Self::state_of(&s))
    }

    fn guests(&self) -> Result<Vec<GuestInfo>, ApiError> {
        self.check()?;
        Ok(self.lock().guests.clone())
    }
}

/// A [`VmControl`] for tests: a fixed VM (2 vCPUs, 256 MiB, enrolled with a daemon as
/// guest 7) that counts the actions it is asked for.
#[derive(Debug, Default)]
pub struct FakeVm {
    /// Shutdowns requested.
    pub shutdowns: AtomicU64,
    /// Calls of any kind.
    pub calls: AtomicU64,
    /// The balloon's target, MiB (the fake balloon is always at its target).
    pub balloon_mib: AtomicU64,
}

impl FakeVm {
    /// A running VM, no action taken yet.
    pub fn new() -> Self {
        Self::default()
    }
}

impl VmControl for FakeVm {
    fn info(&self) -> Result<VmInfo, ApiError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let stopping = self.shutdowns.load(Ordering::Relaxed) > 0;
        Ok(VmInfo {
            state: if stopping {
                VmState::Stopping
            } else {
                VmState::Running
            },
            pid: 4242,
            vcpus: 2,
            mem_bytes: 256 << 20,
            kernel: "builtin".into(),
            uptime_ms: 1234,
            share_memory: ShareMemory::Tinyvmm,
            merge: Some(MergeInfo {
                registered: true,
                guest_id: Some(7),
                registrations: 1,
                requests: 50,
                pool_mapped_pages: 3000,
                pages: 65536,
                protect_p50_ns: 20_000,
                protect_p99_ns: 90_000,
                protect_max_ns: 150_000,
                blocked_writes: 3,
                vma_count: 180,
            }),
        })
    }

    fn act(&self, action: VmAction) -> Result<(), ApiError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match action {
            VmAction::Shutdown => self.shutdowns.fetch_add(1, Ordering::Relaxed),
        };
        Ok(())
    }

    fn balloon(&self) -> Result<BalloonInfo, ApiError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mib = self.balloon_mib.load(Ordering::Relaxed);
        Ok(BalloonInfo {
            amount_mib: mib,
            target_pages: (mib * 256) as u32,
            actual_pages: (mib * 256) as u32,
            actual_mib: mib,
            deflate_on_oom: true,
            active: true,
            inflated_pages: mib * 256,
            deflated_pages: 0,
            reported_pages: 1000,
            reports: 20,
            bad_ranges: 0,
            discard_failures: 0,
        })
    }

    fn set_balloon(&self, update: BalloonUpdate) -> Result<(), ApiError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.balloon_mib.store(update.amount_mib, Ordering::Relaxed);
        Ok(())
    }

    fn balloon_statistics(&self) -> Result<BalloonStatistics, ApiError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mib = self.balloon_mib.load(Ordering::Relaxed);
        Ok(BalloonStatistics {
            target_pages: (mib * 256) as u32,
            actual_pages: (mib * 256) as u32,
            target_mib: mib,
            actual_mib: mib,
            age_ms: 5,
            swap_in: Some(0),
            swap_out: Some(0),
            major_faults: Some(1),
            minor_faults: Some(100),
            free_memory: Some(64 << 20),
            total_memory: Some(256 << 20),
            available_memory: Some(100 << 20),
            disk_caches: Some(8 << 20),
            hugetlb_allocations: Some(0),
            hugetlb_failures: Some(0),
        })
    }
}
