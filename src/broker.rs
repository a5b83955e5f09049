//! The broker process: shared read-mostly state (config, metadata image, shard inboxes), start-up
//! (data-dir lock, port check, metadata replay, one pinned executor per shard) and shutdown.
//! Topic administration runs on shard 0, the only metadata writer; partition logs are opened and
//! removed on their owner shards.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use glommio::{LocalExecutorBuilder, Placement};

use crate::config::BrokerConfig;
use crate::metadata::{configs, MetadataImage, MetadataStore, TopicMeta};
use crate::shard::{self, invoke_on, Job, Shard};
use crate::storage::{BatchCache, PartitionLog, StorageError};
use crate::types::{ShardId, TopicPartition};

pub struct Broker {
    pub config: BrokerConfig,
    pub metadata: ArcSwap<MetadataImage>,
    pub inboxes: Vec<async_channel::Sender<Job>>,
    /// Closed (never sent on) to tell every shard to stop.
    shutdown_tx: Mutex<Option<async_channel::Sender<()>>>,
    pub shutdown_rx: async_channel::Receiver<()>,
    pub stopping: AtomicBool,
    /// Producer ids handed out by InitProducerId; persisted as a high-water block.
    pub next_producer_id: AtomicU64,
    /// Only shard 0 touches it; the Mutex is never contended and only satisfies `Sync`.
    store: Mutex<Option<MetadataStore>>,
    /// Serialises topic administration on shard 0.
    admin_lock: glommio_free_lock::Lock,
}

/// A tiny async lock usable from one thread (shard 0) without being `!Sync` in `Broker`.
mod glommio_free_lock {
    pub struct Lock(async_channel::Sender<()>, async_channel::Receiver<()>);
    impl Default for Lock {
        fn default() -> Self {
            let (tx, rx) = async_channel::bounded(1);
            Lock(tx, rx)
        }
    }
    pub struct Guard<'a>(&'a async_channel::Receiver<()>);
    impl Lock {
        pub async fn lock(&self) -> Guard<'_> {
            let _ = self.0.send(()).await;
            Guard(&self.1)
        }
    }
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            let _ = self.0.try_recv();
        }
    }
}

/// Why an admin operation failed, mapped to a Kafka error code by the handler.
#[derive(Debug)]
pub enum AdminError {
    TopicExists,
    UnknownTopic,
    InvalidTopic(String),
    InvalidPartitions(String),
    InvalidConfig(String),
    InvalidReplicationFactor,
    Storage(String),
}

impl AdminError {
    pub fn message(&self) -> String {
        match self {
            AdminError::TopicExists => "topic already exists".into(),
            AdminError::UnknownTopic => "unknown topic".into(),
            AdminError::InvalidTopic(m)
            | AdminError::InvalidPartitions(m)
            | AdminError::InvalidConfig(m)
            | AdminError::Storage(m) => m.clone(),
            AdminError::InvalidReplicationFactor => {
                "replication factor must be 1 (or -1) on a single node".into()
            }
        }
    }
}

impl Broker {
    pub fn shard_count(&self) -> usize {
        self.inboxes.len()
    }

    /// The shard that owns `partition` of `topic` in this process.
    pub fn owner(&self, topic: &TopicMeta, partition: i32) -> Option<ShardId> {
        topic
            .shards
            .get(usize::try_from(partition).ok()?)
            .map(|s| ShardId(*s as usize % self.shard_count()))
    }

