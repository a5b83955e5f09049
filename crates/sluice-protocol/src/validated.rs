//! Concatenated RecordBatch v2 batches checked once: length, magic, record count and CRC-32C of
//! every batch, in one pass over the bytes. What the check learned travels with the bytes
//! ([`Validated`]), so whoever appends them later (on any shard) walks the known batch
//! boundaries instead of parsing and checksumming again.
//!
//! The one edit that changes checksummed bytes, stamping LogAppendTime (a topic setting), is
//! made during the check ([`Validated::check_stamping`]): the checksum of the part of each batch
//! the stamp leaves alone (from `producerId` on, the records) is computed once and combined with
//! the old header's to check the batch and with the new header's to write its new CRC, so the
//! record bytes are checksummed once either way.

use bytes::{Bytes, BytesMut};

use crate::batch::{
    self, BatchError, BatchHeader, ATTR_TIMESTAMP_LOG_APPEND, OFF_ATTRIBUTES, OFF_CRC,
    OFF_MAX_TIMESTAMP, OFF_PRODUCER_ID,
};
use crate::Offset;

/// Batches one produce request carries for one partition are usually a single one; more are
/// held on the heap.
const INLINE_BATCHES: usize = 2;

/// One batch of a [`Validated`] set: where it ends.
#[derive(Debug, Clone, Copy)]
struct Span {
    end: u32,
}

/// Whole RecordBatch v2 batches whose framing and checksums were checked (see the module
/// docs). The only way to make one is [`Validated::check`]; the bytes can be edited only
/// through methods that keep the batches valid (offsets and leader epochs, which the CRC does
/// not cover; LogAppendTime, which rewrites it).
#[derive(Debug)]
pub struct Validated {
    bytes: BytesMut,
    spans: smallvec::SmallVec<[Span; INLINE_BATCHES]>,
}

impl Validated {
    /// Checks every batch of `bytes` (at least one; length, magic 2, record count, CRC-32C).
    pub fn check(bytes: BytesMut) -> Result<Validated, BatchError> {
        if bytes.is_empty() {
            return Err(BatchError::Truncated);
        }
        let mut spans = smallvec::SmallVec::new();
        let mut at = 0usize;
        while at < bytes.len() {
            let h = BatchHeader::parse_checked(&bytes[at..])?;
            at += h.size();
            // `batch_size` is at most i32::MAX + 12 per batch; a buffer past u32 is refused.
            let end = u32::try_from(at).map_err(|_| BatchError::BadLength)?;
            spans.push(Span { end });
        }
        Ok(Validated { bytes, spans })
    }

    /// Batches whose checksums were checked already, once, where they entered this node (a
    /// replicated partition's entries: by the leader when it received the produce, by a
    /// follower when the entry arrived from its leader): length, magic and record count are
    /// checked here, the CRC-32C is not (in debug builds it is asserted).
    pub fn check_framing(bytes: BytesMut) -> Result<Validated, BatchError> {
        if bytes.is_empty() {
            return Err(BatchError::Truncated);
        }
        let mut spans = smallvec::SmallVec::new();
        let mut at = 0usize;
        while at < bytes.len() {
            let h = BatchHeader::parse(&bytes[at..])?;
            debug_assert!(
                h.crc_ok(),
                "a batch whose CRC was checked before is damaged"
            );
            at += h.size();
            let end = u32::try_from(at).map_err(|_| BatchError::BadLength)?;
            spans.push(Span { end });
        }
        Ok(Validated { bytes, spans })
    }

    /// Every batch's header, in order; nothing is parsed or checked again.
    pub fn headers(&self) -> impl Iterator<Item = BatchHeader<'_>> + '_ {
        let mut start = 0usize;
        self.spans.iter().map(move |s| {
            let end = s.end as usize;
            let h = BatchHeader::trusted(&self.bytes[start..end]);
            start = end;
            h
        })
    }

    /// How many batches there are.
    pub fn batch_count(&self) -> usize {
        self.spans.len()
    }

