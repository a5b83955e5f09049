//! The `sluice` console commands against a running broker: topic admin, produce from stdin,
//! consume with a format, and one-line errors.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Broker;

const CMD_WAIT: Duration = Duration::from_secs(20);

/// Runs `sluice ARGS` against `brokers`; returns (exit code, stdout, stderr).
fn sluice(brokers: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(common::BIN);
    cmd.args(args)
        .env("SLUICE_BROKERS", brokers)
        .stdin(Stdio::null());
    let (st, out, err) = common::run_bounded(cmd, CMD_WAIT);
    (st.code(), out, err)
}

fn ok(b: &Broker, args: &[&str]) -> String {
    let (code, out, err) = sluice(&b.bootstrap(), args);
    assert_eq!(
        code,
        Some(0),
        "sluice {args:?}: stdout {out:?} stderr {err:?}"
    );
    out
}

/// `sluice produce` with `input` on stdin (bounded).
fn produce(b: &Broker, args: &[&str], input: &str) {
    let mut child = Command::new(common::BIN)
        .arg("produce")
        .args(args)
        .env("SLUICE_BROKERS", b.bootstrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice produce");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).expect("write stdin");
    drop(stdin);
    let st = common::wait_timeout(&mut child, CMD_WAIT);
    let Some(st) = st else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("sluice produce did not finish in {CMD_WAIT:?}");
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(st.success(), "sluice produce {args:?}: {err}");
}

fn table_rows(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

#[test]
fn topic_create_list_describe_add_partitions_delete() {
    let b = Broker::start(2);
    let out = ok(
        &b,
        &[
            "topic",
            "create",
            "orders",
            "-p",
            "3",
            "-c",
            "retention.ms=3600000",
        ],
    );
    assert!(out.contains("orders"), "{out}");
    ok(&b, &["topic", "create", "other", "-p", "1"]);

    let out = ok(&b, &["topic", "list"]);
    let rows = table_rows(&out);
    assert!(
        rows.iter()
            .any(|r| r.first().map(String::as_str) == Some("orders")
                && r.get(1).map(String::as_str) == Some("3")),
        "{out}"
    );
    assert!(
        rows.iter()
            .any(|r| r.first().map(String::as_str) == Some("other")),
        "{out}"
    );

    let out = ok(&b, &["topic", "describe", "orders"]);
    let rows = table_rows(&out);
    assert!(rows.iter().any(|r| r == &["PARTITIONS", "3"]), "{out}");
    assert!(
        rows.iter()
            .any(|r| r.first().map(String::as_str) == Some("retention.ms")
                && r.get(1).map(String::as_str) == Some("3600000")),
        "{out}"
    );

    // Creating it again fails with one line naming the Kafka error.
    let (code, _, err) = sluice(&b.bootstrap(), &["topic", "create", "orders", "-p", "3"]);
    assert_ne!(code, Some(0));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("TopicAlreadyExists"), "{err}");

    ok(&b, &["topic", "add-partitions", "orders", "-p", "5"]);
    let out = ok(&b, &["topic", "describe", "orders"]);
    assert!(
        table_rows(&out).iter().any(|r| r == &["PARTITIONS", "5"]),
        "{out}"
    );

    ok(&b, &["topic", "delete", "other"]);
    let out = ok(&b, &["topic", "list"]);
    assert!(
        !table_rows(&out)
            .iter()
            .any(|r| r.first().map(String::as_str) == Some("other")),
        "{out}"
    );
}

#[test]
fn produce_stdin_and_consume_with_format() {
    let b = Broker::start(2);
    ok(&b, &["topic", "create", "lines", "-p", "2"]);
    produce(
        &b,
        &["lines", "--key-separator", ":", "-p", "1"],
        "k1:hello\nk2:world\nk3:with:colon\n",
    );
    let out = ok(
        &b,
        &[
            "consume",
            "lines",
            "-p",
            "1",
            "--from-beginning",
            "-n",
            "3",
            "-e",
            "--format",
            "%k:%v\\n",
        ],
    );
    assert_eq!(out, "k1:hello\nk2:world\nk3:with:colon\n");
    let out = ok(
        &b,
        &[
            "consume",
            "lines",
            "-p",
            "1",
            "--offset",
            "1",
            "-n",
            "2",
            "-e",
            "--format",
            "%p/%o %k=%v\\n",
        ],
    );
    assert_eq!(out, "1/1 k2=world\n1/2 k3=with:colon\n");
    // Without -p, records of every partition come back.
    produce(&b, &["lines", "-p", "0"], "plain\n");
    let out = ok(
        &b,
        &[
            "consume",
            "lines",
            "--from-beginning",
            "-n",
            "4",
            "-e",
            "--format",
            "%v\\n",
        ],
    );
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    assert_eq!(got, vec!["hello", "plain", "with:colon", "world"]);
}

#[test]
fn unknown_topic_describe_is_one_line_error() {
    let b = Broker::start(1);
    let (code, out, err) = sluice(&b.bootstrap(), &["topic", "describe", "no-such-topic"]);
    assert_ne!(code, Some(0), "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("UnknownTopicOrPartition"), "{err}");
}

#[test]
fn unreachable_broker_is_one_line_error() {
    let port = common::free_port();
    let brokers = format!("127.0.0.1:{port}");
    for args in [
        &["topic", "list"][..],
        &["consume", "x", "--from-beginning", "-e"][..],
    ] {
        let (code, _, err) = sluice(&brokers, args);
        assert_ne!(code, Some(0), "{args:?}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(&brokers), "{args:?}: {err}");
    }
}
