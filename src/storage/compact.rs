//! Log compaction (`cleanup.policy=compact`): the cleaner keeps the latest record of every key in
//! the sealed segments of a log, drops tombstones `delete.retention.ms` after a pass first kept
//! them (KIP-534), drops aborted transactions' data and spent transaction markers, and swaps the
//! rewritten segments in crash-safely. Runs on the partition's shard, in the shard's cleaner task
//! (one log at a time per shard); it never touches the active segment, so appends never wait for
//! it. Owns [`CleanerState`] (the first dirty offset, the aborted transactions cleared, the next
//! delete horizon, and whether a pass runs).
//!
//! A pass:
//! 1. **Plan.** The sealed segments older than `min.compaction.lag.ms` (by their largest
//!    timestamp) and below the last stable offset are cleanable. The part of them at or past the
//!    first dirty offset (the end of the previous pass) is dirty; the pass runs when dirty
//!    bytes / cleanable bytes reach
//!    `min.cleanable.dirty.ratio`, or when the first dirty segment's records are all older than
//!    `max.compaction.lag.ms`, or once the earliest delete horizon a pass stamped has passed.
//! 2. **Map.** The dirty batches are read in offset order into a key -> latest offset map bounded
//!    by [`CLEANER_MAP_BYTES_MAX`]; when it is full the map ends at a batch boundary (`map_end`)
//!    and the rest stays dirty for the next pass.
//! 3. **Rewrite.** Every cleanable segment from the log start up to the one holding `map_end` is
//!    rewritten into `<base>.log.cleaned` files, batch by batch in offset order: a record is
//!    dropped if the map holds a later offset for its key, if it has no key (Kafka's cleaner
//!    does the same), or if it is a tombstone (null value) in a batch whose delete horizon
//!    (KIP-534) has passed. A pass that keeps a tombstone in a batch without a horizon stamps
//!    one, now + `delete.retention.ms` (attribute bit 6, the base timestamp replaced and the
//!    records' timestamp deltas re-encoded against it, the CRC recomputed). Records at or past
//!    `map_end` are kept. Batches of aborted transactions (by the aborted-transaction index) are
//!    dropped; a COMMIT or ABORT marker is dropped once its transaction has no data left and its
//!    own delete horizon, stamped the same way when it first could go, has passed (ABORT markers
//!    only in offset order, so that the aborted index can forget them by one offset). Other
//!    control batches are kept. A batch that keeps every record is copied verbatim; one that
//!    keeps none is left out (its offsets become a gap no later batch reuses); otherwise it is
//!    rebuilt from the kept records' bytes with its base offset, `lastOffsetDelta`, max
//!    timestamp and producer fields unchanged, so every surviving record keeps its offset
//!    (recompressed only then, with its own codec). Consecutive segments whose original sizes
//!    fit in `segment.bytes` are merged into one output named after the first.
//! 4. **Swap** (synchronous, so no append, roll or retention interleaves): check that the
//!    segments are still the ones read, write the swap marker [`SWAP_FILE`] (old and new bases,
//!    the checkpoint to be), replace the segments in memory (and forget the cleared aborted
//!    transactions), remove the old index files and the old segments that are not outputs,
//!    rename each `.cleaned` file over its base, fsync the directory, write the new index files
//!    and the checkpoint, remove the marker. [`recover`] (at open)
//!    finishes a swap whose marker it finds and removes every `.cleaned` file otherwise, so a
//!    crash at any point leaves either the old segments or the new ones, never both.
//!
//! **Replicated partitions** ([`PartitionLog::compact_replicated`]): every batch is a raft
//! entry whose index is its ordinal in the log, so a pass never leaves a batch out. A batch
//! that keeps no record becomes an empty shell ([`shell`]: same base offset,
//! `lastOffsetDelta`, producer fields, leader epoch, zero records), transaction markers and
//! the raft's own control batches stay verbatim, and the pass stays below the offset the
//! caller says is committed and applied. Offsets, ordinals and terms are unchanged by a pass.

#[cfg(test)]
use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::Bytes;

use crate::protocol::batch::{self, BatchHeader, HEADER_BYTES};
use crate::protocol::compression::{self, Compression, DECOMPRESSED_BATCH_BYTES_MAX};
use crate::protocol::records::RECORD_BYTES_MIN;
use crate::protocol::varint;
use crate::storage::io::{align_down, align_up, SegmentFile};
use crate::storage::segment::Segment;
use crate::storage::txn_index::{self, AbortedTxn, CONTROL_ABORT, CONTROL_COMMIT};
use crate::storage::{meta, PartitionLog, StorageError};
use crate::types::Offset;

/// The compaction settings of a log (`cleanup.policy` includes `compact`).
#[derive(Debug, Clone, PartialEq)]
pub struct CompactionConfig {
    /// `delete.retention.ms`: how long a tombstone stays readable.
    pub delete_retention_ms: u64,
    /// `min.cleanable.dirty.ratio`.
    pub min_cleanable_dirty_ratio: f64,
    /// `min.compaction.lag.ms`: records younger than this are never compacted.
    pub min_compaction_lag_ms: u64,
    /// `max.compaction.lag.ms`: dirty records older than this are compacted whatever the ratio
    /// (`None`: Kafka's default, `Long.MAX_VALUE`).
    pub max_compaction_lag_ms: Option<u64>,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        CompactionConfig {
            delete_retention_ms: 86_400_000,
            min_cleanable_dirty_ratio: 0.5,
            min_compaction_lag_ms: 0,
            max_compaction_lag_ms: None,
        }
    }
}

/// Bytes the key -> offset map of one pass may hold (keys plus [`MAP_ENTRY_OVERHEAD_BYTES`]
/// each). One pass runs at a time per shard, so this bounds the cleaner's memory per core
/// whatever the keys; Kafka's `log.cleaner.dedupe.buffer.size` is 128 MiB shared by its cleaner
/// threads. A dirty section with more distinct keys is cleaned in several passes.
pub const CLEANER_MAP_BYTES_MAX: usize = 32 << 20;
/// What a map entry costs besides its key bytes: the hash table slot (key pointer and length,
/// offset), the key's heap block header, and the table's spare capacity.
pub const MAP_ENTRY_OVERHEAD_BYTES: usize = 48;
/// Bytes of batches read per step from a segment being cleaned.
const READ_CHUNK_BYTES: usize = 4 << 20;
/// Bytes written per step to a `.cleaned` file.
const WRITE_CHUNK_BYTES: usize = 1 << 20;
/// The marker of a swap in progress: `[n u32][old bases i64]*n [m u32][new bases i64]*m` + CRC.
pub const SWAP_FILE: &str = "cleaner-swap.pending";
/// The first dirty offset (the end of the last pass): `i64` + CRC.
pub const CHECKPOINT_FILE: &str = "cleaner-offset.checkpoint";
const CLEANED_EXT: &str = "log.cleaned";

/// Where the cleaner of a log stands. Part of the log's `State`.
pub(crate) struct CleanerState {
    /// Offsets below this were covered by a pass's map: only records from here on can
    /// supersede others.
    first_dirty: Offset,
    /// Every ABORT marker below this offset has been removed by a pass, with the data of its
    /// transaction: the aborted-transaction index no longer lists those transactions (a
    /// transaction snapshot written before the pass may, so recovery drops them again).
    aborts_cleared_below: Offset,
    /// The earliest delete horizon (KIP-534) on a batch that still holds a tombstone or a
    /// removable transaction marker: from then on a pass is due even with nothing dirty.
    next_horizon: Option<i64>,
    /// A pass is running (passes of one log never overlap).
    running: bool,
}

/// The bytes of [`CHECKPOINT_FILE`] (before its CRC): `[first dirty i64][aborts cleared below
/// i64][next horizon i64 (i64::MAX: none)]`. A file of the first field only (written before the
/// other two existed) reads as nothing cleared and no horizon.
const CHECKPOINT_BYTES: usize = 24;

impl CleanerState {
    /// At open: the checkpointed state, if any.
    pub fn recovered(dir: &Path) -> Self {
        let (first_dirty, aborts_cleared_below, next_horizon) =
            meta::read_file(&dir.join(CHECKPOINT_FILE))
                .and_then(|b| decode_checkpoint(&b))
                .unwrap_or((Offset(0), Offset(0), None));
        CleanerState {
            first_dirty,
            aborts_cleared_below,
            next_horizon,
            running: false,
        }
    }

    /// See the field.
    pub fn aborts_cleared_below(&self) -> Offset {
        self.aborts_cleared_below
    }

    fn checkpoint(&self) -> [u8; CHECKPOINT_BYTES] {
        let mut b = [0u8; CHECKPOINT_BYTES];
        b[..8].copy_from_slice(&self.first_dirty.0.to_be_bytes());
        b[8..16].copy_from_slice(&self.aborts_cleared_below.0.to_be_bytes());
        b[16..].copy_from_slice(&self.next_horizon.unwrap_or(i64::MAX).to_be_bytes());
        b
    }
}