    pub fn image(&self) -> Arc<MetadataImage> {
        self.metadata.load_full()
    }

    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.shutdown_tx.lock().unwrap().take();
    }

    pub fn partition_dir(&self, tp: &TopicPartition) -> PathBuf {
        self.config.data_dir.join(tp.dir_name())
    }

    /// Assigns shards to `count` new partitions, spreading them over the shards with the fewest
    /// partitions, starting after the topic's id hash so small topics don't pile onto shard 0.
    /// Applies one change to the metadata log (fsynced) and publishes the new image to every
    /// shard. Shard 0 only: it owns the store.
    fn write_metadata(
        &self,
        change: impl FnOnce(&mut MetadataStore) -> std::io::Result<()>,
    ) -> Result<Arc<MetadataImage>, AdminError> {
        let mut store = self.store.lock().unwrap();
        let store = store.as_mut().expect("metadata store lives on shard 0");
        change(store).map_err(|e| AdminError::Storage(e.to_string()))?;
        let image = Arc::new(store.image().clone());
        self.metadata.store(image.clone());
        Ok(image)
    }

    /// Partitions each running shard owns in `image`.
    fn shard_loads(&self, image: &MetadataImage) -> Vec<usize> {
        let n = self.shard_count() as u32;
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
    fn check_partition_room(&self, image: &MetadataImage, count: i32) -> Result<(), AdminError> {
        let room = self
            .shard_count()
            .saturating_mul(self.config.partitions_per_shard_max);
        let owned: usize = self.shard_loads(image).iter().sum();
        let wanted = usize::try_from(count).unwrap_or(usize::MAX);
        if owned.saturating_add(wanted) > room {
            return Err(AdminError::InvalidPartitions(format!(
                "{count} more partitions do not fit: the shards own {owned} of at most {room} \
                 (partitions_per_shard_max)"
            )));
        }
        Ok(())
    }

    fn assign_shards(&self, image: &MetadataImage, seed: u32, first: i32, count: i32) -> Vec<u32> {
        let n = self.shard_count() as u32;
        let mut load = self.shard_loads(image);
        (0..count)
            .map(|i| {
                let start = (seed.wrapping_add((first + i) as u32)) % n;
                let best = (0..n)
                    .map(|k| (start + k) % n)
                    .min_by_key(|s| load[*s as usize])
                    .unwrap_or(0);
                load[best as usize] += 1;
                best
            })
            .collect()
    }

    fn check_shard_capacity(&self, image: &MetadataImage, new: &[u32]) -> Result<(), AdminError> {
        let n = self.shard_count() as u32;
        let mut load = self.shard_loads(image);
        for s in new {
            load[(*s % n) as usize] += 1;
        }
        if load
            .iter()
            .any(|l| *l > self.config.partitions_per_shard_max)
        {
            return Err(AdminError::InvalidPartitions(format!(
                "a shard would own more than {} partitions (partitions_per_shard_max)",
                self.config.partitions_per_shard_max
            )));
        }
        Ok(())
    }
}

/// Creates a topic: validated, written to the metadata log (fsynced), published, then its
/// partition logs opened on their owner shards. Runs on shard 0 (forwarded there if needed).
pub async fn create_topic(
    name: String,
    partitions: i32,
    replication_factor: i16,
    overrides: BTreeMap<String, String>,
    validate_only: bool,
    internal: bool,
) -> Result<Arc<TopicMeta>, AdminError> {
    invoke_on(ShardId(0), move || async move {
        let shard = shard::local();
        let broker = shard.broker.clone();
        let _g = broker.admin_lock.lock().await;
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
        if replication_factor != 1 && replication_factor != -1 {
            return Err(AdminError::InvalidReplicationFactor);
        }
        for (k, v) in &overrides {
            configs::validate(k, v, internal).map_err(AdminError::InvalidConfig)?;
        }
        let image = broker.image();
        if image.topic(&name).is_some() {
            return Err(AdminError::TopicExists);
        }
        let id = *uuid::Uuid::new_v4().as_bytes();
        let seed = crc32fast::hash(&id);
        broker.check_partition_room(&image, partitions)?;
        let shards = broker.assign_shards(&image, seed, 0, partitions);
        broker.check_shard_capacity(&image, &shards)?;
        let meta = TopicMeta {
            name: name.clone(),
            id,
            shards,
            configs: overrides,
            internal,
        };
        if validate_only {
            return Ok(Arc::new(meta));
        }
        // Open the logs first: a topic is published only once every partition can take writes.
        open_partitions(&broker, &meta, 0).await?;
        let image = broker.write_metadata(|store| store.create_topic(meta))?;
        let published = image.topic(&name).cloned().expect("just created");
        tracing::info!(topic = %name, partitions, "topic created");
        Ok(published)
    })
    .await
}

