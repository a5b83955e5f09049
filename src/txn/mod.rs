//! The transaction coordinator (KIP-98, KIP-447, KIP-890 part 1) of each shard. A
//! transactional id lives on the shard that owns partition `abs(java hashCode(id)) % 50` of
//! `__transaction_state`, exactly as a group lives on its `__consumer_offsets` partition;
//! handlers hop there with [`on_coordinator`].
//!
//! | file | owns |
//! | --- | --- |
//! | [`state`] | one id's metadata, its states, Kafka's `__transaction_state` record formats |
//! | `mod.rs` (here) | [`TxnShard`]: the state transitions, their log, replay, markers, timeouts |
//!
//! Every transition is appended to the id's `__transaction_state` partition and synced before
//! memory changes and before anything acts on it; a start replays those partitions and
//! finishes every transaction found in PrepareCommit/PrepareAbort (its markers are written
//! again: a marker for a transaction a partition no longer has open changes nothing there).
//! Transitions of one id run one at a time (an id lock, [`TxnShard::lock`]), so a check and
//! the write that follows it see the same state; transitions of different ids run
//! concurrently, and their synced appends to a `__transaction_state` partition share its
//! group commit (one fdatasync for all of them) instead of waiting for each other's.
//!
//! Commit or abort: EndTxn writes PrepareCommit/PrepareAbort and is answered; a background
//! task then appends a COMMIT/ABORT control batch to every partition of the transaction (on
//! its owner shard; for a `__consumer_offsets` partition the group coordinator there then
//! applies or drops the transaction's offsets) and writes CompleteCommit/CompleteAbort.
//! Meanwhile requests for the id get CONCURRENT_TRANSACTIONS, which clients retry.
//!
//! One node only: in a cluster no coordinator runs (FindCoordinator answers
//! COORDINATOR_NOT_AVAILABLE and InitProducerId TRANSACTIONAL_ID_AUTHORIZATION_FAILED).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use event_listener::Event;
use kafka_protocol::ResponseError;

use crate::protocol::batch;
use crate::protocol::builder::{self, BatchBuilder, BatchOptions};
use crate::protocol::records;
use crate::storage::{Durability, PartitionLog, ReadOptions, StorageError};
use crate::types::{Clock, ErrorCode, TopicPartition};

pub mod state;
pub mod verified;

pub use state::{TxnMeta, TxnState};

/// The internal topic holding the coordinator's log.
pub const TXN_TOPIC: &str = "__transaction_state";
/// Kafka's default `transaction.state.log.num.partitions`.
pub const TXN_PARTITIONS: i32 = 50;
/// Kafka's default `transaction.max.timeout.ms`: a longer `transaction.timeout.ms` is
/// INVALID_TRANSACTION_TIMEOUT.
pub const TXN_MAX_TIMEOUT_MS: i32 = 900_000;
/// How often open transactions are checked against their timeout (Kafka's
/// `transaction.abort.timed.out.transaction.cleanup.interval.ms` is 10 s; a shorter period
/// costs one map walk).
const EXPIRY_CHECK_MS: u64 = 1_000;
/// Pause before a marker write that failed is tried again.
const MARKER_RETRY_MS: u64 = 500;
/// How long a request waits for its coordinator partition to finish replaying.
const LOAD_WAIT_MAX: Duration = Duration::from_secs(5);
/// Bytes read per step while replaying a `__transaction_state` partition.
const REPLAY_READ_BYTES_MAX: u32 = 1 << 20;
/// Partitions one transaction may hold: bounds its record and the markers one EndTxn writes.
pub const TXN_PARTITIONS_MAX: usize = 100_000;
/// The highest `transaction.version` this broker supports and the level it runs at: 2, Kafka's
/// KIP-890 part 2 (Produce v12 adds partitions implicitly, EndTxn v5 bumps the epoch).
pub const TRANSACTION_VERSION: i16 = 2;
/// The feature ApiVersions reports [`TRANSACTION_VERSION`] under.
pub const TRANSACTION_VERSION_FEATURE: &str = "transaction.version";
/// Kafka's default `transactional.id.expiration.ms` (7 days).
pub const TXN_ID_EXPIRATION_MS_DEFAULT: u64 = 7 * 24 * 3_600_000;
/// Bounds how often the idle-id walk runs: a tenth of the expiration, but at least this …
const ID_EXPIRY_CHECK_MIN_MS: i64 = 1_000;
/// … and at most Kafka's `transaction.remove.expired.transaction.cleanup.interval.ms` (1 hour).
const ID_EXPIRY_CHECK_MAX_MS: i64 = 3_600_000;
/// How long a Produce v12 waits for the previous transaction of its producer to finish its
/// markers before adding the partition to the next one (the producer may start it as soon as
/// EndTxn is answered); past it the produce gets CONCURRENT_TRANSACTIONS and retries.
const IMPLICIT_ADD_WAIT: Duration = Duration::from_secs(5);

