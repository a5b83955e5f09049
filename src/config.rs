//! One typed broker configuration, merged from (highest first) command-line flags, `SLUICE_*`
//! environment variables, a TOML file given with `--config`, and defaults. Validated once at start;
//! an invalid value is one clear line and exit code 2.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use clap::Args;
use serde::Deserialize;

use crate::storage::FlushPolicy;

/// Flags of `sluice start`. Every field is optional so that the file and defaults can fill gaps.
#[derive(Args, Debug, Default, Clone)]
pub struct StartArgs {
    /// TOML file with any of the settings below (keys use underscores: data_dir, listen, …).
    #[arg(long, env = "SLUICE_CONFIG")]
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
    /// Node id reported in Metadata [default: 0].
    #[arg(long, env = "SLUICE_NODE_ID")]
    pub node_id: Option<i32>,
    /// Create topics on first Metadata/Produce use [default: true].
    #[arg(long, env = "SLUICE_AUTO_CREATE_TOPICS")]
    pub auto_create_topics: Option<bool>,
    /// Partitions of auto-created topics and of CreateTopics with -1 [default: 1].
    #[arg(long, env = "SLUICE_DEFAULT_PARTITIONS")]
    pub default_partitions: Option<i32>,
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
    /// Delay before the first rebalance of a new group completes, in ms [default: 0].
    #[arg(long, env = "SLUICE_GROUP_INITIAL_REBALANCE_DELAY_MS")]
    pub group_initial_rebalance_delay_ms: Option<u64>,
    /// Committed offsets of empty groups expire after this many minutes [default: 10080].
    #[arg(long, env = "SLUICE_OFFSETS_RETENTION_MINUTES")]
    pub offsets_retention_minutes: Option<u64>,
    /// Log level filter (also RUST_LOG) [default: info].
    #[arg(long, env = "SLUICE_LOG_LEVEL")]
    pub log_level: Option<String>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    advertise: Option<String>,
    cores: Option<usize>,
    node_id: Option<i32>,
    auto_create_topics: Option<bool>,
    default_partitions: Option<i32>,
    flush: Option<String>,
    segment_bytes: Option<u64>,
    retention_ms: Option<i64>,
    request_bytes_max: Option<usize>,
    connections_max: Option<usize>,
    inflight_bytes_max: Option<usize>,
    inflight_requests_max: Option<usize>,
    shard_request_bytes_max: Option<usize>,
    stall_timeout_ms: Option<u64>,
    connection_idle_ms: Option<u64>,
    message_bytes_max: Option<i32>,
    cache_bytes: Option<usize>,
    partitions_per_shard_max: Option<usize>,
    group_initial_rebalance_delay_ms: Option<u64>,
    offsets_retention_minutes: Option<u64>,
    log_level: Option<String>,
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
    pub auto_create_topics: bool,
    pub default_partitions: i32,
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
    pub log_level: String,
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
        let file: FileConfig = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| {
                    let msg = e.message().to_string();
                    format!("invalid config file {}: {msg}", path.display())
                })?
            }
            None => FileConfig::default(),
        };
        macro_rules! pick {
            ($f:ident, $d:expr) => {
                args.$f.clone().or(file.$f.clone()).unwrap_or_else(|| $d)
            };
        }
        let data_dir = pick!(data_dir, PathBuf::from("./sluice-data"));
        let listen_s = pick!(listen, "127.0.0.1:9092".to_string());
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
        let flush_s = pick!(flush, "always".to_string());
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
        let default_partitions = pick!(default_partitions, 1);
        if default_partitions < 1 {
            return Err(format!(
                "invalid --default-partitions {default_partitions}: must be >= 1"
            ));
        }
        let segment_bytes = pick!(segment_bytes, 1 << 30);
        if segment_bytes < 64 * 1024 {
            return Err(format!(
                "invalid --segment-bytes {segment_bytes}: must be >= 65536"
            ));
        }
        let retention_ms = pick!(retention_ms, 7 * 24 * 3600 * 1000);
        let request_bytes_max = pick!(request_bytes_max, 100 * 1024 * 1024);
        if request_bytes_max < 1024 {
            return Err(format!(
                "invalid --request-bytes-max {request_bytes_max}: must be >= 1024"
            ));
        }
        let message_bytes_max = pick!(message_bytes_max, 1_048_588);
        if message_bytes_max < 128 {
            return Err(format!(
                "invalid --message-bytes-max {message_bytes_max}: must be >= 128"
            ));
        }
        let connections_max = pick!(connections_max, 10_000);
        if connections_max == 0 {
            return Err("invalid --connections-max 0: must be >= 1".into());
        }
        let inflight_bytes_max = pick!(inflight_bytes_max, 64 * 1024 * 1024);
        if inflight_bytes_max < request_bytes_max.min(1 << 20) {
            return Err(format!(
                "invalid --inflight-bytes-max {inflight_bytes_max}: must be >= 1 MiB"
            ));
        }
        let inflight_requests_max = pick!(inflight_requests_max, 128);
        if inflight_requests_max == 0 {
            return Err("invalid --inflight-requests-max 0: must be >= 1".into());
        }
        let shard_request_bytes_max = pick!(shard_request_bytes_max, 512 * 1024 * 1024);
        if shard_request_bytes_max < request_bytes_max {
            return Err(format!(
                "invalid --shard-request-bytes-max {shard_request_bytes_max}: must be >= --request-bytes-max ({request_bytes_max})"
            ));
        }
        let stall_timeout_ms = pick!(stall_timeout_ms, 30_000);
        if stall_timeout_ms < 100 {
            return Err(format!(
                "invalid --stall-timeout-ms {stall_timeout_ms}: must be >= 100"
            ));
        }
        let connection_idle_ms = pick!(connection_idle_ms, 600_000);
        if connection_idle_ms < 100 {
            return Err(format!(
                "invalid --connection-idle-ms {connection_idle_ms}: must be >= 100"
            ));
        }
        Ok(BrokerConfig {
            data_dir,
            listen,
            advertise_host,
            advertise_port,
            cpus,
            node_id: pick!(node_id, 0),
            auto_create_topics: pick!(auto_create_topics, true),
            default_partitions,
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
            cache_bytes: pick!(cache_bytes, 256 * 1024 * 1024),
            partitions_per_shard_max: pick!(partitions_per_shard_max, 100_000),
            group_initial_rebalance_delay_ms: pick!(group_initial_rebalance_delay_ms, 0),
            offsets_retention_minutes: pick!(offsets_retention_minutes, 7 * 24 * 60),
            log_level: pick!(log_level, "info".to_string()),
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
            |a| a.cores = Some(100_000),
            |a| a.inflight_requests_max = Some(0),
            |a| a.shard_request_bytes_max = Some(1 << 20),
            |a| a.stall_timeout_ms = Some(0),
            |a| a.connection_idle_ms = Some(5),
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
