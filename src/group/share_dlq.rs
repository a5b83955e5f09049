//! Dead-letter topics for share groups (KIP-1191): records a share group rejects, or that reach
//! `group.share.delivery.count.limit`, are copied to the group's dead-letter topic
//! (`errors.deadletterqueue.topic.name`) exactly once, across restarts and kill -9.
//!
//! The share partition marks such a record Archived and *dead-letter pending*; the pending set
//! is part of the share partition's snapshot in `__share_group_state` (see `share_state`), so it
//! is durable before the acknowledgement that caused it is answered. A drain task per share
//! partition, on the shard that owns the data partition, then copies pending records in rounds
//! of at most [`DLQ_IN_FLIGHT_MAX`]:
//!
//! ```text
//! 1. read the dead-letter partition's high watermark H             (owner shard of the DLQ partition)
//! 2. persist "attempt: (dlq topic id, partition, H)" on each record (__share_group_state, synced)
//! 3. append the dead-letter records, synced                        (owner shard of the DLQ partition)
//! 4. persist "done": the records leave the pending set             (__share_group_state, synced)
//! ```
//!
//! A record still pending with an attempt (a crash, a panic or an error between 2 and 4) is
//! looked for first: the dead-letter partition is scanned from `H` for a record whose
//! `__dlq.errors.*` headers name this group, topic, partition and offset. Found: step 4 only.
//! Not found: the append never happened, and the record goes through 1-4 again. A record
//! pending without an attempt was never appended (2 is durable before 3 starts).
//!
//! The drain runs after each ShareFetch/ShareAcknowledge of the partition, after a session
//! closes, and at start for every share partition whose stored state has pending records. A dead-letter topic that does not exist is created with the broker defaults when
//! topic auto-creation is on; otherwise, and after [`DLQ_FAILED_ROUNDS_MAX`] failed rounds in a
//! row, the records stay Archived only and are counted as dead-letter failures: a dead-letter
//! topic never blocks its share partition for good.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::metadata::TopicMeta;
use crate::protocol::builder::{self, BatchBuilder, BatchOptions};
use crate::protocol::compression;
use crate::storage::{Durability, PartitionLog, ReadOptions};
use crate::types::{Offset, TopicPartition};

use super::share::DeadLetter;
use super::share_partition::{DlqAttempt, DlqPending, SharePartition};
use super::share_state::{write_state, StateKey};

/// Dead-letter records appended per round (one round in flight per share partition): bounds the
/// records read, built and written at once.
pub const DLQ_IN_FLIGHT_MAX: usize = 100;
/// Bytes of dead-letter records per round: a round closes early once past it (with at least one
/// record), so that a round of large records stays one reasonable append.
const DLQ_ROUND_BYTES_MAX: usize = 4 << 20;
/// Rounds that failed in a row (storage errors, the topic unavailable) before the pending
/// records are given up: they stay Archived, counted as failures.
pub const DLQ_FAILED_ROUNDS_MAX: u32 = 5;
/// Bytes read per step from a source or dead-letter partition.
const READ_BYTES_MAX: u32 = 1 << 20;
/// Largest decompressed batch looked into (Kafka's default `message.max.bytes` is about 1 MiB;
/// this leaves room for well-compressed batches of it).
const DECODE_BYTES_MAX: usize = 64 << 20;
/// Bytes of a dead-letter partition scanned when looking for the records of an interrupted
/// attempt. Past it (a dead-letter partition that took this much from others between the
/// attempt and the recovery) the records not found are appended again.
const SCAN_BYTES_MAX: u64 = 256 << 20;

/// Header names of a dead-letter record (Sluice's choice, after Kafka Connect's
/// `__connect.errors.*`): values are UTF-8 strings.
pub const HEADER_TOPIC: &str = "__dlq.errors.topic";
pub const HEADER_PARTITION: &str = "__dlq.errors.partition";
pub const HEADER_OFFSET: &str = "__dlq.errors.offset";
pub const HEADER_GROUP: &str = "__dlq.errors.group.id";
pub const HEADER_DELIVERY_COUNT: &str = "__dlq.errors.delivery.count";
pub const HEADER_REASON: &str = "__dlq.errors.reason";

