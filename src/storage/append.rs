//! The append path of a partition log: validation, admission (back-pressure, rolls), offset
//! assignment and the wait for the durability asked for. Accepting an append is synchronous —
//! offsets, index entries, producer state, pending bytes and the cache change together — and the
//! flusher ([`appender`](super::appender)) writes and syncs it later. Runs on the partition's
//! shard, in the appending task.

use std::task::Poll;
use std::time::Instant;

use bytes::BytesMut;

use crate::protocol::batch::{self, BatchError, BatchHeader};
use crate::protocol::validated::Validated;
use crate::stats::ProduceStage;
use crate::storage::appender::Ticket;
use crate::storage::epochs::LeaderEpochs;
use crate::storage::producer_state::{BatchMeta, Check};
use crate::storage::{AppendResult, Durability, PartitionLog, State, StorageError};
use crate::types::Offset;

impl PartitionLog {
    /// Appends one or more concatenated RecordBatch v2 batches: validates each (length, magic,
    /// CRC-32C), checks idempotent producer sequences, assigns offsets by patching `baseOffset`,
    /// and waits for `durability`.
    pub async fn append(
        &self,
        records: BytesMut,
        durability: Durability,
    ) -> Result<AppendResult, StorageError> {
        let records = Validated::check(records).map_err(StorageError::Corrupt)?;
        self.append_as(records, durability, Mode::Assign, false)
            .await
    }

    /// [`PartitionLog::append`] of batches validated already (by the shard that received them):
    /// their framing and checksums are not looked at again.
    pub async fn append_validated(
        &self,
        records: Validated,
        durability: Durability,
    ) -> Result<AppendResult, StorageError> {
        self.append_as(records, durability, Mode::Assign, true)
            .await
    }

    /// The leader's append of a replicated partition: [`PartitionLog::append`] with every batch
    /// stamped with `epoch` (the raft term) in `partitionLeaderEpoch`, which lies before the
    /// CRC-covered part of the header, so the checksum stays valid as sent.
    pub async fn append_leader(
        &self,
        records: BytesMut,
        epoch: i32,
        durability: Durability,
    ) -> Result<AppendResult, StorageError> {
        let mut records = Validated::check(records).map_err(StorageError::Corrupt)?;
        records.set_partition_leader_epoch(epoch);
        self.append_as(records, durability, Mode::Assign, false)
            .await
    }

    /// A follower's append: stores the batches verbatim, with the offsets the leader assigned.
    /// The first batch must start at the log end and each following one right after its
    /// predecessor (`StorageError::OffsetMismatch` otherwise: a follower never renumbers), and
    /// every CRC must hold. Producer state follows the batches without being checked (the
    /// leader checked them).
    pub async fn append_replicated(
        &self,
        records: BytesMut,
        durability: Durability,
    ) -> Result<AppendResult, StorageError> {
        // Bytes from a peer: their checksums are checked here, once.
        let records = Validated::check(records).map_err(StorageError::Corrupt)?;
        self.append_as(records, durability, Mode::Verbatim, false)
            .await
    }

    /// [`PartitionLog::append_replicated`] of batches whose checksums were checked once already
    /// where they entered this node (a replica's raft entries): framing is checked, the CRC-32C
    /// only in debug builds.
    pub async fn append_replicated_checked(
        &self,
        records: BytesMut,
        durability: Durability,
    ) -> Result<AppendResult, StorageError> {
        let records = Validated::check_framing(records).map_err(StorageError::Corrupt)?;
        self.append_as(records, durability, Mode::Verbatim, false)
            .await
    }

