//! AlterConfigs, versions 0-2 (flexible from 2): each topic resource's configs become exactly
//! the ones given (those left out return to their defaults). Shared with
//! IncrementalAlterConfigs: the checks and errors of one resource, answered per resource.
//!
//! Topic configs are validated like CreateTopics' (INVALID_CONFIG names the key), written as a
//! metadata record (in a cluster through the controller: other nodes answer NOT_CONTROLLER) and
//! applied to the topic's open partition logs. Broker resources (a broker id, or "" for every
//! broker) may change the broker-wide defaults of the topic configs Sluice applies
//! (`log.retention.ms`, `log.segment.bytes`, `message.max.bytes`, ...): persisted the same way
//! and applied to every open partition log; other broker configs are fixed at start and
//! refused per resource with INVALID_REQUEST naming the key.

use std::collections::HashSet;

use bytes::Bytes;
use kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse;
use kafka_protocol::messages::{AlterConfigsRequest, AlterConfigsResponse};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use super::common::{admin_code, code, str_bytes, NONE};
use crate::admin::{self, ConfigChange, CreateMode};
use crate::kafka::{Request, Response};
use crate::shard;
use crate::types::ErrorCode;

pub const RESOURCE_TOPIC: i8 = 2;
pub const RESOURCE_BROKER: i8 = 4;
/// Kafka's `ConfigResource.Type.GROUP` (KIP-848/KIP-932 group configs).
pub const RESOURCE_GROUP: i8 = 32;
/// The ACL resource type of a group, which some clients send for a group config resource.
pub const RESOURCE_GROUP_ACL: i8 = 3;

/// One resource of an (incremental) AlterConfigs request, decoded.
pub struct Resource {
    pub resource_type: i8,
    pub name: StrBytes,
    /// The change, or the error found decoding it.
    pub change: Result<ConfigChange, (ErrorCode, String)>,
}

fn invalid_request(msg: impl Into<String>) -> (ErrorCode, String) {
    (code(ResponseError::InvalidRequest), msg.into())
}

/// Checks that no key is named twice in one resource (Kafka: INVALID_REQUEST).
pub fn unique_keys<'a>(keys: impl Iterator<Item = &'a str>) -> Result<(), (ErrorCode, String)> {
    let mut seen = HashSet::new();
    for k in keys {
        if !seen.insert(k) {
            return Err(invalid_request(format!("config '{k}' is listed twice")));
        }
    }
    Ok(())
}

/// Applies each resource's change (or checks it, `validate_only`) and gives each resource's
/// error code and message, in request order.
pub async fn alter(resources: Vec<Resource>, validate_only: bool) -> Vec<(ErrorCode, String)> {
    let broker = shard::local().broker.clone();
    let node = broker.config.node_id.to_string();
    let mut named = std::collections::HashMap::<(i8, String), usize>::new();
    for r in &resources {
        *named
            .entry((r.resource_type, r.name.to_string()))
            .or_default() += 1;
    }
    let mode = CreateMode::from_validate_only(validate_only);
    let mut out = Vec::with_capacity(resources.len());
    for r in resources {
        if named[&(r.resource_type, r.name.to_string())] > 1 {
            out.push(invalid_request(format!(
                "resource '{}' is listed more than once",
                r.name
            )));
            continue;
        }
        let result = match r.resource_type {
            RESOURCE_TOPIC => match r.change {
                Err(e) => Err(e),
                Ok(change) => {
                    match admin::alter_topic_configs(r.name.to_string(), change, mode).await {
                        Ok(()) => Ok(()),
                        Err(e) => Err((admin_code(&e), e.message())),
                    }
                }
            },
            RESOURCE_BROKER => {
                let known = r.name.is_empty()
                    || r.name.as_str() == node
                    || r.name.parse::<i32>().is_ok_and(|id| {
                        broker.config.cluster.is_some() && broker.image().brokers.contains_key(&id)
                    });
                match r.change {
                    _ if !known => Err(invalid_request(format!("unknown broker '{}'", r.name))),
                    Err(e) => Err(e),
                    Ok(change) => {
                        match admin::alter_broker_configs(r.name.to_string(), change, mode).await {
                            Ok(()) => Ok(()),
                            Err(e) => Err((admin_code(&e), e.message())),
                        }
                    }
                }
            }
            RESOURCE_GROUP | RESOURCE_GROUP_ACL => match r.change {
                Err(e) => Err(e),
                Ok(change) => alter_group_configs(r.name.to_string(), change, validate_only).await,
            },
            other => Err(invalid_request(format!(
                "resource type {other} is not supported"
            ))),
        };
        out.push(match result {
            Ok(()) => (NONE, String::new()),
            Err(e) => e,
        });
    }
    out
}

