//! Share partitions at run time and their durable state in `__share_group_state`.
//!
//! Two roles on every shard:
//! - **Share partitions** of the data partitions this shard owns: a registry keyed by (group,
//!   topic id, partition) of [`SharePartition`]s, created at a group's first ShareFetch of the
//!   partition (from the persisted state if there is one, else at the log start or end by
//!   `share.auto.offset.reset`). ShareFetch and ShareAcknowledge run here ([`fetch_here`]).
//! - **State store** of the `__share_group_state` partitions this shard owns (50, compacted):
//!   the newest snapshot of every share partition whose key hashes there (Kafka's placement:
//!   `abs(hashCode("group:topicId:partition")) % 50`), replayed at start, read when a share
//!   partition is created and written before an acknowledgement is answered.
//!
//! Each write is a whole snapshot (Kafka's `ShareSnapshot`; Sluice writes no `ShareUpdate`
//! deltas): the start offset and the Acknowledged/Archived ranges and delivery counts in flight,
//! at most `group.share.partition.max.record.locks` records' worth, so compaction keeping the
//! latest record per key keeps exactly the state.
//!
//! ```text
//! key   := version:i16=0 group:str topicId:16 partition:i32     (ShareSnapshotKey)
//! value := version:i16=0 snapshotEpoch:i32 stateEpoch:i32 leaderEpoch:i32 startOffset:i64
//!          stateBatches:[firstOffset:i64 lastOffset:i64 deliveryState:i8 deliveryCount:i16
//!          tagged] tagged                                         (compact array)
//! ```
//!
//! Tagged field 1 of the value (delayed delivery; written only when non-empty) holds the
//! release back-offs of Available records, which a restart must keep exactly:
//! `retryAt:[firstOffset:i64 lastOffset:i64 retryAtMs:i64]` (compact array). Delivery times
//! from record headers are not stored: they are read from the log again.
//!
//! Dead-letter pending records (KIP-1191, see `share_dlq`) ride in the value's tagged field
//! [`DLQ_PENDING_TAG`], which readers that do not know it skip:
//!
//! ```text
//! pending := [offset:i64 deliveryCount:i16 reason:i8 attempt:i8
//!             (attempt=1: dlqTopicId:16 dlqPartition:i32 dlqFrom:i64)]   (compact array)
//! ```

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use event_listener::Event;
use kafka_protocol::ResponseError as E;

use crate::metadata::TopicMeta;
use crate::protocol::batch;
use crate::protocol::builder::{self, BatchBuilder, BatchOptions};
use crate::protocol::records;
use crate::storage::{Durability, PartitionLog, ReadOptions};
use crate::types::{ErrorCode, Offset, TopicPartition};

use super::coordinator::java_string_hash;
use super::offsets::FormatError;
use super::share::{AutoOffsetReset, PartitionSettings};
use super::share_delay;
use super::share_partition::{
    AckRange, BatchSpan, DlqAttempt, DlqPending, DlqReason, RecordState, SharePartition, Snapshot,
    StateBatch,
};

/// The internal topic holding share-partition state.
pub const STATE_TOPIC: &str = "__share_group_state";
/// Kafka's default `share.coordinator.state.topic.num.partitions`.
pub const STATE_PARTITIONS: i32 = 50;
/// How long a request waits for its state partition to finish replaying.
const LOAD_WAIT_MAX: Duration = Duration::from_secs(5);
/// Bytes read per step while replaying a state partition.
const REPLAY_READ_BYTES_MAX: u32 = 1 << 20;
/// The value's tagged field listing dead-letter pending records (KIP-1191's number).
pub const DLQ_PENDING_TAG: u64 = 1191;
/// Smallest pending entry: offset, count, reason, attempt flag.
const DLQ_PENDING_BYTES_MIN: usize = 8 + 2 + 1 + 1;

/// One share partition: its group, topic id and partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateKey {
    pub group: String,
    pub topic: [u8; 16],
    pub partition: i32,
}

impl StateKey {
    /// The `__share_group_state` partition holding this key's state.
    pub fn state_partition(&self, partitions: i32) -> i32 {
        let s = format!(
            "{}:{}:{}",
            self.group,
            uuid::Uuid::from_bytes(self.topic),
            self.partition
        );
        (java_string_hash(&s).unsigned_abs() % partitions.max(1) as u32) as i32
    }
}

