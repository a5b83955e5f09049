//! The durable log of one raft group, behind a trait, and raft-rs's `Storage` over it.
//!
//! [`LogStore`] is what the driver needs from a log: reads (served from memory or a cache, as
//! raft-rs asks for them synchronously, with fetches the driver awaits where raft-rs can wait
//! or where the driver knows the reads ahead: [`LogStore::entries_for_send`],
//! [`LogStore::fetch_committed`]) and buffered writes made durable by one
//! [`LogStore::persist`] per loop pass. [`crate::FileLog`] implements it for small groups such as the controller; the
//! partition groups will implement it over the segment log, where raft entries are the stored
//! RecordBatches.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use std::future::Future;
use std::io;
use std::pin::Pin;

/// The durability wait [`LogStore::persist`], [`LogStore::bootstrap`] and
/// [`LogStore::install_snapshot`] return: it owns what it needs (no borrow of the store), so
/// the driver can await it while the store stays inside raft-rs.
pub type Persist = Pin<Box<dyn Future<Output = io::Result<()>>>>;

/// The durable state of one raft group: log entries after the latest snapshot, the snapshot, the
/// hard state (term, vote, commit) and the configuration (conf state).
///
/// Reads reflect every write made so far, synced or not. Writes may be buffered: nothing is
/// promised durable until the future [`LogStore::persist`] returns has resolved, except
/// [`LogStore::bootstrap`] and [`LogStore::install_snapshot`], durable when the future they
/// return has resolved. The driver awaits each such future before it touches the store again,
/// so no two of them overlap and each sees the writes before it done.
pub trait LogStore {
    /// The state a restarted node resumes from: the hard state, and the conf state of the
    /// snapshot (or the bootstrap conf state when there is no snapshot). The commit index is at
    /// least the snapshot's index, and may lag the last one set: a lower commit index is safe
    /// (the leader re-sends it), so stores need not write a commit-only change durably.
    fn raft_state(&self) -> RaftState;

    /// Index of the first entry held: the snapshot's index + 1.
    fn first_index(&self) -> u64;

    /// Index of the last entry held, or the snapshot's index when no entry follows it.
    fn last_index(&self) -> u64;

    /// Term of the entry at `index`: the snapshot's term at the snapshot's index,
    /// `StorageError::Compacted` below it, `StorageError::Unavailable` past the last entry.
    fn term(&self, index: u64) -> raft::Result<u64>;

    /// Entries `[low, high)`, at most `max_size` bytes of them but always at least one.
    /// `StorageError::Compacted` if `low` is at or below the snapshot's index.
    fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> raft::Result<Vec<Entry>>;

    /// The latest snapshot (empty, index 0, if there is none).
    fn snapshot(&self) -> Snapshot;

    /// Appends entries. The first may overlap held entries: those from its index on are replaced
    /// (raft's conflict truncation). A gap after the last entry is an error.
    fn append(&mut self, entries: &[Entry]) -> io::Result<()>;

    /// Sets the hard state (term, vote, commit). A change of term or vote must be durable by the
    /// next `sync`; a change of commit alone may be written later (see `raft_state`).
    fn set_hard_state(&mut self, hs: &HardState) -> io::Result<()>;

    /// Sets the configuration the group starts from before any entry or snapshot (bootstrap):
    /// in memory at once (`raft_state` reports it), durably when the returned future resolves.
    /// The driver awaits it before it handles any message or command. Later configurations are
    /// not stored through this call: they come back on restart from the snapshot's conf state
    /// and the conf-change entries after it, which the driver re-applies as it replays the log.
    fn bootstrap(&mut self, cs: &ConfState) -> Persist;

    /// Makes every earlier write durable (fsync/fdatasync), before the driver sends the messages
    /// that depend on them. The driver awaits the returned future before it touches the store
    /// again, so a store may do its writes there (asynchronously: the segment log's group
    /// commit) or before returning (the file log, whose future is ready at once).
    fn persist(&mut self) -> Persist;

