//! DescribeLogDirs, versions 1-4 (v0 is gone from Kafka 4, KIP-896; v2+ flexible; v3 a
//! top-level error code; v4 the directory's total and usable bytes, KIP-827): the one data directory of this broker and the partitions it
//! holds there, with their size on disk. `topics` null means every partition of this broker,
//! internal topics included, as Kafka answers; a listed partition this broker does not hold is
//! left out (Kafka does the same). `offset_lag` is Kafka's for a current (not future) log:
//! `max(high watermark - log end offset, 0)`. Sluice keeps no future logs (no replica movement
//! between directories), so `is_future_key` is always false.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use bytes::Bytes;
use kafka_protocol::messages::describe_log_dirs_response::{
    DescribeLogDirsPartition, DescribeLogDirsResult, DescribeLogDirsTopic,
};
use kafka_protocol::messages::{DescribeLogDirsRequest, DescribeLogDirsResponse};

use super::common::{str_bytes, topic_name};
use crate::kafka::{Request, Response};
use crate::shard::{self, invoke_on_all};
use crate::types::TopicPartition;

/// One partition held by a shard: (topic, partition, bytes on disk, offset lag).
type Held = (String, i32, u64, i64);

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: DescribeLogDirsRequest = crate::decode_or_close!(req, b);
    // The wanted partitions, or None for all. Bounded by the request's own size.
    let wanted: Option<HashSet<TopicPartition>> = request.topics.map(|topics| {
        topics
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .map(|&p| TopicPartition::new(t.topic.0.to_string(), p))
            })
            .collect()
    });
    let wanted = std::sync::Arc::new(wanted);
    let held: Vec<Vec<Held>> = invoke_on_all(move || {
        let wanted = wanted.clone();
        async move {
            let here = shard::local();
            let logs = here.partitions.borrow();
            logs.iter()
                .filter(|(tp, _)| wanted.as_ref().as_ref().is_none_or(|w| w.contains(*tp)))
                .map(|(tp, log)| {
                    let lag = (log.high_watermark().0 - log.log_end_offset().0).max(0);
                    (tp.topic.clone(), tp.partition, log.size_bytes(), lag)
                })
                .collect()
        }
    })
    .await;
    // Topic name → its partitions, in a stable order.
    let mut by_topic: BTreeMap<String, Vec<DescribeLogDirsPartition>> = BTreeMap::new();
    for (topic, partition, size, lag) in held.into_iter().flatten() {
        by_topic.entry(topic).or_default().push(
            DescribeLogDirsPartition::default()
                .with_partition_index(partition)
                .with_partition_size(i64::try_from(size).unwrap_or(i64::MAX))
                .with_offset_lag(lag)
                .with_is_future_key(false),
        );
    }
    let topics = by_topic
        .into_iter()
        .map(|(name, mut partitions)| {
            partitions.sort_by_key(|p| p.partition_index);
            DescribeLogDirsTopic::default()
                .with_name(topic_name(&name))
                .with_partitions(partitions)
        })
        .collect();
    // Made absolute at start.
    let dir = shard::local().broker.config.data_dir.clone();
    let (total, usable) = space(&dir).await;
    let result = DescribeLogDirsResult::default()
        .with_error_code(0)
        .with_log_dir(str_bytes(&dir.to_string_lossy()))
        .with_topics(topics)
        .with_total_bytes(total)
        .with_usable_bytes(usable);
    let response = DescribeLogDirsResponse::default()
        .with_error_code(0)
        .with_results(vec![result]);
    req.respond(&response)
}

/// (total, usable) bytes of the file system holding `dir`, or Kafka's "unknown" (-1, -1) when
/// it cannot be read. statvfs runs on the blocking pool, never on the shard's reactor.
async fn space(dir: &Path) -> (i64, i64) {
    let dir = dir.to_path_buf();
    glommio::executor()
        .spawn_blocking(move || statvfs(&dir).unwrap_or((-1, -1)))
        .await
}

fn statvfs(dir: &Path) -> Option<(i64, i64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills a struct we own, from a NUL-terminated path.
    let s = unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return None;
        }
        s
    };
    let block = s.f_frsize as u64;
    let total = (s.f_blocks as u64).saturating_mul(block);
    let usable = (s.f_bavail as u64).saturating_mul(block);
    Some((
        i64::try_from(total).unwrap_or(i64::MAX),
        i64::try_from(usable).unwrap_or(i64::MAX),
    ))
}
