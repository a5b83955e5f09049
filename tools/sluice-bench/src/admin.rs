//! Set-up calls made once before a run: topic metadata (creating the topic if missing),
//! log start/end offsets, and producer ids for the idempotent producer.

use crate::client::Conn;
use anyhow::{anyhow, bail, Context, Result};
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    BrokerId, CreateTopicsRequest, InitProducerIdRequest, ListOffsetsRequest, MetadataRequest,
    ProducerId, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Kafka error codes we react to (Kafka protocol guide, "Error Codes").
pub mod code {
    pub const NONE: i16 = 0;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub const LEADER_NOT_AVAILABLE: i16 = 5;
    pub const NOT_LEADER_OR_FOLLOWER: i16 = 6;
    pub const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const NOT_COORDINATOR: i16 = 16;
    pub const ILLEGAL_GENERATION: i16 = 22;
    pub const UNKNOWN_MEMBER_ID: i16 = 25;
    pub const REBALANCE_IN_PROGRESS: i16 = 27;
    pub const UNSUPPORTED_VERSION: i16 = 35;
    pub const TOPIC_ALREADY_EXISTS: i16 = 36;
    pub const MEMBER_ID_REQUIRED: i16 = 79;
}

/// Where one partition lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub index: i32,
    pub leader: String,
}

/// What a run needs to know about its topic.
#[derive(Debug, Clone)]
pub struct TopicInfo {
    pub name: String,
    /// Nil when the broker does not report topic ids (then name-based API versions are used).
    pub id: uuid::Uuid,
    pub partitions: Vec<PartitionInfo>,
}

/// Connects to the first reachable bootstrap broker.
pub async fn bootstrap(brokers: &str, timeout: Duration) -> Result<Conn> {
    let mut last = None;
    for b in brokers.split(',').map(str::trim).filter(|b| !b.is_empty()) {
        match Conn::connect(b, timeout).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no bootstrap broker given")))
}

/// Reads the topic's metadata; creates it with `create = Some((partitions, rf))` if missing.
/// Waits (up to 15 s) until every partition has a leader.
pub async fn topic_info(
    conn: &mut Conn,
    topic: &str,
    create: Option<(i32, i16)>,
) -> Result<TopicInfo> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut created = false;
    loop {
        let req = MetadataRequest::default()
            .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
                TopicName(StrBytes::from_string(topic.to_string())),
            ))]))
            .with_allow_auto_topic_creation(false);
        let resp = conn.call(&req, None).await.context("Metadata")?;
        let brokers: HashMap<BrokerId, String> = resp
            .brokers
            .iter()
            .map(|b| (b.node_id, format!("{}:{}", b.host.as_str(), b.port)))
            .collect();
        let t = resp
            .topics
            .iter()
            .find(|t| t.name.as_ref().map(|n| n.as_str()) == Some(topic))
            .ok_or_else(|| anyhow!("broker's metadata response does not mention topic {topic}"))?;
        match t.error_code {
            code::NONE => {
                let mut parts = Vec::with_capacity(t.partitions.len());
                let mut ready = true;
                for p in &t.partitions {
                    match brokers.get(&p.leader_id) {
                        Some(addr) if p.error_code == code::NONE => parts.push(PartitionInfo {
                            index: p.partition_index,
                            leader: addr.clone(),
                        }),
                        _ => ready = false,
                    }
                }
                if ready && !parts.is_empty() {
                    parts.sort_by_key(|p| p.index);
                    return Ok(TopicInfo {
                        name: topic.to_string(),
                        id: t.topic_id,
                        partitions: parts,
                    });
                }
            }
            code::UNKNOWN_TOPIC_OR_PARTITION if !created => match create {
                Some((partitions, rf)) => {
                    create_topic(conn, topic, partitions, rf).await?;
                    created = true;
                    continue;
                }
                None => bail!("topic {topic} does not exist"),
            },
            code::UNKNOWN_TOPIC_OR_PARTITION | code::LEADER_NOT_AVAILABLE => {}
            e => bail!("metadata for topic {topic} failed with error code {e}"),
        }
        if Instant::now() > deadline {
            bail!("topic {topic} has no leader for every partition after 15 s");
        }
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn create_topic(conn: &mut Conn, topic: &str, partitions: i32, rf: i16) -> Result<()> {
    let req = CreateTopicsRequest::default()
        .with_topics(vec![CreatableTopic::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_num_partitions(partitions)
            .with_replication_factor(rf)])
        .with_timeout_ms(30_000);
    let resp = conn.call(&req, None).await.context("CreateTopics")?;
    for t in &resp.topics {
        if t.error_code != code::NONE && t.error_code != code::TOPIC_ALREADY_EXISTS {
            let msg = t
                .error_message
                .as_ref()
                .map(|m| m.as_str().to_string())
                .unwrap_or_default();
            bail!(
                "creating topic {topic} failed with error code {} {msg}",
                t.error_code
            );
        }
    }
    Ok(())
}

/// Earliest (`timestamp = -2`) or latest (`-1`) offsets of the given partitions on this broker.
pub async fn list_offsets(
    conn: &mut Conn,
    topic: &str,
    partitions: &[i32],
    timestamp: i64,
) -> Result<HashMap<i32, i64>> {
    let req = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(
                partitions
                    .iter()
                    .map(|&p| {
                        ListOffsetsPartition::default()
                            .with_partition_index(p)
                            .with_current_leader_epoch(-1)
                            .with_timestamp(timestamp)
                    })
                    .collect(),
            )]);
    let resp = conn.call(&req, None).await.context("ListOffsets")?;
    let mut out = HashMap::new();
    for t in &resp.topics {
        for p in &t.partitions {
            if p.error_code != code::NONE {
                bail!(
                    "ListOffsets for {topic}/{} failed with error code {}",
                    p.partition_index,
                    p.error_code
                );
            }
            out.insert(p.partition_index, p.offset);
        }
    }
    for p in partitions {
        if !out.contains_key(p) {
            bail!("ListOffsets response lacks {topic}/{p}");
        }
    }
    Ok(out)
}

/// A producer id and epoch for an idempotent producer (KIP-98).
pub async fn init_producer_id(conn: &mut Conn) -> Result<(i64, i16)> {
    let req = InitProducerIdRequest::default()
        .with_transactional_id(None)
        .with_transaction_timeout_ms(60_000)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    let resp = conn.call(&req, None).await.context("InitProducerId")?;
    if resp.error_code != code::NONE {
        bail!("InitProducerId failed with error code {}", resp.error_code);
    }
    Ok((resp.producer_id.0, resp.producer_epoch))
}
