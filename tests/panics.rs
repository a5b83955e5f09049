//! A panic in a request's handler, in a task it spawned, or in work it sent to another shard costs
//! that one request (its connection is closed) and nothing else: the shard survives, other
//! connections and partitions on it keep working, the panic is logged once with the API key and
//! version of the request, and the broker still stops cleanly on SIGTERM.
//!
//! Each test starts the real (debug) broker with two shards and one panic point armed for a
//! `boom-…` topic or group through `SLUICE_FAULT_PANIC=<point>:<key>` (see `src/fault.rs`).
//! Every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::raw::{batch, create_topic, tn, Raw, IO_WAIT};
use common::Broker;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::RecordBatchDecoder;

/// How long the broker may take to log a panic after closing the connection.
const LOG_WAIT: Duration = Duration::from_secs(10);
/// Partitions of every test topic: spread over both shards (the broker assigns each new
/// partition to the shard with the fewest), so some are owned by a connection's own shard and
/// some by the other one.
const PARTITIONS: i32 = 4;
/// Connections opened before the panic that must keep working after it.
const BYSTANDERS: usize = 4;

const NONE: i16 = 0;
const PRODUCE_VERSION: i16 = 9;
const FETCH_VERSION: i16 = 12;
const DESCRIBE_GROUPS_VERSION: i16 = 5;

/// Produces `value` (acks=all) to one partition: `Some((error, base offset))`, or `None` when the
/// broker closed the connection.
fn try_produce(r: &mut Raw, topic: &str, partition: i32, value: &[u8]) -> Option<(i16, i64)> {
    let resp: ProduceResponse = r.try_call(
        ApiKey::Produce,
        PRODUCE_VERSION,
        &ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(10_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(tn(topic))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(partition)
                    .with_records(Some(batch(&[value])))])]),
    )?;
    let p = &resp.responses[0].partition_responses[0];
    Some((p.error_code, p.base_offset))
}

fn fetch_request(topic: &str, partition: i32, offset: i64, wait_ms: i32) -> FetchRequest {
    FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(wait_ms)
        .with_min_bytes(if wait_ms > 0 { 1 } else { 0 })
        .with_max_bytes(1 << 20)
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(tn(topic))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(partition)
                .with_current_leader_epoch(-1)
                .with_fetch_offset(offset)
                .with_log_start_offset(-1)
                .with_last_fetched_epoch(-1)
                .with_partition_max_bytes(1 << 20)])])
}

/// The values of the records of one partition from `offset` (no waiting).
fn fetch_values(r: &mut Raw, topic: &str, partition: i32, offset: i64) -> Vec<Vec<u8>> {
    let resp: FetchResponse = r.call(
        ApiKey::Fetch,
        FETCH_VERSION,
        &fetch_request(topic, partition, offset, 0),
    );
    let p = &resp.responses[0].partitions[0];
    assert_eq!(p.error_code, NONE, "fetch {topic}/{partition}@{offset}");
    let mut out = Vec::new();
    if let Some(mut recs) = p.records.clone() {
        for set in RecordBatchDecoder::decode_all(&mut recs).expect("decode fetched batches") {
            for rec in set.records {
                out.push(rec.value.map(|v| v.to_vec()).unwrap_or_default());
            }
        }
    }
    out
}

/// Produces one record to `partition` of `topic` and reads it back.
fn assert_produce_and_fetch(r: &mut Raw, topic: &str, partition: i32, value: &[u8]) {
    let (err, offset) = try_produce(r, topic, partition, value)
        .unwrap_or_else(|| panic!("broker closed the connection on a produce to {topic}"));
    assert_eq!(err, NONE, "produce to {topic}/{partition}");
    let values = fetch_values(r, topic, partition, offset);
    assert_eq!(
        values.first().map(|v| &v[..]),
        Some(value),
        "{topic}/{partition}@{offset}"
    );
}

