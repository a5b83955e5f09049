//! Replicated partitions: a raft group (`sluice-raft`) per partition replica whose log is the
//! partition's segment log ([`log::RaftLog`]). [`ReplicatedPartition`] is what the shard will
//! hold for a partition with replicas: `propose` a produced batch and get its committed
//! offsets, the high watermark (the commit index as an offset), role, leader and epoch, and
//! truncation callbacks. The design is in docs/replication.md ("Partitions").
//!
//! Sits right above `storage`: it knows batches, offsets and raft, not Kafka requests, shards or
//! metadata; whoever opens a partition hands it the log, the raft transport and the group's
//! configuration.

pub mod log;

use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;

use bytes::BytesMut;
use event_listener::Event;
use sluice_raft::{
    GroupConfig, GroupStatus, ProposeError, RaftGroup, Role, StateMachine, Transport,
};

use crate::protocol::batch::{self, BatchHeader};
use crate::storage::{BatchMeta, PartitionLog, ProducerCheck, StorageError};
use crate::types::Offset;

pub use log::{EntryIndex, EntryMeta, RaftLog, SnapshotMeta, TruncateHooks};

/// Why a proposal was not committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicateError {
    /// Not exactly one RecordBatch (framing checked: the CRC is the caller's, see
    /// `ReplicatedPartition::propose`), or a control batch.
    InvalidBatch,
    /// The raft group's answer: not the leader (and who is), leadership lost with the outcome
    /// unknown, replaced by another leader's entry, too many pending, or stopped.
    Raft(ProposeError),
    /// An idempotent producer's batch does not follow its last sequence (KIP-98):
    /// OUT_OF_ORDER_SEQUENCE_NUMBER.
    OutOfOrderSequence,
    /// An idempotent producer's batch carries an epoch older than the log's: INVALID_PRODUCER_EPOCH.
    InvalidProducerEpoch,
    /// DeleteRecords past the high watermark: OFFSET_OUT_OF_RANGE.
    OutOfRange,
    /// The log failed a write (its message).
    Storage(String),
}

impl std::fmt::Display for ReplicateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicateError::InvalidBatch => write!(f, "not exactly one valid record batch"),
            ReplicateError::Raft(e) => write!(f, "{e:?}"),
            ReplicateError::OutOfOrderSequence => write!(f, "out of order sequence number"),
            ReplicateError::InvalidProducerEpoch => write!(f, "invalid producer epoch"),
            ReplicateError::OutOfRange => write!(f, "offset out of range"),
            ReplicateError::Storage(e) => write!(f, "{e}"),
        }
    }
}

/// Applied entries need no state machine: the log is the state. Kept so the group reports
/// applied indexes and readers waiting for committed data are woken; snapshots are never taken
/// (see `RaftLog`).
struct LogIsTheState {
    applied: Rc<Cell<u64>>,
    event: Rc<Event>,
    /// Log start moves committed through the log (DeleteRecords), for the replica's task
    /// that performs them.
    log_starts: async_channel::Sender<(Offset, u64)>,
}

impl StateMachine for LogIsTheState {
    fn apply(&mut self, index: u64, _term: u64, data: &[u8]) {
        // Data entries are produced batches; only a control batch can move the log start.
        let control = BatchHeader::parse(data).is_ok_and(|h| h.is_control());
        if let Some((log::CONTROL_RAFT_LOG_START, v)) = control
            .then(|| crate::storage::control_of(&bytes::Bytes::copy_from_slice(data)))
            .flatten()
        {
            if let Ok(b) = <[u8; 8]>::try_from(&v[..]) {
                // Every entry before this one is committed and applied.
                let _ = self
                    .log_starts
                    .try_send((Offset(i64::from_be_bytes(b)), index.saturating_sub(1)));
            }
        }
        self.applied.set(index);
        self.event.notify(usize::MAX);
    }
    fn snapshot(&mut self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(&mut self, _index: u64, _term: u64, _data: &[u8]) {}
}

/// Raft log compaction of partitions follows retention, not an entry count (see `RaftLog`):
/// the driver's count-based snapshots are pushed out of reach.
const NO_SNAPSHOTS: u64 = 1 << 62;

/// How often a retry of a batch already in the log re-checks, while it waits for that batch to
/// commit, that this replica still leads in the same term (role changes do not wake it).
const DUPLICATE_RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// An idempotent producer's batch proposed by this leader and not answered yet: the part of
/// the producer state the log does not show until the entry is appended.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    id: u64,
    pid: i64,
    epoch: i16,
    first_seq: i32,
    last_seq: i32,
}

