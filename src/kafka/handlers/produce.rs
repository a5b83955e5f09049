//! Produce, versions 3-12 (flexible from 9). Validates every batch on the connection's shard
//! (framing, magic v2, CRC-32C, max.message.bytes), then appends it on the partition's owner
//! shard and waits for the durability the acks ask for: acks=0 none, acks=1 the write,
//! acks=all the fdatasync. Partitions of one request are appended concurrently.
//! Transactional requests (KIP-98) carry transactional batches of one producer; each partition
//! is checked with the transaction coordinator to be in the producer's open transaction first
//! (from v12, transaction version 2, the coordinator adds it), on the partition's owner shard,
//! which remembers the answer until the transaction's marker (the verification cache).
//! A topic the broker does not know is UNKNOWN_TOPIC_OR_PARTITION: as in Kafka, Produce never
//! creates topics (a producer's Metadata request may, see `metadata`).

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use glommio::task::JoinHandle;
use kafka_protocol::messages::produce_response::{
    BatchIndexAndErrorMessage, PartitionProduceResponse, TopicProduceResponse,
};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse, TopicName};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use super::common::{code, storage_code, topic_or_create, with_partition_replica, NONE};
use crate::kafka::{Request, Response};
use crate::protocol::batch::{self, BatchError};
use crate::protocol::validated::Validated;
use crate::shard::{self, LocalTopic};
use crate::stats::ProduceStage;
use crate::storage::Durability;
use crate::types::{ErrorCode, TopicPartition};

struct Outcome {
    error_code: ErrorCode,
    base_offset: i64,
    log_append_time_ms: i64,
    log_start_offset: i64,
    message: Option<String>,
    /// KIP-467: the records (index in their batch) that caused `error_code`, each with its
    /// reason; the batch's other records failed only because they were in it.
    record_errors: RecordErrors,
}

/// KIP-467 record errors: (index of the record in its batch, why it was refused).
type RecordErrors = Vec<(i32, String)>;

impl Outcome {
    fn error(error_code: ErrorCode, message: Option<String>) -> Outcome {
        Outcome {
            error_code,
            base_offset: -1,
            log_append_time_ms: -1,
            log_start_offset: -1,
            message,
            record_errors: Vec::new(),
        }
    }
}

/// A transactional producer's (id, epoch).
type ProducerIdEpoch = (i64, i16);

