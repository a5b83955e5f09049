//! Opening a partition log: loads the segments of `<data-dir>/<topic>-<partition>/`, trusts the
//! indexes of sealed segments (rebuilding missing or corrupt ones by a scan), and — unless the
//! previous run left a clean-shutdown marker — scans the active segment from its last durable
//! index entry covered by the producer snapshot, validating every batch (length, magic, CRC-32C,
//! offset continuity) and cutting the log at the first torn or invalid one. Producer state is the
//! last snapshot plus the batches found after it. Builds the log's `State` (its parts through
//! their `recovered` constructors) and checks its invariants before the log is used. Runs once
//! per open, on the partition's shard.

use std::rc::Rc;
use std::time::Instant;

use crate::storage::appender::{self, Appender};
use crate::storage::compact::{self, CleanerState};
use crate::storage::epochs::LeaderEpochs;
use crate::storage::io::{align_down, align_up, StorageIo};
use crate::storage::meta;
use crate::storage::offsets::Offsets;
use crate::storage::producer_state::ProducerState;
use crate::storage::read::ReadAheads;
use crate::storage::segment::{self, ScanStop, Segment};
use crate::storage::truncate;
use crate::storage::txn_index::{TxnIndex, TXN_FILE};
use crate::storage::{BatchCache, LogConfig, PartitionLog, RecoveryReport, State, StorageError};
use crate::types::{Clock, Offset};

