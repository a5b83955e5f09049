//! Heartbeat, versions 0-4 (flexible from 4; group instance id from 3).

use bytes::Bytes;
use kafka_protocol::messages::{HeartbeatRequest, HeartbeatResponse};

use super::common::{opt_str, with_coordinator};
use crate::kafka::Request;
use crate::server::Response;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let r: HeartbeatRequest = crate::decode_or_close!(req, b);
    let group = r.group_id.to_string();
    let member = r.member_id.to_string();
    let instance = opt_str(&r.group_instance_id);
    let generation = r.generation_id;
    let e = with_coordinator(&group.clone(), move |c| async move {
        c.heartbeat(&group, generation, &member, instance.as_deref())
    })
    .await
    .unwrap_or_else(|e| e);
    req.respond(&HeartbeatResponse::default().with_error_code(e))
}
