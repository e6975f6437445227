//! Anonymous memory files.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

/// Creates a memfd named `name` (shown in `/proc/PID/fd` and `/proc/PID/maps`), closed on
/// exec. `flags` are added to `MFD_CLOEXEC` (e.g. `MFD_ALLOW_SEALING`).
pub fn create(name: &str, flags: libc::c_uint) -> io::Result<File> {
    let cname = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "memfd name contains NUL"))?;
    // SAFETY: a valid C string; memfd_create has no other preconditions.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}
