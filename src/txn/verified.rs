//! The verification cache of one shard (KIP-890 part 1's guard, without a hop per produce): for
//! each partition this shard owns, the transactional producers (producer id, epoch) the
//! coordinator confirmed to be in an open transaction that holds the partition. A transactional
//! Produce whose producer is here skips the hop to the coordinator; any other asks it.
//!
//! An entry lives until the transaction's marker is appended to the partition (on this shard,
//! [`forget`] — the next transaction is verified again) and is only ever for one epoch: a bumped
//! epoch (a fence, a timeout, transaction version 2's EndTxn) is a different key and misses. A
//! verification that was under way while a marker landed is not remembered (the generation
//! moved), so an entry never outlives the transaction it was verified for. Partitions are
//! named by topic id, so a topic deleted (its markers skipped) and created again under the same
//! name starts with no entries.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// A partition by its topic's id (KIP-516) and index: a topic deleted and created again under
/// the same name is another topic, and never inherits the entries of the first.
pub type PartitionKey = ([u8; 16], i32);

/// Producers remembered per partition: the transactions open in it at once. Past it the oldest
/// entry is dropped (its next produce asks the coordinator again), so a partition's entry stays
/// small whatever the producers do.
pub const VERIFIED_PER_PARTITION_MAX: usize = 64;

thread_local! {
    static VERIFIED: RefCell<HashMap<PartitionKey, Vec<(i64, i16)>>> =
        RefCell::new(HashMap::new());
    static GENERATION: Cell<u64> = const { Cell::new(0) };
}

/// Whether `pid` at `epoch` was verified in an open transaction holding `tp`.
pub fn contains(tp: &PartitionKey, pid: i64, epoch: i16) -> bool {
    VERIFIED.with(|v| {
        v.borrow()
            .get(tp)
            .is_some_and(|ps| ps.contains(&(pid, epoch)))
    })
}

/// Taken before asking the coordinator and handed to [`remember`].
pub fn generation() -> u64 {
    GENERATION.with(|g| g.get())
}

/// Remembers that the coordinator confirmed `pid`/`epoch` for `tp`, unless a marker was
/// appended on this shard since `generation` was taken (the answer may be about a transaction
/// that has ended).
pub fn remember(tp: &PartitionKey, pid: i64, epoch: i16, generation: u64) {
    if GENERATION.with(|g| g.get()) != generation {
        return;
    }
    VERIFIED.with(|v| {
        let mut v = v.borrow_mut();
        let ps = v.entry(*tp).or_default();
        ps.retain(|(p, _)| *p != pid);
        if ps.len() >= VERIFIED_PER_PARTITION_MAX {
            ps.remove(0);
        }
        ps.push((pid, epoch));
    });
}

/// A marker of `pid` is being appended to `tp`: its transaction there is over.
pub fn forget(tp: &PartitionKey, pid: i64) {
    GENERATION.with(|g| g.set(g.get().wrapping_add(1)));
    VERIFIED.with(|v| {
        let mut v = v.borrow_mut();
        if let Some(ps) = v.get_mut(tp) {
            ps.retain(|(p, _)| *p != pid);
            if ps.is_empty() {
                v.remove(tp);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_end_with_the_marker_and_are_per_epoch() {
        let tp = ([1; 16], 0);
        let g = generation();
        remember(&tp, 7, 1, g);
        assert!(contains(&tp, 7, 1));
        assert!(!contains(&tp, 7, 2), "another epoch is not verified");
        assert!(!contains(&([1; 16], 1), 7, 1));
        forget(&tp, 7);
        assert!(!contains(&tp, 7, 1));
        // A verification that started before the marker is not remembered.
        remember(&tp, 7, 1, g);
        assert!(!contains(&tp, 7, 1));
        // Bounded per partition.
        let g = generation();
        for pid in 0..(VERIFIED_PER_PARTITION_MAX as i64 + 10) {
            remember(&tp, 100 + pid, 0, g);
        }
        VERIFIED.with(|v| assert_eq!(v.borrow()[&tp].len(), VERIFIED_PER_PARTITION_MAX));
        assert!(!contains(&tp, 100, 0), "the oldest was dropped");
    }
}
