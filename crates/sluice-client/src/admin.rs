//! Administration calls: metadata, topics, partitions, offsets, configs, producer ids, and group
//! administration. Each picks its version from the broker's ranges within the range named here,
//! and turns error codes into one-line [`KafkaError`](crate::KafkaError)s.

use std::collections::{BTreeMap, HashMap};

use anyhow::{anyhow, Context, Result};
use futures_lite::{AsyncRead, AsyncWrite};
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::describe_configs_response::DescribeConfigsResourceResult;
use kafka_protocol::messages::describe_groups_response::DescribedGroup;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::{
    BrokerId, CreatePartitionsRequest, CreateTopicsRequest, DeleteGroupsRequest,
    DeleteTopicsRequest, DescribeConfigsRequest, DescribeGroupsRequest, GroupId,
    InitProducerIdRequest, ListGroupsRequest, ListOffsetsRequest, MetadataRequest,
    MetadataResponse, OffsetFetchRequest, ProducerId, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use crate::error::check;
use crate::Connection;

/// Time the broker may take over a topic operation before it answers REQUEST_TIMED_OUT.
pub const TOPIC_OP_TIMEOUT_MS: i32 = 30_000;

/// ListOffsets timestamps with special meaning.
pub const EARLIEST: i64 = -2;
pub const LATEST: i64 = -1;

pub(crate) fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

fn topic_name(v: &str) -> TopicName {
    TopicName(s(v))
}

/// One partition of a topic's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionMetadata {
    pub index: i32,
    pub leader_id: i32,
    /// The leader's `host:port`, when the broker listed it.
    pub leader: Option<String>,
    pub error_code: i16,
}

/// A topic's metadata.
#[derive(Debug, Clone)]
pub struct TopicMetadata {
    pub name: String,
    /// Nil when the broker does not report topic ids.
    pub id: uuid::Uuid,
    pub error_code: i16,
    /// Sorted by index.
    pub partitions: Vec<PartitionMetadata>,
}

/// Metadata of `topics` (None: every topic). Versions up to 12 name topics.
pub async fn metadata<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    topics: Option<&[&str]>,
    allow_auto_topic_creation: bool,
) -> Result<MetadataResponse> {
    let req = MetadataRequest::default()
        .with_topics(topics.map(|ts| {
            ts.iter()
                .map(|t| MetadataRequestTopic::default().with_name(Some(topic_name(t))))
                .collect()
        }))
        .with_allow_auto_topic_creation(allow_auto_topic_creation);
    let v = c.versions().pick_in::<MetadataRequest>(1, 12)?;
    c.call_at(&req, v).await.context("Metadata")
}

/// One topic's metadata, its error code included (the caller decides what an unknown topic
/// means); leaders resolved to `host:port` from the response's broker list.
pub async fn topic_metadata<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    topic: &str,
    allow_auto_topic_creation: bool,
) -> Result<TopicMetadata> {
    let resp = metadata(c, Some(&[topic]), allow_auto_topic_creation).await?;
    let brokers: HashMap<BrokerId, String> = resp
        .brokers
        .iter()
        .map(|b| (b.node_id, format!("{}:{}", b.host.as_str(), b.port)))
        .collect();
    let t = resp
        .topics
        .iter()
        .find(|t| t.name.as_ref().map(|n| n.as_str()) == Some(topic))
        .ok_or_else(|| anyhow!("broker returned no metadata for topic {topic}"))?;
    let mut partitions: Vec<PartitionMetadata> = t
        .partitions
        .iter()
        .map(|p| PartitionMetadata {
            index: p.partition_index,
            leader_id: p.leader_id.0,
            leader: brokers.get(&p.leader_id).cloned(),
            error_code: p.error_code,
        })
        .collect();
    partitions.sort_by_key(|p| p.index);
    Ok(TopicMetadata {
        name: topic.to_string(),
        id: t.topic_id,
        error_code: t.error_code,
        partitions,
    })
}

