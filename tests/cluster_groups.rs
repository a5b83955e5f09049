//! Group coordinators on a replicated `__consumer_offsets`, with three real `sluice` processes:
//! the topic has three replicas, a group's coordinator is the raft leader of its partition
//! (FindCoordinator on every node names it, other nodes answer NOT_COORDINATOR), and after
//! `kill -9` of that node the survivors' new leader loads the group from the replicated log, so
//! a librdkafka consumer group continues from its committed position. Every wait is bounded and
//! polls what the nodes report.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::cluster::{client_config, Cluster, OFFSETS_RF_FLAG};
use common::history;
use common::raw::{tn, Raw};
use common::BrokerOptions;
use futures_lite::future::block_on;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::{
    ApiKey, FindCoordinatorRequest, FindCoordinatorResponse, GroupId, JoinGroupRequest,
    JoinGroupResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest,
    OffsetFetchResponse,
};
use kafka_protocol::protocol::StrBytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

const OFFSETS_TOPIC: &str = "__consumer_offsets";
const OFFSETS_PARTITIONS: usize = 50;
const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
const COORDINATOR_NOT_AVAILABLE: i16 = 15;
const NOT_COORDINATOR: i16 = 16;
const WAIT: Duration = Duration::from_secs(30);

/// Nodes with the default `__consumer_offsets` replication factor (3), which the harness
/// otherwise lowers to 1.
fn replicated_offsets() -> BrokerOptions {
    BrokerOptions::default().args([OFFSETS_RF_FLAG, "3"])
}

/// Kafka's `abs(groupId.hashCode) % partitions` (Java's `String.hashCode`).
fn offsets_partition(group: &str) -> usize {
    let h = group
        .encode_utf16()
        .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(c as i32));
    let abs = if h == i32::MIN { 0 } else { h.abs() };
    (abs % OFFSETS_PARTITIONS as i32) as usize
}

/// (leader, replicas) of every partition of `__consumer_offsets` as node `id` reports them, once
/// it reports all of them with a leader.
fn offsets_state(c: &Cluster, id: i32) -> Option<Vec<(i32, Vec<i32>)>> {
    let m = c.metadata(id)?;
    let t = m
        .topics
        .iter()
        .find(|t| t.name.as_ref().map(|n| n.as_str()) == Some(OFFSETS_TOPIC))?;
    if t.error_code != 0 || t.partitions.len() != OFFSETS_PARTITIONS {
        return None;
    }
    let mut ps: Vec<_> = t.partitions.iter().collect();
    ps.sort_by_key(|p| p.partition_index);
    ps.iter()
        .map(|p| {
            let mut r: Vec<i32> = p.replica_nodes.iter().map(|n| n.0).collect();
            r.sort_unstable();
            (p.error_code == 0 && p.leader_id.0 >= 0).then_some((p.leader_id.0, r))
        })
        .collect()
}

/// FindCoordinator (v1) as node `id` answers it for `group`: (error, node).
fn find_coordinator(c: &Cluster, id: i32, group: &str) -> (i16, i32) {
    let mut raw = Raw::connect(c.node(id).addr);
    let req = FindCoordinatorRequest::default().with_key(StrBytes::from_string(group.into()));
    let resp: FindCoordinatorResponse = raw.call(ApiKey::FindCoordinator, 1, &req);
    (resp.error_code, resp.node_id.0)
}

/// A simple OffsetCommit (v7, no member) of `offset` for partition 0 of `topic` sent to node
/// `id`: the partition's error code.
fn offset_commit(c: &Cluster, id: i32, group: &str, topic: &str, offset: i64) -> i16 {
    let mut raw = Raw::connect(c.node(id).addr);
    let req = OffsetCommitRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.into())))
        .with_generation_id_or_member_epoch(-1)
        .with_topics(vec![OffsetCommitRequestTopic::default()
            .with_name(tn(topic))
            .with_partitions(vec![OffsetCommitRequestPartition::default()
                .with_partition_index(0)
                .with_committed_offset(offset)])]);
    let resp: OffsetCommitResponse = raw.call(ApiKey::OffsetCommit, 7, &req);
    resp.topics[0].partitions[0].error_code
}

/// OffsetFetch (v5) of partition 0 of `topic` from node `id`: (error, partition error, offset).
fn offset_fetch(c: &Cluster, id: i32, group: &str, topic: &str) -> (i16, i16, i64) {
    let mut raw = Raw::connect(c.node(id).addr);
    let req = OffsetFetchRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.into())))
        .with_topics(Some(vec![OffsetFetchRequestTopic::default()
            .with_name(tn(topic))
            .with_partition_indexes(vec![0])]));
    let resp: OffsetFetchResponse = raw.call(ApiKey::OffsetFetch, 5, &req);
    match resp.topics.first().and_then(|t| t.partitions.first()) {
        Some(p) => (resp.error_code, p.error_code, p.committed_offset),
        None => (resp.error_code, -1, -1),
    }
}

