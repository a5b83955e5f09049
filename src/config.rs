//! One typed broker configuration, merged from (highest first) command-line flags, `SLUICE_*`
//! environment variables, a TOML file given with `--config`, and defaults. Validated once at start;
//! an invalid value is one clear line and exit code 2.
//!
//! Each setting is declared once, in [`StartArgs`]: that struct is both the flags (and `SLUICE_*`
//! variables) and the TOML file. Defaults are written once, in [`DEFAULTS`]; the "[default: …]"
//! each flag's help shows is checked against it by a test. [`BrokerConfig`] is the validated result.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::storage::{FlushPolicy, RETENTION_MS_DEFAULT, SEGMENT_BYTES_DEFAULT};

/// Every setting of `sluice start`: a flag, a `SLUICE_*` variable and (but `config`) a key of the
/// TOML file. Every field is optional so that the file and defaults can fill gaps.
#[derive(Args, Deserialize, Serialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct StartArgs {
    /// TOML file with any of the settings below (keys use underscores: data_dir, listen, …).
    #[arg(long, env = "SLUICE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Directory holding the partition logs and metadata [default: ./sluice-data].
    #[arg(long, env = "SLUICE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// host:port to listen on [default: 127.0.0.1:9092].
    #[arg(long, env = "SLUICE_LISTEN")]
    pub listen: Option<String>,
    /// host:port given to clients in Metadata [default: the listen address].
    #[arg(long, env = "SLUICE_ADVERTISE")]
    pub advertise: Option<String>,
    /// Number of shards (one pinned executor per core) [default: all usable CPUs].
    #[arg(long, env = "SLUICE_CORES")]
    pub cores: Option<usize>,
    /// Node id reported in Metadata; in a cluster, this node's id in --controllers [default: 0].
    #[arg(long, env = "SLUICE_NODE_ID")]
    pub node_id: Option<i32>,
    /// This node's rack (Kafka's `broker.rack`): reported in Metadata and DescribeCluster, and
    /// KIP-848 assignors prefer giving a partition to a member on a rack of its replicas
    /// [default: none].
    #[arg(long, env = "SLUICE_RACK")]
    pub rack: Option<String>,
    /// The controller voters of a cluster, `id@host:port` of each one's internal listener,
    /// comma-separated (this node listens on its own entry) [default: none: a single node].
    #[arg(long, env = "SLUICE_CONTROLLERS")]
    pub controllers: Option<String>,
    /// Create unknown topics named in a Metadata request that allows it (Kafka's
    /// `auto.create.topics.enable`); Produce never creates topics [default: true].
    #[arg(long, env = "SLUICE_AUTO_CREATE_TOPICS")]
    pub auto_create_topics: Option<bool>,
    /// Partitions of auto-created topics and of CreateTopics with -1 [default: 1].
    #[arg(long, env = "SLUICE_DEFAULT_PARTITIONS")]
    pub default_partitions: Option<i32>,
    /// In a cluster: replicas of CreateTopics with -1 and of auto-created topics (Kafka's
    /// `default.replication.factor`) [default: 1].
    #[arg(long, env = "SLUICE_DEFAULT_REPLICATION_FACTOR")]
    pub default_replication_factor: Option<i16>,
    /// In a cluster: replicas of `__consumer_offsets` when it is created, at most the live
    /// registered nodes (Kafka's `offsets.topic.replication.factor`) [default: 3].
    #[arg(long, env = "SLUICE_OFFSETS_TOPIC_REPLICATION_FACTOR")]
    pub offsets_topic_replication_factor: Option<i16>,
    /// `always` (fdatasync before acks=all is answered) or a flush interval in ms [default: always].
    #[arg(long, env = "SLUICE_FLUSH")]
    pub flush: Option<String>,
    /// Default segment size in bytes [default: 1073741824].
    #[arg(long, env = "SLUICE_SEGMENT_BYTES")]
    pub segment_bytes: Option<u64>,
    /// Default retention in ms, -1 for none [default: 604800000].
    #[arg(long, env = "SLUICE_RETENTION_MS")]
    pub retention_ms: Option<i64>,
    /// Largest request accepted, in bytes [default: 104857600].
    #[arg(long, env = "SLUICE_REQUEST_BYTES_MAX")]
    pub request_bytes_max: Option<usize>,
    /// Most client connections per shard [default: 10000].
    #[arg(long, env = "SLUICE_CONNECTIONS_MAX")]
    pub connections_max: Option<usize>,
    /// Bytes of requests one connection may have in flight before the broker stops reading
    /// from it [default: 67108864].
    #[arg(long, env = "SLUICE_INFLIGHT_BYTES_MAX")]
    pub inflight_bytes_max: Option<usize>,
    /// Requests one connection may have unanswered before the broker stops reading from it
    /// [default: 128].
    #[arg(long, env = "SLUICE_INFLIGHT_REQUESTS_MAX")]
    pub inflight_requests_max: Option<usize>,
    /// Request bytes one shard holds at once over all its connections (frames being read and
    /// requests not yet answered); readers wait when it is spent [default: 536870912].
    #[arg(long, env = "SLUICE_SHARD_REQUEST_BYTES_MAX")]
    pub shard_request_bytes_max: Option<usize>,
    /// A request frame must arrive whole, and a response must be taken by the client, within
    /// this many ms, else the connection is closed [default: 30000].
    #[arg(long, env = "SLUICE_STALL_TIMEOUT_MS")]
    pub stall_timeout_ms: Option<u64>,
    /// A connection with nothing in flight that sends nothing for this many ms is closed
    /// (Kafka's connections.max.idle.ms) [default: 600000].
    #[arg(long, env = "SLUICE_CONNECTION_IDLE_MS")]
    pub connection_idle_ms: Option<u64>,
    /// Largest record batch accepted, in bytes [default: 1048588].
    #[arg(long, env = "SLUICE_MESSAGE_BYTES_MAX")]
    pub message_bytes_max: Option<i32>,
    /// Batch cache per shard, in bytes [default: 268435456].
    #[arg(long, env = "SLUICE_CACHE_BYTES")]
    pub cache_bytes: Option<usize>,
    /// Most partitions one shard may own [default: 100000].
    #[arg(long, env = "SLUICE_PARTITIONS_PER_SHARD_MAX")]
    pub partitions_per_shard_max: Option<usize>,
    /// Delay before the first rebalance of a new group completes, in ms (Kafka's
    /// `group.initial.rebalance.delay.ms`) [default: 3000].
    #[arg(long, env = "SLUICE_GROUP_INITIAL_REBALANCE_DELAY_MS")]
    pub group_initial_rebalance_delay_ms: Option<u64>,
    /// Committed offsets of empty groups expire after this many minutes [default: 10080].
    #[arg(long, env = "SLUICE_OFFSETS_RETENTION_MINUTES")]
    pub offsets_retention_minutes: Option<u64>,
    /// A transactional id with no transaction open and idle this long is removed, in ms
    /// (Kafka's `transactional.id.expiration.ms`) [default: 604800000].
    #[arg(long, env = "SLUICE_TRANSACTIONAL_ID_EXPIRATION_MS")]
    pub transactional_id_expiration_ms: Option<u64>,
    /// KIP-848 consumer groups: a member that does not heartbeat for this long is removed
    /// (Kafka's `group.consumer.session.timeout.ms`) [default: 45000].
    #[arg(long, env = "SLUICE_GROUP_CONSUMER_SESSION_TIMEOUT_MS")]
    pub group_consumer_session_timeout_ms: Option<u32>,
    /// KIP-848 consumer groups: the heartbeat interval given to members
    /// (`group.consumer.heartbeat.interval.ms`) [default: 5000].
    #[arg(long, env = "SLUICE_GROUP_CONSUMER_HEARTBEAT_INTERVAL_MS")]
    pub group_consumer_heartbeat_interval_ms: Option<u32>,
    /// In a cluster: move leadership of a replicated partition back to its preferred replica
    /// (the first of its replicas) once that one is live and in sync
    /// (`auto.leader.rebalance.enable`) [default: true].
    #[arg(long, env = "SLUICE_AUTO_LEADER_REBALANCE_ENABLE")]
    pub auto_leader_rebalance_enable: Option<bool>,
    /// How often a partition leader checks whether its preferred replica should lead instead
    /// (`leader.imbalance.check.interval.seconds`, in ms here) [default: 30000].
    #[arg(long, env = "SLUICE_LEADER_IMBALANCE_CHECK_INTERVAL_MS")]
    pub leader_imbalance_check_interval_ms: Option<u64>,
    /// KIP-848 server-side assignors, comma-separated, the first the default
    /// (`group.consumer.assignors`: `uniform`, `range`) [default: uniform,range].
    #[arg(long, env = "SLUICE_GROUP_CONSUMER_ASSIGNORS")]
    pub group_consumer_assignors: Option<String>,
    /// KIP-848 consumer groups: most members per group (`group.consumer.max.size`)
    /// [default: 2147483647].
    #[arg(long, env = "SLUICE_GROUP_CONSUMER_MAX_SIZE")]
    pub group_consumer_max_size: Option<u32>,
    /// Share groups (KIP-932): a member that does not heartbeat for this long is removed
    /// (Kafka's `group.share.session.timeout.ms`) [default: 45000].
    #[arg(long, env = "SLUICE_GROUP_SHARE_SESSION_TIMEOUT_MS")]
    pub group_share_session_timeout_ms: Option<u32>,
    /// Share groups: the heartbeat interval given to members
    /// (`group.share.heartbeat.interval.ms`) [default: 5000].
    #[arg(long, env = "SLUICE_GROUP_SHARE_HEARTBEAT_INTERVAL_MS")]
    pub group_share_heartbeat_interval_ms: Option<u32>,
    /// Share groups: most members per group (`group.share.max.size`) [default: 200].
    #[arg(long, env = "SLUICE_GROUP_SHARE_MAX_SIZE")]
    pub group_share_max_size: Option<u32>,
    /// Share groups: how long a delivered record stays acquired by its consumer before it is
    /// available again (`group.share.record.lock.duration.ms`) [default: 30000].
    #[arg(long, env = "SLUICE_GROUP_SHARE_RECORD_LOCK_DURATION_MS")]
    pub group_share_record_lock_duration_ms: Option<u32>,
    /// Share groups: deliveries of one record before it is archived
    /// (`group.share.delivery.count.limit`, 2-10) [default: 5].
    #[arg(long, env = "SLUICE_GROUP_SHARE_DELIVERY_COUNT_LIMIT")]
    pub group_share_delivery_count_limit: Option<u16>,
    /// Share groups: most in-flight records of one share partition
    /// (`group.share.partition.max.record.locks`, 100-10000) [default: 2000].
    #[arg(long, env = "SLUICE_GROUP_SHARE_PARTITION_MAX_RECORD_LOCKS")]
    pub group_share_partition_max_record_locks: Option<u32>,
    /// Online migration between classic and KIP-848 consumer groups
    /// (`group.consumer.migration.policy`: `bidirectional`, `upgrade`, `downgrade`, `disabled`)
    /// [default: bidirectional].
    #[arg(long, env = "SLUICE_GROUP_CONSUMER_MIGRATION_POLICY")]
    pub group_consumer_migration_policy: Option<String>,
    /// Log level filter (also RUST_LOG) [default: info].
    #[arg(long, env = "SLUICE_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log line format: `text` or `json` (one JSON object per line) [default: text].
    #[arg(long, env = "SLUICE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// host:port of the Prometheus metrics endpoint (`GET /metrics`); keep it on loopback or a
    /// private network, it is not authenticated [default: none: no metrics listener].
    #[arg(long, env = "SLUICE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

