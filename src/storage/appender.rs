//! The appender of the active segment: batches are copied into aligned DMA chunks ([`Pending`])
//! as they are appended; one flusher task per partition, spawned on the shard's executor, writes
//! everything pending with one set of concurrent aligned writes and, when the flush policy asks,
//! one fdatasync — the group commit. Batches appended while a write or sync is in flight join the
//! next one. The partial last page is kept in memory and written again, completed, by the next
//! flush. Owned by the partition log; the flusher holds only a weak reference to it.

use std::rc::{Rc, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use glommio::io::DmaBuffer;

use crate::storage::io::{align_down, align_up, join_all, IoFuture, SegmentFile, ALIGN_BYTES};
use crate::storage::{FlushPolicy, PartitionLog, Repair, State};
use crate::types::Offset;

/// Capacity of the first chunk of a flush: small, so a thousand idle-ish partitions on a shard
/// hold little memory.
pub const CHUNK_BYTES_MIN: usize = 64 << 10;
/// Capacity of the following chunks; each is one write request (several run concurrently).
pub const CHUNK_BYTES_MAX: usize = 1 << 20;
/// Appends wait while this many bytes are pending (written by no flush yet): bounds memory when
/// the disk is slower than the producers.
pub const PENDING_BYTES_MAX: usize = 64 << 20;
/// Segment files grow by pre-allocated extents of this size (or the segment size if smaller),
/// so writes inside them change no file size and fdatasync has no size to persist.
pub const EXTENT_BYTES: u64 = 64 << 20;

const _: () = assert!((CHUNK_BYTES_MIN as u64).is_multiple_of(ALIGN_BYTES));
const _: () = assert!((CHUNK_BYTES_MAX as u64).is_multiple_of(ALIGN_BYTES));
const _: () = assert!(PENDING_BYTES_MAX >= 2 * CHUNK_BYTES_MAX);

/// Bytes of the active segment not yet handed to a write, starting at an aligned file position.
pub(crate) struct Pending {
    /// File position of the first byte of `chunks[0]` (aligned).
    pub start: u64,
    /// The bytes of the page at `start` that precede the new batches: already written (and
    /// rewritten, completed, by the next flush) or, after a whole-pages flush, not yet written.
    pub head: Vec<u8>,
    /// Whether `head` still has to be written.
    pub head_unwritten: bool,
    /// (buffer, bytes filled), filled in order.
    pub chunks: Vec<(DmaBuffer, usize)>,
    /// Bytes of new batches (not counting `head`).
    pub bytes: usize,
}

/// A flush taken out of [`Pending`]: what to write where.
pub(crate) struct Flush {
    pub writes: Vec<(Rc<DmaBuffer>, u64)>,
    /// File position after the last byte of data.
    pub end_pos: u64,
    /// File position after the last byte written (aligned).
    pub write_end: u64,
    /// Bytes of the partial last page, for the next flush.
    pub tail: Vec<u8>,
}

impl Pending {
    pub fn new(start: u64, head: Vec<u8>) -> Self {
        debug_assert_eq!(start % ALIGN_BYTES, 0);
        debug_assert!((head.len() as u64) < ALIGN_BYTES);
        Pending {
            start,
            head,
            head_unwritten: false,
            chunks: vec![],
            bytes: 0,
        }
    }

    /// File position after the last pending byte.
    pub fn end_pos(&self) -> u64 {
        self.start + self.head.len() as u64 + self.bytes as u64
    }

    /// Nothing left to write.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0 && !self.head_unwritten
    }

    /// Copies `data` in (one memcpy per chunk it lands in).
    pub fn push(&mut self, mut data: &[u8]) {
        self.bytes += data.len();
        if self.chunks.is_empty() {
            let need = self.head.len() + data.len();
            let mut buf = new_chunk(need);
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

    /// Takes what one flush writes and leaves `self` ready for the appends that arrive while it
    /// is in flight. `whole_pages`: only up to the last page boundary (the partial last page
    /// stays pending, unwritten), so that the next flush touches no page of this one and may run
    /// concurrently with it. `None` when that leaves nothing to write.
    pub fn take(&mut self, whole_pages: bool) -> Option<Flush> {
        let end_pos = self.end_pos();
        let cut = if whole_pages {
            align_down(end_pos)
        } else {
            end_pos
        };
        if self.is_empty() || cut <= self.start {
            return None;
        }
        if self.chunks.is_empty() {
            // Only an unwritten head is left.
            let mut buf = new_chunk(self.head.len());
            buf.as_bytes_mut()[..self.head.len()].copy_from_slice(&self.head);
            self.chunks.push((buf, self.head.len()));
        }
        let mut pos = self.start;
        let mut writes = Vec::with_capacity(self.chunks.len());
        let mut rest = Vec::new();
        for (mut buf, fill) in std::mem::take(&mut self.chunks) {
            if pos >= cut {
                debug_assert!(whole_pages);
                rest.extend_from_slice(&buf.as_bytes()[..fill]);
                continue;
            }
            let keep = ((cut - pos) as usize).min(fill);
            if keep < fill {
                // The chunk holding the cut: what follows it stays pending.
                rest.extend_from_slice(&buf.as_bytes()[keep..fill]);
            }
            let len = align_up(keep as u64) as usize;
            // Zero the padding: nothing stale may follow the last batch on disk.
            buf.as_bytes_mut()[keep..len].fill(0);
            if len < buf.len() {
                buf.trim_to_size(len);
            }
            writes.push((Rc::new(buf), pos));
            pos += len as u64;
        }
        let write_end = pos;
        let page = align_down(cut);
        let tail = if whole_pages {
            vec![]
        } else {
            let (last, lpos) = writes.last().expect("at least one write");
            let from = (page - lpos) as usize;
            last.as_bytes()[from..from + (cut - page) as usize].to_vec()
        };
        if whole_pages {
            debug_assert!(rest.len() < ALIGN_BYTES as usize);
            *self = Pending::new(cut, rest);
            self.head_unwritten = !self.head.is_empty();
        } else {
            *self = Pending::new(page, tail.clone());
        }
        Some(Flush {
            writes,
            end_pos: cut,
            write_end,
            tail,
        })
    }
}

fn new_chunk(need: usize) -> DmaBuffer {
    let cap = (align_up(need as u64) as usize).clamp(CHUNK_BYTES_MIN, CHUNK_BYTES_MAX);
    glommio::allocate_dma_buffer_global(cap)
}

/// Flushes in flight at once per partition (each is one set of concurrent writes).
pub const FLUSHES_INFLIGHT_MAX: usize = 4;
/// Pending bytes from which a flush takes whole pages only, so that the next flush can be
/// issued while it is in flight instead of waiting to rewrite its partial last page.
pub const PIPELINE_BYTES_MIN: usize = 128 << 10;

/// A flush in flight, in issue order; `hw` advances over the completed prefix.
pub(crate) struct InFlight {
    pub seq: u64,
    pub end_pos: u64,
    pub tail: Vec<u8>,
    pub done: bool,
}

/// The per-partition flusher task: issues writes and fdatasyncs as separate tasks whenever the
/// state allows, until the log is closed (and drained) or dropped.
pub(crate) async fn flusher(log: Weak<PartitionLog>) {
    loop {
        let deadline = {
            let Some(log) = log.upgrade() else { return };
            match log.issue() {
                None => return,
                Some(d) => d,
            }
        };
        let kicked = std::future::poll_fn(|cx| {
            let Some(log) = log.upgrade() else {
                return Poll::Ready(());
            };
            let mut s = log.state.borrow_mut();
            if s.kick {
                s.kick = false;
                return Poll::Ready(());
            }
            s.flusher = Some(cx.waker().clone());
            Poll::Pending
        });
        match deadline {
            Some(d) => {
                let wait = d.saturating_duration_since(Instant::now());
                futures_lite::future::or(kicked, glommio::timer::sleep(wait)).await
            }
            None => kicked.await,
        }
    }
}

impl PartitionLog {
    /// Starts every write and sync the state allows. Returns `None` when the flusher should
    /// exit, else when it must look again at the latest (interval flush policy).
    fn issue(self: &Rc<Self>) -> Option<Option<Instant>> {
        let mut s = self.state.borrow_mut();
        let mut deadline = None;
        let mut sync = None;
        if !s.sync_inflight && !s.rolling && s.hw > s.synced {
            let due = match s.config.flush {
                FlushPolicy::Always => s.sync_wanted > s.synced,
                FlushPolicy::IntervalMs(ms) => {
                    let at = s.last_sync + Duration::from_millis(ms);
                    deadline = Some(at);
                    Instant::now() >= at
                }
            };
            if due {
                s.sync_inflight = true;
                sync = Some(sync_task(
                    Rc::downgrade(self),
                    s.active().file.clone(),
                    s.hw,
                ));
            }
        }
        let mut repair = None;
        if s.repair == Repair::Needed && s.writes_inflight == 0 {
            s.repair = Repair::InFlight;
            repair = Some(repair_task(
                Rc::downgrade(self),
                s.active().file.clone(),
                s.written_pos,
                s.attempted_pos,
            ));
        }
        let mut flushes = vec![];
        while let Some(task) = self.next_flush(&mut s) {
            flushes.push(task);
        }
        let exit = s.closed
            && s.pending.is_empty()
            && s.writes_inflight == 0
            && !s.sync_inflight
            && s.repair != Repair::InFlight;
        // Spawned with the state released: a task may run before this returns.
        drop(s);
        if let Some(t) = sync {
            glommio::spawn_local(t).detach();
        }
        if let Some(t) = repair {
            glommio::spawn_local(t).detach();
        }
        for t in flushes {
            glommio::spawn_local(t).detach();
        }
        (!exit).then_some(deadline)
    }

    /// The next flush to start, if the in-flight ones allow one.
    fn next_flush(
        self: &Rc<Self>,
        s: &mut State,
    ) -> Option<impl std::future::Future<Output = ()> + 'static> {
        if s.pending.is_empty() || s.writes_inflight >= FLUSHES_INFLIGHT_MAX {
            return None;
        }
        if s.repair != Repair::None {
            return None;
        }
        if s.writes_inflight > 0 {
            // The newest flush must end on a page boundary, else this one would rewrite a page
            // that is still being written.
            if s.inflight
                .back()
                .is_some_and(|f| f.end_pos % ALIGN_BYTES != 0)
            {
                return None;
            }
        }
        let whole = s.writes_inflight > 0 || s.pending.bytes >= PIPELINE_BYTES_MIN;
        let flush = s.pending.take(whole)?;
        let seg_bytes = s.config.segment_bytes.max(ALIGN_BYTES);
        let alloc = (flush.write_end > s.allocated).then(|| {
            align_up(
                flush
                    .write_end
                    .max(s.allocated + EXTENT_BYTES.min(seg_bytes)),
            )
        });
        if let Some(a) = alloc {
            s.allocated = a;
        }
        s.attempted_pos = s.attempted_pos.max(flush.write_end);
        s.flush_seq += 1;
        let seq = s.flush_seq;
        s.inflight.push_back(InFlight {
            seq,
            end_pos: flush.end_pos,
            tail: flush.tail,
            done: false,
        });
        s.writes_inflight += 1;
        let file = s.active().file.clone();
        let gen = s.gen;
        let log = Rc::downgrade(self);
        let writes = flush.writes;
        Some(async move {
            let result = async {
                if let Some(len) = alloc {
                    file.allocate(len).await?;
                }
                let futs: Vec<IoFuture<'_, ()>> = writes
                    .iter()
                    .map(|(buf, pos)| file.write_at(buf.clone(), *pos))
                    .collect();
                join_all(futs).await
            }
            .await;
            drop(writes);
            let Some(log) = log.upgrade() else { return };
            let mut s = log.state.borrow_mut();
            s.writes_inflight -= 1;
            if gen == s.gen {
                match result {
                    Ok(()) => complete(&mut s, seq),
                    Err(e) => log.fail_unwritten(&mut s, e),
                }
            }
            s.wake_all();
        })
    }
}

/// After a failed write, once no write of the failed generation is in flight: releases the range
/// those writes may have touched past the last complete batch (so no stale batch can follow the
/// log end on disk), and reads back the written part of the partial page there, which the next
/// flush rewrites.
async fn repair_task(log: Weak<PartitionLog>, file: Rc<dyn SegmentFile>, pos: u64, stale_end: u64) {
    let page = align_down(pos);
    let result = async {
        let clean_from = align_up(pos);
        if stale_end > clean_from {
            file.punch(clean_from, stale_end - clean_from).await?;
        }
        if pos == page {
            return Ok(vec![]);
        }
        let head = file.read_at(page, (pos - page) as usize).await?;
        if head.len() as u64 != pos - page {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "segment shorter than its written data",
            ));
        }
        Ok(head.to_vec())
    }
    .await;
    let Some(log) = log.upgrade() else { return };
    let mut s = log.state.borrow_mut();
    match result {
        Ok(head) => {
            debug_assert_eq!(s.written_pos, pos);
            s.pending = Pending::new(page, head.clone());
            s.written_tail = head;
            s.attempted_pos = align_up(pos);
            s.repair = Repair::None;
        }
        Err(e) => {
            tracing::error!(dir = %log.dir.display(), error = %e, "repair after a failed write failed");
            s.set_error(&e);
            s.repair = Repair::Failed;
        }
    }
    s.wake_all();
}