/// The proposals of idempotent batches in flight, in proposal order, and the event that a
/// retry waiting for one of them listens on.
#[derive(Default)]
struct InFlights {
    list: RefCell<Vec<InFlight>>,
    next_id: Cell<u64>,
    done: Event,
}

/// Removes its proposal from the list when it is answered (or its future dropped).
struct InFlightGuard<'a> {
    inflights: &'a InFlights,
    id: u64,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.inflights.list.borrow_mut().retain(|f| f.id != self.id);
        self.inflights.done.notify(usize::MAX);
    }
}

/// See [`ReplicatedPartition::advance_log_start`].
async fn advance_log_start(
    log: &PartitionLog,
    index: &std::cell::RefCell<EntryIndex>,
    group: &RaftGroup,
    turn: &glommio::sync::Semaphore,
    target: Offset,
    applied: Option<u64>,
) -> Result<Offset, StorageError> {
    let _turn = turn
        .acquire_permit(1)
        .await
        .map_err(|_| StorageError::Io(io::Error::other("replica stopped")))?;
    let status = group.status();
    // Compaction stays within what is committed and applied (raft-rs reads the entries it
    // has yet to apply from the log).
    let upto = applied.unwrap_or(0).max(status.commit.min(status.applied));
    let Some(snap) = index.borrow().compaction_point(target, upto) else {
        return Ok(log.log_start_offset());
    };
    log::write_snapshot_meta(log.dir(), snap).await?;
    log.delete_records_before(snap.offset).await?;
    index.borrow_mut().compact(snap);
    Ok(log.log_start_offset())
}

/// What the leader knows of one replica's log (see `ReplicatedPartition::replica_log_ends`).
#[derive(Debug, Clone, Copy)]
pub struct ReplicaProgress {
    pub node: u64,
    /// The offset after the last entry known to match the leader's log; `None` while unknown.
    pub log_end: Option<Offset>,
    pub caught_up_at: Option<std::time::Instant>,
    pub heard_at: Option<std::time::Instant>,
}

/// One replica of a replicated partition, on the partition's shard.
pub struct ReplicatedPartition {
    /// Idempotent batches proposed and not yet answered (leader-side KIP-98 checks).
    inflight: InFlights,
    group: RaftGroup,
    log: Rc<PartitionLog>,
    index: Rc<RefCell<EntryIndex>>,
    truncate_hooks: TruncateHooks,
    fetches: Rc<std::cell::Cell<u64>>,
    /// The last data entry applied (so committed), and its notification.
    applied: Rc<Cell<u64>>,
    applied_event: Rc<Event>,
    /// Moves of the log start take turns (each writes the raft snapshot file, then moves the
    /// segment log's start).
    log_start_turn: Rc<glommio::sync::Semaphore>,
}

