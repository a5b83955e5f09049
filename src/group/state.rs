//! One consumer group's state: members, generation, selected protocol, committed offsets. Plain
//! data plus the small pure helpers the coordinator's state machine uses (protocol selection,
//! support checks). No I/O, no clocks: deadlines are absolute milliseconds set by the caller.
//!
//! ```text
//!            join (first member)          all known members joined / rebalance timeout
//!   Empty ───────────────────▶ PreparingRebalance ─────────────────▶ CompletingRebalance
//!     ▲                            ▲   ▲   │ (no member left)              │ leader's SyncGroup
//!     └────────────────────────────┼───┼───┘                              ▼
//!                                  │   └─ join/leave/expiry ──────────── Stable
//!                                  └──── join/leave/expiry (CompletingRebalance)
//!   Dead: deleted (DeleteGroups, offsets expired); never re-entered.
//! ```

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use indexmap::IndexMap;

use super::offsets::OffsetValue;
use crate::types::ErrorCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
    Dead,
}

impl GroupState {
    /// The name Kafka uses in DescribeGroups/ListGroups.
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
            GroupState::Dead => "Dead",
        }
    }

    /// Parses a ListGroups state filter (case-insensitive, as Kafka does).
    pub fn parse(s: &str) -> Option<GroupState> {
        [
            GroupState::Empty,
            GroupState::PreparingRebalance,
            GroupState::CompletingRebalance,
            GroupState::Stable,
            GroupState::Dead,
        ]
        .into_iter()
        .find(|g| g.name().eq_ignore_ascii_case(s))
    }
}

/// One protocol a member supports (e.g. `range`, `cooperative-sticky`) with its subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protocol {
    pub name: String,
    pub metadata: Bytes,
}

/// What a completed JoinGroup answers one member.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JoinResult {
    pub error: ErrorCode,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// KIP-814: the static leader rejoined a stable group and must not compute a new assignment.
    pub skip_assignment: bool,
    /// Non-empty for the leader only: every member with its metadata for the chosen protocol.
    pub members: Vec<JoinMember>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinMember {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub metadata: Bytes,
}

impl JoinResult {
    pub fn error(error: ErrorCode, member_id: &str) -> JoinResult {
        JoinResult {
            error,
            generation: -1,
            member_id: member_id.to_string(),
            ..Default::default()
        }
    }
}

/// What SyncGroup answers one member.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncResult {
    pub error: ErrorCode,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub assignment: Bytes,
}

impl SyncResult {
    pub fn error(error: ErrorCode) -> SyncResult {
        SyncResult {
            error,
            ..Default::default()
        }
    }
}

/// A reply that is either ready now or completed later by the state machine (JoinGroup waits for
/// the rebalance, SyncGroup followers wait for the leader).
pub enum Reply<T> {
    Now(T),
    Wait(async_channel::Receiver<T>),
}

pub type Waiter<T> = async_channel::Sender<T>;

pub struct Member {
    pub id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: i32,
    pub session_timeout_ms: i32,
    pub protocol_type: String,
    pub protocols: Vec<Protocol>,
    pub assignment: Bytes,
    /// Set while the member waits in JoinGroup for the rebalance to complete.
    pub join_waiter: Option<Waiter<JoinResult>>,
    /// Set while the member waits in SyncGroup for the leader's assignment.
    pub sync_waiter: Option<Waiter<SyncResult>>,
    /// Sent SyncGroup for the current generation (members that do not are removed after the
    /// rebalance timeout).
    pub synced: bool,
    /// The member is removed when it has not heartbeated by then (unless it waits in a join or
    /// sync, which keeps it alive).
    pub heartbeat_deadline_ms: i64,
}

impl Member {
    pub fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|p| p.name == protocol)
            .map(|p| p.metadata.clone())
            .unwrap_or_default()
    }

    /// Same protocols, in the same order, with the same metadata.
    pub fn matches(&self, protocols: &[Protocol]) -> bool {
        self.protocols == protocols
    }

    pub fn complete_join(&mut self, r: JoinResult) {
        if let Some(w) = self.join_waiter.take() {
            let _ = w.try_send(r);
        }
    }

    pub fn complete_sync(&mut self, r: SyncResult) {
        if let Some(w) = self.sync_waiter.take() {
            let _ = w.try_send(r);
        }
    }
}

