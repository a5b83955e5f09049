//! The broker under hostile or unusual input, spoken to over raw TCP with our own framing and the
//! `kafka-protocol` codecs; process-level behaviour (data-dir lock, port in use, invalid config,
//! SIGTERM, kill -9 and restart).
//!
//! After each bad input the broker must still serve a fresh client. Every wait is bounded.

mod common;

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::raw::{batch, create_topic, tn, Raw, IO_WAIT};
use common::{run_bounded, topic_name, Broker};
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, StrBytes};
use kafka_protocol::records::RecordBatchDecoder;

// Kafka error codes (Kafka protocol guide, "Error Codes").
const NONE: i16 = 0;
const CORRUPT_MESSAGE: i16 = 2;
const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
const INVALID_TOPIC_EXCEPTION: i16 = 17;
const UNSUPPORTED_VERSION: i16 = 35;

/// A fresh client gets a normal ApiVersions and Metadata answer.
fn assert_serves(b: &Broker) {
    let mut r = Raw::connect(b.addr);
    let v: ApiVersionsResponse = r.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
    assert_eq!(v.error_code, NONE);
    assert!(!v.api_keys.is_empty());
    let m: MetadataResponse = r.call(
        ApiKey::Metadata,
        9,
        &MetadataRequest::default().with_topics(None),
    );
    assert_eq!(m.brokers.len(), 1);
}

fn produce(r: &mut Raw, topic: &str, partition: i32, acks: i16, records: Bytes) -> (i16, i64) {
    let resp: ProduceResponse = r.call(
        ApiKey::Produce,
        9,
        &ProduceRequest::default()
            .with_acks(acks)
            .with_timeout_ms(10_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(tn(topic))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(partition)
                    .with_records(Some(records))])]),
    );
    let p = &resp.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

/// A one-shard broker with its Prometheus endpoint on a free port, and that endpoint.
fn broker_with_metrics() -> (Broker, SocketAddr) {
    let metrics: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .expect("metrics address");
    let b = Broker::options()
        .args(["--metrics-listen".to_string(), metrics.to_string()])
        .start();
    (b, metrics)
}

/// A connection whose frames are larger than the read chunk (64 KiB batches, as producers with
/// `batch.size` 64 KiB send) gets room for a whole frame before each one arrives: only its first
/// frame outgrows the buffer and is copied into a larger one, not every frame.
#[test]
fn frames_larger_than_a_read_chunk_land_whole_after_the_first() {
    const FRAMES: usize = 20;
    let (b, metrics) = broker_with_metrics();
    let mut r = Raw::connect(b.addr);
    let topic = topic_name("big-frames");
    create_topic(&mut r, &topic, 1);
    let regrown = || common::scrape_metric(metrics, "sluice_request_buffer_regrowths_total");
    let before = regrown().expect("the regrowth counter is exported");
    let value = [5u8; 1024];
    let values: Vec<&[u8]> = vec![&value[..]; 64];
    let records = batch(&values);
    assert!(records.len() > 64 << 10, "{} bytes", records.len());
    let mut p = Raw::connect(b.addr);
    for i in 0..FRAMES {
        let (err, base) = produce(&mut p, &topic, 0, 1, records.clone());
        assert_eq!((err, base), (0, 64 * i as i64), "frame {i}");
    }
    let regrowths = regrown().expect("the regrowth counter is exported") - before;
    assert!(
        regrowths <= 2.0,
        "{regrowths} of {FRAMES} frames of {} bytes outgrew their read buffer",
        records.len()
    );
    let bytes = common::scrape_metric(metrics, "sluice_request_bytes_regrown_total")
        .expect("the regrown-bytes counter is exported");
    assert!(
        regrowths == 0.0 || bytes > 0.0,
        "{regrowths} regrowths, {bytes} bytes"
    );
}

/// A produce request of one partition gives its batch to the log without a copy once its frame
/// has a buffer of its own (the connection's frames are all that size); a request of two
/// partitions shares its frame between them, and a batch appended while another still holds
/// the frame is copied. Either way every record reads back as produced, and a damaged batch is
/// refused.
#[test]
fn one_partition_produce_requests_give_their_batch_to_the_log_without_a_copy() {
    const FRAMES: usize = 20;
    let (b, metrics) = broker_with_metrics();
    let mut r = Raw::connect(b.addr);
    let topic = topic_name("no-copy");
    create_topic(&mut r, &topic, 2);
    let copied = || {
        common::scrape_metric(metrics, "sluice_produce_copied_bytes_total")
            .expect("the copied-bytes counter is exported")
    };
    let values: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 1024]).collect();
    let refs: Vec<&[u8]> = values.iter().map(|v| &v[..]).collect();
    let records = batch(&refs);

    let mut p = Raw::connect(b.addr);
    let before = copied();
    for i in 0..FRAMES {
        let (err, base) = produce(&mut p, &topic, 0, 1, records.clone());
        assert_eq!((err, base), (0, 64 * i as i64), "frame {i}");
    }
    // The connection's first frames may share a buffer with what arrived before them.
    let one = copied() - before;
    assert!(
        one <= 2.0 * records.len() as f64,
        "{one} bytes copied for {FRAMES} one-partition requests of {} bytes",
        records.len()
    );

    let before = copied();
    let two = ProduceRequest::default()
        .with_acks(1)
        .with_timeout_ms(10_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(tn(&topic))
            .with_partition_data(
                (0..2)
                    .map(|i| {
                        PartitionProduceData::default()
                            .with_index(i)
                            .with_records(Some(records.clone()))
                    })
                    .collect(),
            )]);
    let resp: ProduceResponse = p.call(ApiKey::Produce, 9, &two);
    let parts = &resp.responses[0].partition_responses;
    assert!(parts.iter().all(|p| p.error_code == 0), "{parts:?}");
    // The first partition's batch is copied (the second one's shares its frame); the last
    // one appended may find itself alone by then and be taken as it is.
    let shared = copied() - before;
    assert!(
        shared >= records.len() as f64 && shared <= 2.0 * records.len() as f64,
        "{shared} bytes copied for a two-partition request of {} bytes each",
        records.len()
    );

    // A damaged batch taken without a copy is refused as one that was copied, and the
    // connection goes on.
    let mut damaged = BytesMut::from(&records[..]);
    let last = damaged.len() - 1;
    damaged[last] ^= 0xff;
    let (err, _) = produce(&mut p, &topic, 0, 1, damaged.freeze());
    assert_eq!(err, 2, "CORRUPT_MESSAGE for a batch failing its CRC");
    let (err, base) = produce(&mut p, &topic, 1, 1, records.clone());
    assert_eq!((err, base), (0, 64));

    // Partition 0 holds the twenty batches and the one after them, intact, and partition 1
    // the second batch of the two-partition request.
    let (hw, all) = fetch_all(&mut r, &topic, 0);
    assert_eq!(hw, 64 * (FRAMES as i64 + 1));
    for (o, v) in &all {
        assert_eq!(v, &values[(o % 64) as usize], "partition 0 offset {o}");
    }
    assert_eq!(all.len() as i64, hw);
    let (hw, all) = fetch_all(&mut r, &topic, 1);
    assert_eq!(hw, 128);
    assert!(all.iter().all(|(o, v)| v == &values[(*o % 64) as usize]));
}

/// A Fetch v12 request for `(partition, offset, partition_max_bytes)` of `topic`, no waiting,
/// no session, limited to `max_bytes`.
fn fetch_request(topic: &str, parts: &[(i32, i64, i32)], max_bytes: i32) -> FetchRequest {
    FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(0)
        .with_min_bytes(0)
        .with_max_bytes(max_bytes)
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(tn(topic))
            .with_partitions(
                parts
                    .iter()
                    .map(|&(p, o, max)| {
                        FetchPartition::default()
                            .with_partition(p)
                            .with_current_leader_epoch(-1)
                            .with_fetch_offset(o)
                            .with_log_start_offset(-1)
                            .with_last_fetched_epoch(-1)
                            .with_partition_max_bytes(max)
                    })
                    .collect(),
            )])
}

/// Fetches from `offset` (no waiting); returns (error, high watermark, records as (offset, value)).
fn fetch(r: &mut Raw, topic: &str, partition: i32, offset: i64) -> (i16, i64, Vec<(i64, Vec<u8>)>) {
    let resp: FetchResponse = r.call(
        ApiKey::Fetch,
        12,
        &fetch_request(topic, &[(partition, offset, 8 << 20)], 16 << 20),
    );
    assert_eq!(resp.error_code, NONE);
    let p = &resp.responses[0].partitions[0];
    let mut out = Vec::new();
    if let Some(mut recs) = p.records.clone() {
        for set in RecordBatchDecoder::decode_all(&mut recs).expect("decode fetched batches") {
            for rec in set.records {
                out.push((
                    rec.offset,
                    rec.value.map(|v| v.to_vec()).unwrap_or_default(),
                ));
            }
        }
    }
    (p.error_code, p.high_watermark, out)
}

/// Reads everything of a partition from offset 0, fetching until the high watermark.
fn fetch_all(r: &mut Raw, topic: &str, partition: i32) -> (i64, Vec<(i64, Vec<u8>)>) {
    let mut all = Vec::new();
    let mut next = 0;
    let deadline = Instant::now() + IO_WAIT;
    loop {
        let (err, hw, recs) = fetch(r, topic, partition, next);
        assert_eq!(err, NONE, "fetch {topic}/{partition}@{next}");
        for (o, v) in recs {
            if o >= next {
                next = o + 1;
                all.push((o, v));
            }
        }
        if next >= hw {
            return (hw, all);
        }
        assert!(
            Instant::now() < deadline,
            "fetch did not reach the high watermark"
        );
    }
}

#[test]
fn garbage_bytes_close_the_connection_only() {
    let b = Broker::start();
    // An HTTP request: "GET " read as a length is far beyond request_bytes_max.
    let mut r = Raw::connect(b.addr);
    r.send_bytes(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    r.assert_closed("HTTP request");
    assert_serves(&b);
    // A plausible length followed by noise (api key 0x7f7f does not exist).
    let mut r = Raw::connect(b.addr);
    let mut f = 40i32.to_be_bytes().to_vec();
    f.extend((0..40u32).map(|i| (i * 37 % 256) as u8 | 0x7f));
    r.send_bytes(&f);
    r.assert_closed("noise frame");
    assert_serves(&b);
}

#[test]
fn negative_and_tiny_length_prefixes_close_the_connection() {
    let b = Broker::start();
    for len in [-1i32, i32::MIN, 0, 3] {
        let mut r = Raw::connect(b.addr);
        r.send_bytes(&len.to_be_bytes());
        r.send_bytes(&[0u8; 16]);
        r.assert_closed(&format!("length prefix {len}"));
        assert_serves(&b);
    }
}

#[test]
fn length_prefix_over_request_bytes_max_closes_without_reading_it() {
    let b = Broker::options()
        .args(["--request-bytes-max", "65536"])
        .start();
    let mut r = Raw::connect(b.addr);
    // Announce 1 MB but send only a header's worth: the broker must not wait for the rest.
    r.send_bytes(&(1_000_000i32).to_be_bytes());
    r.send_bytes(&[0, 3, 0, 9, 0, 0, 0, 1, 0xff, 0xff]);
    r.assert_closed("oversized frame");
    assert_serves(&b);
}

#[test]
fn truncated_frame_then_close_leaves_broker_serving() {
    let b = Broker::start();
    for _ in 0..3 {
        let mut r = Raw::connect(b.addr);
        let f = r.frame(
            ApiKey::Metadata,
            9,
            &MetadataRequest::default().with_topics(None),
        );
        r.send_bytes(&f[..f.len() / 2]);
        let _ = r.s.shutdown(Shutdown::Write);
        r.assert_closed("truncated frame");
    }
    assert_serves(&b);
}

#[test]
fn unknown_api_key_closes_the_connection() {
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    // [api key 9999][version 0][correlation 1][client id null]
    let mut body = Vec::new();
    body.extend(9999i16.to_be_bytes());
    body.extend(0i16.to_be_bytes());
    body.extend(1i32.to_be_bytes());
    body.extend((-1i16).to_be_bytes());
    let mut f = (body.len() as i32).to_be_bytes().to_vec();
    f.extend(body);
    r.send_bytes(&f);
    r.assert_closed("unknown api key");
    assert_serves(&b);
}

#[test]
fn unsupported_metadata_version_closes_the_connection() {
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    let v: ApiVersionsResponse = r.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
    let md = v
        .api_keys
        .iter()
        .find(|k| k.api_key == ApiKey::Metadata as i16)
        .expect("Metadata advertised");
    // One past the advertised maximum, hand-framed (no codec knows this version).
    let version = md.max_version + 1;
    let mut body = Vec::new();
    body.extend((ApiKey::Metadata as i16).to_be_bytes());
    body.extend(version.to_be_bytes());
    body.extend(7i32.to_be_bytes());
    body.extend((-1i16).to_be_bytes()); // client id null
    body.push(0); // header tagged fields
    body.push(1); // topics: compact array, null
    body.push(0); // allow_auto_topic_creation
    body.push(0); // include_topic_authorized_operations
    body.push(0); // tagged fields
    let mut f = (body.len() as i32).to_be_bytes().to_vec();
    f.extend(body);
    r.send_bytes(&f);
    // Kafka answers an unsupported version of any API but ApiVersions by closing.
    r.assert_closed("Metadata one past the max version");
    assert_serves(&b);
}

#[test]
fn too_new_api_versions_gets_unsupported_version_and_a_v0_list() {
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    // KIP-511: a client may send a newer ApiVersions than the broker knows; the broker answers
    // UNSUPPORTED_VERSION with a v0 body listing its APIs.
    let mut body = Vec::new();
    body.extend((ApiKey::ApiVersions as i16).to_be_bytes());
    body.extend(127i16.to_be_bytes());
    body.extend(4242i32.to_be_bytes());
    body.extend(4i16.to_be_bytes());
    body.extend(b"test");
    body.push(0);
    body.extend([1, 1, 0, 0, 0, 0]); // some future body
    let mut f = (body.len() as i32).to_be_bytes().to_vec();
    f.extend(body);
    r.send_bytes(&f);
    let mut resp = r
        .read_frame()
        .expect("broker answered the too-new ApiVersions");
    let h = ResponseHeader::decode(&mut resp, 0).expect("v0 response header");
    assert_eq!(h.correlation_id, 4242);
    let v = ApiVersionsResponse::decode(&mut resp, 0).expect("v0 ApiVersions body");
    assert_eq!(v.error_code, UNSUPPORTED_VERSION);
    let keys: Vec<i16> = v.api_keys.iter().map(|k| k.api_key).collect();
    for must in [
        ApiKey::Produce,
        ApiKey::Fetch,
        ApiKey::ListOffsets,
        ApiKey::Metadata,
        ApiKey::ApiVersions,
    ] {
        assert!(
            keys.contains(&(must as i16)),
            "{must:?} missing from {keys:?}"
        );
    }
    let av = v
        .api_keys
        .iter()
        .find(|k| k.api_key == ApiKey::ApiVersions as i16)
        .expect("ApiVersions listed");
    assert_eq!(av.min_version, 0);
    assert!(av.max_version >= 3);
    assert!(resp.is_empty(), "trailing bytes after the v0 body");
    // The same connection keeps working with a supported version.
    let ok: ApiVersionsResponse = r.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
    assert_eq!(ok.error_code, NONE);
}

#[test]
fn produce_with_corrupt_crc_is_rejected_and_writes_nothing() {
    let b = Broker::start();
    let t = topic_name("crc");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 1);
    let good = batch(&[b"one", b"two"]);
    assert_eq!(
        RecordBatchDecoder::decode_batch_info(&mut good.clone())
            .expect("batch info")
            .len(),
        1,
        "test batches must be single batches"
    );
    let mut bad = BytesMut::from(&good[..]);
    // RecordBatch v2: baseOffset(8) batchLength(4) partitionLeaderEpoch(4) magic(1) crc(4).
    bad[18] ^= 0x5a;
    let (err, _) = produce(&mut r, &t, 0, -1, bad.freeze());
    assert_eq!(err, CORRUPT_MESSAGE);
    let (err, hw, recs) = fetch(&mut r, &t, 0, 0);
    assert_eq!((err, hw), (NONE, 0));
    assert!(recs.is_empty());
    // A payload byte flipped under an intact CRC field is caught as well.
    let mut bad = BytesMut::from(&good[..]);
    let last = bad.len() - 2;
    bad[last] ^= 0x01;
    let (err, _) = produce(&mut r, &t, 0, 1, bad.freeze());
    assert_eq!(err, CORRUPT_MESSAGE);
    // The good batch lands at offset 0.
    assert_eq!(produce(&mut r, &t, 0, -1, good), (NONE, 0));
    let (hw, recs) = fetch_all(&mut r, &t, 0);
    assert_eq!(hw, 2);
    assert_eq!(recs, vec![(0, b"one".to_vec()), (1, b"two".to_vec())]);
    assert_serves(&b);
}

