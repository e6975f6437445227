//! What processes cost the host, from /proc; the kernel's KSM knobs and counters.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Proportional set size of a process, bytes (`Pss` of /proc/PID/smaps_rollup).
pub fn pss_bytes(pid: u32) -> Option<u64> {
    rollup_field(pid, "Pss:")
}

fn rollup_field(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// Resident set size of a process, bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    rollup_field(pid, "Rss:")
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime from a /proc/.../stat file.
fn stat_cpu(path: &Path) -> Option<Duration> {
    let s = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64((utime + stime) / ticks_per_sec()))
}

/// CPU time (user + system) of a whole process.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    stat_cpu(&PathBuf::from(format!("/proc/{pid}/stat")))
}

/// CPU time of the threads of `pid` whose name is `name`.
pub fn thread_cpu(pid: u32, name: &str) -> Duration {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    dir.flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .map(|c| c.trim() == name)
                .unwrap_or(false)
        })
        .filter_map(|t| stat_cpu(&t.path().join("stat")))
        .sum()
}

/// The pid of the kernel's ksmd thread.
pub fn ksmd_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == "ksmd").then_some(pid)
    })
}

const KSM: &str = "/sys/kernel/mm/ksm";

/// Reads a KSM counter or knob.
pub fn ksm_read(name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("{KSM}/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Writes a KSM knob.
pub fn ksm_write(name: &str, value: u64) -> std::io::Result<()> {
    std::fs::write(format!("{KSM}/{name}"), value.to_string())
}

/// The kernel's KSM knobs as found, restored on drop (also on panic and early return):
/// `run`, `pages_to_scan`, `sleep_millisecs`. Restoring `run` to 0 after a run of 1 leaves
/// merged pages merged, as the kernel does; 2 is written first to unmerge them.
pub struct KsmGuard {
    saved: Vec<(&'static str, u64)>,
}

impl KsmGuard {
    /// Saves the knobs; fails when KSM is missing or not writable (not root).
    pub fn new() -> std::io::Result<Self> {
        let mut saved = Vec::new();
        for k in ["run", "pages_to_scan", "sleep_millisecs"] {
            let v = ksm_read(k).ok_or_else(|| {
                std::io::Error::other(format!(
                    "{KSM}/{k} is not readable (no KSM in this kernel?)"
                ))
            })?;
            saved.push((k, v));
        }
        // Writing the value back proves we may change it.
        ksm_write("pages_to_scan", saved[1].1)?;
        Ok(Self { saved })
    }
}

impl Drop for KsmGuard {
    fn drop(&mut self) {
        // Unmerge what we merged, then restore every knob.
        let _ = ksm_write("run", 2);
        for (k, v) in &self.saved {
            if let Err(e) = ksm_write(k, *v) {
                tracing::error!("cannot restore {KSM}/{k} to {v}: {e}");
            }
        }
    }
}

/// Kernel memory one mapping (VMA) of a VM process costs, bytes, from the slab caches'
/// object sizes: a `vm_area_struct`, half an `anon_vma_chain` (the anonymous pieces a
/// merged run splits off keep one each) and an eighth of a `maple_node` (the VMA tree).
/// 192 + 32 + 32 = 256 B on this machine kind, where remapping 200 000 isolated guest
/// pages (400 000 new VMAs) grew the kernel's slab by 259 B per VMA. Falls back to 256
/// when /proc/slabinfo is not readable.
pub fn vma_kernel_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/slabinfo") else {
        return 256;
    };
    let objsize = |cache: &str| -> Option<u64> {
        s.lines()
            .find(|l| l.split_whitespace().next() == Some(cache))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok())
    };
    match (
        objsize("vm_area_struct"),
        objsize("anon_vma_chain"),
        objsize("maple_node"),
    ) {
        (Some(vma), Some(avc), Some(node)) => vma + avc / 2 + node / 8,
        _ => 256,
    }
}

/// Kernel memory KSM's own metadata holds now, bytes: what `general_profit` leaves of the
/// pages it saved (the kernel counts its rmap items there, 64 B per page scanned in
/// mergeable areas). `None` on kernels without `general_profit`.
pub fn ksm_metadata_bytes() -> Option<u64> {
    let saved = ksm_read("pages_sharing")? + ksm_read("ksm_zero_pages").unwrap_or(0);
    let profit: i64 = std::fs::read_to_string(format!("{KSM}/general_profit"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some((saved as i64 * 4096 - profit).max(0) as u64)
}

/// `vm.max_map_count` as found, restored on drop: the density benchmark lets tinyvmm's
/// daemon raise it (`tinyvmm merged --max-map-count`) for its run only.
pub struct MapCountGuard {
    saved: u64,
}

impl MapCountGuard {
    /// Saves the current value.
    pub fn save() -> Result<Self, tinyvmm_sys::vm_limits::MapCountError> {
        Ok(Self {
            saved: tinyvmm_sys::vm_limits::max_map_count()?,
        })
    }

    /// The value found.
    pub fn saved(&self) -> u64 {
        self.saved
    }
}

impl Drop for MapCountGuard {
    fn drop(&mut self) {
        use tinyvmm_sys::vm_limits;
        if vm_limits::max_map_count().ok() == Some(self.saved) {
            return;
        }
        if let Err(e) = vm_limits::set_max_map_count(self.saved) {
            tracing::error!("cannot restore vm.max_map_count to {}: {e}", self.saved);
        }
    }
}