/// The default of every setting that has a fixed one, written only here (`advertise` defaults to
/// the listen address and `cores` to every usable CPU, both found at start).
#[derive(Debug, Serialize)]
pub struct Defaults {
    pub data_dir: &'static str,
    pub listen: &'static str,
    pub node_id: i32,
    pub auto_create_topics: bool,
    pub default_partitions: i32,
    pub default_replication_factor: i16,
    pub offsets_topic_replication_factor: i16,
    pub flush: &'static str,
    pub segment_bytes: u64,
    /// -1: keep data forever.
    pub retention_ms: i64,
    pub request_bytes_max: usize,
    pub connections_max: usize,
    pub inflight_bytes_max: usize,
    pub inflight_requests_max: usize,
    pub shard_request_bytes_max: usize,
    pub stall_timeout_ms: u64,
    pub connection_idle_ms: u64,
    pub message_bytes_max: i32,
    pub cache_bytes: usize,
    pub partitions_per_shard_max: usize,
    pub group_initial_rebalance_delay_ms: u64,
    pub offsets_retention_minutes: u64,
    pub transactional_id_expiration_ms: u64,
    pub group_consumer_session_timeout_ms: u32,
    pub group_consumer_heartbeat_interval_ms: u32,
    pub auto_leader_rebalance_enable: bool,
    pub leader_imbalance_check_interval_ms: u64,
    pub group_consumer_assignors: &'static str,
    pub group_consumer_max_size: u32,
    pub group_share_session_timeout_ms: u32,
    pub group_share_heartbeat_interval_ms: u32,
    pub group_share_max_size: u32,
    pub group_share_record_lock_duration_ms: u32,
    pub group_share_delivery_count_limit: u16,
    pub group_share_partition_max_record_locks: u32,
    pub group_consumer_migration_policy: &'static str,
    pub log_level: &'static str,
    pub log_format: &'static str,
}

