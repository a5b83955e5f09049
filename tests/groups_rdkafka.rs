//! Consumer groups against the real `sluice` binary with librdkafka (rust-rdkafka): partition
//! assignment across members, rebalances on leave and on session timeout, cooperative-sticky
//! incremental rebalancing, committed offsets across consumer and broker restarts, admin
//! listing, and Kafka error codes for bad group requests.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

const WAIT: Duration = Duration::from_secs(40);

/// A broker process on a free loopback port with its own data dir; killed on drop.
struct Broker {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    fn start() -> Broker {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut b = Broker {
            child: None,
            port: free_port(),
            dir,
            _tmp: Some(tmp),
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["start", "--cores", "2", "--log-level", "warn"])
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sluice");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "broker did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn stop(&mut self, signal: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling the child we started, by its pid.
            unsafe { libc::kill(c.id() as i32, signal) };
            let _ = c.wait();
        }
    }

    fn restart(&mut self, signal: i32) {
        self.stop(signal);
        self.spawn();
    }

    fn create_topic(&self, name: &str, partitions: i32) {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([
                "topic",
                "--brokers",
                &self.addr(),
                "create",
                name,
                "--partitions",
            ])
            .arg(partitions.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn produce(&self, topic: &str, partitions: i32, per_partition: usize) {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", self.addr())
            .set("linger.ms", "0")
            .create()
            .unwrap();
        for part in 0..partitions {
            for i in 0..per_partition {
                let v = format!("p{part}-{i}");
                p.send(BaseRecord::<(), _>::to(topic).partition(part).payload(&v))
                    .map_err(|(e, _)| e)
                    .unwrap();
            }
        }
        p.flush(Duration::from_secs(10)).unwrap();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop(libc::SIGKILL);
    }
}

fn consumer(b: &Broker, group: &str, extra: &[(&str, &str)]) -> BaseConsumer {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", b.addr())
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500");
    for (k, v) in extra {
        cfg.set(*k, *v);
    }
    cfg.create().unwrap()
}

fn assigned(c: &BaseConsumer) -> usize {
    c.assignment().map(|a| a.count()).unwrap_or(0)
}

/// Polls every consumer until `done` holds or the wait runs out; returns the elapsed time.
fn poll_until(cs: &[&BaseConsumer], what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "timed out waiting for: {what}");
        for c in cs {
            let _ = c.poll(Duration::from_millis(50));
        }
    }
    start.elapsed()
}

#[test]
fn two_consumers_split_four_partitions_and_survivor_takes_all_after_leave() {
    let b = Broker::start();
    b.create_topic("orders", 4);
    let c1 = consumer(&b, "split", &[]);
    let c2 = consumer(&b, "split", &[]);
    c1.subscribe(&["orders"]).unwrap();
    c2.subscribe(&["orders"]).unwrap();
    let t = poll_until(&[&c1, &c2], "2/2 split", || {
        assigned(&c1) == 2 && assigned(&c2) == 2
    });
    eprintln!("rebalance: two members to 2/2 in {t:?}");
    drop(c2); // close: LeaveGroup
    let t = poll_until(&[&c1], "survivor owns 4", || assigned(&c1) == 4);
    eprintln!("rebalance after LeaveGroup: survivor owns 4 in {t:?}");
}

