//! KIP-848 consumer groups against the real broker: librdkafka with `group.protocol=consumer`
//! (the server-side assignor, incremental reconciliation, commits with member epochs) and raw
//! ConsumerGroupHeartbeat / ConsumerGroupDescribe frames for the error paths.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::consumers::{committed_of, debug_from_env, owned, Logs};
use common::{topic_name, Broker};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::Message;

const WAIT_MAX: Duration = Duration::from_secs(60);

/// A broker whose consumer groups heartbeat every 500 ms and expire members after 6 s.
fn broker() -> Broker {
    Broker::options()
        .cores(2)
        .args([
            "--group-consumer-heartbeat-interval-ms",
            "500",
            "--group-consumer-session-timeout-ms",
            "6000",
        ])
        .start()
}

type Member = BaseConsumer<Logs>;

fn consumer(b: &Broker, group: &str, extra: &[(&str, &str)]) -> Member {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", b.bootstrap())
        .set("group.id", group)
        .set("group.protocol", "consumer")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    debug_from_env(&mut cfg);
    for (k, v) in extra {
        cfg.set(*k, *v);
    }
    cfg.create_with_context(Logs).expect("consumer")
}

/// One record a consumer was given: its value, and which consumer got it from where.
struct Seen {
    value: String,
    consumer: usize,
    partition: i32,
    offset: i64,
}

/// Polls every consumer, committing each record it is given, until `done` holds (bounded).
/// Checks on every round that no partition is owned by two consumers at once.
fn poll_until(
    cs: &[&Member],
    seen: &mut Vec<Seen>,
    mut done: impl FnMut(&[&Member], &[Seen]) -> bool,
) {
    let start = Instant::now();
    loop {
        for (i, c) in cs.iter().enumerate() {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(20)) {
                seen.push(Seen {
                    value: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                    consumer: i,
                    partition: m.partition(),
                    offset: m.offset(),
                });
                c.commit_message(&m, CommitMode::Sync).expect("commit");
            }
        }
        let sets: Vec<BTreeSet<i32>> = cs.iter().map(|c| owned(c)).collect();
        for (i, a) in sets.iter().enumerate() {
            for b in &sets[i + 1..] {
                assert!(a.is_disjoint(b), "two members own a partition: {sets:?}");
            }
        }
        if done(cs, seen) {
            eprintln!("condition reached after {:?}: {sets:?}", start.elapsed());
            return;
        }
        assert!(
            start.elapsed() < WAIT_MAX,
            "condition not reached within {WAIT_MAX:?}; assignments {sets:?}, {} records",
            seen.len()
        );
    }
}

/// Fails naming every record given more than once, with each delivery's consumer and offset.
fn no_duplicates(seen: &[Seen]) {
    let mut by_value: BTreeMap<&str, Vec<&Seen>> = BTreeMap::new();
    for s in seen {
        by_value.entry(&s.value).or_default().push(s);
    }
    let twice: Vec<String> = by_value
        .values()
        .filter(|v| v.len() > 1)
        .flatten()
        .map(|s| {
            format!(
                "{} to consumer {} from partition {} offset {}",
                s.value, s.consumer, s.partition, s.offset
            )
        })
        .collect();
    assert!(twice.is_empty(), "records delivered twice: {twice:#?}");
}

