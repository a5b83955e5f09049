//! Fetch, versions 4-16 (flexible from 12, topic ids from 13). Sessionless: every request is a
//! full fetch and the response carries session id 0, which Kafka clients accept.
//!
//! The response is encoded by hand around the stored batches: the glue (headers, partition
//! fields, lengths) goes into small buffers, the batches are the log's own `Bytes`, and the
//! whole response leaves in one vectored write — record bytes are never copied, decompressed or
//! re-encoded. Long polling: when less than `min_bytes` is ready, the handler waits on the owner
//! shards until an append lands or `max_wait_ms` passes.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::FetchRequest;
use kafka_protocol::ResponseError;

use super::common::{code, storage_code, with_partition, NONE};
use crate::kafka::{Request, Response};
use crate::metadata::TopicMeta;
use crate::protocol::wire::{put_array_len, put_uvarint};
use crate::shard;
use crate::storage::{ReadOptions, ReadResult};
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

struct PartReq {
    index: i32,
    fetch_offset: i64,
    partition_max_bytes: i32,
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
    log_start_offset: i64,
    batches: Vec<Bytes>,
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: FetchRequest = crate::decode_or_close!(req, b);
    let broker = shard::local().broker.clone();
    let image = broker.image();
    let topics: Vec<TopicReq> = request
        .topics
        .iter()
        .map(|t| {
            let meta = if req.version >= 13 {
                image.topic_by_id(t.topic_id.as_bytes()).cloned()
            } else {
                image.topic(t.topic.as_str()).cloned()
            };
            let error = match (&meta, req.version >= 13) {
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
                    })
                    .collect(),
            }
        })
        .collect();

    let clock = shard::local().clock.clone();
    let start = clock.now();
    let max_wait =
        Duration::from_millis((request.max_wait_ms.max(0) as u64).min(FETCH_WAIT_MS_MAX));
    let min_bytes = request.min_bytes.max(0) as usize;
    let max_bytes = if request.max_bytes <= 0 {
        FETCH_RESPONSE_BYTES_MAX
    } else {
        (request.max_bytes as usize).min(FETCH_RESPONSE_BYTES_MAX)
    };
    let mut results = read_all(&topics, max_bytes).await;
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
        wait_for_any_append(&topics, &results, max_wait - elapsed).await;
        results = read_all(&topics, max_bytes).await;
    }
    Response::Frames(encode(
        req.version,
        req.header.correlation_id,
        &topics,
        &results,
    ))
}

