//! The `sluice` command line: `start` runs the broker; `topic`, `produce` and `consume` are
//! Kafka-protocol clients (like `rpk` and `kafka-topics.sh`). Errors are one line and a non-zero
//! exit code. Holds no broker logic.

use clap::{Parser, Subcommand};

use crate::config::StartArgs;

pub mod client;
pub mod consume;
pub mod group;
pub mod produce;
pub mod topic;

#[derive(Parser, Debug)]
#[command(
    name = "sluice",
    version,
    about = "A Kafka-compatible streaming broker, thread-per-core on io_uring"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the broker.
    Start(StartArgs),
    /// Create, list, describe and delete topics.
    Topic {
        #[command(subcommand)]
        command: topic::TopicCommand,
        /// Comma-separated bootstrap brokers.
        #[arg(
            long,
            global = true,
            default_value = "127.0.0.1:9092",
            env = "SLUICE_BROKERS"
        )]
        brokers: String,
    },
    /// List, describe, delete consumer groups and reset their offsets.
    Group {
        #[command(subcommand)]
        command: group::GroupCommand,
        /// Comma-separated bootstrap brokers.
        #[arg(
            long,
            global = true,
            default_value = "127.0.0.1:9092",
            env = "SLUICE_BROKERS"
        )]
        brokers: String,
    },
    /// Produce stdin lines as records.
    Produce(produce::ProduceArgs),
    /// Print records of a topic.
    Consume(consume::ConsumeArgs),
}
