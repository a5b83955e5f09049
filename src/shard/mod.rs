//! The shards: one glommio executor per core (started and pinned by the broker), each owning a
//! set of partitions. Other shards reach a shard's state only by message ([`invoke_on`]). Owns
//! the per-shard state ([`Shard`]), the context every shard shares ([`BrokerContext`]: config,
//! metadata image, inboxes, stop signal) and the partition → shard routing
//! ([`BrokerContext::owner`]). Knows nothing of Kafka APIs.
//!
//! A cross-shard call ships a `Send` closure to the owner shard, which runs it there and sends
//! the result back; `Bytes` travel by reference count, never by copy.
//!
//! Panics: work a request starts on this shard ([`spawn_contained`]) or on another shard
//! ([`invoke_on`]) is contained, and its panic is re-raised in whoever awaits it, so it unwinds
//! into the request that caused it; the shard and its other connections keep running.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use glommio::task::JoinHandle;

pub use crate::contain::{contain, Panic};
use crate::metadata::configs::{self, BrokerDefaults, ProduceConfig};
use crate::metadata::{MetadataImage, TopicMeta};
use crate::replica::ReplicatedPartition;
use crate::storage::{io::DmaIo, BatchCache, LogConfig, PartitionLog, StorageError};
use crate::types::{Clock, PartitionKey, ShardId, TopicPartition};

mod context;

pub use context::BrokerContext;

/// A unit of work sent to another shard: builds a local future there.
pub type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// Queue depth of each shard's inbox; senders wait (back-pressure) when it is full.
pub const INBOX_DEPTH_MAX: usize = 4096;

/// The state one shard owns. Lives on its executor's thread only.
pub struct Shard {
    pub id: ShardId,
    /// The state shared with every other shard.
    pub broker: Arc<BrokerContext>,
    pub partitions: RefCell<HashMap<TopicPartition, Rc<PartitionLog>>>,
    /// The raft group of each partition of `partitions` that has replicas (in a cluster).
    pub replicas: RefCell<HashMap<TopicPartition, Rc<ReplicatedPartition>>>,
    /// The partitions of `partitions` whose log belongs to a raft group, whether or not the
    /// group runs yet (see [`Shard::awaits_replica`]).
    replicated: RefCell<HashSet<TopicPartition>>,
    /// Notified each time a replica is attached to its log here.
    replica_attached: event_listener::Event,
    /// In a cluster: this shard's raft transport, which carries the groups of its partitions
    /// to and from the same shard of every other node (see [`partition_transport_port`]).
    pub transport: RefCell<Option<sluice_raft::Transport>>,
    pub cache: Rc<BatchCache>,
    /// What this shard's logs, coordinator and timer loops read the time from.
    pub clock: Clock,
    /// This shard's copy of the current metadata (see [`Shard::metadata`]).
    local_image: RefCell<Option<Rc<LocalImage>>>,
}

/// One shard's read-only copy of a published metadata image, with what the request path reads
/// of each topic resolved into typed values. Built on the shard, once per published image, the
/// first time the shard needs it; handed out as an `Rc`, so the request path takes no shared
/// reference count and parses no config.
pub struct LocalImage {
    pub image: Arc<MetadataImage>,
    generation: u64,
    topics: HashMap<String, Rc<LocalTopic>>,
}

/// A topic as the request path of one shard sees it.
pub struct LocalTopic {
    pub meta: Arc<TopicMeta>,
    /// Its produce configs, resolved against the broker defaults of the same image.
    pub produce: ProduceConfig,
}

impl LocalImage {
    fn build(broker: &BrokerContext, generation: u64) -> LocalImage {
        let image = broker.image();
        let defaults = BrokerDefaults::of(&broker.config, &image);
        let topics = image
            .topics
            .iter()
            .map(|(name, t)| {
                let topic = LocalTopic {
                    meta: t.clone(),
                    produce: configs::produce_config(&defaults, &t.configs),
                };
                (name.clone(), Rc::new(topic))
            })
            .collect();
        LocalImage {
            image,
            generation,
            topics,
        }
    }

