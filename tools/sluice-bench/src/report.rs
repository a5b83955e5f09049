//! Counters and latency histograms shared by all cores, the live line printed every second, and
//! the final summary (text first, optional JSON with OpenMessaging-Benchmark-style names).
//!
//! Throughput leads: records/s and MB/s where MB = 10^6 bytes. Latencies are recorded in
//! microseconds in an HdrHistogram (3 significant digits) and printed in milliseconds.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Highest latency the histograms track; larger values are clamped (saturating record).
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("static histogram bounds are valid")
}

/// One measured stream of events: a count, a byte total, errors and a latency distribution.
pub struct Meter {
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    hist: Mutex<Histogram<u64>>,
    /// Whether anything was ever counted (decides which streams the reports show).
    seen: AtomicBool,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            hist: Mutex::new(new_hist()),
            seen: AtomicBool::new(false),
        }
    }
}

impl Meter {
    pub fn add(&self, records: u64, bytes: u64) {
        self.records.fetch_add(records, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
        self.seen.store(true, Relaxed);
    }
    pub fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
        self.seen.store(true, Relaxed);
    }
    /// Records `count` events that each took `latency_us`.
    pub fn latency(&self, latency_us: u64, count: u64) {
        if let Ok(mut h) = self.hist.lock() {
            h.saturating_record_n(latency_us.max(1), count.max(1));
        }
    }
    pub fn used(&self) -> bool {
        self.seen.load(Relaxed)
    }
    pub fn snapshot(&self) -> Histogram<u64> {
        match self.hist.lock() {
            Ok(h) => h.clone(),
            Err(_) => new_hist(),
        }
    }
    fn reset(&self) {
        self.records.store(0, Relaxed);
        self.bytes.store(0, Relaxed);
        self.errors.store(0, Relaxed);
        if let Ok(mut h) = self.hist.lock() {
            h.reset();
        }
    }
}

/// Share-group (`share-consume`) counts: what was delivered, and how each delivery was
/// acknowledged (counted when the broker confirmed the acknowledgement).
#[derive(Default)]
pub struct ShareCounts {
    /// Records delivered (acquired by a member), redeliveries included.
    pub deliveries: AtomicU64,
    /// Deliveries with a delivery count above 1.
    pub redeliveries: AtomicU64,
    /// Offsets delivered for the first time in this run, and deliveries of an offset seen before.
    pub distinct: AtomicU64,
    pub duplicates: AtomicU64,
    pub accepted: AtomicU64,
    pub released: AtomicU64,
    pub rejected: AtomicU64,
    /// Acknowledged records the broker refused (or whose session was lost).
    pub ack_errors: AtomicU64,
    /// Records acquired by holding members, never acknowledged, to measure lock expiry.
    pub held: AtomicU64,
    /// From a holding member's acquisition to the record's redelivery to another member.
    pub lock_redelivery: Meter,
}

impl ShareCounts {
    pub fn used(&self) -> bool {
        self.deliveries.load(Relaxed) > 0 || self.held.load(Relaxed) > 0
    }

    /// Accepted plus rejected: records done with (released ones come back).
    pub fn settled(&self) -> u64 {
        self.accepted.load(Relaxed) + self.rejected.load(Relaxed)
    }

    fn reset(&self) {
        for c in [
            &self.deliveries,
            &self.redeliveries,
            &self.distinct,
            &self.duplicates,
            &self.accepted,
            &self.released,
            &self.rejected,
            &self.ack_errors,
            &self.held,
        ] {
            c.store(0, Relaxed);
        }
        self.lock_redelivery.reset();
    }
}

