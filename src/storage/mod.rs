//! The partition log. Owns the segments, indexes, appender and producer state of one partition
//! and its entry in the shard's batch cache. Lives on the partition's shard (`Rc`/`RefCell`, no
//! locks; used from tasks of one glommio executor). Knows batches and offsets, never Kafka
//! requests or sockets.
//!
//! | module | owns |
//! | --- | --- |
//! | `mod.rs` (here) | `PartitionLog` and its `State`: segments, config, producer state, waiters; close; `AppendSignal` (a fetch's wake-up) |
//! | `offsets` | `Offsets`: log start, synced, high watermark, log end, and every move of them |
//! | `append` | the append path: validation, admission, offset assignment, the durability wait |
//! | `appender` | `Appender`: pending aligned chunks, written/synced positions, the flusher task, index appends on the blocking pool |
//! | `cycle` | the shard's commit cycle: acks=all flushes of all its partitions start together |
//! | `read` | the read path: cache, cold reads, `ReadAheads`, timestamp lookups |
//! | `truncate` | cutting the tail of the log (a follower's conflict truncation), crash-safe |
//! | [`epochs`] | the leader-epoch cache: epoch -> start offset, `end_offset_for` |
//! | `roll` | sealing the active segment and starting the next |
//! | `retention` | moving the log start: retention and DeleteRecords |
//! | `compact` | log compaction: the cleaner pass, its bounded key map, the crash-safe swap |
//! | `recovery` | `open`: loading segments, validating the tail, rebuilding what is missing |
//! | `segment` | one segment: its file, sparse offset/time index, and the validating scanner |
//! | [`cache`] | the per-shard cache of recent batches (`Rc`-shared by the shard's logs) |
//! | `producer_state` | idempotent producer sequences and epochs (KIP-98) |
//! | `meta` | small checksummed files: index files, checkpoints, snapshot, clean marker |
//! | [`io`] | the I/O seam: glommio DMA files, and a fault-injecting wrapper for tests |
//! | `sim` (tests) | a seeded simulation of one log under faults and crashes (`SLUICE_SIM_SEED` replays) |
//!
//! Offsets, in order: `log_start <= synced <= hw <= log_end` (see `offsets`). The state of
//! each concern lives in a struct of the module that owns it, with private fields changed
//! through methods that keep its invariants; `State::check_invariants` ties them together and
//! runs after every transition (accepted append, completed write or sync, failed write, roll,
//! retention, DeleteRecords, the end of recovery, close). See docs/storage.md for the file
//! formats and the append/flush/recovery design.

mod append;
mod appender;
pub mod cache;
mod compact;
mod cycle;
pub mod epochs;
pub mod io;
mod meta;
mod offsets;
mod producer_state;
mod read;
mod recovery;
mod retention;
mod roll;
mod segment;
pub(crate) mod shard_sync;
mod shutdown;
#[cfg(test)]
mod sim;
#[cfg(test)]
pub(crate) mod tests;
mod truncate;
pub mod txn_index;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::task::{Poll, Waker};

use bytes::Bytes;

use crate::protocol::batch::BatchError;
use crate::types::{Clock, Offset};

pub use append::{
    control_batch, control_of, stamp_epoch, CONTROL_RAFT_CONF_CHANGE, CONTROL_RAFT_CONF_CHANGE_V2,
    CONTROL_RAFT_NOOP,
};
use appender::Appender;
pub use cache::{BatchCache, CacheStats};
pub use compact::{CleanReport, CompactionConfig, CLEANER_MAP_BYTES_MAX};
use epochs::LeaderEpochs;
use io::StorageIo;
pub use meta::{decode_producers, encode_producers};
use offsets::Offsets;
pub use producer_state::{BatchMeta, Check as ProducerCheck, ProducerState};
use read::ReadAheads;
pub use read::{READAHEAD_MIN_BYTES, READAHEAD_SHARD_BYTES, READAHEAD_SLOTS, READ_BYTES_MIN};
use segment::Segment;
pub use shutdown::{
    close_all, defer_marker_syncs, load_shutdown_records, sync_deferred_markers, ClosingFiles,
    SegmentSync, CLOSE_CONCURRENCY_MAX,
};

