//! Mixed groups and online migration (KIP-848's "Online migration").
//!
//! A member that speaks the classic protocol (JoinGroup with protocol type `consumer`) may join
//! a consumer group: the consumer-group state machine serves it. Its subscription is read from
//! the ConsumerProtocol metadata of its JoinGroup, its owned partitions likewise (v1+), and it
//! converges to its target like any member, one JoinGroup at a time:
//!
//! ```text
//!  JoinGroup ──▶ subscription, owned partitions ──▶ reconcile ──▶ generation := member epoch
//!  SyncGroup ──▶ the member's assigned partitions, as a ConsumerProtocol assignment
//!  Heartbeat ──▶ REBALANCE_IN_PROGRESS while the group epoch is ahead of the member's epoch,
//!                it must revoke, or a partition it waits for became free: it rejoins
//!  LeaveGroup ─▶ removed like a consumer-protocol member leaving
//! ```
//!
//! A classic group with members becomes a consumer group when a consumer-protocol member joins
//! (policy `upgrade`/`bidirectional`, group Stable): each classic member keeps its current
//! assignment at the group's generation, and the new member's join starts a new epoch. A
//! consumer group whose last consumer-protocol member leaves, with classic members left, goes
//! back to a classic group (policy `downgrade`/`bidirectional`) and rebalances.

use bytes::Bytes;

use super::*;
use crate::group::coordinator::{self, JoinRequest, SyncRequest};
use crate::group::state::{JoinResult, Member, Protocol, Reply, SyncResult};

/// The classic side of a member in a consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassicInfo {
    /// The session timeout of its JoinGroup (a classic member's own).
    pub session_timeout_ms: i32,
    /// The protocols (name, ConsumerProtocol subscription) of its last JoinGroup.
    pub protocols: Vec<Protocol>,
}

impl ClassicInfo {
    /// The protocol a consumer group answers a classic member with: its first (preferred).
    fn protocol_name(&self) -> Option<String> {
        self.protocols.first().map(|p| p.name.clone())
    }

    /// The ConsumerProtocol version of its subscription: its assignment is encoded with it.
    fn version(&self) -> i16 {
        self.protocols
            .first()
            .and_then(|p| offsets::decode_subscription(&p.metadata))
            .map_or(0, |s| s.version)
    }
}

/// Queues the records of one call into a consumer group: group epoch first, then members'
/// metadata, the target assignment (members' targets, then its epoch), current assignments,
/// then tombstones (replay applies them in that order).
pub(super) fn queue_changes(
    writes: &mut Vec<Write>,
    gid: &str,
    cg: &ConsumerGroup,
    ch: &Changes,
    partition: i32,
) {
    if ch.epoch_bumped {
        writes.push(epoch_record(gid, cg.epoch, partition));
    }
    for id in &ch.member_meta {
        if let Some(m) = cg.members.get(id) {
            writes.push(member_record(gid, m, partition));
        }
    }
    if ch.target {
        writes.extend(target_records(gid, cg, partition));
    }
    for id in &ch.member_assignment {
        if let Some(m) = cg.members.get(id) {
            writes.push(assignment_record(gid, m, partition));
        }
    }
    for id in &ch.removed {
        writes.extend(member_tombstones(gid, id, partition));
    }
}

/// Partitions by topic name → by topic id; topics that do not exist are dropped.
fn by_id(named: &[(String, Vec<i32>)], topics: &dyn Topics) -> Assignment {
    let mut a = Assignment::new();
    for (t, ps) in named {
        if let Some((id, n)) = topics.by_name(t) {
            for p in ps.iter().filter(|p| (0..n).contains(*p)) {
                insert(&mut a, id, *p);
            }
        }
    }
    a
}

