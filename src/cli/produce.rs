//! `sluice produce TOPIC`: stdin lines become records (`--key-separator` splits key from value).
//! Keyed records go to `murmur2(key) % partitions` as Kafka's default partitioner does; others
//! round-robin over partitions batch by batch.

use std::io::BufRead;

use anyhow::{bail, Result};
use bytes::Bytes;
use clap::Args;
use futures_lite::future::block_on;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ProduceRequest, TopicName};
use kafka_protocol::protocol::StrBytes;

use std::time::Instant;

use sluice_client::check;

use super::{connect, leader_moved, Leaders, LEADER_RETRY_BACKOFF, LEADER_RETRY_MAX};
use crate::protocol::builder::{BatchBuilder, BatchOptions, Record};
use crate::protocol::compression::Compression;

#[derive(Args, Debug)]
pub struct ProduceArgs {
    pub topic: String,
    #[arg(long, default_value = "127.0.0.1:9092", env = "SLUICE_BROKERS")]
    pub brokers: String,
    /// Split each line into key and value at the first occurrence of this string.
    #[arg(long)]
    pub key_separator: Option<String>,
    /// Send everything to this partition.
    #[arg(short = 'p', long)]
    pub partition: Option<i32>,
    /// 0, 1 or all.
    #[arg(long, default_value = "all")]
    pub acks: String,
    /// none, gzip, snappy, lz4 or zstd.
    #[arg(long, default_value = "none")]
    pub compression: String,
    /// Records per produce request.
    #[arg(long, default_value_t = 1000)]
    pub batch_records: usize,
}

/// Kafka's murmur2 (the Java client's default partitioner hash).
pub fn murmur2(data: &[u8]) -> i32 {
    let seed: u32 = 0x9747b28c;
    let m: u32 = 0x5bd1e995;
    let r = 24;
    let len = data.len();
    let mut h: u32 = seed ^ (len as u32);
    let chunks = len / 4;
    for i in 0..chunks {
        let mut k = u32::from_le_bytes(data[i * 4..i * 4 + 4].try_into().unwrap());
        k = k.wrapping_mul(m);
        k ^= k >> r;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m);
        h ^= k;
    }
    let tail = &data[chunks * 4..];
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(m);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(m);
    h ^= h >> 15;
    h as i32
}

pub fn run(a: ProduceArgs) -> Result<()> {
    let acks: i16 = match a.acks.as_str() {
        "0" => 0,
        "1" => 1,
        "all" | "-1" => -1,
        other => bail!("invalid --acks '{other}': expected 0, 1 or all"),
    };
    let compression: Compression = match a.compression.parse() {
        Ok(c) => c,
        Err(e) => bail!("invalid --compression: {e}"),
    };
    // Metadata with auto-creation allowed, as a producer does.
    let mut leaders = Leaders::new(connect(&a.brokers)?, &a.topic, true)?;
    let parts = leaders.partition_count();
    if let Some(p) = a.partition {
        if p < 0 || p >= parts {
            bail!(
                "partition {p} does not exist (topic {} has {parts})",
                a.topic
            );
        }
    }
    let stdin = std::io::stdin();
    let mut pending: Vec<Vec<Line>> = (0..parts).map(|_| Vec::new()).collect();
    let mut count = 0usize;
    let mut rr = 0i32;
    let mut total = 0u64;
    for line in stdin.lock().lines() {
        let line = line?;
        let (key, value) = match &a.key_separator {
            Some(sep) => match line.split_once(sep.as_str()) {
                Some((k, v)) => (Some(Bytes::from(k.to_string())), Bytes::from(v.to_string())),
                None => (None, Bytes::from(line)),
            },
            None => (None, Bytes::from(line)),
        };
        let p = match (a.partition, &key) {
            (Some(p), _) => p,
            (None, Some(k)) => (murmur2(k) & 0x7fffffff) % parts,
            (None, None) => rr,
        };
        pending[p as usize].push(Line {
            timestamp_ms: crate::types::now_ms(),
            key,
            value,
        });
        count += 1;
        if count >= a.batch_records {
            total += send(&mut leaders, &a.topic, acks, compression, &mut pending)?;
            count = 0;
            rr = (rr + 1) % parts;
        }
    }
    total += send(&mut leaders, &a.topic, acks, compression, &mut pending)?;
    eprintln!("produced {total} records to {}", a.topic);
    Ok(())
}

/// One stdin line waiting for its partition's next batch.
struct Line {
    timestamp_ms: i64,
    key: Option<Bytes>,
    value: Bytes,
}

