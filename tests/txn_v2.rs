//! Transactions over raw frames: transaction version 2 (KIP-890 part 2: Produce v12 adds its
//! partition to the transaction, EndTxn v5 bumps the epoch on every commit and abort) as the
//! `transaction.version` feature in ApiVersions advertises it, version 1 kept working beside
//! it, the verification cache ending with the transaction's marker, and transactional-id
//! expiration. No installable client sends transaction version 2 yet, hence raw requests
//! through the shared test client (`common::raw`). Every wait is on a condition, bounded.

mod common;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::raw::{create_topic, tn, Raw};
use common::{topic_name, Broker};
use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use kafka_protocol::ResponseError;

/// Longest wait for a condition (the coordinator's start, markers, expiration).
const WAIT_MAX: Duration = Duration::from_secs(30);
/// Pause between two looks at a condition.
const POLL: Duration = Duration::from_millis(50);

fn code(e: ResponseError) -> i16 {
    e.code()
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

/// Retries `f` until it answers `Some`, at most [`WAIT_MAX`].
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {WAIT_MAX:?}");
        std::thread::sleep(POLL);
    }
}

/// InitProducerId v4 for `tid`: (producer id, epoch). Retried while the coordinator loads.
fn init(r: &mut Raw, tid: &str) -> (i64, i16) {
    wait_for("InitProducerId", || {
        let resp: InitProducerIdResponse = r.call(
            ApiKey::InitProducerId,
            4,
            &InitProducerIdRequest::default()
                .with_transactional_id(Some(TransactionalId(s(tid))))
                .with_transaction_timeout_ms(60_000)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
        );
        let retriable = [
            code(ResponseError::CoordinatorNotAvailable),
            code(ResponseError::CoordinatorLoadInProgress),
            code(ResponseError::ConcurrentTransactions),
        ];
        if retriable.contains(&resp.error_code) {
            return None;
        }
        assert_eq!(resp.error_code, 0, "InitProducerId {tid}");
        Some((resp.producer_id.0, resp.producer_epoch))
    })
}

/// One transactional batch of `values` from `pid`/`epoch`, first sequence `seq`.
fn txn_batch(pid: i64, epoch: i16, seq: i32, values: &[&str]) -> Bytes {
    let records: Vec<Record> = values
        .iter()
        .enumerate()
        .map(|(i, v)| Record {
            transactional: true,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: pid,
            producer_epoch: epoch,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: seq + i as i32,
            timestamp: 1_700_000_000_000 + i as i64,
            key: Some(Bytes::from(format!("k{i}"))),
            value: Some(Bytes::from(v.to_string())),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .expect("encode batch");
    buf.freeze()
}

/// A transactional Produce (acks=all) of one batch to `topic`-`p`: the partition's error code.
fn produce(r: &mut Raw, version: i16, tid: &str, topic: &str, p: i32, batch: Bytes) -> i16 {
    let resp: ProduceResponse = r.call(
        ApiKey::Produce,
        version,
        &ProduceRequest::default()
            .with_transactional_id(Some(TransactionalId(s(tid))))
            .with_acks(-1)
            .with_timeout_ms(10_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(tn(topic))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(p)
                    .with_records(Some(batch))])]),
    );
    resp.responses[0].partition_responses[0].error_code
}

fn end_txn(
    r: &mut Raw,
    version: i16,
    tid: &str,
    (pid, epoch): (i64, i16),
    commit: bool,
) -> EndTxnResponse {
    r.call(
        ApiKey::EndTxn,
        version,
        &EndTxnRequest::default()
            .with_transactional_id(TransactionalId(s(tid)))
            .with_producer_id(ProducerId(pid))
            .with_producer_epoch(epoch)
            .with_committed(commit),
    )
}

/// AddPartitionsToTxn v3 (one transaction, as the version 1 clients send it).
fn add_partitions(r: &mut Raw, tid: &str, (pid, epoch): (i64, i16), topic: &str, p: i32) -> i16 {
    let resp: AddPartitionsToTxnResponse = r.call(
        ApiKey::AddPartitionsToTxn,
        3,
        &AddPartitionsToTxnRequest::default()
            .with_v3_and_below_transactional_id(TransactionalId(s(tid)))
            .with_v3_and_below_producer_id(ProducerId(pid))
            .with_v3_and_below_producer_epoch(epoch)
            .with_v3_and_below_topics(vec![AddPartitionsToTxnTopic::default()
                .with_name(tn(topic))
                .with_partitions(vec![p])]),
    );
    resp.results_by_topic_v3_and_below[0].results_by_partition[0].partition_error_code
}

