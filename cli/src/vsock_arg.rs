//! `tinyvmm run --vsock CID,PATH`: the guest's vsock CID and the Unix socket host programs
//! use to reach it (Firecracker's convention).

use std::path::PathBuf;

/// The longest path a Unix socket address holds (`sun_path` less its NUL), less room for
/// the `_<port>` suffix of the per-port listeners (`_4294967295`).
pub const MAX_SOCKET_PATH: usize = 107 - 11;

/// A `--vsock` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockArg {
    /// The guest's context ID (3 or more).
    pub cid: u64,
    /// The Unix socket path.
    pub path: PathBuf,
}

/// A `--vsock` argument that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VsockArgError {
    /// Not `CID,PATH`.
    #[error("invalid --vsock '{0}': expected CID,PATH (e.g. 3,/tmp/vm.vsock)")]
    Shape(String),
    /// The CID is not a number that fits in 32 bits.
    #[error("invalid --vsock CID '{0}': expected a number from 3 to 4294967295")]
    Cid(String),
    /// A reserved CID.
    #[error(
        "invalid --vsock CID {0}: CIDs 0-2 are reserved (hypervisor, local, host); use 3 or more"
    )]
    ReservedCid(u64),
    /// A path too long for a Unix socket address.
    #[error("invalid --vsock path '{0}': longer than {MAX_SOCKET_PATH} bytes (a Unix socket path, with room for _<port>)")]
    PathTooLong(String),
}

/// Parses `CID,PATH`.
pub fn parse_vsock(s: &str) -> Result<VsockArg, VsockArgError> {
    let (cid, path) = s
        .split_once(',')
        .filter(|(c, p)| !c.trim().is_empty() && !p.is_empty())
        .ok_or_else(|| VsockArgError::Shape(s.to_string()))?;
    let cid: u64 = cid
        .trim()
        .parse()
        .ok()
        .filter(|&c| c <= u64::from(u32::MAX))
        .ok_or_else(|| VsockArgError::Cid(cid.to_string()))?;
    if cid < 3 {
        return Err(VsockArgError::ReservedCid(cid));
    }
    if path.len() > MAX_SOCKET_PATH {
        return Err(VsockArgError::PathTooLong(path.to_string()));
    }
    Ok(VsockArg {
        cid,
        path: PathBuf::from(path),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_and_path_parse() {
        let a = parse_vsock("3,/tmp/v.sock").unwrap();
        assert_eq!((a.cid, a.path), (3, PathBuf::from("/tmp/v.sock")));
        assert_eq!(
            parse_vsock("4294967295,a,b").unwrap().path,
            PathBuf::from("a,b")
        );
    }

    #[test]
    fn malformed_arguments_say_what_is_wrong() {
        for (arg, want) in [
            ("3", "expected CID,PATH"),
            ("3,", "expected CID,PATH"),
            (",/tmp/x", "expected CID,PATH"),
            ("x,/tmp/x", "expected a number"),
            ("-1,/tmp/x", "expected a number"),
            ("4294967296,/tmp/x", "expected a number"),
            ("2,/tmp/x", "reserved"),
            ("0,/tmp/x", "reserved"),
        ] {
            let e = parse_vsock(arg).unwrap_err().to_string();
            assert!(e.contains(want), "{arg}: {e}");
        }
        let long = format!("3,/{}", "a".repeat(100));
        assert!(parse_vsock(&long)
            .unwrap_err()
            .to_string()
            .contains("longer than"));
    }
}