#[derive(Default)]
pub struct ShareShard {
    partitions: RefCell<HashMap<StateKey, Rc<RefCell<SharePartition>>>>,
    logs: RefCell<HashMap<i32, Rc<PartitionLog>>>,
    states: RefCell<HashMap<StateKey, Snapshot>>,
    loaded: Event,
}

thread_local! {
    static LOCAL: RefCell<Option<Rc<ShareShard>>> = const { RefCell::new(None) };
}

fn local() -> Rc<ShareShard> {
    LOCAL.with(|l| l.borrow_mut().get_or_insert_with(Default::default).clone())
}

fn not_available() -> ErrorCode {
    ErrorCode::new(E::CoordinatorNotAvailable)
}

// ------------------------------------------------------------------------------ records

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(i16::MAX as usize)];
    out.extend_from_slice(&(b.len() as i16).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn encode_key(k: &StateKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + k.group.len());
    out.extend_from_slice(&0i16.to_be_bytes());
    put_str(&mut out, &k.group);
    out.extend_from_slice(&k.topic);
    out.extend_from_slice(&k.partition.to_be_bytes());
    out
}

pub fn encode_value(s: &Snapshot) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + 20 * s.batches.len());
    out.extend_from_slice(&0i16.to_be_bytes());
    out.extend_from_slice(&s.snapshot_epoch.to_be_bytes());
    out.extend_from_slice(&s.state_epoch.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&s.start_offset.to_be_bytes());
    put_uvarint(&mut out, s.batches.len() as u64 + 1);
    for b in &s.batches {
        out.extend_from_slice(&b.first.to_be_bytes());
        out.extend_from_slice(&b.last.to_be_bytes());
        out.push(b.state as i8 as u8);
        out.extend_from_slice(&b.delivery_count.to_be_bytes());
        out.push(0);
    }
    // Tagged fields, in tag order, each written only when non-empty.
    let mut tags: Vec<(u64, Vec<u8>)> = Vec::new();
    if !s.retry_at.is_empty() {
        let mut f = Vec::with_capacity(1 + RETRY_AT_BYTES * s.retry_at.len());
        put_uvarint(&mut f, s.retry_at.len() as u64 + 1);
        for (first, last, at) in &s.retry_at {
            f.extend_from_slice(&first.to_be_bytes());
            f.extend_from_slice(&last.to_be_bytes());
            f.extend_from_slice(&at.to_be_bytes());
        }
        tags.push((TAG_RETRY_AT, f));
    }
    if !s.dead_letter.is_empty() {
        let mut f = Vec::with_capacity(1 + 40 * s.dead_letter.len());
        put_uvarint(&mut f, s.dead_letter.len() as u64 + 1);
        for (o, p) in &s.dead_letter {
            f.extend_from_slice(&o.to_be_bytes());
            f.extend_from_slice(&p.delivery_count.to_be_bytes());
            f.push(p.reason as i8 as u8);
            match &p.attempt {
                None => f.push(0),
                Some(a) => {
                    f.push(1);
                    f.extend_from_slice(&a.topic);
                    f.extend_from_slice(&a.partition.to_be_bytes());
                    f.extend_from_slice(&a.from.to_be_bytes());
                }
            }
        }
        tags.push((DLQ_PENDING_TAG, f));
    }
    put_uvarint(&mut out, tags.len() as u64);
    for (tag, f) in tags {
        put_uvarint(&mut out, tag);
        put_uvarint(&mut out, f.len() as u64);
        out.extend_from_slice(&f);
    }
    out
}

/// The value's tagged field holding release back-offs.
const TAG_RETRY_AT: u64 = 1;
/// Size of one release back-off range: two offsets and a time.
const RETRY_AT_BYTES: usize = 8 + 8 + 8;

fn decode_retry_at(buf: &[u8]) -> Result<Vec<(i64, i64, i64)>, FormatError> {
    let mut r = Reader { buf, at: 0 };
    let n = usize::try_from(r.uvarint()?.saturating_sub(1))
        .map_err(|_| FormatError("length overflow".into()))?;
    // Bounded by the bytes present, never by the number itself.
    if n > r.remaining() / RETRY_AT_BYTES {
        return Err(FormatError(format!(
            "release back-off count {n} exceeds the record"
        )));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (first, last, at) = (r.i64()?, r.i64()?, r.i64()?);
        if first > last {
            return Err(FormatError(
                "release back-off with first offset past its last".into(),
            ));
        }
        out.push((first, last, at));
    }
    Ok(out)
}

