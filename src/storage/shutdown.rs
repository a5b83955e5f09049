//! Closing many partition logs at once (a shard at shutdown), and the shard's clean-shutdown
//! record that lets them open again without a recovery scan.
//!
//! One log's [`PartitionLog::close`] leaves, next to its synced segment, the active segment's
//! index files, the producer snapshot and a `.clean-shutdown` marker, each written atomically
//! and durably. With 10,000 partitions on a shard, creating those files (four per log) is what
//! a shutdown costs. [`close_all`] instead:
//!
//! 1. drains the logs, up to [`CLOSE_CONCURRENCY_MAX`] at once, and fdatasyncs each active
//!    segment that holds unsynced bytes (concurrently, through the log's own file);
//! 2. writes one record per data directory, `clean-shutdown.<executor>.<n>`: per log its active
//!    segment (base, log end, bytes written), how many index and time-index entries its index
//!    files hold and the entries after them, and its producer and transaction state at the log
//!    end; then fdatasyncs it and the directory.
//!
//! No per-log file is created, renamed or synced. Each log's entry is framed with its own length
//! and CRC-32: a record cut short or damaged covers the logs of the entries before the damage,
//! and every other log is recovered by a scan as after a crash. An entry is only written after
//! its log's data is durable, and a crash at any point before the record is complete leaves the
//! logs as a crash would (no marker, files as written while serving).
//!
//! At start, before any shard opens a log, [`load_shutdown_records`] reads the data directory's
//! records into memory and removes them durably: from then on no record vouches for files that
//! may change. [`PartitionLog::open`] takes its log's entry; it trusts it only if the active
//! segment and the index files match it, else it recovers the log by a scan. Logs closed one at
//! a time, and data directories from before the record, still use the per-log marker.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::storage::producer_state::ProducerState;
use crate::storage::segment::IndexTail;
use crate::storage::txn_index::TxnIndex;
use crate::storage::{meta, PartitionLog, StorageError};
use crate::types::Offset;

/// Logs one call closes at once: enough to keep the device's queue full (each drain ends
/// with a write and an fdatasync), few enough to bound the memory of the flushes in flight.
pub const CLOSE_CONCURRENCY_MAX: usize = 128;

/// Whether [`PartitionLog::close_deferred`] syncs the active segment itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentSync {
    Now,
    /// Only if bytes were written since the last sync (or a range was punched).
    IfUnsynced,
}

/// What a drained log still has to write to be closed cleanly.
#[derive(Debug)]
pub struct ClosingFiles {
    pub(crate) dir: PathBuf,
    /// Index files and the producer (and transaction) snapshots: (path, whole contents).
    pub(crate) data: Vec<(PathBuf, Vec<u8>)>,
    /// Files that must be gone (a stale snapshot), removed with the renames of `data`.
    pub(crate) remove: Vec<PathBuf>,
    /// The clean-shutdown marker, written only once `data` is durable.
    pub(crate) clean: (PathBuf, Vec<u8>),
}

impl ClosingFiles {
    /// Writes them the way one log's close does: each file atomically and durably, the marker
    /// last.
    pub fn write_durably(self) -> io::Result<()> {
        for (path, bytes) in &self.data {
            meta::write_atomic(path, bytes)?;
        }
        let mut removed = false;
        for path in &self.remove {
            removed |= path.exists();
            meta::remove_if_exists(path)?;
        }
        if removed {
            meta::sync_dir(&self.dir)?;
        }
        meta::write_atomic(&self.clean.0, &self.clean.1)
    }
}

/// Closes every log of `logs` and writes the clean-shutdown record (see the module docs),
/// returning the ones that failed with their error; `K` labels a log in that answer (e.g. its
/// partition).
pub async fn close_all<K: 'static>(logs: Vec<(K, Rc<PartitionLog>)>) -> Vec<(K, StorageError)> {
    let mut failed = Vec::new();
    let mut entries = Vec::new();
    let mut logs = logs.into_iter();
    loop {
        let wave: Vec<_> = logs
            .by_ref()
            .take(CLOSE_CONCURRENCY_MAX)
            .map(|(k, log)| glommio::spawn_local(async move { (k, log.close_for_record().await) }))
            .collect();
        if wave.is_empty() {
            break;
        }
        for task in wave {
            match task.await {
                (_, Ok(None)) => {}
                (_, Ok(Some(entry))) => entries.push(entry),
                (k, Err(e)) => failed.push((k, e)),
            }
        }
    }
    if entries.is_empty() {
        return failed;
    }
    let n = entries.len();
    let executor = glommio::executor().id();
    let written = glommio::executor()
        .spawn_blocking(move || write_records(executor, entries))
        .await;
    match written {
        Ok(()) => tracing::info!("clean-shutdown record written: {n} logs"),
        // The logs are closed and their data durable; the next start recovers them by a scan.
        Err(e) => tracing::warn!(logs = n, error = %e, "cannot write the clean-shutdown record"),
    }
    failed
}

