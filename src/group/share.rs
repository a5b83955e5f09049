//! KIP-932 share groups: membership through ShareGroupHeartbeat and the server-side `simple`
//! assignment. Sans-IO like the other state machines: every call takes `now_ms` and a view of
//! the topics; records to persist are queued on the coordinator.
//!
//! A share group has an epoch, bumped whenever its membership, a member's subscription or the
//! subscribed topics' partition counts change; then the assignment is computed again for every
//! member. Unlike a consumer group there is no revocation phase: several members may fetch from
//! one partition (the share partition on the partition's leader hands each record to one member
//! at a time), so a member simply gets its new assignment and the group epoch on its next
//! heartbeat.
//!
//! The `simple` assignment of one topic with `P` partitions and `M` subscribed members (sorted
//! by member id): with `M >= P`, member `i` gets partition `i % P` (every partition is shared
//! by about `M / P` members); with `M < P`, partition `j` goes to member `j % M`.

use std::collections::{BTreeMap, BTreeSet};

use kafka_protocol::ResponseError as E;

use crate::types::ErrorCode;

use super::consumer::{Assignment, ConsumerConfig, HeartbeatResult, Topics, SUBSCRIBED_TOPICS_MAX};
use super::coordinator::{Coordinator, CoordinatorConfig, Write};
use super::offsets;

/// Longest member id accepted (KIP-932 ids are client-generated UUIDs, 22-36 characters).
const MEMBER_ID_LEN_MAX: usize = 256;

/// Share-group settings (Kafka's `group.share.*` broker configs).
#[derive(Debug, Clone)]
pub struct ShareConfig {
    pub session_timeout_ms: i32,
    pub heartbeat_interval_ms: i32,
    pub max_size: usize,
    pub record_lock_duration_ms: i64,
    pub delivery_count_limit: u16,
    pub partition_max_record_locks: u32,
}

impl Default for ShareConfig {
    fn default() -> Self {
        let d = &crate::config::DEFAULTS;
        ShareConfig {
            session_timeout_ms: d.group_share_session_timeout_ms as i32,
            heartbeat_interval_ms: d.group_share_heartbeat_interval_ms as i32,
            max_size: d.group_share_max_size as usize,
            record_lock_duration_ms: d.group_share_record_lock_duration_ms as i64,
            delivery_count_limit: d.group_share_delivery_count_limit,
            partition_max_record_locks: d.group_share_partition_max_record_locks,
        }
    }
}

/// Where a share partition starts when the group first reads it (`share.auto.offset.reset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoOffsetReset {
    #[default]
    Latest,
    Earliest,
}

impl AutoOffsetReset {
    pub fn parse(s: &str) -> Option<AutoOffsetReset> {
        match s {
            "latest" => Some(AutoOffsetReset::Latest),
            "earliest" => Some(AutoOffsetReset::Earliest),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            AutoOffsetReset::Latest => "latest",
            AutoOffsetReset::Earliest => "earliest",
        }
    }
}

/// Per-group configs (IncrementalAlterConfigs on a GROUP resource); `None`: the broker default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupConfigs {
    /// `share.auto.offset.reset`.
    pub auto_offset_reset: Option<AutoOffsetReset>,
    /// `share.record.lock.duration.ms`.
    pub record_lock_duration_ms: Option<i32>,
    /// `share.isolation.level`: true for read_committed.
    pub read_committed: Option<bool>,
    /// `share.release.backoff.ms`: a released or expired record waits this long before it is
    /// acquirable again.
    pub release_backoff_ms: Option<i32>,
    /// `share.release.backoff.max.ms`: the back-off doubles with each further delivery up to
    /// this (at least `share.release.backoff.ms`).
    pub release_backoff_max_ms: Option<i32>,
    /// `errors.deadletterqueue.topic.name` (KIP-1191): where records the group rejects or
    /// that reach the delivery-count limit are copied.
    pub dlq_topic: Option<String>,
    /// `errors.deadletterqueue.copy.record.enable` (KIP-1191): copy the record's key and
    /// value into the dead-letter record (default false: headers only).
    pub dlq_copy_record: Option<bool>,
    /// `consumer.session.timeout.ms` (KIP-848 groups; stored apart from a share group's).
    pub consumer_session_timeout_ms: Option<i32>,
    /// `consumer.heartbeat.interval.ms` (KIP-848 groups).
    pub consumer_heartbeat_interval_ms: Option<i32>,
}

/// KIP-1191's group config naming the dead-letter topic.
pub const DLQ_TOPIC_CONFIG: &str = "errors.deadletterqueue.topic.name";
/// KIP-1191's group config for copying the record's key and value.
pub const DLQ_COPY_RECORD_CONFIG: &str = "errors.deadletterqueue.copy.record.enable";

