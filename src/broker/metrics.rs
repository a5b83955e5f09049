//! The Prometheus endpoint (`--metrics-listen`): `GET /metrics` in the text exposition format.
//!
//! Served by its own threads, off the shards: one thread accepts, and each connection (at most
//! `CONNECTIONS_MAX` at once) gets a thread with a deadline for the whole exchange, so a client
//! that sends garbage, huge headers or trickles bytes costs one slot until its deadline and never
//! a shard's time. A scrape asks every shard for its numbers by queueing one job on its inbox
//! (`BrokerContext::try_send_job`, which never waits); the job runs on the shard, copies the
//! shard's counters (`crate::stats`, plain thread-local cells its own code bumps), its
//! partitions' offsets and sizes, its batch cache and its groups, and sends the copy back. A shard
//! that does not answer within `SHARD_ANSWER_WAIT` is reported with `sluice_shard_scrape_ok 0`.
//! Nothing is computed on the data path for metrics except those counter bumps and two clock
//! reads per request; with nobody scraping, nothing else runs.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::group::GroupState;
use crate::shard::{self, BrokerContext, Job};
use crate::stats;
use crate::types::ShardId;

/// Metrics connections served at once; more are closed at accept. Each costs a thread with a
/// small stack for at most `EXCHANGE_DEADLINE`.
const CONNECTIONS_MAX: usize = 16;
/// A connection must deliver its request head and take the response within this, in total (a
/// client that trickles bytes is cut off here however slowly it sends).
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(5);
/// Largest request head (request line and headers) read; a longer one gets 431 and is closed.
const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// How long a scrape waits for each shard's answer.
const SHARD_ANSWER_WAIT: Duration = Duration::from_secs(2);
/// Per-partition series (offsets, sizes) in one scrape; past it, partitions are left out of the
/// per-partition families (the per-shard storage totals still count them) and
/// `sluice_metrics_series_dropped` says how many.
const PARTITION_SERIES_MAX: usize = 10_000;
/// Per-(group, partition) series (committed offset, lag) in one scrape; past it, likewise.
const GROUP_OFFSET_SERIES_MAX: usize = 10_000;
/// Partitions a shard's scrape job looks at before yielding to the shard's other tasks.
const PARTITIONS_PER_YIELD: usize = 256;
/// Stack of each metrics thread: it holds a request head and renders text into the heap.
const THREAD_STACK_BYTES: usize = 256 * 1024;

/// Request latency histogram bounds, in seconds.
const LATENCY_BOUNDS_S: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Binds `addr` and serves the endpoint from background threads for the life of the process.
/// Returns the bound address (the port is chosen by the kernel when `addr` has port 0).
pub fn start(broker: Arc<BrokerContext>, addr: SocketAddr) -> Result<SocketAddr, String> {
    let listener =
        TcpListener::bind(addr).map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("sluice-metrics".into())
        .stack_size(THREAD_STACK_BYTES)
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else {
                    // Out of descriptors, usually: back off rather than spin.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                if active.fetch_add(1, Ordering::SeqCst) >= CONNECTIONS_MAX {
                    active.fetch_sub(1, Ordering::SeqCst);
                    tracing::debug!(
                        connections_max = CONNECTIONS_MAX,
                        "metrics connection limit reached; closing new connection"
                    );
                    continue;
                }
                let (broker, active2) = (broker.clone(), active.clone());
                let spawned = std::thread::Builder::new()
                    .name("sluice-metrics-conn".into())
                    .stack_size(THREAD_STACK_BYTES)
                    .spawn(move || {
                        serve(conn, &broker, started);
                        active2.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })
        .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
    Ok(bound)
}

