//! Pre-built Kafka RecordBatch v2 pools. Pure functions over bytes, no I/O.
//!
//! The load generator must cost little per record, so every batch is built (records encoded,
//! compressed) once at start-up. Per send only the header fields that change are rewritten —
//! base/max timestamp, producer id/epoch/base sequence, and for uncompressed batches a send
//! timestamp in the first 8 bytes of the first record's value — and the CRC-32C is recomputed.
//!
//! ```text
//!  0        8          12       16    17    21     23           27       35      43     51    53      57        61
//!  |baseOff |batchLen  |leaderEp|magic| crc |attrs |lastOffDelta|baseTs  |maxTs  |prodId|epoch|baseSeq|numRecs  |records…
//! ```

use anyhow::{bail, Result};
use bytes::{Bytes, BytesMut};
use rand::{Rng, SeedableRng};

pub const HEADER_BYTES: usize = 61;
const LOG_OVERHEAD_BYTES: usize = 12;
const OFF_BATCH_LENGTH: usize = 8;
const OFF_MAGIC: usize = 16;
const OFF_CRC: usize = 17;
const OFF_ATTRIBUTES: usize = 21;
const OFF_LAST_OFFSET_DELTA: usize = 23;
const OFF_BASE_TIMESTAMP: usize = 27;
const OFF_MAX_TIMESTAMP: usize = 35;
const OFF_PRODUCER_ID: usize = 43;
const OFF_PRODUCER_EPOCH: usize = 51;
const OFF_BASE_SEQUENCE: usize = 53;
const OFF_RECORD_COUNT: usize = 57;

/// Distinct batches kept per pool; enough that compressors and caches do not see one buffer.
pub const POOL_BATCHES_MAX: usize = 64;
/// Largest batch we build (Kafka's default `message.max.bytes` is ~1 MiB).
pub const BATCH_BYTES_MAX: usize = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Lz4,
    Zstd,
}

impl Compression {
    /// The codec id in the batch attributes (Kafka: 0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd).
    pub fn attribute(self) -> i16 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }
}

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

