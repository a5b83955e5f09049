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

/// `target/<profile>/sluice-bench`, found next to this test's own `deps/` directory.
fn bench_bin() -> PathBuf {
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
