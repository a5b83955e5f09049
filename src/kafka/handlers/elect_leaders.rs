//! ElectLeaders, versions 0-2 (flexible from 2; the election type from 1). Preferred elections
//! (type 0) hand a replicated partition's leadership to its preferred replica, the first of its
//! replicas, through raft's leader transfer: the preferred replica is brought up to date and
//! then campaigns at once, so nothing committed is lost and the pause is one election round
//! trip. Any node serves it, as any broker of a KRaft cluster takes the request to the
//! controller: the partition's leader transfers at once; another node (a follower, or a node
//! holding no replica) sends the transfer request to the leader it knows of over the partition
//! transport of the partition's shard, and watches the leadership it sees (its own replica's
//! view, or the leader reports in the metadata image) until the preferred replica leads,
//! asking again while it does not. Answered once the preferred replica leads or the request's
//! timeout passes. Unclean elections (type 1) are refused: raft elects only a replica holding
//! every committed record, so there is no unclean leader to choose.

use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::elect_leaders_response::{PartitionResult, ReplicaElectionResult};
use kafka_protocol::messages::{ElectLeadersRequest, ElectLeadersResponse, TopicName};
use kafka_protocol::ResponseError;

use super::common::{code, str_bytes, with_partition_replica, NONE};
use super::metadata::replicated_state;
use crate::kafka::{Request, Response};
use crate::shard;
use crate::types::{ErrorCode, ShardId};

/// The longest an election is waited for, whatever the request's timeout: a transfer takes an
/// election round trip once the preferred replica is caught up.
const ELECTION_WAIT_MAX: Duration = Duration::from_secs(30);

/// How often a node that does not lead the partition looks at the leadership it knows of
/// while a transfer it asked for is under way (an election takes tens of milliseconds).
const FORWARDED_POLL: Duration = Duration::from_millis(20);

/// How often such a node repeats its transfer request while the preferred replica does not
/// lead: the request travels as a raft message, which may be lost, and a leader gives up a
/// transfer that does not complete within an election timeout (1–1.4 s).
const FORWARDED_RESEND: Duration = Duration::from_millis(500);

/// Kafka's election types.
const PREFERRED: i8 = 0;

/// Elects the preferred replica of partition `p` of `topic`: on the partition's leader if this
/// node is it, else through the leader.
async fn elect_preferred(
    meta: &crate::metadata::TopicMeta,
    p: i32,
    wait: Duration,
) -> (ErrorCode, Option<String>) {
    match elect_preferred_here(meta, p, wait).await {
        (c, _) if c == code(ResponseError::NotLeaderOrFollower) => {
            elect_preferred_through_leader(meta, p, wait).await
        }
        r => r,
    }
}

/// On a node that does not lead partition `p`: the checks the leader would make, from the
/// leadership and ISR this node knows of, then the transfer request to the leader, repeated
/// until the preferred replica leads or `wait` passes.
async fn elect_preferred_through_leader(
    meta: &crate::metadata::TopicMeta,
    p: i32,
    wait: Duration,
) -> (ErrorCode, Option<String>) {
    let here = shard::local();
    let broker = here.broker.clone();
    let Some(&preferred) = meta.replica_nodes(p).first() else {
        return (code(ResponseError::UnknownTopicOrPartition), None);
    };
    let (Some(&group), Some(&k)) = (meta.groups.get(p as usize), meta.shards.get(p as usize))
    else {
        return (code(ResponseError::UnknownTopicOrPartition), None);
    };
    let shard_k = ShardId(k as usize);
    if shard_k.0 >= broker.shard_count() {
        // The partition's traffic flows between shard k of its replicas; this node has no
        // such shard to send the request from.
        return (
            code(ResponseError::NotLeaderOrFollower),
            Some(format!(
                "this node has no shard {k} to reach the partition's leader from; ask the leader"
            )),
        );
    }
    let name = meta.name.clone();
    let started = std::time::Instant::now();
    let mut asked: Option<std::time::Instant> = None;
    loop {
        let image = broker.image();
        let Some(meta) = image.topic(&name) else {
            return (code(ResponseError::UnknownTopicOrPartition), None);
        };
        let state = replicated_state(&broker, &image, meta, p);
        if state.leader == preferred {
            return match asked {
                Some(_) => (NONE, None),
                None => (code(ResponseError::ElectionNotNeeded), None),
            };
        }
        if image.fenced.contains(&preferred) || !state.isr.contains(&preferred) {
            return (
                code(ResponseError::PreferredLeaderNotAvailable),
                Some(format!("replica {preferred} is not live and in sync")),
            );
        }
        let leader_known = state.leader >= 0 && !image.fenced.contains(&state.leader);
        if leader_known && asked.is_none_or(|at| at.elapsed() >= FORWARDED_RESEND) {
            let (leader, to) = (state.leader as u64, preferred as u64);
            let sent = shard::invoke_on(shard_k, move || async move {
                shard::ask_leader_transfer(group, leader, to)
            })
            .await;
            if !sent {
                return (code(ResponseError::NotLeaderOrFollower), None);
            }
            asked = Some(std::time::Instant::now());
        }
        if started.elapsed() >= wait {
            return (
                code(ResponseError::RequestTimedOut),
                Some(format!("replica {preferred} did not take over in time")),
            );
        }
        here.clock.sleep(FORWARDED_POLL).await;
    }
}