/// A share group's dead-letter settings, as the share partitions of the group use them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub topic: String,
    pub copy_record: bool,
}

/// Longest release back-off a group may set (`share.release.backoff.ms` and its max): a day,
/// beyond which a record is better parked elsewhere than held in the in-flight window.
pub const RELEASE_BACKOFF_MS_MAX: i32 = 86_400_000;

/// The group configs Sluice knows, with their types (for DescribeConfigs and validation).
pub const GROUP_CONFIG_KEYS: &[&str] = &[
    "consumer.heartbeat.interval.ms",
    "consumer.session.timeout.ms",
    "share.auto.offset.reset",
    "share.record.lock.duration.ms",
    "share.isolation.level",
    "share.release.backoff.ms",
    "share.release.backoff.max.ms",
    DLQ_TOPIC_CONFIG,
    DLQ_COPY_RECORD_CONFIG,
];

impl GroupConfigs {
    /// Sets (`Some`) or removes (`None`) one config; an error names what is wrong.
    pub fn set(&mut self, key: &str, value: Option<&str>) -> Result<(), String> {
        match key {
            "share.auto.offset.reset" => {
                self.auto_offset_reset = match value {
                    None => None,
                    Some(v) => Some(AutoOffsetReset::parse(v).ok_or_else(|| {
                        format!("Invalid value {v} for configuration {key}: latest or earliest expected")
                    })?),
                }
            }
            "share.record.lock.duration.ms" => {
                self.record_lock_duration_ms = match value {
                    None => None,
                    Some(v) => Some(
                        v.parse::<i32>()
                            .ok()
                            .filter(|n| (1_000..=3_600_000).contains(n))
                            .ok_or_else(|| {
                                format!("Invalid value {v} for configuration {key}: 1000-3600000 expected")
                            })?,
                    ),
                }
            }
            "share.isolation.level" => {
                self.read_committed = match value {
                    None => None,
                    Some("read_committed") => Some(true),
                    Some("read_uncommitted") => Some(false),
                    Some(v) => {
                        return Err(format!(
                            "Invalid value {v} for configuration {key}: read_committed or read_uncommitted expected"
                        ))
                    }
                }
            }
            "share.release.backoff.ms" | "share.release.backoff.max.ms" => {
                let v = match value {
                    None => None,
                    Some(v) => Some(
                        v.parse::<i32>()
                            .ok()
                            .filter(|n| (0..=RELEASE_BACKOFF_MS_MAX).contains(n))
                            .ok_or_else(|| {
                                format!("Invalid value {v} for configuration {key}: 0-{RELEASE_BACKOFF_MS_MAX} expected")
                            })?,
                    ),
                };
                if key == "share.release.backoff.ms" {
                    self.release_backoff_ms = v;
                } else {
                    self.release_backoff_max_ms = v;
                }
            }
            DLQ_TOPIC_CONFIG => {
                self.dlq_topic = match value {
                    None | Some("") => None,
                    Some(v) if !crate::metadata::valid_topic_name(v) || v.starts_with("__") => {
                        return Err(format!(
                            "Invalid value {v} for configuration {key}: not a valid name for a user topic"
                        ))
                    }
                    Some(v) => Some(v.to_string()),
                }
            }
            DLQ_COPY_RECORD_CONFIG => {
                self.dlq_copy_record = match value {
                    None => None,
                    Some(v) if v.eq_ignore_ascii_case("true") => Some(true),
                    Some(v) if v.eq_ignore_ascii_case("false") => Some(false),
                    Some(v) => {
                        return Err(format!(
                            "Invalid value {v} for configuration {key}: true or false expected"
                        ))
                    }
                }
            }
            "consumer.session.timeout.ms" | "consumer.heartbeat.interval.ms" => {
                let v = match value {
                    None => None,
                    Some(v) => Some(v.parse::<i32>().ok().filter(|n| *n > 0).ok_or_else(
                        || format!("Invalid value {v} for configuration {key}: a positive int expected"),
                    )?),
                };
                if key == "consumer.session.timeout.ms" {
                    self.consumer_session_timeout_ms = v;
                } else {
                    self.consumer_heartbeat_interval_ms = v;
                }
            }
            _ => return Err(format!("Unknown group config name: {key}")),
        }
        Ok(())
    }

