//! The read path of a partition log: reads from the batch cache or by aligned direct reads
//! through the sparse index (CRC-checked again), the read-aheads of sequential readers, and
//! timestamp lookups. Owns [`ReadAheads`]. Runs on the partition's shard, in the reading task;
//! it changes no offset.

use std::rc::Rc;

use bytes::Bytes;

use crate::protocol::batch::{self, BatchError, BatchHeader};
use crate::storage::io::{self, align_down, align_up};
use crate::storage::{PartitionLog, ReadOptions, ReadResult, StorageError};
use crate::types::Offset;

/// Bytes read from disk at least per cold read (one aligned request).
pub const READ_BYTES_MIN: usize = 64 << 10;
/// Cold reads asking for at least this much are treated as a sequential reader catching up: the
/// bytes after what they return are read ahead, for the next read.
pub const READAHEAD_MIN_BYTES: usize = 256 << 10;
/// Read-aheads kept per log (one per reader position), and bytes per shard in them.
pub const READAHEAD_SLOTS: usize = 4;
pub const READAHEAD_SHARD_BYTES: usize = 64 << 20;

thread_local! {
    /// Bytes held by the read-aheads of this shard's logs.
    pub(crate) static READAHEAD_BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The read-aheads of one log (oldest first) and how many reads found theirs. Part of the log's
/// `State`; its fields are private to this module.
pub(crate) struct ReadAheads {
    slots: Vec<ReadAhead>,
    used: u64,
}

impl ReadAheads {
    pub fn new() -> Self {
        ReadAheads {
            slots: vec![],
            used: 0,
        }
    }
    /// Cold reads that found their bytes already read ahead.
    pub fn used(&self) -> u64 {
        self.used
    }
    /// The read-ahead for a read of segment `seg_base` starting at `next`, if one was started.
    fn take(&mut self, seg_base: Offset, next: Offset) -> Option<ReadAhead> {
        let k = self
            .slots
            .iter()
            .position(|a| a.seg_base == seg_base && a.next == next)?;
        self.used += 1;
        Some(self.slots.remove(k))
    }
    /// Forgets every read-ahead (the segments they read were replaced by compaction).
    pub fn clear(&mut self) {
        self.slots.clear();
    }
    /// Keeps `ahead`, dropping the oldest one when every slot is taken.
    fn put(&mut self, ahead: ReadAhead) {
        if self.slots.len() >= READAHEAD_SLOTS {
            self.slots.remove(0);
        }
        self.slots.push(ahead);
    }
}

/// A read started for the next read of a sequential reader: the bytes of segment `seg_base`
/// from `apos`, for a read that starts at offset `next` (its batch at file position `next_pos`).
pub(crate) struct ReadAhead {
    seg_base: Offset,
    next: Offset,
    next_pos: u64,
    apos: u64,
    len: usize,
    /// The data limit when it was issued: bytes past it are not data.
    limit: u64,
    /// Contained: a panic of the read is re-raised in the reader that takes it.
    task: Option<glommio::Task<Result<std::io::Result<io::ReadBuf>, crate::contain::Panic>>>,
}

impl ReadAhead {
    async fn take(&mut self) -> std::io::Result<io::ReadBuf> {
        let task = self.task.take().expect("a read-ahead is taken once");
        READAHEAD_BYTES.with(|b| b.set(b.get() - self.len));
        match task.await {
            Ok(r) => r,
            Err(p) => p.resume(),
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            READAHEAD_BYTES.with(|b| b.set(b.get() - self.len));
            // Let the read finish on its own (its buffer belongs to the ring until then).
            task.detach();
        }
    }
}

impl PartitionLog {
    /// Whole batches from `opts.start`: from the batch cache when it holds `start`, else by
    /// aligned direct reads located through the sparse index (CRC-checked again).
    pub async fn read(&self, opts: ReadOptions) -> Result<ReadResult, StorageError> {
        let (hw, log_start) = {
            let s = self.state.borrow();
            if opts.start < s.offsets.log_start() || opts.start > s.offsets.log_end() {
                return Err(s.out_of_range(opts.start));
            }
            (s.offsets.hw(), s.offsets.log_start())
        };
        let mut out = ReadResult {
            batches: vec![],
            high_watermark: hw,
            log_start_offset: log_start,
        };
        if opts.start >= hw {
            return Ok(out);
        }
        let bytes_max = opts.bytes_max as usize;
        if self
            .cache
            .read(self.cache_id, opts.start, hw, bytes_max, &mut out.batches)
        {
            return Ok(out);
        }
        let mut start = opts.start;
        loop {
            out.batches = self.read_disk(start, hw, bytes_max).await?;
            if !out.batches.is_empty() {
                return Ok(out);
            }
            // Compaction may have removed the last batches of a sealed segment: the data goes
            // on in the next segment.
            let s = self.state.borrow();
            let i = s.segments.partition_point(|g| g.base() <= start);
            match s.segments.get(i) {
                Some(next) if i >= 1 && next.base() < hw => start = next.base(),
                _ => return Ok(out),
            }
        }
    }

    fn start_readahead(
        &self,
        file: &Rc<dyn io::SegmentFile>,
        seg_base: Offset,
        next: Offset,
        next_pos: u64,
        len: usize,
        limit: u64,
    ) {
        if len == 0 || READAHEAD_BYTES.with(|b| b.get()) + len > READAHEAD_SHARD_BYTES {
            return;
        }
        let apos = align_down(next_pos);
        let f = file.clone();
        READAHEAD_BYTES.with(|b| b.set(b.get() + len));
        let ahead = ReadAhead {
            seg_base,
            next,
            next_pos,
            apos,
            len,
            limit,
            task: Some(glommio::spawn_local(crate::contain::contain(async move {
                f.read_at(apos, len).await
            }))),
        };
        self.state.borrow_mut().reads.put(ahead);
    }

    async fn read_disk(
        &self,
        start: Offset,
        hw: Offset,
        bytes_max: usize,
    ) -> Result<Vec<Bytes>, StorageError> {
        let (file, pos, limit, seg_base, mut ahead) = {
            let mut s = self.state.borrow_mut();
            let i = s.segments.partition_point(|g| g.base() <= start);
            let Some(seg) = i.checked_sub(1).map(|i| &s.segments[i]) else {
                return Err(s.out_of_range(start));
            };
            let active = i == s.segments.len();
            let limit = if active {
                s.appender.written_pos()
            } else {
                seg.size()
            };
            let (file, pos, base) = (seg.file().clone(), seg.lookup(start), seg.base());
            let ahead = s.reads.take(base, start);
            (file, pos, limit, base, ahead)
        };
        let mut pos = ahead.as_ref().map_or(pos, |a| a.next_pos);
        let mut want = bytes_max.max(READ_BYTES_MIN);
        loop {
            let apos = align_down(pos);
            if pos >= limit {
                return Ok(vec![]);
            }
            let len = align_up((pos - apos) + want as u64).min(align_up(limit) - apos) as usize;
            let before = (pos, want);
            let (buf, buf_limit, from_ahead) = match ahead.take() {
                Some(mut a) if a.apos == apos => {
                    let limit = a.limit.min(limit);
                    (a.take().await?, limit, true)
                }
                _ => (file.read_at(apos, len).await?, limit, false),
            };
            let avail = (buf.len() as u64).min(buf_limit - apos) as usize;
            let data = &buf[..avail];
            let mut i = (pos - apos) as usize;
            let mut first: Option<usize> = None;
            let mut end = i;
            let mut count = 0usize;
            let mut next_offset = start;
            while i < data.len() {
                let rest = &data[i..];
                if rest.len() < batch::LOG_OVERHEAD_BYTES {
                    break;
                }
                let Some(size) = batch::batch_size(rest) else {
                    return Err(StorageError::Corrupt(BatchError::BadLength));
                };
                if size > rest.len() {
                    if first.is_none() {
                        if apos + (i + size) as u64 > limit {
                            return Err(StorageError::Corrupt(BatchError::Truncated));
                        }
                        // The batch holding `start` does not fit: read it whole.
                        want = want.max(size);
                    }
                    break;
                }
                let h = BatchHeader::parse(&rest[..size]).map_err(StorageError::Corrupt)?;
                if h.last_offset() >= hw {
                    break;
                }
                if h.last_offset() < start {
                    i += size;
                    pos = apos + i as u64;
                    continue;
                }
                if first.is_some() && end - first.unwrap_or(0) + size > bytes_max {
                    break;
                }
                first.get_or_insert(i);
                i += size;
                end = i;
                count += 1;
                next_offset = h.last_offset().next();
            }
            let Some(first) = first else {
                // Nothing complete at `pos` in this buffer: read again from there if the position
                // advanced or `want` now covers the whole batch (or the buffer was a read-ahead
                // of another size); otherwise the data ends here.
                if (pos, want) == before && !from_ahead {
                    return Ok(vec![]);
                }
                continue;
            };
            // A sequential reader (large reads) comes back for what follows: start reading it
            // now, so the disk works while this buffer is checked, copied and sent.
            let end_pos = apos + end as u64;
            if bytes_max >= READAHEAD_MIN_BYTES && end_pos < limit {
                let next_len = (len as u64).min(align_up(limit) - align_down(end_pos));
                self.start_readahead(
                    &file,
                    seg_base,
                    next_offset,
                    end_pos,
                    next_len as usize,
                    limit,
                );
            }
            // One copy out of the DMA buffer into memory that can cross shards.
            let all = Bytes::copy_from_slice(&data[first..end]);
            let mut batches = Vec::with_capacity(count);
            let mut at = 0usize;
            let mut expect = None;
            while at < all.len() {
                let h = BatchHeader::parse_checked(&all[at..]).map_err(StorageError::Corrupt)?;
                // Check after the read, paired with the offsets assigned before the write: the
                // batches found follow each other, hold `start` and end below the high watermark.
                // (Compacted segments may leave gaps between batches, never overlaps.)
                debug_assert!(expect.is_none_or(|e| h.base_offset() >= e));
                debug_assert!(h.last_offset() >= start && h.last_offset() < hw);
                expect = Some(h.last_offset().next());
                let size = h.size();
                batches.push(all.slice(at..at + size));
                at += size;
            }
            return Ok(batches);
        }
    }

    /// The earliest batch whose max timestamp is >= `timestamp_ms`: its base offset (not below
    /// the log start) and that max timestamp; `None` if every record is older.
    pub async fn offset_for_timestamp(
        &self,
        timestamp_ms: i64,
    ) -> Result<Option<(Offset, i64)>, StorageError> {
        let (mut from, hw, log_start) = {
            let s = self.state.borrow();
            let Some(seg) = s.segments.iter().find(|g| g.max_ts().0 >= timestamp_ms) else {
                return Ok(None);
            };
            (
                seg.time_lookup(timestamp_ms).max(s.offsets.log_start()),
                s.offsets.hw(),
                s.offsets.log_start(),
            )
        };
        while from < hw {
            let r = self
                .read(ReadOptions {
                    start: from,
                    bytes_max: 1 << 20,
                })
                .await?;
            if r.batches.is_empty() {
                break;
            }
            for b in &r.batches {
                let h = BatchHeader::parse(b).map_err(StorageError::Corrupt)?;
                if h.max_timestamp() >= timestamp_ms {
                    return Ok(Some((h.base_offset().max(log_start), h.max_timestamp())));
                }
                from = h.last_offset().next();
            }
        }
        Ok(None)
    }

    /// The last offset of the batch with the largest timestamp and that timestamp
    /// (ListOffsets -3).
    pub fn max_timestamp(&self) -> Option<(Offset, i64)> {
        let s = self.state.borrow();
        let mut best: Option<(Offset, i64)> = None;
        for g in &s.segments {
            if g.max_ts().0 >= 0 && best.is_none_or(|b| g.max_ts().0 > b.1) {
                best = Some((g.max_ts().1, g.max_ts().0));
            }
        }
        best
    }
}
