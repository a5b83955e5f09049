//! DescribeConfigs, versions 1-4 (flexible from 4). Topic resources (type 2) show every topic
//! key with its effective value and source; broker resources (type 4) show the broker settings.

use bytes::Bytes;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::{DescribeConfigsRequest, DescribeConfigsResponse};
use kafka_protocol::ResponseError;

use super::common::{code, str_bytes, NONE};
use crate::kafka::{Request, Response};
use crate::metadata::configs::{self, Source};
use crate::shard;

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;

/// DescribeConfigs `config_type` values (KIP-569).
fn config_type(key: &str) -> i8 {
    match key {
        "cleanup.policy" => 7,         // LIST
        "message.timestamp.type" => 2, // STRING
        "max.message.bytes" => 3,      // INT
        _ => 5,                        // LONG
    }
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
        let entries: Vec<(String, String, Source, bool)> = match r.resource_type {
            RESOURCE_TOPIC => match image.topic(r.resource_name.as_str()) {
                Some(t) => configs::resolve(&broker.config, &t.configs)
                    .into_iter()
                    .map(|(k, v, s)| (k, v, s, false))
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
                let c = &broker.config;
                let s = Source::StaticBroker;
                vec![
                    ("broker.id".into(), node, s, true),
                    ("log.dirs".into(), c.data_dir.display().to_string(), s, true),
                    (
                        "num.partitions".into(),
                        c.default_partitions.to_string(),
                        s,
                        true,
                    ),
                    (
                        "auto.create.topics.enable".into(),
                        c.auto_create_topics.to_string(),
                        s,
                        true,
                    ),
                    (
                        "log.segment.bytes".into(),
                        c.segment_bytes.to_string(),
                        s,
                        true,
                    ),
                    (
                        "log.retention.ms".into(),
                        c.retention_ms.map(|v| v as i64).unwrap_or(-1).to_string(),
                        s,
                        true,
                    ),
                    (
                        "message.max.bytes".into(),
                        c.message_bytes_max.to_string(),
                        s,
                        true,
                    ),
                    (
                        "socket.request.max.bytes".into(),
                        c.request_bytes_max.to_string(),
                        s,
                        true,
                    ),
                    (
                        "max.connections".into(),
                        c.connections_max.to_string(),
                        s,
                        true,
                    ),
                    (
                        "connections.max.idle.ms".into(),
                        c.connection_idle_ms.to_string(),
                        s,
                        true,
                    ),
                    (
                        "offsets.retention.minutes".into(),
                        c.offsets_retention_minutes.to_string(),
                        s,
                        true,
                    ),
                    (
                        "default.replication.factor".into(),
                        "1".into(),
                        Source::Default,
                        true,
                    ),
                ]
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
        let wanted = r.configuration_keys.as_ref();
        let cfgs = entries
            .into_iter()
            .filter(|(k, _, _, _)| {
                wanted
                    .map(|w| w.iter().any(|x| x.as_str() == k))
                    .unwrap_or(true)
            })
            .map(|(k, v, src, read_only)| {
                DescribeConfigsResourceResult::default()
                    .with_config_type(if req.version >= 3 { config_type(&k) } else { 0 })
                    .with_name(str_bytes(&k))
                    .with_value(Some(str_bytes(&v)))
                    .with_read_only(read_only)
                    .with_config_source(src as i8)
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
