//! Fetch, versions 4-16 (flexible from 12, topic ids from 13), with incremental fetch sessions
//! from v7 (KIP-227; the session cache is `kafka::fetch_sessions`): epoch 0 is a full fetch that
//! opens a session, a later epoch an incremental one that names only what changed and is
//! answered with only the partitions that have something new, epoch -1 (and every request
//! before v7) is sessionless.
//!
//! The response is encoded by hand around the stored batches: the glue (headers, partition
//! fields, lengths) goes into small buffers, the batches are the log's own `Bytes`, and the
//! whole response leaves in one vectored write — record bytes are never copied, decompressed or
//! re-encoded. Long polling: when less than `min_bytes` is ready, the handler waits on the owner
//! shards until an append lands or `max_wait_ms` passes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::FetchRequest;
use kafka_protocol::ResponseError;

use super::common::{
    code, committed_end, storage_code, with_partition_at_epoch, NONE, NO_EPOCH_CHECK,
};
use crate::kafka::fetch_sessions as sessions;
use crate::kafka::{Request, Response};
use crate::metadata::TopicMeta;
use crate::protocol::wire::{put_array_len, put_uvarint};
use crate::shard;
use crate::stats::{self, FetchStage};
use crate::storage::{AbortedTxn, AppendSignal, ReadOptions, ReadResult};
use crate::types::{ErrorCode, Offset};

/// Upper bound on how long one fetch may wait, whatever the client asks.
const FETCH_WAIT_MS_MAX: u64 = 30_000;
/// Most record bytes one fetch response carries, whatever `max_bytes` the client asks: Kafka's
/// broker default `fetch.max.bytes`. Protects memory: with the windowed reads below, one fetch
/// holds about this much read data (plus one batch per concurrent read) however many
/// partitions it lists and whatever `partition_max_bytes` it declares.
const FETCH_RESPONSE_BYTES_MAX: usize = 57_671_680;
/// Most partition reads one fetch runs at once: bounds the tasks and cross-shard calls one
/// request can have outstanding, however many partitions (or copies of one) it lists.
const FETCH_READS_CONCURRENT_MAX: usize = 256;
/// Once a response holds at least `storage::READAHEAD_MIN_BYTES` (reads that large start
/// read-aheads), a partition whose share of what is left of the budget is below this is not
/// read: its offsets are reported, as for partitions past the budget. A disk read that small
/// (the smallest cold read, `storage::READ_BYTES_MIN`) queues behind the read-aheads the
/// partitions before it just started and would hold the whole response until they finish, for
/// a batch that rarely fits; the client fetches the partition again next time. Responses with
/// less data read every partition the budget reaches, as before.
const FETCH_TAIL_READ_MIN_BYTES: usize = crate::storage::READ_BYTES_MIN;

struct PartReq {
    index: i32,
    fetch_offset: i64,
    partition_max_bytes: i32,
    /// The client's leader epoch (KIP-320, v9+), checked on replicated partitions; -1: none.
    current_leader_epoch: i32,
}

struct TopicReq {
    name: String,
    id: [u8; 16],
    meta: Option<Arc<TopicMeta>>,
    error: ErrorCode,
    parts: Vec<PartReq>,
}

#[derive(Default)]
struct PartResult {
    error: ErrorCode,
    high_watermark: i64,
    /// The last stable offset (-1 with an error).
    last_stable: i64,
    log_start_offset: i64,
    /// read_committed: the aborted transactions the returned batches overlap.
    aborted: Vec<AbortedTxn>,
    batches: Vec<Bytes>,
}

/// What a partition read returns besides its batches: the last stable offset and, for
/// read_committed, the aborted transactions the batches overlap.
struct TxnView {
    last_stable: Offset,
    aborted: Vec<AbortedTxn>,
}

/// How a request uses fetch sessions (KIP-227).
enum Mode {
    /// No session (before v7, epoch -1): a full response, session id 0.
    Sessionless,
    /// Epoch 0: a full response, and a new session if the cache has room. (Incremental
    /// requests, epoch > 0, are served by their own path in `handle`.)
    Full,
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: FetchRequest = crate::decode_or_close!(req, b);
    let local = shard::local();
    let broker = local.broker.clone();
    let image = broker.image();
    let clock = local.clock.clone();
    let (shard_id, shards) = (local.id.0, broker.shard_count());
    drop(local);
    let uses_ids = req.version >= 13;
    let now_ms = || clock.now_ms().max(0) as u64;

