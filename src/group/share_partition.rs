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
//! Delayed delivery: an Available record is acquirable only once it is *due*: at its delivery
//! time (read from the record's headers by the caller, see [`DueTimes`]) and after the
//! back-off of its last release or lock expiry (`share.release.backoff.ms`). A record that is
//! not due stays Available in the window and is skipped; records behind it are acquired.
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
/// ShareFetch/ShareAcknowledge v2 (KIP-1222): the member keeps the record and its lock is
/// extended by the lock duration from now, without counting a delivery.
pub const ACK_RENEW: i8 = 4;

#[derive(Debug, Clone)]
pub struct InFlight {
    pub state: RecordState,
    pub delivery_count: i16,
    /// The member holding it while Acquired.
    pub member: Option<Rc<str>>,
    pub deadline_ms: i64,
    /// Delivery time from the record's headers (0: none); `None` until the record's batch was
    /// read (records brought back from persisted state).
    pub due_ms: Option<i64>,
    /// Not acquirable before this: the back-off of its last release or lock expiry (0: none).
    pub retry_at_ms: i64,
}

impl InFlight {
    /// Whether an Available record may be acquired at `now_ms`.
    fn due(&self, now_ms: i64) -> bool {
        self.due_ms.is_some_and(|d| d <= now_ms) && self.retry_at_ms <= now_ms
    }
}

/// Delivery times of one batch's records: `(offset, due_ms)` for every record that carries
/// one, in offset order (records without one are due at once).
pub type DueTimes = Vec<(i64, i64)>;

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
    /// Release back-offs of Available records: `(first, last, retry_at_ms)`.
    pub retry_at: Vec<(i64, i64, i64)>,
    /// Archived records not yet copied to the dead-letter topic, by offset.
    pub dead_letter: Vec<(i64, DlqPending)>,
}

impl Snapshot {
    /// Records at or past the start offset whose delivery is complete (Acknowledged or
    /// Archived): KIP-1226's `DeliveryCompleteCount`, which the lag leaves out.
    pub fn delivery_complete_count(&self) -> i64 {
        self.batches
            .iter()
            .filter(|b| b.state.terminal())
            .map(|b| {
                b.last
                    .saturating_sub(b.first.max(self.start_offset))
                    .saturating_add(1)
                    .max(0)
            })
            .fold(0i64, i64::saturating_add)
    }
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
    /// Average stored bytes per record of the batches read so far (0: nothing read yet), to
    /// size the next read ([`Self::read_bytes`]). Not persisted.
    pub bytes_per_record: u64,
}