    /// Entries `[low, high)` for a message to a follower, where raft-rs can wait for them: a
    /// store that would have to read them from disk may instead start fetching them (see
    /// [`LogStore::take_fetch`]) and answer `StorageError::LogTemporarilyUnavailable`; the driver
    /// asks again once the fetch is done. The default reads synchronously.
    fn entries_for_send(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> raft::Result<Vec<Entry>> {
        self.entries(low, high, max_size)
    }

    /// The fetch started by the last `entries_for_send` that answered
    /// `LogTemporarilyUnavailable`: once the future resolves, the entries are readable without
    /// disk reads. The driver awaits it in a separate task.
    fn take_fetch(&mut self) -> Option<Fetch> {
        None
    }

    /// Committed entries from `low` (up to `high`, at least `max_size` bytes of them when
    /// there are that many) that the driver is about to have raft-rs read synchronously: the
    /// committed entries a `ready` and the `advance` after it hand over to be applied, which
    /// raft-rs reads with a context that cannot wait. A store that would read some of them from
    /// disk returns a fetch that brings them into memory; the driver awaits it before `ready`.
    /// Entries it no longer holds by then are read synchronously, as without it. The default
    /// holds everything in memory: `None`.
    fn fetch_committed(&mut self, _low: u64, _high: u64, _max_size: u64) -> Option<Fetch> {
        None
    }

    /// Installs a snapshot: a snapshot received from the leader, or one taken locally to compact
    /// the log. Entries up to its index are dropped; entries after it are kept if the log holds
    /// the snapshot's (index, term), else the whole log is dropped. The conf state becomes the
    /// snapshot's and the commit index at least its index. Reads reflect it at once; it is
    /// durable when the returned future resolves, or, for a store that stages it with its other
    /// writes, when the `persist` of the same loop pass resolves (the driver installs a received
    /// snapshot before that pass's `persist`, and sends nothing that depends on it before).
    fn install_snapshot(&mut self, snapshot: Snapshot) -> Persist;
}

/// An asynchronous fetch of entries (see [`LogStore::take_fetch`]).
pub type Fetch = Pin<Box<dyn Future<Output = ()>>>;

/// raft-rs's `Storage` over a [`LogStore`]: the form in which the `RawNode` owns the log.
pub struct RaftStorage<L> {
    log: L,
    /// Contexts of reads answered `LogTemporarilyUnavailable`, handed back to raft-rs
    /// (`RawNode::on_entries_fetched`) when their fetch is done.
    waiting: std::cell::RefCell<Vec<GetEntriesContext>>,
}

impl<L: LogStore> RaftStorage<L> {
    pub fn new(log: L) -> Self {
        RaftStorage {
            log,
            waiting: Default::default(),
        }
    }

    pub fn log(&self) -> &L {
        &self.log
    }

    pub fn log_mut(&mut self) -> &mut L {
        &mut self.log
    }

    pub fn into_inner(self) -> L {
        self.log
    }

    /// The contexts of reads waiting for a fetch (see [`LogStore::take_fetch`]).
    pub fn take_waiting(&self) -> Vec<GetEntriesContext> {
        std::mem::take(&mut self.waiting.borrow_mut())
    }
}

impl<L: LogStore> raft::Storage for RaftStorage<L> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(self.log.raft_state())
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if !context.can_async() {
            return self.log.entries(low, high, max_size.into());
        }
        let r = self.log.entries_for_send(low, high, max_size.into());
        if let Err(raft::Error::Store(StorageError::LogTemporarilyUnavailable)) = r {
            self.waiting.borrow_mut().push(context);
        }
        r
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.log.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.log.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.log.last_index())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let snap = self.log.snapshot();
        if snap.get_metadata().index < request_index || snap.get_metadata().index == 0 {
            // The driver compacts only at applied indexes; a follower asking for a newer one
            // waits for the next compaction.
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snap)
    }
}