#[test]
fn killed_member_expires_after_session_timeout_and_survivor_takes_all() {
    let b = Broker::start();
    b.create_topic("events", 4);
    // The member to kill runs in its own process (kcat, librdkafka) so it can die with SIGKILL.
    let mut victim = Command::new("kcat")
        .args([
            "-b",
            &b.addr(),
            "-G",
            "killme",
            "-q",
            "-X",
            "session.timeout.ms=6000",
        ])
        .args([
            "-X",
            "heartbeat.interval.ms=500",
            "-X",
            "auto.offset.reset=earliest",
            "events",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kcat is installed");
    let c1 = consumer(&b, "killme", &[]);
    c1.subscribe(&["events"]).unwrap();
    poll_until(&[&c1], "2/2 with the kcat member", || assigned(&c1) == 2);
    // SAFETY: killing the child we started, by its pid.
    unsafe { libc::kill(victim.id() as i32, libc::SIGKILL) };
    let _ = victim.wait();
    let t = poll_until(&[&c1], "survivor owns 4 after session timeout", || {
        assigned(&c1) == 4
    });
    eprintln!("rebalance after SIGKILL of a member (session.timeout.ms=6000): {t:?}");
}

#[test]
fn cooperative_sticky_rebalance_is_incremental() {
    let b = Broker::start();
    b.create_topic("coop", 4);
    let coop = [("partition.assignment.strategy", "cooperative-sticky")];
    let c1 = consumer(&b, "coop-group", &coop);
    c1.subscribe(&["coop"]).unwrap();
    poll_until(&[&c1], "c1 owns 4", || assigned(&c1) == 4);
    let before: Vec<i32> = c1
        .assignment()
        .unwrap()
        .elements()
        .iter()
        .map(|e| e.partition())
        .collect();
    let c2 = consumer(&b, "coop-group", &coop);
    c2.subscribe(&["coop"]).unwrap();
    let mut c1_min = usize::MAX;
    let t = poll_until(&[&c1, &c2], "2/2 after incremental rebalance", || {
        c1_min = c1_min.min(assigned(&c1));
        assigned(&c1) == 2 && assigned(&c2) == 2
    });
    eprintln!("cooperative-sticky: second member to 2/2 in {t:?}");
    // KIP-429: c1 only gives up the partitions that move; it never drops to zero.
    assert!(
        c1_min >= 2,
        "c1 went down to {c1_min} partitions during the rebalance"
    );
    let after: Vec<i32> = c1
        .assignment()
        .unwrap()
        .elements()
        .iter()
        .map(|e| e.partition())
        .collect();
    assert!(after.iter().all(|p| before.contains(p)));
    assert!(matches!(
        c1.rebalance_protocol(),
        rdkafka::consumer::RebalanceProtocol::Cooperative
    ));
}

fn read_values(c: &BaseConsumer, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    let start = Instant::now();
    while out.len() < n {
        assert!(
            start.elapsed() < WAIT,
            "read only {} of {n} records",
            out.len()
        );
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m.unwrap();
            out.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).to_string());
            c.commit_message(&m, CommitMode::Sync).unwrap();
        }
    }
    out
}

fn committed_offset(c: &BaseConsumer, topic: &str, partition: i32) -> Offset {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    got.find_partition(topic, partition).unwrap().offset()
}

#[test]
fn restarted_consumer_resumes_at_committed_offset() {
    let b = Broker::start();
    b.create_topic("resume", 1);
    b.produce("resume", 1, 10);
    {
        let c = consumer(&b, "resumers", &[]);
        c.subscribe(&["resume"]).unwrap();
        assert_eq!(read_values(&c, 4), ["p0-0", "p0-1", "p0-2", "p0-3"]);
    }
    let c = consumer(&b, "resumers", &[]);
    c.subscribe(&["resume"]).unwrap();
    assert_eq!(read_values(&c, 1), ["p0-4"]);
}

#[test]
fn committed_offsets_survive_broker_restart_after_sigterm_and_sigkill() {
    let mut b = Broker::start();
    b.create_topic("durable", 2);
    b.produce("durable", 2, 5);
    {
        let c = consumer(&b, "durable-group", &[]);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("durable", 0, Offset::Offset(3))
            .unwrap();
        tpl.add_partition_offset("durable", 1, Offset::Offset(5))
            .unwrap();
        c.commit(&tpl, CommitMode::Sync).unwrap();
    }
    b.restart(libc::SIGTERM);
    {
        let c = consumer(&b, "durable-group", &[]);
        assert_eq!(committed_offset(&c, "durable", 0), Offset::Offset(3));
        assert_eq!(committed_offset(&c, "durable", 1), Offset::Offset(5));
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("durable", 0, Offset::Offset(4))
            .unwrap();
        c.commit(&tpl, CommitMode::Sync).unwrap();
    }
    b.restart(libc::SIGKILL);
    let c = consumer(&b, "durable-group", &[]);
    assert_eq!(committed_offset(&c, "durable", 0), Offset::Offset(4));
    assert_eq!(committed_offset(&c, "durable", 1), Offset::Offset(5));
    // A group member resumes there.
    c.subscribe(&["durable"]).unwrap();
    let mut vals = read_values(&c, 1);
    vals.sort();
    assert!(vals[0] == "p0-4", "got {vals:?}");
}

