//! State-machine tests with a fake clock (Kafka classic rebalance protocol, KIP-345, KIP-394),
//! and persistence + replay tests on a real partition log in a glommio executor.

use crate::types::{Clock, ErrorCode, FakeClock};
use bytes::Bytes;
use kafka_protocol::ResponseError as E;
use std::time::Duration;

use super::coordinator::*;
use super::state::*;
use super::*;

const SESSION_MS: i32 = 10_000;
const REBALANCE_MS: i32 = 30_000;

/// Kafka's defaults but no initial rebalance delay (3 s by default): a lone member's join is
/// answered at once.
fn no_delay() -> CoordinatorConfig {
    CoordinatorConfig {
        initial_rebalance_delay_ms: 0,
        ..Default::default()
    }
}

fn coordinator() -> Coordinator {
    Coordinator::new(CoordinatorConfig {
        initial_rebalance_delay_ms: 0,
        ..Default::default()
    })
}

fn protocols(names: &[&str]) -> Vec<Protocol> {
    names
        .iter()
        .map(|n| Protocol {
            name: n.to_string(),
            metadata: Bytes::from(format!("meta-{n}")),
        })
        .collect()
}

fn join_req(group: &str, member: &str, instance: Option<&str>) -> JoinRequest {
    JoinRequest {
        group_id: group.into(),
        member_id: member.into(),
        group_instance_id: instance.map(String::from),
        client_id: "client".into(),
        client_host: "/127.0.0.1".into(),
        session_timeout_ms: SESSION_MS,
        rebalance_timeout_ms: REBALANCE_MS,
        protocol_type: "consumer".into(),
        protocols: protocols(&["range"]),
        require_known_member_id: false,
    }
}

/// The answer now, or the one already delivered to the waiter.
fn ready<T>(r: Reply<T>) -> Option<T> {
    match r {
        Reply::Now(v) => Some(v),
        Reply::Wait(rx) => rx.try_recv().ok(),
    }
}

fn waiting<T>(r: Reply<T>) -> async_channel::Receiver<T> {
    match r {
        Reply::Now(_) => panic!("expected the call to wait"),
        Reply::Wait(rx) => {
            assert!(rx.is_empty(), "expected no answer yet");
            rx
        }
    }
}

fn sync_req(
    group: &str,
    member: &str,
    generation: i32,
    assignments: Vec<(String, Bytes)>,
) -> SyncRequest {
    SyncRequest {
        group_id: group.into(),
        generation,
        member_id: member.into(),
        group_instance_id: None,
        protocol_type: Some("consumer".into()),
        protocol_name: Some("range".into()),
        assignments,
    }
}

/// One member joins an empty group and syncs: generation 1, Stable.
fn single_member_stable(c: &mut Coordinator, now: i64) -> String {
    let j = ready(c.join(join_req("g", "", None), now)).unwrap();
    assert_eq!(j.error, ErrorCode::NONE);
    assert_eq!(j.generation, 1);
    assert_eq!(j.leader, j.member_id);
    assert_eq!(j.members.len(), 1);
    let s = ready(c.sync(
        sync_req(
            "g",
            &j.member_id,
            1,
            vec![(j.member_id.clone(), Bytes::from_static(b"A"))],
        ),
        now,
    ))
    .unwrap();
    assert_eq!(s.error, ErrorCode::NONE);
    assert_eq!(&s.assignment[..], b"A");
    assert_eq!(c.group("g").unwrap().state, GroupState::Stable);
    j.member_id
}

#[test]
fn kafka_partition_for_matches_java_hash_code() {
    // Java: "group".hashCode() == 98629247; "test-group".hashCode() == -1637468497 → abs.
    assert_eq!(java_string_hash("group"), 98629247);
    assert_eq!(partition_for("group", 50), 98629247 % 50);
    assert_eq!(java_string_hash(""), 0);
    let h = java_string_hash("test-group");
    assert_eq!(partition_for("test-group", 50), h.abs() % 50);
    // Utils.abs(Integer.MIN_VALUE) == 0: "polygenelubricants".hashCode() == Integer.MIN_VALUE.
    assert_eq!(java_string_hash("polygenelubricants"), i32::MIN);
    assert_eq!(partition_for("polygenelubricants", 50), 0);
}

#[test]
fn first_join_without_member_id_requires_one_kip_394() {
    let mut c = coordinator();
    let mut req = join_req("g", "", None);
    req.require_known_member_id = true;
    let r = ready(c.join(req, 0)).unwrap();
    assert_eq!(r.error, ErrorCode::new(E::MemberIdRequired));
    assert!(!r.member_id.is_empty());
    let mut again = join_req("g", &r.member_id, None);
    again.require_known_member_id = true;
    let j = ready(c.join(again, 1)).unwrap();
    assert_eq!(j.error, ErrorCode::NONE);
    assert_eq!(j.member_id, r.member_id);
    assert_eq!(j.generation, 1);
}

#[test]
fn pending_member_id_expires_after_session_timeout() {
    let mut c = coordinator();
    let mut req = join_req("g", "", None);
    req.require_known_member_id = true;
    let r = ready(c.join(req, 0)).unwrap();
    c.tick(SESSION_MS as i64 + 1);
    let j = ready(c.join(join_req("g", &r.member_id, None), SESSION_MS as i64 + 2)).unwrap();
    assert_eq!(j.error, ErrorCode::new(E::UnknownMemberId));
}

