//! Storage engine benchmark: append, read and recovery throughput of the partition log on one
//! shard, with direct I/O on the real file system. Prints one line per figure (MB/s or GB/s).
//!
//! Data lives in `$SLUICE_BENCH_DIR` (default `./target/bench-data`; keep it off tmpfs so direct
//! I/O reaches a disk) and is removed at the end.
//!
//! `cargo bench --bench storage [-- PHASE...]` with phases `big` (1 MiB appends, recovery, cold
//! reads), `one` (single partition, 16 KiB and synced variants), `many` (100 and 1,000
//! partitions; `many-1000-16k` and the like pick one set) and `cached`; all of them when none is
//! named.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sluice::protocol::builder as build;
use sluice::storage::{BatchCache, Durability, FlushPolicy, LogConfig, PartitionLog, ReadOptions};
use sluice::types::Offset;

const MIB: usize = 1 << 20;

fn config(segment_bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes,
        segment_ms: None,
        retention_ms: None,
        retention_bytes: None,
        index_interval_bytes: 4096,
        flush: FlushPolicy::Always,
        compaction: None,
    }
}

/// One batch of about `bytes` bytes (a single record).
fn make_batch(bytes: usize) -> Vec<u8> {
    let value = vec![0x42u8; bytes - 80];
    build::single(None, Some(&value), 1_700_000_000_000)
}

fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn report(name: &str, bytes: u64, d: Duration) {
    println!(
        "{name:<52} {:>9.1} MB/s  ({} MiB in {:.3} s)",
        mb_s(bytes, d),
        bytes / MIB as u64,
        d.as_secs_f64()
    );
}

/// `tasks` concurrent producers append `total` bytes of `batch_bytes` batches to `logs`
/// (round robin); returns the elapsed time.
async fn append_load(
    logs: &[Rc<PartitionLog>],
    batch_bytes: usize,
    total: usize,
    tasks: usize,
    durability: Durability,
) -> Duration {
    let batch = Rc::new(make_batch(batch_bytes));
    let per_task = total / batch.len() / tasks;
    let start = Instant::now();
    let mut handles = vec![];
    for t in 0..tasks {
        let log = logs[t % logs.len()].clone();
        let batch = batch.clone();
        handles.push(glommio::spawn_local(async move {
            for _ in 0..per_task {
                log.append(BytesMut::from(&batch[..]), durability)
                    .await
                    .expect("append");
            }
        }));
    }
    for h in handles {
        h.await;
    }
    start.elapsed()
}

async fn open(dir: &Path, cfg: LogConfig, cache: &Rc<BatchCache>) -> Rc<PartitionLog> {
    PartitionLog::open(dir, cfg, cache.clone())
        .await
        .expect("open")
}

/// A fresh log in `dir` holding `bytes` of 1 MiB batches appended by `tasks` producers.
async fn filled_log(
    dir: &Path,
    cache: &Rc<BatchCache>,
    bytes: usize,
    tasks: usize,
) -> Rc<PartitionLog> {
    let log = open(dir, config(1 << 30), cache).await;
    append_load(
        std::slice::from_ref(&log),
        MIB,
        bytes,
        tasks,
        Durability::Written,
    )
    .await;
    log
}

/// Reads `[from, to)` sequentially with `bytes_max` per read; returns bytes read.
async fn read_range(log: &PartitionLog, from: Offset, to: Offset, bytes_max: u32) -> u64 {
    let mut at = from;
    let mut bytes = 0u64;
    while at < to {
        let r = log
            .read(ReadOptions {
                start: at,
                bytes_max,
            })
            .await
            .expect("read");
        let last = r.batches.last().expect("batches");
        let h = sluice::protocol::batch::BatchHeader::parse(last).expect("batch");
        at = h.last_offset().next();
        bytes += r.bytes() as u64;
    }
    bytes
}

