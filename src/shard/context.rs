//! The state every shard shares with the whole broker process: the configuration, the published
//! metadata image, the shard inboxes and the stop signal. Built once by the broker's start-up
//! before any shard runs and installed in every shard ([`super::Shard::broker`]); read-mostly and
//! `Sync`. The metadata image is replaced (never edited) by the metadata owner on shard 0.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use event_listener::Event;

use super::Job;
use crate::config::BrokerConfig;
use crate::metadata::{MetadataImage, TopicMeta};
use crate::types::{ShardId, TopicPartition};

pub struct BrokerContext {
    pub config: BrokerConfig,
    /// The current metadata image; swapped whole by [`BrokerContext::publish`].
    metadata: ArcSwap<MetadataImage>,
    /// How many images were published: written only by [`BrokerContext::publish`], read by every
    /// shard to see whether its own copy ([`super::LocalImage`]) is current.
    generation: AtomicU64,
    /// Notified after every [`BrokerContext::publish`].
    published: Event,
    /// One inbox per shard, indexed by shard id (see [`super::invoke_on`]).
    pub(super) inboxes: Vec<async_channel::Sender<Job>>,
    /// Closed (never sent on) to tell every shard to stop.
    shutdown_tx: async_channel::Sender<()>,
    pub shutdown_rx: async_channel::Receiver<()>,
    pub stopping: AtomicBool,
    /// The controller leader's node id, -1 while none is known; on a single node, this node.
    controller_id: AtomicI32,
    /// The raft leader (-1 while none is known) and term of each partition with replicas held
    /// on this node, as its shard last saw them; read by Metadata on any shard.
    replica_leaders: Mutex<HashMap<TopicPartition, (i32, i32)>>,
    /// The in-sync replicas of each partition this node leads, from raft progress, as its
    /// shard last computed them (see `shard::open_replica_here`).
    replica_isr: Mutex<HashMap<TopicPartition, Vec<i32>>>,
    /// Notified when a partition replica held here sees another leader or term, or the ISR of
    /// a partition this node leads changes (the controller's leadership reports wait on it).
    replicas_changed: Event,
}

impl BrokerContext {
    pub fn new(
        config: BrokerConfig,
        image: MetadataImage,
        inboxes: Vec<async_channel::Sender<Job>>,
    ) -> BrokerContext {
        let (shutdown_tx, shutdown_rx) = async_channel::bounded(1);
        BrokerContext {
            metadata: ArcSwap::from_pointee(image),
            generation: AtomicU64::new(0),
            published: Event::new(),
            inboxes,
            shutdown_tx,
            shutdown_rx,
            stopping: AtomicBool::new(false),
            controller_id: AtomicI32::new(if config.cluster.is_some() {
                -1
            } else {
                config.node_id
            }),
            replica_leaders: Mutex::new(HashMap::new()),
            replica_isr: Mutex::new(HashMap::new()),
            replicas_changed: Event::new(),
            config,
        }
    }

    /// Records the raft leader and term of a partition replica held here.
    pub fn set_replica_leader(&self, tp: &TopicPartition, leader: i32, epoch: i32) {
        let old = self
            .replica_leaders
            .lock()
            .expect("replica leaders")
            .insert(tp.clone(), (leader, epoch));
        if old != Some((leader, epoch)) {
            self.replicas_changed.notify(usize::MAX);
        }
    }

    /// Listens for the next change of a replica's leader or term, or of a led partition's ISR.
    pub fn replicas_changed(&self) -> event_listener::EventListener {
        self.replicas_changed.listen()
    }

    /// The partitions whose replica here names this node leader: (partition, epoch, ISR as
    /// published; the replica set until the first publication).
    pub fn led_here(&self) -> Vec<(TopicPartition, i32, Option<Vec<i32>>)> {
        let me = self.config.node_id;
        let led: Vec<(TopicPartition, i32)> = self
            .replica_leaders
            .lock()
            .expect("replica leaders")
            .iter()
            .filter(|(_, (l, _))| *l == me)
            .map(|(tp, (_, e))| (tp.clone(), *e))
            .collect();
        let isr = self.replica_isr.lock().expect("replica ISR");
        led.into_iter()
            .map(|(tp, e)| {
                let i = isr.get(&tp).cloned();
                (tp, e, i)
            })
            .collect()
    }

    pub fn forget_replica_leader(&self, tp: &TopicPartition) {
        self.replica_leaders
            .lock()
            .expect("replica leaders")
            .remove(tp);
    }

