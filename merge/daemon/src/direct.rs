//! Reading the pages to populate straight from the VM process (`process_vm_readv`): one
//! copy into the daemon instead of the agent's copy, two socket copies and a decode.
//!
//! Trust: the agent reports where guest RAM is in its process (`Request::RamLayout`);
//! that is only a hint. The daemon reads from the VM process it is talking to (the pid is
//! the socket's peer credentials, not the agent's word), so a lying agent only gets the
//! daemon to copy some other memory *of its own process* into a new frame — bytes it could
//! have put in its guest pages anyway. The frame's hash is the daemon's, from the bytes it
//! read, and no page maps the frame before the agent's byte compare under write protection
//! (the Join) found it equal to the page: a wrong copy is a mismatch, never a wrong merge.
//! A pid names the same process for as long as that process has not exited, so the read is
//! kept only if the process (watched through its pidfd) is still alive after it: a pid
//! reused by another process meanwhile never fills a frame.
//!
//! Permission: `process_vm_readv` needs `PTRACE_MODE_ATTACH_REALCREDS` on the VM process.
//! A root daemon has it (`CAP_SYS_PTRACE`). A non-root daemon has it for VM processes of
//! its own uid that are dumpable, unless Yama's `ptrace_scope` is 1 or more (then only for
//! its descendants) — an autostarted daemon is not the parent of its VMs, and a VMM that
//! dropped privileges is not dumpable. Where it is refused (or the layout is unusable, or
//! a read comes back short) the daemon asks the agent for copies (`ReadPages`) from then
//! on, as before.

use tinyvmm_merge::host::{GuestId, PageRun, PAGE_SIZE};
use tinyvmm_merge_protocol::wire::{Reply, Request};

use crate::fleet::Fleet;
use crate::page_source::Source;

impl Fleet {
    /// Reads the pages of `runs` of `guest` straight from its VM process into `buf` (4 KiB a
    /// page, in order). `false`: not possible for this guest (the caller asks the agent).
    pub(crate) fn read_direct(
        &mut self,
        guest: GuestId,
        runs: &[PageRun],
        buf: &mut Vec<u8>,
    ) -> bool {
        if !self.sources.contains_key(&guest) {
            let source = self.ask_layout(guest);
            self.sources.insert(guest, source);
        }
        let Some(Source::Direct(ranges)) = self.sources.get(&guest) else {
            return false;
        };
        let Some(conn) = self.conns.get(&guest) else {
            return false;
        };
        let mut remote: Vec<libc::iovec> = Vec::new();
        let mut total = 0usize;
        for r in runs {
            let Some(pieces) = pieces(ranges, r.gfn, u64::from(r.len)) else {
                return self.give_up(guest, "a page outside the reported RAM");
            };
            for (hva, len) in pieces {
                remote.push(libc::iovec {
                    iov_base: hva as *mut libc::c_void,
                    iov_len: len as usize,
                });
                total += len as usize;
            }
        }
        buf.clear();
        buf.resize(total, 0);
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: total,
        };
        let pid = conn.process.pid() as libc::pid_t;
        // SAFETY: `local` is our own buffer of `total` bytes; the remote iovecs name memory
        // of the other process, which the kernel checks (a bad address is EFAULT or a
        // short read, never a write here).
        let n = unsafe {
            libc::process_vm_readv(pid, &local, 1, remote.as_ptr(), remote.len() as u64, 0)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return self.give_up(guest, &format!("process_vm_readv: {e}"));
        }
        if n as usize != total {
            return self.give_up(guest, "process_vm_readv read short");
        }
        // The pid named the VM process all along only if it is still alive now.
        let alive = self.conns.get(&guest).is_some_and(|c| !c.process.exited());
        alive
    }

    /// Asks the agent where guest RAM is; usable if the ranges are whole pages and cover
    /// exactly the registered pages.
    fn ask_layout(&mut self, guest: GuestId) -> Source {
        let pages = match self.conns.get(&guest) {
            Some(c) => c.hello.pages,
            None => return Source::Agent,
        };
        match self.call(guest, Request::RamLayout) {
            Ok(Reply::RamLayout(r))
                if r.iter()
                    .all(|&(a, l)| a % PAGE_SIZE as u64 == 0 && l % PAGE_SIZE as u64 == 0)
                    && r.iter().map(|&(_, l)| l / PAGE_SIZE as u64).sum::<u64>() == pages =>
            {
                tracing::debug!(
                    guest = guest.0,
                    "pages to populate are read from the VM process"
                );
                Source::Direct(r)
            }
            _ => {
                tracing::info!(
                    guest = guest.0,
                    "no usable RAM layout; page copies come from the agent"
                );
                Source::Agent
            }
        }
    }

    fn give_up(&mut self, guest: GuestId, why: &str) -> bool {
        tracing::info!(
            guest = guest.0,
            "cannot read the VM's pages directly ({why}); page copies come from the agent"
        );
        self.sources.insert(guest, Source::Agent);
        false
    }
}

