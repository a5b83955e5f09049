//! [`RaftLog`]: the raft log of a replicated partition is its segment log. Every raft entry is
//! exactly one RecordBatch: data entries are the produced batch, and entries without data (the
//! empty entry a new leader appends, configuration changes) are one-record control batches
//! (`storage::control_batch`), which Kafka clients skip. An entry's term is its batch's
//! `partitionLeaderEpoch`; its index is its ordinal in the log (index 1 = the first batch).
//!
//! Offsets are a function of the log prefix: the store stamps each entry's batch with base
//! offset = the log end before it and leader epoch = the entry's term as it appends it, on the
//! leader and on every follower alike. Raft's log matching (same index and term ⇒ same prefix)
//! thus gives every replica byte-identical batches at identical offsets, and the segment log's
//! follower append (`append_replicated`) checks the stamped base offset against its log end on
//! every append — a disagreement stops the group instead of renumbering anything.
//!
//! Writes are staged by `append` (raft-rs calls it synchronously) and performed by the future
//! `persist` returns: truncations (`truncate_to`), one verbatim append of the new batches, one
//! group commit (`sync_all`) and, when term or vote changed, the hard-state file (written on
//! the blocking pool). Reads come from the batch cache; entries for a follower behind it are
//! fetched asynchronously (`entries_for_send` answers `LogTemporarilyUnavailable`, `take_fetch`
//! reads them with the log's DMA reads, the driver then has raft-rs send them), and so are
//! committed entries raft-rs is about to hand over for applying (`fetch_committed`, awaited by
//! the driver before `ready` and `advance`). raft-rs's remaining reads that cannot wait
//! (`TransferLeader`, `CommitByVote`: the committed entries not yet applied), and an entry
//! fetched but pushed out of the buffer before it was read, fall back to blocking reads of the
//! segment file (`PartitionLog::read_batch_now`).
//!
//! In memory per entry: its term and offsets (`EntryIndex`), rebuilt at open by reading the
//! log's batch headers from the raft log's start. The log cleaner of compacted topics rewrites
//! the batches of committed and applied entries in place and never removes one (a batch left
//! with no record stays as an empty shell, `PartitionLog::compact_replicated`), so it changes
//! no index, term or offset; a conflict at or below the commit index is refused.
//!
//! Compaction follows the log start (retention, DeleteRecords): the raft log starts after the
//! last entry wholly below the log start offset, recorded in `SNAPSHOT_FILE` (index, term,
//! offset) before the log start moves. A partition's snapshot is that metadata (the log is the
//! state) plus the idempotent producers as of its offset: a follower that needs an entry below
//! the leader's start receives it and restarts its log empty at its offset (`install_snapshot`,
//! performed in `persist`: the log is truncated to its start, one control batch spanning the
//! offsets it skips records the snapshot durably — producers included — then the producer
//! state, the snapshot file and the log start follow), then catches up by entries.

// Protobuf messages are built by setting fields on a default value, as raft-proto itself does.
#![allow(clippy::field_reassign_with_default)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use sluice_raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot};
use sluice_raft::raft::{self, RaftState, StorageError as RaftStorageError};
use sluice_raft::{LogStore, Persist};

use crate::protocol::batch::{self, BatchHeader};
use crate::storage::{
    control_batch, control_of, Durability, PartitionLog, ProducerState, CONTROL_RAFT_CONF_CHANGE,
    CONTROL_RAFT_CONF_CHANGE_V2, CONTROL_RAFT_NOOP,
};
use crate::types::Offset;

/// The hard state (term, vote, commit) and the bootstrap voters of a replica, replaced
/// atomically when term or vote change.
pub const HARD_STATE_FILE: &str = "raft-hard-state";
/// Voters and learners a hard-state file may list (a partition has a handful of replicas).
const MEMBERS_MAX: usize = 1024;
/// Bytes of entries fetched from disk for followers and not sent yet: a fetch reads at most
/// one append message (`max_size_per_msg`, 1 MiB by default); older fetched entries go first.
const PREFETCH_BYTES_MAX: usize = 8 << 20;

/// Term and offsets of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryMeta {
    pub term: u64,
    pub base: Offset,
    pub last: Offset,
}

/// Where a partition's raft log starts: the last entry compacted away (its index and term,
/// both 0 when nothing was) and the offset after it, where the first entry held starts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub index: u64,
    pub term: u64,
    pub offset: Offset,
}

/// Raft index → batch of every entry of the log from its start, shared by the store and the
/// partition handle.
#[derive(Debug, Default)]
pub struct EntryIndex {
    /// The entries before the first one held (see [`SnapshotMeta`]).
    snap: SnapshotMeta,
    /// Entry `i` is `entries[i - snap.index - 1]`.
    entries: VecDeque<EntryMeta>,
}

impl EntryIndex {
    pub fn last_index(&self) -> u64 {
        self.snap.index + self.entries.len() as u64
    }
    /// The index of the first entry held.
    pub fn first_index(&self) -> u64 {
        self.snap.index + 1
    }
    pub fn snapshot(&self) -> SnapshotMeta {
        self.snap
    }
    pub fn get(&self, index: u64) -> Option<EntryMeta> {
        index
            .checked_sub(self.first_index())
            .and_then(|i| self.entries.get(usize::try_from(i).ok()?).copied())
    }
    /// The offset after entry `index` (the log's start for the snapshot's index or below):
    /// the high watermark when it is the commit index.
    pub fn offset_after(&self, index: u64) -> Offset {
        let index = index.min(self.last_index());
        self.get(index).map_or(self.snap.offset, |m| m.last.next())
    }
    /// The log end offset the entries describe.
    pub fn log_end(&self) -> Offset {
        self.offset_after(self.last_index())
    }
    /// The index of the entry whose batch starts at `base`.
    pub fn index_at(&self, base: Offset) -> Option<u64> {
        let k = self.entries.partition_point(|m| m.base < base);
        (self.entries.get(k)?.base == base).then(|| self.snap.index + 1 + k as u64)
    }
    /// The last entry wholly below `offset` that is at or below `upto`: where the log may be
    /// compacted to when its start moves to `offset` (`None` when that is nothing new).
    pub fn compaction_point(&self, offset: Offset, upto: u64) -> Option<SnapshotMeta> {
        let held = self.entries.partition_point(|m| m.last < offset) as u64;
        let index = (self.snap.index + held).min(upto);
        if index <= self.snap.index {
            return None;
        }
        let m = self.get(index)?;
        Some(SnapshotMeta {
            index,
            term: m.term,
            offset: m.last.next(),
        })
    }
    /// Drops the entries up to `snap.index` (a compaction), or all of them when the log does
    /// not reach it (a snapshot from the leader).
    pub fn compact(&mut self, snap: SnapshotMeta) {
        if snap.index <= self.snap.index {
            return;
        }
        let drop = (snap.index - self.snap.index) as usize;
        if drop >= self.entries.len()
            || self.get(snap.index).map(|m| (m.term, m.last.next()))
                != Some((snap.term, snap.offset))
        {
            self.entries.clear();
        } else {
            self.entries.drain(..drop);
        }
        self.snap = snap;
    }
}

/// The raft log's start, replaced atomically (temp file, fsync, rename) before the log start
/// offset moves past it: `[index u64][term u64][offset i64][crc32]`.
pub const SNAPSHOT_FILE: &str = "raft-snapshot";

/// Control batch kind: a snapshot installed from the leader, spanning the offsets the
/// replica's log skips (its value is the [`SnapshotMeta`]: index, term, offset).
pub const CONTROL_RAFT_SNAPSHOT: i16 = 103;
/// Control batch kind: the leader's request (DeleteRecords) that every replica move its log
/// start up to the offset in the value.
pub const CONTROL_RAFT_LOG_START: i16 = 104;

