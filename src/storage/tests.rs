//! Tests of the partition log as a whole, each run inside a glommio LocalExecutor on a temp dir.

use crate::protocol::batch::HEADER_BYTES;
use crate::protocol::builder as build;

/// An uncompressed batch of `n` records from idempotent producer `pid`/`epoch` starting at
/// sequence `seq` (KIP-98 fields set, CRC recomputed).
pub(crate) fn idempotent_batch(pid: i64, epoch: i16, seq: i32, n: usize) -> Vec<u8> {
    let recs: Vec<build::Record<'_>> = (0..n)
        .map(|_| build::Record {
            key: None,
            value: Some(b"v"),
            headers: &[],
            timestamp_ms: 1000,
        })
        .collect();
    let mut b = build::batch(&recs);
    b[43..51].copy_from_slice(&pid.to_be_bytes());
    b[51..53].copy_from_slice(&epoch.to_be_bytes());
    b[53..57].copy_from_slice(&seq.to_be_bytes());
    let crc = crc32c::crc32c(&b[21..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    debug_assert!(b.len() > HEADER_BYTES);
    b
}

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use crate::protocol::batch::{self, BatchHeader};
use crate::storage::cycle;
use crate::storage::io::{Faults, FaultyIo};
use crate::storage::read::READAHEAD_BYTES;
use crate::storage::*;
use crate::types::{Clock, FakeClock, Offset};

pub(crate) fn run<T>(f: impl std::future::Future<Output = T> + 'static) -> T {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(f)
}

pub(crate) fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes: 64 << 10,
        segment_ms: None,
        retention_ms: None,
        retention_bytes: None,
        index_interval_bytes: 1024,
        flush: FlushPolicy::Always,
        compaction: None,
    }
}

/// A batch of `n` records of `value_bytes` each, timestamped `ts`; content depends on `tag`.
pub(crate) fn batch(n: usize, value_bytes: usize, ts: i64, tag: u8) -> Vec<u8> {
    let value = vec![tag; value_bytes];
    let recs: Vec<build::Record<'_>> = (0..n)
        .map(|i| build::Record {
            key: None,
            value: Some(&value),
            headers: &[],
            timestamp_ms: ts + i as i64,
        })
        .collect();
    build::batch(&recs)
}

pub(crate) async fn open(dir: &Path, cfg: LogConfig) -> Rc<PartitionLog> {
    PartitionLog::open(dir, cfg, BatchCache::new(64 << 20))
        .await
        .expect("open")
}

pub(crate) async fn open_faulty(dir: &Path, cfg: LogConfig) -> (Rc<PartitionLog>, Rc<Faults>) {
    open_faulty_at(dir, cfg, Clock::system()).await
}

/// [`open_faulty`] with the log reading `clock`.
pub(crate) async fn open_faulty_at(
    dir: &Path,
    cfg: LogConfig,
    clock: Clock,
) -> (Rc<PartitionLog>, Rc<Faults>) {
    open_with_faults(dir, cfg, clock, Faults::default()).await
}

/// The power fails under `logs`: their storage crashes (the I/O already issued completes), the
/// logs are dropped and waited for, then each file is cut back to what a completed sync covered.
async fn cut_power(logs: Vec<Rc<PartitionLog>>, faults: &Faults) {
    faults.crashed.set(true);
    let weak: Vec<_> = logs.iter().map(Rc::downgrade).collect();
    drop(logs);
    poll_until("the logs to be gone", || {
        weak.iter().all(|w| w.upgrade().is_none())
    })
    .await;
    faults.power_cut().unwrap();
}

/// Faults that model a power cut: only what a completed sync covered survives `power_cut()`.
fn power_model() -> Faults {
    let f = Faults::default();
    f.model_power.set(true);
    f
}

/// A log over [`FaultyIo`] with `faults` set from the start (e.g. `model_power`, which must
/// see every file the log opens).
pub(crate) async fn open_with_faults(
    dir: &Path,
    cfg: LogConfig,
    clock: Clock,
    faults: Faults,
) -> (Rc<PartitionLog>, Rc<Faults>) {
    let faults = Rc::new(faults);
    let io = Rc::new(FaultyIo {
        faults: faults.clone(),
    });
    let log = PartitionLog::open_with_io(dir, cfg, BatchCache::new(64 << 20), io, clock)
        .await
        .expect("open");
    (log, faults)
}

pub(crate) async fn append(log: &PartitionLog, b: &[u8], d: Durability) -> AppendResult {
    log.append(BytesMut::from(b), d).await.expect("append")
}

/// Every batch from `from` to the high watermark, read in steps of `bytes_max`.
pub(crate) async fn read_all(log: &PartitionLog, from: Offset, bytes_max: u32) -> Vec<Bytes> {
    let mut out = vec![];
    let mut at = from;
    while at < log.high_watermark() {
        let r = log
            .read(ReadOptions {
                start: at,
                bytes_max,
            })
            .await
            .expect("read");
        assert!(!r.batches.is_empty(), "no batch at {at}");
        for b in r.batches {
            let h = BatchHeader::parse_checked(&b).expect("valid batch");
            assert!(h.last_offset() >= at);
            at = h.last_offset().next();
            out.push(b);
        }
    }
    out
}

/// How long a test waits for a condition before it fails.
const WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits until `cond` holds on the log's state (re-checked on every change of it); fails the
/// test after [`WAIT_MAX`].
pub(crate) async fn wait_state(log: &PartitionLog, what: &str, cond: impl Fn(&State) -> bool) {
    let done = futures_lite::future::or(
        async {
            log.wait_until(cond).await;
            true
        },
        async {
            glommio::timer::sleep(WAIT_MAX).await;
            false
        },
    )
    .await;
    assert!(done, "timed out waiting for {what}");
}

/// Polls `cond` (for conditions outside the log's state, such as files) until it holds; fails
/// the test after [`WAIT_MAX`].
pub(crate) async fn poll_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + WAIT_MAX;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
    }
}

fn base_of(b: &[u8]) -> Offset {
    BatchHeader::parse(b).unwrap().base_offset()
}

/// The batch with its base offset patched, as the log stores it.
fn at_offset(b: &[u8], base: Offset) -> Vec<u8> {
    let mut v = b.to_vec();
    batch::set_base_offset(&mut v, base);
    v
}

#[test]
fn appends_get_consecutive_offsets_and_read_back_from_cache_and_disk() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let log = open(&d, small_config()).await;
        let mut stored = vec![];
        let mut expected = Offset(0);
        for i in 0..40u8 {
            let n = 1 + i as usize % 3;
            let b = batch(n, 500 + i as usize * 40, 1000 + i as i64, i);
            let r = append(&log, &b, Durability::Written).await;
            assert_eq!(r.base_offset, expected);
            assert_eq!(r.last_offset.0, expected.0 + n as i64 - 1);
            assert!(!r.duplicate);
            expected = r.last_offset.next();
            stored.push(at_offset(&b, r.base_offset));
        }
        assert!(log.segment_count() > 1, "64 KiB segments must have rolled");
        assert_eq!(log.high_watermark(), log.log_end_offset());
        let cached = read_all(&log, Offset(0), 1).await;
        assert_eq!(cached.len(), stored.len());
        for (a, b) in cached.iter().zip(&stored) {
            assert_eq!(&a[..], &b[..]);
        }
        assert!(log.cache().stats().hits > 0);
        log.close().await.unwrap();
        // A fresh cache: every read goes to disk.
        let log = PartitionLog::open(&d, small_config(), BatchCache::new(0))
            .await
            .unwrap();
        let cold = read_all(&log, Offset(0), 3000).await;
        assert_eq!(cold.len(), stored.len());
        for (a, b) in cold.iter().zip(&stored) {
            assert_eq!(&a[..], &b[..]);
        }
        assert_eq!(log.cache().stats().hits, 0);
        // Reading from the middle of a batch returns the batch containing the offset.
        let mid = base_of(&stored[10]).0 + 1; // stored[10] holds 2 records
        let r = log
            .read(ReadOptions {
                start: Offset(mid),
                bytes_max: 1,
            })
            .await
            .unwrap();
        assert_eq!(r.batches.len(), 1);
        assert_eq!(&r.batches[0][..], &stored[10][..]);
    });
}

#[test]
fn durability_levels_and_wait_for_append() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let log = open(&d, small_config()).await;
        let b = batch(3, 100, 5, 1);
        // Accepted: offsets assigned, not necessarily readable yet.
        let r = append(&log, &b, Durability::Accepted).await;
        assert_eq!((r.base_offset, r.last_offset), (Offset(0), Offset(2)));
        assert_eq!(log.log_end_offset(), Offset(3));
        log.wait_for_append(Offset(2)).await;
        assert_eq!(log.high_watermark(), Offset(3));
        let r = append(&log, &b, Durability::Synced).await;
        assert_eq!(r.base_offset, Offset(3));
        assert!(log.synced_offset() >= Offset(6));
        let r = append(&log, &b, Durability::Written).await;
        assert!(log.high_watermark() > r.last_offset);
        // An empty or corrupt input is refused before anything is assigned.
        let mut bad = b.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(matches!(
            log.append(BytesMut::from(&bad[..]), Durability::Written)
                .await,
            Err(StorageError::Corrupt(BatchError::BadCrc))
        ));
        assert!(matches!(
            log.append(BytesMut::new(), Durability::Written).await,
            Err(StorageError::Corrupt(_))
        ));
        assert_eq!(log.log_end_offset(), Offset(9));
        // Reads outside [log start, log end] are out of range; at the end they are empty.
        assert!(matches!(
            log.read(ReadOptions {
                start: Offset(10),
                bytes_max: 100
            })
            .await,
            Err(StorageError::OffsetOutOfRange { .. })
        ));
        let r = log
            .read(ReadOptions {
                start: Offset(9),
                bytes_max: 100,
            })
            .await
            .unwrap();
        assert!(r.batches.is_empty());
        assert_eq!(r.high_watermark, Offset(9));
    });
}

#[test]
fn concurrent_synced_appends_share_writes_and_fdatasyncs() {
    // Group commit: appends arriving while a write or sync is in flight join the next one.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let (log, faults) = open_faulty(&d, small_config()).await;
        let n = 64;
        let mut tasks = vec![];
        for i in 0..n {
            let log = log.clone();
            tasks.push(glommio::spawn_local(async move {
                append(&log, &batch(1, 200, i, i as u8), Durability::Synced).await
            }));
        }
        let mut offsets = vec![];
        for t in tasks {
            offsets.push(t.await.base_offset.0);
        }
        offsets.sort();
        assert_eq!(offsets, (0..n).collect::<Vec<_>>());
        assert!(log.synced_offset() >= Offset(n));
        let (w, s) = (faults.writes.get(), faults.syncs.get());
        assert!(w < n as u64 / 2, "{w} writes for {n} appends");
        assert!(s < n as u64 / 2, "{s} syncs for {n} appends");
    });
}

#[test]
fn read_returns_one_whole_batch_even_beyond_bytes_max() {
    // Kafka protocol guide, Fetch: the first batch is returned even if larger than max_bytes.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let log = PartitionLog::open(&d, small_config(), BatchCache::new(0))
            .await
            .unwrap();
        let big = batch(2, 30_000, 1, 9);
        append(&log, &big, Durability::Written).await;
        append(&log, &batch(1, 10, 2, 8), Durability::Written).await;
        let r = log
            .read(ReadOptions {
                start: Offset(1),
                bytes_max: 100,
            })
            .await
            .unwrap();
        assert_eq!(r.batches.len(), 1);
        assert_eq!(&r.batches[0][..], &at_offset(&big, Offset(0))[..]);
        let r = log
            .read(ReadOptions {
                start: Offset(0),
                bytes_max: 1 << 20,
            })
            .await
            .unwrap();
        assert_eq!(r.batches.len(), 2);
    });
}

#[test]
fn restart_after_clean_close_and_after_crash_keeps_every_written_batch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let log = open(&d, small_config()).await;
        let mut stored = vec![];
        for i in 0..60u8 {
            let b = batch(2, 700, 100 + i as i64, i);
            let r = append(&log, &b, Durability::Written).await;
            stored.push(at_offset(&b, r.base_offset));
        }
        let segs = log.segment_count();
        log.close().await.unwrap();
        assert!(d.join(meta::CLEAN_FILE).exists());
        assert!(matches!(
            log.append(BytesMut::from(&stored[0][..]), Durability::Written)
                .await,
            Err(StorageError::Io(_))
        ));
        drop(log);
        let log = open(&d, small_config()).await;
        // The marker is gone as soon as the log is open for writing.
        assert!(!d.join(meta::CLEAN_FILE).exists());
        assert_eq!(log.segment_count(), segs);
        assert_eq!(log.log_end_offset(), Offset(120));
        let all = read_all(&log, Offset(0), 5000).await;
        assert_eq!(all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), stored);
        for i in 60..70u8 {
            let b = batch(2, 700, 100 + i as i64, i);
            let r = append(&log, &b, Durability::Written).await;
            stored.push(at_offset(&b, r.base_offset));
        }
        // Crash: no close, no marker.
        drop(log);
        let log = PartitionLog::open(&d, small_config(), BatchCache::new(0))
            .await
            .unwrap();
        assert_eq!(log.log_end_offset(), Offset(140));
        let all = read_all(&log, Offset(0), 5000).await;
        assert_eq!(all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), stored);
        assert_eq!(log.max_timestamp(), Some((Offset(139), 170)));
    });
}

/// A power cut can leave a later write on disk after a lost earlier one: valid batches behind a
/// hole of zeros. Recovery stops at the hole and cuts the file there, so an append that later
/// ends exactly where such a stale batch starts, with the offset before the stale one's, cannot
/// make a second recovery take the stale batch as the log's. A crash with only pre-allocated
/// space past the log end keeps that space (no truncation, no journal commit at restart).
#[test]
fn recovery_cuts_the_file_at_a_hole_so_no_stale_batch_behind_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let log = open(&d, small_config()).await;
        let a = batch(1, 300, 1, 1);
        append(&log, &a, Durability::Synced).await;
        let path = meta::segment_path(&d, Offset(0), "log");
        let allocated = std::fs::metadata(&path).unwrap().len();
        assert!(allocated > io::ALIGN_BYTES);
        // A crash (no clean shutdown record) with nothing written past the log end: the
        // pre-allocated space is kept.
        drop(log);
        let log = PartitionLog::open(&d, small_config(), BatchCache::new(0))
            .await
            .unwrap();
        assert_eq!(log.log_end_offset(), Offset(1));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), allocated);
        assert!(log.recovery_report().is_some_and(|r| !r.truncated));
        // Another crash, and a batch of offset 2 one page into the file, behind zeros.
        drop(log);
        let stale_pos = io::ALIGN_BYTES;
        let stale = at_offset(&batch(1, 200, 3, 9), Offset(2));
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            assert!(f.metadata().unwrap().len() > stale_pos + stale.len() as u64);
            f.write_all_at(&stale, stale_pos).unwrap();
        }
        let log = PartitionLog::open(&d, small_config(), BatchCache::new(0))
            .await
            .unwrap();
        assert_eq!(log.log_end_offset(), Offset(1));
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            a.len() as u64,
            "cut at the recovered end"
        );
        assert!(
            log.recovery_report().is_some_and(|r| r.truncated),
            "the report tells the cut"
        );
        // Offset 1, ending exactly where the stale batch of offset 2 began.
        let c = (1..4096)
            .map(|v| batch(1, v, 2, 2))
            .find(|c| (a.len() + c.len()) as u64 == stale_pos)
            .expect("a batch of the right length");
        append(&log, &c, Durability::Synced).await;
        // A second crash.
        drop(log);
        let log = PartitionLog::open(&d, small_config(), BatchCache::new(0))
            .await
            .unwrap();
        assert_eq!(log.log_end_offset(), Offset(2));
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(
            all.iter().map(|x| x.to_vec()).collect::<Vec<_>>(),
            vec![at_offset(&a, Offset(0)), at_offset(&c, Offset(1))]
        );
        log.close().await.unwrap();
    });
}

/// A batch appended in a buffer with room past it (a request's own buffer) is charged that room
/// in the batch cache, since the room stays allocated while the batch is cached. Several
/// batches of one buffer share it: the last is charged the room.
#[test]
fn a_cached_batch_is_charged_the_room_its_buffer_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let log = open(&d, small_config()).await;
        let a = batch(1, 300, 1, 1);
        let mut one = BytesMut::with_capacity(a.len() + 10_000);
        one.extend_from_slice(&a);
        let room = one.capacity() - a.len();
        assert!(room >= 10_000);
        log.append(one, Durability::Written).await.unwrap();
        let s = log.cache().stats();
        assert_eq!((s.batches, s.bytes), (1, a.len() + room));
        let (b, c) = (batch(1, 200, 2, 2), batch(2, 100, 3, 3));
        let mut two = BytesMut::with_capacity(b.len() + c.len() + 5_000);
        two.extend_from_slice(&b);
        two.extend_from_slice(&c);
        let room2 = two.capacity() - b.len() - c.len();
        log.append(two, Durability::Written).await.unwrap();
        let s = log.cache().stats();
        assert_eq!(
            (s.batches, s.bytes),
            (3, a.len() + room + b.len() + c.len() + room2)
        );
        // A buffer with no room is charged its bytes.
        let e = batch(1, 100, 4, 4);
        append(&log, &e, Durability::Written).await;
        let s2 = log.cache().stats();
        assert_eq!(s2.bytes, s.bytes + e.len());
        log.close().await.unwrap();
    });
}

