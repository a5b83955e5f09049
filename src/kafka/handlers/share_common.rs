//! What the share-group handlers (KIP-932) share: the single-node refusal.

use kafka_protocol::ResponseError;

use super::common::code;
use crate::types::ErrorCode;

/// Why a share API is refused in a cluster.
pub const CLUSTER_MESSAGE: &str = "share groups run on a single node only";

/// In a cluster share groups are not served (their state is not replicated yet): the APIs
/// answer UNSUPPORTED_VERSION, as transactions are refused there.
pub fn refuse_in_cluster() -> Option<ErrorCode> {
    crate::shard::local()
        .broker
        .config
        .cluster
        .is_some()
        .then(|| code(ResponseError::UnsupportedVersion))
}

/// The checks ShareFetch and ShareAcknowledge begin with: served on this node, and a group id
/// and a member id given. The (group, member) ids, or the error and message to answer with.
pub fn admit(
    group_id: Option<&impl ToString>,
    member_id: Option<&impl ToString>,
) -> Result<(String, String), (ErrorCode, Option<&'static str>)> {
    if let Some(c) = refuse_in_cluster() {
        return Err((c, Some(CLUSTER_MESSAGE)));
    }
    let missing = || {
        (
            code(ResponseError::InvalidRequest),
            Some("group and member id are required"),
        )
    };
    let (Some(group), Some(member)) = (
        group_id.map(|g| g.to_string()),
        member_id.map(|m| m.to_string()),
    ) else {
        return Err(missing());
    };
    if group.is_empty() || member.is_empty() {
        return Err(missing());
    }
    Ok((group, member))
}
