//! DescribeCluster, versions 0-2 (all flexible; v1 endpoint type, v2 fenced brokers, KIP-919):
//! the cluster id, the controller and the brokers as Metadata lists them (v2 with
//! `include_fenced_brokers`: the fenced ones too, marked), and the cluster's authorized
//! operations when asked. Only the broker endpoint type is served: a request for controller
//! endpoints answers MISMATCHED_ENDPOINT_TYPE, as a Kafka broker does.

use bytes::Bytes;
use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::{BrokerId, DescribeClusterRequest, DescribeClusterResponse};
use kafka_protocol::ResponseError;

use super::common::{authorized_operations, code, str_bytes, AclResource};
use super::metadata::{cluster_id, listed_brokers};
use crate::kafka::{Request, Response};
use crate::shard;

/// KIP-919 endpoint types.
const ENDPOINT_BROKERS: i8 = 1;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: DescribeClusterRequest = crate::decode_or_close!(req, b);
    let broker = shard::local().broker.clone();
    let response = DescribeClusterResponse::default()
        .with_endpoint_type(ENDPOINT_BROKERS)
        .with_cluster_id(str_bytes(&cluster_id()));
    if req.version >= 1 && request.endpoint_type != ENDPOINT_BROKERS {
        let response = response
            .with_error_code(req.error_code(code(ResponseError::MismatchedEndpointType)))
            .with_error_message(Some(str_bytes(
                "this is a broker endpoint: only broker endpoints (type 1) are described",
            )))
            .with_controller_id(BrokerId(-1));
        return req.respond(&response);
    }
    let include_fenced = req.version >= 2 && request.include_fenced_brokers;
    let brokers = listed_brokers(&broker, include_fenced)
        .into_iter()
        .map(|b| {
            DescribeClusterBroker::default()
                .with_broker_id(BrokerId(b.id))
                .with_host(str_bytes(&b.host))
                .with_port(b.port as i32)
                .with_rack(b.rack.as_deref().map(str_bytes))
                .with_is_fenced(b.fenced && req.version >= 2)
        })
        .collect();
    let response = response
        .with_controller_id(BrokerId(broker.controller_id()))
        .with_brokers(brokers)
        .with_cluster_authorized_operations(authorized_operations(
            AclResource::Cluster,
            request.include_cluster_authorized_operations,
        ));
    req.respond(&response)
}
