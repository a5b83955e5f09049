//! The controller of a cluster: one raft group (group 0, `sluice-raft`) over the nodes listed
//! in `--controllers`, on shard 0 of each, with its transport on the node's internal listener
//! and its log under `<data-dir>/__controller/`. Its state machine is the metadata image: each
//! entry is one [`Record`], applied with [`MetadataImage::apply`]; its snapshot is the image as
//! one record. Every node applies the same entries in the same order and publishes the image to
//! its shards exactly as the single node's metadata owner does, after opening the partition
//! logs the entry gives to this node (and before removing those it takes away).
//!
//! The leader is the controller: topic administration (`admin`) proposes records there and
//! answers once its entry is applied and published here. Other nodes answer NOT_CONTROLLER
//! and name the leader in Metadata. Each node registers itself (id, Kafka address, shard
//! count) with a proposal forwarded to the leader. The leader fences a broker it has not heard
//! from (no controller raft message) for `FENCE_AFTER`, and unfences it when it hears it again.
//!
//! Not used on a single node (no `--controllers`): no internal listener, no raft.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_listener::Event;
use sluice_raft::{
    FileLog, GroupConfig, ProposeError, RaftGroup, Role, StateMachine, Transport, TransportConfig,
};

use crate::metadata::{configs, BrokerInfo, MetadataImage, PartitionLeader, Record, TopicMeta};
use crate::shard::{self, invoke_on, BrokerContext};
use crate::types::{ShardId, TopicPartition};

/// The controller's raft group id (partition groups will use their global ids, from 1).
pub const CONTROLLER_GROUP: u64 = 0;

/// The shard the controller runs on (with the metadata owner).
pub const CONTROLLER_SHARD: ShardId = ShardId(0);

/// How long a node waits for its registration to appear in the image before proposing it
/// again (the forwarded proposal may have been lost, e.g. to a leader change).
const REGISTER_RETRY: Duration = Duration::from_secs(1);

/// A broker the controller leader has not heard from for this long is fenced: it leads
/// nothing in Metadata and gets no new partitions. The design's 6 s: a few missed heartbeat
/// ticks (100 ms) are not a failure, a crashed or cut-off node is noticed within seconds.
const FENCE_AFTER: Duration = Duration::from_secs(6);

/// How often the leader checks whom it has heard from.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);

/// How often a partition leader proposes again a leadership report the image does not show yet
/// (a forwarded proposal may be lost, e.g. to a controller leader change).
const REPORT_RETRY: Duration = Duration::from_secs(1);

/// Why a proposal was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControllerError {
    /// This node is not the controller leader (or stopped being it before the entry committed:
    /// the client retries against the new one).
    NotController,
    /// The group has stopped or refused the entry.
    Failed(String),
}

/// The image a [`ControllerSm`] hands to the publisher: the state after the entry at `index`.
type Applied = (u64, Arc<MetadataImage>);

/// The controller's state machine: the metadata image, updated by each committed record.
struct ControllerSm {
    image: MetadataImage,
    applied: async_channel::Sender<Applied>,
    /// Index of the last image handed to the publisher (shared with [`Controller`]).
    handed: Rc<Cell<u64>>,
}

impl ControllerSm {
    fn hand_over(&self, index: u64) {
        self.handed.set(index);
        // Unbounded: the publisher takes every image in order.
        let _ = self.applied.try_send((index, Arc::new(self.image.clone())));
    }
}

impl StateMachine for ControllerSm {
    fn apply(&mut self, index: u64, _term: u64, data: &[u8]) {
        match Record::decode(data) {
            Some(r) => self.image.apply(r),
            None => tracing::error!(index, "controller entry is not a metadata record; skipped"),
        }
        self.hand_over(index);
    }

    fn snapshot(&mut self) -> Vec<u8> {
        self.image.snapshot_record().encode()
    }

    fn restore(&mut self, index: u64, _term: u64, data: &[u8]) {
        let mut image = MetadataImage::default();
        match Record::decode(data) {
            Some(r) => image.apply(r),
            None => tracing::error!(index, "controller snapshot is not a metadata record"),
        }
        self.image = image;
        self.hand_over(index);
    }
}

