//! One share partition (KIP-932): a share group's view of one topic partition, kept on the shard
//! that owns the partition. Sans-IO: the caller reads the log and hands the batch boundaries in.
//!
//! ```text
//!   start (SPSO)                                   end (SPEO + 1)
//!      │ in flight: one entry per offset             │ not yet delivered
//!      ▼                                             ▼
//!   ───┬───┬───┬───┬───┬───┬───┬───┬───┬───┬───┬───┬─────────▶ log
//!      │Ack│Acq│Av │Arc│Acq│Acq│Av │Ack│Acq│...│   │
//! ```
//! A record is Acquired by one member under a lock that expires; the member acknowledges it
//! Accept (→ Acknowledged), Release (→ Available again) or Reject (→ Archived); an expired lock
//! makes it Available again. Each acquisition counts a delivery; a record released or expired
//! after `delivery_count_limit` deliveries is Archived instead. The start offset moves over the
//! prefix of Acknowledged/Archived records, and `end - start` never exceeds
//! `max_record_locks`, which bounds the entries kept per share partition.
//!
//! Dead-letter topics (KIP-1191): when the group has one, a record Archived by a Reject or at
//! the delivery-count limit is also *dead-letter pending* ([`SharePartition::dead_letter`])
//! until it has been copied to the dead-letter topic; the start offset does not move past a
//! pending record, so pending records stay inside the in-flight window and are bounded by it.

use std::collections::BTreeMap;
use std::rc::Rc;

use kafka_protocol::ResponseError as E;

use crate::types::ErrorCode;

use super::share::PartitionSettings;

/// Kafka's record states (the numbers are those of `RecordState` and of the persisted state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    Available = 0,
    Acquired = 1,
    Acknowledged = 2,
    Archived = 4,
}

impl RecordState {
    pub fn from_id(id: i8) -> Option<RecordState> {
        match id {
            0 => Some(RecordState::Available),
            1 => Some(RecordState::Acquired),
            2 => Some(RecordState::Acknowledged),
            4 => Some(RecordState::Archived),
            _ => None,
        }
    }
    fn terminal(self) -> bool {
        matches!(self, RecordState::Acknowledged | RecordState::Archived)
    }
}

/// Acknowledge types of ShareFetch/ShareAcknowledge.
pub const ACK_GAP: i8 = 0;
pub const ACK_ACCEPT: i8 = 1;
pub const ACK_RELEASE: i8 = 2;
pub const ACK_REJECT: i8 = 3;

#[derive(Debug, Clone)]
pub struct InFlight {
    pub state: RecordState,
    pub delivery_count: i16,
    /// The member holding it while Acquired.
    pub member: Option<Rc<str>>,
    pub deadline_ms: i64,
}

/// Why a record was dead-lettered (the `__dlq.errors.reason` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlqReason {
    /// Acknowledged with Reject.
    Rejected = 1,
    /// Released or its lock expired at `group.share.delivery.count.limit`.
    DeliveryCountExceeded = 2,
}

impl DlqReason {
    pub fn from_id(id: i8) -> Option<DlqReason> {
        match id {
            1 => Some(DlqReason::Rejected),
            2 => Some(DlqReason::DeliveryCountExceeded),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DlqReason::Rejected => "rejected",
            DlqReason::DeliveryCountExceeded => "delivery.count.exceeded",
        }
    }
}

/// Where an append of a dead-letter record was about to go: persisted before the append, so
/// that recovery knows where to look for it (the append may or may not have happened).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DlqAttempt {
    /// The dead-letter topic's id and partition.
    pub topic: [u8; 16],
    pub partition: i32,
    /// That partition's high watermark before the append: the record is at or past it.
    pub from: i64,
}

/// An Archived record still to be copied to the dead-letter topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DlqPending {
    pub reason: DlqReason,
    pub delivery_count: i16,
    pub attempt: Option<DlqAttempt>,
}

