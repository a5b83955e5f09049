//! ApiVersions, versions 0-4 (flexible from 3). Lists exactly the APIs and ranges in
//! [`crate::kafka::versions::SUPPORTED`].

use bytes::Bytes;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse};
use kafka_protocol::ResponseError;

use crate::kafka::Response;
use crate::kafka::{encode_frame, versions, Request};
use crate::types::ErrorCode;

fn body(error: ErrorCode) -> ApiVersionsResponse {
    let api_keys = versions::SUPPORTED
        .iter()
        .map(|(k, lo, hi)| {
            ApiVersion::default()
                .with_api_key(*k as i16)
                .with_min_version(*lo)
                .with_max_version(*hi)
        })
        .collect();
    // Tagged fields (features, zk_migration_ready) stay at their defaults so that they are not
    // written at all: older librdkafka (2.0) fails to parse them otherwise.
    ApiVersionsResponse::default()
        .with_error_code(error.get())
        .with_api_keys(api_keys)
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let _request: ApiVersionsRequest = crate::decode_or_close!(req, b);
    req.respond(&body(ErrorCode::NONE))
}

/// The v0 answer to an ApiVersions request with a version we do not support (KIP-511).
pub fn unsupported(correlation_id: i32) -> Response {
    let body = body(ErrorCode::new(ResponseError::UnsupportedVersion));
    match encode_frame(ApiKey::ApiVersions, 0, correlation_id, &body) {
        Ok(f) => Response::Frames(vec![f]),
        Err(e) => Response::Close(format!("cannot encode ApiVersions v0: {e}")),
    }
}
