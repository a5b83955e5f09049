//! `sluice-bench` entry point: parse, run, print the summary; any failure is one line on stderr
//! and exit status 1 (2 for bad flags).

use clap::Parser;
use sluice_bench::cli::{Cli, Command};
use sluice_bench::report::Summary;
use sluice_bench::runner::{self, Workload};
use sluice_bench::scenario;
use std::process::ExitCode;

fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match run_argv(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("sluice-bench: {msg} (see --help)");
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("sluice-bench: error: {}", one_line(&format!("{e:#}")));
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Usage(String),
    Run(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Run(e)
    }
}

fn run_argv(args: &[String]) -> Result<(), Failure> {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return Ok(());
            }
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .to_string();
            return Err(Failure::Usage(first));
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
    let kind = match &cli.command {
        Command::Produce(_) => "produce",
        Command::Consume(_) => "consume",
        Command::E2e(_) => "e2e",
        Command::ExactlyOnce(_) => "exactly-once",
        Command::ShareConsume(_) => "share-consume",
        Command::Scenario(_) => "scenario",
    };
    let (workload, json) = match cli.command {
        Command::Produce(p) => {
            let json = p.common.json.clone();
            (
                Workload {
                    common: p.common,
                    produce: Some(p.produce),
                    consume: None,
                    exactly_once: None,
                    share: None,
                },
                json,
            )
        }
        Command::Consume(c) => {
            let json = c.common.json.clone();
            (
                Workload {
                    common: c.common,
                    produce: None,
                    consume: Some(c.consume),
                    exactly_once: None,
                    share: None,
                },
                json,
            )
        }
        Command::E2e(e) => {
            let json = e.common.json.clone();
            if e.consume.until_end {
                return Err(Failure::Usage(
                    "error: --until-end is for `consume` only".into(),
                ));
            }
            (
                Workload {
                    common: e.common,
                    produce: Some(e.produce),
                    consume: Some(e.consume),
                    exactly_once: None,
                    share: None,
                },
                json,
            )
        }
        Command::ExactlyOnce(x) => {
            let json = x.common.json.clone();
            (
                Workload {
                    common: x.common,
                    produce: None,
                    consume: None,
                    exactly_once: Some((x.txn, x.eos)),
                    share: None,
                },
                json,
            )
        }
        Command::ShareConsume(s) => {
            let json = s.common.json.clone();
            (
                Workload {
                    common: s.common,
                    produce: None,
                    consume: None,
                    exactly_once: None,
                    share: Some(s.share),
                },
                json,
            )
        }
        Command::Scenario(s) => return run_scenario(s),
    };
    if let Some(p) = &workload.produce {
        p.validate()
            .map_err(|e| Failure::Usage(format!("error: {e}")))?;
    }
    if let Some(c) = &workload.consume {
        c.validate()
            .map_err(|e| Failure::Usage(format!("error: {e}")))?;
    }
    if let Some(s) = &workload.share {
        s.validate()
            .map_err(|e| Failure::Usage(format!("error: {e}")))?;
    }
    if let Some((t, x)) = &workload.exactly_once {
        t.validate()
            .and_then(|()| x.validate())
            .map_err(|e| Failure::Usage(format!("error: {e}")))?;
    }
    workload
        .common
        .validate()
        .map_err(|e| Failure::Usage(format!("error: {e}")))?;
    let report = workload.common.report.clone().map(|dir| {
        let name = workload.common.report_name.clone().unwrap_or_else(|| {
            format!(
                "{}-{kind}-{}",
                chrono::Utc::now().format("%Y%m%d-%H%M%S"),
                workload.common.topic
            )
        });
        (dir, name)
    });
    let summary = runner::run(workload)?;
    emit(&summary, json.as_deref())?;
    if let Some((dir, name)) = report {
        let run = sluice_bench::chart::write_run(&dir, &name, &summary.json)?;
        println!(
            "report: {} (index {})",
            run.display(),
            dir.join("index.html").display()
        );
    }
    Ok(())
}

fn emit(summary: &Summary, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    print!("{}", summary.text);
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&summary.json)?;
        std::fs::write(path, text + "\n")
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

fn run_scenario(s: sluice_bench::cli::ScenarioCmd) -> Result<(), Failure> {
    let source = scenario::find(s.dir.as_deref(), &s.name)
        .map_err(|e| Failure::Usage(format!("error: {e:#}")))?;
    let sc = scenario::load(&source)?;
    let steps: Vec<(usize, &scenario::Step)> = match s.step {
        Some(n) if n >= 1 && n <= sc.steps.len() => vec![(n, &sc.steps[n - 1])],
        Some(n) => {
            return Err(Failure::Usage(format!(
                "error: scenario has {} steps, no step {n}",
                sc.steps.len()
            )))
        }
        None => sc
            .steps
            .iter()
            .enumerate()
            .map(|(i, st)| (i + 1, st))
            .collect(),
    };
    println!("scenario {source}: {}", sc.description);
    for (n, step) in steps {
        let argv = scenario::step_argv(step, &s.overrides);
        println!(
            "step {n}{}: {}",
            if step.cold { " (cold)" } else { "" },
            argv.join(" ")
        );
        if !s.dry_run {
            if let Some(Command::Scenario(_)) = Cli::try_parse_from(&argv).ok().map(|c| c.command) {
                return Err(Failure::Usage(
                    "error: a scenario step cannot be a scenario".into(),
                ));
            }
            run_argv(&argv)?;
        }
    }
    Ok(())
}
