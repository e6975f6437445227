//! Builds the test guest from `src-guest/` with the system `gcc`:
//! `testguest.elf` (a vmlinux-like ELF) and `testguest.bzImage` (a setup header
//! written here, followed by the ELF's loadable segment as a flat binary).

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

/// Physical load address of the guest (`code32_start`).
const LOAD_ADDR: u64 = 0x10_0000;
/// Offset of the 64-bit entry point from the load address (Linux boot protocol).
const ENTRY64_OFFSET: u64 = 0x200;
/// Setup sectors after the boot sector; the payload starts at (SETUP_SECTS + 1) * 512.
const SETUP_SECTS: u8 = 1;

const SOURCES: &[&str] = &[
    "head.S",
    "kernel.c",
    "user.c",
    "lib.c",
    "content.c",
    "acpi.c",
    "virtio_mmio.c",
    "balloon.c",
    "virtio.c",
    "vsock.c",
];
const HEADERS: &[&str] = &["guest.h", "link.ld"];

const CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-nostdlib",
    "-mno-red-zone",
    "-mno-sse",
    "-mno-mmx",
    "-mno-avx",
    "-mgeneral-regs-only",
    "-mcmodel=small",
    "-O2",
    "-static",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-builtin",
    "-fno-tree-loop-distribute-patterns",
    "-fno-strict-aliasing",
    "-fcf-protection=none",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
];

fn main() {
    let src = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("src-guest");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=build.rs");
    for f in SOURCES.iter().chain(HEADERS) {
        println!("cargo:rerun-if-changed={}", src.join(f).display());
    }
    println!("cargo:rerun-if-env-changed=TINYVMM_GUEST_CC");
    let cc = env::var("TINYVMM_GUEST_CC").unwrap_or_else(|_| "gcc".to_string());

    let mut objs = Vec::new();
    for f in SOURCES {
        let obj = out.join(format!("{f}.o"));
        let mut cmd = Command::new(&cc);
        cmd.args(CFLAGS)
            .arg("-I")
            .arg(&src)
            .arg("-c")
            .arg(src.join(f))
            .arg("-o")
            .arg(&obj);
        run(&mut cmd, &format!("compile {f}"));
        objs.push(obj);
    }

    let elf_path = out.join("testguest.elf");
    let mut link = Command::new(&cc);
    link.args(CFLAGS)
        .arg("-Wl,--build-id=none")
        .arg("-Wl,-z,noexecstack")
        .arg("-Wl,-z,max-page-size=4096")
        .arg("-Wl,--no-dynamic-linker")
        .arg(format!("-Wl,-T,{}", src.join("link.ld").display()))
        .arg("-o")
        .arg(&elf_path)
        .args(&objs)
        .arg("-lgcc");
    run(&mut link, "link testguest.elf");

    let elf = fs::read(&elf_path).expect("read testguest.elf");
    let image = flat_image(&elf);
    let bz = bzimage(&image);
    fs::write(out.join("testguest.bin"), &image.payload).expect("write testguest.bin");
    fs::write(out.join("testguest.bzImage"), bz).expect("write testguest.bzImage");
}