impl ReplicatedPartition {
    /// Starts the replica's raft group over `log` (opened by the caller), registered with
    /// `transport` under `config.group_id`. A brand-new log with `config.voters` bootstraps the
    /// group.
    pub async fn start(
        log: Rc<PartitionLog>,
        mut config: GroupConfig,
        transport: &Transport,
    ) -> io::Result<ReplicatedPartition> {
        let store = RaftLog::open(log.clone()).await?;
        let index = store.index();
        let truncate_hooks = store.truncate_hooks();
        let fetches = store.fetches();
        config.snapshot_interval_entries = NO_SNAPSHOTS;
        // Entries are RecordBatches: a follower checks each one's CRC once, as it arrives.
        config.payload_check = Some(log::entry_payload_check);
        let applied = Rc::new(Cell::new(0));
        let applied_event = Rc::new(Event::new());
        let (log_starts, log_start_rx) = async_channel::unbounded();
        let sm = LogIsTheState {
            applied: applied.clone(),
            event: applied_event.clone(),
            log_starts,
        };
        let group = RaftGroup::start(config, store, sm, transport)?;
        let log_start_turn = Rc::new(glommio::sync::Semaphore::new(1));
        // DeleteRecords committed through the log: every replica moves its log start there.
        {
            let (log, index, group, turn) = (
                log.clone(),
                index.clone(),
                group.clone(),
                log_start_turn.clone(),
            );
            crate::contain::spawn_background("replica log start", async move {
                while let Ok((target, upto)) = log_start_rx.recv().await {
                    let moved = advance_log_start(&log, &index, &group, &turn, target, Some(upto));
                    if let Err(e) = moved.await {
                        tracing::warn!(dir = %log.dir().display(), error = %e, "log start move failed");
                    }
                }
            });
        }
        Ok(ReplicatedPartition {
            inflight: InFlights::default(),
            group,
            log,
            index,
            truncate_hooks,
            fetches,
            applied,
            applied_event,
            log_start_turn,
        })
    }

    /// Moves this replica's log start towards `target` (retention): only over committed and
    /// applied entries, and in whole entries (batches) — the log start becomes the first offset
    /// of the entry holding `target`, or stays. The raft log is compacted with it: its snapshot
    /// (the entry before the new start, its term and the offset after it) is written first,
    /// then the segment log's start moves. A follower that needs an entry below it gets the
    /// snapshot and restarts its log there. Returns the log start.
    pub async fn advance_log_start(&self, target: Offset) -> Result<Offset, StorageError> {
        advance_log_start(
            &self.log,
            &self.index,
            &self.group,
            &self.log_start_turn,
            target,
            None,
        )
        .await
    }

    /// DeleteRecords on the leader: `target` (at most the high watermark, else
    /// OffsetOutOfRange) is committed through the log as a control entry, which every replica
    /// applies by moving its log start there ([`advance_log_start`](Self::advance_log_start),
    /// so rounded down to the first offset of the batch holding `target`); answered with the
    /// leader's log start once it has moved: Kafka's low watermark.
    pub async fn delete_records(&self, target: Offset) -> Result<Offset, ReplicateError> {
        if target > self.high_watermark() || target < Offset(0) {
            return Err(ReplicateError::OutOfRange);
        }
        if target <= self.log.log_start_offset() {
            return Ok(self.log.log_start_offset());
        }
        let b = crate::storage::control_batch(
            log::CONTROL_RAFT_LOG_START,
            &target.0.to_be_bytes(),
            self.leader_epoch(),
            -1,
        );
        let (base, _) = self.propose_raw(BytesMut::from(&b[..]), true).await?;
        // Every entry before the committed control entry is committed and applied.
        let upto = self.index.borrow().index_at(base).map(|i| i - 1);
        advance_log_start(
            &self.log,
            &self.index,
            &self.group,
            &self.log_start_turn,
            target,
            upto,
        )
        .await
        .map_err(|e| ReplicateError::Storage(e.to_string()))
    }