fn code(e: ResponseError) -> ErrorCode {
    ErrorCode::new(e)
}

/// The coordinator of one shard with the `__transaction_state` partitions it owns.
pub struct TxnShard {
    txns: RefCell<HashMap<String, TxnMeta>>,
    logs: RefCell<HashMap<i32, Rc<PartitionLog>>>,
    loaded: Event,
    /// Notified whenever a transaction completes (its Complete record is written).
    completed: Event,
    /// The ids with a transition under way (check, write, apply): one at a time per id.
    busy: RefCell<std::collections::HashSet<String>>,
    /// Notified when an id's transition ends.
    freed: Event,
    partitions: Cell<i32>,
    clock: Clock,
    /// `transactional.id.expiration.ms`: an id idle this long outside a transaction is removed.
    id_expiration_ms: i64,
    /// When the idle-id walk runs next.
    next_id_expiry_ms: Cell<i64>,
}

thread_local! {
    static LOCAL: RefCell<Option<Rc<TxnShard>>> = const { RefCell::new(None) };
}

/// The coordinator of the calling shard, if transactions are enabled on it.
pub fn local() -> Option<Rc<TxnShard>> {
    LOCAL.with(|l| l.borrow().clone())
}

/// What one InitProducerId answers.
pub type InitResult = Result<(i64, i16), ErrorCode>;

/// One id's description (DescribeTransactions, ListTransactions).
#[derive(Debug, Clone)]
pub struct Described {
    pub transactional_id: String,
    pub meta: TxnMeta,
}

impl TxnShard {
    pub fn new(clock: Clock, id_expiration_ms: u64) -> Rc<TxnShard> {
        Rc::new(TxnShard {
            txns: RefCell::new(HashMap::new()),
            logs: RefCell::new(HashMap::new()),
            loaded: Event::new(),
            completed: Event::new(),
            busy: RefCell::new(std::collections::HashSet::new()),
            freed: Event::new(),
            partitions: Cell::new(TXN_PARTITIONS),
            clock,
            id_expiration_ms: id_expiration_ms.min(i64::MAX as u64) as i64,
            next_id_expiry_ms: Cell::new(0),
        })
    }

    fn partition_of(&self, tid: &str) -> i32 {
        crate::group::partition_for(tid, self.partitions.get())
    }

    fn check(&self, tid: &str) -> bool {
        self.logs.borrow().contains_key(&self.partition_of(tid))
    }

    /// Waits until `tid`'s partition is loaded here, at most `wait_max`.
    async fn loaded(&self, tid: &str, wait_max: Duration) -> Result<(), ErrorCode> {
        let loaded = async {
            loop {
                let done = self.loaded.listen();
                if self.check(tid) {
                    return;
                }
                done.await;
            }
        };
        futures_lite::future::or(loaded, self.clock.sleep(wait_max)).await;
        if self.check(tid) {
            Ok(())
        } else {
            Err(code(ResponseError::CoordinatorLoadInProgress))
        }
    }