    pub fn topic(&self, name: &str) -> Option<&Rc<LocalTopic>> {
        self.topics.get(name)
    }
}

thread_local! {
    static LOCAL: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
}

/// Installs the shard state of the calling executor thread.
pub fn install(shard: Rc<Shard>) {
    LOCAL.with(|l| *l.borrow_mut() = Some(shard));
}

/// The shard running on this thread. Panics if called outside a shard executor (a bug).
pub fn local() -> Rc<Shard> {
    LOCAL.with(|l| l.borrow().clone().expect("called outside a shard executor"))
}

/// The shard running on this thread, if any.
pub fn try_local() -> Option<Rc<Shard>> {
    LOCAL.with(|l| l.borrow().clone())
}

impl Shard {
    pub fn new(id: ShardId, broker: Arc<BrokerContext>) -> Shard {
        let cache = BatchCache::new(broker.config.cache_bytes);
        Shard {
            id,
            broker,
            partitions: RefCell::new(HashMap::new()),
            replicas: RefCell::new(HashMap::new()),
            replicated: RefCell::new(HashSet::new()),
            replica_attached: event_listener::Event::new(),
            transport: RefCell::new(None),
            cache,
            clock: Clock::system(),
            local_image: RefCell::new(None),
        }
    }

    /// The current metadata as this shard's read-only copy: rebuilt here when an image was
    /// published since the last call (one read of the publish counter otherwise), so it is never
    /// older than what [`BrokerContext::image`] returned before the call.
    pub fn metadata(&self) -> Rc<LocalImage> {
        let generation = self.broker.generation();
        if let Some(v) = self.local_image.borrow().as_ref() {
            if v.generation == generation {
                return v.clone();
            }
        }
        let v = Rc::new(LocalImage::build(&self.broker, generation));
        *self.local_image.borrow_mut() = Some(v.clone());
        v
    }

    pub fn partition(&self, tp: &dyn PartitionKey) -> Option<Rc<PartitionLog>> {
        self.partitions.borrow().get(tp).cloned()
    }

    /// The raft group of a partition with replicas held here.
    pub fn replica(&self, tp: &dyn PartitionKey) -> Option<Rc<ReplicatedPartition>> {
        self.replicas.borrow().get(tp).cloned()
    }

    /// Whether `tp`'s log is open here and belongs to a raft group that is not attached yet: at
    /// start-up, from the opening of the logs until the controller starts their groups, and
    /// while [`open_replica_here`] starts one. Such a log is raft's: nothing may append to it,
    /// serve reads from it, clean it or move its start outside raft until its replica runs
    /// (a plain append would put a batch in the log that is no raft entry).
    pub fn awaits_replica(&self, tp: &dyn PartitionKey) -> bool {
        self.replicated.borrow().contains(tp) && !self.replicas.borrow().contains_key(tp)
    }

    /// Waits until `tp`'s replica is attached here; `None` once `tp` no longer belongs to a
    /// raft group on this shard (removed) or the broker stops.
    pub async fn attached_replica(&self, tp: &TopicPartition) -> Option<Rc<ReplicatedPartition>> {
        loop {
            let attached = self.replica_attached.listen();
            if let Some(r) = self.replica(tp) {
                return Some(r);
            }
            if !self.replicated.borrow().contains(tp)
                || self
                    .broker
                    .stopping
                    .load(std::sync::atomic::Ordering::SeqCst)
            {
                return None;
            }
            // Stopping does not notify: look again now and then.
            futures_lite::future::or(attached, self.clock.sleep(ATTACH_RECHECK)).await;
        }
    }
}

/// How often [`Shard::attached_replica`] looks again without a notification (to see the broker
/// stopping).
const ATTACH_RECHECK: std::time::Duration = std::time::Duration::from_millis(200);

/// The port of shard `shard`'s partition transport on a node whose controller listens on
/// `internal_port`: the ports right above it, one per shard, so that every node derives every
/// peer's address from `--controllers` alone.
pub fn partition_transport_port(internal_port: u16, shard: ShardId) -> Option<u16> {
    u16::try_from(shard.0)
        .ok()
        .and_then(|s| internal_port.checked_add(1)?.checked_add(s))
}