/// Partitions by topic id → by name (sorted by name), for a ConsumerProtocol assignment.
fn by_name(a: &Assignment, topics: &dyn Topics) -> Vec<(String, Vec<i32>)> {
    let mut out: Vec<(String, Vec<i32>)> = a
        .iter()
        .filter_map(|(t, ps)| {
            topics
                .by_id(t)
                .map(|(name, _)| (name, ps.iter().copied().collect()))
        })
        .collect();
    out.sort();
    out
}

/// The partitions of `member_id`'s target no other member holds any more (it may take them
/// on its next join).
fn released_partitions_waiting(cg: &ConsumerGroup, member_id: &str) -> bool {
    let Some(m) = cg.members.get(member_id) else {
        return false;
    };
    let Some(target) = cg.target.get(member_id) else {
        return false;
    };
    target.iter().any(|(t, ps)| {
        ps.iter().any(|p| {
            !m.assigned.get(t).is_some_and(|q| q.contains(p))
                && !cg.members.values().any(|o| {
                    o.id != member_id
                        && (o.assigned.get(t).is_some_and(|q| q.contains(p))
                            || o.revoking.get(t).is_some_and(|q| q.contains(p)))
                })
        })
    })
}

fn join_error(code: E, member_id: &str) -> Reply<JoinResult> {
    Reply::Now(JoinResult::error(ErrorCode::new(code), member_id))
}

