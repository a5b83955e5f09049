//! Classic consumer-group membership (JoinGroup / SyncGroup / Heartbeat / OffsetCommit /
//! LeaveGroup, FindCoordinator) and the range assignor. The calls return the broker's error
//! codes: members react to them (rejoin, retry) rather than fail.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite};
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    FindCoordinatorRequest, GroupId, HeartbeatRequest, JoinGroupRequest, JoinGroupResponse,
    LeaveGroupRequest, OffsetCommitRequest, SyncGroupRequest, SyncGroupResponse, TopicName,
};

use crate::admin::s;
use crate::Connection;

/// The protocol type of consumer groups, and the one assignor the tools offer.
pub const PROTOCOL_TYPE: &str = "consumer";
pub const RANGE: &str = "range";

/// Range assignor (Kafka's `RangeAssignor`): members sorted by id, each takes a contiguous run
/// of the sorted partitions; the first `partitions % members` members take one extra.
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

/// FindCoordinator key types.
pub const KEY_TYPE_GROUP: i8 = 0;
pub const KEY_TYPE_TRANSACTION: i8 = 1;

/// The group coordinator: (error code, `host:port`).
pub async fn find_coordinator<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    group: &str,
) -> Result<(i16, String)> {
    find_coordinator_of(c, KEY_TYPE_GROUP, group).await
}

/// The coordinator of `key` of `key_type` ([`KEY_TYPE_GROUP`], [`KEY_TYPE_TRANSACTION`]):
/// (error code, `host:port`). Transaction keys need v1.
pub async fn find_coordinator_of<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    key_type: i8,
    key: &str,
) -> Result<(i16, String)> {
    let min = if key_type == KEY_TYPE_GROUP { 0 } else { 1 };
    let v = c
        .versions()
        .pick_in::<FindCoordinatorRequest>(min, i16::MAX)?;
    let mut req = FindCoordinatorRequest::default().with_key_type(key_type);
    // v4 batches keys.
    req = if v >= 4 {
        req.with_coordinator_keys(vec![s(key)])
    } else {
        req.with_key(s(key))
    };
    let r = c.call_at(&req, v).await.context("FindCoordinator")?;
    Ok(match r.coordinators.first() {
        Some(k) if v >= 4 => (k.error_code, format!("{}:{}", k.host.as_str(), k.port)),
        _ => (r.error_code, format!("{}:{}", r.host.as_str(), r.port)),
    })
}

/// Timeouts a member joins with.
#[derive(Debug, Clone, Copy)]
pub struct JoinTimeouts {
    pub session_ms: i32,
    pub rebalance_ms: i32,
}

/// JoinGroup with the range protocol and `metadata` (the encoded subscription). From v4 a new
/// member gets MEMBER_ID_REQUIRED and its id, and joins again with it.
pub async fn join_group<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    group: &str,
    member_id: &str,
    t: JoinTimeouts,
    metadata: Bytes,
) -> Result<JoinGroupResponse> {
    let req = JoinGroupRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_session_timeout_ms(t.session_ms)
        .with_rebalance_timeout_ms(t.rebalance_ms)
        .with_member_id(s(member_id))
        .with_protocol_type(s(PROTOCOL_TYPE))
        .with_protocols(vec![JoinGroupRequestProtocol::default()
            .with_name(s(RANGE))
            .with_metadata(metadata)]);
    let v = c.versions().pick_in::<JoinGroupRequest>(4, 9)?;
    c.call_at(&req, v).await.context("JoinGroup")
}

/// SyncGroup; the leader passes (member id, encoded assignment) for every member.
pub async fn sync_group<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    group: &str,
    generation: i32,
    member_id: &str,
    assignments: Vec<(String, Bytes)>,
) -> Result<SyncGroupResponse> {
    let req = SyncGroupRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_generation_id(generation)
        .with_member_id(s(member_id))
        .with_protocol_type(Some(s(PROTOCOL_TYPE)))
        .with_protocol_name(Some(s(RANGE)))
        .with_assignments(
            assignments
                .into_iter()
                .map(|(m, a)| {
                    SyncGroupRequestAssignment::default()
                        .with_member_id(s(&m))
                        .with_assignment(a)
                })
                .collect(),
        );
    let v = c.versions().pick_in::<SyncGroupRequest>(1, 5)?;
    c.call_at(&req, v).await.context("SyncGroup")
}

/// Heartbeat; returns the error code.
pub async fn heartbeat<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    group: &str,
    generation: i32,
    member_id: &str,
) -> Result<i16> {
    let req = HeartbeatRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_generation_id(generation)
        .with_member_id(s(member_id));
    let v = c.versions().pick_in::<HeartbeatRequest>(0, 4)?;
    Ok(c.call_at(&req, v).await.context("Heartbeat")?.error_code)
}

/// OffsetCommit of `(partition, offset)` pairs of one topic; returns (partition, error code)
/// pairs. Generation -1 and an empty member id commit for an empty group (offset resets).
pub async fn commit<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    group: &str,
    generation: i32,
    member_id: &str,
    topic: &str,
    offsets: impl IntoIterator<Item = (i32, i64)>,
) -> Result<Vec<(i32, i16)>> {
    let req = OffsetCommitRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_generation_id_or_member_epoch(generation)
        .with_member_id(s(member_id))
        .with_topics(vec![OffsetCommitRequestTopic::default()
            .with_name(TopicName(s(topic)))
            .with_partitions(
                offsets
                    .into_iter()
                    .map(|(p, o)| {
                        OffsetCommitRequestPartition::default()
                            .with_partition_index(p)
                            .with_committed_offset(o)
                    })
                    .collect(),
            )]);
    // v9 is the KIP-848 protocol's (member epochs).
    let v = c.versions().pick_in::<OffsetCommitRequest>(2, 8)?;
    let r = c.call_at(&req, v).await.context("OffsetCommit")?;
    Ok(r.topics
        .iter()
        .flat_map(|t| t.partitions.iter())
        .map(|p| (p.partition_index, p.error_code))
        .collect())
}

/// LeaveGroup of one member.
pub async fn leave_group<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    group: &str,
    member_id: &str,
) -> Result<()> {
    let v = c.versions().pick::<LeaveGroupRequest>(None)?;
    let mut req = LeaveGroupRequest::default().with_group_id(GroupId(s(group)));
    // v3 leaves a list of members.
    req = if v >= 3 {
        req.with_members(vec![MemberIdentity::default().with_member_id(s(member_id))])
    } else {
        req.with_member_id(s(member_id))
    };
    c.call_at(&req, v).await.context("LeaveGroup")?;
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
        assert_eq!(range_assign(&["a".into()], &[0, 1])["a"], vec![0, 1]);
    }
}