/// Name prefix of a clean-shutdown record in a data directory: `clean-shutdown.<executor>.<n>`.
/// A partition directory is `<topic>-<partition>`, so no topic can collide with it.
pub const RECORD_PREFIX: &str = "clean-shutdown.";
const RECORD_MAGIC: &[u8; 8] = b"SLCSR\x00\x00\x01";

/// Distinguishes the records of several [`close_all`] calls by one executor (tests).
static RECORD_SEQ: AtomicU64 = AtomicU64::new(0);

/// One log's part of a clean-shutdown record, from [`PartitionLog::close_for_record`].
#[derive(Debug)]
pub(crate) struct RecordEntry {
    /// The log's directory (its parent is the data directory the record goes to).
    pub dir: PathBuf,
    pub state: CleanState,
}

/// What the record vouches for one log: its files as they were when it was written.
#[derive(Debug)]
pub(crate) struct CleanState {
    pub active_base: Offset,
    pub log_end: Offset,
    /// Bytes of batches in the active segment.
    pub written: u64,
    pub index: IndexTail,
    /// Producer state and transaction index of every batch below `log_end`.
    pub producers: ProducerState,
    pub txns: TxnIndex,
}

fn encode_entry(name: &[u8], s: &CleanState) -> Vec<u8> {
    let mut v = Vec::with_capacity(128);
    v.extend_from_slice(&(name.len() as u16).to_be_bytes());
    v.extend_from_slice(name);
    v.extend_from_slice(&s.active_base.0.to_be_bytes());
    v.extend_from_slice(&s.log_end.0.to_be_bytes());
    v.extend_from_slice(&s.written.to_be_bytes());
    v.extend_from_slice(&s.index.index_durable.to_be_bytes());
    v.extend_from_slice(&s.index.time_durable.to_be_bytes());
    v.extend_from_slice(&(s.index.index.len() as u32).to_be_bytes());
    for (rel, pos) in &s.index.index {
        v.extend_from_slice(&rel.to_be_bytes());
        v.extend_from_slice(&pos.to_be_bytes());
    }
    v.extend_from_slice(&(s.index.time_index.len() as u32).to_be_bytes());
    for (ts, rel) in &s.index.time_index {
        v.extend_from_slice(&ts.to_be_bytes());
        v.extend_from_slice(&rel.to_be_bytes());
    }
    let producers = meta::encode_producers(s.log_end, &s.producers);
    v.extend_from_slice(&(producers.len() as u32).to_be_bytes());
    v.extend_from_slice(&producers);
    let txns = if s.txns.is_empty() {
        vec![]
    } else {
        s.txns.encode(s.log_end)
    };
    v.extend_from_slice(&(txns.len() as u32).to_be_bytes());
    v.extend_from_slice(&txns);
    v
}

/// A bounds-checked big-endian reader over one entry.
struct Reader<'a>(&'a [u8]);
impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Some(h)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.bytes(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.bytes(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.bytes(8)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        self.u64().map(|v| v as i64)
    }
    /// A count of items of `each` bytes, checked against the bytes left before anything is
    /// allocated for them.
    fn count(&mut self, each: usize) -> Option<usize> {
        let n = self.u32()? as usize;
        (n <= self.0.len() / each).then_some(n)
    }
}

/// One entry's body: the log directory's name and its state; `None` if it does not decode
/// exactly.
fn decode_entry(b: &[u8]) -> Option<(String, CleanState)> {
    let mut r = Reader(b);
    let len = r.u16()? as usize;
    let name = std::str::from_utf8(r.bytes(len)?).ok()?;
    // One plain path component: an entry can only ever name a directory inside the data dir.
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return None;
    }
    let active_base = Offset(r.i64()?);
    let log_end = Offset(r.i64()?);
    let written = r.u64()?;
    let index_durable = r.u32()?;
    let time_durable = r.u32()?;
    let n = r.count(8)?;
    let mut index = Vec::with_capacity(n);
    for _ in 0..n {
        index.push((r.u32()?, r.u32()?));
    }
    let n = r.count(12)?;
    let mut time_index = Vec::with_capacity(n);
    for _ in 0..n {
        time_index.push((r.i64()?, r.u32()?));
    }
    let n = r.u32()? as usize;
    let (upto, producers) = meta::decode_producers(r.bytes(n)?)?;
    let n = r.u32()? as usize;
    let txns = match n {
        0 => TxnIndex::default(),
        _ => {
            let (t_upto, t) = TxnIndex::decode(r.bytes(n)?)?;
            if t_upto != log_end {
                return None;
            }
            t
        }
    };
    if upto != log_end || log_end < active_base || !r.0.is_empty() {
        return None;
    }
    Some((
        name.to_string(),
        CleanState {
            active_base,
            log_end,
            written,
            index: IndexTail {
                index_durable,
                time_durable,
                index,
                time_index,
            },
            producers,
            txns,
        },
    ))
}