impl Coordinator {
    /// JoinGroup from a classic member into a consumer group with members.
    pub(in crate::group) fn classic_join(
        &mut self,
        req: JoinRequest,
        topics: &dyn Topics,
        now_ms: i64,
    ) -> Reply<JoinResult> {
        let cfg = self.config.consumer.clone();
        let partition = self.partition_of(&req.group_id);
        if req.protocol_type != "consumer" || req.protocols.is_empty() {
            return join_error(E::InconsistentGroupProtocol, &req.member_id);
        }
        // The subscription of the first protocol (they all carry the same topics).
        let Some(sub) = offsets::decode_subscription(&req.protocols[0].metadata) else {
            tracing::debug!(group = %req.group_id, metadata = ?req.protocols[0].metadata,
                "classic member's subscription does not parse");
            return join_error(E::InconsistentGroupProtocol, &req.member_id);
        };
        if sub.topics.len() > SUBSCRIBED_TOPICS_MAX {
            return join_error(E::InvalidRequest, &req.member_id);
        }
        let Some(group) = self.groups.get_mut(&req.group_id) else {
            return join_error(E::UnknownMemberId, &req.member_id);
        };
        let Some(cg) = group.consumer.as_mut() else {
            return join_error(E::UnknownMemberId, &req.member_id);
        };
        let mut ch = Changes::new();
        let member_id = if req.member_id.is_empty() {
            let id = fresh_member_id();
            if req.group_instance_id.is_none() && req.require_known_member_id {
                // KIP-394: the member comes back with this id.
                return join_error(E::MemberIdRequired, &id);
            }
            id
        } else {
            req.member_id.clone()
        };
        if let Some(inst) = &req.group_instance_id {
            if let Some(old) = cg.static_members.get(inst).cloned() {
                if old != member_id {
                    if !req.member_id.is_empty() {
                        return join_error(E::FencedInstanceId, &req.member_id);
                    }
                    // The instance comes back under a new member id: it takes over its
                    // predecessor's partitions and epoch.
                    if let Some(mut m) = cg.members.remove(&old) {
                        if let Some(t) = cg.target.remove(&old) {
                            cg.target.insert(member_id.clone(), t);
                        }
                        ch.target = true;
                        ch.removed.push(old.clone());
                        m.id = member_id.clone();
                        m.left_static = false;
                        cg.members.insert(member_id.clone(), m);
                        ch.member_meta.insert(member_id.clone());
                        ch.member_assignment.insert(member_id.clone());
                    }
                    cg.static_members.insert(inst.clone(), member_id.clone());
                }
            }
        }
        match cg.members.get(&member_id) {
            Some(m) if m.classic.is_none() => {
                // The id belongs to a consumer-protocol member.
                return join_error(E::UnknownMemberId, &member_id);
            }
            Some(_) => {}
            None => {
                if cg.members.len() >= cfg.max_size {
                    return join_error(E::GroupMaxSizeReached, &member_id);
                }
                let mut m = ConsumerMember::new(member_id.clone());
                m.instance_id = req.group_instance_id.clone();
                if let Some(i) = &req.group_instance_id {
                    cg.static_members.insert(i.clone(), member_id.clone());
                }
                cg.members.insert(member_id.clone(), m);
                ch.member_meta.insert(member_id.clone());
                ch.member_assignment.insert(member_id.clone());
                bump(cg, &mut ch);
            }
        }
        let m = cg.members.get_mut(&member_id).expect("present");
        let info = ClassicInfo {
            session_timeout_ms: req.session_timeout_ms,
            protocols: req.protocols,
        };
        let mut names = sub.topics;
        names.sort();
        names.dedup();
        let sub_changed = names != m.subscribed_names || m.subscribed_regex.is_some();
        let meta_changed = m.classic.as_ref() != Some(&info)
            || m.rebalance_timeout_ms != req.rebalance_timeout_ms
            || m.client_id != req.client_id
            || m.client_host != req.client_host
            || (sub.rack_id.is_some() && m.rack_id != sub.rack_id);
        m.subscribed_names = names;
        m.subscribed_regex = None;
        m.classic = Some(info);
        m.rebalance_timeout_ms = req.rebalance_timeout_ms;
        m.client_id = req.client_id;
        m.client_host = req.client_host;
        if sub.rack_id.is_some() {
            m.rack_id = sub.rack_id;
        }
        m.left_static = false;
        m.session_deadline_ms = now_ms + req.session_timeout_ms as i64;
        if sub_changed || meta_changed {
            ch.member_meta.insert(member_id.clone());
        }
        if sub_changed {
            bump(cg, &mut ch);
        }
        // What the member owns: it revoked everything else before rejoining.
        let owned = by_id(&sub.owned.unwrap_or_default(), topics);
        refresh_metadata(cg, topics, &mut ch);
        if cg.assignment_epoch < cg.epoch {
            compute_target(cg, &cfg, topics, &mut ch);
        }
        reconcile(cg, &member_id, Some(&owned), now_ms, &mut ch);
        let m = cg.members.get_mut(&member_id).expect("present");
        if m.state != MemberState::UnrevokedPartitions {
            // The rejoin it was asked for happened.
            m.revocation_deadline_ms = None;
        }
        m.send_assignment = false;
        let result = JoinResult {
            error: ErrorCode::NONE,
            generation: m.epoch,
            protocol_type: Some("consumer".into()),
            protocol_name: m.classic.as_ref().and_then(ClassicInfo::protocol_name),
            // No member leads: the assignment is computed here, every member syncs empty.
            leader: String::new(),
            member_id: member_id.clone(),
            skip_assignment: false,
            members: vec![],
        };
        tracing::debug!(group = %req.group_id, member = %member_id, generation = result.generation,
            state = ?cg.members[&member_id].state, assigned = ?cg.members[&member_id].assigned,
            owned = ?owned, "classic member joined a consumer group");
        queue_changes(&mut self.writes, &req.group_id, cg, &ch, partition);
        if group.state != GroupState::Stable {
            group.transition(GroupState::Stable, now_ms);
        }
        Reply::Now(result)
    }

