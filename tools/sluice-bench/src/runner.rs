//! Runs a workload: set-up on one executor (bootstrap, topic metadata), then one glommio
//! executor per core, each running its share of producer lanes and consumers, while the main
//! thread prints a live line every second and decides warm-up end and stop.

use crate::batch::{BatchPool, BatchSpec};
use crate::cli::{
    AckMode, Common, ConsumeOpts, ExactlyOnceOpts, ProduceOpts, ShareOpts, StartFrom, TxnOpts,
};
use crate::consume::{self, FetchSpec};
use crate::eos;
use crate::group;
use crate::produce::{self, LaneSpec, SentCounter};
use crate::report::{self, LiveLine, Stats, Summary};
use crate::setup::{self, TopicInfo};
use crate::share;
use crate::txn::{self, TxnLane, TxnPools};
use anyhow::{anyhow, Context, Result};
use glommio::{LocalExecutorBuilder, Placement};
use serde_json::json;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One consumer's job: either directly assigned partitions or a group membership.
#[derive(Debug, Clone)]
enum ConsumerJob {
    Assigned {
        leader: String,
        partitions: Vec<i32>,
    },
    Member {
        group: String,
    },
}

#[derive(Default)]
struct CoreWork {
    lanes: Vec<LaneSpec>,
    consumers: Vec<ConsumerJob>,
    workers: Vec<eos::WorkerSpec>,
    share_members: Vec<share::MemberSpec>,
}

fn executor(cpu: Option<usize>, name: &str) -> LocalExecutorBuilder {
    let placement = match cpu {
        Some(c) => Placement::Fixed(c),
        None => Placement::Unbound,
    };
    // Small io_uring buffer area: the client does network I/O only.
    LocalExecutorBuilder::new(placement)
        .name(name)
        .io_memory(2 << 20)
}

/// Runs `f` to completion on a fresh executor on `cpu` (used for set-up).
fn run_on<T: Send + 'static, F, Fut>(cpu: Option<usize>, f: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>> + 'static,
{
    executor(cpu, "bench-setup")
        .spawn(f)
        .map_err(|e| anyhow!("cannot start executor: {e}"))?
        .join()
        .map_err(|e| anyhow!("set-up executor failed: {e}"))?
}

/// Splits partitions over producers: with at least as many partitions as producers each
/// producer gets every N-th partition, otherwise producer i writes partition i mod P.
pub fn split_partitions(partitions: &[i32], producers: usize) -> Vec<Vec<i32>> {
    (0..producers)
        .map(|i| {
            if partitions.len() >= producers {
                partitions
                    .iter()
                    .copied()
                    .skip(i)
                    .step_by(producers)
                    .collect()
            } else {
                vec![partitions[i % partitions.len()]]
            }
        })
        .collect()
}

pub struct Workload {
    pub common: Common,
    pub produce: Option<ProduceOpts>,
    pub consume: Option<ConsumeOpts>,
    /// `exactly-once`: consume-transform-produce workers.
    pub exactly_once: Option<(TxnOpts, ExactlyOnceOpts)>,
    /// `share-consume`: share-group members.
    pub share: Option<ShareOpts>,
}

