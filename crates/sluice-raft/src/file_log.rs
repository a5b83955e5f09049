//! [`FileLog`]: a [`LogStore`] in two files of a directory, for groups whose log is small and
//! compacted by snapshots (the controller).
//!
//! - `raft.log`: an 8-byte magic, then records `[len u32][crc32c u32][body]` (little-endian; the
//!   CRC covers the body). A body is `1, count u32, entries…` (one loop pass of entries: replay
//!   replaces held entries from the first one's index on, which is how conflict truncation is
//!   recorded without rewriting the file) or `2, snapshot` (metadata and state machine bytes;
//!   replay drops the entries it covers). Records are appended with one write and one fdatasync
//!   per loop pass. Installing a snapshot rewrites the file as `snapshot, entries after it` into
//!   a temporary file, fsynced and renamed over the old one (then the directory is fsynced), which
//!   is how the log is compacted.
//! - `hardstate`: term, vote, commit and the bootstrap conf state, replaced atomically (write a
//!   temporary file, fsync, rename, fsync the directory) whenever term or vote change.
//!
//! Recovery at open: a record is written (and fdatasynced) only after every record before it was
//! fdatasynced, so only the last record can be torn. A last record whose header or body runs past
//! the end of the file, or whose CRC fails and that ends exactly at the end of the file, or that
//! is followed only by zero bytes, is torn and cut off. A bad record followed by anything else is
//! corruption of synced data: opening fails and names the offset, rather than silently dropping
//! entries this node may have acknowledged.
//!
//! [`LogStore::persist`] does the appends, fdatasyncs and hard-state replacement on the glommio
//! executor's blocking thread pool (the controller's log lives on shard 0, which also serves
//! partitions), and so do the futures of `install_snapshot` (the log's rewrite) and `bootstrap`
//! (the hard-state file). Only [`FileLog::open`] (before the group starts) and the test helper
//! [`FileLog::sync`] touch the files on the calling thread.
//!
//! All entries after the snapshot are held in memory (raft-rs reads them synchronously); the log
//! stays small because the driver compacts it every `snapshot_interval_entries`.

use crate::codec::{self, Malformed, Reader};
use crate::storage::LogStore;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{RaftState, StorageError};
use std::cell::RefCell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

pub const LOG_FILE: &str = "raft.log";
pub const HARD_STATE_FILE: &str = "hardstate";
const LOG_MAGIC: &[u8; 8] = b"SLRLOG01";
const HARD_STATE_MAGIC: &[u8; 8] = b"SLRHS001";
const RECORD_HEADER: usize = 8;
const KIND_ENTRIES: u8 = 1;
const KIND_SNAPSHOT: u8 = 2;

/// Largest record body. One record is one loop pass of entries or one snapshot; a declared length
/// above it is not a record this code wrote (a corrupt or torn header), so the scan stops without
/// reading on. Appends larger than this are split into several records, each made durable before
/// the next is written (so that only the last can be torn).
pub const MAX_RECORD_BYTES: usize = 256 << 20;

/// Largest hard-state file: the hard state and a conf state of a few thousand members.
const MAX_HARD_STATE_BYTES: usize = 1 << 20;

fn corrupt(path: &Path, offset: usize, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: corrupt at byte {offset}: {what}", path.display()),
    )
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `dir/name` atomically and durably: temporary file, fsync, rename, fsync dir.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    fsync_dir(dir)
}

