//! Consumer groups and committed offsets. Owns the group coordinator of each shard and the
//! `__consumer_offsets` partitions that persist it. Knows Kafka group semantics, never sockets.
//!
//! | file | owns |
//! | --- | --- |
//! | [`coordinator`] | the sans-IO state machine: JoinGroup/SyncGroup/Heartbeat/LeaveGroup, offsets, timers |
//! | [`state`] | one group's data (members, generation, protocol, offsets) and protocol selection |
//! | [`consumer`] | KIP-848 consumer groups: ConsumerGroupHeartbeat, server-side assignors, reconciliation |
//! | [`offsets`] | Kafka's `__consumer_offsets` key/value record formats |
//! | [`share`] | KIP-932 share groups: ShareGroupHeartbeat membership, the `simple` assignment, group configs |
//! | [`share_delay`] | delayed delivery: the delivery-time headers of records |
//! | [`share_partition`] | one share partition: acquisition locks, acknowledgements, delivery counts |
//! | [`share_state`] | share partitions at run time and their snapshots in `__share_group_state` |
//! | [`share_dlq`] | dead-letter topics (KIP-1191): copying archived records there exactly once |
//!
//! This file is the async shell around the state machine on one shard ([`GroupShard`]): it
//! runs the coordinator's timers, writes the records it queues to the `__consumer_offsets`
//! partitions this shard owns ([`GroupShard::persist_with`], the one write path: a synced
//! append on a single node, a raft proposal committed by a majority on a replicated
//! partition), and rebuilds state by replaying those partitions: at start, or, for a
//! replicated partition, each time this node's replica becomes its raft leader (and drops it
//! again when the replica stops leading). A group lives on the shard that owns partition
//! `abs(java hashCode(group id)) % 50` of `__consumer_offsets` (in a cluster: on the node whose
//! replica leads it); handlers hop there first.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use event_listener::Event;

use crate::protocol::batch;
use crate::protocol::builder::{self, BatchBuilder, BatchOptions};
use crate::protocol::records;
use crate::replica::{ReplicateError, ReplicatedPartition};
use crate::storage::{Durability, PartitionLog, ReadOptions, StorageError};
use crate::types::{Clock, ErrorCode, Offset, TopicPartition};

pub mod consumer;
pub mod coordinator;
pub mod offsets;
pub mod share;
pub mod share_delay;
pub mod share_dlq;
pub mod share_partition;
pub mod share_state;
pub mod state;
pub mod txn_offsets;

pub use coordinator::{partition_for, Coordinator, CoordinatorConfig, MemberRef, Write};
pub use state::{GroupState, JoinResult, Reply, SyncResult};

/// The internal topic holding committed offsets and group metadata.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Kafka's default `offsets.topic.num.partitions`.
pub const OFFSETS_PARTITIONS: i32 = 50;
/// How often committed offsets of empty groups are checked for expiry
/// (`offsets.retention.check.interval.ms`, Kafka's default).
pub const OFFSETS_RETENTION_CHECK_MS: i64 = 600_000;
/// Upper bound on the timer loop's sleep: deadlines set while it sleeps are seen this late at
/// worst (it is also woken on every state change).
const TIMER_SLEEP_MS_MAX: i64 = 1000;
/// How long a request waits for its coordinator partition to finish replaying.
const LOAD_WAIT_MAX: Duration = Duration::from_secs(5);
/// Bytes read per step while replaying a `__consumer_offsets` partition.
const REPLAY_READ_BYTES_MAX: u32 = 1 << 20;

/// A `__consumer_offsets` partition whose groups this shard serves (replayed).
#[derive(Clone)]
struct Served {
    log: Rc<PartitionLog>,
    /// A replicated partition: its replica and the raft term this coordinator leads in, the
    /// term its state was loaded in; its writes are proposed in that term only.
    leader: Option<(Rc<ReplicatedPartition>, u64)>,
}

/// Why a coordinator write failed.
#[derive(Debug)]
pub enum PersistError {
    /// The partition is not served here (any more): this replica stopped leading it, or the
    /// write ended up in another term than the one the coordinator loaded in. The outcome is
    /// unknown to the client, which must retry at the current coordinator: NOT_COORDINATOR.
    NotCoordinator,
    Storage(StorageError),
}

impl std::fmt::Display for PersistError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PersistError::NotCoordinator => write!(f, "not the coordinator (any more)"),
            PersistError::Storage(e) => write!(f, "{e}"),
        }
    }
}

