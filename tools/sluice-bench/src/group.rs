//! A classic-protocol consumer group member (JoinGroup / SyncGroup / Heartbeat / OffsetCommit /
//! LeaveGroup) with the range assignor. Offsets are committed every heartbeat and on exit.

use crate::admin::{self, code, TopicInfo};
use crate::cli::StartFrom;
use crate::client::Conn;
use crate::consume::{self, FetchSpec};
use crate::report::Stats;
use anyhow::{bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition as AssignedTopic;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    ConsumerProtocolAssignment, ConsumerProtocolSubscription, FindCoordinatorRequest, GroupId,
    HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, OffsetCommitRequest, OffsetFetchRequest,
    SyncGroupRequest, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

const SESSION_TIMEOUT_MS: i32 = 30_000;
const REBALANCE_TIMEOUT_MS: i32 = 30_000;
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);
/// The embedded consumer protocol version we write (v0: topics + user data).
const CONSUMER_PROTOCOL_VERSION: i16 = 0;

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

/// Range assignor (Kafka's `RangeAssignor`): members sorted by id, each takes a contiguous run of
/// the sorted partitions; the first `partitions % members` members take one extra.
pub fn range_assign(members: &[String], partitions: &[i32]) -> BTreeMap<String, Vec<i32>> {
    let mut ms: Vec<&String> = members.iter().collect();
    ms.sort();
    let mut ps = partitions.to_vec();
    ps.sort_unstable();
    let (per, extra) = (ps.len() / ms.len().max(1), ps.len() % ms.len().max(1));
    let mut out = BTreeMap::new();
    let mut at = 0;
    for (i, m) in ms.into_iter().enumerate() {
        let n = per + usize::from(i < extra);
        out.insert(m.clone(), ps[at..at + n].to_vec());
        at += n;
    }
    out
}

fn encode_versioned<T: Encodable>(v: &T) -> Result<Bytes> {
    let mut b = BytesMut::new();
    b.put_i16(CONSUMER_PROTOCOL_VERSION);
    v.encode(&mut b, CONSUMER_PROTOCOL_VERSION)?;
    Ok(b.freeze())
}

fn decode_versioned<T: Decodable + Default>(mut b: Bytes) -> Result<T> {
    if b.is_empty() {
        return Ok(T::default());
    }
    if b.len() < 2 {
        bail!("consumer protocol payload too short");
    }
    let v = b.get_i16();
    T::decode(&mut b, v.clamp(0, 3))
}

/// Finds the group coordinator's address through `conn`.
pub async fn find_coordinator(conn: &mut Conn, group: &str) -> Result<String> {
    for _ in 0..50 {
        let v = conn.versions.pick::<FindCoordinatorRequest>(None)?;
        let mut req = FindCoordinatorRequest::default().with_key_type(0);
        req = if v >= 4 {
            req.with_coordinator_keys(vec![s(group)])
        } else {
            req.with_key(s(group))
        };
        let r = conn.call_at(&req, v).await.context("FindCoordinator")?;
        let (err, host, port) = match r.coordinators.first() {
            Some(c) if v >= 4 => (c.error_code, c.host.to_string(), c.port),
            _ => (r.error_code, r.host.to_string(), r.port),
        };
        match err {
            code::NONE => return Ok(format!("{host}:{port}")),
            code::COORDINATOR_NOT_AVAILABLE | code::COORDINATOR_LOAD_IN_PROGRESS => {
                glommio::timer::sleep(Duration::from_millis(200)).await
            }
            e => bail!("FindCoordinator for group {group} failed with error code {e}"),
        }
    }
    bail!("no coordinator for group {group} after 10 s")
}

struct Membership {
    generation: i32,
    member_id: String,
    partitions: Vec<i32>,
}