fn decode_checkpoint(b: &[u8]) -> Option<(Offset, Offset, Option<i64>)> {
    let at =
        |i: usize| -> Option<i64> { Some(i64::from_be_bytes(b.get(i..i + 8)?.try_into().ok()?)) };
    match b.len() {
        8 => Some((Offset(at(0)?), Offset(0), None)),
        CHECKPOINT_BYTES => Some((
            Offset(at(0)?),
            Offset(at(8)?),
            Some(at(16)?).filter(|h| *h != i64::MAX),
        )),
        _ => None,
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanReport {
    pub segments_in: usize,
    pub segments_out: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Dirty bytes read to build the map.
    pub bytes_mapped: u64,
    pub records_removed: u64,
    pub tombstones_removed: u64,
    /// Batches of aborted transactions removed (their records count in `records_removed`).
    pub aborted_batches_removed: u64,
    /// Transaction markers (COMMIT or ABORT) removed past their delete horizon.
    pub markers_removed: u64,
    pub batches_removed: u64,
    pub batches_rewritten: u64,
    /// Batches that kept no record and were rewritten as empty shells (replicated logs).
    pub batches_emptied: u64,
    /// The new first dirty offset.
    pub cleaned_to: Offset,
    /// Dirty data remains past `cleaned_to` that the map had no room for.
    pub more: bool,
}

#[cfg(test)]
thread_local! {
    /// Tests: a smaller map budget, to force several passes.
    pub(crate) static MAP_BYTES_LIMIT: Cell<Option<usize>> = const { Cell::new(None) };
    /// Tests: the swap stops (as a crash would) after this many of its steps.
    pub(crate) static SWAP_STOP_AFTER: Cell<Option<u32>> = const { Cell::new(None) };
}

/// Counts swap steps; in tests, stops the swap after `SWAP_STOP_AFTER` of them (read once on
/// the shard's thread, since the swap's file work runs on the blocking pool).
struct Steps {
    done: u32,
    stop_after: Option<u32>,
}

impl Steps {
    fn new() -> Steps {
        #[cfg(test)]
        let stop_after = SWAP_STOP_AFTER.with(|s| s.get());
        #[cfg(not(test))]
        let stop_after = None;
        Steps {
            done: 0,
            stop_after,
        }
    }

    /// Never stops: recovery finishing a swap.
    fn unlimited() -> Steps {
        Steps {
            done: 0,
            stop_after: None,
        }
    }

    fn step(&mut self) -> Result<(), StorageError> {
        self.done += 1;
        if self.stop_after.is_some_and(|k| self.done > k) {
            return Err(StorageError::Io(std::io::Error::other(
                "test: swap stopped here",
            )));
        }
        Ok(())
    }
}

fn map_bytes_max() -> usize {
    #[cfg(test)]
    if let Some(l) = MAP_BYTES_LIMIT.with(|l| l.get()) {
        return l;
    }
    CLEANER_MAP_BYTES_MAX
}

fn cleaned_path(dir: &Path, base: Offset) -> std::path::PathBuf {
    meta::segment_path(dir, base, CLEANED_EXT)
}

/// The swap marker: `[n u32][old bases i64]*n [m u32][new bases i64]*m [checkpoint]`, the
/// checkpoint being the bytes of [`CHECKPOINT_FILE`] after the swap (recovery writes it when it
/// finishes the swap: the aborted transactions it clears must not come back).
fn encode_swap(old: &[Offset], new: &[Offset], checkpoint: &[u8; CHECKPOINT_BYTES]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 8 * (old.len() + new.len()) + CHECKPOINT_BYTES);
    for list in [old, new] {
        v.extend_from_slice(&(list.len() as u32).to_be_bytes());
        for b in list {
            v.extend_from_slice(&b.0.to_be_bytes());
        }
    }
    v.extend_from_slice(checkpoint);
    v
}

/// The inverse of [`encode_swap`]; a marker without the checkpoint (written before it was
/// added) reads with `None`.
type Swap = (Vec<Offset>, Vec<Offset>, Option<[u8; CHECKPOINT_BYTES]>);

fn decode_swap(b: &[u8]) -> Option<Swap> {
    let mut at = 0usize;
    let mut lists = vec![];
    for _ in 0..2 {
        let n = u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
        at += 4;
        // A count the file cannot hold never sizes an allocation.
        if n > (b.len() - at) / 8 {
            return None;
        }
        let mut list = Vec::with_capacity(n);
        for _ in 0..n {
            list.push(Offset(i64::from_be_bytes(
                b.get(at..at + 8)?.try_into().ok()?,
            )));
            at += 8;
        }
        lists.push(list);
    }
    let new = lists.pop()?;
    let old = lists.pop()?;
    let checkpoint = match b.len() - at {
        0 => None,
        CHECKPOINT_BYTES => Some(b[at..].try_into().ok()?),
        _ => return None,
    };
    Some((old, new, checkpoint))
}

/// Removes the outputs (`.cleaned` files) of a failed cleaner pass from `dir`, unless a swap
/// stopped after its marker (the next open finishes it). Blocking: run on the blocking pool.
fn remove_cleaned_files(dir: &Path) -> std::io::Result<()> {
    if dir.join(SWAP_FILE).exists() {
        return Ok(());
    }
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        if name.to_str().is_some_and(|n| n.ends_with(".cleaned")) {
            meta::remove_if_exists(&dir.join(&name))?;
        }
    }
    Ok(())
}

/// The file operations of a swap after its marker: old index files go (rebuilt from the data
/// when missing), old segments that are not outputs go, each output's `.cleaned` file is renamed
/// over its base. Idempotent, so recovery can run it again after a crash.
fn finish_swap(
    dir: &Path,
    old: &[Offset],
    new: &[Offset],
    steps: &mut Steps,
) -> Result<(), StorageError> {
    for &b in old {
        meta::remove_if_exists(&meta::segment_path(dir, b, "index"))?;
        meta::remove_if_exists(&meta::segment_path(dir, b, "timeindex"))?;
    }
    steps.step()?;
    for &b in old.iter().filter(|b| !new.contains(b)) {
        meta::remove_if_exists(&meta::segment_path(dir, b, "log"))?;
        steps.step()?;
    }
    for &b in new {
        let from = cleaned_path(dir, b);
        if from.exists() {
            std::fs::rename(&from, meta::segment_path(dir, b, "log"))?;
        }
        steps.step()?;
    }
    meta::sync_dir(dir)?;
    Ok(())
}

/// At open, before the segments are listed: finishes a swap that a crash interrupted after its
/// marker, and removes `.cleaned` files of a pass that never reached its swap.
pub(crate) fn recover(dir: &Path) -> Result<(), StorageError> {
    let marker = dir.join(SWAP_FILE);
    if marker.exists() {
        match meta::read_file(&marker).and_then(|b| decode_swap(&b)) {
            Some((old, new, checkpoint)) => {
                tracing::info!(
                    dir = %dir.display(), old = old.len(), new = new.len(),
                    "finishing a log-cleaner swap interrupted by a crash"
                );
                finish_swap(dir, &old, &new, &mut Steps::unlimited())?;
                if let Some(c) = checkpoint {
                    meta::write_file(&dir.join(CHECKPOINT_FILE), &c)?;
                }
            }
            None => {
                // The marker is written atomically (temp file, rename): a damaged one was never
                // acted on, so no file of the swap was touched.
                tracing::warn!(dir = %dir.display(), "damaged log-cleaner swap marker ignored");
            }
        }
    }
    let mut removed = false;
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        if name.to_str().is_some_and(|n| n.ends_with(".cleaned")) {
            meta::remove_if_exists(&dir.join(&name))?;
            removed = true;
        }
    }
    if removed || marker.exists() {
        meta::sync_dir(dir)?;
        meta::remove_if_exists(&marker)?;
        meta::sync_dir(dir)?;
    }
    Ok(())
}

/// Reads the batches of a sealed segment in order, a chunk at a time, each CRC-checked. Offsets
/// must increase; gaps (earlier compaction) are allowed.
struct SegmentReader {
    file: Rc<dyn SegmentFile>,
    pos: u64,
    size: u64,
}

impl SegmentReader {
    /// The next whole batches (at least one), or `None` at the end of the segment.
    async fn next_chunk(&mut self) -> Result<Option<Vec<Bytes>>, StorageError> {
        let corrupt = |e| StorageError::Corrupt(e);
        if self.pos >= self.size {
            return Ok(None);
        }
        let mut want = READ_CHUNK_BYTES as u64;
        loop {
            let apos = align_down(self.pos);
            let len = (align_up(self.pos - apos + want)).min(align_up(self.size) - apos);
            let buf = self.file.read_at(apos, len as usize).await?;
            let avail = (buf.len() as u64).min(self.size - apos) as usize;
            let data = &buf[(self.pos - apos) as usize..avail];
            let mut i = 0usize;
            let mut ends = vec![];
            while data.len() - i >= batch::LOG_OVERHEAD_BYTES {
                let size = batch::batch_size(&data[i..])
                    .ok_or(StorageError::Corrupt(batch::BatchError::BadLength))?;
                if size > data.len() - i {
                    break;
                }
                i += size;
                ends.push(i);
            }
            if ends.is_empty() {
                // The batch at `pos` did not fit: read it whole, once. A sealed segment is
                // exactly sized, so a batch reaching past its end, or one that a read of its
                // declared size still does not hold, is damage.
                let need = batch::batch_size(data)
                    .filter(|_| data.len() >= batch::LOG_OVERHEAD_BYTES)
                    .ok_or(StorageError::Corrupt(batch::BatchError::Truncated))?
                    as u64;
                if need > self.size - self.pos || need <= want {
                    return Err(corrupt(batch::BatchError::Truncated));
                }
                want = need;
                continue;
            }
            let all = Bytes::copy_from_slice(&data[..i]);
            let mut out = Vec::with_capacity(ends.len());
            let mut at = 0;
            for end in ends {
                let b = all.slice(at..end);
                BatchHeader::parse_checked(&b).map_err(corrupt)?;
                out.push(b);
                at = end;
            }
            self.pos += i as u64;
            return Ok(Some(out));
        }
    }
}

/// One record of a batch's records section: where its bytes are, its offset, key and whether
/// its value is null.
struct RawRecord {
    start: usize,
    end: usize,
    offset: i64,
    key: Option<(usize, usize)>,
    null_value: bool,
}

