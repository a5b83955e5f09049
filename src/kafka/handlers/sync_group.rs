//! SyncGroup, versions 0-5 (flexible from 4; protocol type and name from 5). The leader's
//! assignments are handed to every member; followers wait for them.

use bytes::Bytes;
use kafka_protocol::messages::{SyncGroupRequest, SyncGroupResponse};

use super::common::{opt_str, str_bytes, with_coordinator};
use crate::group::coordinator::SyncOutcome;
use crate::kafka::Request;
use crate::server::Response;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let r: SyncGroupRequest = crate::decode_or_close!(req, b);
    let group = r.group_id.to_string();
    let member = r.member_id.to_string();
    let instance = opt_str(&r.group_instance_id);
    let ptype = opt_str(&r.protocol_type);
    let pname = opt_str(&r.protocol_name);
    let generation = r.generation_id;
    let assignments: Vec<(String, Bytes)> = r
        .assignments
        .iter()
        .map(|a| (a.member_id.to_string(), a.assignment.clone()))
        .collect();
    let out = with_coordinator(&group.clone(), move |c| async move {
        c.sync(
            &group,
            generation,
            &member,
            instance.as_deref(),
            ptype.as_deref(),
            pname.as_deref(),
            assignments,
        )
        .await
    })
    .await
    .unwrap_or_else(|e| SyncOutcome {
        error: e,
        ..Default::default()
    });
    let mut resp = SyncGroupResponse::default()
        .with_error_code(out.error)
        .with_assignment(out.assignment);
    if req.version >= 5 {
        resp = resp
            .with_protocol_type(out.protocol_type.map(|p| str_bytes(&p)))
            .with_protocol_name(out.protocol.map(|p| str_bytes(&p)));
    }
    req.respond(&resp)
}
