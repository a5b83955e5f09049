//! `sluice cluster describe`: the cluster id, the controller and the brokers (DescribeCluster,
//! like `rpk cluster info` and `kafka-cluster.sh`). `sluice cluster logdirs`: every broker's
//! data directory and the partitions it holds there, with their size (DescribeLogDirs, like
//! `rpk cluster logdirs describe` and `kafka-log-dirs.sh --describe`).

use anyhow::Result;
use clap::Subcommand;
use futures_lite::future::block_on;
use sluice_client::admin;

use super::connect;

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Show the cluster id, the controller and every broker.
    Describe,
    /// Show each live broker's data directory and the size of every partition held there.
    Logdirs {
        /// Only this topic's partitions.
        #[arg(long)]
        topic: Option<String>,
    },
}

pub fn run(cmd: ClusterCommand, brokers: &str) -> Result<()> {
    let mut c = connect(brokers)?;
    match cmd {
        ClusterCommand::Describe => {
            let d = block_on(admin::describe_cluster(&mut c))?;
            println!("CLUSTER     {}", d.cluster_id);
            println!("CONTROLLER  {}", d.controller_id);
            println!();
            println!("{:>6}  {:<30} {:>6}  STATE", "ID", "HOST", "PORT");
            for b in &d.brokers {
                let mut state = if b.fenced { "fenced" } else { "live" }.to_string();
                if b.id == d.controller_id {
                    state.push_str(" (controller)");
                }
                println!("{:>6}  {:<30} {:>6}  {state}", b.id, b.host, b.port);
            }
        }
        ClusterCommand::Logdirs { topic } => {
            let d = block_on(admin::describe_cluster(&mut c))?;
            println!(
                "{:>6}  {:<40} {:>9}  {:>14} {:>8}",
                "BROKER", "TOPIC", "PARTITION", "SIZE", "LAG"
            );
            for b in d.brokers.iter().filter(|b| !b.fenced) {
                let addr = format!("{}:{}", b.host, b.port);
                let mut bc = connect(&addr)?;
                for dir in block_on(admin::describe_log_dirs(&mut bc))? {
                    let space = match (dir.usable_bytes, dir.total_bytes) {
                        (Some(free), Some(total)) => format!(" ({free} of {total} bytes free)"),
                        _ => String::new(),
                    };
                    println!("{:>6}  {}{space}", b.id, dir.path);
                    for p in dir
                        .partitions
                        .iter()
                        .filter(|p| topic.as_ref().is_none_or(|t| *t == p.topic))
                    {
                        println!(
                            "{:>6}  {:<40} {:>9}  {:>14} {:>8}",
                            b.id, p.topic, p.partition, p.size, p.offset_lag
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
