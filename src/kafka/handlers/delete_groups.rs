//! DeleteGroups, versions 0-2 (flexible from 2). Only empty groups can be deleted
//! (NON_EMPTY_GROUP otherwise); their offsets and metadata are tombstoned.

use bytes::Bytes;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::{DeleteGroupsRequest, DeleteGroupsResponse, GroupId};

use crate::group::on_coordinator;
use crate::kafka::{Request, Response};

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: DeleteGroupsRequest = crate::decode_or_close!(req, b);
    let mut results = Vec::with_capacity(request.groups_names.len());
    for g in request.groups_names {
        let id = g.to_string();
        let gid = id.clone();
        let code = on_coordinator(&id, move |gs| async move {
            gs.with(|c, _| c.delete_group(&gid)).await
        })
        .await
        .unwrap_or_else(|e| e);
        results.push(
            DeletableGroupResult::default()
                .with_group_id(GroupId(g.0))
                .with_error_code(req.error_code(code)),
        );
    }
    req.respond(&DeleteGroupsResponse::default().with_results(results))
}