/// In a cluster: starts the calling shard's partition transport (at start-up), listening on its
/// [`partition_transport_port`], with the same shard of every controller node as peers.
pub fn start_partition_transport() -> Result<(), String> {
    let shard = local();
    let Some(cluster) = shard.broker.config.cluster.clone() else {
        return Ok(());
    };
    let at = |addr: std::net::SocketAddr| {
        partition_transport_port(addr.port(), shard.id)
            .map(|port| std::net::SocketAddr::new(addr.ip(), port))
            .ok_or_else(|| format!("no partition transport port above {addr}"))
    };
    let listen = at(cluster.internal_listen)?;
    let mut peers = HashMap::new();
    for (id, addr) in &cluster.controllers {
        peers.insert(*id as u64, at(*addr)?);
    }
    let me = shard.broker.config.node_id as u64;
    let transport =
        sluice_raft::Transport::start(sluice_raft::TransportConfig::new(me, listen, peers))
            .map_err(|e| {
                format!("cannot listen on the partition transport address {listen}: {e}")
            })?;
    *shard.transport.borrow_mut() = Some(transport);
    Ok(())
}

/// Asks node `leader`, the current leader of raft group `group_id`, to hand leadership to
/// replica `to`, over the calling shard's partition transport (the group's traffic flows
/// between the same shard of every node, so call this on the partition's shard). The message
/// is raft's own leader-transfer request, as raft-rs forwards it from a follower to its
/// leader: a local message (term 0) from the transferee, which the leader acts on as if it had
/// been asked itself. False when this shard has no transport (not in a cluster). The request
/// may be lost like any raft message: the caller watches the leadership and asks again.
pub fn ask_leader_transfer(group_id: u64, leader: u64, to: u64) -> bool {
    use sluice_raft::eraftpb::{Message, MessageType};
    let Some(transport) = local().transport.borrow().clone() else {
        return false;
    };
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgTransferLeader);
    m.to = leader;
    m.from = to;
    m.term = 0;
    transport.send(group_id, vec![m]);
    true
}

/// Opens one partition replica on the calling shard (idempotent): its log, then its raft group
/// `group_id` over the `voters`' same shard. Leadership changes are published to every shard
/// through [`BrokerContext::set_replica_leader`].
pub async fn open_replica_here(
    tp: TopicPartition,
    lc: LogConfig,
    group_id: u64,
    voters: Vec<u64>,
) -> Result<(), StorageError> {
    let shard = local();
    if shard.replica(&tp).is_some() {
        return Ok(());
    }
    open_partition_here(tp.clone(), lc, true).await?;
    let log = shard.partition(&tp).expect("just opened");
    if let Some(d) = crate::fault::delay_for("replica_start", &tp.to_string()) {
        shard.clock.sleep(d).await;
    }
    let transport = shard.transport.borrow().clone().ok_or_else(|| {
        StorageError::Io(std::io::Error::other(
            "no partition transport on this shard (not in a cluster)",
        ))
    })?;
    let me = shard.broker.config.node_id as u64;
    let config = sluice_raft::GroupConfig::new(group_id, me, voters.clone());
    let replica = Rc::new(ReplicatedPartition::start(log, config, &transport).await?);
    spawn_isr_publisher(tp.clone(), replica.clone(), voters.clone());
    spawn_preferred_leader_check(replica.clone(), voters);
    let statuses = replica.watch();
    let broker = shard.broker.clone();
    let watched = tp.clone();
    crate::contain::spawn_background("partition leader watcher", async move {
        while let Ok(s) = statuses.recv().await {
            if s.role == sluice_raft::Role::Stopped {
                break;
            }
            let leader = s.leader_id.map(|l| l as i32).unwrap_or(-1);
            let epoch = i32::try_from(s.term).unwrap_or(i32::MAX);
            broker.set_replica_leader(&watched, leader, epoch);
        }
    });
    shard.replicas.borrow_mut().insert(tp, replica);
    shard.replica_attached.notify(usize::MAX);
    Ok(())
}