async fn join(
    coord: &mut Conn,
    group: &str,
    topic: &TopicInfo,
    member_id: &str,
) -> Result<Membership> {
    let sub = ConsumerProtocolSubscription::default().with_topics(vec![s(&topic.name)]);
    let mut member_id = member_id.to_string();
    for _ in 0..20 {
        let req = JoinGroupRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_session_timeout_ms(SESSION_TIMEOUT_MS)
            .with_rebalance_timeout_ms(REBALANCE_TIMEOUT_MS)
            .with_member_id(s(&member_id))
            .with_protocol_type(s("consumer"))
            .with_protocols(vec![JoinGroupRequestProtocol::default()
                .with_name(s("range"))
                .with_metadata(encode_versioned(&sub)?)]);
        let r = coord.call(&req, None).await.context("JoinGroup")?;
        match r.error_code {
            code::NONE => {}
            code::MEMBER_ID_REQUIRED => {
                member_id = r.member_id.to_string();
                continue;
            }
            code::UNKNOWN_MEMBER_ID => {
                member_id.clear();
                continue;
            }
            code::REBALANCE_IN_PROGRESS | code::COORDINATOR_LOAD_IN_PROGRESS => {
                glommio::timer::sleep(Duration::from_millis(200)).await;
                continue;
            }
            e => bail!("JoinGroup {group} failed with error code {e}"),
        }
        member_id = r.member_id.to_string();
        let mut assignments = vec![];
        if r.leader.as_str() == member_id {
            let ids: Vec<String> = r.members.iter().map(|m| m.member_id.to_string()).collect();
            let parts: Vec<i32> = topic.partitions.iter().map(|p| p.index).collect();
            for (m, ps) in range_assign(&ids, &parts) {
                let a = ConsumerProtocolAssignment::default().with_assigned_partitions(vec![
                    AssignedTopic::default()
                        .with_topic(TopicName(s(&topic.name)))
                        .with_partitions(ps),
                ]);
                assignments.push(
                    SyncGroupRequestAssignment::default()
                        .with_member_id(s(&m))
                        .with_assignment(encode_versioned(&a)?),
                );
            }
        }
        let sync = SyncGroupRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_generation_id(r.generation_id)
            .with_member_id(s(&member_id))
            .with_protocol_type(Some(s("consumer")))
            .with_protocol_name(Some(s("range")))
            .with_assignments(assignments);
        let sr = coord.call(&sync, None).await.context("SyncGroup")?;
        match sr.error_code {
            code::NONE => {}
            code::REBALANCE_IN_PROGRESS | code::ILLEGAL_GENERATION => continue,
            e => bail!("SyncGroup {group} failed with error code {e}"),
        }
        let a: ConsumerProtocolAssignment = decode_versioned(sr.assignment)?;
        let partitions = a
            .assigned_partitions
            .iter()
            .filter(|t| t.topic.as_str() == topic.name)
            .flat_map(|t| t.partitions.iter().copied())
            .collect();
        return Ok(Membership {
            generation: r.generation_id,
            member_id,
            partitions,
        });
    }
    bail!("could not join group {group} after 20 attempts")
}

async fn committed(
    coord: &mut Conn,
    group: &str,
    topic: &str,
    parts: &[i32],
) -> Result<BTreeMap<i32, i64>> {
    let req = OffsetFetchRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_topics(Some(vec![OffsetFetchRequestTopic::default()
            .with_name(TopicName(s(topic)))
            .with_partition_indexes(parts.to_vec())]));
    let r = coord.call(&req, Some(7)).await.context("OffsetFetch")?;
    if r.error_code != code::NONE {
        bail!(
            "OffsetFetch for group {group} failed with error code {}",
            r.error_code
        );
    }
    let mut out = BTreeMap::new();
    for t in &r.topics {
        for p in &t.partitions {
            if p.error_code == code::NONE && p.committed_offset >= 0 {
                out.insert(p.partition_index, p.committed_offset);
            }
        }
    }
    Ok(out)
}

async fn commit(
    coord: &mut Conn,
    group: &str,
    m: &Membership,
    topic: &str,
    offsets: &BTreeMap<i32, i64>,
) -> Result<i16> {
    if offsets.is_empty() {
        return Ok(code::NONE);
    }
    let req = OffsetCommitRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_generation_id_or_member_epoch(m.generation)
        .with_member_id(s(&m.member_id))
        .with_topics(vec![OffsetCommitRequestTopic::default()
            .with_name(TopicName(s(topic)))
            .with_partitions(
                offsets
                    .iter()
                    .map(|(&p, &o)| {
                        OffsetCommitRequestPartition::default()
                            .with_partition_index(p)
                            .with_committed_offset(o)
                    })
                    .collect(),
            )]);
    let r = coord.call(&req, Some(9)).await.context("OffsetCommit")?;
    Ok(r.topics
        .iter()
        .flat_map(|t| t.partitions.iter())
        .map(|p| p.error_code)
        .find(|&e| e != code::NONE)
        .unwrap_or(code::NONE))
}

async fn heartbeat(coord: &mut Conn, group: &str, m: &Membership) -> Result<i16> {
    let req = HeartbeatRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_generation_id(m.generation)
        .with_member_id(s(&m.member_id));
    Ok(coord
        .call(&req, None)
        .await
        .context("Heartbeat")?
        .error_code)
}

async fn leave(coord: &mut Conn, group: &str, member_id: &str) -> Result<()> {
    let v = coord.versions.pick::<LeaveGroupRequest>(None)?;
    let mut req = LeaveGroupRequest::default().with_group_id(GroupId(s(group)));
    req = if v >= 3 {
        req.with_members(vec![MemberIdentity::default().with_member_id(s(member_id))])
    } else {
        req.with_member_id(s(member_id))
    };
    coord.call_at(&req, v).await.context("LeaveGroup")?;
    Ok(())
}