/// Ways to damage the tail of the active segment after a crash.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// Cut the file inside the last batch's 61-byte header.
    MidHeader,
    /// Cut the file inside the last batch's records.
    MidRecord,
    /// Flip a byte of the last batch's stored CRC.
    MidCrc,
    /// Flip a byte of the last batch's records (CRC mismatch).
    FlippedRecord,
    /// Zero the last batch (pre-allocated space that was never written).
    ZeroTail,
    /// Garbage bytes after the last batch.
    GarbageTail,
}

#[test]
fn recovery_truncates_at_the_first_torn_or_invalid_batch() {
    for damage in [
        Damage::MidHeader,
        Damage::MidRecord,
        Damage::MidCrc,
        Damage::FlippedRecord,
        Damage::ZeroTail,
        Damage::GarbageTail,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let mut cfg = small_config();
            cfg.segment_bytes = 1 << 20;
            let log = open(&d, cfg.clone()).await;
            let mut stored = vec![];
            for i in 0..10u8 {
                let b = batch(3, 300, 10 + i as i64, i);
                let r = append(&log, &b, Durability::Written).await;
                stored.push(at_offset(&b, r.base_offset));
            }
            drop(log);
            let path = meta::segment_path(&d, Offset(0), "log");
            let mut bytes = std::fs::read(&path).unwrap();
            let last_pos: usize = stored[..9].iter().map(|b| b.len()).sum();
            let end = last_pos + stored[9].len();
            let keep_last = match damage {
                Damage::MidHeader => {
                    bytes.truncate(last_pos + 30);
                    false
                }
                Damage::MidRecord => {
                    bytes.truncate(last_pos + 200);
                    false
                }
                Damage::MidCrc => {
                    bytes[last_pos + 18] ^= 0xff;
                    false
                }
                Damage::FlippedRecord => {
                    bytes[last_pos + 100] ^= 0x01;
                    false
                }
                Damage::ZeroTail => {
                    bytes[last_pos..end].fill(0);
                    false
                }
                Damage::GarbageTail => {
                    bytes[end..end + 64].fill(0xab);
                    true
                }
            };
            std::fs::write(&path, &bytes).unwrap();
            let log = PartitionLog::open(&d, cfg.clone(), BatchCache::new(0))
                .await
                .unwrap();
            let n = if keep_last { 10 } else { 9 };
            assert_eq!(log.log_end_offset(), Offset(3 * n as i64), "{damage:?}");
            let all = read_all(&log, Offset(0), 1 << 20).await;
            assert_eq!(all.len(), n, "{damage:?}");
            // Appends continue right after the last valid batch, and survive another crash.
            let b = batch(1, 50, 99, 77);
            let r = append(&log, &b, Durability::Written).await;
            assert_eq!(r.base_offset, Offset(3 * n as i64));
            drop(log);
            let log = PartitionLog::open(&d, cfg, BatchCache::new(0))
                .await
                .unwrap();
            assert_eq!(log.log_end_offset(), Offset(3 * n as i64 + 1), "{damage:?}");
            let all = read_all(&log, Offset(0), 1 << 20).await;
            assert_eq!(&all.last().unwrap()[..], &at_offset(&b, r.base_offset)[..]);
        });
    }
}

#[test]
fn missing_or_corrupt_index_files_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let log = open(&d, small_config()).await;
        let mut stored = vec![];
        for i in 0..80u8 {
            let b = batch(1, 1500, 1000 + i as i64, i);
            let r = append(&log, &b, Durability::Written).await;
            stored.push(at_offset(&b, r.base_offset));
        }
        assert!(log.segment_count() >= 2);
        log.close().await.unwrap();
        drop(log);
        std::fs::remove_file(meta::segment_path(&d, Offset(0), "index")).unwrap();
        let ti = meta::segment_path(&d, Offset(0), "timeindex");
        let mut t = std::fs::read(&ti).unwrap();
        t[0] ^= 0xff;
        std::fs::write(&ti, t).unwrap();
        let log = PartitionLog::open(&d, small_config(), BatchCache::new(0))
            .await
            .unwrap();
        assert!(meta::segment_path(&d, Offset(0), "index").exists());
        let all = read_all(&log, Offset(0), 4000).await;
        assert_eq!(all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), stored);
        // Time index lookups work over the rebuilt index.
        assert_eq!(
            log.offset_for_timestamp(1000 + 17).await.unwrap(),
            Some((Offset(17), 1017))
        );
        assert_eq!(log.offset_for_timestamp(5000).await.unwrap(), None);
        assert_eq!(log.max_timestamp(), Some((Offset(79), 1079)));
    });
}

// Kafka protocol guide, DeleteRecords (KIP-107): the log start moves up to the requested
// offset, never past the high watermark (OFFSET_OUT_OF_RANGE). Here the log start also never
// passes the synced offset: written but unsynced batches are synced first.
#[test]
fn delete_records_stops_at_the_high_watermark_and_never_passes_the_synced_offset() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let cfg = small_config();
        let (log, faults) = open_faulty(&d, cfg.clone()).await;
        // Written, not synced: every fdatasync fails meanwhile.
        faults.sync_fails.set(true);
        for i in 0..10u8 {
            append(
                &log,
                &batch(2, 100, 1000 + i as i64, i),
                Durability::Written,
            )
            .await;
        }
        let hw = log.high_watermark();
        assert_eq!((hw, log.synced_offset()), (Offset(20), Offset(0)));
        // Past the high watermark: out of range, nothing moves.
        assert!(matches!(
            log.delete_records_before(Offset(21)).await,
            Err(StorageError::OffsetOutOfRange { .. })
        ));
        // Inside it, but the sync it needs fails: the log start stays where it is.
        assert!(matches!(
            log.delete_records_before(Offset(5)).await,
            Err(StorageError::Io(_))
        ));
        assert_eq!(log.log_start_offset(), Offset(0));
        // Once syncs work, the batches below the new log start are synced first.
        faults.sync_fails.set(false);
        assert_eq!(
            log.delete_records_before(Offset(5)).await.unwrap(),
            Offset(5)
        );
        assert!(log.synced_offset() >= Offset(5));
        assert!(matches!(
            log.read(ReadOptions {
                start: Offset(4),
                bytes_max: 1 << 20
            })
            .await,
            Err(StorageError::OffsetOutOfRange { .. })
        ));
        // Below the log start: nothing changes.
        assert_eq!(
            log.delete_records_before(Offset(3)).await.unwrap(),
            Offset(5)
        );
        // More written, unsynced batches; DeleteRecords at the high watermark empties the log.
        faults.sync_fails.set(true);
        for i in 0..3u8 {
            append(
                &log,
                &batch(1, 100, 2000 + i as i64, i),
                Durability::Written,
            )
            .await;
        }
        let hw = log.high_watermark();
        assert_eq!(hw, Offset(23));
        assert!(log.synced_offset() < hw);
        faults.sync_fails.set(false);
        assert_eq!(log.delete_records_before(hw).await.unwrap(), hw);
        assert_eq!(log.synced_offset(), hw);
        let r = log
            .read(ReadOptions {
                start: hw,
                bytes_max: 1 << 20,
            })
            .await
            .unwrap();
        assert!(r.batches.is_empty());
        assert_eq!((r.log_start_offset, r.high_watermark), (hw, hw));
        // Crash (no close): the log start and every offset below it survive, and appends
        // continue at the old log end.
        drop(log);
        let log = open(&d, cfg.clone()).await;
        assert_eq!(
            (
                log.log_start_offset(),
                log.high_watermark(),
                log.log_end_offset()
            ),
            (hw, hw, hw)
        );
        let r = append(&log, &batch(1, 10, 3000, 1), Durability::Synced).await;
        assert_eq!(r.base_offset, hw);
        assert_eq!(r.log_start_offset, hw);
    });
}

#[test]
fn retention_and_delete_records_advance_log_start_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let mut cfg = small_config();
        cfg.retention_bytes = Some(150 << 10);
        let log = open(&d, cfg.clone()).await;
        for i in 0..200u32 {
            append(
                &log,
                &batch(1, 1500, i as i64, i as u8),
                Durability::Written,
            )
            .await;
        }
        let before = log.segment_count();
        log.enforce_retention(1_000_000).await.unwrap();
        let after = log.segment_count();
        assert!(after < before, "{before} -> {after}");
        assert!(
            log.size_bytes() >= 150 << 10 && log.size_bytes() < (150 << 10) + (64 << 10) + 4096
        );
        let start = log.log_start_offset();
        assert!(start > Offset(0));
        assert!(matches!(
            log.read(ReadOptions {
                start: Offset(0),
                bytes_max: 10
            })
            .await,
            Err(StorageError::OffsetOutOfRange { .. })
        ));
        // Files are unlinked in the background.
        poll_until("the unlink of the segments below the log start", || {
            meta::list_segments(&d).unwrap().len() == after
        })
        .await;

        // DeleteRecords: past the high watermark is out of range; inside moves the log start.
        assert!(log.delete_records_before(Offset(201)).await.is_err());
        assert_eq!(
            log.delete_records_before(Offset(150)).await.unwrap(),
            Offset(150)
        );
        let r = log
            .read(ReadOptions {
                start: Offset(150),
                bytes_max: 1,
            })
            .await
            .unwrap();
        assert_eq!(base_of(&r.batches[0]), Offset(150));
        // retention.ms: every sealed segment is older than now - 10 ms.
        cfg.retention_bytes = None;
        cfg.retention_ms = Some(10);
        log.set_config(cfg.clone());
        log.enforce_retention(1_000_000).await.unwrap();
        assert_eq!(log.segment_count(), 1);
        // Every sealed segment went: the log now starts at the active segment's base.
        let start = log.log_start_offset();
        assert!(start > Offset(150) && start < Offset(200));
        assert!(matches!(
            log.read(ReadOptions {
                start: Offset(150),
                bytes_max: 10
            })
            .await,
            Err(StorageError::OffsetOutOfRange { .. })
        ));
        drop(log); // crash: the log start must come from its checkpoint
        let log = open(&d, cfg).await;
        assert_eq!(log.log_start_offset(), start);
        assert_eq!(log.log_end_offset(), Offset(200));
    });
}

#[test]
fn disk_full_fails_unwritten_appends_keeps_reads_and_resumes_without_a_hole() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let (log, faults) = open_faulty(&d, small_config()).await;
        let mut stored = vec![];
        for i in 0..5u8 {
            let b = batch(2, 100, i as i64, i);
            let r = append(&log, &b, Durability::Written).await;
            stored.push(at_offset(&b, r.base_offset));
        }
        faults.disk_full.set(true);
        let mut tasks = vec![];
        for i in 0..4u8 {
            let log = log.clone();
            tasks.push(glommio::spawn_local(async move {
                log.append(
                    BytesMut::from(&batch(1, 100, 50, 50 + i)[..]),
                    Durability::Written,
                )
                .await
            }));
        }
        for t in tasks {
            match t.await {
                Err(StorageError::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOSPC)),
                other => panic!("expected ENOSPC, got {other:?}"),
            }
        }
        // Nothing claims offsets that are not on disk; reads still work.
        assert_eq!(log.log_end_offset(), Offset(10));
        assert_eq!(log.high_watermark(), Offset(10));
        assert_eq!(read_all(&log, Offset(0), 1).await.len(), 5);
        // Space returns: appends resume at the next offset, no hole, no duplicate.
        faults.disk_full.set(false);
        let b = batch(1, 100, 60, 60);
        let r = append(&log, &b, Durability::Synced).await;
        assert_eq!(r.base_offset, Offset(10));
        stored.push(at_offset(&b, r.base_offset));
        drop(log);
        let log = PartitionLog::open(&d, small_config(), BatchCache::new(0))
            .await
            .unwrap();
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), stored);
    });
}

/// A flush's lists are kept for the next one and cleared whatever the write's outcome: after a
/// failed (torn) write the next flushes carry only the appends made after it, from the written
/// end, and the file (read back without the cache) holds exactly the acknowledged batches.
#[test]
fn flushes_after_a_failed_write_reuse_clean_lists() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let (log, faults) = open_faulty(&d, small_config()).await;
        let mut stored = vec![];
        for i in 0..3u8 {
            let b = batch(2, 700, i as i64, i);
            let r = append(&log, &b, Durability::Written).await;
            stored.push(at_offset(&b, r.base_offset));
        }
        assert!(log.state.borrow().appender.spare_is_clear());
        faults.torn_writes.set(1);
        let mut big = batch(4, 3000, 10, 10);
        big.extend(batch(4, 3000, 11, 11));
        assert!(log
            .append(BytesMut::from(&big[..]), Durability::Written)
            .await
            .is_err());
        assert!(log.state.borrow().appender.spare_is_clear());
        for i in 20..26u8 {
            let b = batch(1, 50 + 400 * (i as usize % 3), i as i64, i);
            let r = append(&log, &b, Durability::Written).await;
            stored.push(at_offset(&b, r.base_offset));
            assert!(log.state.borrow().appender.spare_is_clear());
        }
        log.close().await.unwrap();
        drop(log);
        let log = PartitionLog::open(&d, small_config(), BatchCache::new(0))
            .await
            .unwrap();
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), stored);
    });
}

#[test]
fn torn_write_leaves_no_stale_batch_behind_a_shorter_retry() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let (log, faults) = open_faulty(&d, small_config()).await;
        let first = batch(1, 100, 1, 1);
        append(&log, &first, Durability::Written).await;
        // A large write of two batches is torn (half of it reaches the file) and fails.
        faults.torn_writes.set(1);
        let mut two = batch(4, 3000, 2, 2);
        two.extend(batch(4, 3000, 3, 3));
        assert!(log
            .append(BytesMut::from(&two[..]), Durability::Written)
            .await
            .is_err());
        assert_eq!(log.log_end_offset(), Offset(1));
        // A short append takes offset 1; after a crash nothing of the failed write may appear.
        let short = batch(1, 10, 4, 4);
        let r = append(&log, &short, Durability::Written).await;
        assert_eq!(r.base_offset, Offset(1));
        drop(log);
        let log = PartitionLog::open(&d, small_config(), BatchCache::new(0))
            .await
            .unwrap();
        assert_eq!(log.log_end_offset(), Offset(2));
        assert_eq!(read_all(&log, Offset(0), 1 << 20).await.len(), 2);
    });
}

#[test]
fn failed_fdatasync_fails_synced_appends_but_keeps_written_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let (log, faults) = open_faulty(&d, small_config()).await;
        // The write + fdatasync path: a failed fdatasync leaves the write in place.
        log.state.borrow_mut().appender.set_durable_writes(false);
        faults.sync_fails.set(true);
        let r = log
            .append(BytesMut::from(&batch(1, 10, 1, 1)[..]), Durability::Synced)
            .await;
        assert!(matches!(r, Err(StorageError::Io(_))));
        assert_eq!(log.high_watermark(), Offset(1));
        faults.sync_fails.set(false);
        let r = append(&log, &batch(1, 10, 2, 2), Durability::Synced).await;
        assert_eq!(r.base_offset, Offset(1));
        assert!(log.synced_offset() >= Offset(2));
    });
}

/// With durable writes, a write whose durability fails is a failed write: its appends fail,
/// nothing of it counts as written, and the next append takes its offsets.
#[test]
fn failed_durable_write_fails_its_appends_and_gives_their_offsets_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let (log, faults) = open_faulty(&d, small_config()).await;
        log.state.borrow_mut().appender.set_durable_writes(true);
        append(&log, &batch(1, 10, 0, 0), Durability::Synced).await;
        assert_eq!(faults.durable_writes.get(), 1);
        assert_eq!(
            faults.syncs.get(),
            0,
            "the durable write needs no fdatasync"
        );
        faults.sync_fails.set(true);
        let r = log
            .append(BytesMut::from(&batch(1, 10, 1, 1)[..]), Durability::Synced)
            .await;
        assert!(matches!(r, Err(StorageError::Io(_))));
        assert_eq!(
            (log.high_watermark(), log.synced_offset()),
            (Offset(1), Offset(1))
        );
        faults.sync_fails.set(false);
        let b = batch(1, 10, 2, 2);
        let r = append(&log, &b, Durability::Synced).await;
        assert_eq!(r.base_offset, Offset(1));
        assert!(log.synced_offset() >= Offset(2));
        let all = read_all(&log, Offset(1), 1 << 20).await;
        assert_eq!(all[0].to_vec(), at_offset(&b, Offset(1)));
    });
}