/// Opens partitions `first..` of `meta` on their owner shards.
async fn open_partitions(
    broker: &Arc<Broker>,
    meta: &TopicMeta,
    first: i32,
) -> Result<(), AdminError> {
    let log_config = configs::log_config(&broker.config, &meta.configs);
    for p in first..meta.partition_count() {
        let owner = broker.owner(meta, p).expect("partition in range");
        let tp = TopicPartition::new(meta.name.clone(), p);
        let lc = log_config.clone();
        invoke_on(
            owner,
            move || async move { open_partition_here(tp, lc).await },
        )
        .await
        .map_err(|e| AdminError::Storage(e.to_string()))?;
    }
    Ok(())
}

/// Opens one partition log on the calling shard (idempotent).
pub async fn open_partition_here(
    tp: TopicPartition,
    lc: crate::storage::LogConfig,
) -> Result<(), StorageError> {
    let shard = shard::local();
    if shard.partition(&tp).is_some() {
        return Ok(());
    }
    let dir = shard.broker.partition_dir(&tp);
    let log = PartitionLog::open(&dir, lc, shard.cache.clone()).await?;
    shard.partitions.borrow_mut().insert(tp, log);
    Ok(())
}

/// Deletes a topic: unpublished and logged first, then the partition logs closed and their
/// directories removed on the owner shards, so the name can be reused at once.
pub async fn delete_topic(name: String) -> Result<(), AdminError> {
    invoke_on(ShardId(0), move || async move {
        let broker = shard::local().broker.clone();
        let _g = broker.admin_lock.lock().await;
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
        broker.write_metadata(|store| store.delete_topic(&name))?;
        for p in 0..meta.partition_count() {
            let owner = broker.owner(&meta, p).expect("in range");
            let tp = TopicPartition::new(name.clone(), p);
            invoke_on(owner, move || async move {
                let shard = shard::local();
                let log = shard.partitions.borrow_mut().remove(&tp);
                match log {
                    Some(log) => log.remove().await,
                    None => {
                        let _ = std::fs::remove_dir_all(shard.broker.partition_dir(&tp));
                        Ok(())
                    }
                }
            })
            .await
            .map_err(|e| AdminError::Storage(e.to_string()))?;
        }
        tracing::info!(topic = %name, "topic deleted");
        Ok(())
    })
    .await
}

/// Raises a topic's partition count to `total` (CreatePartitions).
pub async fn add_partitions(
    name: String,
    total: i32,
    validate_only: bool,
) -> Result<(), AdminError> {
    invoke_on(ShardId(0), move || async move {
        let broker = shard::local().broker.clone();
        let _g = broker.admin_lock.lock().await;
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
        broker.check_partition_room(&image, total - current)?;
        let new = broker.assign_shards(&image, seed, current, total - current);
        broker.check_shard_capacity(&image, &new)?;
        if validate_only {
            return Ok(());
        }
        let mut grown = (*meta).clone();
        grown.shards.extend(new.iter().copied());
        open_partitions(&broker, &grown, current).await?;
        broker.write_metadata(|store| store.add_partitions(&name, new))?;
        Ok(())
    })
    .await
}

/// Holds the data-dir lock for the life of the process (flock; released by the kernel on exit,
/// even after `kill -9`).
struct DirLock {
    _file: File,
}

fn lock_data_dir(dir: &Path) -> Result<DirLock, String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", dir.display()))?;
    let path = dir.join(".lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a valid descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(format!(
            "data dir {} is in use by another sluice process (lock held on {})",
            dir.display(),
            path.display()
        ));
    }
    let _ = file.set_len(0);
    let _ = writeln!(file, "{}", std::process::id());
    Ok(DirLock { _file: file })
}

/// SO_REUSEPORT would let us bind a port another process holds and silently share its traffic:
/// refuse to start unless a plain bind (without SO_REUSEPORT) succeeds first. The socket is bound
/// but never listens, so no client can connect to it in the meantime.
///
/// A broker killed with SIGKILL releases its listening socket only when the kernel has torn down
/// its io_uring instances (an accept in flight holds the socket), which can take a moment after
/// the process is gone; a restart in that window waits for the port instead of failing.
fn check_port_free(addr: std::net::SocketAddr) -> Result<(), String> {
    const PORT_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(3);
    let deadline = std::time::Instant::now() + PORT_WAIT_MAX;
    loop {
        let sock = new_tcp_socket(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        match sock.bind(&addr.into()) {
            Ok(()) => return Ok(()),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                drop(sock);
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(format!("cannot listen on {addr}: {e}")),
        }
    }
}

fn new_tcp_socket(addr: std::net::SocketAddr) -> std::io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // Connections of a previous run lingering in TIME_WAIT must not keep a restarted broker
    // from binding its port (Kafka restarts at once, so do we).
    sock.set_reuse_address(true)?;
    Ok(sock)
}

