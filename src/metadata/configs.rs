//! Topic configuration keys Sluice understands, their validation, and how they resolve against
//! broker defaults (for DescribeConfigs and for the partition log).

use std::collections::BTreeMap;

use crate::config::BrokerConfig;
use crate::storage::{FlushPolicy, LogConfig, SEGMENT_MS_DEFAULT};

/// Where a config value comes from (DescribeConfigs `config_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    TopicOverride = 1,
    StaticBroker = 4,
    Default = 5,
}

pub const TOPIC_KEYS: &[&str] = &[
    "cleanup.policy",
    "max.message.bytes",
    "message.timestamp.type",
    "retention.bytes",
    "retention.ms",
    "segment.bytes",
    "segment.ms",
    "flush.ms",
    "min.insync.replicas",
];

/// Checks one topic config; the error is the INVALID_CONFIG message.
pub fn validate(key: &str, value: &str, internal: bool) -> Result<(), String> {
    let int = |min: i64| -> Result<(), String> {
        match value.parse::<i64>() {
            Ok(v) if v >= min => Ok(()),
            _ => Err(format!("{key} must be an integer >= {min}, got '{value}'")),
        }
    };
    match key {
        "cleanup.policy" => match value {
            "delete" => Ok(()),
            "compact" if internal => Ok(()),
            _ => Err(format!(
                "cleanup.policy '{value}' is not supported (only 'delete')"
            )),
        },
        "max.message.bytes" => int(0),
        "message.timestamp.type" => match value {
            "CreateTime" | "LogAppendTime" => Ok(()),
            _ => Err(format!(
                "message.timestamp.type must be CreateTime or LogAppendTime, got '{value}'"
            )),
        },
        "retention.bytes" | "retention.ms" => int(-1),
        "segment.bytes" => int(14),
        "segment.ms" => int(1),
        "flush.ms" => int(-1),
        "min.insync.replicas" => int(1),
        _ => Err(format!("unknown topic config '{key}'")),
    }
}

/// The effective value and source of every topic key for a topic with `overrides`.
pub fn resolve(
    cfg: &BrokerConfig,
    overrides: &BTreeMap<String, String>,
) -> Vec<(String, String, Source)> {
    TOPIC_KEYS
        .iter()
        .map(|k| match overrides.get(*k) {
            Some(v) => (k.to_string(), v.clone(), Source::TopicOverride),
            None => {
                let (v, src) = broker_default(cfg, k);
                (k.to_string(), v, src)
            }
        })
        .collect()
}

fn broker_default(cfg: &BrokerConfig, key: &str) -> (String, Source) {
    match key {
        "cleanup.policy" => ("delete".into(), Source::Default),
        "max.message.bytes" => (cfg.message_bytes_max.to_string(), Source::StaticBroker),
        "message.timestamp.type" => ("CreateTime".into(), Source::Default),
        "retention.bytes" => ("-1".into(), Source::Default),
        "retention.ms" => (
            cfg.retention_ms.map(|v| v as i64).unwrap_or(-1).to_string(),
            Source::StaticBroker,
        ),
        "segment.bytes" => (cfg.segment_bytes.to_string(), Source::StaticBroker),
        "segment.ms" => (SEGMENT_MS_DEFAULT.to_string(), Source::Default),
        "flush.ms" => match cfg.flush {
            FlushPolicy::Always => ("-1".into(), Source::StaticBroker),
            FlushPolicy::IntervalMs(ms) => (ms.to_string(), Source::StaticBroker),
        },
        "min.insync.replicas" => ("1".into(), Source::Default),
        _ => (String::new(), Source::Default),
    }
}

fn get_i64(cfg: &BrokerConfig, o: &BTreeMap<String, String>, key: &str) -> i64 {
    o.get(key)
        .cloned()
        .unwrap_or_else(|| broker_default(cfg, key).0)
        .parse()
        .unwrap_or(-1)
}

/// The partition-log configuration of a topic.
pub fn log_config(cfg: &BrokerConfig, o: &BTreeMap<String, String>) -> LogConfig {
    let opt = |v: i64| if v < 0 { None } else { Some(v as u64) };
    LogConfig {
        segment_bytes: get_i64(cfg, o, "segment.bytes").max(4096) as u64,
        segment_ms: opt(get_i64(cfg, o, "segment.ms")),
        retention_ms: opt(get_i64(cfg, o, "retention.ms")),
        retention_bytes: opt(get_i64(cfg, o, "retention.bytes")),
        index_interval_bytes: 4096,
        flush: match get_i64(cfg, o, "flush.ms") {
            v if v <= 0 => FlushPolicy::Always,
            v => FlushPolicy::IntervalMs(v as u64),
        },
    }
}

/// `max.message.bytes` of a topic.
pub fn max_message_bytes(cfg: &BrokerConfig, o: &BTreeMap<String, String>) -> i64 {
    get_i64(cfg, o, "max.message.bytes")
}

/// `min.insync.replicas` of a topic: acks=all produces are refused (NOT_ENOUGH_REPLICAS) while
/// fewer replicas are in sync.
pub fn min_insync_replicas(cfg: &BrokerConfig, o: &BTreeMap<String, String>) -> i64 {
    get_i64(cfg, o, "min.insync.replicas")
}

/// Whether the topic stamps batches with the broker's time.
pub fn log_append_time(o: &BTreeMap<String, String>) -> bool {
    o.get("message.timestamp.type")
        .map(|v| v == "LogAppendTime")
        .unwrap_or(false)
}