#[test]
fn second_member_triggers_rebalance_and_both_get_the_new_generation() {
    let mut c = coordinator();
    let a = single_member_stable(&mut c, 0);
    // B joins: the group prepares a rebalance and B waits for A to rejoin.
    let b_rx = waiting(c.join(join_req("g", "", None), 10));
    assert_eq!(c.group("g").unwrap().state, GroupState::PreparingRebalance);
    assert_eq!(
        c.heartbeat(MemberRef::of_group("g").member(&a).generation(1), 20),
        ErrorCode::new(E::RebalanceInProgress)
    );
    let a_join = ready(c.join(join_req("g", &a, None), 30)).unwrap();
    let b_join = b_rx.try_recv().unwrap();
    assert_eq!((a_join.generation, b_join.generation), (2, 2));
    assert_eq!(a_join.leader, a, "the previous leader keeps leading");
    assert_eq!(a_join.members.len(), 2, "the leader sees every member");
    assert!(b_join.members.is_empty(), "followers see none");
    assert_eq!(c.group("g").unwrap().state, GroupState::CompletingRebalance);
    // The follower syncs first and waits for the leader.
    let b_sync = waiting(c.sync(sync_req("g", &b_join.member_id, 2, vec![]), 40));
    let assignments = vec![
        (a.clone(), Bytes::from_static(b"p0,p1")),
        (b_join.member_id.clone(), Bytes::from_static(b"p2,p3")),
    ];
    let a_sync = ready(c.sync(sync_req("g", &a, 2, assignments), 50)).unwrap();
    assert_eq!(&a_sync.assignment[..], b"p0,p1");
    assert_eq!(&b_sync.try_recv().unwrap().assignment[..], b"p2,p3");
    assert_eq!(c.group("g").unwrap().state, GroupState::Stable);
    assert_eq!(
        c.heartbeat(
            MemberRef::of_group("g")
                .member(&b_join.member_id)
                .generation(2),
            60
        ),
        ErrorCode::NONE
    );
    // A generation-1 heartbeat is refused.
    assert_eq!(
        c.heartbeat(MemberRef::of_group("g").member(&a).generation(1), 60),
        ErrorCode::new(E::IllegalGeneration)
    );
}

#[test]
fn unloading_a_partition_drops_its_groups_and_answers_waiting_members_not_coordinator() {
    let mut c = coordinator();
    let a = single_member_stable(&mut c, 0);
    // Another group on another partition stays.
    let other = (0..100)
        .map(|i| format!("other-{i}"))
        .find(|g| c.partition_of(g) != c.partition_of("g"))
        .unwrap();
    let o = ready(c.join(join_req(&other, "", None), 0)).unwrap();
    assert_eq!(o.error, ErrorCode::NONE);
    c.take_writes();
    // B waits in JoinGroup for A to rejoin; a record of "g" is queued.
    let b_rx = waiting(c.join(join_req("g", "", None), 10));
    c.apply_commit("g", vec![entry("t", 0, 5, 10)], 10);
    c.writes.push(Write {
        partition: c.partition_of("g"),
        key: b"k".to_vec(),
        value: None,
    });
    let p = c.partition_of("g");
    assert_eq!(c.unload_partition(p), 1);
    assert_eq!(
        b_rx.try_recv().unwrap().error,
        ErrorCode::new(E::NotCoordinator)
    );
    assert!(c.group("g").is_none(), "the group and its offsets are gone");
    assert!(c.take_writes().iter().all(|w| w.partition != p));
    assert!(c.group(&other).is_some(), "other partitions' groups stay");
    assert_eq!(
        c.heartbeat(MemberRef::of_group("g").member(&a).generation(1), 20),
        ErrorCode::new(E::UnknownMemberId)
    );
}

#[test]
fn rebalance_timeout_removes_members_that_did_not_rejoin() {
    let mut c = coordinator();
    let a = single_member_stable(&mut c, 0);
    let b_rx = waiting(c.join(join_req("g", "", None), 10));
    // A keeps heartbeating but never rejoins.
    for t in (1000..REBALANCE_MS as i64).step_by(3000) {
        c.heartbeat(MemberRef::of_group("g").member(&a).generation(1), t);
        c.tick(t);
        assert!(b_rx.is_empty());
    }
    c.tick(10 + REBALANCE_MS as i64);
    let b = b_rx.try_recv().unwrap();
    assert_eq!(b.error, ErrorCode::NONE);
    assert_eq!(b.generation, 2);
    assert_eq!(b.leader, b.member_id, "A was dropped, B leads");
    assert_eq!(c.group("g").unwrap().members.len(), 1);
    assert_eq!(
        c.heartbeat(MemberRef::of_group("g").member(&a).generation(1), 40_000),
        ErrorCode::new(E::UnknownMemberId)
    );
}

#[test]
fn session_timeout_removes_dead_member_and_rebalances_the_rest() {
    let mut c = coordinator();
    let a = single_member_stable(&mut c, 0);
    let b_rx = waiting(c.join(join_req("g", "", None), 0));
    let _ = ready(c.join(join_req("g", &a, None), 0)).unwrap();
    let b = b_rx.try_recv().unwrap();
    let _ = waiting(c.sync(sync_req("g", &b.member_id, 2, vec![]), 0));
    let _ = ready(c.sync(sync_req("g", &a, 2, vec![]), 0)).unwrap();
    // B heartbeats, A goes silent.
    let mut t = 0;
    while t < SESSION_MS as i64 + 1000 {
        t += 2000;
        let code = c.heartbeat(
            MemberRef::of_group("g").member(&b.member_id).generation(2),
            t,
        );
        c.tick(t);
        if code != ErrorCode::NONE {
            assert_eq!(code, ErrorCode::new(E::RebalanceInProgress));
            break;
        }
    }
    assert!(c.group("g").unwrap().members.get(&a).is_none(), "A expired");
    assert_eq!(c.group("g").unwrap().state, GroupState::PreparingRebalance);
    let b2 = ready(c.join(join_req("g", &b.member_id, None), t)).unwrap();
    assert_eq!(b2.generation, 3);
    assert_eq!(b2.leader, b.member_id);
}

#[test]
fn leave_group_batched_and_last_leave_empties_the_group() {
    let mut c = coordinator();
    let a = single_member_stable(&mut c, 0);
    let (top, per) = c.leave("g", &[(a.clone(), None), ("nobody".into(), None)], 10);
    assert_eq!(top, ErrorCode::NONE);
    assert_eq!(
        per,
        vec![ErrorCode::NONE, ErrorCode::new(E::UnknownMemberId)]
    );
    let g = c.group("g").unwrap();
    assert_eq!(g.state, GroupState::Empty);
    assert_eq!(
        g.generation, 2,
        "the empty rebalance bumps the generation as Kafka does"
    );
    let (top, per) = c.leave("missing", &[("x".into(), None)], 10);
    assert_eq!(
        (top, per),
        (ErrorCode::NONE, vec![ErrorCode::new(E::UnknownMemberId)])
    );
}

