//! ShareGroupHeartbeat, version 1 (KIP-932; always flexible): join with a member id the client
//! chose, heartbeat, leave with epoch -1. The assignment is computed on the server (see
//! [`crate::group::share`]). Share groups run on a single node: in a cluster the answer is
//! UNSUPPORTED_VERSION, naming why.

use bytes::Bytes;
use kafka_protocol::messages::share_group_heartbeat_response::{Assignment, TopicPartitions};
use kafka_protocol::messages::{ShareGroupHeartbeatRequest, ShareGroupHeartbeatResponse};

use super::common::str_bytes;
use super::share_common::{refuse_in_cluster, CLUSTER_MESSAGE};
use crate::group::share::ShareHeartbeat;
use crate::group::{on_coordinator, ImageTopics};
use crate::kafka::{Request, Response};

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: ShareGroupHeartbeatRequest = crate::decode_or_close!(req, b);
    if let Some(code) = refuse_in_cluster() {
        return req.respond(
            &ShareGroupHeartbeatResponse::default()
                .with_error_code(req.error_code(code))
                .with_error_message(Some(str_bytes(CLUSTER_MESSAGE)))
                .with_member_epoch(-1),
        );
    }
    let hb = ShareHeartbeat {
        group_id: request.group_id.to_string(),
        member_id: request.member_id.to_string(),
        member_epoch: request.member_epoch,
        rack_id: request.rack_id.as_ref().map(|s| s.to_string()),
        subscribed_topic_names: request
            .subscribed_topic_names
            .as_ref()
            .map(|ns| ns.iter().map(|n| n.to_string()).collect()),
        client_id: req
            .header
            .client_id
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default(),
        client_host: format!("/{}", req.conn.peer.ip()),
    };
    let group_id = hb.group_id.clone();
    tracing::debug!(group = %group_id, member = %hb.member_id, epoch = hb.member_epoch, "ShareGroupHeartbeat");
    let r = on_coordinator(&group_id, move |gs| async move {
        let topics = ImageTopics(crate::shard::local().broker.image());
        gs.with(|c, now| c.share_heartbeat(hb, &topics, now)).await
    })
    .await
    .and_then(|r| r);
    let resp = match r {
        Err(code) => ShareGroupHeartbeatResponse::default()
            .with_error_code(req.error_code(code))
            .with_member_epoch(-1),
        Ok(r) => ShareGroupHeartbeatResponse::default()
            .with_error_code(req.error_code(r.error))
            .with_error_message(r.message.as_deref().map(str_bytes))
            .with_member_id(r.member_id.as_deref().map(str_bytes))
            .with_member_epoch(r.member_epoch)
            .with_heartbeat_interval_ms(r.heartbeat_interval_ms)
            .with_assignment(r.assignment.map(|a| {
                Assignment::default().with_topic_partitions(
                    a.into_iter()
                        .map(|(t, ps)| {
                            TopicPartitions::default()
                                .with_topic_id(uuid::Uuid::from_bytes(t))
                                .with_partitions(ps.into_iter().collect())
                        })
                        .collect(),
                )
            })),
    };
    req.respond(&resp)
}