#[test]
fn idempotent_retries_are_answered_with_original_offsets_across_restarts() {
    // KIP-98: duplicates within the last 5 batches return the original offsets.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let log = open(&d, small_config()).await;
        append(&log, &batch(2, 10, 1, 1), Durability::Written).await; // offsets 0-1, no producer
        let b0 = idempotent_batch(42, 3, 0, 3);
        let r0 = append(&log, &b0, Durability::Written).await;
        assert_eq!((r0.base_offset, r0.last_offset), (Offset(2), Offset(4)));
        let b1 = idempotent_batch(42, 3, 3, 2);
        let r1 = append(&log, &b1, Durability::Written).await;
        let dup = append(&log, &b0, Durability::Written).await;
        assert!(dup.duplicate);
        assert_eq!((dup.base_offset, dup.last_offset), (Offset(2), Offset(4)));
        assert_eq!(log.log_end_offset(), Offset(7));
        assert!(matches!(
            log.append(
                BytesMut::from(&idempotent_batch(42, 3, 9, 1)[..]),
                Durability::Written
            )
            .await,
            Err(StorageError::OutOfOrderSequence)
        ));
        assert!(matches!(
            log.append(
                BytesMut::from(&idempotent_batch(42, 2, 5, 1)[..]),
                Durability::Written
            )
            .await,
            Err(StorageError::InvalidProducerEpoch)
        ));
        assert!(matches!(
            log.append(
                BytesMut::from(&idempotent_batch(42, 4, 5, 1)[..]),
                Durability::Written
            )
            .await,
            Err(StorageError::OutOfOrderSequence)
        ));
        // Several batches in one append are checked one after the other.
        let mut two = idempotent_batch(42, 3, 5, 1);
        two.extend(idempotent_batch(42, 3, 6, 1));
        let r = append(&log, &two, Durability::Written).await;
        assert_eq!((r.base_offset, r.last_offset), (Offset(7), Offset(8)));
        let mut gap = idempotent_batch(42, 3, 7, 1);
        gap.extend(idempotent_batch(42, 3, 9, 1));
        assert!(log
            .append(BytesMut::from(&gap[..]), Durability::Written)
            .await
            .is_err());
        assert_eq!(log.log_end_offset(), Offset(9));
        // Clean restart: the snapshot.
        log.close().await.unwrap();
        drop(log);
        let log = open(&d, small_config()).await;
        let dup = append(&log, &b1, Durability::Written).await;
        assert!(dup.duplicate);
        assert_eq!(dup.base_offset, r1.base_offset);
        append(&log, &idempotent_batch(42, 3, 7, 1), Durability::Written).await;
        // Crash: rebuilt from the snapshot plus the batch headers after it.
        drop(log);
        let log = open(&d, small_config()).await;
        let dup = append(&log, &idempotent_batch(42, 3, 7, 1), Durability::Written).await;
        assert!(dup.duplicate);
        assert_eq!(dup.base_offset, Offset(9));
        assert!(matches!(
            log.append(
                BytesMut::from(&idempotent_batch(42, 3, 10, 1)[..]),
                Durability::Written
            )
            .await,
            Err(StorageError::OutOfOrderSequence)
        ));
    });
}

// KIP-98: a retry is answered with the original offsets, and (like the first attempt) only
// once those batches are as durable as the retry asks. Found by the storage simulation: the
// retry of a Synced append whose fdatasync had failed was acknowledged at once, unsynced.
#[test]
fn idempotent_retry_waits_for_the_durability_of_the_original_batch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let (log, faults) = open_faulty(&d, small_config()).await;
        // The write + fdatasync path, where a batch can be written but not synced.
        log.state.borrow_mut().appender.set_durable_writes(false);
        let b = idempotent_batch(42, 0, 0, 2);
        faults.sync_fails.set(true);
        assert!(matches!(
            log.append(BytesMut::from(&b[..]), Durability::Synced).await,
            Err(StorageError::Io(_))
        ));
        // Written, not synced: the retry may not claim more than the first attempt got.
        assert_eq!(
            (log.high_watermark(), log.synced_offset()),
            (Offset(2), Offset(0))
        );
        assert!(matches!(
            log.append(BytesMut::from(&b[..]), Durability::Synced).await,
            Err(StorageError::Io(_))
        ));
        let r = append(&log, &b, Durability::Written).await;
        assert!(r.duplicate);
        faults.sync_fails.set(false);
        let r = append(&log, &b, Durability::Synced).await;
        assert!(r.duplicate);
        assert_eq!((r.base_offset, r.last_offset), (Offset(0), Offset(1)));
        assert!(log.synced_offset() >= Offset(2));
        // The first attempt's write fails (disk full): the retry waiting on it fails with it,
        // and the next retry appends the batch anew.
        let b = idempotent_batch(42, 0, 2, 1);
        faults.disk_full.set(true);
        let first = {
            let log = log.clone();
            let b = b.clone();
            glommio::spawn_local(async move {
                log.append(BytesMut::from(&b[..]), Durability::Written)
                    .await
            })
        };
        let retry = {
            let log = log.clone();
            let b = b.clone();
            glommio::spawn_local(async move {
                log.append(BytesMut::from(&b[..]), Durability::Written)
                    .await
            })
        };
        assert!(matches!(first.await, Err(StorageError::Io(_))));
        assert!(matches!(retry.await, Err(StorageError::Io(_))));
        faults.disk_full.set(false);
        let r = append(&log, &b, Durability::Written).await;
        assert!(!r.duplicate);
        assert_eq!(r.base_offset, Offset(2));
    });
}

// Found by the storage simulation: a roll that failed after creating the new segment's file
// left it behind while appends went on in the current segment; the next start took the empty
// file as the active segment and cut the current one at its base.
#[test]
fn a_failed_roll_leaves_no_segment_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let (log, faults) = open_faulty(&d, small_config()).await;
        let mut stored = vec![];
        for i in 0..3u8 {
            let b = batch(1, 100, i as i64, i);
            let r = append(&log, &b, Durability::Written).await;
            stored.push(at_offset(&b, r.base_offset));
        }
        faults.allocate_fails.set(true);
        assert!(matches!(log.roll().await, Err(StorageError::Io(_))));
        faults.allocate_fails.set(false);
        assert_eq!(meta::list_segments(&d).unwrap(), vec![Offset(0)]);
        for i in 3..6u8 {
            let b = batch(1, 100, i as i64, i);
            let r = append(&log, &b, Durability::Written).await;
            stored.push(at_offset(&b, r.base_offset));
        }
        log.close().await.unwrap();
        drop(log);
        let log = open(&d, small_config()).await;
        assert!(log.recovery_report().is_none());
        assert_eq!(log.log_end_offset(), Offset(6));
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), stored);
    });
}

#[test]
fn segments_roll_by_size_and_age() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let mut cfg = small_config();
        cfg.segment_bytes = 1 << 30;
        cfg.segment_ms = Some(20);
        let fake = FakeClock::new(1_000_000);
        let (log, _) = open_faulty_at(&d, cfg, Clock::fake(&fake)).await;
        append(&log, &batch(1, 10, 1, 1), Durability::Written).await;
        fake.advance(std::time::Duration::from_millis(19));
        append(&log, &batch(1, 10, 2, 2), Durability::Written).await;
        assert_eq!(log.segment_count(), 1, "younger than segment.ms");
        fake.advance(std::time::Duration::from_millis(1));
        append(&log, &batch(1, 10, 3, 3), Durability::Written).await;
        assert_eq!(log.segment_count(), 2);
        assert_eq!(meta::list_segments(&d).unwrap(), vec![Offset(0), Offset(2)]);
        log.roll().await.unwrap();
        assert_eq!(log.segment_count(), 3);
        assert_eq!(read_all(&log, Offset(0), 1).await.len(), 3);
    });
}

mod model {
    //! Model-based test: random append / read / roll / DeleteRecords / retention / restart
    //! sequences against a plain in-memory list of batches.
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Append {
            batches: Vec<(usize, usize)>,
            synced: bool,
        },
        Read {
            at: f64,
            bytes_max: u32,
        },
        Roll,
        DeleteRecords {
            at: f64,
        },
        RetainBytes {
            bytes: u64,
        },
        Restart {
            clean: bool,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (prop::collection::vec((1usize..4, 0usize..3000), 1..4), any::<bool>())
                .prop_map(|(batches, synced)| Op::Append { batches, synced }),
            4 => (0.0f64..1.0, 1u32..20_000).prop_map(|(at, bytes_max)| Op::Read { at, bytes_max }),
            1 => Just(Op::Roll),
            1 => (0.0f64..1.0).prop_map(|at| Op::DeleteRecords { at }),
            1 => (0u64..60_000).prop_map(|bytes| Op::RetainBytes { bytes }),
            1 => any::<bool>().prop_map(|clean| Op::Restart { clean }),
        ]
    }

    struct Model {
        batches: Vec<(Offset, Offset, Vec<u8>)>,
        start: Offset,
    }

    impl Model {
        fn end(&self) -> Offset {
            self.batches.last().map_or(Offset(0), |b| b.1.next())
        }
        fn pick(&self, at: f64) -> Offset {
            let (s, e) = (self.start.0, self.end().0);
            Offset(s + ((e - s) as f64 * at) as i64)
        }
        /// Index of the batch containing `o`.
        fn find(&self, o: Offset) -> Option<usize> {
            let i = self.batches.partition_point(|b| b.1 < o);
            (i < self.batches.len()).then_some(i)
        }
    }

    async fn check(ops: Vec<Op>, cache_bytes: usize, dir: std::path::PathBuf) {
        let cfg = LogConfig {
            segment_bytes: 16 << 10,
            index_interval_bytes: 2048,
            ..small_config()
        };
        let open_log = |cfg: LogConfig| {
            let dir = dir.clone();
            async move {
                PartitionLog::open(&dir, cfg, BatchCache::new(cache_bytes))
                    .await
                    .expect("open")
            }
        };
        let mut log = open_log(cfg.clone()).await;
        let mut m = Model {
            batches: vec![],
            start: Offset(0),
        };
        let mut tag = 0u8;
        for op in ops {
            match op {
                Op::Append { batches, synced } => {
                    let mut all = vec![];
                    let mut parts = vec![];
                    for (n, v) in batches {
                        tag = tag.wrapping_add(1);
                        let b = batch(n, v, tag as i64, tag);
                        parts.push((n, b.clone()));
                        all.extend(b);
                    }
                    let d = if synced {
                        Durability::Synced
                    } else {
                        Durability::Written
                    };
                    let r = append(&log, &all, d).await;
                    assert_eq!(r.base_offset, m.end());
                    let mut at = r.base_offset;
                    for (n, b) in parts {
                        let last = Offset(at.0 + n as i64 - 1);
                        m.batches.push((at, last, at_offset(&b, at)));
                        at = last.next();
                    }
                    assert_eq!(r.last_offset.next(), m.end());
                }
                Op::Read { at, bytes_max } => {
                    let start = m.pick(at);
                    let r = log
                        .read(ReadOptions { start, bytes_max })
                        .await
                        .expect("read");
                    match m.find(start) {
                        None => assert!(r.batches.is_empty()),
                        Some(i) => {
                            assert!(!r.batches.is_empty());
                            if r.batches.len() > 1 {
                                assert!(r.bytes() <= bytes_max as usize);
                            }
                            for (k, b) in r.batches.iter().enumerate() {
                                assert_eq!(&b[..], &m.batches[i + k].2[..]);
                            }
                        }
                    }
                }
                Op::Roll => log.roll().await.expect("roll"),
                Op::DeleteRecords { at } => {
                    let o = m.pick(at);
                    assert_eq!(
                        log.delete_records_before(o).await.expect("delete"),
                        o.max(m.start)
                    );
                    m.start = m.start.max(o);
                }
                Op::RetainBytes { bytes } => {
                    let mut c = cfg.clone();
                    c.retention_bytes = Some(bytes);
                    log.set_config(c);
                    log.enforce_retention(0).await.expect("retention");
                    log.set_config(cfg.clone());
                    let s = log.log_start_offset();
                    assert!(s >= m.start);
                    assert!(s == m.end() || m.batches.iter().any(|b| b.0 == s) || s == m.start);
                    m.start = s;
                }
                Op::Restart { clean } => {
                    if clean {
                        log.close().await.expect("close");
                    }
                    drop(log);
                    log = open_log(cfg.clone()).await;
                }
            }
            assert_eq!(log.log_end_offset(), m.end());
            assert_eq!(log.high_watermark(), m.end());
            assert_eq!(log.log_start_offset(), m.start);
        }
        let all = read_all(&log, m.start, 7000).await;
        let i = m.find(m.start).unwrap_or(m.batches.len());
        assert_eq!(all.len(), m.batches.len() - i);
        for (a, b) in all.iter().zip(&m.batches[i..]) {
            assert_eq!(&a[..], &b.2[..]);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn log_matches_model(
            ops in prop::collection::vec(op(), 1..40),
            cache_bytes in prop_oneof![Just(0usize), Just(16 << 10), Just(1 << 20)],
        ) {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().to_path_buf();
            run(check(ops, cache_bytes, d));
        }
    }
}

#[test]
fn interval_flush_policy_syncs_on_its_timer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let mut cfg = small_config();
        cfg.flush = FlushPolicy::IntervalMs(20);
        let fake = FakeClock::new(1_000_000);
        let (log, faults) = open_faulty_at(&d, cfg, Clock::fake(&fake)).await;
        let interval = std::time::Duration::from_millis(20);
        // Written appends alone get synced once the interval has passed, not before.
        append(&log, &batch(1, 10, 1, 1), Durability::Written).await;
        poll_until("the flusher's timer", || fake.sleepers() > 0).await;
        assert_eq!(log.synced_offset(), Offset(0));
        fake.advance(interval);
        wait_state(&log, "the timed sync", |s| s.offsets.synced() >= Offset(1)).await;
        // A Synced append waits for the next timed sync; many of them share it.
        let mut tasks = vec![];
        for i in 0..10u8 {
            let log = log.clone();
            tasks.push(glommio::spawn_local(async move {
                append(&log, &batch(1, 10, 2, i), Durability::Synced).await
            }));
        }
        wait_state(&log, "the appends written", |s| {
            s.offsets.hw() >= Offset(11)
        })
        .await;
        poll_until("the flusher's timer", || fake.sleepers() > 0).await;
        assert_eq!(log.synced_offset(), Offset(1), "synced before the interval");
        let before = faults.syncs.get();
        fake.advance(interval);
        for t in tasks {
            t.await;
        }
        assert_eq!(log.synced_offset(), Offset(11));
        assert_eq!(faults.syncs.get() - before, 1, "one sync for all of them");
        // DeleteRecords over written, unsynced batches waits for the next timed sync too.
        append(&log, &batch(1, 10, 3, 1), Durability::Written).await;
        let delete = {
            let log = log.clone();
            glommio::spawn_local(async move { log.delete_records_before(Offset(12)).await })
        };
        poll_until("the flusher's timer", || fake.sleepers() > 0).await;
        assert_eq!(log.synced_offset(), Offset(11));
        fake.advance(interval);
        assert_eq!(delete.await.unwrap(), Offset(12));
        assert_eq!(log.synced_offset(), Offset(12));
    });
}

/// Seven days on a fake clock: the active segment reaches `segment.ms` and rolls on the next
/// append, and once its newest record is older than `retention.ms`, retention removes it.
#[test]
fn seven_days_later_the_segment_rolls_and_retention_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let mut cfg = small_config();
        cfg.segment_ms = Some(SEGMENT_MS_DEFAULT);
        cfg.retention_ms = Some(RETENTION_MS_DEFAULT);
        let start = 1_700_000_000_000;
        let fake = FakeClock::new(start);
        let clock = Clock::fake(&fake);
        let (log, _) = open_faulty_at(&d, cfg, clock.clone()).await;
        append(&log, &batch(3, 100, start, 1), Durability::Written).await;
        let day = std::time::Duration::from_secs(24 * 3600);
        fake.advance(6 * day);
        append(&log, &batch(1, 100, clock.now_ms(), 2), Durability::Written).await;
        assert_eq!(log.segment_count(), 1, "rolled before segment.ms");
        fake.advance(day);
        append(&log, &batch(1, 100, clock.now_ms(), 3), Durability::Written).await;
        assert_eq!(log.segment_count(), 2, "segment.ms passed: rolled");
        // The sealed segment's newest record is a day old, then exactly `retention.ms`: kept.
        log.enforce_retention(clock.now_ms()).await.unwrap();
        fake.advance(6 * day);
        log.enforce_retention(clock.now_ms()).await.unwrap();
        assert_eq!(log.log_start_offset(), Offset(0));
        assert_eq!(log.segment_count(), 2);
        fake.advance(std::time::Duration::from_millis(1));
        log.enforce_retention(clock.now_ms()).await.unwrap();
        assert_eq!(log.segment_count(), 1);
        assert_eq!(log.log_start_offset(), Offset(4));
        assert_eq!(read_all(&log, Offset(4), 1 << 20).await.len(), 1);
    });
}

#[test]
fn accepted_appends_are_written_by_close() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let log = open(&d, small_config()).await;
        for i in 0..20u8 {
            append(&log, &batch(2, 500, 1, i), Durability::Accepted).await;
        }
        assert_eq!(log.log_end_offset(), Offset(40));
        log.close().await.unwrap();
        drop(log);
        let log = open(&d, small_config()).await;
        assert_eq!(log.log_end_offset(), Offset(40));
        assert_eq!(read_all(&log, Offset(0), 1 << 20).await.len(), 20);
    });
}

/// (base offset, stored bytes) of acknowledged appends.
type Acked = Vec<(Offset, Vec<u8>)>;