/// A two-shard broker with `point` armed for `key`, a `calm-…` topic (never armed) and the
/// bystander connections, each checked to answer before the panic.
struct Scene {
    broker: Broker,
    bystanders: Vec<Raw>,
    calm: String,
}

fn scene(point: &str, key: &str, boom_topic: Option<&str>) -> Scene {
    let broker = Broker::options()
        .cores(2)
        .env("SLUICE_FAULT_PANIC", format!("{point}:{key}"))
        .start();
    let calm = format!("calm-{point}");
    let mut setup = Raw::connect(broker.addr);
    create_topic(&mut setup, &calm, PARTITIONS);
    if let Some(boom) = boom_topic {
        create_topic(&mut setup, boom, PARTITIONS);
    }
    let mut bystanders = Vec::new();
    for i in 0..BYSTANDERS {
        let mut r = Raw::connect(broker.addr);
        assert_produce_and_fetch(&mut r, &calm, i as i32 % PARTITIONS, b"before");
        bystanders.push(r);
    }
    Scene {
        broker,
        bystanders,
        calm,
    }
}

impl Scene {
    /// After the panic: the connections opened before it still work; a new connection produces
    /// to and fetches from every partition of the calm topic (both shards); there is exactly one
    /// panic line, naming `request` (API and version), and no default panic message; the broker
    /// runs, then exits 0 on SIGTERM. Returns the panic line.
    fn assert_contained(mut self, request: &str) -> String {
        for (i, r) in self.bystanders.iter_mut().enumerate() {
            let v: ApiVersionsResponse =
                r.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
            assert_eq!(v.error_code, NONE);
            assert_produce_and_fetch(r, &self.calm, i as i32 % PARTITIONS, b"after");
        }
        let mut fresh = Raw::connect(self.broker.addr);
        for p in 0..PARTITIONS {
            assert_produce_and_fetch(&mut fresh, &self.calm, p, b"fresh");
        }

        let line = wait_for_panic_line(&self.broker);
        let stderr = self.broker.stderr();
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("panicked")).collect();
        assert_eq!(
            lines.len(),
            1,
            "the panic must be logged exactly once (and never by the default hook):\n{stderr}"
        );
        assert!(
            line.contains(request),
            "the panic line must name {request}: {line}"
        );
        assert!(
            line.contains("fault injection"),
            "the panic line must carry the panic message: {line}"
        );

        assert!(
            self.broker.wait_exit(Duration::ZERO).is_none(),
            "the broker process died:\n{stderr}"
        );
        let status = self.broker.sigterm();
        assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
        line
    }
}