    /// SyncGroup from a classic member of a consumer group: its assigned partitions.
    pub(in crate::group) fn classic_sync(
        &mut self,
        req: &SyncRequest,
        topics: &dyn Topics,
        now_ms: i64,
    ) -> SyncResult {
        let err = |code: E| SyncResult::error(ErrorCode::new(code));
        let Some(cg) = self
            .groups
            .get_mut(&req.group_id)
            .and_then(|g| g.consumer.as_mut())
        else {
            return err(E::UnknownMemberId);
        };
        let m = match classic_member(cg, &req.member_id, req.group_instance_id.as_deref()) {
            Ok(m) => m,
            Err(code) => return SyncResult::error(code),
        };
        if req.generation != m.epoch {
            return err(E::IllegalGeneration);
        }
        let info = m.classic.as_ref().expect("checked");
        if req.protocol_type.as_ref().is_some_and(|t| t != "consumer")
            || req
                .protocol_name
                .as_ref()
                .is_some_and(|p| info.protocol_name().as_ref() != Some(p))
        {
            return err(E::InconsistentGroupProtocol);
        }
        m.session_deadline_ms = now_ms + info.session_timeout_ms as i64;
        SyncResult {
            error: ErrorCode::NONE,
            protocol_type: Some("consumer".into()),
            protocol_name: info.protocol_name(),
            assignment: offsets::encode_assignment(info.version(), &by_name(&m.assigned, topics)),
        }
    }

    /// Heartbeat from a classic member of a consumer group: REBALANCE_IN_PROGRESS when it must
    /// rejoin to move towards its target (it then has its rebalance timeout to do so).
    pub(in crate::group) fn classic_heartbeat(
        &mut self,
        group_id: &str,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        now_ms: i64,
    ) -> ErrorCode {
        let Some(cg) = self
            .groups
            .get_mut(group_id)
            .and_then(|g| g.consumer.as_mut())
        else {
            return ErrorCode::new(E::UnknownMemberId);
        };
        let group_epoch = cg.epoch;
        let waiting = released_partitions_waiting(cg, member_id);
        let m = match classic_member(cg, member_id, instance_id) {
            Ok(m) => m,
            Err(code) => return code,
        };
        if generation != m.epoch {
            return ErrorCode::new(E::IllegalGeneration);
        }
        let session = m.classic.as_ref().map_or(0, |c| c.session_timeout_ms);
        m.session_deadline_ms = now_ms + session as i64;
        let rejoin = m.epoch < group_epoch
            || m.state == MemberState::UnrevokedPartitions
            || (m.state == MemberState::UnreleasedPartitions && waiting);
        tracing::debug!(group = %group_id, member = %member_id, epoch = m.epoch, group_epoch,
            state = ?m.state, waiting, rejoin, "classic member heartbeat in a consumer group");
        if rejoin {
            if m.revocation_deadline_ms.is_none() {
                m.revocation_deadline_ms = Some(now_ms + m.rebalance_timeout_ms.max(0) as i64);
            }
            ErrorCode::new(E::RebalanceInProgress)
        } else {
            ErrorCode::NONE
        }
    }

    /// LeaveGroup of classic members of a consumer group: one error per member.
    pub(in crate::group) fn classic_leave(
        &mut self,
        group_id: &str,
        leaving: &[(String, Option<String>)],
        now_ms: i64,
    ) -> Vec<ErrorCode> {
        let partition = self.partition_of(group_id);
        let Some(group) = self.groups.get_mut(group_id) else {
            return vec![ErrorCode::new(E::UnknownMemberId); leaving.len()];
        };
        let Some(cg) = group.consumer.as_mut() else {
            return vec![ErrorCode::new(E::UnknownMemberId); leaving.len()];
        };
        let mut ch = Changes::new();
        let mut errors = Vec::with_capacity(leaving.len());
        for (member_id, instance) in leaving {
            let id = if member_id.is_empty() {
                instance
                    .as_ref()
                    .and_then(|i| cg.static_members.get(i).cloned())
                    .unwrap_or_default()
            } else {
                member_id.clone()
            };
            match classic_member(cg, &id, instance.as_deref()) {
                Ok(_) => {
                    remove_member(cg, &id, &mut ch);
                    errors.push(ErrorCode::NONE);
                }
                Err(code) => errors.push(code),
            }
        }
        queue_changes(&mut self.writes, group_id, cg, &ch, partition);
        if cg.members.is_empty() && group.state != GroupState::Empty {
            group.transition(GroupState::Empty, now_ms);
        }
        if !ch.removed.is_empty() {
            self.maybe_downgrade(group_id, now_ms);
        }
        errors
    }