/// The (decompressed) records section of `b` and its records, bounds-checked.
fn records_of(h: &BatchHeader<'_>, b: &Bytes) -> Result<(Bytes, Vec<RawRecord>), StorageError> {
    let bad = || StorageError::Corrupt(batch::BatchError::BadLength);
    let codec = Compression::from_attributes(h.attributes()).map_err(|_| bad())?;
    let body = b.slice(HEADER_BYTES..h.size());
    let body = match codec {
        Compression::None => body,
        c => Bytes::from(
            compression::decompress(c, &body, DECOMPRESSED_BATCH_BYTES_MAX).map_err(|_| bad())?,
        ),
    };
    let count = usize::try_from(h.record_count()).map_err(|_| bad())?;
    // Each record takes at least RECORD_BYTES_MIN bytes: a count the body cannot hold is
    // refused before it sizes anything.
    if count > body.len() / RECORD_BYTES_MIN {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(count);
    let mut at = 0usize;
    let base = h.base_offset().0;
    for _ in 0..count {
        let start = at;
        let len = varint::read_varint(&body, &mut at).map_err(|_| bad())?;
        let len = usize::try_from(len).map_err(|_| bad())?;
        let end = at
            .checked_add(len)
            .filter(|e| *e <= body.len())
            .ok_or_else(bad)?;
        let rec = &body[at..end];
        let mut r = 1usize; // record attributes
        if rec.is_empty() {
            return Err(bad());
        }
        varint::read_varint(rec, &mut r).map_err(|_| bad())?; // timestamp delta
        let delta = varint::read_varint(rec, &mut r).map_err(|_| bad())?;
        let klen = varint::read_varint(rec, &mut r).map_err(|_| bad())?;
        let key = if klen < 0 {
            None
        } else {
            let k = usize::try_from(klen).map_err(|_| bad())?;
            let kend = r
                .checked_add(k)
                .filter(|e| *e <= rec.len())
                .ok_or_else(bad)?;
            let span = (at + r, at + kend);
            r = kend;
            Some(span)
        };
        let vlen = varint::read_varint(rec, &mut r).map_err(|_| bad())?;
        out.push(RawRecord {
            start,
            end,
            offset: base.saturating_add(delta),
            key,
            null_value: vlen < 0,
        });
        at = end;
    }
    Ok((body, out))
}

/// Key -> latest offset, bounded by [`CLEANER_MAP_BYTES_MAX`].
struct OffsetMap {
    map: HashMap<Box<[u8]>, i64>,
    bytes: usize,
}

impl OffsetMap {
    fn new() -> Self {
        OffsetMap {
            map: HashMap::new(),
            bytes: 0,
        }
    }
    /// Bytes `batch`'s records would add at most.
    fn cost(recs: &[RawRecord]) -> usize {
        recs.iter()
            .map(|r| r.key.map_or(0, |(a, b)| b - a) + MAP_ENTRY_OVERHEAD_BYTES)
            .sum()
    }
    fn put(&mut self, key: &[u8], offset: i64) {
        match self.map.get_mut(key) {
            Some(o) => *o = (*o).max(offset),
            None => {
                self.bytes += key.len() + MAP_ENTRY_OVERHEAD_BYTES;
                self.map.insert(key.into(), offset);
            }
        }
    }
    fn get(&self, key: &[u8]) -> Option<i64> {
        self.map.get(key).copied()
    }
}

/// What the rewrite does with one batch.
enum Verdict {
    Keep,
    Drop,
    Rewrite(Vec<u8>),
    /// Nothing kept, the batch stays as an empty shell (replicated logs).
    Shell(Vec<u8>),
}

#[derive(Default)]
struct Counts {
    records_removed: u64,
    tombstones_removed: u64,
    aborted_batches_removed: u64,
    markers_removed: u64,
}

/// The aborted transactions of the range a pass reads, by producer: (first offset, offset of
/// the ABORT marker), in offset order (one producer's transactions follow each other).
struct AbortedRanges(HashMap<i64, Vec<(Offset, Offset)>>);

impl AbortedRanges {
    fn new(list: &[AbortedTxn]) -> Self {
        let mut m: HashMap<i64, Vec<(Offset, Offset)>> = HashMap::new();
        for a in list {
            m.entry(a.producer_id).or_default().push((a.first, a.last));
        }
        for v in m.values_mut() {
            v.sort_unstable();
        }
        AbortedRanges(m)
    }

    /// A transactional batch of `producer_id` at `offset` belongs to an aborted transaction.
    fn contains(&self, producer_id: i64, offset: Offset) -> bool {
        self.0.get(&producer_id).is_some_and(|v| {
            let i = v.partition_point(|(first, _)| *first <= offset);
            i > 0 && offset <= v[i - 1].1
        })
    }
}

/// Whether a batch is a transactional producer's data that the aborted-transaction index says
/// was aborted: such a batch is never mapped and never kept.
fn is_aborted(h: &BatchHeader<'_>, aborted: &AbortedRanges) -> bool {
    !h.is_control()
        && h.is_transactional()
        && h.producer_id() >= 0
        && aborted.contains(h.producer_id(), h.base_offset())
}

/// The rewrite of one pass, batch by batch in offset order from the start of the log: what to
/// keep of each, and the transaction and delete-horizon bookkeeping that runs across batches.
struct Rewrite<'a> {
    map: &'a OffsetMap,
    map_end: Offset,
    now_ms: i64,
    /// The delete horizon (KIP-534) this pass stamps on a batch that keeps a tombstone, or on a
    /// transaction marker that may go, for the first time: now + `delete.retention.ms`.
    stamp_ms: i64,
    aborted: &'a AbortedRanges,
    /// A replicated log: a batch that keeps nothing becomes a shell instead of going, and
    /// transaction markers stay (see [`shell`]).
    shells: bool,
    /// Producers with data of a (committed) transaction kept since their last marker: that
    /// marker stays while its transaction has data.
    open_data: std::collections::HashSet<i64>,
    /// The first ABORT marker this pass keeps. ABORT markers after it are kept too, so the
    /// removed ones are always a prefix and [`CleanerState::aborts_cleared_below`] can say which.
    abort_kept: Option<Offset>,
    /// The earliest delete horizon (now or later) on a batch kept with a tombstone or a
    /// removable marker.
    next_horizon: Option<i64>,
    counts: Counts,
}

impl Rewrite<'_> {
    fn note_horizon(&mut self, horizon_ms: i64) {
        // A horizon of now (`delete.retention.ms` = 0) still needs a later pass to remove what
        // this pass stamped and kept.
        if horizon_ms >= self.now_ms {
            self.next_horizon = Some(self.next_horizon.map_or(horizon_ms, |h| h.min(horizon_ms)));
        }
    }

    /// A batch none of whose records stays: left out, or on a replicated log kept as a shell
    /// (an existing shell verbatim).
    fn gone(&self, h: &BatchHeader<'_>) -> Verdict {
        match (self.shells, h.record_count()) {
            (false, _) => Verdict::Drop,
            (true, 0) => Verdict::Keep,
            (true, _) => Verdict::Shell(shell(h)),
        }
    }

    fn batch(&mut self, b: &Bytes) -> Result<Verdict, StorageError> {
        let h = BatchHeader::parse(b).map_err(StorageError::Corrupt)?;
        if h.is_control() {
            return self.control(&h, b);
        }
        if is_aborted(&h, self.aborted) {
            if h.record_count() > 0 {
                self.counts.aborted_batches_removed += 1;
                self.counts.records_removed += h.record_count() as u64;
            }
            return Ok(self.gone(&h));
        }
        let (body, recs) = records_of(&h, b)?;
        let horizon = h.delete_horizon_ms();
        let expired = horizon.is_some_and(|hz| self.now_ms >= hz);
        let mut keep: Vec<&RawRecord> = Vec::with_capacity(recs.len());
        let mut kept_tombstone = false;
        for r in &recs {
            let kept = if r.offset >= self.map_end.0 {
                true
            } else if let Some((a, z)) = r.key {
                if self.map.get(&body[a..z]).is_some_and(|o| o > r.offset) {
                    false
                } else if r.null_value && expired {
                    self.counts.tombstones_removed += 1;
                    false
                } else {
                    true
                }
            } else {
                false
            };
            if kept {
                kept_tombstone |= r.null_value;
                keep.push(r);
            }
        }
        self.counts.records_removed += (recs.len() - keep.len()) as u64;
        if keep.is_empty() {
            return Ok(self.gone(&h));
        }
        if h.is_transactional() && h.producer_id() >= 0 {
            self.open_data.insert(h.producer_id());
        }
        // A tombstone kept for the first time gets the batch's delete horizon (KIP-534): it
        // goes at the first pass from then on, however old its timestamp.
        let stamp = (kept_tombstone && horizon.is_none()).then_some(self.stamp_ms);
        if kept_tombstone {
            self.note_horizon(horizon.unwrap_or(self.stamp_ms));
        }
        if keep.len() == recs.len() && stamp.is_none() {
            return Ok(Verdict::Keep);
        }
        Ok(Verdict::Rewrite(rebuild(&h, b, &body, &keep, stamp)?))
    }

    /// A transaction marker goes once its transaction has no data left (aborted data is always
    /// removed; committed data as its keys are superseded) and its delete horizon has passed;
    /// the pass that first finds it removable stamps that horizon. Other control batches stay.
    fn control(&mut self, h: &BatchHeader<'_>, b: &Bytes) -> Result<Verdict, StorageError> {
        let kind = h
            .is_transactional()
            .then(|| txn_index::marker_type(h))
            .flatten()
            .filter(|k| *k == CONTROL_ABORT || *k == CONTROL_COMMIT);
        let Some(kind) = kind else {
            return Ok(Verdict::Keep);
        };
        let abort = kind == CONTROL_ABORT;
        let removable = !self.open_data.remove(&h.producer_id());
        if self.shells {
            // A replicated log keeps its markers: a follower that receives the entry rebuilds
            // its transaction state from it, which an empty shell would leave open there.
            if abort {
                self.abort_kept.get_or_insert(h.base_offset());
            }
            return Ok(Verdict::Keep);
        }
        let horizon = h.delete_horizon_ms();
        if removable
            && horizon.is_some_and(|hz| self.now_ms >= hz)
            && !(abort && self.abort_kept.is_some())
        {
            self.counts.markers_removed += 1;
            return Ok(Verdict::Drop);
        }
        if abort {
            self.abort_kept.get_or_insert(h.base_offset());
        }
        if !removable {
            return Ok(Verdict::Keep);
        }
        match horizon {
            Some(hz) => {
                self.note_horizon(hz);
                Ok(Verdict::Keep)
            }
            None => {
                self.note_horizon(self.stamp_ms);
                let (body, recs) = records_of(h, b)?;
                let all: Vec<&RawRecord> = recs.iter().collect();
                Ok(Verdict::Rewrite(rebuild(
                    h,
                    b,
                    &body,
                    &all,
                    Some(self.stamp_ms),
                )?))
            }
        }
    }
}

/// Re-encodes one record (length prefix included) of a batch whose base timestamp moves from
/// `old_base` to `new_base`: the timestamp delta changes so the record's timestamp does not.
fn rebase_record(
    rec: &[u8],
    old_base: i64,
    new_base: i64,
    out: &mut Vec<u8>,
) -> Result<(), StorageError> {
    let bad = || StorageError::Corrupt(batch::BatchError::BadLength);
    let mut at = 0usize;
    varint::read_varint(rec, &mut at).map_err(|_| bad())?; // length
    let attributes = *rec.get(at).ok_or_else(bad)?;
    let mut r = at + 1;
    let delta = varint::read_varint(rec, &mut r).map_err(|_| bad())?;
    let new_delta = old_base.saturating_add(delta).saturating_sub(new_base);
    let rest = &rec[r..];
    let len = 1 + varint::varint_len(new_delta) + rest.len();
    varint::put_varint(out, len as i64);
    out.push(attributes);
    varint::put_varint(out, new_delta);
    out.extend_from_slice(rest);
    Ok(())
}

/// The empty shell a replicated log keeps for a batch none of whose records stays (Kafka keeps
/// such batches too, and clients skip them): the header alone, with the same base offset,
/// `lastOffsetDelta`, leader epoch, producer id, epoch and base sequence, transactional and
/// control bits and timestamp type; zero records, no compression, no delete horizon (the base
/// timestamp becomes the max timestamp if it held one), a fresh CRC-32C. The raft index of the
/// entry (its ordinal), its term and its offsets are thus unchanged.
pub fn shell(h: &BatchHeader<'_>) -> Vec<u8> {
    let mut out = h.bytes()[..HEADER_BYTES].to_vec();
    let len = (HEADER_BYTES - batch::LOG_OVERHEAD_BYTES) as i32;
    out[8..12].copy_from_slice(&len.to_be_bytes());
    let attrs = h.attributes() & !(batch::ATTR_COMPRESSION_MASK | batch::ATTR_DELETE_HORIZON);
    out[21..23].copy_from_slice(&attrs.to_be_bytes());
    if h.delete_horizon_ms().is_some() {
        batch::set_timestamps(&mut out, h.max_timestamp(), h.max_timestamp());
    }
    out[57..61].copy_from_slice(&0i32.to_be_bytes());
    batch::write_crc(&mut out);
    out
}

