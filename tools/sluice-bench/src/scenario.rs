//! Named scenarios: one TOML file each in `perf/scenarios/`, holding one or more steps, each a
//! `sluice-bench` subcommand with its arguments. Extra arguments given to `scenario` (e.g.
//! `--duration 5s --brokers host:port`) are appended to every step and override its values.
//!
//! ```toml
//! description = "1 topic, 8 partitions, 1 KiB incompressible records, acks=all, 30 s"
//! [[step]]
//! command = "produce"
//! args = ["--topic", "s1", "--partitions", "8", "--size", "1KiB", "--acks", "all"]
//! ```
//! A step may say `cold = true`: it reads data that must not be in the broker's cache, so a
//! harness (perf/compare) restarts the broker before it. Run alone, the step just runs.
//!
//! The files of `perf/scenarios/` are compiled into the binary, so `sluice-bench scenario s1`
//! works from any directory; `--dir` (or `SLUICE_BENCH_SCENARIOS`) reads a directory instead.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
pub struct Scenario {
    pub description: String,
    #[serde(rename = "step")]
    pub steps: Vec<Step>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct Step {
    pub command: String,
    pub args: Vec<String>,
    #[serde(default)]
    pub cold: bool,
    /// Arguments from the overrides that this step must not receive (e.g. `--duration` for a
    /// step bounded by `--count`).
    #[serde(default)]
    pub ignore_overrides: Vec<String>,
}

/// The scenario files of `perf/scenarios/`, as compiled into the binary: (file stem, text).
pub const EMBEDDED: &[(&str, &str)] = &[
    (
        "s1-produce-max",
        include_str!("../../../perf/scenarios/s1-produce-max.toml"),
    ),
    (
        "s2-small-records",
        include_str!("../../../perf/scenarios/s2-small-records.toml"),
    ),
    (
        "s3-e2e-latency",
        include_str!("../../../perf/scenarios/s3-e2e-latency.toml"),
    ),
    (
        "s4-catch-up",
        include_str!("../../../perf/scenarios/s4-catch-up.toml"),
    ),
    (
        "s5-many-partitions",
        include_str!("../../../perf/scenarios/s5-many-partitions.toml"),
    ),
    (
        "s6-exactly-once",
        include_str!("../../../perf/scenarios/s6-exactly-once.toml"),
    ),
    (
        "s7-queue",
        include_str!("../../../perf/scenarios/s7-queue.toml"),
    ),
];

/// Where a scenario was found: a file, or one of the [`EMBEDDED`] texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Embedded(&'static str),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Embedded(stem) => write!(f, "{stem} (built in)"),
        }
    }
}

/// Whether the file stem `stem` answers to `name`: the exact stem, a stem ending in `-name`
/// (s1-produce-max for produce-max), or the `sN` prefix alone.
fn stem_matches(stem: &str, name: &str) -> bool {
    let prefix = stem.split('-').next().unwrap_or_default();
    stem == name || stem.ends_with(&format!("-{name}")) || prefix == name
}

/// Finds `name`: a path to a file; else in `dir` when one is given; else among the built-in
/// scenarios.
pub fn find(dir: Option<&Path>, name: &str) -> Result<Source> {
    let direct = PathBuf::from(name);
    if direct.is_file() {
        return Ok(Source::File(direct));
    }
    let Some(dir) = dir else {
        if let Some((stem, _)) = EMBEDDED.iter().find(|(stem, _)| stem_matches(stem, name)) {
            return Ok(Source::Embedded(stem));
        }
        let names: Vec<&str> = EMBEDDED.iter().map(|(stem, _)| *stem).collect();
        bail!("no scenario {name:?} (built in: {})", names.join(", "));
    };
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read scenario directory {}", dir.display()))?;
    let mut names = vec![];
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("toml") {
            continue;
        }
        let stem = p
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        if stem_matches(&stem, name) {
            return Ok(Source::File(p));
        }
        names.push(stem);
    }
    names.sort();
    bail!(
        "no scenario {name:?} in {} (have: {})",
        dir.display(),
        names.join(", ")
    )
}

pub fn load(source: &Source) -> Result<Scenario> {
    let text = match source {
        Source::File(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        Source::Embedded(stem) => EMBEDDED
            .iter()
            .find(|(s, _)| s == stem)
            .map(|(_, text)| text.to_string())
            .with_context(|| format!("no built-in scenario {stem}"))?,
    };
    let s: Scenario = toml::from_str(&text).with_context(|| format!("parsing {source}"))?;
    if s.steps.is_empty() {
        bail!("scenario {source} has no steps");
    }
    Ok(s)
}

/// The argument vector for one step, with overrides appended (minus those the step ignores).
pub fn step_argv(step: &Step, overrides: &[String]) -> Vec<String> {
    let mut argv = vec!["sluice-bench".to_string(), step.command.clone()];
    argv.extend(step.args.iter().cloned());
    let mut i = 0;
    while i < overrides.len() {
        let flag = &overrides[i];
        let takes_value = flag.starts_with("--")
            && !flag.contains('=')
            && overrides.get(i + 1).is_some_and(|v| !v.starts_with("--"));
        let n = if takes_value { 2 } else { 1 };
        let name = flag.split('=').next().unwrap_or(flag);
        if !step.ignore_overrides.iter().any(|f| f == name) {
            argv.extend(overrides[i..i + n].iter().cloned());
        }
        i += n;
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_appended_except_ignored_ones() {
        let step = Step {
            command: "consume".into(),
            args: vec!["--count".into(), "10".into()],
            cold: true,
            ignore_overrides: vec!["--duration".into()],
        };
        let argv = step_argv(
            &step,
            &[
                "--duration".into(),
                "5s".into(),
                "--brokers".into(),
                "h:1".into(),
                "--quiet".into(),
            ],
        );
        assert_eq!(
            argv,
            [
                "sluice-bench",
                "consume",
                "--count",
                "10",
                "--brokers",
                "h:1",
                "--quiet"
            ]
        );
    }

    #[test]
    fn every_scenario_in_perf_is_built_in_parses_and_its_steps_are_valid_commands() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../perf/scenarios");
        let mut on_disk = vec![];
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().and_then(|x| x.to_str()) != Some("toml") {
                continue;
            }
            let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
            let text = std::fs::read_to_string(&p).unwrap();
            let built_in = EMBEDDED.iter().find(|(s, _)| *s == stem);
            assert_eq!(
                built_in.map(|(_, t)| *t),
                Some(text.as_str()),
                "{stem}: perf/scenarios and the built-in list differ"
            );
            on_disk.push(stem);
        }
        assert_eq!(
            on_disk.len(),
            EMBEDDED.len(),
            "a built-in scenario has no file"
        );
        for (stem, _) in EMBEDDED {
            let s = load(&Source::Embedded(stem)).unwrap();
            for step in &s.steps {
                let argv = step_argv(step, &["--duration".into(), "1s".into()]);
                <crate::cli::Cli as clap::Parser>::try_parse_from(&argv)
                    .unwrap_or_else(|e| panic!("{stem}: {e}"));
            }
        }
        assert_eq!(
            find(None, "produce-max").unwrap(),
            Source::Embedded("s1-produce-max")
        );
        assert_eq!(find(None, "s4").unwrap(), Source::Embedded("s4-catch-up"));
        assert!(find(None, "nope").is_err());
        assert_eq!(
            find(Some(&dir), "s4").unwrap(),
            Source::File(dir.join("s4-catch-up.toml"))
        );
        assert!(find(Some(&dir), "nope").is_err());
    }
}
