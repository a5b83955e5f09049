//! Transactional-producer calls (KIP-98 with KIP-447's group fencing), transaction version 1:
//! partitions are added with AddPartitionsToTxn before they are written, and EndTxn keeps the
//! producer's epoch. The calls return the broker's error codes: the caller retries the ones
//! that ask for it (CONCURRENT_TRANSACTIONS, COORDINATOR_LOAD_IN_PROGRESS) after a back-off,
//! as Kafka's clients do, and finds the coordinator again on NOT_COORDINATOR.
//!
//! Versions are capped below those of transaction version 2 (KIP-890 part 2: EndTxn v5,
//! AddOffsetsToTxn v4, TxnOffsetCommit v5, Produce v12), whose meaning differs: a client
//! speaking them must also follow that protocol. InitProducerId stops at v4 (v5 is KIP-939's
//! two-phase commit).

use anyhow::{Context, Result};
use futures_lite::{AsyncRead, AsyncWrite};
use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use kafka_protocol::messages::txn_offset_commit_request::{
    TxnOffsetCommitRequestPartition, TxnOffsetCommitRequestTopic,
};
use kafka_protocol::messages::{
    AddOffsetsToTxnRequest, AddPartitionsToTxnRequest, EndTxnRequest, GroupId,
    InitProducerIdRequest, ProducerId, TopicName, TransactionalId, TxnOffsetCommitRequest,
};

use crate::admin::s;
use crate::error::code;
use crate::Connection;

/// Highest versions spoken (transaction version 1; see the module notes).
pub const INIT_PRODUCER_ID_MAX: i16 = 4;
pub const ADD_PARTITIONS_TO_TXN_MAX: i16 = 3;
pub const ADD_OFFSETS_TO_TXN_MAX: i16 = 3;
pub const TXN_OFFSET_COMMIT_MAX: i16 = 4;
pub const END_TXN_MAX: i16 = 4;
/// Produce versions a transaction-version-1 producer may use (v12 adds partitions implicitly).
pub const PRODUCE_TXN_V1_MAX: i16 = 11;

/// A transactional producer's identity: its transactional id, producer id and epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnProducer {
    pub transactional_id: String,
    pub producer_id: i64,
    pub epoch: i16,
}

/// InitProducerId for `transactional_id`: (error code, producer). A first call names no
/// producer; `current` (KIP-360, v3+) names the id and epoch the caller already holds.
pub async fn init_producer_id<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    transactional_id: &str,
    transaction_timeout_ms: i32,
    current: Option<(i64, i16)>,
) -> Result<(i16, TxnProducer)> {
    let (pid, epoch) = current.unwrap_or((-1, -1));
    let req = InitProducerIdRequest::default()
        .with_transactional_id(Some(TransactionalId(s(transactional_id))))
        .with_transaction_timeout_ms(transaction_timeout_ms)
        .with_producer_id(ProducerId(pid))
        .with_producer_epoch(epoch);
    let v = c
        .versions()
        .pick_in::<InitProducerIdRequest>(0, INIT_PRODUCER_ID_MAX)?;
    let r = c.call_at(&req, v).await.context("InitProducerId")?;
    Ok((
        r.error_code,
        TxnProducer {
            transactional_id: transactional_id.to_string(),
            producer_id: r.producer_id.0,
            epoch: r.producer_epoch,
        },
    ))
}

/// AddPartitionsToTxn of `partitions` of `topic`: the first error code of a partition (NONE if
/// all were added).
pub async fn add_partitions<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    p: &TxnProducer,
    topic: &str,
    partitions: &[i32],
) -> Result<i16> {
    let req = AddPartitionsToTxnRequest::default()
        .with_v3_and_below_transactional_id(TransactionalId(s(&p.transactional_id)))
        .with_v3_and_below_producer_id(ProducerId(p.producer_id))
        .with_v3_and_below_producer_epoch(p.epoch)
        .with_v3_and_below_topics(vec![AddPartitionsToTxnTopic::default()
            .with_name(TopicName(s(topic)))
            .with_partitions(partitions.to_vec())]);
    let v = c
        .versions()
        .pick_in::<AddPartitionsToTxnRequest>(0, ADD_PARTITIONS_TO_TXN_MAX)?;
    let r = c.call_at(&req, v).await.context("AddPartitionsToTxn")?;
    if r.error_code != code::NONE {
        return Ok(r.error_code);
    }
    let mut answered = 0;
    for t in &r.results_by_topic_v3_and_below {
        for q in &t.results_by_partition {
            answered += 1;
            if q.partition_error_code != code::NONE {
                return Ok(q.partition_error_code);
            }
        }
    }
    if answered < partitions.len() {
        anyhow::bail!(
            "AddPartitionsToTxn answered {answered} of {} partitions",
            partitions.len()
        );
    }
    Ok(code::NONE)
}

