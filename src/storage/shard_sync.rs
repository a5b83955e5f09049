//! The shard's background sync rounds. Written data that no acks=all append waits for (acks=1
//! traffic under the `Always` flush policy) must still reach stable storage within a bounded
//! time (`background_sync_interval`: a second, stretched on shards of more than 100
//! partitions). An fdatasync per partition pays a device cache flush each (on ext4 without a
//! journal also a synchronous inode write), and the device's writes queue behind every flush:
//! on a shard of 1,000 partitions, their 100 fdatasyncs a second made S5's writes wait 30-50 %
//! longer (perf/RESULTS.md). Instead, every partition whose background sync is due joins the
//! shard's next *round*: one [`StorageIo::sync_fs`] of the file system that holds the logs (a
//! `syncfs`, which writes back the metadata of every file written — the extent conversions of
//! direct writes into pre-allocated blocks — and flushes the device cache once, then a
//! directory fsync, whose flush comes after everything `syncfs` wrote). A round vouches for
//! every write completed before it started, so a partition joins with the positions it has
//! written by then and, once the round succeeds, counts them synced; if its positions started
//! over meanwhile (a roll, a truncation) it counts nothing.
//!
//! A round starts when a partition joins and none is in flight, at most one every
//! [`ROUND_SPACING_MS`]; it first lets the partitions woken in the same executor turn join,
//! and partitions that join while it runs wait for the next. Every partition of a round takes
//! its completion as its last sync, so partitions that share a round stay in step. The
//! file-system calls run on the shard's blocking thread pool, never on its executor. Every
//! partition of the shard joins the same round; the round syncs once per storage domain
//! ([`StorageIo::sync_domain`]: in the broker, one) and, within it, once per file system
//! (told apart by device number), however many directories and storage handles its logs use.
//!
//! `SLUICE_BACKGROUND_SYNC=file` goes back to an fdatasync per partition, for measuring one
//! against the other, or for a data directory on a file system shared with other heavy
//! writers, whose dirty data a `syncfs` would write back too.
//!
//! State is per executor thread (one shard), reset when another executor runs on the thread.

use std::cell::RefCell;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crate::storage::io::StorageIo;
use crate::types::{Clock, Sleep};

/// Rounds start at most this often: partitions whose syncs fall due at different times share
/// a round as long as they are due within this much of each other. It is also the most a
/// partition's background sync waits beyond its interval for a round to start.
pub const ROUND_SPACING_MS: u64 = 100;

/// Whether background syncs go through shard rounds (see the module doc); the default.
pub const SHARD_ROUNDS: bool = true;

pub(crate) fn shard_rounds_default() -> bool {
    static MODE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MODE.get_or_init(
        || match std::env::var("SLUICE_BACKGROUND_SYNC").as_deref() {
            Ok("file") => false,
            Ok("shard") => true,
            _ => SHARD_ROUNDS,
        },
    )
}

#[derive(Default)]
struct Rounds {
    /// The executor this state belongs to: a round in flight dies with its executor.
    executor: usize,
    /// Rounds started and completed on this shard; at most one is in flight.
    started: u64,
    done: u64,
    /// The round `started` is still gathering partitions: it syncs nothing before the
    /// partitions woken in the same executor turn as its first have joined.
    gathering: bool,
    /// The outcome of the last completed round.
    last: Option<Result<(), Rc<std::io::Error>>>,
    last_start: Option<Instant>,
    /// What the next round syncs: per storage domain, a storage of it and the directories
    /// whose file systems it syncs (in practice one domain and one directory: the data
    /// directory every log lives in).
    dirs: Vec<(Rc<dyn StorageIo>, Vec<PathBuf>)>,
    wakers: Vec<Waker>,
}

impl Rounds {
    fn in_flight(&self) -> bool {
        self.started > self.done
    }
}

thread_local! {
    static ROUNDS: RefCell<Rounds> = RefCell::default();
}

fn with_rounds<R>(f: impl FnOnce(&mut Rounds) -> R) -> R {
    let executor = glommio::executor().id();
    ROUNDS.with(|r| {
        let mut r = r.borrow_mut();
        if r.executor != executor {
            *r = Rounds {
                executor,
                ..Rounds::default()
            };
        }
        f(&mut r)
    })
}