#[test]
fn consumers_share_partitions_rebalance_incrementally_and_commits_survive_a_restart() {
    let mut b = broker();
    let topic = topic_name("kip848");
    b.create_topic(&topic, 6);
    let group = "kip848-group";
    // The first member starts alone and consumes from every partition before the second joins.
    // Two members joining at once make the first take all six partitions and hand three over
    // while their `auto.offset.reset` queries (ListOffsets) are still in flight; librdkafka
    // (2.12) answers such an outdated reply by re-arming its offset-query timer, which later
    // queries the earliest offset again and rewinds a partition it is already fetching. From
    // here on, every partition that moves has a committed offset, so no such query is made.
    let c1 = consumer(&b, group, &[]);
    c1.subscribe(&[&topic]).unwrap();
    let mut seen = Vec::new();
    poll_until(&[&c1], &mut seen, |cs, _| owned(cs[0]).len() == 6);
    b.produce_to_partitions(&topic, 6, 10, "r1-");
    poll_until(&[&c1], &mut seen, |_, s| s.len() >= 60);
    // A second member joins: three partitions move to it, revoked before they are reassigned.
    let c2 = consumer(&b, group, &[]);
    c2.subscribe(&[&topic]).unwrap();
    poll_until(&[&c1, &c2], &mut seen, |cs, _| {
        owned(cs[0]).len() == 3 && owned(cs[1]).len() == 3
    });
    b.produce_to_partitions(&topic, 6, 10, "r2-");
    poll_until(&[&c1, &c2], &mut seen, |_, s| s.len() >= 120);
    no_duplicates(&seen);
    // A third member joins: partitions move one by one, revoked before they are reassigned.
    let c3 = consumer(&b, group, &[]);
    c3.subscribe(&[&topic]).unwrap();
    poll_until(&[&c1, &c2, &c3], &mut seen, |cs, _| {
        cs.iter().all(|c| owned(c).len() == 2)
    });
    b.produce_to_partitions(&topic, 6, 10, "r3-");
    poll_until(&[&c1, &c2, &c3], &mut seen, |_, s| s.len() >= 180);
    no_duplicates(&seen);
    // One leaves (close sends the leave heartbeat): the other two take its partitions.
    drop(c3);
    poll_until(&[&c1, &c2], &mut seen, |cs, _| {
        owned(cs[0]).len() + owned(cs[1]).len() == 6
    });
    b.produce_to_partitions(&topic, 6, 10, "r4-");
    poll_until(&[&c1, &c2], &mut seen, |_, s| s.len() >= 240);
    no_duplicates(&seen);
    assert_eq!(seen.len(), 240);
    let want: BTreeMap<i32, i64> = (0..6).map(|p| (p, 40)).collect();
    assert_eq!(committed_of(&c1, &topic, 6), want);
    drop(c1);
    drop(c2);
    // The group's offsets and records survive a restart; a new member resumes after them.
    assert!(b.sigterm().success());
    b.restart();
    b.produce_to_partitions(&topic, 6, 1, "r5-");
    let c = consumer(&b, group, &[]);
    c.subscribe(&[&topic]).unwrap();
    let mut after = Vec::new();
    poll_until(&[&c], &mut after, |_, s| s.len() >= 6);
    assert!(
        after.iter().all(|s| s.value.starts_with("r5-")),
        "only records after the commits: {:?}",
        after.iter().map(|s| &s.value).collect::<Vec<_>>()
    );
}

#[test]
fn range_assignor_and_regex_subscription() {
    let b = broker();
    let t1 = topic_name("rx-a");
    b.create_topic(&t1, 2);
    let group = "kip848-regex";
    let c1 = consumer(&b, group, &[("group.remote.assignor", "range")]);
    // librdkafka sends a `^`-prefixed subscription as the KIP-848 regex.
    let re = format!("^{}.*", t1.trim_end_matches(|c: char| c != '-'));
    c1.subscribe(&[&re]).unwrap();
    let mut seen = Vec::new();
    poll_until(&[&c1], &mut seen, |cs, _| owned(cs[0]).len() == 2);
    // A topic created later that matches joins the subscription.
    let t2 = format!("{}more", t1.trim_end_matches(|c: char| c != '-'));
    b.create_topic(&t2, 3);
    poll_until(&[&c1], &mut seen, |cs, _| {
        cs[0].assignment().map(|a| a.count()).unwrap_or(0) == 5
    });
}

mod raw {
    use super::*;
    use common::Client;
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::ResponseError;

    fn s(x: &str) -> StrBytes {
        StrBytes::from_string(x.to_string())
    }

    fn hb(c: &mut Client, req: ConsumerGroupHeartbeatRequest) -> ConsumerGroupHeartbeatResponse {
        c.call_at(ApiKey::ConsumerGroupHeartbeat, 1, &req)
            .expect("heartbeat")
    }

    fn join(group: &str, member: &str, topic: &str) -> ConsumerGroupHeartbeatRequest {
        ConsumerGroupHeartbeatRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_member_id(s(member))
            .with_member_epoch(0)
            .with_rebalance_timeout_ms(30_000)
            .with_subscribed_topic_names(Some(vec![TopicName(s(topic))]))
            .with_topic_partitions(Some(vec![]))
    }