/// `b` rebuilt from the records `keep` (record bytes of `body`, its decompressed records
/// section), recompressed with its own codec, with the same base offset, `lastOffsetDelta`,
/// max timestamp and producer fields, so every kept record keeps its offset. With `horizon`,
/// the batch is stamped with that delete horizon (KIP-534): the attribute set, the base
/// timestamp replaced and each record's timestamp delta re-encoded against it.
fn rebuild(
    h: &BatchHeader<'_>,
    b: &[u8],
    body: &[u8],
    keep: &[&RawRecord],
    horizon: Option<i64>,
) -> Result<Vec<u8>, StorageError> {
    let raw: usize = keep.iter().map(|r| r.end - r.start).sum();
    // A re-encoded delta takes at most 10 bytes more than before, its length prefix 5.
    let mut section = Vec::with_capacity(raw + horizon.map_or(0, |_| 15 * keep.len()));
    for r in keep {
        let rec = &body[r.start..r.end];
        match horizon {
            None => section.extend_from_slice(rec),
            Some(hz) => rebase_record(rec, h.base_timestamp(), hz, &mut section)?,
        }
    }
    let codec = Compression::from_attributes(h.attributes())
        .map_err(|_| StorageError::Corrupt(batch::BatchError::BadLength))?;
    let mut out = Vec::with_capacity(HEADER_BYTES + section.len());
    out.extend_from_slice(&b[..HEADER_BYTES]);
    compression::compress(codec, &section, &mut out)
        .map_err(|e| StorageError::Io(std::io::Error::other(e.to_string())))?;
    let len = i32::try_from(out.len() - batch::LOG_OVERHEAD_BYTES)
        .map_err(|_| StorageError::Corrupt(batch::BatchError::BadLength))?;
    out[8..12].copy_from_slice(&len.to_be_bytes());
    // Record count (the last header field).
    out[57..61].copy_from_slice(&(keep.len() as i32).to_be_bytes());
    if let Some(hz) = horizon {
        batch::set_delete_horizon(&mut out, hz);
    }
    batch::write_crc(&mut out);
    Ok(out)
}

/// One `.cleaned` output being written: the bytes not yet written and the segment's index.
struct Output {
    base: Offset,
    file: Rc<dyn SegmentFile>,
    seg: Segment,
    pending: Vec<u8>,
    written: u64,
    interval: u32,
}

impl Output {
    async fn push(&mut self, b: &[u8]) -> Result<(), StorageError> {
        let pos = self.written + self.pending.len() as u64;
        let h = BatchHeader::parse(b).map_err(StorageError::Corrupt)?;
        self.seg.on_batch(&h, pos, self.interval);
        self.pending.extend_from_slice(b);
        while self.pending.len() >= WRITE_CHUNK_BYTES {
            self.write(WRITE_CHUNK_BYTES).await?;
        }
        Ok(())
    }

    /// Writes the first `n` pending bytes (padded with zeros to the alignment).
    async fn write(&mut self, n: usize) -> Result<(), StorageError> {
        let len = align_up(n as u64) as usize;
        let mut buf = glommio::allocate_dma_buffer_global(len);
        let m = buf.as_bytes_mut();
        m[..n].copy_from_slice(&self.pending[..n]);
        m[n..].fill(0);
        self.file.write_at(Rc::new(buf), self.written).await?;
        self.pending.drain(..n);
        self.written += n as u64;
        Ok(())
    }

    /// Writes the rest, cuts the file to its data and makes it durable. The segment ends at
    /// `end` (the base of the segment that follows), whatever offsets its last batches left out.
    async fn finish(mut self, end: Offset) -> Result<Segment, StorageError> {
        if !self.pending.is_empty() {
            self.write(self.pending.len()).await?;
        }
        self.file.truncate(self.written).await?;
        self.file.sync().await?;
        self.seg.push_time_entry();
        self.seg.set_extent(self.written, end);
        Ok(self.seg)
    }
}

/// What a pass leaves for the cleaner's state (see [`CleanerState`]).
struct After {
    map_end: Offset,
    aborts_cleared_below: Offset,
    next_horizon: Option<i64>,
}

/// A sealed segment as the pass found it.
struct Planned {
    base: Offset,
    next: Offset,
    size: u64,
    created_ms: i64,
    max_ts: i64,
    file: Rc<dyn SegmentFile>,
}

impl PartitionLog {
    /// The first dirty offset: records from here on have not been through a pass's map.
    pub fn cleaner_first_dirty(&self) -> Offset {
        self.state.borrow().cleaner.first_dirty
    }

    /// Runs one cleaning pass if the log is compacted and due (see the module docs); `None`
    /// when there was nothing to do. Never touches the active segment.
    pub async fn compact(&self, now_ms: i64) -> Result<Option<CleanReport>, StorageError> {
        self.compact_within(now_ms, None).await
    }

    /// [`compact`](Self::compact) for the log of a replicated partition: batches that keep no
    /// record stay as empty shells and transaction markers stay (so every batch keeps its raft
    /// index, term and offsets), and the pass cleans nothing at or past `committed`, the
    /// offset below which this replica's entries are committed and applied (raft never
    /// truncates or rewrites them).
    pub async fn compact_replicated(
        &self,
        now_ms: i64,
        committed: Offset,
    ) -> Result<Option<CleanReport>, StorageError> {
        self.compact_within(now_ms, Some(committed)).await
    }

    async fn compact_within(
        &self,
        now_ms: i64,
        committed: Option<Offset>,
    ) -> Result<Option<CleanReport>, StorageError> {
        {
            let mut s = self.state.borrow_mut();
            if s.cleaner.running || s.closed || s.config.compaction.is_none() {
                return Ok(None);
            }
            s.cleaner.running = true;
        }
        let r = self.compact_pass(now_ms, committed).await;
        #[cfg(test)]
        let stopped = SWAP_STOP_AFTER.with(|s| s.get()).is_some();
        #[cfg(not(test))]
        let stopped = false;
        if r.is_err() && !stopped {
            // Outputs of a failed pass; the old segments are untouched. On the blocking pool,
            // with the pass still counted as running, so the next pass's outputs never meet
            // this removal.
            if let Err(e) = self.remove_cleaned_files().await {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove .cleaned files");
            }
        }
        self.state.borrow_mut().cleaner.running = false;
        r
    }

    /// [`remove_cleaned_files`] of this log, on the blocking pool. Called while a pass runs
    /// (`cleaner.running`), so no pass writes outputs meanwhile.
    async fn remove_cleaned_files(&self) -> std::io::Result<()> {
        let dir = self.dir.clone();
        glommio::executor()
            .spawn_blocking(move || remove_cleaned_files(&dir))
            .await
    }

    async fn compact_pass(
        &self,
        now_ms: i64,
        committed: Option<Offset>,
    ) -> Result<Option<CleanReport>, StorageError> {
        let (cfg, segment_bytes, interval, planned, first_dirty, horizon_due, aborted) = {
            let s = self.state.borrow();
            let cfg = s.config.compaction.clone().expect("checked by compact");
            let sealed = &s.segments[..s.segments.len() - 1];
            let lag_limit = now_ms.saturating_sub(cfg.min_compaction_lag_ms as i64);
            // On a replicated log the written offset may be past what is committed.
            let hw = committed.map_or(s.offsets.hw(), |c| c.min(s.offsets.hw()));
            let lso = s.txns.first_unstable().map_or(hw, |f| f.min(hw));
            // Cleanable: the sealed segments, in order, whose records are all past the lag and
            // below the last stable offset (every transaction there has its outcome).
            let planned: Vec<Planned> = sealed
                .iter()
                .take_while(|g| g.max_ts().0 <= lag_limit && g.next() <= lso)
                .map(|g| Planned {
                    base: g.base(),
                    next: g.next(),
                    size: g.size(),
                    created_ms: g.created_ms(),
                    max_ts: g.max_ts().0,
                    file: g.file().clone(),
                })
                .collect();
            let first_dirty = s.cleaner.first_dirty.max(s.offsets.log_start());
            let horizon_due = s.cleaner.next_horizon.is_some_and(|h| now_ms >= h);
            let aborted = match (planned.first(), planned.last()) {
                (Some(a), Some(z)) => s.txns.aborted_between(a.base, z.next),
                _ => vec![],
            };
            (
                cfg,
                s.config.segment_bytes,
                s.config.index_interval_bytes,
                planned,
                first_dirty,
                horizon_due,
                AbortedRanges::new(&aborted),
            )
        };
        let Some(cleanable_end) = planned.last().map(|p| p.next) else {
            return Ok(None);
        };
        if cleanable_end <= first_dirty && !horizon_due {
            return Ok(None);
        }
        let total: u64 = planned.iter().map(|p| p.size).sum();
        let dirty: u64 = planned
            .iter()
            .filter(|p| p.next > first_dirty)
            .map(|p| p.size)
            .sum();
        let ratio = if total == 0 {
            0.0
        } else {
            dirty as f64 / total as f64
        };
        // Overdue: every record of the first dirty segment is older than the max lag.
        let overdue = cfg.max_compaction_lag_ms.is_some_and(|lag| {
            let limit = now_ms.saturating_sub(lag as i64);
            planned
                .iter()
                .find(|p| p.next > first_dirty)
                .is_some_and(|p| p.max_ts <= limit)
        });
        if ratio < cfg.min_cleanable_dirty_ratio && !overdue && !horizon_due {
            return Ok(None);
        }

        // Map the dirty batches, latest offset per key, within the map's budget.
        let mut report = CleanReport::default();
        let mut map = OffsetMap::new();
        let mut map_end = first_dirty;
        'map: for p in planned.iter().filter(|p| p.next > first_dirty) {
            let mut rd = SegmentReader {
                file: p.file.clone(),
                pos: 0,
                size: p.size,
            };
            while let Some(chunk) = rd.next_chunk().await? {
                for b in chunk {
                    let h = BatchHeader::parse(&b).map_err(StorageError::Corrupt)?;
                    if h.last_offset() < first_dirty {
                        continue;
                    }
                    report.bytes_mapped += b.len() as u64;
                    // Committed transactional records count as any others; aborted ones and
                    // control batches never supersede anything.
                    if !(h.is_control() || is_aborted(&h, &aborted)) {
                        let (body, recs) = records_of(&h, &b)?;
                        if map_end > first_dirty
                            && map.bytes + OffsetMap::cost(&recs) > map_bytes_max()
                        {
                            report.more = true;
                            break 'map;
                        }
                        for r in recs.iter().filter(|r| r.offset >= first_dirty.0) {
                            if let Some((a, z)) = r.key {
                                map.put(&body[a..z], r.offset);
                            }
                        }
                    }
                    map_end = h.last_offset().next();
                }
                glommio::yield_if_needed().await;
            }
            map_end = map_end.max(p.next);
        }