pub const DEFAULTS: Defaults = Defaults {
    data_dir: "./sluice-data",
    listen: "127.0.0.1:9092",
    node_id: 0,
    auto_create_topics: true,
    default_partitions: 1,
    // Kafka's default.replication.factor: a cluster that lost a node still creates topics
    // with defaults.
    default_replication_factor: 1,
    // Kafka's offsets.topic.replication.factor: committed offsets and groups survive the loss
    // of a node.
    offsets_topic_replication_factor: 3,
    flush: "always",
    segment_bytes: SEGMENT_BYTES_DEFAULT,
    retention_ms: RETENTION_MS_DEFAULT as i64,
    request_bytes_max: 100 * 1024 * 1024,
    connections_max: 10_000,
    inflight_bytes_max: 64 * 1024 * 1024,
    inflight_requests_max: 128,
    shard_request_bytes_max: 512 * 1024 * 1024,
    stall_timeout_ms: 30_000,
    connection_idle_ms: 600_000,
    // Kafka's message.max.bytes: 1 MiB plus the 12-byte log overhead (offset and length).
    message_bytes_max: 1_048_588,
    cache_bytes: 256 * 1024 * 1024,
    partitions_per_shard_max: 100_000,
    // Kafka's group.initial.rebalance.delay.ms: members that start together form one
    // generation instead of a lone first member's generation followed by a second rebalance.
    group_initial_rebalance_delay_ms: 3_000,
    offsets_retention_minutes: 7 * 24 * 60,
    // Kafka's transactional.id.expiration.ms.
    transactional_id_expiration_ms: 7 * 24 * 3_600_000,
    // Kafka's KIP-848 defaults.
    group_consumer_session_timeout_ms: 45_000,
    group_consumer_heartbeat_interval_ms: 5_000,
    auto_leader_rebalance_enable: true,
    // Kafka checks every 300 s; a preferred replica back from a restart leads again within
    // half a minute here.
    leader_imbalance_check_interval_ms: 30_000,
    group_consumer_assignors: "uniform,range",
    group_consumer_max_size: i32::MAX as u32,
    // Kafka's KIP-932 defaults.
    group_share_session_timeout_ms: 45_000,
    group_share_heartbeat_interval_ms: 5_000,
    group_share_max_size: 200,
    group_share_record_lock_duration_ms: 30_000,
    group_share_delivery_count_limit: 5,
    group_share_partition_max_record_locks: 2_000,
    group_consumer_migration_policy: "bidirectional",
    log_level: "info",
    log_format: "text",
};

/// The values of `--group-consumer-migration-policy` (Kafka's `group.consumer.migration.policy`).
pub const CONSUMER_GROUP_MIGRATION_POLICIES: &[&str] =
    &["bidirectional", "upgrade", "downgrade", "disabled"];

/// The server-side assignors of KIP-848 consumer groups.
pub const CONSUMER_GROUP_ASSIGNORS: &[&str] = &["uniform", "range"];

/// Highest node id in a cluster: producer ids carry the node id in their low bits
/// (`admin::next_producer_id`), so ids must fit `NODE_ID_BITS`.
pub const NODE_ID_MAX: i32 = (1 << NODE_ID_BITS) - 1;
/// Bits of a producer id that name the node that handed it out, in a cluster.
pub const NODE_ID_BITS: u32 = 10;

/// Longest `--stall-timeout-ms` and `--connection-idle-ms`: a week. A connection's deadlines are
/// instants that far ahead, which must stay representable (a value near `u64::MAX` ms would
/// overflow the clock's arithmetic); Kafka's own `connections.max.idle.ms` is an `int` (under 25
/// days).
pub const CONNECTION_TIMEOUT_MS_MAX: u64 = 7 * 24 * 3600 * 1000;

/// A cluster's membership, from `--node-id` and `--controllers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Every controller voter: node id and the address of its internal listener, in the order
    /// given.
    pub controllers: Vec<(i32, SocketAddr)>,
    /// This node's internal listener (its own entry of `controllers`).
    pub internal_listen: SocketAddr,
}