/// A one-shot wake-up shared by the logs of one shard: a long-polling fetch registers it with
/// each of its partitions on the shard ([`PartitionLog::signal_append`]) and waits on it once;
/// the first partition whose high watermark passes the registered offset fires it, and the
/// others drop their registration at their next change. Nothing is woken per append while the
/// fetch waits, and no task or waker is kept per partition. Shard-local (`Rc`).
#[derive(Default)]
pub struct AppendSignal {
    fired: std::cell::Cell<bool>,
    /// When it fired (the fetch's wake-up latency is measured from here).
    fired_at: std::cell::Cell<Option<std::time::Instant>>,
    waker: RefCell<Option<Waker>>,
}

impl AppendSignal {
    pub fn new() -> Rc<Self> {
        Rc::default()
    }
    /// Some registered partition moved past its offset (or closed).
    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }
    /// When some registered partition moved past its offset (or closed); `None` before.
    pub fn fired_at(&self) -> Option<std::time::Instant> {
        self.fired_at.get()
    }
    fn fire(&self) {
        if !self.fired.replace(true) {
            self.fired_at.set(Some(std::time::Instant::now()));
            if let Some(w) = self.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }
    /// Resolves once the signal has fired.
    pub async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.fired.get() {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}
use txn_index::TxnIndex;
pub use txn_index::{marker_batch, AbortedTxn};

/// When appends are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// fdatasync every group commit that carries a `Durability::Synced` append (default).
    Always,
    /// fdatasync at most every N ms; `Synced` appends still wait for the next sync.
    IntervalMs(u64),
}

/// What the caller of `append` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Only that the batch is in the log's memory and offsets are assigned (acks=0).
    Accepted,
    /// The write to the file has completed (acks=1).
    Written,
    /// The write is on stable storage: fdatasync done (acks=all).
    Synced,
}

/// Default `segment.bytes`: the broker's `--segment-bytes` unless set.
pub const SEGMENT_BYTES_DEFAULT: u64 = 1 << 30;
/// Default `segment.ms` (Kafka's: 7 days).
pub const SEGMENT_MS_DEFAULT: u64 = 7 * 24 * 3600 * 1000;
/// Default `retention.ms` (Kafka's: 7 days): the broker's `--retention-ms` unless set.
pub const RETENTION_MS_DEFAULT: u64 = 7 * 24 * 3600 * 1000;

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub segment_bytes: u64,
    pub segment_ms: Option<u64>,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub index_interval_bytes: u32,
    pub flush: FlushPolicy,
    /// `cleanup.policy` includes `compact`: the cleaner's settings (see `compact`).
    pub compaction: Option<CompactionConfig>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            segment_ms: Some(SEGMENT_MS_DEFAULT),
            retention_ms: Some(RETENTION_MS_DEFAULT),
            retention_bytes: None,
            index_interval_bytes: 4096,
            flush: FlushPolicy::Always,
            compaction: None,
        }
    }
}

