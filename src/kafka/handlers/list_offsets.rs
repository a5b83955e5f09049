//! ListOffsets, versions 1-7 (flexible from 6). Timestamps: -2 earliest (log start), -1 latest
//! (high watermark; the last stable offset with `isolation_level` read_committed), -3 the record with the largest timestamp (v7, KIP-734), otherwise the first
//! offset whose timestamp is at or after the given one (through the time index).

use bytes::Bytes;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::{ListOffsetsRequest, ListOffsetsResponse};
use kafka_protocol::ResponseError;

use super::common::{
    code, readable_end, storage_code, with_partition_at_epoch, NONE, NO_EPOCH_CHECK,
    UNREPLICATED_EPOCH,
};
use crate::kafka::{Request, Response};
use crate::protocol::compression;
use crate::shard;

pub const EARLIEST: i64 = -2;
pub const LATEST: i64 = -1;
pub const MAX_TIMESTAMP: i64 = -3;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: ListOffsetsRequest = crate::decode_or_close!(req, b);
    let image = shard::local().broker.image();
    let mut topics = Vec::new();
    for t in request.topics {
        let meta = image.topic(t.name.as_str()).cloned();
        let mut parts = Vec::new();
        for p in t.partitions {
            let resp =
                ListOffsetsPartitionResponse::default().with_partition_index(p.partition_index);
            let Some(meta) = &meta else {
                parts.push(
                    resp.with_error_code(
                        req.error_code(code(ResponseError::UnknownTopicOrPartition)),
                    )
                    .with_offset(-1)
                    .with_timestamp(-1),
                );
                continue;
            };
            let ts = p.timestamp;
            let committed_only = request.isolation_level == 1;
            let (name, index) = (meta.name.clone(), p.partition_index);
            // KIP-320: v4+ carries the client's current leader epoch.
            let current = if req.version >= 4 {
                p.current_leader_epoch
            } else {
                NO_EPOCH_CHECK
            };
            let replicated = meta.replication_factor() > 1;
            let r = with_partition_at_epoch(meta, index, current, move |log, epoch| async move {
                let found = match ts {
                    EARLIEST => Ok((log.log_start_offset().0, -1)),
                    // read_committed consumers start at the last stable offset.
                    LATEST if committed_only => Ok((
                        readable_end(&name, index, &log)
                            .min(log.last_stable_offset())
                            .0,
                        -1,
                    )),
                    LATEST => Ok((readable_end(&name, index, &log).0, -1)),
                    MAX_TIMESTAMP => match log.max_timestamp() {
                        // The batch's last offset is a bound; the record is the first with
                        // the batch's max timestamp (KIP-734).
                        Some((o, t)) => record_in_batch(&log, o, |ts| ts == t)
                            .await
                            .map(|r| r.unwrap_or((o.0, t))),
                        None => Ok((-1, -1)),
                    },
                    t if t < 0 => Err(code(ResponseError::InvalidRequest)),
                    t => match log.offset_for_timestamp(t).await {
                        // The batch holding the answer; the answer is the first record in it at
                        // or after `t` (Kafka looks inside the batch too).
                        Ok(Some((o, bt))) => record_in_batch(&log, o, |ts| ts >= t)
                            .await
                            .map(|r| r.unwrap_or((o.0, bt))),
                        Ok(None) => Ok((-1, -1)),
                        Err(e) => Err(storage_code(&e)),
                    },
                };
                // The leader epoch of the answer (v4+): on a replicated partition the current
                // one for the latest offset, else the epoch of the batch holding the offset, as
                // Kafka reports them; a partition without replicas reports 0, as Metadata does.
                found.map(|(offset, timestamp)| {
                    let answer_epoch = if !replicated {
                        UNREPLICATED_EPOCH
                    } else if ts == LATEST {
                        epoch
                    } else {
                        epoch_at(&log.leader_epochs(), offset)
                    };
                    (offset, timestamp, answer_epoch)
                })
            })
            .await;
            parts.push(match r {
                Ok(Ok((offset, timestamp, epoch))) => resp
                    .with_error_code(req.error_code(NONE))
                    .with_offset(offset)
                    .with_timestamp(timestamp)
                    .with_leader_epoch(if req.version >= 4 { epoch } else { -1 }),
                Ok(Err(c)) | Err(c) => resp
                    .with_error_code(req.error_code(c))
                    .with_offset(-1)
                    .with_timestamp(-1),
            });
        }
        topics.push(
            ListOffsetsTopicResponse::default()
                .with_name(t.name)
                .with_partitions(parts),
        );
    }
    req.respond(&ListOffsetsResponse::default().with_topics(topics))
}

/// The leader epoch that wrote `offset`: the last of `epochs` (epoch, start offset; oldest
/// first) starting at or before it; -1 when none does (or `offset` is -1).
pub fn epoch_at(epochs: &[(i32, crate::types::Offset)], offset: i64) -> i32 {
    if offset < 0 {
        return -1;
    }
    epochs
        .iter()
        .take_while(|(_, start)| start.0 <= offset)
        .last()
        .map_or(-1, |(e, _)| *e)
}

/// The first record (offset, timestamp) satisfying `wanted` in the batch holding `offset`. Rare
/// admin path: the batch is decoded (and decompressed, at most
/// [`DECOMPRESSED_BATCH_BYTES_MAX`](crate::protocol::compression::DECOMPRESSED_BATCH_BYTES_MAX)
/// bytes of it) here; produce and fetch never do this. A batch that does not decode answers with
/// the batch itself, as the index found it.
async fn record_in_batch(
    log: &crate::storage::PartitionLog,
    offset: crate::types::Offset,
    wanted: impl Fn(i64) -> bool,
) -> Result<Option<(i64, i64)>, crate::types::ErrorCode> {
    let read = log
        .read(crate::storage::ReadOptions {
            start: offset.max(log.log_start_offset()),
            bytes_max: 1,
        })
        .await
        .map_err(|e| storage_code(&e))?;
    let Some(batch) = read.batches.first() else {
        return Ok(None);
    };
    let mut buf = batch.clone();
    let recs = match compression::decode_batch(&mut buf, compression::DECOMPRESSED_BATCH_BYTES_MAX)
    {
        Ok(recs) => recs,
        Err(e) => {
            tracing::warn!(offset = offset.0, error = %e, "ListOffsets: stored batch does not decode");
            return Ok(None);
        }
    };
    let start = log.log_start_offset().0;
    // Under LogAppendTime every decoded record carries the batch's time.
    Ok(recs
        .iter()
        .filter(|r| r.offset >= start)
        .map(|r| (r.offset, r.timestamp_ms))
        .find(|(_, ts)| wanted(*ts)))
}
