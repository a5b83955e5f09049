//! Topic configuration: every topic config Kafka documents, its type and valid range, its
//! default and the broker setting it falls back to, its validation, and how a topic's
//! overrides resolve against the broker (for DescribeConfigs and for the partition log).
//!
//! Every documented key is accepted, validated and stored; the partition log applies
//! `retention.ms`, `retention.bytes`, `segment.bytes`, `segment.ms`, `flush.ms`,
//! `index.interval.bytes`, `cleanup.policy` (a policy without `delete` turns time and size
//! retention off; one with `compact` runs the log cleaner), `delete.retention.ms`,
//! `min.cleanable.dirty.ratio`, `min.compaction.lag.ms` and `max.compaction.lag.ms`, and Produce applies
//! `max.message.bytes` and `message.timestamp.type`. The others are stored and reported only
//! ([`TopicConfig::applied`]).

use std::collections::BTreeMap;

use crate::config::BrokerConfig;
use crate::storage::{CompactionConfig, FlushPolicy, LogConfig, SEGMENT_MS_DEFAULT};

/// Where a config value comes from (DescribeConfigs `config_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// DYNAMIC_TOPIC_CONFIG: a topic override.
    TopicOverride = 1,
    /// DYNAMIC_BROKER_CONFIG: set with AlterConfigs for this broker.
    DynamicBroker = 2,
    /// DYNAMIC_DEFAULT_BROKER_CONFIG: set with AlterConfigs for every broker (resource "").
    DynamicDefaultBroker = 3,
    /// STATIC_BROKER_CONFIG: the broker's own setting (a flag, variable or config file value
    /// that differs from Kafka's default).
    StaticBroker = 4,
    /// DEFAULT_CONFIG: Kafka's default.
    Default = 5,
    /// DYNAMIC_GROUP_CONFIG: set on a group resource.
    DynamicGroup = 8,
}

/// A config's type, with its valid values (DescribeConfigs `config_type`, KIP-569).
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Boolean,
    /// One of the listed values.
    Choice(&'static [&'static str]),
    Int {
        min: i64,
        max: i64,
    },
    Long {
        min: i64,
    },
    Double {
        min: f64,
        max: f64,
    },
    /// A comma-separated list; each item one of the listed values (any value if empty).
    List(&'static [&'static str]),
    /// Any string.
    Text,
}

impl Kind {
    /// The DescribeConfigs `config_type` code.
    pub fn code(self) -> i8 {
        match self {
            Kind::Boolean => 1,
            Kind::Choice(_) | Kind::Text => 2,
            Kind::Int { .. } => 3,
            Kind::Long { .. } => 5,
            Kind::Double { .. } => 6,
            Kind::List(_) => 7,
        }
    }
}

/// One topic config as Kafka documents it.
#[derive(Debug, Clone, Copy)]
pub struct TopicConfig {
    pub name: &'static str,
    pub kind: Kind,
    /// Kafka's default value.
    pub default: &'static str,
    /// The broker setting a topic without an override takes (Kafka's synonym), if any.
    pub broker_key: Option<&'static str>,
    /// Whether Sluice acts on the value (others are stored and reported only).
    pub applied: bool,
}

const LONG_MAX: &str = "9223372036854775807";
const INT_MAX: i64 = i32::MAX as i64;

const fn c(
    name: &'static str,
    kind: Kind,
    default: &'static str,
    broker_key: Option<&'static str>,
    applied: bool,
) -> TopicConfig {
    TopicConfig {
        name,
        kind,
        default,
        broker_key,
        applied,
    }
}

