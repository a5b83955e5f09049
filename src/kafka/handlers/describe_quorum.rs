//! DescribeQuorum, versions 0-1 (flexible from 0; v1 the replicas' fetch and catch-up times;
//! v2's directory ids and node endpoints are not served). Kafka answers it for the metadata
//! partition of its KRaft quorum; Sluice answers it for every replicated partition, whose raft
//! group is a quorum of the partition's replicas: the leader, its epoch (the raft term), the
//! high watermark (the commit index as an offset) and, per replica, the log end offset the
//! leader knows it to have — its own log end, and for a follower the offset after its matched
//! index in raft progress. A follower's lag in offsets is the leader's log end minus its own
//! (`sluice cluster status` shows it). Served by the partition's leader, which alone sees the
//! progress: other nodes answer NOT_LEADER_OR_FOLLOWER, a partition without replicas
//! INVALID_REQUEST.

use bytes::Bytes;
use kafka_protocol::messages::describe_quorum_response::{PartitionData, ReplicaState, TopicData};
use kafka_protocol::messages::{BrokerId, DescribeQuorumRequest, DescribeQuorumResponse};
use kafka_protocol::ResponseError;

use super::common::{code, with_partition_replica, NONE};
use crate::kafka::{Request, Response};
use crate::shard;
use crate::types::now_ms;

/// Kafka's "unknown" for an offset or a timestamp.
const UNKNOWN: i64 = -1;

/// What the leader answers for one partition (built on its shard, sent back as plain values).
type Answer = (i32, i32, i64, Vec<(i32, i64, i64, i64)>);

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: DescribeQuorumRequest = crate::decode_or_close!(req, b);
    let image = shard::local().broker.image();
    let mut topics = Vec::with_capacity(request.topics.len());
    for t in request.topics {
        let meta = image.topic(t.topic_name.as_str()).cloned();
        let mut parts = Vec::with_capacity(t.partitions.len());
        for p in t.partitions {
            let p = p.partition_index;
            let answer: Result<Answer, _> = match &meta {
                None => Err(code(ResponseError::UnknownTopicOrPartition)),
                Some(m) if p < 0 || p >= m.partition_count() => {
                    Err(code(ResponseError::UnknownTopicOrPartition))
                }
                Some(m) if m.replication_factor() < 2 => Err(code(ResponseError::InvalidRequest)),
                Some(m) => {
                    let voters: Vec<u64> = m.replica_nodes(p).iter().map(|n| *n as u64).collect();
                    with_partition_replica(m, p, move |_, replica| async move {
                        let replica = replica.ok_or(code(ResponseError::InvalidRequest))?;
                        let progress = replica
                            .replica_log_ends(&voters)
                            .ok_or(code(ResponseError::NotLeaderOrFollower))?;
                        let now = std::time::Instant::now();
                        let wall = now_ms();
                        let at = |i: Option<std::time::Instant>| {
                            i.map_or(UNKNOWN, |i| {
                                wall - now.saturating_duration_since(i).as_millis() as i64
                            })
                        };
                        let status = replica.status();
                        Ok((
                            status.node_id as i32,
                            replica.leader_epoch(),
                            replica.high_watermark().0,
                            progress
                                .into_iter()
                                .map(|r| {
                                    (
                                        r.node as i32,
                                        r.log_end.map_or(UNKNOWN, |o| o.0),
                                        at(r.heard_at),
                                        at(r.caught_up_at),
                                    )
                                })
                                .collect(),
                        ))
                    })
                    .await
                    .and_then(|r| r)
                }
            };
            let part = PartitionData::default().with_partition_index(p);
            parts.push(match answer {
                Ok((leader, epoch, hw, replicas)) => part
                    .with_error_code(req.error_code(NONE))
                    .with_leader_id(BrokerId(leader))
                    .with_leader_epoch(epoch)
                    .with_high_watermark(hw)
                    .with_current_voters(
                        replicas
                            .into_iter()
                            .map(|(id, leo, fetched, caught_up)| {
                                let s = ReplicaState::default()
                                    .with_replica_id(BrokerId(id))
                                    .with_log_end_offset(leo);
                                if req.version >= 1 {
                                    s.with_last_fetch_timestamp(fetched)
                                        .with_last_caught_up_timestamp(caught_up)
                                } else {
                                    s
                                }
                            })
                            .collect(),
                    ),
                Err(c) => part
                    .with_error_code(req.error_code(c))
                    .with_leader_id(BrokerId(-1))
                    .with_leader_epoch(-1)
                    .with_high_watermark(UNKNOWN),
            });
        }
        topics.push(
            TopicData::default()
                .with_topic_name(t.topic_name)
                .with_partitions(parts),
        );
    }
    req.respond(
        &DescribeQuorumResponse::default()
            .with_error_code(req.error_code(NONE))
            .with_topics(topics),
    )
}