/// (partition, leader id) of an existing topic, sorted; fails naming the error if the topic is
/// unknown.
pub async fn partitions<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    topic: &str,
) -> Result<Vec<(i32, i32)>> {
    let t = topic_metadata(c, topic, false).await?;
    check(t.error_code, &format!("topic {topic}"), None)?;
    Ok(t.partitions
        .iter()
        .map(|p| (p.index, p.leader_id))
        .collect())
}

/// A topic to create.
#[derive(Debug, Clone, Default)]
pub struct NewTopic {
    pub name: String,
    /// -1: the broker's default.
    pub partitions: i32,
    /// -1: the broker's default.
    pub replication_factor: i16,
    pub configs: Vec<(String, String)>,
    pub validate_only: bool,
}

/// Creates a topic; returns its partition count as the broker reports it. An existing topic is
/// a [`KafkaError`](crate::KafkaError) with code TOPIC_ALREADY_EXISTS.
pub async fn create_topic<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    t: &NewTopic,
) -> Result<i32> {
    let req = CreateTopicsRequest::default()
        .with_topics(vec![CreatableTopic::default()
            .with_name(topic_name(&t.name))
            .with_num_partitions(t.partitions)
            .with_replication_factor(t.replication_factor)
            .with_configs(
                t.configs
                    .iter()
                    .map(|(k, v)| {
                        CreatableTopicConfig::default()
                            .with_name(s(k))
                            .with_value(Some(s(v)))
                    })
                    .collect(),
            )])
        .with_timeout_ms(TOPIC_OP_TIMEOUT_MS)
        .with_validate_only(t.validate_only);
    let v = c.versions().pick_in::<CreateTopicsRequest>(2, 7)?;
    let resp = c.call_at(&req, v).await.context("CreateTopics")?;
    let r = resp
        .topics
        .first()
        .ok_or_else(|| anyhow!("broker returned no CreateTopics result"))?;
    check(
        r.error_code,
        &format!("cannot create topic {}", t.name),
        r.error_message.as_ref(),
    )?;
    Ok(r.num_partitions)
}

pub async fn delete_topic<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    name: &str,
) -> Result<()> {
    let req = DeleteTopicsRequest::default()
        .with_topic_names(vec![topic_name(name)])
        .with_topics(vec![
            DeleteTopicState::default().with_name(Some(topic_name(name)))
        ])
        .with_timeout_ms(TOPIC_OP_TIMEOUT_MS);
    let v = c.versions().pick_in::<DeleteTopicsRequest>(1, 6)?;
    let resp = c.call_at(&req, v).await.context("DeleteTopics")?;
    let r = resp
        .responses
        .first()
        .ok_or_else(|| anyhow!("broker returned no DeleteTopics result"))?;
    check(
        r.error_code,
        &format!("cannot delete topic {name}"),
        r.error_message.as_ref(),
    )
}

/// Raises a topic's partition count to `count`.
pub async fn create_partitions<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    name: &str,
    count: i32,
) -> Result<()> {
    let req = CreatePartitionsRequest::default()
        .with_topics(vec![CreatePartitionsTopic::default()
            .with_name(topic_name(name))
            .with_count(count)])
        .with_timeout_ms(TOPIC_OP_TIMEOUT_MS);
    let v = c.versions().pick_in::<CreatePartitionsRequest>(0, 3)?;
    let resp = c.call_at(&req, v).await.context("CreatePartitions")?;
    let r = resp
        .results
        .first()
        .ok_or_else(|| anyhow!("broker returned no CreatePartitions result"))?;
    check(
        r.error_code,
        &format!("cannot add partitions to {name}"),
        r.error_message.as_ref(),
    )
}

/// (partition, error code, offset) for `timestamp` ([`EARLIEST`], [`LATEST`] or a time in ms)
/// of each of `partitions`, errors left to the caller.
pub async fn list_offsets<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    topic: &str,
    partitions: &[i32],
    timestamp: i64,
) -> Result<Vec<(i32, i16, i64)>> {
    let req = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(topic_name(topic))
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
    let v = c.versions().pick_in::<ListOffsetsRequest>(1, 7)?;
    let resp = c.call_at(&req, v).await.context("ListOffsets")?;
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

/// Offsets of every one of `partitions` for `timestamp`; fails naming the error of any
/// partition, or one the response lacks.
pub async fn offsets<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    topic: &str,
    partitions: &[i32],
    timestamp: i64,
) -> Result<BTreeMap<i32, i64>> {
    let mut out = BTreeMap::new();
    for (p, err, o) in list_offsets(c, topic, partitions, timestamp).await? {
        check(err, &format!("offsets of {topic}-{p}"), None)?;
        out.insert(p, o);
    }
    if let Some(p) = partitions.iter().find(|p| !out.contains_key(p)) {
        anyhow::bail!("broker returned no offset of {topic}-{p}");
    }
    Ok(out)
}