/// The shard's listener: SO_REUSEPORT so every shard listens on the same port and the kernel
/// spreads connections, SO_REUSEADDR so a restart binds at once.
fn bind_listener(addr: std::net::SocketAddr) -> std::io::Result<glommio::net::TcpListener> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let sock = new_tcp_socket(addr)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    // SAFETY: a bound, listening TCP socket whose descriptor we hand over.
    Ok(unsafe { glommio::net::TcpListener::from_raw_fd(sock.into_raw_fd()) })
}

/// Producer ids are handed out from blocks persisted in `__meta/producer_ids` so that ids are
/// never reused across restarts.
pub const PRODUCER_ID_BLOCK: u64 = 1000;

fn load_producer_id_block(data_dir: &Path) -> std::io::Result<u64> {
    let path = data_dir.join("__meta/producer_ids");
    let start = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    write_producer_id_limit(data_dir, start + PRODUCER_ID_BLOCK)?;
    Ok(start)
}

pub fn write_producer_id_limit(data_dir: &Path, limit: u64) -> std::io::Result<()> {
    let path = data_dir.join("__meta/producer_ids");
    let tmp = data_dir.join("__meta/producer_ids.tmp");
    {
        let mut f = File::create(&tmp)?;
        writeln!(f, "{limit}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    File::open(data_dir.join("__meta"))?.sync_all()
}

/// Starts the broker and blocks until it has shut down. Returns the process exit code.
pub fn run(mut config: BrokerConfig) -> Result<(), String> {
    // Contained panics are logged once by their catcher; others by the default hook.
    crate::contain::install_hook();
    crate::fault::init();
    tune_allocator();
    raise_fd_limit();
    let _lock = lock_data_dir(&config.data_dir)?;
    // Absolute from here on: direct-I/O files are opened by absolute path, and logs name it.
    config.data_dir = std::fs::canonicalize(&config.data_dir)
        .map_err(|e| format!("cannot resolve data dir {}: {e}", config.data_dir.display()))?;
    check_port_free(config.listen)?;
    let store = MetadataStore::open(&config.data_dir)
        .map_err(|e| format!("cannot open metadata in {}: {e}", config.data_dir.display()))?;
    let pid_start = load_producer_id_block(&config.data_dir)
        .map_err(|e| format!("cannot write producer id block: {e}"))?;
    let image = store.image().clone();
    let n = config.shard_count();
    let mut inboxes = Vec::with_capacity(n);
    let mut receivers = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = async_channel::bounded::<Job>(shard::INBOX_DEPTH_MAX);
        inboxes.push(tx);
        receivers.push(rx);
    }
    let (shutdown_tx, shutdown_rx) = async_channel::bounded(1);
    let broker = Arc::new(Broker {
        config: config.clone(),
        metadata: ArcSwap::from_pointee(image),
        inboxes,
        shutdown_tx: Mutex::new(Some(shutdown_tx)),
        shutdown_rx,
        stopping: AtomicBool::new(false),
        next_producer_id: AtomicU64::new(pid_start),
        store: Mutex::new(Some(store)),
        admin_lock: Default::default(),
    });

    // Signals: the first SIGINT/SIGTERM starts a graceful shutdown.
    {
        let broker = broker.clone();
        let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])
            .map_err(|e| format!("cannot install signal handlers: {e}"))?;
        std::thread::Builder::new()
            .name("sluice-signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    tracing::info!(signal = sig, "shutting down");
                    broker.begin_shutdown();
                }
            })
            .map_err(|e| e.to_string())?;
    }

    let ready = Arc::new(std::sync::Barrier::new(n + 1));
    let failed: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let mut handles = Vec::with_capacity(n);
    for (i, rx) in receivers.into_iter().enumerate() {
        let broker = broker.clone();
        let ready = ready.clone();
        let failed = failed.clone();
        let cpu = config.cpus[i];
        let h = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{i}"))
            .spawn(move || async move {
                run_shard(ShardId(i), broker, rx, ready, failed).await;
            })
            .map_err(|e| format!("cannot start shard {i} on cpu {cpu}: {e}"))?;
        handles.push(h);
    }
    ready.wait();
    if let Some(e) = failed.lock().unwrap().clone() {
        broker.begin_shutdown();
        for h in handles {
            let _ = h.join();
        }
        return Err(e);
    }
    tracing::info!(
        listen = %config.listen,
        shards = n,
        data_dir = %config.data_dir.display(),
        "sluice started"
    );
    for h in handles {
        let _ = h.join();
    }
    tracing::info!("sluice stopped");
    Ok(())
}

