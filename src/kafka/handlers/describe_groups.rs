//! DescribeGroups, versions 0-6 (flexible from 5; v3+ authorized operations: every group operation when asked, as Kafka without an authorizer; v4+ instance ids;
//! v6 error messages and GROUP_ID_NOT_FOUND for unknown groups, KIP-1043). Member metadata and
//! assignments are filled in only for Stable groups, as Kafka does. A KIP-848 consumer group
//! (with classic members or not) is not a classic group: Kafka 4 answers it like an unknown
//! group (Dead, no members; v6: GROUP_ID_NOT_FOUND "Group … is not a classic group."), and so
//! does Sluice; ConsumerGroupDescribe describes it.

use bytes::Bytes;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::{DescribeGroupsRequest, DescribeGroupsResponse, GroupId};

use super::common::{authorized_operations, str_bytes, AclResource};
use crate::group::on_coordinator;
use crate::kafka::{Request, Response};

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: DescribeGroupsRequest = crate::decode_or_close!(req, b);
    let version = req.version;
    let operations = authorized_operations(
        AclResource::Group,
        version >= 3 && request.include_authorized_operations,
    );
    let mut groups = Vec::with_capacity(request.groups.len());
    for g in request.groups {
        let id = g.to_string();
        let gid = id.clone();
        let d = on_coordinator(&id, move |gs| async move {
            gs.coordinator.borrow().describe(&gid, version >= 6)
        })
        .await;
        let out = match d {
            Err(code) => DescribedGroup::default()
                .with_group_id(GroupId(g.0))
                .with_error_code(req.error_code(code))
                .with_group_state(str_bytes("")),
            Ok(d) => {
                let members = d
                    .members
                    .into_iter()
                    .map(|m| {
                        DescribedGroupMember::default()
                            .with_member_id(str_bytes(&m.member_id))
                            .with_group_instance_id(if version >= 4 {
                                m.group_instance_id.as_deref().map(str_bytes)
                            } else {
                                None
                            })
                            .with_client_id(str_bytes(&m.client_id))
                            .with_client_host(str_bytes(&m.client_host))
                            .with_member_metadata(m.metadata)
                            .with_member_assignment(m.assignment)
                    })
                    .collect();
                let mut out = DescribedGroup::default()
                    .with_group_id(GroupId(g.0))
                    .with_error_code(req.error_code(d.error))
                    .with_group_state(str_bytes(d.state))
                    .with_protocol_type(str_bytes(&d.protocol_type))
                    .with_protocol_data(str_bytes(&d.protocol))
                    .with_members(members);
                if version >= 6 && d.error.is_error() {
                    out.error_message = d.message.as_deref().map(str_bytes);
                }
                out
            }
        };
        groups.push(out.with_authorized_operations(operations));
    }
    req.respond(&DescribeGroupsResponse::default().with_groups(groups))
}
