//! AddOffsetsToTxn, versions 0-3 (flexible from 3): adds the group's `__consumer_offsets`
//! partition to the producer's transaction, so that the offsets it commits there with
//! TxnOffsetCommit end with the transaction.

use bytes::Bytes;
use kafka_protocol::messages::{AddOffsetsToTxnRequest, AddOffsetsToTxnResponse};
use kafka_protocol::ResponseError;

use super::common::code;
use super::txn_common::fenced_for;
use crate::group::{partition_for, OFFSETS_TOPIC};
use crate::kafka::{Request, Response};
use crate::shard;
use crate::txn;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: AddOffsetsToTxnRequest = crate::decode_or_close!(req, b);
    let image = shard::local().broker.image();
    let e = if request.group_id.is_empty() {
        code(ResponseError::InvalidGroupId)
    } else if !txn::enabled() {
        code(ResponseError::CoordinatorNotAvailable)
    } else if let Some(meta) = image.topic(OFFSETS_TOPIC) {
        let p = partition_for(request.group_id.as_str(), meta.partition_count());
        let tid = request.transactional_id.to_string();
        let (pid, epoch) = (request.producer_id.0, request.producer_epoch);
        txn::on_coordinator(&tid.clone(), move |ts| async move {
            ts.add_partitions(
                &tid,
                pid,
                epoch,
                vec![(OFFSETS_TOPIC.to_string(), p)],
                false,
            )
            .await
        })
        .await
        .unwrap_or_else(|e| e)
    } else {
        code(ResponseError::CoordinatorNotAvailable)
    };
    req.respond(
        &AddOffsetsToTxnResponse::default().with_error_code(req.error_code(fenced_for(
            req.version,
            2,
            e,
        ))),
    )
}
