//! Per-shard counters for the metrics endpoint: plain `Cell`s and hdrhistograms in a
//! thread-local, written only by the shard's own thread (no atomics, no locks, no contention on
//! the data path). The exporter never reads them from another thread: it sends each shard a job
//! through the shard's inbox, and the job copies them into a [`Snapshot`] on the shard itself.
//!
//! A leaf module: `server`, `kafka`, `shard` and `storage` record into it; `broker` reads it.
//! On a thread that is not a shard (tests, tools) the counters exist too and nobody reads them.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Request counters are kept for Kafka API keys below this (the highest key Kafka defines is
/// below 100); a request with a larger key is closed by dispatch before it is counted.
pub const API_KEY_SLOTS: usize = 128;
/// Distinct (API, error code) pairs counted per shard. Codes come from the broker's own
/// responses (about 120 exist), so this is never reached in practice; past it, new pairs are
/// counted under `ERROR_OVERFLOW_CODE`, which keeps the series count bounded.
pub const ERROR_SERIES_MAX: usize = 512;
/// The error code label used once `ERROR_SERIES_MAX` pairs exist.
pub const ERROR_OVERFLOW_CODE: i16 = i16::MIN;
/// Latencies are recorded in microseconds from 1 µs up to this (longer ones saturate here): a
/// long-polling fetch waits at most 30 s, so a minute covers every request.
const LATENCY_US_MAX: u64 = 60_000_000;
/// Two significant digits: about 1% error, a few KiB per histogram.
const LATENCY_SIGFIGS: u8 = 2;

/// Latency of one kind of operation: an hdrhistogram of microseconds plus the exact sum.
pub struct Latency {
    pub hist: Histogram<u64>,
    pub sum_us: u64,
}

impl Latency {
    fn new() -> Latency {
        Latency {
            hist: Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGFIGS)
                .expect("static histogram bounds are valid"),
            sum_us: 0,
        }
    }

    fn record(&mut self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, LATENCY_US_MAX);
        self.hist.saturating_record(us);
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// Prometheus histogram view: cumulative counts at each bound (in seconds), count, sum.
    pub fn buckets(&self, bounds_s: &[f64]) -> HistogramSnapshot {
        let cumulative = bounds_s
            .iter()
            .map(|b| {
                let us = (b * 1e6) as u64;
                if us == 0 {
                    0
                } else {
                    self.hist.count_between(0, us)
                }
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            count: self.hist.len(),
            sum_s: self.sum_us as f64 / 1e6,
        }
    }
}

/// A histogram as exported: cumulative bucket counts (one per bound), total count, sum.
#[derive(Debug, Clone, Default)]
pub struct HistogramSnapshot {
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_s: f64,
}

/// The stages of a produce request's time in the broker, each with its own histogram, so that
/// an end-to-end tail measured by a client can be attributed: queueing before the handler runs,
/// the handler's own work up to the append (decode, validation, partition lookup), waiting for
/// admission to the log, waiting for the write (acks=1) or the sync (acks=all), and waiting for
/// the response to be written (behind the connection's earlier responses, then the send).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProduceStage {
    /// From the request's whole frame to its handler starting.
    Queued = 0,
    /// From the handler starting to the append being submitted to the partition's log.
    Handler = 1,
    /// Waiting for the log to admit the append (its turn, a roll, the pending-bytes limit).
    Admit = 2,
    /// From the append being accepted to the durability acks asked for (write or sync).
    Durable = 3,
    /// From the response being ready to it being written to the socket.
    Respond = 4,
}

/// Every produce stage with its label on the metrics endpoint, in stage order.
pub const PRODUCE_STAGES: [(ProduceStage, &str); 5] = [
    (ProduceStage::Queued, "queued"),
    (ProduceStage::Handler, "handler"),
    (ProduceStage::Admit, "admit"),
    (ProduceStage::Durable, "durable"),
    (ProduceStage::Respond, "respond"),
];

/// The stages of a long-polling fetch's time in the broker after the data it waited for
/// arrived, so that the consumer side of an end-to-end tail can be attributed too: from the
/// append making the data readable (the high watermark moving past the fetch's position) to the
/// fetch re-reading, the re-read itself, and waiting for the response to be written. Fetches
/// answered without waiting (data already there) record only `Respond`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchStage {
    /// From the data becoming readable to the waiting fetch starting its re-read (the wake-up
    /// of the waiter on the partition's shard and, across shards, the hop back).
    Woken = 0,
    /// The re-read of every partition of the fetch after the wake-up.
    Read = 1,
    /// From the response being ready to it being written to the socket.
    Respond = 2,
}