/// Everything measured in one run.
pub struct Stats {
    pub publish: Meter,
    pub consume: Meter,
    pub end_to_end: Meter,
    /// Committed transactions: records and payload bytes they held, and EndTxn latency
    /// (request → response) of the commits.
    pub txn: Meter,
    /// From a commit's EndTxn request to the moment the coordinator accepts the next
    /// transaction's AddPartitionsToTxn: it answers CONCURRENT_TRANSACTIONS until the markers
    /// are durable and the transaction is complete, so this bounds EndTxn → markers durable
    /// from above (by the retry back-off and one coordinator log write).
    pub txn_complete: Meter,
    pub txns_committed: AtomicU64,
    pub txns_aborted: AtomicU64,
    /// `share-consume`: deliveries and acknowledgements.
    pub share: ShareCounts,
    /// False during warm-up: workers keep running but their figures are discarded.
    measuring: AtomicBool,
    /// Set when the run should end (duration elapsed, count reached, or fatal error).
    pub stop: AtomicBool,
    /// The first fatal error, reported as the run's one-line failure.
    pub fatal: Mutex<Option<String>>,
}

impl Stats {
    pub fn new(warm: bool) -> Stats {
        Stats {
            publish: Meter::default(),
            consume: Meter::default(),
            end_to_end: Meter::default(),
            txn: Meter::default(),
            txn_complete: Meter::default(),
            txns_committed: AtomicU64::new(0),
            txns_aborted: AtomicU64::new(0),
            share: ShareCounts::default(),
            measuring: AtomicBool::new(!warm),
            stop: AtomicBool::new(false),
            fatal: Mutex::new(None),
        }
    }
    pub fn measuring(&self) -> bool {
        self.measuring.load(Relaxed)
    }
    /// Ends warm-up: everything counted so far is dropped.
    pub fn start_measuring(&self) {
        self.publish.reset();
        self.consume.reset();
        self.end_to_end.reset();
        self.txn.reset();
        self.txn_complete.reset();
        self.txns_committed.store(0, Relaxed);
        self.txns_aborted.store(0, Relaxed);
        self.share.reset();
        self.measuring.store(true, Relaxed);
    }
    pub fn stopped(&self) -> bool {
        self.stop.load(Relaxed)
    }
    pub fn fail(&self, msg: String) {
        if let Ok(mut f) = self.fatal.lock() {
            if f.is_none() {
                *f = Some(msg);
            }
        }
        self.stop.store(true, Relaxed);
    }
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().ok().and_then(|f| f.clone())
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Throughput of one stream over one interval.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Rates {
    pub records_per_sec: f64,
    pub mb_per_sec: f64,
    pub errors: u64,
}

/// Latency percentiles of one interval, in ms.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub count: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        (!h.is_empty()).then(|| Percentiles {
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            count: h.len(),
        })
    }
}

/// What happened in one second of a run: the live line's figures, kept for the report's charts.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// Seconds since the run started (warm-up included).
    pub t: f64,
    pub warmup: bool,
    pub produce: Option<Rates>,
    pub consume: Option<Rates>,
    /// Ack latency of the sends answered in this interval.
    pub publish_latency: Option<Percentiles>,
    /// End-to-end latency of the records consumed in this interval.
    pub end_to_end_latency: Option<Percentiles>,
}

/// Samples the counters once per call: the change since the previous call becomes one
/// [`Sample`] of the timeline and one live line.
pub struct LiveLine {
    last: Instant,
    started: Instant,
    last_counts: [(u64, u64, u64); 2],
    /// Histograms at the previous call: an interval's latencies are the difference.
    last_hists: [Option<Histogram<u64>>; 2],
    timeline: Vec<Sample>,
}

/// One sample per second: a day-long run keeps 86,400 of them (a few MiB).
const TIMELINE_SAMPLES_MAX: usize = 86_400;

impl LiveLine {
    pub fn new() -> LiveLine {
        let now = Instant::now();
        LiveLine {
            last: now,
            started: now,
            last_counts: [(0, 0, 0); 2],
            last_hists: [None, None],
            timeline: Vec::new(),
        }
    }

    /// The histogram of what was recorded since `prev` was taken. Meters are reset when
    /// warm-up ends, so a histogram smaller than its predecessor is taken whole.
    fn interval(now: Histogram<u64>, prev: &Option<Histogram<u64>>) -> Histogram<u64> {
        match prev {
            Some(p) if p.len() <= now.len() => {
                let mut d = now.clone();
                match d.subtract(p) {
                    Ok(()) => d,
                    Err(_) => now,
                }
            }
            _ => now,
        }
    }

