//! The partition log. Owns the segments, indexes, appender and producer state of one partition
//! and its entry in the shard's batch cache. Lives on the partition's shard (`Rc`/`RefCell`, no
//! locks; used from tasks of one glommio executor). Knows batches and offsets, never Kafka
//! requests or sockets.
//!
//! | module | owns |
//! | --- | --- |
//! | [`io`] | the I/O seam: glommio DMA files, and a fault-injecting wrapper for tests |
//! | [`segment`] | one segment: its file, sparse offset/time index, and the validating scanner |
//! | [`appender`] | pending aligned chunks and the per-partition flusher task (group commit) |
//! | [`cache`] | the per-shard cache of recent batches (`Rc`-shared by the shard's logs) |
//! | [`producer_state`] | idempotent producer sequences and epochs (KIP-98) |
//! | [`meta`] | small checksummed files: index files, checkpoints, snapshot, clean marker |
//! | [`recovery`] | `open`: loading segments, validating the tail, rebuilding what is missing |
//!
//! Offsets, in order: `log_start <= synced <= hw <= log_end`. `log_end` is the next offset to
//! assign; `hw` (high watermark) is the offset up to which batches are written to the file (one
//! node: that is what readers see); `synced` is the offset up to which an fdatasync completed.
//! See docs/storage.md for the file formats and the append/flush/recovery design.

pub mod appender;
pub mod cache;
pub mod io;
pub mod meta;
pub mod producer_state;
pub mod recovery;
pub mod segment;
#[cfg(test)]
pub(crate) mod tests;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::protocol::batch::{self, BatchError, BatchHeader};
use crate::types::Offset;

use appender::{Pending, PENDING_BYTES_MAX};
pub use cache::{BatchCache, CacheStats};
use io::{align_down, align_up, StorageIo};
use producer_state::{BatchMeta, Check, ProducerState};
use segment::Segment;

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

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub segment_bytes: u64,
    pub segment_ms: Option<u64>,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub index_interval_bytes: u32,
    pub flush: FlushPolicy,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 1 << 30,
            segment_ms: Some(7 * 24 * 3600 * 1000),
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: None,
            index_interval_bytes: 4096,
            flush: FlushPolicy::Always,
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
    /// Bytes after the last valid batch were cut off (torn or invalid data, not zeros).
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

/// Bytes read from disk at least per cold read (one aligned request).
pub const READ_BYTES_MIN: usize = 64 << 10;
/// Cold reads asking for at least this much are treated as a sequential reader catching up: the
/// bytes after what they return are read ahead, for the next read.
pub const READAHEAD_MIN_BYTES: usize = 256 << 10;
/// Read-aheads kept per log (one per reader position), and bytes per shard in them.
pub const READAHEAD_SLOTS: usize = 4;
pub const READAHEAD_SHARD_BYTES: usize = 64 << 20;

