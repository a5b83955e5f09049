//! Idempotent-producer state of one partition (KIP-98): per producer id its epoch and the last
//! [`BATCHES_MAX`] batches (first/last sequence, base/last offset), used to answer retries with
//! the original offsets and to refuse sequence gaps and fenced epochs. Owned by the partition log;
//! persisted as a snapshot on roll and close (see [`super::meta`]) and completed on recovery by
//! replaying the batch headers that follow the snapshot.

use std::collections::{HashMap, VecDeque};

use crate::protocol::batch::BatchHeader;
use crate::storage::StorageError;
use crate::types::Offset;

/// Batches remembered per producer: Kafka's client keeps at most 5 in flight per connection.
pub const BATCHES_MAX: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMeta {
    pub first_seq: i32,
    pub last_seq: i32,
    pub base: Offset,
    pub last: Offset,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerEntry {
    pub epoch: i16,
    pub batches: VecDeque<BatchMeta>,
}

/// Outcome of checking one batch against the producer state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Not idempotent (producer id < 0) or in sequence: append it.
    Append,
    /// A retry of a batch already in the log, at these offsets.
    Duplicate(BatchMeta),
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProducerState {
    pub producers: HashMap<i64, ProducerEntry>,
}

fn next_seq(seq: i32) -> i32 {
    if seq == i32::MAX {
        0
    } else {
        seq + 1
    }
}

impl ProducerState {
    /// Checks `h` against the state as it would be after `staged` (earlier batches of the same
    /// append, not yet applied). KIP-98 rules, as in Kafka's ProducerStateManager.
    pub fn check(
        &self,
        h: &BatchHeader<'_>,
        staged: &[(i64, i16, BatchMeta)],
    ) -> Result<Check, StorageError> {
        let pid = h.producer_id();
        if pid < 0 {
            return Ok(Check::Append);
        }
        let epoch = h.producer_epoch();
        if h.is_control() || h.base_sequence() < 0 {
            // A transaction marker, or a batch the broker wrote for a producer (a
            // transactional offset commit), carries no sequence: only an older epoch is
            // refused.
            return match self.producers.get(&pid) {
                Some(e) if epoch < e.epoch => Err(StorageError::InvalidProducerEpoch),
                _ => Ok(Check::Append),
            };
        }
        let first = h.base_sequence();
        let last = h.last_sequence();
        // The state of this producer: the persisted entry, then what this append staged.
        let mut cur_epoch = self.producers.get(&pid).map(|e| e.epoch);
        let mut last_seq = self
            .producers
            .get(&pid)
            .and_then(|e| e.batches.back())
            .map(|b| b.last_seq);
        for (p, e, m) in staged {
            if *p == pid {
                cur_epoch = Some(*e);
                last_seq = Some(m.last_seq);
            }
        }
        let Some(cur_epoch) = cur_epoch else {
            // Unknown producer (new, or its state expired with the log): any sequence starts it.
            return Ok(Check::Append);
        };
        if epoch < cur_epoch {
            return Err(StorageError::InvalidProducerEpoch);
        }
        if epoch > cur_epoch {
            // KIP-98: a bumped epoch restarts the sequence at 0.
            return if first == 0 {
                Ok(Check::Append)
            } else {
                Err(StorageError::OutOfOrderSequence)
            };
        }
        if let Some(e) = self.producers.get(&pid) {
            if let Some(m) = e
                .batches
                .iter()
                .find(|m| m.first_seq == first && m.last_seq == last)
            {
                return Ok(Check::Duplicate(*m));
            }
        }
        match last_seq {
            None => Ok(Check::Append),
            Some(l) if next_seq(l) == first => Ok(Check::Append),
            Some(_) => Err(StorageError::OutOfOrderSequence),
        }
    }

    /// Records an appended batch (at its final offsets).
    pub fn apply(&mut self, pid: i64, epoch: i16, m: BatchMeta) {
        if pid < 0 {
            return;
        }
        if m.first_seq < 0 {
            // No sequence to remember (see `check`): only the epoch moves.
            self.apply_marker(pid, epoch);
            return;
        }
        let e = self.producers.entry(pid).or_default();
        if e.epoch != epoch {
            e.epoch = epoch;
            e.batches.clear();
        }
        if e.batches.len() == BATCHES_MAX {
            e.batches.pop_front();
        }
        e.batches.push_back(m);
    }

    /// Records a transaction marker: it moves the producer to its epoch, with no sequence.
    pub fn apply_marker(&mut self, pid: i64, epoch: i16) {
        if pid < 0 {
            return;
        }
        let e = self.producers.entry(pid).or_insert_with(|| ProducerEntry {
            epoch,
            batches: Default::default(),
        });
        if epoch > e.epoch {
            e.epoch = epoch;
            e.batches.clear();
        }
    }

    /// Replays a batch header found in the log (recovery).
    pub fn replay(&mut self, h: &BatchHeader<'_>) {
        if h.is_control() {
            self.apply_marker(h.producer_id(), h.producer_epoch());
            return;
        }
        self.apply(
            h.producer_id(),
            h.producer_epoch(),
            BatchMeta {
                first_seq: h.base_sequence(),
                last_seq: h.last_sequence(),
                base: h.base_offset(),
                last: h.last_offset(),
            },
        );
    }

    /// The state as a replica that holds only the batches below `offset` needs it, so that
    /// replaying the batches from `offset` on (as entries arrive) ends in this state: each
    /// producer's remembered batches below `offset`; producers whose remembered batches all lie
    /// at or past it are left out (the replay brings them back), those with none remembered (a
    /// transaction marker's epoch) kept. What a replica restarted from a snapshot at `offset`
    /// receives (`replica::log`).
    pub fn as_of(&self, offset: Offset) -> ProducerState {
        let producers = self
            .producers
            .iter()
            .filter_map(|(pid, e)| {
                let batches: VecDeque<BatchMeta> = e
                    .batches
                    .iter()
                    .filter(|m| m.last < offset)
                    .copied()
                    .collect();
                let keep = e.batches.is_empty() || !batches.is_empty();
                keep.then_some((
                    *pid,
                    ProducerEntry {
                        epoch: e.epoch,
                        batches,
                    },
                ))
            })
            .collect();
        ProducerState { producers }
    }

    /// Forgets batches at or past `end` (their write failed, or recovery truncated them).
    pub fn truncate_from(&mut self, end: Offset) {
        self.producers.retain(|_, e| {
            while e.batches.back().is_some_and(|m| m.last >= end) {
                e.batches.pop_back();
            }
            !e.batches.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::builder as build;

    /// A batch of `n` records from producer `pid`/`epoch` starting at sequence `seq`.
    pub(crate) fn idem(pid: i64, epoch: i16, seq: i32, n: usize) -> Vec<u8> {
        crate::storage::tests::idempotent_batch(pid, epoch, seq, n)
    }

    fn meta(b: &[u8], base: i64) -> (i64, i16, BatchMeta) {
        let h = BatchHeader::parse(b).unwrap();
        (
            h.producer_id(),
            h.producer_epoch(),
            BatchMeta {
                first_seq: h.base_sequence(),
                last_seq: h.last_sequence(),
                base: Offset(base),
                last: Offset(base + h.last_offset_delta() as i64),
            },
        )
    }

    #[test]
    fn kip98_sequence_rules() {
        let mut s = ProducerState::default();
        let b0 = idem(7, 0, 0, 3);
        let h0 = BatchHeader::parse(&b0).unwrap();
        assert_eq!(s.check(&h0, &[]).unwrap(), Check::Append);
        let (p, e, m) = meta(&b0, 10);
        s.apply(p, e, m);
        // Retry of the same batch: duplicate with the original offsets.
        assert_eq!(s.check(&h0, &[]).unwrap(), Check::Duplicate(m));
        // Gap: sequence 5 after 2.
        let gap = idem(7, 0, 5, 1);
        assert!(matches!(
            s.check(&BatchHeader::parse(&gap).unwrap(), &[]),
            Err(StorageError::OutOfOrderSequence)
        ));
        // In sequence.
        let next = idem(7, 0, 3, 1);
        assert_eq!(
            s.check(&BatchHeader::parse(&next).unwrap(), &[]).unwrap(),
            Check::Append
        );
        // Older epoch is fenced; newer epoch must start at 0.
        let mut s2 = s.clone();
        s2.apply(
            7,
            2,
            BatchMeta {
                first_seq: 0,
                last_seq: 0,
                base: Offset(20),
                last: Offset(20),
            },
        );
        let old = idem(7, 1, 1, 1);
        assert!(matches!(
            s2.check(&BatchHeader::parse(&old).unwrap(), &[]),
            Err(StorageError::InvalidProducerEpoch)
        ));
        let bump_bad = idem(7, 3, 4, 1);
        assert!(matches!(
            s2.check(&BatchHeader::parse(&bump_bad).unwrap(), &[]),
            Err(StorageError::OutOfOrderSequence)
        ));
        let bump_ok = idem(7, 3, 0, 1);
        assert_eq!(
            s2.check(&BatchHeader::parse(&bump_ok).unwrap(), &[])
                .unwrap(),
            Check::Append
        );
        // Non-idempotent batches are never checked.
        let plain = build::single(None, Some(b"x"), 1);
        assert_eq!(
            s.check(&BatchHeader::parse(&plain).unwrap(), &[]).unwrap(),
            Check::Append
        );
    }

    #[test]
    fn the_state_as_of_an_offset_replayed_from_there_is_the_state() {
        // Producer 1: batches at 0..=6 (remembers 2..=6); producer 2: only past 4; producer 3:
        // a marker's epoch, no batches.
        let mut full = ProducerState::default();
        let mut log = Vec::new();
        for (i, pid) in [1, 1, 1, 1, 1, 2, 1, 2, 1].iter().enumerate() {
            let seq = log.iter().filter(|(p, _, _)| p == pid).count() as i32;
            let m = BatchMeta {
                first_seq: seq,
                last_seq: seq,
                base: Offset(i as i64),
                last: Offset(i as i64),
            };
            log.push((*pid, 0i16, m));
        }
        for (pid, epoch, m) in &log {
            full.apply(*pid, *epoch, *m);
        }
        full.apply_marker(3, 4);
        let at = Offset(5);
        let mut s = full.as_of(at);
        assert!(s.producers[&1].batches.iter().all(|m| m.last < at));
        assert!(!s.producers.contains_key(&2));
        assert_eq!(s.producers[&3].epoch, 4);
        for (pid, epoch, m) in log.iter().filter(|(_, _, m)| m.base >= at) {
            s.apply(*pid, *epoch, *m);
        }
        assert_eq!(s, full);
    }

    #[test]
    fn remembers_only_the_last_five_batches_and_truncates() {
        let mut s = ProducerState::default();
        for i in 0..7 {
            s.apply(
                1,
                0,
                BatchMeta {
                    first_seq: i,
                    last_seq: i,
                    base: Offset(i as i64),
                    last: Offset(i as i64),
                },
            );
        }
        let e = &s.producers[&1];
        assert_eq!(e.batches.len(), BATCHES_MAX);
        assert_eq!(e.batches.front().unwrap().first_seq, 2);
        s.truncate_from(Offset(5));
        assert_eq!(s.producers[&1].batches.back().unwrap().last, Offset(4));
        s.truncate_from(Offset(0));
        assert!(s.producers.is_empty());
    }
}
