//! LeaveGroup, versions 0-5 (flexible from 4). v0-2 name one member; v3+ a batch of members,
//! each by member id and/or group instance id (KIP-345), with an error each.

use bytes::Bytes;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::{LeaveGroupRequest, LeaveGroupResponse};

use super::common::str_bytes;
use crate::group::on_coordinator;
use crate::kafka::{Request, Response};
use crate::types::ErrorCode;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: LeaveGroupRequest = crate::decode_or_close!(req, b);
    let leaving: Vec<(String, Option<String>)> = if req.version >= 3 {
        request
            .members
            .iter()
            .map(|m| {
                (
                    m.member_id.to_string(),
                    m.group_instance_id.as_ref().map(|s| s.to_string()),
                )
            })
            .collect()
    } else {
        vec![(request.member_id.to_string(), None)]
    };
    let group_id = request.group_id.to_string();
    let list = leaving.clone();
    let (top, per) = on_coordinator(&group_id.clone(), move |gs| async move {
        gs.with(|c, now| c.leave(&group_id, &list, now))
            .await
            .unwrap_or_else(|e| (e, vec![]))
    })
    .await
    .unwrap_or_else(|e| (e, vec![]));
    let resp = if req.version >= 3 {
        let members = leaving
            .iter()
            .zip(per.iter())
            .map(|((m, i), e)| {
                MemberResponse::default()
                    .with_member_id(str_bytes(m))
                    .with_group_instance_id(i.as_deref().map(str_bytes))
                    .with_error_code(req.error_code(*e))
            })
            .collect();
        LeaveGroupResponse::default()
            .with_error_code(req.error_code(top))
            .with_members(members)
    } else {
        let code = if top.is_error() {
            top
        } else {
            per.first().copied().unwrap_or(ErrorCode::NONE)
        };
        LeaveGroupResponse::default().with_error_code(req.error_code(code))
    };
    req.respond(&resp)
}