/// Every topic-level config of Kafka's documentation (3.x and 4.x), sorted by name.
pub const TOPIC_CONFIGS: &[TopicConfig] = &[
    c(
        "cleanup.policy",
        Kind::List(&["compact", "delete"]),
        "delete",
        Some("log.cleanup.policy"),
        true,
    ),
    c(
        "compression.gzip.level",
        Kind::Int { min: -1, max: 9 },
        "-1",
        Some("compression.gzip.level"),
        false,
    ),
    c(
        "compression.lz4.level",
        Kind::Int { min: 1, max: 17 },
        "9",
        Some("compression.lz4.level"),
        false,
    ),
    c(
        "compression.type",
        Kind::Choice(&["uncompressed", "zstd", "lz4", "snappy", "gzip", "producer"]),
        "producer",
        Some("compression.type"),
        false,
    ),
    c(
        "compression.zstd.level",
        Kind::Int {
            min: -131072,
            max: 22,
        },
        "3",
        Some("compression.zstd.level"),
        false,
    ),
    c(
        "delete.retention.ms",
        Kind::Long { min: 0 },
        "86400000",
        Some("log.cleaner.delete.retention.ms"),
        true,
    ),
    c(
        "file.delete.delay.ms",
        Kind::Long { min: 0 },
        "60000",
        Some("log.segment.delete.delay.ms"),
        false,
    ),
    c(
        "flush.messages",
        Kind::Long { min: 1 },
        LONG_MAX,
        Some("log.flush.interval.messages"),
        false,
    ),
    // Sluice's own reading: -1 or 0 is "fdatasync before acks=all is answered" (the broker's
    // `--flush always`), a positive value a periodic flush.
    c(
        "flush.ms",
        Kind::Long { min: -1 },
        LONG_MAX,
        Some("log.flush.interval.ms"),
        true,
    ),
    c(
        "follower.replication.throttled.replicas",
        Kind::List(&[]),
        "",
        Some("follower.replication.throttled.replicas"),
        false,
    ),
    c(
        "index.interval.bytes",
        Kind::Int {
            min: 0,
            max: INT_MAX,
        },
        "4096",
        Some("log.index.interval.bytes"),
        true,
    ),
    c(
        "leader.replication.throttled.replicas",
        Kind::List(&[]),
        "",
        Some("leader.replication.throttled.replicas"),
        false,
    ),
    c(
        "local.retention.bytes",
        Kind::Long { min: -2 },
        "-2",
        Some("log.local.retention.bytes"),
        false,
    ),
    c(
        "local.retention.ms",
        Kind::Long { min: -2 },
        "-2",
        Some("log.local.retention.ms"),
        false,
    ),
    c(
        "max.compaction.lag.ms",
        Kind::Long { min: 1 },
        LONG_MAX,
        Some("log.cleaner.max.compaction.lag.ms"),
        true,
    ),
    c(
        "max.message.bytes",
        Kind::Int {
            min: 0,
            max: INT_MAX,
        },
        "1048588",
        Some("message.max.bytes"),
        true,
    ),
    c(
        "message.downconversion.enable",
        Kind::Boolean,
        "true",
        Some("log.message.downconversion.enable"),
        false,
    ),
    c(
        "message.format.version",
        Kind::Text,
        "3.0-IV1",
        Some("log.message.format.version"),
        false,
    ),
    c(
        "message.timestamp.after.max.ms",
        Kind::Long { min: 0 },
        LONG_MAX,
        Some("log.message.timestamp.after.max.ms"),
        false,
    ),
    c(
        "message.timestamp.before.max.ms",
        Kind::Long { min: 0 },
        LONG_MAX,
        Some("log.message.timestamp.before.max.ms"),
        false,
    ),
    c(
        "message.timestamp.difference.max.ms",
        Kind::Long { min: 0 },
        LONG_MAX,
        Some("log.message.timestamp.difference.max.ms"),
        false,
    ),
    c(
        "message.timestamp.type",
        Kind::Choice(&["CreateTime", "LogAppendTime"]),
        "CreateTime",
        Some("log.message.timestamp.type"),
        true,
    ),
    c(
        "min.cleanable.dirty.ratio",
        Kind::Double { min: 0.0, max: 1.0 },
        "0.5",
        Some("log.cleaner.min.cleanable.ratio"),
        true,
    ),
    c(
        "min.compaction.lag.ms",
        Kind::Long { min: 0 },
        "0",
        Some("log.cleaner.min.compaction.lag.ms"),
        true,
    ),
    c(
        "min.insync.replicas",
        Kind::Int {
            min: 1,
            max: INT_MAX,
        },
        "1",
        Some("min.insync.replicas"),
        false,
    ),
    c(
        "preallocate",
        Kind::Boolean,
        "false",
        Some("log.preallocate"),
        false,
    ),
    c(
        "remote.log.copy.disable",
        Kind::Boolean,
        "false",
        None,
        false,
    ),
    c(
        "remote.log.delete.on.disable",
        Kind::Boolean,
        "false",
        None,
        false,
    ),
    c("remote.storage.enable", Kind::Boolean, "false", None, false),
    c(
        "retention.bytes",
        Kind::Long { min: -1 },
        "-1",
        Some("log.retention.bytes"),
        true,
    ),
    c(
        "retention.ms",
        Kind::Long { min: -1 },
        "604800000",
        Some("log.retention.ms"),
        true,
    ),
    c(
        "segment.bytes",
        Kind::Int {
            min: 14,
            max: INT_MAX,
        },
        "1073741824",
        Some("log.segment.bytes"),
        true,
    ),
    c(
        "segment.index.bytes",
        Kind::Int {
            min: 4,
            max: INT_MAX,
        },
        "10485760",
        Some("log.index.size.max.bytes"),
        false,
    ),
    c(
        "segment.jitter.ms",
        Kind::Long { min: 0 },
        "0",
        Some("log.roll.jitter.ms"),
        false,
    ),
    c(
        "segment.ms",
        Kind::Long { min: 1 },
        "604800000",
        Some("log.roll.ms"),
        true,
    ),
    c(
        "unclean.leader.election.enable",
        Kind::Boolean,
        "false",
        Some("unclean.leader.election.enable"),
        false,
    ),
];