    /// Kafka's `GroupConfig` checks of the KIP-848 configs against the broker's bounds
    /// (`group.consumer.{min,max}.{session.timeout,heartbeat.interval}.ms`); the heartbeat
    /// interval must stay below the session timeout.
    pub fn check_consumer(&self, cfg: &ConsumerConfig) -> Result<(), String> {
        if let Some(v) = self.consumer_session_timeout_ms {
            if !(cfg.session_timeout_ms_min..=cfg.session_timeout_ms_max).contains(&v) {
                return Err(format!(
                    "consumer.session.timeout.ms must be between {} and {} (group.consumer.min.session.timeout.ms, group.consumer.max.session.timeout.ms), got {v}",
                    cfg.session_timeout_ms_min, cfg.session_timeout_ms_max
                ));
            }
        }
        if let Some(v) = self.consumer_heartbeat_interval_ms {
            if !(cfg.heartbeat_interval_ms_min..=cfg.heartbeat_interval_ms_max).contains(&v) {
                return Err(format!(
                    "consumer.heartbeat.interval.ms must be between {} and {} (group.consumer.min.heartbeat.interval.ms, group.consumer.max.heartbeat.interval.ms), got {v}",
                    cfg.heartbeat_interval_ms_min, cfg.heartbeat_interval_ms_max
                ));
            }
        }
        let (session, heartbeat) = self.consumer_timeouts(cfg);
        if heartbeat >= session {
            return Err(format!(
                "consumer.heartbeat.interval.ms ({heartbeat}) must be below consumer.session.timeout.ms ({session})"
            ));
        }
        Ok(())
    }

    /// The session timeout and heartbeat interval a KIP-848 group runs with.
    pub fn consumer_timeouts(&self, cfg: &ConsumerConfig) -> (i32, i32) {
        (
            self.consumer_session_timeout_ms
                .unwrap_or(cfg.session_timeout_ms),
            self.consumer_heartbeat_interval_ms
                .unwrap_or(cfg.heartbeat_interval_ms),
        )
    }

    /// Only the KIP-848 configs (what the group-configs record holds).
    pub fn consumer_part(&self) -> GroupConfigs {
        GroupConfigs {
            consumer_session_timeout_ms: self.consumer_session_timeout_ms,
            consumer_heartbeat_interval_ms: self.consumer_heartbeat_interval_ms,
            ..Default::default()
        }
    }

    /// Whether a share-group config (any but the `consumer.*` ones) is set.
    pub fn has_share(&self) -> bool {
        let share_only = GroupConfigs {
            consumer_session_timeout_ms: None,
            consumer_heartbeat_interval_ms: None,
            ..self.clone()
        };
        share_only != GroupConfigs::default()
    }

    /// The value of `key` as a string, and whether it is set on the group (else the default).
    pub fn get(&self, key: &str, all: &CoordinatorConfig) -> Option<(String, bool)> {
        let cfg = &all.share;
        Some(match key {
            "consumer.session.timeout.ms" => (
                self.consumer_timeouts(&all.consumer).0.to_string(),
                self.consumer_session_timeout_ms.is_some(),
            ),
            "consumer.heartbeat.interval.ms" => (
                self.consumer_timeouts(&all.consumer).1.to_string(),
                self.consumer_heartbeat_interval_ms.is_some(),
            ),
            "share.auto.offset.reset" => (
                self.auto_offset_reset
                    .unwrap_or_default()
                    .name()
                    .to_string(),
                self.auto_offset_reset.is_some(),
            ),
            "share.record.lock.duration.ms" => (
                self.record_lock_duration_ms
                    .map(|v| v as i64)
                    .unwrap_or(cfg.record_lock_duration_ms)
                    .to_string(),
                self.record_lock_duration_ms.is_some(),
            ),
            "share.isolation.level" => (
                if self.read_committed == Some(true) {
                    "read_committed"
                } else {
                    "read_uncommitted"
                }
                .to_string(),
                self.read_committed.is_some(),
            ),
            "share.release.backoff.ms" => (
                self.release_backoff_ms.unwrap_or(0).to_string(),
                self.release_backoff_ms.is_some(),
            ),
            "share.release.backoff.max.ms" => (
                self.release_backoff_max_ms
                    .unwrap_or(0)
                    .max(self.release_backoff_ms.unwrap_or(0))
                    .to_string(),
                self.release_backoff_max_ms.is_some(),
            ),
            DLQ_TOPIC_CONFIG => (
                self.dlq_topic.clone().unwrap_or_default(),
                self.dlq_topic.is_some(),
            ),
            DLQ_COPY_RECORD_CONFIG => (
                self.dlq_copy_record.unwrap_or(false).to_string(),
                self.dlq_copy_record.is_some(),
            ),
            _ => return None,
        })
    }

    /// The group's dead-letter topic and copy flag, if it has a dead-letter topic.
    pub fn dead_letter(&self) -> Option<DeadLetter> {
        self.dlq_topic.as_ref().map(|t| DeadLetter {
            topic: t.clone(),
            copy_record: self.dlq_copy_record.unwrap_or(false),
        })
    }

