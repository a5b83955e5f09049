//! ListGroups, versions 0-4 (flexible from 3; state filter and states from 4). Gathers the
//! groups of every shard's coordinator.

use bytes::Bytes;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::{GroupId, ListGroupsRequest, ListGroupsResponse};

use super::common::str_bytes;
use crate::kafka::Request;
use crate::server::Response;
use crate::shard;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let r: ListGroupsRequest = crate::decode_or_close!(req, b);
    let filter: Vec<String> = r
        .states_filter
        .iter()
        .map(|s| s.to_ascii_lowercase())
        .collect();
    let per_shard = shard::invoke_on_all(|| async {
        crate::group::coordinator::local()
            .list()
            .into_iter()
            .map(|(id, pt, s)| (id, pt, s.name()))
            .collect::<Vec<_>>()
    })
    .await;
    let mut groups: Vec<_> = per_shard
        .into_iter()
        .flatten()
        .filter(|(_, _, s)| filter.is_empty() || filter.contains(&s.to_ascii_lowercase()))
        .collect();
    groups.sort();
    let listed = groups
        .into_iter()
        .map(|(id, pt, s)| {
            let g = ListedGroup::default()
                .with_group_id(GroupId(str_bytes(&id)))
                .with_protocol_type(str_bytes(&pt));
            if req.version >= 4 {
                g.with_group_state(str_bytes(s))
            } else {
                g
            }
        })
        .collect();
    req.respond(&ListGroupsResponse::default().with_groups(listed))
}
