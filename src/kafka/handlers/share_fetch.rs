//! ShareFetch, versions 1-2 (KIP-932; always flexible; version 2 adds `ShareAcquireMode` and
//! Renew acknowledgements, KIP-1206 and KIP-1222): acknowledges what the request carries, then
//! acquires records for the member on each partition's share partition (on the partition's
//! owner shard, [`crate::group::share_state`]), and long-polls like Fetch when nothing could be
//! acquired. Each partition answers its batches (whole, as stored) and the `acquired_records`
//! ranges with their delivery counts; the client delivers only those offsets.
//!
//! Share sessions (KIP-932): epoch 0 opens one with the partitions named (replacing the
//! member's previous session, whose acquired records are released), later requests carry the
//! next epoch and name partitions to add (`forgotten_topics_data` removes), epoch -1 closes it
//! after applying its acknowledgements (nothing is fetched) and releases what the member still
//! holds. An unknown session is SHARE_SESSION_NOT_FOUND, a wrong epoch
//! INVALID_SHARE_SESSION_EPOCH. Sessions live on the shard of the member's connection.
//!
//! A v2 request with `IsRenewAck` only acknowledges (Renew extends the locks of records the
//! member holds): it fetches and waits for nothing, and its fetch parameters must be zero.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::share_fetch_response::{
    AcquiredRecords, LeaderIdAndEpoch, PartitionData, ShareFetchableTopicResponse,
};
use kafka_protocol::messages::{ShareFetchRequest, ShareFetchResponse};
use kafka_protocol::ResponseError;

use super::common::{code, str_bytes, with_partition};
use super::share_common;
use super::share_sessions::{
    self, ack_ranges, release_all, renew_refused, AckBudget, Opened, SessionKey,
};
use crate::group::share_partition::AckRange;
use crate::group::share_state::{self, FetchPart, FetchPartResult, StateKey};
use crate::kafka::{Request, Response};
use crate::shard;
use crate::types::{ErrorCode, TopicPartition};