    /// Proposes one produced batch; resolves with its offsets (base, last) once it is committed
    /// (a majority has it durably, this leader included) — acks=all. The batch is stored with
    /// the offsets and leader epoch the log assigns at its raft index, identically on every
    /// replica. Its CRC-32C must have been checked by the caller (the produce path validates
    /// every batch it receives; coordinators build theirs): it is not checked again on this
    /// node, and each follower checks it once as it arrives. The bytes travel to the log and to
    /// the followers without further copies.
    pub async fn propose(&self, records: BytesMut) -> Result<(Offset, Offset), ReplicateError> {
        self.propose_as(records, true).await
    }

    /// Proposes one produced batch; resolves with its offsets once this leader has appended it
    /// durably (its own log, not yet a majority's) — acks=1. It may still be lost with this
    /// leader; the high watermark stays the commit index.
    pub async fn propose_appended(
        &self,
        records: BytesMut,
    ) -> Result<(Offset, Offset), ReplicateError> {
        self.propose_as(records, false).await
    }

    /// Idempotent producers (KIP-98) are checked here, on the leader, before the batch is
    /// proposed: against the log's producer state (rebuilt from the log on every replica, so a
    /// new leader knows what its predecessor appended) plus the batches proposed and not yet
    /// appended. A retry of a batch already in the log is answered with its offsets once that
    /// entry is committed; a retry of a batch still in flight waits for its first attempt and
    /// is checked again.
    async fn propose_as(
        &self,
        records: BytesMut,
        committed: bool,
    ) -> Result<(Offset, Offset), ReplicateError> {
        let h = BatchHeader::parse(&records).map_err(|_| ReplicateError::InvalidBatch)?;
        if h.size() != records.len() || h.is_control() {
            return Err(ReplicateError::InvalidBatch);
        }
        debug_assert!(h.crc_ok(), "a batch proposed unchecked");
        let (pid, epoch, first_seq, last_seq) = (
            h.producer_id(),
            h.producer_epoch(),
            h.base_sequence(),
            h.last_sequence(),
        );
        if pid < 0 || first_seq < 0 {
            return self.propose_raw(records, committed).await;
        }
        loop {
            let done = self.inflight.done.listen();
            let (retry_of_inflight, staged) = {
                let list = self.inflight.list.borrow();
                let retry = list.iter().any(|f| {
                    f.pid == pid
                        && f.epoch == epoch
                        && f.first_seq == first_seq
                        && f.last_seq == last_seq
                });
                let staged: Vec<(i64, i16, BatchMeta)> = list
                    .iter()
                    .filter(|f| f.pid == pid)
                    .map(|f| {
                        (
                            f.pid,
                            f.epoch,
                            BatchMeta {
                                first_seq: f.first_seq,
                                last_seq: f.last_seq,
                                base: Offset(-1),
                                last: Offset(-1),
                            },
                        )
                    })
                    .collect();
                (retry, staged)
            };
            if retry_of_inflight {
                done.await;
                continue;
            }
            let h = BatchHeader::parse(&records).map_err(|_| ReplicateError::InvalidBatch)?;
            match self.log.check_producer(&h, &staged) {
                Ok(ProducerCheck::Append) => break,
                Ok(ProducerCheck::Duplicate(m)) => return self.committed_duplicate(m).await,
                Err(StorageError::InvalidProducerEpoch) => {
                    return Err(ReplicateError::InvalidProducerEpoch)
                }
                Err(_) => return Err(ReplicateError::OutOfOrderSequence),
            }
        }
        // Checked and registered with no await in between: the next batch of this producer
        // is checked against this one.
        let id = self.inflight.next_id.get();
        self.inflight.next_id.set(id + 1);
        self.inflight.list.borrow_mut().push(InFlight {
            id,
            pid,
            epoch,
            first_seq,
            last_seq,
        });
        let _guard = InFlightGuard {
            inflights: &self.inflight,
            id,
        };
        self.propose_raw(records, committed).await
    }

