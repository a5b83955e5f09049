//! Writes a seed corpus from our own encoders: the default request of every API version the
//! broker advertises, in its own header form (`corpus/request_decode/`), and a few valid record
//! batch sets (`corpus/record_batch/`). Run before the first fuzzing session:
//! `cargo run --manifest-path tests/fuzz/Cargo.toml --bin seeds`.

use std::path::Path;

use bytes::BytesMut;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Encodable, StrBytes};
use sluice::protocol::builder as build;

fn body(key: ApiKey, version: i16) -> Vec<u8> {
    fn e<T: Encodable + Default>(version: i16) -> Vec<u8> {
        let mut b = BytesMut::new();
        T::default()
            .encode(&mut b, version)
            .expect("a default request encodes at every version");
        b.to_vec()
    }
    let v = version;
    match key {
        ApiKey::Produce => e::<ProduceRequest>(v),
        ApiKey::Fetch => e::<FetchRequest>(v),
        ApiKey::ListOffsets => e::<ListOffsetsRequest>(v),
        ApiKey::Metadata => e::<MetadataRequest>(v),
        ApiKey::ApiVersions => e::<ApiVersionsRequest>(v),
        ApiKey::CreateTopics => e::<CreateTopicsRequest>(v),
        ApiKey::DeleteTopics => e::<DeleteTopicsRequest>(v),
        ApiKey::DeleteRecords => e::<DeleteRecordsRequest>(v),
        ApiKey::InitProducerId => e::<InitProducerIdRequest>(v),
        ApiKey::DescribeConfigs => e::<DescribeConfigsRequest>(v),
        ApiKey::CreatePartitions => e::<CreatePartitionsRequest>(v),
        ApiKey::FindCoordinator => e::<FindCoordinatorRequest>(v),
        ApiKey::JoinGroup => e::<JoinGroupRequest>(v),
        ApiKey::SyncGroup => e::<SyncGroupRequest>(v),
        ApiKey::Heartbeat => e::<HeartbeatRequest>(v),
        ApiKey::LeaveGroup => e::<LeaveGroupRequest>(v),
        ApiKey::OffsetCommit => e::<OffsetCommitRequest>(v),
        ApiKey::OffsetFetch => e::<OffsetFetchRequest>(v),
        ApiKey::DescribeGroups => e::<DescribeGroupsRequest>(v),
        ApiKey::ListGroups => e::<ListGroupsRequest>(v),
        ApiKey::DeleteGroups => e::<DeleteGroupsRequest>(v),
        ApiKey::OffsetDelete => e::<OffsetDeleteRequest>(v),
        other => panic!("{other:?} is advertised but seeds does not build it"),
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let requests = root.join("request_decode");
    let batches = root.join("record_batch");
    std::fs::create_dir_all(&requests).expect("create corpus dir");
    std::fs::create_dir_all(&batches).expect("create corpus dir");

    let mut n = 0;
    for (key, lo, hi) in sluice::kafka::versions::SUPPORTED {
        for version in *lo..=*hi {
            let mut frame = BytesMut::new();
            RequestHeader::default()
                .with_request_api_key(*key as i16)
                .with_request_api_version(version)
                .with_correlation_id(1)
                .with_client_id(Some(StrBytes::from_static_str("seed")))
                .encode(&mut frame, key.request_header_version(version))
                .expect("encode header");
            frame.extend_from_slice(&body(*key, version));
            let name = format!("{key:?}-v{version}");
            std::fs::write(requests.join(name), &frame).expect("write seed");
            n += 1;
        }
    }

    let one = build::single(Some(b"key"), Some(b"value"), 1_700_000_000_000);
    let with_headers = build::batch(&[
        build::Record {
            key: None,
            value: Some(b"first"),
            headers: &[("h", Some(b"v")), ("null", None)],
            timestamp_ms: 1_700_000_000_000,
        },
        build::Record {
            key: Some(b""),
            value: None,
            headers: &[],
            timestamp_ms: 1_700_000_000_123,
        },
    ]);
    let two = [one.clone(), with_headers.clone()].concat();
    for (name, b) in [("single", &one), ("headers", &with_headers), ("two", &two)] {
        std::fs::write(batches.join(name), b).expect("write seed");
    }
    println!(
        "wrote {n} request seeds to {} and 3 batch seeds to {}",
        requests.display(),
        batches.display()
    );
}
