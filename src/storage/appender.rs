//! The appender of the active segment: batches are copied into aligned DMA chunks ([`Pending`])
//! as they are appended; one flusher task per partition, spawned on the shard's executor, writes
//! everything pending with one set of concurrent aligned writes and, when the flush policy asks,
//! one fdatasync — the group commit. Batches appended while a write or sync is in flight join the
//! next one. The partial last page is kept in memory and written again, completed, by the next
//! flush. Owns [`Appender`], the write-side state of the partition log (its fields are private
//! here); the flusher holds only a weak reference to the log. Lives on the partition's shard.

use std::future::Future;
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use glommio::io::DmaBuffer;
use smallvec::SmallVec;

use crate::storage::io::{align_down, align_up, join_in_order, IoFuture, ALIGN_BYTES};
use crate::storage::{FlushPolicy, PartitionLog, State, StorageError};
use crate::types::{Offset, Sleep};

/// Capacity of the first chunk of a flush: small, so a thousand idle-ish partitions on a shard
/// hold little memory.
pub const CHUNK_BYTES_MIN: usize = 64 << 10;
/// Capacity of the following chunks; each is one write request (several run concurrently).
pub const CHUNK_BYTES_MAX: usize = 1 << 20;
/// Appends wait while this many bytes are pending (written by no flush yet): bounds memory when
/// the disk is slower than the producers.
pub const PENDING_BYTES_MAX: usize = 64 << 20;
/// Segment files grow by pre-allocated extents, so writes inside them change no file size and
/// fdatasync has no size to persist. Extents start at `EXTENT_BYTES_MIN` and double with the file
/// up to `EXTENT_BYTES` (never past the segment size): a busy partition soon allocates in large
/// extents, while an idle one (or the 50 partitions of `__consumer_offsets`) costs 1 MiB of disk,
/// not 64 MiB.
pub const EXTENT_BYTES: u64 = 64 << 20;
pub const EXTENT_BYTES_MIN: u64 = 1 << 20;
const _: () = assert!(EXTENT_BYTES_MIN <= EXTENT_BYTES);
/// A producer snapshot is written (in the background) once this many bytes were synced after
/// the last one; with the index entries appended after every fdatasync it bounds how much of the
/// active segment a crash recovery scans.
pub const PRODUCER_SNAPSHOT_BYTES: u64 = 64 << 20;
/// With the `Always` policy and no `Synced` append waiting, written data is still fdatasynced
/// this often, so a power loss loses at most this much of acks=1 traffic and the recovery scan
/// after a crash stays short — on a shard of at most [`BACKGROUND_SYNCS_PER_SEC_MAX`]
/// partitions; with more, see [`background_sync_interval`].
pub const BACKGROUND_SYNC_MS: u64 = 1000;
/// Background fdatasyncs a shard's partitions start per second, together, at most. Each costs
/// the device a cache flush (on ext4 without a journal also a synchronous inode write) and the
/// shard's core an io_uring worker's run, whatever the bytes it covers, so their rate must not
/// grow with the partition count: 1,000 partitions syncing once a second each took 7-17 % of
/// S5's throughput and a third of its p99 (perf/RESULTS.md).
pub const BACKGROUND_SYNCS_PER_SEC_MAX: u64 = 100;
/// The longest a partition's background fdatasync interval stretches to on a shard with many
/// partitions: bounds what a power loss can take and the recovery scan after a crash even with
/// 10,000 partitions on a shard (which then sync 1,000 times a second in all).
pub const BACKGROUND_SYNC_MS_MAX: u64 = 10_000;

