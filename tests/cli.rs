//! The `sluice` command line against a running broker: topic administration, produce from stdin
//! and consume with a format string; errors are one line on stderr and a non-zero exit code.

mod common;

use std::process::Output;

use common::{sluice, topic_name, Broker};

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed with {}: stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "command unexpectedly succeeded");
    let e = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert!(!e.is_empty(), "no error message");
    assert_eq!(e.lines().count(), 1, "error is not one line:\n{e}");
    e
}

#[test]
fn topic_create_list_describe_add_partitions_delete() {
    let b = Broker::options().cores(2).start();
    let bs = b.bootstrap();
    let t = topic_name("cli");
    let out = ok(&sluice(
        &[
            "topic",
            "create",
            &t,
            "-p",
            "3",
            "-c",
            "retention.ms=60000",
            "--brokers",
            &bs,
        ],
        None,
    ));
    assert!(out.contains(&t) && out.contains('3'), "{out}");

    // Creating it again fails with one line naming the problem.
    let e = one_line_error(&sluice(&["topic", "create", &t, "--brokers", &bs], None));
    assert!(e.to_lowercase().contains("exist"), "{e}");

    let out = ok(&sluice(&["topic", "list", "--brokers", &bs], None));
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(t.as_str()))
        .unwrap_or_else(|| panic!("{t} not listed:\n{out}"));
    assert_eq!(line.split_whitespace().nth(1), Some("3"), "{line}");

    let out = ok(&sluice(&["topic", "describe", &t, "--brokers", &bs], None));
    assert!(out.contains("PARTITIONS  3"), "{out}");
    let cfg = out
        .lines()
        .find(|l| l.starts_with("retention.ms"))
        .unwrap_or_else(|| panic!("retention.ms missing:\n{out}"));
    assert!(cfg.contains("60000") && cfg.contains("topic"), "{cfg}");

    ok(&sluice(
        &["topic", "add-partitions", &t, "-p", "5", "--brokers", &bs],
        None,
    ));
    let out = ok(&sluice(&["topic", "describe", &t, "--brokers", &bs], None));
    assert!(out.contains("PARTITIONS  5"), "{out}");

    ok(&sluice(&["topic", "delete", &t, "--brokers", &bs], None));
    let out = ok(&sluice(&["topic", "list", "--brokers", &bs], None));
    assert!(
        !out.lines()
            .any(|l| l.split_whitespace().next() == Some(t.as_str())),
        "{out}"
    );
}

#[test]
fn topic_alter_config_and_cluster_describe() {
    let b = Broker::start();
    let bs = b.bootstrap();
    let t = topic_name("clialter");
    ok(&sluice(&["topic", "create", &t, "--brokers", &bs], None));
    let config_line = |name: &str| {
        let out = ok(&sluice(&["topic", "describe", &t, "--brokers", &bs], None));
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{out}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // rpk-style and kafka-configs-style flags.
    let out = ok(&sluice(
        &[
            "topic",
            "alter-config",
            &t,
            "--set",
            "retention.ms=120000",
            "--add-config",
            "compression.type=zstd",
            "--append",
            "cleanup.policy=compact",
            "--brokers",
            &bs,
        ],
        None,
    ));
    assert!(out.contains("applied 3"), "{out}");
    assert_eq!(
        config_line("retention.ms"),
        ["retention.ms", "120000", "topic"]
    );
    assert_eq!(
        config_line("compression.type"),
        ["compression.type", "zstd", "topic"]
    );
    assert_eq!(
        config_line("cleanup.policy"),
        ["cleanup.policy", "delete,compact", "topic"]
    );
    ok(&sluice(
        &[
            "topic",
            "alter-config",
            &t,
            "--delete-config",
            "compression.type",
            "--subtract",
            "cleanup.policy=delete",
            "--brokers",
            &bs,
        ],
        None,
    ));
    assert_eq!(
        config_line("compression.type"),
        ["compression.type", "producer", "default"]
    );
    assert_eq!(
        config_line("cleanup.policy"),
        ["cleanup.policy", "compact", "topic"]
    );
    // --dry-run validates only; a bad value is one line naming the error and the key.
    ok(&sluice(
        &[
            "topic",
            "alter-config",
            &t,
            "--set",
            "retention.ms=1",
            "--dry-run",
            "--brokers",
            &bs,
        ],
        None,
    ));
    assert_eq!(
        config_line("retention.ms"),
        ["retention.ms", "120000", "topic"]
    );
    let e = one_line_error(&sluice(
        &[
            "topic",
            "alter-config",
            &t,
            "--set",
            "retention.ms=soon",
            "--brokers",
            &bs,
        ],
        None,
    ));
    assert!(
        e.contains("INVALID_CONFIG") && e.contains("retention.ms"),
        "{e}"
    );
    let e = one_line_error(&sluice(
        &[
            "topic",
            "alter-config",
            "no-such-topic",
            "--set",
            "retention.ms=1",
            "--brokers",
            &bs,
        ],
        None,
    ));
    assert!(e.contains("UNKNOWN_TOPIC_OR_PARTITION"), "{e}");

    let out = ok(&sluice(&["cluster", "describe", "--brokers", &bs], None));
    assert!(out.contains("CONTROLLER  0"), "{out}");
    let port = b.addr.port().to_string();
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some("0"))
        .unwrap_or_else(|| panic!("no broker row:\n{out}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        row,
        ["0", "127.0.0.1", port.as_str(), "live", "(controller)"]
    );

    // Log directories: the topic's one partition, its size growing with what was produced.
    let size_of_partition_0 = || {
        let out = ok(&sluice(
            &["cluster", "logdirs", "--topic", &t, "--brokers", &bs],
            None,
        ));
        assert!(
            out.lines().any(|l| l.trim_start().starts_with("0  /")),
            "no directory line:\n{out}"
        );
        let rows: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|r| r.get(1) == Some(&t.as_str()))
            .collect();
        assert_eq!(rows.len(), 1, "one partition of {t}:\n{out}");
        assert_eq!(
            (rows[0][0], rows[0][2], rows[0][4]),
            ("0", "0", "0"),
            "{out}"
        );
        rows[0][3].parse::<u64>().expect("a size in bytes")
    };
    let before = size_of_partition_0();
    // Keyed: the test made the topic compacted above, which refuses keyless records.
    ok(&sluice(
        &["produce", &t, "--key-separator", ":", "--brokers", &bs],
        Some(format!("k:{}", "x".repeat(2000)).as_bytes()),
    ));
    assert!(size_of_partition_0() > before + 2000);
}