/// Every partition holds its segment file open, and its active segment's two index files once
/// they are written; with sockets on top, a thousand partitions pass the usual soft limit of
/// 1,024 descriptors. Raise the soft limit to the hard one, as Kafka's and Redpanda's
/// deployment guides ask operators to.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= lim.rlim_max {
            return;
        }
        let from = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            tracing::info!(from, to = lim.rlim_max, "raised the open-file limit");
        }
    }
}

/// Request frames and batch copies are often 64 KiB-1 MiB. glibc serves blocks that large with
/// fresh mmaps and returns them on free, so every produce request paid for page faults and the
/// kernel zeroing new pages (a third of the broker's CPU under load). Keep them in the heap.
pub fn tune_allocator() {
    // SAFETY: mallopt only adjusts glibc allocator thresholds; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

pub fn next_connection_id() -> u64 {
    NEXT_CONN.fetch_add(1, Ordering::Relaxed)
}

async fn run_shard(
    id: ShardId,
    broker: Arc<Broker>,
    inbox: async_channel::Receiver<Job>,
    ready: Arc<std::sync::Barrier>,
    failed: Arc<Mutex<Option<String>>>,
) {
    let shard = Rc::new(Shard {
        id,
        broker: broker.clone(),
        partitions: RefCell::new(HashMap::new()),
        cache: BatchCache::new(broker.config.cache_bytes),
    });
    shard::install(shard.clone());
    glommio::spawn_local(shard::serve_inbox(inbox)).detach();

    // Open the partitions this shard owns.
    let image = broker.image();
    let mut err = None;
    for t in image.topics.values() {
        let lc = configs::log_config(&broker.config, &t.configs);
        for p in 0..t.partition_count() {
            if broker.owner(t, p) == Some(id) {
                let tp = TopicPartition::new(t.name.clone(), p);
                if let Err(e) = open_partition_here(tp.clone(), lc.clone()).await {
                    err = Some(format!("cannot open partition {tp}: {e}"));
                }
            }
        }
    }
    let listener = match err {
        Some(e) => Err(e),
        None => bind_listener(broker.config.listen)
            .map_err(|e| format!("cannot listen on {}: {e}", broker.config.listen)),
    };
    let listener = match listener {
        Ok(l) => Some(l),
        Err(e) => {
            failed.lock().unwrap().get_or_insert(e);
            None
        }
    };
    ready.wait();
    let Some(listener) = listener else {
        close_partitions(&shard).await;
        return;
    };
    crate::contain::spawn_background("retention", retention_loop());
    crate::group::start_shard_tasks();
    crate::server::accept_loop(listener).await;
    close_partitions(&shard).await;
}

async fn retention_loop() {
    loop {
        glommio::timer::sleep(std::time::Duration::from_secs(30)).await;
        let logs: Vec<_> = shard::local()
            .partitions
            .borrow()
            .values()
            .cloned()
            .collect();
        let now = crate::types::now_ms();
        for log in logs {
            // Contained per log: a panic skips that log this round (logged) and the loop goes on.
            match crate::contain::contain(log.enforce_retention(now)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(dir = %log.dir().display(), error = %e, "retention failed")
                }
                Err(mut p) => {
                    p.mark_reported();
                    tracing::error!(dir = %log.dir().display(), "retention {p}; skipped this round");
                }
            }
        }
    }
}

async fn close_partitions(shard: &Rc<Shard>) {
    let logs: Vec<_> = shard.partitions.borrow_mut().drain().collect();
    for (tp, log) in logs {
        if let Err(e) = log.close().await {
            tracing::error!(partition = %tp, error = %e, "close failed");
        }
    }
}
