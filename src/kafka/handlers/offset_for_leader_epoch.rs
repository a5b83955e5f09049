//! OffsetForLeaderEpoch, versions 2-4 (v0-1 are gone from Kafka 4, KIP-896; flexible from 4;
//! the client's current leader epoch from v2): for each partition and a leader epoch the client last saw,
//! the largest epoch at or below it that this log holds and the offset where that epoch ended —
//! how a consumer (KIP-320) finds out, after a leader change, whether the log it was reading was
//! truncated below its position. Served by the partition leader from the log's leader-epoch
//! cache (`PartitionLog::end_offset_for_epoch`), with the same current-epoch check as Fetch.

use bytes::Bytes;
use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderTopicResult,
};
use kafka_protocol::messages::{OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse};
use kafka_protocol::ResponseError;

use super::common::{code, with_partition_at_epoch, NONE, NO_EPOCH_CHECK, UNREPLICATED_EPOCH};
use crate::kafka::{Request, Response};
use crate::shard;

/// Kafka's answer for an epoch it cannot place (`UNDEFINED_EPOCH`, `UNDEFINED_EPOCH_OFFSET`).
const UNDEFINED: (i32, i64) = (-1, -1);

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: OffsetForLeaderEpochRequest = crate::decode_or_close!(req, b);
    let image = shard::local().broker.image();
    let mut topics = Vec::new();
    for t in request.topics {
        let meta = image.topic(t.topic.as_str()).cloned();
        let mut parts = Vec::new();
        for p in t.partitions {
            let resp = EpochEndOffset::default().with_partition(p.partition);
            let Some(meta) = &meta else {
                parts.push(
                    resp.with_error_code(
                        req.error_code(code(ResponseError::UnknownTopicOrPartition)),
                    )
                    .with_leader_epoch(UNDEFINED.0)
                    .with_end_offset(UNDEFINED.1),
                );
                continue;
            };
            let current = if req.version >= 2 {
                p.current_leader_epoch
            } else {
                NO_EPOCH_CHECK
            };
            let requested = p.leader_epoch;
            let replicated = meta.replication_factor() > 1;
            let r = with_partition_at_epoch(meta, p.partition, current, move |log, _| async move {
                if requested < 0 {
                    return UNDEFINED;
                }
                if !replicated {
                    // A partition without replicas has had one leader at epoch 0 (what Metadata
                    // reports) for its whole log: nothing was ever truncated under a reader.
                    return (UNREPLICATED_EPOCH, log.log_end_offset().0);
                }
                let (epoch, end) = log.end_offset_for_epoch(requested);
                (epoch, end.0)
            })
            .await;
            parts.push(match r {
                Ok((epoch, end)) => resp
                    .with_error_code(req.error_code(NONE))
                    .with_leader_epoch(epoch)
                    .with_end_offset(end),
                Err(c) => resp
                    .with_error_code(req.error_code(c))
                    .with_leader_epoch(UNDEFINED.0)
                    .with_end_offset(UNDEFINED.1),
            });
        }
        topics.push(
            OffsetForLeaderTopicResult::default()
                .with_topic(t.topic)
                .with_partitions(parts),
        );
    }
    req.respond(&OffsetForLeaderEpochResponse::default().with_topics(topics))
}
