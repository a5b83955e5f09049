//! SyncGroup, versions 0-5 (flexible from 4; v3+ static members; v5 protocol type and name).
//! The leader's request carries every member's assignment; followers wait on the group's shard
//! until it arrives.

use bytes::Bytes;
use kafka_protocol::messages::{SyncGroupRequest, SyncGroupResponse};

use super::common::str_bytes;
use crate::group::coordinator::SyncRequest;
use crate::group::{on_coordinator, ImageTopics, SyncResult};
use crate::kafka::{Request, Response};

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: SyncGroupRequest = crate::decode_or_close!(req, b);
    let sync = SyncRequest {
        group_id: request.group_id.to_string(),
        generation: request.generation_id,
        member_id: request.member_id.to_string(),
        group_instance_id: request.group_instance_id.as_ref().map(|s| s.to_string()),
        protocol_type: request.protocol_type.as_ref().map(|s| s.to_string()),
        protocol_name: request.protocol_name.as_ref().map(|s| s.to_string()),
        assignments: request
            .assignments
            .into_iter()
            .map(|a| (a.member_id.to_string(), a.assignment))
            .collect(),
    };
    let group_id = sync.group_id.clone();
    let r = match on_coordinator(&group_id, move |gs| async move {
        let topics = ImageTopics(crate::shard::local().broker.image());
        gs.sync(sync, &topics).await
    })
    .await
    {
        Ok(r) => r,
        Err(code) => SyncResult::error(code),
    };
    let mut resp = SyncGroupResponse::default()
        .with_error_code(req.error_code(r.error))
        .with_assignment(r.assignment);
    if req.version >= 5 {
        resp.protocol_type = r.protocol_type.as_deref().map(str_bytes);
        resp.protocol_name = r.protocol_name.as_deref().map(str_bytes);
    }
    req.respond(&resp)
}