/// One persisted range of records with one state and delivery count (Kafka's `StateBatch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateBatch {
    pub first: i64,
    pub last: i64,
    pub state: RecordState,
    pub delivery_count: i16,
}

/// A share partition's durable state: what survives a restart (acquired records come back
/// Available, with their delivery counts).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Bumped by every snapshot of one share partition: a store keeps the newest.
    pub snapshot_epoch: i32,
    pub state_epoch: i32,
    pub start_offset: i64,
    pub batches: Vec<StateBatch>,
    /// Archived records not yet copied to the dead-letter topic, by offset.
    pub dead_letter: Vec<(i64, DlqPending)>,
}

/// One batch read from the log, as the acquisition needs it.
#[derive(Debug, Clone, Copy)]
pub struct BatchSpan {
    pub base: i64,
    pub last: i64,
    /// Control batches (transaction markers) are never delivered.
    pub control: bool,
}

/// An acknowledgement range from the wire: one type for the whole range, or one per offset.
#[derive(Debug, Clone)]
pub struct AckRange {
    pub first: i64,
    pub last: i64,
    pub types: Vec<i8>,
}

#[derive(Debug)]
pub struct SharePartition {
    pub settings: PartitionSettings,
    pub start: i64,
    pub end: i64,
    pub records: BTreeMap<i64, InFlight>,
    pub state_epoch: i32,
    pub snapshot_epoch: i32,
    /// A state change not persisted yet.
    pub dirty: bool,
    /// Archived records waiting to be copied to the group's dead-letter topic (module docs).
    pub dead_letter: BTreeMap<i64, DlqPending>,
}

/// What one acquisition took: ranges `(first, last, delivery_count)` in offset order and the
/// indexes of the batches that hold them.
#[derive(Debug, Default)]
pub struct Acquired {
    pub ranges: Vec<(i64, i64, i16)>,
    pub batches: Vec<usize>,
    pub records: usize,
}

impl SharePartition {
    /// A share partition starting at `start` (from `share.auto.offset.reset`, or the log start
    /// when a persisted start fell below it).
    pub fn new(settings: PartitionSettings, start: i64) -> SharePartition {
        SharePartition {
            settings,
            start,
            end: start,
            records: BTreeMap::new(),
            state_epoch: 0,
            snapshot_epoch: 0,
            dirty: true,
            dead_letter: BTreeMap::new(),
        }
    }

    /// Rebuilt from persisted state; anything not Acknowledged/Archived is Available.
    pub fn from_snapshot(settings: PartitionSettings, s: &Snapshot) -> SharePartition {
        let mut sp = SharePartition::new(settings, s.start_offset);
        sp.state_epoch = s.state_epoch;
        sp.snapshot_epoch = s.snapshot_epoch;
        sp.dirty = false;
        sp.dead_letter = s
            .dead_letter
            .iter()
            .filter(|(o, _)| *o >= sp.start)
            .take(settings.max_record_locks as usize)
            .copied()
            .collect();
        let cap = settings.max_record_locks as i64;
        for b in &s.batches {
            let first = b.first.max(sp.start);
            let last = b.last.min(sp.start.saturating_add(cap) - 1);
            if first > last {
                continue;
            }
            let state = if b.state.terminal() {
                b.state
            } else {
                RecordState::Available
            };
            for o in first..=last {
                sp.records.insert(
                    o,
                    InFlight {
                        state,
                        delivery_count: b.delivery_count,
                        member: None,
                        deadline_ms: 0,
                    },
                );
            }
            sp.end = sp.end.max(last + 1);
        }
        // Offsets between the start and the last persisted one that are not in any batch were
        // never delivered: deliver them as new (Available, count 0).
        for o in sp.start..sp.end {
            sp.records.entry(o).or_insert(InFlight {
                state: RecordState::Available,
                delivery_count: 0,
                member: None,
                deadline_ms: 0,
            });
        }
        sp.advance();
        sp
    }

