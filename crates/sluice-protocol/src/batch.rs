//! A read-only view of Kafka RecordBatch v2 headers, plus the two in-place edits the broker makes
//! (patching `baseOffset`, and `maxTimestamp` for LogAppendTime). Pure functions over bytes: no I/O,
//! no decompression. Record data is never looked at.
//!
//! ```text
//!  0        8          12                  16    17    21          23               27
//!  +--------+----------+-------------------+-----+-----+-----------+----------------+
//!  |baseOff |batchLen  |partitionLeaderEp. |magic| crc |attributes |lastOffsetDelta |
//!  |  i64   |  i32     |       i32         | i8  | u32 |    i16    |      i32       |
//!  +--------+----------+-------------------+-----+-----+-----------+----------------+
//!  27             35             43           51           53            57         61
//!  +--------------+--------------+------------+------------+-------------+----------+---------
//!  |baseTimestamp |maxTimestamp  | producerId |producerEp. |baseSequence |numRecords| records…
//!  |     i64      |     i64      |    i64     |    i16     |     i32     |   i32    |
//!  +--------------+--------------+------------+------------+-------------+----------+---------
//! ```
//! `batchLen` counts the bytes after itself; the CRC-32C covers everything from `attributes` on.

use crate::Offset;

/// Bytes before `batchLength` ends: the part of the header needed to find the batch's size.
pub const LOG_OVERHEAD_BYTES: usize = 12;
/// The fixed RecordBatch v2 header.
pub const HEADER_BYTES: usize = 61;
pub const MAGIC_V2: i8 = 2;

pub(crate) const OFF_BASE_OFFSET: usize = 0;
pub(crate) const OFF_BATCH_LENGTH: usize = 8;
pub(crate) const OFF_LEADER_EPOCH: usize = 12;
pub(crate) const OFF_MAGIC: usize = 16;
pub(crate) const OFF_CRC: usize = 17;
pub(crate) const OFF_ATTRIBUTES: usize = 21;
pub(crate) const OFF_LAST_OFFSET_DELTA: usize = 23;
pub(crate) const OFF_BASE_TIMESTAMP: usize = 27;
pub(crate) const OFF_MAX_TIMESTAMP: usize = 35;
pub(crate) const OFF_PRODUCER_ID: usize = 43;
pub(crate) const OFF_PRODUCER_EPOCH: usize = 51;
pub(crate) const OFF_BASE_SEQUENCE: usize = 53;
pub(crate) const OFF_RECORD_COUNT: usize = 57;

pub const ATTR_COMPRESSION_MASK: i16 = 0x07;
pub const ATTR_TIMESTAMP_LOG_APPEND: i16 = 0x08;
pub const ATTR_TRANSACTIONAL: i16 = 0x10;
pub const ATTR_CONTROL: i16 = 0x20;
/// KIP-534: `baseTimestamp` holds the batch's delete horizon (set by a log cleaner that kept a
/// tombstone or a transaction marker in it); record timestamp deltas are relative to it.
pub const ATTR_DELETE_HORIZON: i16 = 0x40;

/// Why a batch was refused. Maps to CORRUPT_MESSAGE (or UNSUPPORTED_FOR_MESSAGE_FORMAT for magic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchError {
    /// Fewer bytes than a header, or `batchLength` points past the end of the buffer.
    Truncated,
    /// `batchLength` is smaller than the fixed header or otherwise impossible.
    BadLength,
    /// Magic other than 2.
    BadMagic(i8),
    /// The stored CRC-32C does not match the bytes.
    BadCrc,
    /// Record count negative or inconsistent with lastOffsetDelta.
    BadRecordCount,
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::Truncated => write!(f, "record batch truncated"),
            BatchError::BadLength => write!(f, "record batch length invalid"),
            BatchError::BadMagic(m) => write!(f, "record batch magic {m} unsupported (need 2)"),
            BatchError::BadCrc => write!(f, "record batch CRC-32C mismatch"),
            BatchError::BadRecordCount => write!(f, "record batch record count invalid"),
        }
    }
}
impl std::error::Error for BatchError {}

// Field readers for a buffer known to hold at least the field: a [`BatchHeader`] always holds
// [`HEADER_BYTES`]; the in-place edits below assert it.
#[inline]
fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}
#[inline]
fn be_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_be_bytes(a)
}
#[inline]
fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