        // Rewrite the segments up to the one holding the map's end, merging small neighbours.
        let upto = planned.iter().take_while(|p| p.base < map_end).count();
        let planned = &planned[..upto];
        let mut groups: Vec<&[Planned]> = vec![];
        let mut start = 0;
        for k in 1..=planned.len() {
            let g = &planned[start..k];
            let bytes: u64 = g.iter().map(|p| p.size).sum();
            let next_fits = planned.get(k).is_some_and(|n| {
                bytes + n.size <= segment_bytes
                    && bytes + n.size < u32::MAX as u64
                    && n.next.0 - g[0].base.0 < u32::MAX as i64
            });
            if !next_fits {
                groups.push(g);
                start = k;
            }
        }
        let mut rw = Rewrite {
            map: &map,
            map_end,
            now_ms,
            stamp_ms: now_ms
                .saturating_add(i64::try_from(cfg.delete_retention_ms).unwrap_or(i64::MAX)),
            aborted: &aborted,
            shells: committed.is_some(),
            open_data: Default::default(),
            abort_kept: None,
            next_horizon: None,
            counts: Counts::default(),
        };
        let mut outputs: Vec<Segment> = vec![];
        for g in &groups {
            let base = g[0].base;
            let file = self.io.open(&cleaned_path(&self.dir, base), true).await?;
            let mut out = Output {
                base,
                file: file.clone(),
                seg: Segment::new(base, file, g[0].created_ms),
                pending: Vec::with_capacity(WRITE_CHUNK_BYTES),
                written: 0,
                interval,
            };
            for p in g.iter() {
                report.bytes_in += p.size;
                let mut rd = SegmentReader {
                    file: p.file.clone(),
                    pos: 0,
                    size: p.size,
                };
                while let Some(chunk) = rd.next_chunk().await? {
                    for b in chunk {
                        match rw.batch(&b)? {
                            Verdict::Keep => out.push(&b).await?,
                            Verdict::Drop => report.batches_removed += 1,
                            Verdict::Rewrite(nb) => {
                                report.batches_rewritten += 1;
                                out.push(&nb).await?
                            }
                            Verdict::Shell(nb) => {
                                report.batches_emptied += 1;
                                out.push(&nb).await?
                            }
                        }
                    }
                    glommio::yield_if_needed().await;
                }
            }
            let end = g.last().expect("groups are not empty").next;
            debug_assert_eq!(out.base, base);
            let seg = out.finish(end).await?;
            report.bytes_out += seg.size();
            outputs.push(seg);
        }
        report.segments_in = planned.len();
        report.segments_out = outputs.len();
        report.records_removed = rw.counts.records_removed;
        report.tombstones_removed = rw.counts.tombstones_removed;
        report.aborted_batches_removed = rw.counts.aborted_batches_removed;
        report.markers_removed = rw.counts.markers_removed;
        report.cleaned_to = map_end;
        // Every ABORT marker of the rewritten range before the first one kept is gone (the
        // range starts at the log start, so that is every one below it).
        let rewritten_end = planned.last().map_or(map_end, |p| p.next);
        let after = After {
            map_end,
            aborts_cleared_below: rw.abort_kept.unwrap_or(rewritten_end),
            next_horizon: rw.next_horizon,
        };
        if !self.swap(planned, outputs, after).await? {
            return Ok(None);
        }
        Ok(Some(report))
    }

    /// Puts `outputs` in place of `old` (see the module docs, step 4). `false`: the segments
    /// changed meanwhile (retention, close) and nothing was swapped.
    ///
    /// The file work (the marker, unlinks, renames, index files, the checkpoint, each with its
    /// fsyncs) runs on the executor's blocking thread pool, so the shard's other partitions keep
    /// appending. The swap holds the log-start turn throughout: retention and removal, which
    /// take it too, never move segments under it.
    async fn swap(
        &self,
        old: &[Planned],
        outputs: Vec<Segment>,
        after: After,
    ) -> Result<bool, StorageError> {
        let map_end = after.map_end;
        let _turn = self
            .log_start_turn
            .acquire_permit(1)
            .await
            .map_err(|_| StorageError::Io(std::io::Error::other("log is closed")))?;
        let mut steps = Steps::new();
        let old_bases: Vec<Offset> = old.iter().map(|p| p.base).collect();
        let new_bases: Vec<Offset> = outputs.iter().map(|g| g.base()).collect();
        if self.unchanged(old).is_none() {
            self.remove_cleaned_files().await?;
            return Ok(false);
        }
        steps.step()?;
        // The cleaner's state once swapped: checkpointed with the swap's marker, so that
        // recovery finishing the swap restores it too.
        let checkpoint = {
            let s = self.state.borrow();
            let c = &s.cleaner;
            CleanerState {
                first_dirty: c.first_dirty.max(map_end),
                aborts_cleared_below: c.aborts_cleared_below.max(after.aborts_cleared_below),
                next_horizon: after.next_horizon,
                running: true,
            }
        };
        let checkpoint_bytes = checkpoint.checkpoint();
        let marker = self.dir.join(SWAP_FILE);
        let body = encode_swap(&old_bases, &new_bases, &checkpoint_bytes);
        glommio::executor()
            .spawn_blocking(move || meta::write_file(&marker, &body))
            .await?;
        steps.step()?;
        // The marker's write yielded: look again (a close may have come meanwhile).
        let Some(i0) = self.unchanged(old) else {
            let (dir, marker) = (self.dir.clone(), self.dir.join(SWAP_FILE));
            glommio::executor()
                .spawn_blocking(move || {
                    meta::remove_if_exists(&marker)?;
                    meta::sync_dir(&dir)
                })
                .await?;
            self.remove_cleaned_files().await?;
            return Ok(false);
        };
        let index_files: Vec<[(PathBuf, Vec<u8>); 2]> = {
            let mut s = self.state.borrow_mut();
            let m = outputs.len();
            s.segments.splice(i0..i0 + old.len(), outputs);
            s.reads.clear();
            s.cleaner = checkpoint;
            // The transactions whose ABORT markers are gone leave the aborted index (their
            // data went at an earlier pass): a read_committed consumer told of one would skip
            // its producer's later transactions, waiting for a marker that is no longer there.
            let cleared = s.cleaner.aborts_cleared_below;
            s.txns.forget_aborted_below(cleared);
            s.check_invariants();
            s.check_segments();
            debug_assert!(s.segments[i0..i0 + m]
                .iter()
                .zip(&new_bases)
                .all(|(g, b)| g.base() == *b));
            s.segments[i0..i0 + m]
                .iter_mut()
                .map(|g| g.index_files_to_write(&self.dir))
                .collect()
        };
        // Cached copies of the old batches would show superseded records.
        self.cache.drop_below(self.cache_id, map_end);
        let dir = self.dir.clone();
        let bases = new_bases.clone();
        glommio::executor()
            .spawn_blocking(move || -> Result<(), StorageError> {
                finish_swap(&dir, &old_bases, &bases, &mut steps)?;
                for (path, body) in index_files.iter().flatten() {
                    meta::write_atomic(path, body)?;
                }
                steps.step()?;
                meta::write_file(&dir.join(CHECKPOINT_FILE), &checkpoint_bytes)?;
                steps.step()?;
                meta::remove_if_exists(&dir.join(SWAP_FILE))?;
                meta::sync_dir(&dir)?;
                Ok(())
            })
            .await?;
        let mut s = self.state.borrow_mut();
        for g in s.segments.iter_mut() {
            if new_bases.contains(&g.base()) {
                g.index_files_written();
                // Its `.cleaned` file now has the segment's own name. (A reopen between the
                // rename and here finds no `.cleaned` file and fails that one read.)
                g.file()
                    .renamed(&meta::segment_path(&self.dir, g.base(), "log"));
            }
        }
        Ok(true)
    }

    /// Where the planned segments still are in the log, untouched (same bases, sizes and
    /// files, and not the active segment); `None` if the log is closed or they changed.
    fn unchanged(&self, old: &[Planned]) -> Option<usize> {
        let s = self.state.borrow();
        if s.closed {
            return None;
        }
        let n = s.segments.len();
        let i0 = s.segments.iter().position(|g| g.base() == old[0].base)?;
        let same = i0 + old.len() < n
            && old.iter().zip(&s.segments[i0..]).all(|(p, g)| {
                p.base == g.base() && p.size == g.size() && Rc::ptr_eq(&p.file, g.file())
            });
        same.then_some(i0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::builder as build;
    use crate::protocol::compression::decode_batch;
    use crate::storage::io::Faults;
    use crate::storage::tests::{append, open, open_with_faults, read_all, run, small_config};
    use crate::storage::{marker_batch, Durability, LogConfig};
    use crate::types::Clock;

    /// (offset, key, value) of every record in `batches`.
    type Rec = (i64, Option<Vec<u8>>, Option<Vec<u8>>);

    fn records(batches: &[Bytes]) -> Vec<Rec> {
        let mut out = vec![];
        for b in batches {
            let mut b = b.clone();
            for r in decode_batch(&mut b, 1 << 24).expect("decodes") {
                out.push((
                    r.offset,
                    r.key.map(|k| k.to_vec()),
                    r.value.map(|v| v.to_vec()),
                ));
            }
        }
        out
    }

    fn keyed(recs: &[(&str, Option<String>)], ts: i64, codec: Compression) -> Vec<u8> {
        let rs: Vec<build::Record<'_>> = recs
            .iter()
            .map(|(k, v)| build::Record {
                key: Some(k.as_bytes()),
                value: v.as_deref().map(str::as_bytes),
                headers: &[],
                timestamp_ms: ts,
            })
            .collect();
        let mut b = build::BatchBuilder::new(build::BatchOptions {
            compression: codec,
            ..Default::default()
        });
        for r in &rs {
            b.push(r);
        }
        b.finish().expect("batch")
    }

    fn compacted_config() -> LogConfig {
        LogConfig {
            segment_bytes: 4 << 10,
            compaction: Some(CompactionConfig {
                delete_retention_ms: 1_000,
                min_cleanable_dirty_ratio: 0.0,
                ..Default::default()
            }),
            ..small_config()
        }
    }

    /// Appends 40 rounds over 12 keys (every 4th batch compressed, every 7th batch and the
    /// last two tombstones stamped `old_ts`), rolls, and appends a tail into the active segment.
    async fn fill(log: &PartitionLog, old_ts: i64) -> Vec<Rec> {
        let mut all = vec![];
        for round in 0..40 {
            let recs: Vec<(String, Option<String>)> = (0..3)
                .map(|i| {
                    let k = format!("k{}", (round * 3 + i) % 12);
                    let v = (round % 7 != 6 && round < 38)
                        .then(|| format!("v{round}-{i}-{}", "x".repeat(200)));
                    (k, v)
                })
                .collect();
            let refs: Vec<(&str, Option<String>)> =
                recs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            let codec = if round % 4 == 0 {
                Compression::Zstd
            } else {
                Compression::None
            };
            let ts = if round % 7 == 6 || round >= 38 {
                old_ts
            } else {
                2_000_000
            };
            let r = append(log, &keyed(&refs, ts, codec), Durability::Synced).await;
            for (i, (k, v)) in recs.into_iter().enumerate() {
                all.push((
                    r.base_offset.0 + i as i64,
                    Some(k.into_bytes()),
                    v.map(String::into_bytes),
                ));
            }
        }
        log.roll().await.unwrap();
        let r = append(
            log,
            &keyed(&[("k0", Some("tail".into()))], 2_000_000, Compression::None),
            Durability::Synced,
        )
        .await;
        all.push((
            r.base_offset.0,
            Some(b"k0".to_vec()),
            Some(b"tail".to_vec()),
        ));
        all
    }

    /// What a full pass leaves: the latest record of each key below `sealed_end` (tombstones
    /// gone when `drop_tombstones`), and everything from `sealed_end` on.
    fn expected(all: &[Rec], sealed_end: i64, drop_tombstones: bool) -> Vec<Rec> {
        let mut latest: HashMap<Vec<u8>, i64> = HashMap::new();
        for (o, k, _) in all.iter().filter(|r| r.0 < sealed_end) {
            latest.insert(k.clone().unwrap(), *o);
        }
        all.iter()
            .filter(|(o, k, v)| {
                *o >= sealed_end
                    || (latest[k.as_ref().unwrap()] == *o && (v.is_some() || !drop_tombstones))
            })
            .cloned()
            .collect()
    }

    /// Survivors are original records at their original offsets, in offset order; every latest
    /// record (and the active segment) survives.
    fn consistent(got: &[Rec], all: &[Rec], sealed_end: i64) -> bool {
        let must = expected(all, sealed_end, false);
        got.windows(2).all(|w| w[0].0 < w[1].0)
            && got.iter().all(|r| all.contains(r))
            && must
                .iter()
                .filter(|r| r.2.is_some())
                .all(|r| got.contains(r))
    }

    #[test]
    fn compaction_keeps_the_latest_value_per_key_at_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let log = open(&d, compacted_config()).await;
            let all = fill(&log, 2_000_000).await;
            let sealed_end = log.log_end_offset().0 - 1;
            let segments = log.segment_count();
            assert!(segments > 3, "{segments} segments");
            let before = log.size_bytes();
            // Young tombstones stay (delete.retention.ms not over).
            let now = 2_000_500;
            let rep = log.compact(now).await.unwrap().expect("a pass ran");
            assert_eq!(rep.cleaned_to.0, sealed_end);
            assert!(!rep.more);
            let got = records(&read_all(&log, Offset(0), 1 << 20).await);
            assert_eq!(got, expected(&all, sealed_end, false));
            assert!(
                log.size_bytes() < before / 4,
                "{} of {before}",
                log.size_bytes()
            );
            // Outputs are grouped by the inputs' sizes (as Kafka does): full segments stay
            // apart at the first pass, and merge once they are small.
            assert_eq!(log.segment_count(), segments);
            // Nothing dirty: no second pass.
            assert_eq!(log.compact(now).await.unwrap(), None);
            // Past delete.retention.ms the tombstones go, at the next pass over the segment.
            log.state.borrow_mut().cleaner.first_dirty = Offset(0);
            let rep = log
                .compact(1_000_000_000)
                .await
                .unwrap()
                .expect("a pass ran");
            assert!(rep.tombstones_removed > 0, "{rep:?}");
            let got = records(&read_all(&log, Offset(0), 1 << 20).await);
            assert_eq!(got, expected(&all, sealed_end, true));
            assert_eq!(log.segment_count(), 2, "small cleaned segments merged");
            // Survives a clean restart and a crash (no close).
            log.close().await.unwrap();
            drop(log);
            let log = open(&d, compacted_config()).await;
            assert_eq!(
                records(&read_all(&log, Offset(0), 1 << 20).await),
                expected(&all, sealed_end, true)
            );
            assert_eq!(log.cleaner_first_dirty().0, sealed_end);
            let r = append(
                &log,
                &keyed(
                    &[("k1", Some("after".into()))],
                    2_000_000,
                    Compression::None,
                ),
                Durability::Synced,
            )
            .await;
            assert_eq!(r.base_offset.0, sealed_end + 1);
            drop(log);
            // Index files gone: rebuilt by a scan that allows the gaps.
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "index") {
                    std::fs::remove_file(p).unwrap();
                }
            }
            let log = open(&d, compacted_config()).await;
            let got = records(&read_all(&log, Offset(0), 1 << 20).await);
            assert_eq!(got.len(), expected(&all, sealed_end, true).len() + 1);
            // Reads starting inside a gap (and small reads) land on the next survivor.
            for start in 0..sealed_end {
                let r = log
                    .read(crate::storage::ReadOptions {
                        start: Offset(start),
                        bytes_max: 1,
                    })
                    .await
                    .unwrap();
                let first = records(&r.batches);
                assert!(
                    first.iter().any(|x| x.0 >= start),
                    "nothing at or after {start}"
                );
            }
            log.close().await.unwrap();
        });
    }

    // The shard's descriptor pool closes the cleaned segments' descriptors; reopened, they
    // are found under their own names (renamed from `.cleaned` by the swap).
    #[test]
    fn cleaned_segments_reopen_under_their_names_after_their_descriptors_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            crate::storage::io::set_open_files_max(crate::storage::io::OPEN_FILES_MIN);
            let log = open(&d.join("log"), compacted_config()).await;
            let all = fill(&log, 2_000_000).await;
            let sealed_end = log.log_end_offset().0 - 1;
            log.compact(2_000_500).await.unwrap().expect("a pass ran");
            // Other logs take every descriptor of the pool.
            let mut others = vec![];
            for i in 0..2 * crate::storage::io::OPEN_FILES_MIN {
                let o = open(&d.join(format!("other-{i}")), compacted_config()).await;
                append(
                    &o,
                    &keyed(&[("k", Some("v".into()))], 1, Compression::None),
                    Durability::Synced,
                )
                .await;
                others.push(o);
            }
            let got = records(&read_all(&log, Offset(0), 1 << 20).await);
            assert_eq!(got, expected(&all, sealed_end, false));
        });
    }

    #[test]
    fn a_full_map_cleans_in_several_passes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let log = open(&d, compacted_config()).await;
            let all = fill(&log, 2_000_000).await;
            let sealed_end = log.log_end_offset().0 - 1;
            MAP_BYTES_LIMIT.with(|l| l.set(Some(5 * (MAP_ENTRY_OVERHEAD_BYTES + 3))));
            let mut passes = 0;
            while let Some(rep) = log.compact(2_000_500).await.unwrap() {
                passes += 1;
                assert!(passes < 100);
                if !rep.more {
                    break;
                }
            }
            MAP_BYTES_LIMIT.with(|l| l.set(None));
            assert!(passes > 3, "{passes} passes");
            let got = records(&read_all(&log, Offset(0), 1 << 20).await);
            assert_eq!(got, expected(&all, sealed_end, false));
            log.close().await.unwrap();
        });
    }

    #[test]
    fn the_lag_and_the_dirty_ratio_hold_a_pass_back() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let mut cfg = compacted_config();
            cfg.compaction.as_mut().unwrap().min_compaction_lag_ms = 10_000;
            let log = open(&d, cfg.clone()).await;
            fill(&log, 2_000_000).await;
            // Records stamped 2,000,000: younger than the lag at 2,005,000.
            assert_eq!(log.compact(2_005_000).await.unwrap(), None);
            assert!(log.compact(2_010_000).await.unwrap().is_some());
            // The pass stamped the tombstones it kept: the next is due at their horizon.
            assert_eq!(log.compact(2_010_999).await.unwrap(), None);
            let rep = log
                .compact(2_011_000)
                .await
                .unwrap()
                .expect("due at the horizon");
            assert!(rep.tombstones_removed > 0, "{rep:?}");
            // Now all clean: a ratio of 0.9 waits for more dirty data, unless overdue.
            let mut c = cfg.compaction.clone().unwrap();
            c.min_cleanable_dirty_ratio = 0.9;
            c.max_compaction_lag_ms = Some(50_000);
            log.set_config(LogConfig {
                compaction: Some(c),
                ..cfg.clone()
            });
            for i in 0..5 {
                append(
                    &log,
                    &keyed(
                        &[("k1", Some(format!("n{i}")))],
                        2_000_000,
                        Compression::None,
                    ),
                    Durability::Synced,
                )
                .await;
            }
            log.roll().await.unwrap();
            assert_eq!(log.compact(2_020_000).await.unwrap(), None);
            assert!(log.compact(2_060_000).await.unwrap().is_some(), "overdue");
            log.close().await.unwrap();
        });
    }

    #[test]
    fn keyless_records_and_control_batches() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let log = open(&d, compacted_config()).await;
            let keyless = build::single(None, Some(b"nokey"), 2_000_000);
            append(&log, &keyless, Durability::Synced).await;
            let ctl =
                crate::storage::control_batch(crate::storage::CONTROL_RAFT_NOOP, &[], 0, 2_000_000);
            log.append_replicated(
                BytesMut_from(&ctl, log.log_end_offset()),
                Durability::Synced,
            )
            .await
            .unwrap();
            append(
                &log,
                &keyed(&[("a", Some("1".into()))], 2_000_000, Compression::None),
                Durability::Synced,
            )
            .await;
            log.roll().await.unwrap();
            log.compact(3_000_000).await.unwrap().expect("a pass");
            let got = read_all(&log, Offset(0), 1 << 20).await;
            assert_eq!(got.len(), 2, "keyless record dropped, control batch kept");
            assert!(BatchHeader::parse(&got[0]).unwrap().is_control());
            log.close().await.unwrap();
        });
    }

    #[allow(non_snake_case)]
    fn BytesMut_from(b: &[u8], base: Offset) -> bytes::BytesMut {
        let mut m = bytes::BytesMut::from(b);
        batch::set_base_offset(&mut m, base);
        m
    }

    /// A kill at every step of a pass — each file operation of the rewrite under the power-cut
    /// model, then each step of the swap — reopens to the old segments or the new ones: every
    /// record read back is an original record at its offset, every latest value is there, no
    /// offset twice, no `.cleaned` file or swap marker left; and a pass after it finishes the
    /// job.
    #[test]
    fn a_crash_at_any_step_of_a_pass_loses_nothing_and_duplicates_nothing() {
        let cases = (0..12u32)
            .map(|n| (Some(n), None))
            .chain((0..10u32).map(|k| (None, Some(k))));
        for (io_ops, swap_steps) in cases {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().to_path_buf();
            run(async move {
                let power = Faults::default();
                power.model_power.set(true);
                let (log, faults) =
                    open_with_faults(&d, compacted_config(), Clock::system(), power).await;
                let all = fill(&log, 2_000_000).await;
                let sealed_end = log.log_end_offset().0 - 1;
                faults.crash_after_ops.set(io_ops);
                SWAP_STOP_AFTER.with(|s| s.set(swap_steps));
                let r = log.compact(2_000_500).await;
                SWAP_STOP_AFTER.with(|s| s.set(None));
                faults.crashed.set(true);
                let weak = Rc::downgrade(&log);
                drop(log);
                crate::storage::tests::poll_until("the log to be gone", || {
                    weak.upgrade().is_none()
                })
                .await;
                faults.power_cut().unwrap();
                let log = open(&d, compacted_config()).await;
                let got = records(&read_all(&log, Offset(0), 1 << 20).await);
                assert!(
                    consistent(&got, &all, sealed_end),
                    "io ops {io_ops:?}, swap steps {swap_steps:?} ({r:?}): {} records",
                    got.len()
                );
                for e in std::fs::read_dir(&d).unwrap() {
                    let name = e.unwrap().file_name().into_string().unwrap();
                    assert!(
                        !name.ends_with(".cleaned") && name != SWAP_FILE,
                        "{name} left"
                    );
                }
                log.state.borrow_mut().cleaner.first_dirty = Offset(0);
                log.compact(2_000_500).await.unwrap().expect("a pass");
                let got = records(&read_all(&log, Offset(0), 1 << 20).await);
                assert_eq!(got, expected(&all, sealed_end, false));
                log.close().await.unwrap();
            });
        }
    }

    #[test]
    fn swap_marker_round_trips_and_refuses_bad_counts() {
        let old = vec![Offset(0), Offset(10), Offset(20)];
        let new = vec![Offset(0)];
        let ckpt = CleanerState {
            first_dirty: Offset(30),
            aborts_cleared_below: Offset(12),
            next_horizon: Some(99),
            running: false,
        }
        .checkpoint();
        let b = encode_swap(&old, &new, &ckpt);
        assert_eq!(
            decode_swap(&b),
            Some((old.clone(), new.clone(), Some(ckpt)))
        );
        assert_eq!(
            decode_checkpoint(&ckpt),
            Some((Offset(30), Offset(12), Some(99)))
        );
        // Markers and checkpoints written before the checkpoint's new fields still read.
        let short = &b[..b.len() - CHECKPOINT_BYTES];
        assert_eq!(decode_swap(short), Some((old, new, None)));
        assert_eq!(
            decode_checkpoint(&7i64.to_be_bytes()),
            Some((Offset(7), Offset(0), None))
        );
        let mut huge = b.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_swap(&huge), None);
        assert_eq!(decode_swap(&b[..b.len() - 1]), None);
        assert_eq!(decode_swap(&[]), None);
        assert_eq!(decode_checkpoint(&ckpt[..20]), None);
    }

    /// The batches of `log` with their headers: (base offset, control, delete horizon) and
    /// the records of each.
    async fn batches_of(log: &PartitionLog) -> Vec<((i64, bool, Option<i64>), Vec<Rec>)> {
        read_all(log, Offset(0), 1 << 20)
            .await
            .iter()
            .map(|b| {
                let h = BatchHeader::parse_checked(b).expect("a valid batch, CRC included");
                (
                    (h.base_offset().0, h.is_control(), h.delete_horizon_ms()),
                    records(std::slice::from_ref(b)),
                )
            })
            .collect()
    }

    /// KIP-534: a tombstone is kept by the first pass that sees it, whatever its timestamp, and
    /// its batch is stamped with the delete horizon (now + delete.retention.ms: the attribute
    /// set, the base timestamp replaced, the record timestamps unchanged, the CRC valid). The
    /// first pass at or after the horizon removes it; that pass is due even with nothing
    /// dirty, and the horizon survives a crash.
    #[test]
    fn a_tombstone_goes_delete_retention_ms_after_the_pass_that_first_kept_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let log = open(&d, compacted_config()).await;
            let v = |s: &str| Some(s.to_string());
            // Produced with an old CreateTime: its age does not count, only the horizon.
            append(
                &log,
                &keyed(&[("a", v("1")), ("b", v("2"))], 1_000, Compression::None),
                Durability::Synced,
            )
            .await;
            append(
                &log,
                &keyed(&[("c", v("3")), ("a", None)], 1_500, Compression::Zstd),
                Durability::Synced,
            )
            .await;
            log.roll().await.unwrap();
            append(
                &log,
                &keyed(&[("b", v("tail"))], 1_000, Compression::None),
                Durability::Synced,
            )
            .await;
            let now = 5_000_000;
            let rep = log.compact(now).await.unwrap().expect("a pass");
            assert_eq!(
                (rep.tombstones_removed, rep.records_removed),
                (0, 1),
                "{rep:?}"
            );
            let got = batches_of(&log).await;
            let stamped = &got[1];
            assert_eq!(stamped.0, (2, false, Some(now + 1_000)));
            let mut b = read_all(&log, Offset(2), 1).await[0].clone();
            let recs = decode_batch(&mut b, 1 << 20).unwrap();
            assert_eq!(
                recs.iter()
                    .map(|r| (r.offset, r.timestamp_ms))
                    .collect::<Vec<_>>(),
                vec![(2, 1_500), (3, 1_500)],
                "record timestamps survive the new base timestamp"
            );
            assert_eq!(stamped.1[1], (3, Some(b"a".to_vec()), None));
            // Nothing dirty and the horizon not reached: no pass.
            assert_eq!(log.compact(now + 999).await.unwrap(), None);
            drop(log); // a crash: the horizon is in the checkpoint
            let log = open(&d, compacted_config()).await;
            assert_eq!(log.compact(now + 999).await.unwrap(), None);
            let rep = log
                .compact(now + 1_000)
                .await
                .unwrap()
                .expect("due at the horizon");
            assert_eq!(rep.tombstones_removed, 1, "{rep:?}");
            let got: Vec<Rec> = batches_of(&log)
                .await
                .into_iter()
                .flat_map(|b| b.1)
                .collect();
            assert_eq!(
                got,
                vec![
                    (0, Some(b"a".to_vec()), None).clone(),
                    (1, Some(b"b".to_vec()), Some(b"2".to_vec())),
                    (2, Some(b"c".to_vec()), Some(b"3".to_vec())),
                    (4, Some(b"b".to_vec()), Some(b"tail".to_vec())),
                ]
                .into_iter()
                .filter(|r| r.2.is_some())
                .collect::<Vec<_>>()
            );
            // Nothing left to wait for.
            assert_eq!(log.compact(i64::MAX / 2).await.unwrap(), None);
            log.close().await.unwrap();
        });
    }

    /// A transactional producer's keyed batch.
    fn txn_keyed(pid: i64, seq: i32, recs: &[(&str, Option<&str>)], ts: i64) -> Vec<u8> {
        let mut b = build::BatchBuilder::new(build::BatchOptions {
            producer_id: pid,
            producer_epoch: 0,
            base_sequence: seq,
            transactional: true,
            ..Default::default()
        });
        for (k, v) in recs {
            b.push(&build::Record {
                key: Some(k.as_bytes()),
                value: v.map(str::as_bytes),
                headers: &[],
                timestamp_ms: ts,
            });
        }
        b.finish().expect("batch")
    }

    /// What a read_committed consumer sees of `batches` (as the Java client and librdkafka
    /// filter): the records below `lso`, minus those of the aborted transactions listed.
    fn read_committed(log: &PartitionLog, batches: &[Bytes]) -> Vec<Rec> {
        let lso = log.last_stable_offset();
        let mut aborted = log.aborted_between(Offset(0), lso);
        aborted.sort_by_key(|a| a.first);
        let mut aborted = std::collections::VecDeque::from(aborted);
        let mut skipping = std::collections::HashSet::new();
        let mut out = vec![];
        for b in batches {
            let h = BatchHeader::parse(b).unwrap();
            if h.base_offset() >= lso {
                break;
            }
            while aborted.front().is_some_and(|a| a.first <= h.last_offset()) {
                skipping.insert(aborted.pop_front().unwrap().producer_id);
            }
            if h.is_control() {
                if txn_index::marker_type(&h) == Some(CONTROL_ABORT) {
                    skipping.remove(&h.producer_id());
                }
                continue;
            }
            if h.is_transactional() && skipping.contains(&h.producer_id()) {
                continue;
            }
            out.extend(records(std::slice::from_ref(b)));
        }
        out
    }

    /// Transactional compaction: the data of aborted transactions goes at the first pass;
    /// committed transactional records supersede and are superseded like any others; a marker
    /// goes once its transaction has no data left and its delete horizon has passed, and an
    /// aborted transaction leaves the aborted index with its marker (also after a crash, from
    /// a transaction snapshot that still lists it). Offsets never change, nothing at or past
    /// the last stable offset is cleaned, and read_committed and read_uncommitted views are
    /// the same before and after every pass.
    #[test]
    fn aborted_data_and_spent_markers_are_removed_and_both_isolation_levels_hold() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let mut cfg = compacted_config();
            cfg.segment_bytes = 1 << 20;
            let log = open(&d, cfg.clone()).await;
            let ts = 1_000;
            let plain =
                |k: &str, v: &str| keyed(&[(k, Some(v.to_string()))], ts, Compression::None);
            let marker = |pid, commit| marker_batch(pid, 0, commit, ts);
            let mut off = vec![];
            for b in [
                plain("k3", "p0"), // 0
                txn_keyed(
                    7,
                    0,
                    &[("k1", Some("aborted")), ("k2", Some("aborted"))],
                    ts,
                ), // 1-2
                txn_keyed(8, 0, &[("k3", Some("c1"))], ts), // 3
                marker(7, false),  // 4
                marker(8, true),   // 5
                txn_keyed(8, 1, &[("k3", Some("c2")), ("k4", None)], ts), // 6-7
                marker(8, true),   // 8
                plain("k1", "v1"), // 9
            ] {
                off.push(append(&log, &b, Durability::Synced).await.base_offset.0);
            }
            assert_eq!(off, vec![0, 1, 3, 4, 5, 6, 8, 9]);
            log.roll().await.unwrap();
            // A transaction still open in a sealed segment: that segment is not cleaned.
            let open_at = append(
                &log,
                &txn_keyed(10, 0, &[("k1", Some("open"))], ts),
                Durability::Synced,
            )
            .await
            .base_offset;
            log.roll().await.unwrap();
            append(&log, &plain("k9", "tail"), Durability::Synced).await;
            assert_eq!(log.last_stable_offset(), open_at);
            let committed_view =
                |log: &PartitionLog, batches: &[Bytes]| read_committed(log, batches);
            let before = read_all(&log, Offset(0), 1 << 20).await;
            let view = committed_view(&log, &before);
            assert_eq!(
                view.iter().map(|r| r.0).collect::<Vec<_>>(),
                vec![0, 3, 6, 7, 9],
                "read_committed before cleaning"
            );

            let now = 5_000_000;
            let rep = log.compact(now).await.unwrap().expect("a pass");
            assert_eq!(rep.aborted_batches_removed, 1, "{rep:?}");
            assert_eq!(rep.markers_removed, 0, "{rep:?}");
            let got = batches_of(&log).await;
            let heads: Vec<_> = got.iter().map(|g| g.0).collect();
            let hz = Some(now + 1_000);
            assert_eq!(
                heads,
                vec![
                    (4, true, hz),   // ABORT: its data is gone, stamped
                    (5, true, hz),   // COMMIT: its record superseded by offset 6
                    (6, false, hz),  // keeps the tombstone of k4
                    (8, true, None), // COMMIT: its transaction still has data
                    (9, false, None),
                    (open_at.0, false, None),
                    (open_at.0 + 1, false, None),
                ],
            );
            assert_eq!(log.last_stable_offset(), open_at);
            let after = read_all(&log, Offset(0), 1 << 20).await;
            // Everything a read_committed consumer sees is what it saw, less superseded keys.
            let now_view = committed_view(&log, &after);
            assert_eq!(
                now_view.iter().map(|r| r.0).collect::<Vec<_>>(),
                vec![6, 7, 9]
            );
            assert!(now_view.iter().all(|r| view.contains(r)));
            // read_uncommitted no longer sees the aborted records.
            let uncommitted = records(&after);
            assert!(!uncommitted
                .iter()
                .any(|r| r.2.as_deref() == Some(b"aborted".as_slice())));
            assert_eq!(
                log.aborted_between(Offset(0), open_at).len(),
                1,
                "until its marker goes"
            );

            // The horizon passes: both spent markers and the tombstone go, the aborted
            // transaction leaves the index.
            assert_eq!(log.compact(now + 999).await.unwrap(), None);
            let rep = log
                .compact(now + 1_000)
                .await
                .unwrap()
                .expect("due at the horizon");
            assert_eq!(
                (rep.markers_removed, rep.tombstones_removed),
                (2, 1),
                "{rep:?}"
            );
            assert!(log
                .aborted_between(Offset(0), log.high_watermark())
                .is_empty());
            let heads: Vec<_> = batches_of(&log).await.iter().map(|g| g.0).collect();
            assert_eq!(
                heads,
                vec![
                    (6, false, hz),
                    (8, true, None),
                    (9, false, None),
                    (open_at.0, false, None),
                    (open_at.0 + 1, false, None),
                ],
            );
            let after = read_all(&log, Offset(0), 1 << 20).await;
            assert_eq!(
                committed_view(&log, &after)
                    .iter()
                    .map(|r| r.0)
                    .collect::<Vec<_>>(),
                vec![6, 9]
            );

            // A crash: the transaction snapshot of the last roll still lists the aborted
            // transaction; the checkpoint keeps it out.
            drop(log);
            let log = open(&d, cfg.clone()).await;
            assert!(log
                .aborted_between(Offset(0), log.high_watermark())
                .is_empty());
            assert_eq!(log.last_stable_offset(), open_at);
            // The open transaction aborts: once the log rolls past it, its segment is
            // cleanable and its data goes.
            append(&log, &marker(10, false), Durability::Synced).await;
            assert_eq!(log.last_stable_offset(), log.high_watermark());
            log.roll().await.unwrap();
            append(&log, &plain("k9", "tail2"), Durability::Synced).await;
            let rep = log.compact(now + 2_000).await.unwrap().expect("a pass");
            assert_eq!(rep.aborted_batches_removed, 1, "{rep:?}");
            let after = read_all(&log, Offset(0), 1 << 20).await;
            let all = records(&after);
            assert!(
                !all.iter().any(|r| r.0 == open_at.0),
                "aborted data of pid 10 gone"
            );
            assert_eq!(
                committed_view(&log, &after)
                    .iter()
                    .map(|r| r.0)
                    .collect::<Vec<_>>(),
                vec![6, 9, open_at.0 + 1, open_at.0 + 3],
            );
            log.close().await.unwrap();
        });
    }

    /// What a replicated log's entries are made of, batch by batch: offsets, leader epoch,
    /// producer fields, control and transactional bits.
    type Entry = (i64, i64, i32, i64, i16, i32, bool, bool);

    fn entries_of(batches: &[Bytes]) -> Vec<Entry> {
        batches
            .iter()
            .map(|b| {
                let h = BatchHeader::parse_checked(b).expect("a valid batch, CRC included");
                (
                    h.base_offset().0,
                    h.last_offset().0,
                    h.partition_leader_epoch(),
                    h.producer_id(),
                    h.producer_epoch(),
                    h.base_sequence(),
                    h.is_control(),
                    h.is_transactional(),
                )
            })
            .collect()
    }

    /// On a replicated log a pass never drops a batch: one that keeps no record is an empty
    /// shell at the same offsets, with the same leader epoch and producer fields and a valid
    /// CRC; nothing at or past the committed bound is cleaned; the log reopens the same.
    #[test]
    fn a_replicated_pass_keeps_every_batch_and_empties_the_spent_ones() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let log = open(&d, compacted_config()).await;
            let all = fill(&log, 2_000_000).await;
            let sealed_end = log.log_end_offset().0 - 1;
            let before = read_all(&log, Offset(0), 1 << 20).await;
            let entries = entries_of(&before);
            // Nothing committed: nothing to clean.
            assert_eq!(
                log.compact_replicated(2_000_500, Offset(0)).await.unwrap(),
                None
            );
            let rep = log
                .compact_replicated(2_000_500, Offset(sealed_end))
                .await
                .unwrap()
                .expect("a pass ran");
            assert_eq!(rep.batches_removed, 0, "{rep:?}");
            assert!(rep.batches_emptied > 0, "{rep:?}");
            let after = read_all(&log, Offset(0), 1 << 20).await;
            assert_eq!(entries_of(&after), entries, "every batch at its offsets");
            assert_eq!(
                records(&after),
                expected(&all, sealed_end, false),
                "the latest record of each key"
            );
            let shells: Vec<&Bytes> = after
                .iter()
                .filter(|b| BatchHeader::parse(b).unwrap().record_count() == 0)
                .collect();
            assert_eq!(shells.len() as u64, rep.batches_emptied);
            for b in &shells {
                let h = BatchHeader::parse_checked(b).unwrap();
                assert_eq!(
                    (b.len(), h.compression(), h.delete_horizon_ms()),
                    (HEADER_BYTES, 0, None)
                );
            }
            // Past the horizon the tombstones go: their batches become shells too.
            log.state.borrow_mut().cleaner.first_dirty = Offset(0);
            let rep = log
                .compact_replicated(1_000_000_000, Offset(sealed_end))
                .await
                .unwrap()
                .expect("a pass ran");
            assert!(rep.tombstones_removed > 0, "{rep:?}");
            let after = read_all(&log, Offset(0), 1 << 20).await;
            assert_eq!(entries_of(&after), entries);
            assert_eq!(records(&after), expected(&all, sealed_end, true));
            // A crash (no close): the log reopens with the same batches.
            drop(log);
            let log = open(&d, compacted_config()).await;
            let reopened = read_all(&log, Offset(0), 1 << 20).await;
            assert_eq!(entries_of(&reopened), entries);
            assert_eq!(records(&reopened), expected(&all, sealed_end, true));
            log.close().await.unwrap();
        });
    }

    /// On a replicated log aborted data becomes shells at the first pass and transaction
    /// markers stay verbatim (a follower rebuilds its transaction state from them), so the
    /// read_committed view holds and the last stable offset does not move.
    #[test]
    fn a_replicated_pass_keeps_markers_and_empties_aborted_data() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(async move {
            let mut cfg = compacted_config();
            cfg.segment_bytes = 1 << 20;
            let log = open(&d, cfg.clone()).await;
            let ts = 1_000;
            for b in [
                keyed(&[("k3", Some("p0".into()))], ts, Compression::None), // 0
                txn_keyed(7, 0, &[("k1", Some("aborted")), ("k2", None)], ts), // 1-2
                txn_keyed(8, 0, &[("k3", Some("c1"))], ts),                 // 3
                marker_batch(7, 0, false, ts),                              // 4
                marker_batch(8, 0, true, ts),                               // 5
                keyed(&[("k3", Some("v1".into()))], ts, Compression::Lz4),  // 6
            ] {
                append(&log, &b, Durability::Synced).await;
            }
            log.roll().await.unwrap();
            append(
                &log,
                &keyed(&[("k9", Some("tail".into()))], ts, Compression::None),
                Durability::Synced,
            )
            .await;
            let before = read_all(&log, Offset(0), 1 << 20).await;
            let view = read_committed(&log, &before);
            for now in [5_000_000, 1_000_000_000] {
                log.state.borrow_mut().cleaner.first_dirty = Offset(0);
                let rep = log
                    .compact_replicated(now, log.log_end_offset())
                    .await
                    .unwrap()
                    .expect("a pass");
                assert_eq!(
                    (rep.batches_removed, rep.markers_removed),
                    (0, 0),
                    "{rep:?}"
                );
                let after = read_all(&log, Offset(0), 1 << 20).await;
                assert_eq!(entries_of(&after), entries_of(&before));
                let counts: Vec<i32> = after
                    .iter()
                    .map(|b| BatchHeader::parse(b).unwrap().record_count())
                    .collect();
                assert_eq!(counts, vec![0, 0, 0, 1, 1, 1, 1]);
                assert_eq!(&after[3], &before[3], "ABORT marker verbatim");
                assert_eq!(&after[4], &before[4], "COMMIT marker verbatim");
                let now_view = read_committed(&log, &after);
                assert_eq!(now_view.iter().map(|r| r.0).collect::<Vec<_>>(), vec![6, 7]);
                assert!(now_view.iter().all(|r| view.contains(r)));
                assert_eq!(log.last_stable_offset(), log.high_watermark());
            }
            log.close().await.unwrap();
        });
    }
}