    /// The bytes of all batches.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: a `Validated` holds at least one batch.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes
    }

    /// The memory the bytes keep alive from their start: their buffer's capacity, at least
    /// [`len`](Self::len). A request's own buffer may have room past its batches.
    pub fn held(&self) -> usize {
        self.bytes.capacity().max(self.bytes.len())
    }

    /// [`check`](Self::check) that also marks every batch as LogAppendTime with `now_ms` as
    /// its max timestamp and writes its new CRC-32C, reading each batch's bytes once.
    pub fn check_stamping(mut bytes: BytesMut, now_ms: i64) -> Result<Validated, BatchError> {
        if bytes.is_empty() {
            return Err(BatchError::Truncated);
        }
        let mut spans = smallvec::SmallVec::new();
        let mut at = 0usize;
        while at < bytes.len() {
            let size = BatchHeader::parse(&bytes[at..])?.size();
            let b = &mut bytes[at..at + size];
            let tail_len = b.len() - OFF_PRODUCER_ID;
            let tail = crc32c::crc32c(&b[OFF_PRODUCER_ID..]);
            let head = crc32c::crc32c(&b[OFF_ATTRIBUTES..OFF_PRODUCER_ID]);
            let stored =
                u32::from_be_bytes([b[OFF_CRC], b[OFF_CRC + 1], b[OFF_CRC + 2], b[OFF_CRC + 3]]);
            if crc32c_combine(head, tail, tail_len) != stored {
                return Err(BatchError::BadCrc);
            }
            let attrs = i16::from_be_bytes([b[OFF_ATTRIBUTES], b[OFF_ATTRIBUTES + 1]])
                | ATTR_TIMESTAMP_LOG_APPEND;
            b[OFF_ATTRIBUTES..OFF_ATTRIBUTES + 2].copy_from_slice(&attrs.to_be_bytes());
            b[OFF_MAX_TIMESTAMP..OFF_MAX_TIMESTAMP + 8].copy_from_slice(&now_ms.to_be_bytes());
            let head = crc32c::crc32c(&b[OFF_ATTRIBUTES..OFF_PRODUCER_ID]);
            let crc = crc32c_combine(head, tail, tail_len);
            b[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
            at += size;
            let end = u32::try_from(at).map_err(|_| BatchError::BadLength)?;
            spans.push(Span { end });
        }
        Ok(Validated { bytes, spans })
    }

    /// Numbers the batches from `base` on, each right after the one before (the CRC does not
    /// cover `baseOffset`); returns the offset after the last.
    pub fn assign_offsets(&mut self, base: Offset) -> Offset {
        let mut next = base;
        let mut start = 0usize;
        for s in &self.spans {
            let end = s.end as usize;
            let b = &mut self.bytes[start..end];
            batch::set_base_offset(b, next);
            next = BatchHeader::trusted(b).last_offset().next();
            start = end;
        }
        next
    }

    /// Sets `partitionLeaderEpoch` of every batch (not covered by the CRC).
    pub fn set_partition_leader_epoch(&mut self, epoch: i32) {
        let mut start = 0usize;
        for s in &self.spans {
            let end = s.end as usize;
            batch::set_partition_leader_epoch(&mut self.bytes[start..end], epoch);
            start = end;
        }
    }

    /// Marks every batch as LogAppendTime with `now_ms` as its max timestamp and writes its new
    /// CRC-32C (both fields are covered by it).
    pub fn set_log_append_time(&mut self, now_ms: i64) {
        let mut start = 0usize;
        for s in &self.spans {
            let end = s.end as usize;
            batch::set_log_append_time(&mut self.bytes[start..end], now_ms);
            start = end;
        }
    }

    /// Splits off the first batch (`None` when this is the only one left): for callers that
    /// hand batches on one at a time.
    pub fn split_first(&mut self) -> Option<Validated> {
        if self.spans.len() < 2 {
            return None;
        }
        let first = self.spans.remove(0);
        let bytes = self.bytes.split_to(first.end as usize);
        for s in &mut self.spans {
            s.end -= first.end;
        }
        Some(Validated {
            bytes,
            spans: smallvec::smallvec![first],
        })
    }

    /// The bytes, for writing or storing.
    pub fn into_bytes(self) -> BytesMut {
        self.bytes
    }

    /// The bytes, frozen, with each batch's start and end in them.
    pub fn freeze(self) -> (Bytes, impl Iterator<Item = (usize, usize)>) {
        let mut start = 0usize;
        let ends = self.spans.into_iter().map(move |s| {
            let r = (start, s.end as usize);
            start = s.end as usize;
            r
        });
        (self.bytes.freeze(), ends)
    }
}

/// The reflected CRC-32C (Castagnoli) polynomial.
const CRC32C_POLY: u32 = 0x82f6_3b78;

/// `a · b` modulo the CRC-32C polynomial, both in the CRC's reflected bit order.
fn mul_mod_p(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0u32;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                return p;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 {
            (b >> 1) ^ CRC32C_POLY
        } else {
            b >> 1
        };
    }
}

/// `x^(2^k)` modulo the polynomial for every k a length can need (3 + the bits of a u64).
const X2N: [u32; 67] = {
    let mut t = [0u32; 67];
    let mut p = 1u32 << 30; // x^1
    let mut k = 0;
    while k < 67 {
        t[k] = p;
        // p = p · p mod P, spelled out for const evaluation.
        let (a, mut b) = (p, p);
        let mut m = 1u32 << 31;
        let mut r = 0u32;
        loop {
            if a & m != 0 {
                r ^= b;
                if a & (m - 1) == 0 {
                    break;
                }
            }
            m >>= 1;
            b = if b & 1 != 0 {
                (b >> 1) ^ CRC32C_POLY
            } else {
                b >> 1
            };
        }
        p = r;
        k += 1;
    }
    t
};

