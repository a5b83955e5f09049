//! KIP-848 consumer groups: the server-side group protocol of ConsumerGroupHeartbeat. Sans-IO,
//! like the classic state machine: every call takes `now_ms` and a view of the topics, records
//! to persist are queued on the coordinator.
//!
//! A group has an epoch, bumped whenever its membership, a member's subscription or the
//! subscribed topics' metadata change. When the group epoch is ahead of the target assignment's
//! epoch, the server-side assignor (`uniform` or `range`) computes a new target for every member.
//! Each member then converges to its target on its own heartbeats (Kafka's
//! `CurrentAssignmentBuilder`):
//!
//! ```text
//!  Stable ──target changed──▶ partitions to revoke? ──yes──▶ UnrevokedPartitions
//!    ▲                              │ no                        │ member acknowledges (owned
//!    │                              ▼                           │ partitions without them)
//!    └──── all added ◀── epoch := target epoch; add partitions ◀┘
//!                            no other member still holds
//!                            (the rest: UnreleasedPartitions, retried on each heartbeat)
//! ```
//! A partition is given to a member only once no other member holds it (assigned or pending
//! revocation), so two members never own one partition at the same time.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kafka_protocol::ResponseError as E;

use crate::types::ErrorCode;

use super::coordinator::{Coordinator, Write};
use super::offsets::{self, ConsumerMemberValue, CurrentAssignmentValue};
use super::state::{Group, GroupState};

/// Topic id → partitions. Keyed by topic id as the protocol is, so a deleted and re-created
/// topic is a different topic.
pub type Assignment = BTreeMap<[u8; 16], BTreeSet<i32>>;

/// The assignors a group may use (`group.consumer.assignors`), the first the default.
pub const ASSIGNORS: &[&str] = crate::config::CONSUMER_GROUP_ASSIGNORS;

/// Largest compiled subscription regex: bounds the memory one member's regex may take.
const REGEX_BYTES_MAX: usize = 1 << 20;
/// Longest subscription regex accepted, in bytes.
const REGEX_LEN_MAX: usize = 4096;
/// Most topic names one member may subscribe to by name: bounds the member's record.
pub const SUBSCRIBED_TOPICS_MAX: usize = 10_000;

/// What the coordinator needs to know about topics: the metadata image, or a map in tests.
pub trait Topics {
    /// Id and partition count of a topic by name.
    fn by_name(&self, name: &str) -> Option<([u8; 16], i32)>;
    /// Name and partition count of a topic by id.
    fn by_id(&self, id: &[u8; 16]) -> Option<(String, i32)>;
    /// Every topic a regex may match (internal topics excluded, as Kafka does).
    fn names(&self) -> Vec<String>;
    /// The racks of a partition's replicas (empty when brokers have no rack): the assignors
    /// prefer members on one of them.
    fn racks(&self, _id: &[u8; 16], _partition: i32) -> BTreeSet<String> {
        BTreeSet::new()
    }
}

/// No topics at all: for callers that serve classic groups only.
pub struct NoTopics;

impl Topics for NoTopics {
    fn by_name(&self, _: &str) -> Option<([u8; 16], i32)> {
        None
    }
    fn by_id(&self, _: &[u8; 16]) -> Option<(String, i32)> {
        None
    }
    fn names(&self) -> Vec<String> {
        vec![]
    }
}

/// KIP-848 settings (Kafka's `group.consumer.*` broker configs).
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// `group.consumer.session.timeout.ms`.
    pub session_timeout_ms: i32,
    /// `group.consumer.heartbeat.interval.ms`.
    pub heartbeat_interval_ms: i32,
    /// `group.consumer.min.session.timeout.ms` / `group.consumer.max.session.timeout.ms`: the
    /// bounds of a group's `consumer.session.timeout.ms`.
    pub session_timeout_ms_min: i32,
    pub session_timeout_ms_max: i32,
    /// `group.consumer.min.heartbeat.interval.ms` / `group.consumer.max.heartbeat.interval.ms`.
    pub heartbeat_interval_ms_min: i32,
    pub heartbeat_interval_ms_max: i32,
    /// `group.consumer.assignors`: the first is the default.
    pub assignors: Vec<String>,
    /// `group.consumer.max.size`.
    pub max_size: usize,
    /// `group.consumer.migration.policy`.
    pub migration: MigrationPolicy,
}

/// Kafka's `group.consumer.migration.policy`: whether a classic group with members becomes a
/// consumer group when a consumer-protocol member joins (upgrade), and back when the last
/// consumer-protocol member leaves (downgrade). Empty groups change type under every policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MigrationPolicy {
    #[default]
    Bidirectional,
    Upgrade,
    Downgrade,
    Disabled,
}

impl MigrationPolicy {
    pub fn parse(s: &str) -> Option<MigrationPolicy> {
        match s.to_ascii_lowercase().as_str() {
            "bidirectional" => Some(MigrationPolicy::Bidirectional),
            "upgrade" => Some(MigrationPolicy::Upgrade),
            "downgrade" => Some(MigrationPolicy::Downgrade),
            "disabled" => Some(MigrationPolicy::Disabled),
            _ => None,
        }
    }
    pub fn upgrade(self) -> bool {
        matches!(
            self,
            MigrationPolicy::Bidirectional | MigrationPolicy::Upgrade
        )
    }
    pub fn downgrade(self) -> bool {
        matches!(
            self,
            MigrationPolicy::Bidirectional | MigrationPolicy::Downgrade
        )
    }
}