    let mode = if req.version < 7 {
        Mode::Sessionless
    } else {
        let (id, epoch) = (request.session_id, request.session_epoch);
        if epoch == sessions::FINAL_EPOCH || epoch == sessions::INITIAL_EPOCH {
            if id != 0 {
                // Closes the session (epoch -1), or replaces it with a new one (epoch 0).
                sessions::with_cache(shard_id, shards, |c| c.remove(id));
            }
            if epoch == sessions::FINAL_EPOCH {
                Mode::Sessionless
            } else {
                Mode::Full
            }
        } else {
            let begun = sessions::with_cache(shard_id, shards, |c| {
                c.begin_incremental(
                    id,
                    epoch,
                    uses_ids,
                    session_adds(&request, req.version, uses_ids),
                    session_forgets(&request, uses_ids),
                    now_ms(),
                )
            });
            match begun {
                Ok((parts, epoch)) => {
                    let topics = session_topics(&parts, uses_ids, &image);
                    let results = fetch_ready(&request, &topics, &clock, &broker).await;
                    let outcomes: Vec<sessions::PartOutcome> = results
                        .iter()
                        .flatten()
                        .map(|r| sessions::PartOutcome {
                            has_records: !r.batches.is_empty(),
                            error: r.error.is_error(),
                            high_watermark: r.high_watermark,
                            log_start_offset: r.log_start_offset,
                        })
                        .collect();
                    let named = sessions::with_cache(shard_id, shards, |c| {
                        c.finish_incremental(id, epoch, &outcomes)
                    });
                    return match named {
                        Ok(named) => {
                            let mut named = named.into_iter();
                            let keep: Vec<Vec<bool>> = topics
                                .iter()
                                .map(|t| named.by_ref().take(t.parts.len()).collect())
                                .collect();
                            Response::Frames(encode(
                                req.version,
                                req.header.correlation_id,
                                (NONE, id),
                                &topics,
                                &results,
                                Some(&keep),
                            ))
                        }
                        Err(e) => session_error(req, e),
                    };
                }
                Err(e) => return session_error(req, e),
            }
        }
    };

    let topics: Vec<TopicReq> = request
        .topics
        .iter()
        .map(|t| {
            let meta = if uses_ids {
                image.topic_by_id(t.topic_id.as_bytes()).cloned()
            } else {
                image.topic(t.topic.as_str()).cloned()
            };
            let error = match (&meta, uses_ids) {
                (Some(_), _) => NONE,
                (None, true) => code(ResponseError::UnknownTopicId),
                (None, false) => code(ResponseError::UnknownTopicOrPartition),
            };
            TopicReq {
                name: t.topic.to_string(),
                id: *t.topic_id.as_bytes(),
                meta,
                error,
                parts: t
                    .partitions
                    .iter()
                    .map(|p| PartReq {
                        index: p.partition,
                        fetch_offset: p.fetch_offset,
                        partition_max_bytes: p.partition_max_bytes,
                        current_leader_epoch: client_epoch(req.version, p.current_leader_epoch),
                    })
                    .collect(),
            }
        })
        .collect();
    let results = fetch_ready(&request, &topics, &clock, &broker).await;
    let session_id = match mode {
        Mode::Full
            if sessions::SessionCache::could_hold(topics.iter().map(|t| t.parts.len()).sum()) =>
        {
            let parts: Vec<sessions::CachedPart> = topics
                .iter()
                .zip(&results)
                .flat_map(|(t, rs)| {
                    let name: std::rc::Rc<str> = std::rc::Rc::from(t.name.as_str());
                    t.parts
                        .iter()
                        .zip(rs)
                        .map(move |(p, r)| sessions::CachedPart {
                            topic_id: t.id,
                            topic_name: name.clone(),
                            partition: p.index,
                            fetch_offset: p.fetch_offset,
                            partition_max_bytes: p.partition_max_bytes,
                            current_leader_epoch: p.current_leader_epoch,
                            high_watermark: if r.error.is_error() {
                                -1
                            } else {
                                r.high_watermark
                            },
                            log_start_offset: if r.error.is_error() {
                                -1
                            } else {
                                r.log_start_offset
                            },
                        })
                })
                .collect();
            sessions::with_cache(shard_id, shards, |c| {
                c.create(uses_ids, parts, now_ms(), sessions::random_u32)
            })
        }
        // Too many partitions for any session: served sessionless.
        Mode::Full | Mode::Sessionless => 0,
    };
    Response::Frames(encode(
        req.version,
        req.header.correlation_id,
        (NONE, session_id),
        &topics,
        &results,
        None,
    ))
}