/// Changes a group's configs (the share-group configs, `share.*`, and the KIP-848 ones,
/// `consumer.session.timeout.ms` and `consumer.heartbeat.interval.ms`): validated, then stored
/// in `__consumer_offsets` unless `validate_only`.
async fn alter_group_configs(
    group: String,
    change: ConfigChange,
    validate_only: bool,
) -> Result<(), (ErrorCode, String)> {
    if group.is_empty() {
        return Err((code(ResponseError::InvalidGroupId), "empty group id".into()));
    }
    let gid = group.clone();
    let r = crate::group::on_coordinator(&group, move |gs| async move {
        let mut cfg = gs.coordinator.borrow().group_configs(&gid);
        let invalid = |m: String| (code(ResponseError::InvalidConfig), m);
        match change {
            ConfigChange::Replace(all) => {
                cfg = Default::default();
                for (k, v) in &all {
                    cfg.set(k, Some(v)).map_err(invalid)?;
                }
            }
            ConfigChange::Incremental(ops) => {
                for op in ops {
                    match op {
                        admin::ConfigOp::Set(k, v) => cfg.set(&k, Some(&v)).map_err(invalid)?,
                        admin::ConfigOp::Delete(k) => cfg.set(&k, None).map_err(invalid)?,
                        admin::ConfigOp::Append(k, _) | admin::ConfigOp::Subtract(k, _) => {
                            return Err(invalid_request(format!(
                                "'{k}' is not a list config: APPEND and SUBTRACT do not apply"
                            )))
                        }
                    }
                }
            }
        }
        if validate_only {
            return cfg
                .check_consumer(&gs.coordinator.borrow().config.consumer)
                .map_err(invalid);
        }
        match gs.with(|c, _| c.set_group_configs(&gid, cfg)).await {
            Ok(r) => r,
            Err(e) => Err((e, "the group coordinator moved".into())),
        }
    })
    .await;
    match r {
        Ok(r) => r,
        Err(e) => Err((e, "the group coordinator is not available".into())),
    }
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: AlterConfigsRequest = crate::decode_or_close!(req, b);
    let ids: Vec<(i8, StrBytes)> = request
        .resources
        .iter()
        .map(|r| (r.resource_type, r.resource_name.clone()))
        .collect();
    let resources = request
        .resources
        .into_iter()
        .map(|r| {
            let keys: Vec<String> = r.configs.iter().map(|c| c.name.to_string()).collect();
            let change = unique_keys(keys.iter().map(String::as_str)).and_then(|()| {
                r.configs
                    .iter()
                    .map(|c| match &c.value {
                        Some(v) => Ok((c.name.to_string(), v.to_string())),
                        None => Err(invalid_request(format!("config '{}' has no value", c.name))),
                    })
                    .collect::<Result<_, _>>()
                    .map(ConfigChange::Replace)
            });
            Resource {
                resource_type: r.resource_type,
                name: r.resource_name,
                change,
            }
        })
        .collect();
    let results = alter(resources, request.validate_only).await;
    let responses = ids
        .into_iter()
        .zip(results)
        .map(|((t, name), (err, msg))| {
            AlterConfigsResourceResponse::default()
                .with_error_code(req.error_code(err))
                .with_error_message(err.is_error().then(|| str_bytes(&msg)))
                .with_resource_type(t)
                .with_resource_name(name)
        })
        .collect();
    req.respond(&AlterConfigsResponse::default().with_responses(responses))
}