/// A topic's configs (name, value, source code as DescribeConfigs defines it).
pub async fn topic_configs<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    name: &str,
) -> Result<Vec<DescribeConfigsResourceResult>> {
    let req =
        DescribeConfigsRequest::default().with_resources(vec![DescribeConfigsResource::default()
            .with_resource_type(RESOURCE_TOPIC)
            .with_resource_name(s(name))
            .with_configuration_keys(None)]);
    let v = c.versions().pick_in::<DescribeConfigsRequest>(1, 4)?;
    let resp = c.call_at(&req, v).await.context("DescribeConfigs")?;
    let r = resp
        .results
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("broker returned no DescribeConfigs result"))?;
    check(
        r.error_code,
        &format!("configs of {name}"),
        r.error_message.as_ref(),
    )?;
    Ok(r.configs)
}

/// One change of a topic config (IncrementalAlterConfigs' operations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigOp {
    Set(String, String),
    /// Back to the default.
    Delete(String),
    /// Adds items to a list config.
    Append(String, String),
    /// Removes items from a list config.
    Subtract(String, String),
}

/// IncrementalAlterConfigs resource types.
pub const RESOURCE_TOPIC: i8 = 2;
/// A group (share-group configs such as `share.record.lock.duration.ms`, KIP-932).
pub const RESOURCE_GROUP: i8 = 32;

/// Changes a topic's configs with IncrementalAlterConfigs (`validate_only`: checks only).
pub async fn alter_topic_configs<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    name: &str,
    ops: &[ConfigOp],
    validate_only: bool,
) -> Result<()> {
    alter_configs(c, RESOURCE_TOPIC, name, ops, validate_only).await
}

/// Changes a group's configs with IncrementalAlterConfigs (share groups: KIP-932's
/// `share.auto.offset.reset`, `share.record.lock.duration.ms`, `share.isolation.level`).
pub async fn alter_group_configs<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    group: &str,
    ops: &[ConfigOp],
) -> Result<()> {
    alter_configs(c, RESOURCE_GROUP, group, ops, false).await
}

/// IncrementalAlterConfigs of one resource of `resource_type`.
pub async fn alter_configs<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    resource_type: i8,
    name: &str,
    ops: &[ConfigOp],
    validate_only: bool,
) -> Result<()> {
    use kafka_protocol::messages::incremental_alter_configs_request::{
        AlterConfigsResource, AlterableConfig,
    };
    use kafka_protocol::messages::IncrementalAlterConfigsRequest;
    let configs = ops
        .iter()
        .map(|op| {
            let (k, code, v) = match op {
                ConfigOp::Set(k, v) => (k, 0, Some(v)),
                ConfigOp::Delete(k) => (k, 1, None),
                ConfigOp::Append(k, v) => (k, 2, Some(v)),
                ConfigOp::Subtract(k, v) => (k, 3, Some(v)),
            };
            AlterableConfig::default()
                .with_name(s(k))
                .with_config_operation(code)
                .with_value(v.map(|v| s(v)))
        })
        .collect();
    let req = IncrementalAlterConfigsRequest::default()
        .with_resources(vec![AlterConfigsResource::default()
            .with_resource_type(resource_type)
            .with_resource_name(s(name))
            .with_configs(configs)])
        .with_validate_only(validate_only);
    let v = c
        .versions()
        .pick_in::<IncrementalAlterConfigsRequest>(0, 1)?;
    let resp = c
        .call_at(&req, v)
        .await
        .context("IncrementalAlterConfigs")?;
    let r = resp
        .responses
        .first()
        .ok_or_else(|| anyhow!("broker returned no IncrementalAlterConfigs result"))?;
    check(
        r.error_code,
        &format!("cannot change the configs of {name}"),
        r.error_message.as_ref(),
    )
}