/// The controller on shard 0 of this node.
struct Controller {
    group: RaftGroup,
    transport: Transport,
    /// Index of the last entry whose image the state machine handed to the publisher.
    handed: Rc<Cell<u64>>,
    /// Index of the last entry whose image is published to every shard.
    published: Cell<u64>,
    /// Notified after each publish.
    published_event: Event,
}

thread_local! {
    static CONTROLLER: RefCell<Option<Rc<Controller>>> = const { RefCell::new(None) };
}

fn controller() -> Option<Rc<Controller>> {
    CONTROLLER.with(|c| c.borrow().clone())
}

/// Starts the controller on the calling shard (shard 0, at start-up, in a cluster): binds the
/// internal listener, opens the raft log and starts the group, the publisher, the leader
/// watcher and this node's registration.
pub fn start() -> Result<(), String> {
    let shard = shard::local();
    assert_eq!(
        shard.id, CONTROLLER_SHARD,
        "the controller lives on shard 0"
    );
    let broker = shard.broker.clone();
    let cluster = broker
        .config
        .cluster
        .clone()
        .expect("the controller starts only in a cluster");
    let me = broker.config.node_id as u64;
    let peers: HashMap<u64, std::net::SocketAddr> = cluster
        .controllers
        .iter()
        .map(|(id, addr)| (*id as u64, *addr))
        .collect();
    let transport = Transport::start(TransportConfig::new(me, cluster.internal_listen, peers))
        .map_err(|e| {
            format!(
                "cannot listen on the internal address {}: {e}",
                cluster.internal_listen
            )
        })?;
    let dir = broker.config.data_dir.join("__controller");
    let log = FileLog::open(&dir)
        .map_err(|e| format!("cannot open the controller log in {}: {e}", dir.display()))?;
    let (tx, rx) = async_channel::unbounded();
    let handed = Rc::new(Cell::new(0));
    let sm = ControllerSm {
        image: MetadataImage::default(),
        applied: tx,
        handed: handed.clone(),
    };
    let voters = cluster
        .controllers
        .iter()
        .map(|(id, _)| *id as u64)
        .collect();
    let group = RaftGroup::start(
        GroupConfig::new(CONTROLLER_GROUP, me, voters),
        log,
        sm,
        &transport,
    )
    .map_err(|e| format!("cannot start the controller group: {e}"))?;
    let c = Rc::new(Controller {
        group,
        transport,
        handed,
        published: Cell::new(0),
        published_event: Event::new(),
    });
    CONTROLLER.with(|slot| *slot.borrow_mut() = Some(c.clone()));
    crate::contain::spawn_background("controller publisher", publish_loop(c.clone(), rx));
    crate::contain::spawn_background("controller watcher", watch_leader(c.clone()));
    crate::contain::spawn_background("broker registration", register(c.clone()));
    crate::contain::spawn_background("broker liveness", liveness(c.clone()));
    crate::contain::spawn_background("partition leadership reports", report_leaders(c));
    tracing::info!(
        node = me,
        internal = %cluster.internal_listen,
        "controller started"
    );
    Ok(())
}

/// Stops the controller group and closes the internal listener (at shutdown).
pub async fn stop() {
    if let Some(c) = controller() {
        c.group.stop().await;
        c.transport.close();
    }
}

/// Keeps [`BrokerContext::controller_id`] naming the leader this node knows of.
async fn watch_leader(c: Rc<Controller>) {
    let broker = shard::local().broker.clone();
    let statuses = c.group.watch();
    while let Ok(s) = statuses.recv().await {
        let leader = s.leader_id.map(|id| id as i32).unwrap_or(-1);
        if broker.controller_id() != leader {
            tracing::info!(leader, term = s.term, "controller leader changed");
        }
        broker.set_controller_id(leader);
        if s.role == Role::Stopped {
            broker.set_controller_id(-1);
            return;
        }
    }
}

