//! Consumer groups against the real broker with real clients: librdkafka (rdkafka crate) for the
//! rebalance flows and committed offsets, the `sluice` CLI as a second, killable group member,
//! and raw requests for the error codes of the classic protocol (Kafka protocol guide: JoinGroup,
//! SyncGroup, Heartbeat, OffsetCommit).

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{sluice, topic_name, Broker};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

const WAIT_MAX: Duration = Duration::from_secs(60);

fn consumer(b: &Broker, group: &str, extra: &[(&str, &str)]) -> BaseConsumer {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", b.bootstrap())
        .set("group.id", group)
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    for (k, v) in extra {
        cfg.set(*k, *v);
    }
    cfg.create().expect("consumer")
}

fn assigned(c: &BaseConsumer) -> usize {
    c.assignment().map(|a| a.count()).unwrap_or(0)
}

/// Polls every consumer until `done` holds (bounded); returns the messages seen per consumer.
fn poll_until(
    cs: &[&BaseConsumer],
    mut done: impl FnMut(&[&BaseConsumer], &[Vec<String>]) -> bool,
) -> Vec<Vec<String>> {
    let start = Instant::now();
    let deadline = start + WAIT_MAX;
    let mut seen = vec![Vec::new(); cs.len()];
    loop {
        for (i, c) in cs.iter().enumerate() {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(20)) {
                seen[i].push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
            }
        }
        if done(cs, &seen) {
            // Rebalance times for the record (visible with --nocapture); not asserted.
            eprintln!(
                "condition reached after {:?}; assignments {:?}",
                start.elapsed(),
                cs.iter().map(|c| assigned(c)).collect::<Vec<_>>()
            );
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "condition not reached within {WAIT_MAX:?}; assignments {:?}",
            cs.iter().map(|c| assigned(c)).collect::<Vec<_>>()
        );
    }
}

#[test]
fn two_consumers_split_partitions_and_the_survivor_takes_all_when_one_leaves() {
    let b = Broker::options().cores(2).start();
    let topic = topic_name("split");
    b.create_topic(&topic, 4);
    let group = "split-group";
    let c1 = consumer(&b, group, &[]);
    let c2 = consumer(&b, group, &[]);
    c1.subscribe(&[&topic]).unwrap();
    c2.subscribe(&[&topic]).unwrap();
    poll_until(&[&c1, &c2], |cs, _| {
        assigned(cs[0]) == 2 && assigned(cs[1]) == 2
    });
    drop(c2); // closes: LeaveGroup
    poll_until(&[&c1], |cs, _| assigned(cs[0]) == 4);
}