/// How long a follower may go without catching up with the leader's log and still count as in
/// sync (Kafka's `replica.lag.time.max.ms`, 30 s there): 10 s, several election timeouts, so a
/// follower that is down or stuck leaves the ISR well before a client's request times out,
/// while one that keeps pace (it catches up every round trip) never does.
pub const REPLICA_LAG_TIME_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// How often a partition leader republishes its ISR for Metadata and `min.insync.replicas`.
const ISR_PUBLISH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// While `replica` runs: publishes, every `ISR_PUBLISH_INTERVAL`, its in-sync replicas among
/// `voters` when it leads (see [`ReplicatedPartition::in_sync`]), and withdraws them when it
/// does not.
fn spawn_isr_publisher(tp: TopicPartition, replica: Rc<ReplicatedPartition>, voters: Vec<u64>) {
    let broker = local().broker.clone();
    crate::contain::spawn_background("partition ISR publisher", async move {
        loop {
            if replica.role() == sluice_raft::Role::Stopped {
                broker.set_replica_isr(&tp, None);
                break;
            }
            let isr = replica
                .in_sync(&voters, REPLICA_LAG_TIME_MAX)
                .map(|isr| isr.into_iter().map(|n| n as i32).collect());
            broker.set_replica_isr(&tp, isr);
            local().clock.sleep(ISR_PUBLISH_INTERVAL).await;
        }
    });
}

/// With `auto.leader.rebalance.enable`: while `replica` runs, every
/// `leader.imbalance.check.interval`, a leader that is not the partition's preferred replica
/// (the first of `voters`) hands leadership to it once that replica is in sync and its node is
/// not fenced — Kafka's automatic preferred leader election, so leaders spread again after a
/// node comes back. Raft's leader transfer brings the preferred replica up to date before it
/// campaigns, so nothing committed is lost.
fn spawn_preferred_leader_check(replica: Rc<ReplicatedPartition>, voters: Vec<u64>) {
    let broker = local().broker.clone();
    let Some(&preferred) = voters.first() else {
        return;
    };
    if !broker.config.auto_leader_rebalance_enable {
        return;
    }
    let interval =
        std::time::Duration::from_millis(broker.config.leader_imbalance_check_interval_ms);
    let me = broker.config.node_id as u64;
    if me == preferred {
        return;
    }
    crate::contain::spawn_background("preferred leader check", async move {
        loop {
            local().clock.sleep(interval).await;
            if replica.role() == sluice_raft::Role::Stopped {
                break;
            }
            let Some(isr) = replica.in_sync(&voters, REPLICA_LAG_TIME_MAX) else {
                continue;
            };
            let fenced = i32::try_from(preferred)
                .map(|p| broker.image().fenced.contains(&p))
                .unwrap_or(true);
            if isr.contains(&preferred) && !fenced {
                tracing::info!(
                    group = replica.group().status().group_id,
                    to = preferred,
                    "handing leadership back to the preferred replica"
                );
                replica.group().transfer_leader(preferred);
            }
        }
    });
}

/// Opens one partition log on the calling shard (idempotent). `replicated`: the partition has
/// a raft group (in the metadata), so the log waits for its replica (see
/// [`Shard::awaits_replica`]) before anything but raft touches it.
pub async fn open_partition_here(
    tp: TopicPartition,
    lc: LogConfig,
    replicated: bool,
) -> Result<(), StorageError> {
    let shard = local();
    if replicated {
        shard.replicated.borrow_mut().insert(tp.clone());
    }
    if shard.partition(&tp).is_some() {
        return Ok(());
    }
    let dir = shard.broker.partition_dir(&tp);
    let log = PartitionLog::open_with_io(
        &dir,
        lc,
        shard.cache.clone(),
        DmaIo::shared(),
        shard.clock.clone(),
    )
    .await?;
    shard.partitions.borrow_mut().insert(tp, log);
    Ok(())
}