    /// Waits until no other transition of `tid` is under way and holds its lock until the
    /// guard drops. Transitions of other ids go on meanwhile.
    async fn lock(&self, tid: &str) -> IdLock<'_> {
        loop {
            let listener = self.freed.listen();
            if self.busy.borrow_mut().insert(tid.to_string()) {
                return IdLock {
                    shard: self,
                    tid: tid.to_string(),
                };
            }
            listener.await;
        }
    }

    /// Appends `tid`'s new metadata and waits for the fdatasync.
    async fn persist(&self, tid: &str, m: Option<&TxnMeta>) -> Result<(), StorageError> {
        let p = self.partition_of(tid);
        let log = self.logs.borrow().get(&p).cloned().ok_or_else(|| {
            StorageError::Io(std::io::Error::other(format!(
                "{TXN_TOPIC} partition {p} is not loaded on this shard"
            )))
        })?;
        let key = state::encode_key(tid);
        let value = m.map(state::encode_value);
        let mut b = BatchBuilder::new(BatchOptions::default());
        b.push(&builder::Record {
            key: Some(&key),
            value: value.as_deref(),
            headers: &[],
            timestamp_ms: self.clock.now_ms(),
        });
        let bytes = b
            .finish()
            .map_err(|e| StorageError::Io(std::io::Error::other(e.to_string())))?;
        log.append(BytesMut::from(&bytes[..]), Durability::Synced)
            .await?;
        Ok(())
    }

    /// Writes `m` for `tid`, then makes it the state in memory.
    async fn transition(&self, tid: &str, m: TxnMeta) -> Result<(), ErrorCode> {
        if let Err(e) = self.persist(tid, Some(&m)).await {
            tracing::warn!(transactional_id = tid, error = %e, "transaction state not persisted");
            return Err(code(ResponseError::CoordinatorNotAvailable));
        }
        self.txns.borrow_mut().insert(tid.to_string(), m);
        Ok(())
    }

    /// InitProducerId with a transactional id: a new producer id for a new id, otherwise the
    /// epoch bumped (fencing the previous producer). An open transaction is aborted first and
    /// the caller told CONCURRENT_TRANSACTIONS (it retries and then gets the new epoch).
    /// `expected` is the producer id and epoch the client already holds (KIP-360), if any.
    pub async fn init_producer(
        self: &Rc<Self>,
        tid: &str,
        timeout_ms: i32,
        expected: Option<(i64, i16)>,
    ) -> InitResult {
        let _lock = self.lock(tid).await;
        let now = self.clock.now_ms();
        let cur = self.txns.borrow().get(tid).cloned();
        let Some(cur) = cur else {
            if expected.is_some() {
                return Err(code(ResponseError::InvalidProducerIdMapping));
            }
            let pid = new_producer_id().await?;
            let m = TxnMeta {
                producer_id: pid,
                epoch: 0,
                timeout_ms,
                state: TxnState::Empty,
                partitions: BTreeSet::new(),
                last_update_ms: now,
                start_ms: -1,
                previous: None,
                next_producer_id: None,
            };
            self.transition(tid, m).await?;
            return Ok((pid, 0));
        };
        if cur.state.completing() {
            return Err(code(ResponseError::ConcurrentTransactions));
        }
        if let Some((pid, epoch)) = expected {
            // KIP-360: only the producer that holds the current epoch may bump it (or retry
            // a bump it already got).
            let retry = pid == cur.producer_id && epoch.checked_add(1) == Some(cur.epoch);
            if retry && cur.state != TxnState::Ongoing {
                return Ok((cur.producer_id, cur.epoch));
            }
            if pid != cur.producer_id || epoch != cur.epoch {
                return Err(code(ResponseError::ProducerFenced));
            }
        }
        if cur.state == TxnState::Ongoing {
            // Fence the previous producer and abort its transaction with a bumped epoch.
            let mut m = cur.clone();
            m.epoch = bump(cur.epoch);
            m.state = TxnState::PrepareAbort;
            // The epoch moved past any EndTxn v5 retry.
            m.previous = None;
            m.last_update_ms = now;
            self.transition(tid, m).await?;
            self.spawn_complete(tid.to_string());
            return Err(code(ResponseError::ConcurrentTransactions));
        }
        let mut m = cur.clone();
        if cur.epoch >= i16::MAX - 1 {
            // The epoch is exhausted: a new producer id starts again at 0.
            m.producer_id = new_producer_id().await?;
            m.epoch = 0;
        } else {
            m.epoch = cur.epoch + 1;
        }
        m.timeout_ms = timeout_ms;
        m.state = TxnState::Empty;
        m.partitions.clear();
        m.last_update_ms = now;
        m.start_ms = -1;
        m.previous = None;
        self.transition(tid, m.clone()).await?;
        Ok((m.producer_id, m.epoch))
    }

    /// The checks every request of a producer passes: its id is known, the producer id and
    /// epoch are current, no transaction is completing.
    fn current(&self, tid: &str, pid: i64, epoch: i16) -> Result<TxnMeta, ErrorCode> {
        let m = self
            .txns
            .borrow()
            .get(tid)
            .cloned()
            .ok_or(code(ResponseError::InvalidProducerIdMapping))?;
        if m.producer_id != pid {
            return Err(code(ResponseError::InvalidProducerIdMapping));
        }
        if m.epoch != epoch {
            return Err(code(ResponseError::ProducerFenced));
        }
        Ok(m)
    }

    /// AddPartitionsToTxn / AddOffsetsToTxn: adds `parts` to the open transaction (opening
    /// it). With `verify_only` (KIP-890), only checks that they are in it.
    pub async fn add_partitions(
        &self,
        tid: &str,
        pid: i64,
        epoch: i16,
        parts: Vec<(String, i32)>,
        verify_only: bool,
    ) -> ErrorCode {
        let _lock = self.lock(tid).await;
        let m = match self.current(tid, pid, epoch) {
            Ok(m) => m,
            Err(e) => return e,
        };
        if m.state.completing() {
            return code(ResponseError::ConcurrentTransactions);
        }
        if verify_only {
            let ok = m.state == TxnState::Ongoing && parts.iter().all(|p| m.partitions.contains(p));
            return if ok {
                ErrorCode::NONE
            } else {
                code(ResponseError::InvalidTxnState)
            };
        }
        if m.state == TxnState::Ongoing && parts.iter().all(|p| m.partitions.contains(p)) {
            return ErrorCode::NONE;
        }
        let mut next = m.clone();
        next.partitions.extend(parts);
        if next.partitions.len() > TXN_PARTITIONS_MAX {
            return code(ResponseError::InvalidRequest);
        }
        let now = self.clock.now_ms();
        if m.state != TxnState::Ongoing {
            next.start_ms = now;
        }
        next.state = TxnState::Ongoing;
        next.last_update_ms = now;
        match self.transition(tid, next).await {
            Ok(()) => ErrorCode::NONE,
            Err(e) => e,
        }
    }

    /// Transaction version 2 (Produce v12): adds `tp` to the producer's transaction, opening
    /// one, as an AddPartitionsToTxn would. A previous transaction of the producer still
    /// writing its markers (the producer starts the next one as soon as EndTxn is answered) is
    /// waited for, up to [`IMPLICIT_ADD_WAIT`].
    pub async fn add_partition_implicitly(
        &self,
        tid: &str,
        pid: i64,
        epoch: i16,
        tp: (String, i32),
    ) -> ErrorCode {
        let deadline = self.clock.now_ms() + IMPLICIT_ADD_WAIT.as_millis() as i64;
        loop {
            let done = self.completed.listen();
            let e = self
                .add_partitions(tid, pid, epoch, vec![tp.clone()], false)
                .await;
            let left = deadline - self.clock.now_ms();
            if e != code(ResponseError::ConcurrentTransactions) || left <= 0 {
                return e;
            }
            futures_lite::future::or(done, self.clock.sleep(Duration::from_millis(left as u64)))
                .await;
        }
    }

    /// EndTxn: PrepareCommit/PrepareAbort written, answered, and the markers written after.
    /// With transaction version 2 (`bump`, EndTxn v5) the epoch is bumped on every commit and
    /// abort: the Prepare record carries the new epoch, the markers are written with it (so
    /// the producer's batches at the old epoch are refused from then on), and the answer is
    /// the producer id and epoch the producer continues with. An exhausted epoch hands the
    /// producer a new producer id at epoch 0 once the markers are written. Answers the
    /// producer id and epoch (unchanged without `bump`).
    pub async fn end_txn(
        self: &Rc<Self>,
        tid: &str,
        pid: i64,
        epoch: i16,
        commit: bool,
        bump_epoch: bool,
    ) -> Result<(i64, i16), ErrorCode> {
        let _lock = self.lock(tid).await;
        if bump_epoch {
            let m = self.describe(tid);
            if let Some(m) = m.filter(|m| m.previous == Some((pid, epoch))) {
                // A retry of an EndTxn v5 already taken: its epoch was bumped since.
                return match (m.state, commit) {
                    (TxnState::CompleteCommit, true) | (TxnState::CompleteAbort, false) => {
                        Ok((m.producer_id, m.epoch))
                    }
                    (TxnState::PrepareCommit, true) | (TxnState::PrepareAbort, false) => {
                        Err(code(ResponseError::ConcurrentTransactions))
                    }
                    _ => Err(code(ResponseError::ProducerFenced)),
                };
            }
        }
        let m = self.current(tid, pid, epoch)?;
        match (m.state, commit) {
            (TxnState::Ongoing, _) => {}
            // Transaction version 2: an abort with nothing added still bumps the epoch (the
            // producer aborts after an abortable error whatever it sent).
            (TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort, false)
                if bump_epoch => {}
            // A retry of an EndTxn that already went through.
            (TxnState::CompleteCommit, true) | (TxnState::CompleteAbort, false) => {
                return Ok((m.producer_id, m.epoch))
            }
            (TxnState::PrepareCommit, true) | (TxnState::PrepareAbort, false) => {
                return Err(code(ResponseError::ConcurrentTransactions))
            }
            _ => return Err(code(ResponseError::InvalidTxnState)),
        }
        let mut next = m;
        next.state = if commit {
            TxnState::PrepareCommit
        } else {
            TxnState::PrepareAbort
        };
        next.last_update_ms = self.clock.now_ms();
        let mut answer = (pid, epoch);
        if bump_epoch {
            next.previous = Some((pid, epoch));
            if epoch < i16::MAX - 1 {
                next.epoch = epoch + 1;
                answer = (pid, epoch + 1);
            } else {
                // The markers take the last epoch; the producer continues with a new id.
                next.epoch = i16::MAX;
                let np = new_producer_id().await?;
                next.next_producer_id = Some(np);
                answer = (np, 0);
            }
        }
        self.transition(tid, next).await?;
        self.spawn_complete(tid.to_string());
        Ok(answer)
    }

    /// Whether `pid`/`epoch` may write transactional batches to `tp` now (the partition was
    /// added to its open transaction).
    pub fn verify_partition(
        &self,
        tid: &str,
        pid: i64,
        epoch: i16,
        tp: &(String, i32),
    ) -> ErrorCode {
        match self.current(tid, pid, epoch) {
            Err(e) => e,
            Ok(m) if m.state == TxnState::Ongoing && m.partitions.contains(tp) => ErrorCode::NONE,
            Ok(m) if m.state.completing() => code(ResponseError::ConcurrentTransactions),
            Ok(_) => code(ResponseError::InvalidTxnState),
        }
    }

    pub fn describe(&self, tid: &str) -> Option<TxnMeta> {
        self.txns.borrow().get(tid).cloned()
    }

    /// Every id of this shard, ordered by id.
    pub fn list(&self) -> Vec<Described> {
        let mut v: Vec<Described> = self
            .txns
            .borrow()
            .iter()
            .map(|(k, m)| Described {
                transactional_id: k.clone(),
                meta: m.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.transactional_id.cmp(&b.transactional_id));
        v
    }

    /// Finishes `tid`'s prepared transaction in the background: markers, then the Complete
    /// record. Contained: a panic leaves the transaction prepared until the next start, which
    /// finishes it.
    fn spawn_complete(self: &Rc<Self>, tid: String) {
        let ts = self.clone();
        crate::contain::spawn_background("transaction markers", async move {
            ts.complete(&tid).await;
        });
    }

    async fn complete(&self, tid: &str) {
        crate::fault::panic_point("txn_markers", tid);
        let Some(m) = self.describe(tid) else { return };
        let commit = match m.state {
            TxnState::PrepareCommit => true,
            TxnState::PrepareAbort => false,
            _ => return,
        };
        // The partitions' markers are written concurrently (each on its owner shard, where
        // markers of other transactions share the log's group commit); the Complete record
        // waits for all of them.
        let writes: Vec<_> = m
            .partitions
            .iter()
            .map(|(topic, p)| {
                let (topic, p, tid) = (topic.clone(), *p, tid.to_string());
                let (pid, epoch, clock) = (m.producer_id, m.epoch, self.clock.clone());
                crate::shard::spawn_contained(async move {
                    loop {
                        match write_marker(&topic, p, pid, epoch, commit).await {
                            Ok(()) => break,
                            Err(e) => {
                                tracing::warn!(
                                    transactional_id = %tid, topic = %topic, partition = p,
                                    error = %e, "transaction marker not written; trying again"
                                );
                                clock.sleep(Duration::from_millis(MARKER_RETRY_MS)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        for w in writes {
            crate::shard::join(w).await;
        }
        let _lock = self.lock(tid).await;
        let mut next = m;
        next.state = if commit {
            TxnState::CompleteCommit
        } else {
            TxnState::CompleteAbort
        };
        next.partitions.clear();
        next.last_update_ms = self.clock.now_ms();
        next.start_ms = -1;
        if let Some(np) = next.next_producer_id.take() {
            next.producer_id = np;
            next.epoch = 0;
        }
        // On failure the transaction stays prepared in memory and in the log; the next start
        // writes its markers again and completes it.
        let _ = self.transition(tid, next).await;
        self.completed.notify(usize::MAX);
    }

    /// Removes the ids idle for `transactional.id.expiration.ms` with no transaction open
    /// (Empty, CompleteCommit, CompleteAbort): a tombstone in `__transaction_state` (which the
    /// cleaner compacts away), then the id is forgotten. Answers how many were removed.
    pub async fn expire_ids(&self) -> usize {
        let now = self.clock.now_ms();
        let idle = |m: &TxnMeta| {
            matches!(
                m.state,
                TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort
            ) && now.saturating_sub(m.last_update_ms) >= self.id_expiration_ms
        };
        let expired: Vec<String> = self
            .txns
            .borrow()
            .iter()
            .filter(|(_, m)| idle(m))
            .map(|(k, _)| k.clone())
            .collect();
        let mut removed = 0;
        for tid in expired {
            let _lock = self.lock(&tid).await;
            // Checked again under the lock: a request may have used the id meanwhile.
            if !self.describe(&tid).is_some_and(|m| idle(&m)) {
                continue;
            }
            if let Err(e) = self.persist(&tid, None).await {
                tracing::warn!(transactional_id = %tid, error = %e, "expired transactional id not removed");
                continue;
            }
            self.txns.borrow_mut().remove(&tid);
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "removed transactional ids past transactional.id.expiration.ms"
            );
        }
        removed
    }

    /// Aborts every open transaction past its timeout, with a bumped epoch so the producer
    /// that let it expire is fenced (as Kafka does).
    pub async fn abort_expired(self: &Rc<Self>) {
        let now = self.clock.now_ms();
        let expired: Vec<String> = self
            .txns
            .borrow()
            .iter()
            .filter(|(_, m)| {
                m.state == TxnState::Ongoing
                    && m.start_ms >= 0
                    && now.saturating_sub(m.start_ms) > m.timeout_ms as i64
            })
            .map(|(k, _)| k.clone())
            .collect();
        for tid in expired {
            let _lock = self.lock(&tid).await;
            let Some(m) = self.describe(&tid) else {
                continue;
            };
            if m.state != TxnState::Ongoing {
                continue;
            }
            tracing::info!(transactional_id = %tid, producer_id = m.producer_id, "aborting a transaction past its timeout");
            let mut next = m.clone();
            next.epoch = bump(m.epoch);
            next.state = TxnState::PrepareAbort;
            next.last_update_ms = now;
            // The producer that let it expire is fenced, a retry of its last EndTxn v5 too.
            next.previous = None;
            if self.transition(&tid, next).await.is_ok() {
                self.spawn_complete(tid.clone());
            }
        }
    }

    /// Replays partition `p` of `__transaction_state`, then finishes the transactions found
    /// prepared and starts serving its ids.
    pub async fn load_partition(
        self: &Rc<Self>,
        p: i32,
        log: Rc<PartitionLog>,
    ) -> Result<usize, StorageError> {
        let mut next = log.log_start_offset();
        let end = log.high_watermark();
        let mut found: BTreeMap<String, Option<TxnMeta>> = BTreeMap::new();
        while next < end {
            let r = log
                .read(ReadOptions {
                    start: next,
                    bytes_max: REPLAY_READ_BYTES_MAX,
                })
                .await?;
            let before = next;
            for b in &r.batches {
                let Ok(h) = batch::BatchHeader::parse(b) else {
                    continue;
                };
                let last = h.last_offset();
                if last < next {
                    continue;
                }
                if !h.is_control() {
                    match records::decode_batch(b) {
                        Ok(recs) => {
                            for rec in recs.into_iter().filter(|r| r.offset >= next.0) {
                                let Some(key) = rec.key.as_ref() else {
                                    continue;
                                };
                                let tid = match state::decode_key(key) {
                                    Ok(t) => t,
                                    Err(e) => {
                                        tracing::warn!(partition = p, offset = rec.offset, error = %e, "skipping {TXN_TOPIC} record");
                                        continue;
                                    }
                                };
                                match rec.value.as_ref().map(|v| state::decode_value(v)) {
                                    None => {
                                        found.insert(tid, None);
                                    }
                                    Some(Ok(m)) => {
                                        found.insert(tid, Some(m));
                                    }
                                    Some(Err(e)) => {
                                        tracing::warn!(partition = p, offset = rec.offset, error = %e, "skipping {TXN_TOPIC} record")
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(partition = p, error = %e, "skipping undecodable batch in {TXN_TOPIC}")
                        }
                    }
                }
                next = last.next();
            }
            if next == before {
                tracing::warn!(
                    partition = p,
                    offset = next.0,
                    "{TXN_TOPIC} replay stopped at undecodable data"
                );
                break;
            }
        }
        let mut prepared = vec![];
        {
            let mut txns = self.txns.borrow_mut();
            for (tid, m) in found.iter() {
                match m {
                    None => {
                        txns.remove(tid);
                    }
                    Some(m) => {
                        if m.state.completing() {
                            prepared.push(tid.clone());
                        }
                        txns.insert(tid.clone(), m.clone());
                    }
                }
            }
        }
        self.logs.borrow_mut().insert(p, log);
        self.loaded.notify(usize::MAX);
        for tid in prepared {
            tracing::info!(transactional_id = %tid, "completing a transaction prepared before the restart");
            self.spawn_complete(tid);
        }
        Ok(found.len())
    }

    /// The expiry loop.
    async fn run_timers(self: Rc<Self>) {
        loop {
            self.clock
                .sleep(Duration::from_millis(EXPIRY_CHECK_MS))
                .await;
            self.abort_expired().await;
            let now = self.clock.now_ms();
            if now >= self.next_id_expiry_ms.get() {
                let every = (self.id_expiration_ms / 10)
                    .clamp(ID_EXPIRY_CHECK_MIN_MS, ID_EXPIRY_CHECK_MAX_MS);
                self.next_id_expiry_ms.set(now.saturating_add(every));
                self.expire_ids().await;
            }
        }
    }
}

/// One id's transition lock (see [`TxnShard::lock`]).
struct IdLock<'a> {
    shard: &'a TxnShard,
    tid: String,
}

impl Drop for IdLock<'_> {
    fn drop(&mut self) {
        let was_held = self.shard.busy.borrow_mut().remove(&self.tid);
        debug_assert!(was_held, "an id lock is held by its guard");
        self.shard.freed.notify(usize::MAX);
    }
}

fn bump(epoch: i16) -> i16 {
    if epoch >= i16::MAX - 1 {
        epoch
    } else {
        epoch + 1
    }
}

async fn new_producer_id() -> Result<i64, ErrorCode> {
    crate::admin::next_producer_id()
        .await
        .map(|id| id as i64)
        .map_err(|e| {
            tracing::error!(error = %e, "cannot persist producer id block");
            code(ResponseError::KafkaStorageError)
        })
}

/// Appends a COMMIT or ABORT marker for `pid`/`epoch` to partition `p` of `topic` on its owner
/// shard, synced; for a `__consumer_offsets` partition the group coordinator there then
/// applies or drops the transaction's offsets. A topic or partition that no longer exists has
/// nothing to mark.
pub async fn write_marker(
    topic: &str,
    p: i32,
    pid: i64,
    epoch: i16,
    commit: bool,
) -> Result<(), String> {
    let broker = crate::shard::local().broker.clone();
    let image = broker.image();
    let Some(meta) = image.topic(topic) else {
        return Ok(());
    };
    if p < 0 || p >= meta.partition_count() {
        return Ok(());
    }
    let owner = broker
        .owner(meta, p)
        .ok_or_else(|| format!("{topic}-{p} has no owner shard here"))?;
    let tp = TopicPartition::new(topic, p);
    let key = (meta.id, p);
    crate::shard::invoke_on(owner, move || async move {
        let shard = crate::shard::local();
        let Some(log) = shard.partition(&tp) else {
            return Err(format!("{tp} is not open"));
        };
        let now = shard.clock.now_ms();
        // The transaction ends here: its producer must be verified again for the next one.
        verified::forget(&key, pid);
        let marker = crate::storage::marker_batch(pid, epoch, commit, now);
        match log
            .append(BytesMut::from(&marker[..]), Durability::Synced)
            .await
        {
            Ok(_) => {}
            // The producer moved past this epoch here already (a marker written before a
            // restart and written again): nothing is left to mark.
            Err(StorageError::InvalidProducerEpoch) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
        if tp.topic.as_str() == crate::group::OFFSETS_TOPIC {
            if let Some(gs) = crate::group::local() {
                gs.complete_txn(tp.partition, pid, commit).await;
            }
        }
        Ok(())
    })
    .await
}

/// Runs `f` with the coordinator of `tid` on the shard that owns its `__transaction_state`
/// partition. COORDINATOR_NOT_AVAILABLE when there is none (a cluster, or still starting),
/// COORDINATOR_LOAD_IN_PROGRESS while the partition replays.
pub async fn on_coordinator<F, Fut, R>(tid: &str, f: F) -> Result<R, ErrorCode>
where
    F: FnOnce(Rc<TxnShard>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = R> + 'static,
    R: Send + 'static,
{
    let broker = crate::shard::local().broker.clone();
    let not_available = code(ResponseError::CoordinatorNotAvailable);
    if broker.config.cluster.is_some() {
        return Err(not_available);
    }
    let image = broker.image();
    let meta = image.topic(TXN_TOPIC).ok_or(not_available)?;
    let p = crate::group::partition_for(tid, meta.partition_count());
    let owner = broker.owner(meta, p).ok_or(not_available)?;
    let tid = tid.to_string();
    crate::shard::invoke_on(owner, move || async move {
        let ts = local().ok_or(not_available)?;
        ts.loaded(&tid, LOAD_WAIT_MAX).await?;
        Ok(f(ts).await)
    })
    .await
}

/// Every shard's ids (ListTransactions, DescribeTransactions of unknown ids).
pub async fn list_all() -> Vec<Described> {
    let mut all: Vec<Described> =
        crate::shard::invoke_on_all(|| async { local().map(|ts| ts.list()).unwrap_or_default() })
            .await
            .into_iter()
            .flatten()
            .collect();
    all.sort_by(|a, b| a.transactional_id.cmp(&b.transactional_id));
    all
}

/// Whether transactions are served here: a single node.
pub fn enabled() -> bool {
    crate::shard::local().broker.config.cluster.is_none()
}

/// Starts the transaction coordinator of the calling shard on a single node: installs it,
/// creates `__transaction_state` if missing (shard 0), replays the partitions this shard owns
/// and runs the timeout check.
pub fn start_shard_tasks() {
    let shard = crate::shard::local();
    if shard.broker.config.cluster.is_some() {
        return;
    }
    let ts = TxnShard::new(
        shard.clock.clone(),
        shard.broker.config.transactional_id_expiration_ms,
    );
    LOCAL.with(|l| *l.borrow_mut() = Some(ts.clone()));
    crate::contain::spawn_background("transaction coordinator", async move {
        if let Err(e) = load_here(&ts).await {
            tracing::error!(error = %e, "transaction coordinator failed to load");
            return;
        }
        loop {
            match crate::contain::contain(ts.clone().run_timers()).await {
                Ok(()) => return,
                Err(mut p) => {
                    p.mark_reported();
                    tracing::error!("transaction timers {p}; restarting them");
                    ts.clock.sleep(Duration::from_millis(1_000)).await;
                }
            }
        }
    });
}

async fn load_here(ts: &Rc<TxnShard>) -> Result<(), String> {
    let (meta, owned) = crate::admin::internal_topic_here(TXN_TOPIC, TXN_PARTITIONS, 1).await?;
    ts.partitions.set(meta.partition_count());
    for (p, log) in owned {
        ts.load_partition(p, log)
            .await
            .map_err(|e| format!("cannot replay {TXN_TOPIC}-{p}: {e}"))?;
    }
    Ok(())
}
