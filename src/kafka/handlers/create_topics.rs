//! CreateTopics, versions 2-7 (flexible from 5; v5+ returns partitions, replication factor and
//! configs; v7 topic ids). Replication factor must be 1 or -1 on a single node.

use std::collections::BTreeMap;

use bytes::Bytes;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::{CreateTopicsRequest, CreateTopicsResponse};
use kafka_protocol::ResponseError;

use super::common::{admin_code, code, str_bytes, NONE};
use crate::admin;
use crate::kafka::{Request, Response};
use crate::metadata::configs;
use crate::shard;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: CreateTopicsRequest = crate::decode_or_close!(req, b);
    let broker = shard::local().broker.clone();
    let node = broker.config.node_id;
    let mut results = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for t in request.topics {
        let name = t.name.to_string();
        let result = CreatableTopicResult::default().with_name(t.name.clone());
        if !seen.insert(name.clone()) {
            results.push(
                result
                    .with_error_code(req.error_code(code(ResponseError::InvalidRequest)))
                    .with_error_message(Some(str_bytes("topic listed twice"))),
            );
            continue;
        }
        let mut overrides = BTreeMap::new();
        for c in &t.configs {
            if let Some(v) = &c.value {
                overrides.insert(c.name.to_string(), v.to_string());
            }
        }
        let mut partitions = t.num_partitions;
        if !t.assignments.is_empty() {
            if t.num_partitions != -1 || t.replication_factor != -1 {
                results.push(
                    result
                        .with_error_code(req.error_code(code(ResponseError::InvalidRequest)))
                        .with_error_message(Some(str_bytes(
                            "give either assignments or partitions and replication factor",
                        ))),
                );
                continue;
            }
            let bad = t.assignments.iter().enumerate().any(|(i, a)| {
                a.partition_index != i as i32
                    || a.broker_ids.len() != 1
                    || a.broker_ids[0].0 != node
            });
            if bad {
                results.push(
                    result
                        .with_error_code(
                            req.error_code(code(ResponseError::InvalidReplicaAssignment)),
                        )
                        .with_error_message(Some(str_bytes(&format!(
                            "assignments must list partitions 0..n in order, each on broker {node}"
                        )))),
                );
                continue;
            }
            partitions = t.assignments.len() as i32;
        }
        let rf = if t.assignments.is_empty() {
            t.replication_factor
        } else {
            1
        };
        let topic = admin::NewTopic {
            name,
            partitions,
            replication_factor: rf,
            overrides,
        };
        match admin::create_topic(
            topic,
            admin::CreateMode::from_validate_only(request.validate_only),
            admin::TopicKind::User,
        )
        .await
        {
            Ok(meta) => {
                let image = broker.image();
                let cfgs = configs::resolve(
                    &configs::BrokerDefaults::of(&broker.config, &image),
                    &meta.configs,
                )
                .into_iter()
                .map(|r| {
                    CreatableTopicConfigs::default()
                        .with_name(str_bytes(r.name))
                        .with_value(Some(str_bytes(&r.value)))
                        .with_config_source(r.source as i8)
                })
                .collect();
                let mut ok = result.with_error_code(req.error_code(NONE));
                if req.version >= 5 {
                    ok = ok
                        .with_num_partitions(meta.partition_count())
                        .with_replication_factor(meta.replication_factor() as i16)
                        .with_configs(Some(cfgs));
                }
                if req.version >= 7 {
                    ok = ok.with_topic_id(uuid::Uuid::from_bytes(meta.id));
                }
                results.push(ok);
            }
            Err(e) => results.push(
                result
                    .with_error_code(req.error_code(admin_code(&e)))
                    .with_error_message(Some(str_bytes(&e.message()))),
            ),
        }
    }
    req.respond(&CreateTopicsResponse::default().with_topics(results))
}
