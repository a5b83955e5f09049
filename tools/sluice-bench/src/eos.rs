//! `exactly-once`: consume-transform-produce workers, Kafka's exactly-once loop.
//!
//! Each worker is a classic group member with its own transactional producer. Per transaction
//! it fetches up to `txn_records` records of its partitions (whole batches; read_committed by
//! default), adds the output partitions, writes every input batch as a transactional batch of
//! output partition `input partition mod output partitions` (the transform is the identity on
//! records: the batch header is rewritten for the producer, the records are copied), adds the
//! group to the transaction, commits the next input offsets with TxnOffsetCommit, and ends the
//! transaction. After an abort the worker reads again from the offsets of its last commit, so
//! every input record reaches the output exactly once among committed transactions.

use crate::cli::StartFrom;
use crate::consume::{self, AbortedFilter, FetchSpec};
use crate::group::{self, HEARTBEAT_INTERVAL};
use crate::produce::SentCounter;
use crate::report::Stats;
use crate::setup::{self, Conn, TopicInfo};
use crate::txn::{Retry, TxnCall, TxnCoordinator};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ProduceRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use sluice_client::error::{code, kafka_code};
use sluice_client::txn::{self as ktxn, GroupMember, TxnProducer};
use sluice_client::{admin, check, error_name, group as kgroup};
use sluice_protocol::batch::{self, BatchHeader};
use sluice_protocol::Offset;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Produce requests in flight per output connection (the idempotent producer's limit).
const OUTPUT_IN_FLIGHT_MAX: usize = 5;

/// Everything one worker needs; plain data so it can cross to its executor.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub brokers: String,
    pub group: String,
    pub transactional_id: String,
    pub input: TopicInfo,
    pub output: TopicInfo,
    pub txn_records: u64,
    pub abort_every: u64,
    pub transaction_timeout_ms: i32,
    pub from: StartFrom,
    /// The input fetches (topic, isolation level, sizes, wait).
    pub fetch: FetchSpec,
    pub request_timeout_ms: i32,
    pub connect_timeout: Duration,
    /// Stop once this many input records were committed by all workers together.
    pub count: Option<u64>,
}

/// Group membership and transaction codes after which the worker joins the group again.
fn rejoin_code(c: i16) -> bool {
    matches!(
        c,
        code::ILLEGAL_GENERATION | code::UNKNOWN_MEMBER_ID | code::REBALANCE_IN_PROGRESS
    )
}

/// What one transaction read: the input batches (input partition, bytes), their record and
/// byte counts, and the input positions after them.
#[derive(Default)]
struct Input {
    batches: Vec<(i32, Bytes)>,
    records: u64,
    bytes: u64,
    next: BTreeMap<i32, i64>,
}

/// Takes the visible batches of one fetched partition from `pos` on into `input`, until it
/// holds `limit` records; moves `pos` past every batch taken or skipped.
fn take_batches(
    records: &[u8],
    filter: &mut AbortedFilter,
    partition: i32,
    pos: &mut i64,
    limit: u64,
    input: &mut Input,
) -> Result<()> {
    let mut full = false;
    batch::for_each_fetched_batch(records, false, |h| {
        let visible = filter.visible(&h);
        if full || h.last_offset().0 < *pos {
            return;
        }
        if visible && input.records >= limit {
            full = true; // left for the next transaction
            return;
        }
        *pos = h.last_offset().0.saturating_add(1);
        if visible {
            input.records += h.record_count().max(0) as u64;
            input.bytes += h.size() as u64;
            input
                .batches
                .push((partition, Bytes::copy_from_slice(h.bytes())));
        }
    })
    .map_err(|e| anyhow::anyhow!("fetched batch of partition {partition}: {e}"))?;
    Ok(())
}

