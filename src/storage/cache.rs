//! The per-shard batch cache: recently appended batches of every partition on the shard, kept as
//! the `Bytes` they arrived in (no copy), so tail-reading consumers never touch the disk. Owned by
//! the shard and shared by its partition logs through `Rc`; one memory budget for all of them,
//! evicted oldest-first (insertion order, which is append order).
//!
//! Per log the cached batches are a contiguous run of offsets ending at the newest appended
//! batch: a read is either answered entirely from the cache (its start is inside the run) or
//! entirely from disk.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use bytes::Bytes;

use crate::types::Offset;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub bytes: usize,
    pub batches: usize,
}

pub(crate) struct Cached {
    pub base: Offset,
    pub last: Offset,
    pub bytes: Bytes,
    /// The memory this entry keeps alive, charged to the budget: at least the batch's bytes;
    /// more when the batch is the buffer a request arrived in and that buffer has room past it.
    pub held: usize,
}

/// What one cached batch costs beyond its bytes, charged to the budget with them: its entry
/// (base, last and the `Bytes` handle, 48 bytes), its place in the eviction order (16), the
/// shared `Bytes` header and the allocator's rounding. Without it a budget of gigabytes filled
/// with batches of one small record would hold several times its size.
pub const ENTRY_OVERHEAD_BYTES: usize = 128;

#[derive(Default)]
struct Inner {
    logs: HashMap<u64, VecDeque<Cached>>,
    /// Insertion order across logs: (log id, base offset). Entries whose batch was already
    /// dropped (truncation, log removal) are skipped when they reach the front.
    order: VecDeque<(u64, Offset)>,
    /// Memory the cached batches keep alive (`Cached::held`).
    bytes: usize,
    /// Cached batches.
    entries: usize,
}

impl Inner {
    /// What the cache holds against its budget: the memory its batches keep alive and
    /// [`ENTRY_OVERHEAD_BYTES`] per batch.
    fn charged(&self) -> usize {
        self.bytes + self.entries * ENTRY_OVERHEAD_BYTES
    }
    /// `n` batches of `bytes` in all left the cache.
    fn released(&mut self, n: usize, bytes: usize) {
        self.entries -= n;
        self.bytes -= bytes;
    }
}

/// Per-shard cache of recently appended batches, shared by the shard's partitions.
pub struct BatchCache {
    pub bytes_max: usize,
    inner: RefCell<Inner>,
    next_id: Cell<u64>,
    hits: Cell<u64>,
    misses: Cell<u64>,
    evictions: Cell<u64>,
}

impl BatchCache {
    pub fn new(bytes_max: usize) -> Rc<Self> {
        Rc::new(BatchCache {
            bytes_max,
            inner: RefCell::new(Inner::default()),
            next_id: Cell::new(0),
            hits: Cell::new(0),
            misses: Cell::new(0),
            evictions: Cell::new(0),
        })
    }

    pub fn stats(&self) -> CacheStats {
        let inner = self.inner.borrow();
        CacheStats {
            hits: self.hits.get(),
            misses: self.misses.get(),
            evictions: self.evictions.get(),
            bytes: inner.bytes,
            batches: inner.entries,
        }
    }