    /// A retry of a batch this leader's log holds at `m`: answered with its offsets once the
    /// entry is committed, as long as this replica leads in the term it had when it looked
    /// (an entry in a leader's log stays there while it leads). Otherwise the outcome is
    /// unknown here: LeadershipLost, and the client retries at the new leader.
    async fn committed_duplicate(&self, m: BatchMeta) -> Result<(Offset, Offset), ReplicateError> {
        let start = self.group.status();
        if start.role != Role::Leader {
            return Err(ReplicateError::Raft(ProposeError::NotLeader {
                leader: start.leader_id,
            }));
        }
        loop {
            let applied = self.applied_event.listen();
            let now = self.group.status();
            if now.role != Role::Leader || now.term != start.term {
                return Err(ReplicateError::Raft(ProposeError::LeadershipLost));
            }
            if self.high_watermark() > m.last {
                return Ok((m.base, m.last));
            }
            futures_lite::future::or(applied, async {
                glommio::timer::sleep(DUPLICATE_RECHECK).await;
            })
            .await;
        }
    }

    async fn propose_raw(
        &self,
        mut records: BytesMut,
        committed: bool,
    ) -> Result<(Offset, Offset), ReplicateError> {
        // The term is stamped at append; the proposal carries the leader's current one too, so
        // entries in flight already read as they will be stored.
        batch::set_partition_leader_epoch(&mut records, self.leader_epoch());
        // Shared from here on, not copied: by the raft entry, the messages to every follower and
        // the log's append (which copies it once, into the buffer it writes and caches).
        let data = records.freeze();
        let index = if committed {
            self.group.propose(data).await
        } else {
            self.group.propose_appended(data).await
        }
        .map_err(ReplicateError::Raft)?;
        // The entry is in the log (appended here); a conflict truncation in between would
        // have answered the proposal with an error, but do not trust that with a panic.
        let m = self.index.borrow().get(index).ok_or(ReplicateError::Raft(
            sluice_raft::ProposeError::LeadershipLost,
        ))?;
        Ok((m.base, m.last))
    }

    /// Proposes one batch for a coordinator that took over in `term` (its state was loaded
    /// then): committed by a majority like [`propose`](Self::propose), and only as an entry of
    /// that term. Refused before proposing when this replica no longer leads in `term`; an
    /// entry that nevertheless ends up in another term (leadership lost and won again while
    /// it was queued) answers `LeadershipLost`: the state it was computed from is gone, so the
    /// client must not be told it succeeded here.
    pub async fn propose_in_term(
        &self,
        records: BytesMut,
        term: u64,
    ) -> Result<(Offset, Offset), ReplicateError> {
        let status = self.group.status();
        if status.role != Role::Leader || status.term != term {
            return Err(ReplicateError::Raft(ProposeError::NotLeader {
                leader: status.leader_id,
            }));
        }
        let (base, last) = self.propose(records).await?;
        let stored_term = self
            .index
            .borrow()
            .index_at(base)
            .and_then(|i| self.index.borrow().get(i))
            .map(|m| m.term);
        if stored_term != Some(term) {
            return Err(ReplicateError::Raft(ProposeError::LeadershipLost));
        }
        Ok((base, last))
    }

    /// On a leader in `term`: waits until an entry of `term` is committed and applied here,
    /// which commits every entry before it (raft commits a new leader's predecessors' entries
    /// only with one of its own). Then the log up to the high watermark is everything any
    /// earlier leader may have answered a client for. False as soon as this replica no longer
    /// leads in `term`.
    pub async fn wait_leader_caught_up(&self, term: u64) -> bool {
        loop {
            let applied = self.applied_event.listen();
            let status = self.group.status();
            if status.role != Role::Leader || status.term != term {
                return false;
            }
            let done = status.commit.min(status.applied);
            if self
                .index
                .borrow()
                .get(done)
                .is_some_and(|m| m.term == term)
            {
                return true;
            }
            // Role changes do not wake the applied event: look again now and then.
            futures_lite::future::or(applied, async {
                glommio::timer::sleep(DUPLICATE_RECHECK).await;
            })
            .await;
        }
    }

