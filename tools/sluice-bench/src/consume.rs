//! One consumer: a fetch loop over a set of partitions on one leader, one Fetch in flight at a
//! time (as Kafka consumers do), no fetch sessions (full fetches, session epoch -1).
//! Counts records and fetched batch bytes; records end-to-end latency from the send time the
//! producer stamped into each batch. Control batches (transaction markers) are never counted;
//! under read_committed neither are the batches of aborted transactions, which the broker lists
//! beside the records ([`AbortedFilter`], as Kafka's consumers drop them).

use crate::produce::unix_now;
use crate::report::Stats;
use crate::setup::Conn;
use anyhow::{bail, Context, Result};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::fetch_response::AbortedTransaction;
use kafka_protocol::messages::{BrokerId, FetchRequest, FetchResponse, TopicName};
use kafka_protocol::protocol::StrBytes;
use sluice_client::check;
use sluice_protocol::batch;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
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
    /// Fetch isolation level: 0 read_uncommitted, 1 read_committed (up to the last stable
    /// offset, aborted transactions dropped).
    pub isolation_level: i8,
    /// Return once every partition was read up to the end the broker reported (the last
    /// stable offset under read_committed, else the high watermark).
    pub until_end: bool,
}

/// Which fetched batches a read_committed consumer delivers: not control batches, and not the
/// batches of a transaction the broker listed as aborted (from its first offset until that
/// producer's marker), as Kafka's consumers decide.
#[derive(Debug, Default)]
pub struct AbortedFilter {
    /// (first offset, producer id) not yet reached, sorted by first offset.
    pending: Vec<(i64, i64)>,
    /// Producers whose aborted transaction the walk is inside of.
    active: HashSet<i64>,
}

impl AbortedFilter {
    /// The filter of one partition's response (`None`: nothing aborted, or read_uncommitted).
    pub fn new(aborted: Option<&Vec<AbortedTransaction>>) -> AbortedFilter {
        let mut pending: Vec<(i64, i64)> = aborted
            .map(|v| {
                v.iter()
                    .map(|a| (a.first_offset, a.producer_id.0))
                    .collect()
            })
            .unwrap_or_default();
        pending.sort_unstable();
        pending.reverse(); // popped from the end, lowest offset first
        AbortedFilter {
            pending,
            active: HashSet::new(),
        }
    }

    /// Whether the batch `h` holds records a consumer delivers. Call in offset order.
    pub fn visible(&mut self, h: &batch::BatchHeader<'_>) -> bool {
        while let Some(&(first, pid)) = self.pending.last() {
            if first > h.last_offset().0 {
                break;
            }
            self.active.insert(pid);
            self.pending.pop();
        }
        if h.is_control() {
            // A marker ends the producer's transaction: what follows is not aborted.
            self.active.remove(&h.producer_id());
            return false;
        }
        !(h.is_transactional() && self.active.contains(&h.producer_id()))
    }
}

/// Picks the Fetch version for `spec` (names up to v12 when the broker reports no topic ids).
pub fn fetch_version(conn: &Conn, spec: &FetchSpec) -> Result<i16> {
    let cap = if spec.topic_id.is_nil() {
        Some(12)
    } else {
        None
    };
    conn.versions().pick::<FetchRequest>(cap)
}

