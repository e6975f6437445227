//! What a VM process's merge agent and the merge daemon share, and nothing else: the
//! vocabulary of the page work ([`page`]) and the framed messages that carry it over the
//! daemon's Unix socket ([`wire`]).
//!
//! Both sides link this crate; neither links the other. The agent (in `tinyvmm-vmm`) does
//! page work on its own guest's RAM; the daemon (`tinyvmm-merged`) drives the merge engine
//! (`tinyvmm-merge`), which plans in these same types.

pub mod page;
pub mod wire;

pub use page::*;
pub use wire::{
    recv, recv_bounded, send, AgentError, AgentErrorKind, AgentMsg, AgentStats, DaemonMsg, Hello,
    PageBytes, Reply, Request, WireError, MAX_FRAME, MAX_READ_PAGES, PROTOCOL_VERSION,
};