#[derive(Debug)]
pub enum StorageError {
    /// I/O failure or full disk: KAFKA_STORAGE_ERROR. The partition stays readable.
    Io(std::io::Error),
    /// Read or truncation outside [log start, log end]: OFFSET_OUT_OF_RANGE.
    OffsetOutOfRange {
        requested: Offset,
        log_start: Offset,
        log_end: Offset,
    },
    /// The records did not parse or failed the CRC: CORRUPT_MESSAGE.
    Corrupt(BatchError),
    /// Idempotent producer sequence gap: OUT_OF_ORDER_SEQUENCE_NUMBER.
    OutOfOrderSequence,
    /// Idempotent producer with an older epoch than we know: INVALID_PRODUCER_EPOCH.
    InvalidProducerEpoch,
    /// A replicated batch does not continue the log (its base offset is not the log end), or a
    /// truncation point is not a batch boundary: the replicas disagree on offsets.
    OffsetMismatch { expected: Offset, found: Offset },
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageError::Io(e) => write!(f, "storage I/O error: {e}"),
            StorageError::OffsetOutOfRange {
                requested,
                log_start,
                log_end,
            } => {
                write!(f, "offset {requested} outside [{log_start}, {log_end}]")
            }
            StorageError::Corrupt(e) => write!(f, "{e}"),
            StorageError::OutOfOrderSequence => write!(f, "out of order sequence number"),
            StorageError::InvalidProducerEpoch => write!(f, "invalid producer epoch"),
            StorageError::OffsetMismatch { expected, found } => {
                write!(
                    f,
                    "offset mismatch: expected a batch at {expected}, found {found}"
                )
            }
        }
    }
}
impl std::error::Error for StorageError {}
impl From<std::io::Error> for StorageError {
    fn from(e: std::io::Error) -> Self {
        StorageError::Io(e)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AppendResult {
    pub base_offset: Offset,
    pub last_offset: Offset,
    pub log_start_offset: Offset,
    /// The batch was a retry of one already in the log (idempotent producer); offsets are the
    /// original ones and nothing was written.
    pub duplicate: bool,
}

/// What the last open found in the active segment when there was no clean-shutdown marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segment: Offset,
    /// File position the validating scan started at (its last usable index entry, or 0).
    pub scan_from: u64,
    /// Batches validated by the scan.
    pub batches: u64,
    /// Position after the last valid batch, and the file size found.
    pub valid_bytes: u64,
    pub file_bytes: u64,
    /// Bytes after the last valid batch were cut off: torn or invalid data, or written data
    /// behind a hole of zeros (not pre-allocated zeros alone).
    pub truncated: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    pub start: Offset,
    /// Stop adding batches once this many bytes are gathered; at least one whole batch is
    /// returned even when it is larger (Kafka's rule).
    pub bytes_max: u32,
}

#[derive(Debug, Clone, Default)]
pub struct ReadResult {
    /// Whole batches, in offset order; the first one may start before `start` (it contains it).
    pub batches: Vec<Bytes>,
    pub high_watermark: Offset,
    pub log_start_offset: Offset,
}

impl ReadResult {
    pub fn bytes(&self) -> usize {
        self.batches.iter().map(|b| b.len()).sum()
    }
}

/// The mutable state of one log, on one executor. Each concern's part is a struct owned by its
/// module ([`Offsets`], [`Appender`], [`ReadAheads`]) whose fields only that module touches; the
/// fields here belong to the log as a whole.
pub(crate) struct State {
    config: LogConfig,
    /// Sorted by base offset and contiguous; the last one is the active segment (appends go
    /// there). Every sealed segment is synced.
    segments: Vec<Segment>,
    offsets: Offsets,
    appender: Appender,
    producers: ProducerState,
    /// Open transactions and the aborted-transaction index (see [`txn_index`]).
    txns: TxnIndex,
    /// Leader epoch -> first offset (see [`epochs`]).
    epochs: LeaderEpochs,
    reads: ReadAheads,
    /// The log cleaner's position (compacted logs).
    cleaner: compact::CleanerState,
    /// A roll (or close) is in progress: appends wait.
    rolling: bool,
    closed: bool,
    waiters: Vec<Waker>,
    /// Long-polling fetches waiting for the high watermark to pass an offset (see
    /// [`AppendSignal`]): fired once, when it does or the log closes.
    signals: Vec<(std::rc::Weak<AppendSignal>, Offset)>,
    /// Appends waiting for admission, oldest first. Appends are admitted in the order they
    /// arrived: a small batch never overtakes a larger one waiting for room, so the pipelined
    /// produce requests of one connection land in the log in request order, as in Kafka.
    admission: AdmissionQueue,
}

/// The appends of a partition waiting in [`PartitionLog::append`] for their turn.
#[derive(Default)]
pub(crate) struct AdmissionQueue {
    next_id: u64,
    waiting: std::collections::VecDeque<u64>,
}

impl State {
    pub fn active(&self) -> &Segment {
        self.segments
            .last()
            .expect("a log always has an active segment")
    }
    pub fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .last_mut()
            .expect("a log always has an active segment")
    }
    pub fn wake_all(&mut self) {
        for w in self.waiters.drain(..) {
            w.wake();
        }
        self.appender.wake_flusher();
        if !self.signals.is_empty() {
            let (hw, closed) = (self.offsets.hw(), self.closed);
            self.signals
                .retain(|(signal, after)| match signal.upgrade() {
                    Some(signal) if hw > *after || closed => {
                        signal.fire();
                        false
                    }
                    Some(signal) => !signal.fired.get(),
                    None => false,
                });
        }
    }
    fn out_of_range(&self, requested: Offset) -> StorageError {
        StorageError::OffsetOutOfRange {
            requested,
            log_start: self.offsets.log_start(),
            log_end: self.offsets.log_end(),
        }
    }
    fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.size()).sum()
    }

    /// The invariants that tie the parts together, O(1): the offsets in order; the active
    /// segment ends at the log end and starts at or below the synced offset (sealed segments
    /// are synced); the first segment holds the log start; the appender's positions fit the
    /// active segment. Cold paths call this; hot paths call [`State::debug_check_invariants`].
    pub fn check_invariants(&self) {
        self.offsets.check();
        let (first, active) = (&self.segments[0], self.active());
        assert!(
            active.next() == self.offsets.log_end()
                && active.base() <= self.offsets.synced()
                && first.base() <= self.offsets.log_start(),
            "segments [{}, {}) active from {} disagree with {:?}",
            first.base(),
            active.next(),
            active.base(),
            self.offsets
        );
        self.appender.check(active.size());
    }

    /// [`State::check_invariants`] in debug builds.
    pub fn debug_check_invariants(&self) {
        if cfg!(debug_assertions) {
            self.check_invariants();
        }
    }

    /// Nothing pending or in flight in the appender, and no index append in flight (a dead
    /// flusher writes nothing more, but an index append already on the blocking pool still
    /// comes back).
    pub fn is_drained(&self) -> bool {
        self.appender.is_drained() && !self.active().index_append_in_flight()
    }

    /// O(segments), for cold paths: each sealed segment ends where the next one starts, and
    /// none has an index append in flight (only the active segment appends to its files).
    pub fn check_segments(&self) {
        for w in self.segments.windows(2) {
            assert!(
                !w[0].index_append_in_flight(),
                "sealed segment {} has an index append in flight",
                w[0].base()
            );
            assert!(
                w[0].base() <= w[0].next() && w[0].next() == w[1].base(),
                "segments not contiguous: [{}, {}) then {}",
                w[0].base(),
                w[0].next(),
                w[1].base()
            );
        }
    }
}

