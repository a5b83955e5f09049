//! Declared lengths planted in every request the broker advertises: for each API key and version,
//! the default request (encoded with kafka-protocol) gets a huge array count, compact-array or
//! compact-string length, string length or bytes length written over each of its first body
//! positions, in the request-header form that version uses and in the other form, whole and cut
//! off right after the planted value. Also huge client-id lengths and tagged-field counts in the
//! header itself. The broker must refuse each without allocating what the frame claims: it stays
//! up, its peak memory barely moves, and a real client works afterwards.
//!
//! Kafka protocol guide, "Protocol Primitive Types": ARRAY counts are INT32, COMPACT_ARRAY and
//! COMPACT_STRING lengths are UNSIGNED_VARINT (N+1), STRING lengths INT16, BYTES lengths INT32.

mod common;
mod hostile;

use std::collections::HashSet;
use std::time::Instant;

use common::{topic_name, Broker};
use hostile::*;

/// Body positions at which a length is planted: the early fields of every request, where its
/// top-level counts and strings sit.
const PLANT_POSITIONS_MAX: usize = 24;

/// The declared lengths planted, as they appear on the wire.
const PLANTS: &[(&str, &[u8])] = &[
    ("i32 count 0x7fffffff", &[0x7f, 0xff, 0xff, 0xff]),
    ("i32 count -2", &[0xff, 0xff, 0xff, 0xfe]),
    ("uvarint 0xffffffff", &[0xff, 0xff, 0xff, 0xff, 0x0f]),
    ("uvarint 0x7fffffff", &[0xff, 0xff, 0xff, 0xff, 0x07]),
    ("i16 string 0x7fff", &[0x7f, 0xff]),
];

/// Client-id lengths planted in the header (INT16; -1 is null, anything else below 0 invalid).
const CLIENT_ID_LENGTHS: &[i16] = &[i16::MAX, 0x7ffe, -2, i16::MIN];

/// Sender threads (connections open at once).
const PROBE_THREADS: usize = 4;

/// `body` with `plant` written at `at` (extending the body when it runs past the end), and
/// optionally cut right after it.
fn planted(body: &[u8], at: usize, plant: &[u8], truncate: bool) -> Vec<u8> {
    let mut b = body.to_vec();
    if b.len() < at + plant.len() {
        b.resize(at + plant.len(), 0);
    }
    b[at..at + plant.len()].copy_from_slice(plant);
    if truncate {
        b.truncate(at + plant.len());
    }
    b
}

/// Header bytes up to and including the client-id length field, with `len` planted there.
fn header_with_client_id_len(key: i16, version: i16, correlation_id: i32, len: i16) -> Vec<u8> {
    let mut h = Vec::with_capacity(10);
    h.extend(key.to_be_bytes());
    h.extend(version.to_be_bytes());
    h.extend(correlation_id.to_be_bytes());
    h.extend(len.to_be_bytes());
    h
}

/// Every hostile frame, deduplicated, with the number of `(API, version)` pairs covered.
fn hostile_frames() -> (Vec<Vec<u8>>, usize) {
    let mut seen = HashSet::new();
    let mut frames = Vec::new();
    let mut push = |payload: Vec<u8>| {
        let f = frame(&payload);
        if seen.insert(f.clone()) {
            frames.push(f);
        }
    };
    let apis = advertised();
    for &(key, version) in &apis {
        let body = encode_body(&*default_request(key), version)
            .unwrap_or_else(|| panic!("default {key:?} v{version} request does not encode"));
        for flexible in [
            native_flexible(key, version),
            !native_flexible(key, version),
        ] {
            let head = request_header(key, version, 7, flexible);
            let positions = PLANT_POSITIONS_MAX.min(body.len());
            for at in 0..=positions {
                for (_, plant) in PLANTS {
                    for truncate in [false, true] {
                        let mut p = head.clone();
                        p.extend(planted(&body, at, plant, truncate));
                        push(p);
                    }
                }
            }
            // The body cut short at each position, with nothing planted.
            for cut in 0..body.len() {
                let mut p = head.clone();
                p.extend_from_slice(&body[..cut]);
                push(p);
            }
        }
        for len in CLIENT_ID_LENGTHS {
            let head = header_with_client_id_len(key as i16, version, 7, *len);
            // Nothing after the length; then the body follows as if it were the client id.
            push(head.clone());
            let mut p = head;
            p.extend_from_slice(&body);
            push(p);
        }
        // A flexible header whose tagged-field section declares 2^32-1 fields, or one field of
        // 2^32-1 bytes.
        for tags in [
            &[0xff, 0xff, 0xff, 0xff, 0x0f][..],
            &[0x01, 0x00, 0xff, 0xff, 0xff, 0xff, 0x0f][..],
        ] {
            let mut p = header_with_client_id_len(key as i16, version, 7, -1);
            p.extend_from_slice(tags);
            p.extend_from_slice(&body);
            push(p);
        }
    }
    (frames, apis.len())
}

