//! Record decoding for uncompressed RecordBatch v2 batches: the broker looks inside records only
//! where it reads its own internal topics (`__consumer_offsets`). Pure functions over bytes;
//! every length read off the buffer is checked.
//!
//! ```text
//! record := length:varint attributes:i8 timestampDelta:varlong offsetDelta:varint
//!           keyLength:varint key valueLength:varint value headerCount:varint header*
//! header := keyLength:varint key valueLength:varint value
//! ```
//! Lengths of -1 mean null. Varints are zigzag-encoded (protobuf style).

use bytes::Bytes;

use crate::batch::{BatchHeader, HEADER_BYTES};
use crate::varint::{self, VarintError};

/// The smallest encoded record: length, attributes, timestamp delta, offset delta, key length,
/// value length and header count, one byte each.
pub const RECORD_BYTES_MIN: usize = 7;

/// Why records did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// Ran off the end of the buffer.
    Truncated,
    /// A varint longer than 10 bytes, or a negative length other than -1.
    BadLength,
    /// The batch is compressed; callers decompress first.
    Compressed(i16),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Truncated => write!(f, "record truncated"),
            RecordError::BadLength => write!(f, "record length or varint invalid"),
            RecordError::Compressed(c) => write!(f, "compressed batch (codec {c}) not decoded"),
        }
    }
}
impl std::error::Error for RecordError {}

/// One decoded record. Keys, values and header values share the batch's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(Bytes, Option<Bytes>)>,
}

impl From<VarintError> for RecordError {
    fn from(e: VarintError) -> RecordError {
        match e {
            VarintError::Truncated => RecordError::Truncated,
            VarintError::TooLong => RecordError::BadLength,
        }
    }
}

/// Reads one zigzag varint, as a record field.
#[inline]
fn read_varint(buf: &[u8], at: &mut usize) -> Result<i64, RecordError> {
    Ok(varint::read_varint(buf, at)?)
}

fn read_bytes(buf: &Bytes, at: &mut usize) -> Result<Option<Bytes>, RecordError> {
    let len = read_varint(buf, at)?;
    if len == -1 {
        return Ok(None);
    }
    let len = usize::try_from(len).map_err(|_| RecordError::BadLength)?;
    let end = at.checked_add(len).ok_or(RecordError::BadLength)?;
    if end > buf.len() {
        return Err(RecordError::Truncated);
    }
    let b = buf.slice(*at..end);
    *at = end;
    Ok(Some(b))
}

/// Decodes every record of one uncompressed batch (`batch` holds exactly the batch).
pub fn decode_batch(batch: &Bytes) -> Result<Vec<Record>, RecordError> {
    let h = BatchHeader::parse(batch).map_err(|_| RecordError::Truncated)?;
    if h.compression() != 0 {
        return Err(RecordError::Compressed(h.compression()));
    }
    decode_records(
        &batch.slice(HEADER_BYTES..h.size()),
        h.base_offset().0,
        h.base_timestamp(),
        h.record_count(),
    )
}