/// Smallest read of the log for an acquisition (also the first one, before any record size is
/// known): a few batches of typical size, one direct read.
pub const READ_BYTES_MIN: u32 = 1 << 20;

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
            bytes_per_record: 0,
        }
    }

    /// How many bytes of the log to read for an acquisition of up to `max_records`, within
    /// `bytes_max` (the request's limit). Clients ask for far more bytes than `max_records`
    /// records take (50 MB by default); reading all of it from a cold log for a ShareFetch that
    /// keeps 1,000 records would cost the whole read each time. So the read is sized by the
    /// average record size seen so far, with a quarter to spare, never below
    /// [`READ_BYTES_MIN`].
    pub fn read_bytes(&self, max_records: usize, bytes_max: u32) -> u32 {
        let want = (max_records as u64)
            .saturating_mul(self.bytes_per_record)
            .saturating_mul(5)
            / 4;
        want.clamp(READ_BYTES_MIN as u64, u32::MAX as u64)
            .min(bytes_max.max(1) as u64) as u32
    }

    /// Notes that `bytes` of batches held `records` records (for [`Self::read_bytes`]).
    pub fn note_read(&mut self, bytes: u64, records: u64) {
        if let Some(seen) = bytes.checked_div(records) {
            self.bytes_per_record = if self.bytes_per_record == 0 {
                seen
            } else {
                (self.bytes_per_record * 3 + seen) / 4
            };
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
                        due_ms: None,
                        retry_at_ms: 0,
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
                due_ms: None,
                retry_at_ms: 0,
            });
        }
        // Release back-offs come back exactly; delivery times are read from the log again.
        for &(first, last, at) in &s.retry_at {
            // A range below the start (or reversed) is nothing: `range_mut` must not see it.
            let first = first.max(sp.start);
            if first > last {
                continue;
            }
            for (_, r) in sp.records.range_mut(first..=last) {
                if r.state == RecordState::Available {
                    r.retry_at_ms = at;
                }
            }
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
        let mut retry_at: Vec<(i64, i64, i64)> = vec![];
        for (o, r) in &self.records {
            if r.state != RecordState::Available || r.retry_at_ms == 0 {
                continue;
            }
            match retry_at.last_mut() {
                Some((_, last, at)) if *last + 1 == *o && *at == r.retry_at_ms => *last = *o,
                _ => retry_at.push((*o, *o, r.retry_at_ms)),
            }
        }
        Snapshot {
            snapshot_epoch: self.snapshot_epoch,
            state_epoch: self.state_epoch,
            start_offset: self.start,
            batches,
            retry_at,
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

    /// Makes `o` Available again (Archived at the delivery limit); with `now_ms` (a release or
    /// a lock expiry, not a closed session) not before the release back-off.
    fn give_back(&mut self, o: i64, now_ms: Option<i64>) {
        let limit = self.settings.delivery_count_limit as i16;
        let settings = self.settings;
        if let Some(r) = self.records.get_mut(&o) {
            r.member = None;
            r.state = if r.delivery_count >= limit {
                RecordState::Archived
            } else {
                RecordState::Available
            };
            if let Some(now) = now_ms {
                let b = settings.release_backoff(r.delivery_count);
                r.retry_at_ms = if b > 0 { now.saturating_add(b) } else { 0 };
            }
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
        let expired: Vec<(i64, i64)> = self
            .records
            .iter()
            .filter(|(_, r)| r.state == RecordState::Acquired && r.deadline_ms <= now_ms)
            .map(|(o, r)| (*o, r.deadline_ms))
            .collect();
        // The back-off runs from the lock's deadline, however late expiry is applied.
        for (o, deadline) in &expired {
            self.give_back(*o, Some(*deadline));
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
            self.give_back(*o, None);
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

    /// Where the next read must start: the first Available record in flight that is due at
    /// `now_ms` (or whose delivery time is not known yet), else the end.
    pub fn read_from(&self, now_ms: i64) -> i64 {
        self.records
            .iter()
            .find(|(_, r)| {
                r.state == RecordState::Available && (r.due_ms.is_none() || r.due(now_ms))
            })
            .map(|(o, _)| *o)
            .unwrap_or(self.end)
    }

    /// Whether anything could be acquired at `now_ms` without new data.
    pub fn has_available(&self, now_ms: i64) -> bool {
        self.records
            .values()
            .any(|r| r.state == RecordState::Available && (r.due_ms.is_none() || r.due(now_ms)))
    }

    /// The earliest time after `now_ms` at which an Available record not due yet becomes due,
    /// for a fetch waiting for records.
    pub fn next_due_ms(&self, now_ms: i64) -> Option<i64> {
        self.records
            .values()
            .filter(|r| r.state == RecordState::Available)
            .filter_map(|r| Some(r.due_ms?.max(r.retry_at_ms)))
            .filter(|t| *t > now_ms)
            .min()
    }

    /// Whether new records may enter the in-flight window.
    pub fn window_open(&self) -> bool {
        self.end - self.start < self.settings.max_record_locks as i64
    }

    /// Acquires up to `max_records` records of `batches` (read from [`Self::read_from`], up to
    /// `readable_end`) for `member`: Available records in flight first (redeliveries), then new
    /// ones while the in-flight window has room. Records are taken only once due: `due_of(i)`
    /// reads the delivery times of batch `i`, called only for a batch holding records whose
    /// delivery time is not known yet (new ones, or ones brought back from persisted state) and
    /// at most once per batch. A record not due enters the window Available and is skipped.
    pub fn acquire(
        &mut self,
        batches: &[BatchSpan],
        readable_end: i64,
        member: &Rc<str>,
        max_records: usize,
        now_ms: i64,
        due_of: &mut dyn FnMut(usize) -> DueTimes,
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
                            due_ms: Some(0),
                            retry_at_ms: 0,
                        },
                    );
                    self.end = o + 1;
                }
                continue;
            }
            // This batch's delivery times, read at most once and only if needed.
            let mut due: Option<DueTimes> = None;
            let mut due_at = |o: i64| -> i64 {
                let d = due.get_or_insert_with(|| due_of(i));
                d.binary_search_by_key(&o, |(x, _)| *x)
                    .map_or(0, |k| d[k].1)
            };
            let mut o = first;
            while o <= last && out.records < max_records {
                if o < self.end {
                    if let Some(r) = self.records.get_mut(&o) {
                        if r.state == RecordState::Available && r.due_ms.is_none() {
                            r.due_ms = Some(due_at(o));
                        }
                        if r.state == RecordState::Available && r.due(now_ms) {
                            r.retry_at_ms = 0;
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
                                due_ms: Some(0),
                                retry_at_ms: 0,
                            },
                        );
                    }
                    let d = due_at(o);
                    if d > now_ms {
                        // Not due: it takes its place in the window, Available, and waits.
                        self.records.insert(
                            o,
                            InFlight {
                                state: RecordState::Available,
                                delivery_count: 0,
                                member: None,
                                deadline_ms: 0,
                                due_ms: Some(d),
                                retry_at_ms: 0,
                            },
                        );
                        self.end = o + 1;
                        o += 1;
                        continue;
                    }
                    self.records.insert(
                        o,
                        InFlight {
                            state: RecordState::Acquired,
                            delivery_count: 1,
                            member: Some(member.clone()),
                            deadline_ms: deadline,
                            due_ms: Some(d),
                            retry_at_ms: 0,
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

    /// Applies `member`'s acknowledgements at `now_ms`. All ranges are checked first: a range
    /// that is not wholly Acquired by `member` is INVALID_RECORD_STATE and nothing is applied;
    /// a malformed one is INVALID_REQUEST.
    ///
    /// The ranges must be in ascending offset order without overlapping (Kafka's
    /// `validateAcknowledgementBatches` refuses a range starting before the previous one's
    /// end; Sluice refuses a shared offset too): overlapping ranges would make the walk below
    /// cost ranges × `max_record_locks` for one partition. With them disjoint and each inside
    /// `[start, end)`, a partition's acknowledgement walks at most `max_record_locks` offsets.
    ///
    /// Renew (KIP-1222) keeps a record Acquired by `member` with its lock deadline moved to
    /// `now_ms` plus the lock duration, its delivery count unchanged; the handler refuses it
    /// below version 2.
    pub fn acknowledge(
        &mut self,
        member: &str,
        acks: &[AckRange],
        now_ms: i64,
    ) -> Result<(), ErrorCode> {
        let cap = self.settings.max_record_locks as i64;
        let mut prev_last: Option<i64> = None;
        for a in acks {
            if a.first > a.last || a.types.is_empty() || prev_last.is_some_and(|p| a.first <= p) {
                return Err(ErrorCode::new(E::InvalidRequest));
            }
            prev_last = Some(a.last);
        }
        for a in acks {
            // Ranges from the wire may span all of i64: no arithmetic that can overflow.
            let Some(len) = a.last.checked_sub(a.first).and_then(|d| d.checked_add(1)) else {
                return Err(ErrorCode::new(E::InvalidRecordState));
            };
            if a.types.len() != 1 && a.types.len() as i64 != len {
                return Err(ErrorCode::new(E::InvalidRequest));
            }
            if a.types.iter().any(|t| !(ACK_GAP..=ACK_RENEW).contains(t)) {
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
                // A gap may be acknowledged wherever it is (it was never a record); only a
                // held lock can be renewed.
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
                    ACK_RELEASE => self.give_back(o, Some(now_ms)),
                    ACK_RENEW => {
                        // Nothing persisted changes: acquired records are stored Available.
                        if let Some(r) = self.records.get_mut(&o) {
                            r.deadline_ms = now_ms.saturating_add(self.settings.lock_duration_ms);
                        }
                    }
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

    fn none(_: usize) -> DueTimes {
        vec![]
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
        let got = sp.acquire(&one(0, 9), 10, &a, 5, 0, &mut none);
        assert_eq!(got.ranges, vec![(0, 4, 1)]);
        let got = sp.acquire(&one(0, 9), 10, &b, 100, 0, &mut none);
        assert_eq!(got.ranges, vec![(5, 9, 1)]);
        let got = sp.acquire(&one(0, 9), 10, &b, 100, 0, &mut none);
        assert!(got.ranges.is_empty());
        // b cannot acknowledge a's records.
        let ack = |f, l, t| AckRange {
            first: f,
            last: l,
            types: vec![t],
        };
        assert_eq!(
            sp.acknowledge("b", &[ack(0, 4, ACK_ACCEPT)], 0),
            Err(ErrorCode::new(E::InvalidRecordState))
        );
        sp.acknowledge("a", &[ack(0, 4, ACK_ACCEPT)], 0).unwrap();
        assert_eq!(sp.start, 5);
        sp.acknowledge("b", &[ack(5, 9, ACK_ACCEPT)], 0).unwrap();
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
            let got = sp.acquire(&one(0, 0), 1, &a, 10, 0, &mut none);
            assert_eq!(got.ranges, vec![(0, 0, n)]);
            sp.acknowledge("a", std::slice::from_ref(&rel), 0).unwrap();
        }
        // Third release reached the limit: archived, never delivered again.
        assert!(sp
            .acquire(&one(0, 0), 1, &a, 10, 0, &mut none)
            .ranges
            .is_empty());
        assert_eq!(sp.start, 1);
    }

    #[test]
    fn expired_locks_come_back_and_persisted_state_round_trips() {
        let mut sp = SharePartition::new(settings(), 0);
        let a: Rc<str> = "a".into();
        sp.acquire(&one(0, 3), 4, &a, 10, 0, &mut none);
        sp.acknowledge(
            "a",
            &[AckRange {
                first: 1,
                last: 1,
                types: vec![ACK_ACCEPT],
            }],
            0,
        )
        .unwrap();
        assert_eq!(sp.expire(999), 0);
        assert_eq!(sp.expire(1000), 3);
        let got = sp.acquire(&one(0, 3), 4, &a, 10, 2000, &mut none);
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
        let got = sp.acquire(&one(0, 999), 1000, &a, 10_000, 0, &mut none);
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
                }],
                0
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
                }],
                0
            ),
            Err(ErrorCode::new(E::InvalidRecordState))
        );
    }

    #[test]
    fn overlapping_or_unordered_ranges_are_invalid_requests_and_apply_nothing() {
        let mut sp = SharePartition::new(settings(), 0);
        let a: Rc<str> = "a".into();
        sp.acquire(&one(0, 9), 10, &a, 10, 0, &mut none);
        let r = |first, last| AckRange {
            first,
            last,
            types: vec![ACK_ACCEPT],
        };
        for bad in [
            vec![r(0, 4), r(0, 4)],
            vec![r(0, 4), r(4, 6)],
            vec![r(5, 6), r(0, 1)],
        ] {
            assert_eq!(
                sp.acknowledge("a", &bad, 0),
                Err(ErrorCode::new(E::InvalidRequest))
            );
        }
        assert_eq!(sp.start, 0);
        sp.acknowledge("a", &[r(0, 4), r(5, 9)], 0).unwrap();
        assert_eq!(sp.start, 10);
    }

    #[test]
    fn the_lag_leaves_out_records_done_with_past_the_start() {
        let mut sp = SharePartition::new(settings(), 0);
        let a: Rc<str> = "a".into();
        sp.acquire(&one(0, 9), 10, &a, 10, 0, &mut none);
        let r = |first, last, t| AckRange {
            first,
            last,
            types: vec![t],
        };
        sp.acknowledge(
            "a",
            &[
                r(0, 1, ACK_ACCEPT),
                r(4, 5, ACK_REJECT),
                r(7, 7, ACK_ACCEPT),
            ],
            0,
        )
        .unwrap();
        let snap = sp.snapshot();
        assert_eq!(snap.start_offset, 2);
        // 4, 5 and 7 are done with; 0 and 1 are below the start.
        assert_eq!(snap.delivery_complete_count(), 3);
    }

    #[test]
    fn renew_extends_the_lock_without_counting_a_delivery() {
        let mut sp = SharePartition::new(settings(), 0);
        let (a, b): (Rc<str>, Rc<str>) = ("a".into(), "b".into());
        sp.acquire(&one(0, 3), 4, &a, 10, 0, &mut none);
        let renew = |first, last| AckRange {
            first,
            last,
            types: vec![ACK_RENEW],
        };
        // Another member cannot renew a's records.
        assert_eq!(
            sp.acknowledge("b", &[renew(0, 1)], 900),
            Err(ErrorCode::new(E::InvalidRecordState))
        );
        sp.acknowledge("a", &[renew(0, 1)], 900).unwrap();
        // 2 and 3 expire at 1000; 0 and 1 now at 1900, still held by a with one delivery.
        assert_eq!(sp.expire(1000), 2);
        assert_eq!(sp.records[&0].state, RecordState::Acquired);
        assert_eq!(sp.records[&0].delivery_count, 1);
        assert_eq!(
            sp.acquire(&one(0, 3), 4, &b, 10, 1000, &mut none).ranges,
            vec![(2, 3, 2)]
        );
        assert_eq!(sp.expire(1899), 0);
        assert_eq!(sp.expire(1900), 2);
        // An expired lock cannot be renewed.
        assert_eq!(
            sp.acknowledge("a", &[renew(0, 0)], 1950),
            Err(ErrorCode::new(E::InvalidRecordState))
        );
    }

    #[test]
    fn a_record_not_due_waits_in_the_window_and_those_behind_it_are_delivered() {
        let mut sp = SharePartition::new(settings(), 0);
        let a: Rc<str> = "a".into();
        // Offset 2 is due at 5000; the batch's times are read once.
        let mut reads = 0;
        let mut due = |_: usize| {
            reads += 1;
            vec![(2, 5000)]
        };
        let got = sp.acquire(&one(0, 4), 5, &a, 10, 1000, &mut due);
        assert_eq!(got.ranges, vec![(0, 1, 1), (3, 4, 1)]);
        assert_eq!(reads, 1);
        assert_eq!(sp.records[&2].state, RecordState::Available);
        assert_eq!(sp.end, 5);
        assert_eq!(sp.next_due_ms(1000), Some(5000));
        assert!(!sp.has_available(4999));
        assert_eq!(sp.read_from(4999), 5);
        // Not before it is due, and without reading the batch again.
        let got = sp.acquire(&one(0, 4), 5, &a, 10, 4999, &mut none);
        assert!(got.ranges.is_empty());
        assert!(sp.has_available(5000));
        assert_eq!(sp.read_from(5000), 2);
        let got = sp.acquire(&one(0, 4), 5, &a, 10, 5000, &mut none);
        assert_eq!(got.ranges, vec![(2, 2, 1)]);
        assert_eq!(sp.next_due_ms(5000), None);
    }

    #[test]
    fn a_window_full_of_records_not_due_stalls_until_the_first_is_due() {
        let mut sp = SharePartition::new(settings(), 0);
        let a: Rc<str> = "a".into();
        let mut due = |_: usize| (0..1000).map(|o| (o, 10_000 + o)).collect::<DueTimes>();
        let got = sp.acquire(&one(0, 999), 1000, &a, 500, 0, &mut due);
        assert_eq!(got.records, 0);
        // The window (100) holds the first 100, none due; nothing past it enters.
        assert_eq!((sp.end, sp.records.len()), (100, 100));
        assert!(!sp.window_open());
        assert_eq!(sp.next_due_ms(0), Some(10_000));
        let got = sp.acquire(&one(0, 999), 1000, &a, 500, 10_000, &mut none);
        assert_eq!(got.ranges, vec![(0, 0, 1)]);
    }

    #[test]
    fn released_and_expired_records_back_off_and_the_back_off_is_persisted() {
        let s = PartitionSettings {
            release_backoff_ms: 1000,
            release_backoff_max_ms: 3000,
            ..settings()
        };
        assert_eq!(
            (1..=4).map(|n| s.release_backoff(n)).collect::<Vec<_>>(),
            vec![1000, 2000, 3000, 3000]
        );
        let mut sp = SharePartition::new(s, 0);
        let a: Rc<str> = "a".into();
        let rel = AckRange {
            first: 0,
            last: 0,
            types: vec![ACK_RELEASE],
        };
        sp.acquire(&one(0, 1), 2, &a, 10, 0, &mut none);
        sp.acknowledge("a", std::slice::from_ref(&rel), 100)
            .unwrap();
        assert_eq!(sp.records[&0].retry_at_ms, 1100);
        assert!(sp
            .acquire(&one(0, 1), 2, &a, 10, 1099, &mut none)
            .ranges
            .is_empty());
        assert_eq!(sp.next_due_ms(1099), Some(1100));
        // Persisted and brought back exactly (offset 1 is still held: Available at once).
        let back = SharePartition::from_snapshot(s, &sp.snapshot());
        assert_eq!(back.records[&0].retry_at_ms, 1100);
        assert_eq!(back.records[&1].retry_at_ms, 0);
        // Ranges below the start or reversed (a stale or damaged record) are ignored.
        let mut odd = sp.snapshot();
        odd.start_offset = 1;
        odd.retry_at = vec![(0, 0, 7), (5, 2, 7), (i64::MIN, i64::MIN, 7)];
        let back = SharePartition::from_snapshot(s, &odd);
        assert!(back.records.values().all(|r| r.retry_at_ms == 0));
        let got = sp.acquire(&one(0, 1), 2, &a, 10, 1100, &mut none);
        assert_eq!(got.ranges, vec![(0, 0, 2)]);
        assert_eq!(sp.snapshot().retry_at, vec![]);
        // A lock expiring after the second delivery backs off twice as long, from its
        // deadline (expiry applied late).
        sp.expire(1100 + 1000 + 500);
        assert_eq!(sp.records[&0].retry_at_ms, 2100 + 2000);
        // Records a closing session gives back are available at once.
        let mut sp = SharePartition::new(s, 0);
        sp.acquire(&one(0, 0), 1, &a, 10, 0, &mut none);
        sp.release_member("a");
        assert_eq!(sp.acquire(&one(0, 0), 1, &a, 10, 0, &mut none).records, 1);
    }

    #[test]
    fn delivery_times_are_read_again_after_a_restart() {
        let mut sp = SharePartition::new(settings(), 0);
        let a: Rc<str> = "a".into();
        let mut due = |_: usize| vec![(1, 9000)];
        sp.acquire(&one(0, 2), 3, &a, 10, 0, &mut due);
        let back = SharePartition::from_snapshot(settings(), &sp.snapshot());
        let mut sp = back;
        assert_eq!(sp.records[&1].due_ms, None);
        // Unknown times count as readable; the batch is read and the record waits again.
        assert_eq!(sp.read_from(0), 0);
        let mut again = |_: usize| vec![(1, 9000)];
        let got = sp.acquire(&one(0, 2), 3, &a, 10, 10, &mut again);
        assert_eq!(got.ranges, vec![(0, 0, 2), (2, 2, 2)]);
        assert_eq!(sp.records[&1].due_ms, Some(9000));
        assert_eq!(sp.next_due_ms(10), Some(9000));
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
        sp.acquire(&one(0, 2), 3, &a, 10, 0, &mut none);
        // 0 rejected, 1 a gap (never dead-lettered), 2 released up to the limit.
        sp.acknowledge("a", &[ack(0, 0, ACK_REJECT), ack(1, 1, ACK_GAP)], 0)
            .unwrap();
        for _ in 0..3 {
            sp.acknowledge("a", &[ack(2, 2, ACK_RELEASE)], 0).unwrap();
            sp.acquire(&one(0, 2), 3, &a, 10, 0, &mut none);
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
        plain.acquire(&one(0, 0), 1, &a, 10, 0, &mut none);
        plain.acknowledge("a", &[ack(0, 0, ACK_REJECT)], 0).unwrap();
        assert!(plain.dead_letter.is_empty());
        assert_eq!(plain.start, 1);
    }

    #[test]
    fn reads_are_sized_by_the_records_wanted_not_the_request_bytes() {
        let mut sp = SharePartition::new(settings(), 0);
        // Nothing read yet: the minimum, or less when the request allows less.
        assert_eq!(sp.read_bytes(1000, 50 << 20), READ_BYTES_MIN);
        assert_eq!(sp.read_bytes(1000, 4096), 4096);
        // 1,000 records of ~1 KiB: about 1.25 MB, not the 50 MB the client allows.
        sp.note_read(1 << 20, 1024);
        assert_eq!(sp.read_bytes(1000, 50 << 20), 1_280_000);
        // Large records: as many bytes as the records wanted take, up to the request's limit.
        sp.note_read(100 << 20, 100);
        let b = sp.read_bytes(500, 50 << 20);
        assert!(b > 8 << 20 && b <= 50 << 20, "{b}");
        assert_eq!(sp.read_bytes(usize::MAX, 50 << 20), 50 << 20);
        sp.note_read(0, 0);
    }
}