/// The group coordinator of one shard with the `__consumer_offsets` partitions it owns.
pub struct GroupShard {
    pub coordinator: RefCell<Coordinator>,
    /// Loaded (replayed) partitions of `__consumer_offsets` owned by this shard.
    logs: RefCell<HashMap<i32, Served>>,
    /// The replicated partitions of this shard, each with the term its replica leads in
    /// (`None` while it follows): their groups are served only while it leads, once loaded.
    replicated: RefCell<HashMap<i32, Option<u64>>>,
    /// Notified whenever a partition finishes loading.
    loaded: Event,
    wake_tx: async_channel::Sender<()>,
    wake_rx: async_channel::Receiver<()>,
    last_expiry_ms: Cell<i64>,
    pub retention_check_ms: Cell<i64>,
    clock: Clock,
    /// Offsets committed in transactions still open (see [`txn_offsets`]).
    pub pending_txn: RefCell<txn_offsets::PendingTxnOffsets>,
}

thread_local! {
    static LOCAL: RefCell<Option<Rc<GroupShard>>> = const { RefCell::new(None) };
}

/// The coordinator of the calling shard, if groups are enabled on it.
pub fn local() -> Option<Rc<GroupShard>> {
    LOCAL.with(|l| l.borrow().clone())
}

/// Installs the calling shard's coordinator.
pub fn install(g: Rc<GroupShard>) {
    LOCAL.with(|l| *l.borrow_mut() = Some(g));
}

/// Why a group request could not be served on this shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// The coordinator's partition is still replaying: COORDINATOR_LOAD_IN_PROGRESS.
    Loading,
    /// In a cluster: this node's replica of the partition does not lead it: NOT_COORDINATOR.
    NotCoordinator,
    /// No coordinator here: COORDINATOR_NOT_AVAILABLE.
    NotAvailable,
}

impl Unavailable {
    pub fn code(self) -> ErrorCode {
        match self {
            Unavailable::Loading => {
                ErrorCode::new(kafka_protocol::ResponseError::CoordinatorLoadInProgress)
            }
            Unavailable::NotAvailable => {
                ErrorCode::new(kafka_protocol::ResponseError::CoordinatorNotAvailable)
            }
            Unavailable::NotCoordinator => {
                ErrorCode::new(kafka_protocol::ResponseError::NotCoordinator)
            }
        }
    }
}

