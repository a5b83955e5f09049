//! Transactional producer lanes (`produce --transactional`) and the transaction coordinator
//! client both they and the exactly-once workers use.
//!
//! A lane runs one transaction at a time on its partitions: AddPartitionsToTxn for the
//! partitions the transaction writes, its batches pipelined (up to `max_in_flight`) exactly as
//! the non-transactional lane sends them, every ack awaited, then EndTxn. CONCURRENT_TRANSACTIONS
//! (the coordinator is still writing the previous transaction's markers) and a loading or moved
//! coordinator are retried after a back-off, as Kafka's clients do.

use crate::batch::{BatchPool, ProducerFields};
use crate::produce::{self, InFlight, LaneSpec, SentCounter};
use crate::report::Stats;
use crate::setup::{self, Conn};
use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use glommio::sync::Semaphore;
use kafka_protocol::messages::ProduceRequest;
use sluice_client::error::code;
use sluice_client::group::{find_coordinator_of, KEY_TYPE_TRANSACTION};
use sluice_client::txn::{self as ktxn, TxnProducer};
use sluice_client::{check, error_name};
use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// First wait before a retried transactional call. Kafka's clients wait 20 ms before retrying
/// the first AddPartitionsToTxn of a transaction; a single-node coordinator finishes a commit
/// in a few fsyncs, and a 20 ms floor per transaction would measure the client's timer rather
/// than the broker.
pub const TXN_RETRY_BACKOFF_FIRST: Duration = Duration::from_millis(1);
/// Longest wait between retries (Kafka's `retry.backoff.ms` default).
pub const TXN_RETRY_BACKOFF_MAX: Duration = Duration::from_millis(100);
/// A call still refused after this long fails the run.
pub const TXN_RETRY_WAIT_MAX: Duration = Duration::from_secs(60);

/// What a transactional lane needs beyond a plain lane.
#[derive(Debug, Clone)]
pub struct TxnLane {
    pub transactional_id: String,
    /// Bootstrap brokers, to find the transaction coordinator.
    pub brokers: String,
    pub records: u64,
    pub abort_every: u64,
    pub timeout_ms: i32,
}

impl TxnLane {
    fn aborts(&self, k: u64) -> bool {
        self.abort_every > 0 && (k + 1).is_multiple_of(self.abort_every)
    }
}

/// One transactional call, for [`TxnCoordinator::call`].
#[derive(Debug, Clone, Copy)]
pub enum TxnCall<'a> {
    AddPartitions {
        topic: &'a str,
        partitions: &'a [i32],
    },
    AddOffsets {
        group: &'a str,
    },
    End {
        commit: bool,
    },
}

/// A connection to the coordinator of one transactional id, found again when it moves.
pub struct TxnCoordinator {
    brokers: String,
    transactional_id: String,
    timeout: Duration,
    conn: Conn,
}

impl TxnCoordinator {
    /// Finds the coordinator of `transactional_id` through `brokers` and connects to it.
    pub async fn connect(
        brokers: &str,
        transactional_id: &str,
        timeout: Duration,
    ) -> Result<TxnCoordinator> {
        let conn = find(brokers, transactional_id, timeout).await?;
        Ok(TxnCoordinator {
            brokers: brokers.to_string(),
            transactional_id: transactional_id.to_string(),
            timeout,
            conn,
        })
    }

    async fn refind(&mut self) -> Result<()> {
        self.conn = find(&self.brokers, &self.transactional_id, self.timeout).await?;
        Ok(())
    }

    /// InitProducerId for the id, retried while the coordinator is busy (e.g. aborting the
    /// previous producer's open transaction) or loading.
    pub async fn init(&mut self, transaction_timeout_ms: i32) -> Result<TxnProducer> {
        let mut retry = Retry::new();
        loop {
            let (c, p) = ktxn::init_producer_id(
                &mut self.conn,
                &self.transactional_id,
                transaction_timeout_ms,
                None,
            )
            .await?;
            if c == code::NONE {
                return Ok(p);
            }
            self.back_off(&mut retry, c, "InitProducerId").await?;
        }
    }

    /// Sends `call` until the coordinator accepts it; fails on an error that is not retried.
    pub async fn call(&mut self, p: &TxnProducer, call: TxnCall<'_>) -> Result<()> {
        let mut retry = Retry::new();
        loop {
            let (c, what) = match call {
                TxnCall::AddPartitions { topic, partitions } => (
                    ktxn::add_partitions(&mut self.conn, p, topic, partitions).await?,
                    "AddPartitionsToTxn",
                ),
                TxnCall::AddOffsets { group } => (
                    ktxn::add_offsets(&mut self.conn, p, group).await?,
                    "AddOffsetsToTxn",
                ),
                TxnCall::End { commit } => {
                    (ktxn::end_txn(&mut self.conn, p, commit).await?, "EndTxn")
                }
            };
            if c == code::NONE {
                return Ok(());
            }
            self.back_off(&mut retry, c, what).await?;
        }
    }

