//! Building RecordBatch v2 batches from records: the CLI's producer, the broker's internal
//! writers (`__consumer_offsets`), the load generator's batch pools and tests all build here.
//!
//! [`BatchBuilder`] encodes each record straight into one reusable records buffer (its size is
//! computed first, so no per-record allocation), then [`finish_into`](BatchBuilder::finish_into)
//! writes the 61-byte header, the records section compressed with the chosen codec, and the
//! CRC-32C. Offsets are deltas from 0 (the broker assigns the base offset); timestamps are deltas
//! from the first record's.

use crate::batch::{
    ATTR_TRANSACTIONAL, HEADER_BYTES, LOG_OVERHEAD_BYTES, MAGIC_V2, OFF_ATTRIBUTES, OFF_CRC,
};
use crate::compression::{self, CompressError, Compression};
use crate::varint::{put_varint, varint_len};

/// One record to add: key, value and headers are borrowed, nothing is copied until encoded.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
    pub timestamp_ms: i64,
}

/// Batch-wide fields. The default is a plain batch: uncompressed, no idempotence (producer id,
/// epoch and base sequence -1), not transactional, leader epoch -1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    pub compression: Compression,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub transactional: bool,
    pub partition_leader_epoch: i32,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            compression: Compression::None,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            transactional: false,
            partition_leader_epoch: -1,
        }
    }
}

/// Why a batch could not be built.
#[derive(Debug)]
pub enum BuildError {
    /// A batch holds at least one record.
    Empty,
    /// More records or bytes than the header's i32 fields can describe.
    TooLarge,
    Compress(CompressError),
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildError::Empty => write!(f, "a record batch needs at least one record"),
            BuildError::TooLarge => write!(f, "record batch larger than its i32 fields allow"),
            BuildError::Compress(e) => e.fmt(f),
        }
    }
}
impl std::error::Error for BuildError {}

/// Accumulates records, then writes them as one batch. Reusable: `finish*` leaves it empty
/// with its buffers' capacity kept.
#[derive(Debug, Clone)]
pub struct BatchBuilder {
    options: BatchOptions,
    /// The uncompressed records section.
    records: Vec<u8>,
    count: usize,
    base_ts: i64,
    max_ts: i64,
}

#[inline]
fn bytes_len(b: Option<&[u8]>) -> usize {
    match b {
        None => varint_len(-1),
        Some(b) => varint_len(b.len() as i64) + b.len(),
    }
}

#[inline]
fn put_bytes(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => put_varint(out, -1),
        Some(b) => {
            put_varint(out, b.len() as i64);
            out.extend_from_slice(b);
        }
    }
}

impl BatchBuilder {
    pub fn new(options: BatchOptions) -> Self {
        Self::with_capacity(options, 0)
    }

    /// A builder whose records buffer starts with room for `records_bytes`.
    pub fn with_capacity(options: BatchOptions, records_bytes: usize) -> Self {
        BatchBuilder {
            options,
            records: Vec::with_capacity(records_bytes),
            count: 0,
            base_ts: 0,
            max_ts: i64::MIN,
        }
    }

    pub fn options(&self) -> &BatchOptions {
        &self.options
    }

    /// Changes the batch-wide fields of the batch being built.
    pub fn set_options(&mut self, options: BatchOptions) {
        self.options = options;
    }

    /// Records added since the last `finish`.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Uncompressed size of the records section so far.
    pub fn records_bytes(&self) -> usize {
        self.records.len()
    }

    /// Forgets the records added so far.
    pub fn clear(&mut self) {
        self.records.clear();
        self.count = 0;
        self.max_ts = i64::MIN;
    }