/// What a consumer at `isolation` (1: read_committed) reads of `topic`-`p` from offset 0: the
/// data records' values, the last stable offset and the high watermark.
fn fetch(r: &mut Raw, topic: &str, p: i32, isolation: i8) -> (Vec<String>, i64, i64) {
    let resp: FetchResponse = r.call(
        ApiKey::Fetch,
        11,
        &FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(0)
            .with_min_bytes(0)
            .with_max_bytes(1 << 20)
            .with_isolation_level(isolation)
            .with_topics(vec![FetchTopic::default()
                .with_topic(tn(topic))
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(p)
                    .with_fetch_offset(0)
                    .with_partition_max_bytes(1 << 20)])]),
    );
    let part = &resp.responses[0].partitions[0];
    assert_eq!(part.error_code, 0, "fetch {topic}-{p}");
    // As a read_committed consumer does: a producer's records are dropped from the first
    // offset of one of its aborted transactions up to its next marker.
    let mut pending: Vec<(i64, i64)> = part
        .aborted_transactions
        .iter()
        .flatten()
        .map(|t| (t.first_offset, t.producer_id.0))
        .collect();
    pending.sort();
    let mut aborting = std::collections::HashSet::new();
    let mut values = vec![];
    if let Some(mut recs) = part.records.clone() {
        for set in RecordBatchDecoder::decode_all(&mut recs).expect("decode fetched batches") {
            for rec in set.records {
                while pending
                    .first()
                    .is_some_and(|(first, _)| *first <= rec.offset)
                {
                    aborting.insert(pending.remove(0).1);
                }
                if rec.control {
                    aborting.remove(&rec.producer_id);
                } else if !(rec.transactional && aborting.contains(&rec.producer_id)) {
                    values.push(String::from_utf8_lossy(&rec.value.unwrap_or_default()).into());
                }
            }
        }
    }
    (values, part.last_stable_offset, part.high_watermark)
}

/// Waits until `tid`'s transaction is complete (markers written and the Complete record).
fn completed(r: &mut Raw, tid: &str) {
    wait_for("transaction completed", || {
        let st = describe(r, tid).transaction_state;
        matches!(st.as_str(), "CompleteCommit" | "CompleteAbort").then_some(())
    });
}

/// Waits until no transaction holds `topic`-`p` open (its markers are written) and answers
/// what read_committed reads.
fn committed(r: &mut Raw, topic: &str, p: i32) -> Vec<String> {
    wait_for("markers written", || {
        let (values, lso, hw) = fetch(r, topic, p, 1);
        (lso == hw).then_some(values)
    })
}

fn describe(r: &mut Raw, tid: &str) -> describe_transactions_response::TransactionState {
    let resp: DescribeTransactionsResponse = r.call(
        ApiKey::DescribeTransactions,
        0,
        &DescribeTransactionsRequest::default()
            .with_transactional_ids(vec![TransactionalId(s(tid))]),
    );
    resp.transaction_states[0].clone()
}

#[test]
fn api_versions_finalizes_transaction_version_2() {
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    for v in 3..=4 {
        let resp: ApiVersionsResponse = r.call(
            ApiKey::ApiVersions,
            v,
            &ApiVersionsRequest::default()
                .with_client_software_name(s("sluice-test"))
                .with_client_software_version(s("1")),
        );
        assert_eq!(resp.error_code, 0);
        let sup = resp
            .supported_features
            .iter()
            .find(|f| f.name.as_str() == "transaction.version")
            .expect("transaction.version supported");
        assert_eq!((sup.min_version, sup.max_version), (0, 2), "v{v}");
        let fin = resp
            .finalized_features
            .iter()
            .find(|f| f.name.as_str() == "transaction.version")
            .expect("transaction.version finalized");
        assert_eq!(fin.max_version_level, 2, "v{v}");
        assert!(
            resp.finalized_features_epoch >= 0,
            "v{v}: a client ignores epoch -1"
        );
        let max = |k: ApiKey| {
            resp.api_keys
                .iter()
                .find(|a| a.api_key == k as i16)
                .map(|a| a.max_version)
        };
        assert_eq!(
            max(ApiKey::Produce),
            Some(12),
            "v{v}: Produce v13 (topic ids) is not served"
        );
        assert_eq!(max(ApiKey::EndTxn), Some(5), "v{v}");
    }
}

