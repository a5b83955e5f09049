//! `sluice topic create|list|describe|delete|add-partitions`.

use anyhow::{bail, Result};
use clap::Subcommand;
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use super::client::{check, error_name, Client};

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
    /// Raise a topic's partition count to N.
    AddPartitions {
        name: String,
        /// The new total number of partitions.
        #[arg(short = 'p', long)]
        partitions: i32,
    },
}

pub fn run(cmd: TopicCommand, brokers: &str) -> Result<()> {
    let mut c = Client::connect(brokers)?;
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
                cfgs.push(
                    CreatableTopicConfig::default()
                        .with_name(StrBytes::from_string(k.into()))
                        .with_value(Some(StrBytes::from_string(v.into()))),
                );
            }
            let req = CreateTopicsRequest::default()
                .with_topics(vec![CreatableTopic::default()
                    .with_name(TopicName(StrBytes::from_string(name.clone())))
                    .with_num_partitions(partitions)
                    .with_replication_factor(replicas)
                    .with_configs(cfgs)])
                .with_timeout_ms(30_000)
                .with_validate_only(dry_run);
            let resp: CreateTopicsResponse = c.call(ApiKey::CreateTopics, (2, 7), &req)?;
            let t = &resp.topics[0];
            check(
                t.error_code,
                &format!("cannot create topic {name}"),
                t.error_message.as_ref(),
            )?;
            println!(
                "{} topic {name} ({} partitions)",
                if dry_run { "validated" } else { "created" },
                t.num_partitions
            );
        }
        TopicCommand::List => {
            let resp: MetadataResponse = c.call(
                ApiKey::Metadata,
                (1, 12),
                &MetadataRequest::default().with_topics(None),
            )?;
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
            let req = DeleteTopicsRequest::default()
                .with_topic_names(vec![TopicName(StrBytes::from_string(name.clone()))])
                .with_topics(vec![DeleteTopicState::default()
                    .with_name(Some(TopicName(StrBytes::from_string(name.clone()))))])
                .with_timeout_ms(30_000);
            let resp: DeleteTopicsResponse = c.call(ApiKey::DeleteTopics, (1, 6), &req)?;
            let r = &resp.responses[0];
            check(
                r.error_code,
                &format!("cannot delete topic {name}"),
                r.error_message.as_ref(),
            )?;
            println!("deleted topic {name}");
        }
        TopicCommand::AddPartitions { name, partitions } => {
            let req = CreatePartitionsRequest::default()
                .with_topics(vec![CreatePartitionsTopic::default()
                    .with_name(TopicName(StrBytes::from_string(name.clone())))
                    .with_count(partitions)])
                .with_timeout_ms(30_000);
            let resp: CreatePartitionsResponse = c.call(ApiKey::CreatePartitions, (0, 3), &req)?;
            let r = &resp.results[0];
            check(
                r.error_code,
                &format!("cannot add partitions to {name}"),
                r.error_message.as_ref(),
            )?;
            println!("topic {name} now has {partitions} partitions");
        }
    }
    Ok(())
}

/// Earliest and latest offsets of `partitions` of `topic`.
pub fn offsets(
    c: &mut Client,
    topic: &str,
    partitions: &[i32],
    timestamp: i64,
) -> Result<Vec<(i32, i16, i64)>> {
    let req = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(
                partitions
                    .iter()
                    .map(|p| {
                        ListOffsetsPartition::default()
                            .with_partition_index(*p)
                            .with_timestamp(timestamp)
                    })
                    .collect(),
            )]);
    let resp: ListOffsetsResponse = c.call(ApiKey::ListOffsets, (1, 7), &req)?;
    Ok(resp
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(|p| (p.partition_index, p.error_code, p.offset))
        })
        .collect())
}

/// Partition indexes and the leader of each, from Metadata; fails if the topic is unknown.
pub fn partitions(c: &mut Client, topic: &str) -> Result<Vec<(i32, i32)>> {
    let req = MetadataRequest::default()
        .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
            TopicName(StrBytes::from_string(topic.to_string())),
        ))]))
        .with_allow_auto_topic_creation(false);
    let resp: MetadataResponse = c.call(ApiKey::Metadata, (4, 12), &req)?;
    let t = resp
        .topics
        .first()
        .ok_or_else(|| anyhow::anyhow!("broker returned no metadata for {topic}"))?;
    check(t.error_code, &format!("topic {topic}"), None)?;
    let mut ps: Vec<(i32, i32)> = t
        .partitions
        .iter()
        .map(|p| (p.partition_index, p.leader_id.0))
        .collect();
    ps.sort();
    Ok(ps)
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
    let req =
        DescribeConfigsRequest::default().with_resources(vec![DescribeConfigsResource::default()
            .with_resource_type(2)
            .with_resource_name(StrBytes::from_string(name.to_string()))
            .with_configuration_keys(None)]);
    let resp: DescribeConfigsResponse = c.call(ApiKey::DescribeConfigs, (1, 4), &req)?;
    let r = &resp.results[0];
    check(
        r.error_code,
        &format!("configs of {name}"),
        r.error_message.as_ref(),
    )?;
    println!();
    println!("{:<28} {:<20} SOURCE", "CONFIG", "VALUE");
    for cfg in &r.configs {
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