fn encode_snapshot(m: SnapshotMeta) -> Vec<u8> {
    let mut v = Vec::with_capacity(28);
    v.extend_from_slice(&m.index.to_be_bytes());
    v.extend_from_slice(&m.term.to_be_bytes());
    v.extend_from_slice(&m.offset.0.to_be_bytes());
    let crc = crc32fast::hash(&v);
    v.extend_from_slice(&crc.to_be_bytes());
    v
}

fn decode_snapshot(b: &[u8]) -> Option<SnapshotMeta> {
    if b.len() != 28 || crc32fast::hash(&b[..24]).to_be_bytes() != b[24..] {
        return None;
    }
    let at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    Some(SnapshotMeta {
        index: at(0),
        term: at(8),
        offset: Offset(at(16) as i64),
    })
}

/// Bytes of the producer state a partition snapshot may carry. The state rides in the
/// snapshot message (bounded by the transport's frame limit) and in the one control batch that
/// records an install (read back whole at open, in reads of about 1 MiB); a few thousand
/// producers with five batches each fit. A leader whose state is larger sends the snapshot
/// without it (logged): the follower then knows the producers from the entries after it only.
pub const SNAPSHOT_PRODUCERS_BYTES_MAX: usize = 512 << 10;

/// A partition snapshot as it travels (raft snapshot data) and as the install's control batch
/// records it: the [`SnapshotMeta`] (28 bytes with its CRC), then optionally the idempotent
/// producers as of the snapshot's offset — `storage`'s producer snapshot body (covering the
/// offsets below the snapshot's) followed by its CRC-32.
fn encode_snapshot_data(m: SnapshotMeta, producers: Option<&ProducerState>) -> Vec<u8> {
    let mut v = encode_snapshot(m);
    if let Some(p) = producers {
        let body = crate::storage::encode_producers(m.offset, p);
        v.extend_from_slice(&body);
        v.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    }
    v
}

/// Decodes what [`encode_snapshot_data`] wrote, from a leader or from the log: hostile until
/// checked. `None` unless the metadata's CRC holds and, when producer state follows, it is at
/// most `SNAPSHOT_PRODUCERS_BYTES_MAX`, its CRC holds, it decodes exactly (counts checked
/// against the bytes present before anything is built), covers exactly the offsets below the
/// snapshot's, and every batch it remembers lies below that offset.
fn decode_snapshot_data(b: &[u8]) -> Option<(SnapshotMeta, Option<ProducerState>)> {
    let (head, rest) = b.split_at_checked(28)?;
    let m = decode_snapshot(head)?;
    if rest.is_empty() {
        return Some((m, None));
    }
    if rest.len() > SNAPSHOT_PRODUCERS_BYTES_MAX + 4 || rest.len() < 4 {
        return None;
    }
    let (body, crc) = rest.split_at(rest.len() - 4);
    if crc32fast::hash(body).to_be_bytes() != crc {
        return None;
    }
    let (upto, producers) = crate::storage::decode_producers(body)?;
    let sane = upto == m.offset
        && producers.producers.values().all(|e| {
            e.batches
                .iter()
                .all(|b| b.base <= b.last && b.last < m.offset && b.first_seq <= b.last_seq)
        });
    sane.then_some((m, Some(producers)))
}

fn read_snapshot_meta(dir: &Path) -> io::Result<SnapshotMeta> {
    match std::fs::read(dir.join(SNAPSHOT_FILE)) {
        Ok(b) => decode_snapshot(&b).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "raft snapshot file damaged")
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(SnapshotMeta::default()),
        Err(e) => Err(e),
    }
}

/// Writes the raft log's start durably (temp file, fsync, rename, directory fsync), on the
/// executor's blocking pool.
pub async fn write_snapshot_meta(dir: &Path, m: SnapshotMeta) -> io::Result<()> {
    let dir = dir.to_path_buf();
    glommio::executor()
        .spawn_blocking(move || {
            let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
            {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&encode_snapshot(m))?;
                f.sync_data()?;
            }
            std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
}

/// The control batch that stands for a snapshot installed from the leader: it spans the
/// offsets `[base, m.offset)` this replica's log skips (one record, `lastOffsetDelta` the span)
/// and carries the snapshot's index, term and offset, so the log itself records the snapshot
/// durably with one append.
fn snapshot_batch(
    base: Offset,
    m: SnapshotMeta,
    producers: Option<&ProducerState>,
) -> io::Result<BytesMut> {
    let epoch = i32::try_from(m.term)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "term beyond i32"))?;
    let delta = i32::try_from(m.offset.0 - 1 - base.0)
        .map_err(|_| io::Error::other("snapshot span beyond one batch"))?;
    let value = encode_snapshot_data(m, producers);
    let mut b = BytesMut::from(&control_batch(CONTROL_RAFT_SNAPSHOT, &value, epoch, -1)[..]);
    batch::set_last_offset_delta(&mut b, delta);
    batch::set_base_offset(&mut b, base);
    Ok(b)
}

enum Op {
    Truncate(Offset),
    Append(BytesMut),
    /// A snapshot from the leader: the log restarts empty at its offset, with the producer
    /// state it carries (see `RaftLog::install_snapshot`).
    Restart(SnapshotMeta, Option<ProducerState>),
}

pub type TruncateHooks = Rc<RefCell<Vec<Box<dyn Fn(Offset)>>>>;

/// The [`LogStore`] of a replicated partition over its [`PartitionLog`].
pub struct RaftLog {
    log: Rc<PartitionLog>,
    dir: PathBuf,
    index: Rc<RefCell<EntryIndex>>,
    hard: HardState,
    conf: ConfState,
    hard_dirty: bool,
    ops: Vec<Op>,
    on_truncate: TruncateHooks,
    /// Entries read from disk by a fetch for a follower, by index (see `entries_for_send`).
    prefetched: Rc<RefCell<std::collections::BTreeMap<u64, Bytes>>>,
    /// Ranges `entries_for_send` could not serve from memory since the last `take_fetch`:
    /// (low, high, bytes) — one per follower behind the cache.
    fetch: RefCell<Vec<(u64, u64, u64)>>,
    /// Fetches started (a statistic: followers served from disk).
    fetches: Rc<std::cell::Cell<u64>>,
}

