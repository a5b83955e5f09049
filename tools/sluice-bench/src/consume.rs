//! One consumer: a fetch loop over a set of partitions on one leader, one Fetch in flight at a
//! time (as Kafka consumers do), no fetch sessions (full fetches, session epoch -1).
//! Counts records and fetched batch bytes; records end-to-end latency from the send time the
//! producer stamped into each batch.

use crate::produce::unix_now;
use crate::report::Stats;
use crate::setup::Conn;
use anyhow::{bail, Context, Result};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{BrokerId, FetchRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use sluice_client::check;
use sluice_protocol::batch;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct FetchSpec {
    pub topic: String,
    pub topic_id: uuid::Uuid,
    pub max_wait_ms: i32,
    pub max_bytes: i32,
    pub partition_max_bytes: i32,
    pub check_crc: bool,
    /// Record end-to-end latency (only meaningful while our producers run: e2e mode).
    pub end_to_end: bool,
    /// Stop the run once this many records were consumed (after warm-up).
    pub count: Option<u64>,
}

/// Fetches from `offsets` (partition → next offset) until stopped or `rejoin` is raised.
/// Updates `offsets` as it goes so a group member can commit them.
pub async fn fetch_loop(
    conn: &mut Conn,
    spec: &FetchSpec,
    offsets: &RefCell<BTreeMap<i32, i64>>,
    stats: &Arc<Stats>,
    rejoin: Option<&Cell<bool>>,
) -> Result<()> {
    let cap = if spec.topic_id.is_nil() {
        Some(12)
    } else {
        None
    };
    let version = conn.versions().pick::<FetchRequest>(cap)?;
    while !stats.stopped() && !rejoin.map(|r| r.get()).unwrap_or(false) {
        let mut topic = FetchTopic::default().with_partitions(
            offsets
                .borrow()
                .iter()
                .map(|(&p, &o)| {
                    FetchPartition::default()
                        .with_partition(p)
                        .with_fetch_offset(o)
                        .with_current_leader_epoch(-1)
                        .with_last_fetched_epoch(-1)
                        .with_log_start_offset(-1)
                        .with_partition_max_bytes(spec.partition_max_bytes)
                })
                .collect(),
        );
        if version >= 13 {
            topic = topic.with_topic_id(spec.topic_id);
        } else {
            topic = topic.with_topic(TopicName(StrBytes::from_string(spec.topic.clone())));
        }
        let mut req = FetchRequest::default()
            .with_max_wait_ms(spec.max_wait_ms)
            .with_min_bytes(1)
            .with_max_bytes(spec.max_bytes)
            .with_isolation_level(0)
            .with_session_id(0)
            .with_session_epoch(-1)
            .with_topics(vec![topic]);
        if version <= 14 {
            req = req.with_replica_id(BrokerId(-1));
        }
        let resp = conn.call_at(&req, version).await.context("Fetch")?;
        check(resp.error_code, "fetch", None)?;
        let (_, now_us) = unix_now();
        let mut offsets = offsets.borrow_mut();
        for t in &resp.responses {
            for p in &t.partitions {
                check(
                    p.error_code,
                    &format!("fetch of {}/{}", spec.topic, p.partition_index),
                    None,
                )?;
                let Some(next) = offsets.get_mut(&p.partition_index) else {
                    continue;
                };
                let Some(records) = &p.records else { continue };
                let fetch_offset = *next;
                let mut bad_crc = 0;
                // Fetched batches are checked with the header view (length, magic, and the
                // CRC-32C when asked); a trailing partial batch is the broker's size cut.
                batch::for_each_fetched_batch(records, false, |h| {
                    let base = h.base_offset().0;
                    let last = h.last_offset().0;
                    if last < fetch_offset {
                        return; // an earlier batch the broker included whole
                    }
                    if spec.check_crc && !h.crc_ok() {
                        bad_crc += 1;
                    }
                    let skipped = fetch_offset.saturating_sub(base).max(0);
                    let n = (h.record_count() as i64).saturating_sub(skipped).max(0) as u64;
                    *next = (*next).max(last.saturating_add(1));
                    if stats.measuring() {
                        stats.consume.add(n, h.size() as u64);
                        let sent_us = crate::batch::send_stamp_us(&h)
                            .unwrap_or(h.base_timestamp().saturating_mul(1000));
                        if spec.end_to_end && sent_us > 0 {
                            stats
                                .end_to_end
                                .latency((now_us - sent_us).max(0) as u64, n);
                        }
                    }
                })
                .map_err(|e| {
                    anyhow::anyhow!("fetched batch of {}/{}: {e}", spec.topic, p.partition_index)
                })?;
                if bad_crc > 0 {
                    bail!("{bad_crc} fetched batches failed the CRC-32C check");
                }
            }
        }
        if let Some(limit) = spec.count {
            if stats.consume.records.load(Relaxed) >= limit {
                stats.stop.store(true, Relaxed);
            }
        }
    }
    Ok(())
}
