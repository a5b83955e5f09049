//! AddPartitionsToTxn, versions 0-4 (flexible from 3). v0-3 add one producer's partitions to
//! its transaction; v4 (KIP-890) batches several transactions, each possibly `verify_only`
//! (checks that the partitions are already in the transaction). Unknown partitions fail the
//! transaction's request: they get UNKNOWN_TOPIC_OR_PARTITION and the others
//! OPERATION_NOT_ATTEMPTED, as in Kafka.

use bytes::Bytes;
use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnResult, AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::{AddPartitionsToTxnRequest, AddPartitionsToTxnResponse};
use kafka_protocol::ResponseError;

use super::common::{code, NONE};
use super::txn_common::fenced_for;
use crate::kafka::{Request, Response};
use crate::shard;
use crate::txn;
use crate::types::ErrorCode;

/// Transactions one v4 request may carry (Kafka's broker-to-broker batches are per leader;
/// a bound keeps one request's hops finite).
const TRANSACTIONS_PER_REQUEST_MAX: usize = 1_000;

/// The per-partition results of one transaction's request.
async fn add(
    version: i16,
    tid: &str,
    pid: i64,
    epoch: i16,
    topics: &[AddPartitionsToTxnTopic],
    verify_only: bool,
) -> Vec<AddPartitionsToTxnTopicResult> {
    let image = shard::local().broker.image();
    let mut parts = vec![];
    let mut unknown = false;
    for t in topics {
        let meta = image.topic(t.name.as_str());
        for p in &t.partitions {
            match meta {
                Some(m) if *p >= 0 && *p < m.partition_count() => {}
                _ => unknown = true,
            }
            parts.push((t.name.to_string(), *p));
        }
    }
    let outcome: ErrorCode = if unknown {
        code(ResponseError::OperationNotAttempted)
    } else if !txn::enabled() {
        code(ResponseError::CoordinatorNotAvailable)
    } else {
        let t = tid.to_string();
        txn::on_coordinator(tid, move |ts| async move {
            ts.add_partitions(&t, pid, epoch, parts, verify_only).await
        })
        .await
        .unwrap_or_else(|e| e)
    };
    let outcome = fenced_for(version, 2, outcome);
    topics
        .iter()
        .map(|t| {
            let meta = image.topic(t.name.as_str());
            AddPartitionsToTxnTopicResult::default()
                .with_name(t.name.clone())
                .with_results_by_partition(
                    t.partitions
                        .iter()
                        .map(|p| {
                            let known = meta.is_some_and(|m| *p >= 0 && *p < m.partition_count());
                            let e = if unknown && !known {
                                code(ResponseError::UnknownTopicOrPartition)
                            } else {
                                outcome
                            };
                            AddPartitionsToTxnPartitionResult::default()
                                .with_partition_index(*p)
                                .with_partition_error_code(e.get())
                        })
                        .collect(),
                )
        })
        .collect()
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: AddPartitionsToTxnRequest = crate::decode_or_close!(req, b);
    if req.version <= 3 {
        let results = add(
            req.version,
            request.v3_and_below_transactional_id.as_str(),
            request.v3_and_below_producer_id.0,
            request.v3_and_below_producer_epoch,
            &request.v3_and_below_topics,
            false,
        )
        .await;
        return req.respond(
            &AddPartitionsToTxnResponse::default().with_results_by_topic_v3_and_below(results),
        );
    }
    if request.transactions.len() > TRANSACTIONS_PER_REQUEST_MAX {
        return req.respond(
            &AddPartitionsToTxnResponse::default()
                .with_error_code(req.error_code(code(ResponseError::InvalidRequest))),
        );
    }
    let mut out = Vec::with_capacity(request.transactions.len());
    for t in &request.transactions {
        let results = add(
            req.version,
            t.transactional_id.as_str(),
            t.producer_id.0,
            t.producer_epoch,
            &t.topics,
            t.verify_only,
        )
        .await;
        out.push(
            AddPartitionsToTxnResult::default()
                .with_transactional_id(t.transactional_id.clone())
                .with_topic_results(results),
        );
    }
    req.respond(
        &AddPartitionsToTxnResponse::default()
            .with_error_code(req.error_code(NONE))
            .with_results_by_transaction(out),
    )
}