impl RaftLog {
    /// Opens the raft state of the partition whose segment log is `log` (in its directory).
    /// The log's entries start at the raft snapshot (`SNAPSHOT_FILE`, or a snapshot batch in
    /// the log written after it by an install the file did not record yet); a start left
    /// half-moved by a crash is finished here.
    pub async fn open(log: Rc<PartitionLog>) -> io::Result<RaftLog> {
        let dir = log.dir().to_path_buf();
        // Both small files in one job on the blocking pool: a replica starts while its shard
        // serves (a partition created or moved here).
        let ((hard, conf), mut snap) = {
            let dir = dir.clone();
            glommio::executor()
                .spawn_blocking(move || {
                    Ok::<_, io::Error>((read_hard_state(&dir)?, read_snapshot_meta(&dir)?))
                })
                .await?
        };
        let failed = |e: crate::storage::StorageError| io::Error::other(e.to_string());
        if log.log_start_offset() > snap.offset {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "log start {} past the raft log's start {}",
                    log.log_start_offset(),
                    snap.offset
                ),
            ));
        }
        if log.log_end_offset() < snap.offset {
            // An install cut the log and did not write its snapshot batch: restart the log at
            // the recorded snapshot again (the leader sends a newer one if it has to).
            restart_log(&log, snap, None).await?;
        }
        let mut index = EntryIndex {
            snap,
            entries: VecDeque::new(),
        };
        let mut at = log.log_start_offset().max(snap.offset);
        // Batches below the raft log's start (its log start offset not moved yet) are
        // skipped: a snapshot batch among them is an install newer than the file.
        let mut reading_from = log.log_start_offset();
        // The producer state of a snapshot batch newer than the file (an install a crash
        // interrupted), with the entries after it replayed on top.
        let mut reinstall: Option<ProducerState> = None;
        while reading_from < log.log_end_offset() {
            let r = log
                .read(crate::storage::ReadOptions {
                    start: reading_from,
                    bytes_max: 1 << 20,
                })
                .await
                .map_err(io::Error::other)?;
            if r.batches.is_empty() {
                break;
            }
            for b in &r.batches {
                let h = BatchHeader::parse(b).map_err(|e| io::Error::other(e.to_string()))?;
                reading_from = h.last_offset().next();
                if let Some((CONTROL_RAFT_SNAPSHOT, v)) = control_of(b) {
                    let (m, producers) = decode_snapshot_data(&v).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "snapshot batch damaged")
                    })?;
                    if m.index > index.snap.index {
                        index.snap = m;
                        index.entries.clear();
                        at = m.offset;
                        reinstall = producers;
                    }
                    continue;
                }
                if let Some(p) = reinstall.as_mut() {
                    p.replay(&h);
                }
                if h.base_offset() < at {
                    continue;
                }
                if h.base_offset() != at {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("batch at {} where {at} was expected", h.base_offset()),
                    ));
                }
                let term = u64::try_from(h.partition_leader_epoch()).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("batch at {at} carries no leader epoch: not a raft log"),
                    )
                })?;
                index.entries.push_back(EntryMeta {
                    term,
                    base: h.base_offset(),
                    last: h.last_offset(),
                });
                at = h.last_offset().next();
            }
        }
        if index.snap != snap {
            if let Some(p) = reinstall {
                log.install_producers(p).await.map_err(failed)?;
            }
            write_snapshot_meta(&dir, index.snap).await?;
            snap = index.snap;
        }
        if log.log_start_offset() < snap.offset {
            log.delete_records_before(snap.offset)
                .await
                .map_err(failed)?;
        }
        Ok(RaftLog {
            log,
            dir,
            index: Rc::new(RefCell::new(index)),
            hard,
            conf,
            hard_dirty: false,
            ops: vec![],
            on_truncate: Rc::default(),
            prefetched: Rc::default(),
            fetch: RefCell::default(),
            fetches: Rc::default(),
        })
    }

    pub fn index(&self) -> Rc<RefCell<EntryIndex>> {
        self.index.clone()
    }

    /// Fetches of entries from disk for followers started so far.
    pub fn fetches(&self) -> Rc<std::cell::Cell<u64>> {
        self.fetches.clone()
    }

    pub(crate) fn truncate_hooks(&self) -> TruncateHooks {
        self.on_truncate.clone()
    }

    /// The batch bytes of entry `index`, stamped, without a disk read: fetched for a follower,
    /// or in the batch cache.
    fn batch_in_memory(&self, index: u64, m: EntryMeta) -> Option<Bytes> {
        if let Some(b) = self.prefetched.borrow().get(&index) {
            return Some(b.clone());
        }
        self.log.read_batch_cached(m.base)
    }

    /// The batch bytes of entry `index`, stamped; from the file if it is not in memory.
    fn batch_of(&self, index: u64, m: EntryMeta) -> raft::Result<Bytes> {
        if let Some(b) = self.batch_in_memory(index, m) {
            return Ok(b);
        }
        match self.log.read_batch_now(m.base) {
            Ok(Some(b)) => Ok(b),
            Ok(None) => Err(raft::Error::Store(RaftStorageError::Unavailable)),
            Err(e) => Err(raft::Error::Store(RaftStorageError::Other(Box::new(
                io::Error::other(e.to_string()),
            )))),
        }
    }

    /// The raft entry a stored batch is.
    fn entry_of(index: u64, term: u64, b: Bytes) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        match control_of(&b) {
            Some((CONTROL_RAFT_CONF_CHANGE, v)) => {
                e.set_entry_type(EntryType::EntryConfChange);
                e.data = v;
            }
            Some((CONTROL_RAFT_CONF_CHANGE_V2, v)) => {
                e.set_entry_type(EntryType::EntryConfChangeV2);
                e.data = v;
            }
            Some((CONTROL_RAFT_NOOP, _)) => {}
            _ => e.data = b,
        }
        e
    }

    /// Appends to `out` the batch an entry is stored as, stamped at `base` with its term. A
    /// data entry's batch is copied as it is (once: this is the buffer the log appends and
    /// caches); its CRC-32C was checked where it entered this node — by the leader on the
    /// produce, by a follower as it arrived ([`entry_payload_check`]) — and is not checked again
    /// (asserted in debug builds).
    fn stage_batch(e: &Entry, base: Offset, out: &mut BytesMut) -> io::Result<()> {
        let epoch = i32::try_from(e.term)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "term beyond i32"))?;
        let start = out.len();
        match e.get_entry_type() {
            EntryType::EntryNormal if e.data.is_empty() => {
                out.extend_from_slice(&control_batch(CONTROL_RAFT_NOOP, b"", epoch, -1))
            }
            EntryType::EntryNormal => {
                let h = BatchHeader::parse(&e.data).map_err(|err| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("entry {} is not a record batch: {err}", e.index),
                    )
                })?;
                if h.size() != e.data.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("entry {} holds more than one batch", e.index),
                    ));
                }
                debug_assert!(h.crc_ok(), "entry {} was appended unchecked", e.index);
                out.extend_from_slice(&e.data);
            }
            EntryType::EntryConfChange => {
                out.extend_from_slice(&control_batch(CONTROL_RAFT_CONF_CHANGE, &e.data, epoch, -1))
            }
            EntryType::EntryConfChangeV2 => out.extend_from_slice(&control_batch(
                CONTROL_RAFT_CONF_CHANGE_V2,
                &e.data,
                epoch,
                -1,
            )),
        }
        let b = &mut out[start..];
        batch::set_base_offset(b, base);
        batch::set_partition_leader_epoch(b, epoch);
        Ok(())
    }
}

/// The check a follower runs, once, on the data of every entry it receives from its leader
/// (the transport's payload check of partition groups, see `Transport::register_with`): one
/// whole RecordBatch whose CRC-32C holds. A failure closes the connection it came on; nothing
/// of it reaches the log.
pub fn entry_payload_check(data: &[u8]) -> Result<(), &'static str> {
    match BatchHeader::parse_checked(data) {
        Ok(h) if h.size() == data.len() => Ok(()),
        Ok(_) => Err("entry holds more than one record batch"),
        Err(crate::protocol::batch::BatchError::BadCrc) => Err("record batch CRC mismatch"),
        Err(_) => Err("entry is not a record batch"),
    }
}

impl LogStore for RaftLog {
    fn raft_state(&self) -> RaftState {
        // The commit index as stored may be past a log restarted by a snapshot whose entries
        // have not arrived yet; it is never below the snapshot. Both bounds are safe (a lower
        // commit index is re-sent by the leader).
        let idx = self.index.borrow();
        let mut hard_state = self.hard.clone();
        hard_state.commit = hard_state
            .commit
            .min(idx.last_index())
            .max(idx.snapshot().index);
        RaftState {
            hard_state,
            conf_state: self.conf.clone(),
        }
    }

    fn first_index(&self) -> u64 {
        self.index.borrow().first_index()
    }

    fn last_index(&self) -> u64 {
        self.index.borrow().last_index()
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let idx = self.index.borrow();
        let snap = idx.snapshot();
        if index == snap.index {
            return Ok(snap.term);
        }
        if index < snap.index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        idx.get(index)
            .map(|m| m.term)
            .ok_or(raft::Error::Store(RaftStorageError::Unavailable))
    }

    fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> raft::Result<Vec<Entry>> {
        if low < self.index.borrow().first_index() {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        let mut out = Vec::new();
        let mut size = 0u64;
        for i in low..high {
            let m = self
                .index
                .borrow()
                .get(i)
                .ok_or(raft::Error::Store(RaftStorageError::Unavailable))?;
            let b = self.batch_of(i, m)?;
            size += b.len() as u64;
            if !out.is_empty() && max_size.is_some_and(|max| size > max) {
                break;
            }
            out.push(Self::entry_of(i, m.term, b));
        }
        Ok(out)
    }

    /// From memory only; entries that would need a disk read are fetched asynchronously
    /// (`take_fetch`) and the read is answered `LogTemporarilyUnavailable` until then.
    fn entries_for_send(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.index.borrow().first_index() {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        // The follower has everything below `low`: what was fetched for it there is done.
        {
            let mut p = self.prefetched.borrow_mut();
            let keep = p.split_off(&low);
            *p = keep;
        }
        let mut out = Vec::new();
        let mut size = 0u64;
        for i in low..high {
            let m = self
                .index
                .borrow()
                .get(i)
                .ok_or(raft::Error::Store(RaftStorageError::Unavailable))?;
            let Some(b) = self.batch_in_memory(i, m) else {
                if out.is_empty() {
                    self.fetch
                        .borrow_mut()
                        .push((i, high, max_size.unwrap_or(u64::MAX).max(1)));
                    return Err(raft::Error::Store(
                        RaftStorageError::LogTemporarilyUnavailable,
                    ));
                }
                break; // send what is in memory; the rest is asked for next
            };
            size += b.len() as u64;
            if !out.is_empty() && max_size.is_some_and(|max| size > max) {
                break;
            }
            out.push(Self::entry_of(i, m.term, b));
        }
        Ok(out)
    }

    fn take_fetch(&mut self) -> Option<sluice_raft::Fetch> {
        let ranges = std::mem::take(&mut *self.fetch.borrow_mut());
        if ranges.is_empty() {
            return None;
        }
        self.fetches.set(self.fetches.get() + ranges.len() as u64);
        let (log, index, prefetched) = (
            self.log.clone(),
            self.index.clone(),
            self.prefetched.clone(),
        );
        Some(Box::pin(async move {
            for (low, high, max) in ranges {
                fetch_range(&log, &index, &prefetched, low, high, max).await;
            }
        }))
    }

    /// The committed entries a `ready` is about to apply, fetched with the log's DMA reads when
    /// some of them (within `max_size` bytes from `low`) are neither fetched nor cached: a
    /// follower far behind, or a replica re-applying its log after a restart. Without it
    /// raft-rs would read them through `entries`, from the file on the executor.
    fn fetch_committed(
        &mut self,
        low: u64,
        high: u64,
        max_size: u64,
    ) -> Option<sluice_raft::Fetch> {
        if low < self.index.borrow().first_index() {
            return None;
        }
        let mut bytes = 0u64;
        let mut missing = None;
        for i in low..high {
            if bytes >= max_size {
                break;
            }
            let Some(m) = self.index.borrow().get(i) else {
                break;
            };
            match self.batch_in_memory(i, m) {
                Some(b) => bytes += b.len() as u64,
                None => {
                    missing = Some(i);
                    break;
                }
            }
        }
        let from = missing?;
        let (log, index, prefetched) = (
            self.log.clone(),
            self.index.clone(),
            self.prefetched.clone(),
        );
        let max = max_size - bytes;
        Some(Box::pin(async move {
            fetch_range(&log, &index, &prefetched, from, high, max).await;
        }))
    }

    /// A partition's snapshot is the index, term and offset where the log starts (the log is
    /// the state), with the idempotent producers as of that offset (`encode_snapshot_data`). A
    /// follower behind it restarts its log there, knowing those producers.
    fn snapshot(&self) -> Snapshot {
        let m = self.index.borrow().snapshot();
        let mut snap = Snapshot::default();
        if m.index == 0 {
            return snap;
        }
        let producers = self.log.producers_as_of(m.offset);
        let mut data = encode_snapshot_data(m, Some(&producers));
        if data.len() > 28 + SNAPSHOT_PRODUCERS_BYTES_MAX + 4 {
            tracing::warn!(
                dir = %self.dir.display(),
                producers = producers.producers.len(),
                "producer state too large for a partition snapshot: sent without it"
            );
            data = encode_snapshot(m);
        }
        snap.data = Bytes::from(data);
        let meta = snap.mut_metadata();
        meta.index = m.index;
        meta.term = m.term;
        meta.set_conf_state(self.conf.clone());
        snap
    }

    fn append(&mut self, entries: &[Entry]) -> io::Result<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let mut idx = self.index.borrow_mut();
        let last = idx.last_index();
        if first.index < idx.first_index() || first.index > last + 1 {
            return Err(io::Error::other(format!(
                "append at {} after last index {last}",
                first.index
            )));
        }
        if first.index <= last {
            // Committed entries are never cut (raft's log matching); the log cleaner rewrites
            // the batches of committed entries in place (`compact_replicated`), so a cut there
            // would put back bytes this replica has cleaned: refuse it.
            if first.index <= self.hard.commit {
                return Err(io::Error::other(format!(
                    "conflict at {} at or below the commit index {}",
                    first.index, self.hard.commit
                )));
            }
            // Raft's conflict truncation is Kafka's: the log is cut at the first batch of the
            // conflicting index.
            let cut = idx.get(first.index).expect("checked above").base;
            let keep = (first.index - idx.first_index()) as usize;
            idx.entries.truncate(keep);
            let _ = self.prefetched.borrow_mut().split_off(&first.index);
            self.ops.push(Op::Truncate(cut));
        }
        let mut next = idx.log_end();
        // Control batches (no-op, conf change) are small; data entries are copied as they are.
        let capacity: usize = entries.iter().map(|e| e.data.len() + 128).sum();
        let mut staged = BytesMut::with_capacity(capacity);
        for e in entries {
            let start = staged.len();
            Self::stage_batch(e, next, &mut staged)?;
            let h = BatchHeader::parse(&staged[start..])
                .map_err(|err| io::Error::other(err.to_string()))?;
            idx.entries.push_back(EntryMeta {
                term: e.term,
                base: next,
                last: h.last_offset(),
            });
            next = h.last_offset().next();
        }
        self.ops.push(Op::Append(staged));
        Ok(())
    }

    fn set_hard_state(&mut self, hs: &HardState) -> io::Result<()> {
        if hs.term != self.hard.term || hs.vote != self.hard.vote {
            self.hard_dirty = true;
        }
        self.hard = hs.clone();
        Ok(())
    }

    /// The hard-state file (with the voters) is written on the blocking pool, durable when the
    /// future resolves; the group's loop awaits it before it handles anything. Once per
    /// replica, when its group starts on an empty log (a new partition).
    fn bootstrap(&mut self, cs: &ConfState) -> Persist {
        self.conf = cs.clone();
        // Written by this future, with any term or vote set before.
        self.hard_dirty = false;
        let (dir, hs, cs) = (self.dir.clone(), self.hard.clone(), self.conf.clone());
        Box::pin(async move {
            glommio::executor()
                .spawn_blocking(move || write_hard_state(&dir, &hs, &cs))
                .await
        })
    }

    fn persist(&mut self) -> Persist {
        let ops = std::mem::take(&mut self.ops);
        let log = self.log.clone();
        let hooks = self.on_truncate.clone();
        let hard = std::mem::take(&mut self.hard_dirty)
            .then(|| (self.dir.clone(), self.hard.clone(), self.conf.clone()));
        Box::pin(async move {
            let failed = |e: crate::storage::StorageError| io::Error::other(e.to_string());
            let mut appended = false;
            for op in ops {
                match op {
                    Op::Truncate(at) => {
                        log.truncate_to(at).await.map_err(failed)?;
                        for h in hooks.borrow().iter() {
                            h(at);
                        }
                    }
                    Op::Append(b) => {
                        log.append_replicated_checked(b, Durability::Accepted)
                            .await
                            .map_err(failed)?;
                        appended = true;
                    }
                    Op::Restart(m, producers) => {
                        restart_log(&log, m, producers).await?;
                        for h in hooks.borrow().iter() {
                            h(m.offset);
                        }
                    }
                }
            }
            if appended {
                log.sync_all().await.map_err(failed)?;
            }
            if let Some((dir, hs, cs)) = hard {
                // Off the executor. Durable before this future resolves, so before the votes
                // and append answers that depend on it leave. The driver awaits each persist
                // before the next one starts: one write of this file in flight at a time.
                glommio::executor()
                    .spawn_blocking(move || {
                        crate::fault::delay_point("hard_state");
                        write_hard_state(&dir, &hs, &cs)
                    })
                    .await?;
            }
            Ok(())
        })
    }

    /// A snapshot from the leader (this replica is behind the leader's log start, or its log
    /// diverges there): the log restarts empty at the snapshot's offset. The index changes at
    /// once; the files change in the `persist` of the same loop pass, before any entry after
    /// the snapshot is appended and before the answer to the leader leaves.
    fn install_snapshot(&mut self, snapshot: Snapshot) -> Persist {
        let staged = self.stage_snapshot(snapshot);
        Box::pin(std::future::ready(staged))
    }
}

impl RaftLog {
    /// The in-memory part of `install_snapshot`, and the restart staged for `persist`.
    fn stage_snapshot(&mut self, snapshot: Snapshot) -> io::Result<()> {
        let md = snapshot.get_metadata();
        let (m, producers) = decode_snapshot_data(&snapshot.data)
            .filter(|(m, _)| m.index == md.index && m.term == md.term)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "partition snapshot malformed")
            })?;
        let mut idx = self.index.borrow_mut();
        if m.index <= idx.snapshot().index {
            return Ok(());
        }
        idx.entries.clear();
        idx.snap = m;
        self.prefetched.borrow_mut().clear();
        self.hard.commit = self.hard.commit.max(m.index);
        let cs = md.get_conf_state();
        if !cs.voters.is_empty() && *cs != self.conf {
            self.conf = cs.clone();
            self.hard_dirty = true;
        }
        self.ops.push(Op::Restart(m, producers));
        Ok(())
    }
}