/// The CRC-32C of `A ‖ B` from `crc32c(A)`, `crc32c(B)` and `B`'s length: `crc1` shifted by
/// `len2` zero bytes (`x^(8·len2)`, one multiplication per set bit of the length, from the
/// table of squares), plus `crc2`. A few hundred word operations, independent of the bytes.
pub fn crc32c_combine(crc1: u32, crc2: u32, len2: usize) -> u32 {
    let mut shift = 1u32 << 31; // x^0
    let mut n = len2 as u64;
    let mut k = 3usize; // x^(8·n) = x^(n·2^3)
    while n != 0 {
        if n & 1 != 0 {
            shift = mul_mod_p(X2N[k], shift);
        }
        n >>= 1;
        k += 1;
    }
    mul_mod_p(shift, crc1) ^ crc2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{batch as build, Record};

    fn one(value: &[u8], ts: i64) -> Vec<u8> {
        build(&[Record {
            key: None,
            value: Some(value),
            headers: &[],
            timestamp_ms: ts,
        }])
    }

    #[test]
    fn accepts_good_batches_and_walks_their_headers() {
        let mut all = one(b"a", 1);
        all.extend_from_slice(&one(b"bb", 2));
        let v = Validated::check(BytesMut::from(&all[..])).unwrap();
        assert_eq!(v.batch_count(), 2);
        let sizes: Vec<usize> = v.headers().map(|h| h.size()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), all.len());
        assert!(v.headers().all(|h| h.crc_ok()));
    }

    #[test]
    fn refuses_a_bad_crc_truncation_and_empty_input() {
        let mut b = one(b"abc", 1);
        let last = b.len() - 1;
        b[last] ^= 1;
        assert_eq!(
            Validated::check(BytesMut::from(&b[..])).unwrap_err(),
            BatchError::BadCrc
        );
        let b = one(b"abc", 1);
        assert_eq!(
            Validated::check(BytesMut::from(&b[..b.len() - 1])).unwrap_err(),
            BatchError::Truncated
        );
        assert!(Validated::check(BytesMut::new()).is_err());
    }

    #[test]
    fn log_append_time_writes_a_crc_that_a_full_check_accepts() {
        let mut all = one(b"x", 5);
        all.extend_from_slice(&one(b"yy", 6));
        let mut v = Validated::check(BytesMut::from(&all[..])).unwrap();
        v.set_log_append_time(1_700_000_000_000);
        for h in v.headers() {
            assert!(h.crc_ok(), "crc rewritten");
            assert!(h.is_log_append_time());
            assert_eq!(h.max_timestamp(), 1_700_000_000_000);
        }
        // The same edit through the one-batch function gives the same bytes.
        let mut expect = all.clone();
        let n = batch::batch_size(&expect).unwrap();
        batch::set_log_append_time(&mut expect[..n], 1_700_000_000_000);
        batch::set_log_append_time(&mut expect[n..], 1_700_000_000_000);
        assert_eq!(v.as_slice(), &expect[..]);
    }

    #[test]
    fn combine_matches_a_checksum_of_the_whole() {
        let data: Vec<u8> = (0..20_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for split in [0, 1, 7, 22, 61, 4096, 12_345, 19_999, 20_000] {
            let (a, b) = data.split_at(split);
            let whole = crc32c::crc32c(&data);
            assert_eq!(
                crc32c_combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len()),
                whole,
                "split at {split}"
            );
        }
    }

    #[test]
    fn check_stamping_gives_what_check_then_stamp_gives_and_refuses_bad_crcs() {
        let mut all = one(b"x", 5);
        all.extend_from_slice(&one(&[7u8; 3000], 6));
        let now = 1_700_000_000_123;
        let stamped = Validated::check_stamping(BytesMut::from(&all[..]), now).unwrap();
        let mut two_pass = Validated::check(BytesMut::from(&all[..])).unwrap();
        two_pass.set_log_append_time(now);
        assert_eq!(stamped.as_slice(), two_pass.as_slice());
        assert_eq!(stamped.batch_count(), 2);
        assert!(stamped
            .headers()
            .all(|h| h.crc_ok() && h.is_log_append_time()));
        let mut bad = all.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        assert_eq!(
            Validated::check_stamping(BytesMut::from(&bad[..]), now).unwrap_err(),
            BatchError::BadCrc
        );
    }

    #[test]
    fn offsets_epochs_and_split_keep_batches_valid() {
        let mut all = one(b"x", 5);
        all.extend_from_slice(&one(b"yy", 6));
        let mut v = Validated::check(BytesMut::from(&all[..])).unwrap();
        assert_eq!(v.assign_offsets(Offset(10)), Offset(12));
        v.set_partition_leader_epoch(7);
        let bases: Vec<i64> = v.headers().map(|h| h.base_offset().0).collect();
        assert_eq!(bases, [10, 11]);
        let first = v.split_first().unwrap();
        assert_eq!(first.batch_count(), 1);
        assert_eq!(v.batch_count(), 1);
        assert!(v.split_first().is_none());
        for h in first.headers().chain(v.headers()) {
            assert!(h.crc_ok());
            assert_eq!(h.partition_leader_epoch(), 7);
        }
    }
}