pub fn run(w: Workload) -> Result<Summary> {
    let cpus = w.common.validate()?;
    if let Some(p) = &w.produce {
        p.validate()?;
    }
    if let Some(c) = &w.consume {
        c.validate()?;
    }
    if let Some((t, e)) = &w.exactly_once {
        t.validate()?;
        e.validate()?;
    }
    if let Some(s) = &w.share {
        s.validate()?;
    }
    let cores = w.common.cores;
    let cpu_of = |i: usize| cpus.as_ref().map(|c| c[i % c.len()]);

    // Set-up: bootstrap and topic metadata (creating the topic when producing).
    let (brokers, topic, timeout) = (
        w.common.brokers.clone(),
        w.common.topic.clone(),
        w.common.connect_timeout,
    );
    let create = w
        .produce
        .as_ref()
        .map(|p| (p.partitions, p.replication_factor));
    let output = w.exactly_once.as_ref().map(|(_, e)| {
        (
            e.output_topic.clone(),
            e.output_partitions,
            e.replication_factor,
        )
    });
    let group_configs = w
        .share
        .as_ref()
        .map(|s| (s.group.clone(), share_configs(s)));
    let (info, output): (TopicInfo, Option<TopicInfo>) = run_on(cpu_of(0), move || async move {
        let mut c = setup::bootstrap(&brokers, timeout).await?;
        let info = setup::topic_info(&mut c, &topic, create).await?;
        if let Some((group, ops)) = group_configs {
            let addr = group::find_coordinator(&mut c, &group).await?;
            let mut coord = setup::connect(&addr, timeout).await?;
            sluice_client::admin::alter_group_configs(&mut coord, &group, &ops)
                .await
                .with_context(|| format!("configs of share group {group}"))?;
        }
        let output = match output {
            Some((name, partitions, rf)) => {
                let n = partitions.unwrap_or(info.partitions.len() as i32);
                Some(setup::topic_info(&mut c, &name, Some((n, rf))).await?)
            }
            None => None,
        };
        Ok((info, output))
    })?;
    let all: Vec<i32> = info.partitions.iter().map(|p| p.index).collect();
    let leader_of = |p: i32| {
        info.partitions
            .iter()
            .find(|x| x.index == p)
            .map(|x| x.leader.clone())
            .unwrap_or_default()
    };

    let mut work: Vec<CoreWork> = (0..cores).map(|_| CoreWork::default()).collect();
    let mut records_per_batch = 1;
    if let Some(p) = &w.produce {
        records_per_batch = p.records_per_batch();
        if p.transactional {
            // A transaction of fewer records than a batch is one smaller batch.
            records_per_batch = records_per_batch.min(p.txn.txn_records as usize);
        }
        let mut lanes = vec![];
        for parts in split_partitions(&all, p.producers) {
            let mut by_leader: BTreeMap<String, Vec<i32>> = BTreeMap::new();
            for q in parts {
                by_leader.entry(leader_of(q)).or_default().push(q);
            }
            lanes.extend(by_leader);
        }
        let nlanes = lanes.len();
        let mut sends_per_sec = None;
        if let Some(rate) = p.rate {
            let lane_records = rate.records_per_sec(p.size) / nlanes as f64;
            // At a fixed rate a batch leaves when full or after linger: fewer records per batch.
            let lingered = (lane_records * p.linger_ms as f64 / 1000.0)
                .floor()
                .max(1.0) as usize;
            records_per_batch = records_per_batch.min(lingered);
            sends_per_sec = Some(lane_records / records_per_batch as f64);
        }
        for (i, (leader, partitions)) in lanes.into_iter().enumerate() {
            work[i % cores].lanes.push(LaneSpec {
                leader,
                topic: info.name.clone(),
                topic_id: info.id,
                partitions,
                all_partitions: all.clone(),
                acks: p.acks.wire(),
                timeout_ms: p.request_timeout_ms,
                max_in_flight: p.max_in_flight,
                idempotent: p.idempotent || p.transactional,
                sends_per_sec,
                connect_timeout: w.common.connect_timeout,
                count: w.common.count,
                txn: p.transactional.then(|| TxnLane {
                    transactional_id: p.txn.id_of(&info.name, i),
                    brokers: w.common.brokers.clone(),
                    records: p.txn.txn_records,
                    abort_every: p.txn.abort_every,
                    timeout_ms: p.txn.transaction_timeout_ms,
                }),
            });
        }
    }
    let mut consumers = 0;
    if let Some(c) = &w.consume {
        // Without a group, never more consumers than partitions (each partition read once).
        let direct = split_partitions(&all, c.consumers.min(all.len()));
        for i in 0..c.consumers {
            let job = match &c.group {
                Some(g) => ConsumerJob::Member { group: g.clone() },
                None => {
                    let Some(parts) = direct.get(i) else {
                        continue;
                    };
                    // One fetch connection per leader of this consumer's partitions.
                    let mut by_leader: BTreeMap<String, Vec<i32>> = BTreeMap::new();
                    for &p in parts {
                        by_leader.entry(leader_of(p)).or_default().push(p);
                    }
                    for (leader, partitions) in by_leader {
                        work[(i + cores - 1) % cores]
                            .consumers
                            .push(ConsumerJob::Assigned { leader, partitions });
                        // Counted per job: each reports itself ready once positioned.
                        consumers += 1;
                    }
                    continue;
                }
            };
            work[(i + cores - 1) % cores].consumers.push(job);
            consumers += 1;
        }
    }

    if let (Some((t, e)), Some(output)) = (&w.exactly_once, &output) {
        for i in 0..e.workers {
            work[i % cores].workers.push(eos::WorkerSpec {
                brokers: w.common.brokers.clone(),
                group: e.group.clone(),
                transactional_id: t.id_of(&info.name, i),
                input: info.clone(),
                output: output.clone(),
                txn_records: t.txn_records,
                abort_every: t.abort_every,
                transaction_timeout_ms: t.transaction_timeout_ms,
                from: e.from,
                fetch: FetchSpec {
                    topic: info.name.clone(),
                    topic_id: info.id,
                    max_wait_ms: e.fetch_max_wait_ms,
                    max_bytes: e
                        .partition_max_bytes
                        .saturating_mul(info.partitions.len() as u64)
                        .min(i32::MAX as u64) as i32,
                    partition_max_bytes: e.partition_max_bytes as i32,
                    check_crc: false,
                    end_to_end: false,
                    count: None,
                    isolation_level: e.isolation_level.wire(),
                    until_end: false,
                },
                request_timeout_ms: e.request_timeout_ms,
                connect_timeout: w.common.connect_timeout,
                count: w.common.count,
            });
        }
    }
    if let Some(s) = &w.share {
        let limits = sluice_client::share::FetchLimits {
            max_wait_ms: s.fetch_max_wait_ms,
            min_bytes: 1,
            max_bytes: s.fetch_max_bytes as i32,
            partition_max_bytes: s.partition_max_bytes as i32,
            max_records: s.max_records,
            batch_size: s.max_records,
        };
        for i in 0..s.consumers {
            work[(i + cores - 1) % cores]
                .share_members
                .push(share::MemberSpec {
                    brokers: w.common.brokers.clone(),
                    group: s.group.clone(),
                    topic: info.clone(),
                    limits,
                    explicit_acks: s.ack_mode == AckMode::Explicit,
                    reject_ratio: s.reject_ratio,
                    release_ratio: s.release_ratio,
                    hold: i < s.hold,
                    connect_timeout: w.common.connect_timeout,
                    count: w.common.count,
                });
        }
    }
    let shared = Arc::new(share::Shared::new(
        w.share.as_ref().map(|s| s.hold).unwrap_or(0),
    ));
    let stats = Arc::new(Stats::new(!w.common.warmup.is_zero()));
    let sent: SentCounter = Default::default();
    let consumers_ready = Arc::new(AtomicUsize::new(0));
    let cores_done = Arc::new(AtomicUsize::new(0));
    let is_e2e = w.produce.is_some() && w.consume.is_some();
    let mut handles = vec![];
    for (core, cw) in work.into_iter().enumerate() {
        let p = w.produce.clone();
        let c = w.consume.clone();
        let common = w.common.clone();
        let (stats, sent, ready, done, info, shared) = (
            stats.clone(),
            sent.clone(),
            consumers_ready.clone(),
            cores_done.clone(),
            info.clone(),
            shared.clone(),
        );
        let h = executor(cpu_of(core), &format!("bench-{core}"))
            .spawn(move || async move {
                let r = core_main(
                    core,
                    cw,
                    p,
                    c,
                    common,
                    records_per_batch,
                    info,
                    stats.clone(),
                    sent,
                    ready.clone(),
                    consumers,
                    is_e2e,
                    shared,
                )
                .await;
                if let Err(e) = &r {
                    stats.fail(format!("{e:#}"));
                }
                done.fetch_add(1, Relaxed);
            })
            .map_err(|e| anyhow!("cannot start executor on core {core}: {e}"))?;
        handles.push(h);
    }

    // Main thread: warm-up, live lines, stop.
    let run_time = w.common.run_time();
    let mut live = LiveLine::new();
    let started = Instant::now();
    // In e2e mode the clock starts when consumers are positioned.
    while is_e2e
        && consumers_ready.load(Relaxed) < consumers
        && !stats.stopped()
        && cores_done.load(Relaxed) < cores
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut measure_start = if w.common.warmup.is_zero() {
        Some(Instant::now())
    } else {
        None
    };
    let warm_end = Instant::now() + w.common.warmup;
    let mut next_line = Instant::now() + Duration::from_secs(1);
    loop {
        if cores_done.load(Relaxed) >= cores || stats.stopped() {
            break;
        }
        let now = Instant::now();
        if measure_start.is_none() && now >= warm_end {
            stats.start_measuring();
            measure_start = Some(now);
        }
        if let (Some(m), Some(rt)) = (measure_start, run_time) {
            if now >= m + rt {
                break;
            }
        }
        if now >= next_line {
            let line = live.line(&stats);
            if !w.common.quiet {
                eprintln!("{line}");
            }
            next_line += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let measured_end = Instant::now();
    stats.stop.store(true, Relaxed);
    for h in handles {
        let _ = h.join();
    }
    if let Some(e) = stats.fatal() {
        return Err(anyhow!(e));
    }
    let elapsed = measure_start
        .map(|m| measured_end.duration_since(m))
        .unwrap_or_default();
    let config = json!({
        "brokers": w.common.brokers, "topic": w.common.topic, "cores": cores,
        "partitions": all.len(), "recordsPerBatch": records_per_batch,
        "produce": w.produce.as_ref().map(|p| json!({
            "producers": p.producers, "recordBytes": p.size, "batchBytes": p.batch_bytes,
            "acks": format!("{:?}", p.acks), "compression": format!("{:?}", p.compression),
            "payload": format!("{:?}", p.payload), "rate": p.rate.map(|r| format!("{r:?}")),
            "idempotent": p.idempotent, "maxInFlight": p.max_in_flight, "lingerMs": p.linger_ms,
        })),
        "consume": w.consume.as_ref().map(|c| json!({
            "consumers": c.consumers, "group": c.group, "from": format!("{:?}", c.from),
            "fetchMaxBytes": c.fetch_max_bytes, "partitionMaxBytes": c.partition_max_bytes,
            "fetchMaxWaitMs": c.fetch_max_wait_ms,
            "isolationLevel": format!("{:?}", c.isolation_level),
        })),
        "transactions": w.produce.as_ref().filter(|p| p.transactional).map(|p| json!({
            "txnRecords": p.txn.txn_records, "abortEvery": p.txn.abort_every,
        })),
        "exactlyOnce": w.exactly_once.as_ref().map(|(t, e)| json!({
            "outputTopic": e.output_topic, "group": e.group, "workers": e.workers,
            "txnRecords": t.txn_records, "abortEvery": t.abort_every,
            "isolationLevel": format!("{:?}", e.isolation_level),
        })),
        "share": w.share.as_ref().map(|s| json!({
            "group": s.group, "consumers": s.consumers, "from": format!("{:?}", s.from),
            "lockDurationMs": s.lock_duration_ms, "rejectRatio": s.reject_ratio,
            "releaseRatio": s.release_ratio, "ackMode": format!("{:?}", s.ack_mode),
            "maxRecords": s.max_records, "hold": s.hold,
            "fetchMaxBytes": s.fetch_max_bytes, "partitionMaxBytes": s.partition_max_bytes,
            "fetchMaxWaitMs": s.fetch_max_wait_ms,
        })),
        "startedSecondsAgo": started.elapsed().as_secs_f64(),
    });
    Ok(report::summarize(&stats, elapsed, config, live.timeline()))
}

/// The group configs `share-consume` sets before its members join.
fn share_configs(s: &ShareOpts) -> Vec<sluice_client::admin::ConfigOp> {
    use sluice_client::admin::ConfigOp;
    let from = match s.from {
        StartFrom::Earliest => "earliest",
        StartFrom::Latest => "latest",
    };
    let mut ops = vec![ConfigOp::Set("share.auto.offset.reset".into(), from.into())];
    if let Some(ms) = s.lock_duration_ms {
        ops.push(ConfigOp::Set(
            "share.record.lock.duration.ms".into(),
            ms.to_string(),
        ));
    }
    ops
}

#[allow(clippy::too_many_arguments)]
async fn core_main(
    core: usize,
    cw: CoreWork,
    p: Option<ProduceOpts>,
    c: Option<ConsumeOpts>,
    common: Common,
    records_per_batch: usize,
    info: TopicInfo,
    stats: Arc<Stats>,
    sent: SentCounter,
    ready: Arc<AtomicUsize>,
    consumers: usize,
    is_e2e: bool,
    shared: Arc<share::Shared>,
) -> Result<()> {
    let mut tasks = vec![];
    for m in cw.share_members {
        let (stats, shared) = (stats.clone(), shared.clone());
        tasks.push(glommio::spawn_local(share::run_member(m, stats, shared)));
    }
    if let Some(c) = &c {
        let spec = FetchSpec {
            topic: info.name.clone(),
            topic_id: info.id,
            max_wait_ms: c.fetch_max_wait_ms,
            max_bytes: c.fetch_max_bytes as i32,
            partition_max_bytes: c.partition_max_bytes as i32,
            check_crc: c.check_crc,
            end_to_end: is_e2e,
            count: if is_e2e { None } else { common.count },
            isolation_level: c.isolation_level.wire(),
            until_end: c.until_end,
        };
        for job in cw.consumers {
            let (spec, stats, ready, from, timeout) = (
                spec.clone(),
                stats.clone(),
                ready.clone(),
                c.from,
                common.connect_timeout,
            );
            let (brokers, info) = (common.brokers.clone(), info.clone());
            tasks.push(glommio::spawn_local(async move {
                match job {
                    ConsumerJob::Assigned { leader, partitions } => {
                        let mut conn = setup::connect(&leader, timeout).await?;
                        let ts = if from == StartFrom::Earliest { -2 } else { -1 };
                        let start =
                            sluice_client::admin::offsets(&mut conn, &spec.topic, &partitions, ts)
                                .await?;
                        ready.fetch_add(1, Relaxed);
                        let offsets = RefCell::new(start.into_iter().collect());
                        consume::fetch_loop(&mut conn, &spec, &offsets, &stats, None).await
                    }
                    ConsumerJob::Member { group } => {
                        ready.fetch_add(1, Relaxed);
                        group::run_member(brokers, group, info, from, spec, stats, timeout).await
                    }
                }
            }));
        }
    }
    if let Some(p) = &p {
        if !cw.lanes.is_empty() {
            // In e2e mode producers wait until every consumer is positioned.
            while is_e2e && ready.load(Relaxed) < consumers && !stats.stopped() {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            let spec = BatchSpec {
                value_bytes: p.size as usize,
                records_per_batch,
                compression: p.compression.into(),
                payload: p.payload.into(),
                keys: p.keys.0,
                seed: 0x5eed + core as u64,
            };
            if p.transactional {
                for lane in cw.lanes {
                    let pools = TxnPools::build(p.txn.txn_records, records_per_batch, |n| {
                        BatchPool::build_as(
                            &BatchSpec {
                                records_per_batch: n,
                                ..spec.clone()
                            },
                            16,
                            true,
                        )
                    })
                    .context("building record batches")?;
                    let (stats, sent) = (stats.clone(), sent.clone());
                    tasks.push(glommio::spawn_local(txn::run_txn_lane(
                        lane, pools, stats, sent,
                    )));
                }
            } else {
                let pool = Rc::new(BatchPool::build(&spec, 16).context("building record batches")?);
                for lane in cw.lanes {
                    let (pool, stats, sent) = (pool.clone(), stats.clone(), sent.clone());
                    tasks.push(glommio::spawn_local(produce::run_lane(
                        lane, pool, stats, sent,
                    )));
                }
            }
        }
    }
    for wspec in cw.workers {
        let (stats, sent) = (stats.clone(), sent.clone());
        tasks.push(glommio::spawn_local(eos::run_worker(wspec, stats, sent)));
    }
    let mut first_err = None;
    for t in tasks {
        if let Err(e) = t.await {
            stats.fail(format!("{e:#}"));
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_split_evenly_and_every_producer_gets_one() {
        assert_eq!(
            split_partitions(&[0, 1, 2, 3, 4], 2),
            vec![vec![0, 2, 4], vec![1, 3]]
        );
        assert_eq!(
            split_partitions(&[0, 1], 3),
            vec![vec![0], vec![1], vec![0]]
        );
    }
}