/// Restarts `log` empty at `m.offset`, the snapshot's: every batch goes (a conflict truncation
/// to the log start), then one snapshot batch spanning up to the offset records the snapshot
/// (synced), then the raft snapshot file and the log start follow it. A crash before the
/// snapshot batch is durable reopens to the previous snapshot (and the leader sends its
/// snapshot again); after it, `RaftLog::open` finds the batch and finishes the rest.
async fn restart_log(
    log: &PartitionLog,
    m: SnapshotMeta,
    producers: Option<ProducerState>,
) -> io::Result<()> {
    let failed = |e: crate::storage::StorageError| io::Error::other(e.to_string());
    log.truncate_to(log.log_start_offset())
        .await
        .map_err(failed)?;
    let end = log.log_end_offset();
    if end < m.offset {
        log.append_replicated(
            snapshot_batch(end, m, producers.as_ref())?,
            Durability::Synced,
        )
        .await
        .map_err(failed)?;
        // The producers as of the snapshot, recorded in that batch (durable with it): now in
        // the log's memory and its producer snapshot file, before any entry after it.
        if let Some(p) = producers {
            log.install_producers(p).await.map_err(failed)?;
        }
    }
    write_snapshot_meta(log.dir(), m).await?;
    if log.log_start_offset() < m.offset {
        log.delete_records_before(m.offset).await.map_err(failed)?;
    }
    Ok(())
}

/// Reads entries `[low, high)`, at most `max` bytes of them, into `prefetched` (see
/// `RaftLog::take_fetch`). Stops early on a read error (logged; the waiting read asks again) or
/// when a truncation changed the log meanwhile.
async fn fetch_range(
    log: &PartitionLog,
    index: &RefCell<EntryIndex>,
    prefetched: &RefCell<std::collections::BTreeMap<u64, Bytes>>,
    low: u64,
    high: u64,
    max: u64,
) {
    let Some(start) = index.borrow().get(low) else {
        return;
    };
    let mut i = low;
    let mut at = start.base;
    let mut bytes = 0u64;
    while i < high && bytes < max {
        let r = match log
            .read(crate::storage::ReadOptions {
                start: at,
                bytes_max: (max - bytes).min(1 << 20) as u32,
            })
            .await
        {
            Ok(r) if !r.batches.is_empty() => r,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(dir = %log.dir().display(), error = %e, "entry fetch failed");
                return;
            }
        };
        for b in r.batches {
            let Ok(h) = BatchHeader::parse(&b) else {
                return;
            };
            // A truncation ran meanwhile: the indexes no longer match these batches.
            if index.borrow().get(i).map(|m| m.base) != Some(h.base_offset()) {
                return;
            }
            at = h.last_offset().next();
            bytes += b.len() as u64;
            prefetched.borrow_mut().insert(i, b);
            i += 1;
            if i >= high || bytes >= max {
                break;
            }
        }
        let mut p = prefetched.borrow_mut();
        let mut held: usize = p.values().map(|v| v.len()).sum();
        while held > PREFETCH_BYTES_MAX {
            held -= p.pop_first().map_or(0, |(_, v)| v.len());
        }
    }
}

fn encode_hard_state(hs: &HardState, cs: &ConfState) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [hs.term, hs.vote, hs.commit] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    for list in [&cs.voters, &cs.learners] {
        v.extend_from_slice(&(list.len() as u32).to_be_bytes());
        for id in list {
            v.extend_from_slice(&id.to_be_bytes());
        }
    }
    let crc = crc32fast::hash(&v);
    v.extend_from_slice(&crc.to_be_bytes());
    v
}

fn decode_hard_state(b: &[u8]) -> Option<(HardState, ConfState)> {
    let (body, crc) = b.split_at(b.len().checked_sub(4)?);
    if crc32fast::hash(body).to_be_bytes() != crc {
        return None;
    }
    let mut at = 0usize;
    let u64_at = |at: &mut usize| -> Option<u64> {
        let v = u64::from_be_bytes(body.get(*at..*at + 8)?.try_into().ok()?);
        *at += 8;
        Some(v)
    };
    let mut hs = HardState::default();
    hs.term = u64_at(&mut at)?;
    hs.vote = u64_at(&mut at)?;
    hs.commit = u64_at(&mut at)?;
    let mut cs = ConfState::default();
    for which in 0..2 {
        let n = u32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?) as usize;
        at += 4;
        if n > MEMBERS_MAX || n * 8 > body.len() - at {
            return None;
        }
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(u64_at(&mut at)?);
        }
        if which == 0 {
            cs.voters = ids;
        } else {
            cs.learners = ids;
        }
    }
    (at == body.len()).then_some((hs, cs))
}

