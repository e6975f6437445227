//! Guest RAM: private anonymous memory, split around the 32-bit MMIO gap.
//!
//! RAM is `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE` (vm-memory's default), so that the
//! merge agent can later replace any page of it with a copy-on-write mapping of a shared
//! frame (see docs/design.md). Merge-eligible RAM is kept off transparent huge pages: remapping one
//! 4 KiB page of a 2 MiB THP would split it.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Smallest guest RAM we boot: room for boot tables, the command line and a small kernel.
pub const MIN_MEM_SIZE: u64 = 4 << 20;

/// How guest RAM is offered for merging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryPolicy {
    /// Plain private memory; THP allowed where the host enables it.
    #[default]
    Private,
    /// Enrolled with tinyvmm's merge daemon: no THP.
    Shareable,
    /// Marked `MADV_MERGEABLE` for the kernel's own ksmd (what QEMU and Cloud Hypervisor do).
    KernelMergeable,
}

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A size the VMM cannot use.
    #[error("invalid memory size {size} bytes: {why}")]
    InvalidSize {
        /// The requested size.
        size: u64,
        /// Why it is refused.
        why: String,
    },
    /// mmap refused the size.
    #[error("cannot reserve {size} bytes of guest memory: {source}")]
    Mmap {
        /// The requested size.
        size: u64,
        /// The error from vm-memory.
        source: vm_memory::mmap::FromRangesError,
    },
    /// madvise failed.
    #[error("madvise({advice}) on guest memory failed: {source}")]
    Madvise {
        /// The advice.
        advice: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The guest-physical ranges that hold `size` bytes of RAM.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// The host's physical address width, which bounds guest-physical addresses.
fn host_phys_bits() -> u32 {
    let max_ext = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max_ext >= 0x8000_0008 {
        std::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff
    } else {
        36
    }
}

/// Checks a requested RAM size.
pub fn validate_size(size: u64) -> Result<(), MemoryError> {
    let invalid = |why: String| MemoryError::InvalidSize { size, why };
    if size < MIN_MEM_SIZE {
        return Err(invalid(format!(
            "the minimum is {} MiB",
            MIN_MEM_SIZE >> 20
        )));
    }
    if !size.is_multiple_of(4096) {
        return Err(invalid("not a multiple of 4 KiB".into()));
    }
    let top = ram_ranges(size)
        .last()
        .map(|(a, l)| a.0 + *l as u64)
        .unwrap_or(0);
    let limit = 1u64 << host_phys_bits().min(52);
    if top > limit {
        return Err(invalid(format!(
            "guest-physical addresses would reach {top:#x}, beyond the host's {limit:#x}"
        )));
    }
    Ok(())
}

fn madvise(
    mem: &GuestMemoryMmap,
    advice: libc::c_int,
    name: &'static str,
) -> Result<(), MemoryError> {
    for region in mem.iter() {
        let addr = region.as_ptr();
        // SAFETY: the range is a mapping owned by `mem`; madvise with these advices does not
        // change its contents (NOHUGEPAGE, MERGEABLE are hints).
        let rc = unsafe { libc::madvise(addr.cast(), region.len() as usize, advice) };
        if rc != 0 {
            return Err(MemoryError::Madvise {
                advice: name,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Creates `size` bytes of guest RAM under `policy`.
pub fn create_guest_memory(
    size: u64,
    policy: MemoryPolicy,
) -> Result<GuestMemoryMmap, MemoryError> {
    validate_size(size)?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&ram_ranges(size))
        .map_err(|source| MemoryError::Mmap { size, source })?;
    match policy {
        MemoryPolicy::Private => {}
        MemoryPolicy::Shareable => madvise(&mem, libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")?,
        MemoryPolicy::KernelMergeable => {
            madvise(&mem, libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")?;
            madvise(&mem, libc::MADV_MERGEABLE, "MADV_MERGEABLE")?;
        }
    }
    Ok(mem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_around_the_mmio_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(validate_size(0).is_err());
        assert!(validate_size((64 << 20) + 1).is_err());
        assert!(validate_size(1 << 60).is_err());
        assert!(validate_size(64 << 20).is_ok());
    }
}
