//! Loading a Linux kernel (ELF vmlinux or bzImage), its initrd and command line, and
//! writing the boot parameters of the Linux 64-bit boot protocol.

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    ReadVolatile,
};

use crate::x86_64::layout::*;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// The bzImage's 64-bit entry point is this far past its protected-mode load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Boot protocol 2.12 introduced `xloadflags` (and so XLF_KERNEL_64).
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1;
/// Boot protocol 2.14 introduced `acpi_rsdp_addr`.
const ACPI_RSDP_BOOT_PROTOCOL: u16 = 0x020e;
const E820_MAX_ENTRIES: usize = 128;

/// Where the kernel image comes from.
#[derive(Debug, Clone)]
pub enum KernelSource {
    /// A file on the host.
    File(PathBuf),
    /// An image built into the binary (the demo guest), with a name for messages.
    Embedded {
        /// Name shown in messages.
        name: &'static str,
        /// The image bytes.
        bytes: &'static [u8],
    },
}

impl std::fmt::Display for KernelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelSource::File(p) => write!(f, "{}", p.display()),
            KernelSource::Embedded { name, .. } => write!(f, "<built-in {name}>"),
        }
    }
}

/// The format of a kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF64 vmlinux.
    Elf,
    /// A bzImage with a Linux setup header.
    BzImage,
}