thread_local! {
    /// Share partitions with a drain running on this shard.
    static DRAINING: RefCell<HashSet<StateKey>> = RefCell::new(HashSet::new());
    /// Rounds that failed in a row, per share partition.
    static FAILED: RefCell<HashMap<StateKey, u32>> = RefCell::new(HashMap::new());
}

/// Starts a drain of `sp`'s dead-letter pending records unless one runs or none is pending.
pub fn kick(key: &StateKey, sp: &Rc<RefCell<SharePartition>>, log: &Rc<PartitionLog>) {
    if sp.borrow().dead_letter.is_empty() {
        return;
    }
    if !DRAINING.with(|d| d.borrow_mut().insert(key.clone())) {
        return;
    }
    let (key, sp, log) = (key.clone(), sp.clone(), log.clone());
    crate::contain::spawn_background("share dead-letter drain", async move {
        drain(&key, &sp, &log).await;
        // Not reached after a panic: that share partition drains again after the next start.
        DRAINING.with(|d| d.borrow_mut().remove(&key));
    });
}

enum Failure {
    /// Try again at the next kick (counted towards [`DLQ_FAILED_ROUNDS_MAX`]).
    Retry(String),
    /// Give the records up now.
    GiveUp(String),
}

async fn drain(key: &StateKey, sp: &Rc<RefCell<SharePartition>>, log: &Rc<PartitionLog>) {
    loop {
        let round = sp.borrow().dead_letter_batch(DLQ_IN_FLIGHT_MAX);
        if round.is_empty() {
            FAILED.with(|f| f.borrow_mut().remove(key));
            return;
        }
        match drain_round(key, sp, log, round.clone()).await {
            Ok(()) => {
                FAILED.with(|f| f.borrow_mut().remove(key));
            }
            Err(failure) => {
                let (give_up, why) = match failure {
                    Failure::GiveUp(why) => (true, why),
                    Failure::Retry(why) => {
                        let n = FAILED.with(|f| {
                            let mut f = f.borrow_mut();
                            let n = f.entry(key.clone()).or_insert(0);
                            *n += 1;
                            *n
                        });
                        (n >= DLQ_FAILED_ROUNDS_MAX, why)
                    }
                };
                if !give_up {
                    tracing::warn!(group = %key.group, partition = key.partition, error = %why,
                        "dead-letter append failed; retried at the next fetch");
                    return;
                }
                tracing::error!(group = %key.group, partition = key.partition, records = round.len(),
                    error = %why, "records not dead-lettered: they stay archived");
                FAILED.with(|f| f.borrow_mut().remove(key));
                crate::stats::dead_letter_failed(round.len() as u64);
                let offsets: Vec<i64> = round.iter().map(|(o, _)| *o).collect();
                sp.borrow_mut().dead_letter_done(&offsets);
                if let Err(e) = save(key, sp).await {
                    tracing::warn!(error = ?e, "cannot persist share-partition state");
                }
                return;
            }
        }
    }
}

/// Writes a snapshot of `sp` now (not left to a write in progress: the caller needs *this*
/// state durable before it goes on).
async fn save(
    key: &StateKey,
    sp: &Rc<RefCell<SharePartition>>,
) -> Result<(), crate::types::ErrorCode> {
    let snap = sp.borrow_mut().take_snapshot();
    write_state(key, Some(snap)).await
}

