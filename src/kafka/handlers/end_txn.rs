//! EndTxn, versions 0-4 (flexible from 3): commits or aborts the producer's transaction. The
//! answer comes once PrepareCommit/PrepareAbort is durable; the markers follow (see
//! [`crate::txn`]).

use bytes::Bytes;
use kafka_protocol::messages::{EndTxnRequest, EndTxnResponse, ProducerId};
use kafka_protocol::ResponseError;

use super::common::code;
use super::txn_common::fenced_for;
use crate::kafka::{Request, Response};
use crate::txn;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: EndTxnRequest = crate::decode_or_close!(req, b);
    let e = if !txn::enabled() {
        code(ResponseError::CoordinatorNotAvailable)
    } else {
        let tid = request.transactional_id.to_string();
        let (pid, epoch, commit) = (
            request.producer_id.0,
            request.producer_epoch,
            request.committed,
        );
        txn::on_coordinator(&tid.clone(), move |ts| async move {
            ts.end_txn(&tid, pid, epoch, commit).await
        })
        .await
        .unwrap_or_else(|e| e)
    };
    req.respond(
        &EndTxnResponse::default()
            .with_error_code(req.error_code(fenced_for(req.version, 2, e)))
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1),
    )
}
