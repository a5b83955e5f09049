//! Produce, versions 3-11 (flexible from 9). Validates every batch on the connection's shard
//! (framing, magic v2, CRC-32C, max.message.bytes), then appends it on the partition's owner
//! shard and waits for the durability the acks ask for: acks=0 none, acks=1 the write,
//! acks=all the fdatasync. Partitions of one request are appended concurrently.
//! A topic the broker does not know is UNKNOWN_TOPIC_OR_PARTITION: as in Kafka, Produce never
//! creates topics (a producer's Metadata request may, see `metadata`).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse};
use kafka_protocol::ResponseError;

use super::common::{code, storage_code, topic_or_create, with_partition, NONE};
use crate::kafka::{Request, Response};
use crate::metadata::configs;
use crate::protocol::batch::{self, BatchError};
use crate::shard;
use crate::storage::Durability;
use crate::types::ErrorCode;

struct Outcome {
    error_code: ErrorCode,
    base_offset: i64,
    log_append_time_ms: i64,
    log_start_offset: i64,
    message: Option<String>,
}

impl Outcome {
    fn error(error_code: ErrorCode, message: Option<String>) -> Outcome {
        Outcome {
            error_code,
            base_offset: -1,
            log_append_time_ms: -1,
            log_start_offset: -1,
            message,
        }
    }
}

/// Checks each batch in `records`; the first failure decides the partition's error.
fn validate(records: &[u8], max_message_bytes: i64) -> Result<(), (ErrorCode, String)> {
    if records.is_empty() {
        return Err((
            code(ResponseError::CorruptMessage),
            "empty record set".into(),
        ));
    }
    let mut too_large = None;
    let mut transactional = false;
    let mut inconsistent = None;
    let walked = batch::for_each_batch(records, true, |h| {
        if h.size() as i64 > max_message_bytes {
            too_large = Some(h.size());
        }
        transactional |= h.is_transactional() || h.is_control();
        // Kafka's LogValidator: a produced batch spans exactly its record count of offsets.
        // Unchecked, one small batch claiming 2^31 records would move the log end by 2^31.
        if h.record_count() <= 0
            || i64::from(h.last_offset_delta()) != i64::from(h.record_count()) - 1
        {
            inconsistent.get_or_insert((h.record_count(), h.last_offset_delta()));
        }
    });
    match walked {
        Ok(_) => {}
        Err(BatchError::BadMagic(m)) => {
            return Err((
                code(ResponseError::UnsupportedForMessageFormat),
                format!("record batch magic {m} is not supported; produce v3+ requires magic 2"),
            ))
        }
        Err(e) => return Err((code(ResponseError::CorruptMessage), e.to_string())),
    }
    if let Some((count, delta)) = inconsistent {
        return Err((
            code(ResponseError::InvalidRecord),
            format!("inconsistent batch: {count} records but lastOffsetDelta {delta}"),
        ));
    }
    if let Some(size) = too_large {
        return Err((
            code(ResponseError::MessageTooLarge),
            format!("batch of {size} bytes exceeds max.message.bytes {max_message_bytes}"),
        ));
    }
    if transactional {
        return Err((
            code(ResponseError::InvalidRecord),
            "transactional and control batches are not supported yet".into(),
        ));
    }
    Ok(())
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: ProduceRequest = crate::decode_or_close!(req, b);
    let acks = request.acks;
    let durability = match acks {
        0 => Some(Durability::Accepted),
        1 => Some(Durability::Written),
        -1 => Some(Durability::Synced),
        _ => None,
    };
    let timeout = Duration::from_millis(request.timeout_ms.max(0) as u64);
    let transactional = request.transactional_id.is_some();

    // One task per partition, all started before any is awaited. The tasks are contained: a
    // panic in one is re-raised here when it is awaited, and fails this request only.
    let mut topics = Vec::with_capacity(request.topic_data.len());
    for td in request.topic_data {
        let name = td.name.to_string();
        crate::fault::panic_point("produce_request", &name);
        let topic = if durability.is_none() || transactional {
            None
        } else {
            // Kafka never creates a topic from Produce: an unknown topic is
            // UNKNOWN_TOPIC_OR_PARTITION (only Metadata may auto-create).
            Some(topic_or_create(&name, false).await)
        };
        let mut parts = Vec::with_capacity(td.partition_data.len());
        for pd in td.partition_data {
            let index = pd.index;
            let task = match (&topic, durability) {
                (_, None) => {
                    let e = Outcome::error(code(ResponseError::InvalidRequiredAcks), None);
                    shard::spawn_contained(async move { e })
                }
                (None, _) => {
                    let e = Outcome::error(
                        code(ResponseError::TransactionalIdAuthorizationFailed),
                        Some("transactions are not supported yet".into()),
                    );
                    shard::spawn_contained(async move { e })
                }
                (Some(Err(e)), _) => {
                    let e = Outcome::error(*e, None);
                    shard::spawn_contained(async move { e })
                }
                (Some(Ok(t)), Some(d)) => {
                    let t = t.clone();
                    let records = pd.records.unwrap_or_default();
                    shard::spawn_contained(append_partition(t, index, records, d, timeout))
                }
            };
            parts.push((index, task));
        }
        topics.push((td.name, parts));
    }

    let mut responses = Vec::with_capacity(topics.len());
    let mut any_error = false;
    for (name, parts) in topics {
        let mut prs = Vec::with_capacity(parts.len());
        for (index, task) in parts {
            let o = shard::join(task)
                .await
                .unwrap_or_else(|| Outcome::error(code(ResponseError::UnknownServerError), None));
            any_error |= o.error_code.is_error();
            crate::stats::request_error(
                kafka_protocol::messages::ApiKey::Produce as i16,
                o.error_code.get(),
            );
            prs.push(
                PartitionProduceResponse::default()
                    .with_index(index)
                    .with_error_code(req.error_code(o.error_code))
                    .with_base_offset(o.base_offset)
                    .with_log_append_time_ms(o.log_append_time_ms)
                    .with_log_start_offset(if req.version >= 5 {
                        o.log_start_offset
                    } else {
                        -1
                    })
                    .with_error_message(
                        o.message
                            .filter(|_| req.version >= 8)
                            .map(|m| super::common::str_bytes(&m)),
                    ),
            );
        }
        responses.push(
            TopicProduceResponse::default()
                .with_name(name)
                .with_partition_responses(prs),
        );
    }
    if acks == 0 {
        // acks=0 gets no response; on error Kafka closes the connection so the client notices.
        return if any_error {
            Response::Close("acks=0 produce failed".into())
        } else {
            Response::None
        };
    }
    req.respond(&ProduceResponse::default().with_responses(responses))
}