#[test]
fn produce_to_internal_topic_name_is_rejected() {
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    for name in ["__consumer_offsets", "__transaction_state", "__sluice_test"] {
        let (err, _) = produce(&mut r, name, 0, -1, batch(&[b"sneaky"]));
        assert!(
            err == INVALID_TOPIC_EXCEPTION || err == UNKNOWN_TOPIC_OR_PARTITION,
            "produce to {name}: error {err}"
        );
    }
    // Nothing was auto-created under a reserved name.
    let m: MetadataResponse = r.call(
        ApiKey::Metadata,
        9,
        &MetadataRequest::default().with_topics(None),
    );
    for t in &m.topics {
        let name = t.name.as_ref().map(|n| n.to_string()).unwrap_or_default();
        assert_ne!(name, "__sluice_test");
        assert_ne!(name, "__transaction_state");
    }
    assert_serves(&b);
}

#[test]
fn unknown_topic_with_auto_create_off() {
    let b = Broker::options()
        .args(["--auto-create-topics", "false"])
        .start();
    let mut r = Raw::connect(b.addr);
    let t = topic_name("nope");
    let m: MetadataResponse = r.call(
        ApiKey::Metadata,
        9,
        &MetadataRequest::default()
            .with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(tn(&t)))
            ]))
            .with_allow_auto_topic_creation(true),
    );
    assert_eq!(m.topics.len(), 1);
    assert_eq!(m.topics[0].error_code, UNKNOWN_TOPIC_OR_PARTITION);
    let (err, _) = produce(&mut r, &t, 0, -1, batch(&[b"x"]));
    assert_eq!(err, UNKNOWN_TOPIC_OR_PARTITION);
    let (err, _, _) = fetch(&mut r, &t, 0, 0);
    assert_eq!(err, UNKNOWN_TOPIC_OR_PARTITION);
    let m: MetadataResponse = r.call(
        ApiKey::Metadata,
        9,
        &MetadataRequest::default().with_topics(None),
    );
    assert!(m
        .topics
        .iter()
        .all(|x| x.name.as_ref().map(|n| n.as_str()) != Some(t.as_str())));
    assert_serves(&b);
}

#[test]
fn produce_never_creates_topics() {
    // Auto-creation is on (the default): still, as in Kafka, only Metadata may create a topic.
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    let t = topic_name("typo");
    let (err, _) = produce(&mut r, &t, 0, -1, batch(&[b"x"]));
    assert_eq!(err, UNKNOWN_TOPIC_OR_PARTITION);
    let (err, _) = produce(&mut r, &t, 0, 1, batch(&[b"x"]));
    assert_eq!(err, UNKNOWN_TOPIC_OR_PARTITION);
    let all: MetadataResponse = r.call(
        ApiKey::Metadata,
        9,
        &MetadataRequest::default().with_topics(None),
    );
    assert!(all
        .topics
        .iter()
        .all(|x| x.name.as_ref().map(|n| n.as_str()) != Some(t.as_str())));
    // A Metadata request that allows auto-creation creates it; then Produce appends.
    let m: MetadataResponse = r.call(
        ApiKey::Metadata,
        9,
        &MetadataRequest::default()
            .with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(tn(&t)))
            ]))
            .with_allow_auto_topic_creation(true),
    );
    assert_eq!(m.topics[0].error_code, NONE);
    assert_eq!(produce(&mut r, &t, 0, -1, batch(&[b"x"])), (NONE, 0));
    assert_serves(&b);
}

/// The topic's overrides as DescribeConfigs (v4) reports them: (name, value) of every config
/// whose source is DYNAMIC_TOPIC_CONFIG.
fn topic_overrides(r: &mut Raw, topic: &str) -> Vec<(String, String)> {
    let resp: DescribeConfigsResponse = r.call(
        ApiKey::DescribeConfigs,
        4,
        &DescribeConfigsRequest::default().with_resources(vec![DescribeConfigsResource::default()
            .with_resource_type(2)
            .with_resource_name(StrBytes::from_string(topic.to_string()))]),
    );
    assert_eq!(resp.results[0].error_code, NONE, "{:?}", resp.results[0]);
    resp.results[0]
        .configs
        .iter()
        .filter(|c| c.config_source == 1)
        .map(|c| {
            (
                c.name.to_string(),
                c.value.as_ref().map(|v| v.to_string()).unwrap_or_default(),
            )
        })
        .collect()
}

#[test]
fn alter_configs_replace_incremental_ops_errors_per_resource_and_survive_restart() {
    use kafka_protocol::messages::alter_configs_request as legacy;
    use kafka_protocol::messages::incremental_alter_configs_request as inc;
    const INVALID_REQUEST: i16 = 42;
    const INVALID_CONFIG: i16 = 40;
    let s = |x: &str| StrBytes::from_string(x.to_string());
    let mut b = Broker::start();
    let t = topic_name("alter");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 1);
    let op = |name: &str, op: i8, value: Option<&str>| {
        inc::AlterableConfig::default()
            .with_name(s(name))
            .with_config_operation(op)
            .with_value(value.map(s))
    };
    let incremental = |r: &mut Raw, resources: Vec<inc::AlterConfigsResource>, only: bool| {
        let resp: IncrementalAlterConfigsResponse = r.call(
            ApiKey::IncrementalAlterConfigs,
            1,
            &IncrementalAlterConfigsRequest::default()
                .with_resources(resources)
                .with_validate_only(only),
        );
        resp.responses
            .iter()
            .map(|x| (x.resource_name.to_string(), x.error_code))
            .collect::<Vec<_>>()
    };
    let topic_res = |name: &str, configs| {
        inc::AlterConfigsResource::default()
            .with_resource_type(2)
            .with_resource_name(s(name))
            .with_configs(configs)
    };
    // SET two keys, then DELETE one and SET another.
    let out = incremental(
        &mut r,
        vec![topic_res(
            &t,
            vec![
                op("retention.ms", 0, Some("5000")),
                op("compression.type", 0, Some("gzip")),
            ],
        )],
        false,
    );
    assert_eq!(out, vec![(t.clone(), NONE)]);
    let out = incremental(
        &mut r,
        vec![topic_res(
            &t,
            vec![
                op("compression.type", 1, None),
                op("cleanup.policy", 0, Some("compact")),
            ],
        )],
        false,
    );
    assert_eq!(out, vec![(t.clone(), NONE)]);
    let expect = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(
        topic_overrides(&mut r, &t),
        expect(&[("cleanup.policy", "compact"), ("retention.ms", "5000")])
    );
    // Errors, per resource: a key twice, no value to SET, an unknown operation, a resource
    // listed twice, an unknown topic, a bad value; the good resource next to them still applies.
    let other = topic_name("alter2");
    create_topic(&mut r, &other, 1);
    let out = incremental(
        &mut r,
        vec![
            topic_res(
                &t,
                vec![
                    op("retention.ms", 0, Some("1")),
                    op("retention.ms", 0, Some("2")),
                ],
            ),
            topic_res("no-such-topic", vec![op("retention.ms", 0, Some("1"))]),
            topic_res(&other, vec![op("segment.ms", 0, Some("60000"))]),
        ],
        false,
    );
    assert_eq!(
        out,
        vec![
            (t.clone(), INVALID_REQUEST),
            ("no-such-topic".to_string(), UNKNOWN_TOPIC_OR_PARTITION),
            (other.clone(), NONE)
        ]
    );
    for bad in [
        op("retention.ms", 0, None),
        op("retention.ms", 9, Some("1")),
        op("retention.ms", 0, Some("x")),
    ] {
        let out = incremental(&mut r, vec![topic_res(&t, vec![bad.clone()])], false);
        assert!(
            out[0].1 == INVALID_REQUEST || out[0].1 == INVALID_CONFIG,
            "{bad:?}: {out:?}"
        );
    }
    let out = incremental(
        &mut r,
        vec![
            topic_res(&other, vec![op("retention.ms", 0, Some("1"))]),
            topic_res(&other, vec![op("retention.ms", 0, Some("2"))]),
        ],
        false,
    );
    assert_eq!(
        out,
        vec![
            (other.clone(), INVALID_REQUEST),
            (other.clone(), INVALID_REQUEST)
        ]
    );
    assert_eq!(
        topic_overrides(&mut r, &other),
        expect(&[("segment.ms", "60000")])
    );
    // validate_only checks and changes nothing.
    let out = incremental(
        &mut r,
        vec![topic_res(&t, vec![op("retention.ms", 0, Some("7"))])],
        true,
    );
    assert_eq!(out, vec![(t.clone(), NONE)]);
    assert_eq!(
        topic_overrides(&mut r, &t),
        expect(&[("cleanup.policy", "compact"), ("retention.ms", "5000")])
    );
    // Legacy AlterConfigs: the given configs replace every override.
    let resp: AlterConfigsResponse = r.call(
        ApiKey::AlterConfigs,
        2,
        &AlterConfigsRequest::default().with_resources(vec![
            legacy::AlterConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(s(&t))
                .with_configs(vec![legacy::AlterableConfig::default()
                    .with_name(s("max.message.bytes"))
                    .with_value(Some(s("2000000")))]),
        ]),
    );
    assert_eq!(
        resp.responses[0].error_code, NONE,
        "{:?}",
        resp.responses[0]
    );
    assert_eq!(
        topic_overrides(&mut r, &t),
        expect(&[("max.message.bytes", "2000000")])
    );
    // Broker resources: an empty change is fine; settings fixed at start are refused with the
    // reason; the broker defaults of applied topic configs change (this broker's and every
    // broker's, ""), and topics without an override follow them.
    let broker_res = |configs| {
        inc::AlterConfigsResource::default()
            .with_resource_type(4)
            .with_resource_name(s("0"))
            .with_configs(configs)
    };
    let resp: IncrementalAlterConfigsResponse = r.call(
        ApiKey::IncrementalAlterConfigs,
        0,
        &IncrementalAlterConfigsRequest::default().with_resources(vec![broker_res(vec![])]),
    );
    assert_eq!(resp.responses[0].error_code, NONE);
    let resp: IncrementalAlterConfigsResponse = r.call(
        ApiKey::IncrementalAlterConfigs,
        0,
        &IncrementalAlterConfigsRequest::default().with_resources(vec![broker_res(vec![op(
            "num.partitions",
            0,
            Some("3"),
        )])]),
    );
    assert_eq!(resp.responses[0].error_code, INVALID_REQUEST);
    assert!(resp.responses[0]
        .error_message
        .as_ref()
        .is_some_and(|m| m.contains("num.partitions")));
    let resp: IncrementalAlterConfigsResponse = r.call(
        ApiKey::IncrementalAlterConfigs,
        0,
        &IncrementalAlterConfigsRequest::default().with_resources(vec![
            broker_res(vec![op("log.roll.ms", 0, Some("3600000"))]),
            inc::AlterConfigsResource::default()
                .with_resource_type(4)
                .with_resource_name(s(""))
                .with_configs(vec![
                    op("log.roll.ms", 0, Some("7200000")),
                    op("log.retention.bytes", 0, Some("1000000")),
                ]),
        ]),
    );
    assert_eq!(
        resp.responses[0].error_code, NONE,
        "{:?}",
        resp.responses[0]
    );
    assert_eq!(
        resp.responses[1].error_code, NONE,
        "{:?}",
        resp.responses[1]
    );
    // The changes are in the metadata: they survive a restart.
    drop(r);
    assert_eq!(b.sigterm().code(), Some(0));
    b.restart();
    let mut r = Raw::connect(b.addr);
    assert_eq!(
        topic_overrides(&mut r, &t),
        expect(&[("max.message.bytes", "2000000")])
    );
    assert_eq!(
        topic_overrides(&mut r, &other),
        expect(&[("segment.ms", "60000")])
    );
    // This broker's value before the cluster-wide one; a topic override before both.
    let resp: DescribeConfigsResponse = r.call(
        ApiKey::DescribeConfigs,
        4,
        &DescribeConfigsRequest::default().with_resources(vec![DescribeConfigsResource::default()
            .with_resource_type(2)
            .with_resource_name(StrBytes::from_string(t.clone()))]),
    );
    let cfg = |name: &str| {
        let c = resp.results[0]
            .configs
            .iter()
            .find(|c| c.name.as_str() == name)
            .unwrap_or_else(|| panic!("{name} missing"));
        (
            c.value.as_ref().map(|v| v.to_string()).unwrap_or_default(),
            c.config_source,
        )
    };
    assert_eq!(cfg("segment.ms"), ("3600000".to_string(), 2));
    assert_eq!(cfg("retention.bytes"), ("1000000".to_string(), 3));
    assert_serves(&b);
}

