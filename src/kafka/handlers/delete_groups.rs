//! DeleteGroups, versions 0-2 (flexible from 2). Only empty groups can be deleted
//! (NON_EMPTY_GROUP otherwise); their offsets and metadata are tombstoned, and a share group's
//! share-partition state in `__share_group_state` too.

use bytes::Bytes;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::{DeleteGroupsRequest, DeleteGroupsResponse, GroupId};

use super::common::with_partition;
use crate::group::{on_coordinator, share_state};
use crate::kafka::{Request, Response};

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: DeleteGroupsRequest = crate::decode_or_close!(req, b);
    let mut results = Vec::with_capacity(request.groups_names.len());
    for g in request.groups_names {
        let id = g.to_string();
        let gid = id.clone();
        let code = on_coordinator(&id, move |gs| async move {
            gs.with(|c, _| c.delete_group(&gid))
                .await
                .unwrap_or_else(|e| e)
        })
        .await
        .unwrap_or_else(|e| e);
        if code == crate::types::ErrorCode::NONE {
            for (t, p, _, _) in share_state::group_states(&id).await {
                let Some(meta) = share_state::topic_by_id(&t) else {
                    continue;
                };
                let key = share_state::StateKey {
                    group: id.clone(),
                    topic: t,
                    partition: p,
                };
                let _ = with_partition(&meta, p, move |_| share_state::delete_here(key)).await;
            }
        }
        results.push(
            DeletableGroupResult::default()
                .with_group_id(GroupId(g.0))
                .with_error_code(req.error_code(code)),
        );
    }
    req.respond(&DeleteGroupsResponse::default().with_results(results))
}