#[test]
fn tv2_produce_adds_its_partition_and_end_txn_v5_bumps_the_epoch() {
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    let topic = topic_name("tv2");
    create_topic(&mut r, &topic, 2);
    let tid = "tv2-producer";
    let (pid, e0) = init(&mut r, tid);

    // Produce v12 to a partition never added: the broker adds it to the transaction.
    assert_eq!(
        produce(
            &mut r,
            12,
            tid,
            &topic,
            0,
            txn_batch(pid, e0, 0, &["a", "b"])
        ),
        0
    );
    let d = describe(&mut r, tid);
    assert_eq!(d.transaction_state.as_str(), "Ongoing");
    assert_eq!(d.topics.len(), 1, "{d:?}");
    assert_eq!(d.topics[0].partitions, vec![0]);
    let (_, lso, hw) = fetch(&mut r, &topic, 0, 1);
    assert_eq!((lso, hw), (0, 2), "the open transaction holds the LSO");
    // A second produce of the transaction (the verification cache answers it).
    assert_eq!(
        produce(&mut r, 12, tid, &topic, 0, txn_batch(pid, e0, 2, &["c"])),
        0
    );

    let end = end_txn(&mut r, 5, tid, (pid, e0), true);
    assert_eq!(end.error_code, 0);
    assert_eq!((end.producer_id.0, end.producer_epoch), (pid, e0 + 1));
    assert_eq!(committed(&mut r, &topic, 0), vec!["a", "b", "c"]);

    // The late producer at the old epoch is fenced everywhere.
    assert_eq!(
        produce(&mut r, 12, tid, &topic, 0, txn_batch(pid, e0, 3, &["late"])),
        code(ResponseError::InvalidProducerEpoch)
    );
    assert_eq!(
        produce(&mut r, 12, tid, &topic, 1, txn_batch(pid, e0, 0, &["late"])),
        code(ResponseError::InvalidProducerEpoch)
    );
    assert_eq!(
        add_partitions(&mut r, tid, (pid, e0), &topic, 1),
        code(ResponseError::ProducerFenced)
    );
    assert_eq!(
        end_txn(&mut r, 4, tid, (pid, e0), false).error_code,
        code(ResponseError::ProducerFenced)
    );
    // A retry of the EndTxn v5 that went through is answered with the epoch it bumped to
    // (CONCURRENT_TRANSACTIONS until the transaction is complete).
    completed(&mut r, tid);
    let retry = end_txn(&mut r, 5, tid, (pid, e0), true);
    assert_eq!(retry.error_code, 0);
    assert_eq!((retry.producer_id.0, retry.producer_epoch), (pid, e0 + 1));

    // The next transaction at the new epoch, aborted: bumped again, invisible to read_committed.
    let e1 = e0 + 1;
    assert_eq!(
        produce(&mut r, 12, tid, &topic, 1, txn_batch(pid, e1, 0, &["x"])),
        0
    );
    assert_eq!(
        produce(&mut r, 12, tid, &topic, 0, txn_batch(pid, e1, 0, &["y"])),
        0
    );
    let end = end_txn(&mut r, 5, tid, (pid, e1), false);
    assert_eq!(end.error_code, 0);
    assert_eq!((end.producer_id.0, end.producer_epoch), (pid, e1 + 1));
    assert_eq!(committed(&mut r, &topic, 1), Vec::<String>::new());
    assert_eq!(committed(&mut r, &topic, 0), vec!["a", "b", "c"]);
    let (all, _, _) = fetch(&mut r, &topic, 1, 0);
    assert_eq!(
        all,
        vec!["x"],
        "read_uncommitted still reads the aborted record"
    );
    assert_eq!(describe(&mut r, tid).producer_epoch, e1 + 1);

    // A transaction that the new epoch starts right after EndTxn (its markers may still be
    // being written) is added once they are.
    let e2 = e1 + 1;
    assert_eq!(
        produce(&mut r, 12, tid, &topic, 1, txn_batch(pid, e2, 0, &["z"])),
        0
    );
    assert_eq!(
        end_txn(&mut r, 5, tid, (pid, e2), true).producer_epoch,
        e2 + 1
    );
    assert_eq!(committed(&mut r, &topic, 1), vec!["z"]);
}

#[test]
fn tv1_keeps_explicit_add_partitions_and_its_epoch() {
    let b = Broker::start();
    let mut r = Raw::connect(b.addr);
    let topic = topic_name("tv1");
    create_topic(&mut r, &topic, 2);
    let tid = "tv1-producer";
    let ids = init(&mut r, tid);
    let (pid, epoch) = ids;

    // Produce up to v11 does not add partitions: one never added is refused.
    assert_eq!(
        produce(
            &mut r,
            11,
            tid,
            &topic,
            1,
            txn_batch(pid, epoch, 0, &["no"])
        ),
        code(ResponseError::InvalidTxnState)
    );
    assert_eq!(add_partitions(&mut r, tid, ids, &topic, 0), 0);
    assert_eq!(
        produce(
            &mut r,
            11,
            tid,
            &topic,
            0,
            txn_batch(pid, epoch, 0, &["one"])
        ),
        0
    );
    let end = end_txn(&mut r, 4, tid, ids, true);
    assert_eq!(end.error_code, 0);
    assert_eq!(committed(&mut r, &topic, 0), vec!["one"]);
    // The epoch stays: the next transaction goes on with it (once this one is complete; a
    // client retries the CONCURRENT_TRANSACTIONS it gets before).
    completed(&mut r, tid);
    assert_eq!(describe(&mut r, tid).producer_epoch, epoch);
    assert_eq!(add_partitions(&mut r, tid, ids, &topic, 0), 0);
    assert_eq!(
        produce(
            &mut r,
            9,
            tid,
            &topic,
            0,
            txn_batch(pid, epoch, 1, &["two"])
        ),
        0
    );
    assert_eq!(end_txn(&mut r, 3, tid, ids, true).error_code, 0);
    assert_eq!(committed(&mut r, &topic, 0), vec!["one", "two"]);
}

