//! DeleteRecords, versions 0-2 (flexible from 2). Advances a partition's log start offset;
//! offset -1 means the high watermark. On a replicated partition the partition's leader
//! commits the move through its raft log and every replica makes it; it is answered once the
//! leader's log start has moved, with that log start (the low watermark), which is the first
//! offset of the batch holding the requested offset: the log of a replicated partition starts
//! at a batch (a raft entry).

use bytes::Bytes;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::{DeleteRecordsRequest, DeleteRecordsResponse};
use kafka_protocol::ResponseError;

use super::common::{code, storage_code, with_partition_replica, NONE};
use crate::kafka::{Request, Response};
use crate::replica::ReplicateError;
use crate::shard;
use crate::types::Offset;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: DeleteRecordsRequest = crate::decode_or_close!(req, b);
    let image = shard::local().broker.image();
    let mut topics = Vec::new();
    for t in request.topics {
        let meta = image.topic(t.name.as_str()).cloned();
        let mut parts = Vec::new();
        for p in t.partitions {
            let r = DeleteRecordsPartitionResult::default()
                .with_partition_index(p.partition_index)
                .with_low_watermark(-1);
            let Some(meta) = &meta else {
                parts.push(
                    r.with_error_code(req.error_code(code(ResponseError::UnknownTopicOrPartition))),
                );
                continue;
            };
            let offset = p.offset;
            let res =
                with_partition_replica(meta, p.partition_index, move |log, replica| async move {
                    match replica {
                        Some(replica) => {
                            let target = if offset == -1 {
                                replica.high_watermark()
                            } else {
                                Offset(offset)
                            };
                            replica.delete_records(target).await.map_err(|e| match e {
                                ReplicateError::OutOfRange => code(ResponseError::OffsetOutOfRange),
                                ReplicateError::Raft(_) => code(ResponseError::NotLeaderOrFollower),
                                _ => code(ResponseError::KafkaStorageError),
                            })
                        }
                        None => {
                            let target = if offset == -1 {
                                log.high_watermark()
                            } else {
                                Offset(offset)
                            };
                            log.delete_records_before(target)
                                .await
                                .map_err(|e| storage_code(&e))
                        }
                    }
                })
                .await;
            parts.push(match res {
                Ok(Ok(low)) => r
                    .with_error_code(req.error_code(NONE))
                    .with_low_watermark(low.0),
                Ok(Err(c)) | Err(c) => r.with_error_code(req.error_code(c)),
            });
        }
        topics.push(
            DeleteRecordsTopicResult::default()
                .with_name(t.name)
                .with_partitions(parts),
        );
    }
    req.respond(&DeleteRecordsResponse::default().with_topics(topics))
}