/// Parses `--controllers` (`id@host:port,…`) for node `node_id`: ids 1..=`NODE_ID_MAX`, each
/// once, addresses that resolve, and `node_id` among them (every node is a controller voter
/// until brokers that are not voters exist).
fn parse_controllers(s: &str, node_id: i32) -> Result<ClusterConfig, String> {
    let mut controllers: Vec<(i32, SocketAddr)> = Vec::new();
    for entry in s.split(',').map(str::trim) {
        let (id, addr) = entry.split_once('@').ok_or_else(|| {
            format!("invalid --controllers entry '{entry}': expected id@host:port")
        })?;
        let id: i32 = id
            .parse()
            .ok()
            .filter(|id| (1..=NODE_ID_MAX).contains(id))
            .ok_or_else(|| {
                format!("invalid --controllers entry '{entry}': the id must be 1-{NODE_ID_MAX}")
            })?;
        let (host, port) = split_host_port(addr, "--controllers address")?;
        if port == 0 {
            return Err(format!(
                "invalid --controllers entry '{entry}': the port must not be 0"
            ));
        }
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                format!("invalid --controllers entry '{entry}': host '{host}' does not resolve")
            })?;
        if controllers.iter().any(|(other, _)| *other == id) {
            return Err(format!("invalid --controllers: node id {id} appears twice"));
        }
        if controllers.iter().any(|(_, other)| *other == addr) {
            return Err(format!(
                "invalid --controllers: address {addr} appears twice"
            ));
        }
        controllers.push((id, addr));
    }
    let internal_listen = controllers
        .iter()
        .find(|(id, _)| *id == node_id)
        .map(|(_, a)| *a)
        .ok_or_else(|| {
            format!(
                "--node-id {node_id} is not in --controllers: every node of a cluster is a \
                 controller voter (brokers that are not voters are not supported yet)"
            )
        })?;
    Ok(ClusterConfig {
        controllers,
        internal_listen,
    })
}

/// The validated broker configuration.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub advertise_host: String,
    pub advertise_port: u16,
    /// CPUs the shards are pinned to; shard i runs on `cpus[i]`.
    pub cpus: Vec<usize>,
    pub node_id: i32,
    /// `broker.rack` (`None`: no rack).
    pub rack: Option<String>,
    /// `None`: a single node (no internal listener, no raft, the metadata log).
    pub cluster: Option<ClusterConfig>,
    pub auto_create_topics: bool,
    pub default_partitions: i32,
    /// In a cluster: replicas of a topic created without a replication factor.
    pub default_replication_factor: i16,
    /// In a cluster: replicas of `__consumer_offsets` (capped by the live nodes at creation).
    pub offsets_topic_replication_factor: i16,
    pub flush: FlushPolicy,
    pub segment_bytes: u64,
    pub retention_ms: Option<u64>,
    /// Protects memory: a frame larger than this closes the connection.
    pub request_bytes_max: usize,
    /// Protects file descriptors and memory: connections past this are closed at accept.
    pub connections_max: usize,
    /// Back-pressure: a connection's unanswered request bytes past this stop its reads.
    pub inflight_bytes_max: usize,
    /// Protects memory: each unanswered request may hold a response (a fetch response is up to
    /// `fetch_bytes_max`); past this many a connection's reads pause.
    pub inflight_requests_max: usize,
    /// Protects a shard's memory from many connections at once: request bytes held by the shard
    /// (partial frames reserved at their declared size, unanswered requests) stay below it.
    pub shard_request_bytes_max: usize,
    /// Protects memory held for a stalled peer (slow-loris frames, a client that never reads):
    /// a frame must arrive whole, and each response write must progress, within it.
    pub stall_timeout_ms: u64,
    /// Protects connection slots and read buffers from idle clients.
    pub connection_idle_ms: u64,
    /// Default `max.message.bytes`: a larger batch gets MESSAGE_TOO_LARGE.
    pub message_bytes_max: i32,
    /// Batch cache budget of each shard.
    pub cache_bytes: usize,
    /// Protects a shard's memory and file descriptors: CreateTopics past it gets INVALID_PARTITIONS.
    pub partitions_per_shard_max: usize,
    pub group_initial_rebalance_delay_ms: u64,
    pub offsets_retention_minutes: u64,
    /// Protects the transaction coordinator's memory and log from ids never used again.
    pub transactional_id_expiration_ms: u64,
    pub group_consumer_session_timeout_ms: u32,
    pub group_consumer_heartbeat_interval_ms: u32,
    /// Leadership goes back to preferred replicas (see `StartArgs`).
    pub auto_leader_rebalance_enable: bool,
    pub leader_imbalance_check_interval_ms: u64,
    /// Server-side assignors of KIP-848 groups, the first the default; each one of
    /// [`CONSUMER_GROUP_ASSIGNORS`].
    pub group_consumer_assignors: Vec<String>,
    pub group_consumer_max_size: u32,
    pub group_share_session_timeout_ms: u32,
    pub group_share_heartbeat_interval_ms: u32,
    pub group_share_max_size: u32,
    pub group_share_record_lock_duration_ms: u32,
    /// Deliveries of one record before it is archived (2-10, Kafka's range).
    pub group_share_delivery_count_limit: u16,
    /// In-flight records of one share partition (100-10000, Kafka's range): bounds its memory.
    pub group_share_partition_max_record_locks: u32,
    /// One of [`CONSUMER_GROUP_MIGRATION_POLICIES`], lower case.
    pub group_consumer_migration_policy: String,
    pub log_level: String,
    pub log_format: LogFormat,
    /// Where the Prometheus endpoint listens; `None`: no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (tracing's default format).
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (with `message`).
    Json,
}

