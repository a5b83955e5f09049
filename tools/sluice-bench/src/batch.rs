//! Pre-built Kafka RecordBatch v2 pools on top of `sluice-protocol`'s builder. Pure functions
//! over bytes, no I/O.
//!
//! The load generator must cost little per record, so every batch is built (records encoded,
//! compressed) once at start-up. Per send only the header fields that change are rewritten —
//! base/max timestamp, producer id/epoch/base sequence, and for uncompressed batches a send
//! timestamp in the first 8 bytes of the first record's value — and the CRC-32C is recomputed.
//! This module owns only what is particular to the load generator: payloads, keys, pools, the
//! per-send patch and the send stamp; the header layout, varints, codecs and CRC are the crate's.

use anyhow::{bail, Result};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use sluice_protocol::batch::{self, BatchHeader};
use sluice_protocol::builder::{BatchBuilder, BatchOptions, Record};
use sluice_protocol::varint::read_varint;

pub use sluice_protocol::batch::HEADER_BYTES;
pub use sluice_protocol::compression::Compression;

/// Distinct batches kept per pool; enough that compressors and caches do not see one buffer.
pub const POOL_BATCHES_MAX: usize = 64;
/// Largest batch we build (Kafka's default `message.max.bytes` is ~1 MiB).
pub const BATCH_BYTES_MAX: usize = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Incompressible bytes.
    Random,
    /// English-like words from a small vocabulary: compresses roughly 2× with lz4.
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    None,
    /// A fresh 16-byte random key per record.
    Random,
    /// One of N keys; every record of a batch carries the same key.
    Fixed(u32),
}

/// What every batch in a pool looks like.
#[derive(Debug, Clone)]
pub struct BatchSpec {
    pub value_bytes: usize,
    pub records_per_batch: usize,
    pub compression: Compression,
    pub payload: Payload,
    pub keys: Keys,
    pub seed: u64,
}

/// One pre-built batch.
#[derive(Debug, Clone)]
pub struct PooledBatch {
    pub bytes: Bytes,
    pub records: u32,
    /// Key + value bytes of all records, before compression.
    pub payload_bytes: u64,
    /// Index of the key used by every record (for `Keys::Fixed`), else 0.
    pub key_index: u32,
    /// Whether the batch was built with `Keys::Fixed` (it then belongs to one partition).
    pub keyed: bool,
    /// Where the first record's value starts, if the batch is uncompressed and the value holds
    /// at least 8 bytes (the send timestamp in microseconds goes there).
    pub stamp_at: Option<usize>,
}

pub struct BatchPool {
    pub batches: Vec<PooledBatch>,
}

const WORDS: &[&str] = &[
    "stream",
    "broker",
    "partition",
    "offset",
    "record",
    "batch",
    "leader",
    "replica",
    "commit",
    "segment",
    "index",
    "fetch",
    "produce",
    "consumer",
    "group",
    "topic",
    "latency",
    "throughput",
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "on",
    "for",
    "with",
    "disk",
    "core",
    "queue",
];

fn fill_payload(rng: &mut impl Rng, payload: Payload, out: &mut [u8]) {
    match payload {
        Payload::Random => rng.fill(out),
        Payload::Text => {
            let mut at = 0;
            while at < out.len() {
                let w = WORDS[rng.gen_range(0..WORDS.len())].as_bytes();
                let n = w.len().min(out.len() - at);
                out[at..at + n].copy_from_slice(&w[..n]);
                at += n;
                if at < out.len() {
                    out[at] = b' ';
                    at += 1;
                }
            }
        }
    }
}

impl BatchPool {
    /// Builds `count` batches (at most [`POOL_BATCHES_MAX`]) following `spec`.
    pub fn build(spec: &BatchSpec, count: usize) -> Result<BatchPool> {
        Self::build_as(spec, count, false)
    }