    /// Adds one record (offset delta = records added before it). Returns where its value's bytes
    /// start within the uncompressed records section (where the value would start if it is
    /// null): an uncompressed batch holds them at `HEADER_BYTES` + that.
    pub fn push(&mut self, r: &Record<'_>) -> usize {
        if self.count == 0 {
            self.base_ts = r.timestamp_ms;
        }
        self.max_ts = self.max_ts.max(r.timestamp_ms);
        let ts_delta = r.timestamp_ms.wrapping_sub(self.base_ts);
        let offset_delta = self.count as i64;
        let mut headers_len = varint_len(r.headers.len() as i64);
        for (k, v) in r.headers {
            headers_len += bytes_len(Some(k.as_bytes())) + bytes_len(*v);
        }
        let key_len = bytes_len(r.key);
        let value_len_len = bytes_len(r.value) - r.value.map_or(0, |v| v.len());
        let len = 1
            + varint_len(ts_delta)
            + varint_len(offset_delta)
            + key_len
            + bytes_len(r.value)
            + headers_len;
        let out = &mut self.records;
        out.reserve(varint_len(len as i64) + len);
        put_varint(out, len as i64);
        let start = out.len();
        out.push(0); // record attributes: unused in v2
        put_varint(out, ts_delta);
        put_varint(out, offset_delta);
        put_bytes(out, r.key);
        let value_at = out.len() + value_len_len;
        put_bytes(out, r.value);
        put_varint(out, r.headers.len() as i64);
        for (k, v) in r.headers {
            put_bytes(out, Some(k.as_bytes()));
            put_bytes(out, *v);
        }
        debug_assert_eq!(out.len() - start, len);
        self.count += 1;
        value_at
    }

