//! Cutting the tail of a partition log: a follower's conflict truncation (raft's, which is
//! Kafka's truncation to the leader's epoch end). Every batch at or after the truncation offset
//! goes — from sealed and active segments, their indexes, the batch cache, producer state and
//! the leader-epoch cache — and the high watermark moves back with the log end.
//!
//! Crash safety: the truncation offset is written first, durably, to `truncate-to.pending`;
//! then segment files past it are unlinked, the segment holding it is cut and synced, the index
//! files, the producer snapshot and the epoch checkpoint are rewritten, and the marker goes last.
//! A log opened with the marker present redoes the cut before anything else (recovery drops
//! every segment starting at or past the offset and cuts the last one at the first batch
//! reaching it), so a crash at any point of a truncation reopens to the log cut at the offset,
//! never to a mix of the old tail and the new. Runs on the partition's shard; appends wait while
//! it runs, as during a roll.

use crate::storage::io::align_down;
use crate::storage::segment::{self, Segment};
use crate::storage::{meta, PartitionLog, StorageError};
use crate::types::Offset;

/// Present while a truncation is under way: its offset, checksummed (see the module doc).
pub const TRUNCATE_FILE: &str = "truncate-to.pending";

/// The truncation offset a crashed truncation left, if any.
pub(crate) fn pending(dir: &std::path::Path) -> Option<Offset> {
    meta::read_file(&dir.join(TRUNCATE_FILE))
        .and_then(|b| b.try_into().ok())
        .map(|a: [u8; 8]| Offset(i64::from_be_bytes(a)))
}

impl PartitionLog {
    /// Drops every batch at or after `offset`, which must be a batch boundary in
    /// `[log start, log end]` (`OffsetOutOfRange`, `OffsetMismatch` otherwise). Appends wait
    /// while it runs; appends still waiting for the durability of a dropped batch fail. Durable
    /// when it returns.
    pub async fn truncate_to(&self, offset: Offset) -> Result<(), StorageError> {
        {
            let s = self.state.borrow();
            if offset < s.offsets.log_start() || offset > s.offsets.log_end() {
                return Err(s.out_of_range(offset));
            }
        }
        // A cleaner swap (or a log-start move) finishes its file work first: the cut never
        // removes a segment file that a swap is about to rename over. Taken before `rolling`,
        // as nothing holding the turn waits for a truncation.
        let _turn = self
            .log_start_turn
            .acquire_permit(1)
            .await
            .map_err(|_| StorageError::Io(std::io::Error::other("log is closed")))?;
        while self.state.borrow().rolling {
            self.wait_until(|s| !s.rolling).await;
        }
        let _turn = self.take_turn();
        self.truncate_inner(offset).await
    }

    async fn truncate_inner(&self, offset: Offset) -> Result<(), StorageError> {
        self.drain().await;
        self.no_snapshot_in_flight().await;
        // Where the cut falls: segment `k` keeps `pos` bytes.
        let (k, file, from_pos, from_next, size) = {
            let s = self.state.borrow();
            if s.appender.is_dead() {
                return Err(s.appender.error());
            }
            if s.closed {
                return Err(StorageError::Io(std::io::Error::other("log is closed")));
            }
            if offset > s.offsets.log_end() || offset < s.offsets.log_start() {
                return Err(s.out_of_range(offset));
            }
            if offset == s.offsets.log_end() {
                return Ok(());
            }
            let mut k = s.segments.partition_point(|g| g.base() <= offset) - 1;
            if k > 0 && s.segments[k].base() == offset {
                // Nothing of segment k stays: the previous one becomes the active segment.
                k -= 1;
            }
            let g = &s.segments[k];
            let from_pos = g.lookup(offset);
            let from_next = index_offset_at(g, from_pos);
            (k, g.file().clone(), from_pos, from_next, g.size())
        };
        // The file position of the batch at `offset` (or the segment's end when it starts the
        // next segment).
        let mut cut: Option<u64> = None;
        let mut straddles = None;
        let out = segment::scan(&*file, from_pos, from_next, size, |h, pos| {
            if cut.is_none() && h.last_offset() >= offset {
                cut = Some(pos);
                if h.base_offset() != offset {
                    straddles = Some(h.base_offset());
                }
            }
        })
        .await?;
        if let Some(found) = straddles {
            return Err(StorageError::OffsetMismatch {
                expected: offset,
                found,
            });
        }
        let pos = match cut {
            Some(p) => p,
            None if out.next == offset && out.end_pos == size => size,
            None => {
                return Err(StorageError::Io(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("segment damaged before the truncation point {offset}"),
                )))
            }
        };

