//! ConsumerGroupDescribe, versions 0-1 (KIP-848; always flexible). Classic and unknown groups
//! answer GROUP_ID_NOT_FOUND, as Kafka does.

use bytes::Bytes;
use kafka_protocol::messages::consumer_group_describe_response::{
    Assignment, DescribedGroup, Member, TopicPartitions,
};
use kafka_protocol::messages::{
    ConsumerGroupDescribeRequest, ConsumerGroupDescribeResponse, GroupId,
};

use super::common::{authorized_operations, str_bytes, topic_name, AclResource};
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
    let request: ConsumerGroupDescribeRequest = crate::decode_or_close!(req, b);
    let version = req.version;
    let operations =
        authorized_operations(AclResource::Group, request.include_authorized_operations);
    let mut groups = Vec::with_capacity(request.group_ids.len());
    for g in request.group_ids {
        let id = g.to_string();
        let gid = id.clone();
        let d = on_coordinator(&id, move |gs| async move {
            let topics = ImageTopics(crate::shard::local().broker.image());
            gs.coordinator
                .borrow()
                .describe_consumer_group(&gid, &topics)
        })
        .await;
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
                .with_assignor_name(str_bytes(&d.assignor))
                .with_members(
                    d.members
                        .into_iter()
                        .map(|m| {
                            Member::default()
                                .with_member_id(str_bytes(&m.member_id))
                                .with_instance_id(m.instance_id.as_deref().map(str_bytes))
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
                                .with_subscribed_topic_regex(
                                    m.subscribed_topic_regex.as_deref().map(str_bytes),
                                )
                                .with_assignment(assignment(m.assignment))
                                .with_target_assignment(assignment(m.target_assignment))
                                // v1 (KIP-1099): 0 a classic member of a mixed group,
                                // 1 a consumer-protocol member; v0 has no member type.
                                .with_member_type(match (version >= 1, m.classic) {
                                    (false, _) => -1,
                                    (true, true) => 0,
                                    (true, false) => 1,
                                })
                        })
                        .collect(),
                ),
        };
        groups.push(out.with_authorized_operations(operations));
    }
    req.respond(&ConsumerGroupDescribeResponse::default().with_groups(groups))
}
