//! Small helpers shared by handlers: error codes, names, topic lookup with auto-creation, and
//! the hop to a partition's owner shard.

use std::rc::Rc;
use std::sync::Arc;

use kafka_protocol::messages::TopicName;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use crate::admin::{self, AdminError};
use crate::metadata::TopicMeta;
use crate::replica::ReplicatedPartition;
use crate::shard::{self, invoke_on};
use crate::storage::{PartitionLog, StorageError};
use crate::types::{ErrorCode, PartitionKey, TopicPartition};

pub const NONE: ErrorCode = ErrorCode::NONE;

pub fn code(e: ResponseError) -> ErrorCode {
    ErrorCode::new(e)
}

pub fn topic_name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

pub fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

pub fn storage_code(e: &StorageError) -> ErrorCode {
    match e {
        StorageError::Io(_) => code(ResponseError::KafkaStorageError),
        StorageError::OffsetOutOfRange { .. } => code(ResponseError::OffsetOutOfRange),
        StorageError::Corrupt(_) => code(ResponseError::CorruptMessage),
        StorageError::OutOfOrderSequence => code(ResponseError::OutOfOrderSequenceNumber),
        StorageError::InvalidProducerEpoch => code(ResponseError::InvalidProducerEpoch),
        StorageError::OffsetMismatch { .. } => code(ResponseError::KafkaStorageError),
    }
}

pub fn admin_code(e: &AdminError) -> ErrorCode {
    code(match e {
        AdminError::TopicExists => ResponseError::TopicAlreadyExists,
        AdminError::UnknownTopic => ResponseError::UnknownTopicOrPartition,
        AdminError::InvalidTopic(_) => ResponseError::InvalidTopicException,
        AdminError::InvalidPartitions(_) => ResponseError::InvalidPartitions,
        AdminError::InvalidConfig(_) => ResponseError::InvalidConfig,
        AdminError::InvalidReplicationFactor(_) => ResponseError::InvalidReplicationFactor,
        AdminError::NotController => ResponseError::NotController,
        AdminError::NotDynamic(_) => ResponseError::InvalidRequest,
        AdminError::Storage(_) => ResponseError::KafkaStorageError,
    })
}

/// Looks a topic up, creating it with the default partition count when auto-creation is on and
/// `allow_auto_create` (the request's own flag) agrees. Errors are Kafka error codes.
pub async fn topic_or_create(
    name: &str,
    allow_auto_create: bool,
) -> Result<Arc<TopicMeta>, ErrorCode> {
    let broker = shard::local().broker.clone();
    if let Some(t) = broker.image().topic(name) {
        return Ok(t.clone());
    }
    if !crate::metadata::valid_topic_name(name) {
        return Err(code(ResponseError::InvalidTopicException));
    }
    if !(broker.config.auto_create_topics && allow_auto_create) || name.starts_with("__") {
        return Err(code(ResponseError::UnknownTopicOrPartition));
    }
    match admin::create_topic(
        admin::NewTopic::with_defaults(name),
        admin::CreateMode::Create,
        admin::TopicKind::User,
    )
    .await
    {
        Ok(t) => Ok(t),
        // Another request created it first.
        Err(AdminError::TopicExists) => broker
            .image()
            .topic(name)
            .cloned()
            .ok_or(code(ResponseError::UnknownTopicOrPartition)),
        // Auto-creation asked of a node that is not the controller: Kafka's answer while an
        // auto-created topic is not ready yet; clients ask again.
        Err(AdminError::NotController) => Err(code(ResponseError::LeaderNotAvailable)),
        Err(e) => Err(admin_code(&e)),
    }
}