/// The response to a request its session cannot serve: the error, session id 0, no partitions.
fn session_error(req: &Request<'_>, e: sessions::SessionError) -> Response {
    Response::Frames(encode(
        req.version,
        req.header.correlation_id,
        (code(e.error()), 0),
        &[],
        &[],
        None,
    ))
}

/// The client's current leader epoch as the request carries it: only from v9 (KIP-320).
fn client_epoch(version: i16, epoch: i32) -> i32 {
    if version >= 9 {
        epoch
    } else {
        NO_EPOCH_CHECK
    }
}

/// The partitions an incremental request adds or changes, one at a time (nothing is copied
/// for the whole list).
fn session_adds(
    request: &FetchRequest,
    version: i16,
    uses_ids: bool,
) -> impl Iterator<Item = sessions::PartUpdate> + '_ {
    request.topics.iter().flat_map(move |t| {
        let name: std::rc::Rc<str> =
            std::rc::Rc::from(if uses_ids { "" } else { t.topic.as_str() });
        t.partitions.iter().map(move |p| sessions::PartUpdate {
            topic_id: *t.topic_id.as_bytes(),
            topic_name: name.clone(),
            partition: p.partition,
            fetch_offset: p.fetch_offset,
            partition_max_bytes: p.partition_max_bytes,
            current_leader_epoch: client_epoch(version, p.current_leader_epoch),
        })
    })
}

/// The partitions an incremental request forgets, one at a time.
fn session_forgets(
    request: &FetchRequest,
    uses_ids: bool,
) -> impl Iterator<Item = sessions::PartUpdate> + '_ {
    request.forgotten_topics_data.iter().flat_map(move |t| {
        let name: std::rc::Rc<str> =
            std::rc::Rc::from(if uses_ids { "" } else { t.topic.as_str() });
        t.partitions.iter().map(move |&p| sessions::PartUpdate {
            topic_id: *t.topic_id.as_bytes(),
            topic_name: name.clone(),
            partition: p,
            fetch_offset: 0,
            partition_max_bytes: 0,
            current_leader_epoch: NO_EPOCH_CHECK,
        })
    })
}

/// A session's partitions as the topics a fetch reads, in the session's order: consecutive
/// partitions of one topic form one entry (a topic may appear more than once, as in Kafka's
/// incremental responses).
fn session_topics(
    parts: &[sessions::CachedPart],
    uses_ids: bool,
    image: &crate::metadata::MetadataImage,
) -> Vec<TopicReq> {
    let mut out: Vec<TopicReq> = Vec::new();
    for p in parts {
        let same = out.last().is_some_and(|t| {
            if uses_ids {
                t.id == p.topic_id
            } else {
                *t.name == *p.topic_name
            }
        });
        if !same {
            let meta = if uses_ids {
                image.topic_by_id(&p.topic_id).cloned()
            } else {
                image.topic(&p.topic_name).cloned()
            };
            let error = match (&meta, uses_ids) {
                (Some(_), _) => NONE,
                (None, true) => code(ResponseError::UnknownTopicId),
                (None, false) => code(ResponseError::UnknownTopicOrPartition),
            };
            out.push(TopicReq {
                name: p.topic_name.to_string(),
                id: p.topic_id,
                meta,
                error,
                parts: Vec::new(),
            });
        }
        if let Some(t) = out.last_mut() {
            t.parts.push(PartReq {
                index: p.partition,
                fetch_offset: p.fetch_offset,
                partition_max_bytes: p.partition_max_bytes,
                current_leader_epoch: p.current_leader_epoch,
            });
        }
    }
    out
}