    /// The state to persist: consecutive records with the same state and count as one batch.
    pub fn snapshot(&self) -> Snapshot {
        let mut batches: Vec<StateBatch> = vec![];
        for (o, r) in &self.records {
            // Acquired records are stored Available: after a restart their locks are gone.
            let state = if r.state == RecordState::Acquired {
                RecordState::Available
            } else {
                r.state
            };
            if state == RecordState::Available && r.delivery_count == 0 {
                continue;
            }
            match batches.last_mut() {
                Some(b)
                    if b.last + 1 == *o
                        && b.state == state
                        && b.delivery_count == r.delivery_count =>
                {
                    b.last = *o
                }
                _ => batches.push(StateBatch {
                    first: *o,
                    last: *o,
                    state,
                    delivery_count: r.delivery_count,
                }),
            }
        }
        Snapshot {
            snapshot_epoch: self.snapshot_epoch,
            state_epoch: self.state_epoch,
            start_offset: self.start,
            batches,
            dead_letter: self.dead_letter.iter().map(|(o, p)| (*o, *p)).collect(),
        }
    }

    /// The next snapshot to persist (a new snapshot epoch); clears `dirty`.
    pub fn take_snapshot(&mut self) -> Snapshot {
        self.snapshot_epoch = self.snapshot_epoch.wrapping_add(1);
        self.dirty = false;
        self.snapshot()
    }

    /// Moves the start over the Acknowledged/Archived prefix.
    pub fn advance(&mut self) {
        while let Some((&o, r)) = self.records.first_key_value() {
            if o < self.start {
                self.records.remove(&o);
                continue;
            }
            if o != self.start || !r.state.terminal() || self.dead_letter.contains_key(&o) {
                break;
            }
            self.records.remove(&o);
            self.start += 1;
            self.dirty = true;
        }
        if self.records.is_empty() && self.end > self.start {
            self.start = self.end;
        }
        self.end = self.end.max(self.start);
    }

    /// The log start moved past the start (retention, DeleteRecords): records below it are gone.
    pub fn truncate_below(&mut self, log_start: i64) {
        if log_start > self.start {
            self.start = log_start;
            self.end = self.end.max(log_start);
            self.records = self.records.split_off(&log_start);
            let gone = self.dead_letter.split_off(&log_start);
            let lost = std::mem::replace(&mut self.dead_letter, gone).len();
            if lost > 0 {
                tracing::warn!(
                    records = lost,
                    "records deleted from the log before they reached the dead-letter topic"
                );
            }
            self.dirty = true;
        }
    }

    /// Moves the share partition to `offset` (AlterShareGroupOffsets): everything in flight is
    /// dropped.
    pub fn reset_to(&mut self, offset: i64) {
        self.records.clear();
        self.dead_letter.clear();
        self.start = offset;
        self.end = offset;
        self.state_epoch = self.state_epoch.wrapping_add(1);
        self.dirty = true;
    }

    fn give_back(&mut self, o: i64) {
        let limit = self.settings.delivery_count_limit as i16;
        if let Some(r) = self.records.get_mut(&o) {
            r.member = None;
            r.state = if r.delivery_count >= limit {
                RecordState::Archived
            } else {
                RecordState::Available
            };
            if r.state == RecordState::Archived && self.settings.dead_letter {
                let count = r.delivery_count;
                self.dead_letter.insert(
                    o,
                    DlqPending {
                        reason: DlqReason::DeliveryCountExceeded,
                        delivery_count: count,
                        attempt: None,
                    },
                );
            }
            self.dirty = true;
        }
    }

    /// Locks that expired by `now_ms` make their records Available again (Archived at the
    /// delivery limit). Returns how many expired.
    pub fn expire(&mut self, now_ms: i64) -> usize {
        let expired: Vec<i64> = self
            .records
            .iter()
            .filter(|(_, r)| r.state == RecordState::Acquired && r.deadline_ms <= now_ms)
            .map(|(o, _)| *o)
            .collect();
        for o in &expired {
            self.give_back(*o);
        }
        if !expired.is_empty() {
            self.advance();
        }
        expired.len()
    }