/// Runs `f` with the partition log on its owner shard. This is the cross-core hop: partitions
/// are owned by exactly one shard, so every access travels there. A node that holds no replica
/// of the partition, or a follower replica of a replicated one, answers NOT_LEADER_OR_FOLLOWER.
pub async fn with_partition<F, Fut, R>(
    topic: &TopicMeta,
    partition: i32,
    f: F,
) -> Result<R, ErrorCode>
where
    F: FnOnce(Rc<PartitionLog>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = R> + 'static,
    R: Send + 'static,
{
    with_partition_checked(topic, partition, NO_EPOCH_CHECK, move |log, _, _| f(log)).await
}

/// [`with_partition`] that also hands `f` the partition's raft group when it has replicas
/// (then this node is its leader).
pub async fn with_partition_replica<F, Fut, R>(
    topic: &TopicMeta,
    partition: i32,
    f: F,
) -> Result<R, ErrorCode>
where
    F: FnOnce(Rc<PartitionLog>, Option<Rc<ReplicatedPartition>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = R> + 'static,
    R: Send + 'static,
{
    with_partition_checked(topic, partition, NO_EPOCH_CHECK, move |log, _, r| f(log, r)).await
}

/// A client's `current_leader_epoch` that asks for no check (KIP-320).
pub const NO_EPOCH_CHECK: i32 = -1;

/// The leader epoch of a partition with no replicas elsewhere, as Metadata reports it.
pub const UNREPLICATED_EPOCH: i32 = 0;

/// [`with_partition`] for requests that carry the client's `current_leader_epoch` (KIP-320:
/// Fetch v9+, ListOffsets v4+, OffsetForLeaderEpoch v2+): on a replicated partition the epoch is
/// checked against the replica's (the raft term) before leadership, as Kafka does —
/// FENCED_LEADER_EPOCH when the client's is older, UNKNOWN_LEADER_EPOCH when newer,
/// [`NO_EPOCH_CHECK`] skips the check. `f` gets the log and the partition's leader epoch
/// ([`UNREPLICATED_EPOCH`] for a partition without replicas, which is never checked).
pub async fn with_partition_at_epoch<F, Fut, R>(
    topic: &TopicMeta,
    partition: i32,
    current_leader_epoch: i32,
    f: F,
) -> Result<R, ErrorCode>
where
    F: FnOnce(Rc<PartitionLog>, i32) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = R> + 'static,
    R: Send + 'static,
{
    with_partition_checked(topic, partition, current_leader_epoch, move |log, e, _| {
        f(log, e)
    })
    .await
}

/// The one implementation of the `with_partition` family: `f` gets the log, the partition's
/// leader epoch and its raft group (if replicated).
async fn with_partition_checked<F, Fut, R>(
    topic: &TopicMeta,
    partition: i32,
    current_leader_epoch: i32,
    f: F,
) -> Result<R, ErrorCode>
where
    F: FnOnce(Rc<PartitionLog>, i32, Option<Rc<ReplicatedPartition>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = R> + 'static,
    R: Send + 'static,
{
    let here = shard::local();
    let broker = &here.broker;
    if broker.node_of(topic, partition).is_none() {
        return Err(code(ResponseError::UnknownTopicOrPartition));
    }
    if !broker.holds(topic, partition) {
        return Err(code(ResponseError::NotLeaderOrFollower));
    }
    let owner = broker
        .owner(topic, partition)
        .ok_or(code(ResponseError::UnknownTopicOrPartition))?;
    if owner == here.id {
        // The partition is here: no hop, and it is looked up by the borrowed name (no key built
        // per request).
        return Ok(on_owner((topic.name.as_str(), partition), current_leader_epoch, f)?.await);
    }
    let tp = TopicPartition::new(topic.name.clone(), partition);
    // The partition lives on another shard, which alone may touch its log: hop there.
    invoke_on(owner, move || async move {
        crate::fault::panic_point("cross_shard", &tp.topic);
        Ok(on_owner(tp, current_leader_epoch, f)?.await)
    })
    .await
}

/// On the partition's owner shard: its log, leader epoch and raft group, checked, handed to
/// `f`; the future `f` returns is awaited by the caller.
fn on_owner<F, Fut>(
    tp: impl PartitionKey,
    current_leader_epoch: i32,
    f: F,
) -> Result<Fut, ErrorCode>
where
    F: FnOnce(Rc<PartitionLog>, i32, Option<Rc<ReplicatedPartition>>) -> Fut,
{
    let here = shard::local();
    let Some(log) = here.partition(&tp) else {
        return Err(code(ResponseError::UnknownTopicOrPartition));
    };
    let replica = here.replica(&tp);
    let epoch = match &replica {
        Some(r) => {
            let epoch = r.leader_epoch();
            check_epoch(current_leader_epoch, epoch)?;
            // A replicated partition is served by its raft leader only, as Kafka serves
            // clients from the partition leader.
            if r.role() != sluice_raft::Role::Leader {
                return Err(code(ResponseError::NotLeaderOrFollower));
            }
            epoch
        }
        // Its raft group is not running yet (the node is starting): not served until it
        // is, as Kafka answers for a replica that is not the leader.
        None if here.awaits_replica(&tp) => {
            return Err(code(ResponseError::NotLeaderOrFollower));
        }
        None => UNREPLICATED_EPOCH,
    };
    Ok(f(log, epoch, replica))
}

/// KIP-320's check of a client's current leader epoch against the partition's.
pub fn check_epoch(client: i32, partition: i32) -> Result<(), ErrorCode> {
    if client == NO_EPOCH_CHECK {
        Ok(())
    } else if client < partition {
        Err(code(ResponseError::FencedLeaderEpoch))
    } else if client > partition {
        Err(code(ResponseError::UnknownLeaderEpoch))
    } else {
        Ok(())
    }
}

/// Kafka's ACL operation codes (`AclOperation`), the bit positions of an authorized-operations
/// bitfield.
mod acl {
    pub const READ: u32 = 3;
    pub const WRITE: u32 = 4;
    pub const CREATE: u32 = 5;
    pub const DELETE: u32 = 6;
    pub const ALTER: u32 = 7;
    pub const DESCRIBE: u32 = 8;
    pub const CLUSTER_ACTION: u32 = 9;
    pub const DESCRIBE_CONFIGS: u32 = 10;
    pub const ALTER_CONFIGS: u32 = 11;
    pub const IDEMPOTENT_WRITE: u32 = 12;
}

/// The resource types that carry authorized operations in responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclResource {
    Topic,
    Group,
    Cluster,
}

/// Kafka's "authorized operations not requested" sentinel.
pub const AUTHORIZED_OPERATIONS_OMITTED: i32 = i32::MIN;

/// The authorized-operations bitfield of a resource: with no authorizer (Sluice has none), every
/// operation Kafka supports for the resource type (`AclEntry.supportedOperations`), one bit per
/// operation code; [`AUTHORIZED_OPERATIONS_OMITTED`] when the request did not ask.
pub fn authorized_operations(resource: AclResource, requested: bool) -> i32 {
    if !requested {
        return AUTHORIZED_OPERATIONS_OMITTED;
    }
    use acl::*;
    let ops: &[u32] = match resource {
        AclResource::Topic => &[
            READ,
            WRITE,
            CREATE,
            DELETE,
            ALTER,
            DESCRIBE,
            DESCRIBE_CONFIGS,
            ALTER_CONFIGS,
        ],
        AclResource::Group => &[READ, DELETE, DESCRIBE],
        AclResource::Cluster => &[
            CREATE,
            ALTER,
            DESCRIBE,
            CLUSTER_ACTION,
            DESCRIBE_CONFIGS,
            ALTER_CONFIGS,
            IDEMPOTENT_WRITE,
        ],
    };
    ops.iter().fold(0i32, |bits, op| bits | (1 << op))
}

/// The high watermark readers see on the partition's owner shard: the commit index (as an
/// offset) of a partition with replicas, the log's own otherwise. Call on the owner shard.
pub fn readable_end(topic: &str, partition: i32, log: &PartitionLog) -> crate::types::Offset {
    committed_end(topic, partition, log).unwrap_or_else(|| log.high_watermark())
}

/// The commit index (as an offset) of a partition with replicas; `None` for a partition
/// without, whose readers stop at the log's own high watermark. Call on the owner shard.
pub fn committed_end(
    topic: &str,
    partition: i32,
    log: &PartitionLog,
) -> Option<crate::types::Offset> {
    let tp = TopicPartition::new(topic.to_string(), partition);
    shard::local()
        .replica(&tp)
        .map(|r| r.high_watermark().min(log.high_watermark()))
}

pub fn opt_str(s: &Option<StrBytes>) -> Option<String> {
    s.as_ref().map(|x| x.to_string())
}