fn run(cmd: &mut Command, what: &str) {
    let output = cmd.output().unwrap_or_else(|e| {
        panic!("tinyvmm-guests: cannot {what}: failed to run {cmd:?}: {e} (is gcc installed?)")
    });
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        if line.contains("LOAD segment with RWX permissions") {
            continue; // one RWX segment is intended: the guest is a single flat image
        }
        println!("cargo:warning={line}");
    }
    if !output.status.success() {
        panic!(
            "tinyvmm-guests: {what} failed ({}): {cmd:?}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The loadable part of the ELF as one flat binary at LOAD_ADDR.
struct FlatImage {
    payload: Vec<u8>,
    /// Bytes of memory the image needs from LOAD_ADDR (file part, .bss and stacks).
    mem_size: u64,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn flat_image(elf: &[u8]) -> FlatImage {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not ELF64");
    assert_eq!(u16_at(elf, 18), 62, "not x86_64");
    let entry = u64_at(elf, 24);
    assert_eq!(
        entry,
        LOAD_ADDR + ENTRY64_OFFSET,
        "entry point must be at load address + 0x200"
    );
    let phoff = u64_at(elf, 32) as usize;
    let phentsize = u16_at(elf, 54) as usize;
    let phnum = u16_at(elf, 56) as usize;
    let mut payload = Vec::new();
    let mut mem_size = 0;
    for i in 0..phnum {
        let ph = &elf[phoff + i * phentsize..];
        if u32_at(ph, 0) != 1 {
            continue; // not PT_LOAD
        }
        let offset = u64_at(ph, 8) as usize;
        let paddr = u64_at(ph, 24);
        let filesz = u64_at(ph, 32) as usize;
        let memsz = u64_at(ph, 40);
        assert!(paddr >= LOAD_ADDR, "PT_LOAD below the load address");
        let at = (paddr - LOAD_ADDR) as usize;
        if payload.len() < at + filesz {
            payload.resize(at + filesz, 0);
        }
        payload[at..at + filesz].copy_from_slice(&elf[offset..offset + filesz]);
        mem_size = mem_size.max(paddr - LOAD_ADDR + memsz);
    }
    assert!(!payload.is_empty(), "no PT_LOAD segment");
    FlatImage { payload, mem_size }
}

/// A bzImage: boot sector + setup header (Linux boot protocol 2.15), then the payload.
fn bzimage(image: &FlatImage) -> Vec<u8> {
    let setup_len = (SETUP_SECTS as usize + 1) * 512;
    let mut b = vec![0u8; setup_len];
    let put16 = |b: &mut Vec<u8>, o: usize, v: u16| b[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |b: &mut Vec<u8>, o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_le_bytes());

    // A version string in the setup area, pointed to by kernel_version.
    let version = b"tinyvmm-testguest 0.1.0 (tinyvmm test guest)\0";
    b[0x300..0x300 + version.len()].copy_from_slice(version);
    // The boot sector only says that a boot loader is needed.
    let msg = b"tinyvmm test guest: boot me with a Linux boot protocol loader.\r\n";
    b[0x10..0x10 + msg.len()].copy_from_slice(msg);

    let payload_len = image.payload.len() as u64;
    let init_size = image.mem_size.max(payload_len).next_multiple_of(4096);

    b[0x1f1] = SETUP_SECTS; // setup_sects
    put16(&mut b, 0x1f2, 0); // root_flags
    put32(&mut b, 0x1f4, payload_len.div_ceil(16) as u32); // syssize (16-byte units)
    put16(&mut b, 0x1fa, 0xffff); // vid_mode: normal
    put16(&mut b, 0x1fe, 0xaa55); // boot_flag
    b[0x200] = 0xeb; // jump: short jmp over the header
    b[0x201] = 0x66;
    put32(&mut b, 0x202, 0x5372_6448); // header: "HdrS"
    put16(&mut b, 0x206, 0x020f); // version 2.15
    put16(&mut b, 0x20c, 0x1000); // start_sys_seg (obsolete)
    put16(&mut b, 0x20e, 0x300 - 0x200); // kernel_version
    b[0x211] = 0x01; // loadflags: LOADED_HIGH
    put16(&mut b, 0x212, 0x8000); // setup_move_size
    put32(&mut b, 0x214, LOAD_ADDR as u32); // code32_start
    put32(&mut b, 0x22c, 0x7fff_ffff); // initrd_addr_max
    put32(&mut b, 0x230, 0x20_0000); // kernel_alignment
    b[0x234] = 0; // relocatable_kernel: no (linked at 0x100000)
    b[0x235] = 12; // min_alignment (log2)
    put16(&mut b, 0x236, 0x3); // xloadflags: XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    put32(&mut b, 0x238, 2047); // cmdline_size
    put64(&mut b, 0x258, LOAD_ADDR); // pref_address: where it is linked
    put32(&mut b, 0x260, init_size as u32); // init_size

    b.extend_from_slice(&image.payload);
    b
}