/// A broker as DescribeCluster (or Metadata) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterBroker {
    pub id: i32,
    pub host: String,
    pub port: i32,
    pub rack: Option<String>,
    pub fenced: bool,
}

/// The cluster as its brokers describe it.
#[derive(Debug, Clone)]
pub struct ClusterDescription {
    pub cluster_id: String,
    pub controller_id: i32,
    pub brokers: Vec<ClusterBroker>,
}

/// A partition held in a broker's log directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogDirPartition {
    pub topic: String,
    pub partition: i32,
    /// Bytes on disk.
    pub size: i64,
    pub offset_lag: i64,
}

/// One log directory of the broker a connection talks to.
#[derive(Debug, Clone)]
pub struct LogDir {
    pub path: String,
    /// Bytes of the file system holding it, and how many are free (`None` when unknown: a
    /// broker before DescribeLogDirs v4 does not say).
    pub total_bytes: Option<i64>,
    pub usable_bytes: Option<i64>,
    pub partitions: Vec<LogDirPartition>,
}

/// One replica of a replicated partition as its leader sees it (DescribeQuorum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumReplica {
    pub id: i32,
    /// The log end offset the leader knows the replica to have; -1 when unknown.
    pub log_end_offset: i64,
}

/// A replicated partition as its leader sees it (DescribeQuorum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumPartition {
    pub topic: String,
    pub partition: i32,
    /// Kafka's error code for this partition (0: the fields below are set).
    pub error_code: i16,
    pub leader: i32,
    pub leader_epoch: i32,
    pub high_watermark: i64,
    pub replicas: Vec<QuorumReplica>,
}

/// The raft quorum of each of `partitions` (topic, partition), asked of the broker this
/// connection talks to — their leader, the only one that answers with replica progress.
pub async fn describe_quorum<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    partitions: &[(String, i32)],
) -> Result<Vec<QuorumPartition>> {
    use kafka_protocol::messages::describe_quorum_request::{PartitionData, TopicData};
    use kafka_protocol::messages::{DescribeQuorumRequest, TopicName};
    use kafka_protocol::protocol::StrBytes;
    let v = c
        .versions()
        .pick_in::<DescribeQuorumRequest>(0, 1)
        .context("the broker does not serve DescribeQuorum")?;
    let mut by_topic: std::collections::BTreeMap<&str, Vec<i32>> = Default::default();
    for (t, p) in partitions {
        by_topic.entry(t.as_str()).or_default().push(*p);
    }
    let req = DescribeQuorumRequest::default().with_topics(
        by_topic
            .into_iter()
            .map(|(t, ps)| {
                TopicData::default()
                    .with_topic_name(TopicName(StrBytes::from_string(t.to_string())))
                    .with_partitions(
                        ps.into_iter()
                            .map(|p| PartitionData::default().with_partition_index(p))
                            .collect(),
                    )
            })
            .collect(),
    );
    let resp = c.call_at(&req, v).await.context("DescribeQuorum")?;
    check(resp.error_code, "cannot describe the quorums", None)?;
    Ok(resp
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|p| QuorumPartition {
                topic: t.topic_name.0.to_string(),
                partition: p.partition_index,
                error_code: p.error_code,
                leader: p.leader_id.0,
                leader_epoch: p.leader_epoch,
                high_watermark: p.high_watermark,
                replicas: p
                    .current_voters
                    .iter()
                    .map(|r| QuorumReplica {
                        id: r.replica_id.0,
                        log_end_offset: r.log_end_offset,
                    })
                    .collect(),
            })
        })
        .collect())
}