    #[test]
    fn heartbeat_errors_describe_and_list_match_kafka() {
        let b = broker();
        let topic = topic_name("raw848");
        b.create_topic(&topic, 3);
        let mut c = Client::connect(&b.bootstrap()).expect("connect");
        // Advertised.
        let v: ApiVersionsResponse = c
            .call_at(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default())
            .expect("api versions");
        for key in [
            ApiKey::ConsumerGroupHeartbeat,
            ApiKey::ConsumerGroupDescribe,
        ] {
            let k = v
                .api_keys
                .iter()
                .find(|k| k.api_key == key as i16)
                .expect("advertised");
            assert_eq!((k.min_version, k.max_version), (0, 1));
        }
        c.wait_coordinator("rg", WAIT_MAX);
        let r = hb(&mut c, join("rg", "m1", &topic));
        assert_eq!(r.error_code, 0, "{:?}", r.error_message);
        assert_eq!(r.member_epoch, 1);
        assert_eq!(r.heartbeat_interval_ms, 500);
        let a = r.assignment.expect("assignment on join");
        assert_eq!(a.topic_partitions[0].partitions.len(), 3);
        // Bad fields: INVALID_REQUEST.
        let r = hb(
            &mut c,
            join("rg", "m2", &topic).with_rebalance_timeout_ms(-1),
        );
        assert_eq!(r.error_code, ResponseError::InvalidRequest.code());
        let r = hb(&mut c, join("rg", "", &topic));
        assert_eq!(r.error_code, ResponseError::InvalidRequest.code());
        let r = hb(&mut c, join("rg", "m2", &topic).with_member_epoch(-3));
        assert_eq!(r.error_code, ResponseError::InvalidRequest.code());
        // Epoch ahead of the coordinator: fenced. Unknown member: UNKNOWN_MEMBER_ID.
        let r = hb(
            &mut c,
            join("rg", "m1", &topic)
                .with_member_epoch(5)
                .with_topic_partitions(None),
        );
        assert_eq!(r.error_code, ResponseError::FencedMemberEpoch.code());
        let r = hb(&mut c, join("rg", "nobody", &topic).with_member_epoch(1));
        assert_eq!(r.error_code, ResponseError::UnknownMemberId.code());
        let r = hb(
            &mut c,
            join("rg", "m2", &topic).with_server_assignor(Some(s("sticky"))),
        );
        assert_eq!(r.error_code, ResponseError::UnsupportedAssignor.code());
        // Static members: a second member id for a live instance is refused.
        let r = hb(
            &mut c,
            join("rg", "s1", &topic).with_instance_id(Some(s("inst"))),
        );
        assert_eq!(r.error_code, 0);
        let r = hb(
            &mut c,
            join("rg", "s2", &topic).with_instance_id(Some(s("inst"))),
        );
        assert_eq!(r.error_code, ResponseError::UnreleasedInstanceId.code());
        // A commit with a stale member epoch.
        let commit = OffsetCommitRequest::default()
            .with_group_id(GroupId(s("rg")))
            .with_generation_id_or_member_epoch(0)
            .with_member_id(s("m1"))
            .with_topics(vec![
                offset_commit_request::OffsetCommitRequestTopic::default()
                    .with_name(TopicName(s(&topic)))
                    .with_partitions(vec![
                        offset_commit_request::OffsetCommitRequestPartition::default()
                            .with_partition_index(0)
                            .with_committed_offset(1),
                    ]),
            ]);
        let r: OffsetCommitResponse = c.call_at(ApiKey::OffsetCommit, 9, &commit).expect("commit");
        assert_eq!(
            r.topics[0].partitions[0].error_code,
            ResponseError::StaleMemberEpoch.code()
        );
        // A classic member may not join it.
        let j: JoinGroupResponse = c
            .call_at(
                ApiKey::JoinGroup,
                5,
                &JoinGroupRequest::default()
                    .with_group_id(GroupId(s("rg")))
                    .with_session_timeout_ms(10_000)
                    .with_rebalance_timeout_ms(10_000)
                    .with_protocol_type(s("consumer"))
                    .with_protocols(vec![join_group_request::JoinGroupRequestProtocol::default(
                    )
                    .with_name(s("range"))]),
            )
            .expect("join group");
        assert_eq!(
            j.error_code,
            ResponseError::InconsistentGroupProtocol.code()
        );
        // ConsumerGroupDescribe, DescribeGroups and ListGroups.
        let d: ConsumerGroupDescribeResponse = c
            .call_at(
                ApiKey::ConsumerGroupDescribe,
                1,
                &ConsumerGroupDescribeRequest::default()
                    .with_group_ids(vec![GroupId(s("rg")), GroupId(s("no-such-group"))]),
            )
            .expect("describe");
        assert_eq!(d.groups[0].error_code, 0);
        assert_eq!(d.groups[0].members.len(), 2);
        assert_eq!(d.groups[0].assignor_name.as_str(), "uniform");
        assert_eq!(
            d.groups[1].error_code,
            ResponseError::GroupIdNotFound.code()
        );
        let g: DescribeGroupsResponse = c
            .call_at(
                ApiKey::DescribeGroups,
                6,
                &DescribeGroupsRequest::default().with_groups(vec![GroupId(s("rg"))]),
            )
            .expect("describe groups");
        assert_eq!(
            g.groups[0].error_code,
            ResponseError::GroupIdNotFound.code()
        );
        let l: ListGroupsResponse = c
            .call_at(
                ApiKey::ListGroups,
                5,
                &ListGroupsRequest::default().with_types_filter(vec![s("consumer")]),
            )
            .expect("list groups");
        let listed: Vec<_> = l
            .groups
            .iter()
            .map(|g| (g.group_id.as_str(), g.group_type.as_str()))
            .collect();
        assert_eq!(listed, vec![("rg", "consumer")]);
        // Leaving: epoch -1 answers -1 and the member is gone.
        let r = hb(
            &mut c,
            join("rg", "m1", &topic)
                .with_member_epoch(-1)
                .with_topic_partitions(None),
        );
        assert_eq!((r.error_code, r.member_epoch), (0, -1));
        let r = hb(
            &mut c,
            join("rg", "m1", &topic)
                .with_member_epoch(1)
                .with_topic_partitions(None),
        );
        assert_eq!(r.error_code, ResponseError::UnknownMemberId.code());
    }

