//! The partition log. Owns the segments, index, cache and producer state of one partition.
//! Lives on the partition's shard (Rc/RefCell, no locks). Knows batches and offsets, never Kafka
//! requests or sockets.
//!
//! STUB: an in-memory stand-in with the final API, replaced by the direct-I/O engine.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use crate::protocol::batch::{self, BatchError, BatchHeader};
use crate::types::Offset;

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

/// Per-shard cache of recently appended batches, shared by the shard's partitions.
pub struct BatchCache {
    pub bytes_max: usize,
}

impl BatchCache {
    pub fn new(bytes_max: usize) -> Rc<Self> {
        Rc::new(BatchCache { bytes_max })
    }
}

struct Inner {
    batches: Vec<(Offset, Offset, i64, Bytes)>,
    log_start: Offset,
    log_end: Offset,
    waiters: Vec<std::task::Waker>,
}

pub struct PartitionLog {
    dir: PathBuf,
    inner: RefCell<Inner>,
}

impl PartitionLog {
    pub async fn open(
        dir: &Path,
        _config: LogConfig,
        _cache: Rc<BatchCache>,
    ) -> Result<Rc<Self>, StorageError> {
        std::fs::create_dir_all(dir)?;
        Ok(Rc::new(PartitionLog {
            dir: dir.to_path_buf(),
            inner: RefCell::new(Inner {
                batches: vec![],
                log_start: Offset(0),
                log_end: Offset(0),
                waiters: vec![],
            }),
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn set_config(&self, _config: LogConfig) {}

    /// Appends one or more concatenated RecordBatch v2 batches: validates each (length, magic,
    /// CRC-32C), assigns offsets by patching `baseOffset`, and waits for `durability`.
    pub async fn append(
        &self,
        mut records: BytesMut,
        _durability: Durability,
    ) -> Result<AppendResult, StorageError> {
        batch::for_each_batch(&records, true, |_| {}).map_err(StorageError::Corrupt)?;
        let mut inner = self.inner.borrow_mut();
        let base = inner.log_end;
        let mut at = 0;
        let mut next = base;
        while at < records.len() {
            let size = batch::batch_size(&records[at..]).unwrap();
            batch::set_base_offset(&mut records[at..at + size], next);
            let h = BatchHeader::parse(&records[at..at + size]).unwrap();
            next = h.last_offset().next();
            at += size;
        }
        let frozen = records.freeze();
        let mut at = 0;
        while at < frozen.len() {
            let size = batch::batch_size(&frozen[at..]).unwrap();
            let b = frozen.slice(at..at + size);
            let h = BatchHeader::parse(&b).unwrap();
            let (bo, lo, ts) = (h.base_offset(), h.last_offset(), h.max_timestamp());
            inner.batches.push((bo, lo, ts, b));
            at += size;
        }
        inner.log_end = next;
        for w in inner.waiters.drain(..) {
            w.wake();
        }
        Ok(AppendResult {
            base_offset: base,
            last_offset: Offset(next.0 - 1),
            log_start_offset: inner.log_start,
            duplicate: false,
        })
    }

    pub async fn read(&self, opts: ReadOptions) -> Result<ReadResult, StorageError> {
        let inner = self.inner.borrow();
        if opts.start < inner.log_start || opts.start > inner.log_end {
            return Err(StorageError::OffsetOutOfRange {
                requested: opts.start,
                log_start: inner.log_start,
                log_end: inner.log_end,
            });
        }
        let mut out = ReadResult {
            batches: vec![],
            high_watermark: inner.log_end,
            log_start_offset: inner.log_start,
        };
        let mut bytes = 0usize;
        for (_, last, _, b) in &inner.batches {
            if *last < opts.start {
                continue;
            }
            if !out.batches.is_empty() && bytes + b.len() > opts.bytes_max as usize {
                break;
            }
            bytes += b.len();
            out.batches.push(b.clone());
        }
        Ok(out)
    }

    pub fn log_start_offset(&self) -> Offset {
        self.inner.borrow().log_start
    }
    pub fn log_end_offset(&self) -> Offset {
        self.inner.borrow().log_end
    }
    pub fn high_watermark(&self) -> Offset {
        self.inner.borrow().log_end
    }

    /// Resolves once the high watermark moves past `after` (or immediately if it already has).
    pub async fn wait_for_append(&self, after: Offset) {
        std::future::poll_fn(|cx| {
            let mut inner = self.inner.borrow_mut();
            if inner.log_end > after {
                std::task::Poll::Ready(())
            } else {
                inner.waiters.push(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await
    }

    /// The earliest offset whose timestamp is >= `timestamp_ms`, with that batch's max
    /// timestamp; `None` if every record is older.
    pub async fn offset_for_timestamp(
        &self,
        timestamp_ms: i64,
    ) -> Result<Option<(Offset, i64)>, StorageError> {
        let inner = self.inner.borrow();
        Ok(inner
            .batches
            .iter()
            .find(|(_, _, ts, _)| *ts >= timestamp_ms)
            .map(|(b, _, ts, _)| (*b.max(&inner.log_start), *ts)))
    }

    /// The offset and timestamp of the record with the largest timestamp (ListOffsets -3).
    pub fn max_timestamp(&self) -> Option<(Offset, i64)> {
        let inner = self.inner.borrow();
        inner
            .batches
            .iter()
            .max_by_key(|(_, _, ts, _)| *ts)
            .map(|(_, last, ts, _)| (*last, *ts))
    }

    /// DeleteRecords: advances the log start offset to `offset` (which must be <= high
    /// watermark), deleting whole segments below it in the background.
    pub async fn delete_records_before(&self, offset: Offset) -> Result<Offset, StorageError> {
        let mut inner = self.inner.borrow_mut();
        if offset > inner.log_end || offset < Offset(0) {
            return Err(StorageError::OffsetOutOfRange {
                requested: offset,
                log_start: inner.log_start,
                log_end: inner.log_end,
            });
        }
        if offset > inner.log_start {
            inner.log_start = offset;
        }
        Ok(inner.log_start)
    }

    /// Applies retention.ms / retention.bytes; called periodically by the shard.
    pub async fn enforce_retention(&self, _now_ms: i64) -> Result<(), StorageError> {
        Ok(())
    }

    /// Flushes, syncs and writes the clean-shutdown marker.
    pub async fn close(&self) -> Result<(), StorageError> {
        Ok(())
    }

    /// Closes the log and removes its directory.
    pub async fn remove(&self) -> Result<(), StorageError> {
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}
