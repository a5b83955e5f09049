//! Raft consensus for Sluice, on tikv's raft-rs.
//!
//! - [`group::RaftGroup`]: drives one raft-rs `RawNode` on a glommio executor (one thread):
//!   ticks, incoming messages, proposals, and the `Ready` loop — entries and hard state made
//!   durable before the messages that depend on them, committed entries applied in order through
//!   a [`group::StateMachine`], snapshots for compaction and for followers that fell behind.
//! - [`storage::LogStore`]: the durable log behind raft-rs's `Storage`
//!   ([`storage::RaftStorage`]); [`file_log::FileLog`] is the implementation for small groups
//!   (the controller): an append-only file of checksummed records and an atomically replaced
//!   hard-state file.
//! - [`transport::Transport`]: raft messages between nodes over TCP, one outgoing connection per
//!   peer carrying every group of the executor (multi-raft), frames checked before they are
//!   decoded.
//!
//! The design of replication as a whole, and which parts of it this crate provides, is in
//! `docs/replication.md`.

// Protobuf messages are built by setting fields on a default value, as raft-proto itself does.
#![allow(clippy::field_reassign_with_default)]

pub mod codec;
pub mod file_log;
pub mod group;
mod logger;
pub mod storage;
pub mod transport;

pub use file_log::FileLog;
pub use group::{
    GroupConfig, GroupStatus, ProposeError, RaftGroup, Role, StateMachine, StopReason,
};
pub use raft;
pub use raft::eraftpb;
pub use storage::{Fetch, LogStore, Persist, RaftStorage};
pub use transport::{Transport, TransportConfig};
