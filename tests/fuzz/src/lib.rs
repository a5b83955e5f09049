//! The fuzz targets' bodies, shared by the libFuzzer entry points (`fuzz_targets/`, built by
//! cargo-fuzz with `--cfg fuzzing`) and by the plain binaries the same files build into on
//! stable, which replay a corpus ([`replay_main`]).
//!
//! Each body mirrors what the broker does with untrusted bytes and must never panic or abort;
//! libFuzzer reports a crash, a leak, or (with `-rss_limit_mb`/`-malloc_limit_mb`) an
//! allocation sized by the input.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::Decodable;
use sluice::protocol::batch::{self, BatchHeader};
use sluice::types::Offset;

/// A request frame (without its length prefix) through the broker's decode path: API key and
/// version off the front, refused unless advertised; the request header in the form that version
/// uses; the body with its type's `Decodable::decode`; for Produce, the RecordBatch walk the
/// handler runs on each partition's records.
pub fn request_decode(frame: &[u8]) {
    if frame.len() < 4 {
        return;
    }
    let key_raw = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let Ok(key) = ApiKey::try_from(key_raw) else {
        return;
    };
    match sluice::kafka::versions::supported(key) {
        Some((lo, hi)) if version >= lo && version <= hi => {}
        _ => return,
    }
    let mut b = Bytes::copy_from_slice(frame);
    if RequestHeader::decode(&mut b, key.request_header_version(version)).is_err() {
        return;
    }
    fn d<T: Decodable>(b: &mut Bytes, version: i16) {
        let _ = T::decode(b, version);
    }
    let v = version;
    match key {
        ApiKey::Produce => {
            if let Ok(req) = ProduceRequest::decode(&mut b, v) {
                for t in &req.topic_data {
                    for p in &t.partition_data {
                        if let Some(records) = &p.records {
                            record_batch(records);
                        }
                    }
                }
            }
        }
        ApiKey::Fetch => d::<FetchRequest>(&mut b, v),
        ApiKey::ListOffsets => d::<ListOffsetsRequest>(&mut b, v),
        ApiKey::Metadata => d::<MetadataRequest>(&mut b, v),
        ApiKey::ApiVersions => d::<ApiVersionsRequest>(&mut b, v),
        ApiKey::CreateTopics => d::<CreateTopicsRequest>(&mut b, v),
        ApiKey::DeleteTopics => d::<DeleteTopicsRequest>(&mut b, v),
        ApiKey::DeleteRecords => d::<DeleteRecordsRequest>(&mut b, v),
        ApiKey::InitProducerId => d::<InitProducerIdRequest>(&mut b, v),
        ApiKey::DescribeConfigs => d::<DescribeConfigsRequest>(&mut b, v),
        ApiKey::CreatePartitions => d::<CreatePartitionsRequest>(&mut b, v),
        ApiKey::FindCoordinator => d::<FindCoordinatorRequest>(&mut b, v),
        ApiKey::JoinGroup => d::<JoinGroupRequest>(&mut b, v),
        ApiKey::SyncGroup => d::<SyncGroupRequest>(&mut b, v),
        ApiKey::Heartbeat => d::<HeartbeatRequest>(&mut b, v),
        ApiKey::LeaveGroup => d::<LeaveGroupRequest>(&mut b, v),
        ApiKey::OffsetCommit => d::<OffsetCommitRequest>(&mut b, v),
        ApiKey::OffsetFetch => d::<OffsetFetchRequest>(&mut b, v),
        ApiKey::DescribeGroups => d::<DescribeGroupsRequest>(&mut b, v),
        ApiKey::ListGroups => d::<ListGroupsRequest>(&mut b, v),
        ApiKey::DeleteGroups => d::<DeleteGroupsRequest>(&mut b, v),
        ApiKey::OffsetDelete => d::<OffsetDeleteRequest>(&mut b, v),
        // Advertised but not listed here: the target is out of date.
        other => panic!("{other:?} is advertised but request_decode does not decode it"),
    }
}

/// Produced records through Sluice's RecordBatch v2 validation (length, magic, record count,
/// CRC-32C), then, for a set that passes, the in-place edits the log makes when it assigns
/// offsets, with the invariants they keep.
pub fn record_batch(records: &[u8]) {
    if batch::for_each_batch(records, true, |h| {
        let _ = (
            h.size(),
            h.is_transactional(),
            h.is_control(),
            h.compression(),
        );
    })
    .is_err()
    {
        return;
    }
    let mut owned = records.to_vec();
    // Offsets the log could assign: the start of a log and far into one.
    for log_end in [0i64, 1 << 40] {
        let mut next = Offset(log_end);
        let mut at = 0usize;
        while at < owned.len() {
            let size = batch::batch_size(&owned[at..]).expect("validated above");
            let b = &mut owned[at..at + size];
            batch::set_base_offset(b, next);
            batch::set_partition_leader_epoch(b, 7);
            let h =
                BatchHeader::parse_checked(b).expect("baseOffset and epoch are outside the CRC");
            assert_eq!(h.base_offset(), next);
            let _ = (h.last_sequence(), h.producer_id(), h.max_timestamp());
            next = h.last_offset().next();
            assert!(next.0 > log_end, "offsets only move forward");
            batch::set_log_append_time(b, 1_700_000_000_000);
            let h = BatchHeader::parse_checked(b).expect("LogAppendTime rewrites the CRC");
            assert!(h.is_log_append_time());
            at += size;
        }
    }
}

/// Replays every file in the directories or files named on the command line (default:
/// `tests/fuzz/corpus/<target>` and `tests/fuzz/artifacts/<target>`, where cargo-fuzz keeps them)
/// through `target`, and says how many ran. A crash names the file being replayed.
pub fn replay_main(name: &str, target: fn(&[u8])) {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut roots: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if roots.is_empty() {
        roots = vec![
            here.join("corpus").join(name),
            here.join("artifacts").join(name),
        ];
    }
    let mut files = Vec::new();
    for root in &roots {
        if root.is_file() {
            files.push(root.clone());
        } else if let Ok(dir) = std::fs::read_dir(root) {
            files.extend(
                dir.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.is_file()),
            );
        }
    }
    files.sort();
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("read {}: {e}", f.display()));
        eprintln!("{name}: {}", f.display());
        target(&data);
    }
    println!(
        "{name}: replayed {} inputs from {roots:?} without a crash",
        files.len()
    );
}
