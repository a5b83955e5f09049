//! Seeded simulation of one partition log under injected faults (test-only).
//!
//! From a seed, a run drives a [`PartitionLog`] over [`FaultyIo`] with a random mix of
//! concurrent appends (every [`Durability`], plain and idempotent batches), reads, rolls,
//! truncations of the tail, DeleteRecords, retention by bytes and by time, clean restarts and crashes, while torn writes,
//! ENOSPC, failed and slow fdatasyncs come and go. After every step and every reopen it checks
//! the log against a model of what was offered and acknowledged.
//!
//! The crash model is a process crash: at a random point every later segment-file operation
//! fails and changes nothing (`Faults::crashed`), the log is dropped (its append tasks
//! cancelled, no close), and the next open recovers from the files as written. `FaultyIo`
//! writes real files through the page cache, so it cannot model a power loss that keeps only
//! fdatasynced bytes; batches acknowledged as `Written` must therefore survive a crash too.
//!
//! Replay: `SLUICE_SIM_SEED=<seed> cargo nextest run -p sluice storage::sim`. The seed fixes the
//! operations and faults; the interleaving of concurrent appends with real I/O completions can
//! still differ between runs.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::protocol::batch::{self, BatchHeader};
use crate::storage::io::{Faults, FaultyIo};
use crate::storage::tests::{batch, idempotent_batch, read_all, run};
use crate::storage::*;
use crate::types::{Clock, Offset};

/// Set to replay one seed.
const SEED_ENV: &str = "SLUICE_SIM_SEED";
/// Seeds run on every test run, before the random ones.
const SEEDS_FIXED: [u64; 4] = [1, 2, 3, 0x5eed];
/// Seeds per test run (fixed ones included), unless the time budget runs out first.
const SEEDS_MAX: usize = 20;
/// No new seed starts after this much time (keeps the debug-build test short).
const BUDGET: Duration = Duration::from_secs(12);
/// Steps per seed.
const STEPS: usize = 120;
/// How long a dropped log may take to finish its in-flight flush and go away.
const DROP_WAIT_MAX: Duration = Duration::from_secs(10);
/// The one idempotent producer of the simulation (KIP-98).
const PID: i64 = 7;
const EPOCH: i16 = 0;

/// Where a run is; printed when a check fails so that it can be replayed.
struct Trace {
    seed: u64,
    step: Cell<usize>,
    op: RefCell<String>,
    /// The last steps, with the offsets after each.
    history: RefCell<std::collections::VecDeque<String>>,
}

/// Steps of history a failure report shows.
const HISTORY_MAX: usize = 12;

impl Drop for Trace {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "storage sim failed: seed {} at step {} ({}); replay with {SEED_ENV}={} \
                 cargo nextest run -p sluice storage::sim",
                self.seed,
                self.step.get(),
                self.op.borrow(),
                self.seed
            );
            for h in self.history.borrow().iter() {
                eprintln!("  {h}");
            }
        }
    }
}

/// What became of a batch offered to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Acknowledged as `Written` or `Synced` at these offsets: must be in the log at them.
    Acked { base: Offset, last: Offset },
    /// Failed, cancelled or only `Accepted`: may be in the log (at some offset) or not.
    Maybe,
}

#[derive(Default)]
struct Producer {
    next_seq: i32,
    /// The batch to send again after a failure (a real producer retries the same sequence).
    retry: Option<Vec<u8>>,
    /// The last acknowledged batch and its base offset.
    last_acked: Option<(Vec<u8>, Offset)>,
}

/// What a run did, printed at its end (`--nocapture`) to show the simulation is not idle.
#[derive(Default, Debug)]
struct Stats {
    appends_acked: u64,
    crashes: u64,
    restarts: u64,
    faults: u64,
    dup_answers: u64,
    truncations: u64,
}