/// One HTTP/1.x exchange: reads the request head within the deadline, answers, closes.
fn serve(mut conn: TcpStream, broker: &BrokerContext, started: f64) {
    let deadline = Instant::now() + EXCHANGE_DEADLINE;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let complete = loop {
        if find_head_end(&head).is_some() {
            break true;
        }
        if head.len() >= REQUEST_HEAD_BYTES_MAX {
            respond(
                &mut conn,
                deadline,
                "431 Request Header Fields Too Large",
                "",
            );
            drain(&mut conn, deadline);
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            break false;
        }
        let room = (REQUEST_HEAD_BYTES_MAX - head.len()).min(chunk.len());
        match conn.read(&mut chunk[..room]) {
            Ok(0) | Err(_) => break false,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    };
    if !complete {
        return; // closed, timed out or failed before a whole request head: nothing to answer
    }
    let line_end = head.iter().position(|&b| b == b'\r' || b == b'\n');
    let line = std::str::from_utf8(&head[..line_end.unwrap_or(head.len())]).unwrap_or("");
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let valid = matches!(version, Some(v) if v.starts_with("HTTP/1.")) && parts.next().is_none();
    match (valid, method, target) {
        (false, _, _) => {
            respond(&mut conn, deadline, "400 Bad Request", "");
            drain(&mut conn, deadline);
        }
        (true, Some("GET"), Some(t)) if t == "/metrics" || t.starts_with("/metrics?") => {
            let body = render(broker, started);
            respond(&mut conn, deadline, "200 OK", &body);
        }
        (true, Some("GET"), _) => respond(&mut conn, deadline, "404 Not Found", ""),
        (true, _, _) => respond(&mut conn, deadline, "405 Method Not Allowed", ""),
    }
}

/// Reads and drops what the client still sends, until it closes or the deadline: closing a
/// socket with unread bytes makes the kernel reset it, and the client could lose the answer.
fn drain(conn: &mut TcpStream, deadline: Instant) {
    let mut sink = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match conn.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// End of the request head (`\r\n\r\n` or a bare `\n\n`).
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n"))
}

fn respond(conn: &mut TcpStream, deadline: Instant, status: &str, body: &str) {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() || conn.set_write_timeout(Some(left)).is_err() {
        return;
    }
    let content_type = if status.starts_with("200") {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn
        .write_all(head.as_bytes())
        .and_then(|_| conn.write_all(body.as_bytes()));
    let _ = conn.shutdown(std::net::Shutdown::Write);
}

// ------------------------------------------------------------------------------ collection

/// One partition of one shard.
struct PartitionRow {
    topic: String,
    partition: i32,
    log_start: i64,
    log_end: i64,
    high_watermark: i64,
    segments: usize,
    bytes: u64,
}

/// One group of one shard's coordinator.
struct GroupRow {
    id: String,
    state: GroupState,
    members: usize,
    /// (topic, partition, committed offset).
    offsets: Vec<(String, i32, i64)>,
}

/// What one shard answers a scrape.
struct ShardScrape {
    counters: stats::Snapshot,
    /// Time spent running tasks since the executor started.
    busy: Duration,
    /// Busy time over wall time since the previous scrape (0 on the first).
    busy_ratio: f64,
    tasks_executed: u64,
    /// From the scrape's request to its job starting on the shard.
    queue_delay: Duration,
    cache: crate::storage::cache::CacheStats,
    cache_bytes_max: usize,
    segments: u64,
    segment_bytes: u64,
    readahead_used: u64,
    partitions: Vec<PartitionRow>,
    groups: Vec<GroupRow>,
    /// The shard's partition transport counters (in a cluster).
    transport: Option<sluice_raft::transport::TransportStats>,
}

std::thread_local! {
    /// This shard's executor busy time so far and when the last scrape read it (glommio hands
    /// out its counters as deltas since the previous read).
    static BUSY: std::cell::Cell<(Duration, u64, Option<Instant>)> =
        const { std::cell::Cell::new((Duration::ZERO, 0, None)) };
}

/// Runs on a shard: copies what it has.
async fn collect_here(asked: Instant) -> ShardScrape {
    let queue_delay = asked.elapsed();
    let ex = glommio::executor().executor_stats();
    let (busy, tasks, last) = BUSY.with(|b| b.get());
    let now = Instant::now();
    let busy_now = busy + ex.executor_runtime();
    let tasks_now = tasks + ex.tasks_executed();
    let busy_ratio = match last {
        Some(t) if now > t => {
            (ex.executor_runtime().as_secs_f64() / (now - t).as_secs_f64()).clamp(0.0, 1.0)
        }
        _ => 0.0,
    };
    BUSY.with(|b| b.set((busy_now, tasks_now, Some(now))));

    let here = shard::local();
    let logs: Vec<_> = here
        .partitions
        .borrow()
        .iter()
        .map(|(tp, log)| (tp.clone(), log.clone()))
        .collect();
    let mut partitions = Vec::with_capacity(logs.len().min(PARTITION_SERIES_MAX));
    let (mut segments, mut segment_bytes, mut readahead_used) = (0u64, 0u64, 0u64);
    for (i, (tp, log)) in logs.into_iter().enumerate() {
        if i % PARTITIONS_PER_YIELD == PARTITIONS_PER_YIELD - 1 {
            glommio::yield_if_needed().await;
        }
        let row = PartitionRow {
            topic: tp.topic,
            partition: tp.partition,
            log_start: log.log_start_offset().0,
            log_end: log.log_end_offset().0,
            high_watermark: log.high_watermark().0,
            segments: log.segment_count(),
            bytes: log.size_bytes(),
        };
        segments += row.segments as u64;
        segment_bytes += row.bytes;
        readahead_used += log.readahead_used();
        partitions.push(row);
    }
    let groups = match crate::group::local() {
        None => vec![],
        Some(g) => g
            .coordinator
            .borrow()
            .groups()
            .filter(|g| g.state != GroupState::Dead)
            .map(|g| GroupRow {
                id: g.id.clone(),
                state: g.state,
                members: g.members.len(),
                offsets: g
                    .offsets
                    .iter()
                    .map(|((t, p), v)| (t.clone(), *p, v.offset))
                    .collect(),
            })
            .collect(),
    };
    let transport = here.transport.borrow().as_ref().map(|t| t.stats());
    ShardScrape {
        counters: stats::snapshot(LATENCY_BOUNDS_S),
        busy: busy_now,
        busy_ratio,
        tasks_executed: tasks_now,
        queue_delay,
        cache: here.cache.stats(),
        cache_bytes_max: here.cache.bytes_max,
        segments,
        segment_bytes,
        readahead_used,
        partitions,
        groups,
        transport,
    }
}

/// Asks every shard (without waiting on a full inbox) and collects the answers in shard order.
fn collect(broker: &BrokerContext) -> Vec<Option<ShardScrape>> {
    let n = broker.shard_count();
    let mut replies = Vec::with_capacity(n);
    for s in 0..n {
        let (tx, rx) = mpsc::sync_channel::<ShardScrape>(1);
        let asked = Instant::now();
        let job: Job = Box::new(move || {
            Box::pin(async move {
                let _ = tx.try_send(collect_here(asked).await);
            })
        });
        replies.push(broker.try_send_job(ShardId(s), job).then_some(rx));
    }
    let deadline = Instant::now() + SHARD_ANSWER_WAIT;
    replies
        .into_iter()
        .map(|rx| {
            rx?.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .ok()
        })
        .collect()
}

// ------------------------------------------------------------------------------ rendering

/// The text exposition format, one family at a time.
struct Text {
    out: String,
}

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        if value.is_finite() && value == value.trunc() && value.abs() < 1e15 {
            let _ = writeln!(self.out, " {}", value as i64);
        } else {
            let _ = writeln!(self.out, " {value}");
        }
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &stats::HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        for (bound, count) in LATENCY_BOUNDS_S.iter().zip(&h.cumulative) {
            let le = bound.to_string();
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, *count as f64);
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        self.sample(&bucket, &l, h.count as f64);
        self.sample(&format!("{name}_sum"), labels, h.sum_s);
        self.sample(&format!("{name}_count"), labels, h.count as f64);
    }
}