#[test]
fn authorized_operations_only_when_asked_and_describe_cluster_endpoints() {
    // No authorizer: every operation of the resource type (Kafka's AclEntry), bit = code.
    const TOPIC_OPS: i32 =
        (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 10) | (1 << 11);
    const CLUSTER_OPS: i32 =
        (1 << 5) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12);
    const GROUP_OPS: i32 = (1 << 3) | (1 << 6) | (1 << 8);
    const OMITTED: i32 = i32::MIN;
    const MISMATCHED_ENDPOINT_TYPE: i16 = 114;
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    let t = topic_name("ops");
    create_topic(&mut r, &t, 1);
    let md = |r: &mut Raw, version: i16, topic_ops: bool, cluster_ops: bool| -> MetadataResponse {
        r.call(
            ApiKey::Metadata,
            version,
            &MetadataRequest::default()
                .with_topics(Some(vec![
                    MetadataRequestTopic::default().with_name(Some(tn(&t)))
                ]))
                .with_include_topic_authorized_operations(topic_ops)
                .with_include_cluster_authorized_operations(cluster_ops && version <= 10),
        )
    };
    for version in [8, 10] {
        let m = md(&mut r, version, true, true);
        assert_eq!(
            m.topics[0].topic_authorized_operations, TOPIC_OPS,
            "v{version}"
        );
        assert_eq!(m.cluster_authorized_operations, CLUSTER_OPS, "v{version}");
        let m = md(&mut r, version, false, false);
        assert_eq!(
            m.topics[0].topic_authorized_operations, OMITTED,
            "v{version}"
        );
        assert_eq!(m.cluster_authorized_operations, OMITTED, "v{version}");
    }
    let m = md(&mut r, 12, true, false);
    assert_eq!(m.topics[0].topic_authorized_operations, TOPIC_OPS);
    // DescribeGroups v3+: the group's operations when asked (an unknown group is Dead, v5).
    for (asked, expect) in [(true, GROUP_OPS), (false, OMITTED)] {
        let d: DescribeGroupsResponse = r.call(
            ApiKey::DescribeGroups,
            5,
            &DescribeGroupsRequest::default()
                .with_groups(vec![GroupId(StrBytes::from_static_str("g"))])
                .with_include_authorized_operations(asked),
        );
        assert_eq!(d.groups[0].authorized_operations, expect, "asked: {asked}");
    }
    // DescribeCluster: broker endpoints only; the cluster's operations when asked.
    for version in 0..=2 {
        let d: DescribeClusterResponse = r.call(
            ApiKey::DescribeCluster,
            version,
            &DescribeClusterRequest::default()
                .with_endpoint_type(1)
                .with_include_cluster_authorized_operations(true),
        );
        assert_eq!(d.error_code, NONE, "v{version}");
        assert_eq!(d.cluster_authorized_operations, CLUSTER_OPS);
        assert_eq!(d.controller_id.0, 0);
        assert_eq!(d.brokers.len(), 1);
        assert_eq!(d.brokers[0].port, b.addr.port() as i32);
    }
    let d: DescribeClusterResponse = r.call(
        ApiKey::DescribeCluster,
        1,
        &DescribeClusterRequest::default().with_endpoint_type(2),
    );
    assert_eq!(d.error_code, MISMATCHED_ENDPOINT_TYPE);
    assert_eq!(d.cluster_authorized_operations, OMITTED);
    assert_serves(&b);
}

#[test]
fn describe_configs_of_unknown_topic_is_unknown_topic() {
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    let resp: DescribeConfigsResponse = r.call(
        ApiKey::DescribeConfigs,
        4,
        &DescribeConfigsRequest::default().with_resources(vec![DescribeConfigsResource::default()
            .with_resource_type(2)
            .with_resource_name(StrBytes::from_static_str("no-such-topic"))
            .with_configuration_keys(None)]),
    );
    assert_eq!(resp.results.len(), 1);
    assert_eq!(resp.results[0].error_code, UNKNOWN_TOPIC_OR_PARTITION);
}

fn one_line(stderr: &[u8]) -> String {
    let s = String::from_utf8_lossy(stderr).trim_end().to_string();
    assert!(!s.is_empty(), "nothing on stderr");
    assert_eq!(
        s.lines().count(),
        1,
        "expected one line on stderr, got:\n{s}"
    );
    s
}

#[test]
fn second_broker_on_same_data_dir_exits_with_lock_message() {
    let b = Broker::start();
    let mut cmd = Command::new(common::sluice_bin());
    cmd.args(["start", "--data-dir"])
        .arg(b.data_dir())
        .args(["--listen", &format!("127.0.0.1:{}", common::free_port())])
        .args(["--cores", "1"]);
    let out = run_bounded(cmd, None, common::CLI_WAIT_MAX);
    assert!(!out.status.success(), "second broker started");
    let line = one_line(&out.stderr);
    assert!(line.to_lowercase().contains("lock"), "{line}");
    assert_serves(&b);
}

#[test]
fn port_in_use_is_one_line_and_exit_2() {
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(common::sluice_bin());
    cmd.args(["start", "--data-dir"])
        .arg(dir.path().join("d"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--cores", "1"]);
    let out = run_bounded(cmd, None, common::CLI_WAIT_MAX);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let line = one_line(&out.stderr);
    assert!(line.contains(&port.to_string()), "{line}");
    drop(holder);
}

#[test]
fn invalid_config_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = dir.path().join("sluice.toml");
    std::fs::write(&toml, "listen = \"127.0.0.1:1\"\nno_such_key = 3\n").expect("write toml");
    let data = dir.path().join("d");
    let port = common::free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--cores".into(),
                "0".into(),
                "--listen".into(),
                listen.clone(),
            ],
            "cores",
        ),
        (
            vec![
                "--cores".into(),
                "1".into(),
                "--listen".into(),
                "not-an-address".into(),
            ],
            "listen",
        ),
        (
            vec![
                "--cores".into(),
                "1".into(),
                "--listen".into(),
                "127.0.0.1:99999".into(),
            ],
            "listen",
        ),
        (
            vec![
                "--cores".into(),
                "1".into(),
                "--config".into(),
                toml.display().to_string(),
            ],
            "no_such_key",
        ),
    ];
    for (args, mention) in cases {
        let mut cmd = Command::new(common::sluice_bin());
        cmd.args(["start", "--data-dir"]).arg(&data).args(&args);
        let out = run_bounded(cmd, None, common::CLI_WAIT_MAX);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let line = one_line(&out.stderr);
        assert!(line.contains(mention), "{args:?}: {line}");
    }
}

#[test]
fn sigterm_exits_0_and_data_survives_restart() {
    let mut b = Broker::options().cores(2).start();
    let t = topic_name("term");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 2);
    let mut acked = Vec::new();
    for i in 0..10 {
        let v = format!("term-{i}");
        let p = i % 2;
        let (err, off) = produce(&mut r, &t, p, 1, batch(&[v.as_bytes()]));
        assert_eq!(err, NONE);
        acked.push((p, off, v.into_bytes()));
    }
    drop(r);
    let status = b.sigterm();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    b.restart();
    let mut r = Raw::connect(b.addr);
    for p in 0..2 {
        let (hw, recs) = fetch_all(&mut r, &t, p);
        let want: Vec<(i64, Vec<u8>)> = acked
            .iter()
            .filter(|(pp, _, _)| *pp == p)
            .map(|(_, o, v)| (*o, v.clone()))
            .collect();
        assert_eq!(hw, want.len() as i64, "partition {p} high watermark");
        assert_eq!(recs, want, "partition {p} after restart");
    }
}

#[test]
fn acks_all_records_survive_kill_9_with_unchanged_offsets() {
    let mut b = Broker::options().cores(2).start();
    let t = topic_name("crash");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 3);
    let mut acked: Vec<(i32, i64, Vec<u8>)> = Vec::new();
    for i in 0..60 {
        let p = i % 3;
        let vals: Vec<Vec<u8>> = (0..5)
            .map(|j| format!("crash-{i}-{j}").into_bytes())
            .collect();
        let refs: Vec<&[u8]> = vals.iter().map(|v| v.as_slice()).collect();
        let (err, base) = produce(&mut r, &t, p, -1, batch(&refs));
        assert_eq!(err, NONE);
        for (j, v) in vals.into_iter().enumerate() {
            acked.push((p, base + j as i64, v));
        }
    }
    drop(r);
    b.sigkill();
    b.restart();
    let mut r = Raw::connect(b.addr);
    for p in 0..3 {
        let want: Vec<(i64, Vec<u8>)> = acked
            .iter()
            .filter(|(pp, _, _)| *pp == p)
            .map(|(_, o, v)| (*o, v.clone()))
            .collect();
        let (hw, recs) = fetch_all(&mut r, &t, p);
        assert_eq!(
            hw,
            want.len() as i64,
            "partition {p} high watermark after kill -9"
        );
        assert_eq!(recs, want, "partition {p} after kill -9");
    }
    // The restarted broker keeps appending after the recovered end.
    let (err, off) = produce(&mut r, &t, 0, -1, batch(&[b"after restart"]));
    assert_eq!((err, off), (NONE, 100));
}

// The active segment's index appends run on the blocking thread pool, not on the shard's
// executor: with every one stalled there (the `index_append` delay point, far longer than the
// test), acks=all produce requests keep being answered, no index entry reaches the file, and a
// kill -9 meanwhile loses nothing acknowledged.
#[test]
fn acks_all_produce_is_answered_while_index_appends_are_stalled_and_survives_kill_9() {
    let mut b = Broker::options()
        .segment_bytes(None) // no roll: a roll waits for the stalled append
        .env("SLUICE_FAULT_DELAY_MS", "index_append:600000")
        .start();
    let t = topic_name("idxstall");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 1);
    // 2 KiB records: an index entry every other batch (4 KiB interval), so the first append
    // (16 entries) starts after ~34 batches and stalls; the rest must still be acknowledged.
    let mut acked: Vec<(i64, Vec<u8>)> = Vec::new();
    for i in 0..120 {
        let v = format!("stall-{i}-").repeat(200).into_bytes();
        let (err, base) = produce(&mut r, &t, 0, -1, batch(&[&v]));
        assert_eq!(err, NONE);
        acked.push((base, v));
    }
    let index = b
        .data_dir()
        .join(format!("{t}-0"))
        .join(format!("{:020}.index", 0));
    assert!(
        std::fs::metadata(&index).map_or(true, |m| m.len() == 0),
        "an index entry reached the file while every append is stalled"
    );
    drop(r);
    b.sigkill();
    b.options.envs.clear();
    b.restart();
    let mut r = Raw::connect(b.addr);
    let (hw, recs) = fetch_all(&mut r, &t, 0);
    assert_eq!(hw, acked.len() as i64);
    assert_eq!(recs, acked);
    // Recovery appended the index entries.
    assert!(std::fs::metadata(&index).is_ok_and(|m| m.len() > 0));
}

