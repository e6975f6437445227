//! Reporting a system call that a seccomp filter refused.
//!
//! Filters that end in `SECCOMP_RET_TRAP` make the kernel send `SIGSYS` to the thread that
//! made the call, with the call's number in the signal information. The handler installed
//! by [`install_sigsys_handler`] writes one line to stderr naming the call and the kind of
//! thread that made it (set by [`set_thread_kind`]), then ends the process with
//! [`BAD_SYSCALL_EXIT`]: a refused call is a bug in the filter or a compromised process,
//! and neither may go on silently.
//!
//! The handler runs under the very filter that refused the call, so it makes two system
//! calls only, `write` and `exit_group`, which every filter must allow; it allocates
//! nothing and takes no lock (async-signal-safe).

use std::cell::Cell;

use crate::syscall_names::SYSCALL_NAMES;

/// The exit status of a process stopped because a thread made a system call outside its
/// seccomp filter (Firecracker's status for the same event).
pub const BAD_SYSCALL_EXIT: i32 = 148;

/// `si_code` of a `SIGSYS` sent by seccomp (`SYS_SECCOMP`).
const SYS_SECCOMP: i32 = 1;

thread_local! {
    /// The kind of the current thread, for the report ("vcpu", "merge-agent", ...).
    static THREAD_KIND: Cell<&'static str> = const { Cell::new("unnamed") };
}

/// Names the kind of the calling thread in reports of refused system calls.
pub fn set_thread_kind(kind: &'static str) {
    THREAD_KIND.with(|k| k.set(kind));
}

/// The name of x86_64 system call `nr`, if known.
pub fn syscall_name(nr: u32) -> Option<&'static str> {
    SYSCALL_NAMES
        .binary_search_by_key(&nr, |(n, _)| *n)
        .ok()
        .map(|i| SYSCALL_NAMES[i].1)
}

/// A fixed buffer that a signal handler can format into.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut v: u32) {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The report of a refused call `nr` on a thread of kind `kind`.
fn report(nr: u32, kind: &str) -> Line {
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"tinyvmm: bad system call ");
    line.push_number(nr);
    if let Some(name) = syscall_name(nr) {
        line.push(b" (");
        line.push(name.as_bytes());
        line.push(b")");
    }
    line.push(b" on a ");
    line.push(kind.as_bytes());
    line.push(b" thread: not allowed by its seccomp filter; stopping the VMM (--no-seccomp turns the filters off to debug)\n");
    line
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler. For SIGSYS the
    // union after the three leading ints and padding (offset 16) is `{ void *call_addr;
    // int syscall; unsigned arch; }`, so the call number is the int at offset 24.
    let (code, nr) = unsafe {
        let code = (*info).si_code;
        let nr = *(info as *const u8).add(24).cast::<i32>();
        (code, nr)
    };
    let kind = THREAD_KIND.with(Cell::get);
    let line = if code == SYS_SECCOMP {
        report(nr as u32, kind)
    } else {
        let mut l = Line {
            buf: [0; 256],
            len: 0,
        };
        l.push(b"tinyvmm: SIGSYS (not from seccomp) on a ");
        l.push(kind.as_bytes());
        l.push(b" thread; stopping the VMM\n");
        l
    };
    // SAFETY: write and _exit are async-signal-safe; the buffer is valid for `len` bytes.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::_exit(BAD_SYSCALL_EXIT);
    }
}

/// Installs the process-wide `SIGSYS` handler that reports a refused system call and
/// exits with [`BAD_SYSCALL_EXIT`].
pub fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: sigaction is plain data; zero is a valid value.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act.sa_mask` is a valid sigset to initialise.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: `act` is initialised; the old action is not needed.
    if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_names_the_call_and_the_thread_kind() {
        let l = report(62, "vcpu");
        let s = std::str::from_utf8(&l.buf[..l.len]).unwrap();
        assert!(
            s.starts_with("tinyvmm: bad system call 62 (kill) on a vcpu thread"),
            "{s}"
        );
        assert!(s.ends_with('\n'));
        let l = report(100_000, "api");
        let s = std::str::from_utf8(&l.buf[..l.len]).unwrap();
        assert!(
            s.starts_with("tinyvmm: bad system call 100000 on a api thread"),
            "{s}"
        );
    }

    #[test]
    fn the_name_table_is_sorted_and_knows_common_calls() {
        assert!(SYSCALL_NAMES.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(syscall_name(0), Some("read"));
        assert_eq!(syscall_name(16), Some("ioctl"));
        assert_eq!(syscall_name(231), Some("exit_group"));
    }
}
