//! Topic administration and producer-id blocks: the metadata owner. Lives on shard 0, the only
//! writer of the metadata log; every operation here runs there (forwarded with
//! [`invoke_on`] from whichever shard took the request), validates, writes the change to the
//! metadata log (fsynced), publishes the new image to every shard through the shared
//! [`BrokerContext`], and has partition logs opened or removed on
//! their owner shards. Knows Kafka's topic rules, never sockets or requests.
//!
//! In a cluster (`--controllers`) the checks run on the controller leader only (others answer
//! [`AdminError::NotController`]), which also places each new partition on a registered node;
//! the change is proposed to the controller group instead of written to the metadata log, and
//! answered once applied and published here. Every node's controller opens and removes its own
//! partition logs as it applies the change (`controller`).
//!
//! | file | owns |
//! | --- | --- |
//! | `mod.rs` | [`MetadataOwner`] (shard 0's state), create/delete topics, add partitions, shard assignment |
//! | `producer_ids.rs` | the producer-id allocator and its persisted blocks |

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use glommio::sync::Semaphore;

use crate::controller::{self, ControllerError};
use crate::metadata::{configs, MetadataImage, MetadataStore, Record, TopicMeta};
use crate::shard::{self, invoke_on, BrokerContext};
use crate::types::{ShardId, TopicPartition};

pub mod producer_ids;

pub use producer_ids::{ProducerIds, PRODUCER_ID_BLOCK};

/// The shard that owns the metadata log and runs every operation of this module.
pub const METADATA_OWNER: ShardId = ShardId(0);

/// Why an admin operation failed, mapped to a Kafka error code by the handler.
#[derive(Debug)]
pub enum AdminError {
    TopicExists,
    UnknownTopic,
    InvalidTopic(String),
    InvalidPartitions(String),
    InvalidConfig(String),
    InvalidReplicationFactor(String),
    /// In a cluster: this node is not the controller leader (Kafka's NOT_CONTROLLER; clients
    /// refresh metadata, which names the leader, and retry there).
    NotController,
    /// A broker config that cannot change while the broker runs.
    NotDynamic(String),
    Storage(String),
}

impl From<ControllerError> for AdminError {
    fn from(e: ControllerError) -> AdminError {
        match e {
            ControllerError::NotController => AdminError::NotController,
            ControllerError::Failed(m) => AdminError::Storage(m),
        }
    }
}

impl AdminError {
    pub fn message(&self) -> String {
        match self {
            AdminError::TopicExists => "topic already exists".into(),
            AdminError::UnknownTopic => "unknown topic".into(),
            AdminError::InvalidTopic(m)
            | AdminError::InvalidPartitions(m)
            | AdminError::InvalidConfig(m)
            | AdminError::InvalidReplicationFactor(m)
            | AdminError::Storage(m) => m.clone(),
            AdminError::NotController => "this node is not the controller".into(),
            AdminError::NotDynamic(k) => format!(
                "broker config '{k}' cannot change while the broker runs (set it with the \
                 `sluice start` flags); dynamic: the broker defaults of the topic configs Sluice \
                 applies (log.retention.ms, log.retention.bytes, log.segment.bytes, log.roll.ms, \
                 log.cleanup.policy, log.flush.interval.ms, log.index.interval.bytes, \
                 message.max.bytes, log.message.timestamp.type)"
            ),
        }
    }
}

/// The state of the metadata owner. Lives on shard 0 only, installed there at start-up.
pub struct MetadataOwner {
    /// The metadata log of a single node; `None` in a cluster (the controller's raft log holds
    /// the metadata there).
    store: RefCell<Option<MetadataStore>>,
    /// Serialises topic administration: an operation awaits other shards (opening or removing
    /// partition logs) between its checks and its write, and no other may run in between.
    admin: Semaphore,
    producer_ids: RefCell<ProducerIds>,
    /// One producer-id block is persisted at a time (on the blocking thread pool).
    producer_block: Semaphore,
    /// One change of the metadata log is written at a time (on the blocking thread pool).
    metadata_log: Semaphore,
}

thread_local! {
    static OWNER: RefCell<Option<Rc<MetadataOwner>>> = const { RefCell::new(None) };
}

/// Makes the calling shard (shard 0, at start-up) the metadata owner, with the metadata log
/// and the producer-id allocator the broker opened before the shards started (no metadata log in
/// a cluster).
pub fn install(store: Option<MetadataStore>, producer_ids: ProducerIds) {
    assert_eq!(
        shard::local().id,
        METADATA_OWNER,
        "the metadata owner lives on shard 0"
    );
    let owner = MetadataOwner {
        store: RefCell::new(store),
        admin: Semaphore::new(1),
        producer_ids: RefCell::new(producer_ids),
        producer_block: Semaphore::new(1),
        metadata_log: Semaphore::new(1),
    };
    OWNER.with(|o| *o.borrow_mut() = Some(Rc::new(owner)));
}

/// The metadata owner. Panics outside shard 0 (a bug: callers hop there first).
fn owner() -> Rc<MetadataOwner> {
    OWNER.with(|o| {
        o.borrow()
            .clone()
            .expect("the metadata owner is installed on shard 0")
    })
}

