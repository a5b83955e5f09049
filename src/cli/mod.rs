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

/// Error codes after which a client asks for Metadata again and retries on the leader it names
/// (the partition moved, or is electing one).
const RETRIABLE_LEADER_ERRORS: [i16; 2] = [
    5, // LEADER_NOT_AVAILABLE
    6, // NOT_LEADER_OR_FOLLOWER
];

/// Whether `code` means "ask Metadata again and retry on the leader it names".
pub fn leader_moved(code: i16) -> bool {
    RETRIABLE_LEADER_ERRORS.contains(&code)
}

/// How long a command keeps retrying a partition whose leader moved or is being elected
/// (Kafka's producers retry for `delivery.timeout.ms`, 2 minutes; an election here takes
/// seconds).
pub const LEADER_RETRY_MAX: Duration = Duration::from_secs(30);
/// Pause between Metadata refreshes while a leader is missing.
pub const LEADER_RETRY_BACKOFF: Duration = Duration::from_millis(250);

/// Connections to the leaders of one topic's partitions, as Metadata names them: how a Kafka
/// client routes Produce and Fetch in a cluster (on a single node every partition has the
/// same leader and one connection serves them all). Leaders are looked up through the
/// bootstrap connection; one connection per leader node, opened on first use.
pub struct Leaders {
    topic: String,
    bootstrap: Client,
    /// Each partition's leader node and its `host:port`, from the last Metadata (`None` while
    /// it has none), by partition index.
    leaders: Vec<Option<(i32, String)>>,
    conns: std::collections::HashMap<i32, Client>,
}

impl Leaders {
    /// Looks up `topic`'s partitions and leaders through `bootstrap` (creating the topic when
    /// the broker auto-creates topics and `auto_create`); fails naming the topic's error.
    pub fn new(bootstrap: Client, topic: &str, auto_create: bool) -> anyhow::Result<Leaders> {
        let mut l = Leaders {
            topic: topic.to_string(),
            bootstrap,
            leaders: vec![],
            conns: Default::default(),
        };
        l.refresh(auto_create)?;
        Ok(l)
    }

    /// Asks Metadata again.
    pub fn refresh(&mut self, auto_create: bool) -> anyhow::Result<()> {
        let t = futures_lite::future::block_on(sluice_client::admin::topic_metadata(
            &mut self.bootstrap,
            &self.topic,
            auto_create,
        ))?;
        sluice_client::check(t.error_code, &format!("topic {}", self.topic), None)?;
        self.leaders = t
            .partitions
            .iter()
            .map(|p| p.leader.clone().map(|addr| (p.leader_id, addr)))
            .collect();
        Ok(())
    }

    pub fn partition_count(&self) -> i32 {
        self.leaders.len() as i32
    }

    /// `partitions` grouped by leader node; those with no leader now are in `None`'s list.
    pub fn by_leader(&self, partitions: &[i32]) -> Vec<(Option<i32>, Vec<i32>)> {
        let mut out: std::collections::BTreeMap<Option<i32>, Vec<i32>> = Default::default();
        for &p in partitions {
            let node = usize::try_from(p)
                .ok()
                .and_then(|i| self.leaders.get(i))
                .and_then(|l| l.as_ref().map(|(n, _)| *n));
            out.entry(node).or_default().push(p);
        }
        out.into_iter().collect()
    }

    /// The connection to leader `node` (opened on first use).
    pub fn conn(&mut self, node: i32) -> anyhow::Result<&mut Client> {
        if !self.conns.contains_key(&node) {
            let addr = self
                .leaders
                .iter()
                .flatten()
                .find(|(n, _)| *n == node)
                .map(|(_, a)| a.clone())
                .ok_or_else(|| anyhow::anyhow!("broker {node} is no leader of {}", self.topic))?;
            self.conns.insert(node, connect(&addr)?);
        }
        Ok(self.conns.get_mut(&node).expect("inserted above"))
    }

    /// Forgets the connection to `node` (after an I/O error: the next use reconnects).
    pub fn drop_conn(&mut self, node: i32) {
        self.conns.remove(&node);
    }
}