#[test]
fn inconsistent_protocols_and_bad_session_timeouts_are_refused() {
    let mut c = coordinator();
    single_member_stable(&mut c, 0);
    let mut other = join_req("g", "", None);
    other.protocols = protocols(&["roundrobin"]);
    assert_eq!(
        ready(c.join(other, 1)).unwrap().error,
        ErrorCode::new(E::InconsistentGroupProtocol)
    );
    let mut other_type = join_req("g", "", None);
    other_type.protocol_type = "connect".into();
    assert_eq!(
        ready(c.join(other_type, 1)).unwrap().error,
        ErrorCode::new(E::InconsistentGroupProtocol)
    );
    let mut empty = join_req("h", "", None);
    empty.protocols.clear();
    assert_eq!(
        ready(c.join(empty, 1)).unwrap().error,
        ErrorCode::new(E::InconsistentGroupProtocol)
    );
    assert!(
        c.group("h").is_none(),
        "a refused first join leaves no group behind"
    );
    let mut short = join_req("g", "", None);
    short.session_timeout_ms = 10;
    assert_eq!(
        ready(c.join(short, 1)).unwrap().error,
        ErrorCode::new(E::InvalidSessionTimeout)
    );
    assert_eq!(
        ready(c.join(join_req("nope", "ghost", None), 1))
            .unwrap()
            .error,
        ErrorCode::new(E::UnknownMemberId)
    );
    assert_eq!(
        ready(c.join(join_req("", "", None), 1)).unwrap().error,
        ErrorCode::new(E::InvalidGroupId)
    );
}

#[test]
fn sync_checks_generation_member_and_state() {
    let mut c = coordinator();
    let a = single_member_stable(&mut c, 0);
    assert_eq!(
        ready(c.sync(sync_req("g", &a, 7, vec![]), 1))
            .unwrap()
            .error,
        ErrorCode::new(E::IllegalGeneration)
    );
    assert_eq!(
        ready(c.sync(sync_req("g", "ghost", 1, vec![]), 1))
            .unwrap()
            .error,
        ErrorCode::new(E::UnknownMemberId)
    );
    assert_eq!(
        ready(c.sync(sync_req("nope", &a, 1, vec![]), 1))
            .unwrap()
            .error,
        ErrorCode::new(E::UnknownMemberId)
    );
    let mut bad = sync_req("g", &a, 1, vec![]);
    bad.protocol_name = Some("roundrobin".into());
    assert_eq!(
        ready(c.sync(bad, 1)).unwrap().error,
        ErrorCode::new(E::InconsistentGroupProtocol)
    );
    // In Stable, a repeated sync returns the stored assignment.
    assert_eq!(
        &ready(c.sync(sync_req("g", &a, 1, vec![]), 1))
            .unwrap()
            .assignment[..],
        b"A"
    );
    // During PreparingRebalance: REBALANCE_IN_PROGRESS.
    let _b = waiting(c.join(join_req("g", "", None), 2));
    assert_eq!(
        ready(c.sync(sync_req("g", &a, 1, vec![]), 3))
            .unwrap()
            .error,
        ErrorCode::new(E::RebalanceInProgress)
    );
}

#[test]
fn member_that_never_syncs_is_removed_after_the_rebalance_timeout() {
    let mut c = coordinator();
    let a = single_member_stable(&mut c, 0);
    let b_rx = waiting(c.join(join_req("g", "", None), 0));
    let _ = ready(c.join(join_req("g", &a, None), 0)).unwrap();
    let b = b_rx.try_recv().unwrap();
    // The leader syncs; B never does but keeps heartbeating.
    let _ = ready(c.sync(sync_req("g", &a, 2, vec![]), 0)).unwrap();
    let mut t = 0;
    while t <= REBALANCE_MS as i64 {
        t += 2000;
        c.heartbeat(MemberRef::of_group("g").member(&a).generation(2), t);
        c.heartbeat(
            MemberRef::of_group("g").member(&b.member_id).generation(2),
            t,
        );
        c.tick(t);
    }
    assert!(c.group("g").unwrap().members.get(&b.member_id).is_none());
}

#[test]
fn static_member_rejoin_replaces_member_id_without_rebalance_kip_345() {
    let mut c = coordinator();
    let j = ready(c.join(join_req("g", "", Some("i1")), 0)).unwrap();
    let b_rx = waiting(c.join(join_req("g", "", Some("i2")), 0));
    let _ = ready(c.join(join_req("g", &j.member_id, Some("i1")), 0)).unwrap();
    let jb = b_rx.try_recv().unwrap();
    assert_eq!(jb.generation, 2);
    let _ = waiting(c.sync(sync_req("g", &jb.member_id, 2, vec![]), 0));
    let asg = vec![
        (j.member_id.clone(), Bytes::from_static(b"X")),
        (jb.member_id.clone(), Bytes::from_static(b"Y")),
    ];
    let mut leader_sync = sync_req("g", &j.member_id, 2, asg);
    leader_sync.group_instance_id = Some("i1".into());
    ready(c.sync(leader_sync, 0)).unwrap();
    assert_eq!(c.group("g").unwrap().state, GroupState::Stable);

    // Follower i2 restarts: new member id, same generation, same assignment, no rebalance.
    let again = ready(c.join(join_req("g", "", Some("i2")), 100)).unwrap();
    assert_eq!(again.error, ErrorCode::NONE);
    assert_ne!(again.member_id, jb.member_id);
    assert_eq!(again.generation, 2);
    assert_eq!(c.group("g").unwrap().state, GroupState::Stable);
    let mut s = sync_req("g", &again.member_id, 2, vec![]);
    s.group_instance_id = Some("i2".into());
    assert_eq!(&ready(c.sync(s, 100)).unwrap().assignment[..], b"Y");
    // The old member id is fenced.
    assert_eq!(
        c.heartbeat(
            MemberRef::of_group("g")
                .member(&jb.member_id)
                .instance(Some("i2"))
                .generation(2),
            100
        ),
        ErrorCode::new(E::FencedInstanceId)
    );
    // The static leader restarting gets skip_assignment (KIP-814).
    let lead = ready(c.join(join_req("g", "", Some("i1")), 200)).unwrap();
    assert!(lead.skip_assignment);
    assert_eq!(lead.leader, lead.member_id);
    assert_eq!(lead.generation, 2);
    // Leave by instance id alone (KIP-345 batch leave).
    let (top, per) = c.leave("g", &[(String::new(), Some("i2".into()))], 300);
    assert_eq!((top, per), (ErrorCode::NONE, vec![ErrorCode::NONE]));
    assert_eq!(c.group("g").unwrap().state, GroupState::PreparingRebalance);
}