    /// Records the in-sync replicas of a partition this node leads; `None`: it leads it no more.
    pub fn set_replica_isr(&self, tp: &TopicPartition, isr: Option<Vec<i32>>) {
        let mut m = self.replica_isr.lock().expect("replica ISR");
        let changed = match isr {
            Some(isr) => m.insert(tp.clone(), isr.clone()).is_none_or(|o| o != isr),
            None => m.remove(tp).is_some(),
        };
        drop(m);
        if changed {
            self.replicas_changed.notify(usize::MAX);
        }
    }

    /// The in-sync replicas of a partition this node leads, from raft progress; `None` when it
    /// does not lead it.
    pub fn replica_isr(&self, tp: &TopicPartition) -> Option<Vec<i32>> {
        self.replica_isr
            .lock()
            .expect("replica ISR")
            .get(tp)
            .cloned()
    }

    /// The raft leader (-1 while none is known) and term of a partition replica held here.
    pub fn replica_leader(&self, tp: &TopicPartition) -> Option<(i32, i32)> {
        self.replica_leaders
            .lock()
            .expect("replica leaders")
            .get(tp)
            .copied()
    }

    /// Whether this node holds a replica of `partition` of `topic` (on a single node, every
    /// existing partition).
    pub fn holds(&self, topic: &TopicMeta, partition: i32) -> bool {
        if topic.nodes.is_empty() {
            return partition >= 0 && partition < topic.partition_count();
        }
        topic
            .replica_nodes(partition)
            .contains(&self.config.node_id)
    }

    pub fn shard_count(&self) -> usize {
        self.inboxes.len()
    }

    /// The shard that owns `partition` of `topic` in this process; `None` when the partition
    /// does not exist or (in a cluster) lives on another node.
    pub fn owner(&self, topic: &TopicMeta, partition: i32) -> Option<ShardId> {
        let p = usize::try_from(partition).ok()?;
        if !self.holds(topic, partition) {
            return None;
        }
        topic
            .shards
            .get(p)
            .map(|s| ShardId(*s as usize % self.shard_count()))
    }

    /// The node that holds `partition` of `topic` (on a single node, this one); `None` when the
    /// partition does not exist.
    pub fn node_of(&self, topic: &TopicMeta, partition: i32) -> Option<i32> {
        let p = usize::try_from(partition).ok()?;
        if p >= topic.shards.len() {
            return None;
        }
        match topic.nodes.get(p) {
            Some(n) => Some(*n),
            None if topic.nodes.is_empty() => Some(self.config.node_id),
            None => None,
        }
    }

    /// Queues `job` on shard `target`'s inbox without waiting, from any thread (the metrics
    /// exporter's scrape); `false` if the inbox is full or closed.
    pub fn try_send_job(&self, target: ShardId, job: Job) -> bool {
        self.inboxes
            .get(target.0)
            .is_some_and(|inbox| inbox.try_send(job).is_ok())
    }

    /// The controller leader's node id, -1 while none is known.
    pub fn controller_id(&self) -> i32 {
        self.controller_id.load(Ordering::SeqCst)
    }

    pub fn set_controller_id(&self, id: i32) {
        self.controller_id.store(id, Ordering::SeqCst);
    }

    /// The number of images published so far (see [`super::Shard::metadata`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn image(&self) -> Arc<MetadataImage> {
        self.metadata.load_full()
    }

    /// Makes `image` the one every shard reads from now on, and wakes every
    /// [`BrokerContext::image_where`] waiter.
    pub fn publish(&self, image: Arc<MetadataImage>) {
        self.metadata.store(image);
        // After the store: a shard that sees the new generation loads this image or a newer one.
        self.generation.fetch_add(1, Ordering::Release);
        self.published.notify(usize::MAX);
    }

    /// Waits (on any shard) until the published image satisfies `cond`, and returns that image;
    /// `None` once the broker is stopping.
    pub async fn image_where(
        &self,
        cond: impl Fn(&MetadataImage) -> bool,
    ) -> Option<Arc<MetadataImage>> {
        loop {
            // Listen before looking, so a publish between the look and the wait is not missed.
            let published = self.published.listen();
            let image = self.image();
            if cond(&image) {
                return Some(image);
            }
            if self.stopping.load(Ordering::SeqCst) {
                return None;
            }
            let stopped = async {
                let _ = self.shutdown_rx.recv().await;
            };
            futures_lite::future::or(published, stopped).await;
        }
    }

    /// Tells every shard to stop: sets the flag and closes the shutdown channel, which wakes
    /// whoever waits on [`BrokerContext::shutdown_rx`].
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.shutdown_tx.close();
    }

    pub fn partition_dir(&self, tp: &TopicPartition) -> PathBuf {
        self.config.data_dir.join(tp.dir_name())
    }
}