    async fn back_off(&mut self, retry: &mut Retry, c: i16, what: &str) -> Result<()> {
        if !ktxn::retriable(c) || retry.started.elapsed() > TXN_RETRY_WAIT_MAX {
            check(
                c,
                &format!("{what} for transactional id {}", self.transactional_id),
                None,
            )?;
        }
        if matches!(c, code::NOT_COORDINATOR | code::COORDINATOR_NOT_AVAILABLE) {
            self.refind().await?;
        }
        retry.wait().await;
        Ok(())
    }
}

/// Exponential back-off from [`TXN_RETRY_BACKOFF_FIRST`] to [`TXN_RETRY_BACKOFF_MAX`].
pub struct Retry {
    started: Instant,
    next: Duration,
}

impl Retry {
    pub fn new() -> Retry {
        Retry {
            started: Instant::now(),
            next: TXN_RETRY_BACKOFF_FIRST,
        }
    }
    pub fn expired(&self) -> bool {
        self.started.elapsed() > TXN_RETRY_WAIT_MAX
    }
    pub async fn wait(&mut self) {
        glommio::timer::sleep(self.next).await;
        self.next = (self.next * 2).min(TXN_RETRY_BACKOFF_MAX);
    }
}

impl Default for Retry {
    fn default() -> Self {
        Self::new()
    }
}

async fn find(brokers: &str, transactional_id: &str, timeout: Duration) -> Result<Conn> {
    let mut boot = setup::bootstrap(brokers, timeout).await?;
    let mut retry = Retry::new();
    loop {
        let (c, addr) = find_coordinator_of(&mut boot, KEY_TYPE_TRANSACTION, transactional_id)
            .await
            .context("FindCoordinator for a transactional id")?;
        match c {
            code::NONE => return setup::connect(&addr, timeout).await,
            code::COORDINATOR_NOT_AVAILABLE | code::COORDINATOR_LOAD_IN_PROGRESS
                if !retry.expired() =>
            {
                retry.wait().await
            }
            e => check(
                e,
                &format!("no transaction coordinator for {transactional_id}"),
                None,
            )?,
        }
    }
}

/// The batches of one transaction: `full` batches of the pool, then one of the remainder pool.
pub struct TxnPools {
    pub full: Rc<BatchPool>,
    pub full_per_txn: usize,
    pub tail: Option<Rc<BatchPool>>,
}

impl TxnPools {
    /// Pools for transactions of `records` records in batches of at most `per_batch`; `build`
    /// makes a pool of batches of the given record count.
    pub fn build(
        records: u64,
        per_batch: usize,
        mut build: impl FnMut(usize) -> Result<BatchPool>,
    ) -> Result<TxnPools> {
        let per_batch = per_batch.max(1);
        let full_per_txn = (records / per_batch as u64) as usize;
        let rest = (records % per_batch as u64) as usize;
        let full = if full_per_txn > 0 {
            build(per_batch)?
        } else {
            build(rest)?
        };
        Ok(TxnPools {
            full: Rc::new(full),
            full_per_txn,
            tail: if rest > 0 && full_per_txn > 0 {
                Some(Rc::new(build(rest)?))
            } else {
                None
            },
        })
    }

    /// Batches per transaction.
    pub fn per_txn(&self) -> usize {
        if self.full_per_txn == 0 {
            1
        } else {
            self.full_per_txn + usize::from(self.tail.is_some())
        }
    }
}

/// Runs one transactional lane until `stats` says stop or the shared count is reached; stops
/// only between transactions.
pub async fn run_txn_lane(
    spec: LaneSpec,
    pools: TxnPools,
    stats: Arc<Stats>,
    sent: SentCounter,
) -> Result<()> {
    let t = spec.txn.clone().context("not a transactional lane")?;
    let r = lane(&spec, &t, &pools, &stats, &sent).await;
    r.with_context(|| {
        format!(
            "transactional producer {} to {}",
            t.transactional_id, spec.leader
        )
    })
}