/// Registers this node with the controller, again until the image shows it (the proposal is
/// forwarded to the leader and may be lost on the way).
async fn register(c: Rc<Controller>) {
    let shard = shard::local();
    let broker = shard.broker.clone();
    let me = BrokerInfo {
        id: broker.config.node_id,
        host: broker.config.advertise_host.clone(),
        port: broker.config.advertise_port,
        shards: broker.shard_count() as u32,
        rack: broker.config.rack.clone(),
    };
    let registered = |i: &MetadataImage| i.brokers.get(&me.id) == Some(&me);
    loop {
        if registered(&broker.image()) {
            tracing::info!(node = me.id, "broker registered with the controller");
            return;
        }
        if broker.controller_id() >= 0 {
            let _ = c
                .group
                .propose_forwarded(Record::RegisterBroker(me.clone()).encode());
        }
        let done = futures_lite::future::or(
            async { broker.image_where(registered).await.is_none() },
            async {
                shard.clock.sleep(REGISTER_RETRY).await;
                false
            },
        )
        .await;
        if done {
            return; // stopping
        }
    }
}

/// On the leader, every `LIVENESS_CHECK`: fences each registered broker not heard from for
/// `FENCE_AFTER` (counted from when this node became leader, at the earliest) and unfences each
/// fenced one heard from within the last check.
async fn liveness(c: Rc<Controller>) {
    let shard = shard::local();
    let broker = shard.broker.clone();
    let me = broker.config.node_id;
    let mut leading_since: Option<Instant> = None;
    loop {
        shard.clock.sleep(LIVENESS_CHECK).await;
        if broker.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let status = c.group.status();
        if status.role == Role::Stopped {
            return;
        }
        if status.role != Role::Leader || status.applied < status.commit {
            leading_since = None;
            continue;
        }
        let since = *leading_since.get_or_insert_with(Instant::now);
        let image = broker.image();
        for b in image.brokers.values() {
            let fenced = image.fenced.contains(&b.id);
            let silent = if b.id == me {
                Duration::ZERO
            } else {
                let heard = c.group.last_heard(b.id as u64).unwrap_or(since).max(since);
                heard.elapsed()
            };
            let change = if !fenced && silent > FENCE_AFTER {
                tracing::warn!(node = b.id, ?silent, "fencing a broker not heard from");
                Record::FenceBroker { id: b.id }
            } else if fenced && silent < 2 * LIVENESS_CHECK {
                tracing::info!(node = b.id, "unfencing a broker heard from again");
                Record::UnfenceBroker { id: b.id }
            } else {
                continue;
            };
            if let Err(e) = propose(change).await {
                tracing::debug!(node = b.id, error = ?e, "liveness change not applied");
            }
        }
    }
}

/// Reports to the controller the leadership (epoch and ISR) of every partition this node leads
/// whenever the image records something else, so that every node — one holding no replica of
/// the partition too — names the current leader in Metadata (Kafka's leader and ISR changes in
/// the controller's log). A report is idempotent and an older epoch never replaces a newer one,
/// so it is forwarded without waiting and proposed again until the image shows it.
async fn report_leaders(c: Rc<Controller>) {
    let shard = shard::local();
    let broker = shard.broker.clone();
    let me = broker.config.node_id;
    loop {
        let changed = broker.replicas_changed();
        if broker.stopping.load(std::sync::atomic::Ordering::SeqCst)
            || c.group.status().role == Role::Stopped
        {
            return;
        }
        let image = broker.image();
        if broker.controller_id() >= 0 {
            for (tp, epoch, isr) in broker.led_here() {
                let Some(t) = image.topic(&tp.topic) else {
                    continue;
                };
                let mut isr = isr.unwrap_or_else(|| t.replica_nodes(tp.partition).to_vec());
                isr.sort_unstable();
                let recorded = image.leader_of(&tp.topic, tp.partition);
                if recorded.is_some_and(|r| {
                    r.epoch > epoch || (r.epoch == epoch && r.leader == me && r.isr == isr)
                }) {
                    continue;
                }
                let report = Record::PartitionLeader(PartitionLeader {
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                    leader: me,
                    epoch,
                    isr,
                });
                let _ = c.group.propose_forwarded(report.encode());
            }
        }
        futures_lite::future::or(changed, async {
            shard.clock.sleep(REPORT_RETRY).await;
        })
        .await;
    }
}