/// Gives every partition of `t` open on this node its log configuration from `t`'s configs
/// now (after a config change), each on its shard: retention, segment size and age, flush
/// policy apply from the next append, roll or retention round.
pub async fn reconfigure_partitions(broker: &BrokerContext, t: &crate::metadata::TopicMeta) {
    let image = broker.image();
    let lc = crate::metadata::configs::log_config(
        &crate::metadata::configs::BrokerDefaults::of(&broker.config, &image),
        &t.configs,
    );
    for p in 0..t.partition_count() {
        let Some(owner) = broker.owner(t, p) else {
            continue;
        };
        let tp = TopicPartition::new(t.name.clone(), p);
        let lc = lc.clone();
        invoke_on(owner, move || async move {
            if let Some(log) = local().partition(&tp) {
                log.set_config(lc);
            }
        })
        .await;
    }
}

/// Closes and removes one partition log of the calling shard (its directory too, if the log was
/// not open), so the name can be reused at once.
pub async fn remove_partition_here(tp: TopicPartition) -> Result<(), StorageError> {
    let shard = local();
    shard.replicated.borrow_mut().remove(&tp);
    let replica = shard.replicas.borrow_mut().remove(&tp);
    if let Some(r) = replica {
        r.stop().await;
        shard.broker.forget_replica_leader(&tp);
        shard.broker.set_replica_isr(&tp, None);
    }
    let log = shard.partitions.borrow_mut().remove(&tp);
    match log {
        Some(log) => log.remove().await,
        None => {
            let dir = shard.broker.partition_dir(&tp);
            let _ = glommio::executor()
                .spawn_blocking(move || std::fs::remove_dir_all(dir))
                .await;
            Ok(())
        }
    }
}

/// Closes every partition log of the calling shard (at shutdown).
pub async fn close_partitions() {
    let replicas: Vec<_> = local().replicas.borrow_mut().drain().collect();
    for (_, r) in replicas {
        r.stop().await;
    }
    if let Some(t) = local().transport.borrow_mut().take() {
        t.close();
    }
    let logs: Vec<_> = local().partitions.borrow_mut().drain().collect();
    // Concurrently, with a few file-system syncs for all of them (see `storage::close_all`).
    for (tp, e) in crate::storage::close_all(logs).await {
        tracing::error!(partition = %tp, error = %e, "close failed");
    }
}

/// Spawns `fut` on this shard as a contained task: a panic ends that task only, with
/// `Err(Panic)` as its output. Await it with [`join`], which re-raises the panic in the awaiting
/// task, so a panic of work a request spawned unwinds into that request (itself contained by
/// the server) instead of taking the shard down.
pub fn spawn_contained<F, T>(fut: F) -> JoinHandle<Result<T, Panic>>
where
    F: Future<Output = T> + 'static,
    T: 'static,
{
    glommio::spawn_local(contain(fut)).detach()
}

/// Awaits a task from [`spawn_contained`]: its output, `None` if it was cancelled, and its panic
/// re-raised here.
pub async fn join<T>(task: JoinHandle<Result<T, Panic>>) -> Option<T> {
    match task.await? {
        Ok(v) => Some(v),
        Err(p) => p.resume(),
    }
}

/// Runs `f` on shard `target` and returns its result. When `target` is the calling shard the
/// closure runs inline, with no hop. A panic of `f` on the target shard is caught there, carried
/// back over the reply channel and re-raised in the caller, exactly as if `f` had run inline: the
/// target shard keeps running and the caller's own containment decides what the panic costs.
pub async fn invoke_on<F, Fut, R>(target: ShardId, f: F) -> R
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = R> + 'static,
    R: Send + 'static,
{
    let here = local();
    if here.id == target {
        return f().await;
    }
    let (tx, rx) = async_channel::bounded::<Result<R, Panic>>(1);
    let job: Job = Box::new(move || {
        Box::pin(async move {
            let r = contain(async move { f().await }).await;
            if let Err(Err(mut p)) = tx.send(r).await.map_err(|e| e.into_inner()) {
                // The caller is gone (its request was dropped): nobody will re-raise it.
                p.mark_reported();
                tracing::error!("cross-shard call {p}; its caller is gone");
            }
        })
    });
    let inbox = &here.broker.inboxes[target.0];
    crate::stats::hop_sent();
    if inbox.send(job).await.is_err() {
        panic!("shard {} inbox closed while the broker runs", target.0);
    }
    match rx
        .recv()
        .await
        .expect("shard dropped a cross-shard call without answering")
    {
        Ok(r) => r,
        Err(p) => p.resume(),
    }
}