/// The input batch rewritten as the transactional producer's batch: offset 0, no leader epoch,
/// producer id, epoch and `sequence`, transactional; records unchanged.
pub fn rewrite(input: &[u8], p: &TxnProducer, sequence: i32) -> Result<Vec<u8>> {
    BatchHeader::parse(input).map_err(|e| anyhow::anyhow!("input batch: {e}"))?;
    let mut b = input.to_vec();
    batch::set_base_offset(&mut b, Offset(0));
    batch::set_partition_leader_epoch(&mut b, -1);
    batch::set_producer(&mut b, p.producer_id, p.epoch, sequence);
    batch::set_transactional(&mut b, true);
    Ok(b)
}

/// Runs one worker until the run stops (or the shared count is reached).
pub async fn run_worker(w: WorkerSpec, stats: Arc<Stats>, processed: SentCounter) -> Result<()> {
    let what = format!("exactly-once worker {}", w.transactional_id);
    worker(&w, &stats, &processed).await.context(what)
}

async fn worker(w: &WorkerSpec, stats: &Arc<Stats>, processed: &SentCounter) -> Result<()> {
    let timeout = w.connect_timeout;
    let mut boot = setup::bootstrap(&w.brokers, timeout).await?;
    let gaddr = group::find_coordinator(&mut boot, &w.group).await?;
    drop(boot);
    let mut gconn = setup::connect(&gaddr, timeout).await?;
    let mut tc = TxnCoordinator::connect(&w.brokers, &w.transactional_id, timeout).await?;
    let producer = tc.init(w.transaction_timeout_ms).await?;
    let mut fetchers: BTreeMap<String, Conn> = BTreeMap::new();
    let mut outputs: BTreeMap<String, Conn> = BTreeMap::new();
    let mut sequences: HashMap<i32, i32> = HashMap::new();
    let mut member_id = String::new();
    let mut last_commit: Option<Instant> = None;
    let mut k = 0u64;
    'join: while !stats.stopped() {
        let m = group::join(&mut gconn, &w.group, &w.input, &member_id).await?;
        member_id = m.member_id.clone();
        if m.partitions.is_empty() {
            // More workers than partitions: idle until the next rebalance.
            let c = group::heartbeat(&mut gconn, &w.group, &m).await?;
            if c == code::NONE {
                glommio::timer::sleep(HEARTBEAT_INTERVAL).await;
            }
            continue;
        }
        let leader = w
            .input
            .partitions
            .iter()
            .find(|p| p.index == m.partitions[0])
            .map(|p| p.leader.clone())
            .context("assigned partition not in topic metadata")?;
        if !fetchers.contains_key(&leader) {
            fetchers.insert(leader.clone(), setup::connect(&leader, timeout).await?);
        }
        let fconn = fetchers.get_mut(&leader).expect("inserted above");
        let fetch_version = consume::fetch_version(fconn, &w.fetch)?;
        let mut positions = stable_committed(&mut gconn, w, &m.partitions).await?;
        let missing: Vec<i32> = m
            .partitions
            .iter()
            .copied()
            .filter(|p| !positions.contains_key(p))
            .collect();
        if !missing.is_empty() {
            let ts = if w.from == StartFrom::Earliest {
                admin::EARLIEST
            } else {
                admin::LATEST
            };
            positions.extend(admin::offsets(fconn, &w.input.name, &missing, ts).await?);
        }
        let mut last_heartbeat = Instant::now();
        while !stats.stopped() {
            if last_heartbeat.elapsed() >= HEARTBEAT_INTERVAL {
                if group::heartbeat(&mut gconn, &w.group, &m).await? != code::NONE {
                    continue 'join;
                }
                last_heartbeat = Instant::now();
            }
            // Read up to txn_records records; a fetch that brings nothing new ends the read.
            let mut input = Input {
                next: positions.clone(),
                ..Input::default()
            };
            loop {
                let resp = consume::fetch(fconn, fetch_version, &w.fetch, &input.next).await?;
                let before = input.next.clone();
                for t in &resp.responses {
                    for p in &t.partitions {
                        check(
                            p.error_code,
                            &format!("fetch of {}/{}", w.input.name, p.partition_index),
                            None,
                        )?;
                        let Some(records) = &p.records else { continue };
                        let Some(pos) = input.next.get(&p.partition_index).copied() else {
                            continue;
                        };
                        let mut pos = pos;
                        let mut filter = AbortedFilter::new(if w.fetch.isolation_level == 1 {
                            p.aborted_transactions.as_ref()
                        } else {
                            None
                        });
                        take_batches(
                            records,
                            &mut filter,
                            p.partition_index,
                            &mut pos,
                            w.txn_records,
                            &mut input,
                        )?;
                        input.next.insert(p.partition_index, pos);
                    }
                }
                if input.records >= w.txn_records || input.next == before || stats.stopped() {
                    break;
                }
            }
            if input.next == positions {
                continue; // nothing new (the fetch waited for it)
            }
            let member = GroupMember {
                group: &w.group,
                generation: m.generation,
                member_id: &m.member_id,
            };
            let commit = !(w.abort_every > 0 && (k + 1).is_multiple_of(w.abort_every));
            match transaction(
                w,
                &mut tc,
                &producer,
                &mut gconn,
                member,
                &mut outputs,
                &mut sequences,
                &input,
                stats,
                &mut last_commit,
                commit,
            )
            .await?
            {
                Outcome::Committed => {
                    positions = input.next;
                    let total = processed.fetch_add(input.records, Relaxed) + input.records;
                    if stats.measuring() {
                        stats.consume.add(input.records, input.bytes);
                    }
                    if w.count.is_some_and(|limit| total >= limit) {
                        stats.stop.store(true, Relaxed);
                    }
                }
                Outcome::Aborted => {} // read again from the committed positions
                Outcome::Rejoin => continue 'join,
            }
            k += 1;
        }
    }
    if !member_id.is_empty() {
        kgroup::leave_group(&mut gconn, &w.group, &member_id).await?;
    }
    Ok(())
}