fn read_hard_state(dir: &Path) -> io::Result<(HardState, ConfState)> {
    match std::fs::read(dir.join(HARD_STATE_FILE)) {
        Ok(b) => decode_hard_state(&b).ok_or_else(|| {
            // Written atomically: damage is not a torn write, and a replica that forgot its
            // vote could vote twice in one term.
            io::Error::new(io::ErrorKind::InvalidData, "raft hard-state file damaged")
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(e),
    }
}

/// Temp file, fsync, rename, directory fsync. Blocks the calling thread: `persist` (term or
/// vote changed: elections, not per append) and `bootstrap` (once per replica) run it on the
/// blocking pool.
fn write_hard_state(dir: &Path, hs: &HardState, cs: &ConfState) -> io::Result<()> {
    let tmp = dir.join(format!("{HARD_STATE_FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&encode_hard_state(hs, cs))?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, dir.join(HARD_STATE_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tests::{batch as data_batch, run, small_config};
    use crate::storage::BatchCache;

    fn entry(index: u64, term: u64, kind: EntryType, data: &[u8]) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.set_entry_type(kind);
        e.data = Bytes::copy_from_slice(data);
        e
    }

    async fn open_store(dir: &Path) -> (Rc<PartitionLog>, RaftLog) {
        // No cache: every read of an entry goes to the segment file.
        let log = PartitionLog::open(dir, small_config(), BatchCache::new(0))
            .await
            .unwrap();
        let store = RaftLog::open(log.clone()).await.unwrap();
        (log, store)
    }

    #[test]
    fn a_follower_checks_each_received_batch_once_and_refuses_a_damaged_one() {
        let good = data_batch(3, 50, 1000, 1);
        assert_eq!(entry_payload_check(&good), Ok(()));
        // One bit flipped anywhere the CRC covers (a record byte here): refused.
        let mut flipped = good.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x10;
        assert_eq!(
            entry_payload_check(&flipped),
            Err("record batch CRC mismatch")
        );
        // Not one whole batch: two, a cut one, garbage.
        let two = [&good[..], &good[..]].concat();
        assert!(entry_payload_check(&two).is_err());
        assert!(entry_payload_check(&good[..good.len() - 1]).is_err());
        assert!(entry_payload_check(b"not a batch").is_err());
        // Partition groups register this check: their frames carry entry data outside the
        // frame CRC, so this check is the one a follower's entries pass (see
        // `sluice_raft::transport`, and its test of a damaged entry refused before the log).
    }

    /// A change of term or vote is written on the blocking pool: queued behind a job that
    /// holds the pool's thread, `persist` is still pending after a poll and the file still
    /// holds the old state; released, it resolves with the new term and vote on disk.
    #[test]
    fn a_new_term_is_written_on_the_blocking_pool_and_durable_when_persist_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let (log, mut store) = open_store(&d).await;
            let mut hs = HardState::default();
            hs.term = 7;
            hs.vote = 3;
            store.set_hard_state(&hs).unwrap();
            let (release, released) = std::sync::mpsc::channel::<()>();
            let ahead = glommio::executor().spawn_blocking(move || {
                released.recv().unwrap();
            });
            let mut persisted = store.persist();
            assert!(
                futures_lite::future::poll_once(&mut persisted)
                    .await
                    .is_none(),
                "the hard state was written on the executor"
            );
            assert_eq!(read_hard_state(log.dir()).unwrap().0.term, 0);
            release.send(()).unwrap();
            persisted.await.unwrap();
            ahead.await;
            let (on_disk, _) = read_hard_state(log.dir()).unwrap();
            assert_eq!((on_disk.term, on_disk.vote), (7, 3));
            drop(store);
            log.close().await.unwrap();
        });
    }

    /// A new replica's bootstrap writes its voters on the blocking pool: in memory at once,
    /// but behind a job that holds the pool's thread the future is still pending after a poll
    /// and no hard-state file exists; released, it resolves with the voters on disk.
    #[test]
    fn a_bootstrap_is_written_on_the_blocking_pool_and_durable_when_it_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let (log, mut store) = open_store(&d).await;
            let mut cs = ConfState::default();
            cs.voters = vec![1, 2, 3];
            let (release, released) = std::sync::mpsc::channel::<()>();
            let ahead = glommio::executor().spawn_blocking(move || {
                released.recv().unwrap();
            });
            let mut durable = store.bootstrap(&cs);
            assert!(
                futures_lite::future::poll_once(&mut durable)
                    .await
                    .is_none(),
                "the bootstrap was written on the executor"
            );
            assert!(!log.dir().join(HARD_STATE_FILE).exists());
            assert_eq!(store.raft_state().conf_state.voters, vec![1, 2, 3]);
            release.send(()).unwrap();
            durable.await.unwrap();
            ahead.await;
            assert_eq!(read_hard_state(log.dir()).unwrap().1.voters, vec![1, 2, 3]);
            drop(store);
            log.close().await.unwrap();
        });
    }

    /// Committed entries neither fetched nor cached are fetched with the log's asynchronous
    /// reads before raft-rs reads them (`fetch_committed`): none is in memory until the fetch
    /// resolves, all within the byte bound are after, and a second call has nothing to fetch.
    #[test]
    fn committed_entries_on_disk_are_fetched_asynchronously_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let (log, mut store) = open_store(&d).await;
            let es: Vec<Entry> = (1..=5)
                .map(|i| entry(i, 1, EntryType::EntryNormal, &data_batch(2, 100, 1000, 1)))
                .collect();
            store.append(&es).unwrap();
            store.persist().await.unwrap();
            drop(store);
            let mut store = RaftLog::open(log.clone()).await.unwrap();
            let in_memory = |store: &RaftLog| -> Vec<u64> {
                (1..=5)
                    .filter(|&i| {
                        let m = store.index.borrow().get(i).unwrap();
                        store.batch_in_memory(i, m).is_some()
                    })
                    .collect()
            };
            // At least one entry, however small the bound.
            let fetch = store.fetch_committed(1, 6, 1).expect("entry 1 is on disk");
            assert!(in_memory(&store).is_empty());
            fetch.await;
            assert_eq!(in_memory(&store), vec![1]);
            let fetch = store
                .fetch_committed(1, 6, u64::MAX)
                .expect("2..=5 are on disk");
            fetch.await;
            assert_eq!(in_memory(&store), vec![1, 2, 3, 4, 5]);
            assert!(store.fetch_committed(1, 6, u64::MAX).is_none());
            assert_eq!(store.entries(1, 6, None).unwrap().len(), 5);
            drop(store);
            log.close().await.unwrap();
        });
    }

    /// Opening a replica's raft state reads its hard-state and snapshot files on the blocking
    /// pool: behind a job that holds the pool's thread, an open over a damaged hard-state file
    /// is still pending after a poll; released, it fails.
    #[test]
    fn a_replica_reads_its_raft_files_on_the_blocking_pool() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let log = PartitionLog::open(&d, small_config(), BatchCache::new(0))
                .await
                .unwrap();
            std::fs::write(log.dir().join(HARD_STATE_FILE), b"damaged").unwrap();
            let (release, released) = std::sync::mpsc::channel::<()>();
            let ahead = glommio::executor().spawn_blocking(move || {
                released.recv().unwrap();
            });
            let mut opened = Box::pin(RaftLog::open(log.clone()));
            assert!(
                futures_lite::future::poll_once(&mut opened).await.is_none(),
                "the raft files were read on the executor"
            );
            release.send(()).unwrap();
            let err = opened.await.err().expect("a damaged hard-state file");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            ahead.await;
            log.close().await.unwrap();
        });
    }

    #[test]
    fn entries_are_stamped_batches_truncated_on_conflict_and_rebuilt_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let (log, mut store) = open_store(&d).await;
            let produced = data_batch(3, 50, 1000, 1);
            store
                .append(&[
                    entry(1, 1, EntryType::EntryNormal, b""),
                    entry(2, 1, EntryType::EntryNormal, &produced),
                    entry(3, 2, EntryType::EntryConfChangeV2, b"cc"),
                ])
                .unwrap();
            let mut hs = HardState::default();
            hs.term = 2;
            hs.vote = 1;
            store.set_hard_state(&hs).unwrap();
            store.persist().await.unwrap();
            assert_eq!(log.log_end_offset(), Offset(5), "1 + 3 + 1 records");
            assert_eq!((store.last_index(), store.term(2).unwrap()), (3, 1));
            assert_eq!(store.term(3).unwrap(), 2);
            assert!(store.term(4).is_err());
            let es = store.entries(1, 4, None).unwrap();
            assert_eq!(es.len(), 3);
            assert!(es[0].data.is_empty());
            let h = BatchHeader::parse_checked(&es[1].data).unwrap();
            assert_eq!((h.base_offset(), h.last_offset()), (Offset(1), Offset(3)));
            assert_eq!(h.partition_leader_epoch(), 1);
            assert_eq!(
                &es[1].data[batch::HEADER_BYTES..],
                &produced[batch::HEADER_BYTES..]
            );
            assert_eq!(es[2].get_entry_type(), EntryType::EntryConfChangeV2);
            assert_eq!(&es[2].data[..], b"cc");
            // At least one entry, however small the limit.
            assert_eq!(store.entries(1, 4, Some(1)).unwrap().len(), 1);

            // A conflicting entry at index 3 replaces it, cutting the log at its batch.
            let cut = Rc::new(std::cell::Cell::new(None));
            let seen = cut.clone();
            store
                .truncate_hooks()
                .borrow_mut()
                .push(Box::new(move |o| seen.set(Some(o))));
            let other = data_batch(2, 50, 2000, 2);
            store
                .append(&[entry(3, 3, EntryType::EntryNormal, &other)])
                .unwrap();
            store.persist().await.unwrap();
            assert_eq!(cut.get(), Some(Offset(4)));
            assert_eq!(log.log_end_offset(), Offset(6));
            assert_eq!(store.term(3).unwrap(), 3);
            assert_eq!(log.leader_epochs(), vec![(1, Offset(0)), (3, Offset(4))]);
            // A gap is refused.
            assert!(store
                .append(&[entry(5, 3, EntryType::EntryNormal, &other)])
                .is_err());

            drop(store);
            log.close().await.unwrap();
            drop(log);
            let (log, store) = open_store(&d).await;
            assert_eq!((store.last_index(), store.term(3).unwrap()), (3, 3));
            assert_eq!(store.raft_state().hard_state.term, 2);
            assert_eq!(store.raft_state().hard_state.vote, 1);
            let idx = store.index();
            assert_eq!(idx.borrow().offset_after(2), Offset(4));
            assert_eq!(idx.borrow().log_end(), Offset(6));
            log.close().await.unwrap();
        });
    }

    /// Reads every batch of `log` from `from` on, concatenated.
    async fn bytes_from(log: &PartitionLog, from: Offset) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = from;
        while at < log.log_end_offset() {
            let r = log
                .read(crate::storage::ReadOptions {
                    start: at,
                    bytes_max: 1 << 20,
                })
                .await
                .unwrap();
            for b in &r.batches {
                at = BatchHeader::parse(b).unwrap().last_offset().next();
                out.extend_from_slice(b);
            }
        }
        out
    }

    #[test]
    fn a_compacted_log_serves_a_snapshot_that_restarts_a_follower_behind_it() {
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (dirs.0.path().to_path_buf(), dirs.1.path().to_path_buf());
        run(async move {
            let (leader_log, mut leader) = open_store(&a).await;
            // Entries 1 and 2 (offsets 0..=5, below the snapshot) are batches of idempotent
            // producer 7; the others plain batches of three records too.
            let produced: Vec<Vec<u8>> = (0u8..6)
                .map(|i| match i {
                    0 | 1 => crate::storage::tests::idempotent_batch(7, 0, 3 * i as i32, 3),
                    _ => data_batch(3, 50, 1000, i),
                })
                .collect();
            let retry = BatchHeader::parse(&produced[1]).unwrap();
            let original = crate::storage::ProducerCheck::Duplicate(crate::storage::BatchMeta {
                first_seq: 3,
                last_seq: 5,
                base: Offset(3),
                last: Offset(5),
            });
            let entries: Vec<Entry> = produced
                .iter()
                .enumerate()
                .map(|(i, d)| entry(i as u64 + 1, 1, EntryType::EntryNormal, d))
                .collect();
            leader.append(&entries).unwrap();
            leader.persist().await.unwrap();
            // A follower that holds a divergent entry 1 only.
            let (follower_log, mut follower) = open_store(&b).await;
            follower
                .append(&[entry(
                    1,
                    0,
                    EntryType::EntryNormal,
                    &data_batch(2, 50, 5, 9),
                )])
                .unwrap();
            follower.persist().await.unwrap();

            // The leader's log start moves to offset 8 (inside entry 3, offsets 6..=8):
            // compaction to entry 2, the log start at 6.
            let idx = leader.index();
            let snap = idx.borrow().compaction_point(Offset(8), 6).unwrap();
            assert_eq!(
                snap,
                SnapshotMeta {
                    index: 2,
                    term: 1,
                    offset: Offset(6)
                }
            );
            write_snapshot_meta(&a, snap).await.unwrap();
            leader_log.delete_records_before(snap.offset).await.unwrap();
            idx.borrow_mut().compact(snap);
            assert_eq!((leader.first_index(), leader.last_index()), (3, 6));
            assert_eq!(idx.borrow().index_at(Offset(6)), Some(3));
            assert_eq!(idx.borrow().index_at(Offset(7)), None);
            assert_eq!(leader.term(2).unwrap(), 1);
            assert!(leader.term(1).is_err());
            assert!(leader.entries(2, 4, None).is_err());
            let s = leader.snapshot();
            assert_eq!((s.get_metadata().index, s.get_metadata().term), (2, 1));

            // The follower installs it: its log restarts empty at offset 6, then takes the
            // entries after the snapshot, byte-identical to the leader's from there.
            follower.install_snapshot(s).await.unwrap();
            follower.persist().await.unwrap();
            assert_eq!(
                (
                    follower_log.log_start_offset(),
                    follower_log.log_end_offset()
                ),
                (Offset(6), Offset(6))
            );
            assert_eq!((follower.first_index(), follower.last_index()), (3, 2));
            // It knows producer 7 from the snapshot: a retry of its last batch is a duplicate
            // at the original offsets, the next sequence follows.
            assert_eq!(follower_log.check_producer(&retry, &[]).unwrap(), original);
            follower.append(&entries[2..]).unwrap();
            follower.persist().await.unwrap();
            assert_eq!(
                bytes_from(&follower_log, Offset(6)).await,
                bytes_from(&leader_log, Offset(6)).await
            );

            // Reopened, both know where their raft logs start.
            drop((leader, follower));
            leader_log.close().await.unwrap();
            follower_log.close().await.unwrap();
            drop((leader_log, follower_log));
            for d in [&a, &b] {
                let (log, store) = open_store(d).await;
                assert_eq!((store.first_index(), store.last_index()), (3, 6));
                assert_eq!(store.term(2).unwrap(), 1);
                assert_eq!(store.index().borrow().log_end(), Offset(18));
                assert_eq!(log.log_start_offset(), Offset(6));
                assert_eq!(log.check_producer(&retry, &[]).unwrap(), original);
                log.close().await.unwrap();
            }

            // A crash after the snapshot batch of an install and before the snapshot file and
            // the log start: the reopened log finds the batch and finishes the install.
            let c = tempfile::tempdir().unwrap();
            let (log, store) = open_store(c.path()).await;
            let snap = SnapshotMeta {
                index: 2,
                term: 1,
                offset: Offset(6),
            };
            let mut producers = crate::storage::ProducerState::default();
            if let crate::storage::ProducerCheck::Duplicate(m) = original {
                producers.apply(7, 0, m);
            }
            let producers = producers.as_of(snap.offset);
            log.append_replicated(
                snapshot_batch(Offset(0), snap, Some(&producers)).unwrap(),
                Durability::Synced,
            )
            .await
            .unwrap();
            drop(store);
            log.close().await.unwrap();
            drop(log);
            let (log, store) = open_store(c.path()).await;
            assert_eq!((store.first_index(), store.last_index()), (3, 2));
            assert_eq!(store.term(2).unwrap(), 1);
            assert_eq!(log.log_start_offset(), Offset(6));
            assert_eq!(read_snapshot_meta(c.path()).unwrap(), snap);
            assert_eq!(log.check_producer(&retry, &[]).unwrap(), original);
            log.close().await.unwrap();
        });
    }

    #[test]
    fn snapshot_data_is_checked_before_it_is_trusted() {
        let m = SnapshotMeta {
            index: 4,
            term: 2,
            offset: Offset(100),
        };
        let mut p = crate::storage::ProducerState::default();
        let b = crate::storage::tests::idempotent_batch(7, 1, 0, 3);
        p.replay(&BatchHeader::parse(&b).unwrap());
        let good = encode_snapshot_data(m, Some(&p));
        assert_eq!(decode_snapshot_data(&good), Some((m, Some(p.clone()))));
        assert_eq!(
            decode_snapshot_data(&encode_snapshot(m)),
            Some((m, None)),
            "metadata alone"
        );
        // Every truncation and every flipped bit is refused, never a panic.
        for n in 0..good.len() {
            if n != 28 {
                assert_eq!(decode_snapshot_data(&good[..n]), None, "cut at {n}");
            }
        }
        for i in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert_eq!(decode_snapshot_data(&bad), None, "bit {i}");
        }
        // Well-formed but inconsistent: covering other offsets than the snapshot's, or a batch
        // at or past its offset.
        let mut other = encode_snapshot(m);
        let body = crate::storage::encode_producers(Offset(99), &p);
        other.extend_from_slice(&body);
        other.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        assert_eq!(decode_snapshot_data(&other), None);
        let small = SnapshotMeta {
            offset: Offset(2),
            ..m
        };
        assert_eq!(
            decode_snapshot_data(&encode_snapshot_data(small, Some(&p))),
            None
        );
        // A huge declared producer count with few bytes behind it, CRC fixed up.
        let mut huge = encode_snapshot(m);
        let mut body = Offset(100).0.to_be_bytes().to_vec();
        body.extend_from_slice(&u32::MAX.to_be_bytes());
        huge.extend_from_slice(&body);
        huge.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        assert_eq!(decode_snapshot_data(&huge), None);
        // Past the size bound, even if well-formed.
        let mut big = encode_snapshot(m);
        let body = vec![0u8; SNAPSHOT_PRODUCERS_BYTES_MAX + 1];
        big.extend_from_slice(&body);
        big.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        assert_eq!(decode_snapshot_data(&big), None);
    }

    #[test]
    fn hard_state_round_trips_and_refuses_damage() {
        let mut hs = HardState::default();
        hs.term = 7;
        hs.vote = 2;
        hs.commit = 40;
        let mut cs = ConfState::default();
        cs.voters = vec![1, 2, 3];
        let b = encode_hard_state(&hs, &cs);
        assert_eq!(decode_hard_state(&b), Some((hs.clone(), cs.clone())));
        let mut bad = b.clone();
        bad[3] ^= 1;
        assert_eq!(decode_hard_state(&bad), None);
        assert_eq!(decode_hard_state(&b[..5]), None);
    }

    /// A keyed batch of one record per key (`None`: a tombstone).
    fn keyed(recs: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut b = crate::protocol::builder::BatchBuilder::new(Default::default());
        for (k, v) in recs {
            b.push(&crate::protocol::builder::Record {
                key: Some(k.as_bytes()),
                value: v.map(str::as_bytes),
                headers: &[],
                timestamp_ms: 1_000,
            });
        }
        b.finish().expect("batch")
    }

    async fn open_compacted(dir: &Path) -> (Rc<PartitionLog>, RaftLog) {
        let cfg = crate::storage::LogConfig {
            segment_bytes: 2 << 10,
            compaction: Some(crate::storage::CompactionConfig {
                min_cleanable_dirty_ratio: 0.0,
                delete_retention_ms: 0,
                ..Default::default()
            }),
            ..small_config()
        };
        let log = PartitionLog::open(dir, cfg, BatchCache::new(0))
            .await
            .unwrap();
        let store = RaftLog::open(log.clone()).await.unwrap();
        (log, store)
    }

    /// Every entry's (index, term, base, last) as the store sees it.
    fn index_of(store: &RaftLog) -> Vec<(u64, EntryMeta)> {
        let idx = store.index();
        let idx = idx.borrow();
        (idx.first_index()..=idx.last_index())
            .map(|i| (i, idx.get(i).expect("held")))
            .collect()
    }

    /// The cleaner over a replicated log keeps every entry: after a pass (shells for the
    /// batches that kept nothing, raft's control batches verbatim) the store serves the same
    /// entries (index, term, offsets, kinds), rebuilds the same index at open, and a follower
    /// that receives the cleaned entries appends them (shells included) at the same offsets.
    #[test]
    fn a_cleaned_log_keeps_its_entries_and_a_follower_appends_them() {
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (dirs.0.path().to_path_buf(), dirs.1.path().to_path_buf());
        run(async move {
            let (log, mut store) = open_compacted(&a).await;
            let value = "v".repeat(300);
            let mut entries = vec![entry(1, 1, EntryType::EntryNormal, b"")];
            for i in 0..40u64 {
                let term = 1 + i / 20;
                let e = match i {
                    20 => entry(2 + i, term, EntryType::EntryConfChangeV2, b"cc"),
                    39 => entry(2 + i, term, EntryType::EntryNormal, &keyed(&[("k1", None)])),
                    _ => {
                        let k = format!("k{}", i % 4);
                        let v = format!("{i}-{value}");
                        entry(
                            2 + i,
                            term,
                            EntryType::EntryNormal,
                            &keyed(&[(&k, Some(&v)), ("k-last", Some(&v))]),
                        )
                    }
                };
                entries.push(e);
            }
            // One entry per persist, so the log rolls between them.
            for e in &entries {
                store.append(std::slice::from_ref(e)).unwrap();
                store.persist().await.unwrap();
            }
            let mut hs = HardState::default();
            hs.term = 2;
            hs.commit = store.last_index();
            store.set_hard_state(&hs).unwrap();
            store.persist().await.unwrap();
            assert!(log.segment_count() > 4, "{} segments", log.segment_count());
            let before = index_of(&store);
            let size = log.size_bytes();
            let rep = log
                .compact_replicated(10_000, log.log_end_offset())
                .await
                .unwrap()
                .expect("a pass");
            assert!(rep.batches_emptied > 20, "{rep:?}");
            assert!(
                log.size_bytes() < size / 2,
                "{} of {size}",
                log.size_bytes()
            );
            assert_eq!(index_of(&store), before);
            let last = store.last_index();
            let served = store.entries(1, last + 1, None).unwrap();
            assert_eq!(served.len() as u64, last);
            assert!(served[0].data.is_empty(), "the new-term entry");
            assert_eq!(served[21].get_entry_type(), EntryType::EntryConfChangeV2);
            assert_eq!(&served[21].data[..], b"cc");
            let mut shells = 0;
            for (e, (i, m)) in served.iter().zip(&before).skip(1) {
                assert_eq!((e.index, e.term), (*i, m.term));
                if e.get_entry_type() != EntryType::EntryNormal {
                    continue;
                }
                let h = BatchHeader::parse_checked(&e.data).unwrap();
                assert_eq!((h.base_offset(), h.last_offset()), (m.base, m.last));
                assert_eq!(h.partition_leader_epoch() as u64, m.term);
                shells += usize::from(h.record_count() == 0);
            }
            assert_eq!(shells as u64, rep.batches_emptied);
            let cleaned = bytes_from(&log, Offset(0)).await;

            // A follower receives the cleaned entries, as raft sends them.
            let (flog, mut follower) = open_compacted(&b).await;
            for chunk in served.chunks(7) {
                follower.append(chunk).unwrap();
                follower.persist().await.unwrap();
            }
            assert_eq!(index_of(&follower), before);
            assert_eq!(bytes_from(&flog, Offset(0)).await, cleaned);
            drop(follower);
            flog.close().await.unwrap();

            // Reopened, the leader's store rebuilds the same index from the cleaned log.
            drop(store);
            log.close().await.unwrap();
            drop(log);
            let (log, store) = open_compacted(&a).await;
            assert_eq!(index_of(&store), before);
            assert_eq!(bytes_from(&log, Offset(0)).await, cleaned);
            // A conflict at a committed index is refused.
            let mut store = store;
            let mut hs = HardState::default();
            hs.term = 3;
            hs.commit = 30;
            store.set_hard_state(&hs).unwrap();
            assert!(store
                .append(&[entry(30, 3, EntryType::EntryNormal, b"")])
                .is_err());
            log.close().await.unwrap();
        });
    }
}
