//! ListTransactions, versions 0-1 (flexible): every transactional id of this node with its
//! producer id and state, filtered by states, producer ids and (v1) how long the transaction
//! has been open (`duration_filter` ms, -1 for any). Unknown state names are echoed in
//! `unknown_state_filters`.

use bytes::Bytes;
use kafka_protocol::messages::list_transactions_response::TransactionState;
use kafka_protocol::messages::{ListTransactionsRequest, ListTransactionsResponse, ProducerId};
use kafka_protocol::ResponseError;

use super::common::{code, str_bytes, NONE};
use crate::kafka::{Request, Response};
use crate::shard;
use crate::txn;

const STATES: [&str; 8] = [
    "Empty",
    "Ongoing",
    "PrepareCommit",
    "PrepareAbort",
    "CompleteCommit",
    "CompleteAbort",
    "Dead",
    "PrepareEpochFence",
];

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: ListTransactionsRequest = crate::decode_or_close!(req, b);
    if !txn::enabled() {
        return req.respond(
            &ListTransactionsResponse::default()
                .with_error_code(req.error_code(code(ResponseError::CoordinatorNotAvailable))),
        );
    }
    let unknown: Vec<_> = request
        .state_filters
        .iter()
        .filter(|s| !STATES.contains(&s.as_str()))
        .cloned()
        .collect();
    let now = shard::local().clock.now_ms();
    let states = txn::list_all()
        .await
        .into_iter()
        .filter(|d| {
            request.state_filters.is_empty()
                || request
                    .state_filters
                    .iter()
                    .any(|s| s.as_str() == d.meta.state.name())
        })
        .filter(|d| {
            request.producer_id_filters.is_empty()
                || request
                    .producer_id_filters
                    .iter()
                    .any(|p| p.0 == d.meta.producer_id)
        })
        .filter(|d| {
            req.version < 1
                || request.duration_filter < 0
                || (d.meta.start_ms >= 0 && now - d.meta.start_ms >= request.duration_filter)
        })
        .map(|d| {
            TransactionState::default()
                .with_transactional_id(str_bytes(&d.transactional_id).into())
                .with_producer_id(ProducerId(d.meta.producer_id))
                .with_transaction_state(str_bytes(d.meta.state.name()))
        })
        .collect();
    req.respond(
        &ListTransactionsResponse::default()
            .with_error_code(req.error_code(NONE))
            .with_unknown_state_filters(unknown)
            .with_transaction_states(states),
    )
}