impl LogFormat {
    pub fn parse(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("invalid --log-format '{s}': expected text or json")),
        }
    }
}

/// CPUs this process may run on (sched_getaffinity), in ascending order.
pub fn usable_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1))
                .collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

fn split_host_port(s: &str, what: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("invalid {what} '{s}': expected host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("invalid {what} '{s}': port must be a number 0-65535"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(format!("invalid {what} '{s}': missing host"));
    }
    Ok((host, port))
}

impl BrokerConfig {
    pub fn from_args(args: &StartArgs) -> Result<BrokerConfig, String> {
        let file: StartArgs = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| {
                    let msg = e.message().to_string();
                    format!("invalid config file {}: {msg}", path.display())
                })?
            }
            None => StartArgs::default(),
        };
        // A flag (or its variable), else the file, else the default.
        macro_rules! pick {
            ($f:ident, $d:expr) => {
                args.$f.clone().or(file.$f.clone()).unwrap_or_else(|| $d)
            };
            ($f:ident) => {
                pick!($f, DEFAULTS.$f.into())
            };
        }
        let data_dir = pick!(data_dir);
        let group_consumer_session_timeout_ms = pick!(group_consumer_session_timeout_ms);
        let group_consumer_heartbeat_interval_ms = pick!(group_consumer_heartbeat_interval_ms);
        if group_consumer_session_timeout_ms == 0
            || group_consumer_session_timeout_ms > i32::MAX as u32
            || group_consumer_heartbeat_interval_ms == 0
            || group_consumer_heartbeat_interval_ms >= group_consumer_session_timeout_ms
        {
            return Err(format!(
                "--group-consumer-heartbeat-interval-ms ({group_consumer_heartbeat_interval_ms}) must be above 0 and below --group-consumer-session-timeout-ms ({group_consumer_session_timeout_ms})"
            ));
        }
        let group_share_session_timeout_ms = pick!(group_share_session_timeout_ms);
        let group_share_heartbeat_interval_ms = pick!(group_share_heartbeat_interval_ms);
        if group_share_session_timeout_ms == 0
            || group_share_session_timeout_ms > i32::MAX as u32
            || group_share_heartbeat_interval_ms == 0
            || group_share_heartbeat_interval_ms >= group_share_session_timeout_ms
        {
            return Err(format!(
                "--group-share-heartbeat-interval-ms ({group_share_heartbeat_interval_ms}) must be above 0 and below --group-share-session-timeout-ms ({group_share_session_timeout_ms})"
            ));
        }
        let group_share_record_lock_duration_ms = pick!(group_share_record_lock_duration_ms);
        if !(1_000..=3_600_000).contains(&group_share_record_lock_duration_ms) {
            return Err(format!(
                "--group-share-record-lock-duration-ms: 1000-3600000 expected, got {group_share_record_lock_duration_ms}"
            ));
        }
        let group_share_delivery_count_limit = pick!(group_share_delivery_count_limit);
        if !(2..=10).contains(&group_share_delivery_count_limit) {
            return Err(format!(
                "--group-share-delivery-count-limit: 2-10 expected, got {group_share_delivery_count_limit}"
            ));
        }
        let group_share_partition_max_record_locks = pick!(group_share_partition_max_record_locks);
        if !(100..=10_000).contains(&group_share_partition_max_record_locks) {
            return Err(format!(
                "--group-share-partition-max-record-locks: 100-10000 expected, got {group_share_partition_max_record_locks}"
            ));
        }
        let group_consumer_assignors: Vec<String> = pick!(group_consumer_assignors)
            .split(',')
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        if group_consumer_assignors.is_empty()
            || group_consumer_assignors
                .iter()
                .any(|a| !CONSUMER_GROUP_ASSIGNORS.contains(&a.as_str()))
        {
            return Err(format!(
                "--group-consumer-assignors: each of {} expected, got {:?}",
                CONSUMER_GROUP_ASSIGNORS.join(", "),
                group_consumer_assignors
            ));
        }
        let group_consumer_migration_policy =
            pick!(group_consumer_migration_policy).to_ascii_lowercase();
        if !CONSUMER_GROUP_MIGRATION_POLICIES.contains(&group_consumer_migration_policy.as_str()) {
            return Err(format!(
                "--group-consumer-migration-policy: one of {} expected, got {group_consumer_migration_policy:?}",
                CONSUMER_GROUP_MIGRATION_POLICIES.join(", ")
            ));
        }
        let listen_s = pick!(listen);
        let (lhost, lport) = split_host_port(&listen_s, "--listen")?;
        let listen = (lhost.as_str(), lport)
            .to_socket_addrs()
            .map_err(|e| format!("invalid --listen '{listen_s}': {e}"))?
            .next()
            .ok_or_else(|| format!("invalid --listen '{listen_s}': host does not resolve"))?;
        let (advertise_host, advertise_port) = match args
            .advertise
            .clone()
            .or(file.advertise.clone())
        {
            Some(a) => {
                let (h, p) = split_host_port(&a, "--advertise")?;
                if h == "0.0.0.0" || h == "::" {
                    return Err(format!(
                        "invalid --advertise '{a}': must be a host clients can reach"
                    ));
                }
                (h, if p == 0 { lport } else { p })
            }
            None => {
                if listen.ip().is_unspecified() {
                    return Err(format!(
                        "--listen {listen_s} is a wildcard address: set --advertise to a host clients can reach"
                    ));
                }
                (lhost.clone(), lport)
            }
        };
        let usable = usable_cpus();
        let cores = pick!(cores, usable.len());
        if cores == 0 || cores > usable.len() {
            return Err(format!(
                "invalid --cores {cores}: this process may use {} CPU(s)",
                usable.len()
            ));
        }
        let cpus = usable[..cores].to_vec();
        let flush_s = pick!(flush);
        let flush = if flush_s == "always" {
            FlushPolicy::Always
        } else {
            match flush_s.trim_end_matches("ms").parse::<u64>() {
                Ok(ms) if ms > 0 => FlushPolicy::IntervalMs(ms),
                _ => {
                    return Err(format!(
                        "invalid --flush '{flush_s}': expected 'always' or an interval in ms"
                    ))
                }
            }
        };
        let default_partitions = pick!(default_partitions);
        if default_partitions < 1 {
            return Err(format!(
                "invalid --default-partitions {default_partitions}: must be >= 1"
            ));
        }
        let default_replication_factor = pick!(default_replication_factor);
        if default_replication_factor < 1 {
            return Err(format!(
                "invalid --default-replication-factor {default_replication_factor}: must be >= 1"
            ));
        }
        let offsets_topic_replication_factor = pick!(offsets_topic_replication_factor);
        if offsets_topic_replication_factor < 1 {
            return Err(format!(
                "invalid --offsets-topic-replication-factor {offsets_topic_replication_factor}: must be >= 1"
            ));
        }
        let segment_bytes = pick!(segment_bytes);
        if segment_bytes < 64 * 1024 {
            return Err(format!(
                "invalid --segment-bytes {segment_bytes}: must be >= 65536"
            ));
        }
        let retention_ms = pick!(retention_ms);
        let request_bytes_max = pick!(request_bytes_max);
        if request_bytes_max < 1024 {
            return Err(format!(
                "invalid --request-bytes-max {request_bytes_max}: must be >= 1024"
            ));
        }
        let message_bytes_max = pick!(message_bytes_max);
        if message_bytes_max < 128 {
            return Err(format!(
                "invalid --message-bytes-max {message_bytes_max}: must be >= 128"
            ));
        }
        let connections_max = pick!(connections_max);
        if connections_max == 0 {
            return Err("invalid --connections-max 0: must be >= 1".into());
        }
        let inflight_bytes_max = pick!(inflight_bytes_max);
        if inflight_bytes_max < request_bytes_max.min(1 << 20) {
            return Err(format!(
                "invalid --inflight-bytes-max {inflight_bytes_max}: must be >= 1 MiB"
            ));
        }
        let inflight_requests_max = pick!(inflight_requests_max);
        if inflight_requests_max == 0 {
            return Err("invalid --inflight-requests-max 0: must be >= 1".into());
        }
        let shard_request_bytes_max = pick!(shard_request_bytes_max);
        if shard_request_bytes_max < request_bytes_max {
            return Err(format!(
                "invalid --shard-request-bytes-max {shard_request_bytes_max}: must be >= --request-bytes-max ({request_bytes_max})"
            ));
        }
        let stall_timeout_ms = pick!(stall_timeout_ms);
        if !(100..=CONNECTION_TIMEOUT_MS_MAX).contains(&stall_timeout_ms) {
            return Err(format!(
                "invalid --stall-timeout-ms {stall_timeout_ms}: must be 100..={CONNECTION_TIMEOUT_MS_MAX} (a week)"
            ));
        }
        let connection_idle_ms = pick!(connection_idle_ms);
        if !(100..=CONNECTION_TIMEOUT_MS_MAX).contains(&connection_idle_ms) {
            return Err(format!(
                "invalid --connection-idle-ms {connection_idle_ms}: must be 100..={CONNECTION_TIMEOUT_MS_MAX} (a week)"
            ));
        }
        let log_format = LogFormat::parse(&pick!(log_format))?;
        let metrics_listen = match args
            .metrics_listen
            .clone()
            .or(file.metrics_listen.clone())
            .filter(|m| !m.trim().is_empty())
        {
            None => None,
            Some(m) => {
                let (host, port) = split_host_port(&m, "--metrics-listen")?;
                let addr = (host.as_str(), port)
                    .to_socket_addrs()
                    .map_err(|e| format!("invalid --metrics-listen '{m}': {e}"))?
                    .next()
                    .ok_or_else(|| {
                        format!("invalid --metrics-listen '{m}': host does not resolve")
                    })?;
                if addr.ip() == listen.ip() && addr.port() == listen.port() && port != 0 {
                    return Err(format!(
                        "invalid --metrics-listen '{m}': it is the Kafka listen address"
                    ));
                }
                Some(addr)
            }
        };
        let node_id = pick!(node_id);
        let rack = args
            .rack
            .clone()
            .or(file.rack.clone())
            .filter(|r| !r.is_empty());
        let cluster = match args.controllers.clone().or(file.controllers.clone()) {
            Some(c) if !c.trim().is_empty() => {
                let cluster = parse_controllers(&c, node_id)?;
                if cluster.internal_listen.ip() == listen.ip()
                    && cluster.internal_listen.port() == listen.port()
                {
                    return Err(format!(
                        "invalid --controllers: node {node_id}'s internal address {} is the Kafka \
                         listen address",
                        cluster.internal_listen
                    ));
                }
                Some(cluster)
            }
            _ => None,
        };
        Ok(BrokerConfig {
            data_dir,
            listen,
            advertise_host,
            advertise_port,
            cpus,
            node_id,
            rack,
            cluster,
            auto_create_topics: pick!(auto_create_topics),
            default_partitions,
            default_replication_factor,
            offsets_topic_replication_factor,
            flush,
            segment_bytes,
            retention_ms: if retention_ms < 0 {
                None
            } else {
                Some(retention_ms as u64)
            },
            request_bytes_max,
            connections_max,
            inflight_bytes_max,
            inflight_requests_max,
            shard_request_bytes_max,
            stall_timeout_ms,
            connection_idle_ms,
            message_bytes_max,
            cache_bytes: pick!(cache_bytes),
            partitions_per_shard_max: pick!(partitions_per_shard_max),
            group_initial_rebalance_delay_ms: pick!(group_initial_rebalance_delay_ms),
            offsets_retention_minutes: pick!(offsets_retention_minutes),
            // Kafka's setting is an int of at least 1.
            transactional_id_expiration_ms: pick!(transactional_id_expiration_ms)
                .clamp(1, i32::MAX as u64),
            group_consumer_session_timeout_ms,
            group_consumer_heartbeat_interval_ms,
            auto_leader_rebalance_enable: pick!(auto_leader_rebalance_enable),
            leader_imbalance_check_interval_ms: pick!(leader_imbalance_check_interval_ms).max(1),
            group_consumer_assignors,
            group_consumer_max_size: pick!(group_consumer_max_size).clamp(1, i32::MAX as u32),
            group_share_session_timeout_ms,
            group_share_heartbeat_interval_ms,
            group_share_max_size: pick!(group_share_max_size).clamp(1, i32::MAX as u32),
            group_share_record_lock_duration_ms,
            group_share_delivery_count_limit,
            group_share_partition_max_record_locks,
            group_consumer_migration_policy,
            log_level: pick!(log_level),
            log_format,
            metrics_listen,
        })
    }

    pub fn shard_count(&self) -> usize {
        self.cpus.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> StartArgs {
        StartArgs {
            cores: Some(1),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_a_local_single_node() {
        let c = BrokerConfig::from_args(&args()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9092");
        assert_eq!(
            (c.advertise_host.as_str(), c.advertise_port),
            ("127.0.0.1", 9092)
        );
        assert_eq!(c.data_dir, PathBuf::from("./sluice-data"));
        assert_eq!(c.flush, FlushPolicy::Always);
        assert_eq!(c.cpus.len(), 1);
        // Kafka's defaults.
        assert_eq!(c.group_initial_rebalance_delay_ms, 3_000);
        assert!(c.auto_create_topics);
    }

    #[test]
    fn wildcard_listen_needs_an_advertised_host() {
        let mut a = args();
        a.listen = Some("0.0.0.0:9092".into());
        let e = BrokerConfig::from_args(&a).unwrap_err();
        assert!(e.contains("--advertise"), "{e}");
        a.advertise = Some("broker1.example:19092".into());
        let c = BrokerConfig::from_args(&a).unwrap();
        assert_eq!(
            (c.advertise_host.as_str(), c.advertise_port),
            ("broker1.example", 19092)
        );
    }

    #[test]
    fn invalid_values_are_one_line_errors() {
        for (f, bad) in [
            (|a: &mut StartArgs| a.cores = Some(0)) as fn(&mut StartArgs),
            |a| a.listen = Some("nonsense".into()),
            |a| a.listen = Some("127.0.0.1:99999".into()),
            |a| a.flush = Some("sometimes".into()),
            |a| a.default_partitions = Some(0),
            |a| a.default_replication_factor = Some(0),
            |a| a.offsets_topic_replication_factor = Some(-1),
            |a| a.cores = Some(100_000),
            |a| a.inflight_requests_max = Some(0),
            |a| a.shard_request_bytes_max = Some(1 << 20),
            |a| a.stall_timeout_ms = Some(0),
            |a| a.connection_idle_ms = Some(5),
            |a| a.stall_timeout_ms = Some(u64::MAX),
            |a| a.connection_idle_ms = Some(CONNECTION_TIMEOUT_MS_MAX + 1),
            |a| a.log_format = Some("xml".into()),
            |a| a.metrics_listen = Some("nonsense".into()),
            |a| a.metrics_listen = Some("127.0.0.1:9092".into()),
        ]
        .into_iter()
        .map(|f| (f, ()))
        {
            let mut a = args();
            f(&mut a);
            let e = BrokerConfig::from_args(&a).unwrap_err();
            assert!(!e.contains('\n') && !e.is_empty(), "{e:?} {bad:?}");
        }
    }

    /// Every setting is a flag named after its field, a `SLUICE_*` variable, a TOML key (but
    /// `config`), and has a default in [`DEFAULTS`] that its help shows (but the two found at
    /// start); `--help` lists every setting.
    #[test]
    fn every_setting_has_a_flag_a_toml_key_and_a_default() {
        use clap::CommandFactory;

        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            start: StartArgs,
        }
        let mut cmd = Cli::command();
        let help = cmd.render_long_help().to_string();
        let defaults = serde_json::to_value(&DEFAULTS).unwrap();
        let defaults = defaults.as_object().unwrap();
        let shown_at_start = [
            ("advertise", "the listen address"),
            ("cores", "all usable CPUs"),
            ("controllers", "none: a single node"),
            ("metrics_listen", "none: no metrics listener"),
            ("rack", "none"),
        ];
        let settings = serde_json::to_value(StartArgs::default()).unwrap();
        let settings: Vec<&String> = settings.as_object().unwrap().keys().collect();
        let mut seen = Vec::new();
        for arg in cmd.get_arguments().filter(|a| a.get_id() != "help") {
            let id = arg.get_id().as_str();
            seen.push(id.to_string());
            assert_eq!(arg.get_long(), Some(id.replace('_', "-").as_str()), "{id}");
            assert!(
                help.contains(&format!("--{} ", id.replace('_', "-"))),
                "{id}"
            );
            let env = format!("SLUICE_{}", id.to_uppercase());
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(env.as_str()));
            if id == "config" {
                assert!(!settings.iter().any(|k| *k == "config"));
                continue;
            }
            assert!(settings.iter().any(|k| *k == id), "{id} is no TOML key");
            let arg_help = arg.get_help().unwrap().to_string();
            let shown = match shown_at_start.iter().find(|(k, _)| *k == id) {
                Some((_, shown)) => {
                    assert!(!defaults.contains_key(id), "{id}");
                    shown.to_string()
                }
                None => {
                    let d = defaults
                        .get(id)
                        .unwrap_or_else(|| panic!("{id} has no default"));
                    // The default, written in the file, reads back as the setting's value.
                    let toml = toml::to_string(
                        &[(id, d)]
                            .into_iter()
                            .collect::<std::collections::BTreeMap<_, _>>(),
                    )
                    .unwrap();
                    let file: StartArgs = toml::from_str(&toml).unwrap();
                    assert_eq!(&serde_json::to_value(file).unwrap()[id], d, "{id}");
                    match d {
                        serde_json::Value::String(s) => s.clone(),
                        d => d.to_string(),
                    }
                }
            };
            assert!(
                arg_help.ends_with(&format!("[default: {shown}]")),
                "{id}: help '{arg_help}' should show [default: {shown}]"
            );
        }
        seen.retain(|id| id != "config");
        seen.sort(); // the JSON map is sorted
        assert_eq!(
            seen,
            settings.iter().map(|s| s.to_string()).collect::<Vec<_>>()
        );
        assert_eq!(defaults.len() + shown_at_start.len(), settings.len());
    }

    #[test]
    fn metrics_listener_and_log_format() {
        let mut a = args();
        let c = BrokerConfig::from_args(&a).unwrap();
        assert_eq!((c.metrics_listen, c.log_format), (None, LogFormat::Text));
        a.metrics_listen = Some("127.0.0.1:9644".into());
        a.log_format = Some("json".into());
        let c = BrokerConfig::from_args(&a).unwrap();
        assert_eq!(c.metrics_listen.unwrap().to_string(), "127.0.0.1:9644");
        assert_eq!(c.log_format, LogFormat::Json);
        // An empty value (a blank variable) leaves the endpoint off.
        a.metrics_listen = Some(" ".into());
        assert_eq!(BrokerConfig::from_args(&a).unwrap().metrics_listen, None);
    }

    #[test]
    fn controllers_parse_and_are_validated() {
        let mut a = args();
        assert_eq!(BrokerConfig::from_args(&a).unwrap().cluster, None);
        a.node_id = Some(2);
        a.controllers = Some("1@127.0.0.1:19093, 2@127.0.0.1:19094,3@localhost:19095".into());
        let c = BrokerConfig::from_args(&a).unwrap().cluster.unwrap();
        assert_eq!(c.controllers.len(), 3);
        assert_eq!(c.internal_listen.to_string(), "127.0.0.1:19094");
        for (node, list, says) in [
            (
                4,
                "1@127.0.0.1:19093,2@127.0.0.1:19094",
                "not in --controllers",
            ),
            (0, "1@127.0.0.1:19093", "not in --controllers"),
            (1, "1@127.0.0.1:19093,1@127.0.0.1:19094", "appears twice"),
            (1, "1@127.0.0.1:19093,2@127.0.0.1:19093", "appears twice"),
            (1, "1@127.0.0.1", "host:port"),
            (1, "127.0.0.1:19093", "id@host:port"),
            (1, "0@127.0.0.1:19093", "1-1023"),
            (1, "x@127.0.0.1:19093", "1-1023"),
            (1, "1@127.0.0.1:0", "port"),
            (1, "1@127.0.0.1:9092", "Kafka listen address"),
            (1, "1@no-such-host.invalid:19093", "does not resolve"),
        ] {
            a.node_id = Some(node);
            a.controllers = Some(list.into());
            let e = BrokerConfig::from_args(&a).unwrap_err();
            assert!(e.contains(says) && !e.contains('\n'), "{list}: {e}");
        }
        // An empty list is a single node, as is no list.
        a.controllers = Some(String::new());
        assert_eq!(BrokerConfig::from_args(&a).unwrap().cluster, None);
    }

    #[test]
    fn file_values_apply_and_flags_win() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("sluice.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9999\"\nflush = \"50\"\ndefault_partitions = 4\n",
        )
        .unwrap();
        let mut a = args();
        a.config = Some(path.clone());
        a.default_partitions = Some(2);
        let c = BrokerConfig::from_args(&a).unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.flush, FlushPolicy::IntervalMs(50));
        assert_eq!(c.default_partitions, 2);
        std::fs::write(&path, "no_such_key = 1\n").unwrap();
        let e = BrokerConfig::from_args(&a).unwrap_err();
        assert!(e.contains("no_such_key"), "{e}");
    }
}