    /// The settings a share partition of this group runs with.
    pub fn effective(&self, cfg: &ShareConfig) -> PartitionSettings {
        PartitionSettings {
            auto_offset_reset: self.auto_offset_reset.unwrap_or_default(),
            lock_duration_ms: self
                .record_lock_duration_ms
                .map(|v| v as i64)
                .unwrap_or(cfg.record_lock_duration_ms),
            delivery_count_limit: cfg.delivery_count_limit,
            max_record_locks: cfg.partition_max_record_locks,
            read_committed: self.read_committed.unwrap_or(false),
            release_backoff_ms: self.release_backoff_ms.unwrap_or(0) as i64,
            release_backoff_max_ms: self.release_backoff_max_ms.unwrap_or(0) as i64,
            dead_letter: self.dlq_topic.is_some(),
        }
    }
}

/// What a share partition needs from its group's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionSettings {
    pub auto_offset_reset: AutoOffsetReset,
    pub lock_duration_ms: i64,
    pub delivery_count_limit: u16,
    pub max_record_locks: u32,
    pub read_committed: bool,
    pub release_backoff_ms: i64,
    pub release_backoff_max_ms: i64,
    /// The group has a dead-letter topic: rejected records and those at the delivery-count
    /// limit wait in the share partition until they are copied there.
    pub dead_letter: bool,
}

impl PartitionSettings {
    /// The back-off after the `delivery_count`-th delivery was released or expired:
    /// `share.release.backoff.ms`, doubled for each delivery after the first, capped at
    /// `share.release.backoff.max.ms` (never below the base). 0: none.
    pub fn release_backoff(&self, delivery_count: i16) -> i64 {
        let base = self.release_backoff_ms.max(0);
        let cap = self.release_backoff_max_ms.max(base);
        let doublings = (delivery_count.max(1) - 1).min(32) as u32;
        base.saturating_mul(1i64 << doublings).min(cap)
    }
}

impl Default for PartitionSettings {
    fn default() -> Self {
        GroupConfigs::default().effective(&ShareConfig::default())
    }
}

#[derive(Debug, Clone)]
pub struct ShareMember {
    pub id: String,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub subscribed: Vec<String>,
    pub epoch: i32,
    pub assigned: Assignment,
    /// The assignment was not sent since it last changed.
    pub send_assignment: bool,
    pub session_deadline_ms: i64,
}

#[derive(Debug, Clone, Default)]
pub struct ShareGroup {
    pub epoch: i32,
    pub assignment_epoch: i32,
    pub members: BTreeMap<String, ShareMember>,
    /// Partition counts of the subscribed topics when the assignment was computed.
    pub subscribed_meta: BTreeMap<String, ([u8; 16], i32)>,
    pub configs: GroupConfigs,
}

impl ShareGroup {
    pub fn state_name(&self) -> &'static str {
        if self.members.is_empty() {
            "Empty"
        } else {
            "Stable"
        }
    }
}

pub struct ShareHeartbeat {
    pub group_id: String,
    pub member_id: String,
    pub member_epoch: i32,
    pub rack_id: Option<String>,
    pub subscribed_topic_names: Option<Vec<String>>,
    pub client_id: String,
    pub client_host: String,
}

pub struct ShareMemberDescription {
    pub member_id: String,
    pub rack_id: Option<String>,
    pub member_epoch: i32,
    pub client_id: String,
    pub client_host: String,
    pub subscribed_topic_names: Vec<String>,
    pub assignment: Vec<([u8; 16], String, Vec<i32>)>,
}

pub struct ShareGroupDescription {
    pub error: ErrorCode,
    pub message: Option<String>,
    pub group_id: String,
    pub state: &'static str,
    pub group_epoch: i32,
    pub assignment_epoch: i32,
    pub members: Vec<ShareMemberDescription>,
}

/// The `simple` assignment (module docs).
pub fn assign_simple(
    members: &BTreeMap<String, ShareMember>,
    topics: &BTreeMap<String, ([u8; 16], i32)>,
) -> BTreeMap<String, Assignment> {
    let mut out: BTreeMap<String, Assignment> = members
        .keys()
        .map(|m| (m.clone(), Assignment::new()))
        .collect();
    for (name, (id, count)) in topics {
        let subs: Vec<&String> = members
            .values()
            .filter(|m| m.subscribed.iter().any(|s| s == name))
            .map(|m| &m.id)
            .collect();
        let (m, p) = (subs.len(), (*count).max(0) as usize);
        if m == 0 || p == 0 {
            continue;
        }
        if m >= p {
            for (i, mid) in subs.iter().enumerate() {
                let a = out.get_mut(*mid).expect("every member has an entry");
                a.entry(*id).or_default().insert((i % p) as i32);
            }
        } else {
            for j in 0..p {
                let a = out.get_mut(subs[j % m]).expect("every member has an entry");
                a.entry(*id).or_default().insert(j as i32);
            }
        }
    }
    out
}