thread_local! {
    /// Partition flushers running on this shard (one per open log).
    static FLUSHERS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Counts a flusher in [`FLUSHERS`] while it runs.
struct FlusherCounted;

impl FlusherCounted {
    /// Counts one more flusher, and returns how far its first background sync moves ahead of
    /// the interval: the shard's `k`th flusher by `k` times the spacing of
    /// [`BACKGROUND_SYNCS_PER_SEC_MAX`], so the logs a shard opens together (a topic's
    /// partitions, a restart) do not all sync at the same moment, interval after interval.
    fn new() -> (Self, Duration) {
        let k = FLUSHERS.with(|n| {
            n.set(n.get() + 1);
            n.get() - 1
        });
        let spacing_ms = 1000 / BACKGROUND_SYNCS_PER_SEC_MAX;
        let phase = Duration::from_millis(k.saturating_mul(spacing_ms) % BACKGROUND_SYNC_MS_MAX);
        (FlusherCounted, phase)
    }
}

impl Drop for FlusherCounted {
    fn drop(&mut self) {
        FLUSHERS.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// How often a partition of this shard fdatasyncs written data no append waits for (`Always`
/// policy): every [`BACKGROUND_SYNC_MS`], stretched so that the shard's partitions together
/// start at most [`BACKGROUND_SYNCS_PER_SEC_MAX`] syncs a second, up to
/// [`BACKGROUND_SYNC_MS_MAX`].
pub(crate) fn background_sync_interval() -> Duration {
    background_sync_interval_for(flushers_running())
}

/// [`background_sync_interval`] on a shard running `flushers` partition flushers.
fn background_sync_interval_for(flushers: u64) -> Duration {
    let spread_ms = flushers.saturating_mul(1000) / BACKGROUND_SYNCS_PER_SEC_MAX;
    Duration::from_millis(spread_ms.clamp(BACKGROUND_SYNC_MS, BACKGROUND_SYNC_MS_MAX))
}

/// Partition flushers running on this shard.
pub(crate) fn flushers_running() -> u64 {
    FLUSHERS.with(std::cell::Cell::get)
}

/// Whether flushes that carry acks=all appends use durable (`O_DSYNC`) writes rather than a
/// write and an fdatasync (see docs/storage.md, Append). `SLUICE_COMMIT=fdatasync` or `dsync`
/// overrides it, for measuring one against the other.
pub const DURABLE_WRITES: bool = true;

fn durable_writes_default() -> bool {
    static MODE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("SLUICE_COMMIT").as_deref() {
        Ok("fdatasync") => false,
        Ok("dsync") => true,
        _ => DURABLE_WRITES,
    })
}

/// How far a file of `allocated` bytes grows next.
pub fn next_extent(allocated: u64, segment_bytes: u64) -> u64 {
    allocated
        .clamp(EXTENT_BYTES_MIN, EXTENT_BYTES)
        .min(segment_bytes)
}

const _: () = assert!((CHUNK_BYTES_MIN as u64).is_multiple_of(ALIGN_BYTES));
const _: () = assert!((CHUNK_BYTES_MAX as u64).is_multiple_of(ALIGN_BYTES));
const _: () = assert!(PENDING_BYTES_MAX >= 2 * CHUNK_BYTES_MAX);

/// Appends one flush may carry before the list of their marks is shrunk back when the flush
/// is done: the lists of a flush are kept for the next (cleared, not dropped, so a steady
/// stream of flushes allocates none), but a burst of many small appends behind a slow write
/// must not leave every partition that saw one holding a list that size. 1024 marks are
/// 16 KiB per partition.
pub const FLUSH_MARKS_KEPT_MAX: usize = 1024;
/// Writes (chunks) whose list a flush keeps for the next: a flush of every pending byte
/// (`PENDING_BYTES_MAX`) in full chunks, plus the first chunk and the kept page. One append
/// admitted alone may be larger (up to a request's size) and make a longer list; it is shrunk
/// back to this when that flush is done. 66 entries, about 1.6 KiB per list.
pub const FLUSH_WRITES_KEPT_MAX: usize = PENDING_BYTES_MAX / CHUNK_BYTES_MAX + 2;
/// Writes of a flush handled without a heap allocation (the futures in flight and their
/// results): a steady flush is a kept page and one chunk.
const FLUSH_WRITES_INLINE: usize = 4;

/// Bytes of the active segment not yet covered by a completed flush, starting at an aligned
/// file position. Its lists keep their capacity across flushes ([`Pending::take`],
/// [`Pending::reset`]).
pub(crate) struct Pending {
    /// File position of the first byte of `chunks[0]` (aligned).
    start: u64,
    /// The already-written bytes of the page at `start`, rewritten by the next flush.
    head: Vec<u8>,
    /// (buffer, bytes filled), filled in order; every chunk but the last is full.
    chunks: Vec<(DmaBuffer, usize)>,
    /// Per append: the file position after its last byte and the offset after its last batch.
    marks: Vec<(u64, crate::types::Offset)>,
    /// Bytes of new batches (not counting `head`).
    bytes: usize,
}

/// A flush taken out of [`Pending`]: what to write where. The appender keeps one, cleared,
/// between flushes ([`Flush::clear`]), so its lists are allocated once, not per flush, and
/// kept up to [`FLUSH_WRITES_KEPT_MAX`] writes and [`FLUSH_MARKS_KEPT_MAX`] marks.
#[derive(Default)]
pub(crate) struct Flush {
    writes: Vec<(Rc<DmaBuffer>, u64)>,
    /// The appends it carries (see [`Pending::marks`]).
    marks: Vec<(u64, crate::types::Offset)>,
    /// File position after the last byte of data.
    end_pos: u64,
    /// File position after the last byte written (aligned).
    write_end: u64,
    /// Bytes of the partial last page, for the next flush.
    tail: Vec<u8>,
}

impl Flush {
    /// Empties the flush for the next one: its buffers are released (no DMA memory is held
    /// between flushes), its lists keep their capacity up to [`FLUSH_MARKS_KEPT_MAX`].
    pub fn clear(&mut self) {
        self.writes.clear();
        self.marks.clear();
        self.marks.shrink_to(FLUSH_MARKS_KEPT_MAX);
        self.writes.shrink_to(FLUSH_WRITES_KEPT_MAX);
        self.tail.clear();
        self.end_pos = 0;
        self.write_end = 0;
    }

    fn is_clear(&self) -> bool {
        self.writes.is_empty() && self.marks.is_empty() && self.tail.is_empty()
    }
}

impl Pending {
    pub fn new(start: u64, head: Vec<u8>) -> Self {
        debug_assert_eq!(start % ALIGN_BYTES, 0);
        debug_assert!((head.len() as u64) < ALIGN_BYTES);
        Pending {
            start,
            head,
            chunks: vec![],
            marks: vec![],
            bytes: 0,
        }
    }

    /// Starts over at `start` (aligned) with the written partial page `head` and nothing
    /// pending: its chunks are released, its lists cleared (their capacity kept, the marks'
    /// up to [`FLUSH_MARKS_KEPT_MAX`]).
    pub fn reset(&mut self, start: u64, head: &[u8]) {
        debug_assert_eq!(start % ALIGN_BYTES, 0);
        debug_assert!((head.len() as u64) < ALIGN_BYTES);
        self.start = start;
        self.head.clear();
        self.head.extend_from_slice(head);
        self.chunks.clear();
        self.chunks.shrink_to(FLUSH_WRITES_KEPT_MAX);
        self.marks.clear();
        self.marks.shrink_to(FLUSH_MARKS_KEPT_MAX);
        self.bytes = 0;
    }

    /// File position after the last pending byte.
    pub fn end_pos(&self) -> u64 {
        self.start + self.head.len() as u64 + self.bytes as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// [`Pending::push_with`] with the kept page in a chunk of its own (tests).
    #[cfg(test)]
    pub fn push(&mut self, data: &[u8]) {
        self.push_with(data, true);
    }

    /// Copies `data` in (one memcpy per chunk it lands in).
    ///
    /// With `own_page`, a flush that starts with a kept partial page (`head`) holds that page
    /// in a chunk of its own, so the page — already written, in an initialised extent — and the
    /// new bytes after it — in blocks allocated ahead but never written — go to the file as
    /// separate writes. One write across both kinds of extent cannot be issued without
    /// blocking (ext4 maps it as two extents, so it is not an overwrite): io_uring hands such a
    /// write to a kernel worker thread, a context switch and most of the write's CPU cost on
    /// the shard's core, paid by every flush of a partition that receives small appends. Not
    /// for appends that wait for a durable (`O_DSYNC`) write: each durable write pays its own
    /// device cache flush, so there one write across both kinds of extent costs less than two.
    /// Only the append that starts a flush decides its layout.
    pub fn push_with(&mut self, mut data: &[u8], own_page: bool) {
        self.bytes += data.len();
        if self.chunks.is_empty() {
            let need = self.head.len() + data.len();
            let mut buf = if self.head.is_empty() || !own_page {
                new_chunk(need)
            } else {
                glommio::allocate_dma_buffer(ALIGN_BYTES as usize)
            };
            buf.as_bytes_mut()[..self.head.len()].copy_from_slice(&self.head);
            self.chunks.push((buf, self.head.len()));
        }
        while !data.is_empty() {
            let (buf, fill) = self.chunks.last_mut().expect("a chunk was just ensured");
            let room = buf.len() - *fill;
            if room == 0 {
                self.chunks.push((new_chunk(data.len()), 0));
                continue;
            }
            let n = room.min(data.len());
            buf.as_bytes_mut()[*fill..*fill + n].copy_from_slice(&data[..n]);
            *fill += n;
            data = &data[n..];
        }
    }

    /// Moves everything pending into `flush` (cleared) and leaves `self` ready for the appends
    /// that arrive while it is in flight (starting with the partial last page). The lists trade
    /// places: `self` goes on with the flush's empty marks list, so neither is allocated anew.
    pub fn take(&mut self, flush: &mut Flush) {
        debug_assert!(flush.is_clear());
        debug_assert!(!self.is_empty());
        let end_pos = self.end_pos();
        let mut pos = self.start;
        let n = self.chunks.len();
        for (i, (mut buf, fill)) in self.chunks.drain(..).enumerate() {
            let len = align_up(fill as u64) as usize;
            if i + 1 == n {
                let page = align_down(fill as u64) as usize;
                flush.tail.extend_from_slice(&buf.as_bytes()[page..fill]);
                // Zero the padding: nothing stale may follow the last batch on disk.
                buf.as_bytes_mut()[fill..len].fill(0);
            }
            if len < buf.len() {
                buf.trim_to_size(len);
            }
            flush.writes.push((Rc::new(buf), pos));
            pos += len as u64;
        }
        self.chunks.shrink_to(FLUSH_WRITES_KEPT_MAX);
        flush.end_pos = end_pos;
        flush.write_end = pos;
        std::mem::swap(&mut self.marks, &mut flush.marks);
        self.start = align_down(end_pos);
        self.head.clear();
        self.head.extend_from_slice(&flush.tail);
        self.bytes = 0;
    }
}

/// From the executor's registered I/O memory when it has room (written with io_uring's fixed-buffer
/// writes: no page pinning per write, no fresh pages), else from the heap.
fn new_chunk(need: usize) -> DmaBuffer {
    let cap = (align_up(need as u64) as usize).clamp(CHUNK_BYTES_MIN, CHUNK_BYTES_MAX);
    glommio::allocate_dma_buffer(cap)
}

/// The write side of one partition log: what is pending, written and synced in the active
/// segment, and the flusher's bookkeeping. Part of the log's `State`; changed only through the
/// methods below, by the append path, the flusher, roll, close and recovery.
pub(crate) struct Appender {
    pending: Pending,
    /// The largest end offset some `Durability::Synced` append waits for.
    sync_wanted: Offset,
    /// Bytes of the active segment that are written to its file.
    written_pos: u64,
    /// Bytes of the active segment covered by a completed fdatasync.
    synced_pos: u64,
    /// The written bytes of the partial last page (`[align_down(written_pos), written_pos)`).
    written_tail: Vec<u8>,
    /// File size reserved (pre-allocated) for the active segment.
    allocated: u64,
    /// Furthest (aligned) position any write of the active segment may have reached.
    attempted_pos: u64,
    /// A range past the written data that a failed write may have touched: punched out before
    /// the next write.
    punch: Option<(u64, u64)>,
    /// A write (one flush) is in flight.
    writing: bool,
    /// An fdatasync is in flight.
    syncing: bool,
    /// Flushes that carry a `Synced` append, with everything before them already durable, are
    /// written with durable (`O_DSYNC`) writes instead of a write and an fdatasync.
    durable_writes: bool,
    /// Flushes that carry a `Synced` append join the shard's commit cycle
    /// ([`crate::storage::cycle`]) instead of starting as soon as the partition has data.
    shard_cycle: bool,
    /// Background syncs of acks=1 data go through the shard's sync rounds
    /// ([`crate::storage::shard_sync`]) instead of an fdatasync of this partition's file.
    shard_rounds: bool,
    /// Changes whenever the positions start over or move back (roll, seal, truncation): a
    /// shard sync round that this partition joined before then vouches for none of them.
    epoch: u64,
    /// The flusher task panicked: nothing pending will be written any more, so every append
    /// (and roll) fails from now on instead of waiting forever.
    dead: bool,
    /// Incremented by every failed write; `gen_end[g]` is `hw` when generation `g` failed:
    /// appends of generation `g` at or past it failed (their offsets were given out again).
    gen: usize,
    gen_end: Vec<Offset>,
    last_error: Option<(Option<i32>, std::io::ErrorKind, String)>,
    sync_failures: u64,
    last_sync: Instant,
    flusher: Option<Waker>,
    /// The lists of the last completed flush, cleared, for the next one.
    spare: Flush,
    /// A producer snapshot is being written in the background.
    snapshotting: bool,
    /// Active-segment position covered by the last producer snapshot, and how many synced bytes
    /// may follow it before the next one (bounds the crash-recovery scan).
    snapshot_pos: u64,
    snapshot_every: u64,
}

/// What an accepted append needs to tell later whether it failed: the write generation and
/// the fdatasync failure count when it was accepted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    gen: usize,
    sync_failures: u64,
}

impl Appender {
    /// The state of an active segment opened with `written` bytes of data (all of them synced,
    /// the last partial page in `written_tail`) in a file of `allocated` bytes.
    pub fn recovered(
        written: u64,
        written_tail: Vec<u8>,
        allocated: u64,
        log_end: Offset,
        snapshot_pos: u64,
        now: Instant,
    ) -> Self {
        let head_pos = align_down(written);
        assert_eq!(written_tail.len() as u64, written - head_pos);
        Appender {
            pending: Pending::new(head_pos, written_tail.clone()),
            sync_wanted: log_end,
            written_pos: written,
            synced_pos: written,
            written_tail,
            allocated: allocated.max(written),
            attempted_pos: align_up(written),
            punch: None,
            writing: false,
            syncing: false,
            durable_writes: durable_writes_default(),
            shard_cycle: crate::storage::cycle::shard_cycle_default(),
            shard_rounds: crate::storage::shard_sync::shard_rounds_default(),
            epoch: 0,
            dead: false,
            gen: 0,
            gen_end: vec![],
            last_error: None,
            sync_failures: 0,
            last_sync: now,
            flusher: None,
            spare: Flush::default(),
            snapshotting: false,
            snapshot_pos,
            snapshot_every: PRODUCER_SNAPSHOT_BYTES,
        }
    }

    /// Bytes of the active segment written to its file (readers see no further).
    pub fn written_pos(&self) -> u64 {
        self.written_pos
    }
    pub fn is_dead(&self) -> bool {
        self.dead
    }
    /// Nothing pending and no write or sync in flight (or never again: the flusher is dead).
    pub fn is_drained(&self) -> bool {
        (self.pending.is_empty() && !self.writing && !self.syncing) || self.dead
    }
    /// An append of `bytes` must wait: the pending bytes would pass their limit.
    pub fn is_full(&self, bytes: usize) -> bool {
        !self.pending.is_empty() && self.pending.bytes + bytes > PENDING_BYTES_MAX
    }
    pub fn is_snapshotting(&self) -> bool {
        self.snapshotting
    }
    #[cfg(test)]
    pub fn set_durable_writes(&mut self, on: bool) {
        self.durable_writes = on;
    }
    #[cfg(test)]
    pub fn set_shard_cycle(&mut self, on: bool) {
        self.shard_cycle = on;
    }
    /// The flush kept for the next one holds nothing of an earlier flush (tests).
    #[cfg(test)]
    pub fn spare_is_clear(&self) -> bool {
        self.spare.is_clear()
            && self.spare.marks.capacity() <= FLUSH_MARKS_KEPT_MAX
            && self.spare.writes.capacity() <= FLUSH_WRITES_KEPT_MAX
    }
    #[cfg(test)]
    pub fn set_snapshot_every(&mut self, bytes: u64) {
        self.snapshot_every = bytes;
    }

    /// Takes the bytes of an accepted append (offsets up to `next`) for the next flush and
    /// wakes the flusher.
    pub fn push(&mut self, records: &[u8], next: Offset, sync: bool) -> Ticket {
        self.pending
            .push_with(records, !(sync && self.durable_writes));
        let end_pos = self.pending.end_pos();
        self.pending.marks.push((end_pos, next));
        if sync {
            self.sync_wanted = self.sync_wanted.max(next);
        }
        self.wake_flusher();
        Ticket {
            gen: self.gen,
            sync_failures: self.sync_failures,
        }
    }

    /// A ticket for an idempotent retry whose batches (offsets up to `next`) are already
    /// accepted: it asks for their fdatasync when `sync`, and fails with their write.
    pub fn retry_ticket(&mut self, next: Offset, sync: bool) -> Ticket {
        if sync {
            self.sync_wanted = self.sync_wanted.max(next);
            self.wake_flusher();
        }
        Ticket {
            gen: self.gen,
            sync_failures: self.sync_failures,
        }
    }

    /// The append of `ticket` ending at `last` failed: a write failed before it was written, or
    /// the flusher died.
    pub fn failed(&self, ticket: Ticket, last: Offset) -> bool {
        (ticket.gen < self.gen && last >= self.gen_end[ticket.gen]) || self.dead
    }
    /// An fdatasync failed after the append of `ticket` was accepted.
    pub fn sync_failed_since(&self, ticket: Ticket) -> bool {
        self.sync_failures > ticket.sync_failures
    }

    pub fn wake_flusher(&mut self) {
        if let Some(w) = self.flusher.take() {
            w.wake();
        }
    }

    /// Nothing more may be appended (the segment files are in a state only a restart
    /// resolves): appends and rolls fail with `e` from now on.
    pub fn stop(&mut self, e: &std::io::Error) {
        self.dead = true;
        self.set_error(e);
    }

    pub fn set_error(&mut self, e: &std::io::Error) {
        self.last_error = Some((e.raw_os_error(), e.kind(), e.to_string()));
    }
    /// The error of the last failed write or sync.
    pub fn error(&self) -> StorageError {
        let e = match &self.last_error {
            Some((Some(code), _, _)) => std::io::Error::from_raw_os_error(*code),
            Some((None, kind, msg)) => std::io::Error::new(*kind, msg.clone()),
            None => std::io::Error::other("write failed"),
        };
        StorageError::Io(e)
    }

    /// A range a failed write may have touched, to punch out before the segment is trusted.
    pub fn take_punch(&mut self) -> Option<(u64, u64)> {
        self.punch.take()
    }

    /// The active segment was synced and truncated to its `written` bytes (roll).
    pub fn sealed(&mut self, written: u64) {
        assert_eq!(written, self.written_pos);
        assert!(self.is_drained());
        self.epoch += 1;
        self.synced_pos = written;
        self.allocated = written;
        self.attempted_pos = align_up(written);
        self.punch = None; // the truncation removed everything past the data
    }

    /// The log was cut back to `written` bytes of the active segment (a file of exactly that
    /// size now, synced), ending at offset `end`. A new write generation starts: appends of
    /// the old one at or past `end` count as failed.
    pub fn truncated(&mut self, written: u64, written_tail: Vec<u8>, end: Offset) {
        assert!(self.is_drained());
        assert_eq!(written_tail.len() as u64, written - align_down(written));
        self.epoch += 1;
        self.pending.reset(align_down(written), &written_tail);
        self.written_pos = written;
        self.synced_pos = written;
        self.written_tail = written_tail;
        self.allocated = written;
        self.attempted_pos = align_up(written);
        self.punch = None;
        self.gen_end.push(end);
        self.gen += 1;
        self.sync_wanted = self.sync_wanted.min(end);
        self.snapshot_pos = written; // the truncation writes a producer snapshot at `end`
    }

    /// A new, empty active segment of `allocated` pre-allocated bytes (roll).
    pub fn started_segment(&mut self, allocated: u64) {
        assert!(self.is_drained());
        self.epoch += 1;
        self.pending.reset(0, &[]);
        self.snapshot_pos = 0;
        self.synced_pos = 0;
        self.written_pos = 0;
        self.written_tail.clear();
        self.allocated = allocated;
        self.attempted_pos = 0;
    }

    /// The positions in the active segment (of `size` bytes) are in order:
    /// `synced_pos <= written_pos <= attempted_pos`, the pending bytes end at `size`, and the
    /// kept tail is the partial page before `written_pos`.
    pub fn check(&self, size: u64) {
        assert!(
            self.synced_pos <= self.written_pos,
            "{}",
            self.describe(size)
        );
        assert!(
            self.written_pos <= size && self.pending.end_pos() == size,
            "{}",
            self.describe(size)
        );
        assert!(
            self.written_pos <= self.attempted_pos,
            "{}",
            self.describe(size)
        );
        assert_eq!(
            self.written_tail.len() as u64,
            self.written_pos - align_down(self.written_pos),
            "{}",
            self.describe(size)
        );
        assert_eq!(self.pending.start % ALIGN_BYTES, 0);
        assert_eq!(self.gen_end.len(), self.gen);
    }
    fn describe(&self, size: u64) -> String {
        format!(
            "appender positions out of order: synced {} written {} attempted {} pending [{}, {}) segment size {}",
            self.synced_pos,
            self.written_pos,
            self.attempted_pos,
            self.pending.start,
            self.pending.end_pos(),
            size
        )
    }
}

thread_local! {
    /// Directories of this shard's logs with an index append on the blocking pool, and the
    /// tasks waiting for one to finish. An append outlives a log dropped without a close (a
    /// partition dropped, a crash in tests); opening the same directory again waits for it
    /// ([`index_appends_finished`]), so recovery never reads or cuts index files that an older
    /// append is still writing.
    static INDEX_APPENDS: std::cell::RefCell<(std::collections::HashSet<std::path::PathBuf>, Vec<Waker>)> =
        Default::default();
}

fn index_append_started(dir: &std::path::Path) {
    INDEX_APPENDS.with(|a| a.borrow_mut().0.insert(dir.to_path_buf()));
}

fn index_append_finished(dir: &std::path::Path) {
    INDEX_APPENDS.with(|a| {
        let mut a = a.borrow_mut();
        a.0.remove(dir);
        for w in a.1.drain(..) {
            w.wake();
        }
    });
}

/// Resolves once no index append of a log in `dir` runs on this shard's blocking pool.
pub(crate) async fn index_appends_finished(dir: &std::path::Path) {
    std::future::poll_fn(|cx| {
        INDEX_APPENDS.with(|a| {
            let mut a = a.borrow_mut();
            if a.0.contains(dir) {
                a.1.push(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
    })
    .await
}

/// A test's stall of the blocking index append: it waits in the pool until the test opens
/// the gate, so a test can act while an append is in flight.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct IndexGate {
    open: std::sync::Mutex<bool>,
    changed: std::sync::Condvar,
    entered: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
impl IndexGate {
    fn pass(&self) {
        self.entered
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.changed.wait(open).unwrap();
        }
    }
    /// Appends that reached the gate so far.
    pub fn entered(&self) -> usize {
        self.entered.load(std::sync::atomic::Ordering::SeqCst)
    }
    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.changed.notify_all();
    }
}

/// What the flusher starts next.
#[derive(Default)]
struct Start {
    write: bool,
    /// The write carries a `Synced` append: it goes in the shard's commit cycle.
    gated: bool,
    /// Its place in the cycle, held until the write is done.
    ticket: Option<crate::storage::cycle::CycleTicket>,
    sync: bool,
    /// Join the shard's next sync round (acks=1 data due for its background sync).
    round: bool,
    /// Nothing to start before this instant (the periodic or `IntervalMs` sync).
    sleep_until: Option<Instant>,
    exit: bool,
}

/// The per-partition flusher task: runs until the log is closed or dropped. It keeps at most one
/// write (a flush of everything pending) and one fdatasync in flight, independently: the next
/// write starts while the previous write's fdatasync is still running, so a steady stream of
/// acks=all appends keeps the device busy with data while the syncs complete. It is contained:
/// a panic is logged once and marks the log dead ([`PartitionLog::flusher_died`]), so its
/// waiting and later appends fail with an I/O error instead of hanging. It is not restarted: the
/// state it panicked in (a write half done, `writing` set) is not one to resume from; a broker
/// restart recovers the partition from its files.
pub(crate) async fn flusher(log: Weak<PartitionLog>) {
    let Err(mut p) = crate::contain::contain(flush_loop(log.clone())).await else {
        return;
    };
    p.mark_reported();
    match log.upgrade() {
        Some(log) => {
            tracing::error!(dir = %log.dir().display(), "partition flusher {p}; appends to this partition fail from now on");
            log.flusher_died();
        }
        None => tracing::error!("partition flusher {p}; its log was already dropped"),
    }
}

async fn flush_loop(weak: Weak<PartitionLog>) {
    let (_counted, phase) = FlusherCounted::new();
    if let Some(log) = weak.upgrade() {
        let a = &mut log.state.borrow_mut().appender;
        // Spread only per-partition fdatasyncs; partitions that share sync rounds are best
        // due together.
        if !a.shard_rounds {
            a.last_sync = a.last_sync.checked_sub(phase).unwrap_or(a.last_sync);
        }
    }
    // The write and the sync in flight hold the log (their I/O completes even if every other
    // handle is dropped); while neither is in flight the flusher holds only `weak`. Each lives
    // in this task's own state, replaced in place: starting one allocates nothing.
    let mut write = std::pin::pin!(write_work(None));
    let mut sync = std::pin::pin!(sync_work(None));
    let mut round = std::pin::pin!(round_work(None));
    let mut timer: Option<(Instant, Sleep)> = None;
    loop {
        let mut start = std::future::poll_fn(|cx| {
            if write
                .as_mut()
                .as_pin_mut()
                .is_some_and(|f| f.poll(cx).is_ready())
            {
                write.set(None);
            }
            if sync
                .as_mut()
                .as_pin_mut()
                .is_some_and(|f| f.poll(cx).is_ready())
            {
                sync.set(None);
            }
            if round
                .as_mut()
                .as_pin_mut()
                .is_some_and(|f| f.poll(cx).is_ready())
            {
                round.set(None);
            }
            if timer
                .as_mut()
                .is_some_and(|(_, t)| std::pin::Pin::new(t).poll(cx).is_ready())
            {
                timer = None;
            }
            let Some(log) = weak.upgrade() else {
                return Poll::Ready(Start {
                    exit: true,
                    ..Start::default()
                });
            };
            let mut start = next_work(&log, write.is_none(), sync.is_none(), round.is_none());
            if start.write && start.gated && log.state.borrow().appender.shard_cycle {
                // Wait for the shard's next commit cycle if the current one is closed; the
                // cycle wakes this task when it ends.
                start.ticket = crate::storage::cycle::join(cx.waker());
                start.write = start.ticket.is_some();
            }
            let sleep_new = start
                .sleep_until
                .is_some_and(|at| timer.as_ref().is_none_or(|(t, _)| at < *t));
            if start.write || start.sync || start.round || start.exit || sleep_new {
                return Poll::Ready(start);
            }
            log.state.borrow_mut().appender.flusher = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        if start.exit {
            return;
        }
        if let Some(at) = start.sleep_until {
            if let Some(log) = weak.upgrade() {
                let now = log.clock.now();
                timer = Some((at, log.clock.sleep(at.saturating_duration_since(now))));
            }
        }
        if start.write {
            let Some(log) = weak.upgrade() else { return };
            if cfg!(any(debug_assertions, feature = "fault-injection")) {
                let name = log.dir().file_name().and_then(|n| n.to_str());
                crate::fault::panic_point("flusher", name.unwrap_or(""));
            }
            write.set(write_work(Some((log, start.ticket.take()))));
        }
        if start.sync {
            let Some(log) = weak.upgrade() else { return };
            sync.set(sync_work(Some(log)));
        }
        if start.round {
            let Some(log) = weak.upgrade() else { return };
            round.set(round_work(Some(log)));
        }
        glommio::yield_if_needed().await;
    }
}

/// The flusher's write, when given a log: one flush of everything pending, then its place in
/// the shard's commit cycle is given up and a producer snapshot started if one is due. `None`
/// names the same future type for an idle slot.
fn write_work(
    job: Option<(Rc<PartitionLog>, Option<crate::storage::cycle::CycleTicket>)>,
) -> Option<impl Future<Output = ()>> {
    job.map(|(log, ticket)| async move {
        log.flush_pending().await;
        drop(ticket); // out of the cycle: the next may start when all of it is done
        log.snapshot_if_due(); // durable writes advance the synced offset too
    })
}

/// The flusher's fdatasync, when given a log, then a producer snapshot if one is due.
fn sync_work(log: Option<Rc<PartitionLog>>) -> Option<impl Future<Output = ()>> {
    log.map(|log| async move {
        log.sync_written().await;
        log.snapshot_if_due();
    })
}

/// The flusher's place in a shard sync round, when given a log, then a producer snapshot if
/// one is due. It holds the log until the round is done (a few milliseconds past its start).
fn round_work(log: Option<Rc<PartitionLog>>) -> Option<impl Future<Output = ()>> {
    log.map(|log| async move {
        log.sync_in_round().await;
        log.snapshot_if_due();
    })
}

/// What to start now, given which of the write, the sync and the round are idle.
fn next_work(log: &PartitionLog, write_idle: bool, sync_idle: bool, round_idle: bool) -> Start {
    let s = &*log.state.borrow();
    let a = &s.appender;
    let (synced, hw) = (s.offsets.synced(), s.offsets.hw());
    let mut start = Start::default();
    if a.dead {
        start.exit = write_idle && sync_idle;
        return start;
    }
    let always = matches!(s.config.flush, FlushPolicy::Always);
    // Written data that a Synced append waits for is synced as soon as the previous sync is
    // done, whatever the writes do, so a steady stream of appends cannot postpone it.
    start.sync = sync_idle && always && !s.rolling && a.sync_wanted > synced && hw > synced;
    start.write = write_idle && !a.pending.is_empty();
    start.gated = always && a.sync_wanted > hw;
    if start.write || start.sync {
        return start;
    }
    if s.closed && write_idle && sync_idle && a.pending.is_empty() {
        start.exit = true;
        return start;
    }
    let in_rounds = always && a.shard_rounds;
    let idle = if in_rounds { round_idle } else { sync_idle };
    if idle && !s.rolling && hw > synced {
        // Unsynced data no append waits for (or `IntervalMs`): sync when the interval is up,
        // in the shard's next round or with an fdatasync of this partition.
        let every = match s.config.flush {
            FlushPolicy::Always => background_sync_interval(),
            FlushPolicy::IntervalMs(ms) => Duration::from_millis(ms),
        };
        let due = a.last_sync + every;
        if log.clock.now() < due {
            start.sleep_until = Some(due);
        } else if in_rounds {
            start.round = true;
        } else {
            start.sync = true;
        }
    }
    start
}

impl PartitionLog {
    /// One group commit's write: everything pending, as concurrent aligned writes.
    pub(crate) async fn flush_pending(self: &Rc<Self>) {
        let (file, mut flush, end_offset, alloc, punch, durable) = {
            let mut guard = self.state.borrow_mut();
            let s = &mut *guard;
            let hw = s.offsets.hw();
            let a = &mut s.appender;
            if a.pending.is_empty() {
                return;
            }
            a.writing = true;
            // A durable write vouches only for its own bytes: use one when a Synced append
            // waits for this flush and everything before it is already durable.
            let durable = a.durable_writes
                && matches!(s.config.flush, FlushPolicy::Always)
                && a.sync_wanted > hw
                && a.synced_pos == a.written_pos
                && !a.syncing;
            // Check before the write: the flush starts at the page holding the end of the
            // written data and its writes follow each other in file order.
            debug_assert_eq!(a.pending.start, align_down(a.written_pos));
            let mut flush = std::mem::take(&mut a.spare);
            a.pending.take(&mut flush);
            debug_assert!(flush
                .writes
                .windows(2)
                .all(|w| w[0].1 + w[0].0.len() as u64 == w[1].1));
            let seg_bytes = s.config.segment_bytes.max(ALIGN_BYTES);
            let alloc = (flush.write_end > a.allocated).then(|| {
                align_up(
                    flush
                        .write_end
                        .max(a.allocated + next_extent(a.allocated, seg_bytes)),
                )
            });
            // After a failed write, bytes of the failed batches may lie past the written data;
            // release them before writing so no stale batch can follow the log end on disk.
            let punch = a.punch;
            a.attempted_pos = a.attempted_pos.max(flush.write_end);
            let file = s.active().file().clone();
            (file, flush, s.offsets.log_end(), alloc, punch, durable)
        };
        let started = std::time::Instant::now();
        let result = async {
            if let Some((pos, len)) = punch {
                file.punch(pos, len).await?;
            }
            if let Some(len) = alloc {
                file.allocate(len).await?;
            }
            // The flush's writes are in file order. As a prefix of them completes, the appends
            // wholly inside it are acknowledged, so producers refill while the rest of the flush
            // is still on its way to the disk.
            let writes: SmallVec<[IoFuture<'_, ()>; FLUSH_WRITES_INLINE]> = flush
                .writes
                .iter()
                .map(|(buf, pos)| {
                    if durable {
                        file.write_durable_at(buf.clone(), *pos)
                    } else {
                        file.write_at(buf.clone(), *pos)
                    }
                })
                .collect();
            let mut mark = 0usize;
            join_in_order(writes, |n| {
                if n < flush.writes.len() {
                    self.written_prefix(&flush.writes[..n], &flush.marks, &mut mark, durable);
                }
            })
            .await
        }
        .await;
        let mut guard = self.state.borrow_mut();
        let s = &mut *guard;
        s.appender.writing = false;
        match result {
            Ok(()) => {
                crate::stats::storage_written(
                    flush
                        .write_end
                        .saturating_sub(flush.writes.first().map_or(0, |w| w.1)),
                );
                if durable {
                    crate::stats::durable_write_done(started.elapsed());
                }
                let a = &mut s.appender;
                if let Some(len) = alloc {
                    a.allocated = len;
                }
                if punch.is_some() {
                    a.punch = None;
                    a.attempted_pos = flush.write_end;
                }
                a.written_pos = flush.end_pos;
                // The old tail goes back with the flush's lists.
                std::mem::swap(&mut a.written_tail, &mut flush.tail);
                s.offsets.written(end_offset);
                if durable {
                    self.durable_to(s, end_offset, flush.end_pos);
                }
            }
            // The allocation may have succeeded before a write failed; it is asked for again
            // next time, which is harmless.
            Err(e) => {
                crate::stats::storage_write_failed();
                self.fail_unwritten(s, e)
            }
        }
        // Its buffers are released now; its lists serve the next flush.
        flush.clear();
        s.appender.spare = flush;
        s.debug_check_invariants();
        s.wake_all();
    }

    /// Everything below `offset` (file position `pos`) is on stable storage, by durable writes
    /// that followed durable data: the synced offset moves there and the index entries of the
    /// batches below it go to the index files (off the executor, see
    /// [`start_index_append`](Self::start_index_append)).
    fn durable_to(self: &Rc<Self>, s: &mut State, offset: Offset, pos: u64) {
        s.offsets.synced_to(offset);
        let a = &mut s.appender;
        a.synced_pos = a.synced_pos.max(pos);
        a.last_sync = self.clock.now();
        self.start_index_append(s);
    }

    /// Starts appending the index entries of the active segment's durable batches to its index
    /// files, if enough are due and no append is in flight: the blocking file calls run on the
    /// blocking thread pool, never on the shard's executor, in a task of their own (not the
    /// flusher's, so a flusher panic cannot drop an append whose files are still being
    /// written). Its outcome moves the durable counts; then the entries that became durable
    /// meanwhile go in the next one. None starts while a roll, truncation or close runs
    /// (`rolling`), or once the log is closed: each of those rewrites the index files or
    /// vouches for their counts after waiting for the append in flight
    /// ([`State::is_drained`]), so an append never writes to files that changed under it.
    pub(crate) fn start_index_append(self: &Rc<Self>, s: &mut State) {
        if s.rolling || s.closed || s.appender.dead {
            return;
        }
        let durable_pos = s.appender.synced_pos;
        let Some(job) = s.active_mut().index_append(&self.dir, durable_pos, false) else {
            return;
        };
        index_append_started(&self.dir);
        let weak = Rc::downgrade(self);
        let dir = self.dir.clone();
        #[cfg(test)]
        let gate = self.index_gate.borrow().clone();
        glommio::spawn_local(async move {
            let r = crate::contain::contain(async move {
                glommio::executor()
                    .spawn_blocking(move || {
                        #[cfg(test)]
                        if let Some(g) = gate {
                            g.pass();
                        }
                        job.run()
                    })
                    .await
            })
            .await;
            index_append_finished(&dir);
            let Some(log) = weak.upgrade() else { return };
            let mut guard = log.state.borrow_mut();
            let s = &mut *guard;
            match r {
                Ok(done) => s.active_mut().index_appended(&log.dir, done),
                Err(mut p) => {
                    p.mark_reported();
                    tracing::error!(dir = %log.dir.display(), "index append {p}; no more index appends for this segment");
                    s.active_mut().index_append_lost();
                }
            }
            log.start_index_append(s);
            s.wake_all();
        })
        .detach();
    }

    /// The leading writes `written` of a flush have completed: the appends that end inside them
    /// (`marks[*mark..]` onwards) are written (and durable, when the writes were). Advances the
    /// high watermark over them.
    fn written_prefix(
        self: &Rc<Self>,
        written: &[(Rc<DmaBuffer>, u64)],
        marks: &[(u64, Offset)],
        mark: &mut usize,
        durable: bool,
    ) {
        let Some((last, last_pos)) = written.last() else {
            return;
        };
        let prefix_end = last_pos + last.len() as u64;
        let start = *mark;
        while *mark < marks.len() && marks[*mark].0 <= prefix_end {
            *mark += 1;
        }
        if *mark == start {
            return;
        }
        let (end_pos, end_offset) = marks[*mark - 1];
        let page = align_down(end_pos);
        let Some((buf, pos)) = written
            .iter()
            .find(|w| w.1 <= page && page < w.1 + w.0.len() as u64)
        else {
            return;
        };
        let from = (page - pos) as usize;
        let mut guard = self.state.borrow_mut();
        let s = &mut *guard;
        let tail = &mut s.appender.written_tail;
        tail.clear();
        tail.extend_from_slice(&buf.as_bytes()[from..from + (end_pos - page) as usize]);
        s.appender.written_pos = end_pos;
        s.offsets.written(end_offset);
        if durable {
            self.durable_to(s, end_offset, end_pos);
        }
        s.debug_check_invariants();
        s.wake_all();
    }

    /// fdatasync of what is written; then the index entries of the now durable batches go to
    /// the index files (off the executor).
    pub(crate) async fn sync_written(self: &Rc<Self>) {
        let (file, target, pos) = {
            let mut s = self.state.borrow_mut();
            debug_assert!(!s.appender.syncing);
            s.appender.syncing = true;
            (
                s.active().file().clone(),
                s.offsets.hw(),
                s.appender.written_pos,
            )
        };
        let started = std::time::Instant::now();
        let r = file.sync().await;
        crate::stats::fsync_done(started.elapsed());
        let mut guard = self.state.borrow_mut();
        let s = &mut *guard;
        s.appender.syncing = false;
        match r {
            Ok(()) => {
                s.offsets.synced_to(target);
                let a = &mut s.appender;
                a.synced_pos = a.synced_pos.max(pos);
                a.last_sync = self.clock.now();
                self.start_index_append(s);
            }
            Err(e) => {
                crate::stats::storage_write_failed();
                tracing::error!(dir = %self.dir.display(), error = %e, "fdatasync failed");
                let a = &mut s.appender;
                a.sync_failures += 1;
                a.set_error(&e);
                // The waiting Synced appends fail now; the next one asks for a sync again. Retrying
                // at once would spin on a failing device.
                a.sync_wanted = s.offsets.synced();
                a.last_sync = self.clock.now();
            }
        }
        s.debug_check_invariants();
        s.wake_all();
    }

    /// A background sync in the shard's next round ([`crate::storage::shard_sync`]): what is
    /// written when the partition joins counts as synced once the round succeeds, unless the
    /// positions started over meanwhile (roll, truncation). Either way the next background
    /// sync is an interval later; a failed round is logged once, by the round.
    pub(crate) async fn sync_in_round(self: &Rc<Self>) {
        let (target, pos, epoch) = {
            let s = self.state.borrow();
            (s.offsets.hw(), s.appender.written_pos, s.appender.epoch)
        };
        let dir = self.dir.parent().unwrap_or(&self.dir);
        let r = crate::storage::shard_sync::sync_round(dir, &self.io, &self.clock).await;
        let mut guard = self.state.borrow_mut();
        let s = &mut *guard;
        s.appender.last_sync = self.clock.now();
        if r.is_ok() && s.appender.epoch == epoch && !s.closed {
            // Check after the round, paired with the positions taken before it: the high
            // watermark moves back only with a truncation, which changes the epoch.
            debug_assert!(target <= s.offsets.hw() && pos <= s.appender.written_pos);
            s.offsets.synced_to(target);
            let a = &mut s.appender;
            a.synced_pos = a.synced_pos.max(pos);
            self.start_index_append(s);
        }
        s.debug_check_invariants();
        s.wake_all();
    }

    /// Asks the flusher for an fdatasync covering every offset below `upto` (at most the high
    /// watermark) and waits for it. Fails when a sync fails meanwhile or the flusher is dead.
    pub(crate) async fn sync_to(&self, upto: Offset) -> Result<(), StorageError> {
        let failures = {
            let mut guard = self.state.borrow_mut();
            let s = &mut *guard;
            debug_assert!(upto <= s.offsets.hw());
            if s.offsets.synced() >= upto {
                return Ok(());
            }
            let a = &mut s.appender;
            a.sync_wanted = a.sync_wanted.max(upto);
            a.wake_flusher();
            a.sync_failures
        };
        std::future::poll_fn(|cx| {
            let mut s = self.state.borrow_mut();
            if s.offsets.synced() >= upto {
                return Poll::Ready(Ok(()));
            }
            if s.appender.dead || s.appender.sync_failures > failures {
                return Poll::Ready(Err(s.appender.error()));
            }
            if s.closed {
                return Poll::Ready(Err(StorageError::Io(std::io::Error::other(
                    "log is closed",
                ))));
            }
            s.waiters.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Starts a producer snapshot if enough was synced since the last one: the state of every
    /// batch below the synced offset (batches past it may still be rolled back by a failed
    /// write, so they are left to the recovery replay). Written off the reactor, since it ends
    /// with fsyncs of the file and the directory.
    fn snapshot_if_due(self: &Rc<Self>) {
        let (path, body) = {
            let mut guard = self.state.borrow_mut();
            let s = &mut *guard;
            let a = &mut s.appender;
            if a.snapshotting || s.rolling || a.synced_pos < a.snapshot_pos + a.snapshot_every {
                return;
            }
            let upto = s.offsets.synced();
            let mut p = s.producers.clone();
            p.truncate_from(upto);
            a.snapshotting = true;
            a.snapshot_pos = a.synced_pos;
            (
                self.dir.join(crate::storage::meta::PRODUCER_FILE),
                crate::storage::meta::encode_producers(upto, &p),
            )
        };
        let weak = Rc::downgrade(self);
        // Contained, and `snapshotting` is cleared whatever happens: a roll or close waits for it.
        glommio::spawn_local(async move {
            let r = crate::contain::contain(async move {
                glommio::executor()
                    .spawn_blocking(move || crate::storage::meta::write_file(&path, &body))
                    .await
            })
            .await;
            let Some(log) = weak.upgrade() else { return };
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(dir = %log.dir().display(), error = %e, "producer snapshot failed")
                }
                Err(mut p) => {
                    p.mark_reported();
                    tracing::error!(dir = %log.dir().display(), "producer snapshot {p}; the next one retries");
                }
            }
            let mut s = log.state.borrow_mut();
            s.appender.snapshotting = false;
            s.wake_all();
        })
        .detach();
    }

    /// A write failed: every batch not yet on disk fails with it. The log end goes back to the
    /// high watermark so the next append continues exactly after the last written batch — no
    /// hole and no duplicate offset in the file.
    pub(crate) fn fail_unwritten(&self, s: &mut State, e: std::io::Error) {
        tracing::error!(
            dir = %self.dir.display(),
            error = %e,
            failed_from = s.offsets.hw().0,
            failed_to = s.offsets.log_end().0,
            "segment write failed; unwritten appends fail"
        );
        let hw = s.offsets.rewind_to_hw();
        let a = &mut s.appender;
        a.set_error(&e);
        a.gen_end.push(hw);
        a.gen += 1;
        a.sync_wanted = a.sync_wanted.min(hw).max(s.offsets.synced());
        let pos = a.written_pos;
        let clean_from = align_up(pos);
        if a.attempted_pos > clean_from {
            let to = a
                .punch
                .map_or(a.attempted_pos, |(p, l)| (p + l).max(a.attempted_pos));
            a.punch = Some((clean_from, to - clean_from));
        }
        a.pending.reset(align_down(pos), &a.written_tail);
        s.active_mut().truncate(pos, hw);
        s.producers.truncate_from(hw);
        self.cache.truncate_from(self.cache_id, hw);
        s.check_invariants();
    }

    /// The flusher task panicked (it caught the panic itself): what is pending will never be
    /// written, so fail the appends waiting for it and every later one. Reads keep working up to
    /// the high watermark; a restart recovers the partition from its files.
    pub(crate) fn flusher_died(&self) {
        let mut s = self.state.borrow_mut();
        s.appender.dead = true;
        s.appender.set_error(&std::io::Error::other(
            "the partition's flusher stopped after a panic",
        ));
        s.wake_all();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_background_sync_interval_stretches_with_the_shards_partitions_up_to_its_bound() {
        let ms = |n| super::background_sync_interval_for(n).as_millis();
        // Up to BACKGROUND_SYNCS_PER_SEC_MAX partitions: each syncs once a second.
        assert_eq!(ms(0), 1000);
        assert_eq!(ms(8), 1000);
        assert_eq!(ms(100), 1000);
        // More: together still at most 100 syncs a second.
        assert_eq!(ms(250), 2500);
        assert_eq!(ms(1000), 10_000);
        // Bounded, whatever the count.
        assert_eq!(ms(10_000), 10_000);
        assert_eq!(ms(u64::MAX), 10_000);
    }

    #[test]
    fn flushers_started_together_move_their_first_syncs_apart() {
        let before = super::flushers_running();
        let (a, pa) = super::FlusherCounted::new();
        let (b, pb) = super::FlusherCounted::new();
        let (c, pc) = super::FlusherCounted::new();
        assert_eq!(super::flushers_running(), before + 3);
        let spacing = std::time::Duration::from_millis(1000 / super::BACKGROUND_SYNCS_PER_SEC_MAX);
        assert_eq!((pb - pa, pc - pb), (spacing, spacing));
        drop((a, b, c));
        assert_eq!(super::flushers_running(), before);
    }

    use super::*;

    /// A flush of everything pending, in fresh lists.
    fn take(p: &mut Pending) -> Flush {
        let mut f = Flush::default();
        p.take(&mut f);
        f
    }

    #[test]
    fn take_pads_the_last_page_and_keeps_it_for_the_next_flush() {
        crate::storage::tests::run(async {
            let mut p = Pending::new(0, vec![]);
            let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 + 1).collect();
            p.push(&data);
            assert_eq!(p.end_pos(), 5000);
            let f = take(&mut p);
            assert_eq!((f.end_pos, f.write_end), (5000, 8192));
            let w = &f.writes[0].0;
            assert_eq!(&w.as_bytes()[..5000], &data[..]);
            assert!(w.as_bytes()[5000..8192].iter().all(|b| *b == 0));
            // The next flush starts at the partial page and rewrites it, completed.
            assert_eq!(f.tail, data[4096..].to_vec());
            assert_eq!((p.start, p.head.len()), (4096, 904));
            p.push(b"more");
            let g = take(&mut p);
            assert_eq!(g.writes[0].1, 4096);
            assert_eq!(&g.writes[0].0.as_bytes()[..904], &data[4096..]);
            assert_eq!(&g.writes[0].0.as_bytes()[904..908], b"more");
            assert_eq!(g.end_pos, 5004);
        });
    }

    #[test]
    fn a_flush_after_a_partial_page_writes_that_page_on_its_own() {
        crate::storage::tests::run(async {
            let mut p = Pending::new(0, vec![]);
            p.push(&[1u8; 5000]);
            let f = take(&mut p);
            assert_eq!(f.writes.len(), 1, "no kept page: one write");
            // The next flush starts at the written partial page: that page is one write and the
            // new bytes past it, in blocks never written, another.
            p.push(&[2u8; 10_000]);
            let g = take(&mut p);
            let at: Vec<(u64, usize)> = g.writes.iter().map(|(b, pos)| (*pos, b.len())).collect();
            assert_eq!(at, vec![(4096, 4096), (8192, 8192)]);
            assert_eq!(&g.writes[0].0.as_bytes()[..904], &[1u8; 904][..]);
            assert!(g.writes[0].0.as_bytes()[904..].iter().all(|b| *b == 2));
            assert_eq!(g.end_pos, 15_000);
            assert_eq!(g.write_end, 16_384);
            // An append that ends inside the kept page needs one write only.
            p.push(b"x");
            let h = take(&mut p);
            assert_eq!(h.writes.len(), 1);
            assert_eq!(h.writes[0].1, 12_288);
            // For a durable write the page and the new bytes stay one write.
            p.push_with(&[3u8; 10_000], false);
            let d = take(&mut p);
            let at: Vec<(u64, usize)> = d.writes.iter().map(|(b, pos)| (*pos, b.len())).collect();
            assert_eq!(at, vec![(12_288, 16_384)]);
        });
    }

    #[test]
    fn large_appends_span_chunks_written_at_consecutive_positions() {
        crate::storage::tests::run(async {
            let mut p = Pending::new(0, vec![]);
            let data = vec![7u8; 3 * CHUNK_BYTES_MAX + 10];
            p.push(&data);
            let f = take(&mut p);
            let mut pos = 0;
            for (buf, at) in &f.writes {
                assert_eq!(*at, pos);
                assert_eq!(buf.len() as u64 % ALIGN_BYTES, 0);
                pos += buf.len() as u64;
            }
            assert_eq!(f.write_end, pos);
            assert_eq!(f.end_pos, data.len() as u64);
        });
    }

    #[test]
    fn a_flush_reuses_the_lists_of_the_previous_one() {
        crate::storage::tests::run(async {
            let mut p = Pending::new(0, vec![]);
            let mut spare = Flush::default();
            let mut lists = None;
            for round in 0..4u64 {
                p.push(&[round as u8 + 1; 6000]);
                p.marks.push((p.end_pos(), Offset(round as i64 + 1)));
                let mut f = std::mem::take(&mut spare);
                p.take(&mut f);
                // Only this flush's append and bytes, whatever the lists held before.
                assert_eq!(f.marks, vec![(p.end_pos(), Offset(round as i64 + 1))]);
                assert_eq!(f.end_pos, 6000 * (round + 1));
                assert_eq!(
                    f.writes.last().map(|w| w.1 + w.0.len() as u64),
                    Some(f.write_end)
                );
                assert_eq!(f.tail.len() as u64, f.end_pos % ALIGN_BYTES);
                assert!(p.marks.is_empty() && p.chunks.is_empty() && p.bytes == 0);
                f.clear();
                assert!(f.writes.is_empty() && f.marks.is_empty() && f.tail.is_empty());
                let now = (
                    f.writes.as_ptr() as usize,
                    f.marks.as_ptr() as usize,
                    p.marks.as_ptr() as usize,
                );
                // The marks lists trade places between the pending bytes and the flush: two
                // lists serve every round once both exist.
                if round >= 2 {
                    let (writes, a, b) = lists.expect("lists of the previous round");
                    assert_eq!(now.0, writes, "the write list is the previous flush's");
                    assert!([a, b].contains(&now.1) && [a, b].contains(&now.2));
                }
                lists = Some(now);
                spare = f;
            }
        });
    }

    #[test]
    fn a_flush_after_a_failed_write_starts_from_a_clean_list_at_the_written_page() {
        crate::storage::tests::run(async {
            let mut p = Pending::new(0, vec![]);
            p.push(&[1u8; 5000]);
            let mut f = take(&mut p);
            // The write of `f` fails: the appends pending meanwhile fail too, and the appender
            // starts again at the written data (here: nothing of `f`), keeping its lists.
            p.push(&[2u8; 3000]);
            p.marks.push((p.end_pos(), Offset(2)));
            f.clear();
            p.reset(0, &[]);
            assert!(p.is_empty() && p.marks.is_empty() && p.chunks.is_empty());
            assert_eq!(p.end_pos(), 0);
            p.push(&[3u8; 100]);
            p.take(&mut f);
            assert_eq!(f.writes.len(), 1);
            assert_eq!((f.writes[0].1, f.end_pos, f.write_end), (0, 100, 4096));
            assert!(f.writes[0].0.as_bytes()[..100].iter().all(|b| *b == 3));
            assert!(f.writes[0].0.as_bytes()[100..].iter().all(|b| *b == 0));
            assert!(f.marks.is_empty(), "no mark of a failed append survives");
            // Reset at a written partial page: the next flush rewrites it first.
            p.reset(4096, &[9u8; 10]);
            p.push(b"x");
            f.clear();
            p.take(&mut f);
            assert_eq!(f.writes[0].1, 4096);
            assert_eq!(
                &f.writes[0].0.as_bytes()[..11],
                b"\x09\x09\x09\x09\x09\x09\x09\x09\x09\x09x"
            );
        });
    }

    #[test]
    fn a_huge_flush_does_not_leave_huge_lists_behind() {
        crate::storage::tests::run(async {
            let mut p = Pending::new(0, vec![]);
            let appends = 20 * FLUSH_MARKS_KEPT_MAX;
            for i in 0..appends {
                p.push(b"abc");
                p.marks.push((p.end_pos(), Offset(i as i64 + 1)));
            }
            let mut f = take(&mut p);
            assert_eq!(f.marks.len(), appends);
            f.clear();
            assert!(f.marks.capacity() <= FLUSH_MARKS_KEPT_MAX);
            // One append larger than the pending limit (admitted alone) makes a longer write
            // list than a flush keeps.
            p.push(&vec![5u8; PENDING_BYTES_MAX + 4 * CHUNK_BYTES_MAX]);
            p.take(&mut f);
            assert!(f.writes.len() > FLUSH_WRITES_KEPT_MAX);
            f.clear();
            assert!(f.writes.capacity() <= FLUSH_WRITES_KEPT_MAX);
            assert!(p.chunks.capacity() <= FLUSH_WRITES_KEPT_MAX);
            // The same when the appends were dropped by a failed write instead.
            for i in 0..appends {
                p.push(b"abc");
                p.marks.push((p.end_pos(), Offset(i as i64 + 1)));
            }
            p.reset(0, &[]);
            assert!(p.marks.capacity() <= FLUSH_MARKS_KEPT_MAX);
        });
    }
}