fn decode_dead_letter(buf: &[u8]) -> Result<Vec<(i64, DlqPending)>, FormatError> {
    let mut r = Reader { buf, at: 0 };
    let n = r.uvarint()?;
    let n =
        usize::try_from(n.saturating_sub(1)).map_err(|_| FormatError("length overflow".into()))?;
    if n > r.remaining() / DLQ_PENDING_BYTES_MIN {
        return Err(FormatError(format!(
            "dead-letter pending count {n} exceeds the record"
        )));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let offset = r.i64()?;
        let delivery_count = r.i16()?;
        let reason = DlqReason::from_id(r.i8()?)
            .ok_or_else(|| FormatError("unknown dead-letter reason".into()))?;
        let attempt = match r.i8()? {
            0 => None,
            1 => Some(DlqAttempt {
                topic: r.take(16)?.try_into().expect("16 bytes"),
                partition: r.i32()?,
                from: r.i64()?,
            }),
            _ => return Err(FormatError("bad dead-letter attempt flag".into())),
        };
        out.push((
            offset,
            DlqPending {
                reason,
                delivery_count,
                attempt,
            },
        ));
    }
    Ok(out)
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], FormatError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| FormatError("share state record truncated".into()))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn i8(&mut self) -> Result<i8, FormatError> {
        Ok(self.take(1)?[0] as i8)
    }
    fn i16(&mut self) -> Result<i16, FormatError> {
        Ok(i16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn i32(&mut self) -> Result<i32, FormatError> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn i64(&mut self) -> Result<i64, FormatError> {
        Ok(i64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn uvarint(&mut self) -> Result<u64, FormatError> {
        let mut v = 0u64;
        for shift in (0..35).step_by(7) {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(FormatError("varint too long".into()))
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }
}

pub fn decode_key(buf: &[u8]) -> Result<StateKey, FormatError> {
    let mut r = Reader { buf, at: 0 };
    match r.i16()? {
        0 => {}
        v => return Err(FormatError(format!("unknown share state key version {v}"))),
    }
    let n = r.i16()?;
    if n < 0 {
        return Err(FormatError("null group id".into()));
    }
    let group = String::from_utf8(r.take(n as usize)?.to_vec())
        .map_err(|_| FormatError("group id is not UTF-8".into()))?;
    let topic: [u8; 16] = r.take(16)?.try_into().expect("16 bytes");
    let partition = r.i32()?;
    Ok(StateKey {
        group,
        topic,
        partition,
    })
}

/// Size of one state batch on the wire: offsets, state, count, tagged fields.
const STATE_BATCH_BYTES: usize = 8 + 8 + 1 + 2 + 1;

pub fn decode_value(buf: &[u8]) -> Result<Snapshot, FormatError> {
    let mut r = Reader { buf, at: 0 };
    match r.i16()? {
        0 => {}
        v => {
            return Err(FormatError(format!(
                "unknown share state value version {v}"
            )))
        }
    }
    let snapshot_epoch = r.i32()?;
    let state_epoch = r.i32()?;
    let _leader_epoch = r.i32()?;
    let start_offset = r.i64()?;
    let n = r.uvarint()?;
    let n =
        usize::try_from(n.saturating_sub(1)).map_err(|_| FormatError("length overflow".into()))?;
    // Bounded by the bytes present, never by the number itself.
    if n > r.remaining() / STATE_BATCH_BYTES {
        return Err(FormatError(format!(
            "state batch count {n} exceeds the record"
        )));
    }
    let mut batches = Vec::with_capacity(n);
    for _ in 0..n {
        let first = r.i64()?;
        let last = r.i64()?;
        let state = RecordState::from_id(r.i8()?)
            .ok_or_else(|| FormatError("unknown delivery state".into()))?;
        let delivery_count = r.i16()?;
        let _tagged = r.uvarint()?;
        if first > last {
            return Err(FormatError(
                "state batch with first offset past its last".into(),
            ));
        }
        batches.push(StateBatch {
            first,
            last,
            state,
            delivery_count,
        });
    }
    let (mut retry_at, mut dead_letter) = (vec![], vec![]);
    // Tagged fields; unknown tags are skipped.
    for _ in 0..r.uvarint()? {
        let tag = r.uvarint()?;
        let len =
            usize::try_from(r.uvarint()?).map_err(|_| FormatError("length overflow".into()))?;
        let field = r.take(len)?;
        if tag == TAG_RETRY_AT {
            retry_at = decode_retry_at(field)?;
        } else if tag == DLQ_PENDING_TAG {
            dead_letter = decode_dead_letter(field)?;
        }
    }
    Ok(Snapshot {
        snapshot_epoch,
        state_epoch,
        start_offset,
        batches,
        retry_at,
        dead_letter,
    })
}

// ------------------------------------------------------------------------------ state store

/// Replays state partition `p` (owned here) and serves it.
async fn load_state_partition(p: i32, log: Rc<PartitionLog>) -> Result<usize, String> {
    let me = local();
    let mut next = log.log_start_offset();
    let end = log.high_watermark();
    let mut applied = 0;
    while next < end {
        let r = log
            .read(ReadOptions {
                start: next,
                bytes_max: REPLAY_READ_BYTES_MAX,
            })
            .await
            .map_err(|e| e.to_string())?;
        if r.batches.is_empty() {
            break;
        }
        let before = next;
        for b in &r.batches {
            let Ok(h) = batch::BatchHeader::parse(b) else {
                continue;
            };
            let last = h.last_offset();
            if last < next {
                continue;
            }
            if !h.is_control() {
                match records::decode_batch(b) {
                    Ok(recs) => {
                        for rec in recs.into_iter().filter(|r| r.offset >= next.0) {
                            if apply(&me, &rec) {
                                applied += 1;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(partition = p, error = %e, "skipping undecodable batch in {STATE_TOPIC}")
                    }
                }
            }
            next = last.next();
        }
        if next == before {
            tracing::warn!(
                partition = p,
                "{STATE_TOPIC} replay stopped at undecodable data"
            );
            break;
        }
    }
    me.logs.borrow_mut().insert(p, log);
    me.loaded.notify(usize::MAX);
    Ok(applied)
}

fn apply(me: &ShareShard, rec: &records::Record) -> bool {
    let Some(k) = rec.key.as_ref() else {
        return false;
    };
    let key = match decode_key(k) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(offset = rec.offset, error = %e, "skipping {STATE_TOPIC} record");
            return false;
        }
    };
    match rec.value.as_ref().map(|v| decode_value(v)) {
        None => {
            me.states.borrow_mut().remove(&key);
        }
        Some(Ok(s)) => {
            // As in `write_state`: a snapshot older than the one kept (two writes of one share
            // partition that reached the log out of order) does not replace it.
            let mut states = me.states.borrow_mut();
            let newer = states.get(&key).is_none_or(|old| {
                s.snapshot_epoch.wrapping_sub(old.snapshot_epoch) > 0
                    || s.state_epoch != old.state_epoch
            });
            if newer {
                states.insert(key, s);
            }
        }
        Some(Err(e)) => {
            tracing::warn!(offset = rec.offset, error = %e, "skipping {STATE_TOPIC} record");
            return false;
        }
    }
    true
}

/// Starts the state store of the calling shard (single node only): creates
/// `__share_group_state` if missing (shard 0) and replays the partitions this shard owns.
pub fn start_shard_tasks() {
    if crate::shard::local().broker.config.cluster.is_some() {
        return;
    }
    crate::contain::spawn_background("share group state", async move {
        let (_, owned) =
            match crate::admin::internal_topic_here(STATE_TOPIC, STATE_PARTITIONS, 1).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(error = %e, "share group state failed to load");
                    return;
                }
            };
        for (p, log) in owned {
            if let Err(e) = load_state_partition(p, log).await {
                tracing::error!(partition = p, error = %e, "cannot replay {STATE_TOPIC}");
                return;
            }
        }
        // Records left dead-letter pending by the last run are copied now, without waiting
        // for the group's next fetch of their partition.
        let pending: Vec<StateKey> = local()
            .states
            .borrow()
            .iter()
            .filter(|(_, s)| !s.dead_letter.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for key in pending {
            crate::contain::spawn_background("share dead-letter recovery", async move {
                resume_dead_letter(key).await;
            });
        }
    });
}

/// Loads the share partition `key` on its data partition's shard and starts its dead-letter
/// drain (see `share_dlq`). Gives up quietly when the group or topic is gone or not loaded:
/// the group's next fetch of the partition starts the drain too.
async fn resume_dead_letter(key: StateKey) {
    let Some(meta) = topic_by_id(&key.topic) else {
        return;
    };
    let g = key.group.clone();
    let Ok(settings) = super::on_coordinator(&key.group, move |gs| async move {
        gs.coordinator.borrow().share_settings(&g)
    })
    .await
    else {
        return;
    };
    let broker = crate::shard::local().broker.clone();
    let Some(owner) = broker.owner(&meta, key.partition) else {
        return;
    };
    let tp = TopicPartition::new(meta.name.clone(), key.partition);
    crate::shard::invoke_on(owner, move || async move {
        let Some(log) = crate::shard::local().partition(&tp) else {
            return;
        };
        if let Ok(sp) = partition_here(&key, settings, &log).await {
            super::share_dlq::kick(&key, &sp, &log);
        }
    })
    .await;
}

/// Runs `f` on the shard owning `key`'s state partition, once that partition is loaded.
async fn on_state_owner<F, R>(key: &StateKey, f: F) -> Result<R, ErrorCode>
where
    F: FnOnce(
            Rc<ShareShard>,
            i32,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<R, ErrorCode>>>>
        + Send
        + 'static,
    R: Send + 'static,
{
    let broker = crate::shard::local().broker.clone();
    let image = broker.image();
    let meta = image.topic(STATE_TOPIC).ok_or_else(not_available)?;
    let p = key.state_partition(meta.partition_count());
    let owner = broker.owner(meta, p).ok_or_else(not_available)?;
    crate::shard::invoke_on(owner, move || async move {
        let me = local();
        let wait = async {
            loop {
                let done = me.loaded.listen();
                if me.logs.borrow().contains_key(&p) {
                    return;
                }
                done.await;
            }
        };
        futures_lite::future::or(wait, crate::shard::local().clock.sleep(LOAD_WAIT_MAX)).await;
        if !me.logs.borrow().contains_key(&p) {
            return Err(ErrorCode::new(E::CoordinatorLoadInProgress));
        }
        f(me, p).await
    })
    .await
}

/// The persisted state of `key`, if any.
pub async fn read_state(key: &StateKey) -> Result<Option<Snapshot>, ErrorCode> {
    let k = key.clone();
    on_state_owner(key, move |me, _| {
        Box::pin(async move { Ok(me.states.borrow().get(&k).cloned()) })
    })
    .await
}

/// Writes `s` (or a tombstone) for `key` and waits until it is on disk. A snapshot older than
/// the stored one (a reordered write) is not applied in memory; compaction keeps the last
/// written, which replay then compares the same way only within one partition's order, so
/// writes of one share partition go out one at a time (see [`persist`]).
pub async fn write_state(key: &StateKey, s: Option<Snapshot>) -> Result<(), ErrorCode> {
    let k = key.clone();
    on_state_owner(key, move |me, p| {
        Box::pin(async move {
            let log = me
                .logs
                .borrow()
                .get(&p)
                .cloned()
                .ok_or_else(not_available)?;
            let now = crate::shard::local().clock.now_ms();
            let key_bytes = encode_key(&k);
            let value = s.as_ref().map(encode_value);
            let mut b = BatchBuilder::new(BatchOptions::default());
            b.push(&builder::Record {
                key: Some(&key_bytes),
                value: value.as_deref(),
                headers: &[],
                timestamp_ms: now,
            });
            let bytes = b.finish().map_err(|_| not_available())?;
            log.append(BytesMut::from(&bytes[..]), Durability::Synced)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "cannot persist share-partition state");
                    not_available()
                })?;
            let mut states = me.states.borrow_mut();
            match s {
                None => {
                    states.remove(&k);
                }
                Some(s) => {
                    let newer = states.get(&k).is_none_or(|old| {
                        s.snapshot_epoch.wrapping_sub(old.snapshot_epoch) > 0
                            || s.state_epoch != old.state_epoch
                    });
                    if newer {
                        states.insert(k, s);
                    }
                }
            }
            Ok(())
        })
    })
    .await
}

/// Every stored share-partition state of `group` on every shard: (topic id, partition, start
/// offset, records past the start whose delivery is complete).
pub async fn group_states(group: &str) -> Vec<([u8; 16], i32, i64, i64)> {
    let g = group.to_string();
    let all = crate::shard::invoke_on_all(move || {
        let g = g.clone();
        async move {
            local()
                .states
                .borrow()
                .iter()
                .filter(|(k, _)| k.group == g)
                .map(|(k, s)| {
                    (
                        k.topic,
                        k.partition,
                        s.start_offset,
                        s.delivery_complete_count(),
                    )
                })
                .collect::<Vec<_>>()
        }
    })
    .await;
    let mut out: Vec<_> = all.into_iter().flatten().collect();
    out.sort();
    out
}

// ------------------------------------------------------------------------------ share partitions

/// Persists `sp`'s state if it changed. Snapshots of one share partition are taken and written
/// one at a time: a write that finds another in progress leaves the newer state to it.
async fn persist(key: &StateKey, sp: &Rc<RefCell<SharePartition>>) -> Result<(), ErrorCode> {
    loop {
        let snap = {
            let mut s = sp.borrow_mut();
            if !s.dirty {
                return Ok(());
            }
            s.take_snapshot()
        };
        write_state(key, Some(snap)).await?;
    }
}

async fn partition_here(
    key: &StateKey,
    settings: PartitionSettings,
    log: &PartitionLog,
) -> Result<Rc<RefCell<SharePartition>>, ErrorCode> {
    let me = local();
    if let Some(sp) = me.partitions.borrow().get(key) {
        sp.borrow_mut().settings = settings;
        return Ok(sp.clone());
    }
    let stored = read_state(key).await?;
    if let Some(sp) = me.partitions.borrow().get(key) {
        return Ok(sp.clone());
    }
    let sp = match stored {
        Some(s) => {
            let mut sp = SharePartition::from_snapshot(settings, &s);
            sp.truncate_below(log.log_start_offset().0);
            sp
        }
        None => SharePartition::new(
            settings,
            match settings.auto_offset_reset {
                AutoOffsetReset::Earliest => log.log_start_offset().0,
                AutoOffsetReset::Latest => log.high_watermark().0,
            },
        ),
    };
    let sp = Rc::new(RefCell::new(sp));
    me.partitions.borrow_mut().insert(key.clone(), sp.clone());
    Ok(sp)
}

/// One partition of a ShareFetch or ShareAcknowledge, run on the partition's owner shard.
pub struct FetchPart {
    pub key: StateKey,
    pub member: String,
    pub settings: PartitionSettings,
    pub acks: Vec<AckRange>,
    /// 0: acknowledge only.
    pub max_records: usize,
    pub bytes_max: u32,
}

#[derive(Debug, Default)]
pub struct FetchPartResult {
    pub error: ErrorCode,
    /// `None`: nothing was acknowledged.
    pub ack_error: Option<ErrorCode>,
    pub ranges: Vec<(i64, i64, i16)>,
    pub batches: Vec<Bytes>,
    pub acquired: usize,
    /// What a waiting fetch waits for: an append past `end` (when the window has room) or the
    /// first lock deadline.
    pub end: i64,
    pub window_open: bool,
    pub deadline_ms: Option<i64>,
}

/// Applies the acknowledgements, then acquires records for the member.
pub async fn fetch_here(log: Rc<PartitionLog>, part: FetchPart) -> FetchPartResult {
    let mut out = FetchPartResult::default();
    let sp = match partition_here(&part.key, part.settings, &log).await {
        Ok(sp) => sp,
        Err(e) => {
            out.error = e;
            if !part.acks.is_empty() {
                out.ack_error = Some(e);
            }
            return out;
        }
    };
    let clock = crate::shard::local().clock.clone();
    let member: Rc<str> = part.member.as_str().into();
    {
        let mut s = sp.borrow_mut();
        s.truncate_below(log.log_start_offset().0);
        s.expire(clock.now_ms());
        if !part.acks.is_empty() {
            out.ack_error = Some(
                match s.acknowledge(&part.member, &part.acks, clock.now_ms()) {
                    Ok(()) => ErrorCode::NONE,
                    Err(e) => e,
                },
            );
        }
    }
    let readable_end = if part.settings.read_committed {
        log.last_stable_offset().0
    } else {
        log.high_watermark().0
    };
    if part.max_records > 0 {
        let now = clock.now_ms();
        let from = {
            let s = sp.borrow();
            (s.has_available(now) || s.window_open()).then(|| s.read_from(now))
        };
        if let Some(from) = from.filter(|f| *f < readable_end) {
            let bytes_max = sp.borrow().read_bytes(part.max_records, part.bytes_max);
            match log
                .read(ReadOptions {
                    start: Offset(from),
                    bytes_max,
                })
                .await
            {
                Ok(r) => {
                    let (bytes, records) = r
                        .batches
                        .iter()
                        .filter_map(|b| {
                            batch::BatchHeader::parse(b)
                                .ok()
                                .map(|h| (b.len() as u64, h.record_count().max(0) as u64))
                        })
                        .fold((0, 0), |(b, n), (x, y)| (b + x, n + y));
                    sp.borrow_mut().note_read(bytes, records);
                    let mut spans = Vec::with_capacity(r.batches.len());
                    let mut aborted: Vec<(i64, i64, i64)> = vec![];
                    if part.settings.read_committed {
                        if let Some(last) = r
                            .batches
                            .last()
                            .and_then(|b| batch::BatchHeader::parse(b).ok())
                        {
                            aborted = log
                                .aborted_between(Offset(from), last.last_offset().next())
                                .into_iter()
                                .map(|a| (a.producer_id, a.first.0, a.last.0))
                                .collect();
                        }
                    }
                    for b in &r.batches {
                        if let Ok(h) = batch::BatchHeader::parse(b) {
                            // An aborted transaction's records are never delivered to a
                            // read_committed group: archived like control records.
                            let dropped = h.is_transactional()
                                && aborted.iter().any(|(pid, first, last)| {
                                    *pid == h.producer_id()
                                        && (*first..=*last).contains(&h.base_offset().0)
                                });
                            spans.push(BatchSpan {
                                base: h.base_offset().0,
                                last: h.last_offset().0,
                                control: h.is_control() || dropped,
                            });
                        }
                    }
                    // Delivery times are read only from batches whose records need them (and
                    // `spans` indexes `r.batches` only while every header parsed).
                    let batches = &r.batches;
                    let mut due_of = |i: usize| {
                        if spans.len() == batches.len() {
                            batches
                                .get(i)
                                .map(share_delay::due_times)
                                .unwrap_or_default()
                        } else {
                            vec![]
                        }
                    };
                    let got = sp.borrow_mut().acquire(
                        &spans,
                        readable_end,
                        &member,
                        part.max_records,
                        clock.now_ms(),
                        &mut due_of,
                    );
                    out.batches = got
                        .batches
                        .iter()
                        .filter_map(|i| r.batches.get(*i).cloned())
                        .collect();
                    out.ranges = got.ranges;
                    out.acquired = got.records;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "share fetch read failed");
                    out.error = ErrorCode::new(E::UnknownServerError);
                }
            }
        }
    }
    if let Err(e) = persist(&part.key, &sp).await {
        if out.ack_error.is_some() {
            out.ack_error = Some(e);
        }
    }
    super::share_dlq::kick(&part.key, &sp, &log);
    let s = sp.borrow();
    out.end = s.end;
    out.window_open = s.window_open();
    let due = s.next_due_ms(clock.now_ms());
    out.deadline_ms = match (s.next_deadline_ms(), due) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    out
}

