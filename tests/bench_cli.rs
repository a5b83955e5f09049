//! The `sluice-bench` binary as a user meets it: bad flags and an unreachable broker give one
//! line on stderr and a non-zero exit; against a real `sluice` broker it produces and consumes
//! exactly the records it was asked to.
//!
//! `sluice-bench` is another package's binary, so Cargo does not build it for these tests:
//! run `cargo build -p sluice-bench` (or `cargo build --workspace`) first, with the same profile.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>/sluice-bench`: next to the `sluice` binary Cargo built for these tests
/// (where `cargo build -p sluice-bench` puts it, also when intermediate artifacts live in a
/// separate build directory), else next to this test's own `deps/` directory.
fn bench_bin() -> PathBuf {
    let beside_broker = std::path::Path::new(env!("CARGO_BIN_EXE_sluice"))
        .parent()
        .map(|d| d.join("sluice-bench"));
    if let Some(bin) = beside_broker.filter(|b| b.is_file()) {
        return bin;
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile> directory");
    let bin = dir.join("sluice-bench");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p sluice-bench` before these tests",
        bin.display()
    );
    bin
}

/// Runs the bench with `args`, killing it if it outlives `limit`.
fn run_bench(args: &[&str], limit: Duration) -> Output {
    run_bench_in(&std::env::current_dir().expect("current dir"), args, limit)
}

/// Runs the bench with `args` in directory `cwd`, killing it if it outlives `limit`.
fn run_bench_in(cwd: &std::path::Path, args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(bench_bin())
        .current_dir(cwd)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice-bench");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sluice-bench {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect output")
}

fn stderr_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .map(str::to_string)
        .collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[test]
fn unknown_flag_exits_non_zero_with_one_line() {
    let o = run_bench(&["produce", "--no-such-flag"], Duration::from_secs(10));
    assert_eq!(o.status.code(), Some(2));
    let lines = stderr_lines(&o);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("--no-such-flag"), "{lines:?}");
}

#[test]
fn invalid_values_exit_non_zero_with_one_line() {
    for args in [
        &["produce", "--acks", "7"][..],
        &["produce", "--idempotent", "--acks", "1"],
        &["consume", "--fetch-max-bytes", "0"],
        &["scenario", "no-such-scenario", "--dir", "perf/scenarios"],
    ] {
        let o = run_bench(args, Duration::from_secs(10));
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let lines = stderr_lines(&o);
        assert_eq!(lines.len(), 1, "{args:?}: {lines:?}");
    }
}

#[test]
fn built_in_scenarios_run_from_any_directory() {
    let elsewhere = std::env::temp_dir();
    let o = run_bench_in(
        &elsewhere,
        &["scenario", "s1", "--dry-run", "--duration", "1s"],
        Duration::from_secs(10),
    );
    assert!(o.status.success(), "{:?}", stderr_lines(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with("scenario s1-produce-max (built in):"),
        "{out}"
    );
    let steps: Vec<&str> = out.lines().filter(|l| l.starts_with("step ")).collect();
    assert!(!steps.is_empty(), "{out}");
    assert!(steps.iter().all(|l| l.contains("--duration 1s")), "{out}");

    let o = run_bench_in(
        &elsewhere,
        &["scenario", "no-such-scenario"],
        Duration::from_secs(10),
    );
    assert_eq!(o.status.code(), Some(2));
    let lines = stderr_lines(&o);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("s1-produce-max"), "{lines:?}");
}

#[test]
fn unreachable_broker_exits_non_zero_with_one_line() {
    // A port nobody listens on: bound, then released.
    let addr = format!("127.0.0.1:{}", free_port());
    let o = run_bench(
        &[
            "produce",
            "--brokers",
            &addr,
            "--duration",
            "1s",
            "--connect-timeout",
            "2s",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(o.status.code(), Some(1));
    let lines = stderr_lines(&o);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("cannot connect") && lines[0].contains(&addr),
        "{lines:?}"
    );
}

struct Broker {
    child: Child,
    _dir: tempfile::TempDir,
    addr: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_broker() -> Broker {
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["start", "--cores", "1", "--listen", &addr])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sluice");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "broker did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Broker {
        child,
        _dir: dir,
        addr,
    }
}

#[test]
fn produces_then_consumes_exactly_the_requested_records() {
    let b = start_broker();
    let json = tempfile::NamedTempFile::new().expect("temp file");
    let json_path = json.path().to_str().expect("utf-8 path");
    let o = run_bench(
        &[
            "produce",
            "--brokers",
            &b.addr,
            "--topic",
            "cli-t",
            "--partitions",
            "3",
            "--producers",
            "2",
            "--size",
            "100",
            "--batch-bytes",
            "1000",
            "--count",
            "3000",
            "--acks",
            "all",
            "--quiet",
            "--json",
            json_path,
        ],
        Duration::from_secs(60),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Throughput leads the summary.
    assert!(out.starts_with("produce: "), "{out}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json.path()).expect("json")).expect("parse");
    // --count stops at the first batch boundary at or past the count (10 records per batch).
    assert_eq!(j["publishRecords"], serde_json::json!(3000));
    assert!(j["publishLatency99pct"].as_f64().expect("p99") > 0.0);

    let o = run_bench(
        &[
            "consume",
            "--brokers",
            &b.addr,
            "--topic",
            "cli-t",
            "--from",
            "earliest",
            "--count",
            "3000",
            "--check-crc",
            "--quiet",
            "--duration",
            "30s",
        ],
        Duration::from_secs(60),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains(" 3000 records, "), "{out}");
}

#[test]
fn report_dir_collects_charts_of_each_run_and_an_index_of_all() {
    let b = start_broker();
    let dir = tempfile::tempdir().expect("temp dir");
    let report = dir.path().to_str().expect("utf-8 path");
    for name in ["first", "second"] {
        let o = run_bench(
            &[
                "e2e",
                "--brokers",
                &b.addr,
                "--topic",
                "report-t",
                "--partitions",
                "2",
                "--size",
                "200",
                "--duration",
                "3s",
                "--quiet",
                "--report",
                report,
                "--report-name",
                name,
            ],
            Duration::from_secs(60),
        );
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{out} {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.contains("report: "), "{out}");
        let run = dir.path().join(name);
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).expect("run.json"))
                .expect("parse");
        // One sample per second of the run, each with this second's throughput and latencies.
        let tl = j["timeline"].as_array().expect("timeline");
        assert!(tl.len() >= 2, "{tl:?}");
        assert!(
            tl.iter()
                .any(|s| s["produce"]["mb_per_sec"].as_f64().unwrap_or(0.0) > 0.0),
            "{tl:?}"
        );
        assert!(
            tl.iter()
                .any(|s| s["end_to_end_latency"]["p99"].as_f64().unwrap_or(0.0) > 0.0),
            "{tl:?}"
        );
        for chart in ["throughput.svg", "latency.svg"] {
            let svg = std::fs::read_to_string(run.join(chart)).expect(chart);
            assert!(svg.contains("<polyline"), "{chart} has no line");
        }
    }
    let index = std::fs::read_to_string(dir.path().join("index.html")).expect("index");
    assert!(index.contains("first/throughput.svg"), "{index}");
    assert!(index.contains("second/latency.svg"), "{index}");
}

#[test]
fn transactional_flags_are_checked_before_connecting() {
    for args in [
        &["produce", "--transactional", "--acks", "1"][..],
        &["produce", "--transactional", "--txn-records", "0"],
        &["produce", "--transactional", "--rate", "1000"],
        &["exactly-once", "--topic", "in"],
        &["exactly-once", "--output-topic", "out", "--workers", "0"],
        &["consume", "--until-end", "--group", "g"],
        &["e2e", "--until-end"],
    ] {
        let o = run_bench(args, Duration::from_secs(10));
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let lines = stderr_lines(&o);
        assert_eq!(lines.len(), 1, "{args:?}: {lines:?}");
    }
}

/// Runs the bench and returns its JSON summary; fails the test with its output if it fails.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let json = tempfile::NamedTempFile::new().expect("temp file");
    let path = json.path().to_str().expect("utf-8 path");
    let mut all = args.to_vec();
    all.extend(["--quiet", "--json", path]);
    let o = run_bench(&all, Duration::from_secs(120));
    assert!(
        o.status.success(),
        "{args:?}: {} {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(json.path()).expect("json")).expect("parse")
}

/// Records a consumer at `isolation` reads from `topic` up to the end the broker reports.
fn records_to_end(addr: &str, topic: &str, isolation: &str) -> u64 {
    let j = bench_json(&[
        "consume",
        "--brokers",
        addr,
        "--topic",
        topic,
        "--from",
        "earliest",
        "--isolation-level",
        isolation,
        "--until-end",
        "--fetch-max-wait-ms",
        "100",
        "--check-crc",
        "--duration",
        "60s",
    ]);
    j["consumeRecords"].as_u64().unwrap_or(0)
}

/// What a read_committed consumer sees of `topic` once the markers of the transactions that
/// were committed have landed (EndTxn is answered before them): waits until it sees
/// `expected` records, failing at once if it ever sees more.
fn committed_records(addr: &str, topic: &str, expected: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = records_to_end(addr, topic, "read-committed");
        assert!(
            n <= expected,
            "read_committed saw {n} records of {topic}, more than the {expected} committed"
        );
        if n == expected || Instant::now() > deadline {
            return n;
        }
    }
}

#[test]
fn transactional_produce_shows_commits_to_read_committed_and_hides_aborts() {
    let b = start_broker();
    // 16 transactions of 25 records (batches of 10, 10 and 5) over 2 producers; each producer
    // aborts its every 4th transaction.
    let j = bench_json(&[
        "produce",
        "--brokers",
        &b.addr,
        "--topic",
        "txn-t",
        "--partitions",
        "2",
        "--producers",
        "2",
        "--size",
        "100",
        "--batch-bytes",
        "1000",
        "--transactional",
        "--transactional-id",
        "bench-cli",
        "--txn-records",
        "25",
        "--abort-every",
        "4",
        "--count",
        "400",
    ]);
    let committed = j["transactionsCommitted"].as_u64().expect("committed");
    let aborted = j["transactionsAborted"].as_u64().expect("aborted");
    assert_eq!(committed + aborted, 16, "{j}");
    // One of the two producers ran at least 8 transactions: at least 2 aborts.
    assert!(aborted >= 2, "{j}");
    assert_eq!(j["committedRecords"], serde_json::json!(committed * 25));
    // Every batch was acknowledged, aborted ones too.
    assert_eq!(j["publishRecords"], serde_json::json!(400));
    assert!(j["commitLatency99pct"].as_f64().expect("commit p99") > 0.0);

    assert_eq!(
        committed_records(&b.addr, "txn-t", committed * 25),
        committed * 25
    );
    // read_uncommitted sees aborted records too, never the markers.
    assert_eq!(records_to_end(&b.addr, "txn-t", "read-uncommitted"), 400);
}

#[test]
fn exactly_once_loop_copies_each_input_record_once_across_aborts() {
    let b = start_broker();
    let j = bench_json(&[
        "produce",
        "--brokers",
        &b.addr,
        "--topic",
        "eos-in",
        "--partitions",
        "2",
        "--size",
        "100",
        "--batch-bytes",
        "1000",
        "--count",
        "300",
    ]);
    assert_eq!(j["publishRecords"], serde_json::json!(300));
    let run = |extra: &[&str]| {
        let mut args = vec![
            "exactly-once",
            "--brokers",
            &b.addr,
            "--topic",
            "eos-in",
            "--output-topic",
            "eos-out",
            "--group",
            "eos-g",
            "--transactional-id",
            "eos",
            "--txn-records",
            "20",
            "--abort-every",
            "3",
        ];
        args.extend_from_slice(extra);
        bench_json(&args)
    };
    let j = run(&["--count", "300"]);
    assert_eq!(j["committedRecords"], serde_json::json!(300), "{j}");
    assert!(
        j["transactionsAborted"].as_u64().expect("aborted") >= 1,
        "{j}"
    );
    // The output holds every input record once; aborted copies are there but hidden.
    assert_eq!(committed_records(&b.addr, "eos-out", 300), 300);
    assert!(records_to_end(&b.addr, "eos-out", "read-uncommitted") > 300);
    // The group's offsets were committed with the output: a second run has nothing to do.
    let j = run(&["--duration", "2s"]);
    assert_eq!(j["committedRecords"].as_u64().unwrap_or(0), 0, "{j}");
}

/// Produces `count` records of 100 bytes to a new `topic` of `partitions` partitions.
fn produce_records(addr: &str, topic: &str, partitions: &str, count: u64) {
    let j = bench_json(&[
        "produce",
        "--brokers",
        addr,
        "--topic",
        topic,
        "--partitions",
        partitions,
        "--size",
        "100",
        "--batch-bytes",
        "1000",
        "--count",
        &count.to_string(),
    ]);
    assert_eq!(j["publishRecords"], serde_json::json!(count));
}

fn n(j: &serde_json::Value, key: &str) -> u64 {
    j[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing: {j}"))
}

#[test]
fn share_consume_accepts_every_record_exactly_once() {
    let b = start_broker();
    produce_records(&b.addr, "share-all", "3", 3000);
    for (group, mode) in [("share-all-p", "piggyback"), ("share-all-e", "explicit")] {
        let j = bench_json(&[
            "share-consume",
            "--brokers",
            &b.addr,
            "--topic",
            "share-all",
            "--group",
            group,
            "--consumers",
            "3",
            "--ack-mode",
            mode,
            "--max-records",
            "200",
            "--count",
            "3000",
            "--duration",
            "60s",
        ]);
        // Every record delivered once, to one member, and accepted.
        assert_eq!(n(&j, "shareDistinct"), 3000, "{mode}: {j}");
        assert_eq!(n(&j, "shareDuplicates"), 0, "{mode}: {j}");
        assert_eq!(n(&j, "shareDeliveries"), 3000, "{mode}: {j}");
        assert_eq!(n(&j, "shareRedeliveries"), 0, "{mode}: {j}");
        assert_eq!(n(&j, "shareAccepted"), 3000, "{mode}: {j}");
        assert_eq!(
            n(&j, "shareReleased") + n(&j, "shareRejected"),
            0,
            "{mode}: {j}"
        );
        assert_eq!(n(&j, "shareAckErrors"), 0, "{mode}: {j}");
        assert_eq!(n(&j, "consumeRecords"), 3000, "{mode}: {j}");
        assert!(
            j["endToEndLatency50pct"].as_f64().unwrap_or(0.0) > 0.0,
            "{j}"
        );
    }
}

#[test]
fn share_consume_releases_come_back_with_higher_delivery_counts() {
    let b = start_broker();
    produce_records(&b.addr, "share-rel", "1", 1000);
    // Two members share the one partition; a fifth of the first deliveries are released, a
    // tenth rejected.
    let j = bench_json(&[
        "share-consume",
        "--brokers",
        &b.addr,
        "--topic",
        "share-rel",
        "--group",
        "share-rel-g",
        "--consumers",
        "2",
        "--release-ratio",
        "0.2",
        "--reject-ratio",
        "0.1",
        "--max-records",
        "100",
        "--count",
        "1000",
        "--duration",
        "60s",
    ]);
    let released = n(&j, "shareReleased");
    let rejected = n(&j, "shareRejected");
    assert!((100..=300).contains(&released), "{j}");
    assert!((40..=160).contains(&rejected), "{j}");
    // Each released record came back once (delivery count 2) and was accepted then.
    assert_eq!(n(&j, "shareRedeliveries"), released, "{j}");
    assert_eq!(n(&j, "shareDuplicates"), released, "{j}");
    assert_eq!(n(&j, "shareDistinct"), 1000, "{j}");
    assert_eq!(n(&j, "shareAccepted") + rejected, 1000, "{j}");
    assert_eq!(n(&j, "shareAckErrors"), 0, "{j}");
}

#[test]
fn share_consume_measures_redelivery_after_lock_expiry() {
    let b = start_broker();
    produce_records(&b.addr, "share-lock", "1", 500);
    // One member acquires 50 records and never acknowledges; the other gets them once the
    // group's 1 s lock expires.
    let j = bench_json(&[
        "share-consume",
        "--brokers",
        &b.addr,
        "--topic",
        "share-lock",
        "--group",
        "share-lock-g",
        "--consumers",
        "2",
        "--hold",
        "1",
        "--lock-duration-ms",
        "1000",
        "--max-records",
        "50",
        "--duration",
        "4s",
    ]);
    let held = n(&j, "shareHeld");
    assert!(held >= 50, "{j}");
    assert!(n(&j, "shareRedeliveries") >= 50, "{j}");
    assert_eq!(n(&j, "shareDistinct"), 500, "{j}");
    // Not before the lock expired (timed from the arrival of the holder's answer, a little
    // after the broker acquired).
    let p50 = j["lockRedeliveryLatency50pct"].as_f64().unwrap_or(0.0);
    assert!(p50 >= 900.0, "{j}");
}

#[test]
fn share_consume_flags_are_checked_before_connecting() {
    for args in [
        &["share-consume"][..],
        &["share-consume", "--group", "g", "--release-ratio", "1.5"],
        &[
            "share-consume",
            "--group",
            "g",
            "--release-ratio",
            "0.6",
            "--reject-ratio",
            "0.6",
        ],
        &["share-consume", "--group", "g", "--hold", "1"],
        &["share-consume", "--group", "g", "--lock-duration-ms", "10"],
        &["share-consume", "--group", "g", "--max-records", "0"],
    ] {
        let o = run_bench(args, Duration::from_secs(10));
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let lines = stderr_lines(&o);
        assert_eq!(lines.len(), 1, "{args:?}: {lines:?}");
    }
}
