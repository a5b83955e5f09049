//! `sluice cluster describe`: the cluster id, the controller and the brokers (DescribeCluster,
//! like `rpk cluster info` and `kafka-cluster.sh`). `sluice cluster logdirs`: every broker's
//! data directory and the partitions it holds there, with their size (DescribeLogDirs, like
//! `rpk cluster logdirs describe` and `kafka-log-dirs.sh --describe`). `sluice cluster status`:
//! the nodes and their liveness, the controller, and every partition's leader, epoch,
//! replicas, ISR and how far each replica is behind its leader (like `rpk cluster health` and
//! `kafka-topics.sh --describe`).

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
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
    /// Show the nodes and whether they are live, the controller, and per partition its
    /// leader, leader epoch, replicas, in-sync replicas and each replica's lag (in offsets and
    /// in bytes).
    Status {
        /// Only this topic's partitions.
        #[arg(long)]
        topic: Option<String>,
    },
}

/// Comma-separated node ids.
fn ids(v: &[i32]) -> String {
    v.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `sluice cluster status`. The partitions come from Metadata of the node the command reached
/// (every node names the current leaders). Each replica's lag is shown twice: in offsets, the
/// leader's log end minus the log end the leader knows the replica to have from raft progress
/// (DescribeQuorum asked of each partition's leader; `?` when the leader did not answer or
/// does not know yet), and in bytes, what its log holds fewer than the leader's
/// (DescribeLogDirs of each live node; `?` for a node that did not answer).
fn status(c: &mut super::Client, topic: Option<&str>) -> Result<()> {
    let d = block_on(admin::describe_cluster(c))?;
    let m = block_on(admin::metadata(c, None, false))?;
    // Each live node's partition sizes, and which nodes answered.
    let mut sizes: BTreeMap<(i32, String, i32), i64> = BTreeMap::new();
    let mut answered: BTreeMap<i32, bool> = BTreeMap::new();
    for b in &d.brokers {
        let dirs = if b.fenced {
            None
        } else {
            connect(&format!("{}:{}", b.host, b.port))
                .ok()
                .and_then(|mut bc| block_on(admin::describe_log_dirs(&mut bc)).ok())
        };
        answered.insert(b.id, dirs.is_some());
        for dir in dirs.into_iter().flatten() {
            for p in dir.partitions {
                sizes.insert((b.id, p.topic, p.partition), p.size);
            }
        }
    }
    // Each replicated partition's replica log ends, from its leader.
    let mut log_ends: BTreeMap<(String, i32), BTreeMap<i32, i64>> = BTreeMap::new();
    let mut led: BTreeMap<i32, Vec<(String, i32)>> = BTreeMap::new();
    for t in &m.topics {
        let Some(name) = t.name.as_ref() else {
            continue;
        };
        if topic.is_some_and(|w| w != name.as_str()) {
            continue;
        }
        for p in t.partitions.iter().filter(|p| p.replica_nodes.len() > 1) {
            led.entry(p.leader_id.0)
                .or_default()
                .push((name.to_string(), p.partition_index));
        }
    }
    for (leader, partitions) in led {
        let Some(b) = d
            .brokers
            .iter()
            .find(|b| b.id == leader && answered.get(&b.id).copied().unwrap_or(false))
        else {
            continue;
        };
        let quorums = connect(&format!("{}:{}", b.host, b.port))
            .ok()
            .and_then(|mut bc| block_on(admin::describe_quorum(&mut bc, &partitions)).ok());
        for q in quorums.into_iter().flatten().filter(|q| q.error_code == 0) {
            log_ends.insert(
                (q.topic, q.partition),
                q.replicas
                    .iter()
                    .filter(|r| r.log_end_offset >= 0)
                    .map(|r| (r.id, r.log_end_offset))
                    .collect(),
            );
        }
    }
    let down = d
        .brokers
        .iter()
        .filter(|b| b.fenced || !answered.get(&b.id).copied().unwrap_or(false))
        .count();
    let mut rows = Vec::new();
    let (mut leaderless, mut under) = (0usize, 0usize);
    let mut topics: Vec<_> = m
        .topics
        .iter()
        .filter_map(|t| Some((t.name.as_ref()?.to_string(), t)))
        .filter(|(n, _)| topic.is_none_or(|w| w == n))
        .collect();
    topics.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = topic {
        if topics.is_empty() || topics[0].1.error_code != 0 {
            return Err(anyhow!("topic {w} does not exist"));
        }
    }
    for (name, t) in topics {
        let mut ps: Vec<_> = t.partitions.iter().collect();
        ps.sort_by_key(|p| p.partition_index);
        for p in ps {
            let leader = p.leader_id.0;
            let replicas: Vec<i32> = p.replica_nodes.iter().map(|n| n.0).collect();
            let mut isr: Vec<i32> = p.isr_nodes.iter().map(|n| n.0).collect();
            isr.sort_unstable();
            if leader < 0 {
                leaderless += 1;
            }
            if isr.len() < replicas.len() {
                under += 1;
            }
            let leader_size = sizes.get(&(leader, name.clone(), p.partition_index));
            let lag = replicas
                .iter()
                .map(|r| {
                    let size = sizes.get(&(*r, name.clone(), p.partition_index));
                    match (leader_size, size) {
                        (Some(l), Some(s)) => format!("{r}:{}", (l - s).max(0)),
                        _ => format!("{r}:?"),
                    }
                })
                .collect::<Vec<_>>()
                .join(",");
            let ends = log_ends.get(&(name.clone(), p.partition_index));
            let leader_end = ends.and_then(|e| e.get(&leader));
            let offset_lag = replicas
                .iter()
                .map(
                    |r| match (replicas.len(), leader_end, ends.and_then(|e| e.get(r))) {
                        // One replica: it is the log, nothing to lag behind.
                        (1, _, _) => format!("{r}:0"),
                        (_, Some(l), Some(e)) => format!("{r}:{}", (l - e).max(0)),
                        _ => format!("{r}:?"),
                    },
                )
                .collect::<Vec<_>>()
                .join(",");
            rows.push((
                name.clone(),
                p.partition_index,
                if leader < 0 {
                    "none".to_string()
                } else {
                    leader.to_string()
                },
                p.leader_epoch,
                ids(&replicas),
                ids(&isr),
                offset_lag,
                lag,
            ));
        }
    }
    println!("CLUSTER     {}", d.cluster_id);
    println!(
        "CONTROLLER  {}",
        if d.controller_id < 0 {
            "none".to_string()
        } else {
            d.controller_id.to_string()
        }
    );
    println!(
        "HEALTHY     {}",
        if down == 0 && leaderless == 0 && under == 0 && d.controller_id >= 0 {
            "yes".to_string()
        } else {
            format!(
                "no ({down} nodes down, {leaderless} partitions without leader, {under} \
                 under-replicated)"
            )
        }
    );
    println!();
    println!("{:>6}  {:<30} STATE", "NODE", "ADDRESS");
    for b in &d.brokers {
        let mut state = match (b.fenced, answered.get(&b.id).copied().unwrap_or(false)) {
            (true, _) => "fenced",
            (false, true) => "live",
            (false, false) => "not answering",
        }
        .to_string();
        if b.id == d.controller_id {
            state.push_str(" (controller)");
        }
        println!(
            "{:>6}  {:<30} {state}",
            b.id,
            format!("{}:{}", b.host, b.port)
        );
    }
    println!();
    println!(
        "{:<30} {:>9}  {:>6} {:>6}  {:<12} {:<12} {:<20} LAG(bytes)",
        "TOPIC", "PARTITION", "LEADER", "EPOCH", "REPLICAS", "ISR", "LAG(offsets)"
    );
    for (name, p, leader, epoch, replicas, isr, offset_lag, lag) in rows {
        println!(
            "{name:<30} {p:>9}  {leader:>6} {epoch:>6}  {replicas:<12} {isr:<12} {offset_lag:<20} \
             {lag}"
        );
    }
    Ok(())
}

pub fn run(cmd: ClusterCommand, brokers: &str) -> Result<()> {
    let mut c = connect(brokers)?;
    match cmd {
        ClusterCommand::Status { topic } => status(&mut c, topic.as_deref())?,
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