async fn append_partition(
    topic: std::sync::Arc<crate::metadata::TopicMeta>,
    index: i32,
    records: Bytes,
    durability: Durability,
    timeout: Duration,
) -> Outcome {
    crate::fault::panic_point("produce_partition", &topic.name);
    let broker = shard::local().broker.clone();
    if topic.internal {
        return Outcome::error(
            code(ResponseError::InvalidTopicException),
            Some(format!("cannot produce to internal topic {}", topic.name)),
        );
    }
    if index < 0 || index >= topic.partition_count() {
        return Outcome::error(code(ResponseError::UnknownTopicOrPartition), None);
    }
    let image = broker.image();
    let defaults = configs::BrokerDefaults::of(&broker.config, &image);
    let max_bytes = configs::max_message_bytes(&defaults, &topic.configs);
    if let Err((c, m)) = validate(&records, max_bytes) {
        return Outcome::error(c, Some(m));
    }
    let replicated = topic.replication_factor() > 1;
    // The log patches offsets in place, so it gets its own copy of the batch bytes.
    let mut owned = BytesMut::from(&records[..]);
    let append_time =
        configs::log_append_time(&defaults, &topic.configs).then(crate::types::now_ms);
    if let Some(now) = append_time {
        let mut at = 0;
        while at < owned.len() {
            let size = batch::batch_size(&owned[at..]).expect("validated above");
            batch::set_log_append_time(&mut owned[at..at + size], now);
            at += size;
        }
    }
    if durability == Durability::Synced && topic.replication_factor() > 1 {
        let min = configs::min_insync_replicas(&defaults, &topic.configs);
        let isr = in_sync_replicas(&broker, &topic, index).len() as i64;
        if isr < min {
            return Outcome::error(
                code(ResponseError::NotEnoughReplicas),
                Some(format!(
                    "{isr} replicas in sync, min.insync.replicas is {min}"
                )),
            );
        }
    }
    let tp = crate::types::TopicPartition::new(topic.name.clone(), index);
    // A detached task, so that a timed-out wait never cancels the append itself. Contained: its
    // panic is re-raised here, or logged by itself if the wait timed out first.
    let append = shard::spawn_contained(async move {
        with_partition(&topic, index, move |log| async move {
            match shard::local().replica(&tp) {
                Some(replica) => replicate(&replica, owned, durability == Durability::Synced).await,
                None => log
                    .append(owned, durability)
                    .await
                    .map(|r| (r.base_offset.0, r.log_start_offset.0))
                    .map_err(|e| (storage_code(&e), Some(e.to_string()))),
            }
        })
        .await
    });
    let append = shard::join(append);
    let waits = durability == Durability::Synced || replicated;
    let result = if waits && !timeout.is_zero() {
        futures_lite::future::or(append, async {
            shard::local().clock.sleep(timeout).await;
            None
        })
        .await
    } else {
        append.await
    };
    match result {
        None => Outcome::error(code(ResponseError::RequestTimedOut), None),
        Some(Err(c)) => Outcome::error(c, None),
        Some(Ok(Err((c, m)))) => Outcome::error(c, m),
        Some(Ok(Ok((base_offset, log_start_offset)))) => Outcome {
            error_code: NONE,
            base_offset,
            log_append_time_ms: append_time.unwrap_or(-1),
            log_start_offset,
            message: None,
        },
    }
}

