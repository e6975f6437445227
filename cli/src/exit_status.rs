//! The `tinyvmm run` process's exit status: the binary's policy, not the VMM's.

use tinyvmm_vmm::ExitReason;

/// The exit status for a VM that stopped for `reason`: 0 for a guest reset, a signal or a
/// requested shutdown; 1 for a vCPU fault; `(v << 1) | 1` for the value `v` the guest
/// wrote to the debug-exit port (QEMU's isa-debug-exit convention).
pub fn exit_status(reason: &ExitReason) -> u8 {
    match reason {
        ExitReason::GuestReset | ExitReason::Signal(_) | ExitReason::Requested => 0,
        ExitReason::DebugExit(v) => (v << 1) | 1,
        ExitReason::VcpuFault(_) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_isa_debug_exit() {
        assert_eq!(exit_status(&ExitReason::DebugExit(1)), 3);
        assert_eq!(exit_status(&ExitReason::GuestReset), 0);
        assert_eq!(exit_status(&ExitReason::Requested), 0);
        assert_eq!(exit_status(&ExitReason::Signal(15)), 0);
        assert_eq!(exit_status(&ExitReason::VcpuFault("x".into())), 1);
    }
}
