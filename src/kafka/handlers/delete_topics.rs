//! DeleteTopics, versions 1-6 (flexible from 4; v6 by name or topic id). The partition logs are
//! removed from disk and the name can be reused at once.

use bytes::Bytes;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::{DeleteTopicsRequest, DeleteTopicsResponse};
use kafka_protocol::ResponseError;

use super::common::{admin_code, code, str_bytes, topic_name, NONE};
use crate::admin;
use crate::kafka::{Request, Response};
use crate::shard;
use crate::types::ErrorCode;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: DeleteTopicsRequest = crate::decode_or_close!(req, b);
    let image = shard::local().broker.image();
    // (name if known, id as given, error if the topic cannot be resolved)
    let mut targets: Vec<(Option<String>, uuid::Uuid, ErrorCode)> = Vec::new();
    if req.version >= 6 {
        for t in request.topics {
            match (t.name, t.topic_id.is_nil()) {
                (Some(n), _) => targets.push((Some(n.to_string()), t.topic_id, NONE)),
                (None, false) => match image.topic_by_id(t.topic_id.as_bytes()) {
                    Some(m) => targets.push((Some(m.name.clone()), t.topic_id, NONE)),
                    None => targets.push((None, t.topic_id, code(ResponseError::UnknownTopicId))),
                },
                (None, true) => {
                    targets.push((None, t.topic_id, code(ResponseError::InvalidRequest)))
                }
            }
        }
    } else {
        for n in request.topic_names {
            targets.push((Some(n.to_string()), uuid::Uuid::nil(), NONE));
        }
    }
    let mut responses = Vec::new();
    for (name, id, err) in targets {
        let mut r = DeletableTopicResult::default()
            .with_name(name.as_deref().map(topic_name))
            .with_topic_id(if req.version >= 6 {
                id
            } else {
                uuid::Uuid::nil()
            });
        if err.is_error() {
            responses.push(r.with_error_code(req.error_code(err)));
            continue;
        }
        let name = name.expect("resolved above");
        if let (Some(m), true) = (image.topic(&name), req.version >= 6) {
            r = r.with_topic_id(uuid::Uuid::from_bytes(m.id));
        }
        match admin::delete_topic(name).await {
            Ok(()) => responses.push(r.with_error_code(req.error_code(NONE))),
            Err(e) => responses.push(
                r.with_error_code(req.error_code(admin_code(&e)))
                    .with_error_message((req.version >= 5).then(|| str_bytes(&e.message()))),
            ),
        }
    }
    req.respond(&DeleteTopicsResponse::default().with_responses(responses))
}
