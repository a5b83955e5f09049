//! The four offsets of one partition log and the only code that moves them. Owned by the
//! partition log's [`State`](super::State); lives on the partition's shard.
//!
//! `log_start <= synced <= hw <= log_end`:
//! - `log_end`: the next offset to assign (moved by an accepted append, and back to `hw` when a
//!   write fails);
//! - `hw` (high watermark): batches below it are written to the file (one node: readers see
//!   exactly that); it only grows;
//! - `synced`: batches below it are covered by a completed fdatasync; it only grows;
//! - `log_start`: the first offset a reader may ask for (DeleteRecords, retention); it only
//!   grows, and never past `synced`: a log start checkpointed past the durable data would, after
//!   a crash that loses the unsynced tail, sit past the log end and hide the batches appended
//!   next under offsets below it.
//!
//! Every transition asserts the order; the fields are private to this module.

use crate::types::Offset;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Offsets {
    log_start: Offset,
    synced: Offset,
    hw: Offset,
    log_end: Offset,
}

impl Offsets {
    /// A log opened from its files: everything found is written and (recovery synced it) durable.
    pub fn recovered(log_start: Offset, log_end: Offset) -> Self {
        let o = Offsets {
            log_start,
            synced: log_end,
            hw: log_end,
            log_end,
        };
        assert!(Offset(0) <= log_start, "{o:?}");
        o.check();
        o
    }

    pub fn log_start(&self) -> Offset {
        self.log_start
    }
    pub fn synced(&self) -> Offset {
        self.synced
    }
    pub fn hw(&self) -> Offset {
        self.hw
    }
    pub fn log_end(&self) -> Offset {
        self.log_end
    }

    /// An append was accepted: offsets up to `next` (exclusive) are assigned. Hot path.
    pub fn accept(&mut self, next: Offset) {
        debug_assert!(next > self.log_end, "{self:?} -> log_end {next}");
        self.log_end = next;
        self.debug_check();
    }

    /// Batches below `hw` are written to the file.
    pub fn written(&mut self, hw: Offset) {
        debug_assert!(hw >= self.hw, "high watermark moves back: {self:?} -> {hw}");
        debug_assert!(hw <= self.log_end, "{self:?} -> hw {hw}");
        self.hw = hw;
        self.debug_check();
    }

    /// An fdatasync that started when the high watermark was `to` completed.
    pub fn synced_to(&mut self, to: Offset) {
        debug_assert!(to <= self.hw, "{self:?} -> synced {to}");
        self.synced = self.synced.max(to);
        self.debug_check();
    }

    /// A write failed: the offsets past the high watermark are given out again. Returns it.
    pub fn rewind_to_hw(&mut self) -> Offset {
        self.log_end = self.hw;
        self.check();
        self.hw
    }

    /// The log is cut at `to` (a follower's conflict truncation, with nothing pending, the cut
    /// file synced): the log end, the high watermark and the synced offset become `to`. The
    /// only move back of these offsets; `to` is never below the log start.
    pub fn truncate_to(&mut self, to: Offset) {
        assert!(
            self.log_start <= to && to <= self.log_end && self.hw == self.log_end,
            "truncation to {to} of {self:?}"
        );
        self.log_end = to;
        self.hw = to;
        self.synced = to;
        self.check();
    }

    /// The log start moves up to `to`, which must be durable already (see the module doc).
    pub fn advance_start(&mut self, to: Offset) {
        assert!(
            to <= self.synced,
            "log start past the synced offset: {self:?} -> {to}"
        );
        self.log_start = self.log_start.max(to);
        self.check();
    }

    /// `log_start <= synced <= hw <= log_end`. Cheap: called on cold paths as a hard assert.
    pub fn check(&self) {
        assert!(
            self.log_start <= self.synced && self.synced <= self.hw && self.hw <= self.log_end,
            "partition offsets out of order: {self:?}"
        );
    }

    /// [`Offsets::check`] in debug builds (hot paths).
    pub fn debug_check(&self) {
        if cfg!(debug_assertions) {
            self.check();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_keep_the_order() {
        let mut o = Offsets::recovered(Offset(0), Offset(10));
        o.accept(Offset(15));
        o.written(Offset(12));
        o.synced_to(Offset(11));
        o.advance_start(Offset(11));
        assert_eq!(
            (o.log_start(), o.synced(), o.hw(), o.log_end()),
            (Offset(11), Offset(11), Offset(12), Offset(15))
        );
        assert_eq!(o.rewind_to_hw(), Offset(12));
        assert_eq!(o.log_end(), Offset(12));
    }

    #[test]
    #[should_panic(expected = "log start past the synced offset")]
    fn the_log_start_never_passes_the_synced_offset() {
        let mut o = Offsets::recovered(Offset(0), Offset(10));
        o.accept(Offset(15));
        o.written(Offset(15));
        o.advance_start(Offset(12));
    }
}