#[derive(Default)]
struct Model {
    stats: Stats,
    /// Every batch ever offered, keyed by its bytes with base offset 0 (each one is unique).
    fates: HashMap<Vec<u8>, Fate>,
    /// The log start offset the log reported last.
    start: Offset,
    producer: Producer,
    /// Gives every plain batch distinct timestamps, hence distinct bytes; also the fake "now"
    /// of time-based retention.
    next_ts: i64,
    /// Violations seen inside append tasks (they are checked by the driver).
    violations: Vec<String>,
    io_errors: u32,
    last_io_error: String,
}

fn base_of(b: &[u8]) -> Offset {
    BatchHeader::parse(b).expect("our own batch").base_offset()
}

/// Bytes of a stored batch with its base offset zeroed (the CRC does not cover it).
fn normalized(b: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    batch::set_base_offset(&mut v, Offset(0));
    v
}

fn batch_records(b: &[u8]) -> i64 {
    let h = BatchHeader::parse(b).expect("our own batch");
    h.last_offset().0 - h.base_offset().0 + 1
}

/// One append call: one or more plain batches, or (`idempotent`) the producer's next batch.
struct AppendPlan {
    batches: Vec<Vec<u8>>,
    idempotent_records: Option<usize>,
    durability: Durability,
}

async fn append_task(log: Rc<PartitionLog>, plans: Vec<AppendPlan>, model: Rc<RefCell<Model>>) {
    for plan in plans {
        let batches = match plan.idempotent_records {
            None => plan.batches,
            Some(n) => {
                let mut m = model.borrow_mut();
                let p = &mut m.producer;
                let b = match p.retry.clone() {
                    Some(b) => b,
                    None => {
                        let b = idempotent_batch(PID, EPOCH, p.next_seq, n);
                        p.next_seq += n as i32;
                        p.retry = Some(b.clone());
                        b
                    }
                };
                vec![b]
            }
        };
        let mut all = vec![];
        {
            let mut m = model.borrow_mut();
            for b in &batches {
                m.fates.entry(b.clone()).or_insert(Fate::Maybe);
                all.extend_from_slice(b);
            }
        }
        let r = log.append(BytesMut::from(&all[..]), plan.durability).await;
        let mut m = model.borrow_mut();
        match r {
            Ok(r) => {
                if plan.durability == Durability::Synced && log.synced_offset() <= r.last_offset {
                    m.violations.push(format!(
                        "Synced append acknowledged at {} (duplicate {}) but synced offset is {}",
                        r.last_offset,
                        r.duplicate,
                        log.synced_offset()
                    ));
                }
                m.stats.appends_acked += 1;
                m.stats.dup_answers += r.duplicate as u64;
                let mut at = r.base_offset;
                for b in &batches {
                    let last = Offset(at.0 + batch_records(b) - 1);
                    let known = m.fates[b];
                    if r.duplicate {
                        // The retry of a batch already in the log: its original offsets.
                        if let Fate::Acked { base, .. } = known {
                            if base != at {
                                m.violations.push(format!(
                                    "duplicate answered at {at}, acknowledged before at {base}"
                                ));
                            }
                        }
                    } else if let Fate::Acked { base, .. } = known {
                        m.violations.push(format!(
                            "batch acknowledged at {base} appended again at {at}"
                        ));
                    }
                    if plan.durability != Durability::Accepted {
                        m.fates.insert(b.clone(), Fate::Acked { base: at, last });
                    }
                    at = last.next();
                }
                if r.last_offset.next() != at {
                    m.violations.push(format!(
                        "append answered {}..={} for {} records",
                        r.base_offset,
                        r.last_offset,
                        at.0 - r.base_offset.0
                    ));
                }
                if plan.idempotent_records.is_some() {
                    let p = &mut m.producer;
                    let b = p.retry.take().expect("the batch just sent");
                    if plan.durability != Durability::Accepted {
                        p.last_acked = Some((b, r.base_offset));
                    }
                }
            }
            Err(StorageError::Io(e)) => {
                m.io_errors += 1;
                m.last_io_error = e.to_string();
                if plan.idempotent_records.is_some() {
                    return; // retried by a later task, in sequence order
                }
            }
            Err(e) => m.violations.push(format!("append failed: {e}")),
        }
    }
}