#[test]
fn static_rejoin_with_changed_protocol_triggers_rebalance() {
    let mut c = coordinator();
    let j = ready(c.join(join_req("g", "", Some("i1")), 0)).unwrap();
    let mut s = sync_req("g", &j.member_id, 1, vec![]);
    s.group_instance_id = Some("i1".into());
    ready(c.sync(s, 0)).unwrap();
    let mut changed = join_req("g", "", Some("i1"));
    // Still supports the current protocol (else INCONSISTENT_GROUP_PROTOCOL) but prefers another.
    changed.protocols = protocols(&["roundrobin", "range"]);
    let r = ready(c.join(changed, 10)).unwrap();
    // Sole member: the rebalance completes immediately with the new protocol.
    assert_eq!(r.generation, 2);
    assert_eq!(r.protocol_name.as_deref(), Some("roundrobin"));
}

#[test]
fn initial_rebalance_delay_waits_and_extends_for_new_members() {
    let mut c = Coordinator::new(CoordinatorConfig {
        initial_rebalance_delay_ms: 300,
        ..Default::default()
    });
    let a = waiting(c.join(join_req("g", "", None), 0));
    c.tick(200);
    let b = waiting(c.join(join_req("g", "", None), 200));
    c.tick(300);
    assert!(
        a.is_empty(),
        "B arrived during the delay: wait another delay"
    );
    c.tick(600);
    let (ra, rb) = (a.try_recv().unwrap(), b.try_recv().unwrap());
    assert_eq!((ra.generation, rb.generation), (1, 1));
    assert_eq!(c.group("g").unwrap().members.len(), 2);
}

#[test]
fn commit_rules_follow_kafka() {
    let mut c = coordinator();
    // Simple consumers (generation -1) may commit to an unknown or empty group.
    assert_eq!(c.check_commit(MemberRef::of_group("simple"), 0), Ok(()));
    assert_eq!(
        c.check_commit(MemberRef::of_group("simple").generation(3), 0),
        Err(ErrorCode::new(E::IllegalGeneration))
    );
    let a = single_member_stable(&mut c, 0);
    assert_eq!(
        c.check_commit(MemberRef::of_group("g").member(&a).generation(1), 0),
        Ok(())
    );
    assert_eq!(
        c.check_commit(MemberRef::of_group("g").member(&a).generation(0), 0),
        Err(ErrorCode::new(E::IllegalGeneration))
    );
    assert_eq!(
        c.check_commit(MemberRef::of_group("g").member("ghost").generation(1), 0),
        Err(ErrorCode::new(E::UnknownMemberId))
    );
    assert_eq!(
        c.check_commit(MemberRef::of_group("g"), 0),
        Err(ErrorCode::new(E::UnknownMemberId))
    );
    // During CompletingRebalance: REBALANCE_IN_PROGRESS.
    let b = waiting(c.join(join_req("g", "", None), 1));
    ready(c.join(join_req("g", &a, None), 1)).unwrap();
    let _ = b.try_recv().unwrap();
    assert_eq!(
        c.check_commit(MemberRef::of_group("g").member(&a).generation(2), 1),
        Err(ErrorCode::new(E::RebalanceInProgress))
    );
}

fn entry(topic: &str, p: i32, offset: i64, ts: i64) -> CommitEntry {
    CommitEntry {
        topic: topic.into(),
        partition: p,
        value: offsets::OffsetValue {
            offset,
            leader_epoch: -1,
            metadata: String::new(),
            commit_timestamp_ms: ts,
            expire_timestamp_ms: -1,
        },
    }
}

#[test]
fn delete_groups_only_when_empty_and_offsets_delete_respects_subscriptions() {
    let mut c = coordinator();
    let a = single_member_stable(&mut c, 0);
    c.apply_commit("g", vec![entry("t", 0, 5, 0)], 0);
    assert_eq!(c.delete_group("g"), ErrorCode::new(E::NonEmptyGroup));
    assert_eq!(c.delete_group("nope"), ErrorCode::new(E::GroupIdNotFound));
    // The test subscription bytes are not a consumer subscription: non-empty → NON_EMPTY_GROUP.
    assert_eq!(
        c.delete_offsets("g", &[("t".into(), 0)]),
        Err(ErrorCode::new(E::NonEmptyGroup))
    );
    c.leave("g", &[(a, None)], 1);
    c.take_writes();
    assert_eq!(
        c.delete_offsets("g", &[("t".into(), 0)]),
        Ok(vec![ErrorCode::NONE])
    );
    assert_eq!(c.fetch_offsets("g", None).len(), 0);
    assert_eq!(c.delete_group("g"), ErrorCode::NONE);
    assert!(c.group("g").is_none());
    let w = c.take_writes();
    assert!(w.iter().all(|w| w.value.is_none()), "tombstones only");
    assert_eq!(w.len(), 2, "one offset tombstone, one group tombstone");
}

#[test]
fn offsets_of_empty_groups_expire_after_retention() {
    let mut c = Coordinator::new(CoordinatorConfig {
        offsets_retention_ms: 1000,
        ..no_delay()
    });
    c.apply_commit(
        "simple",
        vec![entry("t", 0, 5, 0), entry("t", 1, 6, 900)],
        0,
    );
    assert_eq!(c.expire_offsets(999), 0);
    assert_eq!(c.expire_offsets(1000), 1);
    assert_eq!(c.fetch_offsets("simple", None).len(), 1);
    assert_eq!(c.expire_offsets(1900), 1);
    assert!(
        c.group("simple").is_none(),
        "an empty group without offsets is forgotten"
    );
    // Active groups keep their offsets.
    let a = single_member_stable(&mut c, 0);
    c.apply_commit("g", vec![entry("t", 0, 5, 0)], 0);
    assert_eq!(c.expire_offsets(1_000_000), 0);
    let _ = a;
}

