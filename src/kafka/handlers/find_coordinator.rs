//! FindCoordinator, versions 0-4 (flexible from 3; batched keys from 4). Every group and
//! transactional id is coordinated by this node; which shard handles it is decided inside.

use bytes::Bytes;
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::{BrokerId, FindCoordinatorRequest, FindCoordinatorResponse};
use kafka_protocol::ResponseError;

use super::common::{code, str_bytes, NONE};
use crate::kafka::Request;
use crate::server::Response;
use crate::shard;

const KEY_TYPE_GROUP: i8 = 0;
const KEY_TYPE_TRANSACTION: i8 = 1;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: FindCoordinatorRequest = crate::decode_or_close!(req, b);
    let broker = shard::local().broker.clone();
    let ready = broker.image().topic(crate::group::OFFSETS_TOPIC).is_some();
    let node = broker.config.node_id;
    let host = str_bytes(&broker.config.advertise_host);
    let port = broker.config.advertise_port as i32;
    let answer = |key: &str| -> (i16, Option<String>) {
        if request.key_type != KEY_TYPE_GROUP && request.key_type != KEY_TYPE_TRANSACTION {
            return (
                code(ResponseError::InvalidRequest),
                Some(format!("unknown key type {}", request.key_type)),
            );
        }
        if key.is_empty() {
            return (
                code(ResponseError::InvalidRequest),
                Some("empty coordinator key".into()),
            );
        }
        if !ready {
            return (code(ResponseError::CoordinatorNotAvailable), None);
        }
        (NONE, None)
    };
    if req.version >= 4 {
        let coordinators = request
            .coordinator_keys
            .iter()
            .map(|k| {
                let (e, m) = answer(k.as_str());
                let c = Coordinator::default()
                    .with_key(k.clone())
                    .with_error_code(e)
                    .with_error_message(m.map(|m| str_bytes(&m)));
                if e == NONE {
                    c.with_node_id(BrokerId(node))
                        .with_host(host.clone())
                        .with_port(port)
                } else {
                    c.with_node_id(BrokerId(-1)).with_port(-1)
                }
            })
            .collect();
        return req.respond(&FindCoordinatorResponse::default().with_coordinators(coordinators));
    }
    let (e, m) = answer(request.key.as_str());
    let mut r = FindCoordinatorResponse::default().with_error_code(e);
    if req.version >= 1 {
        r = r.with_error_message(m.map(|m| str_bytes(&m)));
    }
    r = if e == NONE {
        r.with_node_id(BrokerId(node))
            .with_host(host)
            .with_port(port)
    } else {
        r.with_node_id(BrokerId(-1)).with_port(-1)
    };
    req.respond(&r)
}