/// Every fetch stage with its label on the metrics endpoint, in stage order.
pub const FETCH_STAGES: [(FetchStage, &str); 3] = [
    (FetchStage::Woken, "woken"),
    (FetchStage::Read, "read"),
    (FetchStage::Respond, "respond"),
];

/// Requests of one API on this shard.
#[derive(Default)]
struct ApiStats {
    latency: Option<Box<Latency>>,
}

/// Every counter of one shard.
#[derive(Default)]
struct Counters {
    connections_accepted: Cell<u64>,
    connections_rejected: Cell<u64>,
    connections_open: Cell<u64>,
    bytes_in: Cell<u64>,
    bytes_out: Cell<u64>,
    hops_sent: Cell<u64>,
    hops_received: Cell<u64>,
    requests_closed: Cell<u64>,
    request_buffer_regrowths: Cell<u64>,
    request_bytes_regrown: Cell<u64>,
    produce_bytes_copied: Cell<u64>,
    apis: RefCell<Vec<ApiStats>>,
    errors: RefCell<BTreeMap<(i16, i16), u64>>,
    fsyncs: RefCell<Option<Box<Latency>>>,
    produce_stages: RefCell<[Option<Box<Latency>>; PRODUCE_STAGES.len()]>,
    fetch_stages: RefCell<[Option<Box<Latency>>; FETCH_STAGES.len()]>,
    durable_writes: RefCell<Option<Box<Latency>>>,
    storage_bytes_written: Cell<u64>,
    storage_write_errors: Cell<u64>,
    cleaner_passes: Cell<u64>,
    cleaner_bytes_read: Cell<u64>,
    cleaner_bytes_written: Cell<u64>,
    share_delivery_time_invalid: Cell<u64>,
    dead_lettered: Cell<u64>,
    dead_letter_failures: Cell<u64>,
}

thread_local! {
    static COUNTERS: Counters = Counters::default();
}

/// Records `took` in a histogram made on first use.
fn record(slot: &mut Option<Box<Latency>>, took: Duration) {
    slot.get_or_insert_with(|| Box::new(Latency::new()))
        .record(took)
}

fn add(c: &Cell<u64>, n: u64) {
    c.set(c.get().wrapping_add(n));
}

/// A connection was accepted on this shard.
pub fn connection_opened() {
    COUNTERS.with(|c| {
        add(&c.connections_accepted, 1);
        add(&c.connections_open, 1);
    });
}

/// A connection of this shard ended.
pub fn connection_closed() {
    COUNTERS.with(|c| {
        c.connections_open
            .set(c.connections_open.get().saturating_sub(1))
    });
}

/// A connection was refused at `connections_max`.
pub fn connection_rejected() {
    COUNTERS.with(|c| add(&c.connections_rejected, 1));
}

pub fn bytes_in(n: usize) {
    COUNTERS.with(|c| add(&c.bytes_in, n as u64));
}

pub fn bytes_out(n: usize) {
    COUNTERS.with(|c| add(&c.bytes_out, n as u64));
}

/// A cross-shard call left this shard.
pub fn hop_sent() {
    COUNTERS.with(|c| add(&c.hops_sent, 1));
}

/// A cross-shard call arrived in this shard's inbox.
pub fn hop_received() {
    COUNTERS.with(|c| add(&c.hops_received, 1));
}

/// A request of `api_key` was handled in `took` (from its whole frame to its response).
pub fn request_done(api_key: i16, took: Duration) {
    let Ok(slot) = usize::try_from(api_key) else {
        return;
    };
    if slot >= API_KEY_SLOTS {
        return;
    }
    COUNTERS.with(|c| {
        let mut apis = c.apis.borrow_mut();
        if apis.len() <= slot {
            apis.resize_with(slot + 1, ApiStats::default);
        }
        record(&mut apis[slot].latency, took);
    });
}

/// A response of `api_key` carried error `code` (per partition, or for the whole request).
pub fn request_error(api_key: i16, code: i16) {
    if code == 0 {
        return;
    }
    COUNTERS.with(|c| {
        let mut errors = c.errors.borrow_mut();
        let key = if errors.len() >= ERROR_SERIES_MAX && !errors.contains_key(&(api_key, code)) {
            (api_key, ERROR_OVERFLOW_CODE)
        } else {
            (api_key, code)
        };
        *errors.entry(key).or_insert(0) += 1;
    });
}

/// A request was answered by closing its connection (malformed, unsupported, failed acks=0).
pub fn request_closed() {
    COUNTERS.with(|c| add(&c.requests_closed, 1));
}

/// A request frame outgrew the connection's read buffer: the `n` bytes of it already read were
/// copied into a larger one.
pub fn request_buffer_regrown(n: usize) {
    COUNTERS.with(|c| {
        add(&c.request_buffer_regrowths, 1);
        add(&c.request_bytes_regrown, n as u64);
    });
}

