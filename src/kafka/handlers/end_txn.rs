//! EndTxn, versions 0-5 (flexible from 3): commits or aborts the producer's transaction. The
//! answer comes once PrepareCommit/PrepareAbort is durable; the markers follow (see
//! [`crate::txn`]). Version 5 is transaction version 2 (KIP-890 part 2): the epoch is bumped on
//! every commit and abort, and the answer carries the producer id and epoch to continue with.

use bytes::Bytes;
use kafka_protocol::messages::{EndTxnRequest, EndTxnResponse, ProducerId};
use kafka_protocol::ResponseError;

use super::common::code;
use super::txn_common::fenced_for;
use crate::kafka::{Request, Response};
use crate::txn;

/// The first EndTxn version of transaction version 2.
pub const EPOCH_BUMP_VERSION: i16 = 5;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: EndTxnRequest = crate::decode_or_close!(req, b);
    let bump = req.version >= EPOCH_BUMP_VERSION;
    let answer = if !txn::enabled() {
        Err(code(ResponseError::CoordinatorNotAvailable))
    } else {
        let tid = request.transactional_id.to_string();
        let (pid, epoch, commit) = (
            request.producer_id.0,
            request.producer_epoch,
            request.committed,
        );
        txn::on_coordinator(&tid.clone(), move |ts| async move {
            ts.end_txn(&tid, pid, epoch, commit, bump).await
        })
        .await
        .unwrap_or_else(Err)
    };
    let (e, (pid, epoch)) = match answer {
        Ok(ids) if bump => (crate::types::ErrorCode::NONE, ids),
        Ok(_) => (crate::types::ErrorCode::NONE, (-1, -1)),
        Err(e) => (e, (-1, -1)),
    };
    req.respond(
        &EndTxnResponse::default()
            .with_error_code(req.error_code(fenced_for(req.version, 2, e)))
            .with_producer_id(ProducerId(pid))
            .with_producer_epoch(epoch),
    )
}