/// Elects the preferred replica of partition `p` of `topic` on this node, if it leads the
/// partition (NOT_LEADER_OR_FOLLOWER otherwise).
async fn elect_preferred_here(
    meta: &crate::metadata::TopicMeta,
    p: i32,
    wait: Duration,
) -> (ErrorCode, Option<String>) {
    let Some(&preferred) = meta.replica_nodes(p).first() else {
        return (code(ResponseError::UnknownTopicOrPartition), None);
    };
    if meta.replication_factor() < 2 {
        return (code(ResponseError::ElectionNotNeeded), None);
    }
    let fenced = shard::local().broker.image().fenced.contains(&preferred);
    let voters: Vec<u64> = meta.replica_nodes(p).iter().map(|n| *n as u64).collect();
    let r = with_partition_replica(meta, p, move |_, replica| async move {
        let Some(replica) = replica else {
            return (code(ResponseError::ElectionNotNeeded), None);
        };
        let preferred = preferred as u64;
        if replica.leader() == Some(preferred) {
            return (code(ResponseError::ElectionNotNeeded), None);
        }
        let in_sync = replica
            .in_sync(&voters, shard::REPLICA_LAG_TIME_MAX)
            .unwrap_or_default();
        if fenced || !in_sync.contains(&preferred) {
            return (
                code(ResponseError::PreferredLeaderNotAvailable),
                Some(format!("replica {preferred} is not live and in sync")),
            );
        }
        let statuses = replica.watch();
        replica.group().transfer_leader(preferred);
        let led = futures_lite::future::or(
            async {
                while let Ok(s) = statuses.recv().await {
                    if s.leader_id == Some(preferred) {
                        return true;
                    }
                }
                false
            },
            async {
                shard::local().clock.sleep(wait).await;
                false
            },
        )
        .await;
        if led {
            (NONE, None)
        } else {
            (
                code(ResponseError::RequestTimedOut),
                Some(format!("replica {preferred} did not take over in time")),
            )
        }
    })
    .await;
    r.unwrap_or_else(|c| (c, None))
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: ElectLeadersRequest = crate::decode_or_close!(req, b);
    let image = shard::local().broker.image();
    let wait = Duration::from_millis(request.timeout_ms.max(0) as u64).min(ELECTION_WAIT_MAX);
    let election_type = if req.version >= 1 {
        request.election_type
    } else {
        PREFERRED
    };
    // Every replicated partition when the request names none (Kafka: all partitions).
    let asked: Vec<(TopicName, Vec<i32>)> = match request.topic_partitions {
        Some(tps) => tps.into_iter().map(|t| (t.topic, t.partitions)).collect(),
        None => image
            .topics
            .values()
            .filter(|t| t.replication_factor() > 1)
            .map(|t| {
                (
                    TopicName(str_bytes(&t.name)),
                    (0..t.partition_count()).collect(),
                )
            })
            .collect(),
    };
    let mut results = Vec::with_capacity(asked.len());
    for (topic, partitions) in asked {
        let meta = image.topic(topic.as_str()).cloned();
        let mut prs = Vec::with_capacity(partitions.len());
        for p in partitions {
            let (c, message) = match (&meta, election_type) {
                (_, t) if t != PREFERRED => (
                    code(ResponseError::InvalidRequest),
                    Some(
                        "unclean leader election is not supported: raft elects only a replica \
                         holding every committed record"
                            .to_string(),
                    ),
                ),
                (None, _) => (code(ResponseError::UnknownTopicOrPartition), None),
                (Some(m), _) if p < 0 || p >= m.partition_count() => {
                    (code(ResponseError::UnknownTopicOrPartition), None)
                }
                (Some(m), _) => elect_preferred(m, p, wait).await,
            };
            prs.push(
                PartitionResult::default()
                    .with_partition_id(p)
                    .with_error_code(req.error_code(c))
                    .with_error_message(message.map(|m| str_bytes(&m))),
            );
        }
        results.push(
            ReplicaElectionResult::default()
                .with_topic(topic)
                .with_partition_result(prs),
        );
    }
    req.respond(
        &ElectLeadersResponse::default()
            .with_error_code(req.error_code(NONE))
            .with_replica_election_results(results),
    )
}