    /// Takes one sample and returns its live line.
    pub fn line(&mut self, stats: &Stats) -> String {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64().max(1e-9);
        self.last = now;
        let t = now.duration_since(self.started).as_secs_f64();
        let mut sample = Sample {
            t,
            warmup: !stats.measuring(),
            ..Sample::default()
        };
        let mut parts = vec![format!("[{t:>5.0}s]")];
        if sample.warmup {
            parts.push("warm-up".into());
        }
        for (i, (name, m)) in [("produce", &stats.publish), ("consume", &stats.consume)]
            .into_iter()
            .enumerate()
        {
            if !m.used() {
                continue;
            }
            let (r, b, e) = (
                m.records.load(Relaxed),
                m.bytes.load(Relaxed),
                m.errors.load(Relaxed),
            );
            let (lr, lb, le) = self.last_counts[i];
            self.last_counts[i] = (r, b, e);
            // Counters restart at zero when warm-up ends.
            let (dr, db, de) = if r < lr || b < lb || e < le {
                (r, b, e)
            } else {
                (r - lr, b - lb, e - le)
            };
            let rates = Rates {
                records_per_sec: dr as f64 / dt,
                mb_per_sec: db as f64 / dt / 1e6,
                errors: de,
            };
            let h = m.snapshot();
            let p99 = if !h.is_empty() {
                format!(" p99 {:>8.3} ms", ms(h.value_at_quantile(0.99)))
            } else {
                String::new()
            };
            parts.push(format!(
                "{name} {:>10.0} rec/s {:>8.1} MB/s{p99} err {e}",
                rates.records_per_sec, rates.mb_per_sec,
            ));
            if i == 0 {
                let prev = self.last_hists[0].replace(h.clone());
                sample.publish_latency = Percentiles::of(&Self::interval(h, &prev));
                sample.produce = Some(rates);
            } else {
                sample.consume = Some(rates);
            }
        }
        if stats.share.used() {
            let sh = &stats.share;
            parts.push(format!(
                "accepted {} released {} rejected {} redelivered {}",
                sh.accepted.load(Relaxed),
                sh.released.load(Relaxed),
                sh.rejected.load(Relaxed),
                sh.redeliveries.load(Relaxed),
            ));
        }
        let e = stats.end_to_end.snapshot();
        if !e.is_empty() {
            parts.push(format!("e2e p99 {:.3} ms", ms(e.value_at_quantile(0.99))));
            let prev = self.last_hists[1].replace(e.clone());
            sample.end_to_end_latency = Percentiles::of(&Self::interval(e, &prev));
        }
        if self.timeline.len() < TIMELINE_SAMPLES_MAX {
            self.timeline.push(sample);
        }
        parts.join(" | ")
    }

    /// The samples taken so far, one per call of [`LiveLine::line`].
    pub fn timeline(&self) -> &[Sample] {
        &self.timeline
    }
}

impl Default for LiveLine {
    fn default() -> Self {
        Self::new()
    }
}

const QUANTILES: [(&str, f64); 6] = [
    ("50pct", 0.5),
    ("75pct", 0.75),
    ("90pct", 0.9),
    ("99pct", 0.99),
    ("999pct", 0.999),
    ("9999pct", 0.9999),
];

/// The final figures of one run.
pub struct Summary {
    pub text: String,
    pub json: Value,
}