/// A blocking delay point's stall, armed far longer than any test (`STALL_MS`) and ended by the
/// test once it has seen what it waits for (`SLUICE_FAULT_RELEASE` names the file to create).
struct Release {
    dir: tempfile::TempDir,
}

impl Release {
    /// Longer than the whole test: the stall ends when the test releases it.
    const STALL_MS: u64 = 600_000;

    fn new() -> Self {
        Release {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self) -> String {
        self.dir.path().join("release").display().to_string()
    }

    fn now(&self) {
        std::fs::write(self.path(), b"").expect("release file");
    }
}

/// Polls `cond` until it holds, failing after `IO_WAIT`.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + IO_WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

/// The (single) shard answers ApiVersions, Metadata, and an acks=1 and an acks=all produce to
/// partition 0 of `topic`, which holds one record before (offsets 1 and 2 are answered).
fn assert_shard_answers(r: &mut Raw, topic: &str) {
    let v: ApiVersionsResponse = r.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
    assert_eq!(v.error_code, NONE);
    let m: MetadataResponse = r.call(
        ApiKey::Metadata,
        9,
        &MetadataRequest::default().with_topics(None),
    );
    assert_eq!(m.brokers.len(), 1);
    for (i, acks) in [(1, 1), (2, -1)] {
        let v = format!("during-{i}");
        assert_eq!(
            produce(r, topic, 0, acks, batch(&[v.as_bytes()])),
            (NONE, i)
        );
    }
}

/// Nothing has been answered on `conn` yet (a peek would block); `conn` stays usable.
fn assert_unanswered(conn: &mut Raw, what: &str) {
    conn.s.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    assert!(
        matches!(conn.s.peek(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{what}"
    );
    conn.s.set_nonblocking(false).expect("blocking");
}

// Opening a partition log does its file work (directory, checkpoints, snapshots, index files,
// the new log's epoch checkpoint) on the blocking thread pool, not on the shard's executor:
// with the creation of one partition of a new topic stalled there (the `log_open` delay point,
// far longer than the test), the single shard keeps answering ApiVersions, Metadata and
// produce to an existing partition, while that CreateTopics is still unanswered.
#[test]
fn requests_are_answered_while_a_topics_log_creation_is_stalled() {
    let slow = topic_name("openstall");
    let b = Broker::options()
        .env("SLUICE_FAULT_DELAY_MS", format!("log_open:600000:{slow}-0"))
        .start();
    let t = topic_name("openlive");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 1);
    assert_eq!(produce(&mut r, &t, 0, -1, batch(&[b"before"])), (NONE, 0));

    let mut creating = Raw::connect(b.addr);
    let f = creating.frame(
        ApiKey::CreateTopics,
        5,
        &CreateTopicsRequest::default()
            .with_topics(vec![CreatableTopic::default()
                .with_name(tn(&slow))
                .with_num_partitions(16)
                .with_replication_factor(1)])
            .with_timeout_ms(600_000),
    );
    creating.send_bytes(&f);
    // The stalled job has started: it created the partition's directory, then blocked.
    let stalled_dir = b.data_dir().join(format!("{slow}-0"));
    wait_until(&format!("log creation of {slow}-0 to start"), || {
        stalled_dir.exists()
    });

    assert_shard_answers(&mut r, &t);
    let (_, recs) = fetch_all(&mut r, &t, 0);
    assert_eq!(recs.len(), 3);
    // The CreateTopics is still waiting for its stalled partition.
    assert_unanswered(
        &mut creating,
        "CreateTopics answered while one of its partitions is stalled",
    );
}

// The leader-epoch checkpoint an append writes when it begins a new epoch goes to disk on the
// blocking thread pool, not on the shard's executor: with that job stalled after the write (the
// `epoch_checkpoint` delay point, keyed by partition), the single shard keeps answering
// ApiVersions, Metadata and produce to another partition, and the stalled append is accepted
// (visible to fetches, answered) only once its checkpoint is durable and the job has returned.
#[test]
fn requests_are_answered_while_a_new_epochs_checkpoint_is_stalled_and_the_append_completes_after() {
    let slow = topic_name("epochstall");
    let release = Release::new();
    let b = Broker::options()
        .env(
            "SLUICE_FAULT_DELAY_MS",
            format!("epoch_checkpoint:{}:{slow}-0", Release::STALL_MS),
        )
        .env("SLUICE_FAULT_RELEASE", release.path())
        .start();
    let t = topic_name("epochlive");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 1);
    create_topic(&mut r, &slow, 1);
    assert_eq!(produce(&mut r, &t, 0, -1, batch(&[b"before"])), (NONE, 0));

    // A batch in leader epoch 5 (partitionLeaderEpoch, bytes 12..16, lies outside the CRC):
    // the partition's first epoch, so the append writes the checkpoint first.
    let mut stamped = BytesMut::from(&batch(&[b"epoch five"])[..]);
    stamped[12..16].copy_from_slice(&5i32.to_be_bytes());
    let mut stalled = Raw::connect(b.addr);
    let f = stalled.frame(
        ApiKey::Produce,
        9,
        &ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(tn(&slow))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(0)
                    .with_records(Some(stamped.freeze()))])]),
    );
    stalled.send_bytes(&f);
    // The job has written the checkpoint (count, then epoch 5 from offset 0) and stalled.
    let checkpoint = b
        .data_dir()
        .join(format!("{slow}-0/leader-epoch.checkpoint"));
    let want: Vec<u8> = [
        &1u32.to_be_bytes()[..],
        &5i32.to_be_bytes(),
        &0i64.to_be_bytes(),
    ]
    .concat();
    wait_until("the checkpoint of epoch 5 to be written", || {
        std::fs::read(&checkpoint).is_ok_and(|c| c.starts_with(&want))
    });

    assert_shard_answers(&mut r, &t);
    // Nothing of the stalled append is accepted yet, and it is not answered.
    let (hw, recs) = fetch_all(&mut r, &slow, 0);
    assert_eq!((hw, recs.len()), (0, 0));
    assert_unanswered(
        &mut stalled,
        "the append was answered while its epoch checkpoint is stalled",
    );

    release.now();
    // Released: the append is answered at offset 0 and the partition continues after it.
    let mut resp = stalled.read_frame().expect("the stalled produce's answer");
    let h = ResponseHeader::decode(&mut resp, ApiKey::Produce.response_header_version(9))
        .expect("response header");
    assert_eq!(h.correlation_id, stalled.correlation);
    let p: ProduceResponse = ProduceResponse::decode(&mut resp, 9).expect("produce response");
    let part = &p.responses[0].partition_responses[0];
    assert_eq!((part.error_code, part.base_offset), (NONE, 0));
    assert_eq!(produce(&mut r, &slow, 0, -1, batch(&[b"after"])), (NONE, 1));
    let (hw, recs) = fetch_all(&mut r, &slow, 0);
    assert_eq!(hw, 2);
    assert_eq!(recs.len(), 2);
}

// A single node's metadata log is appended and fdatasynced on the blocking thread pool, not on
// shard 0's executor: with a new topic's record stalled there (the `metadata_log` delay point,
// keyed by topic), the shard keeps answering ApiVersions, Metadata and produce, the topic is not
// published before its record is durable, and once released the CreateTopics is answered and
// the topic takes writes.
#[test]
fn requests_are_answered_while_a_topics_metadata_record_is_stalled_and_it_is_published_after() {
    let slow = topic_name("metastall");
    let release = Release::new();
    let b = Broker::options()
        .env(
            "SLUICE_FAULT_DELAY_MS",
            format!("metadata_log:{}:{slow}", Release::STALL_MS),
        )
        .env("SLUICE_FAULT_RELEASE", release.path())
        .start();
    let t = topic_name("metalive");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 1);

    let mut creating = Raw::connect(b.addr);
    let f = creating.frame(
        ApiKey::CreateTopics,
        5,
        &CreateTopicsRequest::default()
            .with_topics(vec![CreatableTopic::default()
                .with_name(tn(&slow))
                .with_num_partitions(1)
                .with_replication_factor(1)])
            .with_timeout_ms(30_000),
    );
    creating.send_bytes(&f);
    // The record is written once the partition's log exists: wait for its directory.
    let dir = b.data_dir().join(format!("{slow}-0"));
    wait_until(&format!("{slow}-0 to be created"), || dir.exists());

    let v: ApiVersionsResponse = r.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
    assert_eq!(v.error_code, NONE);
    assert_eq!(produce(&mut r, &t, 0, -1, batch(&[b"during"])), (NONE, 0));
    let m: MetadataResponse = r.call(
        ApiKey::Metadata,
        9,
        &MetadataRequest::default().with_topics(None),
    );
    assert!(
        m.topics
            .iter()
            .all(|x| x.name.as_ref().map(|n| n.as_str()) != Some(slow.as_str())),
        "{slow} published before its metadata record is durable"
    );
    assert_unanswered(
        &mut creating,
        "CreateTopics answered while its metadata record is stalled",
    );

    release.now();
    // Released: created, published, and it takes writes.
    let mut resp = creating.read_frame().expect("the CreateTopics answer");
    let h = ResponseHeader::decode(&mut resp, ApiKey::CreateTopics.response_header_version(5))
        .expect("response header");
    assert_eq!(h.correlation_id, creating.correlation);
    let c = CreateTopicsResponse::decode(&mut resp, 5).expect("create topics response");
    assert_eq!(c.topics[0].error_code, NONE);
    assert_eq!(produce(&mut r, &slow, 0, -1, batch(&[b"after"])), (NONE, 0));
}

fn list_offset(r: &mut Raw, topic: &str, partition: i32, timestamp: i64) -> (i16, i64, i64) {
    use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
    let resp: ListOffsetsResponse = r.call(
        ApiKey::ListOffsets,
        7,
        &ListOffsetsRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_topics(vec![ListOffsetsTopic::default()
                .with_name(tn(topic))
                .with_partitions(vec![ListOffsetsPartition::default()
                    .with_partition_index(partition)
                    .with_current_leader_epoch(-1)
                    .with_timestamp(timestamp)])]),
    );
    let p = &resp.topics[0].partitions[0];
    (p.error_code, p.offset, p.timestamp)
}

#[test]
fn list_offsets_by_time_finds_the_record_inside_a_batch() {
    let b = Broker::start();
    let t = topic_name("lotime");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 1);
    // One batch, five records, timestamps t0, t0+1, … t0+4 (see `batch`).
    let t0 = 1_700_000_000_000i64;
    assert_eq!(
        produce(&mut r, &t, 0, -1, batch(&[b"a", b"b", b"c", b"d", b"e"])),
        (NONE, 0)
    );
    assert_eq!(list_offset(&mut r, &t, 0, -2), (NONE, 0, -1));
    assert_eq!(list_offset(&mut r, &t, 0, -1).1, 5);
    // Kafka: ListOffsets by timestamp answers the first *record* (not batch) whose timestamp is
    // >= the target, with that record's timestamp.
    for (target, offset, ts) in [
        (t0 - 10, 0, t0),
        (t0, 0, t0),
        (t0 + 1, 1, t0 + 1),
        (t0 + 3, 3, t0 + 3),
        (t0 + 4, 4, t0 + 4),
    ] {
        assert_eq!(
            list_offset(&mut r, &t, 0, target),
            (NONE, offset, ts),
            "ListOffsets timestamp {target}"
        );
    }
    // Past the last record: offset -1, timestamp -1.
    assert_eq!(list_offset(&mut r, &t, 0, t0 + 5), (NONE, -1, -1));
    // -3 (KIP-734): the record with the largest timestamp.
    assert_eq!(list_offset(&mut r, &t, 0, -3), (NONE, 4, t0 + 4));
}

const OFFSET_OUT_OF_RANGE: i16 = 1;
const INVALID_REQUIRED_ACKS: i16 = 21;

fn delete_records(r: &mut Raw, topic: &str, partition: i32, offset: i64) -> (i16, i64) {
    use kafka_protocol::messages::delete_records_request::{
        DeleteRecordsPartition, DeleteRecordsTopic,
    };
    let resp: DeleteRecordsResponse = r.call(
        ApiKey::DeleteRecords,
        2,
        &DeleteRecordsRequest::default()
            .with_topics(vec![DeleteRecordsTopic::default()
                .with_name(tn(topic))
                .with_partitions(vec![DeleteRecordsPartition::default()
                    .with_partition_index(partition)
                    .with_offset(offset)])])
            .with_timeout_ms(10_000),
    );
    let p = &resp.topics[0].partitions[0];
    (p.error_code, p.low_watermark)
}

