//! Mixed KIP-848 groups against the real broker with librdkafka: a `group.protocol=classic`
//! member and a `group.protocol=consumer` member in one group, and a rolling upgrade of a
//! classic group to the consumer protocol (and the downgrade when the last consumer-protocol
//! member leaves). ListGroups and ConsumerGroupDescribe are read with raw frames at each step.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::consumers::{committed_of, debug_from_env, owned, Logs};
use common::{topic_name, Broker, Client};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::Message;

const WAIT_MAX: Duration = Duration::from_secs(60);

/// Fast heartbeats for both protocols, no initial rebalance delay.
fn broker() -> Broker {
    Broker::options()
        .cores(2)
        .args([
            "--group-consumer-heartbeat-interval-ms",
            "500",
            "--group-consumer-session-timeout-ms",
            "6000",
            "--group-initial-rebalance-delay-ms",
            "0",
            "--log-level",
            "info,sluice::group=debug",
        ])
        .start()
}

type Consumer_ = BaseConsumer<Logs>;

fn consumer(b: &Broker, group: &str, protocol: &str) -> Consumer_ {
    with_client_id(b, group, protocol, "rdkafka")
}

/// What the consumers received: every delivery, and the records whose commit failed (those
/// may be delivered again: at-least-once).
#[derive(Default)]
struct Seen {
    deliveries: Vec<String>,
    uncommitted: BTreeSet<String>,
}

impl Seen {
    /// Records delivered more than once must all be records whose commit failed.
    fn check_redeliveries(&self) {
        let mut count: BTreeMap<&String, usize> = BTreeMap::new();
        for d in &self.deliveries {
            *count.entry(d).or_default() += 1;
        }
        for (r, n) in count {
            assert!(
                n == 1 || self.uncommitted.contains(r),
                "{r} delivered {n} times although its commit succeeded"
            );
        }
    }
    fn distinct(&self) -> usize {
        self.deliveries.iter().collect::<BTreeSet<_>>().len()
    }
}

/// Polls every consumer, committing each record it gets, until `done` holds (bounded). Checks
/// on every round that no partition is owned by two consumers at once.
fn poll_until(
    cs: &[&Consumer_],
    seen: &mut Seen,
    mut done: impl FnMut(&[&Consumer_], &Seen) -> bool,
) {
    let start = Instant::now();
    loop {
        for c in cs {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(20)) {
                let v = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                if c.commit_message(&m, CommitMode::Sync).is_err() {
                    seen.uncommitted.insert(v.clone());
                }
                seen.deliveries.push(v);
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
            seen.deliveries.len()
        );
    }
}

fn s(x: &str) -> StrBytes {
    StrBytes::from_string(x.to_string())
}

/// ListGroups v5: (type, state) of `group`.
fn listed(b: &Broker, group: &str) -> Option<(String, String)> {
    let mut c = Client::connect(&b.bootstrap()).expect("connect");
    let l: ListGroupsResponse = c
        .call_at(ApiKey::ListGroups, 5, &ListGroupsRequest::default())
        .expect("list groups");
    l.groups
        .iter()
        .find(|g| g.group_id.as_str() == group)
        .map(|g| (g.group_type.to_string(), g.group_state.to_string()))
}

/// ConsumerGroupDescribe v1: the error and the members' (client id, assigned partitions,
/// member type: 0 classic, 1 consumer protocol, KIP-1099).
fn described(b: &Broker, group: &str) -> (i16, Vec<(String, usize, i8)>) {
    let mut c = Client::connect(&b.bootstrap()).expect("connect");
    let d: ConsumerGroupDescribeResponse = c
        .call_at(
            ApiKey::ConsumerGroupDescribe,
            1,
            &ConsumerGroupDescribeRequest::default().with_group_ids(vec![GroupId(s(group))]),
        )
        .expect("describe");
    let g = &d.groups[0];
    let members = g
        .members
        .iter()
        .map(|m| {
            (
                m.client_id.to_string(),
                m.assignment
                    .topic_partitions
                    .iter()
                    .map(|t| t.partitions.len())
                    .sum(),
                m.member_type,
            )
        })
        .collect();
    (g.error_code, members)
}

fn with_client_id(b: &Broker, group: &str, protocol: &str, id: &str) -> Consumer_ {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", b.bootstrap())
        .set("group.id", group)
        .set("group.protocol", protocol)
        .set("client.id", id)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    if protocol == "classic" {
        cfg.set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500");
    }
    debug_from_env(&mut cfg);
    cfg.create_with_context(Logs).expect("consumer")
}