fn api_name(key: i16) -> String {
    kafka_protocol::messages::ApiKey::try_from(key)
        .map(|k| format!("{k:?}"))
        .unwrap_or_else(|_| key.to_string())
}

fn error_name(code: i16) -> String {
    if code == stats::ERROR_OVERFLOW_CODE {
        return "other".into();
    }
    kafka_protocol::ResponseError::try_from_code(code)
        .map(|e| format!("{e:?}"))
        .unwrap_or_else(|| "unknown".into())
}

/// Per-shard family: one sample per shard that answered.
fn per_shard(
    t: &mut Text,
    shards: &[(String, &ShardScrape)],
    name: &str,
    kind: &str,
    help: &str,
    value: impl Fn(&ShardScrape) -> f64,
) {
    t.family(name, kind, help);
    for (id, s) in shards {
        t.sample(name, &[("shard", id)], value(s));
    }
}

/// One histogram family with a histogram per shard and stage (`stages` names them in the order
/// `histograms` holds them).
fn per_shard_stages(
    t: &mut Text,
    shards: &[(String, &ShardScrape)],
    name: &str,
    help: &str,
    stages: &[&str],
    histograms: impl Fn(&ShardScrape) -> &[stats::HistogramSnapshot],
) {
    t.family(name, "histogram", help);
    for (id, s) in shards {
        for (stage, h) in stages.iter().zip(histograms(s)) {
            t.histogram(name, &[("shard", id), ("stage", stage)], h);
        }
    }
}