#[test]
fn list_and_describe_groups() {
    let mut c = coordinator();
    let a = single_member_stable(&mut c, 0);
    c.apply_commit("simple", vec![entry("t", 0, 1, 0)], 0);
    let all = c.list_groups(&[], &[]);
    assert_eq!(all.len(), 2);
    let stable = c.list_groups(&["stable".to_string()], &[]);
    assert_eq!(stable.len(), 1);
    assert_eq!(stable[0].group_id, "g");
    assert_eq!(stable[0].protocol_type, "consumer");
    let d = c.describe("g", false);
    assert_eq!(d.state, "Stable");
    assert_eq!(d.protocol, "range");
    assert_eq!(d.members.len(), 1);
    assert_eq!(d.members[0].member_id, a);
    assert_eq!(&d.members[0].assignment[..], b"A");
    assert_eq!(&d.members[0].metadata[..], b"meta-range");
    assert_eq!(c.describe("nope", false).state, "Dead");
    assert_eq!(
        c.describe("nope", true).error,
        ErrorCode::new(E::GroupIdNotFound)
    );
}

// ---------------------------------------------------------------- persistence and replay

fn run<T>(f: impl std::future::Future<Output = T> + 'static) -> T {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(f)
}

async fn open_log(dir: &std::path::Path, p: i32) -> std::rc::Rc<crate::storage::PartitionLog> {
    crate::storage::PartitionLog::open(
        &dir.join(format!("{OFFSETS_TOPIC}-{p}")),
        crate::storage::LogConfig::default(),
        crate::storage::BatchCache::new(1 << 20),
    )
    .await
    .expect("open log")
}

/// Opens every partition as a fresh GroupShard would and replays it.
async fn open_shard(
    dir: &std::path::Path,
) -> (
    std::rc::Rc<GroupShard>,
    Vec<std::rc::Rc<crate::storage::PartitionLog>>,
) {
    let gs = GroupShard::new(no_delay(), Clock::system());
    let mut logs = vec![];
    for p in 0..OFFSETS_PARTITIONS {
        let log = open_log(dir, p).await;
        gs.load_partition(p, log.clone()).await.expect("replay");
        logs.push(log);
    }
    (gs, logs)
}

async fn close(logs: Vec<std::rc::Rc<crate::storage::PartitionLog>>) {
    for l in logs {
        l.close().await.expect("close");
    }
}

#[test]
fn committed_offsets_and_group_metadata_survive_replay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(async move {
        let (gs, logs) = open_shard(&path).await;
        // A consumer group with one member, committing through the generation checks.
        let j = gs
            .join(
                join_req("orders-app", "", Some("inst-1")),
                &crate::group::consumer::NoTopics,
            )
            .await;
        assert_eq!(j.error, ErrorCode::NONE);
        let mut s = sync_req(
            "orders-app",
            &j.member_id,
            1,
            vec![(j.member_id.clone(), Bytes::from_static(b"asg"))],
        );
        s.group_instance_id = Some("inst-1".into());
        assert_eq!(
            gs.sync(s, &crate::group::consumer::NoTopics).await.error,
            ErrorCode::NONE
        );
        let code = gs
            .commit(
                MemberRef::of_group("orders-app")
                    .member(&j.member_id)
                    .instance(Some("inst-1"))
                    .generation(1),
                vec![entry("orders", 0, 42, 1), entry("orders", 1, 7, 1)],
            )
            .await;
        assert_eq!(code, ErrorCode::NONE);
        // A simple consumer's commits, then one overwritten and one deleted.
        assert_eq!(
            gs.commit(
                MemberRef::of_group("simple"),
                vec![entry("t", 0, 1, 1), entry("t", 1, 2, 1)]
            )
            .await,
            ErrorCode::NONE
        );
        assert_eq!(
            gs.commit(MemberRef::of_group("simple"), vec![entry("t", 0, 10, 2)])
                .await,
            ErrorCode::NONE
        );
        // A deleted group leaves nothing behind.
        assert_eq!(
            gs.commit(MemberRef::of_group("gone"), vec![entry("t", 0, 3, 1)])
                .await,
            ErrorCode::NONE
        );
        assert_eq!(
            gs.with(|c, _| c.delete_group("gone")).await,
            Ok(ErrorCode::NONE)
        );
        gs.with(|c, _| c.delete_offsets("simple", &[("t".into(), 1)]))
            .await
            .unwrap()
            .unwrap();
        close(logs).await;

        let (gs2, logs2) = open_shard(&path).await;
        {
            let c = gs2.coordinator.borrow();
            let got = c.fetch_offsets("orders-app", None);
            assert_eq!(got.len(), 2);
            assert_eq!(got[0].2.as_ref().unwrap().offset, 42);
            assert_eq!(got[1].2.as_ref().unwrap().offset, 7);
            let simple = c.fetch_offsets("simple", None);
            assert_eq!(simple.len(), 1);
            assert_eq!((simple[0].1, simple[0].2.as_ref().unwrap().offset), (0, 10));
            assert!(c.group("gone").is_none());
            let g = c.group("orders-app").unwrap();
            assert_eq!(g.generation, 1);
            assert_eq!(g.state, GroupState::Stable);
            assert_eq!(g.static_members.get("inst-1"), Some(&j.member_id));
            assert_eq!(&g.members[&j.member_id].assignment[..], b"asg");
        }
        // The reloaded member can keep heartbeating in its generation.
        let hb = gs2
            .with(|c, now| {
                c.heartbeat(
                    MemberRef::of_group("orders-app")
                        .member(&j.member_id)
                        .instance(Some("inst-1"))
                        .generation(1),
                    now,
                )
            })
            .await;
        assert_eq!(hb, Ok(ErrorCode::NONE));
        close(logs2).await;
    });
}

#[test]
fn expired_offsets_are_tombstoned_and_stay_gone_after_replay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(async move {
        let (gs, logs) = open_shard(&path).await;
        assert_eq!(
            gs.commit(MemberRef::of_group("old"), vec![entry("t", 0, 1, 0)])
                .await,
            ErrorCode::NONE
        );
        let n = gs.with(|c, now| c.expire_offsets(now)).await.unwrap();
        assert_eq!(n, 1, "commit timestamp 0 is older than the 7-day retention");
        close(logs).await;
        let (gs2, logs2) = open_shard(&path).await;
        assert!(gs2.coordinator.borrow().group("old").is_none());
        close(logs2).await;
    });
}

