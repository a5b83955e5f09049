//! One segment of a partition log: the `.log` file (batches verbatim, base offsets patched) and
//! its sparse offset and time indexes, kept in memory. The active segment appends its index
//! entries to `.index`/`.timeindex` once the batches they point at are fdatasynced, so crash
//! recovery can start scanning at the last of them: the segment hands out an [`IndexAppend`]
//! (the bytes and where they go), which runs on the blocking thread pool, never on the shard's
//! executor, and takes its outcome back ([`Segment::index_appended`]); at most one is in flight.
//! A sealed segment's index files are rewritten whole at roll and close. Also the batch scanner that validates a segment's bytes (recovery,
//! index rebuild, timestamp lookups). Owned by the partition log.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::protocol::batch::{self, BatchError, BatchHeader, HEADER_BYTES};
use crate::storage::io::{align_down, align_up, SegmentFile};
use crate::storage::meta;
use crate::types::Offset;

/// Index entries the active segment appends to its index files at once. Each append opens
/// and closes the two files (a partition holds no index descriptor between appends), so
/// appending after every fdatasync would cost two opens per sync and partition; batching them
/// lengthens a recovery scan by at most this many index intervals (64 KiB at the default
/// 4 KiB).
pub const INDEX_APPEND_BATCH: usize = 16;

/// Index plus time-index entries of one log's active segment that a clean-shutdown record
/// carries inline (those not yet appended to the index files): 12 or 16 bytes each in the
/// record. Index appends take entries 16 at a time, so a log rarely has more than a few dozen;
/// one with more is left out of the record and recovered by a scan.
pub const RECORD_TAIL_ENTRIES_MAX: usize = 4096;

/// See [`Segment::index_tail`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IndexTail {
    pub index_durable: u32,
    pub time_durable: u32,
    pub index: Vec<(u32, u32)>,
    pub time_index: Vec<(i64, u32)>,
}

/// Bytes read per request while scanning a segment; two requests are kept in flight.
pub const SCAN_CHUNK_BYTES: usize = 4 << 20;

/// Its fields are private: the log reads them through the getters below and changes them only
/// through the methods that keep offsets, positions and index entries consistent.
pub(crate) struct Segment {
    base: Offset,
    file: Rc<dyn SegmentFile>,
    /// Logical size: bytes of batches appended (for the active segment this includes batches
    /// still waiting in the appender).
    size: u64,
    /// The offset after the last batch.
    next: Offset,
    /// Sparse offset index: (offset - base, file position of the batch starting there).
    index: Vec<(u32, u32)>,
    /// Sparse time index: (largest timestamp so far, offset - base of the batch carrying it,
    /// its last offset).
    time_index: Vec<(i64, u32)>,
    bytes_since_index: u64,
    /// Largest batch max-timestamp in the segment and the last offset of that batch.
    max_ts: i64,
    max_ts_offset: Offset,
    created_ms: i64,
    /// Entries of `index` / `time_index` already appended to the segment's index files.
    index_durable: usize,
    time_durable: usize,
    /// Whether the index files were cut to the entries counted as durable since the segment
    /// became active (or its files were last rewritten): appends go after them. The files are
    /// opened for each append and closed after it, so a partition holds no index descriptor.
    /// After a failed append no more entries are appended for this segment: recovery then
    /// scans from the last entry that made it (entries are checksummed one by one).
    index_files_cut: bool,
    index_files_failed: bool,
    /// An [`IndexAppend`] taken from this segment has not come back yet: no other is taken,
    /// and nothing that rewrites, cuts or vouches for the index files (or moves the durable
    /// counts) may run until it has (asserted below).
    index_appending: bool,
}

