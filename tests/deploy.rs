//! The deployment kit: the systemd unit verifies with `systemd-analyze`, the broker speaks
//! systemd's readiness protocol, reports its environment at start-up, and `sluice status`
//! describes a running broker (and says plainly when none runs).

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{answers_api_versions, sluice, topic_name, Broker, EXIT_WAIT_MAX, START_WAIT_MAX};

const UNIT: &str = include_str!("../tools/systemd/sluice.service");

#[test]
fn systemd_unit_verifies_without_warnings() {
    let dir = tempfile::tempdir().expect("temp dir");
    // `verify` checks that ExecStart's binary exists: point it at the one under test.
    let bin = common::sluice_bin();
    assert!(
        UNIT.contains("ExecStart=/usr/local/bin/sluice start"),
        "the unit's ExecStart changed; update this test"
    );
    let unit = UNIT.replace("/usr/local/bin/sluice", &bin.display().to_string());
    let path = dir.path().join("sluice.service");
    std::fs::write(&path, unit).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect(
            "systemd-analyze is needed to verify the unit (Debian package `systemd`; \
             tests/run.sh installs it)",
        );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify failed: {stderr}");
    // Unknown keys and unparsable values are only warnings to systemd: refuse them here.
    assert!(stderr.trim().is_empty(), "verify warned: {stderr}");
    for key in [
        "Type=notify",
        "User=sluice",
        "LimitNOFILE=",
        "LimitMEMLOCK=",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
    ] {
        assert!(UNIT.contains(key), "the unit lacks {key}");
    }
}

/// Receives one datagram from the notification socket, waiting at most `max`.
fn next_notification(sock: &UnixDatagram, max: Duration) -> String {
    sock.set_read_timeout(Some(max)).expect("timeout");
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("a notification from the broker");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn broker_notifies_systemd_when_ready_and_when_stopping() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let mut b = Broker::options()
        .env("NOTIFY_SOCKET", sock_path.display().to_string())
        .start();
    assert_eq!(next_notification(&sock, START_WAIT_MAX), "READY=1");
    assert!(answers_api_versions(b.addr), "ready but not answering");
    b.signal(libc::SIGTERM);
    assert_eq!(next_notification(&sock, EXIT_WAIT_MAX), "STOPPING=1");
    let status = b
        .wait_exit(EXIT_WAIT_MAX)
        .expect("broker exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
}

fn status_json(data_dir: &Path) -> serde_json::Value {
    let out = sluice(
        &[
            "status",
            "--data-dir",
            &data_dir.display().to_string(),
            "--format",
            "json",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

#[test]
fn status_describes_the_running_broker_and_fails_in_one_line_when_none_runs() {
    let mut b = Broker::options().cores(2).start();
    let dir = b.data_dir();
    let bs = b.bootstrap();
    let t = topic_name("status");
    let out = sluice(&["topic", "create", &t, "-p", "3", "--brokers", &bs], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sluice(
        &["produce", &t, "--brokers", &bs],
        Some(b"one\ntwo\nthree\n".as_slice()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let s = status_json(&dir);
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["pid"].as_i64(), b.pid().map(i64::from));
    assert_eq!(s["shards"], 2);
    assert_eq!(s["cluster"], false);
    assert_eq!(s["listen"], b.addr.to_string());
    assert!(s["topics"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["partitions"].as_u64().unwrap() >= 3, "{s}");
    assert!(s["disk_used_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["disk_free_bytes"].as_u64().unwrap() > 0, "{s}");
    let per_topic = s["topic_disk_bytes"].as_array().expect("per-topic list");
    let ours = per_topic
        .iter()
        .find(|e| e[0] == t.as_str())
        .unwrap_or_else(|| panic!("{t} missing from {s}"));
    assert!(ours[1].as_u64().unwrap() > 0, "{ours}");

    let out = sluice(&["status", "--data-dir", &dir.display().to_string()], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("running (pid"), "{text}");
    assert!(text.contains(&t), "{text}");

    // The start-up environment report names the data dir's filesystem and the limits.
    let log = b.stderr();
    assert!(log.contains("environment"), "{log}");
    assert!(log.contains("data_dir_fs"), "{log}");
    assert!(log.contains("nofile_limit"), "{log}");

    b.sigkill();
    let out = sluice(&["status", "--data-dir", &dir.display().to_string()], None);
    assert!(!out.status.success(), "status of a killed broker succeeded");
    let e = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert_eq!(e.lines().count(), 1, "not one line: {e}");
    assert!(e.contains("no broker is running"), "{e}");

    let empty = tempfile::tempdir().expect("temp dir");
    let out = sluice(
        &["status", "--data-dir", &empty.path().display().to_string()],
        None,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no broker has run"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