async fn lane(
    spec: &LaneSpec,
    t: &TxnLane,
    pools: &TxnPools,
    stats: &Arc<Stats>,
    sent: &SentCounter,
) -> Result<()> {
    let mut coord =
        TxnCoordinator::connect(&t.brokers, &t.transactional_id, spec.connect_timeout).await?;
    let producer = coord.init(t.timeout_ms).await?;
    let conn = setup::connect(&spec.leader, spec.connect_timeout).await?;
    let version = conn
        .versions()
        .pick::<ProduceRequest>(Some(ktxn::PRODUCE_TXN_V1_MAX))?;
    let flexible = version >= 9;
    let plan = produce::schedule(&pools.full, spec);
    if plan.is_empty() {
        bail!("no partition to write");
    }
    let (mut writer, reader) = conn.into_split();
    let window = Rc::new(Semaphore::new(spec.max_in_flight as u64));
    let failed = Rc::new(Cell::new(code::NONE));
    let (tx, rx) = async_channel::unbounded::<InFlight>();
    let reader_task = glommio::spawn_local(produce::read_acks(
        reader,
        rx,
        window.clone(),
        stats.clone(),
        Some(failed.clone()),
    ));
    let mut sequences: HashMap<i32, i32> = HashMap::new();
    let mut buf = BytesMut::new();
    let mut at = 0usize;
    // When the last commit's EndTxn was sent (for the completion latency).
    let mut last_commit: Option<Instant> = None;
    let mut result = Ok(());
    let mut k = 0u64;
    while !stats.stopped() {
        if let Some(limit) = spec.count {
            if sent.fetch_add(t.records, Relaxed) >= limit {
                stats.stop.store(true, Relaxed);
                break;
            }
        }
        // This transaction's batches and the partitions they go to.
        let mut sends = Vec::with_capacity(pools.per_txn());
        for i in 0..pools.per_txn() {
            let (bi, partition) = plan[at % plan.len()];
            at += 1;
            let b = match (&pools.tail, i >= pools.full_per_txn) {
                (Some(tail), true) => &tail.batches[bi % tail.batches.len()],
                _ => &pools.full.batches[bi],
            };
            sends.push((b, partition));
        }
        let mut partitions: Vec<i32> = sends.iter().map(|(_, p)| *p).collect();
        partitions.sort_unstable();
        partitions.dedup();
        coord
            .call(
                &producer,
                TxnCall::AddPartitions {
                    topic: &spec.topic,
                    partitions: &partitions,
                },
            )
            .await?;
        if let Some(sent_at) = last_commit.take() {
            if stats.measuring() {
                stats
                    .txn_complete
                    .latency(sent_at.elapsed().as_micros() as u64, 1);
            }
        }
        let (mut records, mut payload) = (0u64, 0u64);
        for (b, partition) in &sends {
            if window.acquire(1).await.is_err() {
                bail!("send window closed");
            }
            let seq = sequences.entry(*partition).or_insert(0);
            let fields = ProducerFields {
                producer_id: producer.producer_id,
                epoch: producer.epoch,
                base_sequence: *seq,
            };
            *seq = ((*seq as i64 + b.records as i64) % (i32::MAX as i64 + 1)) as i32;
            let request = writer.next::<ProduceRequest>(version);
            buf.clear();
            let scheduled = Instant::now();
            produce::encode_produce(
                &mut buf,
                request.correlation_id(),
                version,
                flexible,
                spec,
                *partition,
                b,
                Some(fields),
                produce::unix_now(),
            )?;
            if let Err(e) = writer.write_all(&buf).await {
                result = Err(e);
                break;
            }
            records += b.records as u64;
            payload += b.payload_bytes;
            let _ = tx
                .send(InFlight {
                    request,
                    scheduled,
                    records: b.records as u64,
                    payload_bytes: b.payload_bytes,
                })
                .await;
        }
        if result.is_err() {
            break;
        }
        // Every batch acknowledged before the transaction ends (a producer's flush).
        let all = spec.max_in_flight as u64;
        if window.acquire(all).await.is_err() {
            bail!("send window closed");
        }
        window.signal(all);
        if failed.get() != code::NONE {
            bail!(
                "produce in transaction {k} failed: {}",
                error_name(failed.get())
            );
        }
        let commit = !t.aborts(k);
        let end_sent = Instant::now();
        coord.call(&producer, TxnCall::End { commit }).await?;
        let took = end_sent.elapsed();
        if stats.measuring() {
            if commit {
                stats.txn.add(records, payload);
                stats.txn.latency(took.as_micros() as u64, 1);
                stats.txns_committed.fetch_add(1, Relaxed);
            } else {
                stats.txns_aborted.fetch_add(1, Relaxed);
            }
        }
        if commit {
            last_commit = Some(end_sent);
        }
        k += 1;
    }
    drop(tx);
    result.and(reader_task.await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchSpec, Compression, Keys, Payload};

    fn pools(records: u64, per_batch: usize) -> TxnPools {
        TxnPools::build(records, per_batch, |n| {
            BatchPool::build_as(
                &BatchSpec {
                    value_bytes: 16,
                    records_per_batch: n,
                    compression: Compression::None,
                    payload: Payload::Random,
                    keys: Keys::None,
                    seed: 1,
                },
                2,
                true,
            )
        })
        .unwrap()
    }

    #[test]
    fn a_transaction_is_full_batches_and_one_remainder() {
        let p = pools(100, 64);
        assert_eq!(p.per_txn(), 2);
        assert_eq!(p.full.batches[0].records, 64);
        assert_eq!(p.tail.as_ref().unwrap().batches[0].records, 36);
        let p = pools(100, 10);
        assert_eq!((p.per_txn(), p.tail.is_none()), (10, true));
        let p = pools(7, 64);
        assert_eq!((p.per_txn(), p.full.batches[0].records), (1, 7));
    }

    #[test]
    fn every_kth_transaction_aborts() {
        let t = TxnLane {
            transactional_id: "x".into(),
            brokers: "b".into(),
            records: 1,
            abort_every: 3,
            timeout_ms: 1000,
        };
        let aborted: Vec<u64> = (0..9).filter(|&k| t.aborts(k)).collect();
        assert_eq!(aborted, vec![2, 5, 8]);
    }
}