/// Rounds completed on this shard.
#[cfg(test)]
pub(crate) fn rounds_done() -> u64 {
    with_rounds(|r| r.done)
}

/// Waits for a round that starts after this call and syncs the file system holding `dir`
/// through `io`, and returns its outcome. `clock` times the spacing between rounds.
pub(crate) async fn sync_round(
    dir: &Path,
    io: &Rc<dyn StorageIo>,
    clock: &Clock,
) -> std::io::Result<()> {
    let need = with_rounds(|r| {
        let domain = io.sync_domain();
        match r.dirs.iter_mut().find(|(i, _)| i.sync_domain() == domain) {
            Some((_, dirs)) if dirs.iter().any(|d| d == dir) => {}
            Some((_, dirs)) => dirs.push(dir.to_path_buf()),
            None => r.dirs.push((io.clone(), vec![dir.to_path_buf()])),
        }
        if r.gathering {
            r.started
        } else {
            r.started + 1
        }
    });
    let mut timer: Option<(Instant, Sleep)> = None;
    // The round this task's waker was left for: the flusher polls this future whenever it
    // wakes, and a waker is left once per round, not once per poll.
    let mut registered: Option<u64> = None;
    std::future::poll_fn(|cx| loop {
        if timer
            .as_mut()
            .is_some_and(|(_, t)| std::pin::Pin::new(t).poll(cx).is_ready())
        {
            timer = None;
        }
        let wait_until = with_rounds(|r| {
            if r.done >= need {
                return Ok(r.last.clone().expect("a completed round left its outcome"));
            }
            if !r.in_flight() {
                let now = clock.now();
                let at = r
                    .last_start
                    .map(|t| t + Duration::from_millis(ROUND_SPACING_MS));
                match at {
                    Some(at) if now < at => return Err(Some(at)),
                    _ => start_round(r, now),
                }
            }
            if registered != Some(r.started) {
                registered = Some(r.started);
                r.wakers.push(cx.waker().clone());
            }
            Err(None)
        });
        match wait_until {
            Ok(outcome) => {
                return Poll::Ready(
                    outcome.map_err(|e| std::io::Error::new(e.kind(), e.to_string())),
                )
            }
            Err(None) => return Poll::Pending,
            Err(Some(at)) => {
                if timer.as_ref().is_some_and(|(t, _)| *t == at) {
                    return Poll::Pending;
                }
                // Polled at once, so the new timer registers this task (or has already fired).
                let now = clock.now();
                timer = Some((at, clock.sleep(at.saturating_duration_since(now))));
            }
        }
    })
    .await
}

/// Starts round `started + 1`: it gathers the partitions that join until the executor comes
/// back to it, then syncs their file systems and hands the outcome to every one of them.
fn start_round(r: &mut Rounds, now: Instant) {
    r.started += 1;
    r.gathering = true;
    r.last_start = Some(now);
    let round = r.started;
    glommio::spawn_local(async move {
        // Partitions whose syncs fell due together were woken together: let them join.
        futures_lite::future::yield_now().await;
        let dirs = with_rounds(|r| {
            r.gathering = false;
            std::mem::take(&mut r.dirs)
        });
        let out = crate::contain::contain(async move {
            for (io, dirs) in dirs {
                io.sync_fs(dirs).await?;
            }
            Ok::<(), std::io::Error>(())
        })
        .await;
        let out = match out {
            Ok(r) => r,
            Err(mut p) => {
                p.mark_reported();
                Err(std::io::Error::other(format!("sync round {p}")))
            }
        };
        if let Err(e) = &out {
            crate::stats::storage_write_failed();
            tracing::error!(error = %e, "background sync of the shard's logs failed; retried in a second");
        }
        with_rounds(|r| {
            debug_assert_eq!(r.done + 1, round, "one round in flight at a time");
            r.done = round;
            r.last = Some(out.map_err(Rc::new));
            for w in r.wakers.drain(..) {
                w.wake();
            }
        });
    })
    .detach();
}
