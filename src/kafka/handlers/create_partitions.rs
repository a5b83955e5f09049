//! CreatePartitions, versions 0-3 (flexible from 2). Raises a topic's partition count.

use bytes::Bytes;
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::{CreatePartitionsRequest, CreatePartitionsResponse};
use kafka_protocol::ResponseError;

use super::common::{admin_code, code, str_bytes, NONE};
use crate::admin;
use crate::kafka::{Request, Response};
use crate::shard;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: CreatePartitionsRequest = crate::decode_or_close!(req, b);
    let node = shard::local().broker.config.node_id;
    let mut results = Vec::new();
    for t in request.topics {
        let r = CreatePartitionsTopicResult::default().with_name(t.name.clone());
        if let Some(a) = &t.assignments {
            if a.iter()
                .any(|x| x.broker_ids.len() != 1 || x.broker_ids[0].0 != node)
            {
                results.push(
                    r.with_error_code(
                        req.error_code(code(ResponseError::InvalidReplicaAssignment)),
                    )
                    .with_error_message(Some(str_bytes(&format!(
                        "every new partition must be on broker {node}"
                    )))),
                );
                continue;
            }
        }
        match admin::add_partitions(
            t.name.to_string(),
            t.count,
            admin::CreateMode::from_validate_only(request.validate_only),
        )
        .await
        {
            Ok(()) => results.push(r.with_error_code(req.error_code(NONE))),
            Err(e) => results.push(
                r.with_error_code(req.error_code(admin_code(&e)))
                    .with_error_message(Some(str_bytes(&e.message()))),
            ),
        }
    }
    req.respond(&CreatePartitionsResponse::default().with_results(results))
}
