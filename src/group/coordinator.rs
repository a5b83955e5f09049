//! The group coordinator state machine (Kafka's classic rebalance protocol, KIP-394 member-id
//! handshake, KIP-345 static membership, KIP-814 skip-assignment). Sans-IO: every call takes
//! `now_ms`, JoinGroup/SyncGroup answers that must wait come back as [`Reply::Wait`] channels the
//! state machine completes later, timeouts fire from [`Coordinator::tick`], and records to
//! persist are queued for the caller ([`Coordinator::take_writes`]). One instance per shard owns
//! the groups whose `__consumer_offsets` partition lives on that shard.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use kafka_protocol::ResponseError as E;

use crate::config::DEFAULTS;
use crate::types::ErrorCode;

use super::offsets::{self, GroupValue, MemberValue, OffsetValue};
use super::state::{
    Group, GroupState, JoinMember, JoinMode, JoinResult, Member, Protocol, Reply, SyncResult,
};

const NONE: ErrorCode = ErrorCode::NONE;

/// Coordinator settings (Kafka's `group.*` and `offsets.*` broker configs).
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// `group.initial.rebalance.delay.ms`.
    pub initial_rebalance_delay_ms: i64,
    /// `group.min.session.timeout.ms` / `group.max.session.timeout.ms`.
    pub session_timeout_ms_min: i32,
    pub session_timeout_ms_max: i32,
    /// `offsets.retention.minutes`, in ms.
    pub offsets_retention_ms: i64,
    /// `offset.metadata.max.bytes`.
    pub offset_metadata_bytes_max: usize,
    /// `offsets.topic.num.partitions`.
    pub offsets_partitions: i32,
    /// KIP-848 consumer groups (`group.consumer.*`).
    pub consumer: super::consumer::ConsumerConfig,
    /// KIP-932 share groups (`group.share.*`).
    pub share: super::share::ShareConfig,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            initial_rebalance_delay_ms: DEFAULTS.group_initial_rebalance_delay_ms as i64,
            session_timeout_ms_min: 6000,
            session_timeout_ms_max: 1_800_000,
            offsets_retention_ms: (DEFAULTS.offsets_retention_minutes * 60_000) as i64,
            offset_metadata_bytes_max: 4096,
            offsets_partitions: 50,
            consumer: Default::default(),
            share: Default::default(),
        }
    }
}

/// Java's `String.hashCode` over UTF-16 code units.
pub fn java_string_hash(s: &str) -> i32 {
    s.encode_utf16()
        .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(c as i32))
}

/// Kafka's `Utils.abs(groupId.hashCode) % groupMetadataTopicPartitionCount` (`Utils.abs` maps
/// `i32::MIN` to 0 rather than overflowing).
pub fn partition_for(group_id: &str, partitions: i32) -> i32 {
    let h = java_string_hash(group_id);
    let abs = if h == i32::MIN { 0 } else { h.abs() };
    abs % partitions
}

/// Whom a Heartbeat or OffsetCommit speaks for: one member of one group, at one generation.
/// Borrowed from the request; built by name (`MemberRef::of_group(g).member(m)...`), so a group
/// id, member id and instance id cannot trade places on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberRef<'a> {
    pub group_id: &'a str,
    /// The id the coordinator handed out; empty for a simple (non-member) commit.
    pub member_id: &'a str,
    /// `group.instance.id` of a static member (KIP-345).
    pub instance_id: Option<&'a str>,
    /// The generation the member believes current; negative for a simple commit.
    pub generation: i32,
}

impl<'a> MemberRef<'a> {
    /// No member of `group_id` (a simple commit): empty member id, generation -1.
    pub fn of_group(group_id: &'a str) -> MemberRef<'a> {
        MemberRef {
            group_id,
            member_id: "",
            instance_id: None,
            generation: -1,
        }
    }
    pub fn member(self, member_id: &'a str) -> MemberRef<'a> {
        MemberRef { member_id, ..self }
    }
    pub fn instance(self, instance_id: Option<&'a str>) -> MemberRef<'a> {
        MemberRef {
            instance_id,
            ..self
        }
    }
    pub fn generation(self, generation: i32) -> MemberRef<'a> {
        MemberRef { generation, ..self }
    }
}

/// A static member's rejoin with a fresh member id (KIP-345): the id it had and the one it gets.
struct IdChange {
    old_id: String,
    new_id: String,
}

/// A record to append to a `__consumer_offsets` partition; `value: None` is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub partition: i32,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

pub struct JoinRequest {
    pub group_id: String,
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    pub protocols: Vec<Protocol>,
    /// JoinGroup v4+: a member without an id first gets MEMBER_ID_REQUIRED (KIP-394).
    pub require_known_member_id: bool,
}

pub struct SyncRequest {
    pub group_id: String,
    pub generation: i32,
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub assignments: Vec<(String, Bytes)>,
}

/// One member of DescribeGroups.
#[derive(Debug, Clone)]
pub struct MemberDescription {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub metadata: Bytes,
    pub assignment: Bytes,
}

#[derive(Debug, Clone)]
pub struct GroupDescription {
    pub error: ErrorCode,
    /// Kafka's message for `error` (DescribeGroups v6+).
    pub message: Option<String>,
    pub group_id: String,
    pub state: &'static str,
    pub protocol_type: String,
    pub protocol: String,
    pub members: Vec<MemberDescription>,
}

/// One group in ListGroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupListing {
    pub group_id: String,
    pub protocol_type: String,
    pub state: &'static str,
    /// KIP-848 group type: `classic` or `consumer`.
    pub group_type: &'static str,
}

/// One partition of an OffsetCommit after validation.
#[derive(Debug, Clone)]
pub struct CommitEntry {
    pub topic: String,
    pub partition: i32,
    pub value: OffsetValue,
}

pub struct Coordinator {
    pub config: CoordinatorConfig,
    pub(super) groups: HashMap<String, Group>,
    pub(super) writes: Vec<Write>,
    next_member_seq: u64,
    /// KIP-932 share groups, by id (a group id is either a share group or one of `groups`).
    pub(super) share: BTreeMap<String, super::share::ShareGroup>,
    /// The `consumer.*` group configs set on group ids (any type; absent: broker defaults).
    pub(super) consumer_configs: HashMap<String, super::share::GroupConfigs>,
}

fn new_member_id(client_id: &str, seq: u64) -> String {
    format!("{client_id}-{}-{seq}", uuid::Uuid::new_v4())
}

impl Coordinator {
    pub fn new(config: CoordinatorConfig) -> Coordinator {
        Coordinator {
            config,
            groups: HashMap::new(),
            writes: Vec::new(),
            next_member_seq: 0,
            share: BTreeMap::new(),
            consumer_configs: HashMap::new(),
        }
    }

