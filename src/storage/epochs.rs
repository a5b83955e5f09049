//! The leader-epoch cache of one partition log: for every leader epoch (the raft term of a
//! replicated partition) the offset of its first batch, in increasing order of both — Kafka's
//! `leader-epoch-checkpoint`. It answers OffsetsForLeaderEpoch ([`LeaderEpochs::end_offset_for`])
//! and tells a follower where its log diverges from the leader's.
//!
//! Built from the batch headers (`partitionLeaderEpoch`): an append of a batch whose epoch is
//! larger than the latest adds an entry; batches of epoch -1 (unreplicated logs, clients that do
//! not stamp it) and of an older epoch add nothing. Persisted in `leader-epoch.checkpoint`
//! whenever an entry is added or removed, before the batch that added it is accepted, so the
//! file never lacks an epoch the log holds; it may hold an entry for a batch a crash lost, which
//! recovery drops (entries at or past the recovered log end). A missing or damaged file is
//! rebuilt by scanning the segments. Owned by the partition log's `State`.

use std::path::Path;

use crate::storage::meta;
use crate::types::Offset;

pub const EPOCH_FILE: &str = "leader-epoch.checkpoint";

/// Epoch and offset answered when no epoch applies (Kafka's UNDEFINED_EPOCH and
/// UNDEFINED_EPOCH_OFFSET).
pub const UNDEFINED_EPOCH: i32 = -1;
pub const UNDEFINED_OFFSET: Offset = Offset(-1);

/// Bytes of one entry in the checkpoint file: epoch i32, start offset i64.
const ENTRY_BYTES: usize = 12;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderEpochs {
    /// (epoch, start offset), both strictly increasing.
    entries: Vec<(i32, Offset)>,
}

impl LeaderEpochs {
    pub fn entries(&self) -> &[(i32, Offset)] {
        &self.entries
    }

    /// The latest epoch, if any batch carried one.
    pub fn latest(&self) -> Option<i32> {
        self.entries.last().map(|e| e.0)
    }

    /// A batch of `epoch` starting at `base` is appended. Returns true when it starts a new
    /// epoch (the caller persists the cache).
    pub fn observe(&mut self, epoch: i32, base: Offset) -> bool {
        if epoch < 0 {
            return false;
        }
        match self.entries.last() {
            Some(&(e, start)) if epoch <= e || base <= start => false,
            _ => {
                self.entries.push((epoch, base));
                true
            }
        }
    }

    /// The log is cut at `end`: entries starting at or past it go. Returns true if any did.
    pub fn truncate_from(&mut self, end: Offset) -> bool {
        let n = self.entries.len();
        self.entries.retain(|e| e.1 < end);
        self.entries.len() != n
    }

    /// OffsetsForLeaderEpoch, as Kafka's `LeaderEpochFileCache.endOffsetFor`: the largest epoch
    /// at or below `requested` and the offset where it ended (the start of the next epoch, or
    /// `log_end` for the latest). A requested epoch below the first known one answers itself
    /// with the first epoch's start; one above the latest, or none known, answers undefined.
    pub fn end_offset_for(&self, requested: i32, log_end: Offset) -> (i32, Offset) {
        if requested < 0 {
            return (UNDEFINED_EPOCH, UNDEFINED_OFFSET);
        }
        if self.latest() == Some(requested) {
            return (requested, log_end);
        }
        let higher = self.entries.partition_point(|e| e.0 <= requested);
        let Some(&(_, higher_start)) = self.entries.get(higher) else {
            return (UNDEFINED_EPOCH, UNDEFINED_OFFSET);
        };
        match higher.checked_sub(1).map(|i| self.entries[i]) {
            None => (requested, higher_start),
            Some((floor, _)) => (floor, higher_start),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + self.entries.len() * ENTRY_BYTES);
        v.extend_from_slice(&(self.entries.len() as u32).to_be_bytes());
        for (e, o) in &self.entries {
            v.extend_from_slice(&e.to_be_bytes());
            v.extend_from_slice(&o.0.to_be_bytes());
        }
        v
    }

    /// `None` unless the body is exactly `count` well-ordered entries.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let count = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
        let rest = &b[4..];
        if rest.len() != count.checked_mul(ENTRY_BYTES)? {
            return None;
        }
        let mut out = LeaderEpochs::default();
        for c in rest.chunks_exact(ENTRY_BYTES) {
            let e = i32::from_be_bytes(c[..4].try_into().ok()?);
            let o = Offset(i64::from_be_bytes(c[4..].try_into().ok()?));
            if o < Offset(0) || !out.observe(e, o) {
                return None;
            }
        }
        Some(out)
    }

    pub fn load(dir: &Path) -> Option<Self> {
        meta::read_file(&dir.join(EPOCH_FILE)).and_then(|b| Self::decode(&b))
    }

    /// Replaces the checkpoint file atomically and durably.
    pub fn persist(&self, dir: &Path) -> std::io::Result<()> {
        meta::write_file(&dir.join(EPOCH_FILE), &self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(entries: &[(i32, i64)]) -> LeaderEpochs {
        let mut c = LeaderEpochs::default();
        for &(e, o) in entries {
            assert!(c.observe(e, Offset(o)));
        }
        c
    }

    #[test]
    fn observe_keeps_epochs_and_starts_increasing() {
        let mut c = LeaderEpochs::default();
        assert!(!c.observe(-1, Offset(0)), "epoch -1 is no epoch");
        assert!(c.observe(1, Offset(0)));
        assert!(!c.observe(1, Offset(5)), "same epoch continues");
        assert!(!c.observe(0, Offset(6)), "an older epoch adds nothing");
        assert!(c.observe(3, Offset(7)));
        assert_eq!(c.entries(), &[(1, Offset(0)), (3, Offset(7))]);
        assert!(c.truncate_from(Offset(7)));
        assert!(!c.truncate_from(Offset(7)));
        assert_eq!(c.latest(), Some(1));
    }

    #[test]
    fn end_offset_for_follows_kafka() {
        let c = cache(&[(2, 10), (4, 20), (7, 35)]);
        let end = Offset(50);
        assert_eq!(c.end_offset_for(7, end), (7, end));
        assert_eq!(c.end_offset_for(4, end), (4, Offset(35)));
        assert_eq!(
            c.end_offset_for(5, end),
            (4, Offset(35)),
            "largest epoch <= 5"
        );
        assert_eq!(c.end_offset_for(2, end), (2, Offset(20)));
        assert_eq!(c.end_offset_for(1, end), (1, Offset(10)), "below the first");
        assert_eq!(
            c.end_offset_for(8, end),
            (UNDEFINED_EPOCH, UNDEFINED_OFFSET)
        );
        assert_eq!(
            c.end_offset_for(-1, end),
            (UNDEFINED_EPOCH, UNDEFINED_OFFSET)
        );
        assert_eq!(
            LeaderEpochs::default().end_offset_for(0, end),
            (UNDEFINED_EPOCH, UNDEFINED_OFFSET)
        );
    }

    #[test]
    fn decode_refuses_bad_counts_and_disorder() {
        let c = cache(&[(2, 10), (4, 20)]);
        assert_eq!(LeaderEpochs::decode(&c.encode()), Some(c.clone()));
        let mut huge = c.encode();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(LeaderEpochs::decode(&huge), None);
        let disorder = LeaderEpochs {
            entries: vec![(4, Offset(10)), (2, Offset(20))],
        };
        assert_eq!(LeaderEpochs::decode(&disorder.encode()), None);
        assert_eq!(LeaderEpochs::decode(&[0, 0]), None);
    }
}
