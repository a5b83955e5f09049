//! OffsetDelete, version 0. Removes committed offsets of partitions an empty group (or a
//! consumer group not subscribed to the topic) no longer uses; GROUP_SUBSCRIBED_TO_TOPIC
//! otherwise.

use bytes::Bytes;
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::{OffsetDeleteRequest, OffsetDeleteResponse};
use kafka_protocol::ResponseError;

use super::common::{code, NONE};
use crate::group::on_coordinator;
use crate::kafka::{Request, Response};
use crate::shard;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: OffsetDeleteRequest = crate::decode_or_close!(req, b);
    let image = shard::local().broker.image();
    let mut wanted = Vec::new();
    for t in &request.topics {
        let known = image.topic(t.name.as_str()).map(|m| m.partition_count());
        for p in &t.partitions {
            if known.is_some_and(|n| p.partition_index >= 0 && p.partition_index < n) {
                wanted.push((t.name.to_string(), p.partition_index));
            }
        }
    }
    let gid = request.group_id.to_string();
    let list = wanted.clone();
    let result = on_coordinator(&gid.clone(), move |gs| async move {
        gs.with(|c, _| c.delete_offsets(&gid, &list))
            .await
            .and_then(|r| r)
    })
    .await
    .unwrap_or_else(Err);
    let (top, per) = match result {
        Ok(per) => (NONE, per),
        Err(e) => (e, vec![]),
    };
    let mut next = per.into_iter();
    let topics = request
        .topics
        .iter()
        .map(|t| {
            let known = image.topic(t.name.as_str()).map(|m| m.partition_count());
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    let ok = known.is_some_and(|n| p.partition_index >= 0 && p.partition_index < n);
                    let e = if !ok {
                        code(ResponseError::UnknownTopicOrPartition)
                    } else if top != NONE {
                        NONE
                    } else {
                        next.next().unwrap_or(NONE)
                    };
                    OffsetDeleteResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(req.error_code(e))
                })
                .collect();
            OffsetDeleteResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(partitions)
        })
        .collect();
    req.respond(
        &OffsetDeleteResponse::default()
            .with_error_code(req.error_code(top))
            .with_topics(if top.is_error() { vec![] } else { topics }),
    )
}