/// Concurrent producers with large batches (pipelined whole-page flushes), with the disk
/// failing for a while: every acknowledged batch is on disk at its offset after a crash, and the
/// file holds a gap-free run of offsets.
#[test]
fn concurrent_large_appends_with_failures_keep_every_acknowledged_batch() {
    // Small values keep every flush in its first chunk; large ones make flushes of several
    // writes, whose completed prefix is acknowledged before the rest, while other writes fail.
    for (fail, value) in [
        (false, 9000),
        (true, 9000),
        (false, 150_000),
        (true, 150_000),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let mut cfg = small_config();
            cfg.segment_bytes = if value > 100_000 { 32 << 20 } else { 4 << 20 };
            let (log, faults) = open_faulty(&d, cfg.clone()).await;
            let acked: Rc<std::cell::RefCell<Acked>> = Default::default();
            let mut tasks = vec![];
            for t in 0..12u8 {
                let log = log.clone();
                let acked = acked.clone();
                tasks.push(glommio::spawn_local(async move {
                    for i in 0..25u8 {
                        let b = batch(
                            1 + (i % 3) as usize,
                            value + t as usize * 700,
                            i as i64,
                            t ^ i,
                        );
                        let d = if i % 4 == 0 {
                            Durability::Synced
                        } else {
                            Durability::Written
                        };
                        if let Ok(r) = log.append(BytesMut::from(&b[..]), d).await {
                            acked
                                .borrow_mut()
                                .push((r.base_offset, at_offset(&b, r.base_offset)));
                        }
                    }
                }));
            }
            if fail {
                // A fault schedule while the producers run, placed by the writes issued so
                // far (every producer's every append needs a write, so the run issues at
                // least 25 of them): a torn write, then the disk full for a few writes.
                let writes = |n: u64| {
                    let faults = faults.clone();
                    move |_: &State| faults.writes.get() >= n
                };
                wait_state(&log, "a few writes", writes(3)).await;
                faults.torn_writes.set(1);
                wait_state(&log, "a few more writes", writes(6)).await;
                faults.disk_full.set(true);
                wait_state(&log, "writes on a full disk", writes(10)).await;
                faults.disk_full.set(false);
            }
            for t in tasks {
                t.await;
            }
            assert_eq!(
                faults.torn_writes.get(),
                0,
                "the torn write was never issued"
            );
            let n_acked = acked.borrow().len();
            assert!(n_acked > 100, "{n_acked} acknowledged");
            drop(log); // crash
            let log = PartitionLog::open(&d, cfg, BatchCache::new(0))
                .await
                .unwrap();
            let all = read_all(&log, Offset(0), 1 << 20).await;
            let mut expect = Offset(0);
            let mut by_base = std::collections::HashMap::new();
            for b in &all {
                let h = BatchHeader::parse_checked(b).unwrap();
                assert_eq!(h.base_offset(), expect, "gap or duplicate in the log");
                expect = h.last_offset().next();
                by_base.insert(h.base_offset(), b.clone());
            }
            assert_eq!(expect, log.log_end_offset());
            for (base, bytes) in acked.borrow().iter() {
                let got = by_base.get(base).expect("acknowledged batch missing");
                assert_eq!(&got[..], &bytes[..]);
            }
        });
    }
}

#[test]
fn crash_recovery_scans_from_the_last_durable_index_entry() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let mut cfg = small_config();
        cfg.segment_bytes = 8 << 20;
        let log = open(&d, cfg.clone()).await;
        log.state.borrow_mut().appender.set_snapshot_every(16 << 10);
        let mut stored = vec![];
        let mut seq = 0;
        let mut idem = vec![];
        for i in 0..200u32 {
            let b = if i % 4 == 0 {
                let b = idempotent_batch(7, 0, seq, 2);
                seq += 2;
                b
            } else {
                batch(2, 500, 1000 + i as i64, i as u8)
            };
            let r = append(&log, &b, Durability::Synced).await;
            if i % 4 == 0 {
                idem.push((b.clone(), r.base_offset));
            }
            stored.push(at_offset(&b, r.base_offset));
        }
        log.no_snapshot_in_flight().await;
        // Written but never synced: no index entry points at these.
        for i in 0..5u8 {
            let b = batch(1, 300, 5000 + i as i64, i);
            let r = append(&log, &b, Durability::Written).await;
            stored.push(at_offset(&b, r.base_offset));
        }
        let (index, time_index) = {
            let s = log.state.borrow();
            (
                s.active().index().to_vec(),
                s.active().time_index().to_vec(),
            )
        };
        assert!(index.len() > 150);
        let end = log.log_end_offset();
        let total_bytes: u64 = stored.iter().map(|b| b.len() as u64).sum();
        drop(log); // crash: no close

        let log = PartitionLog::open(&d, cfg.clone(), BatchCache::new(0))
            .await
            .unwrap();
        let rep = log.recovery_report().expect("a crash recovery");
        // The scan covered only the tail after the last snapshot-covered index entry.
        assert!(rep.scan_from > total_bytes / 2, "{rep:?}");
        assert!(rep.batches > 5 && rep.batches < 40, "{rep:?}");
        assert_eq!((rep.valid_bytes, rep.truncated), (total_bytes, false));
        assert_eq!(log.log_end_offset(), end);
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), stored);
        {
            let s = log.state.borrow();
            assert_eq!(s.active().index(), index);
            assert_eq!(s.active().time_index(), time_index);
        }
        // Batch i holds offsets 2i, 2i+1 with timestamps 1000+i, 1001+i (every 4th is an
        // idempotent batch stamped 1000).
        assert_eq!(
            log.offset_for_timestamp(1000 + 101).await.unwrap(),
            Some((Offset(2 * 101), 1000 + 102))
        );
        assert_eq!(log.max_timestamp(), Some((Offset(end.0 - 1), 5004)));
        // Producer state: the snapshot plus the replayed tail. The oldest remembered batch (in
        // the snapshot) and the newest (replayed) are duplicates; the next sequence appends.
        let (oldest, at) = &idem[idem.len() - 5];
        let dup = append(&log, oldest, Durability::Written).await;
        assert!(dup.duplicate);
        assert_eq!(dup.base_offset, *at);
        let (newest, at) = idem.last().unwrap();
        let dup = append(&log, newest, Durability::Written).await;
        assert_eq!((dup.duplicate, dup.base_offset), (true, *at));
        assert!(matches!(
            log.append(
                BytesMut::from(&idempotent_batch(7, 0, seq + 1, 1)[..]),
                Durability::Written
            )
            .await,
            Err(StorageError::OutOfOrderSequence)
        ));
        let b = idempotent_batch(7, 0, seq, 1);
        let r = append(&log, &b, Durability::Synced).await;
        assert!(!r.duplicate);
        stored.push(at_offset(&b, r.base_offset));
        // The damage below must not race an index append still on its way.
        log.index_persisted().await;
        drop(log);

        // A damaged entry in the middle of the active index: recovery starts before it.
        let ip = meta::segment_path(&d, Offset(0), "index");
        let mut raw = std::fs::read(&ip).unwrap();
        let n = raw.len() / meta::INDEX_ENTRY_BYTES;
        raw[(n / 2) * meta::INDEX_ENTRY_BYTES + 5] ^= 0x40;
        std::fs::write(&ip, raw).unwrap();
        let log = PartitionLog::open(&d, cfg.clone(), BatchCache::new(0))
            .await
            .unwrap();
        let rep = log.recovery_report().expect("a crash recovery");
        assert!(
            rep.scan_from < total_bytes / 2 && rep.scan_from > 0,
            "{rep:?}"
        );
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), stored);
        assert_eq!(
            log.state.borrow().active().index()[..index.len()],
            index[..]
        );
        // The rewritten index file holds every entry again.
        log.close().await.unwrap();
        let d2 = meta::read_index_file(&ip, meta::decode_index);
        assert!(d2.complete && d2.entries.len() >= index.len());
    });
}

#[test]
fn a_shards_flushers_are_counted_while_their_logs_are_open() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let before = appender::flushers_running();
        let mut logs = Vec::new();
        for i in 0..3 {
            logs.push(open(&d.join(format!("t-{i}")), small_config()).await);
        }
        poll_until("three flushers to start", || {
            appender::flushers_running() == before + 3
        })
        .await;
        for l in logs.drain(..) {
            l.close().await.unwrap();
        }
        poll_until("the flushers to end", || {
            appender::flushers_running() == before
        })
        .await;
    });
}

#[test]
fn written_data_is_synced_in_the_background_and_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let log = open(&d, small_config()).await;
        for i in 0..20u8 {
            append(&log, &batch(2, 700, 10, i), Durability::Written).await;
        }
        let end = log.log_end_offset();
        assert!(log.synced_offset() < end);
        // Acks=1 traffic alone is fdatasynced within BACKGROUND_SYNC_MS.
        wait_state(&log, "a background fdatasync", |s| {
            s.offsets.synced() >= end
        })
        .await;
        // The sync started an index append: wait for it before reading the file.
        log.index_persisted().await;
        let on_disk = meta::read_index_file(
            &meta::segment_path(&d, log.state.borrow().active().base(), "index"),
            meta::decode_index,
        );
        assert!(!on_disk.entries.is_empty());
        assert_eq!(
            on_disk.entries[..],
            log.state.borrow().active().index()[..on_disk.entries.len()]
        );
    });
}

/// Logs of one shard reading `clock`, in `d/t-0`, `d/t-1`, ..., each through a storage of
/// its own over the shared `faults` (so rounds must not tell logs apart by their storage).
async fn open_shard_logs(
    d: &Path,
    n: usize,
    cfg: LogConfig,
    faults: &Rc<Faults>,
    clock: &Clock,
) -> Vec<Rc<PartitionLog>> {
    let mut logs = vec![];
    for i in 0..n {
        let io: Rc<dyn crate::storage::io::StorageIo> = Rc::new(FaultyIo {
            faults: faults.clone(),
        });
        let log = PartitionLog::open_with_io(
            &d.join(format!("t-{i}")),
            cfg.clone(),
            BatchCache::new(64 << 20),
            io,
            clock.clone(),
        )
        .await
        .expect("open");
        logs.push(log);
    }
    logs
}

/// Acks=1 data of a shard's partitions is made durable by the shard's sync rounds: partitions
/// due together share one file-system sync, no partition fdatasyncs its own file, and what the
/// round covered survives a power cut while what was written after it does not.
#[test]
fn acks1_data_of_a_shards_partitions_is_synced_by_one_shared_round_and_survives_a_power_cut() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let fake = FakeClock::new(1_000);
        let clock = Clock::fake(&fake);
        let faults = Rc::new(power_model());
        let logs = open_shard_logs(&d, 12, small_config(), &faults, &clock).await;
        let mut stored = vec![];
        for (i, log) in logs.iter().enumerate() {
            let b = batch(2, 500, 1, i as u8 + 1);
            let r = append(log, &b, Durability::Written).await;
            stored.push(at_offset(&b, r.base_offset));
        }
        let rounds = shard_sync::rounds_done();
        // Due together, a background-sync interval after the logs opened.
        fake.advance(std::time::Duration::from_millis(
            appender::BACKGROUND_SYNC_MS,
        ));
        for log in &logs {
            wait_state(log, "a background sync round", |s| {
                s.offsets.synced() == s.offsets.hw()
            })
            .await;
        }
        assert_eq!(
            shard_sync::rounds_done() - rounds,
            1,
            "one round for all twelve"
        );
        assert_eq!(faults.fs_syncs.get(), 1);
        assert_eq!(faults.syncs.get(), 0, "no fdatasync of a partition's file");
        // Written after the round and never synced: lost with the power.
        for (i, log) in logs.iter().enumerate() {
            append(log, &batch(2, 500, 2, 100 + i as u8), Durability::Written).await;
        }
        cut_power(logs, &faults).await;
        for (i, b) in stored.iter().enumerate() {
            let log = PartitionLog::open(
                &d.join(format!("t-{i}")),
                small_config(),
                BatchCache::new(0),
            )
            .await
            .unwrap();
            let all = read_all(&log, Offset(0), 1 << 20).await;
            assert_eq!(
                all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(),
                vec![b.clone()],
                "partition {i}"
            );
            log.close().await.unwrap();
        }
    });
}

/// A round vouches for the positions a partition had written when it joined: if the
/// partition rolls to a new segment while the round runs, the round's completion leaves the
/// new segment's positions alone (they start over at zero), and a failed round syncs nothing
/// and is retried an interval later.
#[test]
fn a_round_vouches_for_nothing_past_a_roll_and_a_failed_round_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let fake = FakeClock::new(1_000);
        let clock = Clock::fake(&fake);
        let faults = Rc::new(Faults::default());
        let cfg = small_config(); // 64 KiB segments
        let log = open_shard_logs(&d, 1, cfg, &faults, &clock).await.remove(0);
        for i in 0..3u8 {
            append(&log, &batch(1, 15_000, 1, i), Durability::Written).await;
        }
        // A slow round: it is in flight while the log rolls.
        faults.sync_delay_ms.set(300);
        fake.advance(std::time::Duration::from_millis(
            appender::BACKGROUND_SYNC_MS,
        ));
        poll_until("the round to start", || faults.fs_syncs.get() == 1).await;
        faults.sync_delay_ms.set(0); // the roll's own sync is not held
        let rounds = shard_sync::rounds_done();
        for i in 0..3u8 {
            append(&log, &batch(1, 15_000, 2, 10 + i), Durability::Written).await;
        }
        assert_eq!(log.state.borrow().segments.len(), 2, "rolled");
        poll_until("the round to end", || shard_sync::rounds_done() > rounds).await;
        {
            let s = log.state.borrow();
            s.check_invariants();
            assert!(
                s.offsets.synced() < s.offsets.hw(),
                "the new segment's data is not synced"
            );
        }
        // The flusher lives on: an append after the round is written.
        append(&log, &batch(1, 100, 3, 20), Durability::Written).await;
        // A failed round syncs nothing; the next one, an interval later, does.
        faults.sync_fails.set(true);
        fake.advance(std::time::Duration::from_millis(
            appender::BACKGROUND_SYNC_MS,
        ));
        poll_until("the failing round", || faults.fs_syncs.get() == 2).await;
        poll_until("its end", || shard_sync::rounds_done() > rounds + 1).await;
        assert!(log.synced_offset() < log.high_watermark());
        faults.sync_fails.set(false);
        fake.advance(std::time::Duration::from_millis(
            appender::BACKGROUND_SYNC_MS,
        ));
        wait_state(&log, "the retried round", |s| {
            s.offsets.synced() == s.offsets.hw()
        })
        .await;
        log.close().await.unwrap();
    });
}

#[test]
fn appends_in_a_completed_prefix_of_a_flush_are_acknowledged_before_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let mut cfg = small_config();
        cfg.segment_bytes = 64 << 20;
        let (log, faults) = open_faulty(&d, cfg).await;
        // The flush will be three writes: [0, ~600 KB), [~600 KB, ~1.6 MB), [~1.6 MB, ~2.1 MB);
        // the last one is held back.
        faults.hold_writes_from.set(Some(1 << 20));
        let small = batch(1, 600_000, 1, 1);
        let big = batch(1, 1_500_000, 2, 2);
        let l1 = log.clone();
        let s1 = small.clone();
        let t1 = glommio::spawn_local(async move {
            l1.append(BytesMut::from(&s1[..]), Durability::Written)
                .await
                .unwrap()
        });
        let l2 = log.clone();
        let b2 = big.clone();
        let t2 = glommio::spawn_local(async move {
            l2.append(BytesMut::from(&b2[..]), Durability::Written)
                .await
                .unwrap()
        });
        let r1 = t1.await;
        assert_eq!(r1.base_offset, Offset(0));
        // The first append is written and readable; the second still waits for its last write.
        assert_eq!(log.high_watermark(), Offset(1));
        assert_eq!(log.log_end_offset(), Offset(2));
        let got = log
            .read(ReadOptions {
                start: Offset(0),
                bytes_max: 1 << 20,
            })
            .await
            .unwrap();
        assert_eq!(got.batches.len(), 1);
        faults.hold_writes_from.set(None);
        let r2 = t2.await;
        assert_eq!(r2.base_offset, Offset(1));
        assert_eq!(log.high_watermark(), Offset(2));
        drop(log);
        let log = PartitionLog::open(&d, small_config(), BatchCache::new(0))
            .await
            .unwrap();
        let all = read_all(&log, Offset(0), 4 << 20).await;
        assert_eq!(all[0].to_vec(), at_offset(&small, Offset(0)));
        assert_eq!(all[1].to_vec(), at_offset(&big, Offset(1)));
    });
}

#[test]
fn sequential_cold_readers_are_served_from_read_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let mut cfg = small_config();
        cfg.segment_bytes = 64 << 20;
        let log = open(&d, cfg.clone()).await;
        let mut stored = vec![];
        for i in 0..40u8 {
            let b = batch(1, 90_000 + i as usize * 100, i as i64, i);
            let r = append(&log, &b, Durability::Written).await;
            stored.push(at_offset(&b, r.base_offset));
        }
        log.close().await.unwrap();
        drop(log);
        let log = PartitionLog::open(&d, cfg, BatchCache::new(0))
            .await
            .unwrap();
        // Two sequential readers interleaved, and one random read in between.
        let mut at = [Offset(0), Offset(7)];
        let mut got: [Vec<Bytes>; 2] = [vec![], vec![]];
        while at.iter().any(|a| *a < Offset(40)) {
            for k in 0..2 {
                if at[k] >= Offset(40) {
                    continue;
                }
                let r = log
                    .read(ReadOptions {
                        start: at[k],
                        bytes_max: 300 << 10,
                    })
                    .await
                    .unwrap();
                assert!(!r.batches.is_empty());
                at[k] = BatchHeader::parse(r.batches.last().unwrap())
                    .unwrap()
                    .last_offset()
                    .next();
                got[k].extend(r.batches);
            }
            let r = log
                .read(ReadOptions {
                    start: Offset(19),
                    bytes_max: 1,
                })
                .await
                .unwrap();
            assert_eq!(r.batches[0].to_vec(), stored[19]);
        }
        for (k, from) in [(0usize, 0usize), (1, 7)] {
            let g: Vec<Vec<u8>> = got[k].iter().map(|b| b.to_vec()).collect();
            assert_eq!(g, stored[from..].to_vec(), "reader {k}");
        }
        assert!(log.readahead_used() >= 10);
        drop(log);
        assert_eq!(READAHEAD_BYTES.with(|b| b.get()), 0);
    });
}

