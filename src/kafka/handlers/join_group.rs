//! JoinGroup, versions 0-9 (flexible from 6; MEMBER_ID_REQUIRED from 4; static membership from
//! 5; skip_assignment from 9). Waits until the rebalance completes.

use bytes::Bytes;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::{JoinGroupRequest, JoinGroupResponse};

use super::common::{opt_str, str_bytes, with_coordinator};
use crate::group::coordinator::{JoinArgs, JoinOutcome};
use crate::kafka::Request;
use crate::server::Response;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let r: JoinGroupRequest = crate::decode_or_close!(req, b);
    let args = JoinArgs {
        group_id: r.group_id.to_string(),
        member_id: r.member_id.to_string(),
        instance_id: opt_str(&r.group_instance_id),
        client_id: opt_str(&req.header.client_id).unwrap_or_default(),
        client_host: format!("/{}", req.conn.peer.ip()),
        session_timeout_ms: r.session_timeout_ms,
        rebalance_timeout_ms: if req.version >= 1 {
            r.rebalance_timeout_ms
        } else {
            r.session_timeout_ms
        },
        protocol_type: r.protocol_type.to_string(),
        protocols: r
            .protocols
            .iter()
            .map(|p| (p.name.to_string(), p.metadata.clone()))
            .collect(),
        version: req.version,
    };
    let member_id = args.member_id.clone();
    let out = with_coordinator(&args.group_id.clone(), move |c| async move {
        c.join(args).await
    })
    .await
    .unwrap_or_else(|e| JoinOutcome {
        error: e,
        generation: -1,
        member_id,
        ..Default::default()
    });
    let members = out
        .members
        .into_iter()
        .map(|(id, inst, meta)| {
            JoinGroupResponseMember::default()
                .with_member_id(str_bytes(&id))
                .with_group_instance_id(if req.version >= 5 {
                    inst.map(|i| str_bytes(&i))
                } else {
                    None
                })
                .with_metadata(meta)
        })
        .collect();
    let mut resp = JoinGroupResponse::default()
        .with_error_code(out.error)
        .with_generation_id(out.generation)
        .with_protocol_name(out.protocol.map(|p| str_bytes(&p)).or(if req.version >= 7 {
            None
        } else {
            Some(str_bytes(""))
        }))
        .with_leader(str_bytes(&out.leader))
        .with_member_id(str_bytes(&out.member_id))
        .with_members(members);
    if req.version >= 7 {
        resp = resp.with_protocol_type(out.protocol_type.map(|p| str_bytes(&p)));
    }
    if req.version >= 9 {
        resp = resp.with_skip_assignment(out.skip_assignment);
    }
    req.respond(&resp)
}