    fn offset_fetch(
        c: &mut Client,
        version: i16,
        group: &str,
        member: Option<&str>,
        epoch: i32,
    ) -> i16 {
        let r: OffsetFetchResponse = c
            .call_at(
                ApiKey::OffsetFetch,
                version,
                &OffsetFetchRequest::default().with_groups(vec![
                    offset_fetch_request::OffsetFetchRequestGroup::default()
                        .with_group_id(GroupId(s(group)))
                        .with_member_id(member.map(s))
                        .with_member_epoch(epoch)
                        .with_topics(None),
                ]),
            )
            .expect("offset fetch");
        r.groups[0].error_code
    }

    /// OffsetFetch v9 carries the member id and epoch: a consumer group checks them as Kafka's
    /// coordinator does; no member id with epoch -1 (an admin client) is never checked, and
    /// neither are v8 requests or classic groups.
    #[test]
    fn offset_fetch_checks_the_member_epoch_of_a_consumer_group() {
        let b = broker();
        let topic = topic_name("of848");
        b.create_topic(&topic, 2);
        let mut c = Client::connect(&b.bootstrap()).expect("connect");
        c.wait_coordinator("ofg", WAIT_MAX);
        let r = hb(&mut c, join("ofg", "m1", &topic));
        assert_eq!(
            (r.error_code, r.member_epoch),
            (0, 1),
            "{:?}",
            r.error_message
        );
        assert_eq!(offset_fetch(&mut c, 9, "ofg", Some("m1"), 1), 0);
        for stale in [0, 2, -1] {
            assert_eq!(
                offset_fetch(&mut c, 9, "ofg", Some("m1"), stale),
                ResponseError::StaleMemberEpoch.code(),
                "epoch {stale}"
            );
        }
        assert_eq!(
            offset_fetch(&mut c, 9, "ofg", Some("nobody"), 1),
            ResponseError::UnknownMemberId.code()
        );
        assert_eq!(
            offset_fetch(&mut c, 9, "ofg", None, 1),
            ResponseError::UnknownMemberId.code(),
            "an epoch without a member id"
        );
        // An admin client: no member id, epoch -1.
        assert_eq!(offset_fetch(&mut c, 9, "ofg", None, -1), 0);
        // v8 has no member fields: never checked.
        assert_eq!(offset_fetch(&mut c, 8, "ofg", None, -1), 0);
        // A second member moves the group epoch on: m1's epoch follows on its heartbeat, and
        // only the new epoch is accepted from then on.
        let r = hb(&mut c, join("ofg", "m2", &topic));
        assert_eq!(r.error_code, 0);
        let r = hb(
            &mut c,
            join("ofg", "m1", &topic)
                .with_member_epoch(1)
                .with_topic_partitions(None),
        );
        assert_eq!(r.error_code, 0);
        let now = r.member_epoch;
        assert_eq!(offset_fetch(&mut c, 9, "ofg", Some("m1"), now), 0);
        if now != 1 {
            assert_eq!(
                offset_fetch(&mut c, 9, "ofg", Some("m1"), 1),
                ResponseError::StaleMemberEpoch.code()
            );
        }
        // A member that left is unknown.
        let r = hb(
            &mut c,
            join("ofg", "m2", &topic)
                .with_member_epoch(-1)
                .with_topic_partitions(None),
        );
        assert_eq!(r.error_code, 0);
        assert_eq!(
            offset_fetch(&mut c, 9, "ofg", Some("m2"), 2),
            ResponseError::UnknownMemberId.code()
        );
        // A classic (or unknown) group is not checked.
        assert_eq!(offset_fetch(&mut c, 9, "no-such-group", Some("x"), 7), 0);
    }