    /// The high watermark: the offset after the last committed entry this replica holds.
    pub fn high_watermark(&self) -> Offset {
        let committed = self.group.status().commit.max(self.applied.get());
        self.index.borrow().offset_after(committed)
    }

    /// The offset below which this replica's entries are committed and applied: raft never
    /// truncates, re-sends over or re-applies them, so the log cleaner may rewrite their
    /// batches (as shells at worst, see `PartitionLog::compact_replicated`).
    pub fn cleanable_below(&self) -> Offset {
        let status = self.group.status();
        let settled = status.commit.min(status.applied);
        self.index.borrow().offset_after(settled)
    }

    /// Waits until the high watermark passes `offset` (a data entry past it is committed and
    /// applied here). A long poll waits on this, not on the log's appends, which include
    /// entries not committed yet.
    pub async fn wait_committed_past(&self, offset: Offset) {
        loop {
            let applied = self.applied_event.listen();
            if self.high_watermark() > offset || self.role() == Role::Stopped {
                return;
            }
            applied.await;
        }
    }

    pub fn status(&self) -> GroupStatus {
        self.group.status()
    }
    pub fn role(&self) -> Role {
        self.group.status().role
    }
    pub fn leader(&self) -> Option<u64> {
        self.group.status().leader_id
    }
    /// The leader epoch Kafka sees: the raft term.
    pub fn leader_epoch(&self) -> i32 {
        i32::try_from(self.group.status().term).unwrap_or(i32::MAX)
    }
    /// On the leader: the in-sync replicas among `replicas` — this node, and each follower
    /// that caught up with the leader's log within the last `max_lag` (see
    /// `RaftGroup::caught_up_at`); `None` on a replica that is not the leader, which does not
    /// see the followers' progress.
    pub fn in_sync(&self, replicas: &[u64], max_lag: std::time::Duration) -> Option<Vec<u64>> {
        let status = self.group.status();
        if status.role != Role::Leader {
            return None;
        }
        let now = std::time::Instant::now();
        Some(
            replicas
                .iter()
                .copied()
                .filter(|r| {
                    *r == status.node_id
                        || self
                            .group
                            .caught_up_at(*r)
                            .is_some_and(|at| now.saturating_duration_since(at) <= max_lag)
                })
                .collect(),
        )
    }

    /// On the leader: the log end offset each of `replicas` is known to have, from raft
    /// progress — this node's own log end, and for a follower the offset after its matched
    /// index (what it holds that matches the leader's log) — with when it last caught up and
    /// when it was last heard from. A follower's lag in offsets is the leader's log end minus
    /// its own. `None` on a replica that is not the leader.
    pub fn replica_log_ends(&self, replicas: &[u64]) -> Option<Vec<ReplicaProgress>> {
        let status = self.group.status();
        if status.role != Role::Leader {
            return None;
        }
        let index = self.index.borrow();
        Some(
            replicas
                .iter()
                .map(|r| {
                    if *r == status.node_id {
                        ReplicaProgress {
                            node: *r,
                            log_end: Some(index.log_end()),
                            caught_up_at: Some(std::time::Instant::now()),
                            heard_at: Some(std::time::Instant::now()),
                        }
                    } else {
                        ReplicaProgress {
                            node: *r,
                            log_end: self.group.matched(*r).map(|m| index.offset_after(m)),
                            caught_up_at: self.group.caught_up_at(*r),
                            heard_at: self.group.last_heard(*r),
                        }
                    }
                })
                .collect(),
        )
    }

    /// Role, leader and term changes (see `RaftGroup::watch`).
    pub fn watch(&self) -> async_channel::Receiver<GroupStatus> {
        self.group.watch()
    }
    /// Entry fetches from disk for followers behind the batch cache, so far.
    pub fn entry_fetches(&self) -> u64 {
        self.fetches.get()
    }
    pub fn log(&self) -> &Rc<PartitionLog> {
        &self.log
    }
    pub fn group(&self) -> &RaftGroup {
        &self.group
    }