    /// Releases everything `member` holds (its share session closed). Returns how many.
    pub fn release_member(&mut self, member: &str) -> usize {
        let held: Vec<i64> = self
            .records
            .iter()
            .filter(|(_, r)| {
                r.state == RecordState::Acquired && r.member.as_deref() == Some(member)
            })
            .map(|(o, _)| *o)
            .collect();
        for o in &held {
            self.give_back(*o);
        }
        if !held.is_empty() {
            self.advance();
        }
        held.len()
    }

    /// The earliest lock deadline, for a fetch waiting for records to come back.
    pub fn next_deadline_ms(&self) -> Option<i64> {
        self.records
            .values()
            .filter(|r| r.state == RecordState::Acquired)
            .map(|r| r.deadline_ms)
            .min()
    }

    /// Where the next read must start: the first Available record in flight, else the end.
    pub fn read_from(&self) -> i64 {
        self.records
            .iter()
            .find(|(_, r)| r.state == RecordState::Available)
            .map(|(o, _)| *o)
            .unwrap_or(self.end)
    }

    /// Whether anything could be acquired without new data.
    pub fn has_available(&self) -> bool {
        self.records
            .values()
            .any(|r| r.state == RecordState::Available)
    }

    /// Whether new records may enter the in-flight window.
    pub fn window_open(&self) -> bool {
        self.end - self.start < self.settings.max_record_locks as i64
    }

    /// Acquires up to `max_records` records of `batches` (read from [`Self::read_from`], up to
    /// `readable_end`) for `member`: Available records in flight first (redeliveries), then new
    /// ones while the in-flight window has room.
    pub fn acquire(
        &mut self,
        batches: &[BatchSpan],
        readable_end: i64,
        member: &Rc<str>,
        max_records: usize,
        now_ms: i64,
    ) -> Acquired {
        let mut out = Acquired::default();
        let deadline = now_ms.saturating_add(self.settings.lock_duration_ms);
        let window_end = self
            .start
            .saturating_add(self.settings.max_record_locks as i64);
        for (i, b) in batches.iter().enumerate() {
            if out.records >= max_records {
                break;
            }
            let mut took = false;
            let first = b.base.max(self.start);
            let last = b.last.min(readable_end - 1);
            if first > last {
                continue;
            }
            if b.control {
                // Never delivered: past the end, such offsets enter the window as Archived.
                for o in first.max(self.end)..=last.min(window_end - 1) {
                    self.records.insert(
                        o,
                        InFlight {
                            state: RecordState::Archived,
                            delivery_count: 0,
                            member: None,
                            deadline_ms: 0,
                        },
                    );
                    self.end = o + 1;
                }
                continue;
            }
            let mut o = first;
            while o <= last && out.records < max_records {
                if o < self.end {
                    if let Some(r) = self.records.get_mut(&o) {
                        if r.state == RecordState::Available {
                            r.state = RecordState::Acquired;
                            r.delivery_count = r.delivery_count.saturating_add(1);
                            r.member = Some(member.clone());
                            r.deadline_ms = deadline;
                            push_range(&mut out.ranges, o, r.delivery_count);
                            out.records += 1;
                            took = true;
                        }
                    }
                } else if o < window_end {
                    // Offsets skipped between the end and this batch (compacted away or never
                    // written) are not records: they enter the window as Archived.
                    for gap in self.end..o {
                        self.records.insert(
                            gap,
                            InFlight {
                                state: RecordState::Archived,
                                delivery_count: 0,
                                member: None,
                                deadline_ms: 0,
                            },
                        );
                    }
                    self.records.insert(
                        o,
                        InFlight {
                            state: RecordState::Acquired,
                            delivery_count: 1,
                            member: Some(member.clone()),
                            deadline_ms: deadline,
                        },
                    );
                    self.end = o + 1;
                    push_range(&mut out.ranges, o, 1);
                    out.records += 1;
                    took = true;
                } else {
                    break;
                }
                o += 1;
            }
            if took {
                out.batches.push(i);
            }
        }
        self.advance();
        out
    }