impl PartitionLog {
    /// [`PartitionLog::open`] over any [`StorageIo`] (tests inject faults through it) and any
    /// [`Clock`] (tests drive time by hand).
    pub async fn open_with_io(
        dir: &std::path::Path,
        config: LogConfig,
        cache: Rc<BatchCache>,
        io: Rc<dyn StorageIo>,
        clock: Clock,
    ) -> Result<Rc<Self>, StorageError> {
        let started = Instant::now();
        // glommio opens files and directories relative to no directory fd: paths must be absolute.
        let dir = &std::path::absolute(dir)?;
        // An index append of an earlier log of this directory (dropped without a close) may
        // still be writing its index files.
        super::appender::index_appends_finished(dir).await;
        let clean_path = dir.join(meta::CLEAN_FILE);
        // The shard's clean-shutdown record (see `shutdown`): trusted below only if no
        // truncation is pending and the active segment and its index files match it.
        let record = super::shutdown::take_record(dir);
        // Every file read (and crash leftover finished) before a segment is opened: one job on
        // the blocking pool, so opening many logs never stalls the shard's other requests.
        let prelude = {
            let (dir, with_record) = (dir.clone(), record.is_some());
            glommio::executor()
                .spawn_blocking(move || OpenPrelude::read(&dir, with_record))
                .await?
        };
        let OpenPrelude {
            trunc,
            clean,
            had_marker,
            checkpoint,
            snapshots,
            bases,
            index_files,
            epochs: loaded_epochs,
            cleaner,
        } = prelude;
        let record = record.filter(|_| trunc.is_none());
        let mut snapshots_read = snapshots.is_some();
        debug_assert_eq!(snapshots_read, record.is_none());
        let (mut snap_upto, mut producers, mut txns) = snapshots.unwrap_or_default();
        debug_assert_eq!(index_files.len(), bases.len());
        let interval = config.index_interval_bytes;
        let mut segments: Vec<Segment> = Vec::with_capacity(bases.len() + 1);
        // (segment, valid bytes, file bytes, why the scan stopped, batches, bytes discarded)
        let mut scan_report: Option<(Offset, u64, u64, ScanStop, u64, bool)> = None;
        let mut scan_from = 0u64;
        let mut file_size_active = 0u64;
        let mut from_record = false;
        let n = bases.len();
        // Each segment's index bytes are dropped once it is loaded: the raw files of a long log
        // are not held beside its decoded index.
        for (k, (&base, files)) in bases.iter().zip(index_files).enumerate() {
            let file = io
                .open(&meta::segment_path(dir, base, "log"), false)
                .await?;
            let file_size = file.size().await?;
            let mut seg = Segment::new(base, file.clone(), clock.now_ms());
            let last = k + 1 == n;
            if !last {
                seg.set_extent(file_size, bases[k + 1]);
                if !seg.load_index_files(&files) {
                    let mut fresh = Segment::new(base, file.clone(), seg.created_ms());
                    // Compacted segments have offset gaps between their batches.
                    let out = segment::scan_with_gaps(&*file, 0, base, file_size, |h, pos| {
                        fresh.on_batch(h, pos, interval)
                    })
                    .await?;
                    if out.end_pos != file_size || out.next > seg.next() {
                        tracing::warn!(
                            dir = %dir.display(), segment = base.0, valid_bytes = out.end_pos,
                            file_bytes = file_size, stop = ?out.stop,
                            "sealed segment damaged; reads past the damage return nothing"
                        );
                    }
                    fresh.set_extent(file_size, seg.next());
                    fresh.push_time_entry();
                    seg = fresh;
                    segment::write_index_files(seg.index_files_to_write(dir)).await?;
                    seg.index_files_written();
                }
                segments.push(seg);
                continue;
            }
            file_size_active = file_size;
            if let Some(r) = record
                .as_ref()
                .filter(|r| r.active_base == base && r.written <= file_size && r.log_end >= base)
            {
                seg.set_extent(r.written, r.log_end);
                if seg.restore_index(&files, r.index.clone()) {
                    from_record = true;
                    segments.push(seg);
                    continue;
                }
                seg = Segment::new(base, file.clone(), seg.created_ms());
            }
            if let Some((end, size)) =
                clean.filter(|(end, size)| *size <= file_size && *end >= base)
            {
                seg.set_extent(size, end);
                if seg.load_index_files(&files) {
                    segments.push(seg);
                    continue;
                }
            }
            if !snapshots_read {
                (snap_upto, producers, txns) = read_snapshots_off_executor(dir).await;
                snapshots_read = true;
            }
            // No clean shutdown: validate the active segment from its last durable index entry
            // that the producer snapshot covers (the snapshot holds the producer state of every
            // batch before its offset; the batches after it are replayed from their headers).
            let mut fresh = Segment::new(base, file.clone(), seg.created_ms());
            let covered = snap_upto.filter(|u| *u >= base);
            let idx = files.decode_index().entries;
            let keep = match covered {
                Some(u) => idx
                    .iter()
                    .take_while(|e| {
                        (e.1 as u64) < file_size
                            && base.0 + e.0 as i64 <= u.0
                            && trunc.is_none_or(|t| base.0 + (e.0 as i64) < t.0)
                    })
                    .count(),
                None => 0,
            };
            let tidx = if keep > 0 {
                files.decode_time_index().entries
            } else {
                vec![]
            };
            fresh.resume_at(idx[..keep].to_vec(), tidx);
            let (start_pos, start_next) = (fresh.size(), fresh.next());
            let mut cut: Option<u64> = None;
            let mut hole = false;
            // Scan the written data only: the pre-allocated space past it (most of a young
            // segment) reads as zeros the kernel fills in, which cost a crash restart of
            // 10,000 partitions two fifths of its time (perf/RESULTS.md).
            let limit = file
                .data_end_from(start_pos)
                .await?
                .max(start_pos)
                .min(file_size);
            let mut out = segment::scan(&*file, start_pos, start_next, limit, |h, pos| {
                if cut.is_some() || trunc.is_some_and(|t| h.last_offset() >= t) {
                    cut.get_or_insert(pos);
                    return;
                }
                fresh.on_batch(h, pos, interval);
                if snap_upto.is_none_or(|u| h.base_offset() >= u) {
                    producers.replay(h);
                    txns.on_batch(h);
                }
            })
            .await?;
            if out.stop == ScanStop::End && limit < file_size {
                // What follows the written data reads as zeros: the same stop as reading them.
                out.stop = ScanStop::Zeros;
            }
            if let Some(pos) = cut {
                // The interrupted truncation's cut: everything from the first batch reaching
                // its offset goes.
                out.end_pos = pos;
                out.next = fresh.next();
                file.truncate(pos).await?;
                file_size_active = pos;
            } else if match out.stop {
                ScanStop::End => false,
                // Zeros are usually pre-allocated space never written, kept for the next
                // flushes. Written data past them is a hole's: a power cut kept a later write
                // of a flush (or a later flush) and lost an earlier one.
                ScanStop::Zeros => {
                    hole = file.has_data_from(align_up(out.end_pos)).await?;
                    hole
                }
                _ => true,
            } {
                // Garbage or stale batches follow the valid data: cut them off, so that a later
                // append ending where such a batch starts can never make a second recovery take
                // it as the log's. The next flush allocates again.
                file.truncate(out.end_pos).await?;
                file_size_active = out.end_pos;
            }
            // What survived may have been written but never synced before the crash: make it
            // durable before it counts as the log, then record its index entries.
            file.sync().await?;
            // Cut the files to the kept entries (the scan re-created the ones after them, and
            // stale ones past the kept would hide them) and append the rest, on the blocking
            // pool. Nothing is appended to the log before this is done. A segment without
            // index files has no stale entries: its entries wait for a full index append, as
            // a new segment's do, instead of creating two files per log at every crash
            // restart (a sixth of the restart of 10,000 young partitions).
            let absent = |f: &std::io::Result<Vec<u8>>| {
                f.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
            };
            let no_files = absent(&files.index) && absent(&files.time);
            if let Some(job) = fresh.index_append(dir, out.end_pos, !no_files) {
                let done = glommio::executor().spawn_blocking(move || job.run()).await;
                fresh.index_appended(dir, done);
            }
            scan_from = start_pos;
            // Bytes past the valid data were cut: garbage, or written data behind a hole.
            let discarded = hole || !matches!(out.stop, ScanStop::End | ScanStop::Zeros);
            scan_report = Some((
                base,
                out.end_pos,
                file_size,
                out.stop,
                out.batches,
                discarded,
            ));
            segments.push(fresh);
        }
        if segments.is_empty() {
            let base = checkpoint.unwrap_or(Offset(0));
            let file = io.open(&meta::segment_path(dir, base, "log"), true).await?;
            // A new segment's directory entry must be durable before data in it is
            // acknowledged (fdatasync of the file does not cover the entry).
            io.sync_dir(dir).await?;
            segments.push(Segment::new(base, file, clock.now_ms()));
        }
        if had_marker {
            // The marker vouches for the files as they are now; the first write makes it a lie,
            // so it must be gone (durably) before any append.
            // A log opened clean has changed no file: its removal may be made durable together
            // with the shard's others (start-up), before anything is appended.
            let clean_open = scan_report.is_none() && trunc.is_none();
            let sync = !(clean_open && super::shutdown::marker_sync_deferred(dir));
            glommio::executor()
                .spawn_blocking(move || {
                    meta::remove_if_exists(&clean_path)?;
                    if sync {
                        meta::sync_dir(clean_path.parent().expect("a file in the log's dir"))?;
                    }
                    Ok::<(), std::io::Error>(())
                })
                .await?;
        }

        if !from_record && !snapshots_read {
            (snap_upto, producers, txns) = read_snapshots_off_executor(dir).await;
        }
        if from_record {
            let r = record.expect("the record matched");
            producers = r.producers;
            txns = r.txns;
        }
        let active = segments.last().expect("at least one segment");
        let log_end = active.next();
        let written = active.size();
        let head_pos = align_down(written);
        let written_tail = if written > head_pos {
            active
                .file()
                .read_at(head_pos, (written - head_pos) as usize)
                .await?
                .to_vec()
        } else {
            vec![]
        };
        if written_tail.len() as u64 != written - head_pos {
            return Err(StorageError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "active segment shorter than its recorded size",
            )));
        }
        if snap_upto.is_some_and(|u| u > log_end) {
            producers.truncate_from(log_end);
            txns.truncate_from(log_end);
        }
        let first_base = segments[0].base();
        if let Some(ls) = checkpoint.filter(|ls| *ls > log_end) {
            // Check after the read, paired with the assertion before the checkpoint is written
            // (the log start never passes the synced offset): only a file from elsewhere or a
            // damaged disk gets here. The log start is clamped to the log end.
            tracing::warn!(
                dir = %dir.display(), checkpoint = ls.0, log_end = log_end.0,
                "log start checkpoint past the log end; using the log end"
            );
        }
        let log_start = checkpoint
            .unwrap_or(first_base)
            .max(first_base)
            .min(log_end);
        let epochs = match loaded_epochs {
            Some(mut e) => {
                // Entries of batches a crash lost (the file is written before the batch).
                if e.truncate_from(log_end) {
                    persist_epochs(dir, &e).await?;
                }
                e
            }
            None => {
                // Missing (a log older than the cache) or damaged: rebuilt from the batch
                // headers of every segment, once.
                let mut e = LeaderEpochs::default();
                for g in &segments {
                    segment::scan_with_gaps(&**g.file(), 0, g.base(), g.size(), |h, _| {
                        e.observe(h.partition_leader_epoch(), h.base_offset());
                    })
                    .await?;
                }
                if let Err(err) = persist_epochs(dir, &e).await {
                    tracing::warn!(dir = %dir.display(), error = %err, "cannot write the leader-epoch checkpoint");
                }
                e
            }
        };

        match scan_report {
            Some((seg, valid, file_bytes, stop, batches, discarded)) => {
                let msg = "partition log recovered without clean shutdown";
                if discarded {
                    tracing::warn!(
                        dir = %dir.display(), segment = seg.0, scan_from, batches,
                        valid_bytes = valid, file_bytes, stop = ?stop, truncated = true, log_start = log_start.0,
                        log_end = log_end.0, ms = started.elapsed().as_millis() as u64, "{msg}"
                    );
                } else {
                    tracing::info!(
                        dir = %dir.display(), segment = seg.0, scan_from, batches,
                        valid_bytes = valid, file_bytes, stop = ?stop, truncated = false, log_start = log_start.0,
                        log_end = log_end.0, ms = started.elapsed().as_millis() as u64, "{msg}"
                    );
                }
            }
            None => tracing::debug!(
                dir = %dir.display(), segments = segments.len(), log_end = log_end.0,
                from_record, "partition log opened after clean shutdown"
            ),
        }

        let cache_id = cache.register();
        let now = clock.now();
        // Aborted transactions whose markers the log cleaner removed: a transaction snapshot
        // written before that pass may still list them.
        txns.forget_aborted_below(cleaner.aborts_cleared_below());
        let log = Rc::new(PartitionLog {
            dir: dir.to_path_buf(),
            io,
            clock,
            cache,
            cache_id,
            log_start_turn: glommio::sync::Semaphore::new(1),
            #[cfg(test)]
            index_gate: std::cell::RefCell::new(None),
            recovery: scan_report.map(
                |(segment, valid_bytes, file_bytes, _, batches, truncated)| RecoveryReport {
                    segment,
                    scan_from,
                    batches,
                    valid_bytes,
                    file_bytes,
                    truncated,
                },
            ),
            state: std::cell::RefCell::new(State {
                config,
                segments,
                offsets: Offsets::recovered(log_start, log_end),
                appender: Appender::recovered(
                    written,
                    written_tail,
                    file_size_active,
                    log_end,
                    scan_from,
                    now,
                ),
                producers,
                txns,
                epochs,
                reads: ReadAheads::new(),
                cleaner,
                rolling: false,
                closed: false,
                waiters: vec![],
                signals: vec![],
                admission: Default::default(),
            }),
        });
        {
            let s = log.state.borrow();
            s.check_invariants();
            s.check_segments();
        }
        if trunc.is_some() {
            // Finishing the interrupted truncation: the snapshots cut to the log end are durable
            // before its marker goes, and the marker's removal before the log is used.
            let snapshots = snap_upto
                .is_some_and(|u| u > log_end)
                .then(|| super::snapshot_files(dir, log_end, &log.state.borrow()));
            let dir = dir.clone();
            glommio::executor()
                .spawn_blocking(move || {
                    if let Some((writes, remove)) = snapshots {
                        super::write_snapshot_files(&writes, &remove)?;
                    }
                    meta::remove_if_exists(&dir.join(truncate::TRUNCATE_FILE))?;
                    meta::sync_dir(&dir)
                })
                .await?;
        }
        glommio::spawn_local(appender::flusher(Rc::downgrade(&log))).detach();
        Ok(log)
    }
}

