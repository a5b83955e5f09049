//! ApiVersions, versions 0-4 (flexible from 3). Lists exactly the APIs and ranges in
//! [`crate::kafka::versions::SUPPORTED`] and, from v3, the feature `transaction.version`
//! (supported 0-2, finalized at 2).

use bytes::Bytes;
use kafka_protocol::messages::api_versions_response::{
    ApiVersion, FinalizedFeatureKey, SupportedFeatureKey,
};
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use crate::kafka::Response;
use crate::kafka::{encode_frame, versions, Request};
use crate::types::ErrorCode;

/// The epoch of the finalized features: they never change while the broker runs, and a client
/// takes features only from an epoch above the last it saw (starting at -1).
pub const FINALIZED_FEATURES_EPOCH: i64 = 1;

fn body(error: ErrorCode, version: i16) -> ApiVersionsResponse {
    let api_keys = versions::SUPPORTED
        .iter()
        .map(|(k, lo, hi)| {
            ApiVersion::default()
                .with_api_key(*k as i16)
                .with_min_version(*lo)
                .with_max_version(*hi)
        })
        .collect();
    let r = ApiVersionsResponse::default()
        .with_error_code(error.get())
        .with_api_keys(api_keys);
    if version < 3 || error.is_error() {
        return r;
    }
    // Transaction version 2 (KIP-890, gated as KIP-1022 describes): clients use Produce v12
    // and EndTxn v5 once `transaction.version` is finalized at 2. The other tagged fields
    // (zk_migration_ready) stay at their defaults, so they are not written at all.
    let feature = StrBytes::from_static_str(crate::txn::TRANSACTION_VERSION_FEATURE);
    r.with_supported_features(vec![SupportedFeatureKey::default()
        .with_name(feature.clone())
        .with_min_version(0)
        .with_max_version(crate::txn::TRANSACTION_VERSION)])
        .with_finalized_features_epoch(FINALIZED_FEATURES_EPOCH)
        .with_finalized_features(vec![FinalizedFeatureKey::default()
            .with_name(feature)
            .with_min_version_level(crate::txn::TRANSACTION_VERSION)
            .with_max_version_level(crate::txn::TRANSACTION_VERSION)])
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let _request: ApiVersionsRequest = crate::decode_or_close!(req, b);
    req.respond(&body(ErrorCode::NONE, req.version))
}

/// The v0 answer to an ApiVersions request with a version we do not support (KIP-511).
pub fn unsupported(correlation_id: i32) -> Response {
    let body = body(ErrorCode::new(ResponseError::UnsupportedVersion), 0);
    match encode_frame(ApiKey::ApiVersions, 0, correlation_id, &body) {
        Ok(f) => Response::Frame(f),
        Err(e) => Response::Close(format!("cannot encode ApiVersions v0: {e}")),
    }
}
