//! Fault injection for tests: named panic points the broker passes through, armed for one key
//! (a topic or group name) by `SLUICE_FAULT_PANIC=<point>:<key>` in the broker's environment,
//! read once at start-up ([`init`]). Knows nothing of Kafka: callers name the point and the key.
//!
//! Compiled in only for debug builds or with the `fault-injection` feature; otherwise every
//! function here is an empty inline function and release builds carry no cost.
//!
//! Points (see their call sites): `produce_request` (the Produce request task, before it spawns
//! per-partition work), `produce_partition` (a per-partition produce task), `fetch_wait` (a fetch
//! long-poll waiter task), `cross_shard` (a closure run on a partition's owner shard when that is
//! not the caller's shard), `group` (a group-coordinator call on the group's shard), `flusher` (a
//! partition's flusher task, keyed by the partition's directory name, `<topic>-<partition>`),
//! `dlq_append` and `dlq_appended` (a share group's dead-letter drain, keyed by the group: after
//! the attempt is persisted and before the dead-letter append, and after the append before it
//! is recorded as done).
//!
//! Delay points, armed by `SLUICE_FAULT_DELAY_MS=<point>:<ms>`, block the calling thread for
//! that long (or, with `SLUICE_FAULT_RELEASE=<path>` also set, until that file exists, at most
//! that long: the test releases the stall when it has seen what it waits for, so no test
//! depends on how fast the machine answers within a fixed stall) to widen a window a test
//! wants to hit: `producer_id_block` (a producer-id block is
//! written but not yet renamed into place), `index_append` (an append to a segment's index files,
//! on the blocking thread pool: the shard keeps serving meanwhile), `log_open` (the file work of
//! opening or creating a partition log, on the blocking thread pool; keyed by the partition's
//! directory name, `<topic>-<partition>`, with `SLUICE_FAULT_DELAY_MS=<point>:<ms>:<key>`),
//! `truncate_files` (a truncation's rewrite of the cut log's small files, on the blocking thread
//! pool), `epoch_checkpoint` (after the leader-epoch checkpoint an append that begins a new
//! leader epoch writes, on the blocking thread pool, before the append is accepted; keyed like
//! `log_open`), `hard_state` (a replica's raft hard state written after a change of term or
//! vote, on the blocking thread pool, before the messages that depend on it are sent), `metadata_log` (a single node's metadata log
//! append, on the blocking thread pool; keyed by the topic the record names). Async delay points ([`delay_of`]) make the calling
//! task wait instead, the shard serving everything else meanwhile: `coordinator_load` (a group
//! coordinator that won a `__consumer_offsets` partition's election, before it replays it),
//! `replica_start` (a partition's log is open but its raft group not started yet; keyed by the
//! partition's directory name, `<topic>-<partition>`, with `SLUICE_FAULT_DELAY_MS=<point>:<ms>:<key>`;
//! without a key every partition waits).

/// The environment variable that arms a panic point.
pub const PANIC_ENV: &str = "SLUICE_FAULT_PANIC";
/// The environment variable that arms a delay point.
pub const DELAY_ENV: &str = "SLUICE_FAULT_DELAY_MS";
/// The environment variable naming a file whose creation ends a blocking delay point's stall.
pub const RELEASE_ENV: &str = "SLUICE_FAULT_RELEASE";

#[cfg(any(debug_assertions, feature = "fault-injection"))]
mod armed {
    use std::sync::OnceLock;

    /// `(point, key)` when armed.
    static PANIC_AT: OnceLock<Option<(String, String)>> = OnceLock::new();
    /// `(point, ms, key)` when armed.
    static DELAY_AT: OnceLock<Option<(String, u64, Option<String>)>> = OnceLock::new();
    /// The file whose existence ends a blocking stall early.
    static RELEASE_AT: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    /// How often a blocking stall with a release file looks for it.
    const RELEASE_POLL: std::time::Duration = std::time::Duration::from_millis(5);