/// Total size in bytes of the batch starting at `buf[0]`, read from its `batchLength` field,
/// or `None` if fewer than [`LOG_OVERHEAD_BYTES`] are present or the length is impossible.
#[inline]
pub fn batch_size(buf: &[u8]) -> Option<usize> {
    if buf.len() < LOG_OVERHEAD_BYTES {
        return None;
    }
    let len = be_i32(buf, OFF_BATCH_LENGTH);
    if len < (HEADER_BYTES - LOG_OVERHEAD_BYTES) as i32 {
        return None;
    }
    (len as usize).checked_add(LOG_OVERHEAD_BYTES)
}

/// A validated view of one RecordBatch v2 header. Borrowed; cheap to make.
#[derive(Clone, Copy)]
pub struct BatchHeader<'a> {
    buf: &'a [u8],
}

impl<'a> BatchHeader<'a> {
    /// Views the header of the batch at the start of `buf` after checking length and magic only
    /// (no CRC). `buf` may hold more bytes after the batch.
    pub fn parse(buf: &'a [u8]) -> Result<Self, BatchError> {
        if buf.len() < HEADER_BYTES {
            return Err(BatchError::Truncated);
        }
        let size = batch_size(buf).ok_or(BatchError::BadLength)?;
        if size > buf.len() {
            return Err(BatchError::Truncated);
        }
        let magic = buf[OFF_MAGIC] as i8;
        if magic != MAGIC_V2 {
            return Err(BatchError::BadMagic(magic));
        }
        let h = BatchHeader { buf: &buf[..size] };
        let count = h.record_count();
        if count < 0 || h.last_offset_delta() < 0 {
            return Err(BatchError::BadRecordCount);
        }
        Ok(h)
    }

    /// [`parse`](Self::parse) plus the CRC-32C check over the whole batch.
    pub fn parse_checked(buf: &'a [u8]) -> Result<Self, BatchError> {
        let h = Self::parse(buf)?;
        if !h.crc_ok() {
            return Err(BatchError::BadCrc);
        }
        Ok(h)
    }

    /// Views the exact bytes of a batch that [`parse`](Self::parse) accepted before (e.g. one
    /// of a [`Validated`](crate::validated::Validated) set), without checking anything again.
    /// Fields of bytes that were never parsed read as whatever they hold; a buffer shorter than
    /// the header panics on access, so callers pass only validated batches.
    #[inline]
    pub fn trusted(buf: &'a [u8]) -> Self {
        debug_assert!(Self::parse(buf).is_ok_and(|h| h.size() == buf.len()));
        BatchHeader { buf }
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.buf
    }
    pub fn size(&self) -> usize {
        self.buf.len()
    }
    pub fn base_offset(&self) -> Offset {
        Offset(be_i64(self.buf, OFF_BASE_OFFSET))
    }
    /// `baseOffset + lastOffsetDelta`, saturating: a stored or fetched header can hold any value.
    pub fn last_offset(&self) -> Offset {
        Offset(
            self.base_offset()
                .0
                .saturating_add(self.last_offset_delta() as i64),
        )
    }
    pub fn partition_leader_epoch(&self) -> i32 {
        be_i32(self.buf, OFF_LEADER_EPOCH)
    }
    pub fn stored_crc(&self) -> u32 {
        be_i32(self.buf, OFF_CRC) as u32
    }
    pub fn computed_crc(&self) -> u32 {
        crc32c::crc32c(&self.buf[OFF_ATTRIBUTES..])
    }
    pub fn crc_ok(&self) -> bool {
        self.stored_crc() == self.computed_crc()
    }
    pub fn attributes(&self) -> i16 {
        be_i16(self.buf, OFF_ATTRIBUTES)
    }
    pub fn compression(&self) -> i16 {
        self.attributes() & ATTR_COMPRESSION_MASK
    }
    pub fn is_log_append_time(&self) -> bool {
        self.attributes() & ATTR_TIMESTAMP_LOG_APPEND != 0
    }
    pub fn is_transactional(&self) -> bool {
        self.attributes() & ATTR_TRANSACTIONAL != 0
    }
    pub fn is_control(&self) -> bool {
        self.attributes() & ATTR_CONTROL != 0
    }
    /// KIP-534: the time from which the tombstones and the transaction marker of this batch may
    /// be removed by a log cleaner (`baseTimestamp` when [`ATTR_DELETE_HORIZON`] is set).
    pub fn delete_horizon_ms(&self) -> Option<i64> {
        (self.attributes() & ATTR_DELETE_HORIZON != 0).then(|| self.base_timestamp())
    }
    pub fn last_offset_delta(&self) -> i32 {
        be_i32(self.buf, OFF_LAST_OFFSET_DELTA)
    }
    pub fn base_timestamp(&self) -> i64 {
        be_i64(self.buf, OFF_BASE_TIMESTAMP)
    }
    pub fn max_timestamp(&self) -> i64 {
        be_i64(self.buf, OFF_MAX_TIMESTAMP)
    }
    pub fn producer_id(&self) -> i64 {
        be_i64(self.buf, OFF_PRODUCER_ID)
    }
    pub fn producer_epoch(&self) -> i16 {
        be_i16(self.buf, OFF_PRODUCER_EPOCH)
    }
    pub fn base_sequence(&self) -> i32 {
        be_i32(self.buf, OFF_BASE_SEQUENCE)
    }
    pub fn last_sequence(&self) -> i32 {
        let base = self.base_sequence();
        if base < 0 {
            return base;
        }
        // Sequences wrap at i32::MAX (KIP-98).
        ((base as i64 + self.last_offset_delta() as i64) % (i32::MAX as i64 + 1)) as i32
    }
    pub fn record_count(&self) -> i32 {
        be_i32(self.buf, OFF_RECORD_COUNT)
    }
}

