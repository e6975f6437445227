//! The tinyvmm virtual machine monitor: one VM with its vCPUs, guest RAM, legacy devices
//! and event loop, booted through the Linux 64-bit boot protocol.
//!
//! [`Vmm::new`] builds the VM (KVM VM with in-kernel irqchip and PIT, guest RAM, ACPI and MP
//! tables, kernel, initrd, boot parameters, configured vCPUs, devices on the port bus); [`Vmm::run`] starts
//! the vCPU threads and runs the event loop (serial input, signals, exit requests) until
//! the guest resets, a signal or the API asks to stop, or a vCPU hits an exit the VMM
//! cannot handle; it returns the [`ExitReason`], from which the process exit status comes.

#![warn(missing_docs)]

pub mod boot;
pub mod memory;
pub mod seccomp;
pub mod share;
mod signals;
pub mod vcpu;
pub mod virtio;
pub mod x86_64;

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use tinyvmm_devices::bus::Sink;
use tinyvmm_devices::cmos::{Cmos, CMOS_BASE, CMOS_LEN};
use tinyvmm_devices::debug_exit::{DebugExit, DEBUG_EXIT_PORT};
use tinyvmm_devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use tinyvmm_devices::serial::{SerialDevice, SerialInput, COM1_BASE, COM1_IRQ, UART_LEN};
use tinyvmm_devices::{MmioBus, PioBus};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use boot::{BootInfo, BootSpec, KernelFormat, KernelSource};
pub use memory::MemoryPolicy;
pub use tinyvmm_devices::serial::Stdout as SerialStdout;
pub use tinyvmm_devices::{ExitReason, ExitSignal};

use x86_64::cpuid::{filter_cpuid, CpuidContext};
use x86_64::layout::KVM_TSS_ADDRESS;

/// The default kernel command line.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodules i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";
/// The most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = x86_64::mptable::MAX_SUPPORTED_CPUS;

