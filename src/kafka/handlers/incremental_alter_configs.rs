//! IncrementalAlterConfigs, versions 0-1 (flexible from 1): SET, DELETE, APPEND and SUBTRACT
//! (the last two on list configs only) applied to a topic's current configs; validation,
//! persistence, errors per resource and broker resources as in `alter_configs`.

use bytes::Bytes;
use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse;
use kafka_protocol::messages::{IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use super::alter_configs::{alter, unique_keys, Resource};
use super::common::{code, str_bytes};
use crate::admin::{ConfigChange, ConfigOp};
use crate::kafka::{Request, Response};

const SET: i8 = 0;
const DELETE: i8 = 1;
const APPEND: i8 = 2;
const SUBTRACT: i8 = 3;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: IncrementalAlterConfigsRequest = crate::decode_or_close!(req, b);
    let ids: Vec<(i8, StrBytes)> = request
        .resources
        .iter()
        .map(|r| (r.resource_type, r.resource_name.clone()))
        .collect();
    let invalid = |msg: String| (code(ResponseError::InvalidRequest), msg);
    let resources = request
        .resources
        .into_iter()
        .map(|r| {
            let keys: Vec<String> = r.configs.iter().map(|c| c.name.to_string()).collect();
            let change = unique_keys(keys.iter().map(String::as_str)).and_then(|()| {
                r.configs
                    .iter()
                    .map(|c| {
                        let k = c.name.to_string();
                        let value = || {
                            c.value
                                .as_ref()
                                .map(|v| v.to_string())
                                .ok_or_else(|| invalid(format!("config '{k}' has no value")))
                        };
                        match c.config_operation {
                            SET => Ok(ConfigOp::Set(k.clone(), value()?)),
                            DELETE => Ok(ConfigOp::Delete(k)),
                            APPEND => Ok(ConfigOp::Append(k.clone(), value()?)),
                            SUBTRACT => Ok(ConfigOp::Subtract(k.clone(), value()?)),
                            op => Err(invalid(format!("unknown config operation {op} for '{k}'"))),
                        }
                    })
                    .collect::<Result<_, _>>()
                    .map(ConfigChange::Incremental)
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
    req.respond(&IncrementalAlterConfigsResponse::default().with_responses(responses))
}