#[test]
fn failed_index_and_snapshot_writes_only_lengthen_the_recovery_scan() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let mut cfg = small_config();
        cfg.segment_bytes = 8 << 20;
        let log = open(&d, cfg.clone()).await;
        log.state.borrow_mut().appender.set_snapshot_every(8 << 10);
        // Directories where the index file and the snapshot's temp file go: every write fails.
        std::fs::create_dir(meta::segment_path(&d, Offset(0), "index")).unwrap();
        std::fs::create_dir(d.join(meta::PRODUCER_FILE).with_extension("tmp")).unwrap();
        let mut stored = vec![];
        let mut idem = vec![];
        for i in 0..60u32 {
            let b = if i % 3 == 0 {
                idempotent_batch(5, 0, (i / 3) as i32, 1)
            } else {
                batch(1, 700, i as i64, i as u8)
            };
            let r = append(&log, &b, Durability::Synced).await;
            if i % 3 == 0 {
                idem.push((b.clone(), r.base_offset));
            }
            stored.push(at_offset(&b, r.base_offset));
        }
        log.no_snapshot_in_flight().await;
        log.index_persisted().await;
        assert!(log.state.borrow().active().index_files_failed());
        assert!(!d.join(meta::PRODUCER_FILE).exists());
        drop(log); // crash

        let log = PartitionLog::open(&d, cfg, BatchCache::new(0))
            .await
            .unwrap();
        let rep = log.recovery_report().expect("a crash recovery");
        assert_eq!((rep.scan_from, rep.batches), (0, 60));
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), stored);
        // Producer state comes from replaying the whole segment.
        let (last, at) = idem.last().unwrap();
        let dup = append(&log, last, Durability::Written).await;
        assert_eq!((dup.duplicate, dup.base_offset), (true, *at));
        let r = append(&log, &idempotent_batch(5, 0, 20, 1), Durability::Written).await;
        assert!(!r.duplicate);
    });
}

#[test]
fn hostile_lengths_and_counts_in_files_at_start_up_are_ignored_or_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let mut cfg = small_config();
        cfg.segment_bytes = 1 << 20;
        let log = open(&d, cfg.clone()).await;
        let mut stored = vec![];
        for i in 0..10u8 {
            let b = idempotent_batch(5, 0, 3 * i as i32, 3);
            let r = append(&log, &b, Durability::Written).await;
            stored.push(at_offset(&b, r.base_offset));
        }
        // The files written below must not race an index append still on its way.
        log.index_persisted().await;
        drop(log); // a crash: no clean-shutdown marker
                   // The last batch declares 2^31-1 bytes.
        let path = meta::segment_path(&d, Offset(0), "log");
        let mut bytes = std::fs::read(&path).unwrap();
        let last_pos: usize = stored[..9].iter().map(|b| b.len()).sum();
        bytes[last_pos + 8..last_pos + 12].copy_from_slice(&i32::MAX.to_be_bytes());
        std::fs::write(&path, &bytes).unwrap();
        // A checksummed producer snapshot claiming 2^32-1 producers.
        let mut snap = 0i64.to_be_bytes().to_vec();
        snap.extend_from_slice(&u32::MAX.to_be_bytes());
        meta::write_file(&d.join(meta::PRODUCER_FILE), &snap).unwrap();
        // Index entries with valid checksums pointing far past the file; a garbage time index.
        std::fs::write(
            meta::segment_path(&d, Offset(0), "index"),
            meta::encode_index(&[(0, 0), (3, u32::MAX - 1)]),
        )
        .unwrap();
        std::fs::write(meta::segment_path(&d, Offset(0), "timeindex"), [0xff; 100]).unwrap();

        let log = PartitionLog::open(&d, cfg.clone(), BatchCache::new(0))
            .await
            .unwrap();
        assert_eq!(log.log_end_offset(), Offset(27));
        assert!(log.recovery_report().is_some_and(|r| r.truncated));
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(
            all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(),
            stored[..9]
        );
        // The producer state came from the scan: a retry of the last surviving batch (sequences
        // 24-26) is answered with its offsets, and the next sequence is accepted.
        let r = append(&log, &idempotent_batch(5, 0, 24, 3), Durability::Written).await;
        assert_eq!(r.base_offset, Offset(24));
        let r = append(&log, &idempotent_batch(5, 0, 27, 3), Durability::Written).await;
        assert_eq!(r.base_offset, Offset(27));
        log.close().await.unwrap();
    });
}

/// A power cut loses every write that no completed fdatasync or durable write covered
/// (`Faults::power_cut`): whatever the commit path (write + fdatasync, or durable writes), every
/// append acknowledged as `Synced` is found after the restart, at its offsets, byte for byte —
/// with acks=1 and acks=0 appends interleaved, segments rolling, and appends still in flight at
/// the cut.
#[test]
fn power_cut_keeps_every_append_acknowledged_as_synced() {
    for durable_writes in [false, true] {
        for cut_after in [5usize, 40, 90] {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().to_path_buf();
            run(async move {
                let (log, faults) =
                    open_with_faults(&d, small_config(), Clock::system(), power_model()).await;
                log.state
                    .borrow_mut()
                    .appender
                    .set_durable_writes(durable_writes);
                // (base offset, stored bytes) of every append acknowledged as Synced.
                let acked: Rc<RefCell<Acked>> = Rc::default();
                let mut tasks = vec![];
                for i in 0..120usize {
                    let (log, acked) = (log.clone(), acked.clone());
                    let durability = match i % 4 {
                        0 | 1 => Durability::Synced,
                        2 => Durability::Written,
                        _ => Durability::Accepted,
                    };
                    tasks.push(glommio::spawn_local(async move {
                        let b = batch(1 + i % 3, 300 + 37 * (i % 50), i as i64, i as u8);
                        if let Ok(r) = log.append(BytesMut::from(&b[..]), durability).await {
                            if durability == Durability::Synced {
                                acked
                                    .borrow_mut()
                                    .push((r.base_offset, at_offset(&b, r.base_offset)));
                            }
                        }
                    }));
                    if i % 7 == 0 {
                        glommio::yield_if_needed().await;
                    }
                }
                {
                    let acked = acked.clone();
                    poll_until("enough Synced acknowledgements", move || {
                        acked.borrow().len() >= cut_after.min(60)
                    })
                    .await;
                }
                // The power fails: nothing more reaches the files; the appends still waiting are
                // cancelled; the I/O already issued completes before the files are cut back.
                drop(tasks);
                cut_power(vec![log], &faults).await;

                let log = PartitionLog::open(&d, small_config(), BatchCache::new(0))
                    .await
                    .unwrap();
                let acked = acked.take();
                assert!(acked.len() >= cut_after.min(60));
                for (base, bytes) in acked.iter() {
                    let r = log
                        .read(ReadOptions {
                            start: *base,
                            bytes_max: 1,
                        })
                        .await
                        .unwrap_or_else(|e| {
                            panic!("acknowledged batch at {base} lost ({durable_writes}): {e}")
                        });
                    assert_eq!(
                        r.batches.first().map(|b| b.to_vec()).as_ref(),
                        Some(bytes),
                        "acknowledged batch at {base} (durable writes {durable_writes})"
                    );
                }
                log.close().await.unwrap();
            });
        }
    }
}

/// acks=1 appends that end inside a page: each later flush writes the kept partial page and
/// the new bytes as two writes, and every batch reads back byte for byte — before and after a
/// power cut that keeps only what the syncs covered, and after a clean restart.
#[test]
fn a_flush_written_as_page_then_rest_reads_back_whole_and_survives_a_power_cut() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let cfg = LogConfig {
            segment_bytes: 16 << 20,
            ..small_config()
        };
        let (log, faults) = open_with_faults(&d, cfg.clone(), Clock::system(), power_model()).await;
        let mut stored = vec![];
        for i in 0..12usize {
            let before = faults.writes.get();
            let b = batch(3, 1000 + 333 * i, i as i64, i as u8 + 1);
            let r = append(&log, &b, Durability::Written).await;
            stored.push(at_offset(&b, r.base_offset));
            if i > 0 {
                assert_eq!(
                    faults.writes.get() - before,
                    2,
                    "append {i}: the kept page, then the new bytes"
                );
            }
        }
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), stored);
        // An fdatasync covers the first twelve; one more written append is lost with the power.
        log.sync_to(log.high_watermark()).await.unwrap();
        append(&log, &batch(2, 700, 99, 99), Durability::Written).await;
        cut_power(vec![log], &faults).await;
        let log = PartitionLog::open(&d, cfg.clone(), BatchCache::new(0))
            .await
            .unwrap();
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), stored);
        log.close().await.unwrap();
        let log = PartitionLog::open(&d, cfg, BatchCache::new(0))
            .await
            .unwrap();
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), stored);
        log.close().await.unwrap();
    });
}

/// The power-cut model itself: a write no fdatasync covered is gone after the cut, one that an
/// fdatasync covered is not.
#[test]
fn power_cut_drops_the_writes_no_sync_covered() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let fake = FakeClock::new(1_000);
        let (log, faults) =
            open_with_faults(&d, small_config(), Clock::fake(&fake), power_model()).await;
        let synced = batch(2, 500, 1, 1);
        append(&log, &synced, Durability::Synced).await;
        // Written, never synced: the periodic sync does not come (the clock stands still).
        append(&log, &batch(2, 500, 2, 2), Durability::Written).await;
        assert_eq!(log.synced_offset(), Offset(2));
        cut_power(vec![log], &faults).await;
        let log = PartitionLog::open(&d, small_config(), BatchCache::new(0))
            .await
            .unwrap();
        assert_eq!(
            log.log_end_offset(),
            Offset(2),
            "the unsynced batch is lost"
        );
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(
            all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(),
            vec![synced]
        );
        log.close().await.unwrap();
    });
}

/// A power cut at a random point under concurrent acks=all appends to several partitions of one
/// shard (their logs share the executor and the fault seam, so their flushes and syncs are in
/// flight together): after the restart every partition holds each append acknowledged as
/// `Synced`, byte for byte at its offset, and its batches follow each other from offset 0 with
/// no gap. Seeded; each seed picks the commit path, the number of partitions and producers, the
/// batch sizes and when the power fails.
#[test]
fn power_cut_under_concurrent_synced_appends_to_several_partitions_loses_nothing_acknowledged() {
    use rand::{Rng, SeedableRng};
    for seed in 0..8u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let durable_writes = rng.gen_bool(0.5);
        let shard_cycle = rng.gen_bool(0.75);
        let partitions = rng.gen_range(2..=6usize);
        let producers = rng.gen_range(1..=4usize);
        let cut_after = rng.gen_range(1..=80usize);
        let sync_delay_ms = if rng.gen_bool(0.3) { 2 } else { 0 };
        let sizes: Vec<(usize, usize)> = (0..64)
            .map(|_| (rng.gen_range(1..=4), rng.gen_range(50..=3000)))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        run(async move {
            let faults = Rc::new(power_model());
            faults.sync_delay_ms.set(sync_delay_ms);
            let mut logs = vec![];
            for p in 0..partitions {
                let d = root.join(format!("t-{p}"));
                std::fs::create_dir_all(&d).unwrap();
                let io = Rc::new(FaultyIo {
                    faults: faults.clone(),
                });
                let log = PartitionLog::open_with_io(
                    &d,
                    small_config(),
                    BatchCache::new(64 << 20),
                    io,
                    Clock::system(),
                )
                .await
                .expect("open");
                let mut s = log.state.borrow_mut();
                s.appender.set_durable_writes(durable_writes);
                s.appender.set_shard_cycle(shard_cycle);
                drop(s);
                logs.push(log);
            }
            // Per partition: (base offset, stored bytes) of every append acknowledged as Synced.
            let acked: Rc<RefCell<Vec<Acked>>> = Rc::new(RefCell::new(vec![vec![]; partitions]));
            let count = Rc::new(std::cell::Cell::new(0usize));
            let mut tasks = vec![];
            for (p, log) in logs.iter().enumerate() {
                for producer in 0..producers {
                    let (log, acked, count, sizes) =
                        (log.clone(), acked.clone(), count.clone(), sizes.clone());
                    tasks.push(glommio::spawn_local(async move {
                        for i in 0usize.. {
                            let (n, bytes) = sizes[(i + producer * 7 + p * 13) % sizes.len()];
                            let tag = (p * 31 + producer * 7 + i) as u8;
                            let b = batch(n, bytes, i as i64, tag);
                            let Ok(r) =
                                log.append(BytesMut::from(&b[..]), Durability::Synced).await
                            else {
                                return;
                            };
                            acked.borrow_mut()[p]
                                .push((r.base_offset, at_offset(&b, r.base_offset)));
                            count.set(count.get() + 1);
                        }
                    }));
                }
            }
            {
                let count = count.clone();
                poll_until("enough Synced acknowledgements", move || {
                    count.get() >= cut_after
                })
                .await;
            }
            // The power fails: nothing more reaches the files; the appends still waiting are
            // cancelled; the I/O already issued completes before the files are cut back to what
            // a completed fdatasync or durable write covered.
            drop(tasks);
            cut_power(logs, &faults).await;

            let acked = acked.take();
            for (p, acked) in acked.iter().enumerate() {
                let d = root.join(format!("t-{p}"));
                let log = PartitionLog::open(&d, small_config(), BatchCache::new(0))
                    .await
                    .unwrap();
                // Consecutive from 0: nothing follows a gap.
                let all = read_all(&log, Offset(0), 1 << 20).await;
                let mut next = Offset(0);
                let mut by_base = std::collections::HashMap::new();
                for b in &all {
                    let h = BatchHeader::parse_checked(b).expect("valid batch");
                    assert_eq!(h.base_offset(), next, "seed {seed} partition {p}: a gap");
                    next = h.last_offset().next();
                    by_base.insert(h.base_offset(), b.to_vec());
                }
                assert_eq!(next, log.log_end_offset(), "seed {seed} partition {p}");
                for (base, bytes) in acked {
                    assert_eq!(
                        by_base.get(base),
                        Some(bytes),
                        "seed {seed} partition {p}: acknowledged batch at {base} lost or changed \
                         (durable writes {durable_writes}, shard cycle {shard_cycle})"
                    );
                }
                log.close().await.unwrap();
            }
        });
    }
}

/// A long-polling fetch's wake-up: one `AppendSignal` registered with several logs of a shard
/// fires once, when the first of them moves past its offset; it does not fire for appends at or
/// below an offset, it fires at once when a log is already past it, and the other logs drop
/// their registration at their next change.
#[test]
fn an_append_signal_fires_once_when_any_registered_log_moves_past_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    run(async move {
        let mut logs = vec![];
        for p in 0..3 {
            let d = root.join(format!("t-{p}"));
            std::fs::create_dir_all(&d).unwrap();
            logs.push(open(&d, small_config()).await);
        }
        append(&logs[0], &batch(2, 100, 1, 1), Durability::Written).await;
        let signal = AppendSignal::new();
        // Log 0 is at offset 2: waiting past offset 1 (its last record) is not yet satisfied.
        logs[0].signal_append(Offset(2), &signal);
        logs[1].signal_append(Offset(0), &signal);
        logs[2].signal_append(Offset(0), &signal);
        append(&logs[0], &batch(1, 100, 2, 2), Durability::Written).await;
        // Log 0 moved to 3, past its registered offset 2.
        assert!(signal.is_fired());
        signal.wait().await;
        // An append to another registered log drops its stale registration.
        append(&logs[1], &batch(1, 100, 3, 3), Durability::Written).await;
        assert!(logs[1].state.borrow().signals.is_empty());

        let again = AppendSignal::new();
        logs[2].signal_append(Offset(0), &again);
        logs[1].signal_append(Offset(0), &again);
        assert!(again.is_fired(), "log 1 is already past offset 0");

        // A wait that is never satisfied is cancelled by dropping the signal.
        let idle = AppendSignal::new();
        logs[2].signal_append(Offset(5), &idle);
        drop(idle);
        append(&logs[2], &batch(1, 100, 4, 4), Durability::Written).await;
        assert!(logs[2].state.borrow().signals.is_empty());
        for log in logs {
            log.close().await.unwrap();
        }
    });
}

/// The shard's commit cycle: acks=all flushes of the partitions on a shard start together and
/// the next cycle starts once all of them are written. Here all writes are held: A opens a
/// cycle, and B and C join it while it is open; once B's and C's writes are let through the
/// cycle is closed, so B's next acks=all flush waits for A's write — and goes out as soon as
/// that completes.
#[test]
fn acks_all_flushes_of_a_shard_go_in_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    run(async move {
        let mut logs = vec![];
        for p in 0..3 {
            let d = root.join(format!("t-{p}"));
            std::fs::create_dir_all(&d).unwrap();
            let (log, faults) = open_faulty(&d, small_config()).await;
            log.state.borrow_mut().appender.set_shard_cycle(true);
            faults.hold_writes_from.set(Some(0));
            logs.push((log, faults));
        }
        let (cycles0, flushes0) = cycle::stats();
        let mut tasks = vec![];
        for (i, (log, faults)) in logs.iter().enumerate() {
            let l = log.clone();
            tasks.push(glommio::spawn_local(async move {
                append(&l, &batch(1, 500, i as i64, i as u8), Durability::Synced).await
            }));
            poll_until("the write to be issued", || faults.writes.get() >= 1).await;
        }
        assert_eq!(cycle::stats(), (cycles0 + 1, flushes0 + 3), "one cycle");
        let a_task = tasks.remove(0);
        // B and C complete; A is still in flight, the cycle is closed.
        for (_, faults) in &logs[1..] {
            faults.hold_writes_from.set(None);
        }
        for t in tasks {
            assert_eq!(t.await.base_offset, Offset(0));
        }
        let (b, fb) = logs[1].clone();
        let writes_b = fb.writes.get();
        let b_task = glommio::spawn_local(async move {
            append(&b, &batch(1, 500, 4, 4), Durability::Synced).await
        });
        poll_until("B's flusher to wait for the next cycle", || {
            cycle::waiting() == 1
        })
        .await;
        assert_eq!(
            fb.writes.get(),
            writes_b,
            "B's flush is held for the next cycle"
        );
        logs[0].1.hold_writes_from.set(None);
        assert_eq!(a_task.await.base_offset, Offset(0));
        assert_eq!(b_task.await.base_offset, Offset(1));
        assert_eq!(cycle::stats(), (cycles0 + 2, flushes0 + 4));
        for (log, _) in logs {
            log.close().await.unwrap();
        }
    });
}

