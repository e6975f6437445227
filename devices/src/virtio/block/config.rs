//! What `--disk PATH[,ro]` asks for, and the image it opens.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::str::FromStr;

use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

use super::request::{Disk, SECTOR_SIZE};

/// One disk: an image file, read-write or read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image (a regular file or a block device).
    pub path: PathBuf,
    /// Refuse guest writes (`VIRTIO_BLK_F_RO`); the image is opened read-only.
    pub read_only: bool,
}

/// Errors in a `--disk` argument or opening its image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The argument is not `PATH[,ro]`.
    #[error("invalid --disk {arg:?}: {why} (expected PATH or PATH,ro)")]
    Syntax {
        /// The argument.
        arg: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The image cannot be opened or sized.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The image is not a file or block device.
    #[error("disk image {path} is not a regular file or block device")]
    NotAFile {
        /// The image.
        path: PathBuf,
    },
}

impl FromStr for DiskConfig {
    type Err = DiskError;

    fn from_str(arg: &str) -> Result<Self, DiskError> {
        let bad = |why| DiskError::Syntax {
            arg: arg.to_string(),
            why,
        };
        let (path, opts) = match arg.split_once(',') {
            Some((p, o)) => (p, Some(o)),
            None => (arg, None),
        };
        if path.is_empty() {
            return Err(bad("empty path"));
        }
        let read_only = match opts {
            None => false,
            Some("ro") => true,
            Some("rw") => false,
            Some(_) => return Err(bad("unknown option")),
        };
        Ok(Self {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

impl DiskConfig {
    /// Opens the image (read-only for `ro`) and sizes it.
    pub fn open(&self) -> Result<Disk, DiskError> {
        let open = |source| DiskError::Open {
            path: self.path.clone(),
            source,
        };
        let mut file: File = OpenOptions::new()
            .read(true)
            .write(!self.read_only)
            .open(&self.path)
            .map_err(open)?;
        let meta = file.metadata().map_err(open)?;
        let ft = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        if !ft.is_file() && !ft.is_block_device() {
            return Err(DiskError::NotAFile {
                path: self.path.clone(),
            });
        }
        let len = file.seek(SeekFrom::End(0)).map_err(open)?;
        if len % SECTOR_SIZE != 0 {
            tracing::warn!(
                "disk image {}: {} trailing bytes past the last whole sector are not visible",
                self.path.display(),
                len % SECTOR_SIZE
            );
        }
        Ok(Disk {
            file,
            sectors: len / SECTOR_SIZE,
            read_only: self.read_only,
            id: disk_id(meta.dev(), meta.ino()),
        })
    }
}

/// The `GET_ID` serial: the image's device and inode numbers, as Firecracker derives it.
fn disk_id(dev: u64, ino: u64) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
    let s = format!("tvmm{dev:x}-{ino:x}");
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    let n = s.len().min(id.len());
    id[..n].copy_from_slice(&s.as_bytes()[..n]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_path_and_ro_and_refuses_the_rest() {
        assert_eq!(
            "/a/b.img".parse::<DiskConfig>().unwrap(),
            DiskConfig {
                path: "/a/b.img".into(),
                read_only: false
            }
        );
        assert!("x.img,ro".parse::<DiskConfig>().unwrap().read_only);
        assert!(!"x.img,rw".parse::<DiskConfig>().unwrap().read_only);
        for bad in ["", ",ro", "x.img,", "x.img,readonly", "x.img,ro,ro"] {
            assert!(
                matches!(bad.parse::<DiskConfig>(), Err(DiskError::Syntax { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_missing_image_or_a_directory_is_an_error() {
        let missing = DiskConfig {
            path: "/nonexistent/tinyvmm-disk.img".into(),
            read_only: true,
        };
        assert!(matches!(missing.open(), Err(DiskError::Open { .. })));
        let dir = DiskConfig {
            path: std::env::temp_dir(),
            read_only: true,
        };
        assert!(matches!(dir.open(), Err(DiskError::NotAFile { .. })));
    }
}
