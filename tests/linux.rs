//! Booting a real Linux kernel (Debian's cloud kernel, fetched by
//! `resources/linux/fetch.sh`) with an initramfs whose init loads the package's virtio
//! modules, lists the virtio devices it found, prints a marker and reboots.
//!
//! On a host with hardware virtualization the whole boot runs and the init marker is
//! checked. On hosts whose KVM emulates guest kernel code (kvm_pvm, see docs/design.md), Linux
//! stops early with a KVM internal error: then what can be seen is checked — the banner,
//! our exact command line echoed back, a memory line consistent with `--mem`, the ACPI
//! tables the kernel found and the CPUs it allows — and the VMM must end with a clear
//! one-line error and a non-zero status, not hang or panic.
//! Ignored by default (needs the download); `.ci/run` runs it.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{run_vm, Outcome};

/// Generous, since only a hang should hit these: on a kvm_pvm host the bzImage's
/// decompressor alone, emulated, takes minutes (over 4 on a loaded 2-CPU machine, before the
/// first line); the ELF starts at once.
const BZIMAGE_TIMEOUT: Duration = Duration::from_secs(1800);
const ELF_TIMEOUT: Duration = Duration::from_secs(900);

struct LinuxFiles {
    bzimage: PathBuf,
    /// The ELF inside the bzImage (starts without the emulated decompressor).
    vmlinux: Option<PathBuf>,
    initrd: PathBuf,
}

fn linux_files() -> LinuxFiles {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../resources/linux/build");
    let bzimage = dir.join("bzImage");
    let initrd = dir.join("initramfs.cpio.gz");
    let vmlinux = Some(dir.join("vmlinux")).filter(|p| p.exists());
    if !(bzimage.exists() && initrd.exists()) {
        panic!("{} is missing: run resources/linux/fetch.sh", dir.display());
    }
    LinuxFiles {
        bzimage,
        vmlinux,
        initrd,
    }
}

// earlyprintk: the serial console driver proper starts long after what this host reaches.
const CMDLINE: &str =
    "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 pci=off tinyvmm_marker=4242";

/// The disk every boot gets: 2 MiB of zeros (4096 sectors; init prints the MD5 of its first
/// MiB).
const DISK_SECTORS: u64 = 4096;
const DISK_FIRST_MIB_MD5: &str = "b6d81b360a5672d80c27430f39153e2c";

/// Boots with `--vcpus` N, a virtio-blk disk and a virtio-vsock device, which the DSDT
/// describes and init's virtio modules find on a full boot.
fn boot(kernel: &Path, initrd: &Path, vcpus: u8, timeout: Duration) -> Outcome {
    // Both tests boot --vcpus 2, one the bzImage, one the ELF: a directory each.
    let name = kernel.file_name().unwrap().to_string_lossy();
    let dir = common::scratch_dir(&format!("linux-{name}-{vcpus}"));
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; (DISK_SECTORS * 512) as usize]).unwrap();
    let vsock = format!("{},{}", 3 + u32::from(vcpus), dir.join("vsock").display());
    let vcpus = vcpus.to_string();
    run_vm(
        &[
            "--disk",
            disk.to_str().unwrap(),
            "--vsock",
            &vsock,
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--mem",
            "512M",
            "--vcpus",
            &vcpus,
            "--cmdline",
            CMDLINE,
        ],
        timeout,
    )
}

/// The banner, the command line, the memory, and how the run ended: a full boot (init's
/// marker, clean reset) or, on this host, a KVM internal error reported in one line.
fn check_boot_contract(out: &Outcome) {
    assert!(out.stdout.contains("Linux version"), "no kernel banner");
    let echoed = out
        .stdout
        .lines()
        .find(|l| l.contains("Command line:"))
        .expect("the kernel echoes its command line");
    assert!(echoed.trim_end().ends_with(CMDLINE), "{echoed}");
    // "Memory: 485000K/523884K available" — the total must match --mem within the holes.
    if let Some(mem) = out
        .stdout
        .lines()
        .find(|l| l.contains("Memory: ") && l.contains("K/"))
    {
        let total: u64 = mem
            .split('/')
            .nth(1)
            .and_then(|s| s.split('K').next())
            .and_then(|s| s.trim().parse().ok())
            .expect(mem);
        assert!(total <= 512 * 1024 && total > 500 * 1024, "{mem}");
    } else {
        // The e820 lines come before it in any case.
        assert!(out.stdout.contains("BIOS-e820"), "no memory map printed");
    }
    if out.stdout.contains("TINYVMM INIT OK") {
        // Full boot (hardware virtualization): init saw our command line and rebooted.
        assert!(out.stdout.contains("tinyvmm_marker=4242"));
        // init loaded the kernel package's virtio modules and listed the devices found.
        let virtio = out
            .stdout
            .lines()
            .find(|l| l.contains("TINYVMM VIRTIO:"))
            .unwrap_or_else(|| panic!("init lists no virtio devices\n{}", out.stdout));
        // virtio device IDs: 2 block, 19 (0x13) vsock.
        assert!(
            virtio.contains("0x0002") && virtio.contains("0x0013"),
            "{virtio}"
        );
        let disk = format!("TINYVMM DISK: vda sectors={DISK_SECTORS} md5={DISK_FIRST_MIB_MD5}");
        assert!(out.stdout.contains(&disk), "{}", out.stdout);
        assert!(
            !out.stdout.contains("TINYVMM MODULE FAILED"),
            "{}",
            out.stdout
        );
        assert_eq!(out.code(), Some(0), "reboot=k must end the VMM cleanly");
    } else {
        // This host: emulated guest kernel code stops with a KVM internal error.
        assert_eq!(out.code(), Some(1), "{}", out.stderr);
        let line = out
            .stderr
            .lines()
            .find(|l| l.contains("guest stopped"))
            .expect(&out.stderr);
        assert!(line.contains("KVM") && line.contains("RIP 0x"), "{line}");
    }
}