    /// DescribeConfigs of a GROUP resource: key -> (value, source).
    fn group_configs(c: &mut Client, group: &str) -> BTreeMap<String, (String, i8)> {
        use describe_configs_request::*;
        let r: DescribeConfigsResponse = c
            .call_at(
                ApiKey::DescribeConfigs,
                4,
                &DescribeConfigsRequest::default().with_resources(vec![
                    DescribeConfigsResource::default()
                        .with_resource_type(32)
                        .with_resource_name(s(group))
                        .with_configuration_keys(None),
                ]),
            )
            .expect("describe configs");
        assert_eq!(r.results[0].error_code, 0);
        r.results[0]
            .configs
            .iter()
            .map(|e| {
                (
                    e.name.to_string(),
                    (
                        e.value.as_ref().map(|v| v.to_string()).unwrap_or_default(),
                        e.config_source,
                    ),
                )
            })
            .collect()
    }

    fn members(c: &mut Client, group: &str) -> usize {
        let d: ConsumerGroupDescribeResponse = c
            .call_at(
                ApiKey::ConsumerGroupDescribe,
                1,
                &ConsumerGroupDescribeRequest::default().with_group_ids(vec![GroupId(s(group))]),
            )
            .expect("describe");
        d.groups[0].members.len()
    }