/// Kafka handles a connection's requests one at a time, so pipelined produce requests land in
/// request order. Here appends run concurrently: a large append waiting for room in the pending
/// buffer must not be overtaken by a small one that would fit.
#[test]
fn appends_are_admitted_in_arrival_order_when_the_buffer_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let mut cfg = small_config();
        cfg.segment_bytes = 1 << 30;
        let (log, faults) = open_faulty(&d, cfg).await;
        // Nothing reaches the disk: the first flush takes the first append and waits, later
        // appends stay pending.
        faults.hold_writes_from.set(Some(0));
        let chunk = batch(1, 1 << 20, 0, 1);
        log.append(BytesMut::from(&chunk[..]), Durability::Accepted)
            .await
            .unwrap();
        poll_until("the first flush's write to be issued", || {
            faults.writes.get() >= 1
        })
        .await;
        // Fill the pending buffer to within 1.5 MiB of its limit.
        let filler = (appender::PENDING_BYTES_MAX - (3 << 19)) / chunk.len();
        for _ in 0..filler {
            log.append(BytesMut::from(&chunk[..]), Durability::Accepted)
                .await
                .unwrap();
        }
        let big = batch(1, 2 << 20, 1, 2);
        let small = batch(1, 1000, 2, 3);
        assert!(log.state.borrow().appender.is_full(big.len()));
        assert!(!log.state.borrow().appender.is_full(small.len()));
        let l = log.clone();
        let b = big.clone();
        let big_task = glommio::spawn_local(async move {
            l.append(BytesMut::from(&b[..]), Durability::Written)
                .await
                .unwrap()
        });
        // The big append is queued for room before the small one arrives.
        wait_state(&log, "the big append to wait for room", |s| {
            s.admission.waiting.len() == 1
        })
        .await;
        let l = log.clone();
        let s = small.clone();
        let small_task = glommio::spawn_local(async move {
            l.append(BytesMut::from(&s[..]), Durability::Written)
                .await
                .unwrap()
        });
        wait_state(&log, "the small append to queue behind it", |s| {
            s.admission.waiting.len() == 2
        })
        .await;
        assert_eq!(
            log.log_end_offset(),
            Offset(filler as i64 + 1),
            "nothing admitted yet"
        );
        faults.hold_writes_from.set(None);
        let (b, s) = (big_task.await, small_task.await);
        assert_eq!(b.base_offset, Offset(filler as i64 + 1));
        assert_eq!(s.base_offset, Offset(filler as i64 + 2));
        assert!(log.state.borrow().admission.waiting.is_empty());
    });
}

/// Tests of the replication primitives: follower and leader appends, control batches, the
/// leader-epoch cache, truncation.
mod replicated {
    use super::*;
    use crate::storage::epochs::{UNDEFINED_EPOCH, UNDEFINED_OFFSET};

    /// `b` as the leader would send it: base offset and leader epoch set.
    fn stamped(b: &[u8], base: i64, epoch: i32) -> Vec<u8> {
        let mut v = at_offset(b, Offset(base));
        batch::set_partition_leader_epoch(&mut v, epoch);
        v
    }

    async fn replicate(log: &PartitionLog, b: &[u8]) -> Result<AppendResult, StorageError> {
        log.append_replicated(BytesMut::from(b), Durability::Written)
            .await
    }

    #[test]
    fn follower_appends_store_batches_verbatim_and_refuse_what_does_not_continue_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let log = open(&d, small_config()).await;
            let first = stamped(&batch(3, 100, 1, 1), 0, 2);
            let r = replicate(&log, &first).await.unwrap();
            assert_eq!((r.base_offset, r.last_offset), (Offset(0), Offset(2)));
            // The same batch again, one past the end, one before: refused, nothing changes.
            for base in [0, 4, 2] {
                let b = stamped(&batch(1, 100, 2, 2), base, 2);
                match replicate(&log, &b).await {
                    Err(StorageError::OffsetMismatch { expected, found }) => {
                        assert_eq!((expected, found), (Offset(3), Offset(base)))
                    }
                    other => panic!("batch at {base} accepted: {other:?}"),
                }
            }
            let mut bad = stamped(&batch(1, 100, 3, 3), 3, 2);
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(matches!(
                replicate(&log, &bad).await,
                Err(StorageError::Corrupt(batch::BatchError::BadCrc))
            ));
            // Two batches in one call must follow each other.
            let second = stamped(&batch(2, 100, 4, 4), 3, 5);
            let third = stamped(&batch(1, 100, 5, 5), 5, 5);
            let both = [second.clone(), third.clone()].concat();
            replicate(&log, &both).await.unwrap();
            assert_eq!(log.log_end_offset(), Offset(6));
            let all = read_all(&log, Offset(0), 1 << 20).await;
            let stored: Vec<Vec<u8>> = all.iter().map(|b| b.to_vec()).collect();
            assert_eq!(stored, vec![first, second, third], "stored verbatim");
            assert_eq!(log.leader_epochs(), vec![(2, Offset(0)), (5, Offset(3))]);
            log.close().await.unwrap();
        });
    }

    #[test]
    fn leader_appends_stamp_the_epoch_outside_the_crc() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let log = open(&d, small_config()).await;
            for (i, epoch) in [1, 1, 3, 3, 3, 4].into_iter().enumerate() {
                log.append_leader(
                    BytesMut::from(&batch(2, 50, i as i64, i as u8)[..]),
                    epoch,
                    Durability::Written,
                )
                .await
                .unwrap();
            }
            let all = read_all(&log, Offset(0), 1 << 20).await;
            let epochs: Vec<i32> = all
                .iter()
                .map(|b| {
                    let h = BatchHeader::parse_checked(b).expect("the CRC still holds");
                    h.partition_leader_epoch()
                })
                .collect();
            assert_eq!(epochs, vec![1, 1, 3, 3, 3, 4]);
            assert_eq!(
                log.leader_epochs(),
                vec![(1, Offset(0)), (3, Offset(4)), (4, Offset(10))]
            );
            assert_eq!(log.end_offset_for_epoch(1), (1, Offset(4)));
            assert_eq!(log.end_offset_for_epoch(2), (1, Offset(4)));
            assert_eq!(log.end_offset_for_epoch(4), (4, Offset(12)));
            assert_eq!(
                log.end_offset_for_epoch(5),
                (UNDEFINED_EPOCH, UNDEFINED_OFFSET)
            );
            // The cache survives a clean restart, a crash, and the loss of its file.
            log.close().await.unwrap();
            drop(log);
            let log = open(&d, small_config()).await;
            assert_eq!(log.end_offset_for_epoch(3), (3, Offset(10)));
            drop(log);
            std::fs::remove_file(d.join(crate::storage::epochs::EPOCH_FILE)).unwrap();
            let log = open(&d, small_config()).await;
            assert_eq!(
                log.leader_epochs(),
                vec![(1, Offset(0)), (3, Offset(4)), (4, Offset(10))],
                "rebuilt from the batch headers"
            );
            log.close().await.unwrap();
        });
    }

    /// A new leader epoch's checkpoint is written off the executor while the appends behind it
    /// wait: appends issued together keep their order, every one answered finds its epoch
    /// already in the checkpoint file, and an append refused by the producer checks notes no
    /// epoch.
    #[test]
    fn new_epochs_are_checkpointed_before_their_append_is_accepted_and_appends_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let log = open(&d, small_config()).await;
            let epochs = [1, 1, 2, 2, 2, 5, 5, 6];
            let tasks: Vec<_> = epochs
                .iter()
                .enumerate()
                .map(|(i, &epoch)| {
                    let l = log.clone();
                    let d = d.clone();
                    glommio::spawn_local(async move {
                        let b = batch(2, 50, i as i64, i as u8);
                        let r = l
                            .append_leader(BytesMut::from(&b[..]), epoch, Durability::Accepted)
                            .await
                            .unwrap();
                        let on_disk = crate::storage::epochs::LeaderEpochs::load(&d)
                            .expect("a checkpoint")
                            .latest();
                        assert!(
                            on_disk >= Some(epoch),
                            "epoch {epoch} answered before its checkpoint: {on_disk:?}"
                        );
                        r.base_offset
                    })
                })
                .collect();
            let mut bases = vec![];
            for t in tasks {
                bases.push(t.await);
            }
            let want: Vec<Offset> = (0..epochs.len() as i64).map(|i| Offset(2 * i)).collect();
            assert_eq!(bases, want, "appends keep the order they were issued in");
            let noted = vec![
                (1, Offset(0)),
                (2, Offset(4)),
                (5, Offset(10)),
                (6, Offset(14)),
            ];
            assert_eq!(log.leader_epochs(), noted);
            // An idempotent producer's batch with a sequence gap, under a new epoch: refused, and
            // the epoch is neither noted nor written.
            log.append_leader(
                BytesMut::from(&idempotent_batch(7, 0, 0, 1)[..]),
                6,
                Durability::Written,
            )
            .await
            .unwrap();
            let gap = idempotent_batch(7, 0, 5, 1);
            assert!(log
                .append_leader(BytesMut::from(&gap[..]), 9, Durability::Written)
                .await
                .is_err());
            assert_eq!(log.leader_epochs(), noted);
            assert_eq!(
                crate::storage::epochs::LeaderEpochs::load(&d)
                    .expect("a checkpoint")
                    .entries(),
                &noted[..]
            );
            log.close().await.unwrap();
        });
    }

    #[test]
    fn control_batches_carry_raft_entries_without_data() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let log = open(&d, small_config()).await;
            let noop = control_batch(CONTROL_RAFT_NOOP, b"", 7, 1000);
            let h = BatchHeader::parse_checked(&noop).unwrap();
            assert!(h.is_control());
            assert_eq!((h.record_count(), h.partition_leader_epoch()), (1, 7));
            let cc = control_batch(CONTROL_RAFT_CONF_CHANGE_V2, b"conf", 7, 1000);
            replicate(&log, &noop).await.unwrap();
            replicate(&log, &at_offset(&cc, Offset(1))).await.unwrap();
            let all = read_all(&log, Offset(0), 1 << 20).await;
            assert_eq!(control_of(&all[0]), Some((CONTROL_RAFT_NOOP, Bytes::new())));
            assert_eq!(
                control_of(&all[1]),
                Some((CONTROL_RAFT_CONF_CHANGE_V2, Bytes::from_static(b"conf")))
            );
            assert_eq!(control_of(&Bytes::from(batch(1, 10, 0, 0))), None);
            assert_eq!(log.leader_epochs(), vec![(7, Offset(0))]);
            log.close().await.unwrap();
        });
    }

    /// Appends `n` batches of 1–3 records through the leader path, the epoch growing every 7
    /// batches; returns the stored batches.
    async fn fill(log: &PartitionLog, n: usize) -> Vec<Vec<u8>> {
        let mut out = vec![];
        for i in 0..n {
            let b = batch(1 + i % 3, 400, i as i64, i as u8);
            let r = log
                .append_leader(
                    BytesMut::from(&b[..]),
                    1 + (i / 7) as i32,
                    Durability::Synced,
                )
                .await
                .unwrap();
            out.push(stamped(&b, r.base_offset.0, 1 + (i / 7) as i32));
        }
        out
    }

    fn base(b: &[u8]) -> Offset {
        base_of(b)
    }

    #[test]
    fn truncate_drops_the_tail_across_segments_and_the_log_continues_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let mut cfg = small_config();
            cfg.segment_bytes = 8 << 10;
            let log = open(&d, cfg.clone()).await;
            let stored = fill(&log, 60).await;
            assert!(log.segment_count() > 3);
            let end = log.log_end_offset();
            // Out of range, and inside a batch: refused.
            assert!(matches!(
                log.truncate_to(Offset(end.0 + 1)).await,
                Err(StorageError::OffsetOutOfRange { .. })
            ));
            let inside = stored.iter().find(|b| batch_len(b) > 1).unwrap();
            assert!(matches!(
                log.truncate_to(Offset(base(inside).0 + 1)).await,
                Err(StorageError::OffsetMismatch { .. })
            ));
            // At the log end: nothing happens.
            log.truncate_to(end).await.unwrap();
            assert_eq!(log.log_end_offset(), end);
            // Into a sealed segment, at a batch that starts it and at one inside it.
            let segments_before = log.segment_count();
            let k = 25;
            let to = base(&stored[k]);
            log.truncate_to(to).await.unwrap();
            assert!(log.segment_count() < segments_before);
            assert_eq!((log.log_end_offset(), log.high_watermark()), (to, to));
            assert!(log.synced_offset() <= to);
            let kept: Vec<Vec<u8>> = read_all(&log, Offset(0), 1 << 20)
                .await
                .iter()
                .map(|b| b.to_vec())
                .collect();
            assert_eq!(kept, stored[..k].to_vec());
            // The epochs of the dropped batches went with them: batch 25 began no epoch, so
            // epoch 4 (batches 21..) stays and ends at the new log end.
            assert_eq!(log.end_offset_for_epoch(4), (4, to));
            assert_eq!(log.leader_epochs().last().unwrap().0, 4);
            // Reads past the cut find nothing; the log continues at `to` with a new epoch.
            let b = batch(2, 100, 99, 99);
            let r = log
                .append_leader(BytesMut::from(&b[..]), 9, Durability::Synced)
                .await
                .unwrap();
            assert_eq!(r.base_offset, to);
            assert_eq!(log.end_offset_for_epoch(4), (4, to));
            assert_eq!(log.end_offset_for_epoch(8), (4, to));
            log.close().await.unwrap();
            drop(log);
            let log = open(&d, cfg.clone()).await;
            let mut want = stored[..k].to_vec();
            want.push(stamped(&b, to.0, 9));
            let again: Vec<Vec<u8>> = read_all(&log, Offset(0), 1 << 20)
                .await
                .iter()
                .map(|b| b.to_vec())
                .collect();
            assert_eq!(again, want);
            // Truncation to the very start empties the log.
            log.truncate_to(Offset(0)).await.unwrap();
            assert_eq!((log.log_end_offset(), log.segment_count()), (Offset(0), 1));
            assert!(log.leader_epochs().is_empty());
            drop(log); // a crash: no close
            let log = open(&d, cfg).await;
            assert_eq!(log.log_end_offset(), Offset(0));
            log.close().await.unwrap();
        });
    }

    fn batch_len(b: &[u8]) -> i64 {
        let h = BatchHeader::parse(b).unwrap();
        h.last_offset().0 - h.base_offset().0 + 1
    }

    #[test]
    fn truncate_rolls_producer_state_back() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let log = open(&d, small_config()).await;
            for seq in 0..4 {
                append(
                    &log,
                    &idempotent_batch(5, 0, seq * 2, 2),
                    Durability::Synced,
                )
                .await;
            }
            log.truncate_to(Offset(4)).await.unwrap();
            // Sequence 4 is gone with offset 4: its retry is appended anew, not a duplicate.
            let r = append(&log, &idempotent_batch(5, 0, 4, 2), Durability::Synced).await;
            assert!(!r.duplicate);
            assert_eq!(r.base_offset, Offset(4));
            // Sequence 2 stayed: still a duplicate, at its offsets.
            let r = append(&log, &idempotent_batch(5, 0, 2, 2), Durability::Synced).await;
            assert!(r.duplicate);
            assert_eq!(r.base_offset, Offset(2));
            log.close().await.unwrap();
        });
    }

    #[test]
    fn appends_waiting_for_a_truncated_batch_fail() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let fake = FakeClock::new(1_000);
            let mut cfg = small_config();
            cfg.flush = FlushPolicy::IntervalMs(60_000);
            let (log, _faults) = open_faulty_at(&d, cfg, Clock::fake(&fake)).await;
            append(&log, &batch(1, 100, 0, 0), Durability::Written).await;
            // Waits for an fdatasync the interval policy does not do for a minute.
            let waiting = {
                let log = log.clone();
                glommio::spawn_local(async move {
                    log.append(BytesMut::from(&batch(1, 100, 1, 1)[..]), Durability::Synced)
                        .await
                })
            };
            wait_state(&log, "the second batch written", |s| {
                s.offsets.hw() == Offset(2)
            })
            .await;
            log.truncate_to(Offset(1)).await.unwrap();
            assert!(
                waiting.await.is_err(),
                "an acknowledgement of a dropped batch"
            );
            log.close().await.unwrap();
        });
    }

    /// A kill at every step of a truncation (each file sync, cut, unlink and directory sync),
    /// under the power-cut model: the reopened log is the log cut at the offset — or, when the
    /// kill came before the truncation wrote its marker, the whole log — never a mix; it
    /// accepts appends right after.
    #[test]
    fn a_crash_at_any_step_of_a_truncation_reopens_to_a_consistent_log() {
        for crash_after in 0..8u32 {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().to_path_buf();
            run(async move {
                let mut cfg = small_config();
                cfg.segment_bytes = 8 << 10;
                let (log, faults) =
                    open_with_faults(&d, cfg.clone(), Clock::system(), power_model()).await;
                let stored = fill(&log, 40).await;
                let k = 12;
                let to = base(&stored[k]);
                faults.crash_after_ops.set(Some(crash_after));
                let r = log.truncate_to(to).await;
                let crashed = faults.crashed.get();
                assert!(r.is_ok() || crashed, "{r:?}");
                cut_power(vec![log], &faults).await;
                let log = open(&d, cfg.clone()).await;
                let kept: Vec<Vec<u8>> = read_all(&log, Offset(0), 1 << 20)
                    .await
                    .iter()
                    .map(|b| b.to_vec())
                    .collect();
                let marker = d.join(crate::storage::truncate::TRUNCATE_FILE);
                assert!(!marker.exists(), "the marker outlived the recovery");
                // The first operation is the sync before the marker: a kill there leaves the
                // log whole; after it, always cut.
                let whole = crash_after == 0 && kept == stored;
                assert!(
                    whole || kept == stored[..k].to_vec(),
                    "crash after {crash_after} operations (crashed: {crashed}): {} batches",
                    kept.len()
                );
                let end = if whole { log.log_end_offset() } else { to };
                assert_eq!(log.log_end_offset(), end);
                if !whole {
                    assert_eq!(log.end_offset_for_epoch(2), (2, to));
                }
                let r = append(&log, &batch(1, 10, 7, 7), Durability::Synced).await;
                assert_eq!(r.base_offset, end);
                log.close().await.unwrap();
            });
        }
    }
}