/// Runs one topic operation on shard 0, after any other has finished.
async fn administer<F, Fut, R>(f: F) -> Result<R, AdminError>
where
    F: FnOnce(Arc<BrokerContext>, Rc<MetadataOwner>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<R, AdminError>> + 'static,
    R: Send + 'static,
{
    invoke_on(METADATA_OWNER, move || async move {
        let owner = owner();
        let _turn = owner
            .admin
            .acquire_permit(1)
            .await
            .expect("the admin semaphore is never closed");
        f(shard::local().broker.clone(), owner.clone()).await
    })
    .await
}

/// Applies one change to the metadata log (fdatasynced) and publishes the new image to every
/// shard.
///
/// The log's file work runs on the blocking thread pool; the store and the published image
/// change only once the record is durable. It runs in a task of its own that holds the
/// metadata log's turn until the store is updated, so even when the request that asked for the
/// change is dropped meanwhile, one job writing the log is in flight at a time and each is
/// staged from the store as the previous one left it.
async fn write_metadata(
    owner: &Rc<MetadataOwner>,
    record: Record,
) -> Result<Arc<MetadataImage>, AdminError> {
    let owner = owner.clone();
    let storage = |e: std::io::Error| AdminError::Storage(e.to_string());
    let task = glommio::spawn_local(async move {
        let _turn = owner
            .metadata_log
            .acquire_permit(1)
            .await
            .map_err(|_| AdminError::Storage("broker stopping".into()))?;
        let job = {
            let store = owner.store.borrow();
            let store = store
                .as_ref()
                .expect("a single node's metadata owner has the metadata log");
            store.stage(&record).map_err(storage)?
        };
        // The delay point's key: the topic a record names.
        let key = match &record {
            Record::CreateTopic(t) => t.name.clone(),
            Record::DeleteTopic { name }
            | Record::AddPartitions { name, .. }
            | Record::SetConfigs { name, .. } => name.clone(),
            _ => String::new(),
        };
        let written = glommio::executor()
            .spawn_blocking(move || {
                crate::fault::delay_point_for("metadata_log", &key);
                job.run()
            })
            .await
            .map_err(storage)?;
        let image = {
            let mut store = owner.store.borrow_mut();
            let store = store
                .as_mut()
                .expect("a single node's metadata owner has the metadata log");
            store.staged_written(record, written).map_err(storage)?;
            Arc::new(store.image().clone())
        };
        shard::local().broker.publish(image.clone());
        Ok(image)
    })
    .detach();
    task.await
        .unwrap_or_else(|| Err(AdminError::Storage("metadata write cancelled".into())))
}

/// Partitions each running shard owns in `image`.
fn shard_loads(broker: &BrokerContext, image: &MetadataImage) -> Vec<usize> {
    let n = broker.shard_count() as u32;
    let mut load = vec![0usize; n as usize];
    for t in image.topics.values() {
        for s in &t.shards {
            load[(*s % n) as usize] += 1;
        }
    }
    load
}

/// Refuses `count` more partitions when the shards have no room for them, before anything is
/// sized by `count`: it comes off the wire, and 2^31-1 would build an 8 GiB assignment.
fn check_partition_room(
    broker: &BrokerContext,
    image: &MetadataImage,
    count: i32,
) -> Result<(), AdminError> {
    let room = broker
        .shard_count()
        .saturating_mul(broker.config.partitions_per_shard_max);
    let owned: usize = shard_loads(broker, image).iter().sum();
    let wanted = usize::try_from(count).unwrap_or(usize::MAX);
    if owned.saturating_add(wanted) > room {
        return Err(AdminError::InvalidPartitions(format!(
            "{count} more partitions do not fit: the shards own {owned} of at most {room} \
             (partitions_per_shard_max)"
        )));
    }
    Ok(())
}

/// Assigns shards to the new partitions `new` (their indexes), spreading them over the shards
/// with the fewest partitions, starting after the topic's id hash so small topics don't pile
/// onto shard 0.
fn assign_shards(
    broker: &BrokerContext,
    image: &MetadataImage,
    seed: u32,
    new: std::ops::Range<i32>,
) -> Vec<u32> {
    let n = broker.shard_count() as u32;
    let mut load = shard_loads(broker, image);
    new.map(|p| {
        let start = (seed.wrapping_add(p as u32)) % n;
        let best = (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|s| load[*s as usize])
            .unwrap_or(0);
        load[best as usize] += 1;
        best
    })
    .collect()
}

fn check_shard_capacity(
    broker: &BrokerContext,
    image: &MetadataImage,
    new: &[u32],
) -> Result<(), AdminError> {
    let n = broker.shard_count() as u32;
    let mut load = shard_loads(broker, image);
    for s in new {
        load[(*s % n) as usize] += 1;
    }
    let max = broker.config.partitions_per_shard_max;
    if load.iter().any(|l| *l > max) {
        return Err(AdminError::InvalidPartitions(format!(
            "a shard would own more than {max} partitions (partitions_per_shard_max)"
        )));
    }
    Ok(())
}

/// The default replication factor of a topic created without one (CreateTopics' -1,
/// auto-created topics): Kafka's `default.replication.factor`, 1 as in Kafka, so a cluster that
/// loses a node keeps accepting topic creation with defaults. The default of
/// `--default-replication-factor`.
pub const DEFAULT_REPLICATION_FACTOR: i16 = crate::config::DEFAULTS.default_replication_factor;

/// In a cluster: the replication factor asked for (-1 takes `default_rf`, the broker's
/// `--default-replication-factor`), refused with Kafka's INVALID_REPLICATION_FACTOR when below 1
/// or, with Kafka's message, when there are fewer live registered brokers than asked for.
fn check_cluster_replication_factor(
    image: &MetadataImage,
    rf: i16,
    default_rf: i16,
) -> Result<usize, AdminError> {
    let brokers = image.live_brokers().count();
    let wanted = if rf == -1 { default_rf } else { rf };
    if wanted < 1 {
        return Err(AdminError::InvalidReplicationFactor(format!(
            "replication factor {rf} must be >= 1"
        )));
    }
    if wanted as usize > brokers {
        return Err(AdminError::InvalidReplicationFactor(format!(
            "Replication factor: {wanted} larger than available brokers: {brokers}."
        )));
    }
    Ok(wanted as usize)
}

/// In a cluster: refuses `count` more partitions of `rf` replicas each when the live brokers'
/// shards have no room for them, before anything is sized by `count` (it comes off the wire).
fn check_cluster_room(
    broker: &BrokerContext,
    image: &MetadataImage,
    count: i32,
    rf: usize,
) -> Result<(), AdminError> {
    let room = image
        .live_brokers()
        .map(|b| (b.shards as usize).saturating_mul(broker.config.partitions_per_shard_max))
        .fold(0usize, usize::saturating_add);
    let owned = image
        .topics
        .values()
        .map(|t| t.shards.len().saturating_mul(t.replication_factor()))
        .fold(0usize, usize::saturating_add);
    let wanted = usize::try_from(count)
        .unwrap_or(usize::MAX)
        .saturating_mul(rf);
    if owned.saturating_add(wanted) > room {
        return Err(AdminError::InvalidPartitions(format!(
            "{count} more partitions of {rf} replicas do not fit: the cluster's shards hold \
             {owned} replicas of at most {room} (partitions_per_shard_max)"
        )));
    }
    Ok(())
}

/// Where new partitions go in a cluster: for each, its nodes (preferred leader first) and its
/// shard index, the same on every one of them.
#[derive(Debug, Default, PartialEq)]
struct Placement {
    /// The preferred leader of each partition (`TopicMeta::nodes`).
    nodes: Vec<i32>,
    shards: Vec<u32>,
    /// Every replica of each partition, preferred leader first; empty when `rf` is 1
    /// (`TopicMeta::replicas`).
    replicas: Vec<Vec<i32>>,
    /// The raft group id of each partition, from the image's first free one; empty when `rf`
    /// is 1.
    groups: Vec<u64>,
}

/// In a cluster: the replicas and the shard index of each new partition `new`, `rf` replicas
/// each (at most the live brokers; fewer live brokers place nothing). The preferred leader goes
/// round-robin over the registered brokers that are not fenced, in id order (starting at one
/// picked by the topic's id hash, so small topics do not all start on the same node); the other
/// replicas are the next `rf - 1` brokers in that order, so leaders and replicas both spread
/// evenly. The shard index is below the smallest shard count of the replicas, the one whose
/// shards hold the fewest partitions over the replicas.
fn place(image: &MetadataImage, seed: u32, new: std::ops::Range<i32>, rf: usize) -> Placement {
    let brokers: Vec<&crate::metadata::BrokerInfo> = image.live_brokers().collect();
    let n = brokers.len();
    if n == 0 || rf == 0 || rf > n {
        return Placement::default();
    }
    // Partition replicas held by each (broker, shard).
    let mut load: Vec<Vec<usize>> = brokers
        .iter()
        .map(|b| vec![0; b.shards.max(1) as usize])
        .collect();
    for t in image.topics.values() {
        for (p, shard) in t.shards.iter().enumerate() {
            for node in t.replica_nodes(p as i32) {
                if let Some(i) = brokers.iter().position(|b| b.id == *node) {
                    let slots = load[i].len();
                    load[i][*shard as usize % slots] += 1;
                }
            }
        }
    }
    let mut placed = Placement::default();
    for p in new {
        let first = (seed as usize).wrapping_add(p as usize) % n;
        let set: Vec<usize> = (0..rf).map(|r| (first + r) % n).collect();
        let slots = set.iter().map(|i| load[*i].len()).min().unwrap_or(1);
        let sstart = (seed as usize).wrapping_add(p as usize / n) % slots;
        let s = (0..slots)
            .map(|k| (sstart + k) % slots)
            .min_by_key(|s| set.iter().map(|i| load[*i][*s]).sum::<usize>())
            .unwrap_or(0);
        for i in &set {
            load[*i][s] += 1;
        }
        placed.nodes.push(brokers[first].id);
        placed.shards.push(s as u32);
        if rf > 1 {
            placed
                .replicas
                .push(set.iter().map(|i| brokers[*i].id).collect());
            let group = image.first_free_group() + placed.groups.len() as u64;
            placed.groups.push(group);
        }
    }
    placed
}

/// A topic to create, as a CreateTopics request (or the broker itself) describes it.
#[derive(Debug, Clone)]
pub struct NewTopic {
    pub name: String,
    /// Partition count; -1 takes the broker's `default_partitions`.
    pub partitions: i32,
    /// -1 for the broker's `--default-replication-factor`; on a single node it must be 1 (or -1).
    pub replication_factor: i16,
    /// Topic-level config overrides.
    pub overrides: BTreeMap<String, String>,
}

impl NewTopic {
    /// A topic with the default partition count and replication factor and no overrides.
    pub fn with_defaults(name: impl Into<String>) -> NewTopic {
        NewTopic {
            name: name.into(),
            partitions: -1,
            replication_factor: -1,
            overrides: BTreeMap::new(),
        }
    }
}

/// Whether [`create_topic`] creates the topic or only checks that it could.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateMode {
    Create,
    /// CreateTopics' `validate_only`: every check runs, nothing is written.
    ValidateOnly,
}

