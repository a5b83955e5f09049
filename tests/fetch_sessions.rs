//! Incremental fetch sessions (KIP-227) over raw frames: session ids and epochs, full and
//! incremental requests (added, changed and forgotten partitions), incremental responses that
//! leave out partitions with nothing new, the session error codes, long polling through a
//! session, the bounded cache, and hostile session fields. Every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::raw::{batch, create_topic, tn, topic_id, Raw};
use common::{topic_name, Broker};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic, ForgottenTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::records::RecordBatchDecoder;
use uuid::Uuid;

// Kafka error codes (Kafka protocol guide, "Error Codes").
const NONE: i16 = 0;
const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
const FETCH_SESSION_ID_NOT_FOUND: i16 = 70;
const INVALID_FETCH_SESSION_EPOCH: i16 = 71;
const FETCH_SESSION_TOPIC_ID_ERROR: i16 = 106;

fn produce(r: &mut Raw, topic: &str, partition: i32, value: &[u8]) -> i64 {
    let resp: ProduceResponse = r.call(
        ApiKey::Produce,
        9,
        &ProduceRequest::default()
            .with_acks(1)
            .with_timeout_ms(10_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(tn(topic))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(partition)
                    .with_records(Some(batch(&[value])))])]),
    );
    let p = &resp.responses[0].partition_responses[0];
    assert_eq!(p.error_code, NONE);
    p.base_offset
}

/// A topic as a request names it: by name (v12 and below) or by id (v13+).
#[derive(Clone)]
struct T {
    name: String,
    id: Uuid,
}

fn fetch_topic(version: i16, t: &T, parts: &[(i32, i64)]) -> FetchTopic {
    let mut ft = FetchTopic::default().with_partitions(
        parts
            .iter()
            .map(|&(p, offset)| {
                FetchPartition::default()
                    .with_partition(p)
                    .with_current_leader_epoch(-1)
                    .with_fetch_offset(offset)
                    .with_log_start_offset(-1)
                    .with_last_fetched_epoch(-1)
                    .with_partition_max_bytes(1 << 20)
            })
            .collect(),
    );
    if version >= 13 {
        ft.topic_id = t.id;
    } else {
        ft.topic = tn(&t.name);
    }
    ft
}

fn forgotten(version: i16, t: &T, parts: Vec<i32>) -> ForgottenTopic {
    let mut f = ForgottenTopic::default().with_partitions(parts);
    if version >= 13 {
        f.topic_id = t.id;
    } else {
        f.topic = tn(&t.name);
    }
    f
}

fn request(id: i32, epoch: i32, topics: Vec<FetchTopic>) -> FetchRequest {
    FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(0)
        .with_min_bytes(0)
        .with_max_bytes(16 << 20)
        .with_session_id(id)
        .with_session_epoch(epoch)
        .with_topics(topics)
}

/// What a response said: its error, its session id, and per named partition
/// (topic key, partition, error, high watermark, record values).
/// (topic key, partition, error, high watermark, record values)
type NamedPart = (String, i32, i16, i64, Vec<Vec<u8>>);

#[derive(Debug)]
struct Answer {
    error: i16,
    session_id: i32,
    parts: Vec<NamedPart>,
}

impl Answer {
    fn named(&self) -> Vec<(String, i32)> {
        let mut v: Vec<_> = self.parts.iter().map(|p| (p.0.clone(), p.1)).collect();
        v.sort();
        v
    }
}

fn fetch(r: &mut Raw, version: i16, req: &FetchRequest) -> Answer {
    let resp: FetchResponse = r.call(ApiKey::Fetch, version, req);
    answer(version, resp)
}

fn answer(version: i16, resp: FetchResponse) -> Answer {
    let mut parts = Vec::new();
    for t in &resp.responses {
        let key = if version >= 13 {
            format!("{}", t.topic_id)
        } else {
            t.topic.to_string()
        };
        for p in &t.partitions {
            let mut values = Vec::new();
            if let Some(mut recs) = p.records.clone() {
                for set in RecordBatchDecoder::decode_all(&mut recs).expect("decode batches") {
                    for rec in set.records {
                        values.push(rec.value.map(|v| v.to_vec()).unwrap_or_default());
                    }
                }
            }
            parts.push((
                key.clone(),
                p.partition_index,
                p.error_code,
                p.high_watermark,
                values,
            ));
        }
    }
    Answer {
        error: resp.error_code,
        session_id: resp.session_id,
        parts,
    }
}

