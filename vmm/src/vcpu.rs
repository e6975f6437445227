//! vCPU threads: the KVM_RUN loop and exit dispatch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use tinyvmm_devices::{ExitReason, ExitSignal, MmioBus, PioBus};
use vmm_sys_util::signal::{register_signal_handler, Killable};

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler; KVM_RUN returns EINTR when the signal lands.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), handle_kick).map_err(std::io::Error::other)
}

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_INTERNAL_ERROR_SIMUL_EX: u32 = 2;
const KVM_INTERNAL_ERROR_DELIVERY_EV: u32 = 3;

/// The buses a vCPU's I/O exits reach.
#[derive(Debug, Clone)]
pub struct Buses {
    /// Port I/O (`KVM_EXIT_IO`).
    pub pio: Arc<PioBus>,
    /// Memory-mapped I/O (`KVM_EXIT_MMIO`).
    pub mmio: Arc<MmioBus>,
}

/// One vCPU and what its exits reach.
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    bus: Buses,
    exit: ExitSignal,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("index", &self.index).finish()
    }
}

impl Vcpu {
    /// Wraps a configured vCPU.
    pub fn new(fd: VcpuFd, index: u8, bus: Buses, exit: ExitSignal, stop: Arc<AtomicBool>) -> Self {
        Self {
            fd,
            index,
            bus,
            exit,
            stop,
        }
    }

    fn rip(&self) -> String {
        match self.fd.get_regs() {
            Ok(r) => format!("{:#x}", r.rip),
            Err(_) => "unknown".into(),
        }
    }

    fn internal_error(&mut self) -> String {
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the kvm_run exit
        // union is the one KVM filled in.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let what = match suberror {
            KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
            KVM_INTERNAL_ERROR_SIMUL_EX => "exception during exception delivery",
            KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failure",
            _ => "unknown",
        };
        format!(
            "KVM internal error (suberror {suberror}: {what}) at RIP {}",
            self.rip()
        )
    }

    /// Runs the vCPU until the VM stops; records why it stopped on the exit signal.
    pub fn run(mut self) {
        tracing::debug!(vcpu = self.index, "vCPU running");
        while !self.stop.load(Ordering::Acquire) {
            let outcome = match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !self.bus.pio.write(port, data) {
                        tracing::trace!(port, ?data, "write to unclaimed port");
                    }
                    None
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.bus.pio.read(port, data) {
                        tracing::trace!(port, "read of unclaimed port");
                    }
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.bus.mmio.read(addr, data) {
                        tracing::trace!(addr, "read of unclaimed MMIO");
                    }
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !self.bus.mmio.write(addr, data) {
                        tracing::trace!(addr, "write to unclaimed MMIO");
                    }
                    None
                }
                Ok(VcpuExit::Hlt) => Some(ExitReason::VcpuFault(format!(
                    "vCPU {} halted with interrupts off (KVM_EXIT_HLT) at RIP {}",
                    self.index,
                    self.rip()
                ))),
                Ok(VcpuExit::Shutdown) => Some(ExitReason::VcpuFault(format!(
                    "vCPU {}: guest shut down the CPU (KVM_EXIT_SHUTDOWN, e.g. a triple fault) at RIP {}",
                    self.index,
                    self.rip()
                ))),
                Ok(VcpuExit::InternalError) => {
                    let index = self.index;
                    let what = self.internal_error();
                    Some(ExitReason::VcpuFault(format!("vCPU {index}: {what}")))
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::VcpuFault(format!(
                    "vCPU {}: KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x} on host CPU {cpu}) at RIP {}",
                    self.index,
                    self.rip()
                ))),
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                        Some(ExitReason::GuestReset)
                    }
                    KVM_SYSTEM_EVENT_CRASH => Some(ExitReason::VcpuFault(format!(
                        "vCPU {}: guest crashed (KVM_SYSTEM_EVENT_CRASH) at RIP {}",
                        self.index,
                        self.rip()
                    ))),
                    other => Some(ExitReason::VcpuFault(format!(
                        "vCPU {}: unhandled KVM system event {other} at RIP {}",
                        self.index,
                        self.rip()
                    ))),
                },
                Ok(VcpuExit::Intr) => None,
                Ok(other) => {
                    let what = format!("{other:?}");
                    Some(ExitReason::VcpuFault(format!(
                        "vCPU {}: unhandled KVM exit {what} at RIP {}",
                        self.index,
                        self.rip()
                    )))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(ExitReason::VcpuFault(format!(
                    "vCPU {}: KVM_RUN failed: {e} at RIP {}",
                    self.index,
                    self.rip()
                ))),
            };
            if let Some(reason) = outcome {
                self.exit.request(reason);
                break;
            }
        }
        tracing::debug!(vcpu = self.index, "vCPU stopped");
    }
}

/// Stops running vCPU threads: sets the stop flag and kicks each thread out of KVM_RUN
/// until it has returned (a kick can land before the thread enters KVM_RUN, so it is
/// repeated), giving up after `timeout`.
pub fn stop_vcpus(stop: &AtomicBool, threads: Vec<JoinHandle<()>>, timeout: Duration) {
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + timeout;
    for t in threads {
        while !t.is_finished() && Instant::now() < deadline {
            let _ = t.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(2));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            tracing::warn!("a vCPU thread did not stop in time");
        }
    }
}