thread_local! {
    /// Bytes held by the read-aheads of this shard's logs.
    static READAHEAD_BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A read started for the next read of a sequential reader: the bytes of segment `seg_base`
/// from `apos`, for a read that starts at offset `next` (its batch at file position `next_pos`).
pub(crate) struct ReadAhead {
    seg_base: Offset,
    next: Offset,
    next_pos: u64,
    apos: u64,
    len: usize,
    /// The data limit when it was issued: bytes past it are not data.
    limit: u64,
    /// Contained: a panic of the read is re-raised in the reader that takes it.
    task: Option<glommio::Task<Result<std::io::Result<io::ReadBuf>, crate::contain::Panic>>>,
}

impl ReadAhead {
    async fn take(&mut self) -> std::io::Result<io::ReadBuf> {
        let task = self.task.take().expect("a read-ahead is taken once");
        READAHEAD_BYTES.with(|b| b.set(b.get() - self.len));
        match task.await {
            Ok(r) => r,
            Err(p) => p.resume(),
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            READAHEAD_BYTES.with(|b| b.set(b.get() - self.len));
            // Let the read finish on its own (its buffer belongs to the ring until then).
            task.detach();
        }
    }
}

/// The mutable state of one log. Every field is changed only by the log's own methods and its
/// flusher task, all on one executor.
pub(crate) struct State {
    pub config: LogConfig,
    /// Sorted by base offset; the last one is the active segment (appends go there).
    pub segments: Vec<Segment>,
    pub log_start: Offset,
    pub log_end: Offset,
    pub hw: Offset,
    pub synced: Offset,
    /// The largest end offset some `Durability::Synced` append waits for.
    pub sync_wanted: Offset,
    pub pending: Pending,
    /// Bytes of the active segment that are written to its file.
    pub written_pos: u64,
    /// Bytes of the active segment covered by a completed fdatasync.
    pub synced_pos: u64,
    /// The written bytes of the partial last page (`[align_down(written_pos), written_pos)`).
    pub written_tail: Vec<u8>,
    /// File size reserved (pre-allocated) for the active segment.
    pub allocated: u64,
    /// Furthest (aligned) position any write of the active segment may have reached.
    pub attempted_pos: u64,
    /// A range past the written data that a failed write may have touched: punched out before
    /// the next write.
    pub punch: Option<(u64, u64)>,
    pub flushing: bool,
    /// The flusher task panicked: nothing pending will be written any more, so every append
    /// (and roll) fails from now on instead of waiting forever.
    pub flusher_dead: bool,
    pub rolling: bool,
    pub closed: bool,
    /// Incremented by every failed write; `gen_end[g]` is `hw` when generation `g` failed:
    /// appends of generation `g` at or past it failed (their offsets were given out again).
    pub gen: usize,
    pub gen_end: Vec<Offset>,
    pub last_error: Option<(Option<i32>, std::io::ErrorKind, String)>,
    pub sync_failures: u64,
    pub last_sync: Instant,
    pub waiters: Vec<Waker>,
    pub flusher: Option<Waker>,
    pub producers: ProducerState,
    /// Reads started ahead of sequential readers (oldest first), and how many were used.
    pub readahead: Vec<ReadAhead>,
    pub readahead_used: u64,
    /// A producer snapshot is being written in the background.
    pub snapshotting: bool,
    /// Active-segment position covered by the last producer snapshot, and how many synced bytes
    /// may follow it before the next one (bounds the crash-recovery scan).
    pub snapshot_pos: u64,
    pub snapshot_every: u64,
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
        if let Some(w) = self.flusher.take() {
            w.wake();
        }
    }
    pub fn set_error(&mut self, e: &std::io::Error) {
        self.last_error = Some((e.raw_os_error(), e.kind(), e.to_string()));
    }
    pub fn error(&self) -> StorageError {
        let e = match &self.last_error {
            Some((Some(code), _, _)) => std::io::Error::from_raw_os_error(*code),
            Some((None, kind, msg)) => std::io::Error::new(*kind, msg.clone()),
            None => std::io::Error::other("write failed"),
        };
        StorageError::Io(e)
    }
    fn out_of_range(&self, requested: Offset) -> StorageError {
        StorageError::OffsetOutOfRange {
            requested,
            log_start: self.log_start,
            log_end: self.log_end,
        }
    }
    fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.size).sum()
    }
}

impl Drop for PartitionLog {
    fn drop(&mut self) {
        // The shard's cache outlives its logs: release this log's share of the budget.
        self.cache.drop_log(self.cache_id);
    }
}

/// Outcome of the synchronous part of an append.
enum Assigned {
    Duplicate(AppendResult),
    New {
        result: AppendResult,
        gen: usize,
        sync_failures: u64,
    },
}

pub struct PartitionLog {
    dir: PathBuf,
    io: Rc<dyn StorageIo>,
    cache: Rc<BatchCache>,
    cache_id: u64,
    recovery: Option<RecoveryReport>,
    pub(crate) state: RefCell<State>,
}

