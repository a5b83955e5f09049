//! DeleteRecords, versions 0-2 (flexible from 2). Advances a partition's log start offset;
//! offset -1 means the high watermark.

use bytes::Bytes;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::{DeleteRecordsRequest, DeleteRecordsResponse};
use kafka_protocol::ResponseError;

use super::common::{code, storage_code, with_partition, NONE};
use crate::kafka::{Request, Response};
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
            if meta.replication_factor() > 1 {
                // The raft log of a replicated partition must start at offset 0 until partition
                // snapshots exist.
                parts.push(r.with_error_code(code(ResponseError::PolicyViolation).get()));
                continue;
            }
            let offset = p.offset;
            let res = with_partition(meta, p.partition_index, move |log| async move {
                let target = if offset == -1 {
                    log.high_watermark()
                } else {
                    Offset(offset)
                };
                log.delete_records_before(target).await
            })
            .await;
            parts.push(match res {
                Ok(Ok(low)) => r
                    .with_error_code(req.error_code(NONE))
                    .with_low_watermark(low.0),
                Ok(Err(e)) => r.with_error_code(req.error_code(storage_code(&e))),
                Err(c) => r.with_error_code(req.error_code(c)),
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
