//! `sluice-bench scenario NAME` works from any working directory: the scenario files are built
//! into the binary. `--scenario-dir` (alias of `--dir`) reads them from a directory instead.
//! Runs the built binary as a user would, with `--dry-run` (no broker needed).

use std::path::Path;
use std::process::{Command, Output};

fn bench(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .current_dir(cwd)
        .env_remove("SLUICE_BENCH_SCENARIOS")
        .args(args)
        .output()
        .expect("run sluice-bench")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn built_in_scenarios_run_from_a_directory_without_perf_scenarios() {
    let elsewhere = tempfile::tempdir().expect("temp dir");
    assert!(!elsewhere.path().join("perf/scenarios").exists());
    for name in [
        "s1",
        "produce-max",
        "s2",
        "s3",
        "s4",
        "s5",
        "s6",
        "exactly-once",
    ] {
        let o = bench(elsewhere.path(), &["scenario", name, "--dry-run"]);
        assert!(
            o.status.success(),
            "scenario {name} from {}: {}",
            elsewhere.path().display(),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(stdout(&o).contains("step 1"), "{name}: {}", stdout(&o));
    }
    // S1 carries acks=all and acks=1 side by side.
    let s1 = stdout(&bench(elsewhere.path(), &["scenario", "s1", "--dry-run"]));
    assert!(s1.contains("--acks all") && s1.contains("--acks 1"), "{s1}");
}

#[test]
fn scenario_dir_overrides_the_built_in_copies() {
    let elsewhere = tempfile::tempdir().expect("temp dir");
    let dir = tempfile::tempdir().expect("scenario dir");
    std::fs::write(
        dir.path().join("s9-custom.toml"),
        "description = \"custom\"\n[[step]]\ncommand = \"produce\"\nargs = [\"--topic\", \"custom-topic\"]\n",
    )
    .expect("write scenario");
    let d = dir.path().to_str().expect("utf-8 path");
    let o = bench(
        elsewhere.path(),
        &["scenario", "custom", "--scenario-dir", d, "--dry-run"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("custom-topic"), "{}", stdout(&o));
    // Only that directory is read then: a built-in name it lacks is an error naming it.
    let o = bench(
        elsewhere.path(),
        &["scenario", "s1", "--scenario-dir", d, "--dry-run"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("s9-custom"));
}