#[test]
fn join_waits_in_the_executor_until_the_rebalance_completes() {
    run(async move {
        let gs = GroupShard::new(no_delay(), Clock::system());
        let timers = glommio::spawn_local(gs.clone().run_timers()).detach();
        let first = gs
            .join(join_req("g", "", None), &crate::group::consumer::NoTopics)
            .await;
        assert_eq!(first.generation, 1);
        let gs2 = gs.clone();
        let second = glommio::spawn_local(async move {
            gs2.join(join_req("g", "", None), &crate::group::consumer::NoTopics)
                .await
        });
        // The first member rejoins (as it would after REBALANCE_IN_PROGRESS on heartbeat).
        glommio::yield_if_needed().await;
        let again = gs
            .join(
                join_req("g", &first.member_id, None),
                &crate::group::consumer::NoTopics,
            )
            .await;
        let second = second.await;
        assert_eq!((again.generation, second.generation), (2, 2));
        drop(timers);
    });
}

#[test]
fn join_during_completing_rebalance_fails_waiting_syncs_and_restarts_the_join() {
    let mut c = coordinator();
    let a = single_member_stable(&mut c, 0);
    let b_rx = waiting(c.join(join_req("g", "", None), 0));
    ready(c.join(join_req("g", &a, None), 0)).unwrap();
    let b = b_rx.try_recv().unwrap();
    // B waits in SyncGroup for the leader; then C arrives.
    let b_sync = waiting(c.sync(sync_req("g", &b.member_id, 2, vec![]), 1));
    let _c_rx = waiting(c.join(join_req("g", "", None), 2));
    assert_eq!(
        b_sync.try_recv().unwrap().error,
        ErrorCode::new(E::RebalanceInProgress)
    );
    assert_eq!(c.group("g").unwrap().state, GroupState::PreparingRebalance);
    // The leader's late SyncGroup for generation 2 is refused too.
    assert_eq!(
        ready(c.sync(sync_req("g", &a, 2, vec![]), 3))
            .unwrap()
            .error,
        ErrorCode::new(E::RebalanceInProgress)
    );
}

#[test]
fn leaving_member_that_waits_in_join_gets_unknown_member_and_the_rest_complete() {
    let mut c = coordinator();
    let a = single_member_stable(&mut c, 0);
    let b_rx = waiting(c.join(join_req("g", "", None), 0));
    let b_id = c
        .group("g")
        .unwrap()
        .members
        .keys()
        .find(|k| **k != a)
        .unwrap()
        .clone();
    // B gives up before A rejoins: its pending join is answered, and the rebalance that only
    // waits for A now completes when A rejoins.
    let (top, per) = c.leave("g", &[(b_id, None)], 5);
    assert_eq!((top, per), (ErrorCode::NONE, vec![ErrorCode::NONE]));
    assert_eq!(
        b_rx.try_recv().unwrap().error,
        ErrorCode::new(E::UnknownMemberId)
    );
    let again = ready(c.join(join_req("g", &a, None), 6)).unwrap();
    assert_eq!((again.error, again.generation), (ErrorCode::NONE, 2));
    assert_eq!(again.members.len(), 1);
}

#[test]
fn queued_group_records_replay_into_the_same_state() {
    // Whatever the state machine persists must rebuild an equivalent group.
    let mut c = coordinator();
    let a = single_member_stable(&mut c, 0);
    let writes = c.take_writes();
    assert!(!writes.is_empty());
    let mut fresh = coordinator();
    for w in writes {
        let key = offsets::decode_key(&Bytes::from(w.key)).unwrap();
        let offsets::RecordKey::Group { group } = key else {
            panic!("only group records expected")
        };
        let v = w
            .value
            .map(|v| offsets::decode_group_value(&Bytes::from(v)).unwrap());
        fresh.load_group(&group, v, 100);
    }
    let g = fresh.group("g").unwrap();
    assert_eq!((g.state, g.generation), (GroupState::Stable, 1));
    assert_eq!(g.leader.as_deref(), Some(a.as_str()));
    assert_eq!(&g.members[&a].assignment[..], b"A");
    assert_eq!(
        fresh.heartbeat(MemberRef::of_group("g").member(&a).generation(1), 200),
        ErrorCode::NONE
    );
}

/// A `consumer`-protocol subscription (ConsumerProtocolSubscription v0) to `topics`.
fn subscription(topics: &[&str]) -> Bytes {
    let mut b = vec![0u8, 0];
    b.extend((topics.len() as i32).to_be_bytes());
    for t in topics {
        b.extend((t.len() as i16).to_be_bytes());
        b.extend(t.as_bytes());
    }
    b.extend((-1i32).to_be_bytes());
    Bytes::from(b)
}

#[test]
fn stable_consumer_groups_expire_only_offsets_of_unsubscribed_topics_kip_211() {
    let mut c = Coordinator::new(CoordinatorConfig {
        offsets_retention_ms: 1000,
        ..no_delay()
    });
    let mut req = join_req("g", "", None);
    req.protocols = vec![Protocol {
        name: "range".into(),
        metadata: subscription(&["live"]),
    }];
    let j = ready(c.join(req, 0)).unwrap();
    ready(c.sync(sync_req("g", &j.member_id, 1, vec![]), 0)).unwrap();
    c.apply_commit("g", vec![entry("live", 0, 5, 0), entry("old", 0, 6, 0)], 0);
    assert_eq!(c.expire_offsets(5000), 1);
    let left = c.fetch_offsets("g", None);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0, "live");
    // OffsetDelete refuses a subscribed topic of a non-empty consumer group.
    assert_eq!(
        c.delete_offsets("g", &[("live".into(), 0)]),
        Ok(vec![ErrorCode::new(E::GroupSubscribedToTopic)])
    );
}