    async fn append_as(
        &self,
        records: Validated,
        durability: Durability,
        mode: Mode,
        produce: bool,
    ) -> Result<AppendResult, StorageError> {
        // A client's produce records where its time goes (admission, then durability).
        let stage = |stage, since: Instant| {
            if produce {
                crate::stats::produce_stage(stage, since.elapsed());
            }
        };
        let arrived = Instant::now();
        self.admit(records.len()).await?;
        self.persist_new_epochs(&records, mode).await?;
        // No await since admission (or since the epoch checkpoint, during which other appends
        // waited on `rolling`): admission order is log order.
        let (result, ticket) = self.assign(records, durability, mode)?;
        stage(ProduceStage::Admit, arrived);
        if durability == Durability::Accepted {
            return Ok(result);
        }
        let accepted = Instant::now();
        let last = result.last_offset;
        let answer = std::future::poll_fn(|cx| {
            let mut s = self.state.borrow_mut();
            if s.appender.failed(ticket, last) {
                return Poll::Ready(Err(s.appender.error()));
            }
            let done = match durability {
                Durability::Synced => s.offsets.synced() > last,
                _ => s.offsets.hw() > last,
            };
            if done {
                return Poll::Ready(Ok(result));
            }
            if durability == Durability::Synced && s.appender.sync_failed_since(ticket) {
                return Poll::Ready(Err(s.appender.error()));
            }
            s.waiters.push(cx.waker().clone());
            Poll::Pending
        })
        .await;
        stage(ProduceStage::Durable, accepted);
        answer
    }

    /// The synchronous part of an append: offsets, file positions, index, producer state,
    /// pending bytes and cache change together, with no await in between. Returns what the
    /// append answers and the ticket its wait for `durability` checks.
    fn assign(
        &self,
        mut records: Validated,
        durability: Durability,
        mode: Mode,
    ) -> Result<(AppendResult, Ticket), StorageError> {
        let mut guard = self.state.borrow_mut();
        let s = &mut *guard;
        if s.closed {
            return Err(StorageError::Io(std::io::Error::other("log is closed")));
        }
        if mode == Mode::Verbatim {
            check_contiguous(&records, s.offsets.log_end())?;
        } else if let Some(dup) = self.check_producers(s, &records)? {
            // A retry is answered like its first attempt, once the original batches reach the
            // durability asked for: the first attempt may still be unwritten (and its write may
            // yet fail), or its fdatasync may have failed.
            let ticket = s
                .appender
                .retry_ticket(dup.last_offset.next(), durability == Durability::Synced);
            return Ok((dup, ticket));
        }
        let base = s.offsets.log_end();
        self.note_epochs(s, &records, base);
        let interval = s.config.index_interval_bytes;
        if mode == Mode::Assign {
            records.assign_offsets(base);
        }
        let mut next = base;
        for h in records.headers() {
            let pos = s.active().size();
            s.active_mut().on_batch(&h, pos, interval);
            s.txns.on_batch(&h);
            if h.is_control() {
                s.producers
                    .apply_marker(h.producer_id(), h.producer_epoch());
            } else if h.producer_id() >= 0 {
                s.producers.apply(
                    h.producer_id(),
                    h.producer_epoch(),
                    BatchMeta {
                        first_seq: h.base_sequence(),
                        last_seq: h.last_sequence(),
                        base: h.base_offset(),
                        last: h.last_offset(),
                    },
                );
            }
            next = h.last_offset().next();
        }
        let ticket = s
            .appender
            .push(records.as_slice(), next, durability == Durability::Synced);
        let single = records.batch_count() == 1;
        // The buffer's room past the batches stays allocated while any of them is cached: it
        // is charged to the last one.
        let slack = records.held() - records.len();
        let (frozen, spans) = records.freeze();
        if single {
            // The whole buffer is the batch: cached as it is, since a slice of it would first
            // move it to a shared (allocated) representation.
            let h = BatchHeader::trusted(&frozen);
            let (base, last) = (h.base_offset(), h.last_offset());
            let held = frozen.len() + slack;
            self.cache.insert(self.cache_id, base, last, frozen, held);
        } else {
            let total = frozen.len();
            for (start, end) in spans {
                let b = frozen.slice(start..end);
                let h = BatchHeader::trusted(&b);
                let (base, last) = (h.base_offset(), h.last_offset());
                let held = b.len() + if end == total { slack } else { 0 };
                self.cache.insert(self.cache_id, base, last, b, held);
            }
        }
        s.offsets.accept(next);
        s.debug_check_invariants();
        let result = AppendResult {
            base_offset: base,
            last_offset: Offset(next.0 - 1),
            log_start_offset: s.offsets.log_start(),
            duplicate: false,
        };
        Ok((result, ticket))
    }