    /// Calls `f(offset)` after every conflict truncation of this replica's log (fetch sessions
    /// and consumers positioned past it must be told; Kafka's OFFSET_OUT_OF_RANGE /
    /// divergence).
    pub fn on_truncate(&self, f: impl Fn(Offset) + 'static) {
        self.truncate_hooks.borrow_mut().push(Box::new(f));
    }

    /// Stops the group (the log stays open: the caller closes it).
    pub async fn stop(&self) {
        self.group.stop().await;
    }
}

#[cfg(test)]
// Protobuf messages are built by setting fields on a default value, as raft-proto itself does.
#[allow(clippy::field_reassign_with_default)]
mod tests {
    use super::*;
    use crate::storage::tests::{batch as data_batch, run, small_config};
    use crate::storage::BatchCache;
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    use sluice_raft::eraftpb::{Entry, Message, MessageType};
    use std::time::{Duration, Instant};

    /// An append from node 1 (the leader of term 1) to node 2 carrying `batch` as entry 1.
    fn append_from_leader(group: u64, batch: &[u8]) -> Vec<u8> {
        let mut e = Entry::default();
        e.index = 1;
        e.term = 1;
        e.data = bytes::Bytes::copy_from_slice(batch);
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = 1;
        m.to = 2;
        m.term = 1;
        m.set_entries(vec![e].into());
        let mut out = sluice_raft::transport::PREAMBLE_MAGIC.to_vec();
        out.extend_from_slice(&1u64.to_be_bytes());
        out.extend(sluice_raft::transport::frame_bytes(group, m, true).unwrap());
        out
    }

    #[test]
    fn a_follower_refuses_a_damaged_batch_from_its_leader_and_appends_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let log = PartitionLog::open(&d, small_config(), BatchCache::new(0))
                .await
                .unwrap();
            // Node 1 is not running: this test speaks for it.
            let peers = [
                (1, "127.0.0.1:1".parse().unwrap()),
                (2, "127.0.0.1:0".parse().unwrap()),
            ]
            .into_iter()
            .collect();
            let transport = Transport::start(sluice_raft::TransportConfig::new(
                2,
                "127.0.0.1:0".parse().unwrap(),
                peers,
            ))
            .unwrap();
            let group = 42;
            let config = GroupConfig::new(group, 2, vec![1, 2]);
            let replica = ReplicatedPartition::start(log.clone(), config, &transport)
                .await
                .unwrap();
            let good = data_batch(3, 50, 1000, 1);

            // One bit flipped in a record: the connection is closed, nothing reaches the log.
            let mut damaged = append_from_leader(group, &good);
            let last = damaged.len() - 1;
            damaged[last] ^= 0x04;
            let mut c = glommio::net::TcpStream::connect(transport.local_addr())
                .await
                .unwrap();
            c.write_all(&damaged).await.unwrap();
            let mut buf = [0u8; 16];
            let closed = c.read(&mut buf).await;
            assert!(
                matches!(closed, Ok(0) | Err(_)),
                "the connection is closed: {closed:?}"
            );
            assert_eq!(transport.stats().payloads_refused, 1);
            assert_eq!(log.log_end_offset(), Offset(0), "nothing appended");
            assert_eq!(replica.status().last_index, 0);

            // The same entry undamaged is appended, verbatim but for offsets and epoch.
            let mut c = glommio::net::TcpStream::connect(transport.local_addr())
                .await
                .unwrap();
            c.write_all(&append_from_leader(group, &good))
                .await
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while log.log_end_offset() != Offset(3) {
                assert!(Instant::now() < deadline, "the good entry was not appended");
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(transport.stats().payloads_refused, 1);
            replica.stop().await;
            transport.close();
        });
    }
}
