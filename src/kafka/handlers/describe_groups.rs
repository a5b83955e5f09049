//! DescribeGroups, versions 0-5 (flexible from 5; group instance ids from 4). An unknown group is
//! described as `Dead` with no members, as Kafka does.

use bytes::Bytes;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::{DescribeGroupsRequest, DescribeGroupsResponse};

use super::common::{str_bytes, with_coordinator};
use crate::kafka::Request;
use crate::server::Response;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let r: DescribeGroupsRequest = crate::decode_or_close!(req, b);
    let mut out = Vec::new();
    for gid in r.groups {
        let id = gid.to_string();
        let res = with_coordinator(&id.clone(), move |c| async move {
            c.describe(&id).map(|(s, pt, p, m)| (s.name(), pt, p, m))
        })
        .await;
        let d = DescribedGroup::default()
            .with_group_id(gid)
            .with_authorized_operations(i32::MIN);
        out.push(match res {
            Err(e) => d.with_error_code(e).with_group_state(str_bytes("")),
            Ok(None) => d.with_group_state(str_bytes("Dead")),
            Ok(Some((state, ptype, proto, members))) => d
                .with_group_state(str_bytes(state))
                .with_protocol_type(str_bytes(&ptype))
                .with_protocol_data(str_bytes(&proto))
                .with_members(
                    members
                        .into_iter()
                        .map(|(id, inst, client, host, meta, assign)| {
                            DescribedGroupMember::default()
                                .with_member_id(str_bytes(&id))
                                .with_group_instance_id(if req.version >= 4 {
                                    inst.map(|i| str_bytes(&i))
                                } else {
                                    None
                                })
                                .with_client_id(str_bytes(&client))
                                .with_client_host(str_bytes(&host))
                                .with_member_metadata(meta)
                                .with_member_assignment(assign)
                        })
                        .collect(),
                ),
        });
    }
    req.respond(&DescribeGroupsResponse::default().with_groups(out))
}
