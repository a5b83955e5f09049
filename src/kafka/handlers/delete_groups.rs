//! DeleteGroups, versions 0-2 (flexible from 2). Only empty groups can be deleted
//! (NON_EMPTY_GROUP otherwise); their committed offsets are tombstoned.

use bytes::Bytes;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::{DeleteGroupsRequest, DeleteGroupsResponse};

use super::common::with_coordinator;
use crate::kafka::Request;
use crate::server::Response;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let r: DeleteGroupsRequest = crate::decode_or_close!(req, b);
    let mut results = Vec::new();
    for gid in r.groups_names {
        let id = gid.to_string();
        let e = with_coordinator(&id.clone(), move |c| async move { c.delete(&id).await })
            .await
            .unwrap_or_else(|e| e);
        results.push(
            DeletableGroupResult::default()
                .with_group_id(gid)
                .with_error_code(e),
        );
    }
    req.respond(&DeleteGroupsResponse::default().with_results(results))
}
