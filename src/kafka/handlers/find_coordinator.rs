//! FindCoordinator, versions 0-6 (flexible from 3; batched `coordinator_keys` from 4). A group's
//! coordinator is the node that holds its `__consumer_offsets` partition: on a single node
//! always this one (the hop to the group's shard happens inside the broker), in a cluster the
//! raft leader of that partition as Metadata names it (COORDINATOR_NOT_AVAILABLE while it has
//! none), or with one replica the node the controller placed it on. A transactional id's coordinator is this node
//! on a single node (the hop to the id's `__transaction_state` shard happens inside the
//! broker); in a cluster there is none: COORDINATOR_NOT_AVAILABLE. Share coordinators do not
//! exist: COORDINATOR_NOT_AVAILABLE.

use bytes::Bytes;
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::{BrokerId, FindCoordinatorRequest, FindCoordinatorResponse};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use super::common::{code, str_bytes, NONE};
use crate::group::{partition_for, OFFSETS_TOPIC};
use crate::kafka::{Request, Response};
use crate::shard;
use crate::types::ErrorCode;

const KEY_TYPE_GROUP: i8 = 0;
const KEY_TYPE_TRANSACTION: i8 = 1;
const KEY_TYPE_SHARE: i8 = 2;

/// `(error, node, host, port)` for one key.
fn lookup(key: &str, key_type: i8) -> (ErrorCode, i32, String, i32) {
    let broker = shard::local().broker.clone();
    let cfg = &broker.config;
    let err = |e: ResponseError| (code(e), -1, String::new(), -1);
    match key_type {
        KEY_TYPE_GROUP => {
            if key.is_empty() {
                return err(ResponseError::InvalidGroupId);
            }
            let image = broker.image();
            let Some(meta) = image.topic(OFFSETS_TOPIC) else {
                // Still being created at start: clients retry.
                return err(ResponseError::CoordinatorNotAvailable);
            };
            let p = partition_for(key, meta.partition_count());
            if !meta.groups.is_empty() {
                // Replicated: the coordinator is the raft leader of the partition, as Metadata
                // names it; none while an election runs or the leader is fenced.
                let state = super::metadata::replicated_state(&broker, &image, meta, p);
                let leader = state.leader;
                if leader < 0 || image.fenced.contains(&leader) {
                    return err(ResponseError::CoordinatorNotAvailable);
                }
                if leader == cfg.node_id {
                    return (
                        NONE,
                        cfg.node_id,
                        cfg.advertise_host.clone(),
                        cfg.advertise_port as i32,
                    );
                }
                return match image.brokers.get(&leader) {
                    Some(b) => (NONE, leader, b.host.clone(), b.port as i32),
                    None => err(ResponseError::CoordinatorNotAvailable),
                };
            }
            match broker.node_of(meta, p) {
                Some(n) if n != cfg.node_id => match image.brokers.get(&n) {
                    Some(_) if image.fenced.contains(&n) => {
                        err(ResponseError::CoordinatorNotAvailable)
                    }
                    Some(b) => (NONE, n, b.host.clone(), b.port as i32),
                    None => err(ResponseError::CoordinatorNotAvailable),
                },
                _ => (
                    NONE,
                    cfg.node_id,
                    cfg.advertise_host.clone(),
                    cfg.advertise_port as i32,
                ),
            }
        }
        KEY_TYPE_TRANSACTION => {
            if key.is_empty() {
                return err(ResponseError::InvalidRequest);
            }
            // Transactions run on a single node only: in a cluster there is no coordinator.
            if cfg.cluster.is_some() || broker.image().topic(crate::txn::TXN_TOPIC).is_none() {
                return err(ResponseError::CoordinatorNotAvailable);
            }
            (
                NONE,
                cfg.node_id,
                cfg.advertise_host.clone(),
                cfg.advertise_port as i32,
            )
        }
        KEY_TYPE_SHARE => err(ResponseError::CoordinatorNotAvailable),
        _ => err(ResponseError::InvalidRequest),
    }
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: FindCoordinatorRequest = crate::decode_or_close!(req, b);
    let mut resp = FindCoordinatorResponse::default();
    if req.version >= 4 {
        resp.coordinators = request
            .coordinator_keys
            .iter()
            .map(|k| {
                let (error, node, host, port) = lookup(k.as_str(), request.key_type);
                Coordinator::default()
                    .with_key(k.clone())
                    .with_node_id(BrokerId(node))
                    .with_host(str_bytes(&host))
                    .with_port(port)
                    .with_error_code(req.error_code(error))
                    .with_error_message(error_message(error))
            })
            .collect();
    } else {
        let (error, node, host, port) = lookup(request.key.as_str(), request.key_type);
        resp = resp
            .with_error_code(req.error_code(error))
            .with_node_id(BrokerId(node))
            .with_host(str_bytes(&host))
            .with_port(port);
        if req.version >= 1 {
            resp.error_message = error_message(error);
        }
    }
    req.respond(&resp)
}

fn error_message(error: ErrorCode) -> Option<StrBytes> {
    error.is_error().then(|| {
        use kafka_protocol::error::ParseResponseErrorCode;
        str_bytes(
            &error
                .get()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_else(|| format!("error {}", error.get())),
        )
    })
}