/// What to build.
pub struct VmConfig {
    /// Kernel, initrd, command line.
    pub boot: BootSpec,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// How guest RAM is offered for merging.
    pub memory_policy: MemoryPolicy,
    /// Track guest writes with KVM's dirty log on every RAM slot.
    pub dirty_log: bool,
    /// Where guest serial output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Where guest serial input comes from (a pollable fd), if anywhere.
    pub serial_in: Option<std::os::fd::RawFd>,
    /// Virtio devices, placed at consecutive virtio-mmio slots in list order.
    pub virtio_devices: Vec<virtio::BoxedDevice>,
    /// The seccomp filters that [`Vmm::run`] installs on the vCPU threads and, once they
    /// run, on the calling thread (the event loop); `None` runs unfiltered.
    pub seccomp: Option<Arc<seccomp::Filters>>,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("boot", &self.boot)
            .field("mem_size", &self.mem_size)
            .field("vcpus", &self.vcpus)
            .field("memory_policy", &self.memory_policy)
            .field("dirty_log", &self.dirty_log)
            .field(
                "virtio_devices",
                &self
                    .virtio_devices
                    .iter()
                    .map(|d| d.name())
                    .collect::<Vec<_>>(),
            )
            .field("seccomp", &self.seccomp.is_some())
            .finish()
    }
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` is missing or unusable.
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    Kvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    KvmIoctl {
        /// The operation.
        what: &'static str,
        /// The error from KVM.
        source: kvm_ioctls::Error,
    },
    /// A bad vCPU count.
    #[error("invalid vCPU count {0}: must be 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    /// Guest RAM could not be created.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Loading the kernel failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Setting up vCPU registers failed.
    #[error("vCPU setup: {0}")]
    Regs(#[from] x86_64::regs::RegsError),
    /// Writing the MP table failed.
    #[error(transparent)]
    Mptable(#[from] x86_64::mptable::MptableError),
    /// Building or writing the ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] x86_64::acpi::AcpiError),
    /// A host resource (eventfd, thread, epoll, signal) failed.
    #[error("{what}: {source}")]
    Host {
        /// The operation.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Virtio devices could not be attached.
    #[error(transparent)]
    Virtio(#[from] virtio::VirtioError),
    /// Devices could not be placed on the bus.
    #[error("device setup: {0}")]
    Bus(#[from] tinyvmm_devices::bus::BusError),
}

fn host(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Host { what, source }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::KvmIoctl { what, source }
}

/// One guest RAM slot as KVM sees it.
#[derive(Debug, Clone, Copy)]
pub struct RamSlot {
    /// KVM memory slot number.
    pub slot: u32,
    /// Guest-physical start.
    pub gpa: u64,
    /// Host virtual address of the start.
    pub hva: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A subscriber the caller adds to the VMM's event loop (API socket, merge agent, ...).
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// KVM's dirty log over the VM's RAM slots, and the pages the VMM's devices wrote.
struct KvmDirtyLog {
    vm: Arc<VmFd>,
    slots: Vec<(RamSlot, u64)>,
    device_writes: Arc<share::DeviceWrites>,
}

impl share::DirtySource for KvmDirtyLog {
    fn collect(&mut self, into: &mut share::bitmap::Bitmap) -> std::io::Result<()> {
        for (slot, first) in &self.slots {
            let bits = self
                .vm
                .get_dirty_log(slot.slot, slot.len as usize)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
            into.or_bits(*first, &bits);
        }
        self.device_writes.drain_into(into);
        Ok(())
    }
}

/// A built, not yet running, VM.
pub struct Vmm {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    slots: Vec<RamSlot>,
    vcpus: Vec<VcpuFd>,
    bus: Arc<PioBus>,
    mmio_bus: Arc<MmioBus>,
    device_writes: Arc<share::DeviceWrites>,
    virtio: virtio::VirtioDevices,
    exit: ExitSignal,
    serial_input: Option<SerialInput>,
    boot: BootInfo,
    created: Instant,
    seccomp: Option<Arc<seccomp::Filters>>,
    // Keeps /dev/kvm open for the VM's lifetime.
    _kvm: Kvm,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("slots", &self.slots)
            .field("vcpus", &self.vcpus.len())
            .field("boot", &self.boot)
            .finish()
    }
}

impl Vmm {
    /// Builds the VM described by `cfg`: nothing runs until [`Vmm::run`].
    pub fn new(cfg: VmConfig) -> Result<Self, VmmError> {
        let created = Instant::now();
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(VmmError::VcpuCount(cfg.vcpus));
        }
        memory::validate_size(cfg.mem_size)?;
        let kvm = Kvm::new().map_err(VmmError::Kvm)?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mem = memory::create_guest_memory(cfg.mem_size, cfg.memory_policy)?;
        let mut slots = Vec::new();
        for (i, region) in mem.iter().enumerate() {
            let slot = RamSlot {
                slot: i as u32,
                gpa: region.start_addr().raw_value(),
                hva: region.as_ptr() as u64,
                len: region.len(),
            };
            let flags = if cfg.dirty_log {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            };
            let kvm_region = kvm_userspace_memory_region {
                slot: slot.slot,
                flags,
                guest_phys_addr: slot.gpa,
                memory_size: slot.len,
                userspace_addr: slot.hva,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which `Vmm` keeps for as
            // long as the VM exists; slots do not overlap.
            unsafe { vm.set_user_memory_region(kvm_region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
            slots.push(slot);
        }

        // Virtio devices: where they sit decides what the firmware tables describe.
        let device_writes = Arc::new(if cfg.dirty_log {
            share::DeviceWrites::new(&slots.iter().map(|s| (s.gpa, s.len)).collect::<Vec<_>>())
        } else {
            share::DeviceWrites::disabled()
        });
        let mut mmio_bus = MmioBus::new();
        let virtio = virtio::attach(
            &vm,
            &mem,
            &mut mmio_bus,
            cfg.virtio_devices,
            device_writes.clone(),
        )?;

        // Firmware tables first: the zero page points to the RSDP.
        let mut acpi_devices = vec![x86_64::acpi::DeviceDescription::uart(
            "COM1", 0, COM1_BASE, COM1_IRQ,
        )];
        acpi_devices.extend(virtio.acpi_descriptions());
        let mut isa_irqs = vec![COM1_IRQ as u8];
        isa_irqs.extend(virtio.gsis());
        let acpi = x86_64::acpi::setup_acpi(
            &mem,
            &x86_64::acpi::AcpiConfig {
                vcpus: cfg.vcpus,
                devices: &acpi_devices,
                isa_irqs: &isa_irqs,
            },
        )?;
        x86_64::mptable::setup_mptable(&mem, cfg.vcpus)?;
        let boot = boot::load(&mem, &cfg.boot, Some(acpi.rsdp_addr()))?;
        tracing::info!(
            format = ?boot.format,
            entry = format_args!("{:#x}", boot.entry),
            kernel_end = format_args!("{:#x}", boot.kernel_end),
            initrd = ?boot.initrd,
            "kernel {} loaded", cfg.boot.kernel
        );
        x86_64::regs::write_boot_tables(&mem)?;

        // Devices.
        let exit = ExitSignal::new().map_err(host("exit eventfd"))?;
        let mut bus = PioBus::new();
        let serial_irq =
            EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(host("serial irq eventfd"))?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let (serial, buffer_empty) =
            SerialDevice::new(serial_irq, cfg.serial_out).map_err(host("serial device"))?;
        let serial = Arc::new(Mutex::new(serial));
        bus.insert(serial.clone(), COM1_BASE, UART_LEN)?;
        bus.insert(
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            I8042_BASE,
            I8042_LEN,
        )?;
        bus.insert(Arc::new(Mutex::new(Cmos::new())), CMOS_BASE, CMOS_LEN)?;
        bus.insert(
            Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
            DEBUG_EXIT_PORT,
            1,
        )?;
        // POST code port: Linux writes it as an I/O delay.
        bus.insert(Arc::new(Mutex::new(Sink)), 0x80, 1)?;
        let serial_input = cfg
            .serial_in
            .map(|fd| SerialInput::new(serial, fd, buffer_empty));

        // vCPUs.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for index in 0..cfg.vcpus {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let cpuid = filter_cpuid(
                &supported,
                CpuidContext {
                    cpu_index: index,
                    cpu_count: cfg.vcpus,
                    tsc_khz: fd.get_tsc_khz().ok(),
                },
            );
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            x86_64::regs::setup_msrs(&fd)?;
            x86_64::regs::setup_regs(&fd, boot.entry)?;
            x86_64::regs::setup_fpu(&fd)?;
            x86_64::regs::setup_sregs(&fd)?;
            x86_64::regs::setup_lint(&fd)?;
            vcpus.push(fd);
        }
        tracing::debug!(
            elapsed_us = created.elapsed().as_micros() as u64,
            "VM built"
        );

        Ok(Self {
            vm: Arc::new(vm),
            mem,
            slots,
            vcpus,
            bus: Arc::new(bus),
            mmio_bus: Arc::new(mmio_bus),
            device_writes,
            virtio,
            exit,
            serial_input,
            boot,
            created,
            seccomp: cfg.seccomp,
            _kvm: kvm,
        })
    }

    /// Guest RAM.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The RAM slots registered with KVM.
    pub fn ram_slots(&self) -> &[RamSlot] {
        &self.slots
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> Arc<VmFd> {
        self.vm.clone()
    }

    /// Where the kernel went.
    pub fn boot_info(&self) -> &BootInfo {
        &self.boot
    }

    /// A handle that stops the VM when an exit is requested on it.
    pub fn exit_signal(&self) -> ExitSignal {
        self.exit.clone()
    }

    /// Where the virtio devices sit.
    pub fn virtio_devices(&self) -> &virtio::VirtioDevices {
        &self.virtio
    }

    /// The KVM dirty log of every RAM slot (and the pages virtio devices wrote), in page-index order (slot 0's pages first),
    /// as a source for the merge agent. Needs `dirty_log` in the config.
    pub fn dirty_source(&self) -> Box<dyn share::DirtySource> {
        let mut first = 0;
        let slots = self
            .slots
            .iter()
            .map(|s| {
                let f = first;
                first += s.len / 4096;
                (*s, f)
            })
            .collect();
        Box::new(KvmDirtyLog {
            vm: self.vm.clone(),
            slots,
            device_writes: self.device_writes.clone(),
        })
    }

    /// Guest RAM as ranges for the merge agent, in the same page-index order.
    pub fn ram_ranges(&self) -> Vec<share::RamRange> {
        self.slots
            .iter()
            .map(|s| share::RamRange {
                hva: s.hva,
                len: s.len,
            })
            .collect()
    }

    /// Total guest RAM in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum()
    }

    /// Starts each virtio device's worker thread under its own seccomp filter (the calling
    /// thread has none yet).
    fn start_device_workers(&self) -> Result<(), VmmError> {
        for t in &self.virtio.transports {
            let mut t = tinyvmm_devices::bus::lock(t);
            let filters = self.seccomp.clone();
            let kind = seccomp::ThreadKind::for_virtio_device(t.device_type());
            if filters.is_some() && kind.is_none() {
                return Err(VmmError::Host {
                    what: "virtio device worker",
                    source: std::io::Error::other(format!(
                        "no seccomp filter for virtio device {}",
                        t.device_name()
                    )),
                });
            }
            t.start_device_worker(Box::new(move || {
                if let Some(kind) = kind {
                    seccomp::install_or_exit(filters.as_deref(), kind);
                }
            }))
            .map_err(|e| VmmError::Host {
                what: "virtio device worker",
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        Ok(())
    }

    /// Starts the vCPUs and runs the event loop, with `extra` subscribers, until the VM
    /// stops. SIGINT, SIGTERM and SIGHUP stop it cleanly. With seccomp filters in the
    /// config, each vCPU thread installs its own at its start and the calling thread
    /// installs the event loop's once every vCPU thread is started (a thread inherits its
    /// creator's filter, so the creator must not be filtered first).
    pub fn run(self, extra: Vec<Subscriber>) -> Result<ExitReason, VmmError> {
        self.start_device_workers()?;
        let signals = signals::SignalWatcher::new(self.exit.clone()).map_err(host("signalfd"))?;
        vcpu::install_kick_handler().map_err(host("vCPU kick signal handler"))?;
        let mut em = EventManager::<Subscriber>::new().map_err(|e| VmmError::Host {
            what: "event manager",
            source: std::io::Error::other(format!("{e:?}")),
        })?;
        em.add_subscriber(Arc::new(Mutex::new(signals)));
        em.add_subscriber(Arc::new(Mutex::new(signals::ExitWatcher::new(
            self.exit.clone(),
        ))));
        if let Some(input) = self.serial_input {
            em.add_subscriber(Arc::new(Mutex::new(input)));
        }
        for s in extra {
            em.add_subscriber(s);
        }

        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (index, fd) in self.vcpus.into_iter().enumerate() {
            let vcpu = vcpu::Vcpu::new(
                fd,
                index as u8,
                vcpu::Buses {
                    pio: self.bus.clone(),
                    mmio: self.mmio_bus.clone(),
                },
                self.exit.clone(),
                stop.clone(),
            );
            let filters = self.seccomp.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    seccomp::install_or_exit(filters.as_deref(), seccomp::ThreadKind::Vcpu);
                    vcpu.run()
                })
                .map_err(host("spawn vCPU thread"))?;
            threads.push(t);
        }
        seccomp::install_or_exit(self.seccomp.as_deref(), seccomp::ThreadKind::Main);
        tracing::info!(
            setup_ms = format_args!("{:.2}", self.created.elapsed().as_secs_f64() * 1e3),
            "guest started"
        );

        let reason = loop {
            if let Some(r) = self.exit.reason() {
                break r;
            }
            if let Err(e) = em.run_with_timeout(1000) {
                tracing::warn!("event loop: {e:?}");
            }
        };
        vcpu::stop_vcpus(&stop, threads, Duration::from_secs(2));
        let _ = std::io::stdout().flush();
        Ok(reason)
    }
}