impl PartitionLog {
    /// Opens (recovering if needed) or creates the log in `dir` with direct I/O.
    pub async fn open(
        dir: &Path,
        config: LogConfig,
        cache: Rc<BatchCache>,
    ) -> Result<Rc<Self>, StorageError> {
        Self::open_with_io(dir, config, cache, Rc::new(io::DmaIo)).await
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Cold reads that found their bytes already read ahead.
    pub fn readahead_used(&self) -> u64 {
        self.state.borrow().readahead_used
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

    /// Appends one or more concatenated RecordBatch v2 batches: validates each (length, magic,
    /// CRC-32C), checks idempotent producer sequences, assigns offsets by patching `baseOffset`,
    /// and waits for `durability`.
    pub async fn append(
        &self,
        records: BytesMut,
        durability: Durability,
    ) -> Result<AppendResult, StorageError> {
        if records.is_empty() {
            return Err(StorageError::Corrupt(BatchError::Truncated));
        }
        batch::for_each_batch(&records, true, |_| {}).map_err(StorageError::Corrupt)?;
        self.admit(records.len()).await?;
        let (result, gen, sync_failures) = match self.assign(records, durability)? {
            Assigned::Duplicate(r) => return Ok(r),
            Assigned::New {
                result,
                gen,
                sync_failures,
            } => (result, gen, sync_failures),
        };
        if durability == Durability::Accepted {
            return Ok(result);
        }
        let last = result.last_offset;
        std::future::poll_fn(|cx| {
            let mut s = self.state.borrow_mut();
            if gen < s.gen && last >= s.gen_end[gen] {
                return Poll::Ready(Err(s.error()));
            }
            if s.flusher_dead {
                return Poll::Ready(Err(s.error()));
            }
            let done = match durability {
                Durability::Synced => s.synced > last,
                _ => s.hw > last,
            };
            if done {
                return Poll::Ready(Ok(result));
            }
            if durability == Durability::Synced && s.sync_failures > sync_failures {
                return Poll::Ready(Err(s.error()));
            }
            s.waiters.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// The synchronous part of an append: offsets, file positions, index, producer state,
    /// pending bytes and cache change together, with no await in between.
    fn assign(
        &self,
        mut records: BytesMut,
        durability: Durability,
    ) -> Result<Assigned, StorageError> {
        let mut guard = self.state.borrow_mut();
        let s = &mut *guard;
        if let Some(dup) = self.check_producers(s, &records)? {
            return Ok(Assigned::Duplicate(dup));
        }
        let base = s.log_end;
        let interval = s.config.index_interval_bytes;
        let mut next = base;
        let mut at = 0usize;
        while at < records.len() {
            let size = batch::batch_size(&records[at..]).expect("validated above");
            batch::set_base_offset(&mut records[at..at + size], next);
            let h = BatchHeader::parse(&records[at..at + size]).expect("validated above");
            let pos = s.active().size;
            s.active_mut().on_batch(&h, pos, interval);
            if h.producer_id() >= 0 {
                s.producers.apply(
                    h.producer_id(),
                    h.producer_epoch(),
                    BatchMeta {
                        first_seq: h.base_sequence(),
                        last_seq: h.last_sequence(),
                        base: h.base_offset(),
                        last: h.last_offset(),
                    },
                );
            }
            next = h.last_offset().next();
            at += size;
        }
        s.pending.push(&records);
        let end_pos = s.pending.end_pos();
        s.pending.marks.push((end_pos, next));
        let frozen = records.freeze();
        let mut at = 0usize;
        while at < frozen.len() {
            let size = batch::batch_size(&frozen[at..]).expect("validated above");
            let b = frozen.slice(at..at + size);
            let h = BatchHeader::parse(&b).expect("validated above");
            self.cache
                .insert(self.cache_id, h.base_offset(), h.last_offset(), b.clone());
            at += size;
        }
        s.log_end = next;
        let last = Offset(next.0 - 1);
        if durability == Durability::Synced {
            s.sync_wanted = s.sync_wanted.max(next);
        }
        if let Some(w) = s.flusher.take() {
            w.wake();
        }
        let result = AppendResult {
            base_offset: base,
            last_offset: last,
            log_start_offset: s.log_start,
            duplicate: false,
        };
        Ok(Assigned::New {
            result,
            gen: s.gen,
            sync_failures: s.sync_failures,
        })
    }

    /// Waits until an append of `bytes` may assign offsets: no roll in progress, pending
    /// bytes under their limit; rolls the active segment first when it is full or old.
    async fn admit(&self, bytes: usize) -> Result<(), StorageError> {
        loop {
            let roll = {
                let s = self.state.borrow();
                if s.closed {
                    return Err(StorageError::Io(std::io::Error::other("log is closed")));
                }
                if s.flusher_dead {
                    return Err(s.error());
                }
                if s.rolling
                    || (!s.pending.is_empty() && s.pending.bytes + bytes > PENDING_BYTES_MAX)
                {
                    None
                } else {
                    Some(self.needs_roll(&s, bytes))
                }
            };
            match roll {
                None => {
                    self.wait_until(|s| {
                        s.closed
                            || s.flusher_dead
                            || !(s.rolling
                                || (!s.pending.is_empty()
                                    && s.pending.bytes + bytes > PENDING_BYTES_MAX))
                    })
                    .await
                }
                Some(true) => self.roll_active().await?,
                Some(false) => return Ok(()),
            }
        }
    }

    fn needs_roll(&self, s: &State, bytes: usize) -> bool {
        let a = s.active();
        if a.size == 0 {
            return false;
        }
        let limit = s.config.segment_bytes.min(u32::MAX as u64);
        let too_big = a.size + bytes as u64 > limit;
        // Index entries hold offsets relative to the base as u32.
        let too_many = s.log_end.0 - a.base.0 + bytes as i64 > u32::MAX as i64;
        let too_old = s
            .config
            .segment_ms
            .is_some_and(|ms| crate::types::now_ms() - a.created_ms >= ms as i64);
        too_big || too_many || too_old
    }

    /// KIP-98 checks of every batch. `Ok(Some)` when the append is a retry of batches already
    /// in the log (every batch of it must be).
    fn check_producers(
        &self,
        s: &State,
        records: &[u8],
    ) -> Result<Option<AppendResult>, StorageError> {
        let mut staged: Vec<(i64, i16, BatchMeta)> = vec![];
        let mut dup: Option<(Offset, Offset)> = None;
        let mut fresh = false;
        let mut at = 0usize;
        let mut next = s.log_end;
        while at < records.len() {
            let h = BatchHeader::parse(&records[at..]).map_err(StorageError::Corrupt)?;
            at += h.size();
            let delta = h.last_offset_delta() as i64;
            match s.producers.check(&h, &staged)? {
                Check::Duplicate(m) => {
                    if fresh {
                        return Err(StorageError::OutOfOrderSequence);
                    }
                    dup = Some(match dup {
                        None => (m.base, m.last),
                        Some((b, _)) => (b, m.last),
                    });
                }
                Check::Append => {
                    if dup.is_some() {
                        return Err(StorageError::OutOfOrderSequence);
                    }
                    fresh = true;
                    if h.producer_id() >= 0 {
                        staged.push((
                            h.producer_id(),
                            h.producer_epoch(),
                            BatchMeta {
                                first_seq: h.base_sequence(),
                                last_seq: h.last_sequence(),
                                base: next,
                                last: Offset(next.0 + delta),
                            },
                        ));
                    }
                }
            }
            next = Offset(next.0 + delta + 1);
        }
        Ok(dup.map(|(base, last)| AppendResult {
            base_offset: base,
            last_offset: last,
            log_start_offset: s.log_start,
            duplicate: true,
        }))
    }

    /// A write failed: every batch not yet on disk fails with it. The log end goes back to the
    /// high watermark so the next append continues exactly after the last written batch — no
    /// hole and no duplicate offset in the file.
    pub(crate) fn fail_unwritten(&self, s: &mut State, e: std::io::Error) {
        tracing::error!(
            dir = %self.dir.display(),
            error = %e,
            failed_from = s.hw.0,
            failed_to = s.log_end.0,
            "segment write failed; unwritten appends fail"
        );
        s.set_error(&e);
        let hw = s.hw;
        s.gen_end.push(hw);
        s.gen += 1;
        s.log_end = hw;
        s.sync_wanted = s.sync_wanted.min(hw).max(s.synced);
        let pos = s.written_pos;
        let clean_from = align_up(pos);
        if s.attempted_pos > clean_from {
            let to = s
                .punch
                .map_or(s.attempted_pos, |(p, l)| (p + l).max(s.attempted_pos));
            s.punch = Some((clean_from, to - clean_from));
        }
        s.pending = Pending::new(align_down(pos), s.written_tail.clone());
        s.active_mut().truncate(pos, hw);
        s.producers.truncate_from(hw);
        self.cache.truncate_from(self.cache_id, hw);
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

    /// Waits until nothing is pending or in flight in the appender.
    async fn drain(&self) {
        self.wait_until(|s| (s.pending.is_empty() && !s.flushing) || s.flusher_dead)
            .await
    }

    /// The flusher task panicked (it caught the panic itself): what is pending will never be
    /// written, so fail the appends waiting for it and every later one. Reads keep working up to
    /// the high watermark; a restart recovers the partition from its files.
    pub(crate) fn flusher_died(&self) {
        let mut s = self.state.borrow_mut();
        s.flusher_dead = true;
        s.set_error(&std::io::Error::other(
            "the partition's flusher stopped after a panic",
        ));
        s.wake_all();
    }

    /// Seals the active segment and starts a new one at the log end. Public so the shard (and
    /// tests) can force a roll.
    pub async fn roll(&self) -> Result<(), StorageError> {
        if self.state.borrow().flusher_dead {
            return Err(self.state.borrow().error());
        }
        loop {
            let busy = self.state.borrow().rolling;
            if !busy {
                break;
            }
            self.wait_until(|s| !s.rolling).await;
        }
        if self.state.borrow().active().size == 0 {
            return Ok(());
        }
        self.roll_active().await
    }

    async fn roll_active(&self) -> Result<(), StorageError> {
        self.state.borrow_mut().rolling = true;
        let r = self.roll_inner().await;
        let mut s = self.state.borrow_mut();
        s.rolling = false;
        s.wake_all();
        r
    }

    async fn roll_inner(&self) -> Result<(), StorageError> {
        self.drain().await;
        let (file, written, hw) = {
            let s = self.state.borrow();
            (s.active().file.clone(), s.written_pos, s.hw)
        };
        // The sealed segment must be complete and exactly sized on disk before its successor
        // exists: recovery scans only the last segment and trusts the size of the others.
        file.sync().await?;
        file.truncate(written).await?;
        file.sync().await?;
        {
            let mut s = self.state.borrow_mut();
            s.synced = s.synced.max(hw);
            s.allocated = written;
            s.attempted_pos = align_up(written);
            s.punch = None; // the truncation removed everything past the data
            let a = s.active_mut();
            a.push_time_entry();
            self.write_indexes(a)?;
        }
        self.no_snapshot_in_flight().await;
        let base = self.state.borrow().log_end;
        {
            // Before the new segment exists: recovery replays producer state from the batches
            // of the last segment only, so the snapshot must cover everything before it.
            let s = self.state.borrow();
            meta::write_file(
                &self.dir.join(meta::PRODUCER_FILE),
                &meta::encode_producers(base, &s.producers),
            )?;
        }
        let path = meta::segment_path(&self.dir, base, "log");
        let new_file = self.io.open(&path, true).await?;
        let extent = appender::next_extent(0, self.state.borrow().config.segment_bytes.max(4096));
        new_file.allocate(align_up(extent)).await?;
        // The new file's directory entry must be durable before any append is acknowledged in
        // it: fdatasync of the file does not persist the entry, and after a crash a missing
        // segment would silently lose acknowledged batches.
        self.io.sync_dir(&self.dir).await?;
        let mut s = self.state.borrow_mut();
        s.segments
            .push(Segment::new(base, new_file, crate::types::now_ms()));
        s.pending = Pending::new(0, vec![]);
        s.snapshot_pos = 0;
        s.synced_pos = 0;
        s.written_pos = 0;
        s.written_tail.clear();
        s.allocated = align_up(extent);
        s.attempted_pos = 0;
        Ok(())
    }

    fn write_indexes(&self, seg: &mut Segment) -> Result<(), StorageError> {
        recovery::write_indexes(&self.dir, seg)
    }

    /// Waits for a background producer snapshot to finish (roll and close write their own, which
    /// an older one finishing later must not replace).
    async fn no_snapshot_in_flight(&self) {
        self.wait_until(|s| !s.snapshotting).await
    }

    /// Whole batches from `opts.start`: from the batch cache when it holds `start`, else by
    /// aligned direct reads located through the sparse index (CRC-checked again).
    pub async fn read(&self, opts: ReadOptions) -> Result<ReadResult, StorageError> {
        let (hw, log_start) = {
            let s = self.state.borrow();
            if opts.start < s.log_start || opts.start > s.log_end {
                return Err(s.out_of_range(opts.start));
            }
            (s.hw, s.log_start)
        };
        let mut out = ReadResult {
            batches: vec![],
            high_watermark: hw,
            log_start_offset: log_start,
        };
        if opts.start >= hw {
            return Ok(out);
        }
        let bytes_max = opts.bytes_max as usize;
        if self
            .cache
            .read(self.cache_id, opts.start, hw, bytes_max, &mut out.batches)
        {
            return Ok(out);
        }
        out.batches = self.read_disk(opts.start, hw, bytes_max).await?;
        Ok(out)
    }

    fn start_readahead(
        &self,
        file: &Rc<dyn io::SegmentFile>,
        seg_base: Offset,
        next: Offset,
        next_pos: u64,
        len: usize,
        limit: u64,
    ) {
        if len == 0 || READAHEAD_BYTES.with(|b| b.get()) + len > READAHEAD_SHARD_BYTES {
            return;
        }
        let apos = align_down(next_pos);
        let f = file.clone();
        READAHEAD_BYTES.with(|b| b.set(b.get() + len));
        let ahead = ReadAhead {
            seg_base,
            next,
            next_pos,
            apos,
            len,
            limit,
            task: Some(glommio::spawn_local(crate::contain::contain(async move {
                f.read_at(apos, len).await
            }))),
        };
        let mut s = self.state.borrow_mut();
        if s.readahead.len() >= READAHEAD_SLOTS {
            s.readahead.remove(0);
        }
        s.readahead.push(ahead);
    }

    async fn read_disk(
        &self,
        start: Offset,
        hw: Offset,
        bytes_max: usize,
    ) -> Result<Vec<Bytes>, StorageError> {
        let (file, pos, limit, seg_base, mut ahead) = {
            let mut s = self.state.borrow_mut();
            let i = s.segments.partition_point(|g| g.base <= start);
            let Some(seg) = i.checked_sub(1).map(|i| &s.segments[i]) else {
                return Err(s.out_of_range(start));
            };
            let active = i == s.segments.len();
            let limit = if active { s.written_pos } else { seg.size };
            let (file, pos, base) = (seg.file.clone(), seg.lookup(start), seg.base);
            let ahead = s
                .readahead
                .iter()
                .position(|a| a.seg_base == base && a.next == start)
                .map(|k| s.readahead.remove(k));
            s.readahead_used += ahead.is_some() as u64;
            (file, pos, limit, base, ahead)
        };
        let mut pos = ahead.as_ref().map_or(pos, |a| a.next_pos);
        let mut want = bytes_max.max(READ_BYTES_MIN);
        loop {
            let apos = align_down(pos);
            if pos >= limit {
                return Ok(vec![]);
            }
            let len = align_up((pos - apos) + want as u64).min(align_up(limit) - apos) as usize;
            let before = (pos, want);
            let (buf, buf_limit, from_ahead) = match ahead.take() {
                Some(mut a) if a.apos == apos => {
                    let limit = a.limit.min(limit);
                    (a.take().await?, limit, true)
                }
                _ => (file.read_at(apos, len).await?, limit, false),
            };
            let avail = (buf.len() as u64).min(buf_limit - apos) as usize;
            let data = &buf[..avail];
            let mut i = (pos - apos) as usize;
            let mut first: Option<usize> = None;
            let mut end = i;
            let mut count = 0usize;
            let mut next_offset = start;
            while i < data.len() {
                let rest = &data[i..];
                if rest.len() < batch::LOG_OVERHEAD_BYTES {
                    break;
                }
                let Some(size) = batch::batch_size(rest) else {
                    return Err(StorageError::Corrupt(BatchError::BadLength));
                };
                if size > rest.len() {
                    if first.is_none() {
                        if apos + (i + size) as u64 > limit {
                            return Err(StorageError::Corrupt(BatchError::Truncated));
                        }
                        // The batch holding `start` does not fit: read it whole.
                        want = want.max(size);
                    }
                    break;
                }
                let h = BatchHeader::parse(&rest[..size]).map_err(StorageError::Corrupt)?;
                if h.last_offset() >= hw {
                    break;
                }
                if h.last_offset() < start {
                    i += size;
                    pos = apos + i as u64;
                    continue;
                }
                if first.is_some() && end - first.unwrap_or(0) + size > bytes_max {
                    break;
                }
                first.get_or_insert(i);
                i += size;
                end = i;
                count += 1;
                next_offset = h.last_offset().next();
            }
            let Some(first) = first else {
                // Nothing complete at `pos` in this buffer: read again from there if the position
                // advanced or `want` now covers the whole batch (or the buffer was a read-ahead
                // of another size); otherwise the data ends here.
                if (pos, want) == before && !from_ahead {
                    return Ok(vec![]);
                }
                continue;
            };
            // A sequential reader (large reads) comes back for what follows: start reading it
            // now, so the disk works while this buffer is checked, copied and sent.
            let end_pos = apos + end as u64;
            if bytes_max >= READAHEAD_MIN_BYTES && end_pos < limit {
                let next_len = (len as u64).min(align_up(limit) - align_down(end_pos));
                self.start_readahead(
                    &file,
                    seg_base,
                    next_offset,
                    end_pos,
                    next_len as usize,
                    limit,
                );
            }
            // One copy out of the DMA buffer into memory that can cross shards.
            let all = Bytes::copy_from_slice(&data[first..end]);
            let mut batches = Vec::with_capacity(count);
            let mut at = 0usize;
            while at < all.len() {
                let h = BatchHeader::parse_checked(&all[at..]).map_err(StorageError::Corrupt)?;
                let size = h.size();
                batches.push(all.slice(at..at + size));
                at += size;
            }
            return Ok(batches);
        }
    }

    pub fn log_start_offset(&self) -> Offset {
        self.state.borrow().log_start
    }
    pub fn log_end_offset(&self) -> Offset {
        self.state.borrow().log_end
    }
    pub fn high_watermark(&self) -> Offset {
        self.state.borrow().hw
    }
    /// The offset up to which an fdatasync has completed.
    pub fn synced_offset(&self) -> Offset {
        self.state.borrow().synced
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
        self.wait_until(|s| s.hw > after || s.closed).await
    }

    /// The earliest batch whose max timestamp is >= `timestamp_ms`: its base offset (not below
    /// the log start) and that max timestamp; `None` if every record is older.
    pub async fn offset_for_timestamp(
        &self,
        timestamp_ms: i64,
    ) -> Result<Option<(Offset, i64)>, StorageError> {
        let (mut from, hw, log_start) = {
            let s = self.state.borrow();
            let Some(seg) = s.segments.iter().find(|g| g.max_ts >= timestamp_ms) else {
                return Ok(None);
            };
            (
                seg.time_lookup(timestamp_ms).max(s.log_start),
                s.hw,
                s.log_start,
            )
        };
        while from < hw {
            let r = self
                .read(ReadOptions {
                    start: from,
                    bytes_max: 1 << 20,
                })
                .await?;
            if r.batches.is_empty() {
                break;
            }
            for b in &r.batches {
                let h = BatchHeader::parse(b).map_err(StorageError::Corrupt)?;
                if h.max_timestamp() >= timestamp_ms {
                    return Ok(Some((h.base_offset().max(log_start), h.max_timestamp())));
                }
                from = h.last_offset().next();
            }
        }
        Ok(None)
    }

    /// The last offset of the batch with the largest timestamp and that timestamp
    /// (ListOffsets -3).
    pub fn max_timestamp(&self) -> Option<(Offset, i64)> {
        let s = self.state.borrow();
        let mut best: Option<(Offset, i64)> = None;
        for g in &s.segments {
            if g.max_ts >= 0 && best.is_none_or(|b| g.max_ts > b.1) {
                best = Some((g.max_ts_offset, g.max_ts));
            }
        }
        best
    }

    /// DeleteRecords: advances the log start offset to `offset` (which must be <= high
    /// watermark), deleting whole segments below it in the background.
    pub async fn delete_records_before(&self, offset: Offset) -> Result<Offset, StorageError> {
        {
            let s = self.state.borrow();
            if offset > s.hw || offset < Offset(0) {
                return Err(s.out_of_range(offset));
            }
            if offset <= s.log_start {
                return Ok(s.log_start);
            }
        }
        self.advance_log_start(offset)?;
        Ok(self.state.borrow().log_start)
    }

    /// Applies retention.ms / retention.bytes to whole sealed segments; called periodically by
    /// the shard. Never touches the active segment.
    pub async fn enforce_retention(&self, now_ms: i64) -> Result<(), StorageError> {
        let new_start = {
            let s = self.state.borrow();
            let sealed = s.segments.len() - 1;
            let mut total = s.total_bytes();
            let mut k = 0;
            while k < sealed {
                let g = &s.segments[k];
                let old = s
                    .config
                    .retention_ms
                    .is_some_and(|ms| g.max_ts < now_ms.saturating_sub(ms as i64));
                let big = s
                    .config
                    .retention_bytes
                    .is_some_and(|b| total.saturating_sub(g.size) >= b);
                if !(old || big) {
                    break;
                }
                total -= g.size;
                k += 1;
            }
            (k > 0).then(|| s.segments[k].base)
        };
        if let Some(start) = new_start {
            if start > self.state.borrow().log_start {
                self.advance_log_start(start)?;
            }
        }
        Ok(())
    }

    /// Persists the new log start (before any file goes: a crash in between leaves segments
    /// that open() drops again), then unlinks the segments wholly below it in a background task
    /// so appends never wait for the file system.
    fn advance_log_start(&self, offset: Offset) -> Result<(), StorageError> {
        meta::write_file(
            &self.dir.join(meta::LOG_START_FILE),
            &offset.0.to_be_bytes(),
        )?;
        let mut s = self.state.borrow_mut();
        s.log_start = s.log_start.max(offset);
        let sealed = s.segments.len() - 1;
        let k = s.segments[..sealed]
            .iter()
            .take_while(|g| g.next <= offset)
            .count();
        let gone: Vec<Segment> = s.segments.drain(..k).collect();
        drop(s);
        if !gone.is_empty() {
            let io = self.io.clone();
            let dir = self.dir.clone();
            // Contained: a panic leaves files behind (removed by the next start's cleanup or by
            // hand) and is logged; the shard keeps running.
            crate::contain::spawn_background("segment unlink", async move {
                for g in gone {
                    let base = g.base;
                    drop(g);
                    for ext in ["log", "index", "timeindex"] {
                        let p = meta::segment_path(&dir, base, ext);
                        if let Err(e) = io.remove(&p).await {
                            if e.kind() != std::io::ErrorKind::NotFound {
                                tracing::warn!(path = %p.display(), error = %e, "segment unlink failed");
                            }
                        }
                    }
                }
            });
        }
        Ok(())
    }

    /// Flushes, syncs and writes the clean-shutdown marker. Appends after this fail.
    pub async fn close(&self) -> Result<(), StorageError> {
        if self.state.borrow().closed {
            return Ok(());
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
        if self.state.borrow().flusher_dead {
            // Offsets, index entries and producer state cover batches that were never written:
            // write no clean-shutdown marker, so the next start recovers from the files.
            let mut s = self.state.borrow_mut();
            s.rolling = false;
            s.closed = true;
            s.wake_all();
            return Err(s.error());
        }
        let file = self.state.borrow().active().file.clone();
        let punch = self.state.borrow_mut().punch.take();
        let r = async {
            if let Some((pos, len)) = punch {
                file.punch(pos, len).await?;
            }
            file.sync().await
        }
        .await;
        let mut s = self.state.borrow_mut();
        s.rolling = false;
        s.closed = true;
        s.wake_all();
        r?;
        s.synced = s.hw;
        let (log_end, written) = (s.log_end, s.written_pos);
        let a = s.active_mut();
        a.push_time_entry();
        self.write_indexes(a)?;
        meta::write_file(
            &self.dir.join(meta::PRODUCER_FILE),
            &meta::encode_producers(log_end, &s.producers),
        )?;
        meta::write_file(
            &self.dir.join(meta::CLEAN_FILE),
            &meta::encode_clean(log_end, written),
        )?;
        self.cache.drop_log(self.cache_id);
        Ok(())
    }

    /// Closes the log and removes its directory.
    pub async fn remove(&self) -> Result<(), StorageError> {
        {
            let mut s = self.state.borrow_mut();
            s.closed = true;
            s.wake_all();
        }
        self.cache.drop_log(self.cache_id);
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}
