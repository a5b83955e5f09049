//! A classic-protocol consumer group member (JoinGroup / SyncGroup / Heartbeat / OffsetCommit /
//! LeaveGroup) with the range assignor. Offsets are committed every heartbeat and on exit.

use crate::cli::StartFrom;
use crate::consume::{self, FetchSpec};
use crate::report::Stats;
use crate::setup::{self, Conn, TopicInfo};
use anyhow::{bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition as AssignedTopic;
use kafka_protocol::messages::{
    ConsumerProtocolAssignment, ConsumerProtocolSubscription, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use sluice_client::error::code;
use sluice_client::group::{self as kgroup, range_assign, JoinTimeouts};
use sluice_client::{admin, check};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

const TIMEOUTS: JoinTimeouts = JoinTimeouts {
    session_ms: 30_000,
    rebalance_ms: 30_000,
};
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);
/// The embedded consumer protocol version we write (v0: topics + user data).
const CONSUMER_PROTOCOL_VERSION: i16 = 0;

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
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

/// Finds the group coordinator's address through `conn`, waiting while it loads.
pub async fn find_coordinator(conn: &mut Conn, group: &str) -> Result<String> {
    for _ in 0..50 {
        let (err, addr) = kgroup::find_coordinator(conn, group).await?;
        match err {
            code::NONE => return Ok(addr),
            code::COORDINATOR_NOT_AVAILABLE | code::COORDINATOR_LOAD_IN_PROGRESS => {
                glommio::timer::sleep(Duration::from_millis(200)).await
            }
            e => check(e, &format!("FindCoordinator for group {group}"), None)?,
        }
    }
    bail!("no coordinator for group {group} after 10 s")
}

/// One member's place in a generation of its group.
pub struct Membership {
    pub generation: i32,
    pub member_id: String,
    pub partitions: Vec<i32>,
}

/// Joins `group` (subscribed to `topic`) and syncs: the generation and this member's
/// partitions.
pub async fn join(
    coord: &mut Conn,
    group: &str,
    topic: &TopicInfo,
    member_id: &str,
) -> Result<Membership> {
    let sub = ConsumerProtocolSubscription::default().with_topics(vec![s(&topic.name)]);
    let mut member_id = member_id.to_string();
    for _ in 0..20 {
        let r =
            kgroup::join_group(coord, group, &member_id, TIMEOUTS, encode_versioned(&sub)?).await?;
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
            e => check(e, &format!("JoinGroup {group}"), None)?,
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
                assignments.push((m, encode_versioned(&a)?));
            }
        }
        let sr = kgroup::sync_group(coord, group, r.generation_id, &member_id, assignments).await?;
        match sr.error_code {
            code::NONE => {}
            code::REBALANCE_IN_PROGRESS | code::ILLEGAL_GENERATION => continue,
            e => check(e, &format!("SyncGroup {group}"), None)?,
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

/// Committed offsets of `parts` (those with one).
pub async fn committed(
    coord: &mut Conn,
    group: &str,
    topic: &str,
    parts: &[i32],
) -> Result<BTreeMap<i32, i64>> {
    let all = admin::committed(
        coord,
        group,
        Some(vec![(topic.to_string(), parts.to_vec())]),
    )
    .await?;
    Ok(all
        .into_iter()
        .filter(|((t, _), o)| t == topic && *o >= 0)
        .map(|((_, p), o)| (p, o))
        .collect())
}

/// Commits `offsets`; returns the first error code of a partition (NONE if all committed).
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
    let codes = kgroup::commit(
        coord,
        group,
        m.generation,
        &m.member_id,
        topic,
        offsets.iter().map(|(&p, &o)| (p, o)),
    )
    .await?;
    Ok(codes
        .into_iter()
        .map(|(_, e)| e)
        .find(|&e| e != code::NONE)
        .unwrap_or(code::NONE))
}

pub async fn heartbeat(coord: &mut Conn, group: &str, m: &Membership) -> Result<i16> {
    kgroup::heartbeat(coord, group, m.generation, &m.member_id).await
}

/// Runs one group member until the run stops: join, fetch its assigned partitions (one fetch
/// loop per leader among them), heartbeat and commit, rejoin on rebalance.
pub async fn run_member(
    brokers: String,
    group: String,
    topic: TopicInfo,
    from: StartFrom,
    spec: FetchSpec,
    stats: Arc<Stats>,
    connect_timeout: Duration,
) -> Result<()> {
    let mut boot = setup::bootstrap(&brokers, connect_timeout).await?;
    let coord_addr = find_coordinator(&mut boot, &group).await?;
    drop(boot);
    // Used by this loop between rounds and by the round's heartbeat task while it runs: moved
    // into that task and handed back when it ends.
    let mut coord = setup::connect(&coord_addr, connect_timeout).await?;
    let mut member_id = String::new();
    let mut fetchers: BTreeMap<String, Conn> = BTreeMap::new();
    while !stats.stopped() {
        let m = join(&mut coord, &group, &topic, &member_id).await?;
        member_id = m.member_id.clone();
        if m.partitions.is_empty() {
            // More members than partitions: idle until the next rebalance.
            let code = heartbeat(&mut coord, &group, &m).await?;
            if code == code::NONE {
                glommio::timer::sleep(HEARTBEAT_INTERVAL).await;
            }
            continue;
        }
        // The assigned partitions grouped by their leader: one fetch connection and loop each.
        let mut by_leader: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for &p in &m.partitions {
            let leader = topic
                .partitions
                .iter()
                .find(|i| i.index == p)
                .map(|i| i.leader.clone())
                .context("assigned partition not in topic metadata")?;
            by_leader.entry(leader).or_default().push(p);
        }
        let committed_at = committed(&mut coord, &group, &topic.name, &m.partitions).await?;
        let mut lanes = vec![];
        for (leader, parts) in by_leader {
            if !fetchers.contains_key(&leader) {
                fetchers.insert(
                    leader.clone(),
                    setup::connect(&leader, connect_timeout).await?,
                );
            }
            let conn = fetchers.get_mut(&leader).expect("inserted above");
            let mut start: BTreeMap<i32, i64> = parts
                .iter()
                .filter_map(|p| committed_at.get(p).map(|&o| (*p, o)))
                .collect();
            let missing: Vec<i32> = parts
                .iter()
                .copied()
                .filter(|p| !start.contains_key(p))
                .collect();
            if !missing.is_empty() {
                let ts = if from == StartFrom::Earliest { -2 } else { -1 };
                start.extend(admin::offsets(conn, &topic.name, &missing, ts).await?);
            }
            lanes.push((leader, Rc::new(RefCell::new(start))));
        }
        let all_offsets: Vec<Rc<RefCell<BTreeMap<i32, i64>>>> =
            lanes.iter().map(|(_, o)| o.clone()).collect();
        let merged = move || {
            let mut all = BTreeMap::new();
            for o in &all_offsets {
                all.extend(o.borrow().iter().map(|(&p, &o)| (p, o)));
            }
            all
        };
        let rejoin = Rc::new(Cell::new(false));
        let done = Rc::new(Cell::new(false));
        let m = Rc::new(m);
        let hb = {
            let (mut coord, merged, rejoin, done, m, group, topic_name, stats) = (
                coord,
                merged.clone(),
                rejoin.clone(),
                done.clone(),
                m.clone(),
                group.clone(),
                topic.name.clone(),
                stats.clone(),
            );
            glommio::spawn_local(async move {
                let beats = async {
                    let mut waited = Duration::ZERO;
                    while !done.get() && !stats.stopped() {
                        glommio::timer::sleep(Duration::from_millis(100)).await;
                        waited += Duration::from_millis(100);
                        if waited < HEARTBEAT_INTERVAL {
                            continue;
                        }
                        waited = Duration::ZERO;
                        let snapshot = merged();
                        let e1 = commit(&mut coord, &group, &m, &topic_name, &snapshot).await?;
                        let e2 = heartbeat(&mut coord, &group, &m).await?;
                        if e1 != code::NONE || e2 != code::NONE {
                            rejoin.set(true);
                            return Ok::<(), anyhow::Error>(());
                        }
                    }
                    Ok(())
                };
                let r = beats.await;
                (coord, r)
            })
        };
        // Each lane owns its connection while it runs and hands it back when it ends.
        let mut loops = vec![];
        for (leader, offsets) in lanes {
            let mut conn = fetchers.remove(&leader).expect("connected above");
            let (spec, stats, rejoin) = (spec.clone(), stats.clone(), rejoin.clone());
            loops.push(glommio::spawn_local(async move {
                let r =
                    consume::fetch_loop(&mut conn, &spec, &offsets, &stats, Some(&rejoin)).await;
                if r.is_err() {
                    // A failed lane ends the others too, through a rejoin.
                    rejoin.set(true);
                }
                (leader, conn, r)
            }));
        }
        let mut first_err = None;
        for l in loops {
            let (leader, conn, r) = l.await;
            fetchers.insert(leader, conn);
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        done.set(true);
        let (back, beats) = hb.await;
        coord = back;
        beats?;
        if let Some(e) = first_err {
            return Err(e);
        }
        if !rejoin.get() {
            let snapshot = merged();
            commit(&mut coord, &group, &m, &topic.name, &snapshot).await?;
        }
    }
    if !member_id.is_empty() {
        kgroup::leave_group(&mut coord, &group, &member_id).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
