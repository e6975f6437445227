//! The VM API's backend for a real VM: [`LiveVm`] reads the merge agent's published status
//! and records exit requests on the VMM's [`ExitSignal`]; it holds no VM state of its own.

use std::time::Instant;

use tinyvmm_api::vm::{MergeInfo, ShareMemory, VmAction, VmControl, VmInfo, VmState};
use tinyvmm_api::vm_balloon::{BalloonInfo, BalloonStatistics, BalloonUpdate};
use tinyvmm_api::ApiError;
use tinyvmm_vmm::share::{AgentStatus, AgentStatusHandle};
use tinyvmm_vmm::virtio::balloon::BalloonHandle;
use tinyvmm_vmm::{ExitReason, ExitSignal};

/// What `GET /vm` shows of the merge agent.
fn merge_info(s: &AgentStatus) -> MergeInfo {
    MergeInfo {
        registered: s.registered,
        guest_id: s.guest_id,
        registrations: s.registrations,
        requests: s.requests,
        pool_mapped_pages: s.pool_mapped_pages,
        pages: s.pages,
        protect_p50_ns: s.stats.protect_p50_ns,
        protect_p99_ns: s.stats.protect_p99_ns,
        protect_max_ns: s.stats.protect_max_ns,
        blocked_writes: s.stats.blocked_writes,
        vma_count: s.stats.vma_count,
    }
}

/// What `GET /vm` reports that never changes while the VM runs.
#[derive(Debug, Clone)]
pub struct VmDescription {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// The kernel as given on the command line.
    pub kernel: String,
    /// How guest RAM is offered for merging.
    pub share_memory: ShareMemory,
}

/// The [`VmControl`] of a real VM: reads the merge agent's published status and records
/// exit requests on the VMM's [`ExitSignal`]; it holds no VM state of its own.
#[derive(Debug)]
pub struct LiveVm {
    desc: VmDescription,
    exit: ExitSignal,
    agent: Option<AgentStatusHandle>,
    balloon: Option<BalloonHandle>,
    started: Instant,
}

impl LiveVm {
    /// The VM described by `desc`, stopped through `exit`, with the status of its merge
    /// agent if it has one. Uptime counts from now.
    pub fn new(desc: VmDescription, exit: ExitSignal, agent: Option<AgentStatusHandle>) -> Self {
        LiveVm {
            desc,
            exit,
            agent,
            balloon: None,
            started: Instant::now(),
        }
    }

    /// The VM has a balloon, reached through `handle`.
    pub fn with_balloon(mut self, handle: BalloonHandle) -> Self {
        self.balloon = Some(handle);
        self
    }

    fn balloon_handle(&self) -> Result<&BalloonHandle, ApiError> {
        self.balloon
            .as_ref()
            .ok_or_else(tinyvmm_api::vm_balloon::no_balloon)
    }
}

const PAGES_PER_MIB: u64 = 256;

impl VmControl for LiveVm {
    fn info(&self) -> Result<VmInfo, ApiError> {
        let merge = self.agent.as_ref().map(|a| {
            let status = a.lock().unwrap_or_else(|p| p.into_inner());
            merge_info(&status)
        });
        Ok(VmInfo {
            state: if self.exit.reason().is_some() {
                VmState::Stopping
            } else {
                VmState::Running
            },
            pid: std::process::id(),
            vcpus: self.desc.vcpus,
            mem_bytes: self.desc.mem_bytes,
            kernel: self.desc.kernel.clone(),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            share_memory: self.desc.share_memory,
            merge,
        })
    }

    fn act(&self, action: VmAction) -> Result<(), ApiError> {
        match action {
            VmAction::Shutdown => {
                tracing::info!("shutdown requested through the VM API");
                self.exit.request(ExitReason::Requested);
            }
        }
        Ok(())
    }

    fn balloon(&self) -> Result<BalloonInfo, ApiError> {
        let s = self.balloon_handle()?.status();
        Ok(BalloonInfo {
            amount_mib: u64::from(s.target_pages) / PAGES_PER_MIB,
            target_pages: s.target_pages,
            actual_pages: s.actual_pages,
            actual_mib: u64::from(s.actual_pages) / PAGES_PER_MIB,
            deflate_on_oom: s.deflate_on_oom,
            active: s.active,
            inflated_pages: s.counters.inflated_pages,
            deflated_pages: s.counters.deflated_pages,
            reported_pages: s.counters.reported_pages,
            reports: s.counters.reports,
            bad_ranges: s.counters.bad_ranges,
            discard_failures: s.counters.discard_failures,
        })
    }

    fn set_balloon(&self, update: BalloonUpdate) -> Result<(), ApiError> {
        let pages = update.amount_mib * PAGES_PER_MIB;
        let pages = u32::try_from(pages).map_err(|_| {
            ApiError::BadRequest(format!("amount_mib {} is too large", update.amount_mib))
        })?;
        tracing::info!(pages, "balloon target set through the VM API");
        self.balloon_handle()?
            .set_target_pages(pages)
            .map_err(|e| ApiError::Unavailable(format!("cannot tell the balloon: {e}")))
    }

    fn balloon_statistics(&self) -> Result<BalloonStatistics, ApiError> {
        let h = self.balloon_handle()?;
        let s = h.status();
        let mut out = BalloonStatistics {
            target_pages: s.target_pages,
            actual_pages: s.actual_pages,
            target_mib: u64::from(s.target_pages) / PAGES_PER_MIB,
            actual_mib: u64::from(s.actual_pages) / PAGES_PER_MIB,
            ..Default::default()
        };
        let Some((stats, at)) = h.statistics() else {
            return Err(ApiError::NotFound(
                "the guest has sent no balloon statistics yet".into(),
            ));
        };
        out.age_ms = u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX);
        out.swap_in = stats.get("swap_in");
        out.swap_out = stats.get("swap_out");
        out.major_faults = stats.get("major_faults");
        out.minor_faults = stats.get("minor_faults");
        out.free_memory = stats.get("free_memory");
        out.total_memory = stats.get("total_memory");
        out.available_memory = stats.get("available_memory");
        out.disk_caches = stats.get("disk_caches");
        out.hugetlb_allocations = stats.get("hugetlb_allocations");
        out.hugetlb_failures = stats.get("hugetlb_failures");
        Ok(out)
    }
}