/// One append of index entries to the active segment's index files, taken by
/// [`Segment::index_append`]: plain data, run by [`IndexAppend::run`] on the blocking thread
/// pool (its `open`s, `set_len`s and writes block on the file system: creating the two files
/// of a fresh segment allocates inodes), handed back with its outcome to
/// [`Segment::index_appended`].
pub(crate) struct IndexAppend {
    base: Offset,
    index_path: PathBuf,
    time_path: PathBuf,
    /// The files were not cut since the segment became active: first create them if missing
    /// and cut them to these lengths (the entries counted as durable).
    cut: Option<(u64, u64)>,
    index_bytes: Vec<u8>,
    time_bytes: Vec<u8>,
    /// The durable counts once it succeeded.
    index_upto: usize,
    time_upto: usize,
}

/// What an [`IndexAppend`] did.
pub(crate) struct IndexAppended {
    base: Offset,
    cut: bool,
    index_upto: usize,
    time_upto: usize,
    result: io::Result<()>,
}

impl IndexAppend {
    /// Blocking: cuts the files if asked, then appends the entries. No fsync: recovery
    /// validates every entry, and the data it points at is already durable.
    pub fn run(self) -> IndexAppended {
        crate::fault::delay_point("index_append");
        let result = (|| -> io::Result<()> {
            if let Some((index_len, time_len)) = self.cut {
                let cut = |path: &Path, len: u64| -> io::Result<()> {
                    std::fs::OpenOptions::new()
                        .append(true)
                        .create(true)
                        .open(path)?
                        .set_len(len)
                };
                cut(&self.index_path, index_len)?;
                cut(&self.time_path, time_len)?;
            }
            let append = |path: &Path, bytes: &[u8]| -> io::Result<()> {
                if bytes.is_empty() {
                    return Ok(());
                }
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(path)?
                    .write_all(bytes)
            };
            append(&self.index_path, &self.index_bytes)?;
            append(&self.time_path, &self.time_bytes)
        })();
        IndexAppended {
            base: self.base,
            cut: self.cut.is_some(),
            index_upto: self.index_upto,
            time_upto: self.time_upto,
            result,
        }
    }
}

/// Creates (or empties) the two index files of a new segment starting at `base`: blocking, for
/// the thread pool (a roll creates them there, so its first index append needs no cut).
pub(crate) fn create_index_files(dir: &Path, base: Offset) -> io::Result<()> {
    for ext in ["index", "timeindex"] {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(meta::segment_path(dir, base, ext))?;
    }
    Ok(())
}

impl Segment {
    pub fn base(&self) -> Offset {
        self.base
    }
    pub fn file(&self) -> &Rc<dyn SegmentFile> {
        &self.file
    }
    /// Logical size: bytes of batches appended.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The offset after the last batch.
    pub fn next(&self) -> Offset {
        self.next
    }
    /// Largest batch max-timestamp in the segment (-1 when empty) and that batch's last offset.
    pub fn max_ts(&self) -> (i64, Offset) {
        (self.max_ts, self.max_ts_offset)
    }
    pub fn created_ms(&self) -> i64 {
        self.created_ms
    }
    #[cfg(test)]
    pub fn index(&self) -> &[(u32, u32)] {
        &self.index
    }
    #[cfg(test)]
    pub fn time_index(&self) -> &[(i64, u32)] {
        &self.time_index
    }
    #[cfg(test)]
    pub fn index_files_failed(&self) -> bool {
        self.index_files_failed
    }
    #[cfg(test)]
    pub fn durable_counts(&self) -> (usize, usize) {
        (self.index_durable, self.time_durable)
    }
    /// An [`IndexAppend`] of this segment is on its way (see `index_appending`).
    pub fn index_append_in_flight(&self) -> bool {
        self.index_appending
    }
    /// Its index files exist and hold exactly the entries counted as durable (none: a new
    /// segment whose files a roll created): appends go after them with no cut first.
    pub fn set_index_files_cut(&mut self) {
        debug_assert_eq!((self.index_durable, self.time_durable), (0, 0));
        self.index_files_cut = true;
    }

    /// On open: the segment holds `size` bytes of batches up to `next` (a sealed segment, or
    /// the active one after a clean shutdown), its indexes not loaded yet.
    pub fn set_extent(&mut self, size: u64, next: Offset) {
        assert!(next >= self.base, "segment {} ends at {next}", self.base);
        self.size = size;
        self.next = next;
    }

