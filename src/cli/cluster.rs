//! `sluice cluster describe`: the cluster id, the controller and the brokers (DescribeCluster,
//! like `rpk cluster info` and `kafka-cluster.sh`).

use anyhow::Result;
use clap::Subcommand;
use futures_lite::future::block_on;
use sluice_client::admin;

use super::connect;

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Show the cluster id, the controller and every broker.
    Describe,
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
    }
    Ok(())
}