/// Marks flush `seq` written and advances the written position and high watermark over the
/// completed prefix of the in-flight flushes.
fn complete(s: &mut State, seq: u64) {
    if let Some(f) = s.inflight.iter_mut().find(|f| f.seq == seq) {
        f.done = true;
    }
    while s.inflight.front().is_some_and(|f| f.done) {
        let f = s.inflight.pop_front().expect("checked");
        s.written_pos = f.end_pos;
        s.written_tail = f.tail;
    }
    let written = s.written_pos;
    while let Some(&(end, next)) = s.batch_ends.front() {
        if end > written {
            break;
        }
        s.hw = next;
        s.hw_pos = end;
        s.batch_ends.pop_front();
    }
}

async fn sync_task(log: Weak<PartitionLog>, file: Rc<dyn SegmentFile>, target: Offset) {
    let r = file.sync().await;
    let Some(log) = log.upgrade() else { return };
    let mut s = log.state.borrow_mut();
    s.sync_inflight = false;
    match r {
        Ok(()) => {
            s.synced = s.synced.max(target);
            s.last_sync = Instant::now();
        }
        Err(e) => {
            tracing::error!(dir = %log.dir.display(), error = %e, "fdatasync failed");
            s.sync_failures += 1;
            s.set_error(&e);
            // The waiting Synced appends fail now; the next one asks for a sync again. Retrying
            // at once would spin on a failing device.
            s.sync_wanted = s.synced;
            s.last_sync = Instant::now();
        }
    }
    s.wake_all();
}
