//! Moving the start of a partition log: retention (whole sealed segments older than
//! `retention_ms` or beyond `retention_bytes`) and DeleteRecords. The new log start is
//! checkpointed first, then the segments wholly below it leave memory at once and their files
//! are unlinked by a background task. Runs on the partition's shard.

use crate::storage::segment::Segment;
use crate::storage::{meta, PartitionLog, StorageError};
use crate::types::Offset;

impl PartitionLog {
    /// DeleteRecords: moves the log start offset up to `offset`, deleting whole segments below
    /// it in the background, and returns the new log start (the partition's low watermark).
    /// Kafka's rule: `offset` may not pass the high watermark (`OffsetOutOfRange`); at or below
    /// the current log start nothing changes. Batches below `offset` that are written but not
    /// yet synced are fdatasynced first (under `FlushPolicy::IntervalMs` that waits for the next
    /// sync), so the log start never passes the synced offset.
    pub async fn delete_records_before(&self, offset: Offset) -> Result<Offset, StorageError> {
        {
            let s = self.state.borrow();
            if offset > s.offsets.hw() || offset < Offset(0) {
                return Err(s.out_of_range(offset));
            }
            if offset <= s.offsets.log_start() {
                return Ok(s.offsets.log_start());
            }
        }
        // Why: the checkpoint must not outlive the batches below it. If a crash lost the
        // unsynced tail, a log start past the recovered log end would hide the batches appended
        // next (recovery clamps the log start to the log end, so they would get offsets below
        // the checkpoint and vanish at the following restart).
        self.sync_to(offset).await?;
        self.advance_log_start(offset).await?;
        Ok(self.state.borrow().offsets.log_start())
    }

    /// Applies retention.ms / retention.bytes to whole sealed segments; called periodically by
    /// the shard. Never touches the active segment.
    pub async fn enforce_retention(&self, now_ms: i64) -> Result<(), StorageError> {
        if let Some(start) = self.retention_target(now_ms) {
            if start > self.state.borrow().offsets.log_start() {
                self.advance_log_start(start).await?;
            }
        }
        Ok(())
    }

    /// Where retention.ms / retention.bytes would move the log start (the base of the first
    /// sealed segment to keep), without moving it: a replicated partition moves it through its
    /// raft log, which compacts with it.
    pub fn retention_target(&self, now_ms: i64) -> Option<Offset> {
        let s = self.state.borrow();
        let sealed = s.segments.len() - 1;
        let mut total = s.total_bytes();
        let mut k = 0;
        while k < sealed {
            let g = &s.segments[k];
            let old = s
                .config
                .retention_ms
                .is_some_and(|ms| g.max_ts().0 < now_ms.saturating_sub(ms as i64));
            let big = s
                .config
                .retention_bytes
                .is_some_and(|b| total.saturating_sub(g.size()) >= b);
            if !(old || big) {
                break;
            }
            total -= g.size();
            k += 1;
        }
        (k > 0).then(|| s.segments[k].base())
    }

    /// Persists the new log start (before any file goes: a crash in between leaves segments
    /// that open() drops again), then unlinks the segments wholly below it in a background task
    /// so appends never wait for the file system. `offset` must be synced (see `offsets`).
    /// The checkpoint is written on the executor's blocking thread pool; moves of the log start
    /// take turns, so checkpoints are written in the order their offsets grow.
    async fn advance_log_start(&self, offset: Offset) -> Result<(), StorageError> {
        let _turn = self
            .log_start_turn
            .acquire_permit(1)
            .await
            .map_err(|_| StorageError::Io(std::io::Error::other("log is closed")))?;
        // An open transaction's batches stay until it ends: its marker and the aborted index
        // need them, and a read_committed consumer has not seen them yet.
        let offset = match self.state.borrow().txns.first_unstable() {
            Some(first) => offset.min(first),
            None => offset,
        };
        {
            let s = self.state.borrow();
            if offset <= s.offsets.log_start() {
                return Ok(());
            }
            // Check before the write: the checkpoint never names an offset that a crash could
            // take back (recovery clamps it to the log end it finds).
            assert!(
                offset <= s.offsets.synced(),
                "log start {offset} past the synced offset {}",
                s.offsets.synced()
            );
        }
        let path = self.dir.join(meta::LOG_START_FILE);
        glommio::executor()
            .spawn_blocking(move || meta::write_file(&path, &offset.0.to_be_bytes()))
            .await?;
        let mut s = self.state.borrow_mut();
        s.offsets.advance_start(offset);
        s.txns.start_moved(offset);
        let sealed = s.segments.len() - 1;
        let k = s.segments[..sealed]
            .iter()
            .take_while(|g| g.next() <= offset)
            .count();
        let gone: Vec<Segment> = s.segments.drain(..k).collect();
        s.check_invariants();
        s.check_segments();
        drop(s);
        if !gone.is_empty() {
            let io = self.io.clone();
            let dir = self.dir.clone();
            // Contained: a panic leaves files behind (removed by the next start's cleanup or by
            // hand) and is logged; the shard keeps running.
            crate::contain::spawn_background("segment unlink", async move {
                for g in gone {
                    let base = g.base();
                    drop(g);
                    for ext in ["log", "index", "timeindex"] {
                        let p = meta::segment_path(&dir, base, ext);
                        if let Err(e) = io.remove(&p).await {
                            if e.kind() != std::io::ErrorKind::NotFound {
                                tracing::warn!(path = %p.display(), error = %e, "segment unlink failed");
                            }
                        }
                    }
                }
            });
        }
        Ok(())
    }
}