/// Rewrites `baseOffset` in place. The CRC does not cover it, so nothing else changes.
#[inline]
pub fn set_base_offset(batch: &mut [u8], base: Offset) {
    assert!(batch.len() >= HEADER_BYTES, "not a validated batch");
    batch[OFF_BASE_OFFSET..OFF_BASE_OFFSET + 8].copy_from_slice(&base.0.to_be_bytes());
}

/// Rewrites `partitionLeaderEpoch` in place (not covered by the CRC).
#[inline]
pub fn set_partition_leader_epoch(batch: &mut [u8], epoch: i32) {
    assert!(batch.len() >= HEADER_BYTES, "not a validated batch");
    batch[OFF_LEADER_EPOCH..OFF_LEADER_EPOCH + 4].copy_from_slice(&epoch.to_be_bytes());
}

/// Rewrites `lastOffsetDelta` in place and recomputes the CRC (it covers the field): a batch
/// whose offsets span more than its records, as compaction leaves them.
pub fn set_last_offset_delta(batch: &mut [u8], delta: i32) {
    assert!(batch.len() >= HEADER_BYTES, "not a validated batch");
    batch[OFF_LAST_OFFSET_DELTA..OFF_LAST_OFFSET_DELTA + 4].copy_from_slice(&delta.to_be_bytes());
    write_crc(batch);
}

/// Marks the batch as LogAppendTime with `now_ms` as its max timestamp and recomputes the CRC
/// (both fields are covered by it). Kafka leaves the per-record deltas alone.
pub fn set_log_append_time(batch: &mut [u8], now_ms: i64) {
    assert!(batch.len() >= HEADER_BYTES, "not a validated batch");
    let attrs = be_i16(batch, OFF_ATTRIBUTES) | ATTR_TIMESTAMP_LOG_APPEND;
    batch[OFF_ATTRIBUTES..OFF_ATTRIBUTES + 2].copy_from_slice(&attrs.to_be_bytes());
    batch[OFF_MAX_TIMESTAMP..OFF_MAX_TIMESTAMP + 8].copy_from_slice(&now_ms.to_be_bytes());
    write_crc(batch);
}

/// Rewrites `baseTimestamp` and `maxTimestamp` in place. Both are covered by the CRC: call
/// [`write_crc`] after the last edit.
#[inline]
pub fn set_timestamps(batch: &mut [u8], base_ms: i64, max_ms: i64) {
    assert!(batch.len() >= HEADER_BYTES, "not a validated batch");
    batch[OFF_BASE_TIMESTAMP..OFF_BASE_TIMESTAMP + 8].copy_from_slice(&base_ms.to_be_bytes());
    batch[OFF_MAX_TIMESTAMP..OFF_MAX_TIMESTAMP + 8].copy_from_slice(&max_ms.to_be_bytes());
}

/// KIP-534: marks the batch with a delete horizon, stored in `baseTimestamp`. The records'
/// timestamp deltas must be relative to `horizon_ms` (the caller re-encodes them), and the CRC
/// covers both fields: call [`write_crc`] after the last edit.
#[inline]
pub fn set_delete_horizon(batch: &mut [u8], horizon_ms: i64) {
    assert!(batch.len() >= HEADER_BYTES, "not a validated batch");
    let attrs = be_i16(batch, OFF_ATTRIBUTES) | ATTR_DELETE_HORIZON;
    batch[OFF_ATTRIBUTES..OFF_ATTRIBUTES + 2].copy_from_slice(&attrs.to_be_bytes());
    batch[OFF_BASE_TIMESTAMP..OFF_BASE_TIMESTAMP + 8].copy_from_slice(&horizon_ms.to_be_bytes());
}