/// Releases what `member` holds in the share partition `key` (its share session closed).
pub async fn release_here(key: StateKey, member: String) {
    let sp = local().partitions.borrow().get(&key).cloned();
    if let Some(sp) = sp {
        sp.borrow_mut().release_member(&member);
        let _ = persist(&key, &sp).await;
        let log = topic_by_id(&key.topic).and_then(|t| {
            crate::shard::local().partition(&TopicPartition::new(t.name.clone(), key.partition))
        });
        if let Some(log) = log {
            super::share_dlq::kick(&key, &sp, &log);
        }
    }
}

/// Waits on the owner shard until `tp` has an append past `end` (when `append` is set), the
/// clock reaches `deadline_ms`, `remaining` passes or `done` closes.
pub async fn wait_here(
    tp: TopicPartition,
    end: Option<i64>,
    deadline_ms: Option<i64>,
    remaining: Duration,
    done: async_channel::Receiver<()>,
) {
    let here = crate::shard::local();
    let clock = here.clock.clone();
    let until = deadline_ms
        .map(|d| Duration::from_millis((d - clock.now_ms()).max(0) as u64))
        .map_or(remaining, |d| d.min(remaining));
    let log = here.partition(&tp);
    let append = async {
        match (log, end) {
            (Some(log), Some(end)) => log.wait_for_append(Offset(end)).await,
            _ => std::future::pending::<()>().await,
        }
    };
    futures_lite::future::or(
        futures_lite::future::or(append, clock.sleep(until)),
        async {
            let _ = done.recv().await;
        },
    )
    .await
}