/// The replicas of a partition Metadata reports in sync and `min.insync.replicas` counts, among
/// those on nodes that are not fenced: on the partition's leader, itself and the followers that
/// caught up within `shard::REPLICA_LAG_TIME_MAX` (raft progress); elsewhere, where progress is
/// not known, every replica on a live node.
pub fn in_sync_replicas(
    broker: &shard::BrokerContext,
    topic: &crate::metadata::TopicMeta,
    index: i32,
) -> Vec<i32> {
    let image = broker.image();
    let tp = crate::types::TopicPartition::new(topic.name.clone(), index);
    let progress = broker.replica_isr(&tp);
    topic
        .replica_nodes(index)
        .iter()
        .copied()
        .filter(|n| !image.fenced.contains(n))
        .filter(|n| progress.as_ref().is_none_or(|isr| isr.contains(n)))
        .collect()
}

/// Produces a validated request's records to a replicated partition on its leader: each batch
/// is proposed in turn and answered once committed (acks=all, `committed`) or once appended to
/// the leader's own log (acks=1 and 0). The base offset is the first batch's.
async fn replicate(
    replica: &crate::replica::ReplicatedPartition,
    records: BytesMut,
    committed: bool,
) -> Result<(i64, i64), (ErrorCode, Option<String>)> {
    use crate::replica::ReplicateError;
    use sluice_raft::ProposeError;
    let mut rest = records;
    let mut first = None;
    while !rest.is_empty() {
        let size = batch::batch_size(&rest).expect("validated above");
        let one = rest.split_to(size);
        let proposed = if committed {
            replica.propose(one).await
        } else {
            replica.propose_appended(one).await
        };
        let (base, _) = proposed.map_err(|e| match e {
            ReplicateError::InvalidBatch => (code(ResponseError::CorruptMessage), None),
            ReplicateError::Raft(ProposeError::Busy) => (
                code(ResponseError::RequestTimedOut),
                Some("too many produces awaiting replication".into()),
            ),
            ReplicateError::Raft(e) => (
                code(ResponseError::NotLeaderOrFollower),
                Some(format!("not replicated from this node: {e}")),
            ),
        })?;
        first.get_or_insert(base.0);
    }
    Ok((first.unwrap_or(-1), replica.log().log_start_offset().0))
}