    /// Converts the classic group `req.group_id` (with members) to a consumer group for a
    /// consumer-protocol member's first heartbeat, when the policy and the group allow it;
    /// otherwise the heartbeat's error.
    pub(super) fn upgrade_to_consumer(
        &mut self,
        req: &HeartbeatRequest,
        topics: &dyn Topics,
        now_ms: i64,
    ) -> Result<(), HeartbeatResult> {
        let cfg = self.config.consumer.clone();
        let partition = self.partition_of(&req.group_id);
        let not_consumer = || {
            HeartbeatResult::error(
                E::GroupIdNotFound,
                format!("Group {} is not a consumer group.", req.group_id),
            )
        };
        let Some(group) = self.groups.get_mut(&req.group_id) else {
            return Err(not_consumer());
        };
        if !cfg.migration.upgrade()
            || group.consumer.is_some()
            || group.protocol_type.as_deref() != Some("consumer")
            || group.state != GroupState::Stable
            || group.members.len() >= cfg.max_size
            || req.member_epoch != 0
        {
            tracing::info!(group = %req.group_id, state = group.state.name(), policy = ?cfg.migration,
                "classic group not upgraded to a consumer group");
            return Err(not_consumer());
        }
        let protocol = group.protocol.clone().unwrap_or_default();
        let generation = group.generation;
        let mut cg = ConsumerGroup {
            epoch: generation,
            assignment_epoch: generation,
            ..Default::default()
        };
        let mut ch = Changes::new();
        for m in group.members.values() {
            let sub = offsets::decode_subscription(&m.metadata_for(&protocol)).unwrap_or_default();
            let assigned = offsets::decode_assignment(&m.assignment)
                .map(|a| by_id(&a, topics))
                .unwrap_or_default();
            let mut cm = ConsumerMember::new(m.id.clone());
            cm.instance_id = m.instance_id.clone();
            cm.client_id = m.client_id.clone();
            cm.client_host = m.client_host.clone();
            cm.rebalance_timeout_ms = m.rebalance_timeout_ms;
            let mut names = sub.topics;
            names.sort();
            names.dedup();
            cm.subscribed_names = names;
            cm.rack_id = sub.rack_id;
            cm.epoch = generation;
            cm.previous_epoch = generation - 1;
            cm.assigned = assigned.clone();
            cm.session_deadline_ms = now_ms + m.session_timeout_ms as i64;
            cm.send_assignment = false;
            cm.classic = Some(ClassicInfo {
                session_timeout_ms: m.session_timeout_ms,
                protocols: m.protocols.clone(),
            });
            if let Some(i) = &m.instance_id {
                cg.static_members.insert(i.clone(), m.id.clone());
            }
            cg.target.insert(m.id.clone(), assigned);
            ch.member_meta.insert(m.id.clone());
            ch.member_assignment.insert(m.id.clone());
            cg.members.insert(m.id.clone(), cm);
        }
        // The subscribed topics as they are now, so the conversion itself bumps nothing.
        refresh_metadata(&mut cg, topics, &mut Changes::new());
        cg.epoch = generation;
        cg.assignment_epoch = generation;
        cg.assignor = pick_assignor(&cg, &cfg);
        ch.epoch_bumped = true;
        ch.target = true;
        tracing::info!(group = %req.group_id, generation, members = cg.members.len(),
            "classic group upgraded to a consumer group");
        // The classic record goes first: replaying its tombstone keeps the offsets and the
        // consumer records that follow rebuild the group.
        self.writes.push(Write {
            partition,
            key: offsets::group_key(&req.group_id),
            value: None,
        });
        queue_changes(&mut self.writes, &req.group_id, &cg, &ch, partition);
        for m in group.members.values_mut() {
            m.complete_join(JoinResult::error(
                ErrorCode::new(E::RebalanceInProgress),
                &m.id,
            ));
            m.complete_sync(SyncResult::error(ErrorCode::new(E::RebalanceInProgress)));
        }
        group.members.clear();
        group.static_members.clear();
        group.pending_members.clear();
        group.protocol = None;
        group.leader = None;
        group.join_deadline_ms = None;
        group.sync_deadline_ms = None;
        group.protocol_type = Some("consumer".into());
        group.consumer = Some(Box::new(cg));
        Ok(())
    }

