//! [`PageError`], the errors of the page mechanism, and the helpers that build them.

/// Errors of the page mechanism. Any of them leaves guest memory content intact.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// userfaultfd could not be set up.
    #[error("userfaultfd: {0}")]
    Uffd(String),
    /// A userfaultfd operation on guest RAM (protect, unprotect, register) failed.
    #[error("{what} {hva:#x}+{len:#x}: {source}")]
    UffdOp {
        /// The operation.
        what: &'static str,
        /// First byte of the range.
        hva: u64,
        /// Bytes.
        len: u64,
        /// The error, with its errno.
        source: userfaultfd::Error,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// The call.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A request named pages outside guest RAM or frames outside the pool.
    #[error("request out of range: {0}")]
    Range(String),
    /// No pool yet.
    #[error("no pool: not registered with a merge daemon")]
    NoPool,
    /// The request asks for work an agent never does (e.g. writing pool frames).
    #[error("refused: {0}")]
    Refused(&'static str),
    /// The request failed after it had already remapped some of its pages: content is
    /// intact, but which pages map pool frames is no longer what the request's sender knows.
    #[error("{0} (after remapping part of the request)")]
    Incomplete(Box<PageError>),
}

impl PageError {
    /// The OS error number behind this error, where there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Os { source, .. } => source.raw_os_error(),
            Self::UffdOp { source, .. } => match source {
                userfaultfd::Error::SystemError(e)
                | userfaultfd::Error::CopyFailed(e)
                | userfaultfd::Error::ZeropageFailed(e) => Some(*e as i32),
                userfaultfd::Error::OpenDevUserfaultfd(e) => e.raw_os_error(),
                _ => None,
            },
            _ => None,
        }
    }

    /// A momentary shortage (EAGAIN, ENOMEM, EINTR, EBUSY) that stopped the request before
    /// it changed any mapping: the same request may be carried out again.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::EAGAIN | libc::ENOMEM | libc::EINTR | libc::EBUSY)
        )
    }
}

/// Maps an I/O error of the call `what` to [`PageError::Os`].
pub(super) fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> PageError {
    move |source| PageError::Os { what, source }
}

/// Maps a userfaultfd error of the operation `what` on `hva..hva+len` to
/// [`PageError::UffdOp`].
pub(super) fn uffd_op(
    what: &'static str,
    hva: u64,
    len: u64,
) -> impl FnOnce(userfaultfd::Error) -> PageError {
    move |source| PageError::UffdOp {
        what,
        hva,
        len,
        source,
    }
}

/// [`PageError::Os`] for the call `what`, with the thread's last OS error.
pub(super) fn last_os(what: &'static str) -> PageError {
    PageError::Os {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// The outcome of a mapping call `what` that failed with `e`: ENOMEM means the process is
/// out of mappings (its VMA budget), which the request reports per page as `Ok(false)`;
/// anything else fails the request.
pub(super) fn out_of_vmas_or(what: &'static str, e: std::io::Error) -> Result<bool, PageError> {
    if e.raw_os_error() == Some(libc::ENOMEM) {
        return Ok(false);
    }
    Err(PageError::Os { what, source: e })
}