impl CreateMode {
    /// The mode a request's `validate_only` flag asks for.
    pub fn from_validate_only(validate_only: bool) -> CreateMode {
        if validate_only {
            CreateMode::ValidateOnly
        } else {
            CreateMode::Create
        }
    }
}

/// Who a topic belongs to. Internal topics (`__consumer_offsets`) may use the reserved `__`
/// prefix and internal-only configs, and cannot be deleted by clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    User,
    Internal,
}

/// Creates a topic: validated, its partition logs opened on their owner shards, then written to
/// the metadata log (fsynced) and published.
pub async fn create_topic(
    topic: NewTopic,
    mode: CreateMode,
    kind: TopicKind,
) -> Result<Arc<TopicMeta>, AdminError> {
    let NewTopic {
        name,
        partitions,
        replication_factor,
        overrides,
    } = topic;
    let internal = kind == TopicKind::Internal;
    administer(move |broker, owner| async move {
        if !crate::metadata::valid_topic_name(&name) {
            return Err(AdminError::InvalidTopic(format!(
                "invalid topic name '{name}'"
            )));
        }
        if name.starts_with("__") && !internal {
            return Err(AdminError::InvalidTopic(format!(
                "topic name '{name}' is reserved"
            )));
        }
        let partitions = if partitions == -1 {
            broker.config.default_partitions
        } else {
            partitions
        };
        if partitions < 1 {
            return Err(AdminError::InvalidPartitions(format!(
                "partition count {partitions} must be >= 1"
            )));
        }
        let clustered = broker.config.cluster.is_some();
        if !clustered && replication_factor != 1 && replication_factor != -1 {
            return Err(AdminError::InvalidReplicationFactor(
                "replication factor must be 1 (or -1) on a single node".into(),
            ));
        }
        for (k, v) in &overrides {
            configs::validate(k, v).map_err(AdminError::InvalidConfig)?;
        }
        let rf = if clustered {
            controller::lead().await?;
            check_cluster_replication_factor(
                &broker.image(),
                replication_factor,
                broker.config.default_replication_factor,
            )?
        } else {
            1
        };
        let image = broker.image();
        if image.topic(&name).is_some() {
            return Err(AdminError::TopicExists);
        }
        let id = *uuid::Uuid::new_v4().as_bytes();
        let seed = crc32fast::hash(&id);
        if clustered {
            check_cluster_room(&broker, &image, partitions, rf)?;
            let Placement {
                nodes,
                shards,
                replicas,
                groups,
            } = place(&image, seed, 0..partitions, rf);
            let meta = TopicMeta {
                name: name.clone(),
                id,
                shards,
                configs: overrides,
                internal,
                nodes,
                replicas,
                groups,
            };
            if mode == CreateMode::ValidateOnly {
                return Ok(Arc::new(meta));
            }
            let image = controller::propose(Record::CreateTopic(meta)).await?;
            let published = image
                .topic(&name)
                .filter(|t| t.id == id)
                .cloned()
                .ok_or(AdminError::TopicExists)?;
            tracing::info!(topic = %name, partitions, "topic created");
            return Ok(published);
        }
        check_partition_room(&broker, &image, partitions)?;
        let shards = assign_shards(&broker, &image, seed, 0..partitions);
        check_shard_capacity(&broker, &image, &shards)?;
        let meta = TopicMeta {
            name: name.clone(),
            id,
            shards,
            configs: overrides,
            internal,
            nodes: Vec::new(),
            replicas: Vec::new(),
            groups: Vec::new(),
        };
        if mode == CreateMode::ValidateOnly {
            return Ok(Arc::new(meta));
        }
        // Open the logs first: a topic is published only once every partition can take writes.
        open_partitions(&broker, &meta, 0).await?;
        let image = write_metadata(&owner, Record::CreateTopic(meta)).await?;
        let published = image.topic(&name).cloned().expect("just created");
        tracing::info!(topic = %name, partitions, "topic created");
        Ok(published)
    })
    .await
}

