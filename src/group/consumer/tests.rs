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
    // A classic join to a consumer group with members is refused.
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
