//! Rolling a partition log: sealing the active segment (synced, cut to its data, index files
//! and producer snapshot written) and starting the next one at the log end. Appends wait while
//! a roll runs (`State::rolling`). Runs on the partition's shard, in the task that asked for the
//! roll (an append that found the segment full or old, or the shard).

use crate::storage::io::align_up;
use crate::storage::segment::{self, Segment};
use crate::storage::{appender, meta, PartitionLog, StorageError};

impl PartitionLog {
    /// Seals the active segment and starts a new one at the log end. Public so the shard (and
    /// tests) can force a roll.
    pub async fn roll(&self) -> Result<(), StorageError> {
        if self.state.borrow().appender.is_dead() {
            return Err(self.state.borrow().appender.error());
        }
        loop {
            let busy = self.state.borrow().rolling;
            if !busy {
                break;
            }
            self.wait_until(|s| !s.rolling).await;
        }
        if self.state.borrow().active().size() == 0 {
            return Ok(());
        }
        self.roll_active().await
    }

    pub(crate) async fn roll_active(&self) -> Result<(), StorageError> {
        let _turn = self.take_turn();
        self.roll_inner().await
    }

    async fn roll_inner(&self) -> Result<(), StorageError> {
        self.drain().await;
        let (file, written, hw) = {
            let s = self.state.borrow();
            // No index append in flight (and none starts while `rolling`): the sealed
            // segment's index files are rewritten whole below.
            assert!(s.is_drained() || s.appender.is_dead());
            // Why: a dead flusher leaves appended batches unwritten; a segment started at the
            // log end would begin past the data.
            if s.appender.is_dead() {
                return Err(s.appender.error());
            }
            // Why: a segment without batches (its bytes were all rolled back by a failed
            // write) is not sealed; its successor would start at the same offset, in the same
            // file, and retention or DeleteRecords would unlink the active segment's file with
            // the empty one.
            if s.offsets.log_end() == s.active().base() {
                return Ok(());
            }
            assert_eq!(
                s.offsets.hw(),
                s.offsets.log_end(),
                "a drained log is written"
            );
            (
                s.active().file().clone(),
                s.appender.written_pos(),
                s.offsets.hw(),
            )
        };
        // The sealed segment must be complete and exactly sized on disk before its successor
        // exists: recovery scans only the last segment and trusts the size of the others.
        file.sync().await?;
        file.truncate(written).await?;
        file.sync().await?;
        let index_files = {
            let mut guard = self.state.borrow_mut();
            let s = &mut *guard;
            s.offsets.synced_to(hw);
            s.appender.sealed(written);
            let a = s.active_mut();
            a.push_time_entry();
            let files = a.index_files_to_write(&self.dir);
            s.check_invariants();
            files
        };
        // Whole-file writes with fsyncs: on the blocking thread pool, not the shard's executor.
        // Appends wait meanwhile (`rolling`), so the sealed segment's index does not change.
        segment::write_index_files(index_files).await?;
        self.state.borrow_mut().active_mut().index_files_written();
        self.no_snapshot_in_flight().await;
        let base = self.state.borrow().offsets.log_end();
        // Before the new segment exists: recovery replays producer state from the batches of
        // the last segment only, so the snapshot must cover everything before it.
        let (writes, remove) = {
            let s = self.state.borrow();
            super::snapshot_files(&self.dir, base, &s)
        };
        glommio::executor()
            .spawn_blocking(move || super::write_snapshot_files(&writes, &remove))
            .await?;
        let path = meta::segment_path(&self.dir, base, "log");
        let new_file = self.io.open(&path, true).await?;
        let extent = appender::next_extent(0, self.state.borrow().config.segment_bytes.max(4096));
        let started = async {
            new_file.allocate(align_up(extent)).await?;
            // The new file's directory entry must be durable before any append is acknowledged
            // in it: fdatasync of the file does not persist the entry, and after a crash a
            // missing segment would silently lose acknowledged batches.
            self.io.sync_dir(&self.dir).await
        }
        .await;
        if let Err(e) = started {
            self.abandon_segment_file(&path, &e).await;
            return Err(e.into());
        }
        // The new segment's two index files, created here, on the blocking pool, where the
        // roll already waits: created by its first index append instead, a thousand partitions
        // rolling together would allocate two inodes each inside their appends. Created after
        // the segment file is durable, so a failed roll leaves none behind; a failure here only
        // leaves the creation to that first append (also off the executor).
        let dir = self.dir.clone();
        let created = glommio::executor()
            .spawn_blocking(move || segment::create_index_files(&dir, base))
            .await;
        if let Err(e) = &created {
            tracing::warn!(dir = %self.dir.display(), segment = base.0, error = %e, "cannot create index files");
        }
        let mut s = self.state.borrow_mut();
        assert_eq!(base, s.offsets.log_end(), "appends wait while a roll runs");
        assert!(
            base > s.active().base(),
            "a new segment shares no file with the sealed one"
        );
        let mut seg = Segment::new(base, new_file, self.clock.now_ms());
        if created.is_ok() {
            seg.set_index_files_cut();
        }
        s.segments.push(seg);
        s.appender.started_segment(align_up(extent));
        s.check_invariants();
        s.check_segments();
        Ok(())
    }

    /// A roll failed after creating the new segment's file: removes the file, since appends
    /// continue in the current segment and a file left behind would make the next start take
    /// it as the active segment and cut the current one at its base, dropping every batch
    /// appended meanwhile. When the removal fails too, appends stop (a restart then finds the
    /// current segment exactly sized, and the new one empty and starting at the log end).
    async fn abandon_segment_file(&self, path: &std::path::Path, cause: &std::io::Error) {
        let removed = async {
            self.io.remove(path).await?;
            self.io.sync_dir(&self.dir).await
        }
        .await;
        if let Err(e) = removed {
            tracing::error!(
                path = %path.display(), error = %e, roll_error = %cause,
                "could not remove the segment file of a failed roll; appends to this partition fail until restart"
            );
            let mut s = self.state.borrow_mut();
            s.appender.stop(cause);
            s.wake_all();
        }
    }

    /// Waits for a background producer snapshot to finish (roll and close write their own, which
    /// an older one finishing later must not replace).
    pub(crate) async fn no_snapshot_in_flight(&self) {
        self.wait_until(|s| !s.appender.is_snapshotting()).await
    }
}