/// The log directories of the broker this connection talks to, with every partition held
/// there (DescribeLogDirs v1+, `topics` null: all of them).
pub async fn describe_log_dirs<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
) -> Result<Vec<LogDir>> {
    use kafka_protocol::messages::DescribeLogDirsRequest;
    let v = c
        .versions()
        .pick_in::<DescribeLogDirsRequest>(1, 4)
        .context("the broker does not serve DescribeLogDirs")?;
    let req = DescribeLogDirsRequest::default().with_topics(None);
    let resp = c.call_at(&req, v).await.context("DescribeLogDirs")?;
    check(resp.error_code, "cannot describe the log directories", None)?;
    let known = |b: i64| (b >= 0).then_some(b);
    resp.results
        .iter()
        .map(|d| {
            check(
                d.error_code,
                &format!("log directory {}", d.log_dir.as_str()),
                None,
            )?;
            let mut partitions: Vec<LogDirPartition> = d
                .topics
                .iter()
                .flat_map(|t| {
                    t.partitions.iter().map(|p| LogDirPartition {
                        topic: t.name.0.to_string(),
                        partition: p.partition_index,
                        size: p.partition_size,
                        offset_lag: p.offset_lag,
                    })
                })
                .collect();
            partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
            Ok(LogDir {
                path: d.log_dir.to_string(),
                total_bytes: if v >= 4 { known(d.total_bytes) } else { None },
                usable_bytes: if v >= 4 { known(d.usable_bytes) } else { None },
                partitions,
            })
        })
        .collect()
}

/// The cluster id, controller and brokers (fenced ones included, marked): DescribeCluster, or
/// Metadata from a broker without it.
pub async fn describe_cluster<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
) -> Result<ClusterDescription> {
    use kafka_protocol::messages::DescribeClusterRequest;
    if let Ok(v) = c.versions().pick_in::<DescribeClusterRequest>(0, 2) {
        let req = DescribeClusterRequest::default()
            .with_endpoint_type(1)
            .with_include_fenced_brokers(true);
        let resp = c.call_at(&req, v).await.context("DescribeCluster")?;
        check(
            resp.error_code,
            "cannot describe the cluster",
            resp.error_message.as_ref(),
        )?;
        return Ok(ClusterDescription {
            cluster_id: resp.cluster_id.to_string(),
            controller_id: resp.controller_id.0,
            brokers: resp
                .brokers
                .iter()
                .map(|b| ClusterBroker {
                    id: b.broker_id.0,
                    host: b.host.to_string(),
                    port: b.port,
                    rack: b.rack.as_ref().map(|r| r.to_string()),
                    fenced: b.is_fenced,
                })
                .collect(),
        });
    }
    let m = metadata(c, Some(&[]), false).await?;
    Ok(ClusterDescription {
        cluster_id: m
            .cluster_id
            .as_ref()
            .map(|x| x.to_string())
            .unwrap_or_default(),
        controller_id: m.controller_id.0,
        brokers: m
            .brokers
            .iter()
            .map(|b| ClusterBroker {
                id: b.node_id.0,
                host: b.host.to_string(),
                port: b.port,
                rack: b.rack.as_ref().map(|r| r.to_string()),
                fenced: false,
            })
            .collect(),
    })
}

/// A producer id and epoch for an idempotent producer (KIP-98).
pub async fn init_producer_id<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
) -> Result<(i64, i16)> {
    let req = InitProducerIdRequest::default()
        .with_transactional_id(None)
        .with_transaction_timeout_ms(60_000)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    let resp = c.call(&req, None).await.context("InitProducerId")?;
    check(resp.error_code, "InitProducerId", None)?;
    Ok((resp.producer_id.0, resp.producer_epoch))
}

pub async fn list_groups<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
) -> Result<Vec<ListedGroup>> {
    let v = c.versions().pick_in::<ListGroupsRequest>(0, 4)?;
    let resp = c
        .call_at(&ListGroupsRequest::default(), v)
        .await
        .context("ListGroups")?;
    check(resp.error_code, "list groups", None)?;
    Ok(resp.groups)
}

pub async fn describe_group<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    group: &str,
) -> Result<DescribedGroup> {
    let req = DescribeGroupsRequest::default().with_groups(vec![GroupId(s(group))]);
    let v = c.versions().pick_in::<DescribeGroupsRequest>(0, 5)?;
    let resp = c.call_at(&req, v).await.context("DescribeGroups")?;
    let g = resp
        .groups
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("broker described no group"))?;
    check(
        g.error_code,
        &format!("describe group {group}"),
        g.error_message.as_ref(),
    )?;
    Ok(g)
}