    /// On open after a crash: the active segment resumes at its last durable `index` entry
    /// (the entries before it are kept, with the time entries before it, and count as
    /// durable); the scan from there re-creates the rest. Empty `index`: from the start.
    pub fn resume_at(&mut self, index: Vec<(u32, u32)>, time_index: Vec<(i64, u32)>) {
        assert!(!self.index_appending);
        if let Some(&(rel, pos)) = index.last() {
            self.time_index = time_index.into_iter().take_while(|e| e.1 < rel).collect();
            if let Some(&(ts, trel)) = self.time_index.last() {
                self.max_ts = ts;
                self.max_ts_offset = Offset(self.base.0 + trel as i64);
            }
            self.index = index;
            self.size = pos as u64;
            self.next = Offset(self.base.0 + rel as i64);
        }
        self.index_durable = self.index.len();
        self.time_durable = self.time_index.len();
    }

    /// Loads `.index`/`.timeindex` (after [`Segment::set_extent`]) if both are complete,
    /// intact and consistent with the segment; `false` leaves it unchanged.
    pub fn load_index_files(&mut self, files: &meta::IndexFileBytes) -> bool {
        let (idx, tidx) = (files.decode_index(), files.decode_time_index());
        if !(idx.complete && tidx.complete) {
            return false;
        }
        let durable = (idx.entries.len(), tidx.entries.len());
        self.adopt_index(idx.entries, tidx.entries, durable)
    }

