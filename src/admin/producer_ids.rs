//! Producer ids for idempotent producers (KIP-98), handed out by the metadata owner on shard 0
//! from blocks persisted in `__meta/producer_ids`, so an id is never handed out twice, not even
//! across a crash.
//!
//! The file holds the limit: every id below it may have been handed out. An id is handed out
//! only once the block holding it is durable (the limit above it is written, fsynced and renamed
//! into place), and all ids come from this one allocator on one shard, so no other shard can
//! run ahead of the persisted limit. A restart resumes at the persisted limit and first persists
//! a fresh block above it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Ids per persisted block: one fsync of the limit file per this many InitProducerId calls.
pub const PRODUCER_ID_BLOCK: u64 = 1000;

/// The allocator; lives in the metadata owner on shard 0.
pub struct ProducerIds {
    data_dir: PathBuf,
    /// The next id to hand out.
    next: u64,
    /// The persisted limit: ids below it are covered by a durable block.
    limit: u64,
}

impl ProducerIds {
    /// Resumes after every id a previous run may have handed out and persists the first block.
    pub fn open(data_dir: &Path) -> std::io::Result<ProducerIds> {
        let path = data_dir.join("__meta/producer_ids");
        // No file: a new data dir, ids start at 0. A file that does not hold a number is damage
        // from outside (it is only ever replaced whole): starting again from 0 could hand out
        // ids earlier runs used, so refuse to start instead.
        let start = match std::fs::read_to_string(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
            Ok(text) => text.trim().parse::<u64>().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} does not hold a producer id", path.display()),
                )
            })?,
        };
        let limit = start
            .checked_add(PRODUCER_ID_BLOCK)
            .ok_or_else(|| std::io::Error::other("producer id space exhausted"))?;
        write_limit(data_dir, limit)?;
        Ok(ProducerIds {
            data_dir: data_dir.to_path_buf(),
            next: start,
            limit,
        })
    }

    /// Hands out the next id if the block holding it is durable already; `None` when the next
    /// block must be persisted first ([`ProducerIds::next_block`]).
    pub fn try_allocate(&mut self) -> Option<u64> {
        if self.next >= self.limit {
            return None;
        }
        let id = self.next;
        self.next += 1;
        Some(id)
    }

    /// The block to persist before the next id can be handed out: the data dir and the limit
    /// to write with [`write_limit`]; then [`ProducerIds::block_persisted`].
    pub fn next_block(&self) -> std::io::Result<(PathBuf, u64)> {
        let limit = self
            .limit
            .checked_add(PRODUCER_ID_BLOCK)
            .filter(|l| *l <= i64::MAX as u64)
            .ok_or_else(|| std::io::Error::other("producer id space exhausted"))?;
        Ok((self.data_dir.clone(), limit))
    }

    /// `limit` (from [`ProducerIds::next_block`]) is durable: ids below it may be handed out.
    pub fn block_persisted(&mut self, limit: u64) {
        self.limit = self.limit.max(limit);
    }

    /// Hands out the next id. Crossing into a new block persists that block first (here, on
    /// the calling thread); if that fails no id is handed out.
    pub fn allocate(&mut self) -> std::io::Result<u64> {
        assert!(
            self.next <= self.limit,
            "producer id past its persisted block"
        );
        if self.next == self.limit {
            let limit = self
                .limit
                .checked_add(PRODUCER_ID_BLOCK)
                .filter(|l| *l <= i64::MAX as u64)
                .ok_or_else(|| std::io::Error::other("producer id space exhausted"))?;
            write_limit(&self.data_dir, limit)?;
            self.limit = limit;
        }
        let id = self.next;
        self.next += 1;
        debug_assert!(id < self.limit);
        Ok(id)
    }
}

/// Writes `limit` durably: a temp file fsynced, renamed over the old one, the directory fsynced.
pub fn write_limit(data_dir: &Path, limit: u64) -> std::io::Result<()> {
    let path = data_dir.join("__meta/producer_ids");
    let tmp = data_dir.join("__meta/producer_ids.tmp");
    {
        let mut f = File::create(&tmp)?;
        writeln!(f, "{limit}")?;
        f.sync_all()?;
    }
    crate::fault::delay_point("producer_id_block");
    std::fs::rename(&tmp, &path)?;
    File::open(data_dir.join("__meta"))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(d.path().join("__meta")).expect("create __meta");
        d
    }

    fn persisted(dir: &Path) -> u64 {
        std::fs::read_to_string(dir.join("__meta/producer_ids"))
            .expect("read limit")
            .trim()
            .parse()
            .expect("a number")
    }

    #[test]
    fn every_handed_out_id_is_below_the_persisted_limit() {
        let d = data_dir();
        let mut ids = ProducerIds::open(d.path()).expect("open");
        for _ in 0..3 * PRODUCER_ID_BLOCK + 7 {
            let id = ids.allocate().expect("allocate");
            assert!(
                id < persisted(d.path()),
                "id {id} handed out before its block is durable"
            );
        }
    }

    #[test]
    fn a_damaged_block_file_refuses_to_start_rather_than_reuse_ids() {
        let d = data_dir();
        drop(ProducerIds::open(d.path()).expect("open"));
        std::fs::write(d.path().join("__meta/producer_ids"), "12x\n").expect("damage");
        let e = ProducerIds::open(d.path())
            .err()
            .expect("a damaged file is an error");
        assert!(e.to_string().contains("does not hold a producer id"), "{e}");
    }

    #[test]
    fn a_restart_never_repeats_an_id() {
        let d = data_dir();
        let mut seen = std::collections::BTreeSet::new();
        for run in 0..4 {
            let mut ids = ProducerIds::open(d.path()).expect("open");
            // Each run hands out a different count, crossing block boundaries or not.
            for _ in 0..(run * 700 + 3) {
                let id = ids.allocate().expect("allocate");
                assert!(seen.insert(id), "id {id} handed out twice");
            }
        }
    }
}
