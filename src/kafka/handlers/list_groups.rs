//! ListGroups, versions 0-5 (flexible from 3; v4 state filter; v5 type filter and group type:
//! `classic` or `consumer` for KIP-848 groups, whose states are Empty/Assigning/Reconciling/Stable).
//! Asks every shard's coordinator.

use bytes::Bytes;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::{GroupId, ListGroupsRequest, ListGroupsResponse};

use super::common::str_bytes;
use crate::group;
use crate::kafka::{Request, Response};
use crate::shard;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: ListGroupsRequest = crate::decode_or_close!(req, b);
    let version = req.version;
    let names: Vec<String> = if version >= 4 {
        request
            .states_filter
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        vec![]
    };
    // An unknown state name matches nothing (Kafka ignores it rather than failing).
    let states = names;
    let types: Vec<String> = if version >= 5 {
        request.types_filter.iter().map(|s| s.to_string()).collect()
    } else {
        vec![]
    };
    let per_shard = shard::invoke_on_all(move || {
        let states = states.clone();
        let types = types.clone();
        async move {
            match group::local() {
                Some(gs) => gs.coordinator.borrow().list_groups(&states, &types),
                None => vec![],
            }
        }
    })
    .await;
    let groups = {
        per_shard
            .into_iter()
            .flatten()
            .map(|g| {
                let mut l = ListedGroup::default()
                    .with_group_id(GroupId(str_bytes(&g.group_id)))
                    .with_protocol_type(str_bytes(&g.protocol_type));
                if version >= 4 {
                    l.group_state = str_bytes(g.state);
                }
                if version >= 5 {
                    l.group_type = str_bytes(g.group_type);
                }
                l
            })
            .collect()
    };
    req.respond(&ListGroupsResponse::default().with_groups(groups))
}
