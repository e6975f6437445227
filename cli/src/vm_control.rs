//! The VM API's backend for a real VM: [`LiveVm`] reads the merge agent's published status
//! and records exit requests on the VMM's [`ExitSignal`]; it holds no VM state of its own.

use std::time::Instant;

use tinyvmm_api::vm::{MergeInfo, ShareMemory, VmAction, VmControl, VmInfo, VmState};
use tinyvmm_api::ApiError;
use tinyvmm_vmm::share::{AgentStatus, AgentStatusHandle};
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
            started: Instant::now(),
        }
    }
}

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
}