// Kafka protocol guide, DeleteRecords (KIP-107): the log start offset moves up to the requested
// offset, never past the high watermark (OFFSET_OUT_OF_RANGE); -1 means the high watermark.
#[test]
fn delete_records_stops_at_the_high_watermark_and_survives_kill_9() {
    let mut b = Broker::start();
    let t = topic_name("delrec");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 1);
    // acks=1: written, perhaps not yet synced; the log start must be durable all the same.
    for i in 0..10 {
        let (a, c) = (format!("v{}", 2 * i), format!("v{}", 2 * i + 1));
        let (err, base) = produce(&mut r, &t, 0, 1, batch(&[a.as_bytes(), c.as_bytes()]));
        assert_eq!((err, base), (NONE, 2 * i));
    }
    // Past the high watermark: out of range, nothing moves.
    assert_eq!(delete_records(&mut r, &t, 0, 21), (OFFSET_OUT_OF_RANGE, -1));
    assert_eq!(list_offset(&mut r, &t, 0, -2), (NONE, 0, -1));
    // Inside: the log start moves there; fetches below it are out of range.
    assert_eq!(delete_records(&mut r, &t, 0, 5), (NONE, 5));
    assert_eq!(list_offset(&mut r, &t, 0, -2), (NONE, 5, -1));
    assert_eq!(fetch(&mut r, &t, 0, 4).0, OFFSET_OUT_OF_RANGE);
    let (err, hw, recs) = fetch(&mut r, &t, 0, 5);
    assert_eq!((err, hw), (NONE, 20));
    // The batch holding offset 5 starts at 4 (clients skip what precedes their position).
    let from5: Vec<i64> = recs.iter().map(|x| x.0).filter(|o| *o >= 5).collect();
    assert_eq!(from5, (5..20).collect::<Vec<_>>());
    // At the high watermark: nothing is left to read.
    assert_eq!(delete_records(&mut r, &t, 0, 20), (NONE, 20));
    assert_eq!(fetch(&mut r, &t, 0, 19).0, OFFSET_OUT_OF_RANGE);
    assert_eq!(fetch(&mut r, &t, 0, 20), (NONE, 20, vec![]));
    // -1: the high watermark, which three more acks=1 records moved to 23.
    let (err, base) = produce(&mut r, &t, 0, 1, batch(&[b"x", b"y", b"z"]));
    assert_eq!((err, base), (NONE, 20));
    assert_eq!(delete_records(&mut r, &t, 0, -1), (NONE, 23));
    assert_eq!(list_offset(&mut r, &t, 0, -2), (NONE, 23, -1));
    assert_eq!(list_offset(&mut r, &t, 0, -1).1, 23);
    // kill -9 right after: the log start and the log end survive, and appends continue there.
    drop(r);
    b.sigkill();
    b.restart();
    let mut r = Raw::connect(b.addr);
    assert_eq!(list_offset(&mut r, &t, 0, -2), (NONE, 23, -1));
    assert_eq!(list_offset(&mut r, &t, 0, -1).1, 23);
    assert_eq!(fetch(&mut r, &t, 0, 22).0, OFFSET_OUT_OF_RANGE);
    assert_eq!(fetch(&mut r, &t, 0, 23), (NONE, 23, vec![]));
    assert_eq!(
        produce(&mut r, &t, 0, -1, batch(&[b"after restart"])),
        (NONE, 23)
    );
    assert_eq!(
        fetch(&mut r, &t, 0, 23),
        (NONE, 24, vec![(23, b"after restart".to_vec())])
    );
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    // Two shards, so that partitions of one topic live on different cores and answers complete
    // out of order inside the broker.
    let b = Broker::options().cores(2).start();
    let t = topic_name("pipe");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 4);
    let n = 60;
    let first_correlation = r.correlation + 1;
    let mut wire = Vec::new();
    let mut kinds = Vec::new();
    for i in 0..n {
        if i % 7 == 3 {
            wire.extend(r.frame(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default()));
            kinds.push((ApiKey::ApiVersions, 3i16, -1i32));
        } else {
            let p = i % 4;
            let req = ProduceRequest::default()
                .with_acks(if i % 2 == 0 { -1 } else { 1 })
                .with_timeout_ms(10_000)
                .with_topic_data(vec![TopicProduceData::default()
                    .with_name(tn(&t))
                    .with_partition_data(vec![PartitionProduceData::default()
                        .with_index(p)
                        .with_records(Some(batch(&[format!("pipe-{i}").as_bytes()])))])]);
            wire.extend(r.frame(ApiKey::Produce, 9, &req));
            kinds.push((ApiKey::Produce, 9, p));
        }
    }
    // All requests leave in one write before any answer is read.
    r.send_bytes(&wire);
    let mut next_offset = [0i64; 4];
    for (i, (key, version, p)) in kinds.into_iter().enumerate() {
        let mut resp = r.read_frame().expect("response frame");
        let h = ResponseHeader::decode(&mut resp, key.response_header_version(version))
            .expect("header");
        assert_eq!(
            h.correlation_id,
            first_correlation + i as i32,
            "responses out of request order"
        );
        if key == ApiKey::Produce {
            let pr = ProduceResponse::decode(&mut resp, version).expect("produce response");
            let part = &pr.responses[0].partition_responses[0];
            assert_eq!(part.index, p);
            assert_eq!(part.error_code, NONE);
            assert_eq!(part.base_offset, next_offset[p as usize], "partition {p}");
            next_offset[p as usize] += 1;
        } else {
            let v = ApiVersionsResponse::decode(&mut resp, version).expect("api versions");
            assert_eq!(v.error_code, NONE);
        }
    }
}

/// Answers that are ready together go out in one write (see `server::write_responses`): the
/// answers to the requests before one that closes the connection are all written, in order,
/// an acks=0 produce among them answers nothing but is appended, and nothing after the closing
/// request is answered.
#[test]
fn pipelined_answers_before_a_closing_request_are_all_written_and_none_after_it() {
    let b = Broker::start();
    let t = topic_name("pipeclose");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 1);
    let mut wire = Vec::new();
    let mut answered = Vec::new();
    for i in 0..12 {
        if i == 4 {
            let req = ProduceRequest::default()
                .with_acks(0)
                .with_timeout_ms(10_000)
                .with_topic_data(vec![TopicProduceData::default()
                    .with_name(tn(&t))
                    .with_partition_data(vec![PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(batch(&[b"unanswered"])))])]);
            wire.extend(r.frame(ApiKey::Produce, 9, &req));
        } else if i == 8 {
            // [api key 9999][version 0][correlation][client id null]: closes the connection.
            r.correlation += 1;
            let mut body = Vec::new();
            body.extend(9999i16.to_be_bytes());
            body.extend(0i16.to_be_bytes());
            body.extend(r.correlation.to_be_bytes());
            body.extend((-1i16).to_be_bytes());
            wire.extend((body.len() as i32).to_be_bytes());
            wire.extend(body);
        } else {
            wire.extend(r.frame(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default()));
            if i < 8 {
                answered.push(r.correlation);
            }
        }
    }
    // All requests leave in one write, so their answers are ready together in the broker.
    r.send_bytes(&wire);
    for correlation in answered {
        let mut resp = r
            .read_frame()
            .expect("an answer before the closing request");
        let h = ResponseHeader::decode(&mut resp, 0).expect("header");
        assert_eq!(
            h.correlation_id, correlation,
            "answers out of request order"
        );
        let v = ApiVersionsResponse::decode(&mut resp, 3).expect("api versions");
        assert_eq!(v.error_code, NONE);
    }
    r.assert_closed("requests after the closing one");
    // The acks=0 record was appended before the connection closed: it holds offset 0.
    let mut r = Raw::connect(b.addr);
    assert_eq!(produce(&mut r, &t, 0, 1, batch(&[b"answered"])), (NONE, 1));
    assert_eq!(
        fetch(&mut r, &t, 0, 0).2,
        vec![(0, b"unanswered".to_vec()), (1, b"answered".to_vec())]
    );
    assert_serves(&b);
}

#[test]
fn fetch_past_the_log_end_is_offset_out_of_range() {
    let b = Broker::start();
    let t = topic_name("oor");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 1);
    assert_eq!(produce(&mut r, &t, 0, 1, batch(&[b"a", b"b"])), (NONE, 0));
    // At the log end is fine (nothing yet); past it is OFFSET_OUT_OF_RANGE.
    let (err, hw, recs) = fetch(&mut r, &t, 0, 2);
    assert_eq!((err, hw, recs.len()), (NONE, 2, 0));
    let (err, _, recs) = fetch(&mut r, &t, 0, 100);
    assert_eq!(err, OFFSET_OUT_OF_RANGE);
    assert!(recs.is_empty());
    let (err, _, _) = fetch(&mut r, &t, 0, -5);
    assert_eq!(err, OFFSET_OUT_OF_RANGE);
    // A fetch from the middle of a batch returns the batch; the client skips the earlier record.
    let (err, _, recs) = fetch(&mut r, &t, 0, 1);
    assert_eq!(err, NONE);
    assert!(recs.contains(&(1, b"b".to_vec())), "{recs:?}");
}

#[test]
fn produce_with_invalid_acks_or_partition_is_refused() {
    let b = Broker::start();
    let t = topic_name("badprod");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 1);
    let (err, _) = produce(&mut r, &t, 0, 2, batch(&[b"x"]));
    assert_eq!(err, INVALID_REQUIRED_ACKS);
    let (err, _) = produce(&mut r, &t, 5, -1, batch(&[b"x"]));
    assert_eq!(err, UNKNOWN_TOPIC_OR_PARTITION);
    let (err, _) = produce(&mut r, &t, -1, -1, batch(&[b"x"]));
    assert_eq!(err, UNKNOWN_TOPIC_OR_PARTITION);
    // Nothing was written by the refused requests.
    let (err, hw, _) = fetch(&mut r, &t, 0, 0);
    assert_eq!((err, hw), (NONE, 0));
    assert_serves(&b);
}

/// One produce request mixing partitions answered at once (an unknown partition, an unknown
/// topic) with partitions appended by their own tasks: every answer sits at its own place in
/// the response, in request order, with its own error and base offset.
#[test]
fn a_produce_mixing_refused_and_appended_partitions_answers_each_in_request_order() {
    let b = Broker::start();
    let (a, other, missing) = (
        topic_name("mixa"),
        topic_name("mixb"),
        topic_name("mixmissing"),
    );
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &a, 2);
    create_topic(&mut r, &other, 1);
    // Partition 1 of `a` already holds two records: its base offset differs from partition 0's.
    assert_eq!(produce(&mut r, &a, 1, -1, batch(&[b"p", b"q"])), (NONE, 0));
    let part = |index: i32| {
        PartitionProduceData::default()
            .with_index(index)
            .with_records(Some(batch(&[b"x"])))
    };
    let resp: ProduceResponse = r.call(
        ApiKey::Produce,
        9,
        &ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(10_000)
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(tn(&a))
                    .with_partition_data(vec![part(0), part(7), part(1)]),
                TopicProduceData::default()
                    .with_name(tn(&missing))
                    .with_partition_data(vec![part(0)]),
                TopicProduceData::default()
                    .with_name(tn(&other))
                    .with_partition_data(vec![part(0)]),
            ]),
    );
    // (topic, [(partition, error, base offset)]) per topic, in response order.
    type Answers = Vec<(String, Vec<(i32, i16, i64)>)>;
    let got: Answers = resp
        .responses
        .iter()
        .map(|t| {
            (
                t.name.to_string(),
                t.partition_responses
                    .iter()
                    .map(|p| (p.index, p.error_code, p.base_offset))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                a.clone(),
                vec![
                    (0, NONE, 0),
                    (7, UNKNOWN_TOPIC_OR_PARTITION, -1),
                    (1, NONE, 2)
                ]
            ),
            (missing, vec![(0, UNKNOWN_TOPIC_OR_PARTITION, -1)]),
            (other.clone(), vec![(0, NONE, 0)]),
        ]
    );
    // What was acknowledged is there, and only that.
    for (t, p, hw) in [(&a, 0, 1), (&a, 1, 3), (&other, 0, 1)] {
        let (err, got_hw, _) = fetch(&mut r, t, p, 0);
        assert_eq!((err, got_hw), (NONE, hw), "{t}-{p}");
    }
    assert_serves(&b);
}