/// Opens partitions `first..` of `meta` on their owner shards.
async fn open_partitions(
    broker: &BrokerContext,
    meta: &TopicMeta,
    first: i32,
) -> Result<(), AdminError> {
    let image = broker.image();
    let log_config = configs::log_config(
        &configs::BrokerDefaults::of(&broker.config, &image),
        &meta.configs,
    );
    let count = meta.partition_count();
    let mut next = first;
    while next < count {
        // A window of opens at once, each its own task: the owner shards' blocking pools take
        // the file work of one log right after another's, without a round trip through this
        // task in between.
        let end = count.min(next.saturating_add(OPENS_IN_FLIGHT_MAX));
        let opens: Vec<_> = (next..end)
            .map(|p| {
                let owner = broker.owner(meta, p).expect("partition in range");
                let tp = TopicPartition::new(meta.name.clone(), p);
                let lc = log_config.clone();
                shard::spawn_contained(invoke_on(owner, move || {
                    shard::open_partition_here(tp, lc, false)
                }))
            })
            .collect();
        let mut failed = None;
        // Every open of the window is awaited, failed or not: none is left running unawaited.
        for open in opens {
            let opened = shard::join(open)
                .await
                .unwrap_or_else(|| Err(std::io::Error::other("partition open cancelled").into()));
            if let Err(e) = opened {
                failed.get_or_insert(AdminError::Storage(e.to_string()));
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        next = end;
    }
    Ok(())
}

/// Partition logs opened at once while a topic is created or grows: enough to keep the owner
/// shards' blocking pools busy back to back (an open is a few small file writes and fsyncs
/// there), few enough that a topic of thousands of partitions does not queue them all at once.
const OPENS_IN_FLIGHT_MAX: i32 = 32;

/// Deletes a topic: unpublished and logged first, then the partition logs closed and their
/// directories removed on the owner shards, so the name can be reused at once.
pub async fn delete_topic(name: String) -> Result<(), AdminError> {
    administer(move |broker, owner| async move {
        let clustered = broker.config.cluster.is_some();
        if clustered {
            controller::lead().await?;
        }
        let image = broker.image();
        let meta = image
            .topic(&name)
            .cloned()
            .ok_or(AdminError::UnknownTopic)?;
        if meta.internal {
            return Err(AdminError::InvalidTopic(format!(
                "internal topic '{name}' cannot be deleted"
            )));
        }
        if clustered {
            // Every node removes its own logs of the topic as it applies the entry.
            controller::propose(Record::DeleteTopic { name: name.clone() }).await?;
            tracing::info!(topic = %name, "topic deleted");
            return Ok(());
        }
        write_metadata(&owner, Record::DeleteTopic { name: name.clone() }).await?;
        for p in 0..meta.partition_count() {
            let owner = broker.owner(&meta, p).expect("in range");
            let tp = TopicPartition::new(name.clone(), p);
            invoke_on(owner, move || shard::remove_partition_here(tp))
                .await
                .map_err(|e| AdminError::Storage(e.to_string()))?;
        }
        tracing::info!(topic = %name, "topic deleted");
        Ok(())
    })
    .await
}

/// Raises a topic's partition count to `total` (CreatePartitions).
pub async fn add_partitions(name: String, total: i32, mode: CreateMode) -> Result<(), AdminError> {
    administer(move |broker, owner| async move {
        let clustered = broker.config.cluster.is_some();
        if clustered {
            controller::lead().await?;
        }
        let image = broker.image();
        let meta = image
            .topic(&name)
            .cloned()
            .ok_or(AdminError::UnknownTopic)?;
        let current = meta.partition_count();
        if total <= current {
            return Err(AdminError::InvalidPartitions(format!(
                "topic has {current} partitions; the new count {total} must be larger"
            )));
        }
        let seed = crc32fast::hash(&meta.id);
        if clustered {
            // New partitions get the topic's replication factor.
            let rf = meta.replication_factor();
            check_cluster_room(&broker, &image, total - current, rf)?;
            let Placement {
                nodes,
                shards,
                replicas,
                groups,
            } = place(&image, seed, current..total, rf);
            if nodes.len() != (total - current) as usize {
                let live = image.live_brokers().count();
                return Err(AdminError::InvalidReplicationFactor(format!(
                    "Replication factor: {rf} larger than available brokers: {live}."
                )));
            }
            if mode == CreateMode::ValidateOnly {
                return Ok(());
            }
            controller::propose(Record::AddPartitions {
                name: name.clone(),
                shards,
                nodes,
                replicas,
                groups,
            })
            .await?;
            return Ok(());
        }
        check_partition_room(&broker, &image, total - current)?;
        let new = assign_shards(&broker, &image, seed, current..total);
        check_shard_capacity(&broker, &image, &new)?;
        if mode == CreateMode::ValidateOnly {
            return Ok(());
        }
        let mut grown = (*meta).clone();
        grown.shards.extend(new.iter().copied());
        open_partitions(&broker, &grown, current).await?;
        write_metadata(
            &owner,
            Record::AddPartitions {
                name: name.clone(),
                shards: new,
                replicas: Vec::new(),
                groups: Vec::new(),
                nodes: Vec::new(),
            },
        )
        .await?;
        Ok(())
    })
    .await
}

/// One change of a topic's configs (IncrementalAlterConfigs' operations; AlterConfigs is
/// [`ConfigChange::Replace`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigOp {
    Set(String, String),
    /// Back to the default.
    Delete(String),
    /// Adds items to a list config (to its default when it has no override).
    Append(String, String),
    /// Removes items from a list config.
    Subtract(String, String),
}

/// How a topic's configs change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigChange {
    /// AlterConfigs: these overrides replace all the topic's overrides.
    Replace(BTreeMap<String, String>),
    /// IncrementalAlterConfigs: these operations, in order, on the current overrides.
    Incremental(Vec<ConfigOp>),
}