fn key(version: i16, t: &T) -> String {
    if version >= 13 {
        format!("{}", t.id)
    } else {
        t.name.clone()
    }
}

fn new_topic(r: &mut Raw, prefix: &str, partitions: i32) -> T {
    let name = topic_name(prefix);
    create_topic(r, &name, partitions);
    let id = topic_id(r, &name);
    T { name, id }
}

/// The incremental semantics, at a name-keyed version (12) and a topic-id version (13+).
fn incremental_semantics(version: i16) {
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    let t = new_topic(&mut r, "sess", 4);
    let u = new_topic(&mut r, "sess2", 2);
    produce(&mut r, &t.name, 0, b"a0");
    produce(&mut r, &t.name, 1, b"a1");

    // Full fetch (epoch 0): every partition, and a session.
    let all: Vec<(i32, i64)> = (0..4).map(|p| (p, 0)).collect();
    let full = fetch(
        &mut r,
        version,
        &request(0, 0, vec![fetch_topic(version, &t, &all)]),
    );
    assert_eq!(full.error, NONE);
    assert!(full.session_id > 0, "a full fetch opens a session");
    assert_eq!(full.parts.len(), 4);
    let id = full.session_id;

    // The client did not advance (its cached fetch offsets are still 0): the records there are
    // read again and named again, partitions 2 and 3 (nothing new) are left out.
    let again = fetch(&mut r, version, &request(id, 1, vec![]));
    assert_eq!((again.error, again.session_id), (NONE, id));
    assert_eq!(
        again.named(),
        vec![(key(version, &t), 0), (key(version, &t), 1)]
    );

    // The client advances 0 and 1: now nothing is new anywhere.
    let adv = fetch(
        &mut r,
        version,
        &request(id, 2, vec![fetch_topic(version, &t, &[(0, 1), (1, 1)])]),
    );
    assert_eq!(adv.error, NONE);
    assert!(adv.parts.is_empty(), "nothing new: {adv:?}");
    let quiet = fetch(&mut r, version, &request(id, 3, vec![]));
    assert!(quiet.parts.is_empty(), "{quiet:?}");

    // New data on partition 2 only: only it is named, with its records.
    produce(&mut r, &t.name, 2, b"c0");
    let one = fetch(&mut r, version, &request(id, 4, vec![]));
    assert_eq!(one.parts.len(), 1, "{one:?}");
    assert_eq!(one.parts[0].1, 2);
    assert_eq!(one.parts[0].3, 1);
    assert_eq!(one.parts[0].4, vec![b"c0".to_vec()]);

    // Added partitions (another topic) are named at once; forgotten ones never again.
    let mut req = request(id, 5, vec![fetch_topic(version, &u, &[(0, 0), (1, 0)])]);
    req.forgotten_topics_data = vec![forgotten(version, &t, vec![2, 3])];
    let added = fetch(&mut r, version, &req);
    assert_eq!(
        added.named(),
        {
            let mut v = vec![(key(version, &u), 0), (key(version, &u), 1)];
            v.sort();
            v
        },
        "{added:?}"
    );
    produce(&mut r, &t.name, 3, b"d0");
    produce(&mut r, &t.name, 2, b"c1");
    let after = fetch(&mut r, version, &request(id, 6, vec![]));
    assert!(after.parts.is_empty(), "forgotten partitions: {after:?}");
    produce(&mut r, &u.name, 1, b"u1");
    let uu = fetch(&mut r, version, &request(id, 7, vec![]));
    assert_eq!(uu.named(), vec![(key(version, &u), 1)]);
    assert_eq!(uu.parts[0].4, vec![b"u1".to_vec()]);

    // The same epoch twice: INVALID_FETCH_SESSION_EPOCH, session id 0, nothing named; the
    // session itself goes on at the right epoch.
    let stale = fetch(&mut r, version, &request(id, 7, vec![]));
    assert_eq!(
        (stale.error, stale.session_id, stale.parts.len()),
        (INVALID_FETCH_SESSION_EPOCH, 0, 0)
    );
    let ahead = fetch(&mut r, version, &request(id, 100, vec![]));
    assert_eq!(ahead.error, INVALID_FETCH_SESSION_EPOCH);
    let ok = fetch(&mut r, version, &request(id, 8, vec![]));
    assert_eq!((ok.error, ok.session_id), (NONE, id));

    // An unknown id: FETCH_SESSION_ID_NOT_FOUND.
    let unknown = fetch(&mut r, version, &request(id ^ 0x55, 1, vec![]));
    assert_eq!(
        (unknown.error, unknown.session_id, unknown.parts.len()),
        (FETCH_SESSION_ID_NOT_FOUND, 0, 0)
    );
    let zero = fetch(&mut r, version, &request(0, 1, vec![]));
    assert_eq!(zero.error, FETCH_SESSION_ID_NOT_FOUND);

    // Epoch -1 closes the session and is answered sessionless, in full.
    let close = fetch(
        &mut r,
        version,
        &request(id, -1, vec![fetch_topic(version, &t, &[(0, 0)])]),
    );
    assert_eq!((close.error, close.session_id), (NONE, 0));
    assert_eq!(close.parts.len(), 1);
    let gone = fetch(&mut r, version, &request(id, 9, vec![]));
    assert_eq!(gone.error, FETCH_SESSION_ID_NOT_FOUND);

    // Epoch 0 with an id replaces that session by a new one.
    let s1 = fetch(
        &mut r,
        version,
        &request(0, 0, vec![fetch_topic(version, &t, &[(0, 1)])]),
    );
    let s2 = fetch(
        &mut r,
        version,
        &request(s1.session_id, 0, vec![fetch_topic(version, &t, &[(1, 1)])]),
    );
    assert!(s1.session_id > 0 && s2.session_id > 0 && s1.session_id != s2.session_id);
    let old = fetch(&mut r, version, &request(s1.session_id, 1, vec![]));
    assert_eq!(old.error, FETCH_SESSION_ID_NOT_FOUND);
    let new = fetch(&mut r, version, &request(s2.session_id, 1, vec![]));
    assert_eq!(new.error, NONE);
}

