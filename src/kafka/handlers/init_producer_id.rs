//! InitProducerId, versions 0-4 (flexible from 2). Without a transactional id it hands out
//! producer ids for idempotent producers (KIP-98) from the metadata owner on shard 0
//! ([`crate::admin::next_producer_id`]), which persists each block of ids before handing any
//! out, so ids are never reused, not even after a crash; a known id and epoch (KIP-360, v3+)
//! gets its epoch bumped. With a transactional id the transaction coordinator answers (see
//! [`crate::txn`]): a new id, or the epoch bumped and the previous producer fenced. In a
//! cluster transactional ids are refused (TRANSACTIONAL_ID_AUTHORIZATION_FAILED): transactions
//! run on a single node only.

use bytes::Bytes;
use kafka_protocol::messages::{InitProducerIdRequest, InitProducerIdResponse, ProducerId};
use kafka_protocol::ResponseError;

use super::common::{code, NONE};
use super::txn_common::fenced_for;
use crate::admin;
use crate::kafka::{Request, Response};
use crate::txn;
use crate::types::ErrorCode;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: InitProducerIdRequest = crate::decode_or_close!(req, b);
    let fail = |c: ErrorCode| {
        InitProducerIdResponse::default()
            .with_error_code(req.error_code(c))
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1)
    };
    if let Some(tid) = &request.transactional_id {
        if !txn::enabled() {
            return req.respond(&fail(code(
                ResponseError::TransactionalIdAuthorizationFailed,
            )));
        }
        let timeout = request.transaction_timeout_ms;
        if timeout <= 0 || timeout > txn::TXN_MAX_TIMEOUT_MS {
            return req.respond(&fail(code(ResponseError::InvalidTransactionTimeout)));
        }
        if tid.is_empty() {
            return req.respond(&fail(code(ResponseError::InvalidRequest)));
        }
        let expected = (request.producer_id.0 >= 0 && request.producer_epoch >= 0)
            .then_some((request.producer_id.0, request.producer_epoch));
        let t = tid.to_string();
        let r = txn::on_coordinator(&t.clone(), move |ts| async move {
            ts.init_producer(&t, timeout, expected).await
        })
        .await
        .unwrap_or_else(Err);
        return match r {
            Ok((pid, epoch)) => req.respond(
                &InitProducerIdResponse::default()
                    .with_error_code(req.error_code(NONE))
                    .with_producer_id(ProducerId(pid))
                    .with_producer_epoch(epoch),
            ),
            Err(e) => req.respond(&fail(fenced_for(req.version, 4, e))),
        };
    }
    if request.producer_id.0 >= 0
        && request.producer_epoch >= 0
        && request.producer_epoch < i16::MAX - 1
    {
        return req.respond(
            &InitProducerIdResponse::default()
                .with_error_code(req.error_code(NONE))
                .with_producer_id(request.producer_id)
                .with_producer_epoch(request.producer_epoch + 1),
        );
    }
    // The hop to shard 0: the one allocator, whose blocks are durable before use.
    let id = match admin::next_producer_id().await {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %e, "cannot persist producer id block");
            return req.respond(&fail(code(ResponseError::KafkaStorageError)));
        }
    };
    req.respond(
        &InitProducerIdResponse::default()
            .with_error_code(req.error_code(NONE))
            .with_producer_id(ProducerId(id as i64))
            .with_producer_epoch(0),
    )
}