    /// Checks that the batches starting at `base` begin no epoch the leader-epoch cache does
    /// not hold: [`PartitionLog::persist_new_epochs`] made it durable before this synchronous
    /// part of the append, with no await in between.
    fn note_epochs(&self, s: &State, records: &Validated, base: Offset) {
        debug_assert!(
            new_epochs(&s.epochs, records, base).is_none(),
            "an append begins a leader epoch its checkpoint does not hold"
        );
    }

    /// When the admitted batches begin a new leader epoch (a leader's first append in its term,
    /// a follower's first entry of a new term), persists the leader-epoch cache with it before
    /// any of the append is accepted, and installs it; a failure leaves the log unchanged. An
    /// append that [`PartitionLog::assign`] would refuse or answer as a retry notes nothing.
    ///
    /// The checkpoint's write (temp file, fsync, rename, directory fsync) runs on the blocking
    /// thread pool. Other appends, rolls and truncations wait meanwhile on `rolling`, as during
    /// a roll: the log end does not move under the epochs computed here, and no other job
    /// writing the checkpoint (a truncation's) is in flight at the same time.
    async fn persist_new_epochs(
        &self,
        records: &Validated,
        mode: Mode,
    ) -> Result<(), StorageError> {
        let epochs = {
            let s = self.state.borrow();
            let Some(epochs) = new_epochs(&s.epochs, records, s.offsets.log_end()) else {
                return Ok(());
            };
            let assignable = !s.closed
                && match mode {
                    Mode::Verbatim => check_contiguous(records, s.offsets.log_end()).is_ok(),
                    Mode::Assign => matches!(self.check_producers(&s, records), Ok(None)),
                };
            if !assignable {
                return Ok(());
            }
            epochs
        };
        // Admission returned with no roll running and no await since: the turn is ours.
        let turn = self.take_turn();
        let dir = self.dir.clone();
        let key = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let written = glommio::executor()
            .spawn_blocking(move || {
                epochs.persist(&dir)?;
                crate::fault::delay_point_for("epoch_checkpoint", &key);
                std::io::Result::Ok(epochs)
            })
            .await;
        let epochs = written?;
        self.state.borrow_mut().epochs = epochs;
        // The epochs are installed before the turn is given back: the next append sees them.
        drop(turn);
        Ok(())
    }

    /// Waits until an append of `bytes` may assign offsets: its turn among the appends that
    /// arrived before it, no roll in progress, pending bytes under their limit; rolls the active
    /// segment first when it is full or old. The caller assigns offsets right after it returns,
    /// with no await in between, so admission order is log order.
    async fn admit(&self, bytes: usize) -> Result<(), StorageError> {
        // Fast path: nobody waits and there is room.
        {
            let s = self.state.borrow();
            if s.admission.waiting.is_empty()
                && !s.closed
                && !s.appender.is_dead()
                && !s.rolling
                && !s.appender.is_full(bytes)
                && !self.needs_roll(&s, bytes)
            {
                return Ok(());
            }
        }
        let id = {
            let mut s = self.state.borrow_mut();
            let id = s.admission.next_id;
            s.admission.next_id += 1;
            s.admission.waiting.push_back(id);
            id
        };
        // Leaves the queue however this call ends (admitted, failed, or its future dropped),
        // and lets the next in line re-check.
        let _turn = AdmissionTurn { log: self, id };
        loop {
            let roll = {
                let s = self.state.borrow();
                if s.closed {
                    return Err(StorageError::Io(std::io::Error::other("log is closed")));
                }
                if s.appender.is_dead() {
                    return Err(s.appender.error());
                }
                if s.admission.waiting.front() != Some(&id)
                    || s.rolling
                    || s.appender.is_full(bytes)
                {
                    None
                } else {
                    Some(self.needs_roll(&s, bytes))
                }
            };
            match roll {
                None => {
                    self.wait_until(|s| {
                        s.closed
                            || s.appender.is_dead()
                            || (s.admission.waiting.front() == Some(&id)
                                && !(s.rolling || s.appender.is_full(bytes)))
                    })
                    .await
                }
                Some(true) => self.roll_active().await?,
                Some(false) => return Ok(()),
            }
        }
    }