/// The group's committed offsets of `partitions`, waiting while a transaction that holds one
/// of them completes (OffsetFetch `require_stable`), so a worker never starts from an offset
/// about to change.
async fn stable_committed(
    gconn: &mut Conn,
    w: &WorkerSpec,
    partitions: &[i32],
) -> Result<BTreeMap<i32, i64>> {
    let mut retry = Retry::new();
    loop {
        let asked = Some(vec![(w.input.name.clone(), partitions.to_vec())]);
        match admin::committed_as(gconn, &w.group, asked, true).await {
            Ok(all) => {
                return Ok(all
                    .into_iter()
                    .filter(|((t, _), o)| *t == w.input.name && *o >= 0)
                    .map(|((_, p), o)| (p, o))
                    .collect())
            }
            Err(e) if kafka_code(&e) == Some(code::UNSTABLE_OFFSET_COMMIT) && !retry.expired() => {
                retry.wait().await
            }
            Err(e) => return Err(e),
        }
    }
}

enum Outcome {
    Committed,
    Aborted,
    /// The group moved on (rebalance, fenced generation): the transaction was aborted.
    Rejoin,
}

/// One transaction over `input`: output batches, the consumed offsets, EndTxn.
#[allow(clippy::too_many_arguments)]
async fn transaction(
    w: &WorkerSpec,
    tc: &mut TxnCoordinator,
    producer: &TxnProducer,
    gconn: &mut Conn,
    member: GroupMember<'_>,
    outputs: &mut BTreeMap<String, Conn>,
    sequences: &mut HashMap<i32, i32>,
    input: &Input,
    stats: &Arc<Stats>,
    last_commit: &mut Option<Instant>,
    commit: bool,
) -> Result<Outcome> {
    let outs = &w.output.partitions;
    let mut by_partition: BTreeMap<i32, Vec<&Bytes>> = BTreeMap::new();
    for (p, b) in &input.batches {
        let out = &outs[p.rem_euclid(outs.len() as i32) as usize];
        by_partition.entry(out.index).or_default().push(b);
    }
    let partitions: Vec<i32> = by_partition.keys().copied().collect();
    if !partitions.is_empty() {
        tc.call(
            producer,
            TxnCall::AddPartitions {
                topic: &w.output.name,
                partitions: &partitions,
            },
        )
        .await?;
    } else {
        tc.call(producer, TxnCall::AddOffsets { group: &w.group })
            .await?;
    }
    if let Some(sent_at) = last_commit.take() {
        if stats.measuring() {
            stats
                .txn_complete
                .latency(sent_at.elapsed().as_micros() as u64, 1);
        }
    }
    // Output batches, pipelined per leader connection.
    let mut by_leader: BTreeMap<String, Vec<(i32, Vec<u8>)>> = BTreeMap::new();
    for (p, batches) in &by_partition {
        let leader = outs
            .iter()
            .find(|x| x.index == *p)
            .map(|x| x.leader.clone())
            .context("output partition not in topic metadata")?;
        for b in batches {
            let seq = sequences.entry(*p).or_insert(0);
            let out = rewrite(b, producer, *seq)?;
            let n = BatchHeader::parse(&out)
                .map(|h| h.record_count().max(0) as i64)
                .unwrap_or(0);
            *seq = ((*seq as i64 + n) % (i32::MAX as i64 + 1)) as i32;
            by_leader.entry(leader.clone()).or_default().push((*p, out));
        }
    }
    for (leader, batches) in by_leader {
        if !outputs.contains_key(&leader) {
            outputs.insert(
                leader.clone(),
                setup::connect(&leader, w.connect_timeout).await?,
            );
        }
        let conn = outputs.get_mut(&leader).expect("inserted above");
        let version = conn
            .versions()
            .pick::<ProduceRequest>(Some(ktxn::PRODUCE_TXN_V1_MAX))?;
        for chunk in batches.chunks(OUTPUT_IN_FLIGHT_MAX) {
            let sent = Instant::now();
            let mut pending = Vec::with_capacity(chunk.len());
            for (p, b) in chunk {
                let req = ProduceRequest::default()
                    .with_transactional_id(Some(kafka_protocol::messages::TransactionalId(
                        StrBytes::from_string(producer.transactional_id.clone()),
                    )))
                    .with_acks(-1)
                    .with_timeout_ms(w.request_timeout_ms)
                    .with_topic_data(vec![TopicProduceData::default()
                        .with_name(TopicName(StrBytes::from_string(w.output.name.clone())))
                        .with_partition_data(vec![PartitionProduceData::default()
                            .with_index(*p)
                            .with_records(Some(Bytes::copy_from_slice(b)))])]);
                let records = BatchHeader::parse(b)
                    .map(|h| h.record_count().max(0) as u64)
                    .unwrap_or(0);
                pending.push((conn.send(&req, version).await?, records, b.len() as u64));
            }
            for (req, records, bytes) in pending {
                let resp = conn.recv(req).await.context("Produce")?;
                let err = resp
                    .responses
                    .iter()
                    .flat_map(|t| t.partition_responses.iter())
                    .map(|p| p.error_code)
                    .find(|&e| e != code::NONE)
                    .unwrap_or(code::NONE);
                if err != code::NONE {
                    bail!(
                        "produce to {} in a transaction failed: {}",
                        w.output.name,
                        error_name(err)
                    );
                }
                if stats.measuring() {
                    stats.publish.add(records, bytes);
                    stats
                        .publish
                        .latency(sent.elapsed().as_micros() as u64, records);
                }
            }
        }
    }
    if !partitions.is_empty() {
        tc.call(producer, TxnCall::AddOffsets { group: &w.group })
            .await?;
    }
    // The consumed offsets, committed with the output.
    let mut retry = Retry::new();
    loop {
        let c = ktxn::txn_offset_commit(
            gconn,
            producer,
            member,
            &w.input.name,
            input.next.iter().map(|(&p, &o)| (p, o)),
        )
        .await?;
        if c == code::NONE {
            break;
        }
        if rejoin_code(c) {
            tc.call(producer, TxnCall::End { commit: false }).await?;
            if stats.measuring() {
                stats.txns_aborted.fetch_add(1, Relaxed);
            }
            return Ok(Outcome::Rejoin);
        }
        if !ktxn::retriable(c) || retry.expired() {
            check(c, "TxnOffsetCommit", None)?;
        }
        retry.wait().await;
    }
    let end_sent = Instant::now();
    tc.call(producer, TxnCall::End { commit }).await?;
    let took = end_sent.elapsed();
    if !commit {
        if stats.measuring() {
            stats.txns_aborted.fetch_add(1, Relaxed);
        }
        return Ok(Outcome::Aborted);
    }
    if stats.measuring() {
        stats.txn.add(input.records, input.bytes);
        stats.txn.latency(took.as_micros() as u64, 1);
        stats.txns_committed.fetch_add(1, Relaxed);
    }
    *last_commit = Some(end_sent);
    Ok(Outcome::Committed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchPool, BatchSpec, Compression, Keys, Payload};

    fn pool(records: usize, batches: usize) -> Vec<Vec<u8>> {
        let spec = BatchSpec {
            value_bytes: 16,
            records_per_batch: records,
            compression: Compression::None,
            payload: Payload::Random,
            keys: Keys::None,
            seed: 2,
        };
        let p = BatchPool::build(&spec, batches).unwrap();
        p.batches.iter().map(|b| b.bytes.to_vec()).collect()
    }

    /// `batches` laid out as a fetched log from offset `base`.
    fn log(batches: &[Vec<u8>], base: i64) -> Vec<u8> {
        let mut out = vec![];
        let mut at = base;
        for b in batches {
            let mut b = b.clone();
            batch::set_base_offset(&mut b, Offset(at));
            at += BatchHeader::parse(&b).unwrap().record_count() as i64;
            out.extend_from_slice(&b);
        }
        out
    }

    #[test]
    fn a_transaction_takes_whole_batches_up_to_its_record_count() {
        let fetched = log(&pool(10, 5), 100);
        let mut input = Input::default();
        let mut pos = 100;
        let mut filter = AbortedFilter::new(None);
        take_batches(&fetched, &mut filter, 3, &mut pos, 25, &mut input).unwrap();
        // Three batches reach 25 records; the rest waits for the next transaction.
        assert_eq!((input.records, input.batches.len(), pos), (30, 3, 130));
        assert!(input.batches.iter().all(|(p, _)| *p == 3));
        // Batches before the position are not taken again.
        let mut again = Input::default();
        let mut pos = 120;
        take_batches(&fetched, &mut filter, 3, &mut pos, 1000, &mut again).unwrap();
        assert_eq!((again.records, pos), (30, 150));
    }

    #[test]
    fn rewritten_batch_is_the_producers_and_keeps_its_records() {
        let b = log(&pool(4, 1), 77);
        let p = TxnProducer {
            transactional_id: "t".into(),
            producer_id: 42,
            epoch: 3,
        };
        let out = rewrite(&b, &p, 8).unwrap();
        let h = BatchHeader::parse_checked(&out).unwrap();
        assert_eq!(h.base_offset(), Offset(0));
        assert_eq!(
            (h.producer_id(), h.producer_epoch(), h.base_sequence()),
            (42, 3, 8)
        );
        assert!(h.is_transactional());
        assert_eq!(
            &out[batch::HEADER_BYTES..],
            &b[batch::HEADER_BYTES..],
            "records unchanged"
        );
        assert!(rewrite(&b[..20], &p, 0).is_err());
    }
}