async fn bench(root: PathBuf, phases: Vec<String>) {
    let gib = 1usize << 30;
    let no_cache = BatchCache::new(0);
    let run = |p: &str| phases.is_empty() || phases.iter().any(|x| x == p);

    // Warm-up, not reported: the first few hundred MiB a process appends run at about half speed
    // (heap growth, first-touch page faults of chunk buffers); a broker lives in the steady state.
    {
        let dir = root.join("warmup");
        let log = filled_log(&dir, &no_cache, 256 * MIB, 8).await;
        log.close().await.expect("close");
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    // Single partition, large batches, no fdatasync; the 1 GiB segment is reused below for
    // recovery and cold reads.
    let big = root.join("big-0");
    if run("big") {
        let log = open(&big, config(2 << 30), &no_cache).await;
        let d = append_load(std::slice::from_ref(&log), MIB, gib, 8, Durability::Written).await;
        report(
            "append 1 partition, 1 MiB batches, no fdatasync",
            gib as u64,
            d,
        );
        // Crash: no close. Without the index files and the producer snapshot the next open must
        // scan the whole segment.
    }
    if run("big") {
        for f in [
            "00000000000000000000.index",
            "00000000000000000000.timeindex",
        ] {
            let _ = std::fs::remove_file(big.join(f));
        }
        let _ = std::fs::remove_file(big.join("producer-state.snapshot"));
        let start = Instant::now();
        let log = open(&big, config(2 << 30), &no_cache).await;
        let d = start.elapsed();
        println!(
            "{:<52} {:>9.3} s     ({} MiB unindexed segment, {:.0} MB/s)",
            "recovery of the 1 GiB active segment, no index",
            d.as_secs_f64(),
            log.size_bytes() / MIB as u64,
            mb_s(log.size_bytes(), d)
        );
        // Cold reads: every byte from disk (no cache), 8 readers on distinct ranges like fio's
        // iodepth 8, then one sequential reader.
        let end = log.high_watermark().0;
        let start = Instant::now();
        let mut hs = vec![];
        for k in 0..8 {
            let log = log.clone();
            let (a, b) = (end * k / 8, end * (k + 1) / 8);
            hs.push(glommio::spawn_local(async move {
                read_range(&log, Offset(a), Offset(b), MIB as u32).await
            }));
        }
        let mut bytes = 0;
        for h in hs {
            bytes += h.await;
        }
        report(
            "cold read, 8 readers, 1 MiB per read",
            bytes,
            start.elapsed(),
        );
        let start = Instant::now();
        let bytes = read_range(&log, Offset(0), Offset(end), 4 * MIB as u32).await;
        report(
            "cold read, 1 reader, 4 MiB per read",
            bytes,
            start.elapsed(),
        );
        println!("  (read-aheads used: {})", log.readahead_used());
        log.close().await.expect("close");
    }
    let _ = std::fs::remove_dir_all(&big);

    let singles = [
        (
            "append 1 partition, 1 MiB batches, fdatasync per group commit",
            gib,
            MIB,
            8,
            Durability::Synced,
        ),
        (
            "append 1 partition, 16 KiB batches, no fdatasync",
            gib / 2,
            16 << 10,
            64,
            Durability::Written,
        ),
        (
            "append 1 partition, 16 KiB batches, fdatasync per group commit",
            gib / 2,
            16 << 10,
            64,
            Durability::Synced,
        ),
        (
            "append 1 partition, 16 KiB, fdatasync, 256 in flight",
            gib / 2,
            16 << 10,
            256,
            Durability::Synced,
        ),
    ];
    for (k, (name, bytes, batch, tasks, dur)) in singles.into_iter().enumerate() {
        if !run("one") {
            break;
        }
        let dir = root.join("one");
        let log = open(&dir, config(1 << 30), &no_cache).await;
        let d = append_load(std::slice::from_ref(&log), batch, bytes, tasks, dur).await;
        report(name, bytes as u64, d);
        if k == 0 {
            // Crash after synced appends: the index entries and the producer snapshot written
            // along the way bound the recovery scan.
            drop(log);
            let start = Instant::now();
            let log = open(&dir, config(1 << 30), &no_cache).await;
            let d = start.elapsed();
            let rep = log.recovery_report().expect("crash recovery");
            println!(
                "{:<52} {:>9.3} s     ({} MiB segment, scan from {} MiB, {} batches)",
                "recovery of the 1 GiB active segment, indexed",
                d.as_secs_f64(),
                log.size_bytes() / MIB as u64,
                rep.scan_from / MIB as u64,
                rep.batches
            );
            log.close().await.expect("close");
        } else {
            log.close().await.expect("close");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    // (partitions, segment size, batches in flight per partition, batch size, total bytes)
    for (parts, segment, per_part, batch, total) in [
        (100usize, 64u64 << 20, 1usize, 16usize << 10, gib / 2),
        (1000, 8 << 20, 1, 16 << 10, gib / 2),
        (1000, 8 << 20, 4, 16 << 10, gib / 2),
        (1000, 16 << 20, 1, 256 << 10, gib),
    ] {
        if !run("many") && !run(&format!("many-{parts}-{}k", batch >> 10)) {
            continue;
        }
        let mut logs = vec![];
        for p in 0..parts {
            logs.push(open(&root.join(format!("many-{p}")), config(segment), &no_cache).await);
        }
        let tasks = parts * per_part;
        let kib = batch >> 10;
        // Unreported warm-up: every partition's first extent is allocated here, as it would be
        // long before in a broker that has been running.
        append_load(&logs, batch, total / 4, tasks, Durability::Written).await;
        let d = append_load(&logs, batch, total, tasks, Durability::Written).await;
        report(
            &format!("append {parts} partitions, {kib} KiB, no fdatasync, {per_part}/partition"),
            total as u64,
            d,
        );
        let d = append_load(&logs, batch, total / 2, tasks, Durability::Synced).await;
        report(
            &format!("append {parts} partitions, {kib} KiB, fdatasync, {per_part}/partition"),
            (total / 2) as u64,
            d,
        );
        for l in &logs {
            l.close().await.expect("close");
        }
        drop(logs);
        for p in 0..parts {
            let _ = std::fs::remove_dir_all(root.join(format!("many-{p}")));
        }
    }

    // Cached reads: the batch cache hands out the stored `Bytes` (no copy, no syscall).
    if run("cached") {
        let cache = BatchCache::new(512 * MIB);
        let dir = root.join("cached");
        let log = filled_log(&dir, &cache, 256 * MIB, 4).await;
        let end = log.high_watermark();
        // Hand-off rate: what a zero-copy (vectored) send receives. Measures the read path,
        // not memory bandwidth.
        let start = Instant::now();
        let mut bytes = 0u64;
        for _ in 0..40 {
            bytes += read_range(&log, Offset(0), end, MIB as u32).await;
        }
        let d = start.elapsed();
        println!(
            "{:<52} {:>9.2} GB/s  ({} MiB handed out in {:.3} s, no byte touched)",
            "cached read hand-off, 1 MiB per read",
            bytes as f64 / d.as_secs_f64() / 1e9,
            bytes / MIB as u64,
            d.as_secs_f64()
        );
        // Every returned byte copied once, as a socket write would.
        let mut sink = vec![0u8; 2 * MIB];
        let start = Instant::now();
        let mut bytes = 0u64;
        for _ in 0..8 {
            let mut at = Offset(0);
            while at < end {
                let r = log
                    .read(ReadOptions {
                        start: at,
                        bytes_max: MIB as u32,
                    })
                    .await
                    .expect("read");
                for b in &r.batches {
                    sink[..b.len()].copy_from_slice(b);
                    bytes += b.len() as u64;
                }
                let h =
                    sluice::protocol::batch::BatchHeader::parse(r.batches.last().expect("batch"))
                        .expect("batch");
                at = h.last_offset().next();
            }
        }
        let d = start.elapsed();
        std::hint::black_box(&sink);
        let s = cache.stats();
        println!(
            "{:<52} {:>9.2} GB/s  ({} MiB in {:.3} s, hits {} misses {})",
            "cached read + copy of every byte, 1 MiB per read",
            bytes as f64 / d.as_secs_f64() / 1e9,
            bytes / MIB as u64,
            d.as_secs_f64(),
            s.hits,
            s.misses
        );
        log.close().await.expect("close");
        // The memory-bandwidth limit of the copy above: the same bytes copied the same way,
        // without the engine.
        let src: Vec<Vec<u8>> = (0..256).map(|i| vec![i as u8; MIB]).collect();
        let start = Instant::now();
        let mut bytes = 0u64;
        for _ in 0..8 {
            for b in &src {
                sink[..b.len()].copy_from_slice(b);
                bytes += b.len() as u64;
            }
        }
        let d = start.elapsed();
        std::hint::black_box(&sink);
        println!(
            "{:<52} {:>9.2} GB/s  (limit: 256 MiB of 1 MiB buffers copied 8 times)",
            "memcpy of the same volume, no engine",
            bytes as f64 / d.as_secs_f64() / 1e9,
        );
    }
}

fn main() {
    let root = std::env::var_os("SLUICE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench-data"))
        .join(format!("storage-{}", std::process::id()));
    // glommio opens paths relative to no directory: make the root absolute.
    let root = std::path::absolute(&root).expect("absolute bench dir");
    std::fs::create_dir_all(&root).expect("bench dir");
    println!("storage bench in {}", root.display());
    let phases: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    // The broker's process-wide allocator settings, so chunk and batch buffers come from the
    // heap as they do in the broker.
    sluice::broker::tune_allocator();
    let r = root.clone();
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(bench(r, phases));
    std::fs::remove_dir_all(&root).expect("cleanup");
}