/// The verification cache remembers a producer verified for a partition only while its
/// transaction lasts: once the marker is written, a produce of the same producer and epoch is
/// asked about again, and refused as the partition is no longer in a transaction.
#[test]
fn a_produce_after_the_marker_is_verified_again() {
    let b = Broker::options().cores(2).start();
    let mut r = Raw::connect(b.addr);
    let topic = topic_name("verify");
    create_topic(&mut r, &topic, 4);
    let tid = "verify-producer";
    let ids = init(&mut r, tid);
    let (pid, epoch) = ids;
    for p in 0..4 {
        assert_eq!(add_partitions(&mut r, tid, ids, &topic, p), 0);
    }
    for p in 0..4 {
        // Twice each: the second is answered from the owner shard's cache.
        assert_eq!(
            produce(&mut r, 11, tid, &topic, p, txn_batch(pid, epoch, 0, &["a"])),
            0
        );
        assert_eq!(
            produce(&mut r, 11, tid, &topic, p, txn_batch(pid, epoch, 1, &["b"])),
            0
        );
    }
    assert_eq!(end_txn(&mut r, 4, tid, ids, true).error_code, 0);
    completed(&mut r, tid);
    for p in 0..4 {
        assert_eq!(committed(&mut r, &topic, p), vec!["a", "b"]);
        assert_eq!(
            produce(
                &mut r,
                11,
                tid,
                &topic,
                p,
                txn_batch(pid, epoch, 2, &["after"])
            ),
            code(ResponseError::InvalidTxnState),
            "partition {p}: the cached verification must end with the marker"
        );
    }
    // An abort's markers clear it too.
    for p in 0..2 {
        assert_eq!(add_partitions(&mut r, tid, ids, &topic, p), 0);
        assert_eq!(
            produce(&mut r, 11, tid, &topic, p, txn_batch(pid, epoch, 2, &["x"])),
            0
        );
    }
    assert_eq!(end_txn(&mut r, 4, tid, ids, false).error_code, 0);
    completed(&mut r, tid);
    for p in 0..2 {
        assert_eq!(committed(&mut r, &topic, p), vec!["a", "b"]);
        assert_eq!(
            produce(
                &mut r,
                11,
                tid,
                &topic,
                p,
                txn_batch(pid, epoch, 3, &["after"])
            ),
            code(ResponseError::InvalidTxnState)
        );
    }
}

#[test]
fn idle_transactional_ids_expire_and_stay_removed() {
    let mut b = Broker::options()
        .args(["--transactional-id-expiration-ms", "1000"])
        .start();
    let mut r = Raw::connect(b.addr);
    let topic = topic_name("expire");
    create_topic(&mut r, &topic, 1);
    let idle = "expire-idle";
    let open = "expire-open";
    init(&mut r, idle);
    let ids = init(&mut r, open);
    assert_eq!(add_partitions(&mut r, open, ids, &topic, 0), 0);
    assert_eq!(describe(&mut r, idle).error_code, 0);

    wait_for("the idle id expires", || {
        (describe(&mut r, idle).error_code == code(ResponseError::TransactionalIdNotFound))
            .then_some(())
    });
    // An open transaction is not idle, whatever its age.
    let d = describe(&mut r, open);
    assert_eq!(d.error_code, 0);
    assert_eq!(d.transaction_state.as_str(), "Ongoing");

    // The tombstone is durable: it keeps the id removed across a kill -9 and restart.
    drop(r);
    b.sigkill();
    b.restart();
    let mut r = Raw::connect(b.addr);
    init(&mut r, "expire-other");
    assert_eq!(
        describe(&mut r, idle).error_code,
        code(ResponseError::TransactionalIdNotFound)
    );
    // The id may be used again, as a new one.
    let (_, epoch) = init(&mut r, idle);
    assert_eq!(epoch, 0);
}