#[test]
fn declared_lengths_in_every_advertised_request_are_refused_without_allocating_them() {
    let started = Instant::now();
    let broker = Broker::options().cores(2).start();
    let pid = broker.pid().expect("broker running");
    let topic = topic_name("hostile-frames");
    // Warm up: the first real client round trip sets the baseline peak (topic, segment, buffers).
    assert_serves_real_client(&broker.bootstrap(), &topic);
    let peak_before = vm_hwm_kib(pid);

    let (frames, api_versions) = hostile_frames();
    let bytes: usize = frames.iter().map(Vec::len).sum();
    let outcomes = probe_all(broker.addr, &frames, PROBE_THREADS);
    eprintln!(
        "hostile frames: {} frames ({bytes} bytes) over {api_versions} API versions: \
         {} answered, {} closed the connection, {} stalled; {} connections",
        outcomes.sent, outcomes.answered, outcomes.closed, outcomes.stalled, outcomes.connections
    );
    if !outcomes.stalled_requests.is_empty() {
        eprintln!(
            "stalled (api key, version): {:?}",
            outcomes.stalled_requests
        );
    }
    assert_eq!(outcomes.sent, frames.len());
    assert_eq!(
        outcomes.answered + outcomes.closed + outcomes.stalled,
        outcomes.sent
    );

    assert_alive(pid);
    assert_serves_real_client(&broker.bootstrap(), &topic);
    let peak_after = vm_hwm_kib(pid);
    eprintln!(
        "broker VmHWM {peak_before} KiB before, {peak_after} KiB after; took {:?}",
        started.elapsed()
    );
    assert!(
        peak_after.saturating_sub(peak_before) < PEAK_GROWTH_KIB_MAX,
        "broker peak memory grew from {peak_before} KiB to {peak_after} KiB under hostile frames"
    );
    assert!(
        !broker.stderr().contains("panicked"),
        "broker panicked on a hostile frame:\n{}",
        broker.stderr()
    );
}

/// Sends one request and returns the response body (after the response header), or `None` if
/// the broker closed the connection.
fn round_trip(
    addr: std::net::SocketAddr,
    key: kafka_protocol::messages::ApiKey,
    version: i16,
    body: &[u8],
) -> Option<Vec<u8>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("read timeout");
    let mut p = request_header(key, version, 99, native_flexible(key, version));
    p.extend_from_slice(body);
    s.write_all(&frame(&p)).ok()?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut resp = vec![0u8; i32::from_be_bytes(len) as usize];
    s.read_exact(&mut resp).ok()?;
    let header_bytes = if key.response_header_version(version) >= 1 {
        5
    } else {
        4
    };
    Some(resp.split_off(header_bytes))
}

// Kafka protocol guide, CreateTopics / CreatePartitions: INVALID_PARTITIONS (37).
const INVALID_PARTITIONS: i16 = 37;

#[test]
fn partition_counts_of_two_billion_are_refused_without_sizing_anything_by_them() {
    use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
    use kafka_protocol::messages::create_topics_request::CreatableTopic;
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::{Decodable, StrBytes};

    let broker = Broker::options().cores(2).start();
    let pid = broker.pid().expect("broker running");
    let topic = topic_name("hostile-counts");
    assert_serves_real_client(&broker.bootstrap(), &topic);
    let peak_before = vm_hwm_kib(pid);

    for validate_only in [true, false] {
        let req = CreateTopicsRequest::default()
            .with_timeout_ms(5000)
            .with_validate_only(validate_only)
            .with_topics(vec![CreatableTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic_name("two-billion"))))
                .with_num_partitions(i32::MAX)
                .with_replication_factor(1)]);
        let body = encode_body(&req, 5).expect("encode");
        let resp = round_trip(broker.addr, ApiKey::CreateTopics, 5, &body)
            .expect("CreateTopics with 2^31-1 partitions is answered");
        let resp = CreateTopicsResponse::decode(&mut bytes::Bytes::from(resp), 5).expect("decode");
        assert_eq!(resp.topics[0].error_code, INVALID_PARTITIONS);
    }
    let req = CreatePartitionsRequest::default()
        .with_timeout_ms(5000)
        .with_topics(vec![CreatePartitionsTopic::default()
            .with_name(TopicName(StrBytes::from_string(topic.clone())))
            .with_count(i32::MAX)]);
    let body = encode_body(&req, 1).expect("encode");
    let resp = round_trip(broker.addr, ApiKey::CreatePartitions, 1, &body)
        .expect("CreatePartitions to 2^31-1 partitions is answered");
    let resp = CreatePartitionsResponse::decode(&mut bytes::Bytes::from(resp), 1).expect("decode");
    assert_eq!(resp.results[0].error_code, INVALID_PARTITIONS);

    assert_alive(pid);
    assert_serves_real_client(&broker.bootstrap(), &topic);
    let peak_after = vm_hwm_kib(pid);
    assert!(
        peak_after.saturating_sub(peak_before) < PEAK_GROWTH_KIB_MAX,
        "broker peak memory grew from {peak_before} KiB to {peak_after} KiB"
    );
}