/// The address ranges of pages `gfn..gfn+len` in `ranges` (guest RAM in page order), or
/// `None` if they are not all inside.
fn pieces(ranges: &[(u64, u64)], gfn: u64, len: u64) -> Option<Vec<(u64, u64)>> {
    let page = PAGE_SIZE as u64;
    let mut out = Vec::new();
    let (mut at, mut left) = (gfn, len);
    let mut first = 0u64;
    for &(hva, bytes) in ranges {
        let n = bytes / page;
        if left > 0 && at < first + n {
            let k = (first + n - at).min(left);
            out.push((hva + (at - first) * page, k * page));
            at += k;
            left -= k;
        }
        first += n;
    }
    (left == 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Conn;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    /// A fleet whose one guest is this very process, its "RAM" at `ranges`.
    fn fleet_of_self(ranges: Vec<(u64, u64)>) -> (Fleet, GuestId, UnixStream) {
        let (daemon_end, agent_end) = UnixStream::pair().unwrap();
        let mut fleet = Fleet::new(Duration::from_secs(5));
        let guest = GuestId(1);
        let pages = ranges.iter().map(|&(_, l)| l / PAGE_SIZE as u64).sum();
        fleet
            .conns
            .insert(guest, Conn::of_this_process(daemon_end, "self", pages));
        fleet.sources.insert(guest, Source::Direct(ranges));
        (fleet, guest, agent_end)
    }

    #[test]
    fn pages_are_read_straight_from_the_process() {
        let ram: Vec<u8> = (0..3 * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE + 1) as u8)
            .collect();
        let base = ram.as_ptr() as u64;
        let (mut fleet, guest, _agent) = fleet_of_self(vec![(base, 3 * PAGE_SIZE as u64)]);
        let mut buf = Vec::new();
        let runs = [PageRun { gfn: 1, len: 2 }];
        assert!(fleet.read_direct(guest, &runs, &mut buf));
        assert_eq!(buf, ram[PAGE_SIZE..]);
    }

    #[test]
    fn a_layout_that_points_nowhere_falls_back_to_the_agent() {
        let (mut fleet, guest, _agent) = fleet_of_self(vec![(0x1000, 4 * PAGE_SIZE as u64)]);
        let mut buf = Vec::new();
        assert!(!fleet.read_direct(guest, &[PageRun { gfn: 0, len: 1 }], &mut buf));
        assert!(matches!(fleet.sources.get(&guest), Some(Source::Agent)));
        // Pages outside the reported RAM are never read.
        let (mut fleet, guest, _agent) = fleet_of_self(vec![(0x1000, PAGE_SIZE as u64)]);
        assert!(!fleet.read_direct(guest, &[PageRun { gfn: 1, len: 1 }], &mut buf));
    }

    #[test]
    fn pages_map_onto_the_reported_ranges() {
        let r = [(0x10000, 2 * 4096), (0x80000, 3 * 4096)];
        assert_eq!(pieces(&r, 0, 2), Some(vec![(0x10000, 8192)]));
        assert_eq!(
            pieces(&r, 1, 3),
            Some(vec![(0x11000, 4096), (0x80000, 8192)])
        );
        assert_eq!(pieces(&r, 4, 1), Some(vec![(0x82000, 4096)]));
        assert_eq!(pieces(&r, 4, 2), None);
        assert_eq!(pieces(&r, 9, 1), None);
    }
}