#[test]
fn a_killed_member_is_expired_after_its_session_and_its_partitions_move() {
    let b = Broker::options().cores(2).start();
    let topic = topic_name("kill");
    b.create_topic(&topic, 4);
    let group = "kill-group";
    // The CLI is a full group member (session timeout 10 s); kill it with SIGKILL.
    let mut cli = Command::new(common::sluice_bin())
        .args([
            "consume",
            &topic,
            "--group",
            group,
            "--brokers",
            &b.bootstrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sluice consume");
    let c1 = consumer(&b, group, &[]);
    c1.subscribe(&[&topic]).unwrap();
    poll_until(&[&c1], |cs, _| assigned(cs[0]) == 2);
    cli.kill().expect("SIGKILL the CLI member");
    let _ = cli.wait();
    poll_until(&[&c1], |cs, _| assigned(cs[0]) == 4);
}

#[test]
fn cooperative_sticky_rebalances_incrementally() {
    let b = Broker::options().cores(2).start();
    let topic = topic_name("coop");
    b.create_topic(&topic, 4);
    let extra = [("partition.assignment.strategy", "cooperative-sticky")];
    let c1 = consumer(&b, "coop-group", &extra);
    c1.subscribe(&[&topic]).unwrap();
    poll_until(&[&c1], |cs, _| assigned(cs[0]) == 4);
    let before: Vec<i32> = c1
        .assignment()
        .unwrap()
        .elements()
        .iter()
        .map(|e| e.partition())
        .collect();
    let c2 = consumer(&b, "coop-group", &extra);
    c2.subscribe(&[&topic]).unwrap();
    poll_until(&[&c1, &c2], |cs, _| {
        assigned(cs[0]) == 2 && assigned(cs[1]) == 2
    });
    // Incremental: c1 kept a subset of what it had, c2 got the rest.
    let kept: Vec<i32> = c1
        .assignment()
        .unwrap()
        .elements()
        .iter()
        .map(|e| e.partition())
        .collect();
    assert!(kept.iter().all(|p| before.contains(p)));
    assert!(matches!(
        c1.rebalance_protocol(),
        rdkafka::consumer::RebalanceProtocol::Cooperative
    ));
    drop(c2);
    poll_until(&[&c1], |cs, _| assigned(cs[0]) == 4);
}

#[test]
fn a_restarted_consumer_resumes_at_the_committed_offset_and_two_groups_each_get_everything() {
    let b = Broker::options().cores(2).start();
    let topic = topic_name("resume");
    b.create_topic(&topic, 2);
    b.produce_to_partitions(&topic, 2, 10, "");
    let c = consumer(&b, "resume-a", &[]);
    c.subscribe(&[&topic]).unwrap();
    let seen = poll_until(&[&c], |_, s| s[0].len() >= 20);
    assert_eq!(seen[0].len(), 20);
    c.commit_consumer_state(CommitMode::Sync).expect("commit");
    drop(c);
    b.produce_to_partitions(&topic, 2, 5, "");
    let c = consumer(&b, "resume-a", &[]);
    c.subscribe(&[&topic]).unwrap();
    let seen = poll_until(&[&c], |_, s| s[0].len() >= 10);
    assert_eq!(
        seen[0].len(),
        10,
        "only the records after the commit: {:?}",
        seen[0]
    );
    assert!(seen[0].iter().all(|v| v.ends_with("-0")
        || v.ends_with("-1")
        || v.ends_with("-2")
        || v.ends_with("-3")
        || v.ends_with("-4")));
    // A second group reads everything, independently.
    let other = consumer(&b, "resume-b", &[]);
    other.subscribe(&[&topic]).unwrap();
    let seen = poll_until(&[&other], |_, s| s[0].len() >= 30);
    assert_eq!(seen[0].len(), 30);
}

fn committed_of(b: &Broker, group: &str, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
    let c = consumer(b, group, &[]);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c
        .committed_offsets(tpl, Duration::from_secs(20))
        .expect("committed offsets");
    got.elements()
        .iter()
        .map(|e| {
            (
                e.partition(),
                match e.offset() {
                    Offset::Offset(o) => o,
                    _ => -1,
                },
            )
        })
        .collect()
}

#[test]
fn committed_offsets_survive_sigterm_and_kill_9() {
    let mut b = Broker::options().cores(2).start();
    let topic = topic_name("durable");
    b.create_topic(&topic, 3);
    let c = consumer(&b, "durable-group", &[]);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(7))
        .unwrap();
    tpl.add_partition_offset(&topic, 1, Offset::Offset(0))
        .unwrap();
    tpl.add_partition_offset(&topic, 2, Offset::Offset(42))
        .unwrap();
    c.commit(&tpl, CommitMode::Sync).expect("commit");
    drop(c);
    let want: BTreeMap<i32, i64> = [(0, 7), (1, 0), (2, 42)].into_iter().collect();
    assert_eq!(committed_of(&b, "durable-group", &topic, 3), want);
    assert!(b.sigterm().success());
    b.restart();
    assert_eq!(committed_of(&b, "durable-group", &topic, 3), want);
    b.sigkill();
    b.restart();
    assert_eq!(committed_of(&b, "durable-group", &topic, 3), want);
}

#[test]
fn groups_are_listed_and_described_through_the_client_api() {
    let b = Broker::options().cores(2).start();
    let topic = topic_name("desc");
    b.create_topic(&topic, 2);
    let c = consumer(&b, "described", &[]);
    c.subscribe(&[&topic]).unwrap();
    poll_until(&[&c], |cs, _| assigned(cs[0]) == 2);
    let list = c
        .fetch_group_list(Some("described"), Duration::from_secs(20))
        .expect("group list");
    let g = list
        .groups()
        .iter()
        .find(|g| g.name() == "described")
        .expect("group listed");
    assert_eq!(g.state(), "Stable");
    assert_eq!(g.protocol_type(), "consumer");
    assert_eq!(g.members().len(), 1);
    let out = sluice(
        &[
            "group",
            "describe",
            "described",
            "--brokers",
            &b.bootstrap(),
        ],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Stable") && text.contains(&topic),
        "{text}"
    );
    let out = sluice(&["group", "list", "--brokers", &b.bootstrap()], None);
    assert!(String::from_utf8_lossy(&out.stdout).contains("described"));
}

#[test]
fn reset_offsets_then_consume_reads_from_the_new_position() {
    let b = Broker::options().cores(2).start();
    let topic = topic_name("reset");
    b.create_topic(&topic, 1);
    b.produce_to_partitions(&topic, 1, 10, "");
    let bs = b.bootstrap();
    let out = sluice(
        &[
            "consume",
            &topic,
            "--group",
            "rg",
            "--from-beginning",
            "-e",
            "--brokers",
            &bs,
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 10);
    // Everything is committed: nothing more to read.
    let out = sluice(
        &["consume", &topic, "--group", "rg", "-e", "--brokers", &bs],
        None,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 0);
    let out = sluice(
        &[
            "group",
            "reset-offsets",
            "rg",
            "--topic",
            &topic,
            "--to-offset",
            "6",
            "--brokers",
            &bs,
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sluice(
        &["consume", &topic, "--group", "rg", "-e", "--brokers", &bs],
        None,
    );
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines, vec!["p0-6", "p0-7", "p0-8", "p0-9"]);
    let out = sluice(
        &[
            "group",
            "reset-offsets",
            "rg",
            "--topic",
            &topic,
            "--to-earliest",
            "--brokers",
            &bs,
        ],
        None,
    );
    assert!(out.status.success());
    let out = sluice(
        &["consume", &topic, "--group", "rg", "-e", "--brokers", &bs],
        None,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 10);
    let out = sluice(&["group", "delete", "rg", "--brokers", &bs], None);
    assert!(out.status.success());
    let out = sluice(&["group", "describe", "rg", "--brokers", &bs], None);
    assert!(!out.status.success());
}

mod raw {
    use super::*;
    use common::Client;
    use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
    use kafka_protocol::messages::offset_commit_request::{
        OffsetCommitRequestPartition, OffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::ResponseError;

    fn s(x: &str) -> StrBytes {
        StrBytes::from_string(x.to_string())
    }

    fn join(c: &mut Client, group: &str, member: &str) -> JoinGroupResponse {
        let req = JoinGroupRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_session_timeout_ms(10_000)
            .with_rebalance_timeout_ms(10_000)
            .with_member_id(s(member))
            .with_protocol_type(s("consumer"))
            .with_protocols(vec![JoinGroupRequestProtocol::default()
                .with_name(s("range"))
                .with_metadata(sluice::cli::group::encode_subscription(&[]))]);
        c.call_at(ApiKey::JoinGroup, 5, &req).expect("join")
    }

    #[test]
    fn classic_protocol_errors_match_kafka() {
        let b = Broker::options().cores(2).start();
        let topic = topic_name("errs");
        b.create_topic(&topic, 1);
        let mut c = Client::connect(&b.bootstrap()).expect("connect");
        c.wait_coordinator("eg", WAIT_MAX);
        // KIP-394: a first join without member id is told to come back with the one it is given.
        let first = join(&mut c, "eg", "");
        assert_eq!(first.error_code, ResponseError::MemberIdRequired.code());
        assert!(!first.member_id.is_empty());
        let joined = join(&mut c, "eg", first.member_id.as_str());
        assert_eq!(joined.error_code, 0);
        assert_eq!(joined.leader, joined.member_id);
        // Heartbeat from an unknown group / member, and with a stale generation.
        let hb = |c: &mut Client, g: &str, gen: i32, m: &str| -> i16 {
            let r: HeartbeatResponse = c
                .call_at(
                    ApiKey::Heartbeat,
                    3,
                    &HeartbeatRequest::default()
                        .with_group_id(GroupId(s(g)))
                        .with_generation_id(gen)
                        .with_member_id(s(m)),
                )
                .expect("heartbeat");
            r.error_code
        };
        assert_eq!(
            hb(&mut c, "no-such-group", 1, "m"),
            ResponseError::UnknownMemberId.code()
        );
        assert_eq!(
            hb(&mut c, "eg", joined.generation_id, "stranger"),
            ResponseError::UnknownMemberId.code()
        );
        assert_eq!(
            hb(
                &mut c,
                "eg",
                joined.generation_id + 5,
                joined.member_id.as_str()
            ),
            ResponseError::IllegalGeneration.code()
        );
        // SyncGroup with a wrong generation.
        let r: SyncGroupResponse = c
            .call_at(
                ApiKey::SyncGroup,
                3,
                &SyncGroupRequest::default()
                    .with_group_id(GroupId(s("eg")))
                    .with_generation_id(joined.generation_id + 1)
                    .with_member_id(joined.member_id.clone()),
            )
            .expect("sync");
        assert_eq!(r.error_code, ResponseError::IllegalGeneration.code());
        // OffsetCommit: unknown topic per partition; stale generation for the whole request.
        let commit = |c: &mut Client, gen: i32, member: &StrBytes, t: &str| -> i16 {
            let req = OffsetCommitRequest::default()
                .with_group_id(GroupId(s("eg")))
                .with_generation_id_or_member_epoch(gen)
                .with_member_id(member.clone())
                .with_topics(vec![OffsetCommitRequestTopic::default()
                    .with_name(TopicName(s(t)))
                    .with_partitions(vec![OffsetCommitRequestPartition::default()
                        .with_partition_index(0)
                        .with_committed_offset(1)])]);
            let r: OffsetCommitResponse = c.call_at(ApiKey::OffsetCommit, 7, &req).expect("commit");
            r.topics[0].partitions[0].error_code
        };
        // Complete the rebalance first so the group is Stable.
        let r: SyncGroupResponse = c
            .call_at(
                ApiKey::SyncGroup,
                3,
                &SyncGroupRequest::default()
                    .with_group_id(GroupId(s("eg")))
                    .with_generation_id(joined.generation_id)
                    .with_member_id(joined.member_id.clone()),
            )
            .expect("sync");
        assert_eq!(r.error_code, 0);
        assert_eq!(
            commit(
                &mut c,
                joined.generation_id,
                &joined.member_id,
                "no-such-topic"
            ),
            ResponseError::UnknownTopicOrPartition.code()
        );
        assert_eq!(
            commit(&mut c, joined.generation_id - 1, &joined.member_id, &topic),
            ResponseError::IllegalGeneration.code()
        );
        assert_eq!(
            commit(&mut c, joined.generation_id, &joined.member_id, &topic),
            0
        );
        // DeleteGroups: a group with members is not deleted; an unknown one is not found.
        let r: DeleteGroupsResponse = c
            .call_at(
                ApiKey::DeleteGroups,
                1,
                &DeleteGroupsRequest::default()
                    .with_groups_names(vec![GroupId(s("eg")), GroupId(s("ghost"))]),
            )
            .expect("delete groups");
        assert_eq!(r.results[0].error_code, ResponseError::NonEmptyGroup.code());
        assert_eq!(
            r.results[1].error_code,
            ResponseError::GroupIdNotFound.code()
        );
        // The broker still serves everyone.
        assert!(
            sluice(&["topic", "list", "--brokers", &b.bootstrap()], None)
                .status
                .success()
        );
    }

    // KIP-345: a static member that restarts takes over its identity without a rebalance, and
    // its old member id is fenced.
    #[test]
    fn static_member_rejoins_without_rebalance_and_old_id_is_fenced() {
        let b = Broker::options().cores(2).start();
        let mut c = Client::connect(&b.bootstrap()).expect("connect");
        c.wait_coordinator("sg", WAIT_MAX);
        let join_static = |c: &mut Client, member: &str| -> JoinGroupResponse {
            let req = JoinGroupRequest::default()
                .with_group_id(GroupId(s("sg")))
                .with_session_timeout_ms(10_000)
                .with_rebalance_timeout_ms(10_000)
                .with_member_id(s(member))
                .with_group_instance_id(Some(s("instance-1")))
                .with_protocol_type(s("consumer"))
                .with_protocols(vec![JoinGroupRequestProtocol::default()
                    .with_name(s("range"))
                    .with_metadata(sluice::cli::group::encode_subscription(&[]))]);
            c.call_at(ApiKey::JoinGroup, 5, &req).expect("join")
        };
        let first = join_static(&mut c, "");
        assert_eq!(
            first.error_code, 0,
            "static members need no MEMBER_ID_REQUIRED round"
        );
        let r: SyncGroupResponse = c
            .call_at(
                ApiKey::SyncGroup,
                3,
                &SyncGroupRequest::default()
                    .with_group_id(GroupId(s("sg")))
                    .with_generation_id(first.generation_id)
                    .with_member_id(first.member_id.clone())
                    .with_group_instance_id(Some(s("instance-1"))),
            )
            .expect("sync");
        assert_eq!(r.error_code, 0);
        let again = join_static(&mut c, "");
        assert_eq!(again.error_code, 0);
        assert_eq!(
            again.generation_id, first.generation_id,
            "no rebalance for a static rejoin"
        );
        assert_ne!(again.member_id, first.member_id);
        let r: HeartbeatResponse = c
            .call_at(
                ApiKey::Heartbeat,
                3,
                &HeartbeatRequest::default()
                    .with_group_id(GroupId(s("sg")))
                    .with_generation_id(first.generation_id)
                    .with_member_id(first.member_id.clone())
                    .with_group_instance_id(Some(s("instance-1"))),
            )
            .expect("heartbeat");
        assert_eq!(r.error_code, ResponseError::FencedInstanceId.code());
        let r: HeartbeatResponse = c
            .call_at(
                ApiKey::Heartbeat,
                3,
                &HeartbeatRequest::default()
                    .with_group_id(GroupId(s("sg")))
                    .with_generation_id(again.generation_id)
                    .with_member_id(again.member_id.clone())
                    .with_group_instance_id(Some(s("instance-1"))),
            )
            .expect("heartbeat");
        assert_eq!(r.error_code, 0);
    }

    /// Commits are checked like Kafka's `doCommitOffsets`; DescribeGroups v6 reports unknown
    /// groups (KIP-1043) where v5 answers Dead; transaction coordinators do not exist yet.
    #[test]
    fn commit_checks_describe_versions_and_coordinator_key_types() {
        let b = Broker::options().cores(2).start();
        let topic = topic_name("known");
        b.create_topic(&topic, 1);
        let mut c = Client::connect(&b.bootstrap()).expect("connect");
        c.wait_coordinator("cg", WAIT_MAX);
        let first = join(&mut c, "cg", "");
        let member = first.member_id.to_string();
        let joined = join(&mut c, "cg", &member);
        assert_eq!((joined.error_code, joined.generation_id), (0, 1));
        let commit = |c: &mut Client, group: &str, member: &str, generation: i32| -> i16 {
            let req = OffsetCommitRequest::default()
                .with_group_id(GroupId(s(group)))
                .with_generation_id_or_member_epoch(generation)
                .with_member_id(s(member))
                .with_topics(vec![OffsetCommitRequestTopic::default()
                    .with_name(TopicName(s(&topic)))
                    .with_partitions(vec![OffsetCommitRequestPartition::default()
                        .with_partition_index(0)
                        .with_committed_offset(1)])]);
            let r: OffsetCommitResponse = c.call_at(ApiKey::OffsetCommit, 9, &req).expect("commit");
            r.topics[0].partitions[0].error_code
        };
        // Joined but not synced: CompletingRebalance.
        assert_eq!(
            commit(&mut c, "cg", &member, 1),
            ResponseError::RebalanceInProgress.code()
        );
        // A simple commit (generation -1) to a group with members.
        assert_eq!(
            commit(&mut c, "cg", "", -1),
            ResponseError::UnknownMemberId.code()
        );
        // A simple commit to an unknown group creates it, empty.
        assert_eq!(commit(&mut c, "standalone", "", -1), 0);
        // A generation >= 0 for a group that does not exist.
        assert_eq!(
            commit(&mut c, "ghost-group", "m", 4),
            ResponseError::IllegalGeneration.code()
        );

        let d = DescribeGroupsRequest::default().with_groups(vec![GroupId(s("never-existed"))]);
        let r: DescribeGroupsResponse = c.call_at(ApiKey::DescribeGroups, 5, &d).expect("describe");
        assert_eq!(
            (r.groups[0].error_code, r.groups[0].group_state.as_str()),
            (0, "Dead")
        );
        let r: DescribeGroupsResponse = c.call_at(ApiKey::DescribeGroups, 6, &d).expect("describe");
        assert_eq!(
            r.groups[0].error_code,
            ResponseError::GroupIdNotFound.code()
        );

        // Share groups (key type 2) have no coordinator.
        let keys = FindCoordinatorRequest::default()
            .with_key_type(2)
            .with_coordinator_keys(vec![s("share-group")]);
        let r: FindCoordinatorResponse =
            c.call_at(ApiKey::FindCoordinator, 4, &keys).expect("find");
        assert_eq!(
            r.coordinators[0].error_code,
            ResponseError::CoordinatorNotAvailable.code()
        );
        let keys = FindCoordinatorRequest::default().with_coordinator_keys(vec![s("a"), s("b")]);
        let r: FindCoordinatorResponse =
            c.call_at(ApiKey::FindCoordinator, 4, &keys).expect("find");
        assert_eq!(r.coordinators.len(), 2);
        assert!(r
            .coordinators
            .iter()
            .all(|k| k.error_code == 0 && k.port > 0));

        let states = ListGroupsRequest::default().with_states_filter(vec![s("Empty")]);
        let r: ListGroupsResponse = c.call_at(ApiKey::ListGroups, 4, &states).expect("list");
        let names: Vec<&str> = r.groups.iter().map(|g| g.group_id.as_str()).collect();
        assert_eq!(names, ["standalone"]);
    }
}
