//! ConsumerGroupHeartbeat, versions 0-1 (KIP-848; always flexible; v1 adds the subscription
//! regex and client-generated member ids). The group protocol runs on the server: the answer
//! carries the member's epoch and, when it changed, its assignment.

use bytes::Bytes;
use kafka_protocol::messages::consumer_group_heartbeat_response::{Assignment, TopicPartitions};
use kafka_protocol::messages::{ConsumerGroupHeartbeatRequest, ConsumerGroupHeartbeatResponse};

use super::common::str_bytes;
use crate::group::consumer::{Assignment as Partitions, HeartbeatRequest};
use crate::group::{on_coordinator, ImageTopics};
use crate::kafka::{Request, Response};

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: ConsumerGroupHeartbeatRequest = crate::decode_or_close!(req, b);
    let owned = request.topic_partitions.as_ref().map(|tps| {
        let mut a = Partitions::new();
        for tp in tps {
            a.entry(*tp.topic_id.as_bytes())
                .or_default()
                .extend(tp.partitions.iter().copied());
        }
        a.retain(|_, ps| !ps.is_empty());
        a
    });
    let hb = HeartbeatRequest {
        version: req.version,
        group_id: request.group_id.to_string(),
        member_id: request.member_id.to_string(),
        member_epoch: request.member_epoch,
        instance_id: request.instance_id.as_ref().map(|s| s.to_string()),
        rack_id: request.rack_id.as_ref().map(|s| s.to_string()),
        rebalance_timeout_ms: request.rebalance_timeout_ms,
        subscribed_topic_names: request
            .subscribed_topic_names
            .as_ref()
            .map(|ns| ns.iter().map(|n| n.to_string()).collect()),
        subscribed_topic_regex: request
            .subscribed_topic_regex
            .as_ref()
            .map(|s| s.to_string()),
        server_assignor: request.server_assignor.as_ref().map(|s| s.to_string()),
        owned,
        client_id: req
            .header
            .client_id
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default(),
        client_host: format!("/{}", req.conn.peer.ip()),
    };
    let group_id = hb.group_id.clone();
    tracing::debug!(group = %group_id, member = %hb.member_id, epoch = hb.member_epoch, owned = ?hb.owned, names = ?hb.subscribed_topic_names, "ConsumerGroupHeartbeat");
    let r = on_coordinator(&group_id, move |gs| async move {
        let topics = ImageTopics(crate::shard::local().broker.image());
        gs.with(|c, now| c.consumer_heartbeat(hb, &topics, now))
            .await
    })
    .await
    .and_then(|r| r);
    tracing::debug!(group = %group_id, result = ?r, "ConsumerGroupHeartbeat answered");
    let resp = match r {
        Err(code) => ConsumerGroupHeartbeatResponse::default()
            .with_error_code(req.error_code(code))
            .with_member_epoch(-1),
        Ok(r) => ConsumerGroupHeartbeatResponse::default()
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