impl GroupShard {
    /// A coordinator whose deadlines and timestamps read `clock`.
    pub fn new(config: CoordinatorConfig, clock: Clock) -> Rc<GroupShard> {
        let (wake_tx, wake_rx) = async_channel::bounded(1);
        Rc::new(GroupShard {
            coordinator: RefCell::new(Coordinator::new(config)),
            logs: RefCell::new(HashMap::new()),
            replicated: RefCell::new(HashMap::new()),
            loaded: Event::new(),
            wake_tx,
            wake_rx,
            last_expiry_ms: Cell::new(clock.now_ms()),
            retention_check_ms: Cell::new(OFFSETS_RETENTION_CHECK_MS),
            clock,
            pending_txn: RefCell::new(Default::default()),
        })
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Waits until `group_id`'s partition is loaded here, at most `wait_max` on the clock
    /// (not at all when this replica does not lead it).
    pub async fn loaded(&self, group_id: &str, wait_max: Duration) -> Result<(), Unavailable> {
        let loaded = async {
            loop {
                // Listen before checking, so a load finishing in between is not missed.
                let done = self.loaded.listen();
                if self.check(group_id) != Err(Unavailable::Loading) {
                    return;
                }
                done.await;
            }
        };
        let timeout = self.clock.sleep(wait_max);
        futures_lite::future::or(loaded, timeout).await;
        self.check(group_id)
    }

    /// Whether `group_id`'s partition is loaded here: loading, or (replicated) not led here.
    pub fn check(&self, group_id: &str) -> Result<(), Unavailable> {
        let p = self.partition_of(group_id);
        if self.logs.borrow().contains_key(&p) {
            Ok(())
        } else if self.replicated.borrow().get(&p) == Some(&None) {
            Err(Unavailable::NotCoordinator)
        } else {
            Err(Unavailable::Loading)
        }
    }

    pub fn partition_of(&self, group_id: &str) -> i32 {
        partition_for(
            group_id,
            self.coordinator.borrow().config.offsets_partitions,
        )
    }

    /// Tells the timer loop that deadlines may have moved.
    pub fn wake(&self) {
        let _ = self.wake_tx.try_send(());
    }

    /// Replays partition `p` of `__consumer_offsets` into the coordinator and starts serving
    /// its groups. Records that do not decode are skipped with a warning (a damaged record
    /// loses one commit, not the coordinator).
    pub async fn load_partition(
        &self,
        p: i32,
        log: Rc<PartitionLog>,
    ) -> Result<usize, StorageError> {
        let applied = self.replay(p, &log, log.high_watermark()).await?;
        self.serve(p, log, None, applied);
        Ok(applied)
    }

    /// Starts serving the groups of partition `p` (replayed).
    fn serve(
        &self,
        p: i32,
        log: Rc<PartitionLog>,
        leader: Option<(Rc<ReplicatedPartition>, u64)>,
        applied: usize,
    ) {
        let term = leader.as_ref().map(|(_, t)| *t);
        self.logs.borrow_mut().insert(p, Served { log, leader });
        self.loaded.notify(usize::MAX);
        self.wake();
        tracing::debug!(
            partition = p,
            records = applied,
            term,
            "group coordinator partition loaded"
        );
    }

    /// Stops serving the groups of partition `p` (this replica stopped leading it): their
    /// state, timers and queued writes go, waiting members are answered NOT_COORDINATOR.
    pub fn unload_partition(&self, p: i32) {
        let served = self.logs.borrow_mut().remove(&p).is_some();
        let groups = self.coordinator.borrow_mut().unload_partition(p);
        self.pending_txn.borrow_mut().forget_partition(p);
        self.loaded.notify(usize::MAX);
        self.wake();
        if served {
            tracing::info!(
                partition = p,
                groups,
                "group coordinator partition unloaded"
            );
        }
    }

    /// Replays partition `p` below `end` into the coordinator; returns the records applied.
    async fn replay(&self, p: i32, log: &PartitionLog, end: Offset) -> Result<usize, StorageError> {
        let mut next = log.log_start_offset();
        let mut applied = 0usize;
        let now = self.clock.now_ms();
        while next < end {
            let r = log
                .read(ReadOptions {
                    start: next,
                    bytes_max: REPLAY_READ_BYTES_MAX,
                })
                .await?;
            if r.batches.is_empty() {
                break;
            }
            let before = next;
            for b in &r.batches {
                let h = match batch::BatchHeader::parse(b) {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::warn!(partition = p, error = %e, "skipping bad batch in {OFFSETS_TOPIC}");
                        continue;
                    }
                };
                let last = h.last_offset();
                if last < next {
                    continue;
                }
                if h.is_control() {
                    if h.is_transactional() {
                        let commit = crate::storage::txn_index::marker_type(&h)
                            == Some(crate::storage::txn_index::CONTROL_COMMIT);
                        self.complete_txn(p, h.producer_id(), commit).await;
                    }
                    next = last.next();
                    continue;
                }
                match records::decode_batch(b) {
                    Ok(recs) if h.is_transactional() => {
                        // Offsets of a transaction: held until its marker.
                        for rec in recs.into_iter().filter(|r| r.offset >= next.0) {
                            if let Some((group, e)) = txn_offset_of(&rec) {
                                self.pending_txn.borrow_mut().add(
                                    h.producer_id(),
                                    p,
                                    &group,
                                    vec![e],
                                );
                            }
                        }
                    }
                    Ok(recs) => {
                        let mut c = self.coordinator.borrow_mut();
                        for rec in recs.into_iter().filter(|r| r.offset >= next.0) {
                            if apply_record(&mut c, &rec, now) {
                                applied += 1;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(partition = p, error = %e, "skipping undecodable batch in {OFFSETS_TOPIC}")
                    }
                }
                next = last.next();
            }
            if next == before {
                // Nothing here moved the position (every batch was damaged or behind it):
                // stop rather than read the same bytes forever.
                tracing::warn!(
                    partition = p,
                    offset = next.0,
                    "{OFFSETS_TOPIC} replay stopped at undecodable data"
                );
                break;
            }
        }
        Ok(applied)
    }

    /// Writes `writes` (one batch per partition, in order) and waits until they are durable.
    pub async fn persist(&self, writes: Vec<Write>) -> Result<(), PersistError> {
        self.persist_with(writes, BatchOptions::default()).await
    }

    /// [`GroupShard::persist`] with the batches' producer fields (a transactional commit). The
    /// one place coordinator records are written: on a single node a synced append; on a
    /// replicated partition a proposal in the term this coordinator leads in, answered once a
    /// majority has it (followers only append it to their logs).
    pub async fn persist_with(
        &self,
        writes: Vec<Write>,
        options: BatchOptions,
    ) -> Result<(), PersistError> {
        match self.persist_each(writes, options).await.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Writes each partition's batch (see [`GroupShard::persist_with`]), every one even when
    /// another fails; returns the partitions that failed, with why.
    async fn persist_each(
        &self,
        writes: Vec<Write>,
        options: BatchOptions,
    ) -> Vec<(i32, PersistError)> {
        let mut by_partition: BTreeMap<i32, Vec<Write>> = BTreeMap::new();
        for w in writes {
            by_partition.entry(w.partition).or_default().push(w);
        }
        let mut failed = Vec::new();
        for (p, ws) in by_partition {
            if let Err(e) = self.persist_partition(p, &ws, options).await {
                failed.push((p, e));
            }
        }
        failed
    }

    /// Writes one batch of `ws` to partition `p`.
    async fn persist_partition(
        &self,
        p: i32,
        ws: &[Write],
        options: BatchOptions,
    ) -> Result<(), PersistError> {
        let served = self.logs.borrow().get(&p).cloned();
        let Some(served) = served else {
            if self.replicated.borrow().contains_key(&p) {
                return Err(PersistError::NotCoordinator);
            }
            return Err(PersistError::Storage(StorageError::Io(
                std::io::Error::other(format!(
                    "{OFFSETS_TOPIC} partition {p} is not loaded on this shard"
                )),
            )));
        };
        let now = self.clock.now_ms();
        let mut b = BatchBuilder::new(options);
        for w in ws {
            b.push(&builder::Record {
                key: Some(&w.key),
                value: w.value.as_deref(),
                headers: &[],
                timestamp_ms: now,
            });
        }
        let bytes = b.finish().map_err(|e| {
            PersistError::Storage(StorageError::Io(std::io::Error::other(format!(
                "{OFFSETS_TOPIC} partition {p}: {e}"
            ))))
        })?;
        let bytes = BytesMut::from(&bytes[..]);
        let Some((replica, term)) = &served.leader else {
            return served
                .log
                .append(bytes, Durability::Synced)
                .await
                .map(|_| ())
                .map_err(PersistError::Storage);
        };
        match replica.propose_in_term(bytes, *term).await {
            Ok(_) => Ok(()),
            Err(ReplicateError::Raft(_)) => Err(PersistError::NotCoordinator),
            Err(ReplicateError::InvalidProducerEpoch) => {
                Err(PersistError::Storage(StorageError::InvalidProducerEpoch))
            }
            Err(e) => Err(PersistError::Storage(StorageError::Io(
                std::io::Error::other(format!("{OFFSETS_TOPIC} partition {p}: {e}")),
            ))),
        }
    }

    /// Persists whatever the state machine queued (group metadata, tombstones). Storage
    /// failures are logged: the in-memory state stays authoritative until restart. Returns
    /// the partitions whose writes were refused because this replica no longer coordinates
    /// them (their state is dropped with the partition).
    pub async fn flush(&self) -> Vec<i32> {
        let writes = self.coordinator.borrow_mut().take_writes();
        if writes.is_empty() {
            return Vec::new();
        }
        let mut moved = Vec::new();
        for (p, e) in self.persist_each(writes, BatchOptions::default()).await {
            match e {
                PersistError::NotCoordinator => {
                    tracing::info!(
                        partition = p,
                        "group metadata not written: no longer the coordinator"
                    );
                    moved.push(p);
                }
                PersistError::Storage(e) => {
                    tracing::warn!(partition = p, error = %e, "cannot persist group metadata to {OFFSETS_TOPIC}");
                }
            }
        }
        moved
    }

    /// Runs a state-machine call, then persists what it queued and re-arms the timers. Its
    /// answer is NOT_COORDINATOR, never the call's, when what it wrote was refused because
    /// this replica stopped leading the partition meanwhile.
    pub async fn with<R>(
        &self,
        f: impl FnOnce(&mut Coordinator, i64) -> R,
    ) -> Result<R, ErrorCode> {
        let (r, mine) = {
            let mut c = self.coordinator.borrow_mut();
            let before = c.writes.len();
            let r = f(&mut c, self.clock.now_ms());
            // The partitions this call wrote to (records queued before it are others').
            let mine: Vec<i32> = c.writes.iter().skip(before).map(|w| w.partition).collect();
            (r, mine)
        };
        self.wake();
        let moved = self.flush().await;
        if mine.iter().any(|p| moved.contains(p)) {
            Err(Unavailable::NotCoordinator.code())
        } else {
            Ok(r)
        }
    }

    /// JoinGroup: waits for the rebalance when the state machine says so.
    pub async fn join(
        &self,
        req: coordinator::JoinRequest,
        topics: &dyn consumer::Topics,
    ) -> JoinResult {
        let member_id = req.member_id.clone();
        match self.with(|c, now| c.join_with(req, topics, now)).await {
            Err(code) => JoinResult::error(code, &member_id),
            Ok(Reply::Now(r)) => r,
            Ok(Reply::Wait(rx)) => rx.recv().await.unwrap_or_else(|_| {
                JoinResult::error(
                    ErrorCode::new(kafka_protocol::ResponseError::UnknownMemberId),
                    &member_id,
                )
            }),
        }
    }

    /// SyncGroup: followers wait for the leader's assignment.
    pub async fn sync(
        &self,
        req: coordinator::SyncRequest,
        topics: &dyn consumer::Topics,
    ) -> SyncResult {
        let reply = self.with(|c, now| c.sync_with(req, topics, now)).await;
        match reply {
            Err(code) => SyncResult::error(code),
            Ok(Reply::Now(r)) => r,
            Ok(Reply::Wait(rx)) => rx.recv().await.unwrap_or_else(|_| {
                SyncResult::error(ErrorCode::new(
                    kafka_protocol::ResponseError::UnknownMemberId,
                ))
            }),
        }
    }

    /// OffsetCommit of validated entries: durable before the state changes and before the
    /// answer. Returns the error for every entry (NONE on success).
    pub async fn commit(
        &self,
        who: MemberRef<'_>,
        entries: Vec<coordinator::CommitEntry>,
    ) -> ErrorCode {
        let group_id = who.group_id;
        let now = self.clock.now_ms();
        let writes = {
            let mut c = self.coordinator.borrow_mut();
            if let Err(code) = c.check_commit(who, now) {
                return code;
            }
            c.commit_writes(group_id, &entries)
        };
        if writes.is_empty() {
            return ErrorCode::NONE;
        }
        match self.persist(writes).await {
            Ok(()) => {
                self.coordinator
                    .borrow_mut()
                    .apply_commit(group_id, entries, now);
                ErrorCode::NONE
            }
            Err(PersistError::NotCoordinator) => Unavailable::NotCoordinator.code(),
            Err(e) => {
                tracing::warn!(group = group_id, error = %e, "offset commit not persisted");
                ErrorCode::new(kafka_protocol::ResponseError::CoordinatorNotAvailable)
            }
        }
    }

    /// The timer loop: fires the state machine's deadlines and the periodic offset expiry.
    pub async fn run_timers(self: Rc<Self>) {
        loop {
            let now = self.clock.now_ms();
            let next = self.coordinator.borrow().next_deadline_ms();
            let sleep_ms = next
                .map(|d| (d - now).clamp(0, TIMER_SLEEP_MS_MAX))
                .unwrap_or(TIMER_SLEEP_MS_MAX);
            if sleep_ms > 0 {
                let sleep = self.clock.sleep(Duration::from_millis(sleep_ms as u64));
                let woken = async {
                    let _ = self.wake_rx.recv().await;
                };
                futures_lite::future::or(sleep, woken).await;
            }
            let now = self.clock.now_ms();
            self.coordinator.borrow_mut().tick(now);
            if now - self.last_expiry_ms.get() >= self.retention_check_ms.get() {
                self.last_expiry_ms.set(now);
                let n = self.coordinator.borrow_mut().expire_offsets(now);
                if n > 0 {
                    tracing::info!(offsets = n, "expired committed offsets of empty groups");
                }
            }
            self.flush().await;
        }
    }

    /// Serves the groups of replicated partition `p` while this node's replica leads it: on
    /// each election won it waits until an entry of the new term is committed (so the log up
    /// to the high watermark holds everything a previous coordinator answered for), replays
    /// that (COORDINATOR_LOAD_IN_PROGRESS meanwhile), then serves; when the replica stops
    /// leading (or stops), the groups are unloaded. Runs until the replica stops.
    pub async fn follow_leadership(self: Rc<Self>, p: i32, replica: Rc<ReplicatedPartition>) {
        let statuses = replica.watch();
        self.replicated.borrow_mut().insert(p, None);
        self.loaded.notify(usize::MAX);
        while let Ok(mut status) = statuses.recv().await {
            // Only the latest status matters.
            while let Ok(s) = statuses.try_recv() {
                status = s;
            }
            let leading = self.replicated.borrow().get(&p).copied().flatten();
            if status.role == sluice_raft::Role::Leader {
                if leading == Some(status.term) {
                    continue;
                }
                self.unload_partition(p);
                let term = status.term;
                self.replicated.borrow_mut().insert(p, Some(term));
                self.loaded.notify(usize::MAX);
                let started = std::time::Instant::now();
                if !replica.wait_leader_caught_up(term).await {
                    self.replicated.borrow_mut().insert(p, None);
                    self.unload_partition(p);
                    continue;
                }
                if let Some(d) = crate::fault::delay_of("coordinator_load") {
                    self.clock.sleep(d).await;
                }
                let end = replica.high_watermark();
                let log = replica.log().clone();
                match self.replay(p, &log, end).await {
                    Ok(applied) => {
                        let now = replica.status();
                        if now.role == sluice_raft::Role::Leader && now.term == term {
                            self.serve(p, log, Some((replica.clone(), term)), applied);
                            tracing::info!(
                                partition = p,
                                term,
                                records = applied,
                                ms = started.elapsed().as_millis() as u64,
                                "group coordinator took over {OFFSETS_TOPIC} partition"
                            );
                        } else {
                            self.replicated.borrow_mut().insert(p, None);
                            self.unload_partition(p);
                        }
                    }
                    Err(e) => {
                        tracing::error!(partition = p, error = %e, "cannot replay {OFFSETS_TOPIC}");
                        self.replicated.borrow_mut().insert(p, None);
                        self.unload_partition(p);
                    }
                }
            } else {
                self.replicated.borrow_mut().insert(p, None);
                self.unload_partition(p);
                if status.role == sluice_raft::Role::Stopped {
                    break;
                }
            }
        }
        self.replicated.borrow_mut().remove(&p);
        self.unload_partition(p);
    }
}

/// The group and offset of a transactional offset-commit record (`None` for anything else).
fn txn_offset_of(rec: &records::Record) -> Option<(String, coordinator::CommitEntry)> {
    let key = offsets::decode_key(rec.key.as_ref()?).ok()?;
    let offsets::RecordKey::Offset {
        group,
        topic,
        partition,
    } = key
    else {
        return None;
    };
    let value = offsets::decode_offset_value(rec.value.as_ref()?).ok()?;
    Some((
        group,
        coordinator::CommitEntry {
            topic,
            partition,
            value,
        },
    ))
}

/// Applies one `__consumer_offsets` record; false if it did not decode.
fn apply_record(c: &mut Coordinator, rec: &records::Record, now_ms: i64) -> bool {
    let Some(key) = rec.key.as_ref() else {
        return false;
    };
    let key = match offsets::decode_key(key) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(offset = rec.offset, error = %e, "skipping record");
            return false;
        }
    };
    match key {
        offsets::RecordKey::Offset {
            group,
            topic,
            partition,
        } => {
            let value = match rec.value.as_ref().map(offsets::decode_offset_value) {
                None => None,
                Some(Ok(v)) => Some(v),
                Some(Err(e)) => {
                    tracing::warn!(offset = rec.offset, error = %e, "skipping record");
                    return false;
                }
            };
            c.load_offset(&group, &topic, partition, value, now_ms);
        }
        offsets::RecordKey::Group { group } => {
            let value = match rec.value.as_ref().map(offsets::decode_group_value) {
                None => None,
                Some(Ok(v)) => Some(v),
                Some(Err(e)) => {
                    tracing::warn!(offset = rec.offset, error = %e, "skipping record");
                    return false;
                }
            };
            c.load_group(&group, value, now_ms);
        }
        offsets::RecordKey::ConsumerGroup { group } => {
            match rec.value.as_ref().map(offsets::decode_consumer_group_value) {
                None => c.load_consumer_group(&group, None, now_ms),
                Some(Ok(epoch)) => c.load_consumer_group(&group, Some(epoch), now_ms),
                Some(Err(e)) => {
                    tracing::warn!(offset = rec.offset, error = %e, "skipping record");
                    return false;
                }
            }
        }
        offsets::RecordKey::ConsumerMember { group, member } => {
            match rec
                .value
                .as_ref()
                .map(offsets::decode_consumer_member_value)
            {
                None => c.load_consumer_member(&group, &member, None, now_ms),
                Some(Ok(v)) => c.load_consumer_member(&group, &member, Some(v), now_ms),
                Some(Err(e)) => {
                    tracing::warn!(offset = rec.offset, error = %e, "skipping record");
                    return false;
                }
            }
        }
        offsets::RecordKey::ShareGroup { group } => {
            match rec.value.as_ref().map(offsets::decode_share_group_value) {
                None => c.load_share_group(&group, None),
                Some(Ok(v)) => c.load_share_group(&group, Some(v)),
                Some(Err(e)) => {
                    tracing::warn!(offset = rec.offset, error = %e, "skipping record");
                    return false;
                }
            }
        }
        offsets::RecordKey::GroupConfigs { group } => {
            match rec.value.as_ref().map(offsets::decode_group_configs_value) {
                None => c.load_group_configs(&group, None),
                Some(Ok(v)) => c.load_group_configs(&group, Some(v)),
                Some(Err(e)) => {
                    tracing::warn!(offset = rec.offset, error = %e, "skipping record");
                    return false;
                }
            }
        }
        offsets::RecordKey::ShareMember { group, member } => {
            match rec.value.as_ref().map(offsets::decode_share_member_value) {
                None => c.load_share_member(&group, &member, None, now_ms),
                Some(Ok(v)) => c.load_share_member(&group, &member, Some(v), now_ms),
                Some(Err(e)) => {
                    tracing::warn!(offset = rec.offset, error = %e, "skipping record");
                    return false;
                }
            }
        }
        offsets::RecordKey::ConsumerTargetEpoch { group } => {
            match rec.value.as_ref().map(offsets::decode_target_epoch_value) {
                None => c.load_consumer_target_epoch(&group, None, now_ms),
                Some(Ok(v)) => c.load_consumer_target_epoch(&group, Some(v), now_ms),
                Some(Err(e)) => {
                    tracing::warn!(offset = rec.offset, error = %e, "skipping record");
                    return false;
                }
            }
        }
        offsets::RecordKey::ConsumerTargetMember { group, member } => {
            match rec.value.as_ref().map(offsets::decode_target_member_value) {
                None => c.load_consumer_target_member(&group, &member, None, now_ms),
                Some(Ok(v)) => c.load_consumer_target_member(&group, &member, Some(v), now_ms),
                Some(Err(e)) => {
                    tracing::warn!(offset = rec.offset, error = %e, "skipping record");
                    return false;
                }
            }
        }
        offsets::RecordKey::ConsumerAssignment { group, member } => {
            match rec
                .value
                .as_ref()
                .map(offsets::decode_current_assignment_value)
            {
                None => c.load_consumer_assignment(&group, &member, None, now_ms),
                Some(Ok(v)) => c.load_consumer_assignment(&group, &member, Some(v), now_ms),
                Some(Err(e)) => {
                    tracing::warn!(offset = rec.offset, error = %e, "skipping record");
                    return false;
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests;

// -------------------------------------------------------------------- broker integration

/// Runs `f` with the coordinator of `group_id` on the shard that owns the group's
/// `__consumer_offsets` partition. This is the cross-core hop: a group's state lives on exactly
/// one shard. Errors are COORDINATOR_NOT_AVAILABLE / COORDINATOR_LOAD_IN_PROGRESS, and in a
/// cluster NOT_COORDINATOR when that partition is on another node or, replicated, this node's
/// replica of it does not lead.
pub async fn on_coordinator<F, Fut, R>(group_id: &str, f: F) -> Result<R, ErrorCode>
where
    F: FnOnce(Rc<GroupShard>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = R> + 'static,
    R: Send + 'static,
{
    let broker = crate::shard::local().broker.clone();
    let image = broker.image();
    let not_available = Unavailable::NotAvailable.code();
    let meta = image.topic(OFFSETS_TOPIC).ok_or(not_available)?;
    let p = partition_for(group_id, meta.partition_count());
    let Some(owner) = broker.owner(meta, p) else {
        // In a cluster, the group's partition (and so its coordinator) is on other nodes:
        // clients find it again with FindCoordinator.
        return Err(if broker.config.cluster.is_some() {
            Unavailable::NotCoordinator.code()
        } else {
            not_available
        });
    };
    let gid = group_id.to_string();
    crate::shard::invoke_on(owner, move || async move {
        crate::fault::panic_point("group", &gid);
        let gs = local().ok_or(not_available)?;
        // Right after start the partition may still be replaying: wait a little before
        // answering COORDINATOR_LOAD_IN_PROGRESS, so clients rarely need to retry.
        gs.loaded(&gid, LOAD_WAIT_MAX).await.map_err(|u| u.code())?;
        Ok(f(gs).await)
    })
    .await
}

/// Starts the group machinery of the calling shard once the broker serves: installs this
/// shard's coordinator, then in the background creates `__consumer_offsets` if missing (shard
/// 0), replays the partitions this shard owns and runs the timers.
pub fn start_shard_tasks() {
    let shard = crate::shard::local();
    let cfg = &shard.broker.config;
    let gs = GroupShard::new(
        CoordinatorConfig {
            initial_rebalance_delay_ms: cfg.group_initial_rebalance_delay_ms as i64,
            offsets_retention_ms: (cfg.offsets_retention_minutes as i64).saturating_mul(60_000),
            consumer: consumer::ConsumerConfig {
                session_timeout_ms: cfg.group_consumer_session_timeout_ms as i32,
                heartbeat_interval_ms: cfg.group_consumer_heartbeat_interval_ms as i32,
                assignors: cfg.group_consumer_assignors.clone(),
                max_size: cfg.group_consumer_max_size as usize,
                migration: consumer::MigrationPolicy::parse(&cfg.group_consumer_migration_policy)
                    .unwrap_or_default(),
                ..Default::default()
            }
            .with_bounds_around_defaults(),
            share: share::ShareConfig {
                session_timeout_ms: cfg.group_share_session_timeout_ms as i32,
                heartbeat_interval_ms: cfg.group_share_heartbeat_interval_ms as i32,
                max_size: cfg.group_share_max_size as usize,
                record_lock_duration_ms: cfg.group_share_record_lock_duration_ms as i64,
                delivery_count_limit: cfg.group_share_delivery_count_limit,
                partition_max_record_locks: cfg.group_share_partition_max_record_locks,
            },
            ..Default::default()
        },
        shard.clock.clone(),
    );
    install(gs.clone());
    // Contained: a panic while loading leaves this shard's groups unloaded (their requests get
    // COORDINATOR_LOAD_IN_PROGRESS) and is logged; the shard keeps serving everything else.
    crate::contain::spawn_background("group coordinator", async move {
        if let Err(e) = load_here(&gs).await {
            tracing::error!(error = %e, "group coordinator failed to load");
            return;
        }
        // The timer loop keeps no state of its own (it is all in the coordinator), so after a
        // panic it is logged and restarted, after a pause so that a panic on every tick cannot
        // spin; without timers, sessions would never expire and rebalances never time out.
        loop {
            match crate::contain::contain(gs.clone().run_timers()).await {
                Ok(()) => return,
                Err(mut p) => {
                    p.mark_reported();
                    tracing::error!("group timers {p}; restarting them in {TIMER_RESTART_MS} ms");
                    gs.clock
                        .sleep(Duration::from_millis(TIMER_RESTART_MS))
                        .await;
                }
            }
        }
    });
}

/// Pause before the group timer loop restarts after a panic.
const TIMER_RESTART_MS: u64 = 1_000;

async fn load_here(gs: &Rc<GroupShard>) -> Result<(), String> {
    let shard = crate::shard::local();
    // In a cluster `__consumer_offsets` is replicated (`--offsets-topic-replication-factor`,
    // at most the live nodes when it is created); on a single node it has one replica.
    let rf = if shard.broker.config.cluster.is_some() {
        shard.broker.config.offsets_topic_replication_factor
    } else {
        1
    };
    let (meta, owned) =
        crate::admin::internal_topic_here(OFFSETS_TOPIC, OFFSETS_PARTITIONS, rf).await?;
    gs.coordinator.borrow_mut().config.offsets_partitions = meta.partition_count();
    for (p, log) in owned {
        let tp = TopicPartition::new(OFFSETS_TOPIC, p);
        // In a cluster the log may be open before the controller starts its raft group.
        let replica = match shard.replica(&tp) {
            None if shard.awaits_replica(&tp) => Some(
                shard
                    .attached_replica(&tp)
                    .await
                    .ok_or_else(|| format!("{tp} was removed or the broker stops"))?,
            ),
            r => r,
        };
        match replica {
            // Served while this node's replica leads it.
            Some(replica) => {
                crate::contain::spawn_background(
                    "group coordinator leadership",
                    gs.clone().follow_leadership(p, replica),
                );
            }
            None => {
                gs.load_partition(p, log)
                    .await
                    .map_err(|e| format!("cannot replay {OFFSETS_TOPIC}-{p}: {e}"))?;
            }
        }
    }
    Ok(())
}

/// The metadata image as the KIP-848 coordinator sees topics.
pub struct ImageTopics(pub std::sync::Arc<crate::metadata::MetadataImage>);

impl consumer::Topics for ImageTopics {
    fn by_name(&self, name: &str) -> Option<([u8; 16], i32)> {
        self.0
            .topic(name)
            .filter(|t| !t.internal)
            .map(|t| (t.id, t.partition_count()))
    }
    fn by_id(&self, id: &[u8; 16]) -> Option<(String, i32)> {
        self.0
            .topic_by_id(id)
            .map(|t| (t.name.clone(), t.partition_count()))
    }
    fn names(&self) -> Vec<String> {
        self.0
            .topics
            .values()
            .filter(|t| !t.internal)
            .map(|t| t.name.clone())
            .collect()
    }
    /// The racks of the nodes holding the partition's replicas (`--rack` of each, as
    /// registered); on a single node, this node's.
    fn racks(&self, id: &[u8; 16], partition: i32) -> std::collections::BTreeSet<String> {
        let Some(t) = self.0.topic_by_id(id) else {
            return Default::default();
        };
        let nodes = t.replica_nodes(partition);
        if nodes.is_empty() {
            return crate::shard::local()
                .broker
                .config
                .rack
                .iter()
                .cloned()
                .collect();
        }
        nodes
            .iter()
            .filter_map(|n| self.0.brokers.get(n).and_then(|b| b.rack.clone()))
            .collect()
    }
}
