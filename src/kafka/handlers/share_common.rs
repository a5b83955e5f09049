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