/// Reads `topics`, and while fewer than `min_bytes` are ready (and no partition has an error),
/// waits for an append to any of them, up to `max_wait_ms`, and reads again.
async fn fetch_ready(
    request: &FetchRequest,
    topics: &[TopicReq],
    clock: &crate::types::Clock,
    broker: &shard::BrokerContext,
) -> Vec<Vec<PartResult>> {
    let start = clock.now();
    let max_wait =
        Duration::from_millis((request.max_wait_ms.max(0) as u64).min(FETCH_WAIT_MS_MAX));
    let min_bytes = request.min_bytes.max(0) as usize;
    let max_bytes = if request.max_bytes <= 0 {
        FETCH_RESPONSE_BYTES_MAX
    } else {
        (request.max_bytes as usize).min(FETCH_RESPONSE_BYTES_MAX)
    };
    let committed_only = request.isolation_level == READ_COMMITTED;
    let mut results = read_all(topics, max_bytes, committed_only).await;
    loop {
        let ready: usize = results
            .iter()
            .flatten()
            .map(|r| r.batches.iter().map(|b| b.len()).sum::<usize>())
            .sum();
        let errors = results.iter().flatten().any(|r| r.error.is_error());
        let elapsed = clock.now().saturating_duration_since(start);
        if ready >= min_bytes
            || errors
            || elapsed >= max_wait
            || broker.stopping.load(std::sync::atomic::Ordering::Relaxed)
        {
            break;
        }
        let arrived = wait_for_any_append(topics, &results, max_wait - elapsed).await;
        let reread = Instant::now();
        results = read_all(topics, max_bytes, committed_only).await;
        if let Some(arrived) = arrived {
            stats::fetch_stage(FetchStage::Woken, reread.saturating_duration_since(arrived));
            stats::fetch_stage(FetchStage::Read, reread.elapsed());
        }
    }
    results
}

/// Reads every requested partition, at most `max_bytes` of batches in all (KIP-74: the first
/// batch even if larger), in request order.
///
/// Reads run concurrently in windows: a window takes partitions in order while their limits
/// (`partition_max_bytes`, cut to what is left of `max_bytes`) fit in what is left, up to
/// `FETCH_READS_CONCURRENT_MAX`; its results are trimmed to the budget before the next window
/// starts. Once the budget is spent (or a batch was dropped for it, or only a tail below
/// `FETCH_TAIL_READ_MIN_BYTES` is left of a large response), the remaining partitions are not read at all: they report their
/// offsets (and OFFSET_OUT_OF_RANGE) only.
async fn read_all(
    topics: &[TopicReq],
    max_bytes: usize,
    committed_only: bool,
) -> Vec<Vec<PartResult>> {
    let order: Vec<(usize, usize)> = topics
        .iter()
        .enumerate()
        .flat_map(|(t, topic)| (0..topic.parts.len()).map(move |p| (t, p)))
        .collect();
    let mut out: Vec<Vec<PartResult>> = topics
        .iter()
        .map(|t| Vec::with_capacity(t.parts.len()))
        .collect();
    let mut taken = 0usize;
    // Set once a batch read for this response was dropped because it did not fit the budget:
    // the response is full, and the partitions after it are answered with their offsets only.
    // Without it, every later partition would still read its first batch (from the disk, when
    // cold) only for it to be dropped — a request listing one partition thousands of times
    // would read it thousands of times. The response may carry a little less than `max_bytes`
    // (a soft limit in Kafka too); the client's next fetch asks for the rest.
    let mut full = false;
    let mut next = 0;
    while next < order.len() {
        let left = max_bytes.saturating_sub(taken);
        let mut window = Vec::new();
        let mut window_bytes = 0usize;
        while next < order.len() && window.len() < FETCH_READS_CONCURRENT_MAX {
            let (t, p) = order[next];
            let tail =
                taken >= crate::storage::READAHEAD_MIN_BYTES && left < FETCH_TAIL_READ_MIN_BYTES;
            let want = if full || tail || (taken > 0 && left == 0) {
                0
            } else {
                (topics[t].parts[p].partition_max_bytes.max(0) as usize).min(left.max(1))
            };
            if !window.is_empty() && want > 0 && window_bytes + want > left {
                break;
            }
            window_bytes += want;
            window.push((
                t,
                read_one(&topics[t], &topics[t].parts[p], want, committed_only),
            ));
            next += 1;
        }
        for (t, task) in window {
            let mut r = finish_read(topics[t].error, task).await;
            // The budget, applied as results arrive (KIP-74: the response's first batch is kept
            // even if larger than `max_bytes`).
            let mut keep = 0;
            for b in &r.batches {
                if taken > 0 && taken + b.len() > max_bytes {
                    break;
                }
                taken += b.len();
                keep += 1;
            }
            full |= keep < r.batches.len();
            r.batches.truncate(keep);
            out[t].push(r);
        }
    }
    out
}

/// A partition read that failed, with the offsets the response still reports.
struct ReadFailed {
    error: ErrorCode,
    high_watermark: i64,
    log_start_offset: i64,
}

type ReadTask = Option<
    glommio::task::JoinHandle<
        Result<Result<Result<(ReadResult, TxnView), ReadFailed>, ErrorCode>, shard::Panic>,
    >,
>;

