//! The share-group offset admin APIs (KIP-932; always flexible): DescribeShareGroupOffsets
//! versions 0-1 (the start offset of each share partition, -1 where the group has no state yet,
//! and from version 1 its lag, KIP-1226), AlterShareGroupOffsets version 0 (moves share
//! partitions to a start offset, dropping what is in flight; the group must be empty) and
//! DeleteShareGroupOffsets version 0 (forgets the group's state for whole topics; the group
//! must be empty). Offsets live in
//! `__share_group_state` ([`crate::group::share_state`]).

use bytes::Bytes;
use kafka_protocol::messages::alter_share_group_offsets_response::{
    AlterShareGroupOffsetsResponsePartition, AlterShareGroupOffsetsResponseTopic,
};
use kafka_protocol::messages::delete_share_group_offsets_response::DeleteShareGroupOffsetsResponseTopic;
use kafka_protocol::messages::describe_share_group_offsets_response::{
    DescribeShareGroupOffsetsResponseGroup, DescribeShareGroupOffsetsResponsePartition,
    DescribeShareGroupOffsetsResponseTopic,
};
use kafka_protocol::messages::{
    AlterShareGroupOffsetsRequest, AlterShareGroupOffsetsResponse, DeleteShareGroupOffsetsRequest,
    DeleteShareGroupOffsetsResponse, DescribeShareGroupOffsetsRequest,
    DescribeShareGroupOffsetsResponse, GroupId,
};
use kafka_protocol::ResponseError;

use super::common::{code, str_bytes, topic_name, with_partition};
use super::share_common::{refuse_in_cluster, CLUSTER_MESSAGE};
use crate::group::on_coordinator;
use crate::group::share_state::{self, StateKey};
use crate::kafka::{Request, Response};
use crate::metadata::TopicMeta;
use crate::types::ErrorCode;

/// Checks (and for Alter creates) the empty share group on its coordinator.
async fn empty_group(group: &str, create: bool) -> Result<(), ErrorCode> {
    let g = group.to_string();
    on_coordinator(group, move |gs| async move {
        gs.with(|c, _| c.share_group_empty(&g, create))
            .await
            .and_then(|r| r)
    })
    .await?
}

async fn is_share_group(group: &str) -> Result<(), ErrorCode> {
    let g = group.to_string();
    let known = on_coordinator(group, move |gs| async move {
        gs.coordinator.borrow().share_group(&g).is_some()
    })
    .await?;
    if known {
        Ok(())
    } else {
        Err(code(ResponseError::GroupIdNotFound))
    }
}

/// KIP-1226's lag of a share partition: the records from its start offset to the log end (the
/// high watermark) whose delivery is not complete; -1 where the group has no state there or the
/// log cannot be read.
async fn lag(meta: &TopicMeta, partition: i32, start: i64, done: i64) -> i64 {
    if start < 0 {
        return -1;
    }
    match with_partition(meta, partition, |log| async move { log.high_watermark().0 }).await {
        Ok(end) => end.saturating_sub(start).saturating_sub(done).max(0),
        Err(_) => -1,
    }
}

pub async fn describe(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: DescribeShareGroupOffsetsRequest = crate::decode_or_close!(req, b);
    let image = crate::shard::local().broker.image();
    let mut groups = Vec::with_capacity(request.groups.len());
    for g in request.groups {
        let id = g.group_id.to_string();
        let out = DescribeShareGroupOffsetsResponseGroup::default()
            .with_group_id(GroupId(g.group_id.0.clone()));
        let check = match refuse_in_cluster() {
            Some(c) => Err(c),
            None => is_share_group(&id).await,
        };
        if let Err(e) = check {
            groups.push(out.with_error_code(req.error_code(e)));
            continue;
        }
        let states = share_state::group_states(&id).await;
        let mut topics = vec![];
        match g.topics {
            None => {
                // Every share partition the group has state for, grouped by topic.
                let mut by_topic: std::collections::BTreeMap<[u8; 16], Vec<(i32, i64, i64)>> =
                    Default::default();
                for (t, p, start, done) in states {
                    by_topic.entry(t).or_default().push((p, start, done));
                }
                for (t, ps) in by_topic {
                    let Some(meta) = image.topic_by_id(&t) else {
                        continue;
                    };
                    let mut parts = Vec::with_capacity(ps.len());
                    for (p, start, done) in ps {
                        parts.push(
                            DescribeShareGroupOffsetsResponsePartition::default()
                                .with_partition_index(p)
                                .with_start_offset(start)
                                .with_leader_epoch(0)
                                .with_lag(lag(meta, p, start, done).await),
                        );
                    }
                    topics.push(
                        DescribeShareGroupOffsetsResponseTopic::default()
                            .with_topic_name(topic_name(&meta.name))
                            .with_topic_id(uuid::Uuid::from_bytes(t))
                            .with_partitions(parts),
                    );
                }
            }
            Some(wanted) => {
                for t in wanted {
                    let meta = image.topic(t.topic_name.as_str());
                    let mut parts = Vec::with_capacity(t.partitions.len());
                    for p in &t.partitions {
                        let out = DescribeShareGroupOffsetsResponsePartition::default()
                            .with_partition_index(*p);
                        parts.push(match meta {
                            Some(m) if *p >= 0 && *p < m.partition_count() => {
                                let (start, done) = states
                                    .iter()
                                    .find(|(tid, tp, ..)| *tid == m.id && tp == p)
                                    .map_or((-1, 0), |s| (s.2, s.3));
                                out.with_start_offset(start)
                                    .with_leader_epoch(0)
                                    .with_lag(lag(m, *p, start, done).await)
                            }
                            _ => out.with_start_offset(-1).with_error_code(
                                req.error_code(code(ResponseError::UnknownTopicOrPartition)),
                            ),
                        });
                    }
                    topics.push(
                        DescribeShareGroupOffsetsResponseTopic::default()
                            .with_topic_name(t.topic_name.clone())
                            .with_topic_id(
                                meta.map_or(uuid::Uuid::nil(), |m| uuid::Uuid::from_bytes(m.id)),
                            )
                            .with_partitions(parts),
                    );
                }
            }
        }
        groups.push(out.with_topics(topics));
    }
    req.respond(&DescribeShareGroupOffsetsResponse::default().with_groups(groups))
}

