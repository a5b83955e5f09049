//! ShareGroupDescribe, version 1 (KIP-932; always flexible). Groups that are not share groups
//! answer GROUP_ID_NOT_FOUND, as Kafka does.

use bytes::Bytes;
use kafka_protocol::messages::share_group_describe_response::{
    Assignment, DescribedGroup, Member, TopicPartitions,
};
use kafka_protocol::messages::{GroupId, ShareGroupDescribeRequest, ShareGroupDescribeResponse};

use super::common::{authorized_operations, str_bytes, topic_name, AclResource};
use super::share_common::refuse_in_cluster;
use crate::group::{on_coordinator, ImageTopics};
use crate::kafka::{Request, Response};

fn assignment(parts: Vec<([u8; 16], String, Vec<i32>)>) -> Assignment {
    Assignment::default().with_topic_partitions(
        parts
            .into_iter()
            .map(|(id, name, ps)| {
                TopicPartitions::default()
                    .with_topic_id(uuid::Uuid::from_bytes(id))
                    .with_topic_name(topic_name(&name))
                    .with_partitions(ps)
            })
            .collect(),
    )
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: ShareGroupDescribeRequest = crate::decode_or_close!(req, b);
    let operations =
        authorized_operations(AclResource::Group, request.include_authorized_operations);
    let mut groups = Vec::with_capacity(request.group_ids.len());
    for g in request.group_ids {
        let id = g.to_string();
        let gid = id.clone();
        let d = match refuse_in_cluster() {
            Some(code) => Err(code),
            None => {
                on_coordinator(&id, move |gs| async move {
                    let topics = ImageTopics(crate::shard::local().broker.image());
                    gs.coordinator.borrow().describe_share(&gid, &topics)
                })
                .await
            }
        };
        let out = match d {
            Err(code) => DescribedGroup::default()
                .with_group_id(GroupId(g.0))
                .with_error_code(req.error_code(code)),
            Ok(d) => DescribedGroup::default()
                .with_group_id(GroupId(g.0))
                .with_error_code(req.error_code(d.error))
                .with_error_message(d.message.as_deref().map(str_bytes))
                .with_group_state(str_bytes(d.state))
                .with_group_epoch(d.group_epoch)
                .with_assignment_epoch(d.assignment_epoch)
                .with_assignor_name(str_bytes("simple"))
                .with_members(
                    d.members
                        .into_iter()
                        .map(|m| {
                            Member::default()
                                .with_member_id(str_bytes(&m.member_id))
                                .with_rack_id(m.rack_id.as_deref().map(str_bytes))
                                .with_member_epoch(m.member_epoch)
                                .with_client_id(str_bytes(&m.client_id))
                                .with_client_host(str_bytes(&m.client_host))
                                .with_subscribed_topic_names(
                                    m.subscribed_topic_names
                                        .iter()
                                        .map(|n| topic_name(n))
                                        .collect(),
                                )
                                .with_assignment(assignment(m.assignment))
                        })
                        .collect(),
                ),
        };
        groups.push(out.with_authorized_operations(operations));
    }
    req.respond(&ShareGroupDescribeResponse::default().with_groups(groups))
}