        // The partial page before the cut, which the next flush rewrites.
        let head = align_down(pos);
        let tail = if pos > head {
            file.read_at(head, (pos - head) as usize).await?.to_vec()
        } else {
            vec![]
        };
        if tail.len() as u64 != pos - head {
            return Err(StorageError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "segment shorter than its truncation point",
            )));
        }
        // Everything below the cut becomes durable first: the cut log counts as synced.
        file.sync().await?;
        // The marker is durable before any file or memory changes (off the executor; appends
        // and other truncations wait on `rolling`, log-start moves on the turn we hold).
        let marker = self.dir.join(TRUNCATE_FILE);
        glommio::executor()
            .spawn_blocking(move || meta::write_file(&marker, &offset.0.to_be_bytes()))
            .await?;
        // Memory first, so that readers never see a batch past the cut once its file changes.
        let later: Vec<Segment> = {
            let mut guard = self.state.borrow_mut();
            let s = &mut *guard;
            let later = s.segments.drain(k + 1..).collect();
            s.active_mut().cut(pos, offset);
            s.offsets.truncate_to(offset);
            s.appender.truncated(pos, tail, offset);
            s.producers.truncate_from(offset);
            s.txns.truncate_from(offset);
            s.epochs.truncate_from(offset);
            self.cache.truncate_from(self.cache_id, offset);
            s.check_invariants();
            s.check_segments();
            later
        };
        // From here on the files lag the log's memory until the cut completes: a failure stops
        // appends (and further truncations) until a restart, whose recovery finishes the cut
        // from the marker.
        let cut_files = async {
            let mut removed = Vec::with_capacity(later.len());
            for g in later.into_iter().rev() {
                let base = g.base();
                drop(g);
                self.io
                    .remove(&meta::segment_path(&self.dir, base, "log"))
                    .await?;
                removed.push(base);
            }
            if !removed.is_empty() {
                // The removed segments' index files (orphans without their `.log` are never
                // read: a segment is listed by its log file, and a new one recreates them).
                let dir = self.dir.clone();
                glommio::executor()
                    .spawn_blocking(move || {
                        removed.iter().try_for_each(|&base| {
                            ["index", "timeindex"].iter().try_for_each(|ext| {
                                meta::remove_if_exists(&meta::segment_path(&dir, base, ext))
                            })
                        })
                    })
                    .await?;
            }
            self.io.sync_dir(&self.dir).await?;
            file.truncate(pos).await?;
            file.sync().await?;
            // The files that describe the cut log, taken from its memory (which already holds
            // the cut), then written on the blocking pool in the order recovery relies on: the
            // index files, snapshots and epoch checkpoint are durable before the marker goes,
            // and the marker's removal is durable before the truncation returns.
            let (index_files, (snapshots, remove), epochs) = {
                let mut guard = self.state.borrow_mut();
                let s = &mut *guard;
                debug_assert!(s.is_drained(), "appends wait while a truncation runs");
                (
                    s.active_mut().index_files_to_write(&self.dir),
                    super::snapshot_files(&self.dir, offset, s),
                    s.epochs.clone(),
                )
            };
            debug_assert!(epochs.entries().iter().all(|e| e.1 < offset));
            let dir = self.dir.clone();
            glommio::executor()
                .spawn_blocking(move || {
                    crate::fault::delay_point("truncate_files");
                    for (path, body) in &index_files {
                        meta::write_atomic(path, body)?;
                    }
                    super::write_snapshot_files(&snapshots, &remove)?;
                    epochs.persist(&dir)?;
                    meta::remove_if_exists(&dir.join(TRUNCATE_FILE))?;
                    meta::sync_dir(&dir)
                })
                .await?;
            // Nothing appended meanwhile (`rolling`): the files hold the index as it is.
            self.state.borrow_mut().active_mut().index_files_written();
            std::io::Result::Ok(())
        }
        .await;
        if let Err(e) = cut_files {
            tracing::error!(
                dir = %self.dir.display(), offset = offset.0, error = %e,
                "truncation failed; appends to this partition fail until restart"
            );
            let mut s = self.state.borrow_mut();
            s.appender.stop(&e);
            s.wake_all();
            return Err(e.into());
        }
        Ok(())
    }
}