    /// Takes `idx`/`tidx` as the segment's index if every entry lies inside it and the offset
    /// entries strictly increase, with the first `durable` (index, time index) counted as
    /// already in the files; `false` leaves the segment unchanged.
    fn adopt_index(
        &mut self,
        idx: Vec<(u32, u32)>,
        tidx: Vec<(i64, u32)>,
        durable: (usize, usize),
    ) -> bool {
        let span = self.next.0 - self.base.0;
        let ok = idx
            .iter()
            .all(|e| (e.1 as u64) < self.size && (e.0 as i64) < span)
            && idx.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1)
            && tidx.iter().all(|e| (e.1 as i64) < span);
        if !ok {
            return false;
        }
        assert!(!self.index_appending);
        self.bytes_since_index = self.size - idx.last().map_or(0, |e| e.1 as u64);
        if let Some(&(ts, rel)) = tidx.last() {
            self.max_ts = ts;
            self.max_ts_offset = Offset(self.base.0 + rel as i64);
        }
        (self.index_durable, self.time_durable) = durable;
        self.index = idx;
        self.time_index = tidx;
        true
    }

    /// For a clean-shutdown record: the entries already appended to the index files (how
    /// many of each) and the ones after them, which the record carries instead. `None` if the
    /// files cannot be vouched for (an append failed) or the tail is longer than [`RECORD_TAIL_ENTRIES_MAX`].
    pub fn index_tail(&self) -> Option<IndexTail> {
        // The counts must be final: an append in flight may or may not reach the files.
        assert!(
            !self.index_appending,
            "index tail taken with an append in flight"
        );
        let (it, tt) = (
            &self.index[self.index_durable..],
            &self.time_index[self.time_durable..],
        );
        // Entries reach the files in order, so files holding exactly the durable count hold
        // exactly those entries; a file with stale entries past them fails the count at open.
        (!self.index_files_failed
            && it.len() <= RECORD_TAIL_ENTRIES_MAX
            && tt.len() <= RECORD_TAIL_ENTRIES_MAX)
            .then(|| IndexTail {
                index_durable: self.index_durable as u32,
                time_durable: self.time_durable as u32,
                index: it.to_vec(),
                time_index: tt.to_vec(),
            })
    }

    /// Loads the index of the active segment after a clean shutdown recorded in the shard's
    /// record: the index files must hold exactly the entries the record counts as appended
    /// (a missing file counts as empty), and the record's tail follows them. `false` if they
    /// do not match (the caller then recovers the log by a scan).
    pub fn restore_index(&mut self, files: &meta::IndexFileBytes, tail: IndexTail) -> bool {
        // A missing file holds no entries; an unreadable one cannot be vouched for.
        fn read(r: &io::Result<Vec<u8>>) -> Option<&[u8]> {
            match r {
                Ok(b) => Some(b.as_slice()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Some(&[]),
                Err(_) => None,
            }
        }
        let (Some(ib), Some(tb)) = (read(&files.index), read(&files.time)) else {
            return false;
        };
        let (idx, tidx) = (meta::decode_index(ib), meta::decode_time_index(tb));
        if !(idx.complete && tidx.complete)
            || idx.entries.len() != tail.index_durable as usize
            || tidx.entries.len() != tail.time_durable as usize
        {
            return false;
        }
        let (mut idx, mut tidx) = (idx.entries, tidx.entries);
        idx.extend_from_slice(&tail.index);
        tidx.extend_from_slice(&tail.time_index);
        let durable = (tail.index_durable as usize, tail.time_durable as usize);
        self.adopt_index(idx, tidx, durable)
    }

    /// The paths and whole contents of both index files, to be written by the caller (a clean
    /// shutdown, see [`crate::storage::ClosingFiles`]); the segment takes no more index appends.
    pub fn index_file_bodies(&mut self, dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let files = self.index_files_to_write(dir);
        self.index_files_written();
        files.into()
    }

    /// The whole index files of this segment (a rebuilt sealed segment, a truncation's cut),
    /// to be written elsewhere (off the executor): path and body of each. Call
    /// [`index_files_written`](Self::index_files_written) once they are.
    pub fn index_files_to_write(&mut self, dir: &Path) -> [(PathBuf, Vec<u8>); 2] {
        assert!(
            !self.index_appending,
            "index files rewritten with an append in flight"
        );
        self.index_files_cut = false;
        [
            (
                meta::segment_path(dir, self.base, "index"),
                meta::encode_index(&self.index),
            ),
            (
                meta::segment_path(dir, self.base, "timeindex"),
                meta::encode_time_index(&self.time_index),
            ),
        ]
    }

    /// The files of [`index_files_to_write`](Self::index_files_to_write) were written whole
    /// and durably, and the index has not changed since.
    pub fn index_files_written(&mut self) {
        assert!(!self.index_appending);
        self.index_durable = self.index.len();
        self.time_durable = self.time_index.len();
    }

    pub fn new(base: Offset, file: Rc<dyn SegmentFile>, created_ms: i64) -> Self {
        Segment {
            base,
            file,
            size: 0,
            next: base,
            index: vec![],
            time_index: vec![],
            bytes_since_index: 0,
            max_ts: -1,
            max_ts_offset: base,
            created_ms,
            index_durable: 0,
            time_durable: 0,
            index_files_cut: false,
            index_files_failed: false,
            index_appending: false,
        }
    }

    /// Takes the next append of index entries for the blocking pool: the entries of batches
    /// that start before `durable_pos` (their bytes are on stable storage) not yet in the files,
    /// and the time entries recorded before the last of them, once there are
    /// [`INDEX_APPEND_BATCH`] of them (every one with `all`, which also cuts files that were
    /// not cut yet when there is nothing to append). `None` while one is in flight, after a
    /// failed one, or with nothing due. Entries that become durable while one is in flight are
    /// taken by the next, so appends batch under load.
    pub fn index_append(&mut self, dir: &Path, durable_pos: u64, all: bool) -> Option<IndexAppend> {
        if self.index_files_failed || self.index_appending {
            return None;
        }
        let n = self.index[self.index_durable..]
            .iter()
            .take_while(|e| (e.1 as u64) < durable_pos)
            .count();
        let cut_due = all && !self.index_files_cut;
        if (n == 0 || (n < INDEX_APPEND_BATCH && !all)) && !cut_due {
            return None;
        }
        let upto = self.index_durable + n;
        let tn = match upto.checked_sub(1) {
            Some(last) if n > 0 => {
                let last_rel = self.index[last].0;
                self.time_index[self.time_durable..]
                    .iter()
                    .take_while(|e| e.1 < last_rel)
                    .count()
            }
            _ => 0,
        };
        self.index_appending = true;
        Some(IndexAppend {
            base: self.base,
            index_path: meta::segment_path(dir, self.base, "index"),
            time_path: meta::segment_path(dir, self.base, "timeindex"),
            cut: (!self.index_files_cut).then(|| {
                (
                    (self.index_durable * meta::INDEX_ENTRY_BYTES) as u64,
                    (self.time_durable * meta::TIME_ENTRY_BYTES) as u64,
                )
            }),
            index_bytes: meta::encode_index(&self.index[self.index_durable..upto]),
            time_bytes: meta::encode_time_index(
                &self.time_index[self.time_durable..self.time_durable + tn],
            ),
            index_upto: upto,
            time_upto: self.time_durable + tn,
        })
    }

    /// Takes back the outcome of the [`IndexAppend`] in flight: the durable counts advance only
    /// now, when its entries are in the files. A failure is logged and stops further appends
    /// for this segment: recovery then scans from the last entry that made it (entries are
    /// checksummed one by one).
    pub fn index_appended(&mut self, dir: &Path, done: IndexAppended) {
        assert!(self.index_appending, "an index append came back unasked");
        // Nothing replaces the active segment or rewrites its index while an append is in
        // flight (roll, truncation, close and removal wait for it), so it comes back to the
        // segment it was taken from, whose counts have not moved.
        assert_eq!(
            done.base, self.base,
            "an index append came back to another segment"
        );
        self.index_appending = false;
        match done.result {
            Ok(()) => {
                assert!(
                    done.index_upto <= self.index.len() && done.time_upto <= self.time_index.len()
                );
                self.index_files_cut |= done.cut;
                self.index_durable = done.index_upto;
                self.time_durable = done.time_upto;
            }
            Err(e) => {
                tracing::warn!(
                    dir = %dir.display(), segment = self.base.0, error = %e,
                    "index append failed; recovery will scan from the last entry written"
                );
                self.index_files_failed = true;
            }
        }
    }

    /// The [`IndexAppend`] in flight will not come back (its task panicked): no more appends
    /// for this segment, as after a failed one.
    pub fn index_append_lost(&mut self) {
        assert!(self.index_appending);
        self.index_appending = false;
        self.index_files_failed = true;
    }

    /// Accounts for one batch appended at `pos` (index entries every `interval` bytes).
    #[inline]
    pub fn on_batch(&mut self, h: &BatchHeader<'_>, pos: u64, interval: u32) {
        let size = h.size() as u64;
        if self.bytes_since_index >= interval as u64 {
            self.index
                .push(((h.base_offset().0 - self.base.0) as u32, pos as u32));
            self.bytes_since_index = 0;
            self.push_time_entry();
        }
        self.bytes_since_index += size;
        if h.max_timestamp() > self.max_ts {
            self.max_ts = h.max_timestamp();
            self.max_ts_offset = h.last_offset();
        }
        self.size = pos + size;
        self.next = h.last_offset().next();
    }

    /// Records the current max timestamp in the time index if it grew since the last entry.
    pub fn push_time_entry(&mut self) {
        if self.max_ts >= 0 && self.time_index.last().is_none_or(|e| e.0 < self.max_ts) {
            let rel = (self.max_ts_offset.0 - self.base.0) as u32;
            if self.time_index.last().is_none_or(|e| e.1 < rel) {
                self.time_index.push((self.max_ts, rel));
            }
        }
    }

    /// File position of the indexed batch at or before `offset`.
    pub fn lookup(&self, offset: Offset) -> u64 {
        let rel = (offset.0 - self.base.0).max(0) as u64;
        let i = self.index.partition_point(|e| e.0 as u64 <= rel);
        if i == 0 {
            0
        } else {
            self.index[i - 1].1 as u64
        }
    }

    /// Offset from which to scan for the first batch with max timestamp >= `ts`.
    pub fn time_lookup(&self, ts: i64) -> Offset {
        let i = self.time_index.partition_point(|e| e.0 < ts);
        if i == 0 {
            self.base
        } else {
            Offset(self.base.0 + self.time_index[i - 1].1 as i64)
        }
    }

    /// The offset of the batch at file position `pos`, which is an index entry's position.
    pub fn index_entry_at(&self, pos: u64) -> Offset {
        let i = self.index.partition_point(|e| (e.1 as u64) < pos);
        let e = self.index[i];
        debug_assert_eq!(e.1 as u64, pos, "a position from lookup");
        Offset(self.base.0 + e.0 as i64)
    }

    /// Cuts the segment at `pos` (the batch starting at `next`): a truncation of the log, which
    /// may drop entries already appended to the index files; the caller rewrites them.
    pub fn cut(&mut self, pos: u64, next: Offset) {
        assert!(
            !self.index_appending,
            "log cut with an index append in flight"
        );
        let rel_next = (next.0 - self.base.0) as u32;
        self.index_durable = self.index.iter().filter(|e| (e.1 as u64) < pos).count();
        self.time_durable = self.time_index.iter().filter(|e| e.1 < rel_next).count();
        self.index_files_cut = false;
        self.truncate(pos, next);
    }

    /// Drops index entries for data at or past `pos` (a failed write was rolled back).
    pub fn truncate(&mut self, pos: u64, next: Offset) {
        self.index.retain(|e| (e.1 as u64) < pos);
        let rel_next = (next.0 - self.base.0) as u32;
        self.time_index.retain(|e| e.1 < rel_next);
        // Durable entries point below the synced position, which a failed write never undoes.
        debug_assert!(self.index_durable <= self.index.len());
        debug_assert!(self.time_durable <= self.time_index.len());
        self.index_durable = self.index_durable.min(self.index.len());
        self.time_durable = self.time_durable.min(self.time_index.len());
        self.size = pos;
        self.next = next;
        if self.max_ts_offset >= next {
            // The exact maximum of what remains is not known without a scan; the time index
            // bounds it from below, which only makes retention keep the segment longer.
            match self.time_index.last() {
                Some(&(ts, rel)) => {
                    self.max_ts = ts;
                    self.max_ts_offset = Offset(self.base.0 + rel as i64);
                }
                None => {
                    self.max_ts = -1;
                    self.max_ts_offset = self.base;
                }
            }
        }
        self.bytes_since_index = match self.index.last() {
            Some(e) => pos - e.1 as u64,
            None => pos,
        };
    }
}