/// A random plan for one append task.
fn plan_appends(rng: &mut StdRng, model: &mut Model, idempotent: bool) -> Vec<AppendPlan> {
    (0..rng.gen_range(1..4))
        .map(|_| {
            let durability = match rng.gen_range(0..10) {
                0 => Durability::Accepted,
                1..=5 => Durability::Written,
                _ => Durability::Synced,
            };
            if idempotent {
                // An idempotent producer waits for at least the write (Kafka requires acks=all).
                let durability = match durability {
                    Durability::Accepted => Durability::Written,
                    d => d,
                };
                return AppendPlan {
                    batches: vec![],
                    idempotent_records: Some(rng.gen_range(1..4)),
                    durability,
                };
            }
            let batches = (0..rng.gen_range(1..3))
                .map(|_| {
                    let n = rng.gen_range(1..4);
                    let value_bytes = if rng.gen_bool(0.1) {
                        rng.gen_range(4000..12_000)
                    } else {
                        rng.gen_range(0..2000)
                    };
                    let ts = model.next_ts;
                    model.next_ts += n as i64;
                    batch(n, value_bytes, ts, rng.gen())
                })
                .collect();
            AppendPlan {
                batches,
                idempotent_records: None,
                durability,
            }
        })
        .collect()
}

/// Sets a random fault (or none); returns whether one was set.
fn inject(rng: &mut StdRng, f: &Faults) -> bool {
    match rng.gen_range(0..8) {
        0 => f.torn_writes.set(rng.gen_range(1..3)),
        1 => f.disk_full.set(true),
        2 => f.sync_fails.set(true),
        3 => f.sync_delay_ms.set(rng.gen_range(1..6)),
        _ => return false,
    }
    true
}

/// Waits until no write or fdatasync of the log is in flight, then clears the faults: an
/// operation issued under a fault fails under it, not in the next step.
async fn settle_and_clear(log: &PartitionLog, f: &Faults) {
    crate::storage::tests::wait_state(log, "the flusher to settle", |s| s.appender.is_drained())
        .await;
    clear(f);
}

fn clear(f: &Faults) {
    f.torn_writes.set(0);
    f.disk_full.set(false);
    f.sync_fails.set(false);
    f.sync_delay_ms.set(0);
}

async fn open(
    dir: &Path,
    cfg: &LogConfig,
    cache_bytes: usize,
    durable_writes: bool,
) -> (Rc<PartitionLog>, Rc<Faults>) {
    let faults = Rc::new(Faults::default());
    let io = Rc::new(FaultyIo {
        faults: faults.clone(),
    });
    let log = PartitionLog::open_with_io(
        dir,
        cfg.clone(),
        BatchCache::new(cache_bytes),
        io,
        Clock::system(),
    )
    .await
    .expect("open");
    log.state
        .borrow_mut()
        .appender
        .set_durable_writes(durable_writes);
    (log, faults)
}