/// How the current rebalance may complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinMode {
    /// `group.initial.rebalance.delay.ms` for a new group: waits the delay, extended while new
    /// members keep arriving, never past `max_deadline_ms` (the rebalance timeout).
    Initial { max_deadline_ms: i64 },
    /// Completes once every known member rejoined, or at the deadline.
    Normal,
}

pub struct Group {
    pub id: String,
    pub state: GroupState,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub generation: i32,
    pub leader: Option<String>,
    /// In join order: the first member to join a rebalance without a leader leads.
    pub members: IndexMap<String, Member>,
    /// group.instance.id → member id (KIP-345).
    pub static_members: HashMap<String, String>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, with the deadline to come back by.
    pub pending_members: HashMap<String, i64>,
    pub join_mode: JoinMode,
    pub join_deadline_ms: Option<i64>,
    pub new_member_added: bool,
    /// Members that have not sent SyncGroup by then are removed (CompletingRebalance/Stable).
    pub sync_deadline_ms: Option<i64>,
    /// When the group last changed state (offset retention of empty groups counts from here).
    pub state_timestamp_ms: i64,
    /// The generation last written to `__consumer_offsets`.
    pub persisted_generation: i32,
    pub offsets: BTreeMap<(String, i32), OffsetValue>,
    /// Set for a KIP-848 consumer group (ConsumerGroupHeartbeat); its classic fields are then
    /// unused and `state` is Empty or Stable by whether it has members.
    pub consumer: Option<Box<super::consumer::ConsumerGroup>>,
}

impl Group {
    pub fn new(id: &str, now_ms: i64) -> Group {
        Group {
            id: id.to_string(),
            state: GroupState::Empty,
            protocol_type: None,
            protocol: None,
            generation: 0,
            leader: None,
            members: IndexMap::new(),
            static_members: HashMap::new(),
            pending_members: HashMap::new(),
            join_mode: JoinMode::Normal,
            join_deadline_ms: None,
            new_member_added: false,
            sync_deadline_ms: None,
            state_timestamp_ms: now_ms,
            persisted_generation: 0,
            offsets: BTreeMap::new(),
            consumer: None,
        }
    }

    pub fn transition(&mut self, to: GroupState, now_ms: i64) {
        debug_assert!(
            self.state != GroupState::Dead,
            "a dead group never changes state"
        );
        self.state = to;
        self.state_timestamp_ms = now_ms;
    }

    pub fn is_leader(&self, member_id: &str) -> bool {
        self.leader.as_deref() == Some(member_id)
    }

    /// How many current members support each protocol name.
    fn protocol_support(&self) -> HashMap<&str, usize> {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for m in self.members.values() {
            for p in &m.protocols {
                *counts.entry(p.name.as_str()).or_default() += 1;
            }
        }
        counts
    }

    /// Kafka's `supportsProtocols`: an empty group takes any non-empty protocol list; otherwise
    /// the type must match and one of the protocols must be supported by every current member.
    pub fn supports(&self, protocol_type: &str, protocols: &[Protocol]) -> bool {
        if self.state == GroupState::Empty {
            return !protocol_type.is_empty() && !protocols.is_empty();
        }
        let counts = self.protocol_support();
        let n = self.members.len();
        self.protocol_type.as_deref() == Some(protocol_type)
            && protocols
                .iter()
                .any(|p| counts.get(p.name.as_str()).copied().unwrap_or(0) == n)
    }