    pub fn group(&self, id: &str) -> Option<&Group> {
        self.groups.get(id)
    }

    /// Every group this coordinator holds (Dead ones included), in no particular order.
    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// Records queued for persistence, in the order they must be appended.
    pub fn take_writes(&mut self) -> Vec<Write> {
        std::mem::take(&mut self.writes)
    }

    pub(super) fn partition_of(&self, group_id: &str) -> i32 {
        partition_for(group_id, self.config.offsets_partitions)
    }

    /// Forgets every group of `__consumer_offsets` partition `partition` (this coordinator no
    /// longer leads it): members waiting in JoinGroup or SyncGroup are answered
    /// NOT_COORDINATOR (their clients find the new coordinator), and records queued for it and
    /// not yet written are dropped. Returns how many groups went.
    pub fn unload_partition(&mut self, partition: i32) -> usize {
        let n = self.config.offsets_partitions;
        let not_coordinator = ErrorCode::new(E::NotCoordinator);
        let ids: Vec<String> = self
            .groups
            .keys()
            .filter(|id| partition_for(id, n) == partition)
            .cloned()
            .collect();
        for id in &ids {
            if let Some(mut g) = self.groups.remove(id) {
                for m in g.members.values_mut() {
                    let member_id = m.id.clone();
                    m.complete_join(JoinResult::error(not_coordinator, &member_id));
                    m.complete_sync(SyncResult::error(not_coordinator));
                }
            }
        }
        let before = self.share.len();
        self.share.retain(|id, _| partition_for(id, n) != partition);
        self.consumer_configs
            .retain(|id, _| partition_for(id, n) != partition);
        self.writes.retain(|w| w.partition != partition);
        ids.len() + before - self.share.len()
    }

    // ---------------------------------------------------------------- JoinGroup

    /// JoinGroup where no group can be a consumer group with members (tests of the classic
    /// protocol): [`Coordinator::join_with`] without topics.
    pub fn join(&mut self, req: JoinRequest, now_ms: i64) -> Reply<JoinResult> {
        self.join_with(req, &super::consumer::NoTopics, now_ms)
    }

    /// JoinGroup; `topics` serves a classic member joining a consumer group.
    pub fn join_with(
        &mut self,
        req: JoinRequest,
        topics: &dyn super::consumer::Topics,
        now_ms: i64,
    ) -> Reply<JoinResult> {
        let err = |code: E| Reply::Now(JoinResult::error(ErrorCode::new(code), &req.member_id));
        if req.group_id.is_empty() {
            return err(E::InvalidGroupId);
        }
        if self.share.contains_key(&req.group_id) {
            // A share group's id: not for the classic protocol.
            return err(E::InconsistentGroupProtocol);
        }
        if req.session_timeout_ms < self.config.session_timeout_ms_min
            || req.session_timeout_ms > self.config.session_timeout_ms_max
        {
            return err(E::InvalidSessionTimeout);
        }
        let exists = self.groups.contains_key(&req.group_id);
        if !exists && !req.member_id.is_empty() {
            return err(E::UnknownMemberId);
        }
        let group = self
            .groups
            .entry(req.group_id.clone())
            .or_insert_with(|| Group::new(&req.group_id, now_ms));
        if group.state == GroupState::Dead {
            return err(E::CoordinatorNotAvailable);
        }
        if let Some(cg) = &group.consumer {
            // A KIP-848 group: a classic member joins one with members as a member of the
            // consumer group; an empty one becomes a classic group again, keeping its offsets.
            if !cg.members.is_empty() {
                return self.classic_join(req, topics, now_ms);
            }
            group.consumer = None;
            group.protocol_type = None;
            group.state = GroupState::Empty;
            self.writes.extend(super::consumer::group_tombstones(
                &req.group_id,
                partition_for(&req.group_id, self.config.offsets_partitions),
            ));
        }
        let group = self.groups.get_mut(&req.group_id).expect("present");
        if !group.supports(&req.protocol_type, &req.protocols) {
            if !exists {
                self.groups.remove(&req.group_id);
            }
            return err(E::InconsistentGroupProtocol);
        }
        let seq = self.next_member_seq;
        self.next_member_seq += 1;
        let group_id = req.group_id.clone();
        let partition = self.partition_of(&req.group_id);
        let cfg = self.config.clone();
        let group = self.groups.get_mut(&req.group_id).expect("inserted above");
        let reply = if req.member_id.is_empty() {
            let new_id = new_member_id(&req.client_id, seq);
            match req.group_instance_id.clone() {
                Some(instance) => match group.static_members.get(&instance).cloned() {
                    Some(old_id) => rejoin_static(
                        group,
                        &cfg,
                        partition,
                        &mut self.writes,
                        IdChange { old_id, new_id },
                        req,
                        now_ms,
                    ),
                    None => add_member_and_rebalance(group, &cfg, new_id, req, now_ms),
                },
                None if req.require_known_member_id => {
                    group
                        .pending_members
                        .insert(new_id.clone(), now_ms + req.session_timeout_ms as i64);
                    Reply::Now(JoinResult::error(
                        ErrorCode::new(E::MemberIdRequired),
                        &new_id,
                    ))
                }
                None => add_member_and_rebalance(group, &cfg, new_id, req, now_ms),
            }
        } else if group.pending_members.contains_key(&req.member_id) {
            group.pending_members.remove(&req.member_id);
            let id = req.member_id.clone();
            add_member_and_rebalance(group, &cfg, id, req, now_ms)
        } else if let Err(code) =
            validate_member(group, &req.member_id, req.group_instance_id.as_deref())
        {
            Reply::Now(JoinResult::error(code, &req.member_id))
        } else {
            rejoin_known(group, &cfg, req, now_ms)
        };
        self.after_change(&group_id, now_ms);
        reply
    }

    // ---------------------------------------------------------------- SyncGroup

    /// SyncGroup: [`Coordinator::sync_with`] without topics.
    pub fn sync(&mut self, req: SyncRequest, now_ms: i64) -> Reply<SyncResult> {
        self.sync_with(req, &super::consumer::NoTopics, now_ms)
    }

