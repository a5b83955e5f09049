//! Varints as Kafka writes them: unsigned LEB128 (`uvarint`, compact lengths and tagged fields)
//! and zigzag-encoded signed values (`varint`, record fields), at most 64 bits each.
//! Decoders are bounded: more than [`VARINT_BYTES_MAX`] bytes, or a buffer that ends mid-varint,
//! is an error.

use bytes::BufMut;

/// Longest encoding of a 64-bit value (⌈64 / 7⌉ bytes).
pub const VARINT_BYTES_MAX: usize = 10;

/// Why a varint did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarintError {
    /// The buffer ended before the last byte.
    Truncated,
    /// More than [`VARINT_BYTES_MAX`] bytes.
    TooLong,
}

impl std::fmt::Display for VarintError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VarintError::Truncated => write!(f, "varint truncated"),
            VarintError::TooLong => write!(f, "varint longer than {VARINT_BYTES_MAX} bytes"),
        }
    }
}
impl std::error::Error for VarintError {}

#[inline]
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[inline]
fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

/// Appends `v` as an unsigned varint.
#[inline]
pub fn put_uvarint(out: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

/// Appends `v` as a zigzag varint.
#[inline]
pub fn put_varint(out: &mut impl BufMut, v: i64) {
    put_uvarint(out, zigzag(v));
}

/// Bytes [`put_uvarint`] writes for `v`.
#[inline]
pub fn uvarint_len(v: u64) -> usize {
    // 1 byte per started group of 7 significant bits; 0 still takes one byte.
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Bytes [`put_varint`] writes for `v`.
#[inline]
pub fn varint_len(v: i64) -> usize {
    uvarint_len(zigzag(v))
}

/// Reads one unsigned varint from `buf[*at..]`, advancing `at` past it.
#[inline]
pub fn read_uvarint(buf: &[u8], at: &mut usize) -> Result<u64, VarintError> {
    let mut raw: u64 = 0;
    for i in 0..VARINT_BYTES_MAX {
        let b = *buf.get(*at).ok_or(VarintError::Truncated)?;
        *at += 1;
        raw |= ((b & 0x7f) as u64) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(raw);
        }
    }
    Err(VarintError::TooLong)
}

/// Reads one zigzag varint from `buf[*at..]`, advancing `at` past it.
#[inline]
pub fn read_varint(buf: &[u8], at: &mut usize) -> Result<i64, VarintError> {
    read_uvarint(buf, at).map(unzigzag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn varint_round_trips_extremes() {
        for v in [
            0i64,
            -1,
            1,
            63,
            -64,
            64,
            300,
            -300,
            i32::MAX as i64,
            i64::MIN,
            i64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            let mut at = 0;
            assert_eq!(read_varint(&out, &mut at), Ok(v));
            assert_eq!(at, out.len());
        }
    }

    #[test]
    fn uvarint_matches_known_encodings() {
        for (v, enc) in [
            (0u64, &[0x00][..]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ] {
            let mut out = bytes::BytesMut::new();
            put_uvarint(&mut out, v);
            assert_eq!(&out[..], enc, "{v}");
            assert_eq!(uvarint_len(v), enc.len());
            let mut at = 0;
            assert_eq!(read_uvarint(enc, &mut at), Ok(v));
        }
        // Zigzag: -1 is 1, 1 is 2.
        let mut out = Vec::new();
        put_varint(&mut out, -1);
        put_varint(&mut out, 1);
        assert_eq!(out, [1, 2]);
    }

    #[test]
    fn varints_longer_than_ten_bytes_or_truncated_are_errors() {
        let mut at = 0;
        assert_eq!(read_varint(&[0xff; 11], &mut at), Err(VarintError::TooLong));
        assert_eq!(at, 10);
        let mut at = 0;
        assert_eq!(
            read_varint(&[0x80; 3], &mut at),
            Err(VarintError::Truncated)
        );
        let mut at = 0;
        assert_eq!(read_uvarint(&[], &mut at), Err(VarintError::Truncated));
        let mut at = 0;
        // Ten bytes with every bit set decodes (the top bits drop) without overflow.
        let mut ten = [0xffu8; 10];
        ten[9] = 0x7f;
        assert!(read_varint(&ten, &mut at).is_ok());
    }

    proptest! {
        #[test]
        fn any_value_round_trips(v in any::<i64>(), u in any::<u64>()) {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            put_uvarint(&mut out, u);
            prop_assert_eq!(out.len(), varint_len(v) + uvarint_len(u));
            let mut at = 0;
            prop_assert_eq!(read_varint(&out, &mut at), Ok(v));
            prop_assert_eq!(read_uvarint(&out, &mut at), Ok(u));
            prop_assert_eq!(at, out.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..40)) {
            let mut at = 0;
            while read_varint(&data, &mut at).is_ok() {}
            prop_assert!(at <= data.len());
        }
    }
}