/// Starts the read of one partition on its owner shard: up to `bytes_max` of batches, or with
/// `bytes_max == 0` its offsets only (no batch is read).
fn read_one(topic: &TopicReq, p: &PartReq, bytes_max: usize, committed_only: bool) -> ReadTask {
    let meta = topic.meta.clone()?;
    let (index, offset, bytes_max) = (p.index, p.fetch_offset, bytes_max as u32);
    let epoch = p.current_leader_epoch;
    let name = meta.name.clone();
    // Contained: a panic is re-raised in `finish_read` and fails this request only.
    Some(shard::spawn_contained(async move {
        with_partition_at_epoch(&meta, index, epoch, move |log, _| async move {
            let committed = committed_end(&name, index, &log);
            if bytes_max == 0 {
                let (start, end) = (log.log_start_offset(), log.log_end_offset());
                let hw = committed.unwrap_or_else(|| log.high_watermark());
                let (hw, ls) = (hw.0, start.0);
                if offset < start.0 || offset > end.0 {
                    return Err(ReadFailed {
                        error: code(ResponseError::OffsetOutOfRange),
                        high_watermark: hw,
                        log_start_offset: ls,
                    });
                }
                let view = TxnView {
                    last_stable: log.last_stable_offset().min(Offset(hw)),
                    aborted: vec![],
                };
                return Ok((
                    ReadResult {
                        batches: vec![],
                        high_watermark: Offset(hw),
                        log_start_offset: start,
                    },
                    view,
                ));
            }
            log.read(ReadOptions {
                start: Offset(offset),
                bytes_max,
            })
            .await
            .map(|mut r| {
                // Only what is committed (a replicated partition's log also holds entries
                // not committed yet): whole batches, each one raft entry.
                if let Some(hw) = committed.filter(|hw| *hw < r.high_watermark) {
                    r.batches.retain(|b| {
                        b.get(..8)
                            .and_then(|s| s.try_into().ok())
                            .is_some_and(|s| i64::from_be_bytes(s) < hw.0)
                    });
                    r.high_watermark = hw;
                }
                let last_stable = log.last_stable_offset().min(r.high_watermark);
                let mut aborted = vec![];
                if committed_only {
                    // read_committed: nothing at or past the LSO, and the aborted transactions
                    // the returned batches overlap, so the client can drop their records.
                    r.batches.retain(|b| batch_base(b).is_some_and(|o| o < last_stable.0));
                    if let Some(end) = r.batches.last().and_then(|b| batch_next(b)) {
                        aborted = log.aborted_between(Offset(offset), Offset(end));
                    }
                }
                (
                    r,
                    TxnView {
                        last_stable,
                        aborted,
                    },
                )
            })
            .map_err(|e| {
                if let crate::storage::StorageError::Io(err) = &e {
                    tracing::warn!(dir = %log.dir().display(), offset, error = %err, "fetch read failed");
                }
                ReadFailed {
                    error: storage_code(&e),
                    high_watermark: log.high_watermark().0,
                    log_start_offset: log.log_start_offset().0,
                }
            })
        })
        .await
    }))
}

async fn finish_read(topic_error: ErrorCode, task: ReadTask) -> PartResult {
    match task {
        None => PartResult {
            error: topic_error,
            high_watermark: -1,
            log_start_offset: -1,
            batches: vec![],
            ..Default::default()
        },
        Some(task) => match shard::join(task).await {
            None => PartResult {
                error: code(ResponseError::UnknownServerError),
                ..Default::default()
            },
            Some(Err(c)) => PartResult {
                error: c,
                high_watermark: -1,
                log_start_offset: -1,
                batches: vec![],
                ..Default::default()
            },
            Some(Ok(Err(ReadFailed {
                error,
                high_watermark,
                log_start_offset,
            }))) => PartResult {
                error,
                high_watermark,
                log_start_offset,
                batches: vec![],
                ..Default::default()
            },
            Some(Ok(Ok((
                ReadResult {
                    batches,
                    high_watermark,
                    log_start_offset,
                },
                view,
            )))) => PartResult {
                error: NONE,
                high_watermark: high_watermark.0,
                last_stable: view.last_stable.0,
                log_start_offset: log_start_offset.0,
                aborted: view.aborted,
                batches,
            },
        },
    }
}

