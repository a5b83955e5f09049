//! OffsetFetch, versions 1-8 (flexible from 6; all topics with a null list from 2; leader epoch
//! from 5; several groups per request from 8). A partition without a commit answers -1.

use bytes::Bytes;
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{GroupId, OffsetFetchRequest, OffsetFetchResponse};

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

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let r: OffsetFetchRequest = crate::decode_or_close!(req, b);
    let v = req.version;
    if v >= 8 {
        let mut groups = Vec::new();
        for g in &r.groups {
            let topics = g.topics.as_ref().map(|ts| {
                ts.iter()
                    .map(|t| (t.name.to_string(), t.partition_indexes.clone()))
                    .collect()
            });
            let res = fetch(g.group_id.to_string(), topics).await;
            let (err, topics) = match res {
                Ok(ts) => (0, ts),
                Err(e) => (e, vec![]),
            };
            let topics = topics
                .into_iter()
                .map(|(t, ps)| {
                    OffsetFetchResponseTopics::default()
                        .with_name(topic_name(&t))
                        .with_partitions(
                            ps.into_iter()
                                .map(|(p, c)| {
                                    let (o, e, m) = c
                                        .map(|c| (c.offset, c.leader_epoch, Some(c.metadata)))
                                        .unwrap_or((-1, -1, Some(String::new())));
                                    OffsetFetchResponsePartitions::default()
                                        .with_partition_index(p)
                                        .with_committed_offset(o)
                                        .with_committed_leader_epoch(e)
                                        .with_metadata(m.map(|m| str_bytes(&m)))
                                })
                                .collect(),
                        )
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
    let topics = r.topics.as_ref().map(|ts| {
        ts.iter()
            .map(|t| (t.name.to_string(), t.partition_indexes.clone()))
            .collect()
    });
    let (err, topics) = match fetch(r.group_id.to_string(), topics).await {
        Ok(ts) => (0, ts),
        Err(e) => (e, vec![]),
    };
    let topics = topics
        .into_iter()
        .map(|(t, ps)| {
            OffsetFetchResponseTopic::default()
                .with_name(topic_name(&t))
                .with_partitions(
                    ps.into_iter()
                        .map(|(p, c)| {
                            let (o, e, m) = c
                                .map(|c| (c.offset, c.leader_epoch, Some(c.metadata)))
                                .unwrap_or((-1, -1, Some(String::new())));
                            OffsetFetchResponsePartition::default()
                                .with_partition_index(p)
                                .with_committed_offset(o)
                                .with_committed_leader_epoch(if v >= 5 { e } else { -1 })
                                .with_metadata(m.map(|m| str_bytes(&m)))
                        })
                        .collect(),
                )
        })
        .collect();
    let mut resp = OffsetFetchResponse::default().with_topics(topics);
    if v >= 2 {
        resp = resp.with_error_code(err);
    }
    req.respond(&resp)
}