impl Drop for PartitionLog {
    fn drop(&mut self) {
        // The shard's cache outlives its logs: release this log's share of the budget.
        self.cache.drop_log(self.cache_id);
    }
}

pub struct PartitionLog {
    dir: PathBuf,
    io: Rc<dyn StorageIo>,
    /// Segment ages and the flusher's timer read it (tests pass a fake one).
    clock: Clock,
    cache: Rc<BatchCache>,
    cache_id: u64,
    recovery: Option<RecoveryReport>,
    state: RefCell<State>,
    /// One move of the log start at a time (its checkpoint is written off the executor).
    log_start_turn: glommio::sync::Semaphore,
    /// Tests: index appends wait in the blocking pool until this gate opens.
    #[cfg(test)]
    index_gate: RefCell<Option<std::sync::Arc<appender::IndexGate>>>,
}

/// A log's turn at work that holds appends, rolls and truncations back (`State::rolling`),
/// from [`PartitionLog::take_turn`] until dropped. Dropping gives it back and wakes the waiters,
/// also when the future holding it is dropped at an await, so a cancelled roll, truncation or
/// epoch checkpoint never leaves the log held forever.
pub(crate) struct Turn<'a>(&'a PartitionLog);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state.borrow_mut();
        s.rolling = false;
        s.wake_all();
    }
}

