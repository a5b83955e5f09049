//! Debian's kcat (librdkafka 2.0.2) against the broker: the first client a new user tries.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Broker;

const KCAT_WAIT: Duration = Duration::from_secs(30);

fn kcat_path() -> String {
    let found = Command::new("kcat")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "kcat is not installed: run `apt-get install -y kcat` (tests/run.sh does it)"
    );
    "kcat".to_string()
}

fn kcat(args: &[&str], input: Option<&str>) -> String {
    let mut child = Command::new(kcat_path())
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kcat");
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input.as_bytes()).expect("write kcat stdin");
    }
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let Some(st) = common::wait_timeout(&mut child, KCAT_WAIT) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("kcat {args:?} did not finish in {KCAT_WAIT:?}");
    };
    let out = t_out.join().unwrap_or_default();
    let err = t_err.join().unwrap_or_default();
    assert!(st.success(), "kcat {args:?} failed ({st}): {err}");
    out
}

#[test]
fn kcat_produce_consume_and_metadata() {
    let b = Broker::start(2);
    let bs = b.bootstrap();
    let input: String = (0..100).map(|i| format!("key{i}:value {i}\n")).collect();
    kcat(
        &["-P", "-b", &bs, "-t", "kc", "-p", "0", "-K", ":"],
        Some(&input),
    );
    // Null key, empty-ish records, and compressed batches too.
    kcat(
        &["-P", "-b", &bs, "-t", "kc", "-p", "0", "-z", "lz4"],
        Some("lz4 a\nlz4 b\n"),
    );

    let out = kcat(
        &[
            "-C",
            "-b",
            &bs,
            "-t",
            "kc",
            "-p",
            "0",
            "-o",
            "beginning",
            "-e",
            "-f",
            "%o|%k|%s\\n",
        ],
        None,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 102, "{out}");
    for (i, l) in lines[..100].iter().enumerate() {
        assert_eq!(*l, format!("{i}|key{i}|value {i}"));
    }
    assert_eq!(lines[100], "100||lz4 a");
    assert_eq!(lines[101], "101||lz4 b");

    let md = kcat(&["-L", "-b", &bs, "-t", "kc"], None);
    assert!(md.contains(&format!("broker 0 at {bs}")), "{md}");
    assert!(md.contains("topic \"kc\" with 1 partitions"), "{md}");
    assert!(md.contains("partition 0, leader 0"), "{md}");
}