    /// Blocks the calling thread for `d`, or until the release file exists when one is named.
    fn stall(d: std::time::Duration) {
        let Some(Some(release)) = RELEASE_AT.get() else {
            std::thread::sleep(d);
            return;
        };
        let until = std::time::Instant::now() + d;
        while !release.exists() {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(RELEASE_POLL));
        }
    }

    pub fn init() {
        RELEASE_AT.get_or_init(|| std::env::var_os(super::RELEASE_ENV).map(Into::into));
        DELAY_AT.get_or_init(|| {
            let v = std::env::var(super::DELAY_ENV).ok()?;
            let (point, rest) = v.split_once(':')?;
            let (ms, key) = match rest.split_once(':') {
                Some((ms, key)) => (ms, Some(key.to_string())),
                None => (rest, None),
            };
            let ms = ms.parse().ok()?;
            tracing::warn!(
                point,
                ms,
                "fault injection armed: this broker will stall on purpose"
            );
            Some((point.to_string(), ms, key))
        });
        PANIC_AT.get_or_init(|| {
            let v = std::env::var(super::PANIC_ENV).ok()?;
            let (point, key) = v.split_once(':')?;
            tracing::warn!(
                point,
                key,
                "fault injection armed: this broker will panic on purpose"
            );
            Some((point.to_string(), key.to_string()))
        });
    }

    #[track_caller]
    pub fn panic_point(point: &str, key: &str) {
        if let Some(Some((p, k))) = PANIC_AT.get() {
            if p == point && k == key {
                panic!("fault injection: panic point {point} for {key}");
            }
        }
    }

    /// Blocks the calling thread when this delay point is armed.
    pub fn delay_point(point: &str) {
        if let Some(Some((p, ms, _))) = DELAY_AT.get() {
            if p == point {
                stall(std::time::Duration::from_millis(*ms));
            }
        }
    }

    /// Blocks the calling thread when this delay point is armed without a key, or for `key`.
    pub fn delay_point_for(point: &str, key: &str) {
        if let Some(d) = delay_for(point, key) {
            stall(d);
        }
    }

    /// How long a task should wait at this async delay point, when it is armed.
    pub fn delay_of(point: &str) -> Option<std::time::Duration> {
        match DELAY_AT.get() {
            Some(Some((p, ms, _))) if p == point => Some(std::time::Duration::from_millis(*ms)),
            _ => None,
        }
    }

    /// [`delay_of`] for `key`: armed without a key, or for this one.
    pub fn delay_for(point: &str, key: &str) -> Option<std::time::Duration> {
        match DELAY_AT.get() {
            Some(Some((p, ms, k))) if p == point && k.as_deref().is_none_or(|k| k == key) => {
                Some(std::time::Duration::from_millis(*ms))
            }
            _ => None,
        }
    }
}

#[cfg(any(debug_assertions, feature = "fault-injection"))]
pub use armed::{delay_for, delay_of, delay_point, delay_point_for, init, panic_point};

/// Reads [`PANIC_ENV`] (release build without `fault-injection`: nothing to read).
#[cfg(not(any(debug_assertions, feature = "fault-injection")))]
#[inline(always)]
pub fn init() {}

/// Panics when the broker was started with this point armed for `key` (release build without
/// `fault-injection`: never).
#[cfg(not(any(debug_assertions, feature = "fault-injection")))]
#[inline(always)]
pub fn panic_point(_point: &str, _key: &str) {}

/// Blocks the calling thread when the broker was started with this delay point armed (release
/// build without `fault-injection`: never).
#[cfg(not(any(debug_assertions, feature = "fault-injection")))]
#[inline(always)]
pub fn delay_point(_point: &str) {}

/// Blocks the calling thread when the broker was started with this delay point armed for `key`
/// (release build without `fault-injection`: never).
#[cfg(not(any(debug_assertions, feature = "fault-injection")))]
#[inline(always)]
pub fn delay_point_for(_point: &str, _key: &str) {}

/// How long a task should wait at this async delay point (release build without
/// `fault-injection`: never).
#[cfg(not(any(debug_assertions, feature = "fault-injection")))]
#[inline(always)]
pub fn delay_of(_point: &str) -> Option<std::time::Duration> {
    None
}

/// How long a task should wait at this async delay point for `key` (release build without
/// `fault-injection`: never).
#[cfg(not(any(debug_assertions, feature = "fault-injection")))]
#[inline(always)]
pub fn delay_for(_point: &str, _key: &str) -> Option<std::time::Duration> {
    None
}
