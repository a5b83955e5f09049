//! LeaveGroup, versions 0-5 (flexible from 4; batched members from 3, KIP-345).

use bytes::Bytes;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::{LeaveGroupRequest, LeaveGroupResponse};

use super::common::{opt_str, with_coordinator};
use crate::kafka::Request;
use crate::server::Response;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let r: LeaveGroupRequest = crate::decode_or_close!(req, b);
    let group = r.group_id.to_string();
    let members: Vec<(String, Option<String>)> = if req.version >= 3 {
        r.members
            .iter()
            .map(|m| (m.member_id.to_string(), opt_str(&m.group_instance_id)))
            .collect()
    } else {
        vec![(r.member_id.to_string(), None)]
    };
    let ms = members.clone();
    let (top, per) = with_coordinator(&group.clone(), move |c| async move { c.leave(&group, &ms) })
        .await
        .unwrap_or_else(|e| (e, vec![]));
    if req.version < 3 {
        let e = if top != 0 {
            top
        } else {
            per.first().copied().unwrap_or(0)
        };
        return req.respond(&LeaveGroupResponse::default().with_error_code(e));
    }
    let resp = members
        .into_iter()
        .enumerate()
        .map(|(i, (id, inst))| {
            MemberResponse::default()
                .with_member_id(super::common::str_bytes(&id))
                .with_group_instance_id(inst.map(|x| super::common::str_bytes(&x)))
                .with_error_code(per.get(i).copied().unwrap_or(top))
        })
        .collect();
    req.respond(
        &LeaveGroupResponse::default()
            .with_error_code(top)
            .with_members(resp),
    )
}