/// Checks the batches of one partition's records on the receiving shard, once: framing, magic,
/// CRC-32C (in [`Validated::check`]; with LogAppendTime stamped at `append_time` in the same
/// pass), then Kafka's produce rules on the headers it parsed. The first failure decides the
/// partition's error. Batches of a transactional request must be transactional batches of one
/// producer, returned as `(producer id, epoch)`; other requests may not carry transactional
/// batches. Control batches come only from the broker's own transaction coordinator, never
/// from a producer.
fn validate(
    records: BytesMut,
    max_message_bytes: i64,
    append_time: Option<i64>,
    transactional_request: bool,
) -> Result<(Validated, Option<ProducerIdEpoch>), (ErrorCode, String)> {
    let checked = match append_time {
        None => Validated::check(records),
        Some(now) => Validated::check_stamping(records, now),
    };
    let v = match checked {
        Ok(v) => v,
        Err(BatchError::BadMagic(m)) => {
            return Err((
                code(ResponseError::UnsupportedForMessageFormat),
                format!("record batch magic {m} is not supported; produce v3+ requires magic 2"),
            ))
        }
        Err(e) => return Err((code(ResponseError::CorruptMessage), e.to_string())),
    };
    let mut too_large = None;
    let mut control = false;
    let mut txn_batches = 0usize;
    let mut batches = 0usize;
    let mut producers: Option<(i64, i16)> = None;
    let mut mixed = false;
    let mut inconsistent = None;
    for h in v.headers() {
        if h.size() as i64 > max_message_bytes {
            too_large = Some(h.size());
        }
        control |= h.is_control();
        batches += 1;
        if h.is_transactional() {
            txn_batches += 1;
            let p = (h.producer_id(), h.producer_epoch());
            mixed |= producers.is_some_and(|q| q != p) || p.0 < 0;
            producers = Some(p);
        }
        // Kafka's LogValidator: a produced batch spans exactly its record count of offsets.
        // Unchecked, one small batch claiming 2^31 records would move the log end by 2^31.
        if h.record_count() <= 0
            || i64::from(h.last_offset_delta()) != i64::from(h.record_count()) - 1
        {
            inconsistent.get_or_insert((h.record_count(), h.last_offset_delta()));
        }
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
    if control {
        return Err((
            code(ResponseError::InvalidRecord),
            "control batches are written by the broker only".into(),
        ));
    }
    if transactional_request && (txn_batches != batches || mixed) {
        return Err((
            code(ResponseError::InvalidRecord),
            "a transactional produce carries transactional batches of one producer only".into(),
        ));
    }
    if !transactional_request && txn_batches > 0 {
        return Err((
            code(ResponseError::InvalidRecord),
            "transactional batches need the request's transactional id".into(),
        ));
    }
    Ok((v, producers))
}

/// A topic as this shard's metadata copy has it; for a name it does not know, the error Kafka
/// gives (Produce never creates topics).
async fn local_topic(name: &str) -> Result<Rc<LocalTopic>, ErrorCode> {
    if let Some(t) = shard::local().metadata().topic(name) {
        return Ok(t.clone());
    }
    // Boxed: a rare path, kept out of every produce request's future.
    Box::pin(topic_or_create(name, false)).await?;
    // Published since the first look.
    shard::local()
        .metadata()
        .topic(name)
        .cloned()
        .ok_or(code(ResponseError::UnknownTopicOrPartition))
}

/// One partition's answer: known at once (an error found before any work), or the task
/// appending it.
enum Pending {
    Ready(Outcome),
    Task(JoinHandle<Result<Outcome, shard::Panic>>),
}

/// At most this many record errors (KIP-467) are reported for one refused batch: the client
/// fails the records named with INVALID_RECORD and the batch's others as failed because of
/// them, so a longer list adds nothing but response bytes (Kafka's own error message shows
/// three).
const RECORD_ERRORS_MAX: usize = 1000;

/// A compacted topic keeps the latest record per key, so every record needs one (Kafka's
/// LogValidator): the first batch with keyless records is refused whole with INVALID_RECORD,
/// and each keyless record in it is named (KIP-467 record errors: its index in the batch) so
/// that clients fail only those records with INVALID_RECORD. The only place Produce looks
/// inside batches, and only for compacted topics.
fn keyed(records: &[u8], topic: &str, partition: i32) -> Result<(), (String, RecordErrors)> {
    let mut buf = Bytes::copy_from_slice(records);
    while !buf.is_empty() {
        let recs = crate::protocol::compression::decode_batch(
            &mut buf,
            crate::protocol::compression::DECOMPRESSED_BATCH_BYTES_MAX,
        )
        .map_err(|e| {
            (
                format!("undecodable batch for a compacted topic: {e}"),
                Vec::new(),
            )
        })?;
        let reason =
            format!("compacted topic cannot accept a record without a key in {topic}-{partition}");
        let keyless: RecordErrors = recs
            .iter()
            .enumerate()
            .filter(|(_, r)| r.key.is_none())
            .take(RECORD_ERRORS_MAX)
            .map(|(i, _)| (i32::try_from(i).unwrap_or(i32::MAX), reason.clone()))
            .collect();
        if let Some((first, _)) = keyless.first() {
            let message = format!("{reason} (record {first} of its batch)");
            return Err((message, keyless));
        }
    }
    Ok(())
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let started = Instant::now();
    let mut request: ProduceRequest = crate::decode_or_close!(req, b);
    // What is left of the frame holds its memory too (see `owned_records`), and so does the
    // transactional id until it is copied out.
    drop(b);
    let transactional_id = request.transactional_id.take().map(|t| t.to_string());
    let acks = request.acks;
    let durability = match acks {
        0 => Some(Durability::Accepted),
        1 => Some(Durability::Written),
        -1 => Some(Durability::Synced),
        _ => None,
    };
    let timeout = Duration::from_millis(request.timeout_ms.max(0) as u64);
    let transactional = transactional_id.is_some();
    let partitions: usize = request
        .topic_data
        .iter()
        .map(|td| td.partition_data.len())
        .sum();

    // One task per partition, all started before any is awaited (a lone partition runs in
    // this task). The tasks are contained: a panic in one is re-raised here when it is awaited,
    // and fails this request only.
    // The response is built as the partitions are: a partition answered at once fills its
    // entry here, one appended by a task gets a placeholder that its task's outcome replaces.
    // No list beyond the response's own (the tasks' list stays empty for a lone partition).
    let mut responses = Vec::with_capacity(request.topic_data.len());
    let mut tasks = Vec::new();
    let mut any_error = false;
    for td in request.topic_data {
        crate::fault::panic_point("produce_request", &td.name);
        let topic = if durability.is_none() || (transactional && !crate::txn::enabled()) {
            None
        } else {
            Some(local_topic(&td.name).await)
        };
        let mut prs = Vec::with_capacity(td.partition_data.len());
        // The response's name is the request's; when the frame's memory may become the log's
        // (`owned_records`), detached from it first.
        let name = if req.frame_alone {
            let detached = TopicName(StrBytes::from_string(td.name.as_str().to_owned()));
            drop(td.name);
            detached
        } else {
            td.name
        };
        for pd in td.partition_data {
            let index = pd.index;
            let pending = match (&topic, durability) {
                (_, None) => Pending::Ready(Outcome::error(
                    code(ResponseError::InvalidRequiredAcks),
                    None,
                )),
                (None, _) => Pending::Ready(Outcome::error(
                    code(ResponseError::TransactionalIdAuthorizationFailed),
                    Some("transactions run on a single node only".into()),
                )),
                (Some(Err(e)), _) => Pending::Ready(Outcome::error(*e, None)),
                (Some(Ok(t)), Some(d)) => {
                    let records = pd.records.unwrap_or_default();
                    let tid = transactional_id.clone();
                    let append = append_partition(
                        t.clone(),
                        index,
                        records,
                        d,
                        timeout,
                        tid,
                        req.version,
                        started,
                    );
                    if partitions == 1 {
                        Pending::Ready(append.await)
                    } else {
                        Pending::Task(shard::spawn_contained(append))
                    }
                }
            };
            match pending {
                Pending::Ready(o) => {
                    any_error |= o.error_code.is_error();
                    prs.push(partition_response(req, index, o));
                }
                Pending::Task(task) => {
                    tasks.push((responses.len(), prs.len(), task));
                    prs.push(PartitionProduceResponse::default().with_index(index));
                }
            }
        }
        responses.push(
            TopicProduceResponse::default()
                .with_name(name)
                .with_partition_responses(prs),
        );
    }
    for (t, p, task) in tasks {
        let o = shard::join(task)
            .await
            .unwrap_or_else(|| Outcome::error(code(ResponseError::UnknownServerError), None));
        any_error |= o.error_code.is_error();
        let index = responses[t].partition_responses[p].index;
        responses[t].partition_responses[p] = partition_response(req, index, o);
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

/// One partition's entry of the response, from its outcome (counted for the metrics endpoint).
fn partition_response(req: &Request<'_>, index: i32, o: Outcome) -> PartitionProduceResponse {
    crate::stats::request_error(
        kafka_protocol::messages::ApiKey::Produce as i16,
        o.error_code.get(),
    );
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
        )
        .with_record_errors(if req.version >= 8 {
            o.record_errors
                .iter()
                .map(|(i, m)| {
                    BatchIndexAndErrorMessage::default()
                        .with_batch_index(*i)
                        .with_batch_index_error_message(Some(super::common::str_bytes(m)))
                })
                .collect()
        } else {
            Vec::new()
        })
}

/// A partition's batch bytes, to the log alone: the request's own memory when nothing else
/// holds it, else a copy. The request frame is nothing but this batch and the request's small
/// fields when a producer sends one partition per request and the frame arrived in a buffer
/// of its own (`Request::frame_alone`; dispatch and `handle` then detach the names they keep),
/// so that case takes no copy; a request listing several partitions shares its frame among
/// them, and small frames share the reader's chunk.
fn owned_records(records: Bytes) -> BytesMut {
    match records.try_into_mut() {
        Ok(mine) => mine,
        Err(shared) => {
            crate::stats::produce_bytes_copied(shared.len());
            BytesMut::from(&shared[..])
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn append_partition(
    topic: Rc<LocalTopic>,
    index: i32,
    records: Bytes,
    durability: Durability,
    timeout: Duration,
    transactional_id: Option<String>,
    version: i16,
    started: Instant,
) -> Outcome {
    let meta = &topic.meta;
    crate::fault::panic_point("produce_partition", &meta.name);
    if meta.internal {
        return Outcome::error(
            code(ResponseError::InvalidTopicException),
            Some(format!("cannot produce to internal topic {}", meta.name)),
        );
    }
    if index < 0 || index >= meta.partition_count() {
        return Outcome::error(code(ResponseError::UnknownTopicOrPartition), None);
    }
    if records.is_empty() {
        return Outcome::error(
            code(ResponseError::CorruptMessage),
            Some("empty record set".into()),
        );
    }
    let config = topic.produce;
    let append_time = config.log_append_time.then(crate::types::now_ms);
    // The log patches offsets in place, so it needs the batch bytes to itself; they are
    // validated (and checksummed) once, here.
    let (owned, producer) = match validate(
        owned_records(records),
        config.max_message_bytes,
        append_time,
        transactional_id.is_some(),
    ) {
        Ok(v) => v,
        Err((c, m)) => return Outcome::error(c, Some(m)),
    };
    if config.compacted {
        if let Err((m, record_errors)) = keyed(owned.as_slice(), &meta.name, index) {
            return Outcome {
                record_errors,
                ..Outcome::error(code(ResponseError::InvalidRecord), Some(m))
            };
        }
    }
    let txn = match (transactional_id, producer) {
        (Some(tid), Some((pid, epoch))) => Some(TxnCheck {
            tid,
            pid,
            epoch,
            add: version >= IMPLICIT_ADD_VERSION,
        }),
        _ => None,
    };
    let replicated = meta.replication_factor() > 1;
    if durability == Durability::Synced && replicated {
        let here = shard::local();
        let min = config.min_insync_replicas;
        let isr = in_sync_replicas(&here.broker, meta, index).len() as i64;
        if isr < min {
            return Outcome::error(
                code(ResponseError::NotEnoughReplicas),
                Some(format!(
                    "{isr} replicas in sync, min.insync.replicas is {min}"
                )),
            );
        }
    }
    let waits = durability == Durability::Synced || replicated;
    let append = append_on_owner(topic.clone(), index, owned, durability, txn, started);
    let result = if waits && !timeout.is_zero() {
        // A detached task, so that a timed-out wait never cancels the append itself. Contained:
        // its panic is re-raised here, or logged by itself if the wait timed out first.
        let append = shard::join(shard::spawn_contained(append));
        futures_lite::future::or(append, async {
            shard::local().clock.sleep(timeout).await;
            None
        })
        .await
    } else {
        Some(append.await)
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
            record_errors: Vec::new(),
        },
    }
}

type Appended = Result<Result<(i64, i64), (ErrorCode, Option<String>)>, ErrorCode>;

/// The first Produce version of transaction version 2 (KIP-890 part 2): a transactional
/// produce adds its partition to the transaction itself.
pub const IMPLICIT_ADD_VERSION: i16 = 12;

/// What a transactional produce must pass before its batches are appended.
struct TxnCheck {
    tid: String,
    pid: i64,
    epoch: i16,
    /// Transaction version 2: add the partition to the transaction (opening one) instead of
    /// only checking that it is in it.
    add: bool,
}

/// On the partition's owner shard: the partition must be in the producer's open transaction
/// (KIP-890 part 1: the leader verifies with the coordinator), or its batches would never see
/// a marker; with transaction version 2 the coordinator is asked to add it. A producer the
/// shard's verification cache ([`crate::txn::verified`]) already holds for this partition and
/// epoch skips the hop.
async fn check_txn(tp: &TopicPartition, topic_id: [u8; 16], c: TxnCheck) -> Result<(), ErrorCode> {
    use crate::txn::verified;
    let key = (topic_id, tp.partition);
    if verified::contains(&key, c.pid, c.epoch) {
        return Ok(());
    }
    let generation = verified::generation();
    let (pid, epoch, add) = (c.pid, c.epoch, c.add);
    let tpk = (tp.topic.to_string(), tp.partition);
    let tid = c.tid;
    let answer = crate::txn::on_coordinator(&tid.clone(), move |ts| async move {
        if add {
            ts.add_partition_implicitly(&tid, pid, epoch, tpk).await
        } else {
            ts.verify_partition(&tid, pid, epoch, &tpk)
        }
    })
    .await
    .unwrap_or_else(|e| e);
    if answer.is_error() {
        // Produce predates PRODUCER_FENCED: a fenced producer is told INVALID_PRODUCER_EPOCH.
        return Err(if answer == code(ResponseError::ProducerFenced) {
            code(ResponseError::InvalidProducerEpoch)
        } else {
            answer
        });
    }
    verified::remember(&key, pid, epoch, generation);
    Ok(())
}

/// Appends validated batches to the partition on its owner shard (or proposes them to its raft
/// group): base offset and log start offset.
async fn append_on_owner(
    topic: Rc<LocalTopic>,
    index: i32,
    records: Validated,
    durability: Durability,
    txn: Option<TxnCheck>,
    started: Instant,
) -> Appended {
    // The partition's key is built only for a transactional produce, the only one that needs it.
    let txn = txn.map(|c| (TopicPartition::new(topic.meta.name.clone(), index), c));
    let topic_id = topic.meta.id;
    with_partition_replica(&topic.meta, index, move |log, replica| async move {
        if let Some((tp, c)) = txn {
            // Boxed, as the replicated path below: rare paths are kept out of every produce
            // request's future.
            Box::pin(check_txn(&tp, topic_id, c))
                .await
                .map_err(|e| (e, None))?;
        }
        crate::stats::produce_stage(ProduceStage::Handler, started.elapsed());
        match replica {
            Some(replica) => {
                Box::pin(replicate(
                    &replica,
                    records.into_bytes(),
                    durability == Durability::Synced,
                ))
                .await
            }
            None => log
                .append_validated(records, durability)
                .await
                .map(|r| (r.base_offset.0, r.log_start_offset.0))
                .map_err(|e| (storage_code(&e), Some(e.to_string()))),
        }
    })
    .await
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
            ReplicateError::OutOfOrderSequence => (
                code(ResponseError::OutOfOrderSequenceNumber),
                Some("out of order sequence number".into()),
            ),
            ReplicateError::InvalidProducerEpoch => (
                code(ResponseError::InvalidProducerEpoch),
                Some("invalid producer epoch".into()),
            ),
            ReplicateError::Raft(ProposeError::Busy) => (
                code(ResponseError::RequestTimedOut),
                Some("too many produces awaiting replication".into()),
            ),
            ReplicateError::Raft(e) => (
                code(ResponseError::NotLeaderOrFollower),
                Some(format!("not replicated from this node: {e}")),
            ),
            // Not answers to a produce.
            ReplicateError::OutOfRange | ReplicateError::Storage(_) => {
                (code(ResponseError::KafkaStorageError), Some(e.to_string()))
            }
        })?;
        first.get_or_insert(base.0);
    }
    Ok((first.unwrap_or(-1), replica.log().log_start_offset().0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::builder::{self as build, Record};

    fn record(key: Option<&'static [u8]>) -> Record<'static> {
        Record {
            key,
            value: Some(b"v"),
            headers: &[],
            timestamp_ms: 1_000,
        }
    }

    #[test]
    fn keyed_names_each_keyless_record_of_the_first_bad_batch() {
        // A good batch, then one with keyless records at indexes 0 and 3, then another bad one.
        let mut records = build::batch(&[record(Some(b"a")), record(Some(b"b"))]);
        records.extend(build::batch(&[
            record(None),
            record(Some(b"c")),
            record(Some(b"d")),
            record(None),
        ]));
        records.extend(build::batch(&[record(None)]));
        let (message, errors) = keyed(&records, "t", 2).unwrap_err();
        assert!(message.contains("t-2"), "{message}");
        assert_eq!(errors.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 3]);
        assert!(errors.iter().all(|(_, m)| m.contains("without a key")));
        assert!(keyed(&build::batch(&[record(Some(b"k"))]), "t", 0).is_ok());
    }

    #[test]
    fn keyed_reports_at_most_record_errors_max() {
        let many = vec![record(None); RECORD_ERRORS_MAX + 5];
        let (_, errors) = keyed(&build::batch(&many), "t", 0).unwrap_err();
        assert_eq!(errors.len(), RECORD_ERRORS_MAX);
        assert_eq!(
            errors.last().map(|(i, _)| *i),
            Some(RECORD_ERRORS_MAX as i32 - 1)
        );
    }
}