/// A JoinGroup (v5) of a new member sent to node `id`: its error code.
fn join_group(c: &Cluster, id: i32, group: &str) -> i16 {
    let mut raw = Raw::connect(c.node(id).addr);
    let req = JoinGroupRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.into())))
        .with_session_timeout_ms(10_000)
        .with_rebalance_timeout_ms(10_000)
        .with_protocol_type(StrBytes::from_static_str("consumer"))
        .with_protocols(vec![
            JoinGroupRequestProtocol::default().with_name(StrBytes::from_static_str("range"))
        ]);
    let resp: JoinGroupResponse = raw.call(ApiKey::JoinGroup, 5, &req);
    resp.error_code
}

/// Waits until every node of `among` reports `__consumer_offsets` with all its partitions led,
/// every node the same; returns that.
fn agreed_offsets_state(c: &Cluster, among: &[i32]) -> Vec<(i32, Vec<i32>)> {
    c.wait_for("every node reports the same led __consumer_offsets", |c| {
        let first = offsets_state(c, among[0])?;
        for id in &among[1..] {
            if offsets_state(c, *id)? != first {
                return None;
            }
        }
        Some(first)
    })
}

/// Waits until every node of `among` names the same coordinator for `group`, one of `among`.
fn agreed_coordinator(c: &Cluster, among: &[i32], group: &str) -> i32 {
    c.wait_for("every node names the same coordinator", |c| {
        let mut seen = None;
        for id in among {
            let (e, n) = find_coordinator(c, *id, group);
            if e != 0 || !among.contains(&n) || seen.is_some_and(|s| s != n) {
                return None;
            }
            seen = Some(n);
        }
        seen
    })
}

fn create_replicated(bootstrap: &str, name: &str) {
    let admin: AdminClient<DefaultClientContext> =
        client_config(bootstrap).create().expect("admin client");
    let t = NewTopic::new(name, 1, TopicReplication::Fixed(3));
    let r = block_on(admin.create_topics([&t], &AdminOptions::new().request_timeout(Some(WAIT))))
        .expect("CreateTopics request");
    assert!(r[0].is_ok(), "create {name}: {:?}", r[0]);
}

/// Produces `n` records (acks=all) to partition 0 of `topic`, every delivery awaited.
fn produce(bootstrap: &str, topic: &str, n: usize) -> Vec<history::Acked> {
    let producer: FutureProducer = client_config(bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let mut acked = Vec::new();
    for i in 0..n {
        let value = format!("record-{i}");
        let d = block_on(
            producer.send(
                FutureRecord::<(), _>::to(topic)
                    .payload(&value)
                    .partition(0),
                WAIT,
            ),
        )
        .unwrap_or_else(|(e, _)| panic!("produce {value}: {e}"));
        acked.push(history::Acked {
            partition: d.partition,
            offset: d.offset,
            value,
        });
    }
    acked
}

/// A classic consumer-group member of `group` subscribed to `topic` through `bootstrap`.
fn member(bootstrap: &str, group: &str, topic: &str) -> BaseConsumer {
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

/// Polls `consumer` until it has read `n` records (bounded by `WAIT`): (offset, value) in order.
fn read_n(consumer: &BaseConsumer, n: usize) -> Vec<(i64, String)> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "read {} of {n} records within {WAIT:?}",
            got.len()
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => got.push((
                m.offset(),
                String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            )),
            Some(Err(e)) => eprintln!("consumer error (read past): {e}"),
            None => {}
        }
    }
    got
}

fn commit_at(consumer: &BaseConsumer, topic: &str, offset: i64) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
        .expect("tpl");
    consumer.commit(&tpl, CommitMode::Sync).expect("commit");
}