/// AddOffsetsToTxn: adds `group`'s offsets partition to the transaction; the error code.
pub async fn add_offsets<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    p: &TxnProducer,
    group: &str,
) -> Result<i16> {
    let req = AddOffsetsToTxnRequest::default()
        .with_transactional_id(TransactionalId(s(&p.transactional_id)))
        .with_producer_id(ProducerId(p.producer_id))
        .with_producer_epoch(p.epoch)
        .with_group_id(GroupId(s(group)));
    let v = c
        .versions()
        .pick_in::<AddOffsetsToTxnRequest>(0, ADD_OFFSETS_TO_TXN_MAX)?;
    Ok(c.call_at(&req, v)
        .await
        .context("AddOffsetsToTxn")?
        .error_code)
}

/// The group member whose consumption a transaction commits (KIP-447: from TxnOffsetCommit v3
/// the group coordinator checks it as it checks an OffsetCommit).
#[derive(Debug, Clone, Copy)]
pub struct GroupMember<'a> {
    pub group: &'a str,
    pub generation: i32,
    pub member_id: &'a str,
}

/// TxnOffsetCommit (sent to the group's coordinator) of `(partition, next offset)` pairs of
/// `topic`: the first error code of a partition (NONE if all were accepted).
pub async fn txn_offset_commit<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    p: &TxnProducer,
    m: GroupMember<'_>,
    topic: &str,
    offsets: impl IntoIterator<Item = (i32, i64)>,
) -> Result<i16> {
    let req = TxnOffsetCommitRequest::default()
        .with_transactional_id(TransactionalId(s(&p.transactional_id)))
        .with_group_id(GroupId(s(m.group)))
        .with_producer_id(ProducerId(p.producer_id))
        .with_producer_epoch(p.epoch)
        .with_generation_id(m.generation)
        .with_member_id(s(m.member_id))
        .with_topics(vec![TxnOffsetCommitRequestTopic::default()
            .with_name(TopicName(s(topic)))
            .with_partitions(
                offsets
                    .into_iter()
                    .map(|(q, o)| {
                        TxnOffsetCommitRequestPartition::default()
                            .with_partition_index(q)
                            .with_committed_offset(o)
                            .with_committed_leader_epoch(-1)
                    })
                    .collect(),
            )]);
    let v = c
        .versions()
        .pick_in::<TxnOffsetCommitRequest>(0, TXN_OFFSET_COMMIT_MAX)?;
    let r = c.call_at(&req, v).await.context("TxnOffsetCommit")?;
    Ok(r.topics
        .iter()
        .flat_map(|t| t.partitions.iter())
        .map(|q| q.error_code)
        .find(|&e| e != code::NONE)
        .unwrap_or(code::NONE))
}

/// EndTxn: commits (`commit`) or aborts the open transaction; the error code.
pub async fn end_txn<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    p: &TxnProducer,
    commit: bool,
) -> Result<i16> {
    let req = EndTxnRequest::default()
        .with_transactional_id(TransactionalId(s(&p.transactional_id)))
        .with_producer_id(ProducerId(p.producer_id))
        .with_producer_epoch(p.epoch)
        .with_committed(commit);
    let v = c.versions().pick_in::<EndTxnRequest>(0, END_TXN_MAX)?;
    Ok(c.call_at(&req, v).await.context("EndTxn")?.error_code)
}

/// Whether a transactional call answered `code` should be sent again after a back-off
/// (the coordinator is busy with this id or still loading).
pub fn retriable(code: i16) -> bool {
    matches!(
        code,
        code::CONCURRENT_TRANSACTIONS
            | code::COORDINATOR_LOAD_IN_PROGRESS
            | code::COORDINATOR_NOT_AVAILABLE
            | code::NOT_COORDINATOR
    )
}