    /// SyncGroup; `topics` names the partitions of a classic member of a consumer group.
    pub fn sync_with(
        &mut self,
        req: SyncRequest,
        topics: &dyn super::consumer::Topics,
        now_ms: i64,
    ) -> Reply<SyncResult> {
        if self
            .groups
            .get(&req.group_id)
            .is_some_and(|g| g.consumer.is_some() && g.state != GroupState::Dead)
        {
            return Reply::Now(self.classic_sync(&req, topics, now_ms));
        }
        let err = |code: E| Reply::Now(SyncResult::error(ErrorCode::new(code)));
        let partition = self.partition_of(&req.group_id);
        let Some(group) = self.groups.get_mut(&req.group_id) else {
            return err(E::UnknownMemberId);
        };
        if group.state == GroupState::Dead {
            return err(E::CoordinatorNotAvailable);
        }
        if let Err(code) = validate_member(group, &req.member_id, req.group_instance_id.as_deref())
        {
            return Reply::Now(SyncResult::error(code));
        }
        if req.generation != group.generation {
            return err(E::IllegalGeneration);
        }
        if req
            .protocol_type
            .as_ref()
            .is_some_and(|t| Some(t) != group.protocol_type.as_ref())
            || req
                .protocol_name
                .as_ref()
                .is_some_and(|p| Some(p) != group.protocol.as_ref())
        {
            return err(E::InconsistentGroupProtocol);
        }
        match group.state {
            GroupState::Empty => err(E::UnknownMemberId),
            GroupState::PreparingRebalance => err(E::RebalanceInProgress),
            GroupState::Dead => err(E::CoordinatorNotAvailable),
            GroupState::Stable => {
                let m = group.members.get_mut(&req.member_id).expect("validated");
                m.synced = true;
                m.heartbeat_deadline_ms = now_ms + m.session_timeout_ms as i64;
                let r = SyncResult {
                    error: NONE,
                    protocol_type: group.protocol_type.clone(),
                    protocol_name: group.protocol.clone(),
                    assignment: m.assignment.clone(),
                };
                clear_sync_deadline_if_done(group);
                Reply::Now(r)
            }
            GroupState::CompletingRebalance => {
                let (tx, rx) = async_channel::bounded(1);
                {
                    let m = group.members.get_mut(&req.member_id).expect("validated");
                    m.complete_sync(SyncResult::error(ErrorCode::new(E::RebalanceInProgress)));
                    m.sync_waiter = Some(tx);
                    m.synced = true;
                    m.heartbeat_deadline_ms = now_ms + m.session_timeout_ms as i64;
                }
                if group.is_leader(&req.member_id) {
                    let mut given: HashMap<String, Bytes> = req.assignments.into_iter().collect();
                    let protocol_type = group.protocol_type.clone();
                    let protocol_name = group.protocol.clone();
                    for m in group.members.values_mut() {
                        m.assignment = given.remove(&m.id).unwrap_or_default();
                        let r = SyncResult {
                            error: NONE,
                            protocol_type: protocol_type.clone(),
                            protocol_name: protocol_name.clone(),
                            assignment: m.assignment.clone(),
                        };
                        m.complete_sync(r);
                    }
                    group.transition(GroupState::Stable, now_ms);
                    clear_sync_deadline_if_done(group);
                    group.persisted_generation = group.generation;
                    self.writes.push(group_record(group, partition));
                }
                Reply::Wait(rx)
            }
        }
    }

    // ---------------------------------------------------------------- Heartbeat

    pub fn heartbeat(&mut self, who: MemberRef<'_>, now_ms: i64) -> ErrorCode {
        let MemberRef {
            group_id,
            member_id,
            instance_id,
            generation,
        } = who;
        let Some(group) = self.groups.get_mut(group_id) else {
            return ErrorCode::new(E::UnknownMemberId);
        };
        if group.consumer.is_some() && group.state != GroupState::Dead {
            return self.classic_heartbeat(group_id, member_id, instance_id, generation, now_ms);
        }
        match group.state {
            GroupState::Dead => return ErrorCode::new(E::CoordinatorNotAvailable),
            GroupState::Empty => return ErrorCode::new(E::UnknownMemberId),
            _ => {}
        }
        if let Err(code) = validate_member(group, member_id, instance_id) {
            return code;
        }
        if generation != group.generation {
            return ErrorCode::new(E::IllegalGeneration);
        }
        let m = group.members.get_mut(member_id).expect("validated");
        m.heartbeat_deadline_ms = now_ms + m.session_timeout_ms as i64;
        if group.state == GroupState::PreparingRebalance {
            ErrorCode::new(E::RebalanceInProgress)
        } else {
            NONE
        }
    }

    // ---------------------------------------------------------------- LeaveGroup

    /// Removes each `(member_id, group_instance_id)`; returns the top-level error and one error
    /// per member (LeaveGroup v3+ batches members, KIP-345).
    pub fn leave(
        &mut self,
        group_id: &str,
        leaving: &[(String, Option<String>)],
        now_ms: i64,
    ) -> (ErrorCode, Vec<ErrorCode>) {
        let Some(group) = self.groups.get_mut(group_id) else {
            return (
                NONE,
                vec![ErrorCode::new(E::UnknownMemberId); leaving.len()],
            );
        };
        if group.state == GroupState::Dead {
            return (ErrorCode::new(E::CoordinatorNotAvailable), vec![]);
        }
        if group.consumer.is_some() {
            return (NONE, self.classic_leave(group_id, leaving, now_ms));
        }
        let mut errors = Vec::with_capacity(leaving.len());
        for (member_id, instance) in leaving {
            let target = if member_id.is_empty() {
                match instance.as_ref().and_then(|i| group.static_members.get(i)) {
                    Some(id) => Ok(id.clone()),
                    None => Err(ErrorCode::new(E::UnknownMemberId)),
                }
            } else if group.pending_members.remove(member_id).is_some() {
                errors.push(NONE);
                try_complete_join(group, &self.config, now_ms);
                continue;
            } else {
                validate_member(group, member_id, instance.as_deref()).map(|_| member_id.clone())
            };
            match target {
                Ok(id) => {
                    remove_member_and_update(group, &self.config, &id, now_ms);
                    errors.push(NONE);
                }
                Err(code) => errors.push(code),
            }
        }
        self.after_change(group_id, now_ms);
        (NONE, errors)
    }

    // ---------------------------------------------------------------- timers