fn record(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Entries as records of at most `MAX_RECORD_BYTES` each.
fn entry_records(entries: &[Entry]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < entries.len() {
        let mut body = vec![KIND_ENTRIES, 0, 0, 0, 0];
        let mut count = 0u32;
        for e in &entries[start..] {
            if count > 0 && body.len() + codec::entry_encoded_len(e) > MAX_RECORD_BYTES {
                break;
            }
            codec::put_entry(&mut body, e);
            count += 1;
        }
        body[1..5].copy_from_slice(&count.to_le_bytes());
        start += count as usize;
        out.push(record(&body));
    }
    out
}

fn snapshot_record(snap: &Snapshot) -> Vec<u8> {
    let mut body = vec![KIND_SNAPSHOT];
    codec::put_snapshot(&mut body, snap);
    record(&body)
}

/// The log and hard state of one group in a directory. See the module comment for the format.
pub struct FileLog {
    dir: PathBuf,
    /// The log file, opened for appending. Replaced by the future of `install_snapshot` once
    /// the rewritten file is in place (the driver awaits it before the next `persist`).
    file: Rc<RefCell<File>>,
    snapshot: Snapshot,
    /// Entries after the snapshot, contiguous.
    entries: Vec<Entry>,
    hard_state: HardState,
    /// Conf state before any snapshot (bootstrap).
    bootstrap_conf: ConfState,
    /// Records appended but not yet written.
    pending: Vec<Vec<u8>>,
    /// Term or vote changed since the hard-state file was last written.
    hard_state_dirty: bool,
    /// Bytes cut off a torn tail at open (for tests and logs).
    torn_bytes: u64,
}

enum Scan {
    Record { body_at: usize, end: usize },
    Torn,
    Corrupt(&'static str),
}

fn scan_one(data: &[u8], pos: usize) -> Scan {
    let rest = &data[pos..];
    let zeros = || rest.iter().all(|b| *b == 0);
    if rest.len() < RECORD_HEADER {
        return Scan::Torn;
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if len > rest.len() - RECORD_HEADER {
        // Runs past the end of the file: the write did not finish.
        return Scan::Torn;
    }
    if len == 0 || len > MAX_RECORD_BYTES {
        return if zeros() {
            Scan::Torn
        } else {
            Scan::Corrupt("bad record length")
        };
    }
    let end = RECORD_HEADER + len;
    if crc32c::crc32c(&rest[RECORD_HEADER..end]) != crc {
        return if end == rest.len() || zeros() {
            Scan::Torn
        } else {
            Scan::Corrupt("record checksum mismatch before the last record")
        };
    }
    Scan::Record {
        body_at: pos + RECORD_HEADER,
        end: pos + end,
    }
}

impl FileLog {
    /// Opens (creating if absent) the log in `dir`, recovering a torn tail.
    pub fn open(dir: impl AsRef<Path>) -> io::Result<FileLog> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        let (hard_state, bootstrap_conf) = Self::read_hard_state(&dir)?;
        let log_path = dir.join(LOG_FILE);
        let mut data = match fs::read(&log_path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        if data.len() < LOG_MAGIC.len() {
            // Absent, or torn while being created: nothing in it was ever synced.
            if !LOG_MAGIC.starts_with(&data) && data.iter().any(|b| *b != 0) {
                return Err(corrupt(&log_path, 0, "not a raft log"));
            }
            write_atomic(&dir, LOG_FILE, LOG_MAGIC)?;
            data = LOG_MAGIC.to_vec();
        }
        if &data[..LOG_MAGIC.len()] != LOG_MAGIC {
            return Err(corrupt(&log_path, 0, "not a raft log"));
        }
        let mut log = FileLog {
            file: Rc::new(RefCell::new(
                OpenOptions::new().append(true).open(&log_path)?,
            )),
            dir: dir.clone(),
            snapshot: Snapshot::default(),
            entries: Vec::new(),
            hard_state,
            bootstrap_conf,
            pending: Vec::new(),
            hard_state_dirty: false,
            torn_bytes: 0,
        };
        let mut pos = LOG_MAGIC.len();
        while pos < data.len() {
            match scan_one(&data, pos) {
                Scan::Record { body_at, end } => {
                    log.replay(&data[body_at..end])
                        .map_err(|e| corrupt(&log_path, pos, e))?;
                    pos = end;
                }
                Scan::Torn => {
                    tracing::warn!(
                        "{}: cutting a torn last record ({} bytes at byte {pos})",
                        log_path.display(),
                        data.len() - pos
                    );
                    log.torn_bytes = (data.len() - pos) as u64;
                    let file = log.file.borrow();
                    file.set_len(pos as u64)?;
                    file.sync_all()?;
                    break;
                }
                Scan::Corrupt(what) => return Err(corrupt(&log_path, pos, what)),
            }
        }
        let snap_index = log.snapshot.get_metadata().index;
        if log.hard_state.commit < snap_index {
            log.hard_state.commit = snap_index;
        }
        if log.hard_state.commit > log.last_index() {
            return Err(corrupt(
                &dir.join(HARD_STATE_FILE),
                0,
                format!(
                    "commit index {} past the last log entry {}",
                    log.hard_state.commit,
                    log.last_index()
                ),
            ));
        }
        Ok(log)
    }

    fn read_hard_state(dir: &Path) -> io::Result<(HardState, ConfState)> {
        let path = dir.join(HARD_STATE_FILE);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok((HardState::default(), ConfState::default()))
            }
            Err(e) => return Err(e),
        };
        // Written atomically: any damage is corruption, not a torn write.
        let parse = || -> Result<(HardState, ConfState), Malformed> {
            let mut r = Reader::new(&data);
            if r.bytes(8, "magic")? != HARD_STATE_MAGIC {
                return Err(Malformed("not a hard-state file"));
            }
            let len = r.u32("length")? as usize;
            let crc = r.u32("checksum")?;
            if len > MAX_HARD_STATE_BYTES {
                return Err(Malformed("length over the limit"));
            }
            let body = r.bytes(len, "body")?;
            if crc32c::crc32c(body) != crc {
                return Err(Malformed("checksum mismatch"));
            }
            let mut r = Reader::new(body);
            let hs = codec::get_hard_state(&mut r)?;
            let cs = codec::get_conf_state(&mut r)?;
            Ok((hs, cs))
        };
        parse().map_err(|e| corrupt(&path, 0, e))
    }

    /// The hard-state file's bytes for the current hard state and bootstrap conf state.
    fn hard_state_file(&self) -> Vec<u8> {
        let mut body = Vec::new();
        codec::put_hard_state(&mut body, &self.hard_state);
        codec::put_conf_state(&mut body, &self.bootstrap_conf);
        let mut out = HARD_STATE_MAGIC.to_vec();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Takes what [`FileLog::sync`] would write: the pending records and, when term or vote
    /// changed, the hard-state file. `None` when there is nothing to write.
    fn take_unsynced(&mut self) -> Option<Unsynced> {
        if self.pending.is_empty() && !self.hard_state_dirty {
            return None;
        }
        let hard_state = self.hard_state_dirty.then(|| self.hard_state_file());
        // Taken now: a failed write fails the group (the driver stops on a storage error).
        self.hard_state_dirty = false;
        Some(Unsynced {
            records: std::mem::take(&mut self.pending),
            hard_state,
        })
    }

    fn replay(&mut self, body: &[u8]) -> Result<(), Malformed> {
        let mut r = Reader::new(body);
        match r.u8("record kind")? {
            KIND_ENTRIES => {
                let count = r.u32("entry count")? as usize;
                // An entry takes at least 25 bytes: bound the count before reserving.
                if count > r.remaining() / 25 {
                    return Err(Malformed("entry count past the record"));
                }
                let mut batch = Vec::with_capacity(count);
                for _ in 0..count {
                    batch.push(codec::get_entry(&mut r)?);
                }
                if r.remaining() != 0 {
                    return Err(Malformed("bytes after the entries"));
                }
                self.splice(batch)
            }
            KIND_SNAPSHOT => {
                let snap = codec::get_snapshot(&mut r)?;
                if r.remaining() != 0 {
                    return Err(Malformed("bytes after the snapshot"));
                }
                self.apply_snapshot_in_memory(snap);
                Ok(())
            }
            _ => Err(Malformed("unknown record kind")),
        }
    }

    /// Adds entries to the in-memory log, replacing held entries from the first one's index on.
    fn splice(&mut self, mut batch: Vec<Entry>) -> Result<(), Malformed> {
        if batch.windows(2).any(|w| w[1].index != w[0].index + 1) {
            return Err(Malformed("entries not contiguous"));
        }
        let snap_index = self.snapshot.get_metadata().index;
        batch.retain(|e| e.index > snap_index);
        let Some(first) = batch.first().map(|e| e.index) else {
            return Ok(());
        };
        if first > self.last_index() + 1 {
            return Err(Malformed("gap before the appended entries"));
        }
        let keep = (first - self.first_index()) as usize;
        self.entries.truncate(keep);
        self.entries.extend(batch);
        Ok(())
    }

    fn apply_snapshot_in_memory(&mut self, snap: Snapshot) {
        let (index, term) = (snap.get_metadata().index, snap.get_metadata().term);
        let matches = self.term(index).map(|t| t == term).unwrap_or(false);
        if matches && index >= self.first_index() {
            let drop = (index + 1 - self.first_index()) as usize;
            self.entries.drain(..drop.min(self.entries.len()));
        } else if !matches {
            self.entries.clear();
        }
        self.snapshot = snap;
    }

    /// Bytes cut off a torn tail when this log was opened.
    pub fn torn_bytes(&self) -> u64 {
        self.torn_bytes
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The in-memory hard state, including a commit index not yet written.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Writes the buffered records and the hard state, with their fsyncs, before returning
    /// (the executor thread waits: fine for the controller's small writes).
    pub fn sync(&mut self) -> io::Result<()> {
        match self.take_unsynced() {
            Some(w) => w.write(&mut self.file.borrow_mut(), &self.dir),
            None => Ok(()),
        }
    }
}

/// Writes a [`FileLog`] owes the disk: appended records, and the hard-state file when term or
/// vote changed. Owned, so that [`LogStore::persist`] can do them on the blocking thread pool.
struct Unsynced {
    records: Vec<Vec<u8>>,
    hard_state: Option<Vec<u8>>,
}

impl Unsynced {
    fn write(self, file: &mut File, dir: &Path) -> io::Result<()> {
        let n = self.records.len();
        for (i, rec) in self.records.into_iter().enumerate() {
            file.write_all(&rec)?;
            if i + 1 < n {
                // Only the last record of the file may be torn: see the module comment.
                file.sync_data()?;
            }
        }
        if n > 0 {
            file.sync_data()?;
        }
        if let Some(bytes) = self.hard_state {
            write_atomic(dir, HARD_STATE_FILE, &bytes)?;
        }
        Ok(())
    }
}

impl LogStore for FileLog {
    fn raft_state(&self) -> RaftState {
        let conf = if self.snapshot.get_metadata().index > 0 {
            self.snapshot.get_metadata().get_conf_state().clone()
        } else {
            self.bootstrap_conf.clone()
        };
        RaftState::new(self.hard_state.clone(), conf)
    }

    fn first_index(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn last_index(&self) -> u64 {
        self.entries
            .last()
            .map(|e| e.index)
            .unwrap_or(self.snapshot.get_metadata().index)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let meta = self.snapshot.get_metadata();
        if index == meta.index {
            return Ok(meta.term);
        }
        if index < meta.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > self.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(index - self.first_index()) as usize].term)
    }

    fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> raft::Result<Vec<Entry>> {
        if low < self.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - self.first_index()) as usize;
        let hi = (high - self.first_index()) as usize;
        let mut out = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut out, max_size);
        Ok(out)
    }

    fn snapshot(&self) -> Snapshot {
        self.snapshot.clone()
    }

    fn append(&mut self, entries: &[Entry]) -> io::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        self.splice(entries.to_vec())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.pending.extend(entry_records(entries));
        Ok(())
    }

    fn set_hard_state(&mut self, hs: &HardState) -> io::Result<()> {
        if hs.term != self.hard_state.term || hs.vote != self.hard_state.vote {
            self.hard_state_dirty = true;
        }
        self.hard_state = hs.clone();
        Ok(())
    }

    /// The hard-state file (with the configuration) is replaced on the blocking pool; durable
    /// when the future resolves.
    fn bootstrap(&mut self, cs: &ConfState) -> crate::storage::Persist {
        self.bootstrap_conf = cs.clone();
        let bytes = self.hard_state_file();
        // Written by this future: a later `persist` need not write it again for a term or
        // vote changed before.
        self.hard_state_dirty = false;
        let dir = self.dir.clone();
        Box::pin(async move {
            glommio::executor()
                .spawn_blocking(move || write_atomic(&dir, HARD_STATE_FILE, &bytes))
                .await
        })
    }

    /// The writes and syncs run on the executor's blocking thread pool, so a metadata change
    /// does not stall the shard it is driven on for an fdatasync and an atomic file
    /// replacement. No two run at once: the driver awaits this future before it touches the
    /// store again. A pass that wrote nothing (a commit-only change) costs no pool hop.
    fn persist(&mut self) -> crate::storage::Persist {
        let Some(unsynced) = self.take_unsynced() else {
            return Box::pin(std::future::ready(Ok(())));
        };
        let (file, dir) = (self.file.borrow().try_clone(), self.dir.clone());
        Box::pin(async move {
            // A second descriptor of the same open file (append mode, shared offset).
            let mut file = file?;
            glommio::executor()
                .spawn_blocking(move || unsynced.write(&mut file, &dir))
                .await
        })
    }

    /// The log is rewritten (snapshot, then the entries after it, pending ones included) into a
    /// temporary file renamed over it, and the hard-state file replaced, on the blocking pool;
    /// durable when the future resolves, which then makes the new file the one `persist`
    /// appends to. The in-memory log changes at once.
    fn install_snapshot(&mut self, snapshot: Snapshot) -> crate::storage::Persist {
        let index = snapshot.get_metadata().index;
        if index <= self.snapshot.get_metadata().index {
            return Box::pin(std::future::ready(Ok(())));
        }
        self.apply_snapshot_in_memory(snapshot);
        if self.hard_state.commit < index {
            self.hard_state.commit = index;
        }
        let mut out = LOG_MAGIC.to_vec();
        out.extend(snapshot_record(&self.snapshot));
        for rec in entry_records(&self.entries) {
            out.extend(rec);
        }
        // In the rewrite: nothing left for `persist` to append or replace.
        self.pending.clear();
        let hard_state = self.hard_state_file();
        self.hard_state_dirty = false;
        let (dir, file) = (self.dir.clone(), self.file.clone());
        Box::pin(async move {
            let rewritten = glommio::executor()
                .spawn_blocking(move || {
                    write_atomic(&dir, LOG_FILE, &out)?;
                    let file = OpenOptions::new().append(true).open(dir.join(LOG_FILE))?;
                    write_atomic(&dir, HARD_STATE_FILE, &hard_state)?;
                    Ok::<File, io::Error>(file)
                })
                .await?;
            *file.borrow_mut() = rewritten;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &str) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = bytes::Bytes::copy_from_slice(data.as_bytes());
        e
    }

    fn datas(log: &FileLog) -> Vec<(u64, u64, String)> {
        let all = log
            .entries(log.first_index(), log.last_index() + 1, None)
            .unwrap();
        all.iter()
            .map(|e| (e.index, e.term, String::from_utf8(e.data.to_vec()).unwrap()))
            .collect()
    }

    fn hs(term: u64, vote: u64, commit: u64) -> HardState {
        let mut h = HardState::default();
        h.term = term;
        h.vote = vote;
        h.commit = commit;
        h
    }

    /// Runs `f` on a glommio executor of its own (the store's futures use its blocking pool).
    fn on_executor<T: 'static>(f: impl std::future::Future<Output = T> + 'static) -> T {
        glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor")
            .run(f)
    }

    /// A job that holds the executor's (one-thread) blocking pool until the sender is used.
    fn hold_pool() -> (
        std::sync::mpsc::Sender<()>,
        impl std::future::Future<Output = ()>,
    ) {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let held = glommio::executor().spawn_blocking(move || {
            let _ = released.recv();
        });
        (release, held)
    }

    fn snap(index: u64, term: u64, data: &str) -> Snapshot {
        let mut s = Snapshot::default();
        s.mut_metadata().index = index;
        s.mut_metadata().term = term;
        s.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        s.data = bytes::Bytes::copy_from_slice(data.as_bytes());
        s
    }

    #[test]
    fn append_sync_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        on_executor(async move {
            let mut log = FileLog::open(&path).unwrap();
            assert_eq!((log.first_index(), log.last_index()), (1, 0));
            let mut cs = ConfState::default();
            cs.voters = vec![1, 2, 3];
            log.bootstrap(&cs).await.unwrap();
            log.append(&[entry(1, 1, "a"), entry(2, 1, "b")]).unwrap();
            log.append(&[entry(3, 1, "c")]).unwrap();
            log.set_hard_state(&hs(1, 2, 3)).unwrap();
            log.sync().unwrap();
        });
        let log = FileLog::open(dir.path()).unwrap();
        assert_eq!(
            datas(&log),
            vec![(1, 1, "a".into()), (2, 1, "b".into()), (3, 1, "c".into())]
        );
        let st = log.raft_state();
        assert_eq!(st.hard_state, hs(1, 2, 3));
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(log.term(2).unwrap(), 1);
        assert!(matches!(
            log.term(9),
            Err(raft::Error::Store(StorageError::Unavailable))
        ));
        assert_eq!(log.torn_bytes(), 0);
    }

    /// `persist` writes on the executor's blocking pool: queued behind a job that holds the
    /// pool's thread, it is still pending after a poll and has written nothing; released, it
    /// resolves with the entries and the new term and vote on disk. A pass with nothing to
    /// write resolves at once.
    #[test]
    fn persist_writes_on_the_blocking_pool_and_is_durable_when_it_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let mut log = FileLog::open(&path).unwrap();
                log.append(&[entry(1, 1, "a"), entry(2, 1, "b")]).unwrap();
                log.set_hard_state(&hs(1, 2, 0)).unwrap();
                // A job ahead in the (one-thread) pool, held until released below.
                let (release, released) = std::sync::mpsc::channel::<()>();
                let ahead = glommio::executor().spawn_blocking(move || {
                    released.recv().unwrap();
                });
                let mut persisted = log.persist();
                assert!(
                    futures_lite::future::poll_once(&mut persisted)
                        .await
                        .is_none(),
                    "persist wrote on the executor, not on the blocking pool"
                );
                assert_eq!(FileLog::read_hard_state(&path).unwrap().0, hs(0, 0, 0));
                release.send(()).unwrap();
                persisted.await.unwrap();
                ahead.await;
                let reopened = FileLog::open(&path).unwrap();
                assert_eq!(
                    datas(&reopened),
                    vec![(1, 1, "a".into()), (2, 1, "b".into())]
                );
                assert_eq!(reopened.raft_state().hard_state, hs(1, 2, 0));
                // Commit-only: nothing to write, no pool job.
                log.set_hard_state(&hs(1, 2, 2)).unwrap();
                assert!(log.take_unsynced().is_none());
                log.persist().await.unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// `bootstrap` writes the configuration on the blocking pool: in memory at once, but
    /// behind a job that holds the pool's thread the future is still pending after a poll and
    /// no hard-state file exists; released, it resolves with the voters on disk.
    #[test]
    fn bootstrap_writes_on_the_blocking_pool_and_is_durable_when_it_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        on_executor(async move {
            let mut log = FileLog::open(&path).unwrap();
            let mut cs = ConfState::default();
            cs.voters = vec![1, 2, 3];
            let (release, held) = hold_pool();
            let mut durable = log.bootstrap(&cs);
            assert!(
                futures_lite::future::poll_once(&mut durable)
                    .await
                    .is_none(),
                "bootstrap wrote on the executor, not on the blocking pool"
            );
            assert!(!path.join(HARD_STATE_FILE).exists());
            assert_eq!(log.raft_state().conf_state.voters, vec![1, 2, 3]);
            release.send(()).unwrap();
            durable.await.unwrap();
            held.await;
            assert_eq!(
                FileLog::read_hard_state(&path).unwrap().1.voters,
                vec![1, 2, 3]
            );
            assert_eq!(
                FileLog::open(&path).unwrap().raft_state().conf_state.voters,
                vec![1, 2, 3]
            );
        });
    }

    /// `install_snapshot` rewrites the log and the hard state on the blocking pool: the log in
    /// memory is compacted at once, but behind a job that holds the pool's thread the future
    /// is still pending after a poll and both files are as they were; released, it resolves
    /// with the compacted log on disk, and the next `persist` appends to the rewritten file.
    #[test]
    fn install_snapshot_rewrites_on_the_blocking_pool_and_is_durable_when_it_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        on_executor(async move {
            let mut log = FileLog::open(&path).unwrap();
            let ents: Vec<_> = (1..=10).map(|i| entry(i, 1, &format!("e{i}"))).collect();
            log.append(&ents).unwrap();
            log.set_hard_state(&hs(1, 1, 8)).unwrap();
            log.persist().await.unwrap();
            let (log_before, hs_before) = (
                fs::read(path.join(LOG_FILE)).unwrap(),
                fs::read(path.join(HARD_STATE_FILE)).unwrap(),
            );
            // Pending entries go into the rewrite, and a term changed before it is written
            // with it.
            log.append(&[entry(11, 2, "e11")]).unwrap();
            log.set_hard_state(&hs(2, 1, 8)).unwrap();
            let (release, held) = hold_pool();
            let mut durable = log.install_snapshot(snap(6, 1, "state@6"));
            assert!(
                futures_lite::future::poll_once(&mut durable)
                    .await
                    .is_none(),
                "install_snapshot wrote on the executor, not on the blocking pool"
            );
            assert_eq!(fs::read(path.join(LOG_FILE)).unwrap(), log_before);
            assert_eq!(fs::read(path.join(HARD_STATE_FILE)).unwrap(), hs_before);
            assert_eq!((log.first_index(), log.last_index()), (7, 11));
            release.send(()).unwrap();
            durable.await.unwrap();
            held.await;
            let reopened = FileLog::open(&path).unwrap();
            assert_eq!((reopened.first_index(), reopened.last_index()), (7, 11));
            assert_eq!(&reopened.snapshot().data[..], b"state@6");
            assert_eq!(reopened.raft_state().hard_state, hs(2, 1, 8));
            assert!(fs::read(path.join(LOG_FILE)).unwrap().len() < log_before.len());
            // Appended to the rewritten file, not to the replaced one.
            log.append(&[entry(12, 2, "e12")]).unwrap();
            log.persist().await.unwrap();
            let reopened = FileLog::open(&path).unwrap();
            assert_eq!((reopened.first_index(), reopened.last_index()), (7, 12));
        });
    }

    #[test]
    fn conflicting_append_replaces_the_suffix_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = FileLog::open(dir.path()).unwrap();
            log.append(&[entry(1, 1, "a"), entry(2, 1, "b"), entry(3, 1, "c")])
                .unwrap();
            log.sync().unwrap();
            // A new leader in term 2 overwrites from index 2.
            log.append(&[entry(2, 2, "B")]).unwrap();
            log.sync().unwrap();
            assert_eq!(datas(&log), vec![(1, 1, "a".into()), (2, 2, "B".into())]);
            // A gap is refused.
            assert!(log.append(&[entry(9, 2, "x")]).is_err());
        }
        let log = FileLog::open(dir.path()).unwrap();
        assert_eq!(datas(&log), vec![(1, 1, "a".into()), (2, 2, "B".into())]);
    }

    #[test]
    fn compaction_keeps_later_entries_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        on_executor(async move {
            let mut log = FileLog::open(&path).unwrap();
            let ents: Vec<_> = (1..=10).map(|i| entry(i, 1, &format!("e{i}"))).collect();
            log.append(&ents).unwrap();
            log.set_hard_state(&hs(1, 1, 8)).unwrap();
            log.sync().unwrap();
            log.install_snapshot(snap(6, 1, "state@6")).await.unwrap();
            assert_eq!((log.first_index(), log.last_index()), (7, 10));
            assert_eq!(log.term(6).unwrap(), 1);
            assert!(matches!(
                log.term(5),
                Err(raft::Error::Store(StorageError::Compacted))
            ));
            assert!(matches!(
                log.entries(5, 8, None),
                Err(raft::Error::Store(StorageError::Compacted))
            ));
            log.append(&[entry(11, 2, "e11")]).unwrap();
            log.sync().unwrap();
        });
        let log = FileLog::open(dir.path()).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (7, 11));
        assert_eq!(&log.snapshot().data[..], b"state@6");
        assert_eq!(log.raft_state().conf_state.voters, vec![1, 2, 3]);
        assert_eq!(log.raft_state().hard_state.commit, 8);
        // The file was rewritten: entries 1..=6 are gone from disk too.
        let size = fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
        assert!(size < 400, "log file is {size} bytes");
    }

    #[test]
    fn snapshot_from_a_leader_with_another_history_drops_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        on_executor(async move {
            let mut log = FileLog::open(&path).unwrap();
            log.append(&[entry(1, 1, "a"), entry(2, 1, "b"), entry(3, 1, "c")])
                .unwrap();
            log.sync().unwrap();
            log.install_snapshot(snap(5, 3, "state@5")).await.unwrap();
            assert_eq!((log.first_index(), log.last_index()), (6, 5));
            assert!(datas(&log).is_empty());
            assert_eq!(log.raft_state().hard_state.commit, 5);
        });
        let log = FileLog::open(dir.path()).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (6, 5));
        assert_eq!(log.term(5).unwrap(), 3);
    }

    fn three_passes(dir: &Path) -> u64 {
        let mut log = FileLog::open(dir).unwrap();
        for i in 1..=3 {
            log.append(&[entry(i, 1, "payload")]).unwrap();
            log.sync().unwrap();
        }
        fs::metadata(dir.join(LOG_FILE)).unwrap().len()
    }

    #[test]
    fn torn_tails_are_cut_at_open() {
        // Each way the last write can be torn: cut inside the last record's header or body,
        // garbage or zeros after the last record, a last record with a flipped bit.
        type Damage = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Damage)> = vec![
            (
                "cut in body",
                Box::new(|d: &mut Vec<u8>| d.truncate(d.len() - 3)),
            ),
            (
                "cut in header",
                Box::new(|d: &mut Vec<u8>| {
                    let rec = d.len() - (RECORD_HEADER + 1 + 4 + 25 + 7);
                    d.truncate(rec + 5)
                }),
            ),
            (
                "half a new record",
                Box::new(|d: &mut Vec<u8>| {
                    d.extend_from_slice(&1000u32.to_le_bytes());
                    d.extend_from_slice(&[7; 30]);
                }),
            ),
            (
                "zeros",
                Box::new(|d: &mut Vec<u8>| d.extend_from_slice(&[0; 4096])),
            ),
            (
                "bad crc on the last record",
                Box::new(|d: &mut Vec<u8>| {
                    let n = d.len();
                    d[n - 1] ^= 0x40;
                }),
            ),
        ];
        for (name, damage) in cases {
            let dir = tempfile::tempdir().unwrap();
            let good = three_passes(dir.path());
            let path = dir.path().join(LOG_FILE);
            let mut data = fs::read(&path).unwrap();
            damage(&mut data);
            fs::write(&path, &data).unwrap();
            let mut log = FileLog::open(dir.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(log.torn_bytes() > 0, "{name}");
            let expect_last = if data.len() as u64 > good { 3 } else { 2 };
            assert_eq!(log.last_index(), expect_last, "{name}");
            // The file was cut: appending and reopening works.
            log.append(&[entry(expect_last + 1, 2, "next")]).unwrap();
            log.sync().unwrap();
            drop(log);
            let log = FileLog::open(dir.path()).unwrap();
            assert_eq!(log.last_index(), expect_last + 1, "{name}");
            assert_eq!(log.torn_bytes(), 0, "{name}");
        }
    }

    #[test]
    fn damage_before_the_last_record_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        three_passes(dir.path());
        let path = dir.path().join(LOG_FILE);
        let mut data = fs::read(&path).unwrap();
        data[LOG_MAGIC.len() + RECORD_HEADER + 10] ^= 1; // inside the first record
        fs::write(&path, &data).unwrap();
        let err = FileLog::open(dir.path()).err().expect("must refuse");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("corrupt at byte 8"), "{err}");
    }

    #[test]
    fn huge_declared_lengths_are_not_allocated() {
        let dir = tempfile::tempdir().unwrap();
        three_passes(dir.path());
        let path = dir.path().join(LOG_FILE);
        let mut data = fs::read(&path).unwrap();
        // A last record that declares 4 GiB: cut as torn, nothing allocated for it.
        data.extend_from_slice(&u32::MAX.to_le_bytes());
        data.extend_from_slice(&[1; 8]);
        fs::write(&path, &data).unwrap();
        let log = FileLog::open(dir.path()).unwrap();
        assert_eq!(log.last_index(), 3);
        // A hard-state file declaring a huge length is refused, not allocated.
        let mut hsf = HARD_STATE_MAGIC.to_vec();
        hsf.extend_from_slice(&u32::MAX.to_le_bytes());
        hsf.extend_from_slice(&[0; 4]);
        fs::write(dir.path().join(HARD_STATE_FILE), &hsf).unwrap();
        assert!(FileLog::open(dir.path()).is_err());
    }

    #[test]
    fn commit_only_changes_are_lazy_but_term_and_vote_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = FileLog::open(dir.path()).unwrap();
            log.append(&[entry(1, 1, "a"), entry(2, 1, "b")]).unwrap();
            log.set_hard_state(&hs(1, 1, 0)).unwrap();
            log.sync().unwrap();
            log.set_hard_state(&hs(1, 1, 2)).unwrap();
            log.sync().unwrap();
        }
        let log = FileLog::open(dir.path()).unwrap();
        let st = log.raft_state().hard_state;
        assert_eq!((st.term, st.vote), (1, 1));
        assert!(st.commit <= 2);
    }
}