    fn needs_roll(&self, s: &State, bytes: usize) -> bool {
        let a = s.active();
        if a.size() == 0 {
            return false;
        }
        let limit = s.config.segment_bytes.min(u32::MAX as u64);
        let too_big = a.size() + bytes as u64 > limit;
        // Index entries hold offsets relative to the base as u32.
        let too_many = s.offsets.log_end().0 - a.base().0 + bytes as i64 > u32::MAX as i64;
        let too_old = s
            .config
            .segment_ms
            .is_some_and(|ms| self.clock.now_ms() - a.created_ms() >= ms as i64);
        too_big || too_many || too_old
    }

    /// KIP-98 checks of every batch. `Ok(Some)` when the append is a retry of batches already
    /// in the log (every batch of it must be).
    fn check_producers(
        &self,
        s: &State,
        records: &Validated,
    ) -> Result<Option<AppendResult>, StorageError> {
        let mut staged: Vec<(i64, i16, BatchMeta)> = vec![];
        let mut dup: Option<(Offset, Offset)> = None;
        let mut fresh = false;
        let mut next = s.offsets.log_end();
        for h in records.headers() {
            let delta = h.last_offset_delta() as i64;
            match s.producers.check(&h, &staged)? {
                Check::Duplicate(m) => {
                    if fresh {
                        return Err(StorageError::OutOfOrderSequence);
                    }
                    dup = Some(match dup {
                        None => (m.base, m.last),
                        Some((b, _)) => (b, m.last),
                    });
                }
                Check::Append => {
                    if dup.is_some() {
                        return Err(StorageError::OutOfOrderSequence);
                    }
                    fresh = true;
                    if h.producer_id() >= 0 {
                        staged.push((
                            h.producer_id(),
                            h.producer_epoch(),
                            BatchMeta {
                                first_seq: h.base_sequence(),
                                last_seq: h.last_sequence(),
                                base: next,
                                last: Offset(next.0 + delta),
                            },
                        ));
                    }
                }
            }
            next = Offset(next.0 + delta + 1);
        }
        Ok(dup.map(|(base, last)| AppendResult {
            base_offset: base,
            last_offset: last,
            log_start_offset: s.offsets.log_start(),
            duplicate: true,
        }))
    }
}

/// An append's place in [`AdmissionQueue`](super::AdmissionQueue): removed when dropped, waking
/// the appends behind it.
struct AdmissionTurn<'a> {
    log: &'a PartitionLog,
    id: u64,
}

impl Drop for AdmissionTurn<'_> {
    fn drop(&mut self) {
        let mut s = self.log.state.borrow_mut();
        if let Some(i) = s.admission.waiting.iter().position(|&w| w == self.id) {
            s.admission.waiting.remove(i);
        }
        s.wake_all();
    }
}

/// How an append treats the batches' offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The log assigns them (a single node, or a partition's leader); idempotent producers are
    /// checked.
    Assign,
    /// They were assigned by the leader and must continue the log exactly (a follower).
    Verbatim,
}