/// Drops our handle and waits until the log is gone: a flush in flight finishes first (its
/// writes were already issued when the process died), then the flusher exits.
async fn drop_log(log: Rc<PartitionLog>) {
    let weak = Rc::downgrade(&log);
    drop(log);
    let deadline = Instant::now() + DROP_WAIT_MAX;
    while weak.upgrade().is_some() {
        assert!(Instant::now() < deadline, "a dropped log stayed alive");
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

/// The offsets' order, and the log start the model expects.
fn check_offsets(log: &PartitionLog, m: &Model) {
    let (start, synced, hw, end) = (
        log.log_start_offset(),
        log.synced_offset(),
        log.high_watermark(),
        log.log_end_offset(),
    );
    assert!(
        start <= synced && synced <= hw && hw <= end,
        "offsets out of order: start {start} synced {synced} hw {hw} end {end}"
    );
    assert_eq!(
        start,
        m.start,
        "log start moved by itself; segments {:?}, recovery {:?}",
        meta::list_segments(log.dir()),
        log.recovery_report()
    );
}

/// Reads the whole log and checks it against the model: offsets dense from the log start to
/// the log end, no batch twice, no batch never offered, every acknowledged batch at or above
/// the log start present at its offsets with its bytes.
async fn check_contents(log: &PartitionLog, model: &RefCell<Model>) {
    let start = log.log_start_offset();
    assert_eq!(log.high_watermark(), log.log_end_offset(), "after open");
    let all = read_all(log, start, 1 << 20).await;
    let m = model.borrow();
    let mut at: Option<Offset> = None;
    let mut seen: HashMap<Vec<u8>, Offset> = HashMap::new();
    for b in &all {
        let h = BatchHeader::parse_checked(b).expect("valid batch");
        match at {
            None => assert!(
                h.base_offset() <= start && start <= h.last_offset(),
                "first batch {}..={} does not hold the log start {start}",
                h.base_offset(),
                h.last_offset()
            ),
            Some(next) => assert_eq!(h.base_offset(), next, "offsets not dense"),
        }
        at = Some(h.last_offset().next());
        let key = normalized(b);
        let Some(fate) = m.fates.get(&key) else {
            panic!("batch at {} was never offered", h.base_offset());
        };
        if let Fate::Acked { base, .. } = fate {
            assert_eq!(*base, h.base_offset(), "acknowledged batch moved");
        }
        if let Some(other) = seen.insert(key, h.base_offset()) {
            panic!(
                "batch at {other} is in the log again at {}",
                h.base_offset()
            );
        }
    }
    assert_eq!(at.unwrap_or(start), log.log_end_offset(), "log end");
    for (key, fate) in &m.fates {
        if let Fate::Acked { base, last } = *fate {
            if last >= start {
                assert_eq!(
                    seen.get(key),
                    Some(&base),
                    "acknowledged batch {base}..={last} lost"
                );
            }
        }
    }
}

/// After an open: the producer's last acknowledged batch is still answered as a duplicate with
/// its original offsets (KIP-98), unless it is below the log start.
async fn check_producer(log: &PartitionLog, model: &RefCell<Model>) {
    let Some((b, base)) = model.borrow().producer.last_acked.clone() else {
        return;
    };
    if base < log.log_start_offset() {
        return;
    }
    let r = log
        .append(BytesMut::from(&b[..]), Durability::Written)
        .await
        .expect("retry of an acknowledged idempotent batch");
    assert!(r.duplicate, "acknowledged idempotent batch appended again");
    assert_eq!(r.base_offset, base, "duplicate answered at other offsets");
}

async fn simulate(seed: u64, dir: std::path::PathBuf, trace: Rc<Trace>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let cfg = LogConfig {
        segment_bytes: if rng.gen_bool(0.5) {
            16 << 10
        } else {
            64 << 10
        },
        segment_ms: None,
        retention_ms: None,
        retention_bytes: None,
        index_interval_bytes: 1024,
        flush: if rng.gen_bool(0.25) {
            FlushPolicy::IntervalMs(rng.gen_range(1..10))
        } else {
            FlushPolicy::Always
        },
        compaction: None,
    };
    let cache_bytes = [0, 16 << 10, 1 << 20][rng.gen_range(0..3)];
    // Both commit paths: durable (O_DSYNC) writes, or writes and fdatasyncs. Taken from the
    // seed, not the generator, so every other choice of a seed stays what it was.
    let durable_writes = seed % 2 == 1;
    let model = Rc::new(RefCell::new(Model::default()));
    let (mut log, mut faults) = open(&dir, &cfg, cache_bytes, durable_writes).await;
    for step in 0..=STEPS {
        trace.step.set(step);
        let op = if step == STEPS {
            99
        } else {
            rng.gen_range(0..21)
        };
        match op {
            // Concurrent appends, faults coming and going; a crash at a random point.
            0..=10 | 99 => {
                let crash = op == 99 || rng.gen_bool(0.08);
                *trace.op.borrow_mut() = format!("appends, crash {crash}");
                let mut faulty = inject(&mut rng, &faults);
                let producer_task = rng.gen_bool(0.5);
                let mut tasks = vec![];
                for t in 0..rng.gen_range(1..5) {
                    let plans =
                        plan_appends(&mut rng, &mut model.borrow_mut(), producer_task && t == 0);
                    tasks.push(glommio::spawn_local(append_task(
                        log.clone(),
                        plans,
                        model.clone(),
                    )));
                }
                if rng.gen_bool(0.3) {
                    glommio::timer::sleep(Duration::from_micros(rng.gen_range(0..3000))).await;
                    faulty |= inject(&mut rng, &faults);
                }
                model.borrow_mut().stats.faults += faulty as u64;
                if crash {
                    glommio::timer::sleep(Duration::from_micros(rng.gen_range(0..4000))).await;
                    // From here nothing more reaches the files: a process crash stops the
                    // flusher and every task at once. (Small metadata files written with
                    // std::fs, such as index files and the producer snapshot, are outside the
                    // seam.)
                    faults.crashed.set(true);
                    drop(tasks); // cancels the appends still waiting
                    drop_log(log).await;
                    model.borrow_mut().stats.crashes += 1;
                    {
                        let m = model.borrow();
                        assert!(m.violations.is_empty(), "{:?}", m.violations);
                    }
                    (log, faults) = open(&dir, &cfg, cache_bytes, durable_writes).await;
                    *trace.op.borrow_mut() = "check after crash".into();
                    check_contents(&log, &model).await;
                    check_producer(&log, &model).await;
                } else {
                    let errors_before = model.borrow().io_errors;
                    for t in tasks {
                        t.await;
                    }
                    settle_and_clear(&log, &faults).await;
                    let m = model.borrow();
                    assert!(m.violations.is_empty(), "{:?}", m.violations);
                    assert!(
                        faulty || m.io_errors == errors_before,
                        "appends failed with no fault injected: {}",
                        m.last_io_error
                    );
                }
            }
            11..=13 => {
                let (start, hw) = (model.borrow().start, log.high_watermark());
                let at = Offset(rng.gen_range(start.0..=hw.0));
                let bytes_max = rng.gen_range(1..30_000);
                *trace.op.borrow_mut() = format!("read at {at}, {bytes_max} bytes");
                let r = log
                    .read(ReadOptions {
                        start: at,
                        bytes_max,
                    })
                    .await
                    .expect("read");
                let m = model.borrow();
                let mut next = None;
                for b in &r.batches {
                    let h = BatchHeader::parse_checked(b).expect("valid batch");
                    match next {
                        None => assert!(h.base_offset() <= at && at <= h.last_offset()),
                        Some(n) => assert_eq!(h.base_offset(), n, "read not dense"),
                    }
                    next = Some(h.last_offset().next());
                    match m.fates.get(&normalized(b)) {
                        None => panic!("read a batch never offered at {}", h.base_offset()),
                        Some(Fate::Acked { base, .. }) => assert_eq!(*base, h.base_offset()),
                        Some(Fate::Maybe) => {}
                    }
                }
                assert_eq!(r.batches.is_empty(), at == hw, "read at {at}, hw {hw}");
            }
            14 => {
                *trace.op.borrow_mut() = "roll".into();
                let faulty = inject(&mut rng, &faults);
                let r = log.roll().await;
                settle_and_clear(&log, &faults).await;
                match r {
                    Ok(()) => {}
                    Err(StorageError::Io(_)) if faulty => {}
                    Err(e) => panic!("roll failed: {e}"),
                }
            }
            15..=16 => {
                let start = model.borrow().start;
                let to = Offset(rng.gen_range(start.0..=log.high_watermark().0));
                *trace.op.borrow_mut() = format!("delete records before {to}");
                let faulty = inject(&mut rng, &faults);
                let r = log.delete_records_before(to).await;
                settle_and_clear(&log, &faults).await;
                match r {
                    Ok(s) => {
                        assert_eq!(s, to.max(start));
                        model.borrow_mut().start = s;
                    }
                    Err(StorageError::Io(_)) if faulty => {}
                    Err(e) => panic!("delete records failed: {e}"),
                }
            }
            17 => {
                // Retention by bytes, or by time against the batches' own timestamps (the
                // log's clock is the caller's `now_ms`).
                let mut c = cfg.clone();
                if rng.gen_bool(0.5) {
                    c.retention_bytes = Some(rng.gen_range(0..100_000));
                } else {
                    c.retention_ms = Some(rng.gen_range(0..200));
                }
                *trace.op.borrow_mut() = format!(
                    "retention bytes {:?} ms {:?}",
                    c.retention_bytes, c.retention_ms
                );
                log.set_config(c);
                let now_ms = model.borrow().next_ts;
                log.enforce_retention(now_ms).await.expect("retention");
                log.set_config(cfg.clone());
                let s = log.log_start_offset();
                let mut m = model.borrow_mut();
                assert!(s >= m.start, "retention moved the log start back");
                m.start = s;
            }
            18 => {
                *trace.op.borrow_mut() = "clean restart".into();
                let end = log.log_end_offset();
                log.close().await.expect("close");
                faults.crashed.set(true); // the process exits
                drop_log(log).await;
                model.borrow_mut().stats.restarts += 1;
                (log, faults) = open(&dir, &cfg, cache_bytes, durable_writes).await;
                assert!(
                    log.recovery_report().is_none(),
                    "clean close needs no recovery"
                );
                assert_eq!(log.log_end_offset(), end);
                check_contents(&log, &model).await;
                check_producer(&log, &model).await;
            }
            20 => {
                // A follower's conflict truncation, at a batch boundary after the idempotent
                // producer's last batch (its sequences stay as the model knows them).
                let start = model.borrow().start;
                let all = read_all(&log, start, 1 << 20).await;
                let floor = all
                    .iter()
                    .filter_map(|b| BatchHeader::parse(b).ok())
                    .filter(|h| h.producer_id() == PID)
                    .map(|h| h.last_offset().next())
                    .max()
                    .unwrap_or(start)
                    .max(start);
                let bounds: Vec<Offset> = all
                    .iter()
                    .filter_map(|b| BatchHeader::parse(b).ok())
                    .map(|h| h.base_offset())
                    .chain(std::iter::once(log.log_end_offset()))
                    .filter(|o| *o >= floor)
                    .collect();
                let to = bounds[rng.gen_range(0..bounds.len())];
                *trace.op.borrow_mut() = format!("truncate to {to}");
                {
                    // Whatever the outcome, the batches from `to` on may be gone.
                    let mut m = model.borrow_mut();
                    for b in &all {
                        if base_of(b) >= to {
                            m.fates.insert(normalized(b), Fate::Maybe);
                        }
                    }
                }
                let faulty = inject(&mut rng, &faults);
                let r = log.truncate_to(to).await;
                match r {
                    Ok(()) => {
                        settle_and_clear(&log, &faults).await;
                        model.borrow_mut().stats.truncations += 1;
                        assert_eq!(log.log_end_offset(), to);
                        check_contents(&log, &model).await;
                    }
                    Err(StorageError::Io(_)) if faulty => {
                        // The log stops taking appends until a restart finishes the cut.
                        faults.crashed.set(true);
                        drop_log(log).await;
                        model.borrow_mut().stats.crashes += 1;
                        (log, faults) = open(&dir, &cfg, cache_bytes, durable_writes).await;
                        check_contents(&log, &model).await;
                        check_producer(&log, &model).await;
                    }
                    Err(e) => panic!("truncation failed: {e}"),
                }
            }
            _ => {
                *trace.op.borrow_mut() = "wait for the high watermark".into();
                let end = log.log_end_offset();
                if end > log.log_start_offset() {
                    log.wait_for_append(Offset(end.0 - 1)).await;
                }
            }
        }
        {
            let mut h = trace.history.borrow_mut();
            if h.len() == HISTORY_MAX {
                h.pop_front();
            }
            h.push_back(format!(
                "step {step}: {}; then start {} synced {} hw {} end {}, in memory {:?}, files {:?}, removed {:?}",
                trace.op.borrow(),
                log.log_start_offset(),
                log.synced_offset(),
                log.high_watermark(),
                log.log_end_offset(),
                log.state
                    .borrow()
                    .segments
                    .iter()
                    .map(|g| (g.base().0, g.next().0))
                    .collect::<Vec<_>>(),
                meta::list_segments(log.dir()),
                faults
                    .removed
                    .take()
                    .iter()
                    .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
                    .filter(|n| n.ends_with(".log"))
                    .collect::<Vec<_>>()
            ));
        }
        check_offsets(&log, &model.borrow());
    }
    let m = model.borrow();
    eprintln!(
        "storage sim seed {seed}: {STEPS} steps, {:?}, {} I/O errors, log {}..{}",
        m.stats,
        m.io_errors,
        log.log_start_offset(),
        log.log_end_offset()
    );
}

/// Failures the simulation finds that are not fixed yet, by a part of their message. Outside a
/// replay (`SLUICE_SIM_SEED`) a run that ends in one of these is reported on stderr and does not
/// fail the test; every other failure does. Empty: the failures found so far are fixed (an
/// idempotent retry answered before its original was durable; a failed roll leaving its file
/// behind; a roll of a segment without batches sharing its file with the next one). A new one
/// goes here only with its seeds and a TODO, until it is fixed.
const KNOWN_ISSUES: [&str; 0] = [];

/// Runs one seed; `Err` with the message of a known issue (see [`KNOWN_ISSUES`]) unless
/// `strict`.
fn run_seed_reporting_known(seed: u64, strict: bool) -> Result<(), String> {
    if strict {
        run_seed(seed);
        return Ok(());
    }
    match std::panic::catch_unwind(|| run_seed(seed)) {
        Ok(()) => Ok(()),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            if KNOWN_ISSUES.iter().any(|k| msg.contains(k)) {
                Err(msg)
            } else {
                std::panic::resume_unwind(p)
            }
        }
    }
}

fn run_seed(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let trace = Rc::new(Trace {
        seed,
        step: Cell::new(0),
        op: RefCell::new(String::new()),
        history: RefCell::new(Default::default()),
    });
    let t = trace.clone();
    run(async move { simulate(seed, d, t).await });
    drop(trace);
}

#[test]
fn seeded_simulation_with_faults_and_crashes_keeps_every_acknowledged_batch() {
    if let Ok(s) = std::env::var(SEED_ENV) {
        run_seed_reporting_known(s.parse().expect("SLUICE_SIM_SEED is a u64"), true).unwrap();
        return;
    }
    let began = Instant::now();
    let random = std::iter::repeat_with(rand::random::<u64>);
    for (i, seed) in SEEDS_FIXED.into_iter().chain(random).enumerate() {
        if i >= SEEDS_MAX || (i >= SEEDS_FIXED.len() && began.elapsed() > BUDGET) {
            break;
        }
        if let Err(msg) = run_seed_reporting_known(seed, false) {
            eprintln!("storage sim seed {seed}: known open issue (see KNOWN_ISSUES): {msg}");
        }
    }
}