/// Resets share partitions of `group` (AlterShareGroupOffsets) on this shard, or writes the
/// state directly for partitions not loaded here. `offset` -1 is the log end, -2 the log start.
pub async fn reset_here(
    log: Rc<PartitionLog>,
    key: StateKey,
    offset: i64,
) -> Result<(), ErrorCode> {
    let offset = match offset {
        -1 => log.high_watermark().0,
        -2 => log.log_start_offset().0,
        o if o < 0 => return Err(ErrorCode::new(E::InvalidRequest)),
        o => o.clamp(log.log_start_offset().0, log.high_watermark().0),
    };
    let sp = local().partitions.borrow().get(&key).cloned();
    match sp {
        Some(sp) => {
            sp.borrow_mut().reset_to(offset);
            persist(&key, &sp).await
        }
        None => {
            let old = read_state(&key).await?;
            let snap = Snapshot {
                snapshot_epoch: old.as_ref().map_or(0, |o| o.snapshot_epoch.wrapping_add(1)),
                state_epoch: old.as_ref().map_or(0, |o| o.state_epoch.wrapping_add(1)),
                start_offset: offset,
                batches: vec![],
                retry_at: vec![],
                dead_letter: vec![],
            };
            write_state(&key, Some(snap)).await
        }
    }
}