    /// As [`BatchPool::build`]; `transactional` marks every batch as a transactional
    /// producer's (KIP-98).
    pub fn build_as(spec: &BatchSpec, count: usize, transactional: bool) -> Result<BatchPool> {
        if spec.records_per_batch == 0 {
            bail!("a batch needs at least one record");
        }
        let count = count.clamp(1, POOL_BATCHES_MAX);
        let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
        let mut builder = BatchBuilder::with_capacity(
            BatchOptions {
                compression: spec.compression,
                transactional,
                ..BatchOptions::default()
            },
            spec.records_per_batch * (spec.value_bytes + 24),
        );
        let mut batches = Vec::with_capacity(count);
        for i in 0..count {
            let key_index = match spec.keys {
                Keys::Fixed(n) => (i as u32) % n.max(1),
                _ => 0,
            };
            batches.push(build_one(spec, key_index, &mut rng, &mut builder)?);
        }
        Ok(BatchPool { batches })
    }
}

fn build_one(
    spec: &BatchSpec,
    key_index: u32,
    rng: &mut impl Rng,
    builder: &mut BatchBuilder,
) -> Result<PooledBatch> {
    let mut value = vec![0u8; spec.value_bytes];
    let fixed_key = format!("key-{key_index}");
    let mut random_key = [0u8; 16];
    let mut payload_bytes = 0u64;
    let mut stamp_at = None;
    for i in 0..spec.records_per_batch {
        let key = match spec.keys {
            Keys::None => None,
            Keys::Random => {
                rng.fill(&mut random_key);
                Some(&random_key[..])
            }
            Keys::Fixed(_) => Some(fixed_key.as_bytes()),
        };
        payload_bytes += key.map_or(0, |k| k.len() as u64);
        fill_payload(rng, spec.payload, &mut value);
        payload_bytes += value.len() as u64;
        let value_at = builder.push(&Record {
            key,
            value: Some(&value),
            headers: &[],
            timestamp_ms: 0,
        });
        if i == 0 && spec.compression == Compression::None && spec.value_bytes >= 8 {
            stamp_at = Some(HEADER_BYTES + value_at);
        }
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + builder.records_bytes());
    let total = builder.finish_into(&mut out)?;
    if total > BATCH_BYTES_MAX {
        bail!("batch of {total} bytes exceeds the {BATCH_BYTES_MAX}-byte limit");
    }
    Ok(PooledBatch {
        bytes: Bytes::from(out),
        records: spec.records_per_batch as u32,
        payload_bytes,
        key_index,
        keyed: matches!(spec.keys, Keys::Fixed(_)),
        stamp_at,
    })
}

/// Idempotent-producer fields of a batch (KIP-98).
#[derive(Debug, Clone, Copy)]
pub struct ProducerFields {
    pub producer_id: i64,
    pub epoch: i16,
    pub base_sequence: i32,
}

/// Rewrites the per-send fields of a batch copy in place and recomputes its CRC-32C.
/// `stamp_at` is [`PooledBatch::stamp_at`]; `now_us` goes there as a big-endian i64.
pub fn patch(
    batch: &mut [u8],
    now_ms: i64,
    now_us: i64,
    stamp_at: Option<usize>,
    producer: Option<ProducerFields>,
) {
    debug_assert!(BatchHeader::parse(batch).is_ok(), "not a pooled batch");
    batch::set_timestamps(batch, now_ms, now_ms);
    if let Some(p) = producer {
        batch::set_producer(batch, p.producer_id, p.epoch, p.base_sequence);
    }
    if let Some(at) = stamp_at {
        batch[at..at + 8].copy_from_slice(&now_us.to_be_bytes());
    }
    batch::write_crc(batch);
}

/// The producer's send time in microseconds carried by a fetched batch: the first 8 bytes of its
/// first record's value, if the batch is uncompressed and that value holds at least 8 bytes.
pub fn send_stamp_us(h: &BatchHeader<'_>) -> Option<i64> {
    if h.compression() != 0 {
        return None;
    }
    first_value_stamp(h.bytes().get(HEADER_BYTES..)?)
}