/// Publishes each applied image in order: first the partition logs it gives this node are
/// opened (so a published partition can take writes), then the image goes to every shard, then
/// the logs of partitions it no longer has here are removed.
async fn publish_loop(c: Rc<Controller>, applied: async_channel::Receiver<Applied>) {
    let broker = shard::local().broker.clone();
    while let Ok((index, image)) = applied.recv().await {
        let old = broker.image();
        // A name whose topic was replaced (deleted and created again, seen at once through a
        // snapshot) loses its old logs first: the new topic's logs use the same directories.
        for (name, t) in &old.topics {
            if image.topic(name).is_some_and(|n| n.id != t.id) {
                remove_local(&broker, t).await;
            }
        }
        for (name, t) in &image.topics {
            let first = match old.topic(name) {
                Some(o) if o.id == t.id => o.partition_count(),
                _ => 0,
            };
            open_local(&broker, &image, t, first).await;
        }
        broker.publish(image.clone());
        // Config changes reach the open logs of the topic's partitions on this node (all
        // topics when the dynamic broker configs changed).
        let defaults_changed = old.broker_configs != image.broker_configs;
        for (name, t) in &image.topics {
            if old
                .topic(name)
                .is_some_and(|o| o.id == t.id && (defaults_changed || o.configs != t.configs))
            {
                shard::reconfigure_partitions(&broker, t).await;
            }
        }
        for (name, t) in &old.topics {
            if image.topic(name).is_none() {
                remove_local(&broker, t).await;
            }
        }
        c.published.set(index);
        c.published_event.notify(usize::MAX);
    }
}

/// Opens the partitions `first..` of `t` that live on this node, each on its shard.
async fn open_local(broker: &BrokerContext, image: &MetadataImage, t: &TopicMeta, first: i32) {
    let lc = configs::log_config(
        &configs::BrokerDefaults::of(&broker.config, image),
        &t.configs,
    );
    for p in first..t.partition_count() {
        let Some(owner) = broker.owner(t, p) else {
            continue;
        };
        let tp = TopicPartition::new(t.name.clone(), p);
        let lc = lc.clone();
        let name = tp.clone();
        let group = t.groups.get(p as usize).copied();
        let voters: Vec<u64> = t.replica_nodes(p).iter().map(|n| *n as u64).collect();
        let opened = invoke_on(owner, move || async move {
            match group {
                Some(g) => shard::open_replica_here(tp, lc, g, voters).await,
                None => shard::open_partition_here(tp, lc, false).await,
            }
        })
        .await;
        if let Err(e) = opened {
            tracing::error!(partition = %name, error = %e, "cannot open partition");
        }
    }
}

/// Closes and removes the logs of `t`'s partitions that live on this node.
async fn remove_local(broker: &BrokerContext, t: &TopicMeta) {
    for p in 0..t.partition_count() {
        let Some(owner) = broker.owner(t, p) else {
            continue;
        };
        let tp = TopicPartition::new(t.name.clone(), p);
        let name = tp.clone();
        if let Err(e) = invoke_on(owner, move || shard::remove_partition_here(tp)).await {
            tracing::error!(partition = %name, error = %e, "cannot remove partition");
        }
    }
}

/// Checks that this node is the leader and waits until it has published every entry it has
/// applied, so that checks against the published image see everything earlier leaders decided.
/// A leader that has not applied all it knows committed (just elected) answers NotController:
/// the client retries. Shard 0 only.
pub async fn lead() -> Result<(), ControllerError> {
    let c = controller().ok_or(ControllerError::NotController)?;
    let status = c.group.status();
    if status.role != Role::Leader || status.applied < status.commit {
        return Err(ControllerError::NotController);
    }
    wait_published(&c, c.handed.get()).await;
    if !c.group.is_leader() {
        return Err(ControllerError::NotController);
    }
    Ok(())
}

async fn wait_published(c: &Controller, index: u64) {
    loop {
        let l = c.published_event.listen();
        if c.published.get() >= index {
            return;
        }
        l.await;
    }
}

/// Proposes `record` and waits until its entry is applied and the resulting image published on
/// this node. Returns that image. Shard 0 only.
pub async fn propose(record: Record) -> Result<Arc<MetadataImage>, ControllerError> {
    let c = controller().ok_or(ControllerError::NotController)?;
    match c.group.propose(record.encode()).await {
        Ok(index) => {
            wait_published(&c, index).await;
            Ok(shard::local().broker.image())
        }
        Err(ProposeError::NotLeader { .. })
        | Err(ProposeError::LeadershipLost)
        | Err(ProposeError::Dropped) => Err(ControllerError::NotController),
        Err(e) => Err(ControllerError::Failed(format!(
            "the controller did not take the change: {e}"
        ))),
    }
}