fn subscribed_meta(g: &ShareGroup, topics: &dyn Topics) -> BTreeMap<String, ([u8; 16], i32)> {
    let names: BTreeSet<&String> = g.members.values().flat_map(|m| &m.subscribed).collect();
    names
        .into_iter()
        .filter_map(|n| topics.by_name(n).map(|m| (n.clone(), m)))
        .collect()
}

/// Recomputes the assignment when the epoch moved past it or the topics changed; returns
/// whether the group epoch was bumped.
fn refresh(g: &mut ShareGroup, topics: &dyn Topics, mut bump: bool) -> bool {
    let meta = subscribed_meta(g, topics);
    if meta != g.subscribed_meta {
        bump = true;
    }
    if !bump && g.assignment_epoch == g.epoch {
        return false;
    }
    if bump {
        g.epoch = g.epoch.wrapping_add(1).max(1);
    }
    g.subscribed_meta = meta;
    let target = assign_simple(&g.members, &g.subscribed_meta);
    for (id, a) in target {
        if let Some(m) = g.members.get_mut(&id) {
            if m.assigned != a {
                m.assigned = a;
                m.send_assignment = true;
            }
        }
    }
    g.assignment_epoch = g.epoch;
    bump
}

impl Coordinator {
    /// ShareGroupHeartbeat (KIP-932): join, heartbeat or leave.
    pub fn share_heartbeat(
        &mut self,
        req: ShareHeartbeat,
        topics: &dyn Topics,
        now_ms: i64,
    ) -> HeartbeatResult {
        let cfg = self.config.share.clone();
        if req.group_id.is_empty() {
            return HeartbeatResult::error(E::InvalidRequest, "GroupId can't be empty.");
        }
        if req.member_id.is_empty() || req.member_id.len() > MEMBER_ID_LEN_MAX {
            return HeartbeatResult::error(
                E::InvalidRequest,
                "MemberId must be a non-empty string of at most 256 bytes.",
            );
        }
        if req.member_epoch < -1 {
            return HeartbeatResult::error(E::InvalidRequest, "MemberEpoch is invalid.");
        }
        if req.member_epoch == 0
            && req
                .subscribed_topic_names
                .as_ref()
                .is_none_or(|n| n.is_empty())
        {
            return HeartbeatResult::error(
                E::InvalidRequest,
                "SubscribedTopicNames must be set in first request.",
            );
        }
        if req
            .subscribed_topic_names
            .as_ref()
            .is_some_and(|n| n.len() > SUBSCRIBED_TOPICS_MAX)
        {
            return HeartbeatResult::error(
                E::InvalidRequest,
                format!("SubscribedTopicNames: at most {SUBSCRIBED_TOPICS_MAX} topics."),
            );
        }
        if self
            .groups
            .get(&req.group_id)
            .is_some_and(|g| g.state != super::state::GroupState::Dead)
        {
            return HeartbeatResult::error(
                E::GroupIdNotFound,
                format!("Group {} is not a share group.", req.group_id),
            );
        }
        let partition = self.partition_of(&req.group_id);
        if !self.share.contains_key(&req.group_id) {
            if req.member_epoch != 0 {
                return HeartbeatResult::error(
                    E::GroupIdNotFound,
                    format!("Group {} not found.", req.group_id),
                );
            }
            self.share
                .insert(req.group_id.clone(), ShareGroup::default());
        }
        let g = self.share.get_mut(&req.group_id).expect("present");
        let gid = req.group_id.clone();
        if req.member_epoch == -1 {
            let left = g.members.remove(&req.member_id).is_some();
            if left {
                refresh(g, topics, true);
                self.writes.push(share_epoch_record(&gid, g, partition));
                self.writes
                    .push(share_member_tombstone(&gid, &req.member_id, partition));
            }
            return HeartbeatResult {
                error: ErrorCode::NONE,
                message: None,
                member_id: Some(req.member_id),
                member_epoch: -1,
                heartbeat_interval_ms: 0,
                assignment: None,
            };
        }
        let mut bump = false;
        let mut member_changed = false;
        match g.members.get_mut(&req.member_id) {
            None => {
                if req.member_epoch != 0 {
                    return HeartbeatResult::error(
                        E::UnknownMemberId,
                        format!(
                            "Member {} is not a member of group {}.",
                            req.member_id, req.group_id
                        ),
                    );
                }
                if g.members.len() >= cfg.max_size {
                    return HeartbeatResult::error(
                        E::GroupMaxSizeReached,
                        format!(
                            "The share group has reached its maximum capacity of {} members.",
                            cfg.max_size
                        ),
                    );
                }
                g.members.insert(
                    req.member_id.clone(),
                    ShareMember {
                        id: req.member_id.clone(),
                        rack_id: req.rack_id.clone(),
                        client_id: req.client_id.clone(),
                        client_host: req.client_host.clone(),
                        subscribed: req.subscribed_topic_names.clone().unwrap_or_default(),
                        epoch: 0,
                        assigned: Assignment::new(),
                        send_assignment: true,
                        session_deadline_ms: 0,
                    },
                );
                bump = true;
                member_changed = true;
            }
            Some(m) => {
                if req.member_epoch != 0 && req.member_epoch != m.epoch {
                    return HeartbeatResult::error(
                        E::FencedMemberEpoch,
                        format!(
                            "The share group member has a smaller or larger member epoch ({}) than the one known by the group coordinator ({}).",
                            req.member_epoch, m.epoch
                        ),
                    );
                }
                if req.member_epoch == 0 {
                    // Rejoining with the same id: send the assignment again.
                    m.send_assignment = true;
                }
                if let Some(names) = &req.subscribed_topic_names {
                    if *names != m.subscribed {
                        m.subscribed = names.clone();
                        bump = true;
                        member_changed = true;
                    }
                }
                if req.rack_id.is_some() && req.rack_id != m.rack_id {
                    m.rack_id = req.rack_id.clone();
                    member_changed = true;
                }
            }
        }
        let bumped = refresh(g, topics, bump);
        let m = g.members.get_mut(&req.member_id).expect("present");
        m.session_deadline_ms = now_ms.saturating_add(cfg.session_timeout_ms as i64);
        if m.epoch != g.epoch {
            m.epoch = g.epoch;
            m.send_assignment = true;
        }
        let assignment = if std::mem::take(&mut m.send_assignment) {
            Some(m.assigned.clone())
        } else {
            None
        };
        let result = HeartbeatResult {
            error: ErrorCode::NONE,
            message: None,
            member_id: Some(m.id.clone()),
            member_epoch: m.epoch,
            heartbeat_interval_ms: cfg.heartbeat_interval_ms,
            assignment,
        };
        let record = member_changed.then(|| share_member_record(&gid, m, partition));
        if bumped {
            self.writes.push(share_epoch_record(&gid, g, partition));
        }
        self.writes.extend(record);
        result
    }