/// The producer snapshot (what it covers, its state) and the transaction snapshot of a log.
type Snapshots = (Option<Offset>, ProducerState, TxnIndex);

/// What opening a log reads before it opens any segment file, with the crash leftovers it
/// finishes on the way: gathered by one job on the blocking pool ([`OpenPrelude::read`]).
struct OpenPrelude {
    /// The offset of a truncation a crash interrupted (see `truncate`).
    trunc: Option<Offset>,
    /// The clean-shutdown marker's (log end, active segment size), unless a truncation is
    /// pending.
    clean: Option<(Offset, u64)>,
    had_marker: bool,
    /// The persisted log start.
    checkpoint: Option<Offset>,
    /// Read unless the shard's clean-shutdown record covers the log.
    snapshots: Option<Snapshots>,
    /// The segments' base offsets, ascending, without those the checkpoint or a pending
    /// truncation removed.
    bases: Vec<Offset>,
    /// The index files of each segment of `bases`, in the same order.
    index_files: Vec<meta::IndexFileBytes>,
    /// The leader-epoch checkpoint; `None` if missing or damaged.
    epochs: Option<LeaderEpochs>,
    cleaner: CleanerState,
}

impl OpenPrelude {
    /// Blocking, for the thread pool. Creates the log's directory if needed, finishes an
    /// interrupted cleaner swap, removes segments left below the log start or past a pending
    /// truncation (durably), and reads every small file the open needs. A new log's empty
    /// leader-epoch checkpoint is written here too, so creating a log costs one job.
    fn read(dir: &std::path::Path, with_record: bool) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir)?;
        if let Some(name) = dir.file_name().and_then(|n| n.to_str()) {
            crate::fault::delay_point_for("log_open", name);
        }
        let trunc = truncate::pending(dir);
        let clean_path = dir.join(meta::CLEAN_FILE);
        let clean = meta::read_file(&clean_path)
            .and_then(|b| meta::decode_clean(&b))
            .filter(|_| trunc.is_none());
        let had_marker = clean_path.exists();
        let checkpoint = meta::read_file(&dir.join(meta::LOG_START_FILE)).and_then(|b| {
            b.try_into()
                .ok()
                .map(|a: [u8; 8]| Offset(i64::from_be_bytes(a)))
        });
        // The record is not trusted with a truncation pending: the snapshots are read then.
        let snapshots = (!with_record || trunc.is_some()).then(|| read_snapshots(dir));
        // A log-cleaner swap that a crash interrupted: finish it (or drop a pass's outputs).
        compact::recover(dir)?;
        let mut bases = meta::list_segments(dir)?;
        // Segments wholly below the persisted log start: left by a crash between the
        // checkpoint and the unlink.
        if let Some(ls) = checkpoint {
            while bases.len() > 1 && bases[1] <= ls {
                for ext in ["log", "index", "timeindex"] {
                    meta::remove_if_exists(&meta::segment_path(dir, bases[0], ext))?;
                }
                bases.remove(0);
            }
        }
        if let Some(t) = trunc {
            while bases.len() > 1 && bases.last().is_some_and(|b| *b >= t) {
                let base = bases.pop().expect("checked above");
                for ext in ["log", "index", "timeindex"] {
                    meta::remove_if_exists(&meta::segment_path(dir, base, ext))?;
                }
            }
            meta::sync_dir(dir)?;
        }
        let index_files = bases
            .iter()
            .map(|&base| meta::IndexFileBytes::read(dir, base))
            .collect();
        let mut epochs = LeaderEpochs::load(dir);
        if epochs.is_none() && bases.is_empty() {
            // A new log (or one without segments): the cache rebuilt from no batches is empty.
            let e = LeaderEpochs::default();
            if let Err(err) = e.persist(dir) {
                tracing::warn!(dir = %dir.display(), error = %err, "cannot write the leader-epoch checkpoint");
            }
            epochs = Some(e);
        }
        Ok(OpenPrelude {
            trunc,
            clean,
            had_marker,
            checkpoint,
            snapshots,
            bases,
            index_files,
            epochs,
            cleaner: CleanerState::recovered(dir),
        })
    }
}

