//! DescribeTopicPartitions, version 0 (flexible; KIP-966): topics in name order (every topic
//! when none is named), each with its partitions and its authorized operations (every topic
//! operation: no authorizer), paginated. A response holds at most `response_partition_limit`
//! partitions (capped at [`PARTITIONS_PER_RESPONSE_MAX`], Kafka's
//! `max.request.partition.size.limit` default); `next_cursor` names the topic and partition the
//! next request starts from, null once everything was described. A request's `cursor` starts
//! there; a cursor naming a topic the request does not list is INVALID_REQUEST.

use std::collections::BTreeSet;

use bytes::Bytes;
use kafka_protocol::messages::describe_topic_partitions_response::{
    Cursor, DescribeTopicPartitionsResponsePartition, DescribeTopicPartitionsResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, DescribeTopicPartitionsRequest, DescribeTopicPartitionsResponse,
};
use kafka_protocol::ResponseError;

use super::common::{authorized_operations, code, topic_name, AclResource};
use crate::kafka::{Request, Response};
use crate::metadata::TopicMeta;
use crate::shard::{self, BrokerContext};

/// Most partitions one response describes, whatever the request asks (Kafka's
/// `max.request.partition.size.limit` default): bounds the response a request can cause.
pub const PARTITIONS_PER_RESPONSE_MAX: i32 = 2000;

fn partition_entry(
    broker: &BrokerContext,
    t: &TopicMeta,
    p: i32,
) -> DescribeTopicPartitionsResponsePartition {
    if t.replication_factor() > 1 {
        let image = broker.image();
        let s = super::metadata::replicated_state(broker, &image, t, p);
        let replicas: Vec<i32> = t.replica_nodes(p).to_vec();
        let offline = replicas
            .iter()
            .copied()
            .filter(|n| image.fenced.contains(n))
            .map(BrokerId)
            .collect();
        let entry = DescribeTopicPartitionsResponsePartition::default()
            .with_partition_index(p)
            .with_leader_epoch(s.epoch)
            .with_replica_nodes(replicas.into_iter().map(BrokerId).collect())
            .with_isr_nodes(s.isr.into_iter().map(BrokerId).collect())
            .with_offline_replicas(offline)
            .with_eligible_leader_replicas(Some(Vec::new()))
            .with_last_known_elr(Some(Vec::new()));
        return if s.leader < 0 || image.fenced.contains(&s.leader) {
            entry
                .with_error_code(code(ResponseError::LeaderNotAvailable).get())
                .with_leader_id(BrokerId(-1))
        } else {
            entry.with_leader_id(BrokerId(s.leader))
        };
    }
    let node = broker.node_of(t, p).unwrap_or(-1);
    let entry = DescribeTopicPartitionsResponsePartition::default()
        .with_partition_index(p)
        .with_leader_epoch(0)
        .with_replica_nodes(vec![BrokerId(node)])
        .with_eligible_leader_replicas(Some(Vec::new()))
        .with_last_known_elr(Some(Vec::new()));
    if broker.image().fenced.contains(&node) {
        entry
            .with_error_code(code(ResponseError::LeaderNotAvailable).get())
            .with_leader_id(BrokerId(-1))
            .with_offline_replicas(vec![BrokerId(node)])
    } else {
        entry
            .with_leader_id(BrokerId(node))
            .with_isr_nodes(vec![BrokerId(node)])
    }
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: DescribeTopicPartitionsRequest = crate::decode_or_close!(req, b);
    let broker = shard::local().broker.clone();
    let image = broker.image();
    let operations = authorized_operations(AclResource::Topic, true);
    // Names in order, each once: the ones asked for, or every topic.
    let names: BTreeSet<String> = if request.topics.is_empty() {
        image.topics.keys().cloned().collect()
    } else {
        request.topics.iter().map(|t| t.name.to_string()).collect()
    };
    let mut response = DescribeTopicPartitionsResponse::default();
    let (start_topic, start_partition) = match &request.cursor {
        Some(c) => {
            let name = c.topic_name.to_string();
            if !names.contains(&name) || c.partition_index < 0 {
                let bad = DescribeTopicPartitionsResponseTopic::default()
                    .with_error_code(req.error_code(code(ResponseError::InvalidRequest)))
                    .with_name(Some(c.topic_name.clone()))
                    .with_topic_authorized_operations(operations);
                return req.respond(&response.with_topics(vec![bad]));
            }
            (Some(name), c.partition_index)
        }
        None => (None, 0),
    };
    let mut budget = request
        .response_partition_limit
        .clamp(1, PARTITIONS_PER_RESPONSE_MAX);
    let mut topics = Vec::new();
    let mut next_cursor = None;
    let remaining = names
        .iter()
        .filter(|n| start_topic.as_ref().is_none_or(|s| *n >= s));
    for name in remaining {
        if budget == 0 {
            next_cursor = Some(
                Cursor::default()
                    .with_topic_name(topic_name(name))
                    .with_partition_index(0),
            );
            break;
        }
        let Some(t) = image.topic(name) else {
            let error = if crate::metadata::valid_topic_name(name) {
                ResponseError::UnknownTopicOrPartition
            } else {
                ResponseError::InvalidTopicException
            };
            topics.push(
                DescribeTopicPartitionsResponseTopic::default()
                    .with_error_code(req.error_code(code(error)))
                    .with_name(Some(topic_name(name)))
                    .with_topic_authorized_operations(operations),
            );
            continue;
        };
        let first = if start_topic.as_deref() == Some(name.as_str()) {
            start_partition
        } else {
            0
        };
        let count = t.partition_count();
        let last = count.min(first.saturating_add(budget));
        let partitions: Vec<_> = (first.min(count)..last)
            .map(|p| partition_entry(&broker, t, p))
            .collect();
        budget -= partitions.len() as i32;
        topics.push(
            DescribeTopicPartitionsResponseTopic::default()
                .with_name(Some(topic_name(name)))
                .with_topic_id(uuid::Uuid::from_bytes(t.id))
                .with_is_internal(t.internal)
                .with_partitions(partitions)
                .with_topic_authorized_operations(operations),
        );
        if last < count {
            next_cursor = Some(
                Cursor::default()
                    .with_topic_name(topic_name(name))
                    .with_partition_index(last),
            );
            break;
        }
    }
    response = response.with_topics(topics).with_next_cursor(next_cursor);
    req.respond(&response)
}