/// One sessionless Fetch of `offsets` (partition → next offset); the response, its error
/// code checked.
pub async fn fetch(
    conn: &mut Conn,
    version: i16,
    spec: &FetchSpec,
    offsets: &BTreeMap<i32, i64>,
) -> Result<FetchResponse> {
    let mut topic = FetchTopic::default().with_partitions(
        offsets
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
        .with_isolation_level(spec.isolation_level)
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(vec![topic]);
    if version <= 14 {
        req = req.with_replica_id(BrokerId(-1));
    }
    let resp = conn.call_at(&req, version).await.context("Fetch")?;
    check(resp.error_code, "fetch", None)?;
    Ok(resp)
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
    let version = fetch_version(conn, spec)?;
    // Partition → the end the broker last reported (for --until-end).
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    while !stats.stopped() && !rejoin.map(|r| r.get()).unwrap_or(false) {
        let snapshot = offsets.borrow().clone();
        let resp = fetch(conn, version, spec, &snapshot).await?;
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
                ends.insert(
                    p.partition_index,
                    if spec.isolation_level == 1 {
                        p.last_stable_offset
                    } else {
                        p.high_watermark
                    },
                );
                let Some(records) = &p.records else { continue };
                let mut filter = AbortedFilter::new(if spec.isolation_level == 1 {
                    p.aborted_transactions.as_ref()
                } else {
                    None
                });
                let fetch_offset = *next;
                let mut bad_crc = 0;
                // Fetched batches are checked with the header view (length, magic, and the
                // CRC-32C when asked); a trailing partial batch is the broker's size cut.
                batch::for_each_fetched_batch(records, false, |h| {
                    let base = h.base_offset().0;
                    let last = h.last_offset().0;
                    let visible = filter.visible(&h);
                    if last < fetch_offset {
                        return; // an earlier batch the broker included whole
                    }
                    if spec.check_crc && !h.crc_ok() {
                        bad_crc += 1;
                    }
                    let skipped = fetch_offset.saturating_sub(base).max(0);
                    let n = (h.record_count() as i64).saturating_sub(skipped).max(0) as u64;
                    *next = (*next).max(last.saturating_add(1));
                    if !visible {
                        return;
                    }
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
        if spec.until_end
            && ends.len() == offsets.len()
            && offsets
                .iter()
                .all(|(p, o)| ends.get(p).is_some_and(|e| *o >= *e))
        {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchPool, BatchSpec, Compression, Keys, Payload};
    use kafka_protocol::messages::ProducerId;
    use sluice_protocol::Offset;

    /// A batch of `records` records at `base` from producer `pid`.
    fn batch_at(
        base: i64,
        records: usize,
        pid: i64,
        transactional: bool,
        control: bool,
    ) -> Vec<u8> {
        let spec = BatchSpec {
            value_bytes: 8,
            records_per_batch: records,
            compression: Compression::None,
            payload: Payload::Random,
            keys: Keys::None,
            seed: 3,
        };
        let pool = BatchPool::build_as(&spec, 1, transactional).unwrap();
        let mut b = pool.batches[0].bytes.to_vec();
        batch::set_base_offset(&mut b, Offset(base));
        batch::set_producer(&mut b, pid, 0, 0);
        batch::write_crc(&mut b);
        if control {
            batch::set_control(&mut b);
        }
        b
    }

    #[test]
    fn aborted_transactions_and_markers_are_not_delivered() {
        let batches = [
            batch_at(0, 10, 5, true, false),  // pid 5's aborted transaction
            batch_at(10, 5, 6, false, false), // a plain producer in between
            batch_at(15, 1, 5, true, true),   // pid 5's ABORT marker
            batch_at(16, 10, 5, true, false), // pid 5's next transaction, committed
            batch_at(26, 1, 5, true, true),   // its COMMIT marker
            batch_at(27, 10, 7, true, false), // pid 7: aborted, listed from offset 27
        ];
        let aborted = vec![
            AbortedTransaction::default()
                .with_producer_id(ProducerId(7))
                .with_first_offset(27),
            AbortedTransaction::default()
                .with_producer_id(ProducerId(5))
                .with_first_offset(0),
        ];
        let mut f = AbortedFilter::new(Some(&aborted));
        let seen: Vec<bool> = batches
            .iter()
            .map(|b| f.visible(&batch::BatchHeader::parse_checked(b).unwrap()))
            .collect();
        assert_eq!(seen, vec![false, true, false, true, false, false]);
        // read_uncommitted: everything but the markers.
        let mut f = AbortedFilter::new(None);
        let seen: Vec<bool> = batches
            .iter()
            .map(|b| f.visible(&batch::BatchHeader::parse_checked(b).unwrap()))
            .collect();
        assert_eq!(seen, vec![true, true, false, true, false, true]);
    }
}