/// Blocking: the producer and transaction snapshots of the log in `dir`.
fn read_snapshots(dir: &std::path::Path) -> Snapshots {
    let snapshot =
        meta::read_file(&dir.join(meta::PRODUCER_FILE)).and_then(|b| meta::decode_producers(&b));
    let (snap_upto, producers) = match snapshot {
        Some((upto, s)) => (Some(upto), s),
        None => (None, ProducerState::default()),
    };
    // The transaction snapshot is written with the producer snapshot and covers the same
    // batches; one that does not match it (missing, damaged, or from another point) is not
    // trusted, and the transactions of the batches it would have covered are lost.
    let txns = meta::read_file(&dir.join(TXN_FILE))
        .and_then(|b| TxnIndex::decode(&b))
        .filter(|(upto, _)| Some(*upto) == snap_upto)
        .map(|(_, t)| t)
        .unwrap_or_default();
    (snap_upto, producers, txns)
}

/// [`read_snapshots`] on the blocking pool (a log whose record entry did not match).
async fn read_snapshots_off_executor(dir: &std::path::Path) -> Snapshots {
    let dir = dir.to_path_buf();
    glommio::executor()
        .spawn_blocking(move || read_snapshots(&dir))
        .await
}

/// Replaces the leader-epoch checkpoint durably, on the blocking pool.
pub(crate) async fn persist_epochs(
    dir: &std::path::Path,
    epochs: &LeaderEpochs,
) -> std::io::Result<()> {
    let (dir, epochs) = (dir.to_path_buf(), epochs.clone());
    glommio::executor()
        .spawn_blocking(move || epochs.persist(&dir))
        .await
}