/// Waits until any requested partition receives an append past what the last read saw (its
/// high watermark there, or the fetch offset if that is further), or `remaining` passes.
/// Waiting only for the fetch offset would return at once when data below `min_bytes` is already
/// there, and the fetch would spin re-reading it until `max_wait_ms`.
///
/// One waiter per owner shard, not per partition: it makes one hop to that shard (none for
/// partitions of this shard) and registers one [`AppendSignal`] with each of its partitions
/// there, which the first partition to move past its offset fires — the waiter is woken once,
/// not on every append to every partition. A replicated partition's reads stop at its commit
/// index, so the waiter waits for that to move instead (appends may stay uncommitted).
///
/// Each waiter is contained: the first to finish reports on the channel, and a panic it reports
/// is re-raised here (failing this request only). When this returns, `done` closes and every
/// other waiter ends at once on its shard, so waiters never outlive the fetch that started
/// them. Waiters that finish later find the channel gone; a panic of theirs logs itself.
/// Returns when the data that ended the wait arrived (`None`: the wait ran out or the partition
/// set changed under it).
async fn wait_for_any_append(
    topics: &[TopicReq],
    seen: &[Vec<PartResult>],
    remaining: Duration,
) -> Option<Instant> {
    let broker = shard::local().broker.clone();
    // Owner shard -> (topic, partition, offset past which an append wakes the fetch).
    let mut by_shard: std::collections::BTreeMap<usize, Vec<(Arc<TopicMeta>, i32, i64)>> =
        std::collections::BTreeMap::new();
    let mut waiting = std::collections::HashSet::new();
    for (t, seen) in topics.iter().zip(seen) {
        let Some(meta) = &t.meta else { continue };
        for (p, seen) in t.parts.iter().zip(seen) {
            if !waiting.insert((meta.id, p.index)) {
                continue; // the same partition listed again: one registration is enough
            }
            // A partition not held here was answered with an error, which ends the wait
            // before it starts; skip it.
            let Some(owner) = broker.owner(meta, p.index) else {
                continue;
            };
            by_shard.entry(owner.0).or_default().push((
                meta.clone(),
                p.index,
                p.fetch_offset.max(seen.high_watermark),
            ));
        }
    }
    let (tx, rx) = async_channel::unbounded::<Result<Option<Instant>, shard::Panic>>();
    let (done_tx, done_rx) = async_channel::bounded::<()>(1);
    for (owner, parts) in by_shard {
        let (tx, done_rx) = (tx.clone(), done_rx.clone());
        glommio::spawn_local(async move {
            let waited =
                shard::contain(shard::invoke_on(crate::types::ShardId(owner), move || {
                    wait_on_owner(parts, remaining, done_rx)
                }))
                .await;
            let _ = tx.try_send(waited);
        })
        .detach();
    }
    drop((tx, done_rx));
    let first = futures_lite::future::or(async { rx.recv().await.ok() }, async {
        shard::local().clock.sleep(remaining).await;
        None
    })
    .await;
    drop(done_tx);
    match first {
        Some(Err(p)) => p.resume(),
        Some(Ok(arrived)) => arrived,
        None => None,
    }
}