/// Decodes `count` records from an (uncompressed or already decompressed) records section,
/// numbering them from `base_offset` and timing them from `base_ts`.
pub fn decode_records(
    body: &Bytes,
    base_offset: i64,
    base_ts: i64,
    count: i32,
) -> Result<Vec<Record>, RecordError> {
    let count = usize::try_from(count).map_err(|_| RecordError::BadLength)?;
    let mut at = 0usize;
    // Each record needs at least 7 bytes (length, attributes, two deltas, key and value lengths,
    // header count): a count the body cannot hold is refused before any allocation.
    if count > body.len() / RECORD_BYTES_MIN {
        return Err(RecordError::BadLength);
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let len = read_varint(body, &mut at)?;
        let len = usize::try_from(len).map_err(|_| RecordError::BadLength)?;
        let end = at.checked_add(len).ok_or(RecordError::BadLength)?;
        if end > body.len() {
            return Err(RecordError::Truncated);
        }
        let rec = body.slice(at..end);
        at = end;
        let mut r = 1usize; // attributes: unused in v2 records
        if rec.is_empty() {
            return Err(RecordError::Truncated);
        }
        let ts_delta = read_varint(&rec, &mut r)?;
        let offset_delta = read_varint(&rec, &mut r)?;
        let key = read_bytes(&rec, &mut r)?;
        let value = read_bytes(&rec, &mut r)?;
        let n_headers = read_varint(&rec, &mut r)?;
        let n_headers = usize::try_from(n_headers).map_err(|_| RecordError::BadLength)?;
        // A header is at least two varints (key length, value length): a count the record's
        // remaining bytes cannot hold never sizes an allocation.
        if n_headers > rec.len().saturating_sub(r) / 2 {
            return Err(RecordError::BadLength);
        }
        let mut headers = Vec::with_capacity(n_headers);
        for _ in 0..n_headers {
            let k = read_bytes(&rec, &mut r)?.ok_or(RecordError::BadLength)?;
            let v = read_bytes(&rec, &mut r)?;
            headers.push((k, v));
        }
        out.push(Record {
            offset: base_offset.wrapping_add(offset_delta),
            timestamp_ms: base_ts.wrapping_add(ts_delta),
            key,
            value,
            headers,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::set_base_offset;
    use crate::builder as build;
    use crate::Offset;

    #[test]
    fn built_records_decode_with_offsets_keys_values_and_headers() {
        let recs = [
            build::Record {
                key: Some(b"k1"),
                value: None,
                headers: &[("h", Some(b"x")), ("n", None)],
                timestamp_ms: 1000,
            },
            build::Record {
                key: None,
                value: Some(&[7u8; 300]),
                headers: &[],
                timestamp_ms: 1005,
            },
        ];
        let mut b = build::batch(&recs);
        set_base_offset(&mut b, Offset(40));
        let out = decode_batch(&Bytes::from(b)).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].offset, 40);
        assert_eq!(out[0].key.as_deref(), Some(&b"k1"[..]));
        assert_eq!(out[0].value, None);
        assert_eq!(out[0].headers.len(), 2);
        assert_eq!(out[0].headers[1].1, None);
        assert_eq!(out[1].offset, 41);
        assert_eq!(out[1].timestamp_ms, 1005);
        assert_eq!(out[1].value.as_ref().map(|v| v.len()), Some(300));
    }

    #[test]
    fn truncated_and_garbage_records_are_errors_not_panics() {
        let b = build::single(Some(b"key"), Some(b"value"), 1);
        for cut in HEADER_BYTES..b.len() {
            let mut t = b[..cut].to_vec();
            // Keep the header's length consistent with the cut so only the records are short.
            let len = (cut - 12) as i32;
            t[8..12].copy_from_slice(&len.to_be_bytes());
            assert!(decode_batch(&Bytes::from(t)).is_err(), "cut at {cut}");
        }
        let mut g = b.clone();
        for x in g[HEADER_BYTES..].iter_mut() {
            *x = 0xff;
        }
        assert!(decode_batch(&Bytes::from(g)).is_err());
    }

    /// A valid batch whose header (and CRC) is rewritten after `edit`, so only the records are bad.
    fn with_records(edit: impl FnOnce(&mut Vec<u8>)) -> Bytes {
        let mut b = build::single(Some(b"k"), Some(b"v"), 1);
        edit(&mut b);
        let len = (b.len() - 12) as i32;
        b[8..12].copy_from_slice(&len.to_be_bytes());
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        Bytes::from(b)
    }

    #[test]
    fn record_count_of_i32_max_is_refused_before_allocating() {
        // Without the check this asks for 2^31 records (~250 GB) and aborts.
        let b = with_records(|b| b[57..61].copy_from_slice(&i32::MAX.to_be_bytes()));
        assert_eq!(decode_batch(&b), Err(RecordError::BadLength));
    }

    #[test]
    fn huge_header_count_and_lengths_are_errors() {
        // Record body: len, attrs, ts delta, offset delta, key len, value len, header count.
        // u32::MAX as a zigzag varint in each length position.
        let huge = [0xfe, 0xff, 0xff, 0xff, 0x1f];
        for field in 4..7 {
            let b = with_records(|b| {
                b.truncate(HEADER_BYTES);
                let mut rec = vec![0u8, 0, 0, 0, 1, 1, 0];
                rec.splice(field..field + 1, huge);
                rec.extend_from_slice(&[0u8; 8]);
                b.push((rec.len() as u8) << 1);
                b.extend_from_slice(&rec);
            });
            assert!(decode_batch(&b).is_err(), "field {field}");
        }
        // A record length of u32::MAX.
        let b = with_records(|b| {
            b.truncate(HEADER_BYTES);
            b.extend_from_slice(&huge);
            b.extend_from_slice(&[0u8; 8]);
        });
        assert!(decode_batch(&b).is_err());
    }

    mod fuzz {
        use super::*;
        use crate::batch::{for_each_batch, BatchHeader};
        use proptest::prelude::*;

        /// Key, value, headers, timestamp of one generated record.
        type Input = (
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            Vec<(String, Option<Vec<u8>>)>,
            i64,
        );
        type Headers<'a> = Vec<(&'a str, Option<&'a [u8]>)>;

        fn record() -> impl Strategy<Value = Input> {
            (
                prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
                prop::option::of(prop::collection::vec(any::<u8>(), 0..200)),
                prop::collection::vec(
                    (
                        "[a-z]{0,6}",
                        prop::option::of(prop::collection::vec(any::<u8>(), 0..10)),
                    ),
                    0..3,
                ),
                0i64..1_000_000,
            )
        }

        #[derive(Debug, Clone)]
        enum Mutation {
            Flip(prop::sample::Index, u8),
            Truncate(prop::sample::Index),
            /// Overwrite 4 bytes with i32::MAX / u32::MAX, or 5 with a u32::MAX varint.
            Huge(prop::sample::Index, u8),
        }

        fn mutation() -> impl Strategy<Value = Mutation> {
            prop_oneof![
                (any::<prop::sample::Index>(), 1u8..).prop_map(|(i, x)| Mutation::Flip(i, x)),
                any::<prop::sample::Index>().prop_map(Mutation::Truncate),
                (any::<prop::sample::Index>(), 0u8..3).prop_map(|(i, k)| Mutation::Huge(i, k)),
            ]
        }

        fn mutate(b: &mut Vec<u8>, m: &Mutation) {
            if b.is_empty() {
                return;
            }
            match m {
                Mutation::Flip(i, x) => {
                    let i = i.index(b.len());
                    b[i] ^= x;
                }
                Mutation::Truncate(i) => b.truncate(i.index(b.len())),
                Mutation::Huge(i, k) => {
                    let v: &[u8] = match k {
                        0 => &[0x7f, 0xff, 0xff, 0xff],
                        1 => &[0xff, 0xff, 0xff, 0xff],
                        _ => &[0xfe, 0xff, 0xff, 0xff, 0x1f],
                    };
                    if b.len() >= v.len() {
                        let i = i.index(b.len() - v.len() + 1);
                        b[i..i + v.len()].copy_from_slice(v);
                    }
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..300)) {
                let b = Bytes::from(data);
                let _ = BatchHeader::parse_checked(&b);
                let _ = for_each_batch(&b, false, |h| { let _ = (h.last_offset(), h.last_sequence()); });
                let _ = decode_batch(&b);
                let mut at = 0;
                while read_varint(&b, &mut at).is_ok() {}
            }

            #[test]
            fn valid_batches_round_trip_and_mutations_never_panic(
                recs in prop::collection::vec(record(), 1..8),
                mutations in prop::collection::vec(mutation(), 1..4),
                fix_crc in any::<bool>(),
                fix_length in any::<bool>(),
            ) {
                let headers: Vec<Headers<'_>> = recs
                    .iter()
                    .map(|r| r.2.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect())
                    .collect();
                let input: Vec<build::Record<'_>> = recs
                    .iter()
                    .zip(&headers)
                    .map(|(r, h)| build::Record {
                        key: r.0.as_deref(),
                        value: r.1.as_deref(),
                        headers: h,
                        timestamp_ms: r.3,
                    })
                    .collect();
                let b = build::batch(&input);
                // Round trip.
                let out = decode_batch(&Bytes::from(b.clone())).unwrap();
                prop_assert_eq!(out.len(), recs.len());
                for (i, (o, r)) in out.iter().zip(&recs).enumerate() {
                    prop_assert_eq!(o.offset, i as i64);
                    prop_assert_eq!(o.timestamp_ms, r.3);
                    prop_assert_eq!(o.key.as_deref(), r.0.as_deref());
                    prop_assert_eq!(o.value.as_deref(), r.1.as_deref());
                    prop_assert_eq!(o.headers.len(), r.2.len());
                }
                prop_assert!(BatchHeader::parse_checked(&b).is_ok());
                // Mutations: errors, never panics.
                let mut m = b;
                for x in &mutations {
                    mutate(&mut m, x);
                }
                if m.len() >= HEADER_BYTES {
                    if fix_length {
                        let len = (m.len() - 12) as i32;
                        m[8..12].copy_from_slice(&len.to_be_bytes());
                    }
                    if fix_crc {
                        let crc = crc32c::crc32c(&m[21..]);
                        m[17..21].copy_from_slice(&crc.to_be_bytes());
                    }
                }
                let m = Bytes::from(m);
                let _ = BatchHeader::parse_checked(&m);
                let _ = for_each_batch(&m, true, |_| {});
                if let Ok(out) = decode_batch(&m) {
                    prop_assert!(out.len() <= m.len() / RECORD_BYTES_MIN);
                }
            }
        }
    }
}