#[test]
fn connections_past_connections_max_are_closed() {
    let b = Broker::options().args(["--connections-max", "2"]).start();
    // The start-up probe's connection may not be counted out yet: a connection refused for
    // that reason is retried until the broker has seen the probe close.
    let hold = || {
        let deadline = Instant::now() + IO_WAIT;
        loop {
            let mut r = Raw::connect(b.addr);
            let answer: Option<ApiVersionsResponse> =
                r.try_call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
            if let Some(v) = answer {
                assert_eq!(v.error_code, NONE);
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no room for a first two connections"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut held: Vec<Raw> = (0..2).map(|_| hold()).collect();
    let mut extra = Raw::connect(b.addr);
    let f = extra.frame(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
    extra.send_bytes(&f);
    extra.assert_closed("third connection with connections_max 2");
    // The held connections still work; once one closes, a new client gets in.
    for r in held.iter_mut() {
        let v: ApiVersionsResponse = r.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
        assert_eq!(v.error_code, NONE);
    }
    drop(held.pop());
    let deadline = Instant::now() + IO_WAIT;
    loop {
        if common::answers_api_versions(b.addr) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new connection accepted after one of the two closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Produces acks=all batches of 3 records round-robin over `partitions` until the broker stops
/// answering or `stop` is set; returns every acknowledged record as (partition, offset, value).
fn produce_until_stopped(
    addr: SocketAddr,
    topic: String,
    partitions: i32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<(i32, i64, Vec<u8>)> {
    let mut r = Raw::connect(addr);
    let mut acked = Vec::new();
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let p = (i % partitions as u64) as i32;
        let vals: Vec<Vec<u8>> = (0..3)
            .map(|j| format!("load-{i}-{j}-{}", "z".repeat(200)).into_bytes())
            .collect();
        let refs: Vec<&[u8]> = vals.iter().map(|v| v.as_slice()).collect();
        let req = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(10_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(tn(&topic))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(p)
                    .with_records(Some(batch(&refs)))])]);
        let Some(resp) = r.try_call::<_, ProduceResponse>(ApiKey::Produce, 9, &req) else {
            break;
        };
        let part = &resp.responses[0].partition_responses[0];
        if part.error_code != NONE {
            // Refused while shutting down: not acknowledged, not counted.
            break;
        }
        for (j, v) in vals.into_iter().enumerate() {
            acked.push((p, part.base_offset + j as i64, v));
        }
        i += 1;
    }
    acked
}

/// Every acknowledged record is at its offset, and the log has no holes below the high watermark.
fn assert_acked_present(b: &Broker, topic: &str, partitions: i32, acked: &[(i32, i64, Vec<u8>)]) {
    let mut r = Raw::connect(b.addr);
    for p in 0..partitions {
        let (hw, recs) = fetch_all(&mut r, topic, p);
        let offsets: Vec<i64> = recs.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets,
            (0..hw).collect::<Vec<_>>(),
            "partition {p}: offsets below the high watermark must be contiguous"
        );
        for (pp, o, v) in acked.iter().filter(|(pp, _, _)| *pp == p) {
            let got = recs.get(*o as usize).map(|(_, v)| v);
            assert!(
                got == Some(v),
                "partition {pp}: acknowledged record at offset {o} lost or changed (high watermark {hw})"
            );
        }
    }
}

/// A two-shard broker with a 4-partition topic, two acks=all writers for half a second, then
/// `stop` (SIGTERM or SIGKILL) while they write; returns what was acknowledged.
/// What a writer had acknowledged: (partition, offset, value).
type Acked = Vec<(i32, i64, Vec<u8>)>;

fn stop_under_load(prefix: &str, stop: impl FnOnce(&mut Broker)) -> (Broker, String, Acked) {
    let mut b = Broker::options().cores(2).start();
    let t = topic_name(prefix);
    create_topic(&mut Raw::connect(b.addr), &t, 4);
    let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let (addr, t, stopped) = (b.addr, t.clone(), stopped.clone());
            std::thread::spawn(move || produce_until_stopped(addr, t, 4, stopped))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    stop(&mut b);
    stopped.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writers
        .into_iter()
        .flat_map(|w| w.join().expect("writer thread"))
        .collect();
    (b, t, acked)
}

#[test]
fn sigterm_under_load_keeps_every_acknowledged_record() {
    let mut status = None;
    let (mut b, t, acked) = stop_under_load("termload", |b| status = Some(b.sigterm()));
    let status = status.expect("stopped");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM under load"
    );
    assert!(!acked.is_empty(), "nothing was acknowledged before SIGTERM");
    // Same-port restart with connections open at shutdown is covered by
    // `restart_on_the_same_port_right_after_sigterm_with_open_connections`.
    b.restart_on_new_port();
    assert_acked_present(&b, &t, 4, &acked);
}

#[test]
fn kill_9_under_load_keeps_every_acknowledged_record() {
    let (mut b, t, acked) = stop_under_load("killload", |b| b.sigkill());
    assert!(!acked.is_empty(), "nothing was acknowledged before kill -9");
    // Connections were open at the crash; restarting on the same port right away is the subject
    // of `restart_on_the_same_port_right_after_kill_9_with_open_connections`, not of this test.
    b.restart_on_new_port();
    assert_acked_present(&b, &t, 4, &acked);
    // And the log takes new writes after the recovered end.
    let mut r = Raw::connect(b.addr);
    let (hw, _) = fetch_all(&mut r, &t, 0);
    assert_eq!(produce(&mut r, &t, 0, -1, batch(&[b"after"])), (NONE, hw));
}

#[test]
fn kill_9_after_segment_rolls_recovers_every_segment() {
    // Test brokers use 8 MiB segments: 20 MiB in one partition spans three segments.
    let mut b = Broker::start();
    let t = topic_name("rolls");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 1);
    let big = vec![b'r'; 256 * 1024];
    let mut acked = Vec::new();
    for i in 0..80 {
        let mut v = big.clone();
        v[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let (err, off) = produce(&mut r, &t, 0, -1, batch(&[&v]));
        assert_eq!(err, NONE);
        assert_eq!(off, i);
        acked.push((0, off, v));
    }
    drop(r);
    b.sigkill();
    b.restart();
    assert_acked_present(&b, &t, 1, &acked);
}

#[test]
fn restart_with_a_different_core_count_keeps_data() {
    let mut b = Broker::options().cores(2).start();
    let t = topic_name("recore");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 4);
    let mut acked = Vec::new();
    for i in 0..20 {
        let p = i % 4;
        let v = format!("recore-{i}").into_bytes();
        let (err, off) = produce(&mut r, &t, p, -1, batch(&[&v]));
        assert_eq!(err, NONE);
        acked.push((p, off, v));
    }
    drop(r);
    assert_eq!(b.sigterm().code(), Some(0));
    b.options.cores = 1;
    b.restart();
    assert_acked_present(&b, &t, 4, &acked);
    let mut r = Raw::connect(b.addr);
    assert_eq!(produce(&mut r, &t, 3, -1, batch(&[b"one core"])), (NONE, 5));
}

#[test]
fn restart_on_the_same_port_right_after_kill_9_with_open_connections() {
    let mut b = Broker::options().cores(2).start();
    // Client connections open at the moment of the crash leave the broker's side of each
    // connection in FIN-WAIT/TIME-WAIT on the listen port. Like Kafka (SO_REUSEADDR), the broker
    // must be able to listen on that port again at once.
    let mut clients: Vec<Raw> = (0..3).map(|_| Raw::connect(b.addr)).collect();
    for c in clients.iter_mut() {
        let v: ApiVersionsResponse = c.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
        assert_eq!(v.error_code, NONE);
    }
    b.sigkill();
    drop(clients);
    // Let the connections finish closing, as they would before an operator restarts the broker.
    std::thread::sleep(Duration::from_millis(100));
    b.restart();
    assert_serves(&b);
}

#[test]
fn restart_on_the_same_port_right_after_sigterm_with_open_connections() {
    let mut b = Broker::options().cores(2).start();
    let mut clients: Vec<Raw> = (0..3).map(|_| Raw::connect(b.addr)).collect();
    for c in clients.iter_mut() {
        let v: ApiVersionsResponse = c.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
        assert_eq!(v.error_code, NONE);
    }
    // The broker closes these connections while it shuts down, so its side of each one lingers
    // in TIME-WAIT on the listen port.
    assert_eq!(b.sigterm().code(), Some(0));
    drop(clients);
    b.restart();
    assert_serves(&b);
}

/// Versions the broker advertises for `key`.
fn advertised(r: &mut Raw, key: ApiKey) -> std::ops::RangeInclusive<i16> {
    let v: ApiVersionsResponse = r.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
    let k = v
        .api_keys
        .iter()
        .find(|k| k.api_key == key as i16)
        .unwrap_or_else(|| panic!("{key:?} not advertised"));
    k.min_version..=k.max_version
}

#[test]
fn every_advertised_version_of_the_core_apis_round_trips() {
    // A client may pick any advertised version: each must decode with the reference codecs.
    let b = Broker::options().cores(2).start();
    let t = topic_name("versions");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 2);

    for v in advertised(&mut r, ApiKey::ApiVersions) {
        let resp: ApiVersionsResponse =
            r.call(ApiKey::ApiVersions, v, &ApiVersionsRequest::default());
        assert_eq!(resp.error_code, NONE, "ApiVersions v{v}");
    }

    let mut topic_id = None;
    for v in advertised(&mut r, ApiKey::Metadata) {
        let topics = if v == 0 {
            Some(vec![MetadataRequestTopic::default().with_name(Some(tn(&t)))])
        } else {
            None
        };
        let resp: MetadataResponse = r.call(
            ApiKey::Metadata,
            v,
            // allow_auto_topic_creation exists from v4 (always true before).
            &MetadataRequest::default()
                .with_topics(topics)
                .with_allow_auto_topic_creation(v < 4),
        );
        let mt = resp
            .topics
            .iter()
            .find(|x| x.name.as_ref().map(|n| n.as_str()) == Some(t.as_str()))
            .unwrap_or_else(|| panic!("Metadata v{v} lacks the topic"));
        assert_eq!(mt.error_code, NONE, "Metadata v{v}");
        assert_eq!(mt.partitions.len(), 2, "Metadata v{v}");
        if v >= 10 {
            assert!(!mt.topic_id.is_nil(), "Metadata v{v}: topic id");
            topic_id = Some(mt.topic_id);
        }
    }

    let mut expected = 0i64;
    for v in advertised(&mut r, ApiKey::Produce) {
        let resp: ProduceResponse = r.call(
            ApiKey::Produce,
            v,
            &ProduceRequest::default()
                .with_acks(-1)
                .with_timeout_ms(10_000)
                .with_topic_data(vec![TopicProduceData::default()
                    .with_name(tn(&t))
                    .with_partition_data(vec![PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(batch(&[format!("v{v}").as_bytes()])))])]),
        );
        let p = &resp.responses[0].partition_responses[0];
        assert_eq!(
            (p.error_code, p.base_offset),
            (NONE, expected),
            "Produce v{v}"
        );
        expected += 1;
    }

    for v in advertised(&mut r, ApiKey::ListOffsets) {
        use kafka_protocol::messages::list_offsets_request::{
            ListOffsetsPartition, ListOffsetsTopic,
        };
        let resp: ListOffsetsResponse = r.call(
            ApiKey::ListOffsets,
            v,
            &ListOffsetsRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_topics(vec![ListOffsetsTopic::default()
                    .with_name(tn(&t))
                    .with_partitions(vec![ListOffsetsPartition::default()
                        .with_partition_index(0)
                        .with_current_leader_epoch(-1)
                        .with_timestamp(-1)])]),
        );
        let p = &resp.topics[0].partitions[0];
        assert_eq!(
            (p.error_code, p.offset),
            (NONE, expected),
            "ListOffsets v{v}"
        );
    }

    for v in advertised(&mut r, ApiKey::Fetch) {
        let mut ft = FetchTopic::default().with_partitions(vec![FetchPartition::default()
            .with_partition(0)
            .with_current_leader_epoch(-1)
            .with_fetch_offset(0)
            .with_log_start_offset(-1)
            .with_last_fetched_epoch(-1)
            .with_partition_max_bytes(1 << 20)]);
        ft = if v >= 13 {
            ft.with_topic_id(topic_id.expect("topic id from Metadata v10+"))
        } else {
            ft.with_topic(tn(&t))
        };
        let resp: FetchResponse = r.call(
            ApiKey::Fetch,
            v,
            &FetchRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_max_wait_ms(0)
                .with_min_bytes(0)
                .with_max_bytes(16 << 20)
                .with_session_id(0)
                .with_session_epoch(-1)
                .with_topics(vec![ft]),
        );
        assert_eq!(resp.error_code, NONE, "Fetch v{v}");
        let p = &resp.responses[0].partitions[0];
        assert_eq!(
            (p.error_code, p.high_watermark),
            (NONE, expected),
            "Fetch v{v}"
        );
        let mut recs = p.records.clone().unwrap_or_default();
        let sets = RecordBatchDecoder::decode_all(&mut recs).expect("records");
        let n: usize = sets.iter().map(|s| s.records.len()).sum();
        assert_eq!(n as i64, expected, "Fetch v{v} record count");
    }
}

#[test]
fn parked_fetch_returns_records_that_arrive_while_it_waits() {
    let b = Broker::options().cores(2).start();
    let t = topic_name("park");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 2);
    // A fetch at the log end of both partitions that may wait up to 5 s for one byte.
    let req = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(5_000)
        .with_min_bytes(1)
        .with_max_bytes(1 << 20)
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(tn(&t))
            .with_partitions(
                (0..2)
                    .map(|p| {
                        FetchPartition::default()
                            .with_partition(p)
                            .with_current_leader_epoch(-1)
                            .with_fetch_offset(0)
                            .with_log_start_offset(-1)
                            .with_last_fetched_epoch(-1)
                            .with_partition_max_bytes(1 << 20)
                    })
                    .collect(),
            )]);
    let f = r.frame(ApiKey::Fetch, 12, &req);
    r.send_bytes(&f);
    // Meanwhile another client writes to partition 1.
    std::thread::sleep(Duration::from_millis(200));
    let mut w = Raw::connect(b.addr);
    assert_eq!(produce(&mut w, &t, 1, 1, batch(&[b"arrived"])), (NONE, 0));
    let mut resp = r.read_frame().expect("fetch response");
    let _ = ResponseHeader::decode(&mut resp, ApiKey::Fetch.response_header_version(12))
        .expect("header");
    let resp = FetchResponse::decode(&mut resp, 12).expect("fetch body");
    let p1 = resp.responses[0]
        .partitions
        .iter()
        .find(|p| p.partition_index == 1)
        .expect("partition 1 in the answer");
    assert_eq!(p1.error_code, NONE);
    let mut recs = p1.records.clone().unwrap_or_default();
    let sets = RecordBatchDecoder::decode_all(&mut recs).expect("records");
    let values: Vec<Vec<u8>> = sets
        .iter()
        .flat_map(|s| s.records.iter())
        .map(|rec| rec.value.clone().unwrap_or_default().to_vec())
        .collect();
    assert_eq!(values, vec![b"arrived".to_vec()]);
}