/// On the partitions' owner shard: waits until one of `parts` moves past its offset, `remaining`
/// passes, or `done` closes (the fetch stopped waiting). Returns when the data arrived: when the
/// append signal fired, or (a replicated partition) when its commit wait resolved; `None` when
/// no data ended the wait.
async fn wait_on_owner(
    parts: Vec<(Arc<TopicMeta>, i32, i64)>,
    remaining: Duration,
    done: async_channel::Receiver<()>,
) -> Option<Instant> {
    let here = shard::local();
    let signal = AppendSignal::new();
    let mut commits: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>> = vec![];
    for (meta, index, offset) in parts {
        crate::fault::panic_point("fetch_wait", &meta.name);
        let tp = crate::types::TopicPartition::new(meta.name.clone(), index);
        match (here.replica(&tp), here.partition(&tp)) {
            (Some(r), _) => commits.push(Box::pin(async move {
                r.wait_committed_past(Offset(offset)).await
            })),
            // Not served until its raft group runs: the next read reports it.
            (None, Some(_)) if here.awaits_replica(&tp) => return None,
            (None, Some(log)) => log.signal_append(Offset(offset), &signal),
            // Gone since the read (deleted, moved): the next read reports it.
            (None, None) => return None,
        }
    }
    let committed = std::future::poll_fn(|cx| {
        if commits.is_empty() {
            return std::task::Poll::Pending;
        }
        for c in commits.iter_mut() {
            if c.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    });
    futures_lite::future::or(
        futures_lite::future::or(
            async {
                signal.wait().await;
                signal.fired_at()
            },
            async {
                committed.await;
                Some(Instant::now())
            },
        ),
        futures_lite::future::or(
            async {
                here.clock.sleep(remaining).await;
                None
            },
            async {
                let _ = done.recv().await;
                None
            },
        ),
    )
    .await
}

/// Kafka's `isolation_level` of read_committed consumers.
const READ_COMMITTED: i8 = 1;

/// The base offset of a stored batch.
fn batch_base(b: &[u8]) -> Option<i64> {
    b.get(..8)
        .and_then(|s| s.try_into().ok())
        .map(i64::from_be_bytes)
}

/// The offset after a stored batch's last record.
fn batch_next(b: &[u8]) -> Option<i64> {
    crate::protocol::batch::BatchHeader::parse(b)
        .ok()
        .map(|h| h.last_offset().next().0)
}

/// Encodes the whole response frame as glue buffers interleaved with the stored batches.
///
/// `(error, session_id)` fill the response's top level; with `keep`, only the partitions it
/// marks are named (an incremental response), and topics with none are left out.
fn encode(
    version: i16,
    correlation_id: i32,
    (error, session_id): (ErrorCode, i32),
    topics: &[TopicReq],
    results: &[Vec<PartResult>],
    keep: Option<&[Vec<bool>]>,
) -> Vec<Bytes> {
    let flexible = version >= 12;
    let mut parts: Vec<Bytes> = Vec::new();
    let mut glue = BytesMut::with_capacity(256);
    glue.put_i32(0); // frame length, patched below
    glue.put_i32(correlation_id);
    if flexible {
        put_uvarint(&mut glue, 0); // response header tagged fields
    }
    glue.put_i32(0); // throttle_time_ms
    if version >= 7 {
        glue.put_i16(error.get());
        glue.put_i32(session_id);
    }
    let kept = |t: usize, p: usize| keep.is_none_or(|k| k[t][p]);
    // A full response names every requested topic, even one listed without partitions.
    let named = |t: usize| keep.is_none() || (0..topics[t].parts.len()).any(|p| kept(t, p));
    let named_topics = (0..topics.len()).filter(|&t| named(t)).count();
    put_array_len(&mut glue, flexible, named_topics);
    for (ti, (t, rs)) in topics.iter().zip(results).enumerate() {
        if !named(ti) {
            continue;
        }
        let named_parts = (0..t.parts.len()).filter(|&p| kept(ti, p)).count();
        if version >= 13 {
            glue.put_slice(&t.id);
        } else if flexible {
            put_uvarint(&mut glue, t.name.len() as u64 + 1);
            glue.put_slice(t.name.as_bytes());
        } else {
            glue.put_i16(t.name.len() as i16);
            glue.put_slice(t.name.as_bytes());
        }
        put_array_len(&mut glue, flexible, named_parts);
        for (pi, (p, r)) in t.parts.iter().zip(rs).enumerate() {
            if !kept(ti, pi) {
                continue;
            }
            glue.put_i32(p.index);
            crate::stats::request_error(
                kafka_protocol::messages::ApiKey::Fetch as i16,
                r.error.get(),
            );
            glue.put_i16(r.error.get());
            glue.put_i64(r.high_watermark);
            glue.put_i64(if r.error.is_error() {
                r.high_watermark
            } else {
                r.last_stable
            });
            if version >= 5 {
                glue.put_i64(r.log_start_offset);
            }
            put_array_len(&mut glue, flexible, r.aborted.len());
            for a in &r.aborted {
                glue.put_i64(a.producer_id);
                glue.put_i64(a.first.0);
                if flexible {
                    put_uvarint(&mut glue, 0); // aborted transaction tagged fields
                }
            }
            if version >= 11 {
                glue.put_i32(-1); // preferred_read_replica
            }
            let records_len: usize = r.batches.iter().map(|b| b.len()).sum();
            if flexible {
                put_uvarint(&mut glue, records_len as u64 + 1);
            } else {
                glue.put_i32(records_len as i32);
            }
            if records_len > 0 {
                parts.push(glue.split().freeze());
                parts.extend(r.batches.iter().cloned());
            }
            if flexible {
                put_uvarint(&mut glue, 0); // partition tagged fields
            }
        }
        if flexible {
            put_uvarint(&mut glue, 0); // topic tagged fields
        }
    }
    if flexible {
        put_uvarint(&mut glue, 0); // response tagged fields
    }
    parts.push(glue.freeze());
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut first = BytesMut::from(&parts[0][..]);
    first[..4].copy_from_slice(&((total - 4) as i32).to_be_bytes());
    parts[0] = first.freeze();
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::FetchResponse;
    use kafka_protocol::protocol::Decodable;

    // The hand encoder must produce exactly what the generated codec reads, at every version.
    #[test]
    fn hand_encoded_response_decodes_with_kafka_protocol_at_every_version() {
        let batch = Bytes::from(crate::protocol::builder::single(Some(b"k"), Some(b"v"), 7));
        for version in 4..=16i16 {
            let topics = vec![TopicReq {
                name: "orders".into(),
                id: [9; 16],
                meta: None,
                error: NONE,
                parts: vec![
                    PartReq {
                        index: 0,
                        fetch_offset: 0,
                        partition_max_bytes: 1 << 20,
                        current_leader_epoch: -1,
                    },
                    PartReq {
                        index: 1,
                        fetch_offset: 0,
                        partition_max_bytes: 1 << 20,
                        current_leader_epoch: -1,
                    },
                ],
            }];
            let results = vec![vec![
                PartResult {
                    error: NONE,
                    high_watermark: 1,
                    log_start_offset: 0,
                    batches: vec![batch.clone()],
                    last_stable: 1,
                    aborted: vec![AbortedTxn {
                        producer_id: 5,
                        first: Offset(0),
                        last: Offset(3),
                    }],
                },
                PartResult {
                    error: code(ResponseError::OffsetOutOfRange),
                    high_watermark: 0,
                    log_start_offset: 0,
                    batches: vec![],
                    ..Default::default()
                },
            ]];
            let parts = encode(version, 42, (NONE, 0), &topics, &results, None);
            let mut all = BytesMut::new();
            for p in &parts {
                all.extend_from_slice(p);
            }
            let mut all = all.freeze();
            let len = i32::from_be_bytes(all[..4].try_into().unwrap()) as usize;
            assert_eq!(len, all.len() - 4, "v{version}");
            let _ = all.split_to(4);
            let header_version =
                kafka_protocol::messages::ApiKey::Fetch.response_header_version(version);
            let h =
                kafka_protocol::messages::ResponseHeader::decode(&mut all, header_version).unwrap();
            assert_eq!(h.correlation_id, 42);
            let r = FetchResponse::decode(&mut all, version).unwrap();
            assert!(all.is_empty(), "v{version}: trailing bytes");
            assert_eq!(r.responses.len(), 1);
            let p = &r.responses[0].partitions;
            assert_eq!(p[0].records.as_ref().unwrap(), &batch, "v{version}");
            assert_eq!(p[0].last_stable_offset, 1, "v{version}");
            let aborted = p[0].aborted_transactions.as_ref().unwrap();
            assert_eq!(
                (
                    aborted.len(),
                    aborted[0].producer_id.0,
                    aborted[0].first_offset
                ),
                (1, 5, 0),
                "v{version}"
            );
            assert_eq!(p[1].error_code, ResponseError::OffsetOutOfRange.code());
            if version >= 13 {
                assert_eq!(r.responses[0].topic_id.as_bytes(), &[9; 16]);
            } else {
                assert_eq!(r.responses[0].topic.as_str(), "orders");
            }

            // Incremental: only the kept partitions, topics without any left out.
            if version >= 7 {
                for (keep, named) in [
                    (vec![vec![false, true]], vec![1]),
                    (vec![vec![true, false]], vec![0]),
                    (vec![vec![false, false]], vec![]),
                ] {
                    let parts = encode(version, 43, (NONE, 77), &topics, &results, Some(&keep));
                    let mut all = BytesMut::new();
                    for p in &parts {
                        all.extend_from_slice(p);
                    }
                    let mut all = all.freeze();
                    let len = i32::from_be_bytes(all[..4].try_into().unwrap()) as usize;
                    assert_eq!(len, all.len() - 4, "v{version}");
                    let _ = all.split_to(4);
                    kafka_protocol::messages::ResponseHeader::decode(&mut all, header_version)
                        .unwrap();
                    let r = FetchResponse::decode(&mut all, version).unwrap();
                    assert!(all.is_empty(), "v{version}: trailing bytes");
                    assert_eq!(r.session_id, 77);
                    let got: Vec<i32> = r
                        .responses
                        .iter()
                        .flat_map(|t| t.partitions.iter().map(|p| p.partition_index))
                        .collect();
                    assert_eq!(got, named, "v{version}");
                    assert_eq!(r.responses.len(), usize::from(!named.is_empty()));
                }
            }
        }
    }
}