/// The definition of topic config `key`, if Kafka documents it.
pub fn topic_config(key: &str) -> Option<&'static TopicConfig> {
    TOPIC_CONFIGS.iter().find(|c| c.name == key)
}

/// Longest config value accepted (a list of throttled replicas is the longest legitimate one);
/// values are stored in the metadata and echoed in every DescribeConfigs.
pub const CONFIG_VALUE_BYTES_MAX: usize = 32 * 1024;

/// Checks one topic config; the error is the INVALID_CONFIG message.
pub fn validate(key: &str, value: &str) -> Result<(), String> {
    let Some(def) = topic_config(key) else {
        return Err(format!("unknown topic config '{key}'"));
    };
    if value.len() > CONFIG_VALUE_BYTES_MAX {
        return Err(format!(
            "{key}: value longer than {CONFIG_VALUE_BYTES_MAX} bytes"
        ));
    }
    let bad = |what: String| Err(format!("invalid value '{value}' for {key}: {what}"));
    match def.kind {
        Kind::Boolean => match value.to_ascii_lowercase().as_str() {
            "true" | "false" => Ok(()),
            _ => bad("expected true or false".into()),
        },
        Kind::Choice(values) => {
            if values.contains(&value) {
                Ok(())
            } else {
                bad(format!("expected one of {}", values.join(", ")))
            }
        }
        Kind::Int { min, max } => match value.trim().parse::<i64>() {
            Ok(v) if (min..=max).contains(&v) => Ok(()),
            _ => bad(format!("expected an integer in [{min}, {max}]")),
        },
        Kind::Long { min } => match value.trim().parse::<i64>() {
            Ok(v) if v >= min => Ok(()),
            _ => bad(format!("expected an integer >= {min}")),
        },
        Kind::Double { min, max } => match value.trim().parse::<f64>() {
            Ok(v) if v >= min && v <= max => Ok(()),
            _ => bad(format!("expected a number in [{min}, {max}]")),
        },
        Kind::Text => Ok(()),
        Kind::List(values) => {
            let items: Vec<&str> = value.split(',').map(str::trim).collect();
            if values.is_empty() {
                return Ok(());
            }
            if items.iter().all(|i| values.contains(i)) {
                Ok(())
            } else {
                bad(format!("expected a list of {}", values.join(", ")))
            }
        }
    }
}