    /// Removes share members whose session expired.
    pub(super) fn share_tick(&mut self, topics: Option<&dyn Topics>, now_ms: i64) {
        let mut writes = vec![];
        for (gid, g) in self.share.iter_mut() {
            let expired: Vec<String> = g
                .members
                .values()
                .filter(|m| m.session_deadline_ms <= now_ms)
                .map(|m| m.id.clone())
                .collect();
            if expired.is_empty() {
                continue;
            }
            let partition = super::coordinator::partition_for(gid, self.config.offsets_partitions);
            for id in &expired {
                tracing::info!(group = %gid, member = %id, "share group member removed: session timeout");
                g.members.remove(id);
                writes.push(share_member_tombstone(gid, id, partition));
            }
            match topics {
                Some(t) => {
                    refresh(g, t, true);
                }
                None => {
                    // No view of the topics: keep the partition counts of the last assignment.
                    g.epoch = g.epoch.wrapping_add(1).max(1);
                    let target = assign_simple(&g.members, &g.subscribed_meta);
                    for (id, a) in target {
                        if let Some(m) = g.members.get_mut(&id) {
                            if m.assigned != a {
                                m.assigned = a;
                                m.send_assignment = true;
                            }
                        }
                    }
                    g.assignment_epoch = g.epoch;
                }
            }
            writes.push(share_epoch_record(gid, g, partition));
        }
        self.writes.extend(writes);
    }

    pub(super) fn share_next_deadline_ms(&self) -> Option<i64> {
        self.share
            .values()
            .flat_map(|g| g.members.values())
            .map(|m| m.session_deadline_ms)
            .min()
    }

    pub fn share_group(&self, group_id: &str) -> Option<&ShareGroup> {
        self.share.get(group_id)
    }

    pub fn share_groups(&self) -> impl Iterator<Item = (&String, &ShareGroup)> {
        self.share.iter()
    }

