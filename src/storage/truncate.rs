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
        while self.state.borrow().rolling {
            self.wait_until(|s| !s.rolling).await;
        }
        self.state.borrow_mut().rolling = true;
        let r = self.truncate_inner(offset).await;
        let mut s = self.state.borrow_mut();
        s.rolling = false;
        s.wake_all();
        r
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

        meta::write_file(&self.dir.join(TRUNCATE_FILE), &offset.0.to_be_bytes())?;
        let later: Vec<Offset> = self.state.borrow().segments[k + 1..]
            .iter()
            .map(|g| g.base())
            .collect();
        // From here on the files and the log's memory disagree until the cut completes: a
        // failure stops appends (and further truncations) until a restart, whose recovery
        // finishes the cut from the marker.
        let cut_files = async {
            for base in later.iter().rev() {
                self.io
                    .remove(&meta::segment_path(&self.dir, *base, "log"))
                    .await?;
                for ext in ["index", "timeindex"] {
                    meta::remove_if_exists(&meta::segment_path(&self.dir, *base, ext))?;
                }
            }
            self.io.sync_dir(&self.dir).await?;
            file.truncate(pos).await?;
            file.sync().await?;
            let head = align_down(pos);
            let tail = if pos > head {
                file.read_at(head, (pos - head) as usize).await?.to_vec()
            } else {
                vec![]
            };
            if tail.len() as u64 != pos - head {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "segment shorter than its truncation point",
                ));
            }
            Ok(tail)
        }
        .await;
        let tail = match cut_files {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(
                    dir = %self.dir.display(), offset = offset.0, error = %e,
                    "truncation failed; appends to this partition fail until restart"
                );
                let mut s = self.state.borrow_mut();
                s.appender.stop(&e);
                s.wake_all();
                return Err(e.into());
            }
        };
        {
            let mut guard = self.state.borrow_mut();
            let s = &mut *guard;
            s.segments.truncate(k + 1);
            s.active_mut().cut(pos, offset);
            s.active_mut().write_index_files(&self.dir)?;
            s.offsets.truncate_to(offset);
            s.appender.truncated(pos, tail, offset);
            s.producers.truncate_from(offset);
            s.epochs.truncate_from(offset);
            self.cache.truncate_from(self.cache_id, offset);
            meta::write_file(
                &self.dir.join(meta::PRODUCER_FILE),
                &meta::encode_producers(offset, &s.producers),
            )?;
            s.epochs.persist(&self.dir)?;
            s.check_invariants();
            s.check_segments();
        }
        meta::remove_if_exists(&self.dir.join(TRUNCATE_FILE))?;
        meta::sync_dir(&self.dir)?;
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