async fn drain_round(
    key: &StateKey,
    sp: &Rc<RefCell<SharePartition>>,
    log: &Rc<PartitionLog>,
    round: Vec<(i64, DlqPending)>,
) -> Result<(), Failure> {
    let group = key.group.clone();
    let dl: Option<DeadLetter> = super::on_coordinator(&group, {
        let g = group.clone();
        move |gs| async move { gs.coordinator.borrow().share_configs(&g).dead_letter() }
    })
    .await
    .map_err(|e| Failure::Retry(format!("group coordinator: {e:?}")))?;
    let Some(dl) = dl else {
        return Err(Failure::GiveUp(
            "the group no longer has a dead-letter topic".into(),
        ));
    };
    let source = super::share_state::topic_by_id(&key.topic)
        .ok_or_else(|| Failure::GiveUp("the source topic is gone".into()))?;

    // Records of an interrupted attempt that reached the dead-letter topic: done.
    let mut found = vec![];
    let mut attempts: Vec<DlqAttempt> = round.iter().filter_map(|(_, p)| p.attempt).collect();
    attempts.sort_by_key(|a| (a.topic, a.partition, a.from));
    attempts.dedup_by_key(|a| (a.topic, a.partition));
    for a in attempts {
        let want: Vec<i64> = round
            .iter()
            .filter(|(_, p)| {
                p.attempt
                    .is_some_and(|x| x.topic == a.topic && x.partition == a.partition)
            })
            .map(|(o, _)| *o)
            .collect();
        found.extend(scan(&a, &group, &source.name, key.partition, want).await?);
    }
    if !found.is_empty() {
        tracing::info!(group = %group, records = found.len(),
            "dead-letter records of an interrupted attempt found in the dead-letter topic");
        crate::stats::dead_lettered(found.len() as u64);
        sp.borrow_mut().dead_letter_done(&found);
        save(key, sp)
            .await
            .map_err(|e| Failure::Retry(format!("share state: {e:?}")))?;
    }
    let todo: Vec<(i64, DlqPending)> = round
        .into_iter()
        .filter(|(o, _)| !found.contains(o))
        .collect();
    if todo.is_empty() {
        return Ok(());
    }

    let dlq = dlq_topic(&dl.topic).await?;
    if dlq.partition_count() <= 0 {
        return Err(Failure::GiveUp(
            "the dead-letter topic has no partitions".into(),
        ));
    }
    let dlq_partition = key.partition.rem_euclid(dlq.partition_count());
    let (batch, built, missing) =
        build(log, &todo, &dl, &group, &source.name, key.partition).await?;
    if !missing.is_empty() {
        tracing::warn!(group = %group, records = missing.len(),
            "records no longer in the log cannot be dead-lettered: they stay archived");
        crate::stats::dead_letter_failed(missing.len() as u64);
        sp.borrow_mut().dead_letter_done(&missing);
    }
    let Some(batch) = batch else {
        return save(key, sp)
            .await
            .map_err(|e| Failure::Retry(format!("share state: {e:?}")));
    };

    // 1. Where the records will land, 2. recorded durably before they are written.
    let from = on_dlq_partition(&dlq, dlq_partition, |log| async move {
        Ok(log.high_watermark().0)
    })
    .await?;
    let attempt = DlqAttempt {
        topic: dlq.id,
        partition: dlq_partition,
        from,
    };
    sp.borrow_mut().dead_letter_attempt(&built, attempt);
    save(key, sp)
        .await
        .map_err(|e| Failure::Retry(format!("share state: {e:?}")))?;
    crate::fault::panic_point("dlq_append", &group);
    // 3. The append, synced.
    on_dlq_partition(&dlq, dlq_partition, move |log| async move {
        log.append(BytesMut::from(&batch[..]), Durability::Synced)
            .await
            .map(|_| ())
            .map_err(|e| Failure::Retry(format!("dead-letter append: {e}")))
    })
    .await?;
    crate::fault::panic_point("dlq_appended", &group);
    // 4. Done.
    crate::stats::dead_lettered(built.len() as u64);
    sp.borrow_mut().dead_letter_done(&built);
    save(key, sp)
        .await
        .map_err(|e| Failure::Retry(format!("share state: {e:?}")))
}