/// Reads every requested partition, at most `max_bytes` of batches in all (KIP-74: the first
/// batch even if larger), in request order.
///
/// Reads run concurrently in windows: a window takes partitions in order while their limits
/// (`partition_max_bytes`, cut to what is left of `max_bytes`) fit in what is left, up to
/// `FETCH_READS_CONCURRENT_MAX`; its results are trimmed to the budget before the next window
/// starts. Once the budget is spent, the remaining partitions are not read at all: they report
/// their offsets (and OFFSET_OUT_OF_RANGE) only.
async fn read_all(topics: &[TopicReq], max_bytes: usize) -> Vec<Vec<PartResult>> {
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
    let mut next = 0;
    while next < order.len() {
        let left = max_bytes.saturating_sub(taken);
        let mut window = Vec::new();
        let mut window_bytes = 0usize;
        while next < order.len() && window.len() < FETCH_READS_CONCURRENT_MAX {
            let (t, p) = order[next];
            let want = if taken > 0 && left == 0 {
                0
            } else {
                (topics[t].parts[p].partition_max_bytes.max(0) as usize).min(left.max(1))
            };
            if !window.is_empty() && want > 0 && window_bytes + want > left {
                break;
            }
            window_bytes += want;
            window.push((t, read_one(&topics[t], &topics[t].parts[p], want)));
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
        Result<Result<Result<ReadResult, ReadFailed>, ErrorCode>, shard::Panic>,
    >,
>;

/// Starts the read of one partition on its owner shard: up to `bytes_max` of batches, or with
/// `bytes_max == 0` its offsets only (no batch is read).
fn read_one(topic: &TopicReq, p: &PartReq, bytes_max: usize) -> ReadTask {
    let meta = topic.meta.clone()?;
    let (index, offset, bytes_max) = (p.index, p.fetch_offset, bytes_max as u32);
    // Contained: a panic is re-raised in `finish_read` and fails this request only.
    Some(shard::spawn_contained(async move {
        with_partition(&meta, index, move |log| async move {
            if bytes_max == 0 {
                let (start, end) = (log.log_start_offset(), log.log_end_offset());
                let (hw, ls) = (log.high_watermark().0, start.0);
                if offset < start.0 || offset > end.0 {
                    return Err(ReadFailed {
                        error: code(ResponseError::OffsetOutOfRange),
                        high_watermark: hw,
                        log_start_offset: ls,
                    });
                }
                return Ok(ReadResult {
                    batches: vec![],
                    high_watermark: Offset(hw),
                    log_start_offset: start,
                });
            }
            log.read(ReadOptions {
                start: Offset(offset),
                bytes_max,
            })
            .await
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
            },
            Some(Ok(Ok(ReadResult {
                batches,
                high_watermark,
                log_start_offset,
            }))) => PartResult {
                error: NONE,
                high_watermark: high_watermark.0,
                log_start_offset: log_start_offset.0,
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
/// One waiter task per distinct partition, each contained: the first to finish reports on the
/// channel, and a panic it reports is re-raised here (failing this request only). When this
/// returns, `done` closes and every other waiter ends at once on its shard, so waiters never
/// outlive the fetch that started them. Waiters that finish later find the channel gone; a
/// panic of theirs logs itself.
async fn wait_for_any_append(topics: &[TopicReq], seen: &[Vec<PartResult>], remaining: Duration) {
    let (tx, rx) = async_channel::unbounded::<Result<(), shard::Panic>>();
    let (done_tx, done_rx) = async_channel::bounded::<()>(1);
    let mut waiting = std::collections::HashSet::new();
    for (t, seen) in topics.iter().zip(seen) {
        let Some(meta) = &t.meta else { continue };
        for (p, seen) in t.parts.iter().zip(seen) {
            if !waiting.insert((t.name.as_str(), p.index)) {
                continue; // the same partition listed again: one waiter is enough
            }
            let meta = meta.clone();
            let (index, offset) = (p.index, p.fetch_offset.max(seen.high_watermark));
            let (tx, done_rx) = (tx.clone(), done_rx.clone());
            glommio::spawn_local(async move {
                let waited = shard::contain(async move {
                    crate::fault::panic_point("fetch_wait", &meta.name);
                    let _ = with_partition(&meta, index, move |log| async move {
                        futures_lite::future::or(
                            futures_lite::future::or(
                                log.wait_for_append(Offset(offset)),
                                shard::local().clock.sleep(remaining),
                            ),
                            async {
                                let _ = done_rx.recv().await;
                            },
                        )
                        .await
                    })
                    .await;
                })
                .await;
                let _ = tx.try_send(waited);
            })
            .detach();
        }
    }
    drop((tx, done_rx));
    let first = futures_lite::future::or(async { rx.recv().await.ok() }, async {
        shard::local().clock.sleep(remaining).await;
        None
    })
    .await;
    drop(done_tx);
    if let Some(Err(p)) = first {
        p.resume();
    }
}

/// Encodes the whole response frame as glue buffers interleaved with the stored batches.
fn encode(
    version: i16,
    correlation_id: i32,
    topics: &[TopicReq],
    results: &[Vec<PartResult>],
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
        glue.put_i16(NONE.get()); // error_code
        glue.put_i32(0); // session_id: sessionless
    }
    put_array_len(&mut glue, flexible, topics.len());
    for (t, rs) in topics.iter().zip(results) {
        if version >= 13 {
            glue.put_slice(&t.id);
        } else if flexible {
            put_uvarint(&mut glue, t.name.len() as u64 + 1);
            glue.put_slice(t.name.as_bytes());
        } else {
            glue.put_i16(t.name.len() as i16);
            glue.put_slice(t.name.as_bytes());
        }
        put_array_len(&mut glue, flexible, t.parts.len());
        for (p, r) in t.parts.iter().zip(rs) {
            glue.put_i32(p.index);
            crate::stats::request_error(
                kafka_protocol::messages::ApiKey::Fetch as i16,
                r.error.get(),
            );
            glue.put_i16(r.error.get());
            glue.put_i64(r.high_watermark);
            glue.put_i64(r.high_watermark); // last_stable_offset: no transactions yet
            if version >= 5 {
                glue.put_i64(r.log_start_offset);
            }
            put_array_len(&mut glue, flexible, 0); // aborted_transactions: empty
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
                    },
                    PartReq {
                        index: 1,
                        fetch_offset: 0,
                        partition_max_bytes: 1 << 20,
                    },
                ],
            }];
            let results = vec![vec![
                PartResult {
                    error: NONE,
                    high_watermark: 1,
                    log_start_offset: 0,
                    batches: vec![batch.clone()],
                },
                PartResult {
                    error: code(ResponseError::OffsetOutOfRange),
                    high_watermark: 0,
                    log_start_offset: 0,
                    batches: vec![],
                },
            ]];
            let parts = encode(version, 42, &topics, &results);
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
            assert_eq!(p[1].error_code, ResponseError::OffsetOutOfRange.code());
            if version >= 13 {
                assert_eq!(r.responses[0].topic_id.as_bytes(), &[9; 16]);
            } else {
                assert_eq!(r.responses[0].topic.as_str(), "orders");
            }
        }
    }
}