pub async fn alter(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: AlterShareGroupOffsetsRequest = crate::decode_or_close!(req, b);
    let group = request.group_id.to_string();
    let check = match refuse_in_cluster() {
        Some(c) => Err(c),
        None => empty_group(&group, true).await,
    };
    if let Err(e) = check {
        return req.respond(
            &AlterShareGroupOffsetsResponse::default()
                .with_error_code(req.error_code(e))
                .with_error_message(refuse_in_cluster().map(|_| str_bytes(CLUSTER_MESSAGE))),
        );
    }
    let image = crate::shard::local().broker.image();
    let mut responses = vec![];
    for t in request.topics {
        let meta = image.topic(t.topic_name.as_str()).cloned();
        let mut parts = vec![];
        for p in &t.partitions {
            let error = match &meta {
                Some(m) if p.partition_index >= 0 && p.partition_index < m.partition_count() => {
                    let key = StateKey {
                        group: group.clone(),
                        topic: m.id,
                        partition: p.partition_index,
                    };
                    let offset = p.start_offset;
                    match with_partition(m, p.partition_index, move |log| {
                        share_state::reset_here(log, key, offset)
                    })
                    .await
                    {
                        Ok(Ok(())) => ErrorCode::NONE,
                        Ok(Err(e)) | Err(e) => e,
                    }
                }
                _ => code(ResponseError::UnknownTopicOrPartition),
            };
            parts.push(
                AlterShareGroupOffsetsResponsePartition::default()
                    .with_partition_index(p.partition_index)
                    .with_error_code(req.error_code(error)),
            );
        }
        responses.push(
            AlterShareGroupOffsetsResponseTopic::default()
                .with_topic_name(t.topic_name)
                .with_topic_id(meta.map_or(uuid::Uuid::nil(), |m| uuid::Uuid::from_bytes(m.id)))
                .with_partitions(parts),
        );
    }
    req.respond(&AlterShareGroupOffsetsResponse::default().with_responses(responses))
}

pub async fn delete(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: DeleteShareGroupOffsetsRequest = crate::decode_or_close!(req, b);
    let group = request.group_id.to_string();
    let check = match refuse_in_cluster() {
        Some(c) => Err(c),
        None => empty_group(&group, false).await,
    };
    if let Err(e) = check {
        return req.respond(
            &DeleteShareGroupOffsetsResponse::default()
                .with_error_code(req.error_code(e))
                .with_error_message(refuse_in_cluster().map(|_| str_bytes(CLUSTER_MESSAGE))),
        );
    }
    let image = crate::shard::local().broker.image();
    let states = share_state::group_states(&group).await;
    let mut responses = vec![];
    for t in request.topics {
        let meta = image.topic(t.topic_name.as_str()).cloned();
        let error = match &meta {
            None => code(ResponseError::UnknownTopicOrPartition),
            Some(m) => {
                let mut err = ErrorCode::NONE;
                // Only partitions with state: the others have nothing to forget.
                for (_, p, _, _) in states.iter().filter(|(tid, ..)| *tid == m.id) {
                    let key = StateKey {
                        group: group.clone(),
                        topic: m.id,
                        partition: *p,
                    };
                    match with_partition(m, *p, move |_| share_state::delete_here(key)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) | Err(e) => err = e,
                    }
                }
                err
            }
        };
        responses.push(
            DeleteShareGroupOffsetsResponseTopic::default()
                .with_topic_name(t.topic_name)
                .with_topic_id(meta.map_or(uuid::Uuid::nil(), |m| uuid::Uuid::from_bytes(m.id)))
                .with_error_code(req.error_code(error)),
        );
    }
    req.respond(&DeleteShareGroupOffsetsResponse::default().with_responses(responses))
}