/// Forgets a share partition of `group` (DeleteShareGroupOffsets): dropped here and tombstoned.
pub async fn delete_here(key: StateKey) -> Result<(), ErrorCode> {
    local().partitions.borrow_mut().remove(&key);
    write_state(&key, None).await
}

/// The metadata of `topic_id` in the current image.
pub fn topic_by_id(topic_id: &[u8; 16]) -> Option<Arc<TopicMeta>> {
    crate::shard::local()
        .broker
        .image()
        .topic_by_id(topic_id)
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_records_round_trip_and_counts_are_bounded() {
        let k = StateKey {
            group: "g".into(),
            topic: [7; 16],
            partition: 3,
        };
        assert_eq!(decode_key(&encode_key(&k)).unwrap(), k);
        let s = Snapshot {
            snapshot_epoch: 4,
            state_epoch: 1,
            start_offset: 10,
            batches: vec![StateBatch {
                first: 10,
                last: 12,
                state: RecordState::Acknowledged,
                delivery_count: 2,
            }],
            retry_at: vec![],
            dead_letter: vec![],
        };
        let v = encode_value(&s);
        assert_eq!(decode_value(&v).unwrap(), s);
        // Every truncation fails cleanly.
        for n in 0..v.len() {
            assert!(decode_value(&v[..n]).is_err(), "truncated at {n}");
        }
        // Release back-offs ride in tagged field 1; unknown tags are skipped.
        let with_retry = Snapshot {
            retry_at: vec![(11, 12, 5_000), (14, 14, 6_000)],
            ..s.clone()
        };
        let rv = encode_value(&with_retry);
        assert_eq!(decode_value(&rv).unwrap(), with_retry);
        for n in 0..rv.len() {
            assert!(decode_value(&rv[..n]).is_err(), "truncated at {n}");
        }
        let mut unknown = v[..v.len() - 1].to_vec();
        unknown.extend_from_slice(&[1, 7, 1, 0xee]);
        assert_eq!(decode_value(&unknown).unwrap(), s);
        let mut huge_retry = v[..v.len() - 1].to_vec();
        huge_retry.extend_from_slice(&[1, 1, 5, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        let e = decode_value(&huge_retry).unwrap_err();
        assert!(e.0.contains("exceeds"), "{e}");
        // A huge batch count is refused before anything is allocated.
        let mut huge = v[..22].to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        let e = decode_value(&huge).unwrap_err();
        assert!(e.0.contains("exceeds"), "{e}");

        // Dead-letter pending records ride in a tagged field: they round trip, a cut anywhere
        // in it fails, and a reader of the plain layout is what `v` decodes to.
        let mut d = s.clone();
        d.dead_letter = vec![
            (
                11,
                DlqPending {
                    reason: DlqReason::Rejected,
                    delivery_count: 1,
                    attempt: None,
                },
            ),
            (
                12,
                DlqPending {
                    reason: DlqReason::DeliveryCountExceeded,
                    delivery_count: 5,
                    attempt: Some(DlqAttempt {
                        topic: [9; 16],
                        partition: 2,
                        from: 40,
                    }),
                },
            ),
        ];
        let dv = encode_value(&d);
        assert_eq!(decode_value(&dv).unwrap(), d);
        for n in v.len()..dv.len() {
            assert!(decode_value(&dv[..n]).is_err(), "truncated at {n}");
        }
        // A huge pending count is refused before anything is allocated.
        let mut huge_pending = v[..v.len() - 1].to_vec();
        huge_pending.extend_from_slice(&[1, 0xa7, 0x09, 5, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        let e = decode_value(&huge_pending).unwrap_err();
        assert!(e.0.contains("exceeds"), "{e}");
    }
}