    /// Applies `member`'s acknowledgements. All ranges are checked first: a range that is not
    /// wholly Acquired by `member` is INVALID_RECORD_STATE and nothing is applied; a malformed
    /// one is INVALID_REQUEST.
    pub fn acknowledge(&mut self, member: &str, acks: &[AckRange]) -> Result<(), ErrorCode> {
        let cap = self.settings.max_record_locks as i64;
        for a in acks {
            if a.first > a.last || a.types.is_empty() {
                return Err(ErrorCode::new(E::InvalidRequest));
            }
            // Ranges from the wire may span all of i64: no arithmetic that can overflow.
            let Some(len) = a.last.checked_sub(a.first).and_then(|d| d.checked_add(1)) else {
                return Err(ErrorCode::new(E::InvalidRecordState));
            };
            if a.types.len() != 1 && a.types.len() as i64 != len {
                return Err(ErrorCode::new(E::InvalidRequest));
            }
            if a.types.iter().any(|t| !(ACK_GAP..=ACK_REJECT).contains(t)) {
                return Err(ErrorCode::new(E::InvalidRequest));
            }
            // More than the window can hold cannot all be acquired.
            if len > cap || a.first < self.start || a.last >= self.end {
                return Err(ErrorCode::new(E::InvalidRecordState));
            }
            for (i, o) in (a.first..=a.last).enumerate() {
                let t = if a.types.len() == 1 {
                    a.types[0]
                } else {
                    a.types[i]
                };
                let Some(r) = self.records.get(&o) else {
                    return Err(ErrorCode::new(E::InvalidRecordState));
                };
                let held = r.state == RecordState::Acquired && r.member.as_deref() == Some(member);
                // A gap may be acknowledged wherever it is (it was never a record).
                if !(held || t == ACK_GAP && r.state == RecordState::Archived) {
                    return Err(ErrorCode::new(E::InvalidRecordState));
                }
            }
        }
        for a in acks {
            for (i, o) in (a.first..=a.last).enumerate() {
                let t = if a.types.len() == 1 {
                    a.types[0]
                } else {
                    a.types[i]
                };
                match t {
                    ACK_ACCEPT => self.set(o, RecordState::Acknowledged),
                    ACK_RELEASE => self.give_back(o),
                    ACK_REJECT => {
                        self.set(o, RecordState::Archived);
                        if self.settings.dead_letter {
                            let count = self.records.get(&o).map_or(0, |r| r.delivery_count);
                            self.dead_letter.insert(
                                o,
                                DlqPending {
                                    reason: DlqReason::Rejected,
                                    delivery_count: count,
                                    attempt: None,
                                },
                            );
                        }
                    }
                    _ => self.set(o, RecordState::Archived),
                }
            }
        }
        self.advance();
        Ok(())
    }

    fn set(&mut self, o: i64, state: RecordState) {
        if let Some(r) = self.records.get_mut(&o) {
            r.state = state;
            r.member = None;
            self.dirty = true;
        }
    }

    /// Up to `max` dead-letter pending records, lowest offsets first.
    pub fn dead_letter_batch(&self, max: usize) -> Vec<(i64, DlqPending)> {
        self.dead_letter
            .iter()
            .take(max)
            .map(|(o, p)| (*o, *p))
            .collect()
    }

    /// Records where an append of the pending records at `offsets` is about to go.
    pub fn dead_letter_attempt(&mut self, offsets: &[i64], attempt: DlqAttempt) {
        for o in offsets {
            if let Some(p) = self.dead_letter.get_mut(o) {
                p.attempt = Some(attempt);
                self.dirty = true;
            }
        }
    }

