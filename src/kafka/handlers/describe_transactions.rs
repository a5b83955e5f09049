//! DescribeTransactions, version 0 (flexible): each transactional id's state, producer, timeout,
//! start time and partitions, from its coordinator's shard. An unknown id is
//! TRANSACTIONAL_ID_NOT_FOUND.

use bytes::Bytes;
use kafka_protocol::messages::describe_transactions_response::{TopicData, TransactionState};
use kafka_protocol::messages::{
    DescribeTransactionsRequest, DescribeTransactionsResponse, ProducerId,
};
use kafka_protocol::ResponseError;

use super::common::{code, str_bytes, NONE};
use crate::kafka::{Request, Response};
use crate::txn;

/// Ids one request may describe (each is a hop to its coordinator shard).
const IDS_PER_REQUEST_MAX: usize = 10_000;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: DescribeTransactionsRequest = crate::decode_or_close!(req, b);
    let mut states = Vec::with_capacity(request.transactional_ids.len().min(IDS_PER_REQUEST_MAX));
    for (i, id) in request.transactional_ids.iter().enumerate() {
        let base = TransactionState::default()
            .with_transactional_id(id.clone())
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1)
            .with_transaction_start_time_ms(-1);
        if i >= IDS_PER_REQUEST_MAX {
            states.push(base.with_error_code(req.error_code(code(ResponseError::InvalidRequest))));
            continue;
        }
        let tid = id.to_string();
        let found = if txn::enabled() {
            let t = tid.clone();
            txn::on_coordinator(&tid, move |ts| async move { ts.describe(&t) }).await
        } else {
            Err(code(ResponseError::CoordinatorNotAvailable))
        };
        let s = match found {
            Err(e) => base.with_error_code(req.error_code(e)),
            Ok(None) => {
                base.with_error_code(req.error_code(code(ResponseError::TransactionalIdNotFound)))
            }
            Ok(Some(m)) => {
                let mut topics: Vec<TopicData> = vec![];
                for (t, p) in &m.partitions {
                    match topics.last_mut() {
                        Some(last) if last.topic.as_str() == t.as_str() => last.partitions.push(*p),
                        _ => topics.push(
                            TopicData::default()
                                .with_topic(str_bytes(t).into())
                                .with_partitions(vec![*p]),
                        ),
                    }
                }
                base.with_error_code(req.error_code(NONE))
                    .with_transaction_state(str_bytes(m.state.name()))
                    .with_transaction_timeout_ms(m.timeout_ms)
                    .with_transaction_start_time_ms(m.start_ms)
                    .with_producer_id(ProducerId(m.producer_id))
                    .with_producer_epoch(m.epoch)
                    .with_topics(topics)
            }
        };
        states.push(s);
    }
    req.respond(&DescribeTransactionsResponse::default().with_transaction_states(states))
}