#[test]
fn classic_and_consumer_members_share_a_topic_then_the_group_downgrades() {
    let b = broker();
    let topic = topic_name("mixed");
    b.create_topic(&topic, 6);
    let group = "mixed-group";
    // The consumer-protocol member makes a consumer group; the classic one joins it.
    let cons = with_client_id(&b, group, "consumer", "new-protocol");
    cons.subscribe(&[&topic]).unwrap();
    let mut seen = Seen::default();
    poll_until(&[&cons], &mut seen, |cs, _| owned(cs[0]).len() == 6);
    // One record per partition, consumed and committed before partitions move: a partition
    // handed over while librdkafka's `auto.offset.reset` query is still in flight may later be
    // rewound by that client (see `kip848.rs`), which is not what this test is about.
    b.produce_to_partitions(&topic, 6, 1, "r0-");
    poll_until(&[&cons], &mut seen, |_, s| s.distinct() >= 6);
    let classic = with_client_id(&b, group, "classic", "old-protocol");
    classic.subscribe(&[&topic]).unwrap();
    poll_until(&[&cons, &classic], &mut seen, |cs, _| {
        owned(cs[0]).len() == 3 && owned(cs[1]).len() == 3
    });
    assert_eq!(
        listed(&b, group).map(|l| l.0),
        Some("consumer".to_string()),
        "a classic member does not change the group's type"
    );
    let (err, mut members) = described(&b, group);
    members.sort();
    assert_eq!(
        (err, members),
        (
            0,
            vec![
                ("new-protocol".to_string(), 3, 1),
                ("old-protocol".to_string(), 3, 0)
            ]
        )
    );
    b.produce_to_partitions(&topic, 6, 10, "r1-");
    poll_until(&[&cons, &classic], &mut seen, |_, s| s.distinct() >= 66);
    assert_eq!(seen.deliveries.len(), 66, "every record consumed once");
    // The consumer-protocol member leaves: only the classic member is left, the group goes
    // back to classic and the classic member takes every partition.
    drop(cons);
    poll_until(&[&classic], &mut seen, |cs, _| owned(cs[0]).len() == 6);
    assert_eq!(listed(&b, group).map(|l| l.0), Some("classic".to_string()));
    assert_ne!(described(&b, group).0, 0, "no longer a consumer group");
    b.produce_to_partitions(&topic, 6, 10, "r2-");
    poll_until(&[&classic], &mut seen, |_, s| s.distinct() >= 126);
    seen.check_redeliveries();
    let want: BTreeMap<i32, i64> = (0..6).map(|p| (p, 21)).collect();
    assert_eq!(committed_of(&classic, &topic, 6), want);
}

#[test]
fn rolling_upgrade_from_classic_to_consumer_protocol_keeps_offsets() {
    let b = broker();
    let topic = topic_name("upgrade");
    b.create_topic(&topic, 4);
    let group = "upgrade-group";
    let c1 = consumer(&b, group, "classic");
    let c2 = consumer(&b, group, "classic");
    c1.subscribe(&[&topic]).unwrap();
    c2.subscribe(&[&topic]).unwrap();
    let mut seen = Seen::default();
    poll_until(&[&c1, &c2], &mut seen, |cs, _| {
        owned(cs[0]).len() == 2 && owned(cs[1]).len() == 2
    });
    b.produce_to_partitions(&topic, 4, 10, "a-");
    poll_until(&[&c1, &c2], &mut seen, |_, s| s.distinct() >= 40);
    assert_eq!(listed(&b, group).map(|l| l.0), Some("classic".to_string()));
    // Step 1: c1 is replaced by a consumer-protocol member; records keep flowing.
    drop(c1);
    let n1 = consumer(&b, group, "consumer");
    n1.subscribe(&[&topic]).unwrap();
    b.produce_to_partitions(&topic, 4, 10, "b-");
    poll_until(&[&c2, &n1], &mut seen, |cs, s| {
        s.distinct() >= 80 && !owned(cs[0]).is_empty() && !owned(cs[1]).is_empty()
    });
    assert_eq!(
        listed(&b, group).map(|l| l.0),
        Some("consumer".to_string()),
        "upgraded when the first consumer-protocol member joined"
    );
    // Step 2: c2 is replaced too.
    drop(c2);
    let n2 = consumer(&b, group, "consumer");
    n2.subscribe(&[&topic]).unwrap();
    b.produce_to_partitions(&topic, 4, 10, "c-");
    poll_until(&[&n1, &n2], &mut seen, |cs, s| {
        s.distinct() >= 120 && owned(cs[0]).len() == 2 && owned(cs[1]).len() == 2
    });
    assert_eq!(listed(&b, group).map(|l| l.0), Some("consumer".to_string()));
    let (err, members) = described(&b, group);
    assert_eq!((err, members.len()), (0, 2));
    assert!(
        members.iter().all(|m| m.2 == 1),
        "every member speaks the consumer protocol now: {members:?}"
    );
    // Nothing lost, and a record came twice only where its commit failed.
    assert_eq!(seen.distinct(), 120);
    seen.check_redeliveries();
    let want: BTreeMap<i32, i64> = (0..4).map(|p| (p, 30)).collect();
    assert_eq!(committed_of(&n1, &topic, 4), want);
}