/// The entries of a record's bytes, up to the first one that is cut short or damaged (the
/// logs after it are not covered).
fn decode_record(b: &[u8]) -> Vec<(String, CleanState)> {
    let mut out = Vec::new();
    let Some(mut rest) = b.strip_prefix(RECORD_MAGIC.as_slice()) else {
        return out;
    };
    while rest.len() >= 8 {
        let len = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        if rest.len() - 4 < len.saturating_add(4) {
            break;
        }
        let body = &rest[4..4 + len];
        let crc = u32::from_be_bytes(rest[4 + len..8 + len].try_into().expect("4 bytes"));
        if crc32fast::hash(body) != crc {
            break;
        }
        match decode_entry(body) {
            Some(e) => out.push(e),
            None => break,
        }
        rest = &rest[8 + len..];
    }
    out
}

/// Writes one record per data directory holding logs of `entries` (blocking): contents,
/// fdatasync, directory fsync.
fn write_records(executor: usize, entries: Vec<RecordEntry>) -> io::Result<()> {
    let mut by_dir: HashMap<PathBuf, Vec<u8>> = HashMap::new();
    for e in &entries {
        let (Some(parent), Some(name)) = (e.dir.parent(), e.dir.file_name()) else {
            continue;
        };
        let file = by_dir
            .entry(parent.to_path_buf())
            .or_insert_with(|| RECORD_MAGIC.to_vec());
        let body = encode_entry(name.as_encoded_bytes(), &e.state);
        file.extend_from_slice(&(body.len() as u32).to_be_bytes());
        file.extend_from_slice(&body);
        file.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    }
    let seq = RECORD_SEQ.fetch_add(1, Ordering::Relaxed);
    for (dir, bytes) in by_dir {
        let path = dir.join(format!("{RECORD_PREFIX}{executor}.{seq}"));
        let mut f = fs::File::create(&path)?;
        f.write_all(&bytes)?;
        f.sync_data()?;
        meta::sync_dir(&dir)?;
    }
    Ok(())
}

/// Entries of the records read at start, by log directory, until their log opens.
static RECORDS: Mutex<Option<HashMap<PathBuf, CleanState>>> = Mutex::new(None);

/// Reads the clean-shutdown records of `data_dir` into memory and removes them durably, before
/// any log of the directory opens (see the module docs). Returns how many logs they cover.
/// Blocking; call it before the shards start.
pub fn load_shutdown_records(data_dir: &Path) -> io::Result<usize> {
    let data_dir = std::path::absolute(data_dir)?;
    let mut found = Vec::new();
    for e in fs::read_dir(&data_dir)? {
        let e = e?;
        if e.file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(RECORD_PREFIX))
        {
            found.push(e.path());
        }
    }
    let mut covered = 0;
    let mut records = RECORDS.lock().unwrap_or_else(|p| p.into_inner());
    let map = records.get_or_insert_with(HashMap::new);
    for path in &found {
        let entries = match fs::read(path) {
            Ok(b) => decode_record(&b),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read a clean-shutdown record");
                vec![]
            }
        };
        covered += entries.len();
        for (name, state) in entries {
            map.insert(data_dir.join(name), state);
        }
    }
    drop(records);
    for path in &found {
        meta::remove_if_exists(path)?;
    }
    if !found.is_empty() {
        meta::sync_dir(&data_dir)?;
    }
    Ok(covered)
}

/// The record's entry for the log in `dir` (absolute), taken: it vouches for one open only.
pub(crate) fn take_record(dir: &Path) -> Option<CleanState> {
    let mut records = RECORDS.lock().unwrap_or_else(|p| p.into_inner());
    records.as_mut()?.remove(dir)
}

thread_local! {
    /// While a shard opens its logs at start-up: the directories whose clean-shutdown marker
    /// was removed and not yet made durable (see [`defer_marker_syncs`]).
    static DEFERRED_MARKER_SYNCS: std::cell::RefCell<Option<Vec<PathBuf>>> =
        const { std::cell::RefCell::new(None) };
}

/// From now on (on this shard) until [`sync_deferred_markers`], a log opened after a clean
/// shutdown removes its clean-shutdown marker without a directory fsync of its own: one
/// `syncfs` per file system then makes every removal durable. The caller must not let any of
/// these logs change its files before that returns (the marker vouches for the files as they
/// are): a shard opening its partitions at start-up, before it serves. A crash in between
/// leaves markers that still tell the truth.
pub fn defer_marker_syncs() {
    DEFERRED_MARKER_SYNCS.with(|d| *d.borrow_mut() = Some(Vec::new()));
}

/// Where a log removed its marker: `true` if the removal's fsync is deferred.
pub(crate) fn marker_sync_deferred(dir: &Path) -> bool {
    DEFERRED_MARKER_SYNCS.with(|d| match d.borrow_mut().as_mut() {
        Some(v) => {
            v.push(dir.to_path_buf());
            true
        }
        None => false,
    })
}

/// Makes the marker removals since [`defer_marker_syncs`] durable (one `syncfs` per file
/// system, on the blocking pool) and ends the deferral.
pub async fn sync_deferred_markers() -> io::Result<()> {
    let dirs = DEFERRED_MARKER_SYNCS.with(|d| d.borrow_mut().take().unwrap_or_default());
    if dirs.is_empty() {
        return Ok(());
    }
    glommio::executor()
        .spawn_blocking(move || crate::storage::io::sync_file_systems(&dirs))
        .await
}
