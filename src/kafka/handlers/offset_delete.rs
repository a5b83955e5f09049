//! OffsetDelete, version 0 (KIP-496). Removes committed offsets of topics the group is not
//! consuming (GROUP_SUBSCRIBED_TO_TOPIC otherwise).

use bytes::Bytes;
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::{OffsetDeleteRequest, OffsetDeleteResponse};

use super::common::{topic_name, with_coordinator};
use crate::kafka::Request;
use crate::server::Response;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let r: OffsetDeleteRequest = crate::decode_or_close!(req, b);
    let group = r.group_id.to_string();
    let topics: Vec<(String, Vec<i32>)> = r
        .topics
        .iter()
        .map(|t| {
            (
                t.name.to_string(),
                t.partitions.iter().map(|p| p.partition_index).collect(),
            )
        })
        .collect();
    let res = with_coordinator(&group.clone(), move |c| async move {
        c.delete_offsets(&group, topics).await
    })
    .await;
    let resp = match res {
        Ok(Ok(ts)) => OffsetDeleteResponse::default().with_topics(
            ts.into_iter()
                .map(|(t, ps)| {
                    OffsetDeleteResponseTopic::default()
                        .with_name(topic_name(&t))
                        .with_partitions(
                            ps.into_iter()
                                .map(|(p, e)| {
                                    OffsetDeleteResponsePartition::default()
                                        .with_partition_index(p)
                                        .with_error_code(e)
                                })
                                .collect(),
                        )
                })
                .collect(),
        ),
        Ok(Err(e)) | Err(e) => OffsetDeleteResponse::default().with_error_code(e),
    };
    req.respond(&resp)
}
