//! Log compaction (`cleanup.policy=compact`): the cleaner keeps the latest record of every key in
//! the sealed segments of a log, drops tombstones older than `delete.retention.ms`, and swaps the
//! rewritten segments in crash-safely. Runs on the partition's shard, in the shard's cleaner task
//! (one log at a time per shard); it never touches the active segment, so appends never wait for
//! it. Owns [`CleanerState`] (the first dirty offset and whether a pass runs).
//!
//! A pass:
//! 1. **Plan.** The sealed segments older than `min.compaction.lag.ms` (by their largest
//!    timestamp) are cleanable. The part of them at or past the first dirty offset (the end of
//!    the previous pass) is dirty; the pass runs when dirty bytes / cleanable bytes reach
//!    `min.cleanable.dirty.ratio`, or when the first dirty segment's records are all older than
//!    `max.compaction.lag.ms`.
//! 2. **Map.** The dirty batches are read in offset order into a key -> latest offset map bounded
//!    by [`CLEANER_MAP_BYTES_MAX`]; when it is full the map ends at a batch boundary (`map_end`)
//!    and the rest stays dirty for the next pass.
//! 3. **Rewrite.** Every cleanable segment from the log start up to the one holding `map_end` is
//!    rewritten into `<base>.log.cleaned` files: a record is dropped if the map holds a later
//!    offset for its key, if it has no key (Kafka's cleaner does the same), or if it is a
//!    tombstone (null value) in a batch whose largest timestamp is older than
//!    `delete.retention.ms`. Records at or past `map_end`, control batches and transactional
//!    batches are kept as they are. A batch that keeps every record is copied verbatim; one that
//!    keeps none is left out (its offsets become a gap no later batch reuses); otherwise it is
//!    rebuilt from the kept records' bytes with its base offset, `lastOffsetDelta`, timestamps
//!    and producer fields unchanged, so every surviving record keeps its offset (recompressed
//!    only then, with its own codec). Consecutive segments whose original sizes fit in
//!    `segment.bytes` are merged into one output named after the first.
//! 4. **Swap** (synchronous, so no append, roll or retention interleaves): check that the
//!    segments are still the ones read, write the swap marker [`SWAP_FILE`] (old and new bases),
//!    replace the segments in memory, remove the old index files and the old segments that are
//!    not outputs, rename each `.cleaned` file over its base, fsync the directory, write the new
//!    index files and the first-dirty checkpoint, remove the marker. [`recover`] (at open)
//!    finishes a swap whose marker it finds and removes every `.cleaned` file otherwise, so a
//!    crash at any point leaves either the old segments or the new ones, never both.

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
    /// A pass is running (passes of one log never overlap).
    running: bool,
}

