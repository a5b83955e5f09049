//! Transactions of one partition (KIP-98): for each producer with a transaction open here the
//! offset of its first batch, and the index of aborted transactions (producer, first offset,
//! offset of the ABORT marker). Fed by every appended batch header; gives the last stable
//! offset (LSO: the first offset of the oldest open transaction, or the high watermark) and the
//! aborted transactions a read_committed fetch reports.
//!
//! Persisted beside the producer snapshot (`transactions.snapshot`, same offset it covers; no
//! file when empty) and completed on recovery by the same replay of the batches that follow it.

use std::collections::BTreeMap;

use crate::protocol::batch::BatchHeader;
use crate::types::Offset;

/// Kafka's control record types of transaction markers.
pub const CONTROL_ABORT: i16 = 0;
pub const CONTROL_COMMIT: i16 = 1;

/// The snapshot file, next to the producer snapshot.
pub const TXN_FILE: &str = "transactions.snapshot";
const FORMAT_VERSION: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbortedTxn {
    pub producer_id: i64,
    pub first: Offset,
    /// The offset of the ABORT marker.
    pub last: Offset,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnIndex {
    /// Producer id -> first offset of its open transaction.
    ongoing: BTreeMap<i64, Offset>,
    /// Ordered by marker offset (markers are appended in offset order).
    aborted: Vec<AbortedTxn>,
}

/// The control type of a transaction marker batch (`None` for anything else). A marker is one
/// uncompressed record whose key is `[version i16 = 0][type i16]`.
pub fn marker_type(h: &BatchHeader<'_>) -> Option<i16> {
    if !h.is_control() || h.compression() != 0 || h.record_count() < 1 {
        return None;
    }
    use crate::protocol::varint::read_varint;
    let body = h.bytes().get(crate::protocol::batch::HEADER_BYTES..)?;
    let mut at = 0usize;
    read_varint(body, &mut at).ok()?; // record length
    at += 1; // attributes
    read_varint(body, &mut at).ok()?; // timestamp delta
    read_varint(body, &mut at).ok()?; // offset delta
    let key_len = read_varint(body, &mut at).ok()?;
    if key_len != 4 {
        return None;
    }
    let key = body.get(at..at + 4)?;
    if key[..2] != [0, 0] {
        return None;
    }
    Some(i16::from_be_bytes([key[2], key[3]]))
}

impl TxnIndex {
    /// Notes one appended batch (at its final offsets).
    pub fn on_batch(&mut self, h: &BatchHeader<'_>) {
        let pid = h.producer_id();
        if pid < 0 || !h.is_transactional() {
            return;
        }
        if h.is_control() {
            let Some(kind) = marker_type(h) else { return };
            let first = self.ongoing.remove(&pid);
            if kind == CONTROL_ABORT {
                if let Some(first) = first {
                    self.aborted.push(AbortedTxn {
                        producer_id: pid,
                        first,
                        last: h.base_offset(),
                    });
                }
            }
        } else {
            self.ongoing.entry(pid).or_insert(h.base_offset());
        }
    }

    /// Nothing open and nothing aborted.
    pub fn is_empty(&self) -> bool {
        self.ongoing.is_empty() && self.aborted.is_empty()
    }

    /// The first offset of the oldest open transaction.
    pub fn first_unstable(&self) -> Option<Offset> {
        self.ongoing.values().min().copied()
    }

    /// Producers with a transaction open here.
    pub fn ongoing(&self) -> impl Iterator<Item = (i64, Offset)> + '_ {
        self.ongoing.iter().map(|(p, o)| (*p, *o))
    }

    /// Aborted transactions that overlap `[from, to)`, oldest first.
    pub fn aborted_between(&self, from: Offset, to: Offset) -> Vec<AbortedTxn> {
        // Markers are in offset order: skip those that end before `from`.
        let start = self.aborted.partition_point(|a| a.last < from);
        self.aborted[start..]
            .iter()
            .filter(|a| a.first < to)
            .copied()
            .collect()
    }

    /// Forgets what lies wholly below the new log start.
    pub fn start_moved(&mut self, log_start: Offset) {
        let k = self.aborted.partition_point(|a| a.last < log_start);
        self.aborted.drain(..k);
    }

    /// Forgets the aborted transactions whose ABORT markers lie below `offset`: the log cleaner
    /// removed those markers (and, before them, the transactions' data).
    pub fn forget_aborted_below(&mut self, offset: Offset) {
        self.start_moved(offset);
    }

    /// Forgets what starts at or past `end` (a cut tail).
    pub fn truncate_from(&mut self, end: Offset) {
        self.ongoing.retain(|_, first| *first < end);
        self.aborted.retain(|a| a.last < end);
    }

    /// `[version u8][upto i64][n_ongoing u32]{pid i64, first i64}[n_aborted u32]{pid, first, last}`
    /// followed by a CRC-32C of everything before it.
    pub fn encode(&self, upto: Offset) -> Vec<u8> {
        let mut b =
            Vec::with_capacity(1 + 8 + 8 + self.ongoing.len() * 16 + self.aborted.len() * 24);
        b.push(FORMAT_VERSION);
        b.extend_from_slice(&upto.0.to_be_bytes());
        b.extend_from_slice(&(self.ongoing.len() as u32).to_be_bytes());
        for (p, o) in &self.ongoing {
            b.extend_from_slice(&p.to_be_bytes());
            b.extend_from_slice(&o.0.to_be_bytes());
        }
        b.extend_from_slice(&(self.aborted.len() as u32).to_be_bytes());
        for a in &self.aborted {
            b.extend_from_slice(&a.producer_id.to_be_bytes());
            b.extend_from_slice(&a.first.0.to_be_bytes());
            b.extend_from_slice(&a.last.0.to_be_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        b
    }

    /// The inverse of [`TxnIndex::encode`]; `None` for a damaged or foreign file. Counts are
    /// checked against the bytes present before anything is allocated for them.
    pub fn decode(b: &[u8]) -> Option<(Offset, TxnIndex)> {
        let (body, crc) = b.split_at_checked(b.len().checked_sub(4)?)?;
        if crc32c::crc32c(body).to_be_bytes() != crc {
            return None;
        }
        let mut r = Reader(body);
        if r.u8()? != FORMAT_VERSION {
            return None;
        }
        let upto = Offset(r.i64()?);
        let n = r.u32()? as usize;
        if n > r.0.len() / 16 {
            return None;
        }
        let mut ix = TxnIndex::default();
        for _ in 0..n {
            let (p, o) = (r.i64()?, r.i64()?);
            ix.ongoing.insert(p, Offset(o));
        }
        let n = r.u32()? as usize;
        if n > r.0.len() / 24 {
            return None;
        }
        ix.aborted.reserve(n);
        for _ in 0..n {
            ix.aborted.push(AbortedTxn {
                producer_id: r.i64()?,
                first: Offset(r.i64()?),
                last: Offset(r.i64()?),
            });
        }
        r.0.is_empty().then_some((upto, ix))
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (h, t) = self.0.split_first_chunk::<N>()?;
        self.0 = t;
        Some(*h)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|a| a[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take::<4>().map(u32::from_be_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take::<8>().map(i64::from_be_bytes)
    }
}

/// A transaction marker batch: one control record, key `[0][type]`, value
/// `[version i16 = 0][coordinator epoch i32]`, from `producer_id`/`epoch`, transactional.
pub fn marker_batch(producer_id: i64, epoch: i16, commit: bool, timestamp_ms: i64) -> Vec<u8> {
    use crate::protocol::builder::{BatchBuilder, BatchOptions, Record};
    let kind = if commit {
        CONTROL_COMMIT
    } else {
        CONTROL_ABORT
    };
    let mut key = [0u8; 4];
    key[2..].copy_from_slice(&kind.to_be_bytes());
    let value = [0u8; 6]; // version 0, coordinator epoch 0 (one coordinator per node)
    let mut b = BatchBuilder::new(BatchOptions {
        producer_id,
        producer_epoch: epoch,
        transactional: true,
        ..Default::default()
    });
    b.push(&Record {
        key: Some(&key),
        value: Some(&value),
        headers: &[],
        timestamp_ms,
    });
    let mut out = b.finish().expect("one small record");
    crate::protocol::batch::set_control(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_snapshot_counts_and_truncations_are_refused_before_allocating() {
        // A well-formed, checksummed snapshot claiming u32::MAX open transactions or aborts.
        let sealed = |body: Vec<u8>| {
            let mut b = body;
            let crc = crc32c::crc32c(&b);
            b.extend_from_slice(&crc.to_be_bytes());
            b
        };
        let mut ongoing = vec![FORMAT_VERSION];
        ongoing.extend_from_slice(&7i64.to_be_bytes());
        ongoing.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(TxnIndex::decode(&sealed(ongoing)).is_none());
        let mut aborted = vec![FORMAT_VERSION];
        aborted.extend_from_slice(&7i64.to_be_bytes());
        aborted.extend_from_slice(&0u32.to_be_bytes());
        aborted.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(TxnIndex::decode(&sealed(aborted)).is_none());
        // Every truncation of a real snapshot, and a flipped byte, are refused.
        let mut ix = TxnIndex::default();
        ix.ongoing.insert(3, Offset(10));
        let good = ix.encode(Offset(20));
        assert!(TxnIndex::decode(&good).is_some());
        for cut in 0..good.len() {
            assert!(TxnIndex::decode(&good[..cut]).is_none(), "cut at {cut}");
        }
        let mut flipped = good.clone();
        flipped[3] ^= 1;
        assert!(TxnIndex::decode(&flipped).is_none());
    }

    fn data(pid: i64, base: i64) -> Vec<u8> {
        use crate::protocol::builder::{BatchBuilder, BatchOptions, Record};
        let mut b = BatchBuilder::new(BatchOptions {
            producer_id: pid,
            producer_epoch: 0,
            base_sequence: 0,
            transactional: true,
            ..Default::default()
        });
        b.push(&Record {
            key: None,
            value: Some(b"v"),
            headers: &[],
            timestamp_ms: 1,
        });
        let mut out = b.finish().unwrap();
        crate::protocol::batch::set_base_offset(&mut out, Offset(base));
        out
    }

    fn marker(pid: i64, commit: bool, at: i64) -> Vec<u8> {
        let mut m = marker_batch(pid, 0, commit, 1);
        crate::protocol::batch::set_base_offset(&mut m, Offset(at));
        m
    }

    /// A transactional batch of `pid` at sequence `seq`, with `value_bytes` per record.
    fn txn_batch(pid: i64, seq: i32, value_bytes: usize) -> Vec<u8> {
        use crate::protocol::builder::{BatchBuilder, BatchOptions, Record};
        let value = vec![7u8; value_bytes];
        let mut b = BatchBuilder::new(BatchOptions {
            producer_id: pid,
            producer_epoch: 0,
            base_sequence: seq,
            transactional: true,
            ..Default::default()
        });
        b.push(&Record {
            key: None,
            value: Some(&value),
            headers: &[],
            timestamp_ms: 1,
        });
        b.finish().unwrap()
    }

    #[test]
    fn open_transactions_and_aborts_survive_a_crash_and_a_clean_restart_and_hold_the_log_start() {
        use crate::storage::tests::{append, open, run, small_config};
        use crate::storage::{Durability, PartitionLog};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let log = open(&d, small_config()).await;
            let a = append(&log, &txn_batch(7, 0, 10), Durability::Synced).await;
            let b = append(&log, &txn_batch(8, 0, 10), Durability::Synced).await;
            assert_eq!(log.last_stable_offset(), a.base_offset);
            let m = append(&log, &marker_batch(7, 0, false, 1), Durability::Synced).await;
            assert_eq!(log.last_stable_offset(), b.base_offset);
            // Enough plain batches to roll segments: the snapshot is written at each roll and
            // the crash below replays the active segment after it.
            for i in 0..40u8 {
                append(
                    &log,
                    &crate::storage::tests::batch(1, 4000, 1, i),
                    Durability::Synced,
                )
                .await;
            }
            assert!(log.segment_count() > 2);
            let aborted = vec![AbortedTxn {
                producer_id: 7,
                first: a.base_offset,
                last: m.base_offset,
            }];
            drop(log); // a crash: no close
            let log = open(&d, small_config()).await;
            assert_eq!(log.last_stable_offset(), b.base_offset);
            assert_eq!(
                log.aborted_between(Offset(0), log.high_watermark()),
                aborted
            );
            // Neither DeleteRecords nor retention cuts into the open transaction.
            let hw = log.high_watermark();
            assert_eq!(log.delete_records_before(hw).await.unwrap(), b.base_offset);
            append(&log, &marker_batch(8, 0, true, 1), Durability::Synced).await;
            assert_eq!(log.last_stable_offset(), log.high_watermark());
            log.close().await.unwrap();
            drop(log);
            let log: std::rc::Rc<PartitionLog> = open(&d, small_config()).await;
            assert_eq!(log.last_stable_offset(), log.high_watermark());
            assert!(log.open_transactions().is_empty());
            // The abort lies below the log start now: forgotten once the start moves again.
            let hw = log.high_watermark();
            log.delete_records_before(hw).await.unwrap();
            assert!(log.aborted_between(Offset(0), hw).is_empty());
        });
    }

    #[test]
    fn lso_and_aborted_index_follow_markers() {
        let mut ix = TxnIndex::default();
        for b in [data(1, 0), data(2, 1), data(1, 2)] {
            ix.on_batch(&BatchHeader::parse(&b).unwrap());
        }
        assert_eq!(ix.first_unstable(), Some(Offset(0)));
        let m = marker(1, false, 3);
        assert_eq!(
            marker_type(&BatchHeader::parse(&m).unwrap()),
            Some(CONTROL_ABORT)
        );
        ix.on_batch(&BatchHeader::parse(&m).unwrap());
        assert_eq!(ix.first_unstable(), Some(Offset(1)));
        ix.on_batch(&BatchHeader::parse(&marker(2, true, 4)).unwrap());
        assert_eq!(ix.first_unstable(), None);
        let ab = ix.aborted_between(Offset(0), Offset(10));
        assert_eq!(
            ab,
            vec![AbortedTxn {
                producer_id: 1,
                first: Offset(0),
                last: Offset(3)
            }]
        );
        assert!(ix.aborted_between(Offset(4), Offset(10)).is_empty());
        let enc = ix.encode(Offset(5));
        assert_eq!(TxnIndex::decode(&enc), Some((Offset(5), ix.clone())));
        let mut bad = enc.clone();
        bad[3] ^= 1;
        assert_eq!(TxnIndex::decode(&bad), None);
        assert_eq!(TxnIndex::decode(&enc[..3]), None);
        ix.start_moved(Offset(4));
        assert!(ix.aborted_between(Offset(0), Offset(10)).is_empty());
    }
}