/// A produce handler copied `n` bytes of batches out of a request frame that other parts of the
/// request still shared.
pub fn produce_bytes_copied(n: usize) {
    COUNTERS.with(|c| add(&c.produce_bytes_copied, n as u64));
}

/// One fdatasync of a segment completed in `took`.
pub fn fsync_done(took: Duration) {
    COUNTERS.with(|c| record(&mut c.fsyncs.borrow_mut(), took));
}

/// A produce request spent `took` in `stage`.
pub fn produce_stage(stage: ProduceStage, took: Duration) {
    COUNTERS.with(|c| record(&mut c.produce_stages.borrow_mut()[stage as usize], took));
}

/// A fetch spent `took` in `stage`.
pub fn fetch_stage(stage: FetchStage, took: Duration) {
    COUNTERS.with(|c| record(&mut c.fetch_stages.borrow_mut()[stage as usize], took));
}

/// One group commit written with durable (`O_DSYNC`) writes completed in `took`.
pub fn durable_write_done(took: Duration) {
    COUNTERS.with(|c| record(&mut c.durable_writes.borrow_mut(), took));
}

/// `n` bytes of segment data were written.
pub fn storage_written(n: u64) {
    COUNTERS.with(|c| add(&c.storage_bytes_written, n));
}

/// A segment write or fdatasync failed.
pub fn storage_write_failed() {
    COUNTERS.with(|c| add(&c.storage_write_errors, 1));
}

/// A log-cleaner pass read `read` bytes (mapped and rewritten) and wrote `written`.
pub fn log_cleaned(read: u64, written: u64) {
    COUNTERS.with(|c| {
        add(&c.cleaner_passes, 1);
        add(&c.cleaner_bytes_read, read);
        add(&c.cleaner_bytes_written, written);
    });
}

/// A share acquisition read a malformed delivery-time header (the record is delivered at once).
pub fn share_delivery_time_invalid() {
    COUNTERS.with(|c| add(&c.share_delivery_time_invalid, 1));
}

/// `n` records of share groups reached their dead-letter topic.
pub fn dead_lettered(n: u64) {
    COUNTERS.with(|c| add(&c.dead_lettered, n));
}

/// `n` records of share groups could not be dead-lettered (they stay archived).
pub fn dead_letter_failed(n: u64) {
    COUNTERS.with(|c| add(&c.dead_letter_failures, n));
}

/// The calling thread's counters, copied; histograms as Prometheus buckets at `bounds_s`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub connections_accepted: u64,
    pub connections_rejected: u64,
    pub connections_open: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub hops_sent: u64,
    pub hops_received: u64,
    pub requests_closed: u64,
    pub request_buffer_regrowths: u64,
    pub request_bytes_regrown: u64,
    pub produce_bytes_copied: u64,
    /// (API key, latency) for every API that saw a request.
    pub requests: Vec<(i16, HistogramSnapshot)>,
    /// ((API key, error code), count).
    pub errors: Vec<((i16, i16), u64)>,
    pub fsync: HistogramSnapshot,
    /// One histogram per [`PRODUCE_STAGES`] entry, in its order.
    pub produce_stages: Vec<HistogramSnapshot>,
    /// One histogram per [`FETCH_STAGES`] entry, in its order.
    pub fetch_stages: Vec<HistogramSnapshot>,
    pub durable_write: HistogramSnapshot,
    pub storage_bytes_written: u64,
    pub storage_write_errors: u64,
    pub cleaner_passes: u64,
    pub cleaner_bytes_read: u64,
    pub cleaner_bytes_written: u64,
    pub share_delivery_time_invalid: u64,
    pub dead_lettered: u64,
    pub dead_letter_failures: u64,
}