#[test]
fn offsets_are_replicated_and_a_group_continues_after_its_coordinator_is_killed() {
    let mut c = Cluster::start_with(3, replicated_offsets());
    let ids = c.ids();
    c.wait_controller(&ids);
    let state = agreed_offsets_state(&c, &ids);
    for (p, (leader, replicas)) in state.iter().enumerate() {
        assert_eq!(replicas, &ids, "partition {p} has a replica on every node");
        assert!(ids.contains(leader), "partition {p}: leader {leader}");
    }

    let group = "failover-group";
    let p = offsets_partition(group);
    let leader = agreed_coordinator(&c, &ids, group);
    let reported = agreed_offsets_state(&c, &ids)[p].0;
    assert_eq!(
        leader, reported,
        "the coordinator is the leader of partition {p}"
    );

    let topic = "grouped-replicated";
    create_replicated(&c.bootstrap(), topic);
    // A node that does not lead the group's partition is not its coordinator.
    for id in ids.iter().filter(|id| **id != leader) {
        c.wait_for("the topic known", |c| {
            (offset_commit(c, *id, group, topic, 1) == NOT_COORDINATOR).then_some(())
        });
        assert_eq!(join_group(&c, *id, group), NOT_COORDINATOR);
    }
    let acked = produce(&c.bootstrap(), topic, 200);

    // A member reads the first half and commits there (the position after the 100th record;
    // offsets are not contiguous: each raft term starts with a control batch), then leaves.
    let mid = acked[99].offset + 1;
    let end = acked[199].offset + 1;
    {
        let consumer = member(&c.bootstrap(), group, topic);
        let got = read_n(&consumer, 100);
        assert_eq!(got.first().map(|g| g.0), Some(acked[0].offset));
        commit_at(&consumer, topic, mid);
    }
    assert_eq!(offset_fetch(&c, leader, group, topic), (0, 0, mid));

    // Kill the coordinator.
    let killed_at = Instant::now();
    c.node_mut(leader).sigkill();
    let survivors: Vec<i32> = ids.iter().copied().filter(|id| *id != leader).collect();
    let coordinator = agreed_coordinator(&c, &survivors, group);
    let named = killed_at.elapsed();
    // The first OffsetCommit the new coordinator accepts (the same position again).
    let first_commit = c.wait_for("an OffsetCommit accepted by the new coordinator", |c| {
        let e = offset_commit(c, coordinator, group, topic, mid);
        assert!(
            [
                0,
                NOT_COORDINATOR,
                COORDINATOR_LOAD_IN_PROGRESS,
                COORDINATOR_NOT_AVAILABLE
            ]
            .contains(&e),
            "OffsetCommit: error {e}"
        );
        (e == 0).then(|| killed_at.elapsed())
    });
    println!(
        "coordinator failover: node {leader} killed; node {coordinator} named by FindCoordinator after {named:?}; first OffsetCommit accepted after {first_commit:?}"
    );
    let led = agreed_offsets_state(&c, &survivors)[p].0;
    assert_eq!(coordinator, led, "the new coordinator leads partition {p}");
    assert_eq!(offset_fetch(&c, coordinator, group, topic), (0, 0, mid));
    let other = survivors.iter().find(|id| **id != coordinator).unwrap();
    assert_eq!(
        offset_commit(&c, *other, group, topic, mid),
        NOT_COORDINATOR
    );

    // A new member of the group continues from the committed position: nothing before it.
    let survivors_bootstrap = survivors
        .iter()
        .map(|id| c.node(*id).bootstrap())
        .collect::<Vec<_>>()
        .join(",");
    let consumer = member(&survivors_bootstrap, group, topic);
    let got = read_n(&consumer, 100);
    assert!(
        got.iter().all(|(o, _)| *o >= mid),
        "read from before the committed offset: {:?}",
        got.iter().take(5).collect::<Vec<_>>()
    );
    let rest: Vec<history::Acked> = acked.iter().filter(|a| a.offset >= mid).cloned().collect();
    let reads: history::Reads = BTreeMap::from([(0, got)]);
    history::check(&rest, &reads).expect("history");
    consumer
        .commit_consumer_state(CommitMode::Sync)
        .expect("commit at the new coordinator");
    assert_eq!(offset_fetch(&c, coordinator, group, topic), (0, 0, end));
}

/// How long the coordinator of the next test stalls before replaying a partition it won (the
/// `coordinator_load` fault point): longer than the broker holds a request for a loading
/// partition (5 s), so a request sent as the load starts is answered
/// COORDINATOR_LOAD_IN_PROGRESS.
const LOAD_DELAY_MS: u64 = 7_000;

#[test]
fn a_new_coordinator_holds_requests_while_it_loads_then_answers_load_in_progress() {
    let mut c = Cluster::start_with(
        3,
        replicated_offsets().env(
            "SLUICE_FAULT_DELAY_MS",
            format!("coordinator_load:{LOAD_DELAY_MS}"),
        ),
    );
    let ids = c.ids();
    c.wait_controller(&ids);
    agreed_offsets_state(&c, &ids);
    let group = "loading-group";
    let topic = "loading-topic";
    let leader = agreed_coordinator(&c, &ids, group);
    create_replicated(&c.bootstrap(), topic);
    c.wait_for("the first coordinator loaded", |c| {
        (offset_commit(c, leader, group, topic, 7) == 0).then_some(())
    });

    c.node_mut(leader).sigkill();
    let survivors: Vec<i32> = ids.iter().copied().filter(|id| *id != leader).collect();
    let coordinator = agreed_coordinator(&c, &survivors, group);
    // The new coordinator is loading: the request is held, then answered LOAD_IN_PROGRESS
    // (NOT_COORDINATOR only in the instant between its election and the start of the load).
    let (e, held) = c.wait_for("an answer of the coordinator", |c| {
        let sent = Instant::now();
        let e = offset_commit(c, coordinator, group, topic, 8);
        (e != NOT_COORDINATOR).then(|| (e, sent.elapsed()))
    });
    assert_eq!(e, COORDINATOR_LOAD_IN_PROGRESS, "held {held:?}");
    assert!(held >= Duration::from_secs(4), "held only {held:?}");
    // Once loaded it has the offset committed before the kill, and takes commits.
    c.wait_for("the new coordinator loaded", |c| {
        let (e, pe, offset) = offset_fetch(c, coordinator, group, topic);
        (e == 0 && pe == 0).then_some(offset)
    });
    assert_eq!(offset_fetch(&c, coordinator, group, topic), (0, 0, 7));
    assert_eq!(offset_commit(&c, coordinator, group, topic, 8), 0);
    assert_eq!(offset_fetch(&c, coordinator, group, topic), (0, 0, 8));
}