pub fn put_varint(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// Reads a zig-zag varint; returns the value and the bytes it took.
pub fn get_varint(buf: &[u8]) -> Option<(i64, usize)> {
    let mut z: u64 = 0;
    for (i, b) in buf.iter().take(10).enumerate() {
        z |= ((b & 0x7f) as u64) << (7 * i);
        if b & 0x80 == 0 {
            return Some((((z >> 1) as i64) ^ -((z & 1) as i64), i + 1));
        }
    }
    None
}

impl BatchPool {
    /// Builds `count` batches (at most [`POOL_BATCHES_MAX`]) following `spec`.
    pub fn build(spec: &BatchSpec, count: usize) -> Result<BatchPool> {
        if spec.records_per_batch == 0 {
            bail!("a batch needs at least one record");
        }
        let count = count.clamp(1, POOL_BATCHES_MAX);
        let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
        let mut batches = Vec::with_capacity(count);
        for i in 0..count {
            let key_index = match spec.keys {
                Keys::Fixed(n) => (i as u32) % n.max(1),
                _ => 0,
            };
            batches.push(build_one(spec, key_index, &mut rng)?);
        }
        Ok(BatchPool { batches })
    }
}

fn build_one(spec: &BatchSpec, key_index: u32, rng: &mut impl Rng) -> Result<PooledBatch> {
    let mut records = Vec::with_capacity(spec.records_per_batch * (spec.value_bytes + 24));
    let mut value = vec![0u8; spec.value_bytes];
    let mut rec = Vec::with_capacity(spec.value_bytes + 40);
    let mut payload_bytes = 0u64;
    let mut stamp_at = None;
    for i in 0..spec.records_per_batch {
        rec.clear();
        rec.push(0); // record attributes
        put_varint(&mut rec, 0); // timestamp delta
        put_varint(&mut rec, i as i64); // offset delta
        match spec.keys {
            Keys::None => put_varint(&mut rec, -1),
            Keys::Random => {
                let mut k = [0u8; 16];
                rng.fill(&mut k);
                put_varint(&mut rec, 16);
                rec.extend_from_slice(&k);
                payload_bytes += 16;
            }
            Keys::Fixed(_) => {
                let k = format!("key-{key_index}");
                put_varint(&mut rec, k.len() as i64);
                rec.extend_from_slice(k.as_bytes());
                payload_bytes += k.len() as u64;
            }
        }
        fill_payload(rng, spec.payload, &mut value);
        put_varint(&mut rec, value.len() as i64);
        let value_at_in_rec = rec.len();
        rec.extend_from_slice(&value);
        payload_bytes += value.len() as u64;
        put_varint(&mut rec, 0); // headers
        put_varint(&mut records, rec.len() as i64);
        if i == 0 && spec.compression == Compression::None && spec.value_bytes >= 8 {
            stamp_at = Some(HEADER_BYTES + records.len() + value_at_in_rec);
        }
        records.extend_from_slice(&rec);
    }
    let body = compress(spec.compression, &records)?;
    let total = HEADER_BYTES + body.len();
    if total > BATCH_BYTES_MAX {
        bail!("batch of {total} bytes exceeds the {BATCH_BYTES_MAX}-byte limit");
    }
    let mut out = BytesMut::with_capacity(total);
    out.extend_from_slice(&0i64.to_be_bytes()); // base offset
    out.extend_from_slice(&((total - LOG_OVERHEAD_BYTES) as i32).to_be_bytes());
    out.extend_from_slice(&(-1i32).to_be_bytes()); // partition leader epoch
    out.extend_from_slice(&[2u8]); // magic
    out.extend_from_slice(&0u32.to_be_bytes()); // crc, set below
    out.extend_from_slice(&spec.compression.attribute().to_be_bytes());
    out.extend_from_slice(&((spec.records_per_batch - 1) as i32).to_be_bytes());
    out.extend_from_slice(&0i64.to_be_bytes()); // base timestamp
    out.extend_from_slice(&0i64.to_be_bytes()); // max timestamp
    out.extend_from_slice(&(-1i64).to_be_bytes()); // producer id
    out.extend_from_slice(&(-1i16).to_be_bytes()); // producer epoch
    out.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
    out.extend_from_slice(&(spec.records_per_batch as i32).to_be_bytes());
    out.extend_from_slice(&body);
    debug_assert_eq!(out.len(), total);
    let crc = crc32c::crc32c(&out[OFF_ATTRIBUTES..]);
    out[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
    Ok(PooledBatch {
        bytes: out.freeze(),
        records: spec.records_per_batch as u32,
        payload_bytes,
        key_index,
        keyed: matches!(spec.keys, Keys::Fixed(_)),
        stamp_at,
    })
}

/// Compresses the records section as Kafka expects it: LZ4 frame format (independent blocks,
/// no content checksum) or a zstd frame.
pub fn compress(c: Compression, records: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    Ok(match c {
        Compression::None => records.to_vec(),
        Compression::Lz4 => {
            let info = lz4_flex::frame::FrameInfo::new()
                .block_mode(lz4_flex::frame::BlockMode::Independent)
                .block_size(lz4_flex::frame::BlockSize::Max64KB);
            let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
            enc.write_all(records)?;
            enc.finish()?
        }
        Compression::Zstd => zstd::bulk::compress(records, 1)?,
    })
}

/// Decompresses a records section of a batch this tool built (tests check the encoding with it),
/// refusing output past [`BATCH_BYTES_MAX`]: fetched data is never expanded on the load path.
pub fn decompress(c: Compression, body: &[u8]) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    let limit = BATCH_BYTES_MAX as u64 + 1;
    match c {
        Compression::None => out.extend_from_slice(body),
        Compression::Lz4 => {
            lz4_flex::frame::FrameDecoder::new(body)
                .take(limit)
                .read_to_end(&mut out)?;
        }
        Compression::Zstd => {
            zstd::stream::read::Decoder::new(body)?
                .take(limit)
                .read_to_end(&mut out)?;
        }
    }
    if out.len() > BATCH_BYTES_MAX {
        bail!("records section decompresses past {BATCH_BYTES_MAX} bytes");
    }
    Ok(out)
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
    assert!(batch.len() >= HEADER_BYTES && batch[OFF_MAGIC] == 2);
    batch[OFF_BASE_TIMESTAMP..OFF_BASE_TIMESTAMP + 8].copy_from_slice(&now_ms.to_be_bytes());
    batch[OFF_MAX_TIMESTAMP..OFF_MAX_TIMESTAMP + 8].copy_from_slice(&now_ms.to_be_bytes());
    if let Some(p) = producer {
        batch[OFF_PRODUCER_ID..OFF_PRODUCER_ID + 8].copy_from_slice(&p.producer_id.to_be_bytes());
        batch[OFF_PRODUCER_EPOCH..OFF_PRODUCER_EPOCH + 2].copy_from_slice(&p.epoch.to_be_bytes());
        batch[OFF_BASE_SEQUENCE..OFF_BASE_SEQUENCE + 4]
            .copy_from_slice(&p.base_sequence.to_be_bytes());
    }
    if let Some(at) = stamp_at {
        batch[at..at + 8].copy_from_slice(&now_us.to_be_bytes());
    }
    let crc = crc32c::crc32c(&batch[OFF_ATTRIBUTES..]);
    batch[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
}

/// The facts a consumer needs from one fetched batch, read without decompressing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchInfo {
    pub base_offset: i64,
    pub last_offset_delta: i32,
    pub records: i32,
    pub bytes: usize,
    pub base_timestamp_ms: i64,
    pub compression: i16,
    pub crc_ok: bool,
    /// The producer's send time in microseconds, if the batch is uncompressed and its first
    /// record's value holds at least 8 bytes.
    pub stamp_us: Option<i64>,
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_be_bytes(a)
}

/// Walks the concatenated batches of a fetched records section. A trailing partial batch (Kafka
/// may cut the last one at the size limit) is ignored; anything else malformed is an error.
pub fn scan_batches(buf: &[u8], check_crc: bool, mut f: impl FnMut(BatchInfo)) -> Result<usize> {
    let mut at = 0usize;
    let mut n = 0;
    while buf.len() - at >= HEADER_BYTES {
        let b = &buf[at..];
        let len = be_i32(b, OFF_BATCH_LENGTH);
        if len < (HEADER_BYTES - LOG_OVERHEAD_BYTES) as i32 {
            bail!("fetched batch with impossible length {len}");
        }
        let size = len as usize + LOG_OVERHEAD_BYTES;
        if size > b.len() {
            break; // partial batch at the end of the response
        }
        if b[OFF_MAGIC] != 2 {
            bail!("fetched batch with magic {} (need 2)", b[OFF_MAGIC]);
        }
        let b = &b[..size];
        let attributes = i16::from_be_bytes([b[OFF_ATTRIBUTES], b[OFF_ATTRIBUTES + 1]]);
        let compression = attributes & 0x07;
        let crc_ok =
            !check_crc || crc32c::crc32c(&b[OFF_ATTRIBUTES..]) == be_i32(b, OFF_CRC) as u32;
        let stamp_us = if compression == 0 {
            first_value_stamp(&b[HEADER_BYTES..])
        } else {
            None
        };
        f(BatchInfo {
            base_offset: be_i64(b, 0),
            last_offset_delta: be_i32(b, OFF_LAST_OFFSET_DELTA),
            records: be_i32(b, OFF_RECORD_COUNT),
            bytes: size,
            base_timestamp_ms: be_i64(b, OFF_BASE_TIMESTAMP),
            compression,
            crc_ok,
            stamp_us,
        });
        at += size;
        n += 1;
    }
    Ok(n)
}

/// First 8 bytes of the first record's value, if present.
fn first_value_stamp(records: &[u8]) -> Option<i64> {
    let (_len, mut at) = get_varint(records)?;
    at += 1; // attributes
    let (_, n) = get_varint(records.get(at..)?)?; // timestamp delta
    at += n;
    let (_, n) = get_varint(records.get(at..)?)?; // offset delta
    at += n;
    let (klen, n) = get_varint(records.get(at..)?)?;
    // A fetched key length can be anything: checked arithmetic, then bounds-checked access.
    at = at
        .checked_add(n)?
        .checked_add(usize::try_from(klen.max(0)).ok()?)?;
    let (vlen, n) = get_varint(records.get(at..)?)?;
    at = at.checked_add(n)?;
    if vlen < 8 {
        return None;
    }
    let stamp: [u8; 8] = records.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(i64::from_be_bytes(stamp))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn uncompressed_batch_has_valid_header_and_crc() {
        let pool =
            BatchPool::build(&spec(Compression::None, Payload::Random, Keys::None), 4).unwrap();
        assert_eq!(pool.batches.len(), 4);
        let b = &pool.batches[0];
        assert_eq!(b.records, 50);
        assert_eq!(b.payload_bytes, 5000);
        let mut seen = vec![];
        scan_batches(&b.bytes, true, |i| seen.push(i)).unwrap();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].crc_ok);
        assert_eq!(seen[0].records, 50);
        assert_eq!(seen[0].last_offset_delta, 49);
        assert_eq!(seen[0].bytes, b.bytes.len());
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
        let mut info = None;
        scan_batches(&copy, true, |i| info = Some(i)).unwrap();
        let info = info.unwrap();
        assert!(info.crc_ok);
        assert_eq!(info.base_timestamp_ms, 1_700_000_000_000);
        assert_eq!(info.stamp_us, Some(1_700_000_000_000_123));
        assert_eq!(be_i64(&copy, OFF_PRODUCER_ID), 9);
        assert_eq!(be_i32(&copy, OFF_BASE_SEQUENCE), 100);
    }

    #[test]
    fn compressed_batches_round_trip_and_text_compresses() {
        for c in [Compression::Lz4, Compression::Zstd] {
            let s = spec(c, Payload::Text, Keys::Fixed(3));
            let pool = BatchPool::build(&s, 3).unwrap();
            let b = &pool.batches[1];
            assert_eq!(b.key_index, 1);
            assert!(b.stamp_at.is_none());
            // Text compresses well below its 5,000 payload bytes (record framing included).
            assert!(b.bytes.len() < 3000, "{c:?}: {} bytes", b.bytes.len());
            let records = decompress(c, &b.bytes[HEADER_BYTES..]).unwrap();
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
            let mut info = None;
            scan_batches(&b.bytes, true, |i| info = Some(i)).unwrap();
            assert_eq!(info.unwrap().compression, c.attribute());
        }
    }

    #[test]
    fn scan_ignores_trailing_partial_batch_and_rejects_bad_magic() {
        let pool =
            BatchPool::build(&spec(Compression::None, Payload::Random, Keys::None), 2).unwrap();
        let mut all = pool.batches[0].bytes.to_vec();
        all.extend_from_slice(&pool.batches[1].bytes[..100]);
        assert_eq!(scan_batches(&all, true, |_| {}).unwrap(), 1);
        let mut bad = pool.batches[0].bytes.to_vec();
        bad[OFF_MAGIC] = 1;
        assert!(scan_batches(&bad, true, |_| {}).is_err());
        let mut flipped = pool.batches[0].bytes.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let mut ok = true;
        scan_batches(&flipped, true, |i| ok = i.crc_ok).unwrap();
        assert!(!ok);
    }

    #[test]
    fn varints_round_trip() {
        for v in [
            0i64,
            1,
            -1,
            63,
            -64,
            64,
            300,
            -300,
            i32::MAX as i64,
            i64::MIN,
            i64::MAX,
        ] {
            let mut out = vec![];
            put_varint(&mut out, v);
            assert_eq!(get_varint(&out), Some((v, out.len())));
        }
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
    fn decompression_past_the_batch_limit_is_an_error() {
        let zeros = vec![0u8; BATCH_BYTES_MAX + 1];
        for c in [Compression::Lz4, Compression::Zstd] {
            let z = compress(c, &zeros).unwrap();
            assert!(decompress(c, &z).is_err(), "{c:?}");
        }
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..300)) {
                let _ = scan_batches(&data, true, |_| {});
                let _ = first_value_stamp(&data);
                let _ = decompress(Compression::Lz4, &data);
                let _ = decompress(Compression::Zstd, &data);
            }

            #[test]
            fn pooled_batches_scan_and_mutations_never_panic(
                c in prop_oneof![Just(Compression::None), Just(Compression::Lz4), Just(Compression::Zstd)],
                flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..), 0..4),
                huge in prop::option::of(any::<prop::sample::Index>()),
                cut in prop::option::of(any::<prop::sample::Index>()),
            ) {
                let pool = BatchPool::build(&spec(c, Payload::Text, Keys::Random), 1).unwrap();
                let b = pool.batches[0].bytes.to_vec();
                let mut n = 0;
                prop_assert_eq!(scan_batches(&b, true, |i| { n += 1; assert!(i.crc_ok) }).unwrap(), 1);
                prop_assert_eq!(decompress(c, &b[HEADER_BYTES..]).unwrap().is_empty(), false);
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
                let _ = scan_batches(&m, true, |_| {});
                if m.len() > HEADER_BYTES {
                    let _ = first_value_stamp(&m[HEADER_BYTES..]);
                    let _ = decompress(c, &m[HEADER_BYTES..]);
                }
            }
        }
    }
}