/// Copies the calling thread's counters.
pub fn snapshot(bounds_s: &[f64]) -> Snapshot {
    COUNTERS.with(|c| {
        let buckets = |l: Option<&Latency>| {
            l.map(|l| l.buckets(bounds_s))
                .unwrap_or_else(|| HistogramSnapshot {
                    cumulative: vec![0; bounds_s.len()],
                    ..Default::default()
                })
        };
        let hist = |l: &RefCell<Option<Box<Latency>>>| buckets(l.borrow().as_deref());
        let each = |ls: &[Option<Box<Latency>>]| ls.iter().map(|l| buckets(l.as_deref())).collect();
        Snapshot {
            connections_accepted: c.connections_accepted.get(),
            connections_rejected: c.connections_rejected.get(),
            connections_open: c.connections_open.get(),
            bytes_in: c.bytes_in.get(),
            bytes_out: c.bytes_out.get(),
            hops_sent: c.hops_sent.get(),
            hops_received: c.hops_received.get(),
            requests_closed: c.requests_closed.get(),
            request_buffer_regrowths: c.request_buffer_regrowths.get(),
            request_bytes_regrown: c.request_bytes_regrown.get(),
            produce_bytes_copied: c.produce_bytes_copied.get(),
            requests: c
                .apis
                .borrow()
                .iter()
                .enumerate()
                .filter_map(|(k, a)| Some((k as i16, a.latency.as_ref()?.buckets(bounds_s))))
                .collect(),
            errors: c.errors.borrow().iter().map(|(k, v)| (*k, *v)).collect(),
            fsync: hist(&c.fsyncs),
            produce_stages: each(&*c.produce_stages.borrow()),
            fetch_stages: each(&*c.fetch_stages.borrow()),
            durable_write: hist(&c.durable_writes),
            storage_bytes_written: c.storage_bytes_written.get(),
            storage_write_errors: c.storage_write_errors.get(),
            cleaner_passes: c.cleaner_passes.get(),
            cleaner_bytes_read: c.cleaner_bytes_read.get(),
            cleaner_bytes_written: c.cleaner_bytes_written.get(),
            share_delivery_time_invalid: c.share_delivery_time_invalid.get(),
            dead_lettered: c.dead_lettered.get(),
            dead_letter_failures: c.dead_letter_failures.get(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_errors_bounded() {
        request_done(0, Duration::from_micros(50));
        request_done(0, Duration::from_millis(3));
        request_done(0, Duration::from_secs(2));
        request_done(i16::MAX, Duration::from_secs(1)); // beyond the slots: ignored
        request_done(-1, Duration::from_secs(1));
        let s = snapshot(&[0.0001, 0.005, 1.0, 10.0]);
        let (api, h) = &s.requests[0];
        assert_eq!(*api, 0);
        assert_eq!(h.cumulative, vec![1, 2, 2, 3]);
        assert_eq!(h.count, 3);
        assert!((h.sum_s - 2.00305).abs() < 1e-3, "{}", h.sum_s);
        assert_eq!(s.requests.len(), 1);

        for code in 1..=(ERROR_SERIES_MAX as i16 + 10) {
            request_error(1, code);
        }
        request_error(1, 0); // NONE is not an error
        let s = snapshot(&[]);
        assert_eq!(s.errors.len(), ERROR_SERIES_MAX + 1);
        let overflow: u64 = s
            .errors
            .iter()
            .filter(|((_, c), _)| *c == ERROR_OVERFLOW_CODE)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(overflow, 10);
    }

    #[test]
    fn produce_stages_are_kept_apart() {
        produce_stage(ProduceStage::Durable, Duration::from_millis(2));
        produce_stage(ProduceStage::Durable, Duration::from_millis(4));
        produce_stage(ProduceStage::Respond, Duration::from_micros(20));
        let s = snapshot(&[0.001]);
        assert_eq!(s.produce_stages.len(), PRODUCE_STAGES.len());
        for (i, (stage, _)) in PRODUCE_STAGES.iter().enumerate() {
            assert_eq!(*stage as usize, i, "PRODUCE_STAGES is in stage order");
        }
        let count = |st: ProduceStage| s.produce_stages[st as usize].count;
        assert_eq!(count(ProduceStage::Durable), 2);
        assert_eq!(count(ProduceStage::Respond), 1);
        assert_eq!(count(ProduceStage::Queued), 0);
        assert_eq!(
            s.produce_stages[ProduceStage::Respond as usize].cumulative,
            vec![1]
        );
    }

    #[test]
    fn fetch_stages_are_kept_apart_from_each_other_and_from_produce_stages() {
        fetch_stage(FetchStage::Woken, Duration::from_micros(300));
        fetch_stage(FetchStage::Read, Duration::from_millis(3));
        fetch_stage(FetchStage::Read, Duration::from_micros(10));
        let s = snapshot(&[0.001]);
        assert_eq!(s.fetch_stages.len(), FETCH_STAGES.len());
        for (i, (stage, _)) in FETCH_STAGES.iter().enumerate() {
            assert_eq!(*stage as usize, i, "FETCH_STAGES is in stage order");
        }
        let count = |st: FetchStage| s.fetch_stages[st as usize].count;
        assert_eq!(count(FetchStage::Woken), 1);
        assert_eq!(count(FetchStage::Read), 2);
        assert_eq!(count(FetchStage::Respond), 0);
        // One of the two reads took under 1 ms.
        assert_eq!(
            s.fetch_stages[FetchStage::Read as usize].cumulative,
            vec![1]
        );
        assert!(s.produce_stages.iter().all(|h| h.count == 0));
    }
}
