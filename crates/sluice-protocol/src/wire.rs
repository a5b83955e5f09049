//! Encoding helpers for hand-written Kafka request/response encoders (the broker's Fetch
//! response writes stored batches between glue buffers it encodes itself).

use bytes::BufMut;

pub use crate::varint::put_uvarint;

/// Appends an array length: a compact (`n + 1` as an unsigned varint) length in flexible
/// versions, else an i32.
#[inline]
pub fn put_array_len(buf: &mut impl BufMut, flexible: bool, n: usize) {
    if flexible {
        put_uvarint(buf, n as u64 + 1);
    } else {
        buf.put_i32(i32::try_from(n).unwrap_or(i32::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_lengths_in_both_encodings() {
        let mut b = Vec::new();
        put_array_len(&mut b, true, 0);
        put_array_len(&mut b, true, 200);
        put_array_len(&mut b, false, 3);
        assert_eq!(b, [0x01, 0xc9, 0x01, 0, 0, 0, 3]);
    }
}