/// Errors loading the kernel, initrd or command line.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}: {source}")]
    KernelIo {
        /// The kernel.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("{path} is not a Linux kernel: neither an ELF vmlinux nor a bzImage (no \\x7fELF or HdrS magic)")]
    NotAKernel {
        /// The kernel.
        path: String,
    },
    /// The loader rejected the image.
    #[error("cannot load kernel {path} ({format:?}): {source}")]
    Load {
        /// The kernel.
        path: String,
        /// Its format.
        format: KernelFormat,
        /// The loader's error.
        source: linux_loader::loader::Error,
    },
    /// The bzImage predates the 64-bit boot protocol.
    #[error("bzImage {path} does not support the 64-bit boot protocol (version {version:#06x}, xloadflags {xloadflags:#x}; need >= 2.12 with XLF_KERNEL_64)")]
    No64BitEntry {
        /// The kernel.
        path: String,
        /// Its boot protocol version.
        version: u16,
        /// Its xloadflags.
        xloadflags: u16,
    },
    /// The initrd file cannot be read.
    #[error("cannot read initrd {path}: {source}")]
    InitrdIo {
        /// The initrd.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the end of low RAM.
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM: {room} bytes free between the kernel's end ({kernel_end:#x}) and {ram_end:#x}")]
    InitrdTooBig {
        /// The initrd.
        path: String,
        /// Its size.
        size: u64,
        /// Room available.
        room: u64,
        /// End of the kernel.
        kernel_end: u64,
        /// End of low RAM.
        ram_end: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot parameters failed.
    #[error("cannot write boot parameters: {0}")]
    BootParams(String),
}

/// What the loader placed where.
#[derive(Debug, Clone)]
pub struct BootInfo {
    /// The kernel's format.
    pub format: KernelFormat,
    /// The 64-bit entry point.
    pub entry: u64,
    /// First byte after the kernel image.
    pub kernel_end: u64,
    /// The initrd's guest-physical address and size.
    pub initrd: Option<(u64, u64)>,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// The kernel.
    pub kernel: KernelSource,
    /// An optional initrd.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

fn open_kernel_file(p: &Path) -> Result<File, BootError> {
    let io = |source| BootError::KernelIo {
        path: p.display().to_string(),
        source,
    };
    let f = File::open(p).map_err(io)?;
    if !f.metadata().map_err(io)?.is_file() {
        return Err(io(std::io::Error::other("not a regular file")));
    }
    Ok(f)
}

/// Identifies the format of `image` from its magic numbers.
fn detect_format<F: Read + Seek>(image: &mut F, path: &str) -> Result<KernelFormat, BootError> {
    let io = |source| BootError::KernelIo {
        path: path.to_string(),
        source,
    };
    let mut head = [0u8; 0x206];
    image.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut n = 0;
    while n < head.len() {
        match image.read(&mut head[n..]).map_err(io)? {
            0 => break,
            k => n += k,
        }
    }
    image.seek(SeekFrom::Start(0)).map_err(io)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        Ok(KernelFormat::Elf)
    } else if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else {
        Err(BootError::NotAKernel {
            path: path.to_string(),
        })
    }
}

fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .find(|r| r.start_addr().raw_value() == 0)
        .map(|r| r.len())
        .unwrap_or(0)
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let io = |source| BootError::InitrdIo {
        path: path.display().to_string(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    if !f.metadata().map_err(io)?.is_file() {
        return Err(io(std::io::Error::other("not a regular file")));
    }
    let ram_end = low_ram_end(mem);
    let kernel_end = (kernel_end + 4095) & !4095;
    let room = ram_end.saturating_sub(kernel_end);
    if size == 0 || size > room {
        if size == 0 {
            return Err(io(std::io::Error::other("the file is empty")));
        }
        return Err(BootError::InitrdTooBig {
            path: path.display().to_string(),
            size,
            room,
            kernel_end,
            ram_end,
        });
    }
    let addr = (ram_end - size) & !4095;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| io(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

/// The e820 map for `mem`: low RAM below the EBDA; the EBDA and the BIOS area (MP table,
/// ACPI tables) reserved; then every region from 1 MiB up.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    let mut map = vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            r#type: E820_RESERVED,
        },
    ];
    for r in mem.iter() {
        let start = r.start_addr().raw_value().max(HIMEM_START);
        let end = r.start_addr().raw_value() + r.len();
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

/// Loads the kernel, initrd and command line into `mem` and writes the zero page, which
/// also tells the kernel where the ACPI RSDP is (`acpi_rsdp`), if the kernel knows the
/// field: a bzImage of boot protocol 2.14 or later, or an ELF vmlinux (which has no
/// version; older kernels ignore the field, padding to them).
pub fn load(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    acpi_rsdp: Option<u64>,
) -> Result<BootInfo, BootError> {
    match &spec.kernel {
        KernelSource::File(p) => load_from(mem, spec, acpi_rsdp, &mut open_kernel_file(p)?),
        KernelSource::Embedded { bytes, .. } => {
            load_from(mem, spec, acpi_rsdp, &mut Cursor::new(*bytes))
        }
    }
}

fn load_from<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    acpi_rsdp: Option<u64>,
    image: &mut F,
) -> Result<BootInfo, BootError> {
    let path = spec.kernel.to_string();
    let format = detect_format(image, &path)?;
    let load_err = |source| BootError::Load {
        path: path.clone(),
        format,
        source,
    };
    let highmem = Some(GuestAddress(HIMEM_START));
    let result: KernelLoaderResult = match format {
        KernelFormat::Elf => Elf::load(mem, None, image, highmem).map_err(load_err)?,
        KernelFormat::BzImage => BzImage::load(mem, None, image, highmem).map_err(load_err)?,
    };

    let mut params = boot_params::default();
    let entry = match (format, result.setup_header) {
        (KernelFormat::BzImage, Some(hdr)) => {
            if hdr.version < MIN_BOOT_PROTOCOL || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry {
                    path,
                    version: hdr.version,
                    xloadflags: hdr.xloadflags,
                });
            }
            params.hdr = hdr;
            result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET
        }
        _ => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            result.kernel_load.raw_value()
        }
    };

    // The command line: the kernel's cmdline_size (bzImage) bounds it, else our maximum.
    let capacity = match params.hdr.cmdline_size {
        0 => CMDLINE_MAX_SIZE,
        n => (n as usize + 1).min(CMDLINE_MAX_SIZE),
    };
    let mut cmdline = Cmdline::new(capacity).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(&spec.cmdline)
        .map_err(|e| BootError::Cmdline(format!("{e} (at most {} bytes)", capacity - 1)))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();

    let initrd = match &spec.initrd {
        Some(p) => Some(load_initrd(mem, p, result.kernel_end)?),
        None => None,
    };

    if format == KernelFormat::Elf || params.hdr.version >= ACPI_RSDP_BOOT_PROTOCOL {
        params.acpi_rsdp_addr = acpi_rsdp.unwrap_or(0);
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    let map = e820_map(mem);
    if map.len() > E820_MAX_ENTRIES {
        return Err(BootError::BootParams("too many e820 entries".into()));
    }
    for (i, e) in map.iter().enumerate() {
        params.e820_table[i] = *e;
    }
    params.e820_entries = map.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::BootParams(e.to_string()))?;

    Ok(BootInfo {
        format,
        entry,
        kernel_end: result.kernel_end,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ram_ranges;

    #[test]
    fn e820_skips_legacy_hole_and_mmio_gap() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&ram_ranges(64 << 20)).unwrap();
        let m = e820_map(&mem);
        assert_eq!(m.len(), 3);
        assert_eq!(
            (m[0].addr, m[0].size, m[0].r#type),
            (0, EBDA_START, E820_RAM)
        );
        // The EBDA and the BIOS area, where the MP and ACPI tables are, are reserved.
        assert_eq!(
            (m[1].addr, m[1].addr + m[1].size, m[1].r#type),
            (EBDA_START, HIMEM_START, E820_RESERVED)
        );
        assert!(m[1].addr <= ACPI_START && ACPI_END <= m[1].addr + m[1].size);
        assert_eq!(
            (m[2].addr, m[2].size, m[2].r#type),
            (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM)
        );
    }

    #[test]
    fn rejects_non_kernels() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&ram_ranges(16 << 20)).unwrap();
        let spec = BootSpec {
            kernel: KernelSource::Embedded {
                name: "junk",
                bytes: &[0u8; 4096],
            },
            initrd: None,
            cmdline: "console=ttyS0".into(),
        };
        assert!(matches!(
            load(&mem, &spec, None),
            Err(BootError::NotAKernel { .. })
        ));
        let spec = BootSpec {
            kernel: KernelSource::File("/nonexistent/bzImage".into()),
            ..spec
        };
        assert!(matches!(
            load(&mem, &spec, None),
            Err(BootError::KernelIo { .. })
        ));
    }
}