/// The topic config whose broker-wide default `broker_key` is, when brokers may change it
/// while running (AlterConfigs on a broker resource): the broker synonyms of the topic configs
/// Sluice applies.
pub fn dynamic_broker_config(broker_key: &str) -> Option<&'static TopicConfig> {
    TOPIC_CONFIGS
        .iter()
        .find(|c| c.applied && c.broker_key == Some(broker_key))
}

/// What a topic without an override falls back to: the dynamic broker configs of this node
/// and of the cluster (from the metadata), then the broker's own settings.
#[derive(Clone, Copy)]
pub struct BrokerDefaults<'a> {
    pub cfg: &'a BrokerConfig,
    /// Dynamic configs of this node, keyed by topic config.
    pub node: Option<&'a BTreeMap<String, String>>,
    /// Dynamic cluster-wide defaults, keyed by topic config.
    pub cluster: Option<&'a BTreeMap<String, String>>,
}

impl<'a> BrokerDefaults<'a> {
    /// The defaults of node `cfg.node_id` in `image`.
    pub fn of(cfg: &'a BrokerConfig, image: &'a crate::metadata::MetadataImage) -> Self {
        if image.broker_configs.is_empty() {
            return BrokerDefaults::fixed(cfg);
        }
        BrokerDefaults {
            cfg,
            node: image.broker_configs.get(&cfg.node_id.to_string()),
            cluster: image.broker_configs.get(""),
        }
    }

    /// The broker's own settings only (no dynamic configs).
    pub fn fixed(cfg: &'a BrokerConfig) -> Self {
        BrokerDefaults {
            cfg,
            node: None,
            cluster: None,
        }
    }
}

/// One config of a topic as DescribeConfigs reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub name: &'static str,
    pub value: String,
    pub source: Source,
    pub kind: Kind,
    /// Where the value could come from, most specific first (DescribeConfigs synonyms).
    pub synonyms: Vec<(String, String, Source)>,
}

impl PartialEq for Kind {
    fn eq(&self, other: &Kind) -> bool {
        self.code() == other.code()
    }
}

/// The effective value, source and synonyms of every topic config for a topic with
/// `overrides`.
pub fn resolve(d: &BrokerDefaults, overrides: &BTreeMap<String, String>) -> Vec<Resolved> {
    TOPIC_CONFIGS
        .iter()
        .map(|def| {
            let (value, source) = match overrides.get(def.name) {
                Some(v) => (v.clone(), Source::TopicOverride),
                None => broker_default(d, def),
            };
            Resolved {
                name: def.name,
                value,
                source,
                kind: def.kind,
                synonyms: synonyms(d, def, overrides.get(def.name)),
            }
        })
        .collect()
}

/// Where a topic config's value could come from, most specific first (DescribeConfigs
/// synonyms): the topic override, the dynamic configs of this broker and of the cluster, the
/// broker's own setting, Kafka's default.
pub fn synonyms(
    d: &BrokerDefaults,
    def: &TopicConfig,
    topic_override: Option<&String>,
) -> Vec<(String, String, Source)> {
    let broker_name = def.broker_key.unwrap_or(def.name).to_string();
    let mut out = Vec::new();
    if let Some(v) = topic_override {
        out.push((def.name.to_string(), v.clone(), Source::TopicOverride));
    }
    if let Some(v) = d.node.and_then(|m| m.get(def.name)) {
        out.push((broker_name.clone(), v.clone(), Source::DynamicBroker));
    }
    if let Some(v) = d.cluster.and_then(|m| m.get(def.name)) {
        out.push((broker_name.clone(), v.clone(), Source::DynamicDefaultBroker));
    }
    let (v, src) = static_default(d.cfg, def);
    if src == Source::StaticBroker {
        out.push((broker_name.clone(), v, Source::StaticBroker));
    }
    out.push((broker_name, def.default.to_string(), Source::Default));
    out
}