/// The kernel's own account of the ACPI tables: each table found, every vCPU allowed,
/// no ACPI error. Returns those lines.
fn check_acpi(out: &Outcome, vcpus: u8) -> Vec<String> {
    let lines: Vec<String> = out
        .stdout
        .lines()
        .filter(|l| l.contains("ACPI") || l.contains("smp") || l.contains("IOAPIC["))
        .map(|l| l.trim_end().to_string())
        .collect();
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    for table in [
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: XSDT",
        "ACPI: FACP",
        "ACPI: APIC",
        "ACPI: DSDT",
    ] {
        assert!(
            has(table),
            "--vcpus {vcpus}: no '{table}' line in\n{}",
            out.stdout
        );
    }
    assert!(
        has(&format!("smpboot: Allowing {vcpus} CPUs")),
        "--vcpus {vcpus}: the kernel does not allow every vCPU\n{}",
        out.stdout
    );
    for bad in [
        "ACPI BIOS Error",
        "ACPI Error",
        "A valid RSDP was not found",
    ] {
        assert!(
            !out.stdout.contains(bad),
            "--vcpus {vcpus}: '{bad}' in\n{}",
            out.stdout
        );
    }
    if out.stdout.contains("TINYVMM INIT OK") {
        // A full boot brings up every vCPU.
        assert!(
            has(&format!("smp: Brought up 1 node, {vcpus} CPU")),
            "--vcpus {vcpus}\n{}",
            out.stdout
        );
    }
    lines
}

fn print_run(what: &str, out: &Outcome) {
    println!(
        "--- {what}: guest console ---\n{}\n--- stderr ---\n{}",
        out.stdout, out.stderr
    );
}

#[test]
#[ignore = "needs resources/linux/fetch.sh; run by .ci/run"]
fn debian_cloud_kernel_boots_as_far_as_this_host_allows() {
    require_kvm!();
    let files = linux_files();
    let out = boot(&files.bzimage, &files.initrd, 2, BZIMAGE_TIMEOUT);
    print_run("bzImage, --vcpus 2", &out);
    check_boot_contract(&out);
    check_acpi(&out, 2);
}

/// `--vcpus` 1, 2, 4 and 8, booted side by side: the kernel finds the RSDP, XSDT, FADT,
/// MADT and DSDT and allows exactly N CPUs. Uses the ELF taken out of the bzImage when
/// fetch.sh made one (same kernel, minus minutes of emulated decompression here).
#[test]
#[ignore = "needs resources/linux/fetch.sh; run by .ci/run"]
fn debian_cloud_kernel_sees_every_vcpu_through_acpi() {
    require_kvm!();
    let files = linux_files();
    let (kernel, timeout) = match &files.vmlinux {
        Some(elf) => (elf.clone(), ELF_TIMEOUT),
        None => (files.bzimage.clone(), BZIMAGE_TIMEOUT),
    };
    let runs: Vec<_> = [1u8, 2, 4, 8]
        .into_iter()
        .map(|vcpus| {
            let (kernel, initrd) = (kernel.clone(), files.initrd.clone());
            (
                vcpus,
                std::thread::spawn(move || boot(&kernel, &initrd, vcpus, timeout)),
            )
        })
        .collect();
    let mut report = String::new();
    for (vcpus, run) in runs {
        let out = run.join().expect("boot thread");
        let lines = std::panic::catch_unwind(|| {
            check_boot_contract(&out);
            check_acpi(&out, vcpus)
        })
        .unwrap_or_else(|e| {
            print_run(&format!("--vcpus {vcpus}"), &out);
            std::panic::resume_unwind(e)
        });
        report += &format!("--- {} --vcpus {vcpus}\n", kernel.display());
        for l in lines {
            report += &l;
            report.push('\n');
        }
    }
    println!("{report}");
}