#[test]
fn metadata_auto_creates_only_when_asked() {
    let b = Broker::options()
        .args(["--default-partitions", "3"])
        .start();
    let mut r = Raw::connect(b.addr);
    let md = |r: &mut Raw, name: &str, allow: bool| -> MetadataResponse {
        r.call(
            ApiKey::Metadata,
            9,
            &MetadataRequest::default()
                .with_topics(Some(vec![
                    MetadataRequestTopic::default().with_name(Some(tn(name)))
                ]))
                .with_allow_auto_topic_creation(allow),
        )
    };
    let t = topic_name("noauto");
    assert_eq!(
        md(&mut r, &t, false).topics[0].error_code,
        UNKNOWN_TOPIC_OR_PARTITION
    );
    // Still unknown: the refused lookup created nothing.
    assert_eq!(
        md(&mut r, &t, false).topics[0].error_code,
        UNKNOWN_TOPIC_OR_PARTITION
    );
    // Allowed: created with --default-partitions (Kafka may answer LEADER_NOT_AVAILABLE first).
    let deadline = Instant::now() + IO_WAIT;
    loop {
        let m = md(&mut r, &t, true);
        if m.topics[0].error_code == NONE {
            assert_eq!(m.topics[0].partitions.len(), 3);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "auto-created topic never appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn create_topics_validates_names_configs_and_validate_only() {
    const INVALID_CONFIG: i16 = 40;
    const TOPIC_ALREADY_EXISTS: i16 = 36;
    const INVALID_PARTITIONS: i16 = 37;
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    let create = |r: &mut Raw, name: &str, parts: i32, cfg: Option<(&str, &str)>, only: bool| {
        use kafka_protocol::messages::create_topics_request::CreatableTopicConfig;
        let configs = cfg
            .map(|(k, v)| {
                vec![CreatableTopicConfig::default()
                    .with_name(StrBytes::from_string(k.to_string()))
                    .with_value(Some(StrBytes::from_string(v.to_string())))]
            })
            .unwrap_or_default();
        let resp: CreateTopicsResponse = r.call(
            ApiKey::CreateTopics,
            5,
            &CreateTopicsRequest::default()
                .with_topics(vec![CreatableTopic::default()
                    .with_name(tn(name))
                    .with_num_partitions(parts)
                    .with_replication_factor(1)
                    .with_configs(configs)])
                .with_timeout_ms(10_000)
                .with_validate_only(only),
        );
        resp.topics[0].error_code
    };
    let long = "x".repeat(250);
    for bad in ["", ".", "..", "has space", "slash/name", long.as_str()] {
        assert_eq!(
            create(&mut r, bad, 1, None, false),
            INVALID_TOPIC_EXCEPTION,
            "topic name {bad:?}"
        );
    }
    let t = topic_name("valid");
    assert_eq!(
        create(&mut r, &t, 1, Some(("no.such.config", "1")), false),
        INVALID_CONFIG
    );
    assert_eq!(
        create(&mut r, &t, 1, Some(("retention.ms", "soon")), false),
        INVALID_CONFIG
    );
    assert_eq!(create(&mut r, &t, 0, None, false), INVALID_PARTITIONS);
    // validate_only answers as if created, but creates nothing.
    assert_eq!(create(&mut r, &t, 2, None, true), NONE);
    assert_eq!(create(&mut r, &t, 2, None, false), NONE);
    assert_eq!(create(&mut r, &t, 2, None, false), TOPIC_ALREADY_EXISTS);
}

const KAFKA_STORAGE_ERROR: i16 = 56;

/// A small ext4 file system on a loop device, for running out of disk space. Needs root (or
/// CAP_SYS_ADMIN) and loop devices; unmounted when dropped.
struct LoopFs {
    _dir: tempfile::TempDir,
    mnt: std::path::PathBuf,
}

impl LoopFs {
    fn new(mib: u64) -> LoopFs {
        let dir = tempfile::Builder::new()
            .prefix("sluice-loopfs-")
            .tempdir()
            .expect("temp dir");
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(mib << 20))
            .expect("image file");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mount point");
        let run = |cmd: &mut Command| {
            let out = run_bounded(std::mem::replace(cmd, Command::new("true")), None, IO_WAIT);
            assert!(
                out.status.success(),
                "{cmd:?} failed: {} (this test needs root and loop devices)",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&img));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        LoopFs { _dir: dir, mnt }
    }

    fn avail_bytes(&self) -> u64 {
        let out = run_bounded(
            {
                let mut c = Command::new("df");
                c.args(["--output=avail", "-B1"]).arg(&self.mnt);
                c
            },
            None,
            IO_WAIT,
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df output")
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let mut c = Command::new("umount");
        c.arg("-l").arg(&self.mnt);
        let _ = run_bounded(c, None, IO_WAIT);
    }
}

#[test]
fn full_disk_fails_produce_with_storage_error_keeps_reads_and_resumes() {
    // tests/run.sh sets SLUICE_LOOP_TESTS where root and loop devices are available (and says in
    // its summary whether this test ran); there a failure to mount fails the test.
    if std::env::var_os("SLUICE_LOOP_TESTS").is_none() {
        eprintln!("not run: set SLUICE_LOOP_TESTS=1 (needs root and loop devices)");
        return;
    }
    let fs = LoopFs::new(192);
    let mut b = Broker::options()
        .segment_bytes(Some(16 << 20))
        .data_dir(fs.mnt.join("data"))
        .start();
    let t = topic_name("full");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 1);
    // Leave about 40 MiB free: the partition's pre-allocated extents (1, 2, 4, 8, 16 MiB, then a
    // new segment) soon need more.
    let filler = fs.mnt.join("filler");
    let keep = 40u64 << 20;
    let fill = fs.avail_bytes().saturating_sub(keep);
    let mut c = Command::new("fallocate");
    c.args(["-l", &fill.to_string()]).arg(&filler);
    assert!(run_bounded(c, None, IO_WAIT).status.success());

    let value = |i: usize| -> Vec<u8> {
        let mut v = vec![(i % 251) as u8; 256 << 10];
        v[..8].copy_from_slice(&(i as u64).to_be_bytes());
        v
    };
    let mut acked: Vec<(i64, Vec<u8>)> = Vec::new();
    let mut last_err = NONE;
    for i in 0..400 {
        let v = value(i);
        let (err, base) = produce(&mut r, &t, 0, -1, batch(&[&v]));
        if err != NONE {
            last_err = err;
            break;
        }
        assert_eq!(base, acked.len() as i64, "offsets stay dense");
        acked.push((base, v));
    }
    assert_eq!(
        last_err, KAFKA_STORAGE_ERROR,
        "a full disk is KAFKA_STORAGE_ERROR"
    );
    assert!(acked.len() >= 40, "{} batches acknowledged", acked.len());
    // Still full: the next produce fails the same way, on the same connection.
    let (err, _) = produce(&mut r, &t, 0, 1, batch(&[&value(999)]));
    assert_eq!(err, KAFKA_STORAGE_ERROR);
    // The partition stays readable, with exactly what was acknowledged.
    let (hw, recs) = fetch_all(&mut r, &t, 0);
    assert_eq!(hw, acked.len() as i64);
    assert!(
        recs == acked,
        "reads after the full disk differ from what was acknowledged"
    );
    assert_serves(&b);

    // Space returns: appends resume right after the last acknowledged record.
    std::fs::remove_file(&filler).expect("remove filler");
    let v = value(1000);
    let deadline = Instant::now() + IO_WAIT;
    let base = loop {
        let (err, base) = produce(&mut r, &t, 0, -1, batch(&[&v]));
        if err == NONE {
            break base;
        }
        assert_eq!(err, KAFKA_STORAGE_ERROR);
        assert!(Instant::now() < deadline, "appends did not resume");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(base, acked.len() as i64, "no hole and no reused offset");
    acked.push((base, v));

    // And everything acknowledged survives kill -9.
    drop(r);
    b.sigkill();
    b.restart();
    let mut r = Raw::connect(b.addr);
    let (hw, recs) = fetch_all(&mut r, &t, 0);
    assert_eq!(hw, acked.len() as i64);
    assert!(
        recs == acked,
        "records after restart differ from what was acknowledged"
    );
    drop(r);
    b.sigterm();
}

#[test]
fn many_partitions_work_when_started_with_a_low_soft_open_file_limit() {
    // 300 partitions past a soft limit of 256: the broker raises its soft limit to the hard one
    // at start-up (its shard's segment-descriptor pool is sized from the raised limit).
    let b = Broker::options().fd_soft_limit(256).start();
    assert!(
        b.stderr().contains("raised the open-file limit"),
        "{}",
        b.stderr()
    );
    let t = topic_name("fds");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 300);
    for p in 0..300 {
        let v = format!("fd-{p}");
        assert_eq!(
            produce(&mut r, &t, p, -1, batch(&[v.as_bytes()])),
            (NONE, 0),
            "partition {p}"
        );
    }
    for p in [0, 150, 299] {
        let (hw, recs) = fetch_all(&mut r, &t, p);
        assert_eq!((hw, recs), (1, vec![(0, format!("fd-{p}").into_bytes())]));
    }
    assert_serves(&b);
}

#[test]
fn more_partitions_than_the_hard_open_file_limit_produce_restart_and_read_back() {
    // 2,000 partitions under a hard limit of 512 descriptors: a shard keeps at most half of
    // it open (its segment pool) and reopens the rest on use, so no operation meets EMFILE.
    const PARTITIONS: i32 = 2000;
    let mut b = Broker::options().fd_hard_limit(512).start();
    let t = topic_name("fdpool");
    // Through the CLI: its request waits longer than a raw client's read deadline.
    b.create_topic(&t, PARTITIONS);
    let mut r = Raw::connect(b.addr);
    for p in 0..PARTITIONS {
        let v = format!("fd-{p}");
        assert_eq!(
            produce(&mut r, &t, p, -1, batch(&[v.as_bytes()])),
            (NONE, 0),
            "partition {p}"
        );
    }
    // Reads of every partition, cold ones included, while all are open in turn.
    for p in (0..PARTITIONS).step_by(7) {
        let (hw, recs) = fetch_all(&mut r, &t, p);
        assert_eq!((hw, recs), (1, vec![(0, format!("fd-{p}").into_bytes())]));
    }
    drop(r);
    let first = b.stderr();
    assert!(b.sigterm().success(), "{first}");
    assert!(!first.contains("Too many open files"), "{first}");
    b.restart();
    let mut r = Raw::connect(b.addr);
    for p in 0..PARTITIONS {
        let v = format!("again-{p}");
        assert_eq!(
            produce(&mut r, &t, p, -1, batch(&[v.as_bytes()])),
            (NONE, 1),
            "partition {p}"
        );
    }
    for p in 0..PARTITIONS {
        let (hw, recs) = fetch_all(&mut r, &t, p);
        assert_eq!(
            (hw, recs),
            (
                2,
                vec![
                    (0, format!("fd-{p}").into_bytes()),
                    (1, format!("again-{p}").into_bytes())
                ]
            ),
            "partition {p}"
        );
    }
    drop(r);
    let second = b.stderr();
    assert!(b.sigterm().success(), "{second}");
    assert!(!second.contains("Too many open files"), "{second}");
}

// A clean shutdown of many partitions writes one clean-shutdown record and no per-partition
// file; the restart opens every partition from it without a recovery scan. A SIGKILL while the
// broker shuts down loses nothing acknowledged: the next start recovers what no record covers.
#[test]
fn many_partitions_restart_from_the_shutdown_record_and_survive_a_kill_during_shutdown() {
    const PARTITIONS: i32 = 300;
    let mut b = Broker::start();
    let t = topic_name("shutrec");
    b.create_topic(&t, PARTITIONS);
    let produce_all = |b: &Broker, prefix: &str, offset: i64| {
        let mut r = Raw::connect(b.addr);
        for p in 0..PARTITIONS {
            let v = format!("{prefix}-{p}");
            assert_eq!(
                produce(&mut r, &t, p, -1, batch(&[v.as_bytes()])),
                (NONE, offset),
                "partition {p}"
            );
        }
    };
    let check_all = |b: &Broker, prefixes: &[&str]| {
        let mut r = Raw::connect(b.addr);
        for p in 0..PARTITIONS {
            let want: Vec<(i64, Vec<u8>)> = prefixes
                .iter()
                .enumerate()
                .map(|(i, x)| (i as i64, format!("{x}-{p}").into_bytes()))
                .collect();
            assert_eq!(
                fetch_all(&mut r, &t, p),
                (prefixes.len() as i64, want),
                "partition {p}"
            );
        }
    };
    produce_all(&b, "a", 0);
    assert!(b.sigterm().success(), "{}", b.stderr());
    // The number in `{before}N{after}` on a line of the broker's log.
    let logged = |log: &str, before: &str, after: &str| -> Option<i32> {
        let rest = &log[log.find(before)? + before.len()..];
        rest[..rest.find(after)?].parse().ok()
    };
    let log = b.stderr();
    // The topic's partitions and the internal topics'.
    let written = logged(&log, "clean-shutdown record written: ", " logs");
    assert!(written.is_some_and(|n| n >= PARTITIONS), "{log}");
    let data = b.data_dir();
    for p in 0..PARTITIONS {
        let d = data.join(format!("{t}-{p}"));
        assert!(!d.join(".clean-shutdown").exists(), "{}", d.display());
        assert!(
            !d.join("producer-state.snapshot").exists(),
            "{}",
            d.display()
        );
    }

    b.restart();
    let log = b.stderr();
    assert_eq!(
        logged(&log, "clean-shutdown records read: ", " logs covered"),
        written,
        "{log}"
    );
    assert!(!log.contains("recovered without clean shutdown"), "{log}");
    check_all(&b, &["a"]);
    produce_all(&b, "b", 1);

    // SIGKILL as soon as the shutdown begins: wherever it lands, nothing acknowledged is lost.
    b.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !b.stderr().contains("shutting down") {
        assert!(Instant::now() < deadline, "{}", b.stderr());
        std::thread::sleep(Duration::from_millis(1));
    }
    b.sigkill();
    b.restart();
    check_all(&b, &["a", "b"]);
    produce_all(&b, "c", 2);
    check_all(&b, &["a", "b", "c"]);
    assert!(b.sigterm().success(), "{}", b.stderr());
}

/// A RecordBatch v2 of one record (offset delta 0) whose records section is `records` as given,
/// with codec `attributes` and timestamp `ts`; the CRC-32C is valid.
fn raw_batch(attributes: i16, ts: i64, records: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(61 + records.len());
    b.extend_from_slice(&0i64.to_be_bytes());
    b.extend_from_slice(&((49 + records.len()) as i32).to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.push(2);
    b.extend_from_slice(&[0; 4]); // CRC, below
    b.extend_from_slice(&attributes.to_be_bytes());
    b.extend_from_slice(&0i32.to_be_bytes()); // last offset delta
    b.extend_from_slice(&ts.to_be_bytes());
    b.extend_from_slice(&ts.to_be_bytes());
    b.extend_from_slice(&(-1i64).to_be_bytes());
    b.extend_from_slice(&(-1i16).to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.extend_from_slice(&1i32.to_be_bytes()); // record count
    b.extend_from_slice(records);
    let crc = crc32c::crc32c(&b[21..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    Bytes::from(b)
}

/// A zstd frame of `blocks` RLE blocks of 128 KiB each: 4 bytes per block on the wire, so 32 KiB
/// expand to 1 GiB. (RFC 8878: frame header with a 128 KiB window; block header = last flag,
/// type 1 = RLE, size; then the repeated byte.)
fn zstd_rle_bomb(blocks: usize) -> Vec<u8> {
    let mut f = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, (17 - 10) << 3];
    for i in 0..blocks {
        let last = (i + 1 == blocks) as u32;
        let h = last | (1 << 1) | ((128 << 10) << 3);
        f.extend_from_slice(&h.to_le_bytes()[..3]);
        f.push(0);
    }
    f
}

fn peak_rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn list_offsets_on_a_decompression_bomb_stays_bounded_and_answers_the_batch() {
    let b = Broker::start();
    let t = topic_name("bomb");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 1);
    let ts = 1_700_000_000_000i64;
    // 1 GiB of zstd output and a raw snappy block declaring 4 GiB, each in a small batch. The
    // broker stores them verbatim (it never decompresses on produce).
    let bomb = zstd_rle_bomb(8192);
    assert!(bomb.len() < 64 << 10);
    assert_eq!(
        produce(&mut r, &t, 0, -1, raw_batch(4, ts, &bomb)),
        (NONE, 0)
    );
    let snappy = [0xff, 0xff, 0xff, 0xff, 0x0f, 0x00];
    assert_eq!(
        produce(&mut r, &t, 0, -1, raw_batch(2, ts + 10, &snappy)),
        (NONE, 1)
    );
    let pid = b.pid().expect("broker pid");
    let before = peak_rss_kib(pid);
    // ListOffsets by timestamp looks inside the batch the time index finds. It cannot decode
    // these, so it answers with the batch itself (offset and max timestamp).
    assert_eq!(list_offset(&mut r, &t, 0, ts), (NONE, 0, ts));
    assert_eq!(list_offset(&mut r, &t, 0, ts + 5), (NONE, 1, ts + 10));
    assert_eq!(list_offset(&mut r, &t, 0, -3), (NONE, 1, ts + 10));
    let grown_mib = (peak_rss_kib(pid) - before) / 1024;
    assert!(
        grown_mib < 256,
        "peak RSS grew by {grown_mib} MiB decoding a 1 GiB bomb"
    );
    assert_serves(&b);
}

#[test]
fn hostile_lengths_in_data_files_at_start_up_are_cut_or_ignored_and_the_broker_serves() {
    let mut b = Broker::start();
    let t = topic_name("files");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 1);
    let mut acked = vec![];
    let mut end = 0usize;
    for i in 0..5 {
        let v = format!("files-{i}");
        let records = batch(&[v.as_bytes()]);
        end += records.len();
        assert_eq!(produce(&mut r, &t, 0, -1, records), (NONE, i));
        acked.push((i, v.into_bytes()));
    }
    drop(r);
    b.sigkill(); // no clean-shutdown marker: the active segment is scanned at start-up
    let data = b.data_dir();
    let part = data.join(format!("{t}-0"));
    let huge_batch = |at: u64| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(part.join(format!("{:020}.log", 0)))
            .unwrap();
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(at)).unwrap();
        let mut h = 5i64.to_be_bytes().to_vec();
        h.extend_from_slice(&i32::MAX.to_be_bytes());
        h.extend_from_slice(&[0xab; 49]);
        f.write_all(&h).unwrap();
    };
    // A batch after the acknowledged ones declaring 2^31-1 bytes; index files and a producer
    // snapshot full of 0xff (counts of 2^32-1); a metadata log record declaring 4 GiB.
    huge_batch(end as u64);
    for name in [
        format!("{:020}.index", 0),
        format!("{:020}.timeindex", 0),
        "producer-state.snapshot".to_string(),
    ] {
        std::fs::write(part.join(name), [0xff; 64]).unwrap();
    }
    let mut meta = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("__meta/metadata.log"))
        .unwrap();
    meta.write_all(&[0xff; 40]).unwrap();
    drop(meta);
    // Clean-shutdown records: garbage, and the right magic followed by an entry declaring
    // 4 GiB. Neither covers any log.
    std::fs::write(data.join("clean-shutdown.0.0"), [0xff; 64]).unwrap();
    let mut rec = b"SLCSR\0\0\x01".to_vec();
    rec.extend_from_slice(&[0xff; 64]);
    std::fs::write(data.join("clean-shutdown.0.1"), rec).unwrap();

    b.restart();
    let mut r = Raw::connect(b.addr);
    let (hw, recs) = fetch_all(&mut r, &t, 0);
    assert_eq!(hw, 5);
    assert_eq!(recs, acked);
    assert_eq!(produce(&mut r, &t, 0, -1, batch(&[b"after"])), (NONE, 5));
    assert_serves(&b);
    assert!(b
        .stderr()
        .contains("clean-shutdown records read: 0 logs covered"));
    assert!(!data.join("clean-shutdown.0.0").exists());
}