    /// Kafka's `selectProtocol`: among the protocols every member supports, each member votes for
    /// the first one in its own preference order; the most votes wins (ties: the first
    /// member's preference order decides).
    pub fn select_protocol(&self) -> Option<String> {
        let counts = self.protocol_support();
        let n = self.members.len();
        let candidates: Vec<&str> = self
            .members
            .values()
            .next()?
            .protocols
            .iter()
            .map(|p| p.name.as_str())
            .filter(|name| counts.get(name).copied().unwrap_or(0) == n)
            .collect();
        let mut votes: Vec<(usize, &str)> = candidates.iter().map(|c| (0, *c)).collect();
        for m in self.members.values() {
            if let Some(choice) = m
                .protocols
                .iter()
                .find(|p| candidates.contains(&p.name.as_str()))
            {
                if let Some(v) = votes.iter_mut().find(|(_, name)| *name == choice.name) {
                    v.0 += 1;
                }
            }
        }
        // max_by_key keeps the last maximum: iterate in reverse so the first candidate wins ties.
        votes
            .iter()
            .rev()
            .max_by_key(|(count, _)| *count)
            .map(|(_, name)| name.to_string())
    }

    /// Every known member waits in JoinGroup and no member id handed out is still outstanding.
    pub fn all_members_joined(&self) -> bool {
        self.pending_members.is_empty() && self.members.values().all(|m| m.join_waiter.is_some())
    }

    pub fn max_rebalance_timeout_ms(&self) -> i64 {
        self.members
            .values()
            .map(|m| m.rebalance_timeout_ms as i64)
            .max()
            .unwrap_or(0)
    }

    /// Topics the members subscribe to (consumer protocol only; `None` when unknown).
    pub fn subscribed_topics(&self) -> Option<std::collections::HashSet<String>> {
        if let Some(cg) = &self.consumer {
            return Some(cg.subscribed_topic_names(None).into_iter().collect());
        }
        if self.protocol_type.as_deref() != Some("consumer") {
            return None;
        }
        let protocol = self.protocol.as_deref()?;
        let mut out = std::collections::HashSet::new();
        for m in self.members.values() {
            out.extend(super::offsets::subscription_topics(
                &m.metadata_for(protocol),
            )?);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, protocols: &[&str]) -> Member {
        Member {
            id: id.into(),
            instance_id: None,
            client_id: "c".into(),
            client_host: "h".into(),
            rebalance_timeout_ms: 1000,
            session_timeout_ms: 1000,
            protocol_type: "consumer".into(),
            protocols: protocols
                .iter()
                .map(|p| Protocol {
                    name: p.to_string(),
                    metadata: Bytes::new(),
                })
                .collect(),
            assignment: Bytes::new(),
            join_waiter: None,
            sync_waiter: None,
            synced: false,
            heartbeat_deadline_ms: 0,
        }
    }

    #[test]
    fn protocol_with_most_votes_among_common_ones_wins() {
        let mut g = Group::new("g", 0);
        g.state = GroupState::Stable;
        g.protocol_type = Some("consumer".into());
        g.members
            .insert("a".into(), member("a", &["range", "roundrobin"]));
        g.members
            .insert("b".into(), member("b", &["sticky", "roundrobin", "range"]));
        g.members
            .insert("c".into(), member("c", &["roundrobin", "range"]));
        // Common: range, roundrobin. Votes: a→range, b→roundrobin, c→roundrobin.
        assert_eq!(g.select_protocol().as_deref(), Some("roundrobin"));
        let p = |n: &str| Protocol {
            name: n.into(),
            metadata: Bytes::new(),
        };
        assert!(g.supports("consumer", &[p("range")]));
        assert!(!g.supports("consumer", &[p("sticky")]));
        assert!(!g.supports("connect", &[p("range")]));
    }

    #[test]
    fn tie_goes_to_first_members_preference() {
        let mut g = Group::new("g", 0);
        g.members.insert("a".into(), member("a", &["x", "y"]));
        g.members.insert("b".into(), member("b", &["y", "x"]));
        assert_eq!(g.select_protocol().as_deref(), Some("x"));
    }

    #[test]
    fn state_names_parse_case_insensitively() {
        assert_eq!(GroupState::parse("stable"), Some(GroupState::Stable));
        assert_eq!(
            GroupState::parse("CompletingRebalance"),
            Some(GroupState::CompletingRebalance)
        );
        assert_eq!(GroupState::parse("bogus"), None);
    }
}