/// What a topic without an override gets: a dynamic broker config of this node, else of the
/// cluster, else the broker's own setting.
pub fn broker_default(d: &BrokerDefaults, def: &TopicConfig) -> (String, Source) {
    if let Some(v) = d.node.and_then(|m| m.get(def.name)) {
        return (v.clone(), Source::DynamicBroker);
    }
    if let Some(v) = d.cluster.and_then(|m| m.get(def.name)) {
        return (v.clone(), Source::DynamicDefaultBroker);
    }
    static_default(d.cfg, def)
}

/// The broker's own setting where Sluice has one (STATIC_BROKER_CONFIG when it differs from
/// Kafka's default), else Kafka's default.
fn static_default(cfg: &BrokerConfig, def: &TopicConfig) -> (String, Source) {
    let broker = match def.name {
        "max.message.bytes" => Some(cfg.message_bytes_max.to_string()),
        "retention.ms" => Some(cfg.retention_ms.map(|v| v as i64).unwrap_or(-1).to_string()),
        "segment.bytes" => Some(cfg.segment_bytes.to_string()),
        "segment.ms" => Some(SEGMENT_MS_DEFAULT.to_string()),
        "flush.ms" => Some(match cfg.flush {
            FlushPolicy::Always => "-1".to_string(),
            FlushPolicy::IntervalMs(ms) => ms.to_string(),
        }),
        _ => None,
    };
    match broker {
        Some(v) if v != def.default => (v, Source::StaticBroker),
        _ => (def.default.to_string(), Source::Default),
    }
}

fn effective(d: &BrokerDefaults, o: &BTreeMap<String, String>, key: &str) -> String {
    match (o.get(key), topic_config(key)) {
        (Some(v), _) => v.clone(),
        (None, Some(def)) => broker_default(d, def).0,
        (None, None) => String::new(),
    }
}

fn get_i64(d: &BrokerDefaults, o: &BTreeMap<String, String>, key: &str) -> i64 {
    effective(d, o, key).trim().parse().unwrap_or(-1)
}

/// Whether the topic's effective `cleanup.policy` includes `delete` (time and size retention).
pub fn deletes(d: &BrokerDefaults, o: &BTreeMap<String, String>) -> bool {
    effective(d, o, "cleanup.policy")
        .split(',')
        .any(|x| x.trim() == "delete")
}

/// Whether the topic's effective `cleanup.policy` includes `compact` (the log cleaner runs).
pub fn compacts(d: &BrokerDefaults, o: &BTreeMap<String, String>) -> bool {
    effective(d, o, "cleanup.policy")
        .split(',')
        .any(|x| x.trim() == "compact")
}