pub async fn delete_group<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    group: &str,
) -> Result<()> {
    let req = DeleteGroupsRequest::default().with_groups_names(vec![GroupId(s(group))]);
    let v = c.versions().pick_in::<DeleteGroupsRequest>(0, 2)?;
    let resp = c.call_at(&req, v).await.context("DeleteGroups")?;
    let r = resp
        .results
        .first()
        .ok_or_else(|| anyhow!("broker returned no DeleteGroups result"))?;
    check(r.error_code, &format!("cannot delete group {group}"), None)
}

/// Committed offsets of a group: (topic, partition) → offset (-1: none). `topics` None asks for
/// every topic the group committed. Fails naming the error of the group or of any partition.
pub async fn committed<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    group: &str,
    topics: Option<Vec<(String, Vec<i32>)>>,
) -> Result<BTreeMap<(String, i32), i64>> {
    committed_as(c, group, topics, false).await
}

/// As [`committed`]; with `require_stable` (OffsetFetch v7+, KIP-447) a partition whose offset
/// an open transaction holds fails with UNSTABLE_OFFSET_COMMIT, which the caller retries.
pub async fn committed_as<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    group: &str,
    topics: Option<Vec<(String, Vec<i32>)>>,
    require_stable: bool,
) -> Result<BTreeMap<(String, i32), i64>> {
    let req = OffsetFetchRequest::default()
        .with_require_stable(require_stable)
        .with_group_id(GroupId(s(group)))
        .with_topics(topics.map(|ts| {
            ts.into_iter()
                .map(|(t, ps)| {
                    OffsetFetchRequestTopic::default()
                        .with_name(topic_name(&t))
                        .with_partition_indexes(ps)
                })
                .collect()
        }));
    // v8 moves the group into a list of groups.
    let min = if require_stable { 7 } else { 2 };
    let v = c.versions().pick_in::<OffsetFetchRequest>(min, 7)?;
    let resp = c.call_at(&req, v).await.context("OffsetFetch")?;
    check(resp.error_code, &format!("offsets of group {group}"), None)?;
    let mut out = BTreeMap::new();
    for t in resp.topics {
        for p in t.partitions {
            check(
                p.error_code,
                &format!("offset of {}-{}", t.name.as_str(), p.partition_index),
                None,
            )?;
            out.insert((t.name.to_string(), p.partition_index), p.committed_offset);
        }
    }
    Ok(out)
}

/// Every transactional id the broker coordinates, with its producer id and state
/// (ListTransactions).
pub async fn list_transactions<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
) -> Result<Vec<kafka_protocol::messages::list_transactions_response::TransactionState>> {
    use kafka_protocol::messages::ListTransactionsRequest;
    let v = c.versions().pick_in::<ListTransactionsRequest>(0, 1)?;
    let resp = c
        .call_at(
            &ListTransactionsRequest::default().with_duration_filter(-1),
            v,
        )
        .await
        .context("ListTransactions")?;
    check(resp.error_code, "list transactions", None)?;
    Ok(resp.transaction_states)
}

/// One transactional id's state, producer, timeout, start and partitions
/// (DescribeTransactions).
pub async fn describe_transaction<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    transactional_id: &str,
) -> Result<kafka_protocol::messages::describe_transactions_response::TransactionState> {
    use kafka_protocol::messages::{DescribeTransactionsRequest, TransactionalId};
    let req = DescribeTransactionsRequest::default()
        .with_transactional_ids(vec![TransactionalId(s(transactional_id))]);
    let v = c.versions().pick_in::<DescribeTransactionsRequest>(0, 0)?;
    let resp = c.call_at(&req, v).await.context("DescribeTransactions")?;
    let t = resp
        .transaction_states
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("broker described no transaction"))?;
    check(
        t.error_code,
        &format!("describe transaction {transactional_id}"),
        None,
    )?;
    Ok(t)
}
