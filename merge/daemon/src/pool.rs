//! A share group's pool of frames: the memfd the daemon writes and agents map read-only.

use std::fs::File;
use std::os::fd::AsRawFd;

use tinyvmm_merge::host::{FrameId, PAGE_SIZE};

/// Virtual size of each pool file (sparse: only populated frames use memory).
pub const POOL_LEN: u64 = 256 << 30;

/// A merge domain's pool of frames: a memfd that only the daemon writes.
///
/// Agents get [`Pool::readonly`], a read-only descriptor of the same file: they map frames
/// `MAP_PRIVATE` (copy-on-write, which needs no write access) and read them, but cannot
/// write, punch, truncate or map them writable-shared. The file's mode is 0444, so a
/// process without `CAP_DAC_OVERRIDE` cannot reopen it writable through `/proc/PID/fd`, and
/// its size is sealed (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`), so even such a process
/// cannot make the guests that map it fault (SIGBUS) by truncating it.
#[derive(Debug)]
pub struct Pool {
    /// The daemon's writable descriptor.
    pub file: File,
    /// The descriptor agents receive.
    pub readonly: File,
}

impl Pool {
    pub fn create(name: &str) -> std::io::Result<Self> {
        let file =
            tinyvmm_sys::memfd::create(&format!("tinyvmm-pool-{name}"), libc::MFD_ALLOW_SEALING)?;
        file.set_len(POOL_LEN)?;
        std::fs::set_permissions(
            format!("/proc/self/fd/{}", file.as_raw_fd()),
            std::os::unix::fs::PermissionsExt::from_mode(0o444),
        )?;
        // SAFETY: fcntl on our own memfd with integer arguments.
        let rc = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let readonly = File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        Ok(Self { file, readonly })
    }

    /// Writes new frames from page copies: `bytes` (whole pages) into the frames from
    /// `first` on. Only fresh frames are written: no page maps them yet (invariant 1).
    pub fn write_frames(&self, first: FrameId, bytes: &[u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(
            &self.file,
            bytes,
            u64::from(first) * PAGE_SIZE as u64,
        )
    }

    /// Bytes of frames resident in the pool.
    pub fn resident_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    pub fn punch(&self, frames: &[FrameId]) -> std::io::Result<()> {
        let mut sorted = frames.to_vec();
        sorted.sort_unstable();
        let mut i = 0;
        while i < sorted.len() {
            let mut n = 1;
            while i + n < sorted.len() && sorted[i + n] == sorted[i] + n as u32 {
                n += 1;
            }
            // SAFETY: fallocate on our own memfd; the range is inside the file.
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    i64::from(sorted[i]) * PAGE_SIZE as i64,
                    n as i64 * PAGE_SIZE as i64,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            i += n;
        }
        Ok(())
    }
}
