//! Debian's kcat (librdkafka 2.0.2) against the broker: the first tool a new user tries. Older
//! librdkafka is strict about ApiVersions v3 tagged fields, so this guards wire compatibility.
//! kcat must be installed (tests/run.sh installs it); a missing kcat is a failure, not a skip.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{run_bounded, topic_name, Broker};

const KCAT_WAIT_MAX: Duration = Duration::from_secs(60);

fn kcat(args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    let found = Command::new("kcat").arg("-V").output();
    assert!(
        found.is_ok(),
        "kcat is not installed: run tests/run.sh (it installs kcat) or `apt-get install -y kcat`"
    );
    let mut cmd = Command::new("kcat");
    cmd.args(args);
    let out = run_bounded(cmd, stdin, KCAT_WAIT_MAX);
    assert!(
        out.status.success(),
        "kcat {args:?} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn kcat_metadata_lists_broker_and_topic() {
    let b = Broker::start();
    let bs = b.bootstrap();
    let t = topic_name("kcatmd");
    // Auto-create via a produce, then list.
    kcat(&["-b", &bs, "-P", "-t", &t], Some(b"hello\n"));
    let out = kcat(&["-b", &bs, "-L", "-t", &t], None);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains(&format!("at {bs}")), "{s}");
    assert!(
        s.contains(&format!("topic \"{t}\" with 1 partitions")),
        "{s}"
    );
}

#[test]
fn kcat_produce_consume_round_trip_with_keys() {
    let b = Broker::options().cores(2).start();
    let bs = b.bootstrap();
    let t = topic_name("kcatrt");
    let input: String = (0..50).map(|i| format!("k{i}:v{i}\n")).collect();
    kcat(
        &["-b", &bs, "-P", "-t", &t, "-p", "0", "-K", ":"],
        Some(input.as_bytes()),
    );
    let out = kcat(
        &[
            "-b",
            &bs,
            "-C",
            "-t",
            &t,
            "-p",
            "0",
            "-o",
            "beginning",
            "-e",
            "-f",
            "%o %k=%s\n",
        ],
        None,
    );
    let s = String::from_utf8_lossy(&out.stdout);
    let want: String = (0..50).map(|i| format!("{i} k{i}=v{i}\n")).collect();
    assert_eq!(s, want);
}

#[test]
fn kcat_compressed_produce_reads_back() {
    let b = Broker::start();
    let bs = b.bootstrap();
    for codec in ["gzip", "snappy", "lz4", "zstd"] {
        let t = topic_name(&format!("kcat{codec}"));
        let input: String = (0..200).map(|i| format!("{codec}-{i}\n")).collect();
        kcat(
            &["-b", &bs, "-P", "-t", &t, "-p", "0", "-z", codec],
            Some(input.as_bytes()),
        );
        let out = kcat(
            &[
                "-b",
                &bs,
                "-C",
                "-t",
                &t,
                "-o",
                "beginning",
                "-e",
                "-f",
                "%s\n",
            ],
            None,
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), input, "codec {codec}");
    }
}