// Kafka's LogValidator: "Inconsistent batch offset range ... and count of records".
const INVALID_RECORD: i16 = 87;

#[test]
fn produced_batch_whose_offset_span_disagrees_with_its_record_count_is_invalid_record() {
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    let topic = topic_name("span");
    create_topic(&mut r, &topic, 1);
    assert_eq!(
        produce(&mut r, &topic, 0, -1, batch(&[b"first"])),
        (NONE, 0)
    );
    // One record whose lastOffsetDelta claims 2^31 - 1 more: accepted, it would move the log end
    // by two billion offsets.
    let mut bad = BytesMut::from(&batch(&[b"liar"])[..]);
    bad[23..27].copy_from_slice(&i32::MAX.to_be_bytes());
    let crc = crc32c::crc32c(&bad[21..]);
    bad[17..21].copy_from_slice(&crc.to_be_bytes());
    let (error, _) = produce(&mut r, &topic, 0, -1, bad.freeze());
    assert_eq!(error, INVALID_RECORD);
    assert_eq!(produce(&mut r, &topic, 0, -1, batch(&[b"next"])), (NONE, 1));
    let (error, hw, records) = fetch(&mut r, &topic, 0, 0);
    assert_eq!((error, hw), (NONE, 2));
    assert_eq!(records, vec![(0, b"first".to_vec()), (1, b"next".to_vec())]);
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("process stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

#[test]
fn fetch_waiting_for_more_than_min_bytes_sleeps_instead_of_spinning() {
    // Kafka protocol guide, Fetch min_bytes: with less data than min_bytes the broker waits up
    // to max_wait_ms for more. Data already present below min_bytes must not wake the waiter.
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    let topic = topic_name("minbytes");
    create_topic(&mut r, &topic, 1);
    assert_eq!(produce(&mut r, &topic, 0, -1, batch(&[b"only"])), (NONE, 0));
    let pid = b.pid().expect("broker running");
    let cpu_before = cpu_time(pid);
    let started = Instant::now();
    let max_wait = Duration::from_millis(3000);
    let resp: FetchResponse = r.call(
        ApiKey::Fetch,
        12,
        &FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(max_wait.as_millis() as i32)
            .with_min_bytes(1 << 20)
            .with_max_bytes(16 << 20)
            .with_session_epoch(-1)
            .with_topics(vec![FetchTopic::default()
                .with_topic(tn(&topic))
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(0)
                    .with_current_leader_epoch(-1)
                    .with_fetch_offset(0)
                    .with_log_start_offset(-1)
                    .with_last_fetched_epoch(-1)
                    .with_partition_max_bytes(8 << 20)])]),
    );
    let waited = started.elapsed();
    let cpu = cpu_time(pid) - cpu_before;
    let p = &resp.responses[0].partitions[0];
    assert_eq!(p.error_code, NONE);
    assert!(p.records.as_ref().is_some_and(|r| !r.is_empty()));
    assert!(
        waited >= max_wait - Duration::from_millis(100),
        "answered after {waited:?}, before max_wait_ms"
    );
    // Spinning re-reads for the whole wait, costing about one core for max_wait; sleeping costs
    // next to nothing.
    assert!(
        cpu < max_wait / 3,
        "the broker used {cpu:?} of CPU while one fetch waited {waited:?}"
    );
}

/// Fetches `(partition, offset)` pairs of `topic` in one request limited to `max_bytes` (no
/// waiting); per partition: (error, high watermark, offsets of the records returned).
fn fetch_many(
    r: &mut Raw,
    topic: &str,
    parts: &[(i32, i64)],
    max_bytes: i32,
) -> Vec<(i16, i64, Vec<i64>)> {
    let parts: Vec<_> = parts.iter().map(|&(p, o)| (p, o, 1 << 20)).collect();
    let resp: FetchResponse = r.call(ApiKey::Fetch, 12, &fetch_request(topic, &parts, max_bytes));
    assert_eq!(resp.error_code, NONE);
    resp.responses[0]
        .partitions
        .iter()
        .map(|p| {
            let mut offsets = vec![];
            if let Some(mut recs) = p.records.clone() {
                for set in RecordBatchDecoder::decode_all(&mut recs).expect("decode batches") {
                    offsets.extend(set.records.iter().map(|rec| rec.offset));
                }
            }
            (p.error_code, p.high_watermark, offsets)
        })
        .collect()
}

#[test]
fn a_large_response_leaves_a_small_tail_of_its_budget_unread() {
    let mut b = Broker::start();
    let t = topic_name("tail");
    let mut r = Raw::connect(b.addr);
    create_topic(&mut r, &t, 2);
    // Partition 0: 40 batches of one 16,000-byte record; partition 1: one small batch.
    let big = vec![b'x'; 16_000];
    for i in 0..40 {
        assert_eq!(produce(&mut r, &t, 0, 1, batch(&[&big])), (NONE, i));
    }
    assert_eq!(produce(&mut r, &t, 1, 1, batch(&[b"a", b"b"])), (NONE, 0));
    // Cold: read from the disk after a restart, as a catching-up consumer does.
    assert_eq!(b.sigterm().code(), Some(0));
    b.restart();
    let mut r = Raw::connect(b.addr);

    // 400,000 bytes: partition 0 fills all but less than one of its batches (24 batches), so
    // what is left (< 64 KiB) is not read for partition 1, whose offsets are still reported.
    let got = fetch_many(&mut r, &t, &[(0, 0), (1, 0)], 400_000);
    assert_eq!(got[0].0, NONE);
    assert_eq!(got[0].1, 40);
    assert_eq!(got[0].2, (0..24).collect::<Vec<i64>>());
    assert_eq!(got[1], (NONE, 2, vec![]));
    // A bad offset there is still OFFSET_OUT_OF_RANGE.
    let got = fetch_many(&mut r, &t, &[(0, 0), (1, 100)], 400_000);
    assert_eq!(got[0].2.len(), 24);
    assert_eq!(got[1].0, OFFSET_OUT_OF_RANGE);
    // The next fetch reads on where each partition stopped: everything else, in one response.
    let got = fetch_many(&mut r, &t, &[(0, 24), (1, 0)], 16 << 20);
    assert_eq!(got[0].2, (24..40).collect::<Vec<i64>>());
    assert_eq!(got[1], (NONE, 2, vec![0, 1]));
    // A small response reads every partition its budget reaches, as before (here partition 1
    // listed twice: its batch fits twice in 1,000 bytes).
    let got = fetch_many(&mut r, &t, &[(1, 0), (1, 0)], 1_000);
    assert_eq!(got[0], (NONE, 2, vec![0, 1]));
    assert_eq!(got[1], (NONE, 2, vec![0, 1]));
}
