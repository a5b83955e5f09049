//! Heartbeat, versions 0-4 (flexible from 4; v3+ static members). REBALANCE_IN_PROGRESS tells
//! a member to rejoin.

use bytes::Bytes;
use kafka_protocol::messages::{HeartbeatRequest, HeartbeatResponse};

use crate::group::{on_coordinator, MemberRef};
use crate::kafka::{Request, Response};

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: HeartbeatRequest = crate::decode_or_close!(req, b);
    let member = request.member_id.to_string();
    let instance = request.group_instance_id.as_ref().map(|s| s.to_string());
    let generation = request.generation_id;
    let group_id = request.group_id.to_string();
    let code = on_coordinator(&group_id.clone(), move |gs| async move {
        let who = MemberRef::of_group(&group_id)
            .member(&member)
            .instance(instance.as_deref())
            .generation(generation);
        gs.with(|c, now| c.heartbeat(who, now))
            .await
            .unwrap_or_else(|e| e)
    })
    .await
    .unwrap_or_else(|e| e);
    req.respond(&HeartbeatResponse::default().with_error_code(req.error_code(code)))
}