impl ConsumerConfig {
    /// Kafka's default bounds for group-level overrides, widened to include the broker's own
    /// session timeout and heartbeat interval (so a broker run with shorter ones, as tests do,
    /// accepts group overrides around them).
    pub fn with_bounds_around_defaults(mut self) -> ConsumerConfig {
        let d = ConsumerConfig::default();
        self.session_timeout_ms_min = d.session_timeout_ms_min.min(self.session_timeout_ms);
        self.session_timeout_ms_max = d.session_timeout_ms_max.max(self.session_timeout_ms);
        self.heartbeat_interval_ms_min =
            d.heartbeat_interval_ms_min.min(self.heartbeat_interval_ms);
        self.heartbeat_interval_ms_max =
            d.heartbeat_interval_ms_max.max(self.heartbeat_interval_ms);
        self
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            session_timeout_ms: 45_000,
            heartbeat_interval_ms: 5_000,
            session_timeout_ms_min: 45_000,
            session_timeout_ms_max: 60_000,
            heartbeat_interval_ms_min: 5_000,
            heartbeat_interval_ms_max: 15_000,
            assignors: ASSIGNORS.iter().map(|s| s.to_string()).collect(),
            max_size: i32::MAX as usize,
            migration: MigrationPolicy::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// At its target: nothing to revoke or to add.
    Stable,
    /// Must revoke `revoking` before its epoch advances.
    UnrevokedPartitions,
    /// At the target epoch, but some partitions of its target are still held by others.
    UnreleasedPartitions,
}

impl MemberState {
    /// Kafka's `MemberState` ids as stored in the current-assignment record.
    pub fn id(self) -> i8 {
        match self {
            MemberState::Stable => 0,
            MemberState::UnrevokedPartitions => 1,
            MemberState::UnreleasedPartitions => 2,
        }
    }
    pub fn from_id(id: i8) -> MemberState {
        match id {
            1 => MemberState::UnrevokedPartitions,
            2 => MemberState::UnreleasedPartitions,
            _ => MemberState::Stable,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ConsumerMember {
    pub id: String,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: i32,
    pub subscribed_names: Vec<String>,
    pub subscribed_regex: Option<String>,
    pub server_assignor: Option<String>,
    pub epoch: i32,
    pub previous_epoch: i32,
    pub state: MemberState,
    pub assigned: Assignment,
    pub revoking: Assignment,
    /// Removed (fenced) when it has not heartbeated by then.
    pub session_deadline_ms: i64,
    /// Fenced when it has not acknowledged a revocation by then.
    pub revocation_deadline_ms: Option<i64>,
    /// The assignment changed since the member was last told.
    pub send_assignment: bool,
    /// A static member that left with epoch -2: keeps its partitions until its session expires
    /// or the same instance rejoins.
    pub left_static: bool,
    /// Set for a member that speaks the classic protocol (JoinGroup/SyncGroup/Heartbeat).
    pub classic: Option<ClassicInfo>,
}

impl ConsumerMember {
    fn new(id: String) -> ConsumerMember {
        ConsumerMember {
            id,
            instance_id: None,
            rack_id: None,
            client_id: String::new(),
            client_host: String::new(),
            rebalance_timeout_ms: -1,
            subscribed_names: vec![],
            subscribed_regex: None,
            server_assignor: None,
            epoch: 0,
            previous_epoch: -1,
            state: MemberState::Stable,
            assigned: Assignment::new(),
            revoking: Assignment::new(),
            session_deadline_ms: 0,
            revocation_deadline_ms: None,
            send_assignment: true,
            left_static: false,
            classic: None,
        }
    }
}

/// The KIP-848 part of a group; the offsets stay in [`Group`].
#[derive(Debug, Clone, Default)]
pub struct ConsumerGroup {
    pub epoch: i32,
    pub assignment_epoch: i32,
    /// The assignor of the current target assignment.
    pub assignor: String,
    pub members: BTreeMap<String, ConsumerMember>,
    /// instance id → member id.
    pub static_members: HashMap<String, String>,
    pub target: HashMap<String, Assignment>,
    /// The subscribed topics as last seen (name → id, partitions): a change bumps the epoch.
    pub subscribed_meta: BTreeMap<String, ([u8; 16], i32)>,
    /// The subscription regexes the coordinator has resolved. As in Kafka, a regex is resolved
    /// after the heartbeat that brings it, not in it: that heartbeat's assignment holds the
    /// member's topics by name only, and the regex's topics come with the next heartbeat of the
    /// group (Kafka resolves it in the background and bumps the group epoch). Not persisted:
    /// the regexes of members replayed at start-up resolve at the group's first heartbeat.
    pub resolved_regexes: BTreeSet<String>,
}

impl ConsumerGroup {
    /// Kafka's consumer group state names.
    pub fn state_name(&self) -> &'static str {
        if self.members.is_empty() {
            "Empty"
        } else if self.assignment_epoch < self.epoch {
            "Assigning"
        } else if self
            .members
            .values()
            .any(|m| m.epoch != self.assignment_epoch || m.state != MemberState::Stable)
        {
            "Reconciling"
        } else {
            "Stable"
        }
    }

    /// Topic names the members subscribe to by name (regex matches are in `subscribed_meta`).
    pub fn subscribed_topic_names(&self, topics: Option<&dyn Topics>) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .members
            .values()
            .flat_map(|m| m.subscribed_names.iter().cloned())
            .collect();
        out.extend(self.subscribed_meta.keys().cloned());
        if let Some(t) = topics {
            out.retain(|n| t.by_name(n).is_some());
        }
        out
    }
}

/// One ConsumerGroupHeartbeat, decoded.
#[derive(Debug, Clone, Default)]
pub struct HeartbeatRequest {
    pub version: i16,
    pub group_id: String,
    pub member_id: String,
    pub member_epoch: i32,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub rebalance_timeout_ms: i32,
    pub subscribed_topic_names: Option<Vec<String>>,
    pub subscribed_topic_regex: Option<String>,
    pub server_assignor: Option<String>,
    /// The partitions the member owns; `None` when unchanged since its last heartbeat.
    pub owned: Option<Assignment>,
    pub client_id: String,
    pub client_host: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatResult {
    pub error: ErrorCode,
    pub message: Option<String>,
    pub member_id: Option<String>,
    pub member_epoch: i32,
    pub heartbeat_interval_ms: i32,
    /// The member's assignment, when it changed (or on a join).
    pub assignment: Option<Assignment>,
}

impl HeartbeatResult {
    /// An error answer: no member, epoch -1 (KIP-848 and share groups alike).
    pub(super) fn error(code: E, message: impl Into<String>) -> HeartbeatResult {
        HeartbeatResult {
            error: ErrorCode::new(code),
            message: Some(message.into()),
            member_epoch: -1,
            ..Default::default()
        }
    }
}

/// ConsumerGroupDescribe of one member.
#[derive(Debug, Clone)]
pub struct ConsumerMemberDescription {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub member_epoch: i32,
    pub client_id: String,
    pub client_host: String,
    pub subscribed_topic_names: Vec<String>,
    pub subscribed_topic_regex: Option<String>,
    /// (topic id, name, partitions).
    pub assignment: Vec<([u8; 16], String, Vec<i32>)>,
    pub target_assignment: Vec<([u8; 16], String, Vec<i32>)>,
    /// The member speaks the classic protocol (KIP-1099's member type 0; else 1).
    pub classic: bool,
}

#[derive(Debug, Clone)]
pub struct ConsumerGroupDescription {
    pub error: ErrorCode,
    pub message: Option<String>,
    pub group_id: String,
    pub state: &'static str,
    pub group_epoch: i32,
    pub assignment_epoch: i32,
    pub assignor: String,
    pub members: Vec<ConsumerMemberDescription>,
}

fn compile_regex(re: &str) -> Result<regex::Regex, String> {
    if re.len() > REGEX_LEN_MAX {
        return Err(format!("regex longer than {REGEX_LEN_MAX} bytes"));
    }
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(REGEX_BYTES_MAX)
        .build()
        .map_err(|e| e.to_string())
}

fn fresh_member_id() -> String {
    // Kafka's member ids are 22-character url-safe base64 of a random UUID.
    let u = uuid::Uuid::new_v4();
    u.simple().to_string()
}

fn invalid(msg: &str) -> HeartbeatResult {
    HeartbeatResult::error(E::InvalidRequest, msg)
}

/// Kafka's request checks (`throwIfConsumerGroupHeartbeatRequestIsInvalid`).
fn validate(req: &HeartbeatRequest, cfg: &ConsumerConfig) -> Result<(), HeartbeatResult> {
    if req.group_id.is_empty() {
        return Err(invalid("GroupId can't be empty."));
    }
    if req.instance_id.as_deref() == Some("") {
        return Err(invalid("InstanceId can't be empty."));
    }
    if req.rack_id.as_deref() == Some("") {
        return Err(invalid("RackId can't be empty."));
    }
    if (req.version >= 1 || req.member_epoch != 0) && req.member_id.is_empty() {
        return Err(invalid("MemberId can't be empty."));
    }
    match req.member_epoch {
        0 => {
            if req.rebalance_timeout_ms == -1 {
                return Err(invalid(
                    "RebalanceTimeoutMs must be provided in first request.",
                ));
            }
            if req.owned.as_ref().is_some_and(|o| !o.is_empty()) {
                return Err(invalid("TopicPartitions must be empty when (re-)joining."));
            }
            if req.subscribed_topic_names.is_none() && req.subscribed_topic_regex.is_none() {
                return Err(invalid(
                    "SubscribedTopicNames or SubscribedTopicRegex must be set in first request.",
                ));
            }
        }
        -2 if req.instance_id.is_none() => {
            return Err(invalid("InstanceId can't be null."));
        }
        -1 => {}
        e if e < -2 => return Err(invalid("MemberEpoch is invalid.")),
        _ => {}
    }
    if req.version < 1 && req.subscribed_topic_regex.is_some() {
        return Err(invalid(
            "SubscribedTopicRegex is not supported in version 0.",
        ));
    }
    if req
        .subscribed_topic_names
        .as_ref()
        .is_some_and(|n| n.len() > SUBSCRIBED_TOPICS_MAX)
    {
        return Err(invalid("Too many subscribed topics."));
    }
    if let Some(re) = &req.subscribed_topic_regex {
        // An empty regex clears the member's regex (librdkafka sends one with topic names).
        if re.is_empty() {
            return Ok(());
        }
        if let Err(e) = compile_regex(re) {
            return Err(HeartbeatResult::error(
                E::InvalidRegularExpression,
                format!("SubscribedTopicRegex `{re}` is not a valid regular expression: {e}."),
            ));
        }
    }
    if let Some(a) = &req.server_assignor {
        if !cfg.assignors.iter().any(|x| x == a) {
            return Err(HeartbeatResult::error(
                E::UnsupportedAssignor,
                format!(
                    "ServerAssignor {a} is not supported. Supported assignors: {}.",
                    cfg.assignors.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// The topics one member subscribes to that exist: by name, and by regex (once resolved, see
/// [`ConsumerGroup::resolved_regexes`]) over all topics.
fn member_topics(
    m: &ConsumerMember,
    resolved: &BTreeSet<String>,
    topics: &dyn Topics,
    all: &mut Option<Vec<String>>,
) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = m
        .subscribed_names
        .iter()
        .filter(|n| topics.by_name(n).is_some())
        .cloned()
        .collect();
    if let Some(re) = m
        .subscribed_regex
        .as_deref()
        .filter(|r| resolved.contains(*r))
        .and_then(|r| compile_regex(r).ok())
    {
        let names = all.get_or_insert_with(|| topics.names());
        out.extend(names.iter().filter(|n| re.is_match(n)).cloned());
    }
    out
}

fn overlaps(a: &Assignment, b: &Assignment) -> bool {
    a.iter()
        .any(|(t, ps)| b.get(t).is_some_and(|q| !ps.is_disjoint(q)))
}

fn count(a: &Assignment) -> usize {
    a.values().map(|p| p.len()).sum()
}

fn is_subset(a: &Assignment, b: &Assignment) -> bool {
    a.iter()
        .all(|(t, ps)| ps.is_empty() || b.get(t).is_some_and(|q| ps.is_subset(q)))
}

fn insert(a: &mut Assignment, t: [u8; 16], p: i32) {
    a.entry(t).or_default().insert(p);
}

fn normalize(a: &mut Assignment) {
    a.retain(|_, ps| !ps.is_empty());
}

// ---------------------------------------------------------------------------- assignors

/// Members' subscribed topics (by id) and each topic's partition count.
struct AssignInput<'a> {
    members: Vec<(&'a str, BTreeSet<[u8; 16]>)>,
    partitions: BTreeMap<[u8; 16], i32>,
    previous: &'a HashMap<String, Assignment>,
    /// Members' racks (`rack_id` of their heartbeat), for the members that have one.
    member_racks: HashMap<&'a str, &'a str>,
    /// The racks of each partition's replicas, for partitions whose replicas have racks.
    partition_racks: HashMap<([u8; 16], i32), BTreeSet<String>>,
}

impl AssignInput<'_> {
    /// Whether `member` sits on a rack holding a replica of `(t, p)`.
    fn same_rack(&self, member: &str, t: [u8; 16], p: i32) -> bool {
        match (
            self.member_racks.get(member),
            self.partition_racks.get(&(t, p)),
        ) {
            (Some(r), Some(racks)) => racks.contains(*r),
            _ => false,
        }
    }

    /// Whether `member` and `(t, p)` both have racks and none matches: the member does not
    /// keep such a partition from its previous target.
    fn other_rack(&self, member: &str, t: [u8; 16], p: i32) -> bool {
        match (
            self.member_racks.get(member),
            self.partition_racks.get(&(t, p)),
        ) {
            (Some(r), Some(racks)) => !racks.contains(*r),
            _ => false,
        }
    }
}

/// `uniform`: spreads every subscribed partition evenly over the members subscribed to its
/// topic, keeping each member's previous partitions while that stays balanced (sticky). With
/// racks (members' `rack_id`, the racks of the partitions' replicas), a member keeps only
/// previous partitions with a replica on its rack, and a partition to place goes, balance
/// permitting, to a member on one of its replicas' racks.
fn assign_uniform(input: &AssignInput<'_>) -> HashMap<String, Assignment> {
    let mut out: HashMap<String, Assignment> = input
        .members
        .iter()
        .map(|(id, _)| (id.to_string(), Assignment::new()))
        .collect();
    if input.members.is_empty() {
        return out;
    }
    let all: Vec<([u8; 16], i32)> = input
        .partitions
        .iter()
        .filter(|(t, _)| input.members.iter().any(|(_, s)| s.contains(*t)))
        .flat_map(|(t, n)| (0..*n).map(move |p| (*t, p)))
        .collect();
    let n = input.members.len();
    let floor = all.len() / n;
    let ceil = all.len().div_ceil(n);
    let mut taken: BTreeSet<([u8; 16], i32)> = BTreeSet::new();
    // Sticky pass: each member keeps up to `floor` of its previous partitions.
    for (id, subs) in &input.members {
        let Some(prev) = input.previous.get(*id) else {
            continue;
        };
        let a = out.get_mut(*id).expect("listed");
        for (t, ps) in prev {
            let Some(count_t) = input.partitions.get(t) else {
                continue;
            };
            if !subs.contains(t) {
                continue;
            }
            for p in ps
                .iter()
                .filter(|p| **p < *count_t && !input.other_rack(id, *t, **p))
            {
                if count(a) >= floor {
                    break;
                }
                if taken.insert((*t, *p)) {
                    insert(a, *t, *p);
                }
            }
        }
    }
    // The rest: the previous owner if it may take one more (below `floor`, or one of the
    // `extra` members allowed `ceil`), else the least loaded eligible member (ties by member
    // id order).
    let extra = all.len() % n;
    let mut at_ceil = 0usize;
    for (t, p) in all {
        if taken.contains(&(t, p)) {
            continue;
        }
        let prev_owner = input
            .members
            .iter()
            .find(|(id, subs)| {
                subs.contains(&t)
                    && !input.other_rack(id, t, p)
                    && input
                        .previous
                        .get(*id)
                        .is_some_and(|a| a.get(&t).is_some_and(|ps| ps.contains(&p)))
            })
            .map(|(id, _)| *id)
            .filter(|id| {
                let c = count(&out[*id]);
                c < floor || (c < ceil && at_ceil < extra)
            });
        // Rack awareness: among the members that may take one more without unbalancing the
        // group, the least loaded on a rack of the partition's replicas.
        let same_rack = || {
            input
                .members
                .iter()
                .filter(|(id, subs)| {
                    let c = count(&out[*id]);
                    subs.contains(&t)
                        && input.same_rack(id, t, p)
                        && (c < floor || (c < ceil && at_ceil < extra))
                })
                .min_by_key(|(id, _)| count(&out[*id]))
                .map(|(id, _)| *id)
        };
        let choice = prev_owner.or_else(same_rack).or_else(|| {
            input
                .members
                .iter()
                .filter(|(_, subs)| subs.contains(&t))
                .min_by_key(|(id, _)| count(&out[*id]))
                .map(|(id, _)| *id)
        });
        if let Some(id) = choice {
            let a = out.get_mut(id).expect("listed");
            insert(a, t, p);
            if ceil > floor && count(a) == ceil {
                at_ceil += 1;
            }
            taken.insert((t, p));
        }
    }
    out
}

/// `range`: per topic, the members subscribed to it (in member id order) get contiguous ranges
/// of its partitions, the first ones one more when they do not divide evenly. With racks, each
/// partition first goes to the first member with quota left on one of its replicas' racks; the
/// rest fill the quotas in order.
fn assign_range(input: &AssignInput<'_>) -> HashMap<String, Assignment> {
    let mut out: HashMap<String, Assignment> = input
        .members
        .iter()
        .map(|(id, _)| (id.to_string(), Assignment::new()))
        .collect();
    for (t, n) in &input.partitions {
        let mut subs: Vec<&str> = input
            .members
            .iter()
            .filter(|(_, s)| s.contains(t))
            .map(|(id, _)| *id)
            .collect();
        if subs.is_empty() {
            continue;
        }
        subs.sort();
        let n = *n as usize;
        let per = n / subs.len();
        let extra = n % subs.len();
        // Each member's quota: the first `extra` take one more.
        let mut quota: Vec<usize> = (0..subs.len())
            .map(|i| per + usize::from(i < extra))
            .collect();
        let mut given = vec![false; n];
        // Rack awareness first: a partition goes to the first member (in member id order)
        // with quota left on a rack of its replicas.
        if !input.partition_racks.is_empty() {
            for (p, done) in given.iter_mut().enumerate() {
                if let Some(i) = (0..subs.len())
                    .find(|i| quota[*i] > 0 && input.same_rack(subs[*i], *t, p as i32))
                {
                    quota[i] -= 1;
                    insert(out.get_mut(subs[i]).expect("listed"), *t, p as i32);
                    *done = true;
                }
            }
        }
        // The rest in order: contiguous ranges when no rack applies.
        let mut i = 0usize;
        for (p, done) in given.iter().enumerate() {
            if *done {
                continue;
            }
            while i < subs.len() && quota[i] == 0 {
                i += 1;
            }
            let Some(id) = subs.get(i) else {
                break;
            };
            quota[i] -= 1;
            insert(out.get_mut(*id).expect("listed"), *t, p as i32);
        }
    }
    out
}

// ---------------------------------------------------------------------------- records

fn member_record(group_id: &str, m: &ConsumerMember, partition: i32) -> Write {
    Write {
        partition,
        key: offsets::consumer_member_key(group_id, &m.id),
        value: Some(offsets::consumer_member_value(&ConsumerMemberValue {
            instance_id: m.instance_id.clone(),
            rack_id: m.rack_id.clone(),
            client_id: m.client_id.clone(),
            client_host: m.client_host.clone(),
            subscribed_topic_names: m.subscribed_names.clone(),
            subscribed_topic_regex: m.subscribed_regex.clone(),
            rebalance_timeout_ms: m.rebalance_timeout_ms,
            server_assignor: m.server_assignor.clone(),
            classic: m.classic.as_ref().map(|c| offsets::ClassicMemberValue {
                session_timeout_ms: c.session_timeout_ms,
                protocols: c
                    .protocols
                    .iter()
                    .map(|p| (p.name.clone(), p.metadata.clone()))
                    .collect(),
            }),
        })),
    }
}

fn assignment_record(group_id: &str, m: &ConsumerMember, partition: i32) -> Write {
    let flat = |a: &Assignment| -> Vec<([u8; 16], Vec<i32>)> {
        a.iter()
            .map(|(t, ps)| (*t, ps.iter().copied().collect()))
            .collect()
    };
    Write {
        partition,
        key: offsets::current_assignment_key(group_id, &m.id),
        value: Some(offsets::current_assignment_value(&CurrentAssignmentValue {
            member_epoch: m.epoch,
            previous_member_epoch: m.previous_epoch,
            state: m.state.id(),
            assigned: flat(&m.assigned),
            revoking: flat(&m.revoking),
        })),
    }
}

fn member_tombstones(group_id: &str, member_id: &str, partition: i32) -> [Write; 3] {
    [
        Write {
            partition,
            key: offsets::current_assignment_key(group_id, member_id),
            value: None,
        },
        Write {
            partition,
            key: offsets::target_member_key(group_id, member_id),
            value: None,
        },
        Write {
            partition,
            key: offsets::consumer_member_key(group_id, member_id),
            value: None,
        },
    ]
}

/// The records of the group's target assignment (Kafka's key versions 7 then 6): every
/// member's target, then the assignment epoch, so a replay that has the epoch has the targets.
fn target_records(group_id: &str, cg: &ConsumerGroup, partition: i32) -> Vec<Write> {
    let mut out: Vec<Write> = cg
        .target
        .iter()
        .filter(|(id, _)| cg.members.contains_key(*id))
        .map(|(id, a)| {
            let flat: Vec<([u8; 16], Vec<i32>)> = a
                .iter()
                .map(|(t, ps)| (*t, ps.iter().copied().collect()))
                .collect();
            Write {
                partition,
                key: offsets::target_member_key(group_id, id),
                value: Some(offsets::target_member_value(&flat)),
            }
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out.push(Write {
        partition,
        key: offsets::target_epoch_key(group_id),
        value: Some(offsets::target_epoch_value(cg.assignment_epoch)),
    });
    out
}

/// The tombstones of a consumer group that is deleted or converted: its epoch and its target
/// assignment's epoch (members' records go with the members).
pub(super) fn group_tombstones(group_id: &str, partition: i32) -> [Write; 2] {
    [
        Write {
            partition,
            key: offsets::consumer_group_key(group_id),
            value: None,
        },
        Write {
            partition,
            key: offsets::target_epoch_key(group_id),
            value: None,
        },
    ]
}

fn epoch_record(group_id: &str, epoch: i32, partition: i32) -> Write {
    Write {
        partition,
        key: offsets::consumer_group_key(group_id),
        value: Some(offsets::consumer_group_value(epoch)),
    }
}

fn to_assignment(v: &[([u8; 16], Vec<i32>)]) -> Assignment {
    let mut a = Assignment::new();
    for (t, ps) in v {
        a.entry(*t).or_default().extend(ps.iter().copied());
    }
    normalize(&mut a);
    a
}

// ---------------------------------------------------------------------------- the protocol

/// The outcome of one heartbeat inside the group, before records are queued.
struct Changes {
    /// Members whose metadata record must be written.
    member_meta: BTreeSet<String>,
    /// Members whose current-assignment record must be written.
    member_assignment: BTreeSet<String>,
    /// Members removed (tombstones).
    removed: Vec<String>,
    epoch_bumped: bool,
    /// A new target assignment was computed (or moved to another member id): its records
    /// must be written.
    target: bool,
}

impl Changes {
    fn new() -> Changes {
        Changes {
            member_meta: BTreeSet::new(),
            member_assignment: BTreeSet::new(),
            removed: vec![],
            epoch_bumped: false,
            target: false,
        }
    }
}

/// Bumps the group epoch, once per call into the state machine however many things changed.
fn bump(cg: &mut ConsumerGroup, ch: &mut Changes) {
    if !ch.epoch_bumped {
        cg.epoch += 1;
        ch.epoch_bumped = true;
    }
}

fn remove_member(cg: &mut ConsumerGroup, id: &str, ch: &mut Changes) {
    if let Some(m) = cg.members.remove(id) {
        if let Some(i) = &m.instance_id {
            if cg.static_members.get(i).map(String::as_str) == Some(id) {
                cg.static_members.remove(i);
            }
        }
        cg.target.remove(id);
        ch.removed.push(id.to_string());
        ch.member_meta.remove(id);
        ch.member_assignment.remove(id);
        bump(cg, ch);
    }
}

/// Refreshes the subscribed topics' metadata; a change bumps the group epoch.
fn refresh_metadata(cg: &mut ConsumerGroup, topics: &dyn Topics, ch: &mut Changes) {
    let mut all = None;
    let mut meta = BTreeMap::new();
    for m in cg.members.values() {
        for name in member_topics(m, &cg.resolved_regexes, topics, &mut all) {
            if let Some(v) = topics.by_name(&name) {
                meta.insert(name, v);
            }
        }
    }
    if meta != cg.subscribed_meta {
        cg.subscribed_meta = meta;
        bump(cg, ch);
    }
}

/// The assignor the group uses: the one most members ask for, else the configured default.
fn pick_assignor(cg: &ConsumerGroup, cfg: &ConsumerConfig) -> String {
    let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
    for m in cg.members.values() {
        if let Some(a) = m.server_assignor.as_deref() {
            *votes.entry(a).or_default() += 1;
        }
    }
    let best = votes.values().copied().max().unwrap_or(0);
    if best > 0 {
        // Ties go to the configured order.
        if let Some(a) = cfg
            .assignors
            .iter()
            .find(|a| votes.get(a.as_str()).copied() == Some(best))
        {
            return a.clone();
        }
    }
    cfg.assignors
        .first()
        .cloned()
        .unwrap_or_else(|| ASSIGNORS[0].to_string())
}

fn compute_target(
    cg: &mut ConsumerGroup,
    cfg: &ConsumerConfig,
    topics: &dyn Topics,
    ch: &mut Changes,
) {
    let mut all = None;
    let subs: Vec<(String, BTreeSet<[u8; 16]>)> = cg
        .members
        .values()
        .map(|m| {
            let ids = member_topics(m, &cg.resolved_regexes, topics, &mut all)
                .iter()
                .filter_map(|n| topics.by_name(n).map(|(id, _)| id))
                .collect();
            (m.id.clone(), ids)
        })
        .collect();
    let partitions: BTreeMap<[u8; 16], i32> = cg
        .subscribed_meta
        .values()
        .map(|(id, n)| (*id, *n))
        .collect();
    let assignor = pick_assignor(cg, cfg);
    let member_racks: HashMap<&str, &str> = cg
        .members
        .values()
        .filter_map(|m| m.rack_id.as_deref().map(|r| (m.id.as_str(), r)))
        .collect();
    // Partitions' racks only matter when some member has a rack.
    let mut partition_racks = HashMap::new();
    if !member_racks.is_empty() {
        for (id, n) in &partitions {
            for p in 0..*n {
                let racks = topics.racks(id, p);
                if !racks.is_empty() {
                    partition_racks.insert((*id, p), racks);
                }
            }
        }
    }
    let input = AssignInput {
        members: subs
            .iter()
            .map(|(id, s)| (id.as_str(), s.clone()))
            .collect(),
        partitions,
        previous: &cg.target,
        member_racks,
        partition_racks,
    };
    let mut target = match assignor.as_str() {
        "range" => assign_range(&input),
        _ => assign_uniform(&input),
    };
    for a in target.values_mut() {
        normalize(a);
    }
    cg.target = target;
    cg.assignor = assignor;
    cg.assignment_epoch = cg.epoch;
    ch.target = true;
}

/// Moves one member towards its target (Kafka's `CurrentAssignmentBuilder`).
fn reconcile(
    cg: &mut ConsumerGroup,
    member_id: &str,
    owned: Option<&Assignment>,
    now_ms: i64,
    ch: &mut Changes,
) {
    let target_epoch = cg.assignment_epoch;
    let target = cg.target.get(member_id).cloned().unwrap_or_default();
    // Partitions held by the other members (assigned or still being revoked).
    let mut held_by_others = Assignment::new();
    for (id, o) in &cg.members {
        if id == member_id {
            continue;
        }
        for (t, ps) in o.assigned.iter().chain(o.revoking.iter()) {
            held_by_others.entry(*t).or_default().extend(ps);
        }
    }
    let Some(m) = cg.members.get_mut(member_id) else {
        return;
    };
    if m.state == MemberState::UnrevokedPartitions {
        match owned {
            Some(o) if !overlaps(o, &m.revoking) => {
                m.revoking.clear();
                m.revocation_deadline_ms = None;
                m.state = MemberState::Stable;
                ch.member_assignment.insert(m.id.clone());
            }
            _ => return,
        }
    }
    if m.epoch == target_epoch && m.state == MemberState::Stable {
        return;
    }
    let mut keep = Assignment::new();
    let mut revoke = Assignment::new();
    for (t, ps) in &m.assigned {
        for p in ps {
            if target.get(t).is_some_and(|q| q.contains(p)) {
                insert(&mut keep, *t, *p);
            } else {
                insert(&mut revoke, *t, *p);
            }
        }
    }
    // Partitions the member reports it no longer owns need no revocation round trip (Kafka's
    // `ownsRevokedPartitions`); without a report it is assumed to own them.
    if !revoke.is_empty() && owned.is_none_or(|o| overlaps(o, &revoke)) {
        m.assigned = keep;
        m.revoking = revoke;
        m.state = MemberState::UnrevokedPartitions;
        m.revocation_deadline_ms = Some(now_ms + m.rebalance_timeout_ms.max(0) as i64);
        m.send_assignment = true;
        ch.member_assignment.insert(m.id.clone());
        return;
    }
    let mut unreleased = false;
    let before = m.assigned.clone();
    m.assigned = keep;
    for (t, ps) in &target {
        for p in ps {
            if m.assigned.get(t).is_some_and(|q| q.contains(p)) {
                continue;
            }
            if held_by_others.get(t).is_some_and(|q| q.contains(p)) {
                unreleased = true;
            } else {
                insert(&mut m.assigned, *t, *p);
            }
        }
    }
    let state = if unreleased {
        MemberState::UnreleasedPartitions
    } else {
        MemberState::Stable
    };
    if m.assigned != before || m.epoch != target_epoch || m.state != state {
        if m.epoch != target_epoch {
            m.previous_epoch = m.epoch;
            m.epoch = target_epoch;
        }
        m.state = state;
        m.send_assignment = true;
        ch.member_assignment.insert(m.id.clone());
    }
}

impl Coordinator {
    /// ConsumerGroupHeartbeat (KIP-848): join, heartbeat, reconcile or leave.
    pub fn consumer_heartbeat(
        &mut self,
        req: HeartbeatRequest,
        topics: &dyn Topics,
        now_ms: i64,
    ) -> HeartbeatResult {
        let cfg = self.consumer_config_of(&req.group_id);
        if let Err(r) = validate(&req, &cfg) {
            return r;
        }
        if self.share.contains_key(&req.group_id) {
            return HeartbeatResult::error(
                E::GroupIdNotFound,
                format!("Group {} is not a consumer group.", req.group_id),
            );
        }
        let partition = self.partition_of(&req.group_id);
        let exists = self.groups.contains_key(&req.group_id);
        if !exists {
            if req.member_epoch != 0 {
                return HeartbeatResult::error(
                    E::GroupIdNotFound,
                    format!("Group {} not found.", req.group_id),
                );
            }
            self.groups
                .insert(req.group_id.clone(), Group::new(&req.group_id, now_ms));
        }
        let group = self.groups.get_mut(&req.group_id).expect("present");
        if group.state == GroupState::Dead {
            return HeartbeatResult::error(E::CoordinatorNotAvailable, "group is being deleted");
        }
        if group.consumer.is_none()
            && (group.state != GroupState::Empty || !group.members.is_empty())
        {
            // A classic group with members: converted when the migration policy allows it.
            if let Err(r) = self.upgrade_to_consumer(&req, topics, now_ms) {
                return r;
            }
        }
        let group = self.groups.get_mut(&req.group_id).expect("present");
        if group.consumer.is_none() {
            // An empty classic group becomes a consumer group (keeping its offsets).
            if group.state != GroupState::Empty || !group.members.is_empty() {
                return HeartbeatResult::error(
                    E::GroupIdNotFound,
                    format!("Group {} is not a consumer group.", req.group_id),
                );
            }
            if req.member_epoch != 0 {
                return HeartbeatResult::error(
                    E::UnknownMemberId,
                    format!(
                        "Member {} is not a member of group {}.",
                        req.member_id, req.group_id
                    ),
                );
            }
            group.consumer = Some(Box::default());
            group.protocol_type = Some("consumer".into());
            group.protocol = None;
            group.leader = None;
            group.generation = 0;
            group.pending_members.clear();
            group.static_members.clear();
        }
        let gid = req.group_id.clone();
        let mut ch = Changes::new();
        let result = {
            let cg = group.consumer.as_mut().expect("set above");
            heartbeat_in(cg, &cfg, req, topics, now_ms, &mut ch)
        };
        let cg = group.consumer.as_ref().expect("set above");
        queue_changes(&mut self.writes, &gid, cg, &ch, partition);
        let empty = cg.members.is_empty();
        let new_state = if empty {
            GroupState::Empty
        } else {
            GroupState::Stable
        };
        if group.state != new_state {
            group.transition(new_state, now_ms);
        }
        if !ch.removed.is_empty() {
            self.maybe_downgrade(&gid, now_ms);
        }
        result
    }

    /// The KIP-848 settings of one group: the broker's, with the group's `consumer.*` configs
    /// (IncrementalAlterConfigs on its GROUP resource) applied.
    pub fn consumer_config_of(&self, group_id: &str) -> ConsumerConfig {
        let mut cfg = self.config.consumer.clone();
        if let Some(c) = self.consumer_configs.get(group_id) {
            (cfg.session_timeout_ms, cfg.heartbeat_interval_ms) = c.consumer_timeouts(&cfg);
        }
        cfg
    }

    /// Fires the consumer groups' deadlines: expired sessions and unacknowledged revocations.
    pub(super) fn consumer_tick(&mut self, now_ms: i64) {
        let ids: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| g.consumer.is_some() && g.state != GroupState::Dead)
            .map(|(id, _)| id.clone())
            .collect();
        for gid in ids {
            let partition = self.partition_of(&gid);
            let Some(group) = self.groups.get_mut(&gid) else {
                continue;
            };
            let Some(cg) = group.consumer.as_mut() else {
                continue;
            };
            let mut ch = Changes::new();
            let expired: Vec<String> = cg
                .members
                .values()
                .filter(|m| {
                    m.session_deadline_ms <= now_ms
                        || m.revocation_deadline_ms.is_some_and(|d| d <= now_ms)
                })
                .map(|m| m.id.clone())
                .collect();
            for id in expired {
                tracing::info!(group = %gid, member = %id, "consumer group member fenced: session or rebalance timeout");
                remove_member(cg, &id, &mut ch);
            }
            if ch.removed.is_empty() {
                continue;
            }
            self.writes.push(epoch_record(&gid, cg.epoch, partition));
            for id in &ch.removed {
                self.writes.extend(member_tombstones(&gid, id, partition));
            }
            if cg.members.is_empty() && group.state != GroupState::Empty {
                group.transition(GroupState::Empty, now_ms);
            }
            self.maybe_downgrade(&gid, now_ms);
        }
    }

    /// The earliest consumer-group deadline.
    pub(super) fn consumer_next_deadline_ms(&self) -> Option<i64> {
        self.groups
            .values()
            .filter(|g| g.state != GroupState::Dead)
            .filter_map(|g| g.consumer.as_ref())
            .flat_map(|cg| cg.members.values())
            .flat_map(|m| std::iter::once(m.session_deadline_ms).chain(m.revocation_deadline_ms))
            .min()
    }

    /// Checks an OffsetCommit (or a fetch with a member epoch) against a consumer group:
    /// `Ok(true)` if the group is a consumer group and the commit may proceed, `Ok(false)` if
    /// it is not a consumer group.
    pub fn check_consumer_commit(
        &mut self,
        group_id: &str,
        member_id: &str,
        epoch: i32,
        now_ms: i64,
    ) -> Result<bool, ErrorCode> {
        let Some(cg) = self
            .groups
            .get_mut(group_id)
            .and_then(|g| g.consumer.as_mut())
        else {
            return Ok(false);
        };
        if epoch < 0 && member_id.is_empty() {
            // An admin or standalone commit: only while the group has no members.
            return if cg.members.is_empty() {
                Ok(true)
            } else {
                Err(ErrorCode::new(E::UnknownMemberId))
            };
        }
        let Some(m) = cg.members.get_mut(member_id) else {
            return Err(ErrorCode::new(E::UnknownMemberId));
        };
        if m.classic.is_some() {
            // A classic member commits with its generation, which is its member epoch.
            return if epoch == m.epoch {
                Ok(true)
            } else {
                Err(ErrorCode::new(E::IllegalGeneration))
            };
        }
        if epoch > m.epoch {
            return Err(ErrorCode::new(E::FencedMemberEpoch));
        }
        if epoch < m.epoch {
            return Err(ErrorCode::new(E::StaleMemberEpoch));
        }
        let _ = now_ms;
        Ok(true)
    }

    /// Checks an OffsetFetch v9+ member id and epoch against a consumer group, as Kafka's
    /// `ConsumerGroup.validateOffsetFetch`: no member id with a negative epoch (an admin client,
    /// or a client outside group management) always passes; otherwise the member must exist
    /// (UNKNOWN_MEMBER_ID) at exactly that epoch (STALE_MEMBER_EPOCH; ILLEGAL_GENERATION for a
    /// classic member, whose generation is its epoch). Classic groups are not checked.
    pub fn check_consumer_fetch(
        &self,
        group_id: &str,
        member_id: Option<&str>,
        epoch: i32,
    ) -> Result<(), ErrorCode> {
        if member_id.is_none() && epoch < 0 {
            return Ok(());
        }
        let Some(cg) = self
            .groups
            .get(group_id)
            .filter(|g| g.state != GroupState::Dead)
            .and_then(|g| g.consumer.as_ref())
        else {
            return Ok(());
        };
        let Some(m) = member_id.and_then(|id| cg.members.get(id)) else {
            return Err(ErrorCode::new(E::UnknownMemberId));
        };
        if epoch == m.epoch {
            Ok(())
        } else if m.classic.is_some() {
            Err(ErrorCode::new(E::IllegalGeneration))
        } else {
            Err(ErrorCode::new(E::StaleMemberEpoch))
        }
    }

    /// ConsumerGroupDescribe of one group.
    pub fn describe_consumer_group(
        &self,
        group_id: &str,
        topics: &dyn Topics,
    ) -> ConsumerGroupDescription {
        let not_found = |msg: String| ConsumerGroupDescription {
            error: ErrorCode::new(E::GroupIdNotFound),
            message: Some(msg),
            group_id: group_id.to_string(),
            state: "Dead",
            group_epoch: -1,
            assignment_epoch: -1,
            assignor: String::new(),
            members: vec![],
        };
        let Some(g) = self
            .groups
            .get(group_id)
            .filter(|g| g.state != GroupState::Dead)
        else {
            return not_found(format!("Group {group_id} not found."));
        };
        let Some(cg) = g.consumer.as_ref() else {
            return not_found(format!("Group {group_id} is not a consumer group."));
        };
        let named = |a: &Assignment| -> Vec<([u8; 16], String, Vec<i32>)> {
            a.iter()
                .filter_map(|(t, ps)| {
                    topics
                        .by_id(t)
                        .map(|(name, _)| (*t, name, ps.iter().copied().collect()))
                })
                .collect()
        };
        ConsumerGroupDescription {
            error: ErrorCode::NONE,
            message: None,
            group_id: group_id.to_string(),
            state: cg.state_name(),
            group_epoch: cg.epoch,
            assignment_epoch: cg.assignment_epoch,
            assignor: cg.assignor.clone(),
            members: cg
                .members
                .values()
                .map(|m| ConsumerMemberDescription {
                    member_id: m.id.clone(),
                    instance_id: m.instance_id.clone(),
                    rack_id: m.rack_id.clone(),
                    member_epoch: m.epoch,
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    subscribed_topic_names: m.subscribed_names.clone(),
                    subscribed_topic_regex: m.subscribed_regex.clone(),
                    assignment: named(&m.assigned),
                    target_assignment: named(&cg.target.get(&m.id).cloned().unwrap_or_default()),
                    classic: m.classic.is_some(),
                })
                .collect(),
        }
    }

    // ------------------------------------------------------------------ replay

    /// A consumer group's epoch record read back (`None`: tombstone, the group is gone).
    pub fn load_consumer_group(&mut self, group_id: &str, epoch: Option<i32>, now_ms: i64) {
        match epoch {
            Some(epoch) => {
                let g = self
                    .groups
                    .entry(group_id.to_string())
                    .or_insert_with(|| Group::new(group_id, now_ms));
                let cg = consumer_of(g);
                cg.epoch = epoch;
                // The target assignment's own records (key versions 6 and 7) follow the epoch
                // record when a heartbeat computed one; without them (a group epoch bumped by
                // an expiry, or records of an older version) the assignment epoch stays behind
                // and the next heartbeat computes the target again.
                cg.assignment_epoch = epoch.saturating_sub(1).min(cg.assignment_epoch.max(0));
            }
            None => {
                if let Some(g) = self.groups.get_mut(group_id) {
                    if g.consumer.take().is_some() {
                        g.protocol_type = None;
                        g.state = GroupState::Empty;
                        if g.offsets.is_empty() {
                            self.groups.remove(group_id);
                        }
                    }
                }
            }
        }
    }

    /// A member's metadata record read back (`None`: the member is gone).
    pub fn load_consumer_member(
        &mut self,
        group_id: &str,
        member_id: &str,
        v: Option<ConsumerMemberValue>,
        now_ms: i64,
    ) {
        let session = self.consumer_config_of(group_id).session_timeout_ms as i64;
        let g = self
            .groups
            .entry(group_id.to_string())
            .or_insert_with(|| Group::new(group_id, now_ms));
        let cg = consumer_of(g);
        match v {
            None => {
                if let Some(m) = cg.members.remove(member_id) {
                    if let Some(i) = m.instance_id {
                        cg.static_members.remove(&i);
                    }
                }
            }
            Some(v) => {
                let m = cg
                    .members
                    .entry(member_id.to_string())
                    .or_insert_with(|| ConsumerMember::new(member_id.to_string()));
                m.instance_id = v.instance_id;
                m.rack_id = v.rack_id;
                m.client_id = v.client_id;
                m.client_host = v.client_host;
                m.subscribed_names = v.subscribed_topic_names;
                m.subscribed_regex = v.subscribed_topic_regex;
                m.rebalance_timeout_ms = v.rebalance_timeout_ms;
                m.server_assignor = v.server_assignor;
                m.classic = v.classic.map(|c| ClassicInfo {
                    session_timeout_ms: c.session_timeout_ms,
                    protocols: c
                        .protocols
                        .into_iter()
                        .map(|(name, metadata)| super::state::Protocol { name, metadata })
                        .collect(),
                });
                let session = m
                    .classic
                    .as_ref()
                    .map_or(session, |c| c.session_timeout_ms as i64);
                m.session_deadline_ms = now_ms + session;
                if let Some(i) = &m.instance_id {
                    cg.static_members.insert(i.clone(), member_id.to_string());
                }
            }
        }
        let empty = cg.members.is_empty();
        g.state = if empty {
            GroupState::Empty
        } else {
            GroupState::Stable
        };
    }

    /// A target assignment's epoch record read back (`None`: the group is gone).
    pub fn load_consumer_target_epoch(&mut self, group_id: &str, epoch: Option<i32>, now_ms: i64) {
        let Some(epoch) = epoch else {
            return;
        };
        let g = self
            .groups
            .entry(group_id.to_string())
            .or_insert_with(|| Group::new(group_id, now_ms));
        let cg = consumer_of(g);
        cg.assignment_epoch = epoch;
        cg.assignor = pick_assignor(cg, &self.config.consumer);
    }

    /// A member's target-assignment record read back (`None`: the member left the target).
    pub fn load_consumer_target_member(
        &mut self,
        group_id: &str,
        member_id: &str,
        v: Option<offsets::TopicIdPartitions>,
        now_ms: i64,
    ) {
        match v {
            Some(v) => {
                let g = self
                    .groups
                    .entry(group_id.to_string())
                    .or_insert_with(|| Group::new(group_id, now_ms));
                consumer_of(g)
                    .target
                    .insert(member_id.to_string(), to_assignment(&v));
            }
            None => {
                if let Some(cg) = self
                    .groups
                    .get_mut(group_id)
                    .and_then(|g| g.consumer.as_mut())
                {
                    cg.target.remove(member_id);
                }
            }
        }
    }

    /// A member's current-assignment record read back.
    pub fn load_consumer_assignment(
        &mut self,
        group_id: &str,
        member_id: &str,
        v: Option<CurrentAssignmentValue>,
        now_ms: i64,
    ) {
        let Some(v) = v else {
            return;
        };
        let session = self.consumer_config_of(group_id).session_timeout_ms as i64;
        let g = self
            .groups
            .entry(group_id.to_string())
            .or_insert_with(|| Group::new(group_id, now_ms));
        let cg = consumer_of(g);
        let m = cg
            .members
            .entry(member_id.to_string())
            .or_insert_with(|| ConsumerMember::new(member_id.to_string()));
        m.epoch = v.member_epoch;
        m.previous_epoch = v.previous_member_epoch;
        m.state = MemberState::from_id(v.state);
        m.assigned = to_assignment(&v.assigned);
        m.revoking = to_assignment(&v.revoking);
        let session = m
            .classic
            .as_ref()
            .map_or(session, |c| c.session_timeout_ms as i64);
        m.session_deadline_ms = now_ms + session;
        if m.state == MemberState::UnrevokedPartitions {
            m.revocation_deadline_ms = Some(now_ms + m.rebalance_timeout_ms.max(0) as i64);
        }
        g.state = GroupState::Stable;
    }
}

fn consumer_of(g: &mut Group) -> &mut ConsumerGroup {
    if g.consumer.is_none() {
        g.protocol_type = Some("consumer".into());
        g.members.clear();
        g.static_members.clear();
    }
    g.consumer.get_or_insert_with(Box::default)
}

fn heartbeat_in(
    cg: &mut ConsumerGroup,
    cfg: &ConsumerConfig,
    req: HeartbeatRequest,
    topics: &dyn Topics,
    now_ms: i64,
    ch: &mut Changes,
) -> HeartbeatResult {
    let unknown = |req: &HeartbeatRequest| {
        HeartbeatResult::error(
            E::UnknownMemberId,
            format!(
                "Member {} is not a member of group {}.",
                req.member_id, req.group_id
            ),
        )
    };
    // Leaving.
    if req.member_epoch < 0 {
        let id = if req.member_id.is_empty() {
            req.instance_id
                .as_ref()
                .and_then(|i| cg.static_members.get(i).cloned())
        } else {
            Some(req.member_id.clone())
        };
        let Some(id) = id.filter(|id| cg.members.contains_key(id)) else {
            return unknown(&req);
        };
        if let Some(i) = &req.instance_id {
            if cg.static_members.get(i) != Some(&id) {
                return HeartbeatResult::error(
                    E::FencedInstanceId,
                    format!("Instance {i} belongs to another member."),
                );
            }
        }
        if req.member_epoch == -2 {
            // A static member leaving for a while: keeps its partitions until its session
            // expires or it comes back.
            let m = cg.members.get_mut(&id).expect("checked");
            m.left_static = true;
            m.session_deadline_ms = now_ms + cfg.session_timeout_ms as i64;
        } else {
            remove_member(cg, &id, ch);
        }
        return HeartbeatResult {
            member_id: Some(id),
            member_epoch: req.member_epoch,
            heartbeat_interval_ms: 0,
            ..Default::default()
        };
    }
    let member_id;
    if req.member_epoch == 0 {
        // Joining (or re-joining from scratch).
        let id = if req.member_id.is_empty() {
            fresh_member_id()
        } else {
            req.member_id.clone()
        };
        if let Some(inst) = &req.instance_id {
            if let Some(old) = cg.static_members.get(inst).cloned() {
                if old != id {
                    let left = cg.members.get(&old).is_some_and(|m| m.left_static);
                    if !left {
                        return HeartbeatResult::error(
                            E::UnreleasedInstanceId,
                            format!("Static member {inst} is still in the group with member id {old}; it must leave first."),
                        );
                    }
                    // The instance comes back under a new member id and takes over its
                    // predecessor's partitions and epoch.
                    let mut m = cg.members.remove(&old).expect("mapped");
                    cg.target
                        .remove(&old)
                        .map(|t| cg.target.insert(id.clone(), t));
                    ch.target = true;
                    ch.removed.push(old.clone());
                    m.id = id.clone();
                    m.left_static = false;
                    m.send_assignment = true;
                    cg.members.insert(id.clone(), m);
                    cg.static_members.insert(inst.clone(), id.clone());
                    ch.member_meta.insert(id.clone());
                    ch.member_assignment.insert(id.clone());
                }
            }
        }
        if !cg.members.contains_key(&id) {
            if cg.members.len() >= cfg.max_size {
                return HeartbeatResult::error(
                    E::GroupMaxSizeReached,
                    format!(
                        "The consumer group has reached its maximum capacity of {} members.",
                        cfg.max_size
                    ),
                );
            }
            let mut m = ConsumerMember::new(id.clone());
            m.instance_id = req.instance_id.clone();
            if let Some(i) = &req.instance_id {
                cg.static_members.insert(i.clone(), id.clone());
            }
            cg.members.insert(id.clone(), m);
            ch.member_meta.insert(id.clone());
            ch.member_assignment.insert(id.clone());
            bump(cg, ch);
        }
        let m = cg.members.get_mut(&id).expect("present");
        m.send_assignment = true;
        member_id = id;
    } else {
        let Some(m) = cg.members.get_mut(&req.member_id) else {
            return unknown(&req);
        };
        if m.instance_id != req.instance_id && req.instance_id.is_some() {
            return HeartbeatResult::error(
                E::FencedInstanceId,
                "The instance id does not match the member's.",
            );
        }
        let ok = req.member_epoch == m.epoch
            || (req.member_epoch == m.previous_epoch
                && req
                    .owned
                    .as_ref()
                    .is_some_and(|o| is_subset(o, &m.assigned)));
        if !ok {
            return HeartbeatResult::error(
                E::FencedMemberEpoch,
                format!(
                    "The consumer group member has a member epoch ({}) that does not match the expected one ({}).",
                    req.member_epoch, m.epoch
                ),
            );
        }
        if req.member_epoch != m.epoch {
            // It missed our last answer: tell it again.
            m.send_assignment = true;
        }
        member_id = req.member_id.clone();
    }
    // A full request (what a client sends when it joins, or after an error or a timeout made
    // it unsure of its state) gets the assignment back whether or not it changed, as Kafka's
    // coordinator does: a client whose previous answer was lost learns its revocations.
    let full_request = req.rebalance_timeout_ms != -1
        && (req.subscribed_topic_names.is_some() || req.subscribed_topic_regex.is_some())
        && req.owned.is_some();
    // The regexes brought by earlier heartbeats are resolved now (see `resolved_regexes`); a
    // regex no member subscribes to any more is forgotten, so subscribing to it again waits
    // for a heartbeat again.
    cg.resolved_regexes = cg
        .members
        .values()
        .filter_map(|m| m.subscribed_regex.clone())
        .collect();
    // Update what the member told us.
    let m = cg.members.get_mut(&member_id).expect("present");
    m.left_static = false;
    if full_request {
        m.send_assignment = true;
    }
    let mut sub_changed = false;
    let mut meta_changed = false;
    if let Some(names) = req.subscribed_topic_names {
        let mut names: Vec<String> = names;
        names.sort();
        names.dedup();
        if names != m.subscribed_names {
            m.subscribed_names = names;
            sub_changed = true;
        }
    }
    if let Some(re) = req.subscribed_topic_regex {
        let re = Some(re).filter(|r| !r.is_empty());
        if m.subscribed_regex != re {
            m.subscribed_regex = re;
            sub_changed = true;
        }
    }
    if req.server_assignor.is_some() && req.server_assignor != m.server_assignor {
        m.server_assignor = req.server_assignor;
        sub_changed = true;
    }
    if req.rebalance_timeout_ms >= 0 && req.rebalance_timeout_ms != m.rebalance_timeout_ms {
        m.rebalance_timeout_ms = req.rebalance_timeout_ms;
        meta_changed = true;
    }
    if req.rack_id.is_some() && req.rack_id != m.rack_id {
        m.rack_id = req.rack_id;
        meta_changed = true;
    }
    if m.client_id != req.client_id || m.client_host != req.client_host {
        m.client_id = req.client_id;
        m.client_host = req.client_host;
        meta_changed = true;
    }
    m.session_deadline_ms = now_ms + cfg.session_timeout_ms as i64;
    if sub_changed || meta_changed {
        ch.member_meta.insert(member_id.clone());
    }
    if sub_changed {
        bump(cg, ch);
    }
    refresh_metadata(cg, topics, ch);
    if cg.assignment_epoch < cg.epoch {
        compute_target(cg, cfg, topics, ch);
    }
    reconcile(cg, &member_id, req.owned.as_ref(), now_ms, ch);
    let m = cg.members.get_mut(&member_id).expect("present");
    tracing::debug!(
        member = %member_id,
        epoch = m.epoch,
        state = ?m.state,
        assigned = ?m.assigned,
        revoking = ?m.revoking,
        full_request,
        "consumer group heartbeat"
    );
    let assignment = if std::mem::take(&mut m.send_assignment) {
        Some(m.assigned.clone())
    } else {
        None
    };
    HeartbeatResult {
        error: ErrorCode::NONE,
        message: None,
        member_id: Some(member_id),
        member_epoch: m.epoch,
        heartbeat_interval_ms: cfg.heartbeat_interval_ms,
        assignment,
    }
}

mod classic;
use classic::queue_changes;
pub use classic::ClassicInfo;

#[cfg(test)]
mod tests;