#[test]
fn two_groups_each_receive_every_record() {
    let b = Broker::start();
    b.create_topic("fanout", 3);
    b.produce("fanout", 3, 4);
    for g in ["ga", "gb"] {
        let c = consumer(&b, g, &[]);
        c.subscribe(&["fanout"]).unwrap();
        let mut vals = read_values(&c, 12);
        vals.sort();
        vals.dedup();
        assert_eq!(vals.len(), 12, "group {g}");
    }
}

#[test]
fn list_and_describe_groups_through_the_admin_api() {
    let b = Broker::start();
    b.create_topic("desc", 2);
    let c = consumer(&b, "described", &[("client.id", "desc-client")]);
    c.subscribe(&["desc"]).unwrap();
    poll_until(&[&c], "assigned", || assigned(&c) == 2);
    let list = c.fetch_group_list(None, Duration::from_secs(10)).unwrap();
    assert!(list.groups().iter().any(|g| g.name() == "described"));
    let one = c
        .fetch_group_list(Some("described"), Duration::from_secs(10))
        .unwrap();
    let g = &one.groups()[0];
    assert_eq!(g.state(), "Stable");
    assert_eq!(g.protocol_type(), "consumer");
    assert_eq!(g.protocol(), "range");
    assert_eq!(g.members().len(), 1);
    let m = &g.members()[0];
    assert_eq!(m.client_id(), "desc-client");
    assert!(m.assignment().is_some_and(|a| !a.is_empty()));
}

// ---- raw protocol: error codes (Kafka protocol guide, classic group coordinator) ----