    /// The settings a share partition of `group_id` runs with (broker defaults for an
    /// unknown group).
    pub fn share_settings(&self, group_id: &str) -> PartitionSettings {
        let cfg = &self.config.share;
        self.share
            .get(group_id)
            .map(|g| g.configs.effective(cfg))
            .unwrap_or_else(|| GroupConfigs::default().effective(cfg))
    }

    /// Whether `member_id` is a current member of share group `group_id`.
    pub fn is_share_member(&self, group_id: &str, member_id: &str) -> bool {
        self.share
            .get(group_id)
            .is_some_and(|g| g.members.contains_key(member_id))
    }

    /// Sets the group configs of a share group (created empty if unknown); a classic or
    /// consumer group of that id is INVALID_GROUP_ID.
    pub fn set_share_configs(
        &mut self,
        group_id: &str,
        configs: GroupConfigs,
    ) -> Result<(), ErrorCode> {
        if self
            .groups
            .get(group_id)
            .is_some_and(|g| g.state != super::state::GroupState::Dead)
        {
            return Err(ErrorCode::new(E::InvalidGroupId));
        }
        let p = self.partition_of(group_id);
        let g = self.share.entry(group_id.to_string()).or_default();
        g.configs = configs;
        let w = share_epoch_record(group_id, g, p);
        self.writes.push(w);
        Ok(())
    }

    /// For the offset admin APIs: the share group `group_id` must have no members (it is
    /// created empty when unknown). NON_EMPTY_GROUP with members, GROUP_ID_NOT_FOUND when the
    /// id is another type of group.
    pub fn share_group_empty(&mut self, group_id: &str, create: bool) -> Result<(), ErrorCode> {
        if self
            .groups
            .get(group_id)
            .is_some_and(|g| g.state != super::state::GroupState::Dead)
        {
            return Err(ErrorCode::new(E::GroupIdNotFound));
        }
        match self.share.get(group_id) {
            Some(g) if !g.members.is_empty() => Err(ErrorCode::new(E::NonEmptyGroup)),
            Some(_) => Ok(()),
            None if create => {
                let p = self.partition_of(group_id);
                let g = self.share.entry(group_id.to_string()).or_default();
                let w = share_epoch_record(group_id, g, p);
                self.writes.push(w);
                Ok(())
            }
            None => Err(ErrorCode::new(E::GroupIdNotFound)),
        }
    }

    pub fn share_configs(&self, group_id: &str) -> GroupConfigs {
        self.share
            .get(group_id)
            .map(|g| g.configs.clone())
            .unwrap_or_default()
    }

    /// Every config of `group_id` (IncrementalAlterConfigs and DescribeConfigs on a GROUP
    /// resource): the share group's `share.*` configs and the KIP-848 `consumer.*` ones.
    pub fn group_configs(&self, group_id: &str) -> GroupConfigs {
        let mut c = self.share_configs(group_id);
        let k = self.consumer_configs.get(group_id);
        c.consumer_session_timeout_ms = k.and_then(|k| k.consumer_session_timeout_ms);
        c.consumer_heartbeat_interval_ms = k.and_then(|k| k.consumer_heartbeat_interval_ms);
        c
    }

    /// Sets every config of `group_id`. The `consumer.*` configs (checked against the broker's
    /// bounds) apply to any group id and are stored in their own record, applied from the
    /// group's next heartbeat; `share.*` configs go to the share group as before (created
    /// empty when unknown; INVALID_GROUP_ID for a classic or consumer group).
    pub fn set_group_configs(
        &mut self,
        group_id: &str,
        configs: GroupConfigs,
    ) -> Result<(), (ErrorCode, String)> {
        configs
            .check_consumer(&self.config.consumer)
            .map_err(|m| (ErrorCode::new(E::InvalidConfig), m))?;
        let is_share = self.share.contains_key(group_id);
        if configs.has_share() || is_share {
            self.set_share_configs(group_id, configs.clone())
                .map_err(|e| (e, format!("group {group_id} is not a share group")))?;
        }
        let consumer = configs.consumer_part();
        let before = self
            .consumer_configs
            .get(group_id)
            .cloned()
            .unwrap_or_default();
        if consumer != before {
            let p = self.partition_of(group_id);
            let value = (consumer != GroupConfigs::default())
                .then(|| offsets::group_configs_value(&consumer));
            self.writes.push(Write {
                partition: p,
                key: offsets::group_configs_key(group_id),
                value,
            });
            self.load_group_configs(group_id, Some(consumer));
        }
        Ok(())
    }

    /// A group-configs record read back (`None`: deleted).
    pub fn load_group_configs(&mut self, group_id: &str, configs: Option<GroupConfigs>) {
        match configs.filter(|c| *c != GroupConfigs::default()) {
            Some(c) => {
                self.consumer_configs.insert(group_id.to_string(), c);
            }
            None => {
                self.consumer_configs.remove(group_id);
            }
        }
    }