/// Builds the summary. `elapsed` is the measured time (after warm-up).
pub fn summarize(stats: &Stats, elapsed: Duration, config: Value, timeline: &[Sample]) -> Summary {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let mut text = String::new();
    let mut j = Map::new();
    j.insert("durationSeconds".into(), json!(secs));
    let streams = [
        (
            "produce",
            "publish",
            &stats.publish,
            "ack latency (from scheduled send)",
        ),
        ("consume", "consume", &stats.consume, "fetch latency"),
    ];
    for (label, key, m, what) in streams {
        if !m.used() {
            continue;
        }
        let r = m.records.load(Relaxed);
        let b = m.bytes.load(Relaxed);
        let err = m.errors.load(Relaxed);
        let rate = r as f64 / secs;
        let mbps = b as f64 / secs / 1e6;
        let of = if key == "publish" {
            "record keys+values"
        } else {
            "fetched record batches"
        };
        text.push_str(&format!(
            "{label}: {rate:.0} records/s, {mbps:.2} MB/s (MB = 10^6 bytes of {of}), {r} records, {b} bytes in {secs:.1} s, {err} errors\n"
        ));
        j.insert(format!("{key}Rate"), json!(rate));
        j.insert(format!("{key}ThroughputMBps"), json!(mbps));
        j.insert(format!("{key}Records"), json!(r));
        j.insert(format!("{key}Bytes"), json!(b));
        j.insert(format!("{key}Errors"), json!(err));
        if key == "publish" {
            let h = m.snapshot();
            if !h.is_empty() {
                text.push_str(&latency_line(&format!("{label} {what}"), &h));
                latency_json(&mut j, "publishLatency", &h);
            }
        }
    }
    if stats.txn.used() || stats.txns_aborted.load(Relaxed) > 0 {
        let committed = stats.txns_committed.load(Relaxed);
        let aborted = stats.txns_aborted.load(Relaxed);
        let r = stats.txn.records.load(Relaxed);
        let b = stats.txn.bytes.load(Relaxed);
        let (tps, rate, mbps) = (
            committed as f64 / secs,
            r as f64 / secs,
            b as f64 / secs / 1e6,
        );
        text.push_str(&format!(
            "transactions: {tps:.1} committed/s, {rate:.0} committed records/s, {mbps:.2} MB/s; {committed} committed, {aborted} aborted, {r} records committed\n"
        ));
        j.insert("transactionRate".into(), json!(tps));
        j.insert("transactionsCommitted".into(), json!(committed));
        j.insert("transactionsAborted".into(), json!(aborted));
        j.insert("committedRecords".into(), json!(r));
        j.insert("committedRate".into(), json!(rate));
        j.insert("committedThroughputMBps".into(), json!(mbps));
        let h = stats.txn.snapshot();
        if !h.is_empty() {
            text.push_str(&latency_line(
                "commit latency (EndTxn request → response)",
                &h,
            ));
            latency_json(&mut j, "commitLatency", &h);
        }
        let h = stats.txn_complete.snapshot();
        if !h.is_empty() {
            text.push_str(&latency_line(
                "commit completion (EndTxn request → next transaction accepted)",
                &h,
            ));
            latency_json(&mut j, "commitCompleteLatency", &h);
        }
    }
    if stats.share.used() {
        share_summary(&stats.share, &mut text, &mut j);
    }
    let e = stats.end_to_end.snapshot();
    if !e.is_empty() {
        text.push_str(&latency_line("end-to-end latency", &e));
        latency_json(&mut j, "endToEndLatency", &e);
    }
    if text.is_empty() {
        text.push_str("no records were sent or received\n");
    }
    j.insert("config".into(), config);
    j.insert("timeline".into(), json!(timeline));
    Summary {
        text,
        json: Value::Object(j),
    }
}

fn share_summary(sh: &ShareCounts, text: &mut String, j: &mut Map<String, Value>) {
    let get = |c: &AtomicU64| c.load(Relaxed);
    let fields = [
        ("shareDeliveries", get(&sh.deliveries)),
        ("shareRedeliveries", get(&sh.redeliveries)),
        ("shareDistinct", get(&sh.distinct)),
        ("shareDuplicates", get(&sh.duplicates)),
        ("shareAccepted", get(&sh.accepted)),
        ("shareReleased", get(&sh.released)),
        ("shareRejected", get(&sh.rejected)),
        ("shareAckErrors", get(&sh.ack_errors)),
        ("shareHeld", get(&sh.held)),
    ];
    let v: Vec<u64> = fields.iter().map(|(_, v)| *v).collect();
    text.push_str(&format!(
        "share: {} deliveries ({} distinct offsets, {} duplicates), {} redeliveries (delivery count > 1); acknowledged {} accepted, {} released, {} rejected, {} refused; {} held unacknowledged\n",
        v[0], v[2], v[3], v[1], v[4], v[5], v[6], v[7], v[8]
    ));
    for (k, v) in fields {
        j.insert(k.into(), json!(v));
    }
    let h = sh.lock_redelivery.snapshot();
    if !h.is_empty() {
        text.push_str(&latency_line(
            "lock-expiry redelivery (acquisition → delivery to another member)",
            &h,
        ));
        latency_json(j, "lockRedeliveryLatency", &h);
    }
}