/// Sends the pending lines, one batch per partition, each to its partition's leader; a
/// partition whose leader moved or is being elected is retried on the leader Metadata names
/// next, for up to [`LEADER_RETRY_MAX`].
fn send(
    leaders: &mut Leaders,
    topic: &str,
    acks: i16,
    compression: Compression,
    pending: &mut [Vec<Line>],
) -> Result<u64> {
    let mut todo: Vec<(i32, Bytes)> = Vec::new();
    let mut n = 0u64;
    let mut b = BatchBuilder::new(BatchOptions {
        compression,
        ..BatchOptions::default()
    });
    for (p, recs) in pending.iter_mut().enumerate() {
        if recs.is_empty() {
            continue;
        }
        for r in recs.iter() {
            b.push(&Record {
                key: r.key.as_deref(),
                value: Some(&r.value),
                headers: &[],
                timestamp_ms: r.timestamp_ms,
            });
        }
        todo.push((p as i32, Bytes::from(b.finish()?)));
        n += recs.len() as u64;
        recs.clear();
    }
    let deadline = Instant::now() + LEADER_RETRY_MAX;
    let mut last_error = String::new();
    while !todo.is_empty() {
        let parts: Vec<i32> = todo.iter().map(|t| t.0).collect();
        let mut retry = Vec::new();
        for (node, ps) in leaders.by_leader(&parts) {
            let (mine, rest): (Vec<_>, Vec<_>) = todo.into_iter().partition(|t| ps.contains(&t.0));
            todo = rest;
            let Some(node) = node else {
                last_error = format!("no leader for {topic}-{}", ps[0]);
                retry.extend(mine);
                continue;
            };
            match send_to(leaders, node, topic, acks, &mine) {
                Ok(moved) => {
                    for (p, code) in moved {
                        last_error = format!(
                            "produce to {topic}-{p}: {}",
                            sluice_client::error_name(code)
                        );
                        retry.extend(mine.iter().filter(|t| t.0 == p).cloned());
                    }
                }
                Err(SendError::Io(e)) => {
                    // The leader went away: ask again who leads.
                    leaders.drop_conn(node);
                    last_error = format!("{e:#}");
                    retry.extend(mine);
                }
                Err(SendError::Failed(e)) => return Err(e),
            }
        }
        if retry.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            bail!("{last_error} (still failing after {LEADER_RETRY_MAX:?})");
        }
        std::thread::sleep(LEADER_RETRY_BACKOFF);
        leaders.refresh(false)?;
        todo = retry;
    }
    Ok(n)
}

enum SendError {
    /// The connection failed: worth retrying on the leader Metadata names next.
    Io(anyhow::Error),
    /// The broker refused the records for good.
    Failed(anyhow::Error),
}

/// One Produce request of `batches` to leader `node`: the partitions it answered with a
/// leader-moved error (to retry), or the error that fails the command.
fn send_to(
    leaders: &mut Leaders,
    node: i32,
    topic: &str,
    acks: i16,
    batches: &[(i32, Bytes)],
) -> std::result::Result<Vec<(i32, i16)>, SendError> {
    let data = batches
        .iter()
        .map(|(p, b)| {
            PartitionProduceData::default()
                .with_index(*p)
                .with_records(Some(b.clone()))
        })
        .collect();
    let req = ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partition_data(data)]);
    let c = leaders.conn(node).map_err(SendError::Io)?;
    let v = c
        .versions()
        .pick_in::<ProduceRequest>(3, 11)
        .map_err(SendError::Failed)?;
    if acks == 0 {
        block_on(c.send_only(&req, v)).map_err(SendError::Io)?;
        return Ok(vec![]);
    }
    let resp = block_on(c.call_at(&req, v)).map_err(SendError::Io)?;
    let mut moved = Vec::new();
    for t in &resp.responses {
        for p in &t.partition_responses {
            if leader_moved(p.error_code) {
                moved.push((p.index, p.error_code));
                continue;
            }
            check(
                p.error_code,
                &format!("produce to {topic}-{}", p.index),
                p.error_message.as_ref(),
            )
            .map_err(SendError::Failed)?;
        }
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    // Values from the Java client's Utils.murmur2 test vectors.
    #[test]
    fn murmur2_matches_kafka() {
        assert_eq!(super::murmur2(b"21"), -973932308);
        assert_eq!(super::murmur2(b"foobar"), -790332482);
        assert_eq!(super::murmur2(b"a-little-bit-long-string"), -985981536);
        assert_eq!(super::murmur2(b"a-little-bit-longer-string"), -1486304829);
        assert_eq!(
            super::murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            -58897971
        );
        assert_eq!(super::murmur2(b"abc"), 479470107);
    }
}