/// The first log line that reports a panic, waited for (bounded).
fn wait_for_panic_line(b: &Broker) -> String {
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        if let Some(l) = b.stderr().lines().find(|l| l.contains("panicked")) {
            return l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no panic was logged within {LOG_WAIT:?}:\n{}",
            b.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn panic_in_the_produce_request_task_closes_that_connection_only() {
    let boom = "boom-request";
    let s = scene("produce_request", boom, Some(boom));
    let mut r = Raw::connect(s.broker.addr);
    assert_eq!(
        try_produce(&mut r, boom, 0, b"x"),
        None,
        "connection closed"
    );
    s.assert_contained("request Produce v9 (api key 0)");
}

#[test]
fn panic_in_a_per_partition_produce_task_closes_that_connection_only() {
    let boom = "boom-partition";
    let s = scene("produce_partition", boom, Some(boom));
    let mut r = Raw::connect(s.broker.addr);
    assert_eq!(
        try_produce(&mut r, boom, 1, b"x"),
        None,
        "connection closed"
    );
    s.assert_contained("request Produce v9 (api key 0)");
}

#[test]
fn panic_in_a_fetch_waiter_task_closes_that_connection_only() {
    let boom = "boom-fetch";
    let s = scene("fetch_wait", boom, Some(boom));
    let mut r = Raw::connect(s.broker.addr);
    // An empty partition and min_bytes 1: the fetch long-polls, which starts the waiter tasks.
    let resp: Option<FetchResponse> = r.try_call(
        ApiKey::Fetch,
        FETCH_VERSION,
        &fetch_request(boom, 0, 0, 5_000),
    );
    assert!(resp.is_none(), "connection closed");
    s.assert_contained("request Fetch v12 (api key 1)");
}

#[test]
fn panic_on_the_owner_shard_of_a_cross_shard_call_is_carried_back_to_the_request() {
    let boom = "boom-cross";
    let s = scene("cross_shard", boom, Some(boom));
    let mut r = Raw::connect(s.broker.addr);
    // The point fires only on a partition's owner shard when that is not the connection's own
    // shard: partitions of this connection's shard take the record, the first one owned by the
    // other shard panics there.
    let mut crossed = None;
    for p in 0..PARTITIONS {
        match try_produce(&mut r, boom, p, b"x") {
            Some((err, _)) => assert_eq!(err, NONE, "same-shard partition {p}"),
            None => {
                crossed = Some(p);
                break;
            }
        }
    }
    assert!(
        crossed.is_some(),
        "no partition of {boom} lives on the other shard"
    );
    let line = s.assert_contained("request Produce v9 (api key 0)");
    // "request … on shard-A panicked at … on shard-B: …": the request and the panic ran on
    // different shards, and the panic came back to the request.
    let on: Vec<&str> = line
        .split(" on shard-")
        .skip(1)
        .map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap_or("")
        })
        .collect();
    assert_eq!(on.len(), 2, "request shard and panic shard in: {line}");
    assert_ne!(
        on[0], on[1],
        "the panic happened on the request's own shard: {line}"
    );
}

#[test]
fn panic_in_a_group_coordinator_call_closes_that_connection_only() {
    let group = "boom-group";
    let s = scene("group", group, None);
    let mut r = Raw::connect(s.broker.addr);
    // Groups are served once __consumer_offsets exists (shard 0 creates it at first start).
    let deadline = Instant::now() + IO_WAIT;
    loop {
        let m: MetadataResponse = r.call(
            ApiKey::Metadata,
            9,
            &MetadataRequest::default()
                .with_topics(Some(vec![
                    MetadataRequestTopic::default().with_name(Some(tn("__consumer_offsets")))
                ]))
                .with_allow_auto_topic_creation(false),
        );
        if m.topics.first().map(|t| t.error_code) == Some(NONE) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "__consumer_offsets was not created"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let resp: Option<DescribeGroupsResponse> = r.try_call(
        ApiKey::DescribeGroups,
        DESCRIBE_GROUPS_VERSION,
        &DescribeGroupsRequest::default()
            .with_groups(vec![GroupId(StrBytes::from_static_str(group))]),
    );
    assert!(resp.is_none(), "connection closed");
    s.assert_contained("request DescribeGroups v5 (api key 15)");
}

// KAFKA_STORAGE_ERROR (Kafka protocol guide, "Error Codes").
const KAFKA_STORAGE_ERROR: i16 = 56;

#[test]
fn panic_in_a_partition_flusher_fails_that_partitions_appends_instead_of_hanging() {
    let boom = "boom-flusher";
    let s = scene("flusher", &format!("{boom}-0"), Some(boom));
    let mut r = Raw::connect(s.broker.addr);
    // The flusher of boom-flusher-0 panics before writing this batch: the acks=all produce that
    // waits for it gets an error (not a timeout), and so does every later append; the
    // connection stays open, and the other partitions of the topic are untouched.
    for attempt in 0..2 {
        let (err, _) = try_produce(&mut r, boom, 0, b"x")
            .unwrap_or_else(|| panic!("attempt {attempt}: connection closed"));
        assert_eq!(err, KAFKA_STORAGE_ERROR, "attempt {attempt}");
    }
    for p in 1..PARTITIONS {
        assert_produce_and_fetch(&mut r, boom, p, b"fine");
    }
    s.assert_contained("partition flusher panicked");
}