/// Rewrites the idempotent-producer fields (KIP-98) in place. Covered by the CRC: call
/// [`write_crc`] after the last edit.
#[inline]
pub fn set_producer(batch: &mut [u8], producer_id: i64, producer_epoch: i16, base_sequence: i32) {
    assert!(batch.len() >= HEADER_BYTES, "not a validated batch");
    batch[OFF_PRODUCER_ID..OFF_PRODUCER_ID + 8].copy_from_slice(&producer_id.to_be_bytes());
    batch[OFF_PRODUCER_EPOCH..OFF_PRODUCER_EPOCH + 2]
        .copy_from_slice(&producer_epoch.to_be_bytes());
    batch[OFF_BASE_SEQUENCE..OFF_BASE_SEQUENCE + 4].copy_from_slice(&base_sequence.to_be_bytes());
}

/// Marks the batch that is exactly `batch` as a control batch and recomputes the CRC (the
/// attributes are covered by it).
pub fn set_control(batch: &mut [u8]) {
    assert!(batch.len() >= HEADER_BYTES, "not a validated batch");
    let attrs = be_i16(batch, OFF_ATTRIBUTES) | ATTR_CONTROL;
    batch[OFF_ATTRIBUTES..OFF_ATTRIBUTES + 2].copy_from_slice(&attrs.to_be_bytes());
    write_crc(batch);
}

/// Marks the batch that is exactly `batch` as a transactional producer's (or not) and
/// recomputes the CRC (the attributes are covered by it).
pub fn set_transactional(batch: &mut [u8], transactional: bool) {
    assert!(batch.len() >= HEADER_BYTES, "not a validated batch");
    let mut attrs = be_i16(batch, OFF_ATTRIBUTES) & !ATTR_TRANSACTIONAL;
    if transactional {
        attrs |= ATTR_TRANSACTIONAL;
    }
    batch[OFF_ATTRIBUTES..OFF_ATTRIBUTES + 2].copy_from_slice(&attrs.to_be_bytes());
    write_crc(batch);
}

