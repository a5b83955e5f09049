//! OffsetFetch, versions 1-8 (flexible from 6; all topics with a null list from 2; leader epoch
//! from 5; several groups per request from 8). A partition without a commit answers -1.

use bytes::Bytes;
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{GroupId, OffsetFetchRequest, OffsetFetchResponse};

use kafka_protocol::protocol::StrBytes;

use super::common::{str_bytes, topic_name, with_coordinator};
use crate::group::coordinator::Committed;
use crate::kafka::Request;
use crate::server::Response;

type Fetched = Result<Vec<(String, Vec<(i32, Option<Committed>)>)>, i16>;

async fn fetch(group: String, topics: Option<Vec<(String, Vec<i32>)>>) -> Fetched {
    let g = group.clone();
    match with_coordinator(&g, move |c| async move { c.fetch_offsets(&group, topics) }).await {
        Ok(r) => r,
        Err(e) => Err(e),
    }
}

/// `(offset, leader epoch, metadata)` as OffsetFetch reports it; -1 when nothing is committed.
fn reported(c: Option<Committed>) -> (i64, i32, StrBytes) {
    match c {
        Some(c) => (c.offset, c.leader_epoch, str_bytes(&c.metadata)),
        None => (-1, -1, str_bytes("")),
    }
}

/// Fetches one group's offsets: (group error, topics with their partitions).
async fn fetch_group(
    group: String,
    topics: Option<Vec<(String, Vec<i32>)>>,
) -> (i16, Vec<(String, Vec<(i32, Option<Committed>)>)>) {
    match fetch(group, topics).await {
        Ok(ts) => (0, ts),
        Err(e) => (e, vec![]),
    }
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let r: OffsetFetchRequest = crate::decode_or_close!(req, b);
    let v = req.version;
    if v >= 8 {
        let mut groups = Vec::new();
        for g in &r.groups {
            let wanted = g.topics.as_ref().map(|ts| {
                ts.iter()
                    .map(|t| (t.name.to_string(), t.partition_indexes.clone()))
                    .collect()
            });
            let (err, topics) = fetch_group(g.group_id.to_string(), wanted).await;
            let topics = topics
                .into_iter()
                .map(|(t, ps)| {
                    let parts = ps
                        .into_iter()
                        .map(|(p, c)| {
                            let (o, e, m) = reported(c);
                            OffsetFetchResponsePartitions::default()
                                .with_partition_index(p)
                                .with_committed_offset(o)
                                .with_committed_leader_epoch(e)
                                .with_metadata(Some(m))
                        })
                        .collect();
                    OffsetFetchResponseTopics::default()
                        .with_name(topic_name(&t))
                        .with_partitions(parts)
                })
                .collect();
            groups.push(
                OffsetFetchResponseGroup::default()
                    .with_group_id(GroupId(g.group_id.0.clone()))
                    .with_error_code(err)
                    .with_topics(topics),
            );
        }
        return req.respond(&OffsetFetchResponse::default().with_groups(groups));
    }
    let wanted = r.topics.as_ref().map(|ts| {
        ts.iter()
            .map(|t| (t.name.to_string(), t.partition_indexes.clone()))
            .collect()
    });
    let (err, topics) = fetch_group(r.group_id.to_string(), wanted).await;
    let topics = topics
        .into_iter()
        .map(|(t, ps)| {
            let parts = ps
                .into_iter()
                .map(|(p, c)| {
                    let (o, e, m) = reported(c);
                    OffsetFetchResponsePartition::default()
                        .with_partition_index(p)
                        .with_committed_offset(o)
                        .with_committed_leader_epoch(if v >= 5 { e } else { -1 })
                        .with_metadata(Some(m))
                })
                .collect();
            OffsetFetchResponseTopic::default()
                .with_name(topic_name(&t))
                .with_partitions(parts)
        })
        .collect();
    let mut resp = OffsetFetchResponse::default().with_topics(topics);
    if v >= 2 {
        resp = resp.with_error_code(err);
    }
    req.respond(&resp)
}
