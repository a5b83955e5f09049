//! KIP-848 state-machine tests: assignors, incremental reconciliation (revocation acknowledged
//! before reassignment), epochs and fencing, static members, regex subscriptions, metadata
//! changes, timeouts, commits and replay of the queued records.

use std::collections::BTreeMap;

use bytes::Bytes;
use kafka_protocol::ResponseError as E;

use super::*;
use crate::group::coordinator::{Coordinator, CoordinatorConfig};

/// Topics by name: (id, partitions).
#[derive(Default)]
struct Map(BTreeMap<String, ([u8; 16], i32)>);

impl Map {
    fn with(mut self, name: &str, id: u8, partitions: i32) -> Map {
        self.0.insert(name.to_string(), ([id; 16], partitions));
        self
    }
}

impl Topics for Map {
    fn by_name(&self, name: &str) -> Option<([u8; 16], i32)> {
        self.0.get(name).copied()
    }
    fn by_id(&self, id: &[u8; 16]) -> Option<(String, i32)> {
        self.0
            .iter()
            .find(|(_, (i, _))| i == id)
            .map(|(n, (_, p))| (n.clone(), *p))
    }
    fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

const T: [u8; 16] = [1; 16];

fn coordinator() -> Coordinator {
    Coordinator::new(CoordinatorConfig::default())
}

fn join(member: &str, topics: &[&str]) -> HeartbeatRequest {
    HeartbeatRequest {
        version: 1,
        group_id: "g".into(),
        member_id: member.into(),
        member_epoch: 0,
        rebalance_timeout_ms: 60_000,
        subscribed_topic_names: Some(topics.iter().map(|t| t.to_string()).collect()),
        owned: Some(Assignment::new()),
        client_id: "c".into(),
        client_host: "/127.0.0.1".into(),
        ..Default::default()
    }
}

fn beat(member: &str, epoch: i32, owned: Option<&Assignment>) -> HeartbeatRequest {
    HeartbeatRequest {
        version: 1,
        group_id: "g".into(),
        member_id: member.into(),
        member_epoch: epoch,
        rebalance_timeout_ms: -1,
        owned: owned.cloned(),
        client_id: "c".into(),
        client_host: "/127.0.0.1".into(),
        ..Default::default()
    }
}

fn parts(a: &Assignment, t: [u8; 16]) -> Vec<i32> {
    a.get(&t)
        .map(|p| p.iter().copied().collect())
        .unwrap_or_default()
}

/// A client: remembers what it owns and its epoch, applies what the coordinator sends.
struct Client {
    id: String,
    epoch: i32,
    owned: Assignment,
}

impl Client {
    fn join(c: &mut Coordinator, topics: &Map, id: &str, subs: &[&str], now: i64) -> Client {
        let r = c.consumer_heartbeat(join(id, subs), topics, now);
        assert_eq!(r.error, ErrorCode::NONE, "{:?}", r.message);
        Client {
            id: id.into(),
            epoch: r.member_epoch,
            owned: r.assignment.expect("a join gets its assignment"),
        }
    }
    fn beat(&mut self, c: &mut Coordinator, topics: &Map, now: i64) -> HeartbeatResult {
        let r = c.consumer_heartbeat(beat(&self.id, self.epoch, Some(&self.owned)), topics, now);
        assert_eq!(r.error, ErrorCode::NONE, "{:?}", r.message);
        self.epoch = r.member_epoch;
        if let Some(a) = &r.assignment {
            self.owned = a.clone();
        }
        r
    }
}

fn no_overlap(clients: &[&Client]) {
    for (i, a) in clients.iter().enumerate() {
        for b in &clients[i + 1..] {
            assert!(
                !overlaps(&a.owned, &b.owned),
                "{} and {} own the same partition: {:?} / {:?}",
                a.id,
                b.id,
                a.owned,
                b.owned
            );
        }
    }
}

#[test]
fn second_member_gets_half_only_after_the_first_revokes() {
    let mut c = coordinator();
    let topics = Map::default().with("t", 1, 4);
    let mut a = Client::join(&mut c, &topics, "a", &["t"], 0);
    assert_eq!(parts(&a.owned, T), vec![0, 1, 2, 3]);
    assert_eq!(a.epoch, 1);
    let mut b = Client::join(&mut c, &topics, "b", &["t"], 10);
    // b is at the new epoch but gets nothing while a still holds its partitions.
    assert_eq!(b.epoch, 2);
    assert!(b.owned.is_empty());
    assert_eq!(
        c.group("g")
            .unwrap()
            .consumer
            .as_ref()
            .unwrap()
            .state_name(),
        "Reconciling"
    );
    // a is told to keep two (it revokes the rest); its epoch does not move yet.
    a.beat(&mut c, &topics, 20);
    assert_eq!(count(&a.owned), 2);
    assert_eq!(a.epoch, 1);
    no_overlap(&[&a, &b]);
    // b asks again: still nothing, a has not acknowledged.
    assert!(b.beat(&mut c, &topics, 30).assignment.is_none());
    // a acknowledges (its owned partitions no longer include the revoked ones).
    a.beat(&mut c, &topics, 40);
    assert_eq!(a.epoch, 2);
    b.beat(&mut c, &topics, 50);
    assert_eq!(count(&b.owned), 2);
    no_overlap(&[&a, &b]);
    let cg = c.group("g").unwrap().consumer.as_ref().unwrap();
    assert_eq!(cg.state_name(), "Stable");
    assert_eq!(cg.assignor, "uniform");
}

#[test]
fn leaving_member_partitions_move_to_the_rest() {
    let mut c = coordinator();
    let topics = Map::default().with("t", 1, 6);
    let mut a = Client::join(&mut c, &topics, "a", &["t"], 0);
    let mut b = Client::join(&mut c, &topics, "b", &["t"], 0);
    let mut x = Client::join(&mut c, &topics, "x", &["t"], 0);
    for now in 1..6 {
        a.beat(&mut c, &topics, now);
        b.beat(&mut c, &topics, now);
        x.beat(&mut c, &topics, now);
        no_overlap(&[&a, &b, &x]);
    }
    assert_eq!(
        [count(&a.owned), count(&b.owned), count(&x.owned)],
        [2, 2, 2]
    );
    let r = c.consumer_heartbeat(beat("x", x.epoch, None), &topics, 10);
    assert_eq!(r.error, ErrorCode::NONE);
    let mut leave = beat("x", -1, None);
    leave.member_epoch = -1;
    let r = c.consumer_heartbeat(leave, &topics, 11);
    assert_eq!((r.error, r.member_epoch), (ErrorCode::NONE, -1));
    a.beat(&mut c, &topics, 12);
    b.beat(&mut c, &topics, 12);
    assert_eq!(count(&a.owned) + count(&b.owned), 6);
    no_overlap(&[&a, &b]);
    // The old member is gone.
    let r = c.consumer_heartbeat(beat("x", x.epoch, None), &topics, 13);
    assert_eq!(r.error, ErrorCode::new(E::UnknownMemberId));
}

#[test]
fn range_assignor_when_members_ask_for_it() {
    let mut c = coordinator();
    let topics = Map::default().with("t", 1, 5);
    let mut req = join("a", &["t"]);
    req.server_assignor = Some("range".into());
    let r = c.consumer_heartbeat(req, &topics, 0);
    assert_eq!(
        parts(r.assignment.as_ref().unwrap(), T),
        vec![0, 1, 2, 3, 4]
    );
    let mut req = join("b", &["t"]);
    req.server_assignor = Some("range".into());
    c.consumer_heartbeat(req, &topics, 0);
    let cg = c.group("g").unwrap().consumer.as_ref().unwrap();
    assert_eq!(cg.assignor, "range");
    assert_eq!(parts(&cg.target["a"], T), vec![0, 1, 2]);
    assert_eq!(parts(&cg.target["b"], T), vec![3, 4]);
    // Unknown assignors are refused.
    let mut req = join("z", &["t"]);
    req.server_assignor = Some("sticky".into());
    let r = c.consumer_heartbeat(req, &topics, 0);
    assert_eq!(r.error, ErrorCode::new(E::UnsupportedAssignor));
}

#[test]
fn uniform_assignor_is_balanced_and_sticky() {
    let topics = Map::default().with("t", 1, 7).with("u", 2, 3);
    let subs: BTreeSet<[u8; 16]> = [[1; 16], [2; 16]].into();
    let previous = HashMap::new();
    let input = AssignInput {
        members: vec![
            ("a", subs.clone()),
            ("b", subs.clone()),
            ("c", subs.clone()),
        ],
        partitions: topics.0.values().map(|(id, n)| (*id, *n)).collect(),
        previous: &previous,
        member_racks: HashMap::new(),
        partition_racks: HashMap::new(),
    };
    let first = assign_uniform(&input);
    let mut counts: Vec<usize> = first.values().map(count).collect();
    counts.sort();
    assert_eq!(counts, vec![3, 3, 4]);
    // A fourth member: the first three keep most of what they had.
    let input = AssignInput {
        members: vec![
            ("a", subs.clone()),
            ("b", subs.clone()),
            ("c", subs.clone()),
            ("d", subs.clone()),
        ],
        partitions: topics.0.values().map(|(id, n)| (*id, *n)).collect(),
        previous: &first,
        member_racks: HashMap::new(),
        partition_racks: HashMap::new(),
    };
    let second = assign_uniform(&input);
    let mut counts: Vec<usize> = second.values().map(count).collect();
    counts.sort();
    assert_eq!(counts, vec![2, 2, 3, 3]);
    for m in ["a", "b", "c"] {
        assert!(
            is_subset(&second[m], &first[m]),
            "{m} lost partitions it could keep"
        );
    }
}

/// Partitions 0..n of topic `T`, replica racks alternating over `racks`.
fn racked(n: i32, racks: &[&str]) -> HashMap<([u8; 16], i32), BTreeSet<String>> {
    (0..n)
        .map(|p| ((T, p), [racks[p as usize % racks.len()].to_string()].into()))
        .collect()
}

#[test]
fn assignors_prefer_partitions_with_replicas_on_the_members_rack() {
    let subs: BTreeSet<[u8; 16]> = [T].into();
    let previous = HashMap::new();
    // Partitions 0, 2, 4 have their replica on rack r1; 1, 3, 5 on r2.
    let input = AssignInput {
        members: vec![("a", subs.clone()), ("b", subs.clone())],
        partitions: [(T, 6)].into(),
        previous: &previous,
        member_racks: [("a", "r2"), ("b", "r1")].into(),
        partition_racks: racked(6, &["r1", "r2"]),
    };
    for (name, got) in [
        ("uniform", assign_uniform(&input)),
        ("range", assign_range(&input)),
    ] {
        assert_eq!(parts(&got["a"], T), vec![1, 3, 5], "{name}");
        assert_eq!(parts(&got["b"], T), vec![0, 2, 4], "{name}");
    }
    // More partitions on one rack than its members may take: balance wins, the surplus goes
    // elsewhere. Rack r1 holds 0, 1, 2, 3 (of 4), and only `b` is on it.
    let input = AssignInput {
        partition_racks: racked(4, &["r1"]),
        partitions: [(T, 4)].into(),
        ..input
    };
    for (name, got) in [
        ("uniform", assign_uniform(&input)),
        ("range", assign_range(&input)),
    ] {
        assert_eq!(count(&got["a"]), 2, "{name}: balanced");
        assert_eq!(count(&got["b"]), 2, "{name}: balanced");
    }
    // Without racks (no member rack, or no replica rack) the assignments are as before:
    // contiguous ranges for `range`.
    let input = AssignInput {
        member_racks: HashMap::new(),
        partition_racks: HashMap::new(),
        partitions: [(T, 6)].into(),
        ..input
    };
    let got = assign_range(&input);
    assert_eq!(parts(&got["a"], T), vec![0, 1, 2]);
    assert_eq!(parts(&got["b"], T), vec![3, 4, 5]);
}

/// Topics whose partitions' replicas sit on racks: the member's heartbeat `rack_id` steers the
/// target through the coordinator.
#[test]
fn the_rack_of_a_members_heartbeat_steers_its_target() {
    struct Racked(Map);
    impl Topics for Racked {
        fn by_name(&self, name: &str) -> Option<([u8; 16], i32)> {
            self.0.by_name(name)
        }
        fn by_id(&self, id: &[u8; 16]) -> Option<(String, i32)> {
            self.0.by_id(id)
        }
        fn names(&self) -> Vec<String> {
            self.0.names()
        }
        fn racks(&self, _id: &[u8; 16], p: i32) -> BTreeSet<String> {
            [if p < 2 { "east" } else { "west" }.to_string()].into()
        }
    }
    let topics = Racked(Map::default().with("t", 1, 4));
    let mut c = coordinator();
    let mut a = join("a", &["t"]);
    a.rack_id = Some("west".into());
    let mut b = join("b", &["t"]);
    b.rack_id = Some("east".into());
    assert_eq!(c.consumer_heartbeat(a, &topics, 0).error, ErrorCode::NONE);
    assert_eq!(c.consumer_heartbeat(b, &topics, 1).error, ErrorCode::NONE);
    let cg = c.group("g").unwrap().consumer.as_ref().unwrap();
    assert_eq!(parts(&cg.target["a"], T), vec![2, 3]);
    assert_eq!(parts(&cg.target["b"], T), vec![0, 1]);
}

#[test]
fn epochs_are_checked_and_bad_requests_refused() {
    let mut c = coordinator();
    let topics = Map::default().with("t", 1, 2);
    let a = Client::join(&mut c, &topics, "a", &["t"], 0);
    // Ahead of the coordinator, or behind it with partitions it does not have: fenced.
    let r = c.consumer_heartbeat(beat("a", a.epoch + 1, None), &topics, 1);
    assert_eq!(r.error, ErrorCode::new(E::FencedMemberEpoch));
    assert_eq!(r.member_epoch, -1);
    let r = c.consumer_heartbeat(beat("nobody", 1, None), &topics, 1);
    assert_eq!(r.error, ErrorCode::new(E::UnknownMemberId));
    let r = c.consumer_heartbeat(
        HeartbeatRequest {
            group_id: "other".into(),
            ..beat("a", 1, None)
        },
        &topics,
        1,
    );
    assert_eq!(r.error, ErrorCode::new(E::GroupIdNotFound));
    let bad = |f: &dyn Fn(&mut HeartbeatRequest)| {
        let mut r = join("n", &["t"]);
        f(&mut r);
        r
    };
    for (what, req) in [
        ("empty group", bad(&|r| r.group_id.clear())),
        ("empty member id in v1", bad(&|r| r.member_id.clear())),
        (
            "no rebalance timeout",
            bad(&|r| r.rebalance_timeout_ms = -1),
        ),
        ("no subscription", bad(&|r| r.subscribed_topic_names = None)),
        (
            "owned on join",
            bad(&|r| r.owned = Some([(T, [0].into())].into())),
        ),
        ("epoch -3", bad(&|r| r.member_epoch = -3)),
        (
            "static leave without instance",
            bad(&|r| r.member_epoch = -2),
        ),
        (
            "regex in v0",
            bad(&|r| {
                r.version = 0;
                r.subscribed_topic_regex = Some("t.*".into())
            }),
        ),
    ] {
        let r = c.consumer_heartbeat(req, &topics, 2);
        assert_eq!(r.error, ErrorCode::new(E::InvalidRequest), "{what}");
    }
    let r = c.consumer_heartbeat(
        bad(&|r| r.subscribed_topic_regex = Some("(".into())),
        &topics,
        2,
    );
    assert_eq!(r.error, ErrorCode::new(E::InvalidRegularExpression));
    // An empty regex next to topic names means no regex (librdkafka sends that).
    let r = c.consumer_heartbeat(
        bad(&|r| r.subscribed_topic_regex = Some(String::new())),
        &topics,
        2,
    );
    assert_eq!(r.error, ErrorCode::NONE);
    let cg = c.group("g").unwrap().consumer.as_ref().unwrap();
    assert_eq!(cg.members["n"].subscribed_regex, None);
    // v0: the coordinator picks the member id.
    let r = c.consumer_heartbeat(
        bad(&|r| {
            r.version = 0;
            r.member_id.clear()
        }),
        &topics,
        3,
    );
    assert_eq!(r.error, ErrorCode::NONE);
    assert!(!r.member_id.unwrap().is_empty());
}

#[test]
fn group_max_size_and_classic_groups_refused() {
    let mut c = Coordinator::new(CoordinatorConfig {
        consumer: ConsumerConfig {
            max_size: 1,
            ..Default::default()
        },
        ..Default::default()
    });
    let topics = Map::default().with("t", 1, 2);
    Client::join(&mut c, &topics, "a", &["t"], 0);
    let r = c.consumer_heartbeat(join("b", &["t"]), &topics, 0);
    assert_eq!(r.error, ErrorCode::new(E::GroupMaxSizeReached));
    // A classic join without protocols to a consumer group with members is refused.
    let j = crate::group::coordinator::JoinRequest {
        group_id: "g".into(),
        member_id: String::new(),
        group_instance_id: None,
        client_id: "c".into(),
        client_host: "h".into(),
        session_timeout_ms: 10_000,
        rebalance_timeout_ms: 10_000,
        protocol_type: "consumer".into(),
        protocols: vec![],
        require_known_member_id: false,
    };
    match c.join(j, 1) {
        crate::group::Reply::Now(r) => {
            assert_eq!(r.error, ErrorCode::new(E::InconsistentGroupProtocol))
        }
        crate::group::Reply::Wait(_) => panic!("expected an answer"),
    }
    // DescribeGroups does not see it; ConsumerGroupDescribe does; ListGroups types it.
    assert_eq!(
        c.describe("g", true).error,
        ErrorCode::new(E::GroupIdNotFound)
    );
    let d = c.describe_consumer_group("g", &topics);
    assert_eq!(
        (d.error, d.state, d.members.len()),
        (ErrorCode::NONE, "Stable", 1)
    );
    assert_eq!(d.members[0].assignment[0].1, "t");
    let l = c.list_groups(&[], &["consumer".into()]);
    assert_eq!(l.len(), 1);
    assert_eq!((l[0].group_type, l[0].state), ("consumer", "Stable"));
    assert!(c.list_groups(&[], &["classic".into()]).is_empty());
}

#[test]
fn static_member_leaves_and_its_successor_takes_over() {
    let mut c = coordinator();
    let topics = Map::default().with("t", 1, 2);
    let mut req = join("a1", &["t"]);
    req.instance_id = Some("i".into());
    let r = c.consumer_heartbeat(req, &topics, 0);
    let epoch = r.member_epoch;
    assert_eq!(count(&r.assignment.unwrap()), 2);
    // Another member id with the same instance while the first is still in: refused.
    let mut req = join("a2", &["t"]);
    req.instance_id = Some("i".into());
    let r = c.consumer_heartbeat(req.clone(), &topics, 1);
    assert_eq!(r.error, ErrorCode::new(E::UnreleasedInstanceId));
    // Temporary leave (-2) keeps the partitions; the successor gets them at once.
    let mut leave = beat("a1", -2, None);
    leave.instance_id = Some("i".into());
    let r = c.consumer_heartbeat(leave, &topics, 2);
    assert_eq!((r.error, r.member_epoch), (ErrorCode::NONE, -2));
    let r = c.consumer_heartbeat(req, &topics, 3);
    assert_eq!(r.error, ErrorCode::NONE);
    assert_eq!(
        r.member_epoch, epoch,
        "no rebalance for a static member's return"
    );
    assert_eq!(count(&r.assignment.unwrap()), 2);
    let r = c.consumer_heartbeat(beat("a1", epoch, None), &topics, 4);
    assert_eq!(r.error, ErrorCode::new(E::UnknownMemberId));
}

#[test]
fn regex_subscriptions_follow_new_topics() {
    let mut c = coordinator();
    let mut topics = Map::default().with("orders-1", 1, 1).with("other", 3, 1);
    let mut req = join("a", &[]);
    req.subscribed_topic_names = None;
    req.subscribed_topic_regex = Some("orders-.*".into());
    let r = c.consumer_heartbeat(req, &topics, 0);
    let mut a = Client {
        id: "a".into(),
        epoch: r.member_epoch,
        owned: r.assignment.unwrap(),
    };
    // As in Kafka, the regex is resolved after the heartbeat that brought it: its topics come
    // with the next one.
    assert_eq!(count(&a.owned), 0);
    a.beat(&mut c, &topics, 0);
    assert_eq!(a.owned.keys().collect::<Vec<_>>(), vec![&[1u8; 16]]);
    topics = topics.with("orders-2", 2, 2);
    let before = a.epoch;
    a.beat(&mut c, &topics, 1);
    assert!(a.epoch > before, "a new matching topic bumps the epoch");
    assert_eq!(count(&a.owned), 3);
    // Partitions added to a subscribed topic are assigned too.
    topics = topics.with("orders-2", 2, 4);
    a.beat(&mut c, &topics, 2);
    assert_eq!(count(&a.owned), 5);
}

#[test]
fn session_and_revocation_timeouts_fence_members() {
    let mut c = coordinator();
    let topics = Map::default().with("t", 1, 2);
    let mut a = Client::join(&mut c, &topics, "a", &["t"], 0);
    let mut b = Client::join(&mut c, &topics, "b", &["t"], 1_000);
    // a is told to revoke but never acknowledges: fenced after its rebalance timeout.
    let r = c.consumer_heartbeat(beat("a", a.epoch, None), &topics, 2_000);
    assert_eq!(count(&r.assignment.unwrap()), 1);
    // Both keep heartbeating; a never acknowledges (its owned partitions are unchanged).
    c.consumer_heartbeat(beat("a", a.epoch, None), &topics, 40_000);
    b.beat(&mut c, &topics, 40_000);
    assert_eq!(c.next_deadline_ms(), Some(2_000 + 60_000));
    c.tick(62_000);
    assert!(!c
        .group("g")
        .unwrap()
        .consumer
        .as_ref()
        .unwrap()
        .members
        .contains_key("a"));
    b.beat(&mut c, &topics, 62_001);
    assert_eq!(count(&b.owned), 2);
    // b goes silent: removed after the session timeout, the group is empty.
    c.tick(62_001 + 45_000);
    let g = c.group("g").unwrap();
    assert_eq!(g.state, GroupState::Empty);
    assert_eq!(g.consumer.as_ref().unwrap().state_name(), "Empty");
    let r = c.consumer_heartbeat(beat("b", b.epoch, None), &topics, 200_000);
    assert_eq!(r.error, ErrorCode::new(E::UnknownMemberId));
    a.epoch = 0;
}

#[test]
fn commits_use_the_member_epoch() {
    let mut c = coordinator();
    let topics = Map::default().with("t", 1, 2);
    let a = Client::join(&mut c, &topics, "a", &["t"], 0);
    let who = crate::group::MemberRef::of_group("g").member("a");
    assert_eq!(c.check_commit(who.generation(a.epoch), 1), Ok(()));
    assert_eq!(
        c.check_commit(who.generation(a.epoch - 1), 1),
        Err(ErrorCode::new(E::StaleMemberEpoch))
    );
    assert_eq!(
        c.check_commit(who.generation(a.epoch + 1), 1),
        Err(ErrorCode::new(E::FencedMemberEpoch))
    );
    assert_eq!(
        c.check_commit(
            crate::group::MemberRef::of_group("g")
                .member("zz")
                .generation(1),
            1
        ),
        Err(ErrorCode::new(E::UnknownMemberId))
    );
    // A standalone commit only once the group is empty.
    assert_eq!(
        c.check_commit(crate::group::MemberRef::of_group("g"), 1),
        Err(ErrorCode::new(E::UnknownMemberId))
    );
}

#[test]
fn queued_records_replay_into_the_same_members_and_assignments() {
    let mut c = coordinator();
    let topics = Map::default().with("t", 1, 4);
    let mut a = Client::join(&mut c, &topics, "a", &["t"], 0);
    let mut b = Client::join(&mut c, &topics, "b", &["t"], 0);
    for now in 1..4 {
        a.beat(&mut c, &topics, now);
        b.beat(&mut c, &topics, now);
    }
    let mut leave = beat("b", -1, None);
    leave.member_epoch = -1;
    c.consumer_heartbeat(leave, &topics, 5);
    let writes = c.take_writes();
    let mut fresh = coordinator();
    for (i, w) in writes.into_iter().enumerate() {
        let rec = crate::protocol::records::Record {
            offset: i as i64,
            timestamp_ms: 0,
            key: Some(Bytes::from(w.key)),
            value: w.value.map(Bytes::from),
            headers: vec![],
        };
        assert!(crate::group::apply_record(&mut fresh, &rec, 100));
    }
    let cg = fresh.group("g").unwrap().consumer.as_ref().unwrap();
    let orig = c.group("g").unwrap().consumer.as_ref().unwrap();
    assert_eq!(cg.epoch, orig.epoch);
    assert_eq!(cg.members.keys().collect::<Vec<_>>(), vec!["a"]);
    assert_eq!(cg.members["a"].assigned, orig.members["a"].assigned);
    assert_eq!(cg.members["a"].epoch, orig.members["a"].epoch);
    // The member carries on with the restarted coordinator and converges.
    let r = fresh.consumer_heartbeat(beat("a", a.epoch, Some(&a.owned)), &topics, 200);
    assert_eq!(r.error, ErrorCode::NONE);
    a.epoch = r.member_epoch;
    if let Some(x) = r.assignment {
        a.owned = x;
    }
    let r = fresh.consumer_heartbeat(beat("a", a.epoch, Some(&a.owned)), &topics, 201);
    assert_eq!(r.error, ErrorCode::NONE);
    if let Some(x) = r.assignment {
        a.owned = x;
    }
    assert_eq!(count(&a.owned), 4);
}

/// Replays records into a fresh coordinator, as a restart does.
fn replayed(log: &[crate::group::coordinator::Write]) -> Coordinator {
    let mut fresh = coordinator();
    for (i, w) in log.iter().enumerate() {
        let rec = crate::protocol::records::Record {
            offset: i as i64,
            timestamp_ms: 0,
            key: Some(Bytes::from(w.key.clone())),
            value: w.value.clone().map(Bytes::from),
            headers: vec![],
        };
        assert!(crate::group::apply_record(&mut fresh, &rec, 100));
    }
    fresh
}

#[test]
fn the_target_assignment_is_replayed_mid_reconciliation() {
    let mut c = coordinator();
    let topics = Map::default().with("t", 1, 6);
    // `a` holds everything; `b` joins: a new target, `a` has not revoked yet.
    let a = Client::join(&mut c, &topics, "a", &["t"], 0);
    let _b = Client::join(&mut c, &topics, "b", &["t"], 1);
    let orig = c.group("g").unwrap().consumer.as_ref().unwrap().clone();
    assert_eq!(orig.assignment_epoch, orig.epoch);
    assert_eq!(
        count(&orig.members["a"].assigned),
        6,
        "a has not reconciled"
    );
    let mut log = c.take_writes();
    let mut fresh = replayed(&log);
    let cg = fresh.group("g").unwrap().consumer.as_ref().unwrap();
    assert_eq!(cg.epoch, orig.epoch);
    assert_eq!(
        cg.assignment_epoch, orig.assignment_epoch,
        "no recomputation pending"
    );
    assert_eq!(cg.target, orig.target);
    assert_eq!(cg.assignor, orig.assignor);
    // `a` carries on against the restarted coordinator: it keeps exactly its pre-restart
    // target and revokes the rest.
    let r = fresh.consumer_heartbeat(beat("a", a.epoch, Some(&a.owned)), &topics, 200);
    assert_eq!(r.error, ErrorCode::NONE);
    assert_eq!(r.assignment.expect("a revocation"), orig.target["a"]);
    // A member that leaves takes its target with it.
    let mut leave = beat("b", -1, None);
    leave.member_epoch = -1;
    fresh.consumer_heartbeat(leave, &topics, 300);
    log.extend(fresh.take_writes());
    let again = replayed(&log);
    let cg = again.group("g").unwrap().consumer.as_ref().unwrap();
    assert_eq!(cg.target.keys().collect::<Vec<_>>(), vec!["a"]);
}

#[test]
fn a_full_request_gets_the_assignment_again_after_a_lost_answer() {
    let mut c = coordinator();
    let topics = Map::default().with("t", 1, 4);
    let a = Client::join(&mut c, &topics, "a", &["t"], 0);
    let mut b = Client::join(&mut c, &topics, "b", &["t"], 10);
    // The answer telling a to revoke two partitions is lost on the way.
    let lost = c.consumer_heartbeat(beat("a", a.epoch, None), &topics, 20);
    assert_eq!(count(lost.assignment.as_ref().expect("revocation")), 2);
    // A light heartbeat (nothing changed on the client) is not told again...
    let light = c.consumer_heartbeat(beat("a", a.epoch, None), &topics, 30);
    assert!(light.assignment.is_none());
    // ...but a full one, which a client sends after a timeout, is: it learns its revocation.
    let mut full = beat("a", a.epoch, Some(&a.owned));
    full.rebalance_timeout_ms = 60_000;
    full.subscribed_topic_names = Some(vec!["t".into()]);
    let r = c.consumer_heartbeat(full, &topics, 40);
    assert_eq!(r.error, ErrorCode::NONE, "{:?}", r.message);
    let mut a = Client {
        id: "a".into(),
        epoch: r.member_epoch,
        owned: r.assignment.expect("a full request gets the assignment"),
    };
    assert_eq!(count(&a.owned), 2);
    // It acknowledges; b then gets the other two.
    a.beat(&mut c, &topics, 50);
    b.beat(&mut c, &topics, 60);
    assert_eq!(count(&b.owned), 2);
    no_overlap(&[&a, &b]);
}

// ------------------------------------------------------------------ mixed groups, migration

/// A ConsumerProtocolSubscription v1 naming `topics` and the partitions `owned` of topic `t`.
fn subscription(topics: &[&str], owned: &[i32]) -> Bytes {
    let mut s = vec![0, 1];
    s.extend((topics.len() as i32).to_be_bytes());
    for t in topics {
        s.extend((t.len() as i16).to_be_bytes());
        s.extend(t.as_bytes());
    }
    s.extend((-1i32).to_be_bytes());
    if owned.is_empty() {
        s.extend(0i32.to_be_bytes());
    } else {
        s.extend(1i32.to_be_bytes());
        s.extend(1i16.to_be_bytes());
        s.extend(b"t");
        s.extend((owned.len() as i32).to_be_bytes());
        for p in owned {
            s.extend(p.to_be_bytes());
        }
    }
    Bytes::from(s)
}

fn classic_join_req(member: &str, owned: &[i32]) -> crate::group::coordinator::JoinRequest {
    crate::group::coordinator::JoinRequest {
        group_id: "g".into(),
        member_id: member.into(),
        group_instance_id: None,
        client_id: "classic".into(),
        client_host: "/127.0.0.1".into(),
        session_timeout_ms: 10_000,
        rebalance_timeout_ms: 30_000,
        protocol_type: "consumer".into(),
        protocols: vec![crate::group::state::Protocol {
            name: "range".into(),
            metadata: subscription(&["t"], owned),
        }],
        require_known_member_id: true,
    }
}

fn now<T>(r: crate::group::Reply<T>) -> T {
    match r {
        crate::group::Reply::Now(v) => v,
        crate::group::Reply::Wait(rx) => rx.try_recv().expect("an answer"),
    }
}

/// A classic client: JoinGroup + SyncGroup, then heartbeats with its generation.
struct Classic {
    id: String,
    generation: i32,
    owned: Vec<i32>,
}

impl Classic {
    /// Joins (or rejoins, owning `self.owned`) and syncs; returns the partitions of `t` it got.
    fn rejoin(&mut self, c: &mut Coordinator, topics: &Map, at: i64) {
        let mut j = now(c.join_with(classic_join_req(&self.id, &self.owned), topics, at));
        if j.error == ErrorCode::new(E::MemberIdRequired) {
            self.id = j.member_id.clone();
            j = now(c.join_with(classic_join_req(&self.id, &self.owned), topics, at));
        }
        assert_eq!(j.error, ErrorCode::NONE);
        assert_eq!(j.protocol_name.as_deref(), Some("range"));
        assert!(j.leader.is_empty() && j.members.is_empty());
        self.generation = j.generation;
        let s = now(c.sync_with(
            crate::group::coordinator::SyncRequest {
                group_id: "g".into(),
                generation: j.generation,
                member_id: self.id.clone(),
                group_instance_id: None,
                protocol_type: Some("consumer".into()),
                protocol_name: Some("range".into()),
                assignments: vec![],
            },
            topics,
            at,
        ));
        assert_eq!(s.error, ErrorCode::NONE);
        let a = crate::group::offsets::decode_assignment(&s.assignment).expect("assignment");
        self.owned = a
            .into_iter()
            .filter(|(t, _)| t == "t")
            .flat_map(|(_, ps)| ps)
            .collect();
    }
    fn beat(&self, c: &mut Coordinator, at: i64) -> ErrorCode {
        c.heartbeat(
            crate::group::MemberRef::of_group("g")
                .member(&self.id)
                .generation(self.generation),
            at,
        )
    }
    fn as_assignment(&self) -> Assignment {
        let mut a = Assignment::new();
        for p in &self.owned {
            insert(&mut a, T, *p);
        }
        a
    }
}

/// Drives a consumer member and a classic member until neither has anything left to do.
fn settle(c: &mut Coordinator, topics: &Map, a: &mut Client, b: &mut Classic, from: i64) {
    for at in from..from + 10 {
        a.beat(c, topics, at);
        if b.beat(c, at) == ErrorCode::new(E::RebalanceInProgress) {
            b.rejoin(c, topics, at);
        }
        let owned_b = b.as_assignment();
        assert!(
            !overlaps(&a.owned, &owned_b),
            "a partition owned twice: {:?} / {:?}",
            a.owned,
            owned_b
        );
    }
}

#[test]
fn classic_member_joins_a_consumer_group_and_shares_its_partitions() {
    let mut c = coordinator();
    let topics = Map::default().with("t", 1, 4);
    let mut a = Client::join(&mut c, &topics, "a", &["t"], 0);
    assert_eq!(count(&a.owned), 4);
    let mut b = Classic {
        id: String::new(),
        generation: -1,
        owned: vec![],
    };
    b.rejoin(&mut c, &topics, 1);
    // Everything is still a's: b waits for a to revoke.
    assert!(b.owned.is_empty());
    settle(&mut c, &topics, &mut a, &mut b, 2);
    assert_eq!((count(&a.owned), b.owned.len()), (2, 2));
    assert_eq!(b.beat(&mut c, 20), ErrorCode::NONE);
    // The group stays a consumer group and shows both members.
    let l = c.list_groups(&[], &[]);
    assert_eq!((l[0].group_type, l[0].state), ("consumer", "Stable"));
    let d = c.describe_consumer_group("g", &topics);
    assert_eq!(d.members.len(), 2);
    // A wrong generation is refused as a classic member expects.
    let stale = Classic {
        generation: b.generation - 1,
        ..Classic {
            id: b.id.clone(),
            generation: 0,
            owned: vec![],
        }
    };
    assert_eq!(stale.beat(&mut c, 21), ErrorCode::new(E::IllegalGeneration));
    // Commits with its generation only.
    let who = crate::group::MemberRef::of_group("g").member(&b.id);
    assert!(c.check_commit(who.generation(b.generation), 22).is_ok());
    assert_eq!(
        c.check_commit(who.generation(b.generation + 1), 22),
        Err(ErrorCode::new(E::IllegalGeneration))
    );
    // b leaves: a gets everything back, the group stays a consumer group.
    let (top, per) = c.leave("g", &[(b.id.clone(), None)], 23);
    assert_eq!((top, per), (ErrorCode::NONE, vec![ErrorCode::NONE]));
    a.beat(&mut c, &topics, 24);
    a.beat(&mut c, &topics, 25);
    assert_eq!(count(&a.owned), 4);
    assert_eq!(c.list_groups(&[], &[])[0].group_type, "consumer");
}

#[test]
fn cooperative_classic_member_keeps_partitions_until_it_revokes() {
    let mut c = coordinator();
    let topics = Map::default().with("t", 1, 4);
    let mut a = Client::join(&mut c, &topics, "a", &["t"], 0);
    let mut b = Classic {
        id: String::new(),
        generation: -1,
        owned: vec![],
    };
    b.rejoin(&mut c, &topics, 1);
    settle(&mut c, &topics, &mut a, &mut b, 2);
    // A third member: b must give up a partition, and keeps reporting what it owns.
    let mut d = Client::join(&mut c, &topics, "d", &["t"], 20);
    assert_eq!(b.beat(&mut c, 21), ErrorCode::new(E::RebalanceInProgress));
    let before = b.owned.clone();
    b.rejoin(&mut c, &topics, 22);
    // The sync hands b what it keeps; it has not acknowledged yet, so d cannot have it.
    assert!(b.owned.len() < before.len());
    let revoked: Vec<i32> = before
        .iter()
        .filter(|p| !b.owned.contains(p))
        .copied()
        .collect();
    d.beat(&mut c, &topics, 23);
    assert!(revoked.iter().all(|p| !parts(&d.owned, T).contains(p)));
    // b rejoins owning only what it kept: the revocation is acknowledged.
    for at in 24..40 {
        a.beat(&mut c, &topics, at);
        d.beat(&mut c, &topics, at);
        if b.beat(&mut c, at) == ErrorCode::new(E::RebalanceInProgress) {
            b.rejoin(&mut c, &topics, at);
        }
        let bo = b.as_assignment();
        no_overlap(&[&a, &d]);
        assert!(!overlaps(&a.owned, &bo) && !overlaps(&d.owned, &bo));
    }
    assert_eq!(count(&a.owned) + count(&d.owned) + b.owned.len(), 4);
    assert_eq!(b.beat(&mut c, 41), ErrorCode::NONE);
}

/// A classic group "g" with two members that own partitions 0-1 and 2-3 of "t" at generation 1,
/// and an offset committed.
fn classic_group(c: &mut Coordinator, topics: &Map) -> (Classic, Classic) {
    let mut x = classic_join_req("", &[]);
    x.require_known_member_id = false;
    let rx = c.join_with(x, topics, 0);
    let mut y = classic_join_req("", &[]);
    y.require_known_member_id = false;
    let ry = c.join_with(y, topics, 0);
    // The initial rebalance delay, extended once for the second member.
    c.tick(3_000);
    c.tick(6_000);
    let jx = now(rx);
    let jy = now(ry);
    assert_eq!(jx.generation, 1);
    let (leader, other) = if jx.leader == jx.member_id {
        (jx, jy)
    } else {
        (jy, jx)
    };
    let asg =
        |ps: &[i32]| crate::group::offsets::encode_assignment(1, &[("t".to_string(), ps.to_vec())]);
    let sync = |id: &str, a: Vec<(String, Bytes)>| crate::group::coordinator::SyncRequest {
        group_id: "g".into(),
        generation: 1,
        member_id: id.into(),
        group_instance_id: None,
        protocol_type: Some("consumer".into()),
        protocol_name: Some("range".into()),
        assignments: a,
    };
    let so = c.sync_with(sync(&other.member_id, vec![]), topics, 10_001);
    let sl = c.sync_with(
        sync(
            &leader.member_id,
            vec![
                (leader.member_id.clone(), asg(&[0, 1])),
                (other.member_id.clone(), asg(&[2, 3])),
            ],
        ),
        topics,
        10_001,
    );
    assert_eq!(now(so).error, ErrorCode::NONE);
    assert_eq!(now(sl).error, ErrorCode::NONE);
    c.apply_commit(
        "g",
        vec![crate::group::coordinator::CommitEntry {
            topic: "t".into(),
            partition: 0,
            value: crate::group::offsets::OffsetValue {
                offset: 42,
                leader_epoch: -1,
                metadata: String::new(),
                commit_timestamp_ms: 10_001,
                expire_timestamp_ms: -1,
            },
        }],
        10_001,
    );
    (
        Classic {
            id: leader.member_id,
            generation: 1,
            owned: vec![0, 1],
        },
        Classic {
            id: other.member_id,
            generation: 1,
            owned: vec![2, 3],
        },
    )
}

#[test]
fn classic_group_upgrades_member_by_member_and_downgrades_back() {
    let mut c = coordinator();
    let topics = Map::default().with("t", 1, 4);
    let (mut x, mut y) = classic_group(&mut c, &topics);
    assert_eq!(c.list_groups(&[], &[])[0].group_type, "classic");
    // A consumer-protocol member joins: the group converts, the classic members keep what they
    // own until they rejoin, so the newcomer gets nothing yet.
    let mut a = Client::join(&mut c, &topics, "a", &["t"], 11_000);
    assert!(a.owned.is_empty());
    let l = c.list_groups(&[], &[]);
    assert_eq!(
        (l[0].group_type, l[0].protocol_type.as_str()),
        ("consumer", "consumer")
    );
    assert_eq!(
        c.describe("g", true).error,
        ErrorCode::new(E::GroupIdNotFound)
    );
    assert_eq!(c.describe_consumer_group("g", &topics).members.len(), 3);
    assert_eq!(c.fetch_offsets("g", None).len(), 1, "offsets kept");
    // The classic members are told to rejoin; eager ones revoke everything first.
    for at in 11_001..11_010 {
        a.beat(&mut c, &topics, at);
        for m in [&mut x, &mut y] {
            if m.beat(&mut c, at) == ErrorCode::new(E::RebalanceInProgress) {
                m.owned.clear();
                m.rejoin(&mut c, &topics, at);
            }
        }
        let (xo, yo) = (x.as_assignment(), y.as_assignment());
        assert!(!overlaps(&a.owned, &xo) && !overlaps(&a.owned, &yo) && !overlaps(&xo, &yo));
    }
    assert_eq!(count(&a.owned) + x.owned.len() + y.owned.len(), 4);
    assert!(!a.owned.is_empty());
    // Rolling on: x is replaced by a second consumer-protocol member.
    let (_, per) = c.leave("g", &[(x.id.clone(), None)], 12_000);
    assert_eq!(per, vec![ErrorCode::NONE]);
    let mut b = Client::join(&mut c, &topics, "b", &["t"], 12_001);
    for at in 12_002..12_012 {
        a.beat(&mut c, &topics, at);
        b.beat(&mut c, &topics, at);
        if y.beat(&mut c, at) == ErrorCode::new(E::RebalanceInProgress) {
            y.owned.clear();
            y.rejoin(&mut c, &topics, at);
        }
        no_overlap(&[&a, &b]);
        let yo = y.as_assignment();
        assert!(!overlaps(&a.owned, &yo) && !overlaps(&b.owned, &yo));
    }
    assert_eq!(count(&a.owned) + count(&b.owned) + y.owned.len(), 4);
    // Both consumer-protocol members leave: only the classic y remains, the group goes back to
    // classic and rebalances.
    for id in ["a", "b"] {
        let epoch = if id == "a" { a.epoch } else { b.epoch };
        let mut leave = beat(id, epoch, None);
        leave.member_epoch = -1;
        assert_eq!(
            c.consumer_heartbeat(leave, &topics, 13_000).error,
            ErrorCode::NONE
        );
    }
    let l = c.list_groups(&[], &[]);
    assert_eq!(
        (l[0].group_type, l[0].state),
        ("classic", "PreparingRebalance")
    );
    assert_eq!(c.fetch_offsets("g", None).len(), 1, "offsets kept");
    let j = now(c.join_with(classic_join_req(&y.id, &[]), &topics, 13_001));
    assert_eq!(j.error, ErrorCode::NONE);
    assert_eq!(j.leader, y.id, "a classic leader again");
    assert_eq!(c.list_groups(&[], &[])[0].state, "CompletingRebalance");
}

#[test]
fn migration_policy_decides_upgrade_and_downgrade() {
    let topics = Map::default().with("t", 1, 4);
    for (policy, up) in [
        (MigrationPolicy::Disabled, false),
        (MigrationPolicy::Downgrade, false),
        (MigrationPolicy::Upgrade, true),
    ] {
        let mut c = Coordinator::new(CoordinatorConfig {
            consumer: ConsumerConfig {
                migration: policy,
                ..Default::default()
            },
            ..Default::default()
        });
        let (_x, y) = classic_group(&mut c, &topics);
        let r = c.consumer_heartbeat(join("a", &["t"]), &topics, 11_000);
        if !up {
            assert_eq!(r.error, ErrorCode::new(E::GroupIdNotFound), "{policy:?}");
            continue;
        }
        assert_eq!(r.error, ErrorCode::NONE);
        let mut leave = beat("a", r.member_epoch, None);
        leave.member_epoch = -1;
        c.consumer_heartbeat(leave, &topics, 11_001);
        // Upgrade only: classic members stay in a consumer group.
        assert_eq!(
            c.list_groups(&[], &[])[0].group_type,
            "consumer",
            "{policy:?}"
        );
        assert!(c
            .group("g")
            .unwrap()
            .consumer
            .as_ref()
            .unwrap()
            .members
            .contains_key(&y.id));
    }
    assert_eq!(
        MigrationPolicy::parse("BIDIRECTIONAL"),
        Some(MigrationPolicy::Bidirectional)
    );
    assert_eq!(MigrationPolicy::parse("x"), None);
}

#[test]
fn classic_members_of_a_consumer_group_survive_a_replay() {
    let mut c = coordinator();
    let topics = Map::default().with("t", 1, 4);
    let (_x, _y) = classic_group(&mut c, &topics);
    c.take_writes();
    let mut a = Client::join(&mut c, &topics, "a", &["t"], 11_000);
    let mut b = Classic {
        id: String::new(),
        generation: -1,
        owned: vec![],
    };
    b.rejoin(&mut c, &topics, 11_001);
    a.beat(&mut c, &topics, 11_002);
    let writes = c.take_writes();
    // Everything since the upgrade (its classic-group tombstone first) rebuilds the group.
    let mut fresh = coordinator();
    for (i, w) in writes.into_iter().enumerate() {
        let rec = crate::protocol::records::Record {
            offset: i as i64,
            timestamp_ms: 0,
            key: Some(Bytes::from(w.key)),
            value: w.value.map(Bytes::from),
            headers: vec![],
        };
        assert!(crate::group::apply_record(&mut fresh, &rec, 20_000));
    }
    let cg = fresh.group("g").unwrap().consumer.as_ref().unwrap();
    let orig = c.group("g").unwrap().consumer.as_ref().unwrap();
    assert_eq!(cg.epoch, orig.epoch);
    assert_eq!(cg.members.len(), orig.members.len());
    for (id, m) in &orig.members {
        let r = &cg.members[id];
        assert_eq!(
            (&r.classic, &r.assigned, r.epoch),
            (&m.classic, &m.assigned, m.epoch)
        );
    }
    // The classic member carries on with its generation.
    assert_ne!(
        b.beat(&mut fresh, 20_001),
        ErrorCode::new(E::UnknownMemberId)
    );
}
