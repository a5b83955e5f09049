//! DescribeConfigs, versions 1-4 (flexible from 4). Topic resources (type 2) show every topic
//! config Kafka documents with its effective value, source and type, and with
//! `include_synonyms` where the value could come from (the topic override, the broker
//! setting, Kafka's default); broker resources (type 4) show the broker settings, with the
//! dynamic values AlterConfigs gave them.

use bytes::Bytes;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult, DescribeConfigsSynonym,
};
use kafka_protocol::messages::{DescribeConfigsRequest, DescribeConfigsResponse};
use kafka_protocol::ResponseError;

use super::common::{code, str_bytes, NONE};
use crate::kafka::{Request, Response};
use crate::metadata::configs::{self, Source};
use crate::shard;

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
use super::alter_configs::{RESOURCE_GROUP, RESOURCE_GROUP_ACL};

/// One config as DescribeConfigs reports it.
struct Entry {
    name: String,
    value: String,
    source: Source,
    read_only: bool,
    /// KIP-569 `config_type`.
    kind: i8,
    synonyms: Vec<(String, String, Source)>,
}

const BOOLEAN: i8 = 1;
const STRING: i8 = 2;
const INT: i8 = 3;
const LONG: i8 = 5;
const LIST: i8 = 7;

/// The broker settings DescribeConfigs shows for this node, under Kafka's names: the
/// broker-wide defaults of the topic configs Sluice applies, which AlterConfigs may change
/// (with their dynamic values and synonyms), then the settings fixed at start.
fn broker_entries(d: &configs::BrokerDefaults) -> Vec<Entry> {
    let c = d.cfg;
    let mut out: Vec<Entry> = configs::TOPIC_CONFIGS
        .iter()
        .filter_map(|def| {
            let name = def.broker_key?;
            configs::dynamic_broker_config(name)?;
            let (value, source) = configs::broker_default(d, def);
            Some(Entry {
                name: name.to_string(),
                value,
                source,
                read_only: false,
                kind: def.kind.code(),
                synonyms: configs::synonyms(d, def, None),
            })
        })
        .collect();
    let s = Source::StaticBroker;
    let entry = |name: &str, value: String, kind: i8, source: Source| Entry {
        synonyms: vec![(name.to_string(), value.clone(), source)],
        name: name.to_string(),
        value,
        source,
        read_only: true,
        kind,
    };
    out.extend([
        entry("broker.id", c.node_id.to_string(), INT, s),
        entry("log.dirs", c.data_dir.display().to_string(), STRING, s),
        entry("num.partitions", c.default_partitions.to_string(), INT, s),
        entry(
            "auto.create.topics.enable",
            c.auto_create_topics.to_string(),
            BOOLEAN,
            s,
        ),
        entry(
            "socket.request.max.bytes",
            c.request_bytes_max.to_string(),
            INT,
            s,
        ),
        entry("max.connections", c.connections_max.to_string(), INT, s),
        entry(
            "connections.max.idle.ms",
            c.connection_idle_ms.to_string(),
            LONG,
            s,
        ),
        entry(
            "group.initial.rebalance.delay.ms",
            c.group_initial_rebalance_delay_ms.to_string(),
            INT,
            s,
        ),
        entry(
            "offsets.retention.minutes",
            c.offsets_retention_minutes.to_string(),
            INT,
            s,
        ),
        entry(
            "transactional.id.expiration.ms",
            c.transactional_id_expiration_ms.to_string(),
            INT,
            s,
        ),
        entry(
            "group.consumer.session.timeout.ms",
            c.group_consumer_session_timeout_ms.to_string(),
            INT,
            s,
        ),
        entry(
            "group.consumer.heartbeat.interval.ms",
            c.group_consumer_heartbeat_interval_ms.to_string(),
            INT,
            s,
        ),
        entry(
            "group.consumer.assignors",
            c.group_consumer_assignors.join(","),
            LIST,
            s,
        ),
        entry(
            "group.consumer.max.size",
            c.group_consumer_max_size.to_string(),
            INT,
            s,
        ),
        entry(
            "group.consumer.migration.policy",
            c.group_consumer_migration_policy.clone(),
            STRING,
            s,
        ),
        entry(
            "default.replication.factor",
            "1".into(),
            INT,
            Source::Default,
        ),
    ]);
    out
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: DescribeConfigsRequest = crate::decode_or_close!(req, b);
    let broker = shard::local().broker.clone();
    let image = broker.image();
    let mut results = Vec::new();
    for r in request.resources {
        let result = DescribeConfigsResult::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name.clone());
        let entries: Vec<Entry> = match r.resource_type {
            RESOURCE_TOPIC => match image.topic(r.resource_name.as_str()) {
                Some(t) => configs::resolve(
                    &configs::BrokerDefaults::of(&broker.config, &image),
                    &t.configs,
                )
                .into_iter()
                .map(|r| Entry {
                    name: r.name.to_string(),
                    value: r.value,
                    source: r.source,
                    read_only: false,
                    kind: r.kind.code(),
                    synonyms: r.synonyms,
                })
                .collect(),
                None => {
                    results.push(
                        result
                            .with_error_code(
                                req.error_code(code(ResponseError::UnknownTopicOrPartition)),
                            )
                            .with_error_message(Some(str_bytes("unknown topic"))),
                    );
                    continue;
                }
            },
            RESOURCE_BROKER => {
                let node = broker.config.node_id.to_string();
                if !r.resource_name.is_empty() && r.resource_name.as_str() != node {
                    results.push(
                        result
                            .with_error_code(req.error_code(code(ResponseError::InvalidRequest)))
                            .with_error_message(Some(str_bytes("unknown broker id"))),
                    );
                    continue;
                }
                broker_entries(&configs::BrokerDefaults::of(&broker.config, &image))
            }
            RESOURCE_GROUP | RESOURCE_GROUP_ACL => {
                let gid = r.resource_name.to_string();
                let g = gid.clone();
                let got = crate::group::on_coordinator(&gid, move |gs| async move {
                    let c = gs.coordinator.borrow();
                    let cfg = c.group_configs(&g);
                    crate::group::share::GROUP_CONFIG_KEYS
                        .iter()
                        .filter_map(|k| cfg.get(k, &c.config).map(|(v, set)| (*k, v, set)))
                        .collect::<Vec<_>>()
                })
                .await;
                match got {
                    Err(e) => {
                        results.push(result.with_error_code(req.error_code(e)));
                        continue;
                    }
                    Ok(list) => list
                        .into_iter()
                        .map(|(k, v, set)| Entry {
                            name: k.to_string(),
                            value: v,
                            source: if set {
                                Source::DynamicGroup
                            } else {
                                Source::Default
                            },
                            read_only: false,
                            kind: if k.ends_with(".ms") {
                                INT
                            } else if k.ends_with(".enable") {
                                BOOLEAN
                            } else {
                                STRING
                            },
                            synonyms: vec![],
                        })
                        .collect(),
                }
            }
            other => {
                results.push(
                    result
                        .with_error_code(req.error_code(code(ResponseError::InvalidRequest)))
                        .with_error_message(Some(str_bytes(&format!(
                            "resource type {other} is not supported"
                        )))),
                );
                continue;
            }
        };
        // Null or empty: every config (as Kafka's ConfigHelper).
        let wanted = r.configuration_keys.as_ref().filter(|w| !w.is_empty());
        let cfgs = entries
            .into_iter()
            .filter(|e| {
                wanted
                    .map(|w| w.iter().any(|x| x.as_str() == e.name))
                    .unwrap_or(true)
            })
            .map(|e| {
                let synonyms = if request.include_synonyms {
                    e.synonyms
                        .iter()
                        .map(|(n, v, src)| {
                            DescribeConfigsSynonym::default()
                                .with_name(str_bytes(n))
                                .with_value(Some(str_bytes(v)))
                                .with_source(*src as i8)
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                DescribeConfigsResourceResult::default()
                    .with_config_type(if req.version >= 3 { e.kind } else { 0 })
                    .with_name(str_bytes(&e.name))
                    .with_value(Some(str_bytes(&e.value)))
                    .with_read_only(e.read_only)
                    .with_config_source(e.source as i8)
                    .with_synonyms(synonyms)
            })
            .collect();
        results.push(
            result
                .with_error_code(req.error_code(NONE))
                .with_configs(cfgs),
        );
    }
    req.respond(&DescribeConfigsResponse::default().with_results(results))
}