/// Kafka's `fetch.max.bytes`: the most record bytes one response carries.
const SHARE_FETCH_BYTES_MAX: usize = 57_671_680;
/// Most records one ShareFetch acquires (a client asking for more gets this many).
const SHARE_FETCH_RECORDS_MAX: usize = 10_000;
/// Records acquired when the request asks for none (`max_records` 0 or less), as Kafka's
/// default `max.poll.records`.
const SHARE_FETCH_RECORDS_DEFAULT: usize = 500;
/// `ShareAcquireMode` (v2, KIP-1206): batch-optimized (0) may acquire past `max_records` to
/// end on a batch boundary, record-limit (1) never does. Sluice acquires at most
/// `max_records` in both: what a batch-optimized consumer accepts as well.
const ACQUIRE_MODES: [i8; 2] = [0, 1];

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: ShareFetchRequest = crate::decode_or_close!(req, b);
    let fail = |c: ErrorCode, msg: Option<&str>| {
        req.respond(
            &ShareFetchResponse::default()
                .with_error_code(req.error_code(c))
                .with_error_message(msg.map(str_bytes)),
        )
    };
    let (group, member) =
        match share_common::admit(request.group_id.as_deref(), request.member_id.as_ref()) {
            Ok(ids) => ids,
            Err((c, msg)) => return fail(c, msg),
        };
    if !ACQUIRE_MODES.contains(&request.share_acquire_mode) {
        return fail(
            code(ResponseError::InvalidRequest),
            Some("unknown share acquire mode"),
        );
    }
    // A renew-only ShareFetch (v2, KIP-1222) acknowledges and fetches nothing: its fetch
    // parameters must all be zero.
    if request.is_renew_ack
        && (request.max_bytes != 0
            || request.min_bytes != 0
            || request.max_records != 0
            || request.max_wait_ms != 0)
    {
        return fail(
            code(ResponseError::InvalidRequest),
            Some("a renew acknowledgement fetches nothing: max wait, min and max bytes and max records must be 0"),
        );
    }
    let epoch = request.share_session_epoch;
    // Acknowledgements by partition, and the partitions the request names.
    let mut acks: BTreeMap<([u8; 16], i32), Vec<AckRange>> = BTreeMap::new();
    let mut named: Vec<([u8; 16], i32)> = vec![];
    for t in &request.topics {
        let id = *t.topic_id.as_bytes();
        for p in &t.partitions {
            named.push((id, p.partition_index));
            if !p.acknowledgement_batches.is_empty() {
                acks.entry((id, p.partition_index))
                    .or_default()
                    .extend(ack_ranges(
                        p.acknowledgement_batches
                            .iter()
                            .map(|a| (a.first_offset, a.last_offset, &a.acknowledge_types)),
                    ));
            }
        }
    }
    if epoch == 0 && !acks.is_empty() {
        return fail(
            code(ResponseError::InvalidRequest),
            Some("acknowledgements are not allowed when opening a share session"),
        );
    }
    let forgotten: Vec<([u8; 16], i32)> = request
        .forgotten_topics_data
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(move |p| (*t.topic_id.as_bytes(), *p))
        })
        .collect();
    let key = SessionKey {
        group: group.clone(),
        member: member.clone(),
    };
    let opened = match share_sessions::open_or_advance(&key, epoch, &named, &forgotten).await {
        Ok(o) => o,
        Err(c) => return fail(c, None),
    };
    let Opened {
        partitions,
        settings,
        closing,
        released,
    } = opened;
    // Records a replaced session or forgotten partitions held go back to the group.
    release_all(&group, &member, &released).await;
    let max_records = if closing || request.is_renew_ack {
        0
    } else if request.max_records <= 0 {
        SHARE_FETCH_RECORDS_DEFAULT
    } else {
        (request.max_records as usize).min(SHARE_FETCH_RECORDS_MAX)
    };
    let mut budget = if request.max_bytes <= 0 {
        SHARE_FETCH_BYTES_MAX
    } else {
        (request.max_bytes as usize).min(SHARE_FETCH_BYTES_MAX)
    };
    // Partitions to visit: the session's, plus any acknowledged outside it (acks for a partition
    // the session no longer has still reach its share partition).
    let mut visit: Vec<([u8; 16], i32)> = partitions.clone();
    for k in acks.keys() {
        if !visit.contains(k) {
            visit.push(*k);
        }
    }
    let clock = shard::local().clock.clone();
    let started = clock.now_ms();
    let max_wait = request.max_wait_ms.max(0) as i64;
    let mut results: BTreeMap<([u8; 16], i32), FetchPartResult> = BTreeMap::new();
    // Partitions whose acknowledgements go past the request's budget, or carry Renew before
    // v2: refused, not applied.
    let mut ack_budget = AckBudget::default();
    acks.retain(|tp, ranges| {
        let fits = !renew_refused(req.version, ranges) && ack_budget.take(ranges);
        if !fits {
            results.entry(*tp).or_default().ack_error = Some(code(ResponseError::InvalidRequest));
        }
        fits
    });
    let mut left = max_records;
    loop {
        let mut waits: Vec<(
            TopicPartition,
            shard_target::Target,
            Option<i64>,
            Option<i64>,
        )> = vec![];
        for tp in &visit {
            let part_acks = acks.remove(tp).unwrap_or_default();
            let want = if partitions.contains(tp) { left } else { 0 };
            if want == 0 && part_acks.is_empty() {
                continue;
            }
            let Some(meta) = share_state::topic_by_id(&tp.0) else {
                results.entry(*tp).or_default().error = code(ResponseError::UnknownTopicId);
                continue;
            };
            let part = FetchPart {
                key: StateKey {
                    group: group.clone(),
                    topic: tp.0,
                    partition: tp.1,
                },
                member: member.clone(),
                settings,
                acks: part_acks,
                max_records: want,
                bytes_max: budget.min(u32::MAX as usize) as u32,
            };
            let had_acks = !part.acks.is_empty();
            let r =
                with_partition(&meta, tp.1, move |log| share_state::fetch_here(log, part)).await;
            let r = match r {
                Ok(r) => r,
                Err(c) => FetchPartResult {
                    error: c,
                    ack_error: had_acks.then_some(c),
                    ..Default::default()
                },
            };
            left = left.saturating_sub(r.acquired);
            let bytes: usize = r.batches.iter().map(|b| b.len()).sum();
            budget = budget.saturating_sub(bytes);
            if let Some(owner) = shard::local().broker.owner(&meta, tp.1) {
                waits.push((
                    TopicPartition::new(meta.name.clone(), tp.1),
                    shard_target::Target(owner),
                    r.window_open.then_some(r.end),
                    r.deadline_ms,
                ));
            }
            merge(results.entry(*tp).or_default(), r);
        }
        let got = left < max_records;
        let remaining = started + max_wait - clock.now_ms();
        if closing || got || remaining <= 0 || budget == 0 || waits.is_empty() {
            break;
        }
        wait_any(waits, Duration::from_millis(remaining as u64)).await;
    }
    if closing {
        release_all(&group, &member, &partitions).await;
    }
    let node = shard::local().broker.config.node_id;
    let mut by_topic: BTreeMap<[u8; 16], Vec<PartitionData>> = BTreeMap::new();
    for ((t, p), r) in results {
        // Empty rather than null: clients read the field as bytes (Kafka sends empty records).
        let records = match r.batches.len() {
            0 => Some(Bytes::new()),
            1 => Some(r.batches[0].clone()),
            _ => {
                let mut all = BytesMut::with_capacity(r.batches.iter().map(|b| b.len()).sum());
                for b in &r.batches {
                    all.extend_from_slice(b);
                }
                Some(all.freeze())
            }
        };
        by_topic.entry(t).or_default().push(
            PartitionData::default()
                .with_partition_index(p)
                .with_error_code(req.error_code(r.error))
                .with_acknowledge_error_code(req.error_code(r.ack_error.unwrap_or(ErrorCode::NONE)))
                .with_current_leader(
                    LeaderIdAndEpoch::default()
                        .with_leader_id(node)
                        .with_leader_epoch(0),
                )
                .with_records(records)
                .with_acquired_records(
                    r.ranges
                        .iter()
                        .map(|(f, l, c)| {
                            AcquiredRecords::default()
                                .with_first_offset(*f)
                                .with_last_offset(*l)
                                .with_delivery_count(*c)
                        })
                        .collect(),
                ),
        );
    }
    req.respond(
        &ShareFetchResponse::default()
            .with_acquisition_lock_timeout_ms(settings.lock_duration_ms.min(i32::MAX as i64) as i32)
            .with_responses(
                by_topic
                    .into_iter()
                    .map(|(t, ps)| {
                        ShareFetchableTopicResponse::default()
                            .with_topic_id(uuid::Uuid::from_bytes(t))
                            .with_partitions(ps)
                    })
                    .collect(),
            ),
    )
}