// A shard's shutdown closes all its logs together: no per-log file is written, one record in
// the data directory covers them, and each opens again without a scan, with its producer state.
#[test]
fn closing_many_logs_together_leaves_each_clean_with_its_producer_state() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    run(async move {
        let dirs: Vec<_> = (0..3).map(|i| root.join(format!("p-{i}"))).collect();
        let mut logs = vec![];
        let mut stored: Vec<Vec<Vec<u8>>> = vec![];
        let mut retries = vec![];
        for (i, d) in dirs.iter().enumerate() {
            let log = open(d, small_config()).await;
            let mut s = vec![];
            // Enough for several segments in the last log, one in the others.
            for k in 0..(5 + 30 * i as u8) {
                let b = batch(2, 700, 100 + k as i64, k);
                let r = append(&log, &b, Durability::Written).await;
                s.push(at_offset(&b, r.base_offset));
            }
            let b = idempotent_batch(40 + i as i64, 0, 0, 2);
            let r = append(&log, &b, Durability::Written).await;
            s.push(at_offset(&b, r.base_offset));
            retries.push((b, r.base_offset));
            stored.push(s);
            logs.push((i, log));
        }
        // One already closed: skipped, not failed.
        logs[0].1.close().await.unwrap();
        let failed = close_all(logs.clone()).await;
        assert!(failed.is_empty(), "{failed:?}");
        for (i, log) in logs {
            assert!(matches!(
                log.append(BytesMut::from(&stored[i][0][..]), Durability::Written)
                    .await,
                Err(StorageError::Io(_))
            ));
        }
        assert_eq!(record_files(&root).len(), 1);
        // Log 0 closed on its own (its marker); the record covers the two others.
        assert_eq!(load_shutdown_records(&root).unwrap(), 2);
        assert!(record_files(&root).is_empty());
        for (i, d) in dirs.iter().enumerate() {
            assert_eq!(d.join(meta::CLEAN_FILE).exists(), i == 0);
            let left: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect();
            assert!(
                left.is_empty(),
                "temp files left in {}: {left:?}",
                d.display()
            );
            let log = open(d, small_config()).await;
            assert!(
                log.recovery_report().is_none(),
                "log {i} not opened as clean"
            );
            let all = read_all(&log, Offset(0), 100_000).await;
            assert_eq!(
                all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(),
                stored[i]
            );
            // The producer state came back from the snapshot: the retry is a duplicate.
            let (b, base) = &retries[i];
            let dup = append(&log, b, Durability::Written).await;
            assert!(dup.duplicate);
            assert_eq!(dup.base_offset, *base);
            // And a second shutdown over the files of the first works the same.
            let more = batch(1, 10, 1, 1);
            append(&log, &more, Durability::Written).await;
            assert!(close_all(vec![(i, log)]).await.is_empty());
            assert_eq!(load_shutdown_records(&root).unwrap(), 1);
            let log = open(d, small_config()).await;
            assert!(log.recovery_report().is_none());
            assert_eq!(
                read_all(&log, Offset(0), 100_000).await.len(),
                stored[i].len() + 1
            );
        }
    });
}

// More partitions than the shard's descriptor pool holds, under produce (acks=all and acks=1)
// and fetch load, over several segments each: every append and read works, the pool never
// holds more than its size, and a clean restart and a crash restart read everything back.
#[test]
fn more_logs_than_open_descriptors_keep_working_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    run(async move {
        const POOL: usize = io::OPEN_FILES_MIN;
        const LOGS: usize = 5 * POOL;
        io::set_open_files_max(POOL);
        let dirs: Vec<_> = (0..LOGS).map(|i| root.join(format!("p-{i}"))).collect();
        let mut logs = vec![];
        for d in &dirs {
            logs.push(open(d, small_config()).await);
            assert!(io::open_files().0 <= POOL);
        }
        let mut stored: Vec<Vec<Vec<u8>>> = vec![vec![]; LOGS];
        // Appends to all logs at once: more flushes in flight than descriptors.
        for round in 0..12u8 {
            let tasks: Vec<_> = logs
                .iter()
                .enumerate()
                .map(|(i, log)| {
                    let log = log.clone();
                    let b = batch(2, 3000, round as i64, round ^ i as u8);
                    let d = if i % 2 == 0 {
                        Durability::Synced
                    } else {
                        Durability::Written
                    };
                    glommio::spawn_local(async move {
                        let r = append(&log, &b, d).await;
                        at_offset(&b, r.base_offset)
                    })
                })
                .collect();
            for (i, t) in tasks.into_iter().enumerate() {
                stored[i].push(t.await);
                assert!(io::open_files().0 <= POOL);
            }
            // And reads of every log, concurrently, from the start (cold: several segments).
            let reads: Vec<_> = logs
                .iter()
                .map(|log| {
                    let log = log.clone();
                    glommio::spawn_local(async move { read_all(&log, Offset(0), 4096).await })
                })
                .collect();
            for (i, r) in reads.into_iter().enumerate() {
                let all = r.await;
                assert_eq!(
                    all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(),
                    stored[i]
                );
            }
        }
        assert!(
            logs[0].segment_count() > 1,
            "the test means several segments"
        );
        assert_eq!(io::open_files(), (io::open_files().0, POOL));

        // A clean restart, then a crash (the logs dropped unclosed after more appends).
        let failed = close_all(logs.drain(..).enumerate().collect()).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(load_shutdown_records(&root).unwrap(), LOGS);
        for (i, d) in dirs.iter().enumerate() {
            let log = open(d, small_config()).await;
            assert!(log.recovery_report().is_none());
            let b = batch(1, 100, 99, i as u8);
            let r = append(&log, &b, Durability::Synced).await;
            stored[i].push(at_offset(&b, r.base_offset));
            logs.push(log);
            assert!(io::open_files().0 <= POOL);
        }
        drop(logs); // crash
        for (i, d) in dirs.iter().enumerate() {
            let log = open(d, small_config()).await;
            assert!(log.recovery_report().is_some());
            let all = read_all(&log, Offset(0), 1 << 20).await;
            assert_eq!(
                all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(),
                stored[i]
            );
            assert!(io::open_files().0 <= POOL);
        }
    });
}

// Start-up: logs opened clean while marker syncs are deferred have their markers removed, made
// durable by one sync for all; a crash before it leaves markers that still hold (nothing was
// written), and a log that needed a scan syncs its own removal at once.
#[test]
fn deferred_marker_removals_are_synced_together_and_a_crash_before_keeps_logs_clean() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    run(async move {
        let dirs: Vec<_> = (0..4).map(|i| root.join(format!("p-{i}"))).collect();
        let mut stored = vec![];
        for (i, d) in dirs.iter().enumerate() {
            let log = open(d, small_config()).await;
            let b = batch(2, 700, 10, i as u8);
            let r = append(&log, &b, Durability::Synced).await;
            stored.push(vec![at_offset(&b, r.base_offset)]);
            if i == 3 {
                drop(log); // a crash: this one will need a scan
            } else {
                log.close().await.unwrap();
            }
        }
        defer_marker_syncs();
        let mut logs = vec![];
        for d in &dirs {
            let log = open(d, small_config()).await;
            assert!(!d.join(meta::CLEAN_FILE).exists());
            logs.push(log);
        }
        assert!(logs[3].recovery_report().is_some());
        assert!(logs[..3].iter().all(|l| l.recovery_report().is_none()));
        // A crash before the sync: nothing was appended, every log reopens as it was.
        drop(logs);
        for (i, d) in dirs.iter().enumerate() {
            let log = open(d, small_config()).await;
            let all = read_all(&log, Offset(0), 1 << 20).await;
            assert_eq!(
                all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(),
                stored[i]
            );
            log.close().await.unwrap();
        }
        defer_marker_syncs();
        let mut logs = vec![];
        for d in &dirs {
            logs.push(open(d, small_config()).await);
        }
        sync_deferred_markers().await.unwrap();
        for (i, log) in logs.iter().enumerate() {
            let b = batch(1, 100, 20, i as u8);
            let r = append(log, &b, Durability::Synced).await;
            stored[i].push(at_offset(&b, r.base_offset));
        }
        drop(logs); // crash after appends: each log is recovered by a scan, nothing lost
        for (i, d) in dirs.iter().enumerate() {
            let log = open(d, small_config()).await;
            assert!(log.recovery_report().is_some());
            let all = read_all(&log, Offset(0), 1 << 20).await;
            assert_eq!(
                all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(),
                stored[i]
            );
        }
    });
}

/// The clean-shutdown records in `root` (a data directory).
fn record_files(root: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(shutdown::RECORD_PREFIX))
        })
        .collect();
    v.sort();
    v
}

/// Logs with batches, an idempotent producer's batch last in each, closed together: their
/// directories, what each holds, and each producer batch with its offset (to retry).
async fn closed_together(
    root: &Path,
    n: usize,
) -> (
    Vec<std::path::PathBuf>,
    Vec<Vec<Vec<u8>>>,
    Vec<(Vec<u8>, Offset)>,
) {
    let dirs: Vec<_> = (0..n).map(|i| root.join(format!("t-{i}"))).collect();
    let mut logs = vec![];
    let mut stored = vec![];
    let mut retries = vec![];
    for (i, d) in dirs.iter().enumerate() {
        let log = open(d, small_config()).await;
        let mut s = vec![];
        // Several segments in some, index entries in all (past the 4 KiB interval).
        for k in 0..(8 + 5 * i as u8) {
            let b = batch(2, 3000, 100 + k as i64, k);
            let d = if k % 3 == 0 {
                Durability::Synced
            } else {
                Durability::Written
            };
            let r = append(&log, &b, d).await;
            s.push(at_offset(&b, r.base_offset));
        }
        let b = idempotent_batch(70 + i as i64, 0, 0, 2);
        let r = append(&log, &b, Durability::Written).await;
        s.push(at_offset(&b, r.base_offset));
        retries.push((b, r.base_offset));
        stored.push(s);
        logs.push((i, log));
    }
    let failed = close_all(logs).await;
    assert!(failed.is_empty(), "{failed:?}");
    (dirs, stored, retries)
}

/// Opens every log and checks it holds `stored` and remembers its producer (the retry is a
/// duplicate); `clean[i]`: log i must open without a scan, else with one.
async fn reopen_and_check(
    dirs: &[std::path::PathBuf],
    stored: &[Vec<Vec<u8>>],
    retries: &[(Vec<u8>, Offset)],
    clean: &[bool],
) {
    for (i, d) in dirs.iter().enumerate() {
        let log = open(d, small_config()).await;
        assert_eq!(
            log.recovery_report().is_none(),
            clean[i],
            "log {i}: {:?}",
            log.recovery_report()
        );
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(
            all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(),
            stored[i],
            "log {i}"
        );
        let (b, base) = &retries[i];
        let dup = append(&log, b, Durability::Written).await;
        assert!(dup.duplicate, "log {i}");
        assert_eq!(dup.base_offset, *base);
        log.close().await.unwrap();
    }
}

// A record cut short anywhere (a crash while it was written) or damaged covers only the logs
// of the entries before the damage; the others are recovered by a scan, and nothing is lost
// either way.
#[test]
fn a_cut_or_damaged_shutdown_record_is_trusted_only_up_to_the_damage() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    run(async move {
        const LOGS: usize = 4;
        let (dirs, stored, retries) = closed_together(&root, LOGS).await;
        let files = record_files(&root);
        assert_eq!(files.len(), 1);
        let whole = std::fs::read(&files[0]).unwrap();
        // The entries' ends in the file: magic, then (length, body, CRC) each.
        let mut ends = vec![];
        let mut at = 8;
        while at < whole.len() {
            let len = u32::from_be_bytes(whole[at..at + 4].try_into().unwrap()) as usize;
            at += 8 + len;
            ends.push(at);
        }
        assert_eq!(ends.len(), LOGS);
        assert_eq!(*ends.last().unwrap(), whole.len());
        // Which log each entry is, in file order.
        let order: Vec<usize> = (0..LOGS)
            .map(|k| {
                let start = if k == 0 { 8 } else { ends[k - 1] };
                let name_len =
                    u16::from_be_bytes(whole[start + 4..start + 6].try_into().unwrap()) as usize;
                let name = std::str::from_utf8(&whole[start + 6..start + 6 + name_len]).unwrap();
                dirs.iter()
                    .position(|d| d.file_name().unwrap().to_str().unwrap() == name)
                    .unwrap()
            })
            .collect();
        // Cut in the middle of the third entry: the first two are trusted.
        let cut = (ends[1] + ends[2]) / 2;
        std::fs::write(&files[0], &whole[..cut]).unwrap();
        assert_eq!(load_shutdown_records(&root).unwrap(), 2);
        assert!(record_files(&root).is_empty());
        let mut clean = vec![false; LOGS];
        clean[order[0]] = true;
        clean[order[1]] = true;
        reopen_and_check(&dirs, &stored, &retries, &clean).await;

        // Closed one by one above (markers): closed together again, then a byte of the second
        // entry's body flipped: only the first is trusted.
        let mut logs = vec![];
        for (i, d) in dirs.iter().enumerate() {
            logs.push((i, open(d, small_config()).await));
        }
        assert!(close_all(logs).await.is_empty());
        let files = record_files(&root);
        let mut bytes = std::fs::read(&files[0]).unwrap();
        let second = u32::from_be_bytes(bytes[8..12].try_into().unwrap()) as usize + 16;
        let order: Vec<usize> = {
            let name_len = u16::from_be_bytes(bytes[12..14].try_into().unwrap()) as usize;
            let name = std::str::from_utf8(&bytes[14..14 + name_len])
                .unwrap()
                .to_string();
            vec![dirs
                .iter()
                .position(|d| d.file_name().unwrap().to_str().unwrap() == name)
                .unwrap()]
        };
        bytes[second + 20] ^= 0x40;
        std::fs::write(&files[0], &bytes).unwrap();
        assert_eq!(load_shutdown_records(&root).unwrap(), 1);
        let mut clean = vec![false; LOGS];
        clean[order[0]] = true;
        reopen_and_check(&dirs, &stored, &retries, &clean).await;

        // A record with a damaged header, and one that is empty: nothing trusted.
        for damage in [0usize, usize::MAX] {
            let mut logs = vec![];
            for (i, d) in dirs.iter().enumerate() {
                logs.push((i, open(d, small_config()).await));
            }
            assert!(close_all(logs).await.is_empty());
            let files = record_files(&root);
            let mut bytes = std::fs::read(&files[0]).unwrap();
            if damage == 0 {
                bytes[0] ^= 1;
            } else {
                bytes.clear();
            }
            std::fs::write(&files[0], &bytes).unwrap();
            assert_eq!(load_shutdown_records(&root).unwrap(), 0);
            reopen_and_check(&dirs, &stored, &retries, &[false; LOGS]).await;
        }
    });
}

