//! The shard's commit cycle: the flushes that carry acks=all appends (`Durability::Synced`) of
//! every partition on the shard are started together, as one cycle, and the next cycle starts
//! once every write of the current one is done. A cycle admits flushes until the first of its
//! writes completes; partitions whose data arrives later wait for the next cycle and carry
//! everything appended meanwhile in it. So the shard's durable writes (or writes and their
//! fdatasyncs) reach the device in one batch — one journal commit and one merged cache flush
//! serve all of them — instead of each partition paying its own at its own time. Under the
//! write + fdatasync path the syncs of a cycle overlap the next cycle's writes (the flusher
//! keeps one write and one sync in flight per partition). Acks are released per partition as its
//! own bytes become durable. Flushes without a `Synced` append waiting (acks=1) are not held.
//!
//! State is per thread, that is per shard (one executor per thread); a [`CycleTicket`] is held
//! by each admitted write and released on drop, so a write dropped mid-flight (a log dropped
//! with its executor) cannot hold the cycle closed. Lives on the shard's executor.

use std::cell::RefCell;
use std::task::Waker;

/// Whether acks=all flushes are gathered into shard cycles (see the module doc). Off by
/// default: measured against per-partition flushes (perf/RESULTS.md) the cycle gave lower S3
/// tails at 50 and 100 MB/s but held 200 MB/s less often (a cycle waits for its slowest
/// partition), within noise too wide to call it a win. `SLUICE_COMMIT_CYCLE=shard` turns it
/// on, `partition` (each partition flushes on its own, as soon as it has data) off.
pub const SHARD_CYCLE: bool = false;

pub(crate) fn shard_cycle_default() -> bool {
    static MODE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("SLUICE_COMMIT_CYCLE").as_deref() {
        Ok("partition") => false,
        Ok("shard") => true,
        _ => SHARD_CYCLE,
    })
}

#[derive(Default)]
struct Cycle {
    /// Writes of the current cycle still in flight.
    in_flight: usize,
    /// The current cycle still admits flushes (none of its writes has completed yet).
    open: bool,
    /// Flushers waiting for the next cycle.
    waiting: Vec<Waker>,
    /// Cycles started, and flushes admitted into them (for tests).
    #[cfg_attr(not(test), allow(dead_code))]
    cycles: u64,
    #[cfg_attr(not(test), allow(dead_code))]
    flushes: u64,
}

thread_local! {
    static CYCLE: RefCell<Cycle> = RefCell::default();
}

/// An admitted write of the current cycle: dropping it (the write completed, failed or was
/// dropped) counts it out of the cycle.
pub(crate) struct CycleTicket(());

/// Joins the current cycle (opening one if none is in flight), or registers `waker` for the
/// next one and returns `None`.
pub(crate) fn join(waker: &Waker) -> Option<CycleTicket> {
    CYCLE.with(|c| {
        let mut c = c.borrow_mut();
        if c.in_flight == 0 {
            c.open = true;
            c.cycles += 1;
        }
        if c.open {
            c.in_flight += 1;
            c.flushes += 1;
            Some(CycleTicket(()))
        } else {
            if !c.waiting.iter().any(|w| w.will_wake(waker)) {
                c.waiting.push(waker.clone());
            }
            None
        }
    })
}

impl Drop for CycleTicket {
    fn drop(&mut self) {
        let waiting = CYCLE.with(|c| {
            let mut c = c.borrow_mut();
            c.in_flight -= 1;
            c.open = false;
            if c.in_flight == 0 {
                std::mem::take(&mut c.waiting)
            } else {
                vec![]
            }
        });
        for w in waiting {
            w.wake();
        }
    }
}

/// (cycles started, flushes admitted) on this shard so far.
#[cfg(test)]
pub(crate) fn stats() -> (u64, u64) {
    CYCLE.with(|c| {
        let c = c.borrow();
        (c.cycles, c.flushes)
    })
}

/// Flushers waiting for the next cycle (for tests).
#[cfg(test)]
pub(crate) fn waiting() -> usize {
    CYCLE.with(|c| c.borrow().waiting.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop() -> Waker {
        Waker::noop().clone()
    }

    #[test]
    fn a_cycle_admits_flushes_until_its_first_write_completes_and_the_next_starts_when_all_are_done(
    ) {
        let w = noop();
        let a = join(&w).expect("no cycle in flight: a new one opens");
        let b = join(&w).expect("the open cycle admits");
        drop(a); // the first write done: the cycle closes
        assert!(join(&w).is_none(), "closed: wait for the next cycle");
        drop(b); // all done: the next cycle opens
        let c = join(&w).expect("next cycle");
        drop(c);
    }
}