#[test]
fn produce_stdin_with_key_separator_then_consume_with_format() {
    let b = Broker::start();
    let bs = b.bootstrap();
    let t = topic_name("clirt");
    ok(&sluice(
        &["topic", "create", &t, "-p", "1", "--brokers", &bs],
        None,
    ));
    let input = "a:1\nb:2\nc:three:with:colons\nnokey\n";
    ok(&sluice(
        &["produce", &t, "--key-separator", ":", "--brokers", &bs],
        Some(input.as_bytes()),
    ));
    let out = ok(&sluice(
        &[
            "consume",
            &t,
            "--from-beginning",
            "-n",
            "4",
            "--format",
            "%k:%v\\n",
            "--brokers",
            &bs,
        ],
        None,
    ));
    assert_eq!(out, "a:1\nb:2\nc:three:with:colons\n:nokey\n");
    // Offsets and partitions in the format.
    let out = ok(&sluice(
        &[
            "consume",
            &t,
            "--from-beginning",
            "-n",
            "2",
            "--format",
            "%p/%o %v\\n",
            "--brokers",
            &bs,
        ],
        None,
    ));
    assert_eq!(out, "0/0 1\n0/1 2\n");
}

#[test]
fn produce_to_many_partitions_by_key_then_consume_all() {
    let b = Broker::options().cores(2).start();
    let bs = b.bootstrap();
    let t = topic_name("clikeys");
    ok(&sluice(
        &["topic", "create", &t, "-p", "4", "--brokers", &bs],
        None,
    ));
    let input: String = (0..100).map(|i| format!("key{i}\tvalue{i}\n")).collect();
    ok(&sluice(
        &["produce", &t, "--key-separator", "\t", "--brokers", &bs],
        Some(input.as_bytes()),
    ));
    let out = ok(&sluice(
        &[
            "consume",
            &t,
            "--from-beginning",
            "-n",
            "100",
            "--format",
            "%k=%v\\n",
            "--brokers",
            &bs,
        ],
        None,
    ));
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    let mut want: Vec<String> = (0..100).map(|i| format!("key{i}=value{i}")).collect();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn describe_unknown_topic_is_one_line_error() {
    let b = Broker::start();
    let out = sluice(
        &[
            "topic",
            "describe",
            "no-such-topic",
            "--brokers",
            &b.bootstrap(),
        ],
        None,
    );
    let e = one_line_error(&out);
    assert!(e.contains("no-such-topic"), "{e}");
}

#[test]
fn unreachable_broker_is_one_line_error() {
    // A port bound but not listening: connections are refused, and no other test can start a
    // broker on it while we hold it.
    let holder =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    holder
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .expect("addr")
                .into(),
        )
        .expect("bind");
    let port = holder
        .local_addr()
        .expect("local addr")
        .as_socket()
        .expect("inet")
        .port();
    let bs = format!("127.0.0.1:{port}");
    let e = one_line_error(&sluice(&["topic", "list", "--brokers", &bs], None));
    assert!(e.contains(&bs), "{e}");
    let e = one_line_error(&sluice(&["produce", "t", "--brokers", &bs], Some(b"x\n")));
    assert!(e.contains(&bs), "{e}");
    let e = one_line_error(&sluice(
        &["consume", "t", "-n", "1", "--brokers", &bs],
        None,
    ));
    assert!(e.contains(&bs), "{e}");
}