#[test]
fn timer_task_expires_a_silent_member_without_outside_ticks() {
    run(async move {
        let fake = FakeClock::new(1_700_000_000_000);
        let gs = GroupShard::new(
            CoordinatorConfig {
                session_timeout_ms_min: 10,
                ..no_delay()
            },
            Clock::fake(&fake),
        );
        let timers = glommio::spawn_local(gs.clone().run_timers()).detach();
        let mut req = join_req("g", "", None);
        req.session_timeout_ms = 100;
        let j = gs.join(req, &crate::group::consumer::NoTopics).await;
        assert_eq!(j.error, ErrorCode::NONE);
        let s = gs
            .sync(
                sync_req("g", &j.member_id, 1, vec![]),
                &crate::group::consumer::NoTopics,
            )
            .await;
        assert_eq!(s.error, ErrorCode::NONE);
        let state = || gs.coordinator.borrow().group("g").map(|g| g.state);
        // No heartbeats: the timer loop alone must notice the expired session, once it is.
        fake.advance(Duration::from_millis(99));
        settle(&fake).await;
        assert_eq!(state(), Some(GroupState::Stable), "expired early");
        fake.advance(Duration::from_millis(1));
        until("the session expiry", || state() == Some(GroupState::Empty)).await;
        assert!(gs
            .coordinator
            .borrow()
            .group("g")
            .unwrap()
            .members
            .is_empty());
        drop(timers);
    });
}

/// How many times [`until`] lets the executor run other tasks before it fails the test: the
/// fake clock's wake-ups need a few turns of the timer loop, never thousands.
const TURNS_MAX: usize = 10_000;

/// Lets other tasks run until `cond` holds (time does not pass: the clocks here are fake).
async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..TURNS_MAX {
        if cond() {
            return;
        }
        futures_lite::future::yield_now().await;
    }
    panic!("never saw {what}");
}

/// Lets the timer loop run until it sleeps on the fake clock again.
async fn settle(fake: &FakeClock) {
    futures_lite::future::yield_now().await;
    until("the timer loop asleep", || fake.sleepers() > 0).await;
}

#[test]
fn seven_days_later_the_timer_loop_expires_offsets_of_an_empty_group() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(async move {
        let start = 1_700_000_000_000;
        let fake = FakeClock::new(start);
        let gs = GroupShard::new(CoordinatorConfig::default(), Clock::fake(&fake));
        let mut logs = vec![];
        for p in 0..OFFSETS_PARTITIONS {
            let log = open_log(&path, p).await;
            gs.load_partition(p, log.clone()).await.expect("replay");
            logs.push(log);
        }
        let timers = glommio::spawn_local(gs.clone().run_timers()).detach();
        assert_eq!(
            gs.commit(MemberRef::of_group("old"), vec![entry("t", 0, 1, start)])
                .await,
            ErrorCode::NONE
        );
        let offsets = || gs.coordinator.borrow().fetch_offsets("old", None).len();
        assert_eq!(offsets(), 1);
        // Retention is 7 days from the commit; the loop checks every 10 minutes.
        let day = Duration::from_secs(24 * 3600);
        fake.advance(6 * day);
        settle(&fake).await;
        assert_eq!(offsets(), 1, "expired before the retention");
        fake.advance(day + Duration::from_millis(OFFSETS_RETENTION_CHECK_MS as u64));
        until("the offsets' expiry", || offsets() == 0).await;
        drop(timers);
        close(logs).await;
    });
}

/// Rewrites a built batch's record count (and its CRC, so only the records are hostile).
fn with_record_count(mut b: Vec<u8>, count: i32) -> bytes::BytesMut {
    b[57..61].copy_from_slice(&count.to_be_bytes());
    let crc = crc32c::crc32c(&b[21..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    bytes::BytesMut::from(&b[..])
}

#[test]
fn hostile_records_in_the_offsets_log_are_skipped_at_replay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(async move {
        let p = partition_for("g", OFFSETS_PARTITIONS);
        let log = open_log(&path, p).await;
        let append = |b: bytes::BytesMut| {
            let log = log.clone();
            async move {
                log.append(b, crate::storage::Durability::Synced)
                    .await
                    .expect("append");
            }
        };
        // A group record whose member count is 2^31-1.
        let mut gv = offsets::group_value(&offsets::GroupValue {
            protocol_type: "consumer".into(),
            generation: 1,
            protocol: None,
            leader: None,
            current_state_timestamp_ms: 0,
            members: vec![],
        });
        let at = gv.len() - 4;
        gv[at..].copy_from_slice(&i32::MAX.to_be_bytes());
        let gk = offsets::group_key("g");
        append(builder::single(Some(&gk), Some(&gv), 1)[..].into()).await;
        // A key whose string length runs past the record, and an offset value cut short.
        append(builder::single(Some(&[0, 1, 0x7f, 0xff, b'g']), Some(&[0, 3]), 1)[..].into()).await;
        let ok = offsets::offset_value(&offsets::OffsetValue {
            offset: 5,
            leader_epoch: -1,
            metadata: String::new(),
            commit_timestamp_ms: crate::types::now_ms(),
            expire_timestamp_ms: -1,
        });
        let ok_key = offsets::offset_key("g", "t", 0);
        append(builder::single(Some(&ok_key), Some(&ok[..3]), 1)[..].into()).await;
        // A batch declaring 2^31-1 records.
        append(with_record_count(
            builder::single(Some(&ok_key), Some(&ok), 1),
            i32::MAX,
        ))
        .await;
        // Then a valid commit, which replay must still apply.
        let good = offsets::offset_value(&offsets::OffsetValue {
            offset: 7,
            ..offsets::decode_offset_value(&Bytes::from(ok.clone())).unwrap()
        });
        append(builder::single(Some(&ok_key), Some(&good), 1)[..].into()).await;
        log.close().await.expect("close");

        let gs = GroupShard::new(no_delay(), Clock::system());
        let log = open_log(&path, p).await;
        let applied = gs.load_partition(p, log.clone()).await.expect("replay");
        assert_eq!(applied, 1);
        {
            let c = gs.coordinator.borrow();
            let got = c.fetch_offsets("g", None);
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].2.as_ref().unwrap().offset, 7);
        }
        log.close().await.expect("close");
    });
}

fn compacted_offsets_config() -> crate::storage::LogConfig {
    crate::storage::LogConfig {
        segment_bytes: 4 << 10,
        compaction: Some(crate::storage::CompactionConfig {
            min_cleanable_dirty_ratio: 0.0,
            ..Default::default()
        }),
        ..crate::storage::LogConfig::default()
    }
}