    /// Fires every timeout due at `now_ms`: expired sessions and member-id handshakes, rebalance
    /// and initial-delay deadlines, members that never sent SyncGroup.
    pub fn tick(&mut self, now_ms: i64) {
        self.consumer_tick(now_ms);
        self.share_tick(None, now_ms);
        let ids: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| g.consumer.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let cfg = self.config.clone();
            let Some(group) = self.groups.get_mut(&id) else {
                continue;
            };
            if group.state == GroupState::Dead {
                continue;
            }
            let before = group.pending_members.len();
            group
                .pending_members
                .retain(|_, deadline| *deadline > now_ms);
            if group.pending_members.len() != before {
                try_complete_join(group, &cfg, now_ms);
            }
            let expired: Vec<String> = group
                .members
                .values()
                .filter(|m| {
                    m.join_waiter.is_none()
                        && m.sync_waiter.is_none()
                        && m.heartbeat_deadline_ms <= now_ms
                })
                .map(|m| m.id.clone())
                .collect();
            for m in expired {
                tracing::info!(group = %id, member = %m, "session timeout: removing member");
                remove_member_and_update(group, &cfg, &m, now_ms);
            }
            if group.state == GroupState::PreparingRebalance {
                try_complete_join(group, &cfg, now_ms);
            }
            if matches!(
                group.state,
                GroupState::CompletingRebalance | GroupState::Stable
            ) && group.sync_deadline_ms.is_some_and(|d| d <= now_ms)
            {
                group.sync_deadline_ms = None;
                let unsynced: Vec<String> = group
                    .members
                    .values()
                    .filter(|m| !m.synced)
                    .map(|m| m.id.clone())
                    .collect();
                for m in unsynced {
                    tracing::info!(group = %id, member = %m, "no SyncGroup within the rebalance timeout: removing member");
                    remove_member_and_update(group, &cfg, &m, now_ms);
                }
            }
            self.after_change(&id, now_ms);
        }
    }

    /// The earliest deadline of any group, for the caller's timer.
    pub fn next_deadline_ms(&self) -> Option<i64> {
        let mut best: Option<i64> = None;
        let mut consider = |d: i64| best = Some(best.map_or(d, |b| b.min(d)));
        for g in self.groups.values() {
            if g.state == GroupState::Dead {
                continue;
            }
            g.pending_members.values().for_each(|d| consider(*d));
            for m in g.members.values() {
                if m.join_waiter.is_none() && m.sync_waiter.is_none() {
                    consider(m.heartbeat_deadline_ms);
                }
            }
            if let Some(d) = g.join_deadline_ms {
                consider(d);
            }
            if let Some(d) = g.sync_deadline_ms {
                consider(d);
            }
        }
        if let Some(d) = self.consumer_next_deadline_ms() {
            consider(d);
        }
        if let Some(d) = self.share_next_deadline_ms() {
            consider(d);
        }
        best
    }

    /// Persists the generation of a group that just became Empty (Kafka stores the empty group
    /// when a rebalance ends without members) so that replay does not resurrect old members.
    fn after_change(&mut self, group_id: &str, _now_ms: i64) {
        let partition = self.partition_of(group_id);
        if let Some(g) = self.groups.get_mut(group_id) {
            if g.consumer.is_none()
                && g.state == GroupState::Empty
                && g.persisted_generation != g.generation
            {
                g.persisted_generation = g.generation;
                self.writes.push(group_record(g, partition));
            }
        }
    }

    // ---------------------------------------------------------------- offsets

    /// Checks that `member_id`/`generation` may commit for `group_id` (Kafka's
    /// `doCommitOffsets`): simple commits (generation < 0) are allowed when the group is empty
    /// or unknown; group members must be current.
    pub fn check_commit(&mut self, who: MemberRef<'_>, now_ms: i64) -> Result<(), ErrorCode> {
        let MemberRef {
            group_id,
            member_id,
            instance_id,
            generation,
        } = who;
        if group_id.is_empty() {
            return Err(ErrorCode::new(E::InvalidGroupId));
        }
        // KIP-848 groups: the generation is the member epoch.
        if self.check_consumer_commit(group_id, member_id, generation, now_ms)? {
            return Ok(());
        }
        let Some(group) = self.groups.get_mut(group_id) else {
            return if generation < 0 {
                Ok(())
            } else {
                Err(ErrorCode::new(E::IllegalGeneration))
            };
        };
        if group.state == GroupState::Dead {
            return Err(ErrorCode::new(E::CoordinatorNotAvailable));
        }
        if generation < 0 && group.state == GroupState::Empty {
            return Ok(());
        }
        validate_member(group, member_id, instance_id)?;
        if generation != group.generation {
            return Err(ErrorCode::new(E::IllegalGeneration));
        }
        if group.state == GroupState::CompletingRebalance {
            return Err(ErrorCode::new(E::RebalanceInProgress));
        }
        let m = group.members.get_mut(member_id).expect("validated");
        m.heartbeat_deadline_ms = now_ms + m.session_timeout_ms as i64;
        Ok(())
    }

    /// The records for a validated commit, in one batch's worth.
    pub fn commit_writes(&self, group_id: &str, entries: &[CommitEntry]) -> Vec<Write> {
        let partition = self.partition_of(group_id);
        entries
            .iter()
            .map(|e| Write {
                partition,
                key: offsets::offset_key(group_id, &e.topic, e.partition),
                value: Some(offsets::offset_value(&e.value)),
            })
            .collect()
    }

    /// Applies a commit once its records are durable.
    pub fn apply_commit(&mut self, group_id: &str, entries: Vec<CommitEntry>, now_ms: i64) {
        let group = self
            .groups
            .entry(group_id.to_string())
            .or_insert_with(|| Group::new(group_id, now_ms));
        if group.state == GroupState::Dead {
            return;
        }
        for e in entries {
            group.offsets.insert((e.topic, e.partition), e.value);
        }
    }

