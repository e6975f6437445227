//! Dropping a process's privileges: another user and group, no capabilities, no way back.
//!
//! [`drop_privileges`] is meant for a process that opened what it needs as root (a device,
//! files, sockets) and runs untrusted work from then on. It must run while the process
//! has one thread: the capability sets, the bounding set and `no_new_privs` belong to the
//! calling thread and are inherited only by the threads it starts afterwards.
//!
//! The order matters: the bounding set is dropped first (that needs `CAP_SETPCAP`), then
//! the supplementary groups and the gid (they need `CAP_SETGID`), then the uid (the
//! kernel clears the permitted and effective sets when every uid leaves 0), then
//! whatever is left of the capability sets, the ambient set, and last `no_new_privs`.
//! Every step is checked afterwards ([`verify`]): a caller that gets `Ok` runs with the
//! new ids and no capability at all; one that gets `Err` must not go on.

/// The highest capability number this module drops from the bounding set if the kernel
/// does not say (`/proc/sys/kernel/cap_last_cap`).
const CAP_LAST_CAP_FALLBACK: u32 = 40;

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets in two 32-bit words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Why privileges could not be dropped (or were not dropped entirely).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// uid or gid `-1` (`u32::MAX`) means "unchanged" to the kernel: refused.
    #[error("{what} {id} is not a usable id (it means \"unchanged\" to the kernel)")]
    ReservedId {
        /// "uid" or "gid".
        what: &'static str,
        /// The id given.
        id: u32,
    },
    /// A system call of the drop failed.
    #[error("cannot {step}: {source} (dropping to another user needs root, or CAP_SETUID, CAP_SETGID and CAP_SETPCAP)")]
    Step {
        /// What was being done.
        step: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The calls succeeded but the process does not look as it should.
    #[error("privileges not dropped as asked: {0}")]
    NotDropped(String),
}

fn step(step: &'static str) -> impl FnOnce(std::io::Error) -> JailError {
    move |source| JailError::Step { step, source }
}

fn check(rc: libc::c_long) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The highest capability the running kernel knows.
fn cap_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(CAP_LAST_CAP_FALLBACK)
}

/// Removes every capability from the calling thread's bounding set, so that not even an
/// `execve` of a file with capabilities could give one back.
pub fn drop_bounding_set() -> std::io::Result<()> {
    for cap in 0..=cap_last_cap() {
        // SAFETY: PR_CAPBSET_DROP takes a capability number; no memory is passed.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // A capability this kernel does not know: nothing to drop.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's (effective, permitted, inheritable) capability sets.
pub fn capabilities() -> std::io::Result<(u64, u64, u64)> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData (the version 3 layout) into `data`.
    check(unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) })?;
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
    Ok((
        join(|d| d.effective),
        join(|d| d.permitted),
        join(|d| d.inheritable),
    ))
}

/// Clears the calling thread's effective, permitted, inheritable and ambient sets.
pub fn clear_capabilities() -> std::io::Result<()> {
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads the header and two CapData; all sets become empty.
    check(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) })?;
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointer.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    // Kernels before 4.3 have no ambient set: nothing to clear.
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `no_new_privs` on the calling thread (and the threads and programs it starts):
/// `execve` can never grant privileges again (setuid bits, file capabilities), and a
/// seccomp filter may be installed without `CAP_SYS_ADMIN`.
pub fn set_no_new_privs() -> std::io::Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes an integer; no memory is passed.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into())
}

/// Whether `no_new_privs` is set on the calling thread.
pub fn no_new_privs() -> bool {
    // SAFETY: PR_GET_NO_NEW_PRIVS takes no arguments.
    unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

/// Makes the process `uid`/`gid` with no supplementary group, no capability and
/// `no_new_privs`, as the module's documentation says. Call it while the process has one
/// thread. On `Err` the process may be part-way: the caller must exit, not go on.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    if uid == u32::MAX {
        return Err(JailError::ReservedId {
            what: "uid",
            id: uid,
        });
    }
    if gid == u32::MAX {
        return Err(JailError::ReservedId {
            what: "gid",
            id: gid,
        });
    }
    drop_bounding_set().map_err(step("drop the capability bounding set"))?;
    // SAFETY: setgroups with a count of 0 reads no memory.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }.into())
        .map_err(step("clear the supplementary groups"))?;
    // SAFETY: setresgid takes three ids.
    check(unsafe { libc::setresgid(gid, gid, gid) }.into()).map_err(step("set the gid"))?;
    // SAFETY: setresuid takes three ids.
    check(unsafe { libc::setresuid(uid, uid, uid) }.into()).map_err(step("set the uid"))?;
    clear_capabilities().map_err(step("clear the capability sets"))?;
    set_no_new_privs().map_err(step("set no_new_privs"))?;
    verify(uid, gid)
}

/// Checks that the calling thread runs as `uid`/`gid` (real, effective and saved), with
/// no supplementary group, empty capability sets and `no_new_privs`.
pub fn verify(uid: u32, gid: u32) -> Result<(), JailError> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: getresuid writes three ids into the locals.
    check(unsafe { libc::getresuid(&mut r, &mut e, &mut s) }.into())
        .map_err(step("read the uids"))?;
    if (r, e, s) != (uid, uid, uid) {
        return Err(JailError::NotDropped(format!(
            "uids are {r}/{e}/{s}, not {uid}"
        )));
    }
    // SAFETY: getresgid writes three ids into the locals.
    check(unsafe { libc::getresgid(&mut r, &mut e, &mut s) }.into())
        .map_err(step("read the gids"))?;
    if (r, e, s) != (gid, gid, gid) {
        return Err(JailError::NotDropped(format!(
            "gids are {r}/{e}/{s}, not {gid}"
        )));
    }
    // SAFETY: a count of 0 asks for the number of groups only.
    let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if groups != 0 {
        return Err(JailError::NotDropped(format!(
            "{groups} supplementary groups left"
        )));
    }
    let caps = capabilities().map_err(step("read the capability sets"))?;
    if caps != (0, 0, 0) {
        return Err(JailError::NotDropped(format!(
            "capabilities left (effective {:#x}, permitted {:#x}, inheritable {:#x})",
            caps.0, caps.1, caps.2
        )));
    }
    if !no_new_privs() {
        return Err(JailError::NotDropped("no_new_privs is not set".into()));
    }
    Ok(())
}
