//! Why the merge agent's work with the daemon stopped: a request it could not carry out
//! (and what the daemon may rely on then), a registration that ended, a daemon it did not
//! connect to (absent, or not to be trusted).

use tinyvmm_merge_protocol::{AgentError, AgentErrorKind, WireError};

use super::pages::PageError;

/// Why the agent could not carry out one of the daemon's requests. Guest memory content is
/// intact either way; [`RequestError::kind`] says what else the daemon may rely on.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// KVM's dirty log could not be read, so the agent cannot tell which pages changed.
    #[error("cannot read which guest pages were written (KVM dirty log): {0}")]
    DirtyLog(#[source] std::io::Error),
    /// The page work on guest RAM failed.
    #[error("{0}")]
    Pages(#[from] PageError),
}

impl RequestError {
    /// How the daemon should treat this failure (see [`AgentErrorKind`]).
    pub fn kind(&self) -> AgentErrorKind {
        match self {
            // Harvested bits are kept (see `collect_dirty`): asking again loses nothing.
            Self::DirtyLog(e) if is_transient_errno(e.raw_os_error()) => AgentErrorKind::Transient,
            Self::DirtyLog(_) => AgentErrorKind::Fatal,
            Self::Pages(PageError::Range(_) | PageError::NoPool | PageError::Refused(_)) => {
                AgentErrorKind::BadRequest
            }
            Self::Pages(PageError::Incomplete(_)) => AgentErrorKind::Fatal,
            Self::Pages(e) if e.is_transient() => AgentErrorKind::Transient,
            Self::Pages(_) => AgentErrorKind::Fatal,
        }
    }
}

impl From<RequestError> for AgentError {
    fn from(e: RequestError) -> Self {
        AgentError::new(e.kind(), e.to_string())
    }
}

fn is_transient_errno(errno: Option<i32>) -> bool {
    matches!(
        errno,
        Some(libc::EAGAIN | libc::ENOMEM | libc::EINTR | libc::EBUSY)
    )
}

/// Why one registration with the daemon ended. The agent then waits a second and
/// registers again; the guest runs on either way.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Our hello could not be sent.
    #[error("cannot introduce ourselves to the merge daemon: {0}")]
    Hello(#[source] WireError),
    /// The daemon did not answer the hello (in time, or readably).
    #[error("the merge daemon did not welcome us: {0}")]
    NoWelcome(#[source] WireError),
    /// The daemon refused the registration.
    #[error("the merge daemon refused us: {0}")]
    Refused(String),
    /// The daemon answered the hello with something other than a welcome and its pool.
    #[error("unexpected answer to hello: {0}")]
    UnexpectedWelcome(String),
    /// The pool the daemon sent could not be mapped.
    #[error("cannot map the merge daemon's pool: {0}")]
    Pool(#[source] PageError),
    /// The connection failed or closed (the daemon exited, or dropped this guest).
    #[error("lost the merge daemon: {0}")]
    Lost(#[source] WireError),
    /// The daemon sent something other than a request.
    #[error("the merge daemon sent something other than a request")]
    OutOfTurn,
}

/// Why the agent did not connect to a daemon.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nobody answers on the socket (no daemon yet, or it went away).
    #[error("{0}")]
    NoDaemon(std::io::Error),
    /// The socket's directory could be changed by another user.
    #[error(transparent)]
    UnsafeRunDir(#[from] tinyvmm_sys::dir::PrivateDirError),
    /// The process listening there runs as another (non-root) user.
    #[error(
        "the process listening there (pid {pid}) runs as uid {uid}, neither root nor this user"
    )]
    ForeignDaemon {
        /// Its pid.
        pid: u32,
        /// Its uid.
        uid: u32,
    },
}

impl ConnectError {
    /// Whether the daemon there must not be trusted (as opposed to: not there yet).
    pub(super) fn untrusted(&self) -> bool {
        match self {
            ConnectError::NoDaemon(_) => false,
            ConnectError::UnsafeRunDir(_) | ConnectError::ForeignDaemon { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(e: PageError) -> AgentErrorKind {
        RequestError::from(e).kind()
    }

    fn os(errno: i32) -> PageError {
        PageError::Os {
            what: "mmap",
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    #[test]
    fn page_errors_map_to_the_kinds_the_daemon_acts_on() {
        assert_eq!(
            kind(PageError::Range("page 8 of 8".into())),
            AgentErrorKind::BadRequest
        );
        assert_eq!(kind(PageError::NoPool), AgentErrorKind::BadRequest);
        assert_eq!(kind(os(libc::EAGAIN)), AgentErrorKind::Transient);
        assert_eq!(kind(os(libc::ENOMEM)), AgentErrorKind::Transient);
        assert_eq!(kind(os(libc::EINVAL)), AgentErrorKind::Fatal);
        // A shortage after part of the request was remapped cannot be retried.
        assert_eq!(
            kind(PageError::Incomplete(Box::new(os(libc::EAGAIN)))),
            AgentErrorKind::Fatal
        );
        assert_eq!(
            RequestError::DirtyLog(std::io::Error::from_raw_os_error(libc::EINTR)).kind(),
            AgentErrorKind::Transient
        );
        assert_eq!(
            RequestError::DirtyLog(std::io::Error::from_raw_os_error(libc::EFAULT)).kind(),
            AgentErrorKind::Fatal
        );
        let e = AgentError::from(RequestError::from(PageError::Range("page 9 of 8".into())));
        assert_eq!(e.kind, AgentErrorKind::BadRequest);
        assert!(e.detail.contains("page 9 of 8"));
    }
}