    /// Deletes an empty share group (DeleteGroups).
    pub fn delete_share_group(&mut self, group_id: &str) -> Option<ErrorCode> {
        let g = self.share.get(group_id)?;
        if !g.members.is_empty() {
            return Some(ErrorCode::new(E::NonEmptyGroup));
        }
        self.share.remove(group_id);
        let p = self.partition_of(group_id);
        self.writes.push(Write {
            partition: p,
            key: offsets::share_group_key(group_id),
            value: None,
        });
        Some(ErrorCode::NONE)
    }

    /// ShareGroupDescribe for one group.
    pub fn describe_share(&self, group_id: &str, topics: &dyn Topics) -> ShareGroupDescription {
        let Some(g) = self.share.get(group_id) else {
            let (error, message) = if self
                .groups
                .get(group_id)
                .is_some_and(|g| g.state != super::state::GroupState::Dead)
            {
                (
                    E::GroupIdNotFound,
                    format!("Group {group_id} is not a share group."),
                )
            } else {
                (E::GroupIdNotFound, format!("Group {group_id} not found."))
            };
            return ShareGroupDescription {
                error: ErrorCode::new(error),
                message: Some(message),
                group_id: group_id.to_string(),
                state: "Dead",
                group_epoch: -1,
                assignment_epoch: -1,
                members: vec![],
            };
        };
        ShareGroupDescription {
            error: ErrorCode::NONE,
            message: None,
            group_id: group_id.to_string(),
            state: g.state_name(),
            group_epoch: g.epoch,
            assignment_epoch: g.assignment_epoch,
            members: g
                .members
                .values()
                .map(|m| ShareMemberDescription {
                    member_id: m.id.clone(),
                    rack_id: m.rack_id.clone(),
                    member_epoch: m.epoch,
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    subscribed_topic_names: m.subscribed.clone(),
                    assignment: m
                        .assigned
                        .iter()
                        .map(|(t, ps)| {
                            let name = topics.by_id(t).map(|(n, _)| n).unwrap_or_default();
                            (*t, name, ps.iter().copied().collect())
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    // ------------------------------------------------------------------------ replay

    pub fn load_share_group(&mut self, group_id: &str, v: Option<offsets::ShareGroupValue>) {
        match v {
            None => {
                self.share.remove(group_id);
            }
            Some(v) => {
                let g = self.share.entry(group_id.to_string()).or_default();
                g.epoch = v.epoch;
                g.configs = v.configs;
            }
        }
    }

    pub fn load_share_member(
        &mut self,
        group_id: &str,
        member_id: &str,
        v: Option<offsets::ShareMemberValue>,
        now_ms: i64,
    ) {
        let session = self.config.share.session_timeout_ms as i64;
        match v {
            None => {
                if let Some(g) = self.share.get_mut(group_id) {
                    g.members.remove(member_id);
                }
            }
            Some(v) => {
                let g = self.share.entry(group_id.to_string()).or_default();
                // A member read back gets a fresh session: it is removed if it does not
                // heartbeat, as in Kafka after a coordinator fail-over.
                g.members.insert(
                    member_id.to_string(),
                    ShareMember {
                        id: member_id.to_string(),
                        rack_id: v.rack_id,
                        client_id: v.client_id,
                        client_host: v.client_host,
                        subscribed: v.subscribed_topic_names,
                        epoch: 0,
                        assigned: Assignment::new(),
                        send_assignment: true,
                        session_deadline_ms: now_ms.saturating_add(session),
                    },
                );
                // The assignment is computed again at the first heartbeat.
                g.assignment_epoch = -1;
            }
        }
    }
}

fn share_epoch_record(group_id: &str, g: &ShareGroup, partition: i32) -> Write {
    Write {
        partition,
        key: offsets::share_group_key(group_id),
        value: Some(offsets::share_group_value(&offsets::ShareGroupValue {
            epoch: g.epoch,
            configs: g.configs.clone(),
        })),
    }
}

fn share_member_record(group_id: &str, m: &ShareMember, partition: i32) -> Write {
    Write {
        partition,
        key: offsets::share_member_key(group_id, &m.id),
        value: Some(offsets::share_member_value(&offsets::ShareMemberValue {
            rack_id: m.rack_id.clone(),
            client_id: m.client_id.clone(),
            client_host: m.client_host.clone(),
            subscribed_topic_names: m.subscribed.clone(),
        })),
    }
}

fn share_member_tombstone(group_id: &str, member_id: &str, partition: i32) -> Write {
    Write {
        partition,
        key: offsets::share_member_key(group_id, member_id),
        value: None,
    }
}