/// First 8 bytes of the first record's value, if present.
fn first_value_stamp(records: &[u8]) -> Option<i64> {
    let mut at = 0;
    read_varint(records, &mut at).ok()?; // record length
    at += 1; // attributes
    read_varint(records, &mut at).ok()?; // timestamp delta
    read_varint(records, &mut at).ok()?; // offset delta
    let klen = read_varint(records, &mut at).ok()?;
    // A fetched key length can be anything: checked arithmetic, then bounds-checked access.
    at = at.checked_add(usize::try_from(klen.max(0)).ok()?)?;
    let vlen = read_varint(records, &mut at).ok()?;
    if vlen < 8 {
        return None;
    }
    let stamp: [u8; 8] = records.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(i64::from_be_bytes(stamp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::batch::for_each_fetched_batch;
    use sluice_protocol::compression::decompress;

    fn spec(c: Compression, payload: Payload, keys: Keys) -> BatchSpec {
        BatchSpec {
            value_bytes: 100,
            records_per_batch: 50,
            compression: c,
            payload,
            keys,
            seed: 7,
        }
    }

    /// The one batch in `b`, CRC-checked.
    fn header(b: &[u8]) -> BatchHeader<'_> {
        let h = BatchHeader::parse_checked(b).unwrap();
        assert_eq!(h.size(), b.len());
        h
    }

    #[test]
    fn uncompressed_batch_has_valid_header_and_crc() {
        let pool =
            BatchPool::build(&spec(Compression::None, Payload::Random, Keys::None), 4).unwrap();
        assert_eq!(pool.batches.len(), 4);
        let b = &pool.batches[0];
        assert_eq!(b.records, 50);
        assert_eq!(b.payload_bytes, 5000);
        let h = header(&b.bytes);
        assert_eq!(h.record_count(), 50);
        assert_eq!(h.last_offset_delta(), 49);
        assert_eq!(h.producer_id(), -1);
    }

    #[test]
    fn patch_sets_fields_and_keeps_crc_valid() {
        let pool =
            BatchPool::build(&spec(Compression::None, Payload::Text, Keys::Random), 1).unwrap();
        let b = &pool.batches[0];
        let mut copy = b.bytes.to_vec();
        let p = ProducerFields {
            producer_id: 9,
            epoch: 1,
            base_sequence: 100,
        };
        patch(
            &mut copy,
            1_700_000_000_000,
            1_700_000_000_000_123,
            b.stamp_at,
            Some(p),
        );
        let h = header(&copy);
        assert_eq!(h.base_timestamp(), 1_700_000_000_000);
        assert_eq!(h.max_timestamp(), 1_700_000_000_000);
        assert_eq!(send_stamp_us(&h), Some(1_700_000_000_000_123));
        assert_eq!(h.producer_id(), 9);
        assert_eq!(h.producer_epoch(), 1);
        assert_eq!(h.base_sequence(), 100);
    }

    #[test]
    fn compressed_batches_round_trip_and_text_compresses() {
        for c in [
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let s = spec(c, Payload::Text, Keys::Fixed(3));
            let pool = BatchPool::build(&s, 3).unwrap();
            let b = &pool.batches[1];
            assert_eq!(b.key_index, 1);
            assert!(b.stamp_at.is_none());
            // Text compresses well below its 5,000 payload bytes (record framing included).
            assert!(b.bytes.len() < 3000, "{c:?}: {} bytes", b.bytes.len());
            let h = header(&b.bytes);
            assert_eq!(h.compression(), c.attribute());
            assert_eq!(send_stamp_us(&h), None);
            let records = decompress(c, &b.bytes[HEADER_BYTES..], BATCH_BYTES_MAX).unwrap();
            // Re-encode uncompressed with the same seed: the records section must match.
            let plain = BatchPool::build(
                &BatchSpec {
                    compression: Compression::None,
                    ..s
                },
                3,
            )
            .unwrap();
            assert_eq!(&records[..], &plain.batches[1].bytes[HEADER_BYTES..]);
        }
    }

    #[test]
    fn fetched_walk_ignores_trailing_partial_batch_and_reports_bad_crc() {
        let pool =
            BatchPool::build(&spec(Compression::None, Payload::Random, Keys::None), 2).unwrap();
        let mut all = pool.batches[0].bytes.to_vec();
        all.extend_from_slice(&pool.batches[1].bytes[..100]);
        assert_eq!(for_each_fetched_batch(&all, true, |_| {}), Ok(1));
        let mut flipped = pool.batches[0].bytes.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let mut ok = true;
        for_each_fetched_batch(&flipped, false, |h| ok = h.crc_ok()).unwrap();
        assert!(!ok);
    }

    #[test]
    fn huge_key_length_in_a_fetched_record_is_not_a_panic() {
        // Record: length, attributes, ts delta, offset delta, key length u32::MAX (zigzag varint).
        let rec = [0x20, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff, 0x1f, 0x10, 1, 2, 3];
        assert_eq!(first_value_stamp(&rec), None);
        // i64::MAX as the key length.
        let mut rec = vec![0x20, 0, 0, 0];
        rec.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert_eq!(first_value_stamp(&rec), None);
    }

    #[test]
    fn transactional_pools_mark_their_batches() {
        let s = spec(Compression::None, Payload::Random, Keys::None);
        let pool = BatchPool::build_as(&s, 1, true).unwrap();
        let h = header(&pool.batches[0].bytes);
        assert!(h.is_transactional() && !h.is_control());
        assert!(!header(&BatchPool::build(&s, 1).unwrap().batches[0].bytes).is_transactional());
    }

    #[test]
    fn batches_past_the_size_limit_are_refused() {
        let s = BatchSpec {
            value_bytes: 1 << 20,
            records_per_batch: 17,
            ..spec(Compression::None, Payload::Random, Keys::None)
        };
        assert!(BatchPool::build(&s, 1).is_err());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..300)) {
                let _ = for_each_fetched_batch(&data, true, |h| { let _ = send_stamp_us(&h); });
                let _ = first_value_stamp(&data);
            }

            #[test]
            fn pooled_batches_scan_and_mutations_never_panic(
                c in prop::sample::select(&Compression::ALL[..]),
                flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..), 0..4),
                huge in prop::option::of(any::<prop::sample::Index>()),
                cut in prop::option::of(any::<prop::sample::Index>()),
            ) {
                let pool = BatchPool::build(&spec(c, Payload::Text, Keys::Random), 1).unwrap();
                let b = pool.batches[0].bytes.to_vec();
                prop_assert_eq!(for_each_fetched_batch(&b, true, |_| {}), Ok(1));
                prop_assert!(!decompress(c, &b[HEADER_BYTES..], BATCH_BYTES_MAX).unwrap().is_empty());
                let mut m = b;
                for (i, x) in &flips {
                    let i = i.index(m.len());
                    m[i] ^= x;
                }
                if let Some(i) = huge {
                    let i = i.index(m.len() - 3);
                    m[i..i + 4].copy_from_slice(&i32::MAX.to_be_bytes());
                }
                if let Some(k) = cut {
                    m.truncate(k.index(m.len()));
                }
                let _ = for_each_fetched_batch(&m, false, |h| { let _ = (h.crc_ok(), send_stamp_us(&h)); });
                if m.len() > HEADER_BYTES {
                    let _ = first_value_stamp(&m[HEADER_BYTES..]);
                    let _ = decompress(c, &m[HEADER_BYTES..], BATCH_BYTES_MAX);
                }
            }
        }
    }
}