/// The whole page.
fn render(broker: &BrokerContext, started: f64) -> String {
    let scraped = collect(broker);
    let mut t = Text {
        out: String::with_capacity(64 * 1024),
    };
    let config = &broker.config;

    t.family(
        "sluice_build_info",
        "gauge",
        "Always 1; the version of the running broker.",
    );
    t.sample(
        "sluice_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    t.family(
        "sluice_start_time_seconds",
        "gauge",
        "When the broker started, seconds since the Unix epoch.",
    );
    t.sample("sluice_start_time_seconds", &[], started);
    t.family(
        "sluice_shards",
        "gauge",
        "Number of shards (pinned executors).",
    );
    t.sample("sluice_shards", &[], broker.shard_count() as f64);
    t.family("sluice_node_id", "gauge", "This node's id.");
    t.sample("sluice_node_id", &[], config.node_id as f64);
    t.family(
        "sluice_controller_id",
        "gauge",
        "The controller leader's node id as this node knows it (-1: none known).",
    );
    t.sample("sluice_controller_id", &[], broker.controller_id() as f64);
    t.family(
        "sluice_controller_leader",
        "gauge",
        "1 when this node is the controller leader (always 1 on a single node).",
    );
    t.sample(
        "sluice_controller_leader",
        &[],
        f64::from(u8::from(broker.controller_id() == config.node_id)),
    );

    t.family(
        "sluice_shard_scrape_ok",
        "gauge",
        "1 when the shard answered this scrape within its wait, 0 when its numbers are missing.",
    );
    for (i, s) in scraped.iter().enumerate() {
        t.sample(
            "sluice_shard_scrape_ok",
            &[("shard", &i.to_string())],
            f64::from(u8::from(s.is_some())),
        );
    }
    let shards: Vec<(String, &ShardScrape)> = scraped
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some((i.to_string(), s.as_ref()?)))
        .collect();

    // Reactor.
    per_shard(
        &mut t,
        &shards,
        "sluice_shard_busy_seconds_total",
        "counter",
        "Time the shard's executor spent running tasks.",
        |s| s.busy.as_secs_f64(),
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_shard_busy_ratio",
        "gauge",
        "Share of wall time the shard's executor ran tasks since the previous scrape.",
        |s| s.busy_ratio,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_shard_tasks_executed_total",
        "counter",
        "Tasks the shard's executor ran.",
        |s| s.tasks_executed as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_shard_task_queue_delay_seconds",
        "gauge",
        "How long this scrape's job waited in the shard's inbox and run queue before it ran.",
        |s| s.queue_delay.as_secs_f64(),
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_shard_cross_shard_calls_sent_total",
        "counter",
        "Calls this shard sent to another shard (partition and group hops).",
        |s| s.counters.hops_sent as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_shard_cross_shard_calls_received_total",
        "counter",
        "Jobs other shards (and the metrics scrape) queued on this shard.",
        |s| s.counters.hops_received as f64,
    );

    // Partition raft transport (in a cluster).
    let raft: Vec<(String, &ShardScrape)> = shards
        .iter()
        .filter(|(_, s)| s.transport.is_some())
        .cloned()
        .collect();
    if !raft.is_empty() {
        type Counter = fn(&sluice_raft::transport::TransportStats) -> u64;
        let families: [(&str, &str, Counter); 9] = [
            (
                "sluice_raft_frames_sent_total",
                "Frames the shard's partition transport queued for peers (one raft message, or one coalesced heartbeat frame).",
                |t| t.frames_sent,
            ),
            (
                "sluice_raft_frames_received_total",
                "Frames the shard's partition transport read from peers.",
                |t| t.frames_received,
            ),
            (
                "sluice_raft_messages_sent_total",
                "Raft messages the shard's partition transport queued for peers (each heartbeat of a coalesced frame counted).",
                |t| t.messages_sent,
            ),
            (
                "sluice_raft_messages_received_total",
                "Raft messages the shard's partition transport read from peers (each heartbeat of a coalesced frame counted).",
                |t| t.messages_received,
            ),
            (
                "sluice_raft_bytes_sent_total",
                "Bytes the shard's partition transport wrote to peers.",
                |t| t.bytes_sent,
            ),
            (
                "sluice_raft_bytes_received_total",
                "Bytes the shard's partition transport read from peers.",
                |t| t.bytes_received,
            ),
            (
                "sluice_raft_heartbeat_frames_sent_total",
                "Coalesced heartbeat frames the shard's partition transport queued (each carries the heartbeats and responses of every group for one peer).",
                |t| t.heartbeat_frames_sent,
            ),
            (
                "sluice_raft_heartbeats_coalesced_total",
                "Heartbeats and heartbeat responses sent inside coalesced frames instead of a frame each.",
                |t| t.heartbeats_coalesced,
            ),
            (
                "sluice_raft_messages_dropped_total",
                "Raft messages the shard's partition transport dropped (full queue or inbox, unknown group or peer, unreachable peer).",
                |t| t.messages_dropped,
            ),
        ];
        for (name, help, value) in families {
            per_shard(&mut t, &raft, name, "counter", help, |s| {
                s.transport.as_ref().map_or(0.0, |t| value(t) as f64)
            });
        }
    }

    // Network.
    per_shard(
        &mut t,
        &shards,
        "sluice_connections",
        "gauge",
        "Open Kafka connections.",
        |s| s.counters.connections_open as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_connections_accepted_total",
        "counter",
        "Kafka connections accepted.",
        |s| s.counters.connections_accepted as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_connections_rejected_total",
        "counter",
        "Kafka connections closed at accept because the shard had connections_max.",
        |s| s.counters.connections_rejected as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_received_bytes_total",
        "counter",
        "Bytes read from Kafka connections.",
        |s| s.counters.bytes_in as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_sent_bytes_total",
        "counter",
        "Bytes written to Kafka connections.",
        |s| s.counters.bytes_out as f64,
    );

    // Requests.
    t.family(
        "sluice_requests_total",
        "counter",
        "Requests handled, by API.",
    );
    for (id, s) in &shards {
        for (api, h) in &s.counters.requests {
            let api = api_name(*api);
            t.sample(
                "sluice_requests_total",
                &[("shard", id), ("api", &api)],
                h.count as f64,
            );
        }
    }
    t.family(
        "sluice_request_errors_total",
        "counter",
        "Error codes in responses (per partition where the API answers per partition), by API and Kafka error.",
    );
    for (id, s) in &shards {
        for ((api, code), n) in &s.counters.errors {
            let (api, name, code) = (api_name(*api), error_name(*code), code.to_string());
            t.sample(
                "sluice_request_errors_total",
                &[
                    ("shard", id),
                    ("api", &api),
                    ("error", &name),
                    ("error_code", &code),
                ],
                *n as f64,
            );
        }
    }
    per_shard(
        &mut t,
        &shards,
        "sluice_requests_closed_total",
        "counter",
        "Requests answered by closing the connection (malformed, unsupported, failed acks=0, handler panic).",
        |s| s.counters.requests_closed as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_request_buffer_regrowths_total",
        "counter",
        "Request frames that outgrew their connection's read buffer and were copied into a larger one.",
        |s| s.counters.request_buffer_regrowths as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_request_bytes_regrown_total",
        "counter",
        "Bytes of request frames copied into a larger read buffer (see sluice_request_buffer_regrowths_total).",
        |s| s.counters.request_bytes_regrown as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_produce_copied_bytes_total",
        "counter",
        "Batch bytes a produce request's handler copied because other parts of the request shared its frame (several partitions in one request); a request of one partition gives its batch to the log without a copy.",
        |s| s.counters.produce_bytes_copied as f64,
    );
    t.family(
        "sluice_request_duration_seconds",
        "histogram",
        "Time from a request's whole frame to its response being ready, by API (hdrhistogram, 2 significant digits).",
    );
    for (id, s) in &shards {
        for (api, h) in &s.counters.requests {
            let api = api_name(*api);
            t.histogram(
                "sluice_request_duration_seconds",
                &[("shard", id), ("api", &api)],
                h,
            );
        }
    }

    per_shard_stages(
        &mut t,
        &shards,
        "sluice_produce_stage_duration_seconds",
        "Where a produce request's time in the broker goes, by stage: queued (whole frame to handler start), handler (to the append's submission), admit (waiting for the log to take it), durable (to the write for acks=1, the sync for acks=all), respond (response ready to written).",
        &stats::PRODUCE_STAGES.map(|(_, stage)| stage),
        |s| &s.counters.produce_stages,
    );
    per_shard_stages(
        &mut t,
        &shards,
        "sluice_fetch_stage_duration_seconds",
        "Where a long-polling fetch's time goes once the data it waited for arrived, by stage: woken (data readable to the fetch re-reading), read (the re-read), respond (response ready to written; every fetch).",
        &stats::FETCH_STAGES.map(|(_, stage)| stage),
        |s| &s.counters.fetch_stages,
    );

    // Storage.
    t.family(
        "sluice_storage_fsync_duration_seconds",
        "histogram",
        "fdatasync of segment files (acks=all flushes that could not use durable writes, interval flushes).",
    );
    for (id, s) in &shards {
        t.histogram(
            "sluice_storage_fsync_duration_seconds",
            &[("shard", id)],
            &s.counters.fsync,
        );
    }
    t.family(
        "sluice_storage_durable_write_duration_seconds",
        "histogram",
        "Group commits written with durable (O_DSYNC) writes, which replace the fdatasync for acks=all.",
    );
    for (id, s) in &shards {
        t.histogram(
            "sluice_storage_durable_write_duration_seconds",
            &[("shard", id)],
            &s.counters.durable_write,
        );
    }
    per_shard(
        &mut t,
        &shards,
        "sluice_storage_written_bytes_total",
        "counter",
        "Bytes written to segment files (page-aligned: the partial last page is written again by the next flush).",
        |s| s.counters.storage_bytes_written as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_storage_write_errors_total",
        "counter",
        "Failed segment writes and fdatasyncs.",
        |s| s.counters.storage_write_errors as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_share_delivery_time_invalid_total",
        "counter",
        "Records whose delivery-time header (sluice.deliver.at, sluice.deliver.after.ms) was malformed: delivered to share consumers at once.",
        |s| s.counters.share_delivery_time_invalid as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_log_cleaner_passes_total",
        "counter",
        "Log-cleaner passes that rewrote segments of a compacted log.",
        |s| s.counters.cleaner_passes as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_log_cleaner_read_bytes_total",
        "counter",
        "Bytes the log cleaner read (mapped and rewritten).",
        |s| s.counters.cleaner_bytes_read as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_log_cleaner_written_bytes_total",
        "counter",
        "Bytes the log cleaner wrote (cleaned segments).",
        |s| s.counters.cleaner_bytes_written as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_share_dead_lettered_records_total",
        "counter",
        "Records of share groups copied to their group's dead-letter topic.",
        |s| s.counters.dead_lettered as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_share_dead_letter_failures_total",
        "counter",
        "Records of share groups that could not be copied to the dead-letter topic (they stay archived).",
        |s| s.counters.dead_letter_failures as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_storage_segments",
        "gauge",
        "Segments of the shard's partitions.",
        |s| s.segments as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_storage_segment_bytes",
        "gauge",
        "Bytes in the segments of the shard's partitions.",
        |s| s.segment_bytes as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_storage_readahead_hits_total",
        "counter",
        "Cold reads answered from bytes already read ahead (of the partitions open now).",
        |s| s.readahead_used as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_cache_hits_total",
        "counter",
        "Fetch reads answered from the batch cache.",
        |s| s.cache.hits as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_cache_misses_total",
        "counter",
        "Fetch reads that went to disk.",
        |s| s.cache.misses as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_cache_evictions_total",
        "counter",
        "Batches evicted from the batch cache.",
        |s| s.cache.evictions as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_cache_bytes",
        "gauge",
        "Bytes held by the batch cache.",
        |s| s.cache.bytes as f64,
    );
    per_shard(
        &mut t,
        &shards,
        "sluice_cache_capacity_bytes",
        "gauge",
        "The batch cache's budget (--cache-bytes).",
        |s| s.cache_bytes_max as f64,
    );

    // Partitions: their series count is the partition count (up to PARTITION_SERIES_MAX).
    let mut parts: Vec<&PartitionRow> = shards.iter().flat_map(|(_, s)| &s.partitions).collect();
    parts.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    let ends: HashMap<(&str, i32), i64> = parts
        .iter()
        .map(|p| ((p.topic.as_str(), p.partition), p.high_watermark))
        .collect();
    let dropped_parts = parts.len().saturating_sub(PARTITION_SERIES_MAX);
    parts.truncate(PARTITION_SERIES_MAX);
    type PartValue = fn(&PartitionRow) -> f64;
    let families: [(&str, &str, PartValue); 5] = [
        (
            "sluice_partition_log_start_offset",
            "First offset still in the partition's log.",
            |p| p.log_start as f64,
        ),
        (
            "sluice_partition_log_end_offset",
            "Offset the partition's next record will get.",
            |p| p.log_end as f64,
        ),
        (
            "sluice_partition_high_watermark",
            "Offset below which records are readable by consumers.",
            |p| p.high_watermark as f64,
        ),
        (
            "sluice_partition_segments",
            "Segments of the partition.",
            |p| p.segments as f64,
        ),
        (
            "sluice_partition_size_bytes",
            "Bytes in the partition's segments.",
            |p| p.bytes as f64,
        ),
    ];
    for (name, help, value) in families {
        t.family(name, "gauge", help);
        for p in &parts {
            let pi = p.partition.to_string();
            t.sample(name, &[("topic", &p.topic), ("partition", &pi)], value(p));
        }
    }

    // Groups.
    let mut groups: Vec<&GroupRow> = shards.iter().flat_map(|(_, s)| &s.groups).collect();
    groups.sort_by(|a, b| a.id.cmp(&b.id));
    t.family(
        "sluice_group_members",
        "gauge",
        "Members of each consumer group this node coordinates.",
    );
    for g in &groups {
        t.sample(
            "sluice_group_members",
            &[("group", &g.id)],
            g.members as f64,
        );
    }
    t.family(
        "sluice_group_state",
        "gauge",
        "1 for the group's current state, 0 for the others.",
    );
    const STATES: [GroupState; 4] = [
        GroupState::Empty,
        GroupState::PreparingRebalance,
        GroupState::CompletingRebalance,
        GroupState::Stable,
    ];
    for g in &groups {
        for st in STATES {
            t.sample(
                "sluice_group_state",
                &[("group", &g.id), ("state", st.name())],
                f64::from(u8::from(g.state == st)),
            );
        }
    }
    let mut offsets: Vec<(&str, &str, i32, i64)> = groups
        .iter()
        .flat_map(|g| {
            g.offsets
                .iter()
                .map(|(topic, p, o)| (g.id.as_str(), topic.as_str(), *p, *o))
        })
        .collect();
    let dropped_offsets = offsets.len().saturating_sub(GROUP_OFFSET_SERIES_MAX);
    offsets.truncate(GROUP_OFFSET_SERIES_MAX);
    t.family(
        "sluice_group_committed_offset",
        "gauge",
        "Committed offset of each group and partition.",
    );
    for (g, topic, p, o) in &offsets {
        let pi = p.to_string();
        t.sample(
            "sluice_group_committed_offset",
            &[("group", g), ("topic", topic), ("partition", &pi)],
            *o as f64,
        );
    }
    t.family(
        "sluice_group_lag",
        "gauge",
        "High watermark minus committed offset, for partitions held by this node.",
    );
    for (g, topic, p, o) in &offsets {
        if let Some(hw) = ends.get(&(*topic, *p)) {
            let pi = p.to_string();
            t.sample(
                "sluice_group_lag",
                &[("group", g), ("topic", topic), ("partition", &pi)],
                (hw - o).max(0) as f64,
            );
        }
    }
    t.family(
        "sluice_metrics_series_dropped",
        "gauge",
        "Series left out of this scrape by the per-scrape caps (partitions: 10000, group offsets: 10000).",
    );
    t.sample(
        "sluice_metrics_series_dropped",
        &[("family", "partition")],
        dropped_parts as f64,
    );
    t.sample(
        "sluice_metrics_series_dropped",
        &[("family", "group_offset")],
        dropped_offsets as f64,
    );
    t.out
}