/// The partition-log configuration of a topic.
pub fn log_config(d: &BrokerDefaults, o: &BTreeMap<String, String>) -> LogConfig {
    let opt = |v: i64| if v < 0 { None } else { Some(v as u64) };
    let deletes = deletes(d, o);
    LogConfig {
        segment_bytes: get_i64(d, o, "segment.bytes").max(4096) as u64,
        segment_ms: opt(get_i64(d, o, "segment.ms")),
        retention_ms: opt(get_i64(d, o, "retention.ms")).filter(|_| deletes),
        retention_bytes: opt(get_i64(d, o, "retention.bytes")).filter(|_| deletes),
        index_interval_bytes: get_i64(d, o, "index.interval.bytes").clamp(1, INT_MAX) as u32,
        flush: match get_i64(d, o, "flush.ms") {
            v if v <= 0 => FlushPolicy::Always,
            v => FlushPolicy::IntervalMs(v as u64),
        },
        compaction: compacts(d, o).then(|| CompactionConfig {
            delete_retention_ms: get_i64(d, o, "delete.retention.ms").max(0) as u64,
            min_cleanable_dirty_ratio: effective(d, o, "min.cleanable.dirty.ratio")
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .unwrap_or(0.5),
            min_compaction_lag_ms: get_i64(d, o, "min.compaction.lag.ms").max(0) as u64,
            max_compaction_lag_ms: match get_i64(d, o, "max.compaction.lag.ms") {
                v if v <= 0 || v == i64::MAX => None,
                v => Some(v as u64),
            },
        }),
    }
}

/// `max.message.bytes` of a topic.
pub fn max_message_bytes(d: &BrokerDefaults, o: &BTreeMap<String, String>) -> i64 {
    get_i64(d, o, "max.message.bytes")
}

/// `min.insync.replicas` of a topic: acks=all produces are refused (NOT_ENOUGH_REPLICAS) while
/// fewer replicas are in sync.
pub fn min_insync_replicas(d: &BrokerDefaults, o: &BTreeMap<String, String>) -> i64 {
    get_i64(d, o, "min.insync.replicas")
}

/// Whether the topic stamps batches with the broker's time.
pub fn log_append_time(d: &BrokerDefaults, o: &BTreeMap<String, String>) -> bool {
    effective(d, o, "message.timestamp.type") == "LogAppendTime"
}

/// The configs of a topic the produce path reads, resolved once (per metadata image and shard)
/// into typed values: no map lookups, strings or parsing per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceConfig {
    /// `max.message.bytes`.
    pub max_message_bytes: i64,
    /// `message.timestamp.type` is LogAppendTime.
    pub log_append_time: bool,
    /// `min.insync.replicas`.
    pub min_insync_replicas: i64,
    /// `cleanup.policy` includes `compact`: every record needs a key.
    pub compacted: bool,
}