impl PartitionLog {
    /// Takes the log's turn (see [`Turn`]); the caller waited until no one held it, with no
    /// await since.
    pub(crate) fn take_turn(&self) -> Turn<'_> {
        let mut s = self.state.borrow_mut();
        debug_assert!(!s.rolling, "the log's turn is taken twice");
        s.rolling = true;
        Turn(self)
    }

    /// Opens (recovering if needed) or creates the log in `dir` with direct I/O.
    pub async fn open(
        dir: &Path,
        config: LogConfig,
        cache: Rc<BatchCache>,
    ) -> Result<Rc<Self>, StorageError> {
        Self::open_with_io(dir, config, cache, io::DmaIo::shared(), Clock::system()).await
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Cold reads that found their bytes already read ahead.
    pub fn readahead_used(&self) -> u64 {
        self.state.borrow().reads.used()
    }

    /// What crash recovery did when this log was opened; `None` after a clean shutdown.
    pub fn recovery_report(&self) -> Option<RecoveryReport> {
        self.recovery
    }

    pub fn set_config(&self, config: LogConfig) {
        let mut s = self.state.borrow_mut();
        s.config = config;
        s.wake_all();
    }

    /// KIP-98 check of one produced batch against this log's producer state, as it would be
    /// after `staged` (batches a replicated partition's leader proposed and has not appended
    /// yet, in proposal order). The leader of a replicated partition checks here before it
    /// proposes; a single node checks inside its append.
    pub fn check_producer(
        &self,
        h: &crate::protocol::batch::BatchHeader<'_>,
        staged: &[(i64, i16, BatchMeta)],
    ) -> Result<ProducerCheck, StorageError> {
        self.state.borrow().producers.check(h, staged)
    }

    /// The producer state a replica holding only the batches below `offset` starts from
    /// ([`ProducerState::as_of`]): what a replicated partition's snapshot carries.
    pub fn producers_as_of(&self, offset: Offset) -> ProducerState {
        self.state.borrow().producers.as_of(offset)
    }

    /// Replaces the producer state with `producers`, which describes the batches below the
    /// log end (a replicated partition restarted empty from the leader's snapshot), in memory
    /// and in the producer snapshot file (durably, covering the offsets below the log end).
    pub async fn install_producers(&self, producers: ProducerState) -> Result<(), StorageError> {
        while self.state.borrow().rolling {
            self.wait_until(|s| !s.rolling).await;
        }
        let turn = self.take_turn();
        self.drain().await;
        self.no_snapshot_in_flight().await;
        let (writes, remove) = {
            let mut guard = self.state.borrow_mut();
            let s = &mut *guard;
            s.producers = producers;
            let end = s.offsets.log_end();
            snapshot_files(&self.dir, end, s)
        };
        // Off the executor; appends wait (`rolling`) until the snapshot is durable.
        let r = glommio::executor()
            .spawn_blocking(move || write_snapshot_files(&writes, &remove))
            .await;
        drop(turn);
        Ok(r?)
    }

    pub fn log_start_offset(&self) -> Offset {
        self.state.borrow().offsets.log_start()
    }
    pub fn log_end_offset(&self) -> Offset {
        self.state.borrow().offsets.log_end()
    }
    pub fn high_watermark(&self) -> Offset {
        self.state.borrow().offsets.hw()
    }
    /// The last stable offset: the first offset of the oldest transaction still open here, or
    /// the high watermark. read_committed consumers read below it.
    pub fn last_stable_offset(&self) -> Offset {
        let s = self.state.borrow();
        let hw = s.offsets.hw();
        s.txns.first_unstable().map_or(hw, |f| f.min(hw))
    }
    /// Aborted transactions overlapping `[from, to)`, for a read_committed fetch.
    pub fn aborted_between(&self, from: Offset, to: Offset) -> Vec<AbortedTxn> {
        self.state.borrow().txns.aborted_between(from, to)
    }
    /// `(producer id, first offset)` of every transaction open in this partition.
    pub fn open_transactions(&self) -> Vec<(i64, Offset)> {
        self.state.borrow().txns.ongoing().collect()
    }
    /// OffsetsForLeaderEpoch: the largest epoch at or below `epoch` and its end offset (see
    /// [`LeaderEpochs::end_offset_for`]).
    pub fn end_offset_for_epoch(&self, epoch: i32) -> (i32, Offset) {
        let s = self.state.borrow();
        s.epochs.end_offset_for(epoch, s.offsets.log_end())
    }
    /// (epoch, start offset) of every leader epoch in the log, oldest first.
    pub fn leader_epochs(&self) -> Vec<(i32, Offset)> {
        self.state.borrow().epochs.entries().to_vec()
    }
    /// The offset up to which an fdatasync has completed.
    pub fn synced_offset(&self) -> Offset {
        self.state.borrow().offsets.synced()
    }
    /// Number of segments, the active one included.
    pub fn segment_count(&self) -> usize {
        self.state.borrow().segments.len()
    }
    /// Bytes in all segments.
    pub fn size_bytes(&self) -> u64 {
        self.state.borrow().total_bytes()
    }
    pub fn cache(&self) -> &Rc<BatchCache> {
        &self.cache
    }

    /// Resolves once the high watermark moves past `after` (or immediately if it already has).
    pub async fn wait_for_append(&self, after: Offset) {
        self.wait_until(|s| s.offsets.hw() > after || s.closed)
            .await
    }

    /// Fires `signal` once the high watermark moves past `after` (at once if it already has, or
    /// the log is closed). The registration holds the signal weakly: dropping the signal (the
    /// fetch stopped waiting) cancels it.
    pub fn signal_append(&self, after: Offset, signal: &Rc<AppendSignal>) {
        let mut s = self.state.borrow_mut();
        if s.offsets.hw() > after || s.closed {
            signal.fire();
            return;
        }
        // Registrations of signals that fired elsewhere or were dropped go first, so a
        // partition that never advances does not collect them.
        s.signals
            .retain(|(sig, _)| sig.upgrade().is_some_and(|sig| !sig.fired.get()));
        s.signals.push((Rc::downgrade(signal), after));
    }

    /// Resolves once `cond` holds (re-checked on every state change).
    pub(crate) async fn wait_until(&self, cond: impl Fn(&State) -> bool) {
        std::future::poll_fn(|cx| {
            let mut s = self.state.borrow_mut();
            if cond(&s) {
                Poll::Ready(())
            } else {
                s.waiters.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Waits until nothing is pending or in flight in the appender, index appends included.
    async fn drain(&self) {
        self.wait_until(|s| s.is_drained()).await
    }

    /// Resolves once no index append of the active segment is in flight: the durable counts
    /// then tell what the index files hold. Durable entries fewer than
    /// [`segment::INDEX_APPEND_BATCH`] may still wait for the next one.
    pub async fn index_persisted(&self) {
        self.wait_until(|s| !s.active().index_append_in_flight())
            .await
    }

    /// Flushes, syncs and writes the clean-shutdown marker. Appends after this fail.
    pub async fn close(&self) -> Result<(), StorageError> {
        match self.close_deferred(SegmentSync::Now).await? {
            Some(files) => Ok(files.write_durably()?),
            None => Ok(()),
        }
    }

    /// [`PartitionLog::close`] up to the small files: drains the log (syncing its active
    /// segment as `sync` says), then hands back what is left to write — the active segment's
    /// index files, the producer snapshot and the clean-shutdown marker. `None`: already closed.
    /// A shard closing all its logs uses [`close_all`] instead, which writes no per-log file.
    pub async fn close_deferred(
        &self,
        sync: SegmentSync,
    ) -> Result<Option<ClosingFiles>, StorageError> {
        if !self.shut(sync).await? {
            return Ok(None);
        }
        let mut guard = self.state.borrow_mut();
        let s = &mut *guard;
        let (log_end, written) = seal_drained(s);
        let mut data = s.active_mut().index_file_bodies(&self.dir);
        let (snapshots, remove) = snapshot_files(&self.dir, log_end, s);
        data.extend(snapshots);
        let remove: Vec<PathBuf> = remove.into_iter().collect();
        let clean = (
            self.dir.join(meta::CLEAN_FILE),
            meta::with_crc(&meta::encode_clean(log_end, written)),
        );
        self.cache.drop_log(self.cache_id);
        Ok(Some(ClosingFiles {
            dir: self.dir.clone(),
            data,
            remove,
            clean,
        }))
    }

    /// [`PartitionLog::close`] for a shard's clean-shutdown record ([`close_all`]): drains the
    /// log, fdatasyncs its active segment if it holds unsynced bytes, and returns its entry for
    /// the record instead of writing any file. `None`: already closed, or its index files
    /// cannot be vouched for (the next start recovers it by a scan).
    pub(crate) async fn close_for_record(
        &self,
    ) -> Result<Option<shutdown::RecordEntry>, StorageError> {
        if !self.shut(SegmentSync::IfUnsynced).await? {
            return Ok(None);
        }
        let mut guard = self.state.borrow_mut();
        let s = &mut *guard;
        let (log_end, written) = seal_drained(s);
        let a = s.active_mut();
        let active_base = a.base();
        let index = a.index_tail();
        self.cache.drop_log(self.cache_id);
        let Some(index) = index else {
            return Ok(None);
        };
        Ok(Some(shutdown::RecordEntry {
            dir: self.dir.clone(),
            state: shutdown::CleanState {
                active_base,
                log_end,
                written,
                index,
                producers: std::mem::take(&mut s.producers),
                txns: std::mem::take(&mut s.txns),
            },
        }))
    }

    /// Drains the log and closes it to appends, syncing its active segment as `sync` says.
    /// `false`: it was already closed.
    async fn shut(&self, sync: SegmentSync) -> Result<bool, StorageError> {
        if self.state.borrow().closed {
            return Ok(false);
        }
        loop {
            let rolling = self.state.borrow().rolling;
            if !rolling {
                break;
            }
            self.wait_until(|s| !s.rolling).await;
        }
        self.state.borrow_mut().rolling = true; // holds new appends back
        self.drain().await;
        self.no_snapshot_in_flight().await;
        if self.state.borrow().appender.is_dead() {
            // Offsets, index entries and producer state cover batches that were never written:
            // write no clean-shutdown marker, so the next start recovers from the files.
            let mut s = self.state.borrow_mut();
            s.rolling = false;
            s.closed = true;
            s.wake_all();
            return Err(s.appender.error());
        }
        let file = self.state.borrow().active().file().clone();
        let punch = self.state.borrow_mut().appender.take_punch();
        let unsynced = {
            let s = self.state.borrow();
            s.offsets.synced() < s.offsets.log_end()
        };
        let punched = punch.is_some();
        let r = async {
            if let Some((pos, len)) = punch {
                file.punch(pos, len).await?;
            }
            match sync {
                SegmentSync::IfUnsynced if !unsynced && !punched => Ok(()),
                _ => file.sync().await,
            }
        }
        .await;
        let mut s = self.state.borrow_mut();
        s.rolling = false;
        s.closed = true;
        s.wake_all();
        r?;
        Ok(true)
    }

    /// Closes the log and removes its directory.
    pub async fn remove(&self) -> Result<(), StorageError> {
        {
            let mut s = self.state.borrow_mut();
            s.closed = true;
            s.wake_all();
        }
        // A cleaner swap or a log-start move finishes its file work first (it holds the turn),
        // so no file appears in the directory while it is being removed.
        let _turn = self.log_start_turn.acquire_permit(1).await;
        // An index append in flight would create or write files in the directory being
        // removed; none starts once the log is closed.
        self.index_persisted().await;
        self.cache.drop_log(self.cache_id);
        // A record's entry read at start no longer describes anything.
        let _ = shutdown::take_record(&self.dir);
        let dir = self.dir.clone();
        // Off the executor: a directory of many segments takes many unlinks.
        let removed = glommio::executor()
            .spawn_blocking(move || std::fs::remove_dir_all(dir))
            .await;
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

/// The common end of closing a drained log: checks that every batch below the log end is
/// written, marks it synced, and closes the active segment's time index with its last entry.
/// Returns the log end and the bytes written to the active segment — what a clean-shutdown
/// marker or record vouches for (a clean open trusts them and reads nothing back), so this
/// check runs before either is made.
fn seal_drained(s: &mut State) -> (Offset, u64) {
    let (hw, log_end, written) = (
        s.offsets.hw(),
        s.offsets.log_end(),
        s.appender.written_pos(),
    );
    assert_eq!(hw, log_end, "a drained log is written");
    s.offsets.synced_to(hw);
    s.check_invariants();
    s.active_mut().push_time_entry();
    (log_end, written)
}

/// The producer snapshot and the transactions snapshot covering the batches below `upto`
/// (recovery replays the ones after it into both): the files to write (path, contents with
/// their CRC) and one to remove. Without transactions (most partitions) there is no
/// transactions file: a missing one reads as empty, and a roll or close costs no extra fsync.
pub(crate) fn snapshot_files(
    dir: &Path,
    upto: Offset,
    s: &State,
) -> (Vec<(PathBuf, Vec<u8>)>, Option<PathBuf>) {
    let mut writes = vec![(
        dir.join(meta::PRODUCER_FILE),
        meta::with_crc(&meta::encode_producers(upto, &s.producers)),
    )];
    let txn_path = dir.join(txn_index::TXN_FILE);
    if s.txns.is_empty() {
        (writes, Some(txn_path))
    } else {
        writes.push((txn_path, meta::with_crc(&s.txns.encode(upto))));
        (writes, None)
    }
}

/// Writes what [`snapshot_files`] gave, each file atomically and durably.
pub(crate) fn write_snapshot_files(
    writes: &[(PathBuf, Vec<u8>)],
    remove: &Option<PathBuf>,
) -> std::io::Result<()> {
    for (path, bytes) in writes {
        meta::write_atomic(path, bytes)?;
    }
    match remove {
        Some(path) => meta::remove_if_exists(path),
        None => Ok(()),
    }
}
