//! The `sluice` binary: broker (`sluice start`) and admin/console commands.

use clap::Parser;
use sluice::cli::{Cli, Command};
use sluice::config::{BrokerConfig, LogFormat};

/// mimalloc instead of glibc malloc: the produce path's per-request allocations (the request's
/// task, the log's copy of its batches, the response) cost about a tenth less broker CPU per
/// request with it (perf/RESULTS.md, "Broker CPU per produce request: where it goes").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Log lines go to stderr: text by default, or one JSON object per line (`timestamp`, `level`,
/// `target`, `fields` holding `message` and the event's fields, `span`/`spans` when inside one).
fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Start(_)) {
        // Console commands behave like Unix tools: `sluice consume … | head` ends quietly.
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Start(args) => {
            let config = match BrokerConfig::from_args(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("sluice: {e}");
                    std::process::exit(2);
                }
            };
            init_logging(&config.log_level, config.log_format);
            match sluice::broker::run(config) {
                Ok(()) => Ok(()),
                Err(e) => {
                    eprintln!("sluice: {e}");
                    std::process::exit(2);
                }
            }
        }
        Command::Topic { command, brokers } => sluice::cli::topic::run(command, &brokers.list),
        Command::Group { command, brokers } => sluice::cli::group::run(command, &brokers.list),
        Command::ShareGroup { command, brokers } => {
            sluice::cli::share_group::run(command, &brokers.list)
        }
        Command::Cluster { command, brokers } => sluice::cli::cluster::run(command, &brokers.list),
        Command::Txn { command, brokers } => sluice::cli::txn::run(command, &brokers.list),
        Command::Produce(a) => sluice::cli::produce::run(a),
        Command::Consume(a) => sluice::cli::consume::run(a),
        Command::Status(a) => sluice::cli::status::run(a),
    };
    if let Err(e) = result {
        eprintln!("sluice: {e:#}");
        std::process::exit(1);
    }
}
