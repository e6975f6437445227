//! The host's per-process mapping limit, `vm.max_map_count`: every merged run of guest pages
//! is a mapping (VMA) of its VM process, so this sysctl bounds how much of a guest with
//! scattered duplicates can be merged. Reading it is free; raising it needs root and
//! changes the host for every process (each VMA actually created costs kernel memory,
//! about 256 bytes here; an unused allowance costs nothing).

use std::io;

const PATH: &str = "/proc/sys/vm/max_map_count";

/// The kernel's default `vm.max_map_count`.
pub const DEFAULT_MAX_MAP_COUNT: u64 = 65_530;

/// Raising `vm.max_map_count` failed.
#[derive(Debug, thiserror::Error)]
pub enum MapCountError {
    /// The sysctl could not be read.
    #[error("cannot read {PATH}: {0}")]
    Read(#[source] io::Error),
    /// It does not hold a number.
    #[error("{PATH} holds {0:?}, not a number")]
    Parse(String),
    /// Writing the new value failed (not root, or a read-only /proc/sys).
    #[error("cannot set {PATH} to {want} (it is {now}; raising it needs root): {source}")]
    Write {
        /// The value asked for.
        want: u64,
        /// The value it keeps.
        now: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The current `vm.max_map_count`.
pub fn max_map_count() -> Result<u64, MapCountError> {
    let s = std::fs::read_to_string(PATH).map_err(MapCountError::Read)?;
    s.trim()
        .parse()
        .map_err(|_| MapCountError::Parse(s.trim().to_string()))
}

/// Raises `vm.max_map_count` to `want` if it is lower; never lowers it. Returns the value
/// it had before when it was raised, `None` when it already allowed `want`.
pub fn raise_max_map_count(want: u64) -> Result<Option<u64>, MapCountError> {
    let now = max_map_count()?;
    if now >= want {
        return Ok(None);
    }
    set_max_map_count(want).map_err(|source| MapCountError::Write { want, now, source })?;
    Ok(Some(now))
}

/// Sets `vm.max_map_count` to `value`, up or down (to restore a saved value).
pub fn set_max_map_count(value: u64) -> io::Result<()> {
    std::fs::write(PATH, value.to_string())
}

/// Mappings (VMAs) the calling process has now (lines of /proc/self/maps).
pub fn own_mappings() -> u64 {
    mappings_of("self")
}

/// Mappings (VMAs) of process `pid` now; 0 when it cannot be read.
pub fn mappings(pid: u32) -> u64 {
    mappings_of(&pid.to_string())
}

fn mappings_of(pid: &str) -> u64 {
    std::fs::read(format!("/proc/{pid}/maps"))
        .map(|b| bytecount_lines(&b))
        .unwrap_or(0)
}

fn bytecount_lines(b: &[u8]) -> u64 {
    b.iter().filter(|&&c| c == b'\n').count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_limit_and_counts_own_mappings() {
        assert!(max_map_count().unwrap() > 0);
        let before = own_mappings();
        assert!(before > 0);
        // A limit at or below the current one is left alone, without writing anything.
        assert_eq!(raise_max_map_count(1).unwrap(), None);
    }
}
