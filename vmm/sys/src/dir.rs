//! Directories only their owner may change: the merge daemon's run directory, where a
//! socket that another user could replace would let that user's fake daemon receive a
//! VM's registration (and serve it a pool of its choosing).

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a directory is not private to this user.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    /// It could not be created or inspected.
    #[error("{}: {source}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A symbolic link stands where the directory should be.
    #[error("{} is a symbolic link; refusing it", path.display())]
    Symlink {
        /// The path.
        path: PathBuf,
    },
    /// Something other than a directory stands there.
    #[error("{} is not a directory", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Another user owns it.
    #[error("{} is owned by uid {owner}, not by this user (uid {me}); refusing it", path.display())]
    NotOwned {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// Owned by a user who is neither root nor this process's user.
    #[error("{} is owned by uid {owner}, neither root nor this user (uid {me}); refusing it", path.display())]
    NotTrusted {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// Other users may create or replace files in it.
    #[error("{} is writable by group or others (mode {mode:04o}); refusing it", path.display())]
    Writable {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Checks that `path` is a directory (not a symbolic link) owned by this process's
/// effective uid and not writable by group or others.
pub fn check_private_dir(path: &Path) -> Result<(), PrivateDirError> {
    check_dir(path, false)
}

/// Checks that `path` is a directory (not a symbolic link) owned by root or by this
/// process's effective uid, and not writable by group or others: nobody but root and this
/// user can have put a socket there. This is what a VM of any user asks of the run
/// directory of a daemon it registers with (a root daemon serving several users has its
/// run directory owned by root).
pub fn check_trusted_dir(path: &Path) -> Result<(), PrivateDirError> {
    check_dir(path, true)
}

fn check_dir(path: &Path, root_too: bool) -> Result<(), PrivateDirError> {
    let m = std::fs::symlink_metadata(path).map_err(|source| PrivateDirError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let path = path.to_path_buf();
    if m.file_type().is_symlink() {
        return Err(PrivateDirError::Symlink { path });
    }
    if !m.is_dir() {
        return Err(PrivateDirError::NotADirectory { path });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if root_too && m.uid() != me && m.uid() != 0 {
        return Err(PrivateDirError::NotTrusted {
            path,
            owner: m.uid(),
            me,
        });
    }
    if !root_too && m.uid() != me {
        return Err(PrivateDirError::NotOwned {
            path,
            owner: m.uid(),
            me,
        });
    }
    let mode = m.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(PrivateDirError::Writable { path, mode });
    }
    Ok(())
}

/// Creates `path` with mode 0700 if it does not exist (its missing parents too), then
/// checks it with [`check_private_dir`] and narrows its mode to 0700.
pub fn ensure_private_dir(path: &Path) -> Result<(), PrivateDirError> {
    ensure_private_dir_mode(path, 0o700)
}

/// [`ensure_private_dir`], then sets `mode` (group and others' write bits are always
/// cleared): 0711 lets other users reach sockets inside by name, and nothing more.
pub fn ensure_private_dir_mode(path: &Path, mode: u32) -> Result<(), PrivateDirError> {
    let io_err = |source| PrivateDirError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(e)),
    }
    check_private_dir(path)?;
    let mode = (mode & 0o755) | 0o700;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("tinyvmm-sys-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn a_new_directory_is_created_0700() {
        let d = scratch("new").join("run");
        ensure_private_dir(&d).unwrap();
        let mode = std::fs::metadata(&d).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::remove_dir_all(d.parent().unwrap()).unwrap();
    }

    #[test]
    fn world_writable_symlinked_and_foreign_directories_are_refused() {
        let base = scratch("bad");
        std::fs::create_dir_all(&base).unwrap();
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            ensure_private_dir(&open),
            Err(PrivateDirError::Writable { mode: 0o777, .. })
        ));
        let link = base.join("link");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        assert!(matches!(
            check_private_dir(&link),
            Err(PrivateDirError::Symlink { .. })
        ));
        let file = base.join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            check_private_dir(&file),
            Err(PrivateDirError::NotADirectory { .. })
        ));
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let foreign = base.join("foreign");
            std::fs::create_dir(&foreign).unwrap();
            std::os::unix::fs::chown(&foreign, Some(65534), None).unwrap();
            assert!(matches!(
                check_private_dir(&foreign),
                Err(PrivateDirError::NotOwned { owner: 65534, .. })
            ));
            assert!(matches!(
                check_trusted_dir(&foreign),
                Err(PrivateDirError::NotTrusted { owner: 65534, .. })
            ));
            // Root's directory is trusted (a root daemon serving other users), not private
            // to another user.
            let roots = base.join("roots");
            std::fs::create_dir(&roots).unwrap();
            std::fs::set_permissions(&roots, std::fs::Permissions::from_mode(0o711)).unwrap();
            assert!(check_trusted_dir(&roots).is_ok());
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