// A record's entry is trusted only if the log's files still match it: index files that lost
// their appended entries, or an active segment shorter than recorded, make the log recover by
// a scan; and a crash after a clean open and more appends recovers everything too.
#[test]
fn a_shutdown_record_that_does_not_match_the_files_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    run(async move {
        const LOGS: usize = 3;
        let (dirs, mut stored, retries) = closed_together(&root, LOGS).await;
        // Log 0: its active segment's offset index removed (never written back, say).
        let last_index = meta::list_segments(&dirs[0])
            .unwrap()
            .last()
            .copied()
            .unwrap();
        let ipath = meta::segment_path(&dirs[0], last_index, "index");
        let had_entries = std::fs::metadata(&ipath)
            .map(|m| m.len() > 0)
            .unwrap_or(false);
        std::fs::write(&ipath, b"").unwrap();
        // Log 1: a stray entry appended to its time index.
        let bases = meta::list_segments(&dirs[1]).unwrap();
        let tpath = meta::segment_path(&dirs[1], *bases.last().unwrap(), "timeindex");
        let mut t = std::fs::read(&tpath).unwrap_or_default();
        t.extend_from_slice(&meta::encode_time_index(&[(i64::MAX - 1, 0)]));
        std::fs::write(&tpath, &t).unwrap();
        assert_eq!(load_shutdown_records(&root).unwrap(), LOGS);
        reopen_and_check(&dirs, &stored, &retries, &[!had_entries, false, true]).await;

        // Clean opens from a record, more appends (acknowledged as synced), then a crash: the
        // files written while serving recover everything.
        let mut logs = vec![];
        for (i, d) in dirs.iter().enumerate() {
            logs.push((i, open(d, small_config()).await));
        }
        assert!(close_all(logs).await.is_empty());
        assert_eq!(load_shutdown_records(&root).unwrap(), LOGS);
        let mut logs = vec![];
        for (i, d) in dirs.iter().enumerate() {
            let log = open(d, small_config()).await;
            assert!(log.recovery_report().is_none());
            for k in 0..6u8 {
                let b = batch(1, 1500, 500 + k as i64, k);
                let r = append(&log, &b, Durability::Synced).await;
                stored[i].push(at_offset(&b, r.base_offset));
            }
            logs.push(log);
        }
        drop(logs); // crash
        assert_eq!(load_shutdown_records(&root).unwrap(), 0);
        reopen_and_check(&dirs, &stored, &retries, &[false; LOGS]).await;
    });
}

/// Stalls this log's index appends in the blocking pool until the returned gate opens.
fn stall_index_appends(log: &PartitionLog) -> std::sync::Arc<appender::IndexGate> {
    let gate = std::sync::Arc::new(appender::IndexGate::default());
    *log.index_gate.borrow_mut() = Some(gate.clone());
    gate
}

/// Appends `Synced` batches of one index entry each (see `small_config`) until an index append
/// is in flight and has reached `gate` (its `reached`-th arrival); returns the batches stored.
async fn append_until_index_append_stalls(
    log: &PartitionLog,
    gate: &appender::IndexGate,
    reached: usize,
    tag: u8,
) -> Vec<Vec<u8>> {
    let mut stored = vec![];
    while !log.state.borrow().active().index_append_in_flight() {
        assert!(
            stored.len() <= 2 * segment::INDEX_APPEND_BATCH,
            "no index append started"
        );
        let b = batch(1, 1500, 1000, tag);
        let r = append(log, &b, Durability::Synced).await;
        stored.push(at_offset(&b, r.base_offset));
    }
    poll_until("the index append to reach the gate", || {
        gate.entered() >= reached
    })
    .await;
    stored
}

/// The entries of an index file and of a time-index file.
type IndexEntries = (Vec<(u32, u32)>, Vec<(i64, u32)>);

/// The entries of a segment's two index files.
fn index_files(d: &Path, base: Offset) -> IndexEntries {
    let i = meta::read_index_file(&meta::segment_path(d, base, "index"), meta::decode_index);
    let t = meta::read_index_file(
        &meta::segment_path(d, base, "timeindex"),
        meta::decode_time_index,
    );
    assert!(i.complete && t.complete, "index files of {base} damaged");
    (i.entries, t.entries)
}

/// A spawned operation on the log, and whether it finished.
fn spawn_tracked<F: std::future::Future<Output = Result<(), StorageError>> + 'static>(
    fut: F,
) -> (
    glommio::Task<Result<(), StorageError>>,
    Rc<std::cell::Cell<bool>>,
) {
    let done = Rc::new(std::cell::Cell::new(false));
    let d = done.clone();
    let task = glommio::spawn_local(async move {
        let r = fut.await;
        d.set(true);
        r
    });
    (task, done)
}

// The index files are written on the blocking pool: while an append is stalled there, appends
// and fdatasyncs of the same log keep completing (the executor is not blocked), the durable
// counts stay put, and a roll, a truncation and a close each wait for the append and leave
// index files holding exactly the segment's entries.
#[test]
fn an_index_append_in_flight_blocks_no_append_and_roll_truncate_close_wait_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let log = open(&d, small_config()).await;
        let gate = stall_index_appends(&log);
        let mut stored = append_until_index_append_stalls(&log, &gate, 1, 1).await;
        let durable = log.state.borrow().active().durable_counts();
        // Stalled: appends and syncs still complete, and nothing counts as in the files.
        let synced = log.synced_offset();
        for i in 0..10u8 {
            let b = batch(1, 1500, 2000, i);
            let r = append(&log, &b, Durability::Synced).await;
            stored.push(at_offset(&b, r.base_offset));
        }
        assert!(log.synced_offset() > synced);
        {
            let s = log.state.borrow();
            assert!(s.active().index_append_in_flight());
            assert_eq!(s.active().durable_counts(), durable);
            assert_eq!(gate.entered(), 1, "one append in flight at a time");
        }
        // A roll waits for the append in flight.
        let (roll, rolled) = spawn_tracked({
            let log = log.clone();
            async move { log.roll().await }
        });
        wait_state(&log, "the roll to start", |s| s.rolling).await;
        glommio::yield_if_needed().await;
        assert!(!rolled.get() && log.segment_count() == 1);
        gate.open();
        roll.await.unwrap();
        assert_eq!(log.segment_count(), 2);
        let sealed = {
            let s = log.state.borrow();
            (
                s.segments[0].index().to_vec(),
                s.segments[0].time_index().to_vec(),
            )
        };
        assert_eq!(index_files(&d, Offset(0)), sealed);
        // The roll created the new segment's index files, empty.
        let base2 = log.log_end_offset();
        assert_eq!(index_files(&d, base2), (vec![], vec![]));

        // A truncation below entries an append in flight carries waits for it, then cuts.
        let gate = stall_index_appends(&log);
        let more = append_until_index_append_stalls(&log, &gate, 1, 2).await;
        stored.extend(more);
        let cut_at = Offset(base2.0 + 5);
        let (truncate, truncated) = spawn_tracked({
            let log = log.clone();
            async move { log.truncate_to(cut_at).await }
        });
        wait_state(&log, "the truncation to start", |s| s.rolling).await;
        glommio::yield_if_needed().await;
        assert!(!truncated.get());
        gate.open();
        truncate.await.unwrap();
        stored.truncate(cut_at.0 as usize);
        assert_eq!(log.log_end_offset(), cut_at);
        let active = {
            let s = log.state.borrow();
            let a = s.active();
            assert_eq!(a.durable_counts(), (a.index().len(), a.time_index().len()));
            (a.index().to_vec(), a.time_index().to_vec())
        };
        assert!(active.0.iter().all(|e| (e.0 as i64) < 5));
        assert_eq!(index_files(&d, base2), active);

        // A close waits for the append in flight and writes the files whole.
        let gate = stall_index_appends(&log);
        stored.extend(append_until_index_append_stalls(&log, &gate, 1, 3).await);
        let (close, closed) = spawn_tracked({
            let log = log.clone();
            async move { log.close().await }
        });
        wait_state(&log, "the close to start", |s| s.rolling).await;
        glommio::yield_if_needed().await;
        assert!(!closed.get());
        gate.open();
        close.await.unwrap();
        let active = {
            let s = log.state.borrow();
            (
                s.active().index().to_vec(),
                s.active().time_index().to_vec(),
            )
        };
        assert_eq!(index_files(&d, base2), active);
        drop(log);

        // A clean reopen trusts the files and finds every batch.
        let log = open(&d, small_config()).await;
        assert!(log.recovery_report().is_none());
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), stored);
        assert_eq!(log.state.borrow().active().index(), &active.0[..]);
    });
}

// Opens a log (8 MiB segments) at `d` and appends synced batches until one index append has
// reached the files: the log, its config and the batches stored (as read back).
async fn open_past_a_first_index_append(
    d: &std::path::Path,
) -> (Rc<PartitionLog>, LogConfig, Vec<Vec<u8>>) {
    let mut cfg = small_config();
    cfg.segment_bytes = 8 << 20;
    let log = open(d, cfg.clone()).await;
    let mut stored = vec![];
    while log.state.borrow().active().durable_counts().0 == 0 {
        let b = batch(1, 1500, 1000, 1);
        let r = append(&log, &b, Durability::Synced).await;
        stored.push(at_offset(&b, r.base_offset));
        log.index_persisted().await;
    }
    (log, cfg, stored)
}

// A crash (the log dropped, no close) while an index append is stalled on the blocking pool:
// the reopen waits for that append, then recovers every acknowledged batch, and its index
// files end with exactly the recovered entries (none lost, none twice).
#[test]
fn a_crash_with_an_index_append_in_flight_reopens_with_every_batch_and_exact_index_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        // A first append completes; the second stalls.
        let (log, cfg, mut stored) = open_past_a_first_index_append(&d).await;
        let gate = stall_index_appends(&log);
        stored.extend(append_until_index_append_stalls(&log, &gate, 1, 2).await);
        let index = log.state.borrow().active().index().to_vec();
        drop(log); // a crash: the append is still in the pool
        let reopen = glommio::spawn_local({
            let (d, cfg) = (d.clone(), cfg.clone());
            async move { open(&d, cfg).await }
        });
        glommio::yield_if_needed().await;
        gate.open();
        let log = reopen.await;
        assert!(log.recovery_report().is_some());
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), stored);
        let s = log.state.borrow();
        assert_eq!(s.active().index(), &index[..]);
        let (files, tfiles) = index_files(&d, Offset(0));
        assert_eq!(files, index);
        assert_eq!(tfiles, s.active().time_index());
    });
}

// An index append that fails (its file removed under it) stops index appends for the segment
// only: the log keeps appending and acknowledging, and recovery scans from the last entry that
// made it and finds every acknowledged batch.
#[test]
fn a_failed_index_append_keeps_the_log_acknowledging_and_recovery_finds_every_batch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let (log, cfg, mut stored) = open_past_a_first_index_append(&d).await;
        let in_files = log.state.borrow().active().durable_counts().0;
        std::fs::remove_file(meta::segment_path(&d, Offset(0), "index")).unwrap();
        let mut i = 0u8;
        while !log.state.borrow().active().index_files_failed() {
            assert!(
                (i as usize) <= 2 * segment::INDEX_APPEND_BATCH,
                "no append failed"
            );
            let b = batch(1, 1500, 2000, i);
            let r = append(&log, &b, Durability::Synced).await;
            stored.push(at_offset(&b, r.base_offset));
            log.index_persisted().await;
            i += 1;
        }
        assert_eq!(log.state.borrow().active().durable_counts().0, in_files);
        for i in 0..40u8 {
            let b = batch(1, 1500, 3000, i);
            let d = if i % 2 == 0 {
                Durability::Synced
            } else {
                Durability::Written
            };
            let r = append(&log, &b, d).await;
            stored.push(at_offset(&b, r.base_offset));
        }
        log.sync_to(log.high_watermark()).await.unwrap();
        assert!(!log.state.borrow().active().index_append_in_flight());
        drop(log); // crash
        let log = open(&d, cfg).await;
        let rep = log.recovery_report().expect("a crash recovery");
        assert_eq!(rep.scan_from, 0, "the removed file held no entry");
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(all.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), stored);
        // Recovery wrote every entry again.
        assert_eq!(
            index_files(&d, Offset(0)).0,
            log.state.borrow().active().index()
        );
    });
}

/// A file-system sync skips directories that are gone (nothing to sync there) and reports
/// any other failure to open one.
#[test]
fn a_file_system_sync_skips_directories_that_are_gone_and_reports_other_failures() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    std::fs::create_dir(&a).unwrap();
    let gone = dir.path().join("gone");
    crate::storage::io::sync_file_systems(&[a.clone(), gone, a.clone(), dir.path().into()])
        .expect("directories that exist are synced, the missing one skipped");
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let e = crate::storage::io::sync_file_systems(&[a, file.join("x")])
        .expect_err("a path through a regular file");
    assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR));
}

/// `n` acks=all appends of small batches to `log`, as stored (at their offsets).
async fn synced_batches(log: &PartitionLog, n: u8) -> Vec<Vec<u8>> {
    let mut stored = vec![];
    for i in 0..n {
        let b = batch(2, 700, 10 + i as i64, i);
        let r = append(log, &b, Durability::Synced).await;
        stored.push(at_offset(&b, r.base_offset));
    }
    stored
}

/// The log in `d` opened again (after a crash, recovered) through a storage over `faults`.
async fn reopen_faulty(d: &Path, faults: &Rc<Faults>) -> Rc<PartitionLog> {
    let io = Rc::new(FaultyIo {
        faults: faults.clone(),
    });
    PartitionLog::open_with_io(d, small_config(), BatchCache::new(0), io, Clock::system())
        .await
        .expect("recovered")
}

/// Where the file system cannot tell written data from pre-allocated space past the log end
/// (no `SEEK_DATA`, or a failed `lseek`), crash recovery cuts the active segment at the end of
/// its valid batches: the space is given back and allocated again by the next flush, and no
/// batch is lost, then or after another crash.
#[test]
fn recovery_that_cannot_tell_data_from_allocated_space_cuts_the_file_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let (log, faults) = open_faulty(&d, small_config()).await;
        let mut stored = synced_batches(&log, 3).await;
        let path = meta::segment_path(&d, Offset(0), "log");
        let end: u64 = stored.iter().map(|b| b.len() as u64).sum();
        assert!(
            std::fs::metadata(&path).unwrap().len() > end,
            "space allocated ahead"
        );
        // A crash (no clean shutdown), then a recovery that cannot tell what follows the zeros.
        drop(log);
        faults.data_unknown.set(true);
        let log = reopen_faulty(&d, &faults).await;
        assert_eq!(log.log_end_offset(), Offset(6));
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            end,
            "cut at the end of the valid batches"
        );
        assert!(log.recovery_report().is_some_and(|r| r.truncated));
        let b = batch(2, 700, 20, 9);
        let r = append(&log, &b, Durability::Synced).await;
        stored.push(at_offset(&b, r.base_offset));
        assert!(
            std::fs::metadata(&path).unwrap().len() > end + b.len() as u64,
            "the next flush allocated again"
        );
        // Another crash, recovered the same way.
        drop(log);
        let log = reopen_faulty(&d, &faults).await;
        assert_eq!(log.log_end_offset(), Offset(8));
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(all.iter().map(|x| x.to_vec()).collect::<Vec<_>>(), stored);
        log.close().await.unwrap();
    });
}

/// Crash recovery reads the written data of the active segment, not the space pre-allocated
/// past it (which the file system tells apart, and which only reads as zeros), and keeps that
/// space for the next flushes.
#[test]
fn crash_recovery_reads_the_written_data_and_not_the_space_allocated_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let (log, faults) = open_faulty(&d, small_config()).await;
        let stored = synced_batches(&log, 3).await;
        let path = meta::segment_path(&d, Offset(0), "log");
        let end: u64 = stored.iter().map(|b| b.len() as u64).sum();
        let allocated = std::fs::metadata(&path).unwrap().len();
        assert!(
            allocated >= 8 * io::align_up(end),
            "space allocated well ahead"
        );
        drop(log); // a crash: no clean shutdown
        faults.read_bytes.set(0);
        let log = reopen_faulty(&d, &faults).await;
        assert!(log.recovery_report().is_some_and(|r| !r.truncated));
        assert_eq!(log.log_end_offset(), Offset(6));
        // The scan's pages, and the last partial page read again as the appender's tail.
        assert!(
            faults.read_bytes.get() <= io::align_up(end) + io::ALIGN_BYTES,
            "read {} bytes of {allocated} for {end} bytes of batches",
            faults.read_bytes.get()
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            allocated,
            "space kept"
        );
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(all.iter().map(|x| x.to_vec()).collect::<Vec<_>>(), stored);
        log.close().await.unwrap();
    });
}

/// A crash recovery of a segment that has no index files yet (fewer entries than one index
/// append carries) creates none: its entries wait for a full index append as a new segment's
/// do, which creates the files and writes every entry; nothing is lost across the crashes.
#[test]
fn a_crash_recovery_creates_no_index_files_for_a_segment_that_had_none() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let (log, faults) = open_faulty(&d, small_config()).await;
        let mut stored = synced_batches(&log, 3).await;
        let index = meta::segment_path(&d, Offset(0), "index");
        let time_index = meta::segment_path(&d, Offset(0), "timeindex");
        assert!(
            !index.exists() && !time_index.exists(),
            "no index append yet"
        );
        drop(log); // a crash
        let log = reopen_faulty(&d, &faults).await;
        assert_eq!(log.log_end_offset(), Offset(6));
        assert!(!index.exists() && !time_index.exists(), "none created");
        // Enough entries for an index append (one entry per batch at this interval).
        for i in 0..segment::INDEX_APPEND_BATCH as u8 + 4 {
            let b = batch(2, 700, 40 + i as i64, 50 + i);
            let r = append(&log, &b, Durability::Synced).await;
            stored.push(at_offset(&b, r.base_offset));
        }
        let full = (segment::INDEX_APPEND_BATCH * meta::INDEX_ENTRY_BYTES) as u64;
        poll_until("the index append", || {
            time_index.exists() && std::fs::metadata(&index).is_ok_and(|m| m.len() >= full)
        })
        .await;
        drop(log); // another crash
        let log = reopen_faulty(&d, &faults).await;
        let all = read_all(&log, Offset(0), 1 << 20).await;
        assert_eq!(all.iter().map(|x| x.to_vec()).collect::<Vec<_>>(), stored);
        log.close().await.unwrap();
    });
}