mod raw {
    use super::*;
    use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
    use kafka_protocol::messages::offset_commit_request::{
        OffsetCommitRequestPartition, OffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::ResponseError as E;
    use sluice::cli::client::Client;

    fn s(v: &str) -> StrBytes {
        StrBytes::from_string(v.to_string())
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
                .with_metadata(bytes::Bytes::from_static(b"\0\0\0\0\0\0"))]);
        c.call_at(ApiKey::JoinGroup, 9, &req).unwrap()
    }

    #[test]
    fn bad_group_requests_get_kafka_error_codes() {
        let b = Broker::start();
        b.create_topic("known", 1);
        let mut c = Client::connect(&b.addr()).unwrap();
        // The coordinator becomes available once __consumer_offsets is loaded.
        let deadline = Instant::now() + WAIT;
        let first = loop {
            let r = join(&mut c, "raw", "");
            if r.error_code != E::CoordinatorLoadInProgress.code()
                && r.error_code != E::CoordinatorNotAvailable.code()
            {
                break r;
            }
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(first.error_code, E::MemberIdRequired.code(), "KIP-394");
        let member = first.member_id.to_string();
        let joined = join(&mut c, "raw", &member);
        assert_eq!(joined.error_code, 0);
        assert_eq!(joined.generation_id, 1);

        let hb = |c: &mut Client, group: &str, member: &str, generation: i32| -> i16 {
            let req = HeartbeatRequest::default()
                .with_group_id(GroupId(s(group)))
                .with_member_id(s(member))
                .with_generation_id(generation);
            let r: HeartbeatResponse = c.call_at(ApiKey::Heartbeat, 4, &req).unwrap();
            r.error_code
        };
        assert_eq!(
            hb(&mut c, "no-such-group", "x", 1),
            E::UnknownMemberId.code()
        );
        assert_eq!(hb(&mut c, "raw", "stranger", 1), E::UnknownMemberId.code());
        assert_eq!(hb(&mut c, "raw", &member, 7), E::IllegalGeneration.code());
        // Before SyncGroup the group is CompletingRebalance: heartbeats are fine.
        assert_eq!(hb(&mut c, "raw", &member, 1), 0);

        let commit =
            |c: &mut Client, group: &str, member: &str, generation: i32, topic: &str| -> i16 {
                let req = OffsetCommitRequest::default()
                    .with_group_id(GroupId(s(group)))
                    .with_generation_id_or_member_epoch(generation)
                    .with_member_id(s(member))
                    .with_topics(vec![OffsetCommitRequestTopic::default()
                        .with_name(TopicName(s(topic)))
                        .with_partitions(vec![OffsetCommitRequestPartition::default()
                            .with_partition_index(0)
                            .with_committed_offset(1)])]);
                let r: OffsetCommitResponse = c.call_at(ApiKey::OffsetCommit, 8, &req).unwrap();
                r.topics[0].partitions[0].error_code
            };
        assert_eq!(
            commit(&mut c, "raw", &member, 1, "known"),
            E::RebalanceInProgress.code()
        );
        assert_eq!(
            commit(&mut c, "raw", &member, 1, "unknown-topic"),
            E::UnknownTopicOrPartition.code()
        );
        assert_eq!(
            commit(&mut c, "raw", &member, 3, "known"),
            E::IllegalGeneration.code()
        );
        assert_eq!(
            commit(&mut c, "raw", "", -1, "known"),
            E::UnknownMemberId.code()
        );
        assert_eq!(commit(&mut c, "standalone", "", -1, "known"), 0);

        let sync = SyncGroupRequest::default()
            .with_group_id(GroupId(s("raw")))
            .with_generation_id(1)
            .with_member_id(s(&member))
            .with_protocol_type(Some(s("consumer")))
            .with_protocol_name(Some(s("range")));
        let r: SyncGroupResponse = c.call_at(ApiKey::SyncGroup, 5, &sync).unwrap();
        assert_eq!(r.error_code, 0);
        assert_eq!(commit(&mut c, "raw", &member, 1, "known"), 0);

        let del = DeleteGroupsRequest::default().with_groups_names(vec![
            GroupId(s("raw")),
            GroupId(s("standalone")),
            GroupId(s("never-existed")),
        ]);
        let r: DeleteGroupsResponse = c.call_at(ApiKey::DeleteGroups, 2, &del).unwrap();
        let codes: Vec<i16> = r.results.iter().map(|r| r.error_code).collect();
        assert_eq!(
            codes,
            [E::NonEmptyGroup.code(), 0, E::GroupIdNotFound.code()]
        );

        let d = DescribeGroupsRequest::default().with_groups(vec![GroupId(s("never-existed"))]);
        let r: DescribeGroupsResponse = c.call_at(ApiKey::DescribeGroups, 5, &d).unwrap();
        assert_eq!(
            (r.groups[0].error_code, r.groups[0].group_state.as_str()),
            (0, "Dead")
        );
        let r: DescribeGroupsResponse = c.call_at(ApiKey::DescribeGroups, 6, &d).unwrap();
        assert_eq!(r.groups[0].error_code, E::GroupIdNotFound.code());

        let txn = FindCoordinatorRequest::default()
            .with_key_type(1)
            .with_coordinator_keys(vec![s("txn-id")]);
        let r: FindCoordinatorResponse = c.call_at(ApiKey::FindCoordinator, 4, &txn).unwrap();
        assert_eq!(
            r.coordinators[0].error_code,
            E::CoordinatorNotAvailable.code()
        );
        let grp = FindCoordinatorRequest::default().with_key(s("raw"));
        let r: FindCoordinatorResponse = c.call_at(ApiKey::FindCoordinator, 3, &grp).unwrap();
        assert_eq!((r.error_code, r.port), (0, b.port as i32));
    }
}