mod shard_target {
    /// The owner shard of a partition a fetch waits on.
    pub struct Target(pub crate::types::ShardId);
}

/// Adds a later pass's result to a partition's answer.
fn merge(into: &mut FetchPartResult, r: FetchPartResult) {
    if r.error != ErrorCode::NONE {
        into.error = r.error;
    }
    if r.ack_error.is_some() {
        into.ack_error = r.ack_error;
    }
    into.ranges.extend(r.ranges);
    into.batches.extend(r.batches);
    into.acquired += r.acquired;
}

/// Waits until any of `waits` may have something to acquire (an append past its end, a lock
/// expiring) or `remaining` passes. One waiter per partition on its owner shard; all end when
/// this returns.
async fn wait_any(
    waits: Vec<(
        TopicPartition,
        shard_target::Target,
        Option<i64>,
        Option<i64>,
    )>,
    remaining: Duration,
) {
    let (tx, rx) = async_channel::unbounded::<()>();
    let (done_tx, done_rx) = async_channel::bounded::<()>(1);
    for (tp, owner, end, deadline) in waits {
        let (tx, done_rx) = (tx.clone(), done_rx.clone());
        glommio::spawn_local(async move {
            let _ = shard::contain(shard::invoke_on(owner.0, move || {
                share_state::wait_here(tp, end, deadline, remaining, done_rx)
            }))
            .await;
            let _ = tx.try_send(());
        })
        .detach();
    }
    drop((tx, done_rx));
    futures_lite::future::or(
        async {
            let _ = rx.recv().await;
        },
        shard::local().clock.sleep(remaining),
    )
    .await;
    drop(done_tx);
}
