//! TxnOffsetCommit, versions 0-4 (flexible from 3): offsets committed inside a transaction.
//! The group's coordinator appends them as the producer's transactional batch and applies them
//! when the transaction commits (see [`crate::group::txn_offsets`]). From v3 the request names
//! the consumer's member and generation (KIP-447), checked like an OffsetCommit's.
//!
//! The group's `__consumer_offsets` partition must be in the transaction (AddOffsetsToTxn
//! first): otherwise the offsets would never see a marker. That is checked with the
//! transaction coordinator before anything is written.

use bytes::Bytes;
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::{TxnOffsetCommitRequest, TxnOffsetCommitResponse};
use kafka_protocol::ResponseError;

use super::common::{code, NONE};
use super::offset_commit::Commit;
use super::txn_common::fenced_for;
use crate::group::{on_coordinator, partition_for, MemberRef, OFFSETS_TOPIC};
use crate::kafka::{Request, Response};
use crate::shard;
use crate::txn;
use crate::types::ErrorCode;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: TxnOffsetCommitRequest = crate::decode_or_close!(req, b);
    let image = shard::local().broker.image();
    let now = shard::local().clock.now_ms();
    let mut errors: Vec<Vec<ErrorCode>> = Vec::with_capacity(request.topics.len());
    let mut entries = Vec::new();
    for t in &request.topics {
        let meta = image.topic(t.name.as_str());
        let mut errs = Vec::with_capacity(t.partitions.len());
        for p in &t.partitions {
            let e = match (Commit {
                meta: meta.map(|m| &**m),
                topic: t.name.as_str(),
                partition: p.partition_index,
                offset: p.committed_offset,
                leader_epoch: if req.version >= 2 {
                    p.committed_leader_epoch
                } else {
                    -1
                },
                metadata: p.committed_metadata.as_ref(),
                now,
                expire: -1,
            })
            .entry()
            {
                Ok(entry) => {
                    entries.push(entry);
                    NONE
                }
                Err(e) => e,
            };
            errs.push(e);
        }
        errors.push(errs);
    }
    let group_id = request.group_id.to_string();
    let tid = request.transactional_id.to_string();
    let (pid, epoch) = (request.producer_id.0, request.producer_epoch);
    let commit_code = if group_id.is_empty() {
        code(ResponseError::InvalidGroupId)
    } else if !txn::enabled() {
        code(ResponseError::CoordinatorNotAvailable)
    } else if entries.is_empty() {
        NONE
    } else {
        // The group's partition must be in the producer's transaction.
        let verified = match image.topic(OFFSETS_TOPIC) {
            None => code(ResponseError::CoordinatorNotAvailable),
            Some(meta) => {
                let tp = (
                    OFFSETS_TOPIC.to_string(),
                    partition_for(&group_id, meta.partition_count()),
                );
                let t = tid.clone();
                txn::on_coordinator(&tid, move |ts| async move {
                    ts.verify_partition(&t, pid, epoch, &tp)
                })
                .await
                .unwrap_or_else(|e| e)
            }
        };
        if verified.is_error() {
            verified
        } else {
            let member = request.member_id.to_string();
            let instance = request.group_instance_id.as_ref().map(|s| s.to_string());
            let generation = if req.version >= 3 {
                request.generation_id
            } else {
                -1
            };
            let gid = group_id.clone();
            on_coordinator(&group_id, move |gs| async move {
                let who = MemberRef::of_group(&gid)
                    .member(&member)
                    .instance(instance.as_deref())
                    .generation(generation);
                gs.txn_commit(who, pid, epoch, entries).await
            })
            .await
            .unwrap_or_else(|e| e)
        }
    };
    let commit_code = fenced_for(req.version, 3, commit_code);
    let topics = request
        .topics
        .iter()
        .zip(errors)
        .map(|(t, errs)| {
            let partitions = t
                .partitions
                .iter()
                .zip(errs)
                .map(|(p, e)| {
                    TxnOffsetCommitResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(req.error_code(if e.is_error() { e } else { commit_code }))
                })
                .collect();
            TxnOffsetCommitResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(partitions)
        })
        .collect();
    req.respond(&TxnOffsetCommitResponse::default().with_topics(topics))
}