/// Sets `partitionLeaderEpoch` of every batch in `records` (validated: whole batches).
pub fn stamp_epoch(records: &mut [u8], epoch: i32) -> Result<(), BatchError> {
    let mut at = 0usize;
    while at < records.len() {
        let size = batch::batch_size(&records[at..]).ok_or(BatchError::Truncated)?;
        if at + size > records.len() {
            return Err(BatchError::Truncated);
        }
        batch::set_partition_leader_epoch(&mut records[at..at + size], epoch);
        at += size;
    }
    Ok(())
}

/// The leader-epoch cache `epochs` with the epochs that batches starting at `base` begin, or
/// `None` when they begin none (most appends: same epoch, or no epoch at all).
fn new_epochs(epochs: &LeaderEpochs, records: &Validated, base: Offset) -> Option<LeaderEpochs> {
    let mut next = base;
    let mut out: Option<LeaderEpochs> = None;
    for h in records.headers() {
        let epoch = h.partition_leader_epoch();
        let latest = out.as_ref().unwrap_or(epochs).latest();
        if epoch >= 0 && latest.is_none_or(|l| epoch > l) {
            let mut with = out.take().unwrap_or_else(|| epochs.clone());
            // `observe` refuses an epoch starting where the latest one starts: nothing to note.
            let noted = with.observe(epoch, next);
            if noted || with.entries().len() != epochs.entries().len() {
                out = Some(with);
            }
        }
        next = Offset(next.0 + h.last_offset_delta() as i64 + 1);
    }
    out
}

/// The batches start at `log_end` and follow each other without a gap.
fn check_contiguous(records: &Validated, log_end: Offset) -> Result<(), StorageError> {
    let mut next = log_end;
    for h in records.headers() {
        if h.base_offset() != next {
            return Err(StorageError::OffsetMismatch {
                expected: next,
                found: h.base_offset(),
            });
        }
        next = h.last_offset().next();
    }
    Ok(())
}

/// Control record types of the raft entries that carry no data, above the range Kafka uses
/// (0 abort, 1 commit, 2–6 KRaft). Kafka clients skip control batches whatever their type.
pub const CONTROL_RAFT_NOOP: i16 = 100;
pub const CONTROL_RAFT_CONF_CHANGE: i16 = 101;
pub const CONTROL_RAFT_CONF_CHANGE_V2: i16 = 102;

/// A control batch of one record: key `[version 0: i16][kind: i16]` as Kafka's control
/// records, `value` as given, leader epoch `epoch`, base offset 0 (the log assigns it).
pub fn control_batch(kind: i16, value: &[u8], epoch: i32, timestamp_ms: i64) -> Vec<u8> {
    let mut key = [0u8; 4];
    key[2..].copy_from_slice(&kind.to_be_bytes());
    let mut b = crate::protocol::builder::batch(&[crate::protocol::builder::Record {
        key: Some(&key),
        value: Some(value),
        headers: &[],
        timestamp_ms,
    }]);
    batch::set_control(&mut b);
    batch::set_partition_leader_epoch(&mut b, epoch);
    b
}

/// The kind and value of a control batch built by [`control_batch`]; `None` for a data batch
/// or a control batch of another shape.
pub fn control_of(b: &bytes::Bytes) -> Option<(i16, bytes::Bytes)> {
    let h = BatchHeader::parse(b).ok()?;
    if !h.is_control() || h.record_count() != 1 || h.compression() != 0 {
        return None;
    }
    let recs = crate::protocol::records::decode_batch(&b.slice(..h.size())).ok()?;
    let r = recs.first()?;
    let key = r.key.as_ref()?;
    if key.len() != 4 || key[..2] != [0, 0] {
        return None;
    }
    let kind = i16::from_be_bytes([key[2], key[3]]);
    Some((kind, r.value.clone().unwrap_or_default()))
}
