//! Codec micro-benchmarks: what the broker and the load generator pay per request and per batch.
//!
//! - Produce request encode/decode (kafka-protocol), one 64 KiB batch and 100 × 16 KiB batches
//! - Fetch response encode/decode with 1 MiB of batches
//! - RecordBatch v2 validation with CRC-32C (`BatchHeader::parse_checked`), 64 KiB and 1 MiB
//! - Batch building (records encoded, compressed none/lz4/zstd) and the per-send patch + CRC
//!
//! Run: `cargo bench --bench codec` (quick look: `cargo bench --bench codec -- --quick`).

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{FetchResponse, ProduceRequest, TopicName};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use sluice::protocol::batch::BatchHeader;
use sluice_bench::batch::{self, BatchPool, BatchSpec, Compression, Keys, Payload};

fn pool(value_bytes: usize, records: usize, c: Compression, payload: Payload) -> BatchPool {
    let spec = BatchSpec {
        value_bytes,
        records_per_batch: records,
        compression: c,
        payload,
        keys: Keys::None,
        seed: 1,
    };
    BatchPool::build(&spec, 1).expect("valid batch spec")
}

fn produce_request(batches: &[Bytes]) -> ProduceRequest {
    let parts = batches
        .iter()
        .enumerate()
        .map(|(i, b)| {
            PartitionProduceData::default()
                .with_index(i as i32)
                .with_records(Some(b.clone()))
        })
        .collect();
    ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(TopicName(StrBytes::from_static_str("bench")))
            .with_partition_data(parts)])
}

fn bench_produce(c: &mut Criterion) {
    let one = vec![
        pool(1024, 64, Compression::None, Payload::Random).batches[0]
            .bytes
            .clone(),
    ];
    let b16 = pool(1024, 16, Compression::None, Payload::Random).batches[0]
        .bytes
        .clone();
    let many: Vec<Bytes> = (0..100).map(|_| b16.clone()).collect();
    let mut g = c.benchmark_group("produce_request");
    for (name, batches) in [("1x64KiB", &one), ("100x16KiB", &many)] {
        let req = produce_request(batches);
        let total: usize = batches.iter().map(|b| b.len()).sum();
        g.throughput(Throughput::Bytes(total as u64));
        let version = 9; // first flexible version
        let mut enc = BytesMut::new();
        req.encode(&mut enc, version).expect("encode");
        let enc = enc.freeze();
        g.bench_function(format!("encode_v9_{name}"), |b| {
            let mut buf = BytesMut::with_capacity(enc.len());
            b.iter(|| {
                buf.clear();
                req.encode(&mut buf, version).expect("encode");
                black_box(buf.len())
            })
        });
        g.bench_function(format!("decode_v9_{name}"), |b| {
            b.iter(|| {
                let mut src = enc.clone();
                black_box(ProduceRequest::decode(&mut src, version).expect("decode"))
            })
        });
    }
    g.finish();
}

fn bench_fetch(c: &mut Criterion) {
    let b = pool(1024, 64, Compression::None, Payload::Random).batches[0]
        .bytes
        .clone();
    let mut records = BytesMut::new();
    for _ in 0..16 {
        records.extend_from_slice(&b);
    }
    let records = records.freeze();
    let resp = FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
        .with_topic(TopicName(StrBytes::from_static_str("bench")))
        .with_partitions(
            (0..1)
                .map(|p| {
                    PartitionData::default()
                        .with_partition_index(p)
                        .with_high_watermark(1 << 20)
                        .with_records(Some(records.clone()))
                })
                .collect(),
        )]);
    let version = 12;
    let mut enc = BytesMut::new();
    resp.encode(&mut enc, version).expect("encode");
    let enc = enc.freeze();
    let mut g = c.benchmark_group("fetch_response");
    g.throughput(Throughput::Bytes(records.len() as u64));
    g.bench_function("encode_v12_1MiB", |bch| {
        let mut buf = BytesMut::with_capacity(enc.len());
        bch.iter(|| {
            buf.clear();
            resp.encode(&mut buf, version).expect("encode");
            black_box(buf.len())
        })
    });
    g.bench_function("decode_v12_1MiB", |bch| {
        bch.iter(|| {
            let mut src = enc.clone();
            black_box(FetchResponse::decode(&mut src, version).expect("decode"))
        })
    });
    g.finish();
}

fn bench_validate(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_validate_crc32c");
    for (name, records) in [("64KiB", 64usize), ("1MiB", 1024)] {
        let b = pool(1024, records, Compression::None, Payload::Random).batches[0]
            .bytes
            .clone();
        g.throughput(Throughput::Bytes(b.len() as u64));
        g.bench_function(name, |bch| {
            bch.iter(|| {
                black_box(
                    BatchHeader::parse_checked(black_box(&b))
                        .expect("valid")
                        .record_count(),
                )
            })
        });
    }
    g.finish();
}

fn bench_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_build_64x1KiB_text");
    g.throughput(Throughput::Bytes(64 * 1024));
    for (name, comp) in [
        ("none", Compression::None),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd),
    ] {
        g.bench_function(name, |bch| {
            bch.iter(|| black_box(pool(1024, 64, comp, Payload::Text).batches.len()))
        });
    }
    g.finish();

    // The per-send cost of the load generator: copy a pooled batch, patch, recompute CRC.
    let mut g = c.benchmark_group("batch_patch_per_send");
    let p = pool(1024, 64, Compression::None, Payload::Random);
    let pb = &p.batches[0];
    g.throughput(Throughput::Bytes(pb.bytes.len() as u64));
    g.bench_function("64KiB", |bch| {
        bch.iter_batched_ref(
            || pb.bytes.to_vec(),
            |buf| {
                batch::patch(
                    buf,
                    1_700_000_000_000,
                    1_700_000_000_000_000,
                    pb.stamp_at,
                    None,
                )
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_produce,
    bench_fetch,
    bench_validate,
    bench_build
);
criterion_main!(benches);