/// The offset of the batch at file position `pos` of `g`, which is an index position (0 or an
/// index entry).
fn index_offset_at(g: &Segment, pos: u64) -> Offset {
    if pos == 0 {
        return g.base();
    }
    g.index_entry_at(pos)
}

impl PartitionLog {
    /// Waits until every batch accepted so far is written and fdatasynced (the durability step
    /// of a replicated partition's raft loop: one group commit for all its appends). Fails when
    /// a write or the sync fails.
    pub async fn sync_all(&self) -> Result<(), StorageError> {
        let end = self.state.borrow().offsets.log_end();
        std::future::poll_fn(|cx| {
            let mut s = self.state.borrow_mut();
            if s.offsets.hw() >= end {
                return std::task::Poll::Ready(Ok(()));
            }
            if s.appender.is_dead() || s.offsets.log_end() < end {
                // The flusher stopped, or a failed write gave the offsets out again.
                return std::task::Poll::Ready(Err(s.appender.error()));
            }
            if s.closed {
                return std::task::Poll::Ready(Err(StorageError::Io(std::io::Error::other(
                    "log is closed",
                ))));
            }
            s.waiters.push(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await?;
        self.sync_to(end).await
    }

    /// The batch starting at `offset` if the batch cache holds it (no disk read).
    pub fn read_batch_cached(&self, offset: Offset) -> Option<bytes::Bytes> {
        let s = self.state.borrow();
        if offset < s.offsets.log_start() || offset >= s.offsets.hw() {
            return None;
        }
        let mut out = vec![];
        self.cache
            .read(self.cache_id, offset, s.offsets.hw(), 1, &mut out)
            .then(|| out.pop())
            .flatten()
            .filter(|b| {
                crate::protocol::batch::BatchHeader::parse(b)
                    .is_ok_and(|h| h.base_offset() == offset)
            })
    }

    /// The written batch starting at `offset`, read without awaiting: from the batch cache, or
    /// else with blocking reads of the segment file through the page cache, from the index
    /// entry before it (at most `index_interval_bytes` of headers and the batch itself). For
    /// callers that cannot await — raft-rs's reads that cannot wait, of an entry not fetched
    /// first (docs/replication.md) — and only for data already written. `None` outside the
    /// written log.
    pub fn read_batch_now(&self, offset: Offset) -> Result<Option<bytes::Bytes>, StorageError> {
        use std::os::unix::fs::FileExt;
        let s = self.state.borrow();
        if offset < s.offsets.log_start() || offset >= s.offsets.hw() {
            return Ok(None);
        }
        let mut out = vec![];
        if self
            .cache
            .read(self.cache_id, offset, s.offsets.hw(), 1, &mut out)
        {
            if let Some(b) = out.pop().filter(|b| {
                crate::protocol::batch::BatchHeader::parse(b)
                    .is_ok_and(|h| h.base_offset() == offset)
            }) {
                return Ok(Some(b));
            }
        }
        let k = s.segments.partition_point(|g| g.base() <= offset) - 1;
        let g = &s.segments[k];
        let end = if k + 1 == s.segments.len() {
            s.appender.written_pos()
        } else {
            g.size()
        };
        let f = std::fs::File::open(meta::segment_path(&self.dir, g.base(), "log"))?;
        let mut pos = g.lookup(offset);
        let mut head = [0u8; crate::protocol::batch::HEADER_BYTES];
        while pos < end {
            f.read_exact_at(&mut head, pos)?;
            let size = crate::protocol::batch::batch_size(&head).ok_or(StorageError::Corrupt(
                crate::protocol::batch::BatchError::BadLength,
            ))?;
            let base = Offset(i64::from_be_bytes(head[..8].try_into().expect("8 bytes")));
            if base == offset {
                if pos + size as u64 > end {
                    break;
                }
                let mut b = vec![0u8; size];
                f.read_exact_at(&mut b, pos)?;
                crate::protocol::batch::BatchHeader::parse_checked(&b)
                    .map_err(StorageError::Corrupt)?;
                return Ok(Some(bytes::Bytes::from(b)));
            }
            if base > offset {
                return Err(StorageError::OffsetMismatch {
                    expected: offset,
                    found: base,
                });
            }
            pos += size as u64;
        }
        Ok(None)
    }
}
