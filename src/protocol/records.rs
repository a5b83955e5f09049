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

use crate::protocol::batch::{BatchHeader, HEADER_BYTES};

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

/// Reads one zigzag varint (at most 64 bits) from `buf[*at..]`.
pub fn read_varint(buf: &[u8], at: &mut usize) -> Result<i64, RecordError> {
    let mut raw: u64 = 0;
    for i in 0..10 {
        let b = *buf.get(*at).ok_or(RecordError::Truncated)?;
        *at += 1;
        raw |= ((b & 0x7f) as u64) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64));
        }
    }
    Err(RecordError::BadLength)
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
    let base_offset = h.base_offset().0;
    let base_ts = h.base_timestamp();
    let count = h.record_count() as usize;
    let body = batch.slice(HEADER_BYTES..h.size());
    let mut at = 0usize;
    // Each record needs at least 7 bytes: never pre-allocate more than the buffer can hold.
    let mut out = Vec::with_capacity(count.min(body.len() / 7 + 1));
    for _ in 0..count {
        let len = read_varint(&body, &mut at)?;
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
        if n_headers > rec.len() {
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
    use crate::protocol::batch::{build, set_base_offset};
    use crate::types::Offset;

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

    #[test]
    fn varint_round_trips_extremes() {
        for v in [
            0i64,
            -1,
            1,
            63,
            -64,
            64,
            i32::MAX as i64,
            i64::MIN,
            i64::MAX,
        ] {
            let mut out = Vec::new();
            let mut z = ((v << 1) ^ (v >> 63)) as u64;
            loop {
                if z < 0x80 {
                    out.push(z as u8);
                    break;
                }
                out.push((z as u8 & 0x7f) | 0x80);
                z >>= 7;
            }
            let mut at = 0;
            assert_eq!(read_varint(&out, &mut at), Ok(v));
            assert_eq!(at, out.len());
        }
    }
}