/// File in the data dir describing the process that holds the data-dir lock. Written once the
/// shards run (so the listener it names accepts), replaced atomically; `sluice status` reads it
/// and checks that its pid is alive.
pub const STATUS_FILE: &str = "status.json";

/// The contents of [`STATUS_FILE`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusRecord {
    pub version: String,
    pub pid: u32,
    /// Unix time in ms at which the broker started accepting connections.
    pub started_at_ms: i64,
    pub node_id: i32,
    pub cluster: bool,
    /// The Kafka listener.
    pub listen: String,
    /// host:port given to clients.
    pub advertise: String,
    pub shards: usize,
    pub cpus: Vec<usize>,
    pub data_dir: PathBuf,
}

impl StatusRecord {
    pub fn new(config: &BrokerConfig) -> StatusRecord {
        StatusRecord {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            started_at_ms: chrono::Utc::now().timestamp_millis(),
            node_id: config.node_id,
            cluster: config.cluster.is_some(),
            listen: config.listen.to_string(),
            advertise: format!("{}:{}", config.advertise_host, config.advertise_port),
            shards: config.shard_count(),
            cpus: config.cpus.clone(),
            data_dir: config.data_dir.clone(),
        }
    }

    /// Writes it atomically (temp file, rename): a reader sees the old or the new record.
    pub fn write(&self, data_dir: &Path) -> std::io::Result<()> {
        let tmp = data_dir.join(format!("{STATUS_FILE}.tmp"));
        let body = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, data_dir.join(STATUS_FILE))
    }

    /// Reads the record of `data_dir`, `Ok(None)` if there is none.
    pub fn read(data_dir: &Path) -> Result<Option<StatusRecord>, String> {
        let path = data_dir.join(STATUS_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| format!("{} is not a status record: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }
}