/// `__consumer_offsets` is compacted: after many commits of the same partitions the cleaner
/// keeps one record per key, the replay at start reads only those, and the committed offsets
/// (and the deletion of a group) survive compaction and a restart.
#[test]
fn committed_offsets_survive_compaction_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(async move {
        let open_all = |path: std::path::PathBuf| async move {
            let gs = GroupShard::new(no_delay(), Clock::system());
            let mut logs = vec![];
            let mut applied = 0;
            for p in 0..OFFSETS_PARTITIONS {
                let log = crate::storage::PartitionLog::open(
                    &path.join(format!("{OFFSETS_TOPIC}-{p}")),
                    compacted_offsets_config(),
                    crate::storage::BatchCache::new(1 << 20),
                )
                .await
                .expect("open log");
                applied += gs.load_partition(p, log.clone()).await.expect("replay");
                logs.push(log);
            }
            (gs, logs, applied)
        };
        let (gs, logs, _) = open_all(path.clone()).await;
        for i in 0..300i64 {
            let code = gs
                .commit(
                    MemberRef::of_group("app"),
                    vec![entry("t", 0, i, 1), entry("t", 1, 2 * i, 1)],
                )
                .await;
            assert_eq!(code, ErrorCode::NONE);
        }
        assert_eq!(
            gs.commit(MemberRef::of_group("gone"), vec![entry("t", 0, 3, 1)])
                .await,
            ErrorCode::NONE
        );
        assert_eq!(
            gs.with(|c, _| c.delete_group("gone")).await,
            Ok(ErrorCode::NONE)
        );
        let before: u64 = logs.iter().map(|l| l.size_bytes()).sum();
        let mut passes = 0;
        for l in &logs {
            l.roll().await.unwrap();
            // Far past delete.retention.ms: the deleted group's tombstones go too.
            if l.compact(i64::MAX / 2).await.unwrap().is_some() {
                passes += 1;
            }
        }
        assert!(passes >= 1);
        let after: u64 = logs.iter().map(|l| l.size_bytes()).sum();
        assert!(after * 20 < before, "{after} of {before} bytes left");
        close(logs).await;

        let (gs2, logs2, applied) = open_all(path.clone()).await;
        assert!(applied <= 4, "{applied} records replayed");
        {
            let c = gs2.coordinator.borrow();
            let got = c.fetch_offsets("app", None);
            assert_eq!(got.len(), 2);
            assert_eq!(got[0].2.as_ref().unwrap().offset, 299);
            assert_eq!(got[1].2.as_ref().unwrap().offset, 598);
            assert!(c.group("gone").is_none());
            assert!(c.fetch_offsets("gone", None).iter().all(|o| o.2.is_none()));
        }
        close(logs2).await;
    });
}

/// Figures for perf/RESULTS.md (ignored; run with `--ignored --nocapture`, ideally `--release`):
/// 1,000,000 offset commits (one batch each, 1,000 groups x 10 partitions) in one
/// `__consumer_offsets` partition with Kafka's segment size for it (100 MiB), the replay time at
/// start before and after compaction, and the cleaner's throughput.
#[test]
#[ignore]
fn measure_offsets_replay_and_cleaner_throughput() {
    const COMMITS: i64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{OFFSETS_TOPIC}-0"));
    run(async move {
        let cfg = crate::storage::LogConfig {
            segment_bytes: 100 << 20,
            compaction: Some(crate::storage::CompactionConfig::default()),
            ..crate::storage::LogConfig::default()
        };
        let open = |cfg: crate::storage::LogConfig, path: std::path::PathBuf| async move {
            crate::storage::PartitionLog::open(
                &path,
                cfg,
                crate::storage::BatchCache::new(64 << 20),
            )
            .await
            .expect("open log")
        };
        let log = open(cfg.clone(), path.clone()).await;
        let mut pending = vec![];
        for i in 0..COMMITS {
            let key = offsets::offset_key(
                &format!("group-{}", i % 1000),
                "orders",
                ((i / 1000) % 10) as i32,
            );
            let value = offsets::offset_value(&offsets::OffsetValue {
                offset: i,
                leader_epoch: -1,
                metadata: String::new(),
                commit_timestamp_ms: 1_000,
                expire_timestamp_ms: -1,
            });
            let b = crate::protocol::builder::batch(&[crate::protocol::builder::Record {
                key: Some(&key),
                value: Some(&value),
                headers: &[],
                timestamp_ms: 1_000,
            }]);
            pending.push(log.append(
                bytes::BytesMut::from(&b[..]),
                crate::storage::Durability::Accepted,
            ));
            if pending.len() == 1000 {
                for p in pending.drain(..) {
                    p.await.expect("append");
                }
            }
        }
        for p in pending.drain(..) {
            p.await.expect("append");
        }
        drop(pending);
        log.roll().await.unwrap();
        let bytes_before = log.size_bytes();
        log.close().await.unwrap();
        drop(log);

        let replay = |path: std::path::PathBuf, cfg: crate::storage::LogConfig| async move {
            let t = std::time::Instant::now();
            let log = open(cfg, path).await;
            let gs = GroupShard::new(no_delay(), Clock::system());
            let applied = gs.load_partition(0, log.clone()).await.expect("replay");
            (t.elapsed(), applied, log)
        };
        let (t_before, applied_before, log) = replay(path.clone(), cfg.clone()).await;
        let t = std::time::Instant::now();
        let mut read = 0u64;
        let mut written = 0u64;
        while let Some(r) = log.compact(10_000_000).await.unwrap() {
            read += r.bytes_in + r.bytes_mapped;
            written += r.bytes_out;
            if !r.more {
                break;
            }
        }
        let t_clean = t.elapsed();
        let bytes_after = log.size_bytes();
        log.close().await.unwrap();
        drop(log);
        let (t_after, applied_after, log) = replay(path.clone(), cfg.clone()).await;
        log.close().await.unwrap();
        println!(
            "commits {COMMITS}: log {bytes_before} B; replay {:.3} s ({applied_before} records); \
             cleaner read {read} B wrote {written} B in {:.3} s = {:.1} MB/s (of log bytes \
             cleaned: {:.1} MB/s); after: log {bytes_after} B, replay {:.3} s ({applied_after} records)",
            t_before.as_secs_f64(),
            t_clean.as_secs_f64(),
            read as f64 / 1e6 / t_clean.as_secs_f64(),
            bytes_before as f64 / 1e6 / t_clean.as_secs_f64(),
            t_after.as_secs_f64(),
        );
    });
}