    /// KIP-848's group-level `consumer.session.timeout.ms` and `consumer.heartbeat.interval.ms`:
    /// checked against the broker's bounds, described with their source, persisted across a
    /// restart and applied live (the heartbeat interval given to members, the session timeout
    /// that expires them).
    #[test]
    fn consumer_group_configs_are_validated_persisted_and_applied() {
        const DYNAMIC_GROUP: i8 = 8;
        const DEFAULT: i8 = 5;
        let mut b = broker();
        let topic = topic_name("cfg848");
        b.create_topic(&topic, 2);
        let mut c = Client::connect(&b.bootstrap()).expect("connect");
        let (long, short) = ("cfg-long", "cfg-short");
        c.wait_coordinator(long, WAIT_MAX);
        c.wait_coordinator(short, WAIT_MAX);
        // The broker runs with 6 s / 500 ms: the bounds are Kafka's (45-60 s, 5-15 s) widened
        // to include them.
        let bad = ResponseError::InvalidConfig.code();
        assert_eq!(
            c.alter_group_config(long, "consumer.session.timeout.ms", Some("5999")),
            bad
        );
        assert_eq!(
            c.alter_group_config(long, "consumer.session.timeout.ms", Some("60001")),
            bad
        );
        assert_eq!(
            c.alter_group_config(long, "consumer.session.timeout.ms", Some("soon")),
            bad
        );
        assert_eq!(
            c.alter_group_config(long, "consumer.heartbeat.interval.ms", Some("499")),
            bad
        );
        assert_eq!(
            c.alter_group_config(long, "consumer.heartbeat.interval.ms", Some("15001")),
            bad
        );
        // Not below the session timeout (6 s here).
        assert_eq!(
            c.alter_group_config(long, "consumer.heartbeat.interval.ms", Some("6000")),
            bad
        );
        assert_eq!(
            c.alter_group_config(long, "consumer.session.timeout.ms", Some("20000")),
            0
        );
        assert_eq!(
            c.alter_group_config(long, "consumer.heartbeat.interval.ms", Some("1500")),
            0
        );
        let d = group_configs(&mut c, long);
        assert_eq!(
            d["consumer.session.timeout.ms"],
            ("20000".into(), DYNAMIC_GROUP)
        );
        assert_eq!(
            d["consumer.heartbeat.interval.ms"],
            ("1500".into(), DYNAMIC_GROUP)
        );
        let d = group_configs(&mut c, short);
        assert_eq!(d["consumer.session.timeout.ms"], ("6000".into(), DEFAULT));
        assert_eq!(d["consumer.heartbeat.interval.ms"], ("500".into(), DEFAULT));
        // Applied live: the interval given to members.
        let r = hb(&mut c, join(long, "m-long", &topic));
        assert_eq!((r.error_code, r.heartbeat_interval_ms), (0, 1500));
        let r = hb(&mut c, join(short, "m-short", &topic));
        assert_eq!((r.error_code, r.heartbeat_interval_ms), (0, 500));
        // ...and the session timeout: neither member heartbeats again; the default group's
        // member expires after 6 s while the other's 20 s session still holds it.
        let start = Instant::now();
        while members(&mut c, short) != 0 {
            assert!(
                start.elapsed() < WAIT_MAX,
                "the default session never expired"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(start.elapsed() < Duration::from_secs(15));
        assert_eq!(
            members(&mut c, long),
            1,
            "the group's 20 s session still holds"
        );
        // Persisted: the configs survive a restart.
        drop(c);
        assert!(b.sigterm().success());
        b.restart();
        let mut c = Client::connect(&b.bootstrap()).expect("connect");
        c.wait_coordinator(long, WAIT_MAX);
        let d = group_configs(&mut c, long);
        assert_eq!(
            d["consumer.session.timeout.ms"],
            ("20000".into(), DYNAMIC_GROUP)
        );
        assert_eq!(
            d["consumer.heartbeat.interval.ms"],
            ("1500".into(), DYNAMIC_GROUP)
        );
        let r = hb(&mut c, join(long, "m-again", &topic));
        assert_eq!((r.error_code, r.heartbeat_interval_ms), (0, 1500));
        // Deleted: back to the broker's.
        assert_eq!(
            c.alter_group_config(long, "consumer.heartbeat.interval.ms", None),
            0
        );
        let d = group_configs(&mut c, long);
        assert_eq!(d["consumer.heartbeat.interval.ms"], ("500".into(), DEFAULT));
        let r = hb(
            &mut c,
            join(long, "m-again", &topic)
                .with_member_epoch(r.member_epoch)
                .with_topic_partitions(None),
        );
        assert_eq!((r.error_code, r.heartbeat_interval_ms), (0, 500));
    }

    type Targets = BTreeMap<String, (BTreeSet<i32>, BTreeSet<i32>)>;

    /// ConsumerGroupDescribe: (group epoch, assignment epoch, member -> (target, assigned)).
    fn targets(c: &mut Client, group: &str) -> (i32, i32, Targets) {
        let d: ConsumerGroupDescribeResponse = c
            .call_at(
                ApiKey::ConsumerGroupDescribe,
                1,
                &ConsumerGroupDescribeRequest::default().with_group_ids(vec![GroupId(s(group))]),
            )
            .expect("describe");
        let g = &d.groups[0];
        assert_eq!(g.error_code, 0);
        let set = |a: &consumer_group_describe_response::Assignment| -> BTreeSet<i32> {
            a.topic_partitions
                .iter()
                .flat_map(|t| t.partitions.iter().copied())
                .collect()
        };
        let members = g
            .members
            .iter()
            .map(|m| {
                (
                    m.member_id.to_string(),
                    (set(&m.target_assignment), set(&m.assignment)),
                )
            })
            .collect();
        (g.group_epoch, g.assignment_epoch, members)
    }

    fn owned_of(
        a: &consumer_group_heartbeat_response::Assignment,
    ) -> Vec<consumer_group_heartbeat_request::TopicPartitions> {
        a.topic_partitions
            .iter()
            .map(|t| {
                consumer_group_heartbeat_request::TopicPartitions::default()
                    .with_topic_id(t.topic_id)
                    .with_partitions(t.partitions.clone())
            })
            .collect()
    }

    fn parts(a: &consumer_group_heartbeat_response::Assignment) -> BTreeSet<i32> {
        a.topic_partitions
            .iter()
            .flat_map(|t| t.partitions.iter().copied())
            .collect()
    }

    /// Kafka's target-assignment records (key versions 6 and 7): a broker killed after it
    /// computed a new target and before the members reconciled comes back with that target,
    /// and the members converge to it, not to a target computed again.
    #[test]
    fn the_target_assignment_survives_a_kill_between_computation_and_reconciliation() {
        let mut b = broker();
        let topic = topic_name("tgt848");
        b.create_topic(&topic, 6);
        let mut c = Client::connect(&b.bootstrap()).expect("connect");
        c.wait_coordinator("tg", WAIT_MAX);
        let r1 = hb(&mut c, join("tg", "m1", &topic));
        assert_eq!(r1.error_code, 0, "{:?}", r1.error_message);
        let a1 = r1.assignment.expect("m1's assignment");
        assert_eq!(parts(&a1).len(), 6);
        // m2 joins: a new target splits the partitions; m1 has not revoked any yet.
        let r2 = hb(&mut c, join("tg", "m2", &topic));
        assert_eq!(r2.error_code, 0);
        let (epoch, assignment_epoch, before) = targets(&mut c, "tg");
        assert_eq!(assignment_epoch, epoch, "the target is computed");
        assert_eq!(before["m1"].1.len(), 6, "m1 still holds everything");
        assert_eq!(before["m1"].0.len() + before["m2"].0.len(), 6);
        assert!(!before["m2"].0.is_empty());
        // Crash: nothing is flushed beyond what the heartbeats' answers waited for.
        drop(c);
        b.sigkill();
        b.restart();
        let mut c = Client::connect(&b.bootstrap()).expect("connect");
        c.wait_coordinator("tg", WAIT_MAX);
        assert_eq!(
            targets(&mut c, "tg"),
            (epoch, assignment_epoch, before.clone()),
            "the same target and epochs after the restart, before any heartbeat"
        );
        // m1 revokes exactly what its target leaves out; m2 then gets its target.
        let r = hb(
            &mut c,
            join("tg", "m1", &topic)
                .with_member_epoch(r1.member_epoch)
                .with_topic_partitions(Some(owned_of(&a1))),
        );
        assert_eq!(r.error_code, 0, "{:?}", r.error_message);
        let kept = r.assignment.expect("a revocation");
        assert_eq!(parts(&kept), before["m1"].0);
        let r = hb(
            &mut c,
            join("tg", "m1", &topic)
                .with_member_epoch(r.member_epoch)
                .with_topic_partitions(Some(owned_of(&kept))),
        );
        assert_eq!(r.error_code, 0);
        let r = hb(
            &mut c,
            join("tg", "m2", &topic)
                .with_member_epoch(r2.member_epoch)
                .with_topic_partitions(Some(vec![])),
        );
        assert_eq!(r.error_code, 0, "{:?}", r.error_message);
        assert_eq!(
            parts(&r.assignment.expect("m2's partitions")),
            before["m2"].0
        );
    }

    /// `--rack` (Kafka's `broker.rack`): reported in Metadata and DescribeCluster (the racks the
    /// KIP-848 assignors match members' `rack_id` against).
    #[test]
    fn the_broker_rack_is_reported() {
        let b = Broker::options().args(["--rack", "rack-a"]).start();
        let mut c = Client::connect(&b.bootstrap()).expect("connect");
        let m: MetadataResponse = c
            .call_at(
                ApiKey::Metadata,
                12,
                &MetadataRequest::default().with_topics(Some(vec![])),
            )
            .expect("metadata");
        assert_eq!(m.brokers.len(), 1);
        assert_eq!(m.brokers[0].rack.as_deref(), Some("rack-a"));
        let d: DescribeClusterResponse = c
            .call_at(
                ApiKey::DescribeCluster,
                1,
                &DescribeClusterRequest::default(),
            )
            .expect("describe cluster");
        assert_eq!(d.brokers[0].rack.as_deref(), Some("rack-a"));
        let plain = broker();
        let mut c = Client::connect(&plain.bootstrap()).expect("connect");
        let m: MetadataResponse = c
            .call_at(
                ApiKey::Metadata,
                12,
                &MetadataRequest::default().with_topics(Some(vec![])),
            )
            .expect("metadata");
        assert_eq!(m.brokers[0].rack, None, "no rack unless set");
    }
}