    pub(crate) fn register(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    /// Adds the newest batch of `log`, which keeps `held` bytes of memory alive (at least its
    /// own length; see `Cached::held`). Batches bigger than the whole budget are not cached.
    pub(crate) fn insert(&self, log: u64, base: Offset, last: Offset, bytes: Bytes, held: usize) {
        debug_assert!(held >= bytes.len(), "a batch holds at least its own bytes");
        let size = held.max(bytes.len());
        if size + ENTRY_OVERHEAD_BYTES > self.bytes_max {
            // Keep the run contiguous: an uncached batch ends it.
            self.drop_log(log);
            return;
        }
        let mut inner = self.inner.borrow_mut();
        let (mut freed, mut dropped) = (0, 0);
        {
            let run = inner.logs.entry(log).or_default();
            if let Some(prev) = run.back() {
                if prev.last.next() != base {
                    dropped = run.len();
                    freed = run.drain(..).map(|c| c.held).sum();
                }
            }
            run.push_back(Cached {
                base,
                last,
                bytes,
                held: size,
            });
        }
        inner.order.push_back((log, base));
        inner.released(dropped, freed);
        inner.bytes += size;
        inner.entries += 1;
        while inner.charged() > self.bytes_max {
            let Some((id, base)) = inner.order.pop_front() else {
                break;
            };
            let Some(run) = inner.logs.get_mut(&id) else {
                continue;
            };
            // The order entry may be stale: a failed write gives its offsets out again, so the
            // batch now cached at `base` can differ in size. Account for what is dropped.
            if run.front().map(|c| c.base) == Some(base) {
                if let Some(c) = run.pop_front() {
                    inner.released(1, c.held);
                }
                self.evictions.set(self.evictions.get() + 1);
            }
        }
    }

    /// Collects cached batches of `log` from the one containing `start`, stopping before
    /// `end` (the high watermark) or once `bytes_max` is reached (at least one batch).
    /// Returns false (a miss) when `start` is not inside the cached run.
    pub(crate) fn read(
        &self,
        log: u64,
        start: Offset,
        end: Offset,
        bytes_max: usize,
        out: &mut Vec<Bytes>,
    ) -> bool {
        let inner = self.inner.borrow();
        let hit = match inner.logs.get(&log) {
            Some(run) if run.front().is_some_and(|c| c.base <= start) => {
                let i = run.partition_point(|c| c.last < start);
                let mut bytes = 0usize;
                for c in run.range(i..) {
                    if c.last >= end {
                        break;
                    }
                    if !out.is_empty() && bytes + c.bytes.len() > bytes_max {
                        break;
                    }
                    bytes += c.bytes.len();
                    out.push(c.bytes.clone());
                }
                true
            }
            _ => false,
        };
        if hit {
            self.hits.set(self.hits.get() + 1);
        } else {
            self.misses.set(self.misses.get() + 1);
        }
        hit
    }

    /// Drops cached batches of `log` with offsets at or past `from` (failed writes, truncation).
    pub(crate) fn truncate_from(&self, log: u64, from: Offset) {
        let mut inner = self.inner.borrow_mut();
        let (mut freed, mut n) = (0, 0);
        if let Some(run) = inner.logs.get_mut(&log) {
            while run.back().is_some_and(|c| c.last >= from) {
                if let Some(c) = run.pop_back() {
                    freed += c.held;
                    n += 1;
                }
            }
        }
        inner.released(n, freed);
    }

    /// Drops cached batches of `log` that end before `before` (compaction rewrote them).
    pub(crate) fn drop_below(&self, log: u64, before: Offset) {
        let mut inner = self.inner.borrow_mut();
        let (mut freed, mut n) = (0, 0);
        if let Some(run) = inner.logs.get_mut(&log) {
            while run.front().is_some_and(|c| c.last < before) {
                if let Some(c) = run.pop_front() {
                    freed += c.held;
                    n += 1;
                }
            }
        }
        inner.released(n, freed);
    }

    pub(crate) fn drop_log(&self, log: u64) {
        let mut inner = self.inner.borrow_mut();
        if let Some(run) = inner.logs.remove(&log) {
            let freed: usize = run.iter().map(|c| c.held).sum();
            inner.released(run.len(), freed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: usize) -> Bytes {
        Bytes::from(vec![7u8; n])
    }

    #[test]
    fn evicts_oldest_first_across_logs_within_budget() {
        let c = BatchCache::new(3 * (100 + ENTRY_OVERHEAD_BYTES));
        let (a, z) = (c.register(), c.register());
        c.insert(a, Offset(0), Offset(0), b(100), 100);
        c.insert(z, Offset(0), Offset(4), b(100), 100);
        c.insert(a, Offset(1), Offset(1), b(100), 100);
        c.insert(z, Offset(5), Offset(5), b(100), 100);
        let s = c.stats();
        assert_eq!((s.bytes, s.batches, s.evictions), (300, 3, 1));
        let mut out = vec![];
        // Log `a` lost offset 0: a read there is a miss, offset 1 a hit.
        assert!(!c.read(a, Offset(0), Offset(10), 1000, &mut out));
        assert!(c.read(a, Offset(1), Offset(10), 1000, &mut out));
        assert_eq!(out.len(), 1);
        let s = c.stats();
        assert_eq!((s.hits, s.misses), (1, 1));
    }

    #[test]
    fn read_returns_one_batch_beyond_bytes_max_and_stops_at_high_watermark() {
        let c = BatchCache::new(10_000);
        let l = c.register();
        for i in 0..5 {
            c.insert(l, Offset(i * 2), Offset(i * 2 + 1), b(100), 100);
        }
        let mut out = vec![];
        assert!(c.read(l, Offset(3), Offset(100), 1, &mut out));
        assert_eq!(out.len(), 1);
        out.clear();
        assert!(c.read(l, Offset(3), Offset(6), 10_000, &mut out));
        assert_eq!(out.len(), 2); // batches [2,3] and [4,5]; [6,7] is past the watermark
        c.truncate_from(l, Offset(4));
        assert_eq!(c.stats().batches, 2);
        assert_eq!(c.stats().bytes, 200);
    }

    #[test]
    fn accounting_stays_exact_when_offsets_are_given_out_again() {
        // A failed write truncates the cache and the same offsets come back with other sizes.
        let c = BatchCache::new(130 + 2 * ENTRY_OVERHEAD_BYTES);
        let id = c.register();
        c.insert(id, Offset(0), Offset(0), b(100), 100);
        c.truncate_from(id, Offset(0));
        assert_eq!(c.stats().bytes, 0);
        c.insert(id, Offset(0), Offset(0), b(60), 60);
        c.insert(id, Offset(1), Offset(1), b(80), 80);
        c.insert(id, Offset(2), Offset(2), b(50), 50);
        let s = c.stats();
        assert_eq!((s.bytes, s.batches), (130, 2));
        // A non-contiguous insert drops the run and its bytes.
        c.insert(id, Offset(9), Offset(9), b(10), 10);
        assert_eq!((c.stats().bytes, c.stats().batches), (10, 1));
        c.drop_log(id);
        assert_eq!((c.stats().bytes, c.stats().batches), (0, 0));
    }

    /// Small batches are charged their entry's overhead too: a budget holds far fewer of them
    /// than their bytes alone would allow.
    #[test]
    fn each_batch_is_charged_its_entrys_overhead() {
        let c = BatchCache::new(10_000);
        let id = c.register();
        for i in 0..1_000 {
            c.insert(id, Offset(i), Offset(i), b(10), 10);
        }
        let s = c.stats();
        assert_eq!(s.batches, 10_000 / (10 + ENTRY_OVERHEAD_BYTES));
        assert_eq!(s.bytes, 10 * s.batches);
        assert_eq!(s.evictions, 1_000 - s.batches as u64);
        // A batch that fits the budget only without its overhead is not cached.
        let c = BatchCache::new(100);
        let id = c.register();
        c.insert(id, Offset(0), Offset(0), b(100), 100);
        assert_eq!(c.stats().batches, 0);
    }
}