    /// Appends the batch (header, records compressed with the options' codec, CRC-32C) to `out`
    /// and empties the builder. Returns the batch's size. On error `out` is left as it was.
    pub fn finish_into(&mut self, out: &mut Vec<u8>) -> Result<usize, BuildError> {
        if self.count == 0 {
            return Err(BuildError::Empty);
        }
        let count = i32::try_from(self.count).map_err(|_| BuildError::TooLarge)?;
        let o = self.options;
        let start = out.len();
        out.reserve(HEADER_BYTES + self.records.len());
        out.extend_from_slice(&0i64.to_be_bytes()); // base offset: the broker assigns it
        out.extend_from_slice(&0i32.to_be_bytes()); // batch length, set below
        out.extend_from_slice(&o.partition_leader_epoch.to_be_bytes());
        out.push(MAGIC_V2 as u8);
        out.extend_from_slice(&0u32.to_be_bytes()); // crc, set below
        let mut attributes = o.compression.attribute();
        if o.transactional {
            attributes |= ATTR_TRANSACTIONAL;
        }
        out.extend_from_slice(&attributes.to_be_bytes());
        out.extend_from_slice(&(count - 1).to_be_bytes()); // last offset delta
        out.extend_from_slice(&self.base_ts.to_be_bytes());
        out.extend_from_slice(&self.max_ts.to_be_bytes());
        out.extend_from_slice(&o.producer_id.to_be_bytes());
        out.extend_from_slice(&o.producer_epoch.to_be_bytes());
        out.extend_from_slice(&o.base_sequence.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        debug_assert_eq!(out.len() - start, HEADER_BYTES);
        if let Err(e) = compression::compress(o.compression, &self.records, out) {
            out.truncate(start);
            return Err(BuildError::Compress(e));
        }
        let size = out.len() - start;
        let Ok(batch_len) = i32::try_from(size - LOG_OVERHEAD_BYTES) else {
            out.truncate(start);
            return Err(BuildError::TooLarge);
        };
        let batch = &mut out[start..];
        batch[8..12].copy_from_slice(&batch_len.to_be_bytes());
        let crc = crc32c::crc32c(&batch[OFF_ATTRIBUTES..]);
        batch[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
        self.clear();
        Ok(size)
    }

    /// The batch as a new buffer; see [`finish_into`](Self::finish_into).
    pub fn finish(&mut self) -> Result<Vec<u8>, BuildError> {
        let mut out = Vec::new();
        self.finish_into(&mut out)?;
        Ok(out)
    }
}

/// An uncompressed plain batch of `records` (tests and small internal writes).
///
/// # Panics
/// If `records` is empty or the batch exceeds 2 GiB: callers pass a handful of small records.
pub fn batch(records: &[Record<'_>]) -> Vec<u8> {
    let len: usize = records
        .iter()
        .map(|r| bytes_len(r.key) + bytes_len(r.value))
        .sum();
    let mut b = BatchBuilder::with_capacity(BatchOptions::default(), len + 16 * records.len());
    for r in records {
        b.push(r);
    }
    b.finish()
        .expect("a non-empty uncompressed batch under 2 GiB")
}

/// One record with the given key and value, timestamped `timestamp_ms`; see [`batch`].
pub fn single(key: Option<&[u8]>, value: Option<&[u8]>, timestamp_ms: i64) -> Vec<u8> {
    batch(&[Record {
        key,
        value,
        headers: &[],
        timestamp_ms,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::BatchHeader;
    use crate::compression::{decode_batch, DECOMPRESSED_BATCH_BYTES_MAX};
    use bytes::Bytes;

    #[test]
    fn every_codec_builds_a_batch_that_decodes_with_fields_set() {
        let value = [7u8; 300];
        for c in Compression::ALL {
            let mut b = BatchBuilder::new(BatchOptions {
                compression: c,
                producer_id: 42,
                producer_epoch: 3,
                base_sequence: 10,
                transactional: false,
                partition_leader_epoch: 5,
            });
            for i in 0..30 {
                b.push(&Record {
                    key: Some(b"key"),
                    value: if i % 2 == 0 { Some(&value) } else { None },
                    headers: &[("h", Some(b"x")), ("n", None)],
                    timestamp_ms: 1000 + i,
                });
            }
            assert_eq!(b.len(), 30);
            let batch = b.finish().unwrap();
            assert!(b.is_empty(), "finish empties the builder");
            let h = BatchHeader::parse_checked(&batch).unwrap();
            assert_eq!(h.size(), batch.len(), "{c:?}");
            assert_eq!(h.compression(), c.attribute());
            assert_eq!((h.record_count(), h.last_offset_delta()), (30, 29));
            assert_eq!((h.base_timestamp(), h.max_timestamp()), (1000, 1029));
            assert_eq!((h.producer_id(), h.producer_epoch()), (42, 3));
            assert_eq!((h.base_sequence(), h.last_sequence()), (10, 39));
            assert_eq!(h.partition_leader_epoch(), 5);
            let recs = decode_batch(&mut Bytes::from(batch), DECOMPRESSED_BATCH_BYTES_MAX).unwrap();
            assert_eq!(recs.len(), 30);
            for (i, r) in recs.iter().enumerate() {
                assert_eq!(r.offset, i as i64);
                assert_eq!(r.timestamp_ms, 1000 + i as i64);
                assert_eq!(r.key.as_deref(), Some(&b"key"[..]));
                assert_eq!(r.value.is_some(), i % 2 == 0);
                assert_eq!(r.headers.len(), 2);
            }
        }
    }

    #[test]
    fn push_reports_where_the_value_starts() {
        let mut b = BatchBuilder::new(BatchOptions::default());
        let v0 = b.push(&Record {
            key: Some(b"k"),
            value: Some(b"first-value"),
            headers: &[],
            timestamp_ms: 1,
        });
        let v1 = b.push(&Record {
            key: None,
            value: Some(&[9u8; 200]),
            headers: &[("a", None)],
            timestamp_ms: 1,
        });
        let batch = b.finish().unwrap();
        assert_eq!(&batch[HEADER_BYTES + v0..][..11], b"first-value");
        assert_eq!(&batch[HEADER_BYTES + v1..][..200], &[9u8; 200][..]);
    }

    #[test]
    fn transactional_flag_empty_builder_and_reuse() {
        let mut b = BatchBuilder::new(BatchOptions {
            transactional: true,
            ..BatchOptions::default()
        });
        assert!(matches!(b.finish(), Err(BuildError::Empty)));
        let r = Record {
            key: None,
            value: Some(b"v"),
            headers: &[],
            timestamp_ms: 5,
        };
        b.push(&r);
        let mut out = vec![1, 2, 3];
        let n = b.finish_into(&mut out).unwrap();
        assert_eq!(out.len(), 3 + n);
        let h = BatchHeader::parse_checked(&out[3..]).unwrap();
        assert!(h.is_transactional());
        // Reuse: the second batch is numbered from 0 again.
        b.push(&r);
        b.push(&r);
        let h2 = b.finish().unwrap();
        assert_eq!(BatchHeader::parse_checked(&h2).unwrap().record_count(), 2);
    }

    #[test]
    fn extreme_timestamps_do_not_overflow() {
        let b = batch(&[
            Record {
                key: None,
                value: None,
                headers: &[],
                timestamp_ms: i64::MAX,
            },
            Record {
                key: None,
                value: None,
                headers: &[],
                timestamp_ms: i64::MIN,
            },
        ]);
        let recs = crate::records::decode_batch(&Bytes::from(b)).unwrap();
        assert_eq!(recs[0].timestamp_ms, i64::MAX);
        assert_eq!(recs[1].timestamp_ms, i64::MIN);
    }
}