/// The dead-letter topic, created with the broker defaults when auto-creation is on.
async fn dlq_topic(name: &str) -> Result<Arc<TopicMeta>, Failure> {
    let broker = crate::shard::local().broker.clone();
    if let Some(t) = broker.image().topic(name) {
        return Ok(t.clone());
    }
    if !broker.config.auto_create_topics {
        return Err(Failure::GiveUp(format!(
            "dead-letter topic {name} does not exist and topic auto-creation is off"
        )));
    }
    match crate::admin::create_topic(
        crate::admin::NewTopic::with_defaults(name),
        crate::admin::CreateMode::Create,
        crate::admin::TopicKind::User,
    )
    .await
    {
        Ok(t) => Ok(t),
        Err(crate::admin::AdminError::TopicExists) => broker
            .image()
            .topic(name)
            .cloned()
            .ok_or_else(|| Failure::Retry(format!("dead-letter topic {name} not ready"))),
        Err(e) => Err(Failure::Retry(format!(
            "cannot create dead-letter topic {name}: {e:?}"
        ))),
    }
}

/// Runs `f` with the dead-letter partition's log on its owner shard.
async fn on_dlq_partition<F, Fut, R>(meta: &TopicMeta, partition: i32, f: F) -> Result<R, Failure>
where
    F: FnOnce(Rc<PartitionLog>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<R, Failure>> + 'static,
    R: Send + 'static,
{
    let broker = crate::shard::local().broker.clone();
    let owner = broker
        .owner(meta, partition)
        .ok_or_else(|| Failure::Retry("the dead-letter partition is not on this node".into()))?;
    let tp = TopicPartition::new(meta.name.clone(), partition);
    let r = crate::shard::invoke_on(owner, move || async move {
        let Some(log) = crate::shard::local().partition(&tp) else {
            return Err("the dead-letter partition is not open".to_string());
        };
        f(log).await.map_err(|e| match e {
            Failure::Retry(s) | Failure::GiveUp(s) => s,
        })
    })
    .await;
    r.map_err(Failure::Retry)
}

/// Source offsets of `want` that already have a dead-letter record in `a`'s partition, at or
/// after `a.from`.
async fn scan(
    a: &DlqAttempt,
    group: &str,
    topic: &str,
    partition: i32,
    want: Vec<i64>,
) -> Result<Vec<i64>, Failure> {
    let image = crate::shard::local().broker.image();
    let Some(meta) = image.topic_by_id(&a.topic).cloned() else {
        // The dead-letter topic was deleted: whatever reached it is gone.
        return Ok(vec![]);
    };
    let (from, group, topic) = (a.from, group.to_string(), topic.to_string());
    let want_set: HashSet<i64> = want.into_iter().collect();
    on_dlq_partition(&meta, a.partition, move |log| async move {
        let mut found = vec![];
        let mut next = from.max(log.log_start_offset().0);
        let end = log.high_watermark().0;
        let mut scanned = 0u64;
        let partition = partition.to_string();
        while next < end && scanned < SCAN_BYTES_MAX && found.len() < want_set.len() {
            let r = log
                .read(ReadOptions {
                    start: Offset(next),
                    bytes_max: READ_BYTES_MAX,
                })
                .await
                .map_err(|e| Failure::Retry(format!("dead-letter scan: {e}")))?;
            if r.batches.is_empty() {
                break;
            }
            let before = next;
            for b in &r.batches {
                scanned += b.len() as u64;
                let mut buf = b.clone();
                let Ok(h) = crate::protocol::batch::BatchHeader::parse(b) else {
                    break;
                };
                next = next.max(h.last_offset().0 + 1);
                if h.is_control() {
                    continue;
                }
                let Ok(recs) = compression::decode_batch(&mut buf, DECODE_BYTES_MAX) else {
                    continue;
                };
                for rec in recs {
                    let h = |name: &str| {
                        rec.headers
                            .iter()
                            .find(|(k, _)| &k[..] == name.as_bytes())
                            .and_then(|(_, v)| v.clone())
                    };
                    let is = |name: &str, v: &str| h(name).is_some_and(|x| &x[..] == v.as_bytes());
                    if !(is(HEADER_GROUP, &group)
                        && is(HEADER_TOPIC, &topic)
                        && is(HEADER_PARTITION, &partition))
                    {
                        continue;
                    }
                    let offset = h(HEADER_OFFSET)
                        .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<i64>().ok());
                    if let Some(o) = offset.filter(|o| want_set.contains(o)) {
                        found.push(o);
                    }
                }
            }
            if next == before {
                break;
            }
        }
        Ok(found)
    })
    .await
}