#[test]
fn incremental_fetch_by_topic_name_v12() {
    incremental_semantics(12);
}

#[test]
fn incremental_fetch_by_topic_id_v16() {
    incremental_semantics(16);
}

#[test]
fn incremental_fetch_v7_first_session_version() {
    incremental_semantics(7);
}

#[test]
fn sessionless_fetches_still_answer_in_full_with_session_id_0() {
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    let t = new_topic(&mut r, "nosess", 3);
    produce(&mut r, &t.name, 1, b"x");
    for version in [4i16, 5, 6, 7, 11, 12, 13, 16] {
        let parts: Vec<(i32, i64)> = (0..3).map(|p| (p, 0)).collect();
        for _ in 0..2 {
            let a = fetch(
                &mut r,
                version,
                &request(0, -1, vec![fetch_topic(version, &t, &parts)]),
            );
            assert_eq!((a.error, a.session_id), (NONE, 0), "v{version}");
            assert_eq!(a.parts.len(), 3, "v{version}: all partitions every time");
        }
    }
}

#[test]
fn switching_between_names_and_topic_ids_is_fetch_session_topic_id_error() {
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    let t = new_topic(&mut r, "idswitch", 1);
    let full = fetch(
        &mut r,
        12,
        &request(0, 0, vec![fetch_topic(12, &t, &[(0, 0)])]),
    );
    assert!(full.session_id > 0);
    let a = fetch(&mut r, 13, &request(full.session_id, 1, vec![]));
    assert_eq!((a.error, a.session_id), (FETCH_SESSION_TOPIC_ID_ERROR, 0));
    let full = fetch(
        &mut r,
        13,
        &request(0, 0, vec![fetch_topic(13, &t, &[(0, 0)])]),
    );
    let a = fetch(&mut r, 12, &request(full.session_id, 1, vec![]));
    assert_eq!(a.error, FETCH_SESSION_TOPIC_ID_ERROR);
}

#[test]
fn errors_are_named_in_every_incremental_response() {
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    let gone = T {
        name: topic_name("missing"),
        id: Uuid::nil(),
    };
    let t = new_topic(&mut r, "errs", 1);
    let full = fetch(
        &mut r,
        12,
        &request(
            0,
            0,
            vec![
                fetch_topic(12, &t, &[(0, 0)]),
                fetch_topic(12, &gone, &[(0, 0)]),
            ],
        ),
    );
    let id = full.session_id;
    assert!(id > 0);
    for epoch in 1..4 {
        let a = fetch(&mut r, 12, &request(id, epoch, vec![]));
        assert_eq!(a.error, NONE);
        assert_eq!(a.parts.len(), 1, "{a:?}");
        assert_eq!(
            (a.parts[0].1, a.parts[0].2),
            (0, UNKNOWN_TOPIC_OR_PARTITION)
        );
    }
}

