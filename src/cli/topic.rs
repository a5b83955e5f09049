//! `sluice topic create|list|describe|delete|alter-config|add-partitions`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use clap::Subcommand;
use futures_lite::future::block_on;
use sluice_client::admin::{self, NewTopic};
use sluice_client::error_name;

use super::{connect, Client};

#[derive(Subcommand, Debug)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        /// Number of partitions (-1: the broker default).
        #[arg(short = 'p', long, default_value_t = -1)]
        partitions: i32,
        /// Replication factor (only 1 on a single node).
        #[arg(short = 'r', long, default_value_t = -1)]
        replicas: i16,
        /// Topic config as key=value; repeatable.
        #[arg(short = 'c', long = "config")]
        configs: Vec<String>,
        /// Validate only; create nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// List topics.
    List,
    /// Show partitions, leaders, offsets and configs of a topic.
    Describe { name: String },
    /// Delete a topic.
    Delete { name: String },
    /// Change a topic's configs (IncrementalAlterConfigs), e.g.
    /// `--set retention.ms=3600000 --delete segment.ms --append cleanup.policy=compact`.
    AlterConfig {
        name: String,
        /// key=value to set; repeatable (also `--add-config`, as kafka-configs).
        #[arg(long = "set", visible_alias = "add-config", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Key to return to its default; repeatable (also `--delete-config`).
        #[arg(long = "delete", visible_alias = "delete-config", value_name = "KEY")]
        delete: Vec<String>,
        /// key=item[,item] to add to a list config; repeatable.
        #[arg(long, value_name = "KEY=ITEMS")]
        append: Vec<String>,
        /// key=item[,item] to remove from a list config; repeatable.
        #[arg(long, value_name = "KEY=ITEMS")]
        subtract: Vec<String>,
        /// Validate only; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Raise a topic's partition count to N.
    AddPartitions {
        name: String,
        /// The new total number of partitions.
        #[arg(short = 'p', long)]
        partitions: i32,
    },
}

/// The connection for a topic change: in a cluster only the controller takes them (others
/// answer NOT_CONTROLLER), so the CLI connects to the broker Metadata names as the controller;
/// with one broker, or no controller known, it keeps `c`.
fn to_controller(mut c: Client) -> Result<Client> {
    let m = block_on(admin::metadata(&mut c, Some(&[]), false))?;
    let id = m.controller_id.0;
    match m.brokers.iter().find(|b| b.node_id.0 == id) {
        Some(b) if m.brokers.len() > 1 => connect(&format!("{}:{}", b.host, b.port)),
        _ => Ok(c),
    }
}

pub fn run(cmd: TopicCommand, brokers: &str) -> Result<()> {
    let mut c = connect(brokers)?;
    match cmd {
        TopicCommand::Create {
            name,
            partitions,
            replicas,
            configs,
            dry_run,
        } => {
            let mut cfgs = Vec::new();
            for kv in configs {
                let Some((k, v)) = kv.split_once('=') else {
                    bail!("invalid --config '{kv}': expected key=value");
                };
                cfgs.push((k.to_string(), v.to_string()));
            }
            let new = NewTopic {
                name: name.clone(),
                partitions,
                replication_factor: replicas,
                configs: cfgs,
                validate_only: dry_run,
            };
            let mut c = to_controller(c)?;
            let n = block_on(admin::create_topic(&mut c, &new))?;
            println!(
                "{} topic {name} ({n} partitions)",
                if dry_run { "validated" } else { "created" },
            );
        }
        TopicCommand::List => {
            let resp = block_on(admin::metadata(&mut c, None, false))?;
            println!("{:<40} {:>10} {:>8}", "NAME", "PARTITIONS", "INTERNAL");
            let mut topics: Vec<_> = resp.topics.iter().collect();
            topics.sort_by_key(|t| t.name.as_ref().map(|n| n.to_string()));
            for t in topics {
                let name = t.name.as_ref().map(|n| n.to_string()).unwrap_or_default();
                println!(
                    "{:<40} {:>10} {:>8}",
                    name,
                    t.partitions.len(),
                    t.is_internal
                );
            }
        }
        TopicCommand::Describe { name } => describe(&mut c, &name)?,
        TopicCommand::Delete { name } => {
            let mut c = to_controller(c)?;
            block_on(admin::delete_topic(&mut c, &name))?;
            println!("deleted topic {name}");
        }
        TopicCommand::AlterConfig {
            name,
            set,
            delete,
            append,
            subtract,
            dry_run,
        } => {
            let pair = |kv: &str, flag: &str| -> Result<(String, String)> {
                match kv.split_once('=') {
                    Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                    _ => bail!("invalid --{flag} '{kv}': expected key=value"),
                }
            };
            let mut ops = Vec::new();
            for kv in &set {
                let (k, v) = pair(kv, "set")?;
                ops.push(admin::ConfigOp::Set(k, v));
            }
            for k in delete {
                ops.push(admin::ConfigOp::Delete(k));
            }
            for kv in &append {
                let (k, v) = pair(kv, "append")?;
                ops.push(admin::ConfigOp::Append(k, v));
            }
            for kv in &subtract {
                let (k, v) = pair(kv, "subtract")?;
                ops.push(admin::ConfigOp::Subtract(k, v));
            }
            if ops.is_empty() {
                bail!("nothing to change: give --set, --delete, --append or --subtract");
            }
            let mut c = to_controller(c)?;
            block_on(admin::alter_topic_configs(&mut c, &name, &ops, dry_run))?;
            println!(
                "{} {} config change(s) of topic {name}",
                if dry_run { "validated" } else { "applied" },
                ops.len()
            );
        }
        TopicCommand::AddPartitions { name, partitions } => {
            let mut c = to_controller(c)?;
            block_on(admin::create_partitions(&mut c, &name, partitions))?;
            println!("topic {name} now has {partitions} partitions");
        }
    }
    Ok(())
}

