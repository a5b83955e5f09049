//! `sluice share-group list|describe|reset-offsets`: KIP-932 share groups (ListGroups with the
//! `share` type, ShareGroupDescribe, DescribeShareGroupOffsets, AlterShareGroupOffsets).

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use futures_lite::future::block_on;
use kafka_protocol::messages::alter_share_group_offsets_request::{
    AlterShareGroupOffsetsRequestPartition, AlterShareGroupOffsetsRequestTopic,
};
use kafka_protocol::messages::describe_share_group_offsets_request::DescribeShareGroupOffsetsRequestGroup;
use kafka_protocol::messages::{
    AlterShareGroupOffsetsRequest, DescribeShareGroupOffsetsRequest, GroupId, ListGroupsRequest,
    ShareGroupDescribeRequest, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use sluice_client::{admin, check};

use super::connect;

#[derive(Subcommand, Debug)]
pub enum ShareGroupCommand {
    /// List share groups and their states.
    List,
    /// Members, assignments and share-partition start offsets of a share group.
    Describe { group: String },
    /// Move an empty share group's start offsets on every partition of a topic.
    ResetOffsets {
        group: String,
        #[arg(long)]
        topic: String,
        #[arg(long, group = "to")]
        to_earliest: bool,
        #[arg(long, group = "to")]
        to_latest: bool,
        #[arg(long, group = "to")]
        to_offset: Option<i64>,
    },
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

pub fn run(cmd: ShareGroupCommand, brokers: &str) -> Result<()> {
    let mut c = connect(brokers)?;
    match cmd {
        ShareGroupCommand::List => {
            let req = ListGroupsRequest::default().with_types_filter(vec![s("share")]);
            let resp = block_on(c.call_at(&req, 5)).context("ListGroups")?;
            check(resp.error_code, "list groups", None)?;
            println!("{:<40} STATE", "GROUP");
            for g in resp.groups {
                println!("{:<40} {}", g.group_id.as_str(), g.group_state.as_str());
            }
        }
        ShareGroupCommand::Describe { group } => {
            let req = ShareGroupDescribeRequest::default().with_group_ids(vec![GroupId(s(&group))]);
            let resp = block_on(c.call_at(&req, 1)).context("ShareGroupDescribe")?;
            let Some(g) = resp.groups.into_iter().next() else {
                bail!("broker described no group");
            };
            check(
                g.error_code,
                &format!("share group {group}"),
                g.error_message.as_ref(),
            )?;
            println!(
                "group {} state {} epoch {} assignor {}",
                group,
                g.group_state.as_str(),
                g.group_epoch,
                g.assignor_name.as_str()
            );
            println!(
                "{:<40} {:<24} {:<20} ASSIGNMENT",
                "MEMBER", "CLIENT-ID", "HOST"
            );
            for m in &g.members {
                let a: Vec<String> = m
                    .assignment
                    .topic_partitions
                    .iter()
                    .map(|t| format!("{}:{:?}", t.topic_name.as_str(), t.partitions))
                    .collect();
                println!(
                    "{:<40} {:<24} {:<20} {}",
                    m.member_id.as_str(),
                    m.client_id.as_str(),
                    m.client_host.as_str(),
                    a.join(" ")
                );
            }
            let req = DescribeShareGroupOffsetsRequest::default().with_groups(vec![
                DescribeShareGroupOffsetsRequestGroup::default()
                    .with_group_id(GroupId(s(&group)))
                    .with_topics(None),
            ]);
            let resp = block_on(c.call_at(&req, 1)).context("DescribeShareGroupOffsets")?;
            println!(
                "{:<40} {:>9} {:>14} {:>10}",
                "TOPIC", "PARTITION", "START-OFFSET", "LAG"
            );
            for g in resp.groups {
                check(
                    g.error_code,
                    &format!("share group {group}"),
                    g.error_message.as_ref(),
                )?;
                for t in g.topics {
                    for p in t.partitions {
                        println!(
                            "{:<40} {:>9} {:>14} {:>10}",
                            t.topic_name.as_str(),
                            p.partition_index,
                            p.start_offset,
                            p.lag
                        );
                    }
                }
            }
        }
        ShareGroupCommand::ResetOffsets {
            group,
            topic,
            to_earliest,
            to_latest,
            to_offset,
        } => {
            // -2 and -1 ask the broker for each partition's log start and end.
            let offset = match (to_earliest, to_latest, to_offset) {
                (true, _, _) => -2,
                (_, true, _) => -1,
                (_, _, Some(o)) if o >= 0 => o,
                (_, _, Some(o)) => bail!("--to-offset must not be negative, got {o}"),
                _ => bail!("one of --to-earliest, --to-latest, --to-offset is required"),
            };
            let parts = block_on(admin::partitions(&mut c, &topic))?;
            let req = AlterShareGroupOffsetsRequest::default()
                .with_group_id(GroupId(s(&group)))
                .with_topics(vec![AlterShareGroupOffsetsRequestTopic::default()
                    .with_topic_name(TopicName(s(&topic)))
                    .with_partitions(
                        parts
                            .iter()
                            .map(|(p, _)| {
                                AlterShareGroupOffsetsRequestPartition::default()
                                    .with_partition_index(*p)
                                    .with_start_offset(offset)
                            })
                            .collect(),
                    )]);
            let resp = block_on(c.call_at(&req, 0)).context("AlterShareGroupOffsets")?;
            check(
                resp.error_code,
                &format!("share group {group}"),
                resp.error_message.as_ref(),
            )?;
            for t in resp.responses {
                for p in t.partitions {
                    check(
                        p.error_code,
                        &format!("{}-{}", t.topic_name.as_str(), p.partition_index),
                        p.error_message.as_ref(),
                    )?;
                }
            }
            println!(
                "reset share group {group} on {} partitions of {topic}",
                parts.len()
            );
        }
    }
    Ok(())
}