/// A fetch parked on a session (incremental, `min_bytes` 1) wakes when any of its partitions
/// gets data, and names only that partition.
#[test]
fn a_parked_incremental_fetch_wakes_on_any_session_partition() {
    let b = Broker::options().cores(2).start();
    let mut r = Raw::connect(b.addr);
    let t = new_topic(&mut r, "park", 64);
    let all: Vec<(i32, i64)> = (0..64).map(|p| (p, 0)).collect();
    let full = fetch(&mut r, 12, &request(0, 0, vec![fetch_topic(12, &t, &all)]));
    let id = full.session_id;
    assert!(id > 0);
    let mut epoch = 1;
    for target in [37, 5, 63] {
        let req = request(id, epoch, vec![])
            .with_max_wait_ms(20_000)
            .with_min_bytes(1);
        let f = r.frame(ApiKey::Fetch, 12, &req);
        std::io::Write::write_all(&mut r.s, &f).unwrap();
        let started = Instant::now();
        // The fetch is parked (nothing new); data on one partition from another connection
        // wakes it.
        let mut p = Raw::connect(b.addr);
        produce(&mut p, &t.name, target, b"wake");
        let mut resp = r.read_frame().expect("parked fetch answered");
        let _ = <ResponseHeader as kafka_protocol::protocol::Decodable>::decode(
            &mut resp,
            ApiKey::Fetch.response_header_version(12),
        )
        .unwrap();
        let resp =
            <FetchResponse as kafka_protocol::protocol::Decodable>::decode(&mut resp, 12).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "woken by the append, not by max_wait_ms"
        );
        let a = answer(12, resp);
        assert_eq!(a.error, NONE);
        assert_eq!(a.named(), vec![(t.name.clone(), target)], "{a:?}");
        assert_eq!(a.parts[0].4, vec![b"wake".to_vec()]);
        epoch += 1;
        // Advance past the record so the next round parks again.
        let adv = fetch(
            &mut r,
            12,
            &request(id, epoch, vec![fetch_topic(12, &t, &[(target, 1)])]),
        );
        assert!(adv.parts.is_empty(), "{adv:?}");
        epoch += 1;
    }
}

/// A session id from another shard is not found there (the client falls back to a full fetch);
/// the same id on a connection of its own shard works.
#[test]
fn a_session_used_from_another_shard_is_not_found() {
    let b = Broker::options().cores(2).start();
    let mut r = Raw::connect(b.addr);
    let t = new_topic(&mut r, "shards", 2);
    let owner = |id: i32| id / (i32::MAX / 2);
    let first = fetch(
        &mut r,
        12,
        &request(0, 0, vec![fetch_topic(12, &t, &[(0, 0)])]),
    );
    assert!(first.session_id > 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut same, mut other) = (false, false);
    let mut epoch = 1;
    while !(same && other) {
        assert!(
            Instant::now() < deadline,
            "connections never spread over both shards"
        );
        let mut c = Raw::connect(b.addr);
        let probe = fetch(
            &mut c,
            12,
            &request(0, 0, vec![fetch_topic(12, &t, &[(1, 0)])]),
        );
        assert!(probe.session_id > 0);
        let a = fetch(&mut c, 12, &request(first.session_id, epoch, vec![]));
        if owner(probe.session_id) == owner(first.session_id) {
            assert_eq!(a.error, NONE);
            epoch += 1;
            same = true;
        } else {
            assert_eq!(a.error, FETCH_SESSION_ID_NOT_FOUND);
            other = true;
        }
    }
}

/// The cache holds at most its slots (1,000 per broker, split over shards); sessions of equal
/// size past that are served sessionless, and a larger one evicts a smaller one.
#[test]
fn a_full_cache_serves_sessionless_and_evicts_smaller_sessions() {
    let b = Broker::options().cores(1).start();
    let mut r = Raw::connect(b.addr);
    let t = new_topic(&mut r, "slots", 3);
    let mut ids = Vec::new();
    for _ in 0..1000 {
        let a = fetch(
            &mut r,
            12,
            &request(0, 0, vec![fetch_topic(12, &t, &[(0, 0)])]),
        );
        assert_eq!(a.error, NONE);
        assert!(a.session_id > 0);
        ids.push(a.session_id);
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 1000, "session ids are unique");
    // Full: a session of the same size gets none, and is answered in full.
    let a = fetch(
        &mut r,
        12,
        &request(0, 0, vec![fetch_topic(12, &t, &[(1, 0)])]),
    );
    assert_eq!((a.error, a.session_id, a.parts.len()), (NONE, 0, 1));
    // A larger one evicts one of the one-partition sessions.
    let big = fetch(
        &mut r,
        12,
        &request(0, 0, vec![fetch_topic(12, &t, &[(0, 0), (1, 0), (2, 0)])]),
    );
    assert!(big.session_id > 0);
    let mut lost = 0;
    for id in ids {
        let a = fetch(&mut r, 12, &request(id, 1, vec![]));
        match a.error {
            NONE => {}
            FETCH_SESSION_ID_NOT_FOUND => lost += 1,
            e => panic!("unexpected {e}"),
        }
    }
    assert_eq!(lost, 1, "exactly one smaller session evicted");
}

