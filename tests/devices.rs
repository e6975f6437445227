//! Virtio devices end to end: real guests drive the test guest's virtio-mmio and
//! virtio-blk drivers against real image files in a scratch directory; the host checks
//! what the guest read (checksums it computes from the images) and, after the VM exits,
//! what it wrote.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::merge::{u, Daemon, BIN, LONG};
use tinyvmm::fleet::guest::GuestProc;
use tinyvmm_guests::content::mix64;

const TIMEOUT: Duration = Duration::from_secs(120);

/// Writes an image of `mib` MiB whose words are a function of `seed`.
fn image(dir: &Path, name: &str, mib: u64, seed: u64) -> PathBuf {
    let path = dir.join(name);
    let bytes: Vec<u8> = (0..mib * (1 << 17))
        .flat_map(|i| mix64(seed ^ i).to_le_bytes())
        .collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The guest's read checksum: the wrapping sum over the image's words w_i of
/// mix64(w_i + i).
fn disk_sum(data: &[u8]) -> u64 {
    data.chunks_exact(8).enumerate().fold(0u64, |s, (i, w)| {
        let w = u64::from_le_bytes(w.try_into().unwrap());
        s.wrapping_add(mix64(w.wrapping_add(i as u64)))
    })
}

/// Whether `data` holds the pattern the disk workload writes on disk `dev` with `seed`.
fn holds_pattern(data: &[u8], seed: u64, dev: u64) -> bool {
    data.chunks_exact(8)
        .enumerate()
        .all(|(i, w)| u64::from_le_bytes(w.try_into().unwrap()) == mix64(seed + dev + i as u64))
}

fn arg(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn guest_reads_writes_and_flushes_a_disk_and_a_read_only_disk_refuses_writes() {
    require_kvm!();
    let dir = common::scratch_dir("devices-disk");
    let rw = image(&dir, "rw.img", 8, 1);
    let ro = image(&dir, "ro.img", 2, 2);
    let ro_before = std::fs::read(&ro).unwrap();
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 workload=acpi,disk disk_seed=9 disk0_sum={:#x} disk1_sum={:#x}",
        disk_sum(&std::fs::read(&rw).unwrap()),
        disk_sum(&ro_before)
    );
    let rw_arg = arg(&rw);
    let ro_arg = format!("{},ro", arg(&ro));
    let o = common::run_vm(
        &[
            "--mem",
            "64M",
            "--vcpus",
            "2",
            "--disk",
            &rw_arg,
            "--disk",
            &ro_arg,
            "--cmdline",
            &cmdline,
        ],
        TIMEOUT,
    );
    o.assert_ok();
    assert!(o.line("ACPI OK").is_some(), "{}", o.stdout);
    assert!(o.line("DISK OK disks=2").is_some(), "{}", o.stdout);
    assert_eq!(o.field("DISK dev=0", "ro").as_deref(), Some("0"));
    assert_eq!(o.field("DISK dev=1", "ro").as_deref(), Some("1"));
    assert_eq!(o.field("DISK dev=1", "mmio").as_deref(), Some("0xd0001000"));
    assert_eq!(o.field("DISK dev=0", "sectors").as_deref(), Some("16384"));
    // Completions also arrive as interrupts: irqfd -> IOAPIC pins 5 and 6, as the DSDT says.
    assert!(o.line("DISK irq dev=0 gsi=5 ok").is_some(), "{}", o.stdout);
    assert!(o.line("DISK irq dev=1 gsi=6 ok").is_some(), "{}", o.stdout);
    // Out of spec from a real driver: a buffer in the MMIO gap, a descriptor loop, a queue
    // above the maximum (DEVICE_NEEDS_RESET), then a reset that recovers.
    assert!(
        o.line("DISK out-of-spec dev=0 ok").is_some(),
        "{}",
        o.stdout
    );
    assert!(
        o.line("DISK out-of-spec dev=1 ok").is_some(),
        "{}",
        o.stdout
    );
    // What the guest wrote reached the image; the read-only image is unchanged.
    assert!(holds_pattern(&std::fs::read(&rw).unwrap(), 9, 0));
    assert_eq!(std::fs::read(&ro).unwrap(), ro_before);
    for l in o.stdout.lines().filter(|l| l.starts_with("DISK")) {
        eprintln!("{l}");
    }
}

#[test]
fn bad_disk_arguments_and_unusable_images_fail_before_the_guest_starts() {
    require_kvm!();
    let dir = common::scratch_dir("devices-bad-disk");
    let missing = arg(&dir.join("missing.img"));
    let dir_arg = arg(&dir);
    let good = arg(&image(&dir, "ok.img", 1, 3));
    let bad_opt = format!("{good},readonly");
    let cases: [(&str, &str); 5] = [
        (&missing, "cannot open disk image"),
        (&dir_arg, "is not a regular file or block device"),
        (&bad_opt, "unknown option"),
        (",ro", "empty path"),
        ("", "empty path"),
    ];
    for (disk, want) in cases {
        let o = common::run_vm(&["--mem", "32M", "--disk", disk], TIMEOUT);
        assert_ne!(o.code(), Some(0), "--disk {disk:?}");
        assert!(o.stderr.contains(want), "--disk {disk:?}: {}", o.stderr);
        assert!(
            o.line("TINYVMM TESTGUEST READY").is_none(),
            "--disk {disk:?}: the guest must not start"
        );
    }
}

#[test]
fn disk_worker_runs_under_its_own_seccomp_filter() {
    require_kvm!();
    let dir = common::scratch_dir("devices-seccomp");
    let img = arg(&image(&dir, "d.img", 1, 4));
    let o = common::run_vm(
        &[
            "--mem",
            "32M",
            "--disk",
            &img,
            "--seccomp-test-violation",
            "virtio-blk",
        ],
        TIMEOUT,
    );
    assert_eq!(o.code(), Some(148), "stderr: {}", o.stderr);
    assert!(
        o.stderr
            .contains("bad system call 110 (getppid) on a virtio-blk thread"),
        "stderr: {}",
        o.stderr
    );
}

/// With `--share-memory`, the disk's data buffer is first 256 identical pages that the
/// daemon merges; the disk reads then land in merged pages (the kernel's copy-on-write
/// splits them), the guest sees exactly the disk's data, the agent reports the splits
/// (sharing drops), and every page of the guest's fill still verifies.
#[test]
fn disk_reads_into_merged_pages_split_them_and_the_guest_sees_the_disk() {
    require_kvm!();
    let d = Daemon::fast("devices-share");
    let img = image(&d.dir, "share.img", 4, 5);
    let sum = disk_sum(&std::fs::read(&img).unwrap());
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 workload=fill,diskprep,serve mib=16 seed=1 guest_seed=7 disk_seed=3 disk0_sum={sum:#x}"
    );
    let args: Vec<String> = vec![
        "--mem".into(),
        "40M".into(),
        "--cmdline".into(),
        cmdline,
        "--disk".into(),
        arg(&img),
        "--share-memory".into(),
        "--merge-socket".into(),
        arg(&d.socket()),
        "--no-daemon-autostart".into(),
    ];
    let log = d.dir.join("guest.log");
    let mut g = GuestProc::spawn(Path::new(BIN), &args, Some(&log)).unwrap();
    let fill = g.wait_line("FILL done", LONG).unwrap();
    let pages = tinyvmm::fleet::guest::field(&fill, "pages").unwrap();
    g.wait_line("DISKPREP", LONG).unwrap();
    g.wait_line("SERVE ready", LONG).unwrap();
    // The 256 identical buffer pages merge onto one frame.
    let merged = d.wait_for("the disk buffer merged", LONG, |s| {
        u(s, "pages_sharing") >= 255
    });
    g.send("disk").unwrap();
    let done = g.wait_line("DISK ", LONG).unwrap();
    let mut lines = vec![done];
    while !lines.last().unwrap().starts_with("DISK OK") {
        let l = g.wait_line("DISK", LONG).unwrap();
        assert!(!l.starts_with("DISK FAIL"), "{l}");
        lines.push(l);
    }
    // The buffer now holds distinct disk data: the merged pages were split and the agent
    // saw it.
    let split = d.wait_for("the disk buffer split", LONG, |s| {
        u(s, "pages_sharing") < 64
    });
    eprintln!(
        "pages_sharing {} -> {} after the disk reads; {}",
        u(&merged, "pages_sharing"),
        u(&split, "pages_sharing"),
        lines.join(" | ")
    );
    assert_eq!(g.verify(LONG).unwrap(), pages);
    let st = g.exit(Duration::from_secs(30)).unwrap();
    assert!(st.success(), "guest exit status {st}");
    assert!(holds_pattern(&std::fs::read(&img).unwrap(), 3, 0));
}