/// Recomputes and stores the CRC-32C of the batch that is exactly `batch`.
#[inline]
pub fn write_crc(batch: &mut [u8]) {
    assert!(batch.len() >= HEADER_BYTES, "not a validated batch");
    let crc = crc32c::crc32c(&batch[OFF_ATTRIBUTES..]);
    batch[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
}

/// Walks the concatenated batches in `buf`, yielding each validated header (length and magic;
/// the CRC is checked too when `check_crc`). Stops with the error at the first bad batch.
pub fn for_each_batch<'a>(
    buf: &'a [u8],
    check_crc: bool,
    mut f: impl FnMut(BatchHeader<'a>),
) -> Result<usize, BatchError> {
    let mut at = 0usize;
    let mut n = 0usize;
    while at < buf.len() {
        let rest = &buf[at..];
        let h = if check_crc {
            BatchHeader::parse_checked(rest)?
        } else {
            BatchHeader::parse(rest)?
        };
        at += h.size();
        n += 1;
        f(h);
    }
    Ok(n)
}

/// [`for_each_batch`] over a fetched records section, which may end with a partial batch (a
/// broker cuts the last one at the fetch size limit): a trailing batch whose declared size runs
/// past the buffer, or fewer bytes than its length field, ends the walk without an error.
pub fn for_each_fetched_batch<'a>(
    buf: &'a [u8],
    check_crc: bool,
    mut f: impl FnMut(BatchHeader<'a>),
) -> Result<usize, BatchError> {
    let mut at = 0usize;
    let mut n = 0usize;
    while at < buf.len() {
        let rest = &buf[at..];
        match batch_size(rest) {
            Some(size) if size > rest.len() => break,
            None if rest.len() < LOG_OVERHEAD_BYTES => break,
            _ => {}
        }
        let h = if check_crc {
            BatchHeader::parse_checked(rest)?
        } else {
            BatchHeader::parse(rest)?
        };
        at += h.size();
        n += 1;
        f(h);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{self, BatchBuilder, BatchOptions};

    #[test]
    fn built_batch_parses_and_checks() {
        let b = builder::single(Some(b"k"), Some(b"v"), 1000);
        let h = BatchHeader::parse_checked(&b).unwrap();
        assert_eq!(h.size(), b.len());
        assert_eq!(h.record_count(), 1);
        assert_eq!(h.base_offset(), Offset(0));
        assert_eq!(h.max_timestamp(), 1000);
        assert_eq!(h.producer_id(), -1);
    }

    #[test]
    fn transactional_flag_toggles_and_keeps_crc_valid() {
        let mut b = builder::single(None, Some(b"v"), 5);
        set_transactional(&mut b, true);
        let h = BatchHeader::parse_checked(&b).unwrap();
        assert!(h.is_transactional() && !h.is_control());
        set_transactional(&mut b, false);
        assert!(!BatchHeader::parse_checked(&b).unwrap().is_transactional());
    }

    #[test]
    fn patching_base_offset_keeps_crc_valid() {
        let mut b = builder::single(None, Some(b"v"), 5);
        set_base_offset(&mut b, Offset(42));
        let h = BatchHeader::parse_checked(&b).unwrap();
        assert_eq!(h.base_offset(), Offset(42));
        assert_eq!(h.last_offset(), Offset(42));
    }

    #[test]
    fn log_append_time_rewrites_crc() {
        let mut b = builder::single(None, Some(b"v"), 5);
        set_log_append_time(&mut b, 99);
        let h = BatchHeader::parse_checked(&b).unwrap();
        assert!(h.is_log_append_time());
        assert_eq!(h.max_timestamp(), 99);
    }

    #[test]
    fn timestamp_and_producer_edits_need_and_get_a_new_crc() {
        let mut b = builder::single(None, Some(b"v"), 5);
        set_timestamps(&mut b, 7, 8);
        set_producer(&mut b, 9, 1, 100);
        assert_eq!(
            BatchHeader::parse_checked(&b).err(),
            Some(BatchError::BadCrc)
        );
        write_crc(&mut b);
        let h = BatchHeader::parse_checked(&b).unwrap();
        assert_eq!((h.base_timestamp(), h.max_timestamp()), (7, 8));
        assert_eq!(
            (h.producer_id(), h.producer_epoch(), h.base_sequence()),
            (9, 1, 100)
        );
    }

    #[test]
    fn flipped_byte_fails_crc_and_short_buffer_is_truncated() {
        let mut b = builder::single(Some(b"key"), Some(b"value"), 5);
        let last = b.len() - 1;
        b[last] ^= 0xff;
        assert_eq!(
            BatchHeader::parse_checked(&b).err(),
            Some(BatchError::BadCrc)
        );
        assert_eq!(
            BatchHeader::parse(&b[..30]).err(),
            Some(BatchError::Truncated)
        );
        let mut m = builder::single(None, None, 0);
        m[16] = 1;
        assert_eq!(BatchHeader::parse(&m).err(), Some(BatchError::BadMagic(1)));
    }

    #[test]
    fn walks_concatenated_batches() {
        let mut all = builder::single(None, Some(b"a"), 1);
        all.extend(builder::single(None, Some(b"b"), 2));
        let mut n = 0;
        assert_eq!(for_each_batch(&all, true, |_| n += 1), Ok(2));
        assert_eq!(n, 2);
        all.push(0);
        assert!(for_each_batch(&all, true, |_| {}).is_err());
    }

    #[test]
    fn fetched_walk_ignores_a_trailing_partial_batch_only() {
        let mut b = BatchBuilder::new(BatchOptions::default());
        for i in 0..10 {
            b.push(&builder::Record {
                key: None,
                value: Some(&[i; 50]),
                headers: &[],
                timestamp_ms: 1,
            });
        }
        let one = b.finish().unwrap();
        let mut all = one.clone();
        all.extend_from_slice(&one[..100]);
        assert_eq!(for_each_fetched_batch(&all, true, |_| {}), Ok(1));
        all.truncate(one.len() + 5);
        assert_eq!(for_each_fetched_batch(&all, true, |_| {}), Ok(1));
        let mut bad = one.clone();
        bad[16] = 1;
        assert_eq!(
            for_each_fetched_batch(&bad, false, |_| {}),
            Err(BatchError::BadMagic(1))
        );
        let mut flipped = one;
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(
            for_each_fetched_batch(&flipped, true, |_| {}),
            Err(BatchError::BadCrc)
        );
        let mut ok = true;
        assert_eq!(
            for_each_fetched_batch(&flipped, false, |h| ok = h.crc_ok()),
            Ok(1)
        );
        assert!(!ok);
    }
}