    /// The records at `offsets` reached the dead-letter topic, or never will (then they stay
    /// Archived only): no longer pending, and the start may move past them.
    pub fn dead_letter_done(&mut self, offsets: &[i64]) {
        for o in offsets {
            if self.dead_letter.remove(o).is_some() {
                self.dirty = true;
            }
        }
        self.advance();
    }

    /// Counts by state, for describing the partition.
    pub fn in_flight(&self) -> usize {
        self.records.len()
    }
}

fn push_range(ranges: &mut Vec<(i64, i64, i16)>, o: i64, count: i16) {
    match ranges.last_mut() {
        Some((_, last, c)) if *last + 1 == o && *c == count => *last = o,
        _ => ranges.push((o, o, count)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PartitionSettings {
        PartitionSettings {
            max_record_locks: 100,
            delivery_count_limit: 3,
            lock_duration_ms: 1000,
            ..Default::default()
        }
    }

    fn one(base: i64, last: i64) -> Vec<BatchSpan> {
        vec![BatchSpan {
            base,
            last,
            control: false,
        }]
    }

    #[test]
    fn two_members_never_hold_one_record() {
        let mut sp = SharePartition::new(settings(), 0);
        let (a, b): (Rc<str>, Rc<str>) = ("a".into(), "b".into());
        let got = sp.acquire(&one(0, 9), 10, &a, 5, 0);
        assert_eq!(got.ranges, vec![(0, 4, 1)]);
        let got = sp.acquire(&one(0, 9), 10, &b, 100, 0);
        assert_eq!(got.ranges, vec![(5, 9, 1)]);
        let got = sp.acquire(&one(0, 9), 10, &b, 100, 0);
        assert!(got.ranges.is_empty());
        // b cannot acknowledge a's records.
        let ack = |f, l, t| AckRange {
            first: f,
            last: l,
            types: vec![t],
        };
        assert_eq!(
            sp.acknowledge("b", &[ack(0, 4, ACK_ACCEPT)]),
            Err(ErrorCode::new(E::InvalidRecordState))
        );
        sp.acknowledge("a", &[ack(0, 4, ACK_ACCEPT)]).unwrap();
        assert_eq!(sp.start, 5);
        sp.acknowledge("b", &[ack(5, 9, ACK_ACCEPT)]).unwrap();
        assert_eq!(sp.start, 10);
        assert!(sp.records.is_empty());
    }

    #[test]
    fn release_redelivers_with_a_higher_count_and_the_limit_archives() {
        let mut sp = SharePartition::new(settings(), 0);
        let a: Rc<str> = "a".into();
        let rel = AckRange {
            first: 0,
            last: 0,
            types: vec![ACK_RELEASE],
        };
        for n in 1..=3 {
            let got = sp.acquire(&one(0, 0), 1, &a, 10, 0);
            assert_eq!(got.ranges, vec![(0, 0, n)]);
            sp.acknowledge("a", std::slice::from_ref(&rel)).unwrap();
        }
        // Third release reached the limit: archived, never delivered again.
        assert!(sp.acquire(&one(0, 0), 1, &a, 10, 0).ranges.is_empty());
        assert_eq!(sp.start, 1);
    }

    #[test]
    fn expired_locks_come_back_and_persisted_state_round_trips() {
        let mut sp = SharePartition::new(settings(), 0);
        let a: Rc<str> = "a".into();
        sp.acquire(&one(0, 3), 4, &a, 10, 0);
        sp.acknowledge(
            "a",
            &[AckRange {
                first: 1,
                last: 1,
                types: vec![ACK_ACCEPT],
            }],
        )
        .unwrap();
        assert_eq!(sp.expire(999), 0);
        assert_eq!(sp.expire(1000), 3);
        let got = sp.acquire(&one(0, 3), 4, &a, 10, 2000);
        assert_eq!(got.ranges, vec![(0, 0, 2), (2, 3, 2)]);
        let snap = sp.snapshot();
        let back = SharePartition::from_snapshot(settings(), &snap);
        assert_eq!(back.start, 0);
        assert_eq!(back.end, 4);
        assert_eq!(back.records[&1].state, RecordState::Acknowledged);
        assert_eq!(back.records[&0].state, RecordState::Available);
        assert_eq!(back.records[&0].delivery_count, 2);
    }

    #[test]
    fn the_window_bounds_in_flight_records() {
        let mut sp = SharePartition::new(settings(), 0);
        let a: Rc<str> = "a".into();
        let got = sp.acquire(&one(0, 999), 1000, &a, 10_000, 0);
        assert_eq!(got.records, 100);
        assert_eq!(sp.records.len(), 100);
        // A huge ack range is refused without walking it, the widest without overflowing.
        assert_eq!(
            sp.acknowledge(
                "a",
                &[AckRange {
                    first: i64::MIN,
                    last: i64::MAX,
                    types: vec![ACK_ACCEPT]
                }]
            ),
            Err(ErrorCode::new(E::InvalidRecordState))
        );
        assert_eq!(
            sp.acknowledge(
                "a",
                &[AckRange {
                    first: 0,
                    last: i64::MAX - 1,
                    types: vec![ACK_ACCEPT]
                }]
            ),
            Err(ErrorCode::new(E::InvalidRecordState))
        );
    }

    #[test]
    fn rejected_and_exhausted_records_wait_for_the_dead_letter_topic() {
        let mut st = settings();
        st.dead_letter = true;
        let mut sp = SharePartition::new(st, 0);
        let a: Rc<str> = "a".into();
        let ack = |f, l, t| AckRange {
            first: f,
            last: l,
            types: vec![t],
        };
        sp.acquire(&one(0, 2), 3, &a, 10, 0);
        // 0 rejected, 1 a gap (never dead-lettered), 2 released up to the limit.
        sp.acknowledge("a", &[ack(0, 0, ACK_REJECT), ack(1, 1, ACK_GAP)])
            .unwrap();
        for _ in 0..3 {
            sp.acknowledge("a", &[ack(2, 2, ACK_RELEASE)]).unwrap();
            sp.acquire(&one(0, 2), 3, &a, 10, 0);
        }
        let pending = sp.dead_letter_batch(10);
        assert_eq!(pending.len(), 2, "{pending:?}");
        assert_eq!(pending[0].0, 0);
        assert_eq!(pending[0].1.reason, DlqReason::Rejected);
        assert_eq!(pending[1].0, 2);
        assert_eq!(pending[1].1.reason, DlqReason::DeliveryCountExceeded);
        assert_eq!(pending[1].1.delivery_count, 3);
        // The start waits at the first pending record; pending state survives a restart.
        assert_eq!(sp.start, 0);
        let attempt = DlqAttempt {
            topic: [1; 16],
            partition: 0,
            from: 7,
        };
        sp.dead_letter_attempt(&[0], attempt);
        let back = SharePartition::from_snapshot(st, &sp.snapshot());
        assert_eq!(back.dead_letter, sp.dead_letter);
        assert_eq!(back.dead_letter[&0].attempt, Some(attempt));
        sp.dead_letter_done(&[0, 2]);
        assert_eq!(sp.start, 3);
        assert!(sp.records.is_empty());
        // Without a dead-letter topic nothing waits.
        let mut plain = SharePartition::new(settings(), 0);
        plain.acquire(&one(0, 0), 1, &a, 10, 0);
        plain.acknowledge("a", &[ack(0, 0, ACK_REJECT)]).unwrap();
        assert!(plain.dead_letter.is_empty());
        assert_eq!(plain.start, 1);
    }
}