/// (partition, error code, offset) for `timestamp` of `partitions` of `topic`, in the order
/// given. Each partition is asked of its leader (in a cluster, partitions live on different
/// brokers); with one leader, or none known, everything is asked of `c`.
pub fn offsets(
    c: &mut Client,
    topic: &str,
    partitions: &[i32],
    timestamp: i64,
) -> Result<Vec<(i32, i16, i64)>> {
    let meta = block_on(admin::topic_metadata(c, topic, false)).ok();
    let leader_of = |p: i32| {
        meta.as_ref()
            .and_then(|m| m.partitions.iter().find(|x| x.index == p))
            .and_then(|x| x.leader.clone())
    };
    let mut by_leader: BTreeMap<Option<String>, Vec<i32>> = BTreeMap::new();
    for p in partitions {
        by_leader.entry(leader_of(*p)).or_default().push(*p);
    }
    if by_leader.len() <= 1 {
        return block_on(admin::list_offsets(c, topic, partitions, timestamp));
    }
    let mut found = BTreeMap::new();
    for (leader, ps) in by_leader {
        let answers = match leader {
            Some(addr) => {
                let mut lc = connect(&addr)?;
                block_on(admin::list_offsets(&mut lc, topic, &ps, timestamp))?
            }
            None => block_on(admin::list_offsets(c, topic, &ps, timestamp))?,
        };
        for a in answers {
            found.insert(a.0, a);
        }
    }
    Ok(partitions
        .iter()
        .filter_map(|p| found.get(p).copied())
        .collect())
}

/// Partition indexes and the leader of each, from Metadata; fails if the topic is unknown.
pub fn partitions(c: &mut Client, topic: &str) -> Result<Vec<(i32, i32)>> {
    block_on(admin::partitions(c, topic))
}

fn describe(c: &mut Client, name: &str) -> Result<()> {
    let ps = partitions(c, name)?;
    let idx: Vec<i32> = ps.iter().map(|p| p.0).collect();
    let starts = offsets(c, name, &idx, -2)?;
    let ends = offsets(c, name, &idx, -1)?;
    println!("TOPIC       {name}");
    println!("PARTITIONS  {}", ps.len());
    println!();
    println!(
        "{:>9} {:>7} {:>15} {:>15}",
        "PARTITION", "LEADER", "LOG-START", "HIGH-WATERMARK"
    );
    // An offset, or the error the broker gave for that partition.
    let shown = |list: &[(i32, i16, i64)], p: i32| {
        list.iter()
            .find(|x| x.0 == p)
            .map(|x| {
                if x.1 == 0 {
                    x.2.to_string()
                } else {
                    error_name(x.1)
                }
            })
            .unwrap_or_default()
    };
    for (p, leader) in &ps {
        let (s, e) = (shown(&starts, *p), shown(&ends, *p));
        println!("{p:>9} {leader:>7} {s:>15} {e:>15}");
    }
    let configs = block_on(admin::topic_configs(c, name))?;
    println!();
    println!("{:<28} {:<20} SOURCE", "CONFIG", "VALUE");
    for cfg in &configs {
        let src = match cfg.config_source {
            1 => "topic",
            4 => "broker",
            5 => "default",
            _ => "other",
        };
        println!(
            "{:<28} {:<20} {src}",
            cfg.name.as_str(),
            cfg.value.as_ref().map(|v| v.as_str()).unwrap_or("-")
        );
    }
    Ok(())
}
