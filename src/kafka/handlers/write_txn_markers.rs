//! WriteTxnMarkers, version 1 (flexible): appends COMMIT/ABORT markers to the named partitions.
//! Sluice's coordinator writes its markers itself over the shard mesh
//! ([`crate::txn::write_marker`]); the API is served too, for tools and tests that send it.

use bytes::Bytes;
use kafka_protocol::messages::write_txn_markers_response::{
    WritableTxnMarkerPartitionResult, WritableTxnMarkerResult, WritableTxnMarkerTopicResult,
};
use kafka_protocol::messages::{WriteTxnMarkersRequest, WriteTxnMarkersResponse};
use kafka_protocol::ResponseError;

use super::common::{code, NONE};
use crate::kafka::{Request, Response};
use crate::shard;
use crate::txn;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: WriteTxnMarkersRequest = crate::decode_or_close!(req, b);
    let image = shard::local().broker.image();
    let mut markers = Vec::with_capacity(request.markers.len());
    for m in &request.markers {
        let mut topics = Vec::with_capacity(m.topics.len());
        for t in &m.topics {
            let meta = image.topic(t.name.as_str());
            let mut parts = Vec::with_capacity(t.partition_indexes.len());
            for &p in &t.partition_indexes {
                let e = match meta {
                    _ if !txn::enabled() => code(ResponseError::NotLeaderOrFollower),
                    Some(meta) if p >= 0 && p < meta.partition_count() => {
                        match txn::write_marker(
                            t.name.as_str(),
                            p,
                            m.producer_id.0,
                            m.producer_epoch,
                            m.transaction_result,
                        )
                        .await
                        {
                            Ok(()) => NONE,
                            Err(e) => {
                                tracing::warn!(topic = %t.name.as_str(), partition = p, error = %e, "WriteTxnMarkers failed");
                                code(ResponseError::KafkaStorageError)
                            }
                        }
                    }
                    _ => code(ResponseError::UnknownTopicOrPartition),
                };
                parts.push(
                    WritableTxnMarkerPartitionResult::default()
                        .with_partition_index(p)
                        .with_error_code(req.error_code(e)),
                );
            }
            topics.push(
                WritableTxnMarkerTopicResult::default()
                    .with_name(t.name.clone())
                    .with_partitions(parts),
            );
        }
        markers.push(
            WritableTxnMarkerResult::default()
                .with_producer_id(m.producer_id)
                .with_topics(topics),
        );
    }
    req.respond(&WriteTxnMarkersResponse::default().with_markers(markers))
}