fn latency_line(label: &str, h: &Histogram<u64>) -> String {
    format!(
        "{label} (ms): p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} p99.99 {:.3} max {:.3} (mean {:.3}, n={})\n",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.9)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.value_at_quantile(0.9999)),
        ms(h.max()),
        h.mean() / 1000.0,
        h.len()
    )
}

fn latency_json(j: &mut Map<String, Value>, prefix: &str, h: &Histogram<u64>) {
    j.insert(format!("{prefix}Avg"), json!(h.mean() / 1000.0));
    for (name, q) in QUANTILES {
        j.insert(format!("{prefix}{name}"), json!(ms(h.value_at_quantile(q))));
    }
    j.insert(format!("{prefix}Max"), json!(ms(h.max())));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_leads_with_throughput_and_names_fields_like_omb() {
        let s = Stats::new(false);
        s.publish.add(2000, 2_000_000);
        for us in 1..=1000u64 {
            s.publish.latency(us * 10, 2);
        }
        s.end_to_end.latency(5000, 2000);
        let sum = summarize(&s, Duration::from_secs(2), json!({}), &[]);
        let first = sum.text.lines().next().unwrap();
        assert!(
            first.starts_with("produce: 1000 records/s, 1.00 MB/s"),
            "{first}"
        );
        assert_eq!(sum.json["publishRate"], json!(1000.0));
        assert_eq!(sum.json["publishThroughputMBps"], json!(1.0));
        let p50 = sum.json["publishLatency50pct"].as_f64().unwrap();
        assert!((4.9..=5.1).contains(&p50), "{p50}");
        assert!(sum.json["publishLatency9999pct"].as_f64().unwrap() <= 10.01);
        assert_eq!(
            sum.json["endToEndLatency99pct"].as_f64().unwrap().round(),
            5.0
        );
        assert!(sum.json.get("consumeRate").is_none());
    }

    #[test]
    fn timeline_samples_hold_each_interval_not_the_running_total() {
        let s = Stats::new(false);
        let mut live = LiveLine::new();
        s.publish.add(100, 1000);
        for _ in 0..100 {
            s.publish.latency(1000, 1);
        }
        live.line(&s);
        s.publish.add(50, 500);
        for _ in 0..50 {
            s.publish.latency(9000, 1);
        }
        live.line(&s);
        let tl = live.timeline();
        assert_eq!(tl.len(), 2);
        let (a, b) = (
            tl[0].publish_latency.as_ref().unwrap(),
            tl[1].publish_latency.as_ref().unwrap(),
        );
        assert_eq!((a.count, b.count), (100, 50));
        assert!((0.99..=1.01).contains(&a.max), "{a:?}");
        // The second interval saw only 9 ms sends: its median is 9 ms, not the total's 1 ms.
        assert!((8.9..=9.1).contains(&b.p50), "{b:?}");
        assert_eq!(tl[1].produce.as_ref().unwrap().errors, 0);
        assert!(tl[0].end_to_end_latency.is_none() && tl[0].consume.is_none());

        // Warm-up ends: counters restart; the next interval counts from zero again.
        s.start_measuring();
        s.publish.add(7, 70);
        s.publish.latency(2000, 7);
        live.line(&s);
        assert_eq!(
            live.timeline()[2].publish_latency.as_ref().unwrap().count,
            7
        );
    }

    #[test]
    fn warm_up_figures_are_discarded() {
        let s = Stats::new(true);
        s.publish.add(10, 10);
        s.publish.latency(100, 10);
        assert!(!s.measuring());
        s.start_measuring();
        assert_eq!(s.publish.records.load(Relaxed), 0);
        assert_eq!(s.publish.snapshot().len(), 0);
    }
}