/// Builds one batch of dead-letter records for `todo` (in offset order) from the source log:
/// the batch, the offsets it holds, and the offsets no longer in the log.
async fn build(
    log: &PartitionLog,
    todo: &[(i64, DlqPending)],
    dl: &DeadLetter,
    group: &str,
    topic: &str,
    partition: i32,
) -> Result<(Option<Vec<u8>>, Vec<i64>, Vec<i64>), Failure> {
    let now = crate::shard::local().clock.now_ms();
    let mut b = BatchBuilder::new(BatchOptions::default());
    let (mut built, mut missing) = (vec![], vec![]);
    let mut decoded: Vec<crate::protocol::records::Record> = vec![];
    let mut bytes = 0usize;
    let partition_s = partition.to_string();
    for (o, p) in todo {
        if bytes >= DLQ_ROUND_BYTES_MAX {
            break;
        }
        if !decoded.iter().any(|r| r.offset == *o) {
            decoded.clear();
            if *o >= log.log_start_offset().0 {
                let r = log
                    .read(ReadOptions {
                        start: Offset(*o),
                        bytes_max: READ_BYTES_MAX,
                    })
                    .await
                    .map_err(|e| Failure::Retry(format!("source read: {e}")))?;
                for batch in r.batches.iter().take(1) {
                    let mut buf: Bytes = batch.clone();
                    if let Ok(recs) = compression::decode_batch(&mut buf, DECODE_BYTES_MAX) {
                        decoded = recs;
                    }
                }
            }
        }
        let Some(rec) = decoded.iter().find(|r| r.offset == *o) else {
            missing.push(*o);
            continue;
        };
        let offset_s = o.to_string();
        let count_s = p.delivery_count.to_string();
        let mut headers: Vec<(String, Option<&[u8]>)> = rec
            .headers
            .iter()
            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.as_deref()))
            .collect();
        for (k, v) in [
            (HEADER_TOPIC, topic.as_bytes()),
            (HEADER_PARTITION, partition_s.as_bytes()),
            (HEADER_OFFSET, offset_s.as_bytes()),
            (HEADER_GROUP, group.as_bytes()),
            (HEADER_DELIVERY_COUNT, count_s.as_bytes()),
            (HEADER_REASON, p.reason.name().as_bytes()),
        ] {
            headers.push((k.to_string(), Some(v)));
        }
        let headers: Vec<(&str, Option<&[u8]>)> =
            headers.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let value = if dl.copy_record {
            rec.value.as_deref()
        } else {
            None
        };
        // Where the value starts in the records section, plus the value: the bytes so far.
        bytes = b.push(&builder::Record {
            key: if dl.copy_record {
                rec.key.as_deref()
            } else {
                None
            },
            value,
            headers: &headers,
            timestamp_ms: now,
        }) + value.map_or(0, |v| v.len());
        built.push(*o);
    }
    if built.is_empty() {
        return Ok((None, built, missing));
    }
    let batch = b
        .finish()
        .map_err(|e| Failure::GiveUp(format!("cannot build the dead-letter batch: {e:?}")))?;
    Ok((Some(batch), built, missing))
}