    /// Committed offsets: of the given partitions (unknown ones as `None`), or all of them.
    pub fn fetch_offsets(
        &self,
        group_id: &str,
        partitions: Option<&[(String, Vec<i32>)]>,
    ) -> Vec<(String, i32, Option<OffsetValue>)> {
        let group = self
            .groups
            .get(group_id)
            .filter(|g| g.state != GroupState::Dead);
        match partitions {
            Some(wanted) => wanted
                .iter()
                .flat_map(|(t, ps)| ps.iter().map(move |p| (t, *p)))
                .map(|(t, p)| {
                    let v = group.and_then(|g| g.offsets.get(&(t.clone(), p)).cloned());
                    (t.clone(), p, v)
                })
                .collect(),
            None => group
                .map(|g| {
                    g.offsets
                        .iter()
                        .map(|((t, p), v)| (t.clone(), *p, Some(v.clone())))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// OffsetDelete: removes committed offsets of partitions the group does not consume.
    /// Returns the top-level error, or one error per partition.
    pub fn delete_offsets(
        &mut self,
        group_id: &str,
        partitions: &[(String, i32)],
    ) -> Result<Vec<ErrorCode>, ErrorCode> {
        let partition = self.partition_of(group_id);
        let Some(group) = self.groups.get_mut(group_id) else {
            return Err(ErrorCode::new(E::GroupIdNotFound));
        };
        if group.state == GroupState::Dead {
            return Err(ErrorCode::new(E::GroupIdNotFound));
        }
        let subscribed = if group.state == GroupState::Empty {
            Default::default()
        } else {
            match group.subscribed_topics() {
                Some(s) => s,
                None => return Err(ErrorCode::new(E::NonEmptyGroup)),
            }
        };
        let mut out = Vec::with_capacity(partitions.len());
        for (topic, p) in partitions {
            if subscribed.contains(topic) {
                out.push(ErrorCode::new(E::GroupSubscribedToTopic));
                continue;
            }
            if group.offsets.remove(&(topic.clone(), *p)).is_some() {
                self.writes.push(Write {
                    partition,
                    key: offsets::offset_key(group_id, topic, *p),
                    value: None,
                });
            }
            out.push(NONE);
        }
        Ok(out)
    }

    /// DeleteGroups: only empty groups; their offsets and metadata get tombstones.
    pub fn delete_group(&mut self, group_id: &str) -> ErrorCode {
        if let Some(code) = self.delete_share_group(group_id) {
            return code;
        }
        let Some(group) = self.groups.get(group_id) else {
            return ErrorCode::new(E::GroupIdNotFound);
        };
        match group.state {
            GroupState::Dead => return ErrorCode::new(E::GroupIdNotFound),
            GroupState::Empty => {}
            _ => return ErrorCode::new(E::NonEmptyGroup),
        }
        let mut group = self.groups.remove(group_id).expect("present");
        group.state = GroupState::Dead;
        self.write_group_tombstones(&group);
        NONE
    }

    fn write_group_tombstones(&mut self, group: &Group) {
        let partition = self.partition_of(&group.id);
        for (t, p) in group.offsets.keys() {
            self.writes.push(Write {
                partition,
                key: offsets::offset_key(&group.id, t, *p),
                value: None,
            });
        }
        self.writes.push(Write {
            partition,
            key: offsets::group_key(&group.id),
            value: None,
        });
        if group.consumer.is_some() {
            self.writes
                .extend(super::consumer::group_tombstones(&group.id, partition));
        }
    }

    /// Expires committed offsets of empty groups after `offsets.retention.minutes` (KIP-211:
    /// counted from when the group became empty, or from the commit for standalone consumers),
    /// and forgets empty groups left without offsets. Returns how many offsets expired.
    pub fn expire_offsets(&mut self, now_ms: i64) -> usize {
        let retention = self.config.offsets_retention_ms;
        let mut expired_total = 0;
        let mut dead = Vec::new();
        let mut writes = Vec::new();
        for g in self.groups.values_mut() {
            // Empty groups: everything, counted from when the group emptied (or from the commit
            // for standalone consumers). Stable consumer groups: only topics no member
            // subscribes to any more, counted from the commit.
            let (base_state, subscribed) = match g.state {
                GroupState::Empty => (g.protocol_type.as_ref().map(|_| g.state_timestamp_ms), None),
                GroupState::Stable => match g.subscribed_topics() {
                    Some(topics) => (None, Some(topics)),
                    None => continue,
                },
                _ => continue,
            };
            let partition = partition_for(&g.id, self.config.offsets_partitions);
            let expired: Vec<(String, i32)> = g
                .offsets
                .iter()
                .filter(|((topic, _), _)| subscribed.as_ref().is_none_or(|s| !s.contains(topic)))
                .filter(|(_, v)| {
                    if v.expire_timestamp_ms >= 0 {
                        now_ms >= v.expire_timestamp_ms
                    } else {
                        now_ms - base_state.unwrap_or(v.commit_timestamp_ms) >= retention
                    }
                })
                .map(|(k, _)| k.clone())
                .collect();
            for (t, p) in expired {
                g.offsets.remove(&(t.clone(), p));
                writes.push(Write {
                    partition,
                    key: offsets::offset_key(&g.id, &t, p),
                    value: None,
                });
                expired_total += 1;
            }
            if g.state == GroupState::Empty
                && g.offsets.is_empty()
                && g.members.is_empty()
                && g.pending_members.is_empty()
            {
                dead.push(g.id.clone());
            }
        }
        self.writes.extend(writes);
        for id in dead {
            if let Some(mut g) = self.groups.remove(&id) {
                g.state = GroupState::Dead;
                let partition = self.partition_of(&id);
                self.writes.push(Write {
                    partition,
                    key: offsets::group_key(&id),
                    value: None,
                });
                if g.consumer.is_some() {
                    self.writes
                        .extend(super::consumer::group_tombstones(&id, partition));
                }
            }
        }
        expired_total
    }

    // ---------------------------------------------------------------- admin

    /// ListGroups: groups whose state is one of `states` and whose type (`classic` or
    /// `consumer`) is one of `types` (case-insensitive; empty filters match everything).
    pub fn list_groups(&self, states: &[String], types: &[String]) -> Vec<GroupListing> {
        let mut out: Vec<GroupListing> = self
            .groups
            .values()
            .filter(|g| g.state != GroupState::Dead)
            .map(|g| match &g.consumer {
                Some(cg) => GroupListing {
                    group_id: g.id.clone(),
                    protocol_type: "consumer".into(),
                    state: cg.state_name(),
                    group_type: "consumer",
                },
                None => GroupListing {
                    group_id: g.id.clone(),
                    protocol_type: g.protocol_type.clone().unwrap_or_default(),
                    state: g.state.name(),
                    group_type: "classic",
                },
            })
            .chain(self.share.iter().map(|(id, g)| GroupListing {
                group_id: id.clone(),
                protocol_type: "share".into(),
                state: g.state_name(),
                group_type: "share",
            }))
            .filter(|l| states.is_empty() || states.iter().any(|s| s.eq_ignore_ascii_case(l.state)))
            .filter(|l| {
                types.is_empty() || types.iter().any(|t| t.eq_ignore_ascii_case(l.group_type))
            })
            .collect();
        out.sort_by(|a, b| a.group_id.cmp(&b.group_id));
        out
    }

    /// DescribeGroups for one group: Kafka's summary (member metadata and assignments only
    /// when Stable). An unknown group is reported as Dead (`GROUP_ID_NOT_FOUND` when
    /// `not_found_error`, DescribeGroups v6+).
    pub fn describe(&self, group_id: &str, not_found_error: bool) -> GroupDescription {
        if let Some(g) = self.share.get(group_id) {
            // A share group is shown with its members (no protocol metadata or assignment).
            return GroupDescription {
                error: NONE,
                message: None,
                group_id: group_id.to_string(),
                state: g.state_name(),
                protocol_type: "share".into(),
                protocol: String::new(),
                members: g
                    .members
                    .values()
                    .map(|m| MemberDescription {
                        member_id: m.id.clone(),
                        group_instance_id: None,
                        client_id: m.client_id.clone(),
                        client_host: m.client_host.clone(),
                        metadata: Bytes::new(),
                        assignment: Bytes::new(),
                    })
                    .collect(),
            };
        }
        // A KIP-848 group is not a classic group: described as an unknown one, as Kafka 4 does
        // (Dead before v6, GROUP_ID_NOT_FOUND naming the reason from v6), mixed groups with
        // classic members included; ConsumerGroupDescribe describes it.
        let live = self
            .groups
            .get(group_id)
            .filter(|g| g.state != GroupState::Dead);
        let Some(g) = live.filter(|g| g.consumer.is_none()) else {
            let message = if live.is_some() {
                format!("Group {group_id} is not a classic group.")
            } else {
                format!("Group {group_id} not found.")
            };
            return GroupDescription {
                error: if not_found_error {
                    ErrorCode::new(E::GroupIdNotFound)
                } else {
                    NONE
                },
                message: not_found_error.then_some(message),
                group_id: group_id.to_string(),
                state: GroupState::Dead.name(),
                protocol_type: String::new(),
                protocol: String::new(),
                members: vec![],
            };
        };
        let stable = g.state == GroupState::Stable;
        let protocol = g.protocol.clone().unwrap_or_default();
        GroupDescription {
            error: NONE,
            message: None,
            group_id: g.id.clone(),
            state: g.state.name(),
            protocol_type: g.protocol_type.clone().unwrap_or_default(),
            protocol: if stable {
                protocol.clone()
            } else {
                String::new()
            },
            members: g
                .members
                .values()
                .map(|m| MemberDescription {
                    member_id: m.id.clone(),
                    group_instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    metadata: if stable {
                        m.metadata_for(&protocol)
                    } else {
                        Bytes::new()
                    },
                    assignment: if stable {
                        m.assignment.clone()
                    } else {
                        Bytes::new()
                    },
                })
                .collect(),
        }
    }

    // ---------------------------------------------------------------- replay

    /// Applies one offset record read back from the log (`None` = tombstone).
    pub fn load_offset(
        &mut self,
        group_id: &str,
        topic: &str,
        partition: i32,
        v: Option<OffsetValue>,
        now_ms: i64,
    ) {
        match v {
            Some(v) => {
                let g = self
                    .groups
                    .entry(group_id.to_string())
                    .or_insert_with(|| Group::new(group_id, now_ms));
                g.offsets.insert((topic.to_string(), partition), v);
            }
            None => {
                if let Some(g) = self.groups.get_mut(group_id) {
                    g.offsets.remove(&(topic.to_string(), partition));
                }
            }
        }
    }

    /// Applies one group metadata record read back from the log (`None` = tombstone). Loaded
    /// members get a fresh session: they keep their generation if they heartbeat in time.
    pub fn load_group(&mut self, group_id: &str, v: Option<GroupValue>, now_ms: i64) {
        let Some(v) = v else {
            if let Some(g) = self.groups.get_mut(group_id) {
                if g.offsets.is_empty() {
                    self.groups.remove(group_id);
                } else {
                    let offsets = std::mem::take(&mut g.offsets);
                    *g = Group::new(group_id, now_ms);
                    g.offsets = offsets;
                }
            }
            return;
        };
        let g = self
            .groups
            .entry(group_id.to_string())
            .or_insert_with(|| Group::new(group_id, now_ms));
        g.consumer = None;
        g.protocol_type = Some(v.protocol_type).filter(|t| !t.is_empty());
        g.generation = v.generation;
        g.persisted_generation = v.generation;
        g.protocol = v.protocol;
        g.leader = v.leader;
        g.members.clear();
        g.static_members.clear();
        g.pending_members.clear();
        g.join_deadline_ms = None;
        g.sync_deadline_ms = None;
        for m in v.members {
            if let Some(i) = &m.group_instance_id {
                g.static_members.insert(i.clone(), m.member_id.clone());
            }
            let protocols = match &g.protocol {
                Some(p) => vec![Protocol {
                    name: p.clone(),
                    metadata: m.subscription.clone(),
                }],
                None => vec![],
            };
            g.members.insert(
                m.member_id.clone(),
                Member {
                    id: m.member_id,
                    instance_id: m.group_instance_id,
                    client_id: m.client_id,
                    client_host: m.client_host,
                    rebalance_timeout_ms: m.rebalance_timeout_ms,
                    session_timeout_ms: m.session_timeout_ms,
                    protocol_type: g.protocol_type.clone().unwrap_or_default(),
                    protocols,
                    assignment: m.assignment,
                    join_waiter: None,
                    sync_waiter: None,
                    synced: true,
                    heartbeat_deadline_ms: now_ms + m.session_timeout_ms as i64,
                },
            );
        }
        let state = if g.members.is_empty() {
            GroupState::Empty
        } else {
            GroupState::Stable
        };
        g.state = state;
        g.state_timestamp_ms = if v.current_state_timestamp_ms > 0 {
            v.current_state_timestamp_ms
        } else {
            now_ms
        };
    }
}

// -------------------------------------------------------------------- state machine helpers

/// The group metadata record of the current generation.
pub(super) fn group_record(group: &Group, partition: i32) -> Write {
    let protocol = group.protocol.clone().unwrap_or_default();
    let value = GroupValue {
        protocol_type: group.protocol_type.clone().unwrap_or_default(),
        generation: group.generation,
        protocol: group.protocol.clone(),
        leader: group.leader.clone(),
        current_state_timestamp_ms: group.state_timestamp_ms,
        members: group
            .members
            .values()
            .map(|m| MemberValue {
                member_id: m.id.clone(),
                group_instance_id: m.instance_id.clone(),
                client_id: m.client_id.clone(),
                client_host: m.client_host.clone(),
                rebalance_timeout_ms: m.rebalance_timeout_ms,
                session_timeout_ms: m.session_timeout_ms,
                subscription: m.metadata_for(&protocol),
                assignment: m.assignment.clone(),
            })
            .collect(),
    };
    Write {
        partition,
        key: offsets::group_key(&group.id),
        value: Some(offsets::group_value(&value)),
    }
}

/// FENCED_INSTANCE_ID when a static member's instance id now belongs to another member id;
/// UNKNOWN_MEMBER_ID when the member is not in the group.
fn validate_member(
    group: &Group,
    member_id: &str,
    instance_id: Option<&str>,
) -> Result<(), ErrorCode> {
    if let Some(instance) = instance_id {
        match group.static_members.get(instance) {
            Some(id) if id != member_id => return Err(ErrorCode::new(E::FencedInstanceId)),
            Some(_) => {}
            None => return Err(ErrorCode::new(E::UnknownMemberId)),
        }
    }
    if !group.members.contains_key(member_id) {
        return Err(ErrorCode::new(E::UnknownMemberId));
    }
    Ok(())
}

fn clear_sync_deadline_if_done(group: &mut Group) {
    if group.members.values().all(|m| m.synced) {
        group.sync_deadline_ms = None;
    }
}

/// The JoinGroup answer for `member_id` in the current generation (leaders get the members).
fn current_generation_result(group: &Group, member_id: &str, skip_assignment: bool) -> JoinResult {
    let protocol = group.protocol.clone().unwrap_or_default();
    let leader = group.leader.clone().unwrap_or_default();
    let members = if leader == member_id {
        group
            .members
            .values()
            .map(|m| JoinMember {
                member_id: m.id.clone(),
                group_instance_id: m.instance_id.clone(),
                metadata: m.metadata_for(&protocol),
            })
            .collect()
    } else {
        vec![]
    };
    JoinResult {
        error: NONE,
        generation: group.generation,
        protocol_type: group.protocol_type.clone(),
        protocol_name: group.protocol.clone(),
        leader,
        member_id: member_id.to_string(),
        skip_assignment,
        members,
    }
}

fn waiting_join(member: &mut Member) -> Reply<JoinResult> {
    let (tx, rx) = async_channel::bounded(1);
    member.complete_join(JoinResult::error(
        ErrorCode::new(E::RebalanceInProgress),
        &member.id,
    ));
    member.join_waiter = Some(tx);
    Reply::Wait(rx)
}

fn add_member_and_rebalance(
    group: &mut Group,
    cfg: &CoordinatorConfig,
    id: String,
    req: JoinRequest,
    now_ms: i64,
) -> Reply<JoinResult> {
    if group.state == GroupState::Empty {
        group.protocol_type = Some(req.protocol_type.clone());
    }
    if let Some(i) = &req.group_instance_id {
        group.static_members.insert(i.clone(), id.clone());
    }
    let mut member = Member {
        id: id.clone(),
        instance_id: req.group_instance_id,
        client_id: req.client_id,
        client_host: req.client_host,
        rebalance_timeout_ms: req.rebalance_timeout_ms,
        session_timeout_ms: req.session_timeout_ms,
        protocol_type: req.protocol_type,
        protocols: req.protocols,
        assignment: Bytes::new(),
        join_waiter: None,
        sync_waiter: None,
        synced: false,
        heartbeat_deadline_ms: now_ms + req.session_timeout_ms as i64,
    };
    let reply = waiting_join(&mut member);
    group.members.insert(id, member);
    if group.state == GroupState::PreparingRebalance && group.generation == 0 {
        group.new_member_added = true;
    }
    maybe_prepare_rebalance(group, cfg, now_ms);
    try_complete_join(group, cfg, now_ms);
    reply
}

/// A known static member rejoined with a new member id (KIP-345): the old id is fenced, and a
/// stable group whose selected protocol does not change skips the rebalance.
fn rejoin_static(
    group: &mut Group,
    cfg: &CoordinatorConfig,
    partition: i32,
    writes: &mut Vec<Write>,
    ids: IdChange,
    req: JoinRequest,
    now_ms: i64,
) -> Reply<JoinResult> {
    let IdChange { old_id, new_id } = ids;
    let Some(mut member) = group.members.shift_remove(&old_id) else {
        // The mapping outlived its member (should not happen): treat as a new static member.
        return add_member_and_rebalance(group, cfg, new_id, req, now_ms);
    };
    member.complete_join(JoinResult::error(
        ErrorCode::new(E::FencedInstanceId),
        &old_id,
    ));
    member.complete_sync(SyncResult::error(ErrorCode::new(E::FencedInstanceId)));
    let instance = req.group_instance_id.clone().expect("static join");
    group.static_members.insert(instance, new_id.clone());
    let was_leader = group.is_leader(&old_id);
    if was_leader {
        group.leader = Some(new_id.clone());
    }
    member.id = new_id.clone();
    member.client_id = req.client_id;
    member.client_host = req.client_host;
    member.rebalance_timeout_ms = req.rebalance_timeout_ms;
    member.session_timeout_ms = req.session_timeout_ms;
    member.heartbeat_deadline_ms = now_ms + req.session_timeout_ms as i64;
    member.protocols = req.protocols;
    let reply = waiting_join(&mut member);
    group.members.insert(new_id.clone(), member);
    match group.state {
        GroupState::Stable => {
            if group.select_protocol() == group.protocol {
                // Same generation: hand back the current one; the leader keeps its assignment.
                let r = current_generation_result(group, &new_id, was_leader);
                let m = group.members.get_mut(&new_id).expect("inserted");
                m.synced = true;
                m.complete_join(r);
                writes.push(group_record(group, partition));
            } else {
                // The new protocols change the group's choice: everyone must rejoin.
                prepare_rebalance(group, cfg, now_ms);
            }
        }
        GroupState::CompletingRebalance => prepare_rebalance(group, cfg, now_ms),
        GroupState::PreparingRebalance => {}
        GroupState::Empty | GroupState::Dead => {
            unreachable!("a group with members is neither empty nor dead")
        }
    }
    try_complete_join(group, cfg, now_ms);
    reply
}

/// A current member sent JoinGroup again.
fn rejoin_known(
    group: &mut Group,
    cfg: &CoordinatorConfig,
    req: JoinRequest,
    now_ms: i64,
) -> Reply<JoinResult> {
    let id = req.member_id.clone();
    let is_leader = group.is_leader(&id);
    let state = group.state;
    let m = group.members.get_mut(&id).expect("validated");
    let same = m.matches(&req.protocols);
    match state {
        GroupState::CompletingRebalance if same => {
            return Reply::Now(current_generation_result(group, &id, false));
        }
        GroupState::Stable if same && !is_leader => {
            return Reply::Now(current_generation_result(group, &id, false));
        }
        GroupState::Empty | GroupState::Dead => {
            return Reply::Now(JoinResult::error(ErrorCode::new(E::UnknownMemberId), &id));
        }
        _ => {}
    }
    m.protocols = req.protocols;
    m.rebalance_timeout_ms = req.rebalance_timeout_ms;
    m.session_timeout_ms = req.session_timeout_ms;
    m.heartbeat_deadline_ms = now_ms + req.session_timeout_ms as i64;
    let reply = waiting_join(m);
    maybe_prepare_rebalance(group, cfg, now_ms);
    try_complete_join(group, cfg, now_ms);
    reply
}

fn maybe_prepare_rebalance(group: &mut Group, cfg: &CoordinatorConfig, now_ms: i64) {
    if matches!(
        group.state,
        GroupState::Empty | GroupState::Stable | GroupState::CompletingRebalance
    ) {
        prepare_rebalance(group, cfg, now_ms);
    }
}

pub(super) fn prepare_rebalance(group: &mut Group, cfg: &CoordinatorConfig, now_ms: i64) {
    if group.state == GroupState::CompletingRebalance {
        for m in group.members.values_mut() {
            m.assignment = Bytes::new();
            m.complete_sync(SyncResult::error(ErrorCode::new(E::RebalanceInProgress)));
        }
    }
    let rebalance_timeout = group.max_rebalance_timeout_ms();
    if group.state == GroupState::Empty {
        group.join_mode = JoinMode::Initial {
            max_deadline_ms: now_ms + rebalance_timeout.max(cfg.initial_rebalance_delay_ms),
        };
        group.join_deadline_ms = Some(now_ms + cfg.initial_rebalance_delay_ms);
        group.new_member_added = false;
    } else {
        group.join_mode = JoinMode::Normal;
        group.join_deadline_ms = Some(now_ms + rebalance_timeout);
    }
    group.sync_deadline_ms = None;
    group.transition(GroupState::PreparingRebalance, now_ms);
}

fn try_complete_join(group: &mut Group, cfg: &CoordinatorConfig, now_ms: i64) {
    let initial_delay_ms = cfg.initial_rebalance_delay_ms;
    if group.state != GroupState::PreparingRebalance {
        return;
    }
    let deadline = group.join_deadline_ms.unwrap_or(now_ms);
    match group.join_mode {
        JoinMode::Initial { max_deadline_ms } => {
            if initial_delay_ms == 0 {
                // No initial delay: behave like a normal rebalance.
                if group.all_members_joined() || now_ms >= deadline {
                    complete_join(group, now_ms);
                }
                return;
            }
            if now_ms < deadline {
                return;
            }
            if group.new_member_added && now_ms < max_deadline_ms {
                // Members keep arriving: wait another delay, never past the rebalance timeout.
                group.new_member_added = false;
                group.join_deadline_ms = Some((now_ms + initial_delay_ms).min(max_deadline_ms));
            } else {
                complete_join(group, now_ms);
            }
        }
        JoinMode::Normal => {
            if group.all_members_joined() || now_ms >= deadline {
                complete_join(group, now_ms);
            }
        }
    }
}

/// Ends the join phase: members that did not rejoin are dropped, the next generation starts and
/// every waiting member gets its answer (the leader with everyone's metadata).
fn complete_join(group: &mut Group, now_ms: i64) {
    debug_assert_eq!(group.state, GroupState::PreparingRebalance);
    let gone: Vec<String> = group
        .members
        .values()
        .filter(|m| m.join_waiter.is_none())
        .map(|m| m.id.clone())
        .collect();
    for id in &gone {
        tracing::info!(group = %group.id, member = %id, "member did not rejoin in time: removed");
        remove_member(group, id);
    }
    group.join_deadline_ms = None;
    group.new_member_added = false;
    group.generation += 1;
    if group.members.is_empty() {
        group.protocol = None;
        group.leader = None;
        group.transition(GroupState::Empty, now_ms);
        return;
    }
    group.protocol = group.select_protocol();
    if !group
        .leader
        .as_ref()
        .is_some_and(|l| group.members.contains_key(l))
    {
        group.leader = group.members.keys().next().cloned();
    }
    group.transition(GroupState::CompletingRebalance, now_ms);
    let ids: Vec<String> = group.members.keys().cloned().collect();
    let mut sync_deadline = 0i64;
    for id in ids {
        let r = current_generation_result(group, &id, false);
        let m = group.members.get_mut(&id).expect("listed");
        m.synced = false;
        m.heartbeat_deadline_ms = now_ms + m.session_timeout_ms as i64;
        sync_deadline = sync_deadline.max(now_ms + m.rebalance_timeout_ms as i64);
        m.complete_join(r);
    }
    group.sync_deadline_ms = Some(sync_deadline);
    tracing::info!(group = %group.id, generation = group.generation, members = group.members.len(), protocol = ?group.protocol, "rebalance: join phase complete");
}

/// Drops a member without touching the group state.
fn remove_member(group: &mut Group, id: &str) {
    if let Some(mut m) = group.members.shift_remove(id) {
        m.complete_join(JoinResult::error(ErrorCode::new(E::UnknownMemberId), id));
        m.complete_sync(SyncResult::error(ErrorCode::new(E::UnknownMemberId)));
        if let Some(i) = &m.instance_id {
            if group.static_members.get(i).map(String::as_str) == Some(id) {
                group.static_members.remove(i);
            }
        }
    }
    if group.is_leader(id) {
        group.leader = group.members.keys().next().cloned();
    }
}

/// Kafka's `removeMemberAndUpdateGroup`: leave, session expiry, missed sync.
fn remove_member_and_update(group: &mut Group, cfg: &CoordinatorConfig, id: &str, now_ms: i64) {
    remove_member(group, id);
    match group.state {
        GroupState::Dead | GroupState::Empty => {}
        GroupState::Stable | GroupState::CompletingRebalance => {
            prepare_rebalance(group, cfg, now_ms);
            try_complete_join(group, cfg, now_ms);
        }
        GroupState::PreparingRebalance => try_complete_join(group, cfg, now_ms),
    }
}
