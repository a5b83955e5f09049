//! Closing many partition logs at once (a shard at shutdown).
//!
//! A clean close leaves, next to the synced segment, the active segment's two index files, the
//! producer snapshot and the clean-shutdown marker. Written one log at a time, each durably
//! (temp file, fsync, rename, directory fsync), that is eight fsyncs per log: with 10,000
//! partitions on a shard, tens of seconds — longer than supervisors wait before SIGKILL.
//!
//! [`close_all`] drains the logs concurrently, then writes every log's small files in three
//! passes, each made durable by one `syncfs` of the file system instead of per-file fsyncs:
//!
//! 1. every file's contents to `<name>.tmp`, then `syncfs`: these and the segments' own
//!    writes and sizes are on disk (the segments are not fdatasynced one by one);
//! 2. every index and snapshot renamed over its final name (a stale one removed), then
//!    `syncfs`;
//! 3. every clean-shutdown marker renamed into place, then `syncfs`.
//!
//! A crash before pass 3 completes leaves some logs without a marker: they are recovered by a
//! scan, as after any crash, and whatever index or snapshot they have is whole (renamed only
//! after its contents were durable) and checksummed besides. A marker is only ever in place
//! after the files it vouches for.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::storage::{meta, PartitionLog, StorageError};

/// Logs one call closes at once: enough to keep the device's queue full (each drain ends
/// with a write and an fdatasync), few enough to bound the memory of the flushes in flight.
pub const CLOSE_CONCURRENCY_MAX: usize = 128;

/// Whether [`PartitionLog::close_deferred`] syncs the active segment itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentSync {
    Now,
    /// The caller syncs the file system before it writes the clean-shutdown marker.
    Later,
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

/// Closes every log of `logs` (see the module docs), returning the ones that failed with their
/// error; `K` labels a log in that answer (e.g. its partition).
pub async fn close_all<K: 'static>(logs: Vec<(K, Rc<PartitionLog>)>) -> Vec<(K, StorageError)> {
    let mut failed = Vec::new();
    let mut closing = Vec::new();
    let mut logs = logs.into_iter();
    loop {
        let wave: Vec<_> = logs
            .by_ref()
            .take(CLOSE_CONCURRENCY_MAX)
            .map(|(k, log)| {
                glommio::spawn_local(
                    async move { (k, log.close_deferred(SegmentSync::Later).await) },
                )
            })
            .collect();
        if wave.is_empty() {
            break;
        }
        for task in wave {
            match task.await {
                (_, Ok(None)) => {}
                (k, Ok(Some(files))) => closing.push((k, files)),
                (k, Err(e)) => failed.push((k, e)),
            }
        }
    }
    if closing.is_empty() {
        return failed;
    }
    let (keys, files): (Vec<K>, Vec<ClosingFiles>) = closing.into_iter().unzip();
    let results = glommio::executor()
        .spawn_blocking(move || write_all(files))
        .await;
    for (k, r) in keys.into_iter().zip(results) {
        if let Err(e) = r {
            failed.push((k, e.into()));
        }
    }
    failed
}

/// The three passes of the module docs, on the blocking pool. One result per log, in order.
fn write_all(logs: Vec<ClosingFiles>) -> Vec<io::Result<()>> {
    let file_systems = match file_systems(logs.iter().map(|l| l.dir.as_path())) {
        Ok(f) => f,
        Err(e) => return logs.iter().map(|_| Err(copy(&e))).collect(),
    };
    let mut results: Vec<io::Result<()>> = logs
        .iter()
        .map(|l| {
            for (path, bytes) in l.data.iter().chain(std::iter::once(&l.clean)) {
                write_new(&tmp_path(path), bytes)?;
            }
            Ok(())
        })
        .collect();
    let step = |results: &mut Vec<io::Result<()>>, f: &dyn Fn(&ClosingFiles) -> io::Result<()>| {
        for (l, r) in logs.iter().zip(results.iter_mut()) {
            if r.is_ok() {
                *r = f(l);
            }
        }
        if let Err(e) = sync_file_systems(&file_systems) {
            // Nothing of this pass is known to be durable: no log may go on to the next one.
            for r in results.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(copy(&e));
            }
        }
    };
    step(&mut results, &|_| Ok(()));
    step(&mut results, &|l| {
        l.data
            .iter()
            .try_for_each(|(path, _)| fs::rename(tmp_path(path), path))?;
        l.remove
            .iter()
            .try_for_each(|path| meta::remove_if_exists(path))
    });
    step(&mut results, &|l| {
        fs::rename(tmp_path(&l.clean.0), &l.clean.0)
    });
    results
}

/// `path` with `.tmp` appended (`00000000000000000000.index.tmp`): distinct per file, unlike
/// replacing the extension.
fn tmp_path(path: &Path) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(".tmp");
    PathBuf::from(s)
}

fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = fs::File::create(path)?;
    f.write_all(bytes)
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
        .spawn_blocking(move || {
            let fs = file_systems(dirs.iter().map(|d| d.as_path()))?;
            sync_file_systems(&fs)
        })
        .await
}

/// One directory on each file system holding one of `dirs`.
fn file_systems<'a>(dirs: impl Iterator<Item = &'a Path>) -> io::Result<Vec<PathBuf>> {
    let mut seen: Vec<(u64, PathBuf)> = Vec::new();
    for dir in dirs {
        let dev = fs::metadata(dir)?.dev();
        if !seen.iter().any(|(d, _)| *d == dev) {
            seen.push((dev, dir.to_path_buf()));
        }
    }
    Ok(seen.into_iter().map(|(_, p)| p).collect())
}

/// `syncfs` of each file system (named by a directory on it).
fn sync_file_systems(file_systems: &[PathBuf]) -> io::Result<()> {
    for dir in file_systems {
        let d = fs::File::open(dir)?;
        // SAFETY: syncfs takes any open descriptor of the file system; `d` is open here.
        if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn copy(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), e.to_string())
}