    /// Converts a consumer group whose members all speak the classic protocol back to a
    /// classic group, when the policy allows it; the members then rejoin a rebalance.
    pub(in crate::group) fn maybe_downgrade(&mut self, group_id: &str, now_ms: i64) {
        let cfg = self.config.clone();
        let partition = self.partition_of(group_id);
        let Some(group) = self.groups.get_mut(group_id) else {
            return;
        };
        let Some(cg) = group.consumer.as_ref() else {
            return;
        };
        if !cfg.consumer.migration.downgrade()
            || cg.members.is_empty()
            || cg.members.values().any(|m| m.classic.is_none())
        {
            return;
        }
        let cg = group.consumer.take().expect("checked");
        let mut ch = Changes::new();
        for id in cg.members.keys() {
            ch.removed.push(id.clone());
        }
        queue_changes(&mut self.writes, group_id, &cg, &ch, partition);
        self.writes.extend(group_tombstones(group_id, partition));
        group.members.clear();
        group.static_members.clear();
        group.pending_members.clear();
        for m in cg.members.into_values() {
            let info = m.classic.expect("all classic");
            if let Some(i) = &m.instance_id {
                group.static_members.insert(i.clone(), m.id.clone());
            }
            group.members.insert(
                m.id.clone(),
                Member {
                    id: m.id,
                    instance_id: m.instance_id,
                    client_id: m.client_id,
                    client_host: m.client_host,
                    rebalance_timeout_ms: m.rebalance_timeout_ms,
                    session_timeout_ms: info.session_timeout_ms,
                    protocol_type: "consumer".into(),
                    protocols: info.protocols,
                    assignment: Bytes::new(),
                    join_waiter: None,
                    sync_waiter: None,
                    synced: true,
                    heartbeat_deadline_ms: now_ms + info.session_timeout_ms as i64,
                },
            );
        }
        group.protocol_type = Some("consumer".into());
        group.generation = cg.epoch;
        group.protocol = group.select_protocol();
        group.leader = group.members.keys().next().cloned();
        group.state = GroupState::Stable;
        group.persisted_generation = group.generation;
        self.writes
            .push(coordinator::group_record(group, partition));
        tracing::info!(group = %group_id, generation = group.generation, members = group.members.len(),
            "consumer group downgraded to a classic group");
        // Every member rejoins: the classic assignment is computed by a leader again.
        coordinator::prepare_rebalance(group, &cfg, now_ms);
    }
}

/// The classic member `member_id` of a consumer group, checked like Kafka's classic requests:
/// FENCED_INSTANCE_ID when the instance belongs to another member, UNKNOWN_MEMBER_ID when the
/// member is unknown or speaks the consumer protocol.
fn classic_member<'a>(
    cg: &'a mut ConsumerGroup,
    member_id: &str,
    instance_id: Option<&str>,
) -> Result<&'a mut ConsumerMember, ErrorCode> {
    if let Some(i) = instance_id {
        match cg.static_members.get(i) {
            Some(id) if id != member_id => return Err(ErrorCode::new(E::FencedInstanceId)),
            Some(_) => {}
            None => return Err(ErrorCode::new(E::UnknownMemberId)),
        }
    }
    match cg.members.get_mut(member_id) {
        Some(m) if m.classic.is_some() => Ok(m),
        _ => Err(ErrorCode::new(E::UnknownMemberId)),
    }
}
