//! InitProducerId, versions 0-4 (flexible from 2). Hands out producer ids for idempotent
//! producers (KIP-98) from a block persisted in the data dir, so ids are never reused across
//! restarts; a known id and epoch (KIP-360, v3+) gets its epoch bumped. Transactional ids are
//! refused until transactions exist.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use kafka_protocol::messages::{InitProducerIdRequest, InitProducerIdResponse, ProducerId};
use kafka_protocol::ResponseError;

use super::common::{code, NONE};
use crate::broker::{write_producer_id_limit, PRODUCER_ID_BLOCK};
use crate::kafka::Request;
use crate::server::Response;
use crate::shard;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: InitProducerIdRequest = crate::decode_or_close!(req, b);
    let broker = shard::local().broker.clone();
    let fail = |c: i16| {
        InitProducerIdResponse::default()
            .with_error_code(c)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1)
    };
    if request.transactional_id.is_some() {
        return req.respond(&fail(code(
            ResponseError::TransactionalIdAuthorizationFailed,
        )));
    }
    if request.producer_id.0 >= 0
        && request.producer_epoch >= 0
        && request.producer_epoch < i16::MAX - 1
    {
        return req.respond(
            &InitProducerIdResponse::default()
                .with_error_code(NONE)
                .with_producer_id(request.producer_id)
                .with_producer_epoch(request.producer_epoch + 1),
        );
    }
    let id = broker.next_producer_id.fetch_add(1, Ordering::SeqCst);
    // Crossing into a new block: persist the new limit before the id is used.
    if (id + 1) % PRODUCER_ID_BLOCK == 0 {
        if let Err(e) = write_producer_id_limit(&broker.config.data_dir, id + 1 + PRODUCER_ID_BLOCK)
        {
            tracing::error!(error = %e, "cannot persist producer id block");
            return req.respond(&fail(code(ResponseError::KafkaStorageError)));
        }
    }
    req.respond(
        &InitProducerIdResponse::default()
            .with_error_code(NONE)
            .with_producer_id(ProducerId(id as i64))
            .with_producer_epoch(0),
    )
}
