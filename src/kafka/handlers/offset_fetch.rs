//! OffsetFetch, versions 1-9 (flexible from 6; v2+ all partitions when topics is null and a
//! top-level error; v5+ leader epochs; v8+ several groups per request). Unknown partitions
//! answer offset -1 with no error, as Kafka does. With `require_stable` (v7+, KIP-447) a partition
//! whose offset an open transaction has committed answers UNSTABLE_OFFSET_COMMIT (clients
//! retry), so a consumer taking over never starts from an offset that is about to change.
//! From v9 a KIP-848 member sends its member id and epoch: checked against a consumer group
//! as Kafka does (UNKNOWN_MEMBER_ID, STALE_MEMBER_EPOCH; no id and epoch -1 skip the check, as
//! admin clients send), the error answered for the whole group.

use bytes::Bytes;
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{GroupId, OffsetFetchRequest, OffsetFetchResponse};

use kafka_protocol::ResponseError;

use super::common::{code, str_bytes, topic_name, NONE};
use crate::group::offsets::OffsetValue;
use crate::group::on_coordinator;
use crate::kafka::{Request, Response};

type Fetched = Vec<(String, i32, Option<OffsetValue>)>;
/// Committed offsets of one topic: `(partition, offset)`.
type TopicOffsets = (String, Vec<(i32, Option<OffsetValue>)>);

/// The committed offsets of one group, or a coordinator error (the group's, or the member's
/// from v9: see `check_consumer_fetch`).
async fn fetch(
    group_id: String,
    member: (Option<String>, i32),
    wanted: Option<Vec<(String, Vec<i32>)>>,
    require_stable: bool,
) -> Result<Fetched, crate::types::ErrorCode> {
    let gid = group_id.clone();
    on_coordinator(&group_id, move |gs| async move {
        let c = gs.coordinator.borrow();
        c.check_consumer_fetch(&gid, member.0.as_deref(), member.1)?;
        let mut rows = c.fetch_offsets(&gid, wanted.as_deref());
        drop(c);
        if require_stable {
            let pending = gs.pending_txn.borrow();
            for (t, p, v) in rows.iter_mut() {
                if pending.has_pending(&gid, t, *p) {
                    *v = Some(OffsetValue {
                        offset: UNSTABLE,
                        leader_epoch: -1,
                        metadata: String::new(),
                        commit_timestamp_ms: -1,
                        expire_timestamp_ms: -1,
                    });
                }
            }
        }
        Ok(rows)
    })
    .await?
}

/// Marks a row whose offset an open transaction holds (never a real offset).
const UNSTABLE: i64 = i64::MIN;

/// The error of one row: UNSTABLE_OFFSET_COMMIT for a marked one.
fn row_error(
    v: &Option<OffsetValue>,
    otherwise: crate::types::ErrorCode,
) -> crate::types::ErrorCode {
    if v.as_ref().is_some_and(|v| v.offset == UNSTABLE) {
        code(ResponseError::UnstableOffsetCommit)
    } else {
        otherwise
    }
}

/// The offset a row reports (-1 for none and for a marked one).
fn row_offset(v: &Option<OffsetValue>) -> i64 {
    match v {
        Some(v) if v.offset != UNSTABLE => v.offset,
        _ => -1,
    }
}

/// Groups results by topic, keeping the first-seen topic order.
fn by_topic(rows: Fetched) -> Vec<TopicOffsets> {
    let mut out: Vec<TopicOffsets> = Vec::new();
    for (t, p, v) in rows {
        match out.iter_mut().find(|(name, _)| *name == t) {
            Some((_, ps)) => ps.push((p, v)),
            None => out.push((t, vec![(p, v)])),
        }
    }
    out
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: OffsetFetchRequest = crate::decode_or_close!(req, b);
    let version = req.version;
    let epoch = |v: &Option<OffsetValue>| {
        if version >= 5 {
            v.as_ref().map(|v| v.leader_epoch).unwrap_or(-1)
        } else {
            -1
        }
    };
    if version >= 8 {
        let mut groups = Vec::with_capacity(request.groups.len());
        for g in request.groups {
            let wanted = g.topics.map(|ts| {
                ts.into_iter()
                    .map(|t| (t.name.to_string(), t.partition_indexes))
                    .collect::<Vec<_>>()
            });
            let stable = request.require_stable;
            let member = (g.member_id.map(|m| m.to_string()), g.member_epoch);
            let (error, rows) = match fetch(g.group_id.to_string(), member, wanted, stable).await {
                Ok(rows) => (NONE, rows),
                Err(e) => (e, vec![]),
            };
            let topics = by_topic(rows)
                .into_iter()
                .map(|(t, ps)| {
                    OffsetFetchResponseTopics::default()
                        .with_name(topic_name(&t))
                        .with_partitions(
                            ps.into_iter()
                                .map(|(p, v)| {
                                    OffsetFetchResponsePartitions::default()
                                        .with_partition_index(p)
                                        .with_error_code(req.error_code(row_error(&v, NONE)))
                                        .with_committed_offset(row_offset(&v))
                                        .with_committed_leader_epoch(epoch(&v))
                                        .with_metadata(Some(str_bytes(
                                            v.as_ref().map(|v| v.metadata.as_str()).unwrap_or(""),
                                        )))
                                })
                                .collect(),
                        )
                })
                .collect();
            groups.push(
                OffsetFetchResponseGroup::default()
                    .with_group_id(GroupId(g.group_id.0))
                    .with_error_code(req.error_code(error))
                    .with_topics(topics),
            );
        }
        return req.respond(&OffsetFetchResponse::default().with_groups(groups));
    }
    let wanted = request.topics.map(|ts| {
        ts.into_iter()
            .map(|t| (t.name.to_string(), t.partition_indexes))
            .collect::<Vec<_>>()
    });
    let requested = wanted.clone();
    let stable = version >= 7 && request.require_stable;
    let (error, rows) = match fetch(request.group_id.to_string(), (None, -1), wanted, stable).await
    {
        Ok(rows) => (NONE, rows),
        Err(e) => {
            // v1 has no top-level error: report it on every requested partition.
            let rows = requested
                .unwrap_or_default()
                .into_iter()
                .flat_map(|(t, ps)| ps.into_iter().map(move |p| (t.clone(), p, None)))
                .collect();
            (e, rows)
        }
    };
    let per_partition_error = if version < 2 { error } else { NONE };
    let topics = by_topic(rows)
        .into_iter()
        .map(|(t, ps)| {
            OffsetFetchResponseTopic::default()
                .with_name(topic_name(&t))
                .with_partitions(
                    ps.into_iter()
                        .map(|(p, v)| {
                            OffsetFetchResponsePartition::default()
                                .with_partition_index(p)
                                .with_committed_offset(row_offset(&v))
                                .with_committed_leader_epoch(epoch(&v))
                                .with_metadata(Some(str_bytes(
                                    v.as_ref().map(|v| v.metadata.as_str()).unwrap_or(""),
                                )))
                                .with_error_code(req.error_code(row_error(&v, per_partition_error)))
                        })
                        .collect(),
                )
        })
        .collect();
    let mut resp = OffsetFetchResponse::default().with_topics(topics);
    if version >= 2 {
        resp.error_code = req.error_code(error);
    }
    req.respond(&resp)
}