/// Runs `f` on every shard concurrently and collects the results in shard order. A panic of `f`
/// on any shard is re-raised in the caller once every shard has answered.
pub async fn invoke_on_all<F, Fut, R>(f: F) -> Vec<R>
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = R> + 'static,
    R: Send + 'static,
{
    let n = local().broker.shard_count();
    let mut tasks = Vec::with_capacity(n);
    for s in 0..n {
        let f = f.clone();
        // Contained: the call to this very shard runs inline inside the spawned task.
        tasks.push(spawn_contained(invoke_on(ShardId(s), f)));
    }
    let mut out = Vec::with_capacity(n);
    let mut panicked = None;
    for t in tasks {
        match t.await {
            Some(Ok(r)) => out.push(r),
            Some(Err(p)) => {
                // Keep the first; a later one logs itself when dropped.
                panicked.get_or_insert(p);
            }
            None => panic!("a cross-shard call task was cancelled"),
        }
    }
    if let Some(p) = panicked {
        p.resume();
    }
    out
}

/// The message pump of one shard: runs each job sent to it as its own task. Jobs are contained
/// ([`invoke_on`] also catches inside the job to carry the panic back); a job that panics anyway
/// is logged and the pump goes on.
pub async fn serve_inbox(rx: async_channel::Receiver<Job>) {
    while let Ok(job) = rx.recv().await {
        crate::stats::hop_received();
        crate::contain::spawn_background("cross-shard job", async move { job().await });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{BrokerConfig, StartArgs};

    fn topic(name: &str, configs: &[(&str, &str)]) -> Arc<TopicMeta> {
        Arc::new(TopicMeta {
            name: name.to_string(),
            id: [1; 16],
            shards: vec![0],
            configs: configs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            internal: false,
            nodes: vec![],
            replicas: vec![],
            groups: vec![],
        })
    }

    #[test]
    fn a_shard_sees_each_published_image_with_its_topic_configs_resolved() {
        let config = BrokerConfig::from_args(&StartArgs {
            cores: Some(1),
            message_bytes_max: Some(5000),
            ..Default::default()
        })
        .expect("config");
        let broker = Arc::new(BrokerContext::new(config, MetadataImage::default(), vec![]));
        let shard = Shard::new(ShardId(0), broker.clone());
        let first = shard.metadata();
        assert!(first.topic("a").is_none());
        // Unchanged until something is published: the same copy, not a rebuilt one.
        assert!(Rc::ptr_eq(&first, &shard.metadata()));

        let mut image = MetadataImage::default();
        image.topics.insert("a".into(), topic("a", &[]));
        image.topics.insert(
            "b".into(),
            topic(
                "b",
                &[
                    ("max.message.bytes", "100"),
                    ("message.timestamp.type", "LogAppendTime"),
                    ("min.insync.replicas", "2"),
                ],
            ),
        );
        broker.publish(Arc::new(image));
        let now = shard.metadata();
        assert!(!Rc::ptr_eq(&first, &now));
        let a = now.topic("a").expect("published topic a");
        assert_eq!(
            a.produce,
            ProduceConfig {
                max_message_bytes: 5000,
                log_append_time: false,
                min_insync_replicas: 1,
                compacted: false,
            },
            "the broker's defaults"
        );
        let b = now.topic("b").expect("published topic b");
        assert_eq!(
            b.produce,
            ProduceConfig {
                max_message_bytes: 100,
                log_append_time: true,
                min_insync_replicas: 2,
                compacted: false,
            },
            "the topic's overrides"
        );
        assert!(Rc::ptr_eq(&now, &shard.metadata()));
    }
}