/// Why a scan stopped before the end of the data it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanStop {
    /// Reached the end of the file (or the limit) exactly at a batch boundary.
    End,
    /// Found zeros where the next batch would start: unwritten pre-allocated space.
    Zeros,
    /// A batch that is cut off by the end of the file.
    Torn,
    /// A batch that fails validation.
    Invalid(BatchError),
    /// A valid batch whose base offset does not follow its predecessor's.
    OffsetGap,
}

pub struct ScanOutcome {
    /// Position after the last valid batch.
    pub end_pos: u64,
    /// The offset after the last valid batch.
    pub next: Offset,
    pub stop: ScanStop,
    pub batches: u64,
}

/// Validates the batches of `file` from `pos` (a batch boundary whose batch starts at `next`) up
/// to `limit` bytes: length, magic, CRC-32C and offset continuity. Calls `f(header, position)`
/// for every valid batch. Stops at the first invalid one. A declared batch length reaching past
/// `limit` stops the scan as torn; memory (the carry of a batch straddling two reads) only ever
/// holds bytes actually read, never the declared length.
pub async fn scan(
    file: &dyn SegmentFile,
    pos: u64,
    next: Offset,
    limit: u64,
    f: impl FnMut(&BatchHeader<'_>, u64),
) -> io::Result<ScanOutcome> {
    scan_inner(file, pos, next, limit, false, f).await
}

/// [`scan`] of a sealed segment that compaction may have rewritten: a batch may start past its
/// predecessor's end (the offsets between were compacted away), never before it.
pub async fn scan_with_gaps(
    file: &dyn SegmentFile,
    pos: u64,
    next: Offset,
    limit: u64,
    f: impl FnMut(&BatchHeader<'_>, u64),
) -> io::Result<ScanOutcome> {
    scan_inner(file, pos, next, limit, true, f).await
}

async fn scan_inner(
    file: &dyn SegmentFile,
    mut pos: u64,
    mut next: Offset,
    limit: u64,
    gaps: bool,
    mut f: impl FnMut(&BatchHeader<'_>, u64),
) -> io::Result<ScanOutcome> {
    let mut batches = 0u64;
    let mut carry: Vec<u8> = vec![];
    let mut read_pos = align_down(pos);
    let mut skip = (pos - read_pos) as usize;
    // Reads never reach past `limit` (rounded up to the page): what lies beyond is not the
    // scan's, and reading pre-allocated space costs the kernel a zero-fill of the buffer.
    let read_len = |at: u64| -> usize {
        (align_up(limit).saturating_sub(at)).min(SCAN_CHUNK_BYTES as u64) as usize
    };
    let mut inflight = (read_pos < limit).then(|| file.read_at(read_pos, read_len(read_pos)));
    let mut stop = ScanStop::End;

    // Checks one complete batch; returns false to stop.
    let mut check = |b: &[u8], pos: &mut u64, next: &mut Offset, stop: &mut ScanStop| -> bool {
        match BatchHeader::parse_checked(b) {
            Ok(h) if h.base_offset() == *next || (gaps && h.base_offset() > *next) => {
                f(&h, *pos);
                *pos += h.size() as u64;
                *next = h.last_offset().next();
                batches += 1;
                true
            }
            Ok(_) => {
                *stop = ScanStop::OffsetGap;
                false
            }
            Err(e) => {
                *stop = ScanStop::Invalid(e);
                false
            }
        }
    };

    'outer: while let Some(fut) = inflight.take() {
        let asked = read_len(read_pos);
        let buf = fut.await?;
        let got = buf.len();
        let buf_end = read_pos + got as u64;
        read_pos = buf_end;
        if got == asked && read_pos < limit {
            // Read ahead while this chunk is being checked.
            inflight = Some(file.read_at(read_pos, read_len(read_pos)));
        }
        let usable = (got as u64).min(limit.saturating_sub(buf_end - got as u64)) as usize;
        let data = &buf[skip.min(usable)..usable];
        skip = 0;
        let mut i = 0usize;
        // First finish a batch that straddled the previous chunk.
        if !carry.is_empty() {
            if carry.len() < HEADER_BYTES {
                let take = (HEADER_BYTES - carry.len()).min(data.len());
                carry.extend_from_slice(&data[..take]);
                i = take;
                if carry.len() < HEADER_BYTES {
                    continue;
                }
            }
            let Some(size) = batch::batch_size(&carry) else {
                stop = classify_bad_start(&carry);
                break 'outer;
            };
            if size as u64 > limit.saturating_sub(pos) {
                stop = ScanStop::Torn;
                break 'outer;
            }
            let take = (size - carry.len()).min(data.len() - i);
            carry.extend_from_slice(&data[i..i + take]);
            i += take;
            if carry.len() < size {
                continue;
            }
            let b = std::mem::take(&mut carry);
            if !check(&b, &mut pos, &mut next, &mut stop) {
                break 'outer;
            }
        }
        while i < data.len() {
            let rest = &data[i..];
            if rest.len() >= batch::LOG_OVERHEAD_BYTES {
                match batch::batch_size(rest) {
                    None => {
                        stop = classify_bad_start(rest);
                        break 'outer;
                    }
                    Some(size) if size <= rest.len() => {
                        if !check(&rest[..size], &mut pos, &mut next, &mut stop) {
                            break 'outer;
                        }
                        i += size;
                        continue;
                    }
                    Some(size) if size as u64 > limit.saturating_sub(pos) => {
                        stop = ScanStop::Torn;
                        break 'outer;
                    }
                    Some(_) => {}
                }
            }
            carry.extend_from_slice(rest);
            break;
        }
    }
    if stop == ScanStop::End && !carry.is_empty() {
        stop = if carry.iter().all(|b| *b == 0) {
            ScanStop::Zeros
        } else {
            ScanStop::Torn
        };
    }
    Ok(ScanOutcome {
        end_pos: pos,
        next,
        stop,
        batches,
    })
}

fn classify_bad_start(b: &[u8]) -> ScanStop {
    if b.iter().take(HEADER_BYTES).all(|x| *x == 0) {
        ScanStop::Zeros
    } else {
        ScanStop::Invalid(BatchError::BadLength)
    }
}

/// Writes whole index files ([`Segment::index_files_to_write`]) atomically and durably, on the
/// blocking thread pool; the caller then marks them with [`Segment::index_files_written`].
pub(crate) async fn write_index_files(files: [(PathBuf, Vec<u8>); 2]) -> io::Result<()> {
    glommio::executor()
        .spawn_blocking(move || {
            files
                .iter()
                .try_for_each(|(path, body)| meta::write_atomic(path, body))
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::batch::set_base_offset;
    use crate::protocol::builder as build;
    use crate::storage::io::{DmaIo, StorageIo};

    /// Writes `bytes` to a fresh segment file through the DMA seam (padded with zeros).
    async fn segment_with(dir: &std::path::Path, bytes: &[u8]) -> Rc<dyn SegmentFile> {
        let f = DmaIo.open(&dir.join("s.log"), true).await.unwrap();
        let len = align_up(bytes.len() as u64) as usize;
        let mut buf = glommio::allocate_dma_buffer_global(len.max(4096));
        buf.as_bytes_mut().fill(0);
        buf.as_bytes_mut()[..bytes.len()].copy_from_slice(bytes);
        f.write_at(Rc::new(buf), 0).await.unwrap();
        f
    }

    fn three_batches() -> (Vec<u8>, Vec<usize>) {
        let mut all = vec![];
        let mut ends = vec![];
        for i in 0..3 {
            let mut b = build::single(None, Some(&vec![i as u8; 700]), i);
            set_base_offset(&mut b, Offset(i));
            all.extend(b);
            ends.push(all.len());
        }
        (all, ends)
    }

    #[test]
    fn scan_stops_at_zeros_torn_and_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        crate::storage::tests::run(async move {
            let (all, ends) = three_batches();
            // Clean data followed by pre-allocated zeros.
            let f = segment_with(&d, &all).await;
            let out = scan(&*f, 0, Offset(0), 8192, |_, _| {}).await.unwrap();
            assert_eq!(
                (out.end_pos, out.next, out.stop, out.batches),
                (ends[2] as u64, Offset(3), ScanStop::Zeros, 3)
            );
            // From an index position in the middle.
            let out = scan(&*f, ends[0] as u64, Offset(1), 8192, |_, _| {})
                .await
                .unwrap();
            assert_eq!((out.next, out.batches), (Offset(3), 2));
            // A file cut inside the last batch: torn.
            let out = scan(&*f, 0, Offset(0), ends[2] as u64 - 5, |_, _| {})
                .await
                .unwrap();
            assert_eq!((out.end_pos, out.stop), (ends[1] as u64, ScanStop::Torn));
            // A batch whose offset does not follow: gap.
            let mut gap = all.clone();
            set_base_offset(&mut gap[ends[1]..], Offset(9));
            let f = segment_with(&d, &gap).await;
            let out = scan(&*f, 0, Offset(0), 8192, |_, _| {}).await.unwrap();
            assert_eq!(
                (out.end_pos, out.stop),
                (ends[1] as u64, ScanStop::OffsetGap)
            );
        });
    }
}