/// Hostile session fields never hurt the broker: unknown ids, every odd epoch, epochs that wrap,
/// a huge forgotten list, a session that grows by incremental adds.
#[test]
fn hostile_session_fields_keep_the_broker_serving() {
    let b = Broker::options().cores(2).start();
    let mut r = Raw::connect(b.addr);
    let t = new_topic(&mut r, "hostile", 2);
    for (id, epoch) in [
        (i32::MAX, 1),
        (i32::MIN, 1),
        (-1, 5),
        (1, i32::MAX),
        (12345, i32::MIN),
        (0, -2),
        (0, i32::MIN),
    ] {
        let a = fetch(
            &mut r,
            12,
            &request(id, epoch, vec![fetch_topic(12, &t, &[(0, 0)])]),
        );
        assert!(
            a.error == FETCH_SESSION_ID_NOT_FOUND || a.error == INVALID_FETCH_SESSION_EPOCH,
            "({id}, {epoch}): {a:?}"
        );
    }
    // Epoch -1 of an unknown id and epoch 0 of an unknown id are plain full fetches.
    let a = fetch(
        &mut r,
        12,
        &request(777, -1, vec![fetch_topic(12, &t, &[(0, 0)])]),
    );
    assert_eq!((a.error, a.session_id), (NONE, 0));
    let a = fetch(
        &mut r,
        12,
        &request(777, 0, vec![fetch_topic(12, &t, &[(0, 0)])]),
    );
    assert_eq!(a.error, NONE);
    let id = a.session_id;
    assert!(id > 0);
    // A forgotten list of a million partitions (4 MB), most of them unknown.
    let mut req = request(id, 1, vec![]);
    req.forgotten_topics_data = vec![
        forgotten(12, &t, (0..1_000_000).collect()),
        forgotten(
            12,
            &T {
                name: "x".repeat(200),
                id: Uuid::nil(),
            },
            (0..100_000).collect(),
        ),
    ];
    let a = fetch(&mut r, 12, &req);
    assert_eq!(a.error, NONE);
    assert!(a.parts.is_empty(), "{a:?}");
    // The session is empty now; growing it with many unknown partitions is bounded (the
    // session ends past its byte limit, and the client falls back to a full fetch).
    let mut ended = false;
    for round in 0..20 {
        let epoch = 2 + round;
        let base = round * 50_000;
        let many: Vec<(i32, i64)> = (base..base + 50_000).map(|p| (p, 0)).collect();
        let a = fetch(
            &mut r,
            12,
            &request(id, epoch, vec![fetch_topic(12, &t, &many)]),
        );
        if a.error == FETCH_SESSION_ID_NOT_FOUND {
            ended = true;
            break;
        }
        assert_eq!(a.error, NONE);
    }
    assert!(ended, "a session cannot grow without bound");
    // And a fresh client is served normally.
    let mut fresh = Raw::connect(b.addr);
    produce(&mut fresh, &t.name, 1, b"still here");
    let a = fetch(
        &mut fresh,
        12,
        &request(0, 0, vec![fetch_topic(12, &t, &[(1, 0)])]),
    );
    assert_eq!(a.parts[0].4, vec![b"still here".to_vec()]);
}

/// A long run of incremental epochs keeps one session. (The wrap from i32::MAX to 1, Kafka's
/// `nextEpoch`, would take 2^31 requests over the wire: the cache's unit tests cover it.)
#[test]
fn a_long_run_of_epochs_keeps_the_session() {
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    let t = new_topic(&mut r, "epochs", 1);
    let full = fetch(
        &mut r,
        12,
        &request(0, 0, vec![fetch_topic(12, &t, &[(0, 0)])]),
    );
    let id = full.session_id;
    for epoch in 1..=300 {
        let a = fetch(&mut r, 12, &request(id, epoch, vec![]));
        assert_eq!((a.error, a.session_id), (NONE, id), "epoch {epoch}");
    }
}
