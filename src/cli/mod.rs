//! The `sluice` command line: `start` runs the broker; `topic`, `produce` and `consume` are
//! Kafka-protocol clients (like `rpk` and `kafka-topics.sh`). Errors are one line and a non-zero
//! exit code. Holds no broker logic: the commands speak to brokers through `sluice-client`, the
//! one client the load generator uses too.

use std::time::Duration;

use clap::{Parser, Subcommand};
use sluice_client::conn::{connect_blocking, BlockingConnection, Timeouts};

use crate::config::StartArgs;

pub mod cluster;
pub mod consume;
pub mod group;
pub mod produce;
pub mod share_group;
pub mod status;
pub mod topic;
pub mod txn;

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

/// Where the admin commands (`topic`, `group`, `cluster`) connect.
#[derive(clap::Args, Debug)]
pub struct Brokers {
    /// Comma-separated bootstrap brokers.
    #[arg(
        id = "brokers",
        long = "brokers",
        value_name = "BROKERS",
        global = true,
        default_value = "127.0.0.1:9092",
        env = "SLUICE_BROKERS"
    )]
    pub list: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the broker.
    Start(Box<StartArgs>),
    /// Create, list, describe and delete topics.
    Topic {
        #[command(subcommand)]
        command: topic::TopicCommand,
        #[command(flatten)]
        brokers: Brokers,
    },
    /// List, describe, delete consumer groups and reset their offsets.
    Group {
        #[command(subcommand)]
        command: group::GroupCommand,
        #[command(flatten)]
        brokers: Brokers,
    },
    /// List and describe share groups (KIP-932) and reset their start offsets.
    ShareGroup {
        #[command(subcommand)]
        command: share_group::ShareGroupCommand,
        #[command(flatten)]
        brokers: Brokers,
    },
    /// Describe the cluster: its id, controller and brokers.
    Cluster {
        #[command(subcommand)]
        command: cluster::ClusterCommand,
        #[command(flatten)]
        brokers: Brokers,
    },
    /// List and describe transactions.
    Txn {
        #[command(subcommand)]
        command: txn::TxnCommand,
        #[command(flatten)]
        brokers: Brokers,
    },
    /// Produce stdin lines as records.
    Produce(produce::ProduceArgs),
    /// Print records of a topic.
    Consume(consume::ConsumeArgs),
    /// Show the broker running on a data dir: version, uptime, shards, topics, disk use.
    Status(status::StatusArgs),
}

/// A connection of the command line: a blocking socket, calls driven with `block_on`.
pub type Client = BlockingConnection;

/// The client id in every request header.
const CLIENT_ID: &str = "sluice-cli";

/// A broker that does not accept the connection within this long is unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A broker silent for this long fails the command (fetches wait at most 500 ms).
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Connects to the first reachable broker of a comma-separated list.
pub fn connect(brokers: &str) -> anyhow::Result<Client> {
    connect_blocking(
        brokers,
        CLIENT_ID,
        Timeouts {
            connect: CONNECT_TIMEOUT,
            io: IO_TIMEOUT,
        },
    )
}