impl CleanerState {
    /// At open: the checkpointed first dirty offset, if any.
    pub fn recovered(dir: &Path) -> Self {
        let first_dirty = meta::read_file(&dir.join(CHECKPOINT_FILE))
            .and_then(|b| b.try_into().ok())
            .map(|a: [u8; 8]| Offset(i64::from_be_bytes(a)))
            .unwrap_or(Offset(0));
        CleanerState {
            first_dirty,
            running: false,
        }
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
    pub batches_removed: u64,
    pub batches_rewritten: u64,
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

fn encode_swap(old: &[Offset], new: &[Offset]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 8 * (old.len() + new.len()));
    for list in [old, new] {
        v.extend_from_slice(&(list.len() as u32).to_be_bytes());
        for b in list {
            v.extend_from_slice(&b.0.to_be_bytes());
        }
    }
    v
}

fn decode_swap(b: &[u8]) -> Option<(Vec<Offset>, Vec<Offset>)> {
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
    (at == b.len()).then_some((old, new))
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
            Some((old, new)) => {
                tracing::info!(
                    dir = %dir.display(), old = old.len(), new = new.len(),
                    "finishing a log-cleaner swap interrupted by a crash"
                );
                finish_swap(dir, &old, &new, &mut Steps::unlimited())?;
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
}

#[derive(Default)]
struct Counts {
    records_removed: u64,
    tombstones_removed: u64,
}

fn clean_batch(
    b: &Bytes,
    map: &OffsetMap,
    map_end: Offset,
    tombstone_horizon_ms: i64,
    counts: &mut Counts,
) -> Result<Verdict, StorageError> {
    let h = BatchHeader::parse(b).map_err(StorageError::Corrupt)?;
    // Control and transactional batches stay as they are: their markers and the records they
    // commit or abort must keep each other company. They are left out of the key map too, so a
    // transactional record (perhaps aborted) never displaces another; removing aborted
    // transactional data, as Kafka's cleaner does, is not done yet.
    if h.is_control() || h.is_transactional() || h.base_offset() >= map_end {
        return Ok(Verdict::Keep);
    }
    let (body, recs) = records_of(&h, b)?;
    let expired = h.max_timestamp() < tombstone_horizon_ms;
    let keep: Vec<&RawRecord> = recs
        .iter()
        .filter(|r| {
            if r.offset >= map_end.0 {
                return true;
            }
            let Some((a, z)) = r.key else {
                return false;
            };
            if map.get(&body[a..z]).is_some_and(|o| o > r.offset) {
                return false;
            }
            if r.null_value && expired {
                counts.tombstones_removed += 1;
                return false;
            }
            true
        })
        .collect();
    counts.records_removed += (recs.len() - keep.len()) as u64;
    if keep.len() == recs.len() {
        return Ok(Verdict::Keep);
    }
    if keep.is_empty() {
        return Ok(Verdict::Drop);
    }
    let mut section = Vec::with_capacity(keep.iter().map(|r| r.end - r.start).sum());
    for r in &keep {
        section.extend_from_slice(&body[r.start..r.end]);
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
    // Record count (the last header field); base offset, lastOffsetDelta, timestamps and
    // producer fields are unchanged, so surviving records keep their offsets.
    out[57..61].copy_from_slice(&(keep.len() as i32).to_be_bytes());
    batch::write_crc(&mut out);
    Ok(Verdict::Rewrite(out))
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
        {
            let mut s = self.state.borrow_mut();
            if s.cleaner.running || s.closed || s.config.compaction.is_none() {
                return Ok(None);
            }
            s.cleaner.running = true;
        }
        let r = self.compact_pass(now_ms).await;
        self.state.borrow_mut().cleaner.running = false;
        #[cfg(test)]
        let stopped = SWAP_STOP_AFTER.with(|s| s.get()).is_some();
        #[cfg(not(test))]
        let stopped = false;
        if r.is_err() && !stopped {
            // Outputs of a failed pass; the old segments are untouched.
            if let Err(e) = self.remove_cleaned_files() {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove .cleaned files");
            }
        }
        r
    }

    fn remove_cleaned_files(&self) -> std::io::Result<()> {
        if self.dir.join(SWAP_FILE).exists() {
            // A swap stopped after its marker: the next open finishes it.
            return Ok(());
        }
        for e in std::fs::read_dir(&self.dir)? {
            let name = e?.file_name();
            if name.to_str().is_some_and(|n| n.ends_with(".cleaned")) {
                meta::remove_if_exists(&self.dir.join(&name))?;
            }
        }
        Ok(())
    }

    async fn compact_pass(&self, now_ms: i64) -> Result<Option<CleanReport>, StorageError> {
        let (cfg, segment_bytes, interval, planned, first_dirty) = {
            let s = self.state.borrow();
            let cfg = s.config.compaction.clone().expect("checked by compact");
            let sealed = &s.segments[..s.segments.len() - 1];
            let lag_limit = now_ms.saturating_sub(cfg.min_compaction_lag_ms as i64);
            // Cleanable: the sealed segments, in order, whose records are all past the lag.
            let planned: Vec<Planned> = sealed
                .iter()
                .take_while(|g| g.max_ts().0 <= lag_limit)
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
            (
                cfg,
                s.config.segment_bytes,
                s.config.index_interval_bytes,
                planned,
                first_dirty,
            )
        };
        let Some(cleanable_end) = planned.last().map(|p| p.next) else {
            return Ok(None);
        };
        if cleanable_end <= first_dirty {
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
        if ratio < cfg.min_cleanable_dirty_ratio && !overdue {
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
                    if !(h.is_control() || h.is_transactional()) {
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
        let horizon = now_ms.saturating_sub(cfg.delete_retention_ms as i64);
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
        let mut counts = Counts::default();
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
                        match clean_batch(&b, &map, map_end, horizon, &mut counts)? {
                            Verdict::Keep => out.push(&b).await?,
                            Verdict::Drop => report.batches_removed += 1,
                            Verdict::Rewrite(nb) => {
                                report.batches_rewritten += 1;
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
        report.records_removed = counts.records_removed;
        report.tombstones_removed = counts.tombstones_removed;
        report.cleaned_to = map_end;
        if !self.swap(planned, outputs, map_end).await? {
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
        map_end: Offset,
    ) -> Result<bool, StorageError> {
        let _turn = self
            .log_start_turn
            .acquire_permit(1)
            .await
            .map_err(|_| StorageError::Io(std::io::Error::other("log is closed")))?;
        let mut steps = Steps::new();
        let old_bases: Vec<Offset> = old.iter().map(|p| p.base).collect();
        let new_bases: Vec<Offset> = outputs.iter().map(|g| g.base()).collect();
        if self.unchanged(old).is_none() {
            self.remove_cleaned_files()?;
            return Ok(false);
        }
        steps.step()?;
        let marker = self.dir.join(SWAP_FILE);
        let body = encode_swap(&old_bases, &new_bases);
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
            self.remove_cleaned_files()?;
            return Ok(false);
        };
        let index_files: Vec<[(PathBuf, Vec<u8>); 2]> = {
            let mut s = self.state.borrow_mut();
            let m = outputs.len();
            s.segments.splice(i0..i0 + old.len(), outputs);
            s.reads.clear();
            s.cleaner.first_dirty = s.cleaner.first_dirty.max(map_end);
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
                meta::write_file(&dir.join(CHECKPOINT_FILE), &map_end.0.to_be_bytes())?;
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
    use crate::storage::{Durability, LogConfig};
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
        let b = encode_swap(&old, &new);
        assert_eq!(decode_swap(&b), Some((old, new)));
        let mut huge = b.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_swap(&huge), None);
        assert_eq!(decode_swap(&b[..b.len() - 1]), None);
        assert_eq!(decode_swap(&[]), None);
    }
}
