//! JoinGroup, versions 0-9 (flexible from 6). v4+: a member without an id gets
//! MEMBER_ID_REQUIRED first (KIP-394); v5+: static members (KIP-345); v7+: protocol type and
//! name in the answer; v9: `skip_assignment` for a static leader rejoining (KIP-814). The
//! answer waits on the group's shard until the rebalance completes.

use bytes::Bytes;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::{JoinGroupRequest, JoinGroupResponse};

use super::common::str_bytes;
use crate::group::coordinator::JoinRequest;
use crate::group::state::Protocol;
use crate::group::{on_coordinator, ImageTopics, JoinResult};
use crate::kafka::{Request, Response};

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: JoinGroupRequest = crate::decode_or_close!(req, b);
    let version = req.version;
    let join = JoinRequest {
        group_id: request.group_id.to_string(),
        member_id: request.member_id.to_string(),
        group_instance_id: request.group_instance_id.as_ref().map(|s| s.to_string()),
        client_id: req
            .header
            .client_id
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default(),
        client_host: format!("/{}", req.conn.peer.ip()),
        session_timeout_ms: request.session_timeout_ms,
        // v0 has no rebalance timeout: Kafka uses the session timeout.
        rebalance_timeout_ms: if version >= 1 {
            request.rebalance_timeout_ms
        } else {
            request.session_timeout_ms
        },
        protocol_type: request.protocol_type.to_string(),
        protocols: request
            .protocols
            .iter()
            .map(|p| Protocol {
                name: p.name.to_string(),
                metadata: p.metadata.clone(),
            })
            .collect(),
        require_known_member_id: version >= 4,
    };
    let member_id = join.member_id.clone();
    let r = match on_coordinator(&join.group_id.clone(), move |gs| async move {
        let topics = ImageTopics(crate::shard::local().broker.image());
        gs.join(join, &topics).await
    })
    .await
    {
        Ok(r) => r,
        Err(code) => JoinResult::error(code, &member_id),
    };
    req.error_code(r.error);
    req.respond(&response(r, version))
}

fn response(r: JoinResult, version: i16) -> JoinGroupResponse {
    let members = r
        .members
        .into_iter()
        .map(|m| {
            JoinGroupResponseMember::default()
                .with_member_id(str_bytes(&m.member_id))
                .with_group_instance_id(if version >= 5 {
                    m.group_instance_id.as_deref().map(str_bytes)
                } else {
                    None
                })
                .with_metadata(m.metadata)
        })
        .collect();
    let mut resp = JoinGroupResponse::default()
        .with_error_code(r.error.get())
        .with_generation_id(r.generation)
        .with_leader(str_bytes(&r.leader))
        .with_member_id(str_bytes(&r.member_id))
        .with_members(members);
    if version >= 7 {
        resp.protocol_type = r.protocol_type.as_deref().map(str_bytes);
        resp.protocol_name = r.protocol_name.as_deref().map(str_bytes);
    } else {
        // Not nullable before v7.
        resp.protocol_name = Some(str_bytes(r.protocol_name.as_deref().unwrap_or("")));
    }
    if version >= 9 {
        resp.skip_assignment = r.skip_assignment;
    }
    resp
}
