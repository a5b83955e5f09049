//! The group coordinator of one shard: the classic-protocol state machine of every group placed
//! on this shard, and their committed offsets. Lives on its shard (Rc/RefCell); handlers reach it
//! through `shard::invoke_on`. Join and sync responses that must wait for the rest of the group
//! park a one-shot channel that the state machine completes.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
};
use kafka_protocol::ResponseError;

use super::records::{self, OffsetKey, OffsetValue};
use super::{offsets_partition, OFFSETS_TOPIC};
use crate::shard;
use crate::storage::{Durability, ReadOptions};
use crate::types::{now_ms, Offset, TopicPartition};

/// Kafka's `group.min.session.timeout.ms` is 6 s; Sluice allows 1 s so tests and latency-sensitive
/// consumers can detect dead members faster.
pub const SESSION_TIMEOUT_MS_MIN: i32 = 1_000;
/// Kafka's `group.max.session.timeout.ms`.
pub const SESSION_TIMEOUT_MS_MAX: i32 = 1_800_000;
/// Kafka's `offset.metadata.max.bytes`.
pub const OFFSET_METADATA_BYTES_MAX: usize = 4096;
/// How often timers (session expiry, rebalance deadlines, join delays) are checked.
pub const TICK_MS: u64 = 50;

fn code(e: ResponseError) -> i16 {
    e.code()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::PreparingRebalance => "PreparingRebalance",
            State::CompletingRebalance => "CompletingRebalance",
            State::Stable => "Stable",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct JoinOutcome {
    pub error: i16,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// Filled for the leader only: (member id, instance id, metadata of the chosen protocol).
    pub members: Vec<(String, Option<String>, Bytes)>,
    pub skip_assignment: bool,
}

impl JoinOutcome {
    fn error(error: i16, member_id: &str) -> JoinOutcome {
        JoinOutcome {
            error,
            generation: -1,
            member_id: member_id.to_string(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SyncOutcome {
    pub error: i16,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub assignment: Bytes,
}

pub struct JoinArgs {
    pub group_id: String,
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    /// JoinGroup request version (MEMBER_ID_REQUIRED from v4, skip_assignment from v9).
    pub version: i16,
}

struct Member {
    id: String,
    instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocols: Vec<(String, Bytes)>,
    assignment: Bytes,
    last_heartbeat: Instant,
    joined_this_round: bool,
    join_waiter: Option<async_channel::Sender<JoinOutcome>>,
    sync_waiter: Option<async_channel::Sender<SyncOutcome>>,
}

impl Member {
    fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
pub struct Committed {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_timestamp_ms: i64,
}

struct Group {
    state: State,
    generation: i32,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    /// In join order: the first member to join leads.
    members: Vec<Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED and not yet used.
    pending: HashSet<String>,
    rebalance_deadline: Option<Instant>,
    /// A new group waits this long for more members before its first rebalance completes.
    initial_delay_until: Option<Instant>,
    offsets: BTreeMap<(String, i32), Committed>,
}

impl Group {
    fn new() -> Group {
        Group {
            state: State::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: Vec::new(),
            pending: HashSet::new(),
            rebalance_deadline: None,
            initial_delay_until: None,
            offsets: BTreeMap::new(),
        }
    }
    fn member(&self, id: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }
    fn member_mut(&mut self, id: &str) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.id == id)
    }
    fn by_instance(&self, instance: &str) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| m.instance_id.as_deref() == Some(instance))
    }

    /// Topics the members subscribe to (consumer protocol only).
    fn subscribed_topics(&self) -> HashSet<String> {
        let mut out = HashSet::new();
        if self.protocol_type.as_deref() != Some("consumer") {
            return out;
        }
        for m in &self.members {
            for (_, meta) in &m.protocols {
                out.extend(consumer_subscription(meta.clone()));
            }
        }
        out
    }

    /// Checks a request's (member, instance, generation) against the group.
    fn check_member(
        &self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: Option<i32>,
    ) -> Result<(), i16> {
        if let Some(inst) = instance_id {
            if let Some(m) = self.by_instance(inst) {
                if m.id != member_id {
                    return Err(code(ResponseError::FencedInstanceId));
                }
            }
        }
        if self.member(member_id).is_none() {
            return Err(code(ResponseError::UnknownMemberId));
        }
        if let Some(g) = generation {
            if g != self.generation {
                return Err(code(ResponseError::IllegalGeneration));
            }
        }
        Ok(())
    }

    fn select_protocol(&self) -> Option<String> {
        let first = self.members.first()?;
        let candidates: Vec<&String> = first
            .protocols
            .iter()
            .map(|(n, _)| n)
            .filter(|n| {
                self.members
                    .iter()
                    .all(|m| m.protocols.iter().any(|(x, _)| x == *n))
            })
            .collect();
        let mut votes: HashMap<&String, usize> = HashMap::new();
        for m in &self.members {
            if let Some((n, _)) = m.protocols.iter().find(|(n, _)| candidates.contains(&n)) {
                *votes.entry(n).or_default() += 1;
            }
        }
        candidates
            .into_iter()
            .max_by_key(|n| (votes.get(n).copied().unwrap_or(0), std::cmp::Reverse(0)))
            .cloned()
    }

    fn supports(&self, protocol_type: &str, protocols: &[(String, Bytes)]) -> bool {
        if self.members.is_empty() {
            return !protocols.is_empty();
        }
        if self.protocol_type.as_deref() != Some(protocol_type) {
            return false;
        }
        protocols.iter().any(|(n, _)| {
            self.members
                .iter()
                .all(|m| m.protocols.iter().any(|(x, _)| x == n))
        })
    }

    fn prepare_rebalance(&mut self, initial_delay: Duration) {
        let was_empty = self.state == State::Empty;
        if self.state == State::CompletingRebalance {
            for m in &mut self.members {
                if let Some(w) = m.sync_waiter.take() {
                    let _ = w.try_send(SyncOutcome {
                        error: code(ResponseError::RebalanceInProgress),
                        ..Default::default()
                    });
                }
            }
        }
        self.state = State::PreparingRebalance;
        let timeout = self
            .members
            .iter()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or(Duration::from_secs(1));
        self.rebalance_deadline = Some(Instant::now() + timeout);
        self.initial_delay_until =
            (was_empty && !initial_delay.is_zero()).then(|| Instant::now() + initial_delay);
        for m in &mut self.members {
            m.joined_this_round = m.join_waiter.is_some();
        }
    }

    /// Completes the join phase once every member has rejoined (after any initial delay), or
    /// once the rebalance timeout passes, dropping members that did not rejoin.
    fn maybe_complete_join(&mut self, now: Instant) {
        if self.state != State::PreparingRebalance {
            return;
        }
        let all_joined = self.members.iter().all(|m| m.joined_this_round);
        let delayed = self.initial_delay_until.map(|t| now < t).unwrap_or(false);
        let expired = self.rebalance_deadline.map(|t| now >= t).unwrap_or(false);
        if !(expired || (all_joined && !delayed)) {
            return;
        }
        self.members.retain(|m| m.joined_this_round);
        self.generation += 1;
        self.initial_delay_until = None;
        self.rebalance_deadline = None;
        if self.members.is_empty() {
            self.state = State::Empty;
            self.protocol = None;
            self.leader = None;
            return;
        }
        self.protocol = self.select_protocol();
        if self
            .leader
            .as_ref()
            .map(|l| self.member(l).is_none())
            .unwrap_or(true)
        {
            self.leader = Some(self.members[0].id.clone());
        }
        self.state = State::CompletingRebalance;
        let protocol = self.protocol.clone().unwrap_or_default();
        let leader = self.leader.clone().unwrap_or_default();
        let all: Vec<(String, Option<String>, Bytes)> = self
            .members
            .iter()
            .map(|m| {
                (
                    m.id.clone(),
                    m.instance_id.clone(),
                    m.metadata_for(&protocol),
                )
            })
            .collect();
        let (generation, protocol_type) = (self.generation, self.protocol_type.clone());
        for m in &mut self.members {
            m.joined_this_round = false;
            m.assignment = Bytes::new();
            m.last_heartbeat = now;
            if let Some(w) = m.join_waiter.take() {
                let _ = w.try_send(JoinOutcome {
                    error: 0,
                    generation,
                    protocol_type: protocol_type.clone(),
                    protocol: Some(protocol.clone()),
                    leader: leader.clone(),
                    member_id: m.id.clone(),
                    members: if m.id == leader { all.clone() } else { vec![] },
                    skip_assignment: false,
                });
            }
        }
    }

    fn remove_member(&mut self, id: &str, now: Instant) {
        self.members.retain(|m| m.id != id);
        match self.state {
            State::Stable | State::CompletingRebalance => {
                if self.members.is_empty() {
                    self.state = State::Empty;
                    self.generation += 1;
                    self.protocol = None;
                    self.leader = None;
                } else {
                    self.prepare_rebalance(Duration::ZERO);
                }
            }
            State::PreparingRebalance => self.maybe_complete_join(now),
            State::Empty => {}
        }
    }
}

/// Topics of a consumer-protocol subscription (`ConsumerProtocolSubscription`: version i16,
/// topics as an array of strings, …).
pub fn consumer_subscription(mut meta: Bytes) -> Vec<String> {
    let mut out = Vec::new();
    if meta.remaining() < 6 {
        return out;
    }
    let _version = meta.get_i16();
    let n = meta.get_i32();
    for _ in 0..n.max(0) {
        if meta.remaining() < 2 {
            break;
        }
        let len = meta.get_i16();
        if len < 0 || meta.remaining() < len as usize {
            break;
        }
        let s = meta.split_to(len as usize);
        out.push(String::from_utf8_lossy(&s).into_owned());
    }
    out
}

/// The coordinator of this shard.
pub struct Coordinator {
    groups: RefCell<HashMap<String, Group>>,
    loaded: Cell<bool>,
}

thread_local! {
    static LOCAL: Rc<Coordinator> = Rc::new(Coordinator { groups: RefCell::new(HashMap::new()), loaded: Cell::new(false) });
}

pub fn local() -> Rc<Coordinator> {
    LOCAL.with(|c| c.clone())
}

fn initial_delay() -> Duration {
    Duration::from_millis(
        shard::local()
            .broker
            .config
            .group_initial_rebalance_delay_ms,
    )
}

fn new_member_id(client_id: &str) -> String {
    format!(
        "{}-{}",
        if client_id.is_empty() {
            "member"
        } else {
            client_id
        },
        uuid::Uuid::new_v4()
    )
}

impl Coordinator {
    pub fn is_loaded(&self) -> bool {
        self.loaded.get()
    }

    pub async fn join(&self, a: JoinArgs) -> JoinOutcome {
        if !self.loaded.get() {
            return JoinOutcome::error(
                code(ResponseError::CoordinatorLoadInProgress),
                &a.member_id,
            );
        }
        if a.group_id.is_empty() {
            return JoinOutcome::error(code(ResponseError::InvalidGroupId), &a.member_id);
        }
        if a.session_timeout_ms < SESSION_TIMEOUT_MS_MIN
            || a.session_timeout_ms > SESSION_TIMEOUT_MS_MAX
        {
            return JoinOutcome::error(code(ResponseError::InvalidSessionTimeout), &a.member_id);
        }
        let now = Instant::now();
        let rx = {
            let mut groups = self.groups.borrow_mut();
            let g = groups.entry(a.group_id.clone()).or_insert_with(Group::new);
            if !g.supports(&a.protocol_type, &a.protocols) {
                return JoinOutcome::error(
                    code(ResponseError::InconsistentGroupProtocol),
                    &a.member_id,
                );
            }
            let mut member_id = a.member_id.clone();
            if member_id.is_empty() {
                match &a.instance_id {
                    Some(inst) if g.by_instance(inst).is_some() => {
                        // KIP-345: a static member restarting takes over its old identity.
                        let old = g
                            .by_instance(inst)
                            .map(|m| m.id.clone())
                            .unwrap_or_default();
                        let new_id = format!("{inst}-{}", uuid::Uuid::new_v4());
                        let unchanged = g
                            .member(&old)
                            .map(|m| m.protocols == a.protocols)
                            .unwrap_or(false);
                        if let Some(m) = g.member_mut(&old) {
                            m.id = new_id.clone();
                            m.last_heartbeat = now;
                            if let Some(w) = m.join_waiter.take() {
                                let _ = w.try_send(JoinOutcome::error(
                                    code(ResponseError::FencedInstanceId),
                                    &old,
                                ));
                            }
                        }
                        let was_leader = g.leader.as_deref() == Some(old.as_str());
                        if was_leader {
                            g.leader = Some(new_id.clone());
                        }
                        // Kafka answers a restarted static leader with the member list and no
                        // rebalance; v9+ also tells it to skip the assignor (KIP-814).
                        if g.state == State::Stable && unchanged {
                            let protocol = g.protocol.clone().unwrap_or_default();
                            let members = if was_leader {
                                g.members
                                    .iter()
                                    .map(|m| {
                                        (
                                            m.id.clone(),
                                            m.instance_id.clone(),
                                            m.metadata_for(&protocol),
                                        )
                                    })
                                    .collect()
                            } else {
                                vec![]
                            };
                            return JoinOutcome {
                                error: 0,
                                generation: g.generation,
                                protocol_type: g.protocol_type.clone(),
                                protocol: g.protocol.clone(),
                                leader: g.leader.clone().unwrap_or_default(),
                                member_id: new_id,
                                members,
                                skip_assignment: was_leader,
                            };
                        }
                        member_id = new_id;
                    }
                    Some(_) => member_id = new_member_id(&a.client_id),
                    None if a.version >= 4 => {
                        // KIP-394: hand out an id first so a retried join is not a second member.
                        let id = new_member_id(&a.client_id);
                        g.pending.insert(id.clone());
                        return JoinOutcome::error(code(ResponseError::MemberIdRequired), &id);
                    }
                    None => member_id = new_member_id(&a.client_id),
                }
            } else if g.member(&member_id).is_none() && !g.pending.remove(&member_id) {
                return JoinOutcome::error(code(ResponseError::UnknownMemberId), &member_id);
            } else if let Some(inst) = &a.instance_id {
                if g.by_instance(inst)
                    .map(|m| m.id != member_id)
                    .unwrap_or(false)
                {
                    return JoinOutcome::error(code(ResponseError::FencedInstanceId), &member_id);
                }
            }

            let (tx, rx) = async_channel::bounded(1);
            let existing = g.member(&member_id).is_some();
            let metadata_changed = g
                .member(&member_id)
                .map(|m| m.protocols != a.protocols)
                .unwrap_or(true);
            if g.members.is_empty() {
                g.protocol_type = Some(a.protocol_type.clone());
            }
            if existing {
                let m = g.member_mut(&member_id).expect("exists");
                m.protocols = a.protocols.clone();
                m.session_timeout = Duration::from_millis(a.session_timeout_ms as u64);
                m.rebalance_timeout =
                    Duration::from_millis(a.rebalance_timeout_ms.max(a.session_timeout_ms) as u64);
                m.last_heartbeat = now;
                if let Some(old) = m.join_waiter.replace(tx) {
                    let _ = old.try_send(JoinOutcome::error(
                        code(ResponseError::UnknownMemberId),
                        &member_id,
                    ));
                }
                m.joined_this_round = true;
            } else {
                g.members.push(Member {
                    id: member_id.clone(),
                    instance_id: a.instance_id.clone(),
                    client_id: a.client_id.clone(),
                    client_host: a.client_host.clone(),
                    session_timeout: Duration::from_millis(a.session_timeout_ms as u64),
                    rebalance_timeout: Duration::from_millis(
                        a.rebalance_timeout_ms.max(a.session_timeout_ms) as u64,
                    ),
                    protocols: a.protocols.clone(),
                    assignment: Bytes::new(),
                    last_heartbeat: now,
                    joined_this_round: true,
                    join_waiter: Some(tx),
                    sync_waiter: None,
                });
            }
            let is_leader = g.leader.as_deref() == Some(member_id.as_str());
            match g.state {
                State::Empty => g.prepare_rebalance(initial_delay()),
                State::PreparingRebalance => {}
                State::CompletingRebalance | State::Stable => {
                    if !existing || metadata_changed || is_leader {
                        g.prepare_rebalance(Duration::ZERO);
                    } else {
                        // A follower rejoining with the same metadata gets the current generation.
                        let m = g.member_mut(&member_id).expect("exists");
                        m.join_waiter = None;
                        m.joined_this_round = false;
                        return JoinOutcome {
                            error: 0,
                            generation: g.generation,
                            protocol_type: g.protocol_type.clone(),
                            protocol: g.protocol.clone(),
                            leader: g.leader.clone().unwrap_or_default(),
                            member_id,
                            members: vec![],
                            skip_assignment: false,
                        };
                    }
                }
            }
            g.maybe_complete_join(now);
            rx
        };
        rx.recv().await.unwrap_or_else(|_| {
            JoinOutcome::error(code(ResponseError::UnknownServerError), &a.member_id)
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn sync(
        &self,
        group_id: &str,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
        protocol_type: Option<&str>,
        protocol_name: Option<&str>,
        assignments: Vec<(String, Bytes)>,
    ) -> SyncOutcome {
        let err = |e: ResponseError| SyncOutcome {
            error: code(e),
            ..Default::default()
        };
        if !self.loaded.get() {
            return err(ResponseError::CoordinatorLoadInProgress);
        }
        let rx = {
            let mut groups = self.groups.borrow_mut();
            let Some(g) = groups.get_mut(group_id) else {
                return err(ResponseError::UnknownMemberId);
            };
            if let Err(c) = g.check_member(member_id, instance_id, Some(generation)) {
                return SyncOutcome {
                    error: c,
                    ..Default::default()
                };
            }
            if protocol_type
                .map(|p| Some(p) != g.protocol_type.as_deref())
                .unwrap_or(false)
                || protocol_name
                    .map(|p| Some(p) != g.protocol.as_deref())
                    .unwrap_or(false)
            {
                return err(ResponseError::InconsistentGroupProtocol);
            }
            let ok = |g: &Group, id: &str| SyncOutcome {
                error: 0,
                protocol_type: g.protocol_type.clone(),
                protocol: g.protocol.clone(),
                assignment: g
                    .member(id)
                    .map(|m| m.assignment.clone())
                    .unwrap_or_default(),
            };
            match g.state {
                State::Empty => return err(ResponseError::UnknownMemberId),
                State::PreparingRebalance => return err(ResponseError::RebalanceInProgress),
                State::Stable => return ok(g, member_id),
                State::CompletingRebalance => {}
            }
            if g.leader.as_deref() == Some(member_id) {
                let given: HashMap<String, Bytes> = assignments.into_iter().collect();
                for m in &mut g.members {
                    m.assignment = given.get(&m.id).cloned().unwrap_or_default();
                }
                g.state = State::Stable;
                let waiting: Vec<(String, async_channel::Sender<SyncOutcome>)> = g
                    .members
                    .iter_mut()
                    .filter_map(|m| m.sync_waiter.take().map(|w| (m.id.clone(), w)))
                    .collect();
                for (id, w) in waiting {
                    let _ = w.try_send(ok(g, &id));
                }
                return ok(g, member_id);
            }
            let (tx, rx) = async_channel::bounded(1);
            if let Some(m) = g.member_mut(member_id) {
                m.sync_waiter = Some(tx);
            }
            rx
        };
        rx.recv()
            .await
            .unwrap_or_else(|_| err(ResponseError::RebalanceInProgress))
    }

    pub fn heartbeat(
        &self,
        group_id: &str,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> i16 {
        if !self.loaded.get() {
            return code(ResponseError::CoordinatorLoadInProgress);
        }
        let mut groups = self.groups.borrow_mut();
        let Some(g) = groups.get_mut(group_id) else {
            return code(ResponseError::UnknownMemberId);
        };
        if let Err(c) = g.check_member(member_id, instance_id, None) {
            return c;
        }
        if let Some(m) = g.member_mut(member_id) {
            m.last_heartbeat = Instant::now();
        }
        if generation != g.generation {
            return code(ResponseError::IllegalGeneration);
        }
        match g.state {
            State::Stable => 0,
            State::PreparingRebalance | State::CompletingRebalance => {
                code(ResponseError::RebalanceInProgress)
            }
            State::Empty => code(ResponseError::UnknownMemberId),
        }
    }

    /// LeaveGroup for `(member id, instance id)` pairs; returns (top-level error, per-member errors).
    pub fn leave(&self, group_id: &str, members: &[(String, Option<String>)]) -> (i16, Vec<i16>) {
        if !self.loaded.get() {
            return (code(ResponseError::CoordinatorLoadInProgress), vec![]);
        }
        let mut groups = self.groups.borrow_mut();
        let Some(g) = groups.get_mut(group_id) else {
            return (
                code(ResponseError::UnknownMemberId),
                vec![code(ResponseError::UnknownMemberId); members.len()],
            );
        };
        let now = Instant::now();
        let mut errors = Vec::with_capacity(members.len());
        for (member_id, instance) in members {
            let target = match instance {
                Some(inst) => match g.by_instance(inst) {
                    Some(m) if member_id.is_empty() || m.id == *member_id => Ok(m.id.clone()),
                    Some(_) => Err(code(ResponseError::FencedInstanceId)),
                    None => Err(code(ResponseError::UnknownMemberId)),
                },
                None => match g.member(member_id) {
                    Some(m) => Ok(m.id.clone()),
                    None => Err(code(ResponseError::UnknownMemberId)),
                },
            };
            match target {
                Ok(id) => {
                    g.remove_member(&id, now);
                    errors.push(0);
                }
                Err(e) => errors.push(e),
            }
        }
        (0, errors)
    }

    /// Expires members whose session ran out and completes overdue join phases.
    pub fn tick(&self) {
        let now = Instant::now();
        let mut groups = self.groups.borrow_mut();
        for g in groups.values_mut() {
            let expired: Vec<String> = g
                .members
                .iter()
                .filter(|m| {
                    m.join_waiter.is_none()
                        && m.sync_waiter.is_none()
                        && now.duration_since(m.last_heartbeat) > m.session_timeout
                })
                .map(|m| m.id.clone())
                .collect();
            for id in expired {
                tracing::info!(member = %id, "group member session expired");
                g.remove_member(&id, now);
            }
            g.maybe_complete_join(now);
        }
    }

    /// OffsetCommit: validates the member, appends the commits to `__consumer_offsets` (synced),
    /// then applies them. Per-partition errors, or one error for the whole request.
    pub async fn commit(
        &self,
        group_id: &str,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
        offsets: Vec<(String, i32, i64, i32, Option<String>)>,
    ) -> Result<Vec<i16>, i16> {
        if !self.loaded.get() {
            return Err(code(ResponseError::CoordinatorLoadInProgress));
        }
        {
            let mut groups = self.groups.borrow_mut();
            match groups.get(group_id) {
                None if generation < 0 && member_id.is_empty() => {
                    groups.insert(group_id.to_string(), Group::new());
                }
                None => return Err(code(ResponseError::IllegalGeneration)),
                Some(g) if generation < 0 && member_id.is_empty() => {
                    if g.state != State::Empty {
                        return Err(code(ResponseError::UnknownMemberId));
                    }
                }
                Some(g) => {
                    g.check_member(member_id, instance_id, Some(generation))?;
                    match g.state {
                        State::PreparingRebalance | State::CompletingRebalance => {
                            return Err(code(ResponseError::RebalanceInProgress))
                        }
                        State::Empty => return Err(code(ResponseError::UnknownMemberId)),
                        State::Stable => {}
                    }
                }
            }
        }
        let image = shard::local().broker.image();
        let now = now_ms();
        let mut errors = Vec::with_capacity(offsets.len());
        let mut accepted = Vec::new();
        for (topic, partition, offset, epoch, metadata) in offsets {
            let exists = image
                .topic(&topic)
                .map(|t| partition >= 0 && partition < t.partition_count())
                .unwrap_or(false);
            let metadata = metadata.unwrap_or_default();
            let e = if !exists {
                code(ResponseError::UnknownTopicOrPartition)
            } else if metadata.len() > OFFSET_METADATA_BYTES_MAX {
                code(ResponseError::OffsetMetadataTooLarge)
            } else {
                accepted.push((
                    topic,
                    partition,
                    Committed {
                        offset,
                        leader_epoch: epoch,
                        metadata,
                        commit_timestamp_ms: now,
                    },
                ));
                0
            };
            errors.push(e);
        }
        if accepted.is_empty() {
            return Ok(errors);
        }
        let recs: Vec<(OffsetKey, Option<OffsetValue>)> = accepted
            .iter()
            .map(|(t, p, c)| {
                (
                    OffsetKey {
                        group: group_id.to_string(),
                        topic: t.clone(),
                        partition: *p,
                    },
                    Some(OffsetValue {
                        offset: c.offset,
                        leader_epoch: c.leader_epoch,
                        metadata: c.metadata.clone(),
                        commit_timestamp_ms: c.commit_timestamp_ms,
                    }),
                )
            })
            .collect();
        if let Err(e) = append_records(group_id, &recs).await {
            tracing::warn!(group = group_id, error = %e, "offset commit not persisted");
            let c = code(ResponseError::KafkaStorageError);
            return Ok(errors
                .into_iter()
                .map(|x| if x == 0 { c } else { x })
                .collect());
        }
        let mut groups = self.groups.borrow_mut();
        if let Some(g) = groups.get_mut(group_id) {
            for (t, p, c) in accepted {
                g.offsets.insert((t, p), c);
            }
        }
        Ok(errors)
    }

    /// Committed offsets of a group: all of them when `topics` is `None`.
    pub fn fetch_offsets(
        &self,
        group_id: &str,
        topics: Option<Vec<(String, Vec<i32>)>>,
    ) -> Result<Vec<(String, Vec<(i32, Option<Committed>)>)>, i16> {
        if !self.loaded.get() {
            return Err(code(ResponseError::CoordinatorLoadInProgress));
        }
        let groups = self.groups.borrow();
        let g = groups.get(group_id);
        Ok(match topics {
            Some(ts) => ts
                .into_iter()
                .map(|(t, ps)| {
                    let v = ps
                        .into_iter()
                        .map(|p| (p, g.and_then(|g| g.offsets.get(&(t.clone(), p)).cloned())))
                        .collect();
                    (t, v)
                })
                .collect(),
            None => {
                let mut by_topic: BTreeMap<String, Vec<(i32, Option<Committed>)>> = BTreeMap::new();
                if let Some(g) = g {
                    for ((t, p), c) in &g.offsets {
                        by_topic
                            .entry(t.clone())
                            .or_default()
                            .push((*p, Some(c.clone())));
                    }
                }
                by_topic.into_iter().collect()
            }
        })
    }

    /// DescribeGroups: (state, protocol type, protocol, members as
    /// (id, instance, client id, host, metadata, assignment)); `None` if unknown.
    #[allow(clippy::type_complexity)]
    pub fn describe(
        &self,
        group_id: &str,
    ) -> Option<(
        State,
        String,
        String,
        Vec<(String, Option<String>, String, String, Bytes, Bytes)>,
    )> {
        let groups = self.groups.borrow();
        let g = groups.get(group_id)?;
        let protocol = g.protocol.clone().unwrap_or_default();
        let members = g
            .members
            .iter()
            .map(|m| {
                (
                    m.id.clone(),
                    m.instance_id.clone(),
                    m.client_id.clone(),
                    m.client_host.clone(),
                    m.metadata_for(&protocol),
                    m.assignment.clone(),
                )
            })
            .collect();
        Some((
            g.state,
            g.protocol_type.clone().unwrap_or_default(),
            protocol,
            members,
        ))
    }

    /// ListGroups: (group id, protocol type, state).
    pub fn list(&self) -> Vec<(String, String, State)> {
        self.groups
            .borrow()
            .iter()
            .map(|(id, g)| {
                (
                    id.clone(),
                    g.protocol_type.clone().unwrap_or_default(),
                    g.state,
                )
            })
            .collect()
    }

    /// DeleteGroups for one group: only an empty group can go; its offsets are tombstoned.
    pub async fn delete(&self, group_id: &str) -> i16 {
        if !self.loaded.get() {
            return code(ResponseError::CoordinatorLoadInProgress);
        }
        let keys: Vec<(String, i32)> = {
            let groups = self.groups.borrow();
            match groups.get(group_id) {
                None => return code(ResponseError::GroupIdNotFound),
                Some(g) if g.state != State::Empty => return code(ResponseError::NonEmptyGroup),
                Some(g) => g.offsets.keys().cloned().collect(),
            }
        };
        if let Err(e) = self.tombstone(group_id, &keys).await {
            tracing::warn!(group = group_id, error = %e, "group delete not persisted");
            return code(ResponseError::KafkaStorageError);
        }
        let mut groups = self.groups.borrow_mut();
        if groups
            .get(group_id)
            .map(|g| g.state == State::Empty)
            .unwrap_or(false)
        {
            groups.remove(group_id);
        }
        0
    }

    /// OffsetDelete: drops committed offsets of topics the group does not subscribe to.
    pub async fn delete_offsets(
        &self,
        group_id: &str,
        topics: Vec<(String, Vec<i32>)>,
    ) -> Result<Vec<(String, Vec<(i32, i16)>)>, i16> {
        if !self.loaded.get() {
            return Err(code(ResponseError::CoordinatorLoadInProgress));
        }
        let (subscribed, empty) = {
            let groups = self.groups.borrow();
            let g = groups
                .get(group_id)
                .ok_or(code(ResponseError::GroupIdNotFound))?;
            (g.subscribed_topics(), g.state == State::Empty)
        };
        let mut out = Vec::new();
        let mut keys = Vec::new();
        for (t, ps) in topics {
            let busy = !empty && subscribed.contains(&t);
            let errs = ps
                .into_iter()
                .map(|p| {
                    if busy {
                        (p, code(ResponseError::GroupSubscribedToTopic))
                    } else {
                        keys.push((t.clone(), p));
                        (p, 0)
                    }
                })
                .collect();
            out.push((t, errs));
        }
        self.tombstone(group_id, &keys)
            .await
            .map_err(|_| code(ResponseError::KafkaStorageError))?;
        Ok(out)
    }

    async fn tombstone(&self, group_id: &str, keys: &[(String, i32)]) -> Result<(), String> {
        if keys.is_empty() {
            return Ok(());
        }
        let recs: Vec<(OffsetKey, Option<OffsetValue>)> = keys
            .iter()
            .map(|(t, p)| {
                (
                    OffsetKey {
                        group: group_id.to_string(),
                        topic: t.clone(),
                        partition: *p,
                    },
                    None,
                )
            })
            .collect();
        append_records(group_id, &recs).await?;
        if let Some(g) = self.groups.borrow_mut().get_mut(group_id) {
            for k in keys {
                g.offsets.remove(k);
            }
        }
        Ok(())
    }

    /// Drops committed offsets of empty groups older than the retention (tombstones first).
    pub async fn expire_offsets(&self, retention: Duration) {
        let cutoff = now_ms() - retention.as_millis() as i64;
        let victims: Vec<(String, Vec<(String, i32)>)> = self
            .groups
            .borrow()
            .iter()
            .filter(|(_, g)| g.state == State::Empty)
            .map(|(id, g)| {
                (
                    id.clone(),
                    g.offsets
                        .iter()
                        .filter(|(_, c)| c.commit_timestamp_ms < cutoff)
                        .map(|(k, _)| k.clone())
                        .collect::<Vec<_>>(),
                )
            })
            .filter(|(_, ks)| !ks.is_empty())
            .collect();
        for (group, keys) in victims {
            match self.tombstone(&group, &keys).await {
                Ok(()) => {
                    tracing::info!(group = %group, expired = keys.len(), "expired committed offsets")
                }
                Err(e) => tracing::warn!(group = %group, error = %e, "offset expiry not persisted"),
            }
            let mut groups = self.groups.borrow_mut();
            if groups
                .get(&group)
                .map(|g| g.state == State::Empty && g.offsets.is_empty())
                .unwrap_or(false)
            {
                groups.remove(&group);
            }
        }
    }

    /// Rebuilds committed offsets from this shard's `__consumer_offsets` partitions.
    pub async fn load(&self, partitions: Vec<i32>) {
        let shard = shard::local();
        let mut loaded = 0usize;
        for p in partitions {
            let Some(log) = shard.partition(&TopicPartition::new(OFFSETS_TOPIC, p)) else {
                continue;
            };
            let mut next = log.log_start_offset();
            let hw = log.high_watermark();
            while next < hw {
                let r = match log
                    .read(ReadOptions {
                        start: next,
                        bytes_max: 4 << 20,
                    })
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(partition = p, error = %e, "cannot replay committed offsets");
                        break;
                    }
                };
                if r.batches.is_empty() {
                    break;
                }
                for b in r.batches {
                    let mut buf = b.clone();
                    let Ok(sets) = RecordBatchDecoder::decode_all(&mut buf) else {
                        continue;
                    };
                    for set in sets {
                        for rec in set.records {
                            next = Offset(rec.offset + 1).max(next);
                            let Some(k) = rec.key.and_then(records::decode_key) else {
                                continue;
                            };
                            let mut groups = self.groups.borrow_mut();
                            match rec.value.and_then(records::decode_value) {
                                Some(v) => {
                                    let g = groups.entry(k.group).or_insert_with(Group::new);
                                    g.offsets.insert(
                                        (k.topic, k.partition),
                                        Committed {
                                            offset: v.offset,
                                            leader_epoch: v.leader_epoch,
                                            metadata: v.metadata,
                                            commit_timestamp_ms: v.commit_timestamp_ms,
                                        },
                                    );
                                    loaded += 1;
                                }
                                None => {
                                    if let Some(g) = groups.get_mut(&k.group) {
                                        g.offsets.remove(&(k.topic, k.partition));
                                    }
                                }
                            }
                        }
                    }
                    let h = crate::protocol::batch::BatchHeader::parse(&b)
                        .map(|h| h.last_offset().next());
                    if let Ok(n) = h {
                        next = next.max(n);
                    }
                }
            }
        }
        self.groups
            .borrow_mut()
            .retain(|_, g| !g.offsets.is_empty());
        self.loaded.set(true);
        if loaded > 0 {
            tracing::info!(
                shard = shard.id.0,
                commits = loaded,
                "group coordinator loaded committed offsets"
            );
        }
    }
}

/// Appends offset records (tombstones when the value is `None`) for `group_id` to its
/// `__consumer_offsets` partition and waits for fdatasync.
async fn append_records(
    group_id: &str,
    recs: &[(OffsetKey, Option<OffsetValue>)],
) -> Result<(), String> {
    let tp = TopicPartition::new(OFFSETS_TOPIC, offsets_partition(group_id));
    let log = shard::local()
        .partition(&tp)
        .ok_or_else(|| format!("{tp} is not on this shard"))?;
    let ts = now_ms();
    let records: Vec<Record> = recs
        .iter()
        .enumerate()
        .map(|(i, (k, v))| {
            crate::protocol::plain_record(
                i as i64,
                ts,
                Some(records::encode_key(k)),
                v.as_ref().map(records::encode_value),
            )
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        records.iter(),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .map_err(|e| e.to_string())?;
    log.append(buf, Durability::Synced)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
