//! Transactional offset commits (KIP-98 TxnOffsetCommit, KIP-447 member fencing): the offsets
//! are appended to the group's `__consumer_offsets` partition as a transactional batch of the
//! producer and held aside until the transaction coordinator's marker lands in that partition
//! (COMMIT: they become the committed offsets; ABORT: they are dropped). Replay does the same
//! with the batches and markers it reads.

use std::collections::HashMap;

use crate::group::coordinator::CommitEntry;
use crate::group::{GroupShard, MemberRef, PersistError};
use crate::protocol::builder::BatchOptions;
use crate::storage::StorageError;
use crate::types::ErrorCode;

/// Offsets of open transactions of one shard: producer id -> (partition, group, entry).
#[derive(Default)]
pub struct PendingTxnOffsets {
    by_producer: HashMap<i64, Vec<(i32, String, CommitEntry)>>,
}

impl PendingTxnOffsets {
    pub fn add(&mut self, pid: i64, partition: i32, group: &str, entries: Vec<CommitEntry>) {
        let v = self.by_producer.entry(pid).or_default();
        for e in entries {
            // A later commit of the same partition in the same transaction replaces it.
            v.retain(|(p, g, old)| {
                !(*p == partition
                    && g == group
                    && old.topic == e.topic
                    && old.partition == e.partition)
            });
            v.push((partition, group.to_string(), e));
        }
    }

    /// Drops every pending offset held for `__consumer_offsets` partition `partition` (its
    /// groups moved to another coordinator, which rebuilds them from the log).
    pub fn forget_partition(&mut self, partition: i32) {
        for v in self.by_producer.values_mut() {
            v.retain(|(p, _, _)| *p != partition);
        }
        self.by_producer.retain(|_, v| !v.is_empty());
    }

    /// Takes the producer's pending offsets held in `partition`.
    pub fn take(&mut self, pid: i64, partition: i32) -> Vec<(String, CommitEntry)> {
        let Some(v) = self.by_producer.get_mut(&pid) else {
            return vec![];
        };
        let (mine, rest): (Vec<_>, Vec<_>) = v.drain(..).partition(|(p, _, _)| *p == partition);
        *v = rest;
        if v.is_empty() {
            self.by_producer.remove(&pid);
        }
        mine.into_iter().map(|(_, g, e)| (g, e)).collect()
    }

    /// Whether any open transaction holds an offset of `topic`/`partition` for `group`
    /// (OffsetFetch with `require_stable`: UNSTABLE_OFFSET_COMMIT).
    pub fn has_pending(&self, group: &str, topic: &str, partition: i32) -> bool {
        self.by_producer
            .values()
            .flatten()
            .any(|(_, g, e)| g == group && e.topic == topic && e.partition == partition)
    }
}

impl GroupShard {
    /// TxnOffsetCommit on the group's shard: checks the member (KIP-447) when the request names
    /// one, appends the offsets as `pid`/`epoch`'s transactional batch and holds them until the
    /// transaction ends.
    pub async fn txn_commit(
        &self,
        who: MemberRef<'_>,
        pid: i64,
        epoch: i16,
        entries: Vec<CommitEntry>,
    ) -> ErrorCode {
        let group_id = who.group_id;
        let now = self.clock().now_ms();
        let writes = {
            let mut c = self.coordinator.borrow_mut();
            // Clients before KIP-447 name no member: their commits are not fenced by the group.
            if who.generation >= 0 || !who.member_id.is_empty() {
                if let Err(code) = c.check_commit(who, now) {
                    return code;
                }
            }
            c.commit_writes(group_id, &entries)
        };
        let Some(partition) = writes.first().map(|w| w.partition) else {
            return ErrorCode::NONE;
        };
        let options = BatchOptions {
            producer_id: pid,
            producer_epoch: epoch,
            transactional: true,
            ..Default::default()
        };
        match self.persist_with(writes, options).await {
            Ok(()) => {
                self.pending_txn
                    .borrow_mut()
                    .add(pid, partition, group_id, entries);
                ErrorCode::NONE
            }
            Err(PersistError::Storage(StorageError::InvalidProducerEpoch)) => {
                ErrorCode::new(kafka_protocol::ResponseError::ProducerFenced)
            }
            Err(PersistError::NotCoordinator) => {
                ErrorCode::new(kafka_protocol::ResponseError::NotCoordinator)
            }
            Err(e) => {
                tracing::warn!(group = group_id, error = %e, "transactional offset commit not persisted");
                ErrorCode::new(kafka_protocol::ResponseError::CoordinatorNotAvailable)
            }
        }
    }

    /// The transaction of `pid` ended in `partition` (its marker is durable there).
    pub async fn complete_txn(&self, partition: i32, pid: i64, commit: bool) {
        let taken = self.pending_txn.borrow_mut().take(pid, partition);
        if commit && !taken.is_empty() {
            let now = self.clock().now_ms();
            let mut c = self.coordinator.borrow_mut();
            for (group, e) in taken {
                c.apply_commit(&group, vec![e], now);
            }
        }
    }
}