/// The [`ProduceConfig`] of a topic with overrides `o`.
pub fn produce_config(d: &BrokerDefaults, o: &BTreeMap<String, String>) -> ProduceConfig {
    ProduceConfig {
        max_message_bytes: max_message_bytes(d, o),
        log_append_time: log_append_time(d, o),
        min_insync_replicas: min_insync_replicas(d, o),
        compacted: compacts(d, o),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StartArgs;

    fn broker_config() -> BrokerConfig {
        BrokerConfig::from_args(&StartArgs {
            cores: Some(1),
            ..Default::default()
        })
        .expect("default config")
    }

    #[test]
    fn every_documented_config_validates_its_default_and_is_sorted() {
        for w in TOPIC_CONFIGS.windows(2) {
            assert!(w[0].name < w[1].name, "{} before {}", w[0].name, w[1].name);
        }
        for def in TOPIC_CONFIGS {
            assert_eq!(validate(def.name, def.default), Ok(()), "{}", def.name);
        }
    }

    #[test]
    fn values_are_checked_by_type_and_range() {
        assert!(validate("compression.type", "zstd").is_ok());
        assert!(validate("compression.type", "brotli").is_err());
        assert!(validate("cleanup.policy", "compact,delete").is_ok());
        assert!(validate("cleanup.policy", "compact").is_ok());
        assert!(validate("cleanup.policy", "shred").is_err());
        assert!(validate("delete.retention.ms", "0").is_ok());
        assert!(validate("delete.retention.ms", "-5").is_err());
        assert!(validate("min.cleanable.dirty.ratio", "0.9").is_ok());
        assert!(validate("min.cleanable.dirty.ratio", "1.5").is_err());
        assert!(validate("preallocate", "TRUE").is_ok());
        assert!(validate("preallocate", "yes").is_err());
        assert!(validate("segment.bytes", "3000000000").is_err());
        assert!(validate("retention.ms", "-1").is_ok());
        assert!(validate("no.such.config", "1").is_err());
        assert!(validate("retention.ms", &"9".repeat(CONFIG_VALUE_BYTES_MAX + 1)).is_err());
    }

    #[test]
    fn compact_only_topics_keep_everything() {
        let cfg = broker_config();
        let cfg = BrokerDefaults::fixed(&cfg);
        let mut o = BTreeMap::new();
        o.insert("retention.ms".to_string(), "1000".to_string());
        assert_eq!(log_config(&cfg, &o).retention_ms, Some(1000));
        o.insert("cleanup.policy".to_string(), "compact".to_string());
        assert_eq!(log_config(&cfg, &o).retention_ms, None);
        let c = log_config(&cfg, &o).compaction.expect("compact");
        assert_eq!(
            (c.delete_retention_ms, c.min_compaction_lag_ms),
            (86_400_000, 0)
        );
        assert_eq!(
            (c.min_cleanable_dirty_ratio, c.max_compaction_lag_ms),
            (0.5, None)
        );
        o.insert("cleanup.policy".to_string(), "compact,delete".to_string());
        assert!(log_config(&cfg, &o).compaction.is_some());
        assert_eq!(log_config(&cfg, &o).retention_ms, Some(1000));
    }

    #[test]
    fn sources_and_synonyms() {
        let cfg = broker_config();
        let mut o = BTreeMap::new();
        o.insert("retention.ms".to_string(), "1000".to_string());
        let all = resolve(&BrokerDefaults::fixed(&cfg), &o);
        assert_eq!(all.len(), TOPIC_CONFIGS.len());
        let get = |k: &str| all.iter().find(|r| r.name == k).unwrap().clone();
        let r = get("retention.ms");
        assert_eq!(
            (r.value.as_str(), r.source),
            ("1000", Source::TopicOverride)
        );
        assert_eq!(r.synonyms[0].2, Source::TopicOverride);
        assert_eq!(r.synonyms.last().unwrap().0, "log.retention.ms");
        let d = get("delete.retention.ms");
        assert_eq!((d.value.as_str(), d.source), ("86400000", Source::Default));
        // Dynamic broker configs come between the topic override and the broker's setting:
        // this node's before the cluster's.
        let node: BTreeMap<String, String> = [("segment.ms", "1000")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cluster: BTreeMap<String, String> = [("segment.ms", "2000"), ("retention.ms", "5")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let d = BrokerDefaults {
            cfg: &cfg,
            node: Some(&node),
            cluster: Some(&cluster),
        };
        let all = resolve(&d, &o);
        let get = |k: &str| all.iter().find(|r| r.name == k).unwrap().clone();
        let seg = get("segment.ms");
        assert_eq!(
            (seg.value.as_str(), seg.source),
            ("1000", Source::DynamicBroker)
        );
        let sources: Vec<Source> = seg.synonyms.iter().map(|x| x.2).collect();
        assert_eq!(
            sources,
            [
                Source::DynamicBroker,
                Source::DynamicDefaultBroker,
                Source::Default
            ]
        );
        assert_eq!(seg.synonyms[0].0, "log.roll.ms");
        assert_eq!(get("retention.ms").value, "1000");
        assert_eq!(log_config(&d, &BTreeMap::new()).retention_ms, Some(5));
        assert_eq!(
            dynamic_broker_config("log.retention.ms").map(|c| c.name),
            Some("retention.ms")
        );
        assert_eq!(
            dynamic_broker_config("log.cleaner.delete.retention.ms").map(|c| c.name),
            Some("delete.retention.ms")
        );
        assert!(dynamic_broker_config("log.message.downconversion.enable").is_none());
        assert!(dynamic_broker_config("broker.id").is_none());
    }
}
