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

/// Finds `name` in `dir`: an exact file stem, a stem ending in `-name` (s1-produce-max), the
/// `sN` prefix alone, or a path to a file.
pub fn find(dir: &Path, name: &str) -> Result<PathBuf> {
    let direct = PathBuf::from(name);
    if direct.is_file() {
        return Ok(direct);
    }
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
        let prefix = stem.split('-').next().unwrap_or_default();
        if stem == name || stem.ends_with(&format!("-{name}")) || prefix == name {
            return Ok(p);
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

pub fn load(path: &Path) -> Result<Scenario> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let s: Scenario =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if s.steps.is_empty() {
        bail!("scenario {} has no steps", path.display());
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
    fn every_scenario_in_perf_parses_and_its_steps_are_valid_commands() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../perf/scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().and_then(|x| x.to_str()) != Some("toml") {
                continue;
            }
            let s = load(&p).unwrap();
            for step in &s.steps {
                let argv = step_argv(step, &["--duration".into(), "1s".into()]);
                <crate::cli::Cli as clap::Parser>::try_parse_from(&argv)
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
            n += 1;
        }
        assert!(n >= 5, "expected the five scenarios, found {n}");
        assert!(find(&dir, "produce-max")
            .unwrap()
            .ends_with("s1-produce-max.toml"));
        assert!(find(&dir, "s4").unwrap().ends_with("s4-catch-up.toml"));
        assert!(find(&dir, "nope").is_err());
    }
}