/// Runs one group member until the run stops: join, fetch its assigned partitions (all must be
/// led by one broker: the first partition's leader), heartbeat and commit, rejoin on rebalance.
pub async fn run_member(
    brokers: String,
    group: String,
    topic: TopicInfo,
    from: StartFrom,
    spec: FetchSpec,
    stats: Arc<Stats>,
    connect_timeout: Duration,
) -> Result<()> {
    let mut boot = admin::bootstrap(&brokers, connect_timeout).await?;
    let coord_addr = find_coordinator(&mut boot, &group).await?;
    drop(boot);
    let coord = Rc::new(RefCell::new(
        Conn::connect(&coord_addr, connect_timeout).await?,
    ));
    let mut member_id = String::new();
    let mut fetchers: BTreeMap<String, Conn> = BTreeMap::new();
    while !stats.stopped() {
        let m = join(&mut coord.borrow_mut(), &group, &topic, &member_id).await?;
        member_id = m.member_id.clone();
        if m.partitions.is_empty() {
            // More members than partitions: idle until the next rebalance.
            let code = heartbeat(&mut coord.borrow_mut(), &group, &m).await?;
            if code == code::NONE {
                glommio::timer::sleep(HEARTBEAT_INTERVAL).await;
            }
            continue;
        }
        let leader = topic
            .partitions
            .iter()
            .find(|p| p.index == m.partitions[0])
            .map(|p| p.leader.clone())
            .context("assigned partition not in topic metadata")?;
        let mut start =
            committed(&mut coord.borrow_mut(), &group, &topic.name, &m.partitions).await?;
        if !fetchers.contains_key(&leader) {
            fetchers.insert(
                leader.clone(),
                Conn::connect(&leader, connect_timeout).await?,
            );
        }
        let conn = fetchers.get_mut(&leader).expect("inserted above");
        let missing: Vec<i32> = m
            .partitions
            .iter()
            .copied()
            .filter(|p| !start.contains_key(p))
            .collect();
        if !missing.is_empty() {
            let ts = if from == StartFrom::Earliest { -2 } else { -1 };
            start.extend(admin::list_offsets(conn, &topic.name, &missing, ts).await?);
        }
        let offsets = Rc::new(RefCell::new(start));
        let rejoin = Rc::new(Cell::new(false));
        let done = Rc::new(Cell::new(false));
        let m = Rc::new(m);
        let hb = {
            let (coord, offsets, rejoin, done, m, group, topic_name, stats) = (
                coord.clone(),
                offsets.clone(),
                rejoin.clone(),
                done.clone(),
                m.clone(),
                group.clone(),
                topic.name.clone(),
                stats.clone(),
            );
            glommio::spawn_local(async move {
                let mut waited = Duration::ZERO;
                while !done.get() && !stats.stopped() {
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                    waited += Duration::from_millis(100);
                    if waited < HEARTBEAT_INTERVAL {
                        continue;
                    }
                    waited = Duration::ZERO;
                    let mut c = coord.borrow_mut();
                    let snapshot = offsets.borrow().clone();
                    let e1 = commit(&mut c, &group, &m, &topic_name, &snapshot).await?;
                    let e2 = heartbeat(&mut c, &group, &m).await?;
                    if e1 != code::NONE || e2 != code::NONE {
                        rejoin.set(true);
                        return Ok::<(), anyhow::Error>(());
                    }
                }
                Ok(())
            })
        };
        let r = consume::fetch_loop(conn, &spec, &offsets, &stats, Some(&rejoin)).await;
        done.set(true);
        hb.await?;
        r?;
        if !rejoin.get() {
            let snapshot = offsets.borrow().clone();
            commit(&mut coord.borrow_mut(), &group, &m, &topic.name, &snapshot).await?;
        }
    }
    if !member_id.is_empty() {
        leave(&mut coord.borrow_mut(), &group, &member_id).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_assignor_gives_contiguous_runs_extra_to_first_members() {
        // Kafka RangeAssignor javadoc example: 3 partitions, 2 consumers → [0,1] and [2].
        let a = range_assign(&["c2".into(), "c1".into()], &[2, 0, 1]);
        assert_eq!(a["c1"], vec![0, 1]);
        assert_eq!(a["c2"], vec![2]);
        let b = range_assign(&["a".into(), "b".into(), "c".into()], &[0, 1]);
        assert_eq!((b["a"].len(), b["b"].len(), b["c"].len()), (1, 1, 0));
    }

    #[test]
    fn consumer_protocol_payloads_round_trip() {
        let a = ConsumerProtocolAssignment::default().with_assigned_partitions(vec![
            AssignedTopic::default()
                .with_topic(TopicName(s("t")))
                .with_partitions(vec![0, 3]),
        ]);
        let back: ConsumerProtocolAssignment =
            decode_versioned(encode_versioned(&a).unwrap()).unwrap();
        assert_eq!(back, a);
    }
}
