//! ShareAcknowledge, versions 1-2 (KIP-932; always flexible): Accept (1), Release (2), Reject
//! (3) and Gap (0) per offset range, and from version 2 Renew (4, KIP-1222: the lock is
//! extended, no delivery counted; `IsRenewAck` is a hint the broker does not need), applied on
//! each partition's share partition and persisted before the answer; version 2 answers the
//! acquisition lock duration too. Needs an open share session (epoch 0 is INVALID_SHARE_SESSION_EPOCH);
//! epoch -1 closes it after the acknowledgements and releases what the member still holds.
//! Errors per partition: INVALID_RECORD_STATE for records not acquired by the member,
//! INVALID_REQUEST for malformed ranges.

use std::collections::BTreeMap;

use bytes::Bytes;
use kafka_protocol::messages::share_acknowledge_response::{
    LeaderIdAndEpoch, PartitionData, ShareAcknowledgeTopicResponse,
};
use kafka_protocol::messages::{ShareAcknowledgeRequest, ShareAcknowledgeResponse};
use kafka_protocol::ResponseError;

use super::common::{code, str_bytes, with_partition};
use super::share_common;
use super::share_sessions::{self, ack_ranges, release_all, renew_refused, AckBudget, SessionKey};
use crate::group::share_state::{self, FetchPart, StateKey};
use crate::kafka::{Request, Response};
use crate::types::ErrorCode;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: ShareAcknowledgeRequest = crate::decode_or_close!(req, b);
    let fail = |c: ErrorCode, msg: Option<&str>| {
        req.respond(
            &ShareAcknowledgeResponse::default()
                .with_error_code(req.error_code(c))
                .with_error_message(msg.map(str_bytes)),
        )
    };
    let (group, member) =
        match share_common::admit(request.group_id.as_deref(), request.member_id.as_ref()) {
            Ok(ids) => ids,
            Err((c, msg)) => return fail(c, msg),
        };
    let epoch = request.share_session_epoch;
    if epoch == 0 {
        return fail(code(ResponseError::InvalidShareSessionEpoch), None);
    }
    let key = SessionKey {
        group: group.clone(),
        member: member.clone(),
    };
    let opened = match share_sessions::open_or_advance(&key, epoch, &[], &[]).await {
        Ok(o) => o,
        Err(c) => return fail(c, None),
    };
    let node = crate::shard::local().broker.config.node_id;
    let mut by_topic: BTreeMap<[u8; 16], Vec<PartitionData>> = BTreeMap::new();
    let mut budget = AckBudget::default();
    for t in &request.topics {
        let id = *t.topic_id.as_bytes();
        let meta = share_state::topic_by_id(&id);
        for p in &t.partitions {
            let acks = ack_ranges(
                p.acknowledgement_batches
                    .iter()
                    .map(|a| (a.first_offset, a.last_offset, &a.acknowledge_types)),
            );
            let error = match &meta {
                None => code(ResponseError::UnknownTopicId),
                Some(_) if renew_refused(req.version, &acks) || !budget.take(&acks) => {
                    code(ResponseError::InvalidRequest)
                }
                Some(meta) => {
                    let part = FetchPart {
                        key: StateKey {
                            group: group.clone(),
                            topic: id,
                            partition: p.partition_index,
                        },
                        member: member.clone(),
                        settings: opened.settings,
                        acks,
                        max_records: 0,
                        bytes_max: 0,
                    };
                    match with_partition(meta, p.partition_index, move |log| {
                        share_state::fetch_here(log, part)
                    })
                    .await
                    {
                        Ok(r) => r.ack_error.unwrap_or(r.error),
                        Err(c) => c,
                    }
                }
            };
            by_topic.entry(id).or_default().push(
                PartitionData::default()
                    .with_partition_index(p.partition_index)
                    .with_error_code(req.error_code(error))
                    .with_current_leader(
                        LeaderIdAndEpoch::default()
                            .with_leader_id(node)
                            .with_leader_epoch(0),
                    ),
            );
        }
    }
    if opened.closing {
        release_all(&group, &member, &opened.partitions).await;
    }
    req.respond(
        &ShareAcknowledgeResponse::default()
            .with_acquisition_lock_timeout_ms(
                opened.settings.lock_duration_ms.min(i32::MAX as i64) as i32
            )
            .with_responses(
                by_topic
                    .into_iter()
                    .map(|(t, ps)| {
                        ShareAcknowledgeTopicResponse::default()
                            .with_topic_id(uuid::Uuid::from_bytes(t))
                            .with_partitions(ps)
                    })
                    .collect(),
            ),
    )
}