fn list_items(v: &str) -> Vec<String> {
    v.split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

/// The overrides `change` leaves a topic with `current` overrides, every key validated.
pub fn changed_configs(
    current: &BTreeMap<String, String>,
    change: ConfigChange,
) -> Result<BTreeMap<String, String>, AdminError> {
    let known = |k: &str| {
        configs::topic_config(k)
            .ok_or_else(|| AdminError::InvalidConfig(format!("unknown topic config '{k}'")))
    };
    let list = |k: &str| -> Result<(), AdminError> {
        match known(k)?.kind {
            configs::Kind::List(_) => Ok(()),
            _ => Err(AdminError::InvalidConfig(format!(
                "{k} is not a list: APPEND and SUBTRACT apply to list configs only"
            ))),
        }
    };
    let mut next = match &change {
        ConfigChange::Replace(_) => BTreeMap::new(),
        ConfigChange::Incremental(_) => current.clone(),
    };
    match change {
        ConfigChange::Replace(all) => {
            for (k, v) in all {
                known(&k)?;
                next.insert(k, v);
            }
        }
        ConfigChange::Incremental(ops) => {
            for op in ops {
                match op {
                    ConfigOp::Set(k, v) => {
                        known(&k)?;
                        next.insert(k, v);
                    }
                    ConfigOp::Delete(k) => {
                        known(&k)?;
                        next.remove(&k);
                    }
                    ConfigOp::Append(k, v) => {
                        list(&k)?;
                        let base = next
                            .get(&k)
                            .cloned()
                            .or_else(|| configs::topic_config(&k).map(|d| d.default.to_string()))
                            .unwrap_or_default();
                        let mut items = list_items(&base);
                        for item in list_items(&v) {
                            if !items.contains(&item) {
                                items.push(item);
                            }
                        }
                        next.insert(k, items.join(","));
                    }
                    ConfigOp::Subtract(k, v) => {
                        list(&k)?;
                        let remove = list_items(&v);
                        let Some(base) = next
                            .get(&k)
                            .cloned()
                            .or_else(|| configs::topic_config(&k).map(|d| d.default.to_string()))
                        else {
                            continue;
                        };
                        let items: Vec<String> = list_items(&base)
                            .into_iter()
                            .filter(|i| !remove.contains(i))
                            .collect();
                        next.insert(k, items.join(","));
                    }
                }
            }
        }
    }
    for (k, v) in &next {
        configs::validate(k, v).map_err(AdminError::InvalidConfig)?;
    }
    Ok(next)
}

/// Changes a topic's configs (AlterConfigs, IncrementalAlterConfigs): validated, written to the
/// metadata (a `SetConfigs` record: the metadata log, or in a cluster a proposal to the
/// controller), published, and applied to the topic's open partition logs.
pub async fn alter_topic_configs(
    name: String,
    change: ConfigChange,
    mode: CreateMode,
) -> Result<(), AdminError> {
    administer(move |broker, owner| async move {
        let clustered = broker.config.cluster.is_some();
        if clustered {
            controller::lead().await?;
        }
        let image = broker.image();
        let meta = image
            .topic(&name)
            .cloned()
            .ok_or(AdminError::UnknownTopic)?;
        let next = changed_configs(&meta.configs, change)?;
        if mode == CreateMode::ValidateOnly || next == meta.configs {
            return Ok(());
        }
        if clustered {
            // Every node applies the new configs to its own partitions as it publishes the
            // entry (`controller`).
            controller::propose(Record::SetConfigs {
                name: name.clone(),
                configs: next,
            })
            .await?;
        } else {
            let image = write_metadata(
                &owner,
                Record::SetConfigs {
                    name: name.clone(),
                    configs: next,
                },
            )
            .await?;
            if let Some(t) = image.topic(&name) {
                shard::reconfigure_partitions(&broker, t).await;
            }
        }
        tracing::info!(topic = %name, "topic configs changed");
        Ok(())
    })
    .await
}

/// Changes dynamic broker configs (AlterConfigs on a broker resource) of `scope`: a node id,
/// or "" for every broker. `change` names broker configs (`log.retention.ms`); only the
/// broker-wide defaults of the topic configs Sluice applies may change while running
/// ([`configs::dynamic_broker_config`]), others are [`AdminError::NotDynamic`]. The new values
/// are validated like the topic configs, written as a `SetBrokerConfigs` record (a proposal in a
/// cluster), published, and applied to every open partition log.
pub async fn alter_broker_configs(
    scope: String,
    change: ConfigChange,
    mode: CreateMode,
) -> Result<(), AdminError> {
    // Broker names to topic names, refusing the ones that cannot change while running.
    let to_topic = |k: &str| -> Result<String, AdminError> {
        configs::dynamic_broker_config(k)
            .map(|c| c.name.to_string())
            .ok_or_else(|| AdminError::NotDynamic(k.to_string()))
    };
    let change = match change {
        ConfigChange::Replace(all) => ConfigChange::Replace(
            all.into_iter()
                .map(|(k, v)| Ok((to_topic(&k)?, v)))
                .collect::<Result<_, AdminError>>()?,
        ),
        ConfigChange::Incremental(ops) => ConfigChange::Incremental(
            ops.into_iter()
                .map(|op| {
                    Ok(match op {
                        ConfigOp::Set(k, v) => ConfigOp::Set(to_topic(&k)?, v),
                        ConfigOp::Delete(k) => ConfigOp::Delete(to_topic(&k)?),
                        ConfigOp::Append(k, v) => ConfigOp::Append(to_topic(&k)?, v),
                        ConfigOp::Subtract(k, v) => ConfigOp::Subtract(to_topic(&k)?, v),
                    })
                })
                .collect::<Result<_, AdminError>>()?,
        ),
    };
    administer(move |broker, owner| async move {
        let clustered = broker.config.cluster.is_some();
        if clustered {
            controller::lead().await?;
        }
        let image = broker.image();
        let current = image
            .broker_configs
            .get(&scope)
            .cloned()
            .unwrap_or_default();
        let next = changed_configs(&current, change)?;
        if mode == CreateMode::ValidateOnly || next == current {
            return Ok(());
        }
        if clustered {
            controller::propose(Record::SetBrokerConfigs {
                scope: scope.clone(),
                configs: next,
            })
            .await?;
        } else {
            let image = write_metadata(
                &owner,
                Record::SetBrokerConfigs {
                    scope: scope.clone(),
                    configs: next,
                },
            )
            .await?;
            for t in image.topics.values() {
                shard::reconfigure_partitions(&broker, t).await;
            }
        }
        tracing::info!(scope = %scope, "dynamic broker configs changed");
        Ok(())
    })
    .await
}

/// In a cluster, how long a node that could not create an internal topic (not the controller,
/// or not every node registered yet) waits for another to before trying again.
const INTERNAL_CREATE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// An internal topic of a coordinator (`__consumer_offsets`, `__transaction_state`) as this
/// shard sees it once it exists: shard 0 creates it when missing — compacted, as in Kafka, so
/// its size and replay stay bounded by the live keys; no time retention, since expiry is the
/// coordinator's job (tombstones) — and every shard waits for it to be published. In a cluster
/// only the controller leader creates it, once every node has registered (so its partitions
/// spread over all): every node tries until one did, with `replication_factor` replicas per
/// partition, at most the live registered nodes (1 on a single node). Returns the topic and the
/// partitions this shard owns, with their logs (opened at start, or by the topic's creation
/// before it was published: a topic is published only once every partition is open on its
/// shard).
pub async fn internal_topic_here(
    name: &str,
    partitions: i32,
    replication_factor: i16,
) -> Result<(Arc<TopicMeta>, Vec<(i32, Rc<crate::storage::PartitionLog>)>), String> {
    let here = shard::local();
    let broker = here.broker.clone();
    if here.id.0 == 0 && broker.image().topic(name).is_none() {
        let overrides: BTreeMap<String, String> = [
            ("cleanup.policy", "compact"),
            ("retention.ms", "-1"),
            ("segment.bytes", "104857600"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut topic = NewTopic {
            name: name.to_string(),
            partitions,
            replication_factor: 1,
            overrides,
        };
        let voters = broker
            .config
            .cluster
            .as_ref()
            .map_or(0, |c| c.controllers.len());
        loop {
            let image = broker.image();
            if image.topic(name).is_some() {
                break;
            }
            if image.brokers.len() >= voters {
                if voters > 0 {
                    let live = i16::try_from(image.live_brokers().count()).unwrap_or(i16::MAX);
                    topic.replication_factor = replication_factor.min(live).max(1);
                }
                match create_topic(topic.clone(), CreateMode::Create, TopicKind::Internal).await {
                    Ok(_) | Err(AdminError::TopicExists) => break,
                    Err(e) if voters > 0 => {
                        tracing::debug!(error = %e.message(), "{name} not created yet");
                    }
                    Err(e) => return Err(format!("cannot create {name}: {}", e.message())),
                }
            }
            futures_lite::future::or(
                async {
                    broker.image_where(|i| i.topic(name).is_some()).await;
                },
                here.clock.sleep(INTERNAL_CREATE_RETRY),
            )
            .await;
            if broker.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return Err("broker stopping".into());
            }
        }
    }
    let image = broker
        .image_where(|i| i.topic(name).is_some())
        .await
        .ok_or("broker stopping")?;
    let meta = image.topic(name).expect("waited for it").clone();
    let mut owned = Vec::new();
    for p in 0..meta.partition_count() {
        if broker.owner(&meta, p) != Some(here.id) {
            continue;
        }
        let tp = TopicPartition::new(name, p);
        let log = here
            .partition(&tp)
            .ok_or_else(|| format!("{tp} is published but not open on this shard"))?;
        owned.push((p, log));
    }
    Ok((meta, owned))
}

/// Hands out a new producer id (InitProducerId). Every id comes from shard 0's allocator, which
/// persists the block holding an id before handing it out; no await separates the check of the
/// block from the increment, so concurrent callers are served one after another.
///
/// In a cluster each node hands out ids from its own allocator, with its node id in the low
/// `NODE_ID_BITS` bits, so no two nodes hand out the same id.
pub async fn next_producer_id() -> std::io::Result<u64> {
    invoke_on(METADATA_OWNER, || async {
        let owner = owner();
        let id = loop {
            if let Some(id) = owner.producer_ids.borrow_mut().try_allocate() {
                break id;
            }
            // The next block must be durable before any id of it is handed out. Its write and
            // fsyncs run on the blocking thread pool; callers arriving meanwhile wait here and
            // then take ids of the block it persisted.
            let _turn = owner
                .producer_block
                .acquire_permit(1)
                .await
                .map_err(|_| std::io::Error::other("broker stopping"))?;
            if let Some(id) = owner.producer_ids.borrow_mut().try_allocate() {
                break id;
            }
            let (dir, limit) = owner.producer_ids.borrow().next_block()?;
            glommio::executor()
                .spawn_blocking(move || producer_ids::write_limit(&dir, limit))
                .await?;
            owner.producer_ids.borrow_mut().block_persisted(limit);
        };
        let broker = shard::local().broker.clone();
        if broker.config.cluster.is_none() {
            return Ok(id);
        }
        use crate::config::NODE_ID_BITS;
        id.checked_mul(1 << NODE_ID_BITS)
            .filter(|id| *id < (1 << 62))
            .map(|id| id | broker.config.node_id as u64)
            .ok_or_else(|| std::io::Error::other("producer ids exhausted"))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::BrokerInfo;

    fn cluster(nodes: &[(i32, u32)]) -> MetadataImage {
        let mut image = MetadataImage::default();
        for (id, shards) in nodes {
            image.apply(Record::RegisterBroker(BrokerInfo {
                id: *id,
                host: format!("h{id}"),
                port: 9092,
                shards: *shards,
                rack: None,
            }));
        }
        image
    }

    #[test]
    fn placement_is_round_robin_over_live_nodes_and_spreads_shards() {
        let mut image = cluster(&[(1, 2), (2, 1), (3, 2)]);
        let placed = place(&image, 0, 0..6, 1);
        let (nodes, shards) = (placed.nodes, placed.shards);
        assert_eq!(nodes, [1, 2, 3, 1, 2, 3]);
        assert!(placed.replicas.is_empty());
        // Node 1 and 3 have two shards each: their two partitions go to different shards.
        assert_ne!(shards[0], shards[3]);
        assert_ne!(shards[2], shards[5]);
        assert_eq!((shards[1], shards[4]), (0, 0));
        // Partitions added later continue the rotation from where the topic's seed puts them.
        assert_eq!(place(&image, 0, 6..8, 1).nodes, [1, 2]);
        // Fenced nodes get nothing.
        image.apply(Record::FenceBroker { id: 2 });
        let nodes = place(&image, 1, 0..4, 1).nodes;
        assert!(nodes.iter().all(|n| *n != 2), "{nodes:?}");
        assert_eq!(
            place(&MetadataImage::default(), 0, 0..3, 1),
            Placement::default()
        );
        // More replicas than live nodes places nothing.
        assert_eq!(place(&image, 0, 0..3, 3), Placement::default());
    }

    #[test]
    fn replicas_spread_leaders_and_shards_and_share_a_shard_index() {
        let image = cluster(&[(1, 4), (2, 2), (3, 4)]);
        let placed = place(&image, 0, 0..6, 3);
        assert_eq!(placed.nodes, [1, 2, 3, 1, 2, 3]);
        assert_eq!(placed.replicas.len(), 6);
        for (p, set) in placed.replicas.iter().enumerate() {
            // The preferred leader first, then the next nodes in id order, each once.
            assert_eq!(set[0], placed.nodes[p]);
            let mut sorted = set.clone();
            sorted.sort();
            assert_eq!(sorted, [1, 2, 3], "{set:?}");
            // Below the smallest shard count of the set (node 2 has two shards).
            assert!(placed.shards[p] < 2, "{:?}", placed.shards);
        }
        // Six partitions of three replicas over node 2's two shards: three each.
        let on_zero = placed.shards.iter().filter(|s| **s == 0).count();
        assert_eq!(on_zero, 3, "{:?}", placed.shards);

        // Six partitions of two replicas over three nodes: each node leads two and holds four.
        let placed = place(&image, 5, 0..6, 2);
        for id in 1..=3 {
            let led = placed.nodes.iter().filter(|n| **n == id).count();
            let held = placed
                .replicas
                .iter()
                .flatten()
                .filter(|n| **n == id)
                .count();
            assert_eq!((led, held), (2, 4), "node {id}: {placed:?}");
        }

        // Existing replicas count as load: a new topic avoids the shards they use.
        let mut image = cluster(&[(1, 2), (2, 2)]);
        image.apply(Record::CreateTopic(TopicMeta {
            name: "a".into(),
            id: [1; 16],
            shards: vec![0],
            configs: BTreeMap::new(),
            internal: false,
            nodes: vec![1],
            replicas: vec![vec![1, 2]],
            groups: vec![4],
        }));
        let placed = place(&image, 0, 0..2, 2);
        assert_eq!(placed.shards[0], 1);
        // Group ids continue after every one assigned.
        assert_eq!(placed.groups, [5, 6]);
    }

    #[test]
    fn config_changes_replace_or_apply_operations_and_validate() {
        let current: BTreeMap<String, String> =
            [("retention.ms", "1000"), ("cleanup.policy", "compact")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        // AlterConfigs: what is not given returns to its default.
        let next = changed_configs(
            &current,
            ConfigChange::Replace(map(&[("segment.bytes", "16384")])),
        )
        .unwrap();
        assert_eq!(next, map(&[("segment.bytes", "16384")]));
        // IncrementalAlterConfigs, in order.
        let ops = vec![
            ConfigOp::Set("compression.type".into(), "zstd".into()),
            ConfigOp::Delete("retention.ms".into()),
            ConfigOp::Append("cleanup.policy".into(), "delete,compact".into()),
        ];
        let next = changed_configs(&current, ConfigChange::Incremental(ops)).unwrap();
        assert_eq!(
            next,
            map(&[
                ("cleanup.policy", "compact,delete"),
                ("compression.type", "zstd")
            ])
        );
        let next = changed_configs(
            &next,
            ConfigChange::Incremental(vec![ConfigOp::Subtract(
                "cleanup.policy".into(),
                "compact".into(),
            )]),
        )
        .unwrap();
        assert_eq!(next["cleanup.policy"], "delete");
        // Errors: unknown key, bad value, APPEND to a non-list.
        for op in [
            ConfigOp::Set("no.such".into(), "1".into()),
            ConfigOp::Delete("no.such".into()),
            ConfigOp::Set("retention.ms".into(), "soon".into()),
            ConfigOp::Append("retention.ms".into(), "5".into()),
        ] {
            let r = changed_configs(&current, ConfigChange::Incremental(vec![op.clone()]));
            assert!(
                matches!(r, Err(AdminError::InvalidConfig(_))),
                "{op:?}: {r:?}"
            );
        }
    }

    #[test]
    fn replication_factor_in_a_cluster() {
        let mut image = cluster(&[(1, 1), (2, 1), (3, 1)]);
        assert_eq!(check_cluster_replication_factor(&image, 1, 1).unwrap(), 1);
        assert_eq!(
            check_cluster_replication_factor(&image, -1, DEFAULT_REPLICATION_FACTOR).unwrap(),
            DEFAULT_REPLICATION_FACTOR as usize
        );
        assert_eq!(check_cluster_replication_factor(&image, -1, 3).unwrap(), 3);
        assert!(check_cluster_replication_factor(&image, -1, 4).is_err());
        let msg = |image: &MetadataImage, rf| match check_cluster_replication_factor(image, rf, 1) {
            Err(AdminError::InvalidReplicationFactor(m)) => m,
            other => panic!("rf {rf}: {other:?}"),
        };
        assert_eq!(check_cluster_replication_factor(&image, 3, 1).unwrap(), 3);
        assert_eq!(
            msg(&image, 4),
            "Replication factor: 4 larger than available brokers: 3."
        );
        assert!(msg(&image, 0).contains(">= 1"));
        image.apply(Record::FenceBroker { id: 3 });
        assert_eq!(
            msg(&image, 3),
            "Replication factor: 3 larger than available brokers: 2."
        );
    }
}
