//! KIP-932 share groups over raw frames, for what the ShareConsumer cannot drive: the advertised
//! versions, membership and the simple assignment, share-session epochs, acknowledgements of
//! records a member does not hold, the offset admin APIs and group configs. The end-to-end
//! behaviour with the real client is in tests/python/test_share_groups.py.

mod common;

use std::time::Duration;

use common::{topic_name, Broker, Client};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

const WAIT_MAX: Duration = Duration::from_secs(60);

fn s(x: &str) -> StrBytes {
    StrBytes::from_string(x.to_string())
}

fn err(e: ResponseError) -> i16 {
    e.code()
}

fn broker() -> Broker {
    Broker::options()
        .cores(2)
        .args([
            "--group-share-heartbeat-interval-ms",
            "500",
            "--group-share-session-timeout-ms",
            "6000",
        ])
        .start()
}

fn heartbeat(c: &mut Client, req: ShareGroupHeartbeatRequest) -> ShareGroupHeartbeatResponse {
    c.call_at(ApiKey::ShareGroupHeartbeat, 1, &req)
        .expect("heartbeat")
}

fn join(group: &str, member: &str, topic: &str) -> ShareGroupHeartbeatRequest {
    ShareGroupHeartbeatRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_member_id(s(member))
        .with_member_epoch(0)
        .with_subscribed_topic_names(Some(vec![TopicName(s(topic))]))
}

fn topic_id(c: &mut Client, topic: &str) -> uuid::Uuid {
    let r: MetadataResponse = c
        .call_at(
            ApiKey::Metadata,
            12,
            &MetadataRequest::default()
                .with_topics(Some(vec![metadata_request::MetadataRequestTopic::default(
                )
                .with_name(Some(TopicName(s(topic))))])),
        )
        .expect("metadata");
    r.topics[0].topic_id
}

/// A v1 ShareFetch of partition 0 (five records, 200 ms wait) with `acks`.
fn fetch(
    c: &mut Client,
    group: &str,
    member: &str,
    epoch: i32,
    topic: uuid::Uuid,
    acks: &[(i64, i64, i8)],
) -> ShareFetchResponse {
    fetch_at(c, 1, (group, member, epoch), topic, acks, false, 5, 200)
}

/// A v1 ShareAcknowledge of one range of partition 0.
fn acknowledge(
    c: &mut Client,
    group: &str,
    member: &str,
    epoch: i32,
    topic: uuid::Uuid,
    range: (i64, i64, i8),
) -> ShareAcknowledgeResponse {
    acknowledge_ranges(c, group, member, epoch, topic, 1, &[range])
}

/// A broker with a topic of one partition holding `records` records, and a share group on it
/// starting at the earliest offset: (broker, client, topic, group, topic id).
fn share_setup(prefix: &str, records: usize) -> (Broker, Client, String, String, uuid::Uuid) {
    let b = broker();
    let topic = topic_name(prefix);
    b.create_topic(&topic, 1);
    b.produce_to_partitions(&topic, 1, records, "r");
    let group = format!("g-{topic}");
    let mut c = Client::connect(&b.bootstrap()).expect("connect");
    c.wait_coordinator(&group, WAIT_MAX);
    assert_eq!(
        set_group_config(&mut c, &group, "share.auto.offset.reset", "earliest"),
        0
    );
    let id = topic_id(&mut c, &topic);
    (b, c, topic, group, id)
}

fn describe_offsets(c: &mut Client, group: &str, topic: &str) -> DescribeShareGroupOffsetsResponse {
    use describe_share_group_offsets_request::*;
    c.call_at(
        ApiKey::DescribeShareGroupOffsets,
        1,
        &DescribeShareGroupOffsetsRequest::default().with_groups(vec![
            DescribeShareGroupOffsetsRequestGroup::default()
                .with_group_id(GroupId(s(group)))
                .with_topics(Some(vec![DescribeShareGroupOffsetsRequestTopic::default()
                    .with_topic_name(TopicName(s(topic)))
                    .with_partitions(vec![0])])),
        ]),
    )
    .expect("describe offsets")
}

fn set_group_config(c: &mut Client, group: &str, key: &str, value: &str) -> i16 {
    c.alter_group_config(group, key, Some(value))
}

#[test]
fn share_apis_are_advertised_at_the_versions_served() {
    let b = Broker::start();
    let mut c = Client::connect(&b.bootstrap()).expect("connect");
    let v: ApiVersionsResponse = c
        .call_at(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default())
        .expect("api versions");
    for (key, lo, hi) in [
        (ApiKey::ShareGroupHeartbeat, 1, 1),
        (ApiKey::ShareGroupDescribe, 1, 1),
        (ApiKey::ShareFetch, 1, 2),
        (ApiKey::ShareAcknowledge, 1, 2),
        (ApiKey::DescribeShareGroupOffsets, 0, 1),
        (ApiKey::AlterShareGroupOffsets, 0, 0),
        (ApiKey::DeleteShareGroupOffsets, 0, 0),
    ] {
        let k = v
            .api_keys
            .iter()
            .find(|k| k.api_key == key as i16)
            .unwrap_or_else(|| panic!("{key:?} not advertised"));
        assert_eq!((k.min_version, k.max_version), (lo, hi), "{key:?}");
    }
}

#[test]
fn members_share_partitions_sessions_check_epochs_and_acks_check_ownership() {
    let (_b, mut c, topic, group, id) = share_setup("share-raw", 10);
    assert_eq!(
        set_group_config(&mut c, &group, "share.auto.offset.reset", "sometimes"),
        err(ResponseError::InvalidConfig)
    );

    // Two members of one partition both get it (the simple assignment shares it).
    let a = heartbeat(&mut c, join(&group, "member-a", &topic));
    assert_eq!(a.error_code, 0, "{:?}", a.error_message);
    let bm = heartbeat(&mut c, join(&group, "member-b", &topic));
    assert_eq!(bm.error_code, 0);
    let parts = |r: &ShareGroupHeartbeatResponse| -> Vec<i32> {
        r.assignment
            .as_ref()
            .map(|a| {
                a.topic_partitions
                    .iter()
                    .flat_map(|t| t.partitions.clone())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(parts(&bm), vec![0]);
    let a2 = heartbeat(
        &mut c,
        ShareGroupHeartbeatRequest::default()
            .with_group_id(GroupId(s(&group)))
            .with_member_id(s("member-a"))
            .with_member_epoch(a.member_epoch),
    );
    assert_eq!(a2.error_code, 0);
    assert_eq!(parts(&a2), vec![0]);
    assert_eq!(a2.member_epoch, bm.member_epoch);
    // A stale epoch is fenced.
    let fenced = heartbeat(
        &mut c,
        ShareGroupHeartbeatRequest::default()
            .with_group_id(GroupId(s(&group)))
            .with_member_id(s("member-a"))
            .with_member_epoch(a2.member_epoch + 5),
    );
    assert_eq!(fenced.error_code, err(ResponseError::FencedMemberEpoch));

    // Described, listed with type "share".
    let d: ShareGroupDescribeResponse = c
        .call_at(
            ApiKey::ShareGroupDescribe,
            1,
            &ShareGroupDescribeRequest::default().with_group_ids(vec![GroupId(s(&group))]),
        )
        .expect("describe");
    assert_eq!(d.groups[0].error_code, 0);
    assert_eq!(d.groups[0].members.len(), 2);
    assert_eq!(d.groups[0].group_state.as_str(), "Stable");
    let l: ListGroupsResponse = c
        .call_at(
            ApiKey::ListGroups,
            5,
            &ListGroupsRequest::default().with_types_filter(vec![s("share")]),
        )
        .expect("list");
    assert!(l
        .groups
        .iter()
        .any(|g| g.group_id.as_str() == group && g.group_type.as_str() == "share"));

    // Share sessions: an unknown session, then epoch 0 opens one.
    let r = fetch(&mut c, &group, "member-a", 1, id, &[]);
    assert_eq!(r.error_code, err(ResponseError::ShareSessionNotFound));
    let r = fetch(&mut c, &group, "member-a", 0, id, &[]);
    assert_eq!(r.error_code, 0);
    let p = &r.responses[0].partitions[0];
    assert_eq!(p.acquired_records.len(), 1);
    let got = &p.acquired_records[0];
    assert_eq!(
        (got.first_offset, got.last_offset, got.delivery_count),
        (0, 4, 1)
    );
    assert!(p.records.as_ref().is_some_and(|r| !r.is_empty()));
    // b gets the next five, never a's.
    let rb = fetch(&mut c, &group, "member-b", 0, id, &[]);
    let gb = &rb.responses[0].partitions[0].acquired_records[0];
    assert_eq!((gb.first_offset, gb.last_offset), (5, 9));
    // A wrong epoch; then b acknowledging a's records is INVALID_RECORD_STATE.
    let r = fetch(&mut c, &group, "member-a", 7, id, &[]);
    assert_eq!(r.error_code, err(ResponseError::InvalidShareSessionEpoch));
    let r = acknowledge(&mut c, &group, "member-b", 1, id, (0, 4, 1));
    assert_eq!(
        r.responses[0].partitions[0].error_code,
        err(ResponseError::InvalidRecordState)
    );
    // ShareAcknowledge cannot open a session.
    let r = acknowledge(&mut c, &group, "member-a", 0, id, (0, 4, 1));
    assert_eq!(r.error_code, err(ResponseError::InvalidShareSessionEpoch));
    // a accepts its records (piggy-backed on a fetch), b rejects its own.
    let r = fetch(&mut c, &group, "member-a", 1, id, &[(0, 4, 1)]);
    assert_eq!(r.error_code, 0);
    assert_eq!(r.responses[0].partitions[0].acknowledge_error_code, 0);
    let r = acknowledge(&mut c, &group, "member-b", 2, id, (5, 9, 3));
    assert_eq!(r.responses[0].partitions[0].error_code, 0);
    let o = describe_offsets(&mut c, &group, &topic);
    let p = &o.groups[0].topics[0].partitions[0];
    assert_eq!((p.start_offset, p.lag), (10, 0));

    // Offsets of a group with members cannot be altered; once both left, they can.
    let alter = |c: &mut Client, offset: i64| -> AlterShareGroupOffsetsResponse {
        use alter_share_group_offsets_request::*;
        c.call_at(
            ApiKey::AlterShareGroupOffsets,
            0,
            &AlterShareGroupOffsetsRequest::default()
                .with_group_id(GroupId(s(&group)))
                .with_topics(vec![AlterShareGroupOffsetsRequestTopic::default()
                    .with_topic_name(TopicName(s(&topic)))
                    .with_partitions(vec![
                        AlterShareGroupOffsetsRequestPartition::default()
                            .with_partition_index(0)
                            .with_start_offset(offset),
                    ])]),
        )
        .expect("alter offsets")
    };
    assert_eq!(
        alter(&mut c, 3).error_code,
        err(ResponseError::NonEmptyGroup)
    );
    for m in ["member-a", "member-b"] {
        let r = heartbeat(
            &mut c,
            ShareGroupHeartbeatRequest::default()
                .with_group_id(GroupId(s(&group)))
                .with_member_id(s(m))
                .with_member_epoch(-1),
        );
        assert_eq!((r.error_code, r.member_epoch), (0, -1));
    }
    let r = alter(&mut c, 3);
    assert_eq!(r.error_code, 0);
    assert_eq!(r.responses[0].partitions[0].error_code, 0);
    let o = describe_offsets(&mut c, &group, &topic);
    let p = &o.groups[0].topics[0].partitions[0];
    assert_eq!((p.start_offset, p.lag), (3, 7));
    let del: DeleteShareGroupOffsetsResponse = c
        .call_at(
            ApiKey::DeleteShareGroupOffsets,
            0,
            &DeleteShareGroupOffsetsRequest::default()
                .with_group_id(GroupId(s(&group)))
                .with_topics(vec![
                    delete_share_group_offsets_request::DeleteShareGroupOffsetsRequestTopic::default()
                        .with_topic_name(TopicName(s(&topic))),
                ]),
        )
        .expect("delete offsets");
    assert_eq!((del.error_code, del.responses[0].error_code), (0, 0));
    let o = describe_offsets(&mut c, &group, &topic);
    let p = &o.groups[0].topics[0].partitions[0];
    assert_eq!((p.start_offset, p.lag), (-1, -1));
    // An empty share group can be deleted; then it is unknown.
    let d: DeleteGroupsResponse = c
        .call_at(
            ApiKey::DeleteGroups,
            2,
            &DeleteGroupsRequest::default().with_groups_names(vec![GroupId(s(&group))]),
        )
        .expect("delete groups");
    assert_eq!(d.results[0].error_code, 0);
    let d: ShareGroupDescribeResponse = c
        .call_at(
            ApiKey::ShareGroupDescribe,
            1,
            &ShareGroupDescribeRequest::default().with_group_ids(vec![GroupId(s(&group))]),
        )
        .expect("describe");
    assert_eq!(d.groups[0].error_code, err(ResponseError::GroupIdNotFound));
}

/// A ShareAcknowledge of partition 0 carrying `partitions` entries, each with `ranges`.
fn acknowledge_ranges(
    c: &mut Client,
    group: &str,
    member: &str,
    epoch: i32,
    topic: uuid::Uuid,
    partitions: usize,
    ranges: &[(i64, i64, i8)],
) -> ShareAcknowledgeResponse {
    use share_acknowledge_request::{AcknowledgePartition, AcknowledgeTopic, AcknowledgementBatch};
    let batches: Vec<AcknowledgementBatch> = ranges
        .iter()
        .map(|(f, l, t)| {
            AcknowledgementBatch::default()
                .with_first_offset(*f)
                .with_last_offset(*l)
                .with_acknowledge_types(vec![*t])
        })
        .collect();
    c.call_at(
        ApiKey::ShareAcknowledge,
        1,
        &ShareAcknowledgeRequest::default()
            .with_group_id(Some(GroupId(s(group))))
            .with_member_id(Some(s(member)))
            .with_share_session_epoch(epoch)
            .with_topics(vec![AcknowledgeTopic::default()
                .with_topic_id(topic)
                .with_partitions(
                    (0..partitions)
                        .map(|_| {
                            AcknowledgePartition::default()
                                .with_partition_index(0)
                                .with_acknowledgement_batches(batches.clone())
                        })
                        .collect(),
                )]),
    )
    .expect("share acknowledge")
}

#[test]
fn acknowledgement_work_is_bounded_overlaps_and_excess_are_invalid_requests() {
    let (_b, mut c, topic, group, id) = share_setup("share-ackwork", 10);
    assert_eq!(
        heartbeat(&mut c, join(&group, "member-a", &topic)).error_code,
        0
    );
    let r = fetch(&mut c, &group, "member-a", 0, id, &[]);
    let got = &r.responses[0].partitions[0].acquired_records[0];
    assert_eq!((got.first_offset, got.last_offset), (0, 4));
    let codes = |r: &ShareAcknowledgeResponse| -> Vec<i16> {
        assert_eq!(r.error_code, 0);
        r.responses[0]
            .partitions
            .iter()
            .map(|p| p.error_code)
            .collect()
    };
    let invalid = err(ResponseError::InvalidRequest);
    let state = err(ResponseError::InvalidRecordState);

    // Overlapping ranges (tens of thousands over the same held records), a shared offset, and
    // ranges out of order are refused whole: INVALID_REQUEST, nothing applied.
    let many: Vec<(i64, i64, i8)> = (0..20_000).map(|_| (0, 4, 1)).collect();
    let shared: &[(i64, i64, i8)] = &[(0, 2, 1), (2, 4, 1)];
    let unordered: &[(i64, i64, i8)] = &[(3, 4, 1), (0, 1, 1)];
    for (epoch, bad) in [(1, many.as_slice()), (2, shared), (3, unordered)] {
        let r = acknowledge_ranges(&mut c, &group, "member-a", epoch, id, 1, bad);
        assert_eq!(codes(&r), vec![invalid], "epoch {epoch}");
    }
    // The same on a piggy-backed acknowledgement.
    let r = fetch(&mut c, &group, "member-a", 4, id, &[(0, 4, 1), (1, 3, 1)]);
    assert_eq!(r.responses[0].partitions[0].acknowledge_error_code, invalid);

    // The offsets one request's acknowledgements cover are bounded: ten partition entries of
    // 10,000 offsets each are checked (and refused: not held), the eleventh is past the budget.
    let r = acknowledge_ranges(&mut c, &group, "member-a", 5, id, 11, &[(0, 9_999, 1)]);
    let mut want = vec![state; 10];
    want.push(invalid);
    assert_eq!(codes(&r), want);
    // One range wider than the budget is refused without being walked.
    let r = acknowledge_ranges(&mut c, &group, "member-a", 6, id, 1, &[(0, i64::MAX, 1)]);
    assert_eq!(codes(&r), vec![invalid]);

    // Nothing of those was applied: the member still holds 0..4 and accepts them, disjoint.
    let r = acknowledge_ranges(
        &mut c,
        &group,
        "member-a",
        7,
        id,
        1,
        &[(0, 1, 1), (2, 4, 1)],
    );
    assert_eq!(codes(&r), vec![0]);
    let o = describe_offsets(&mut c, &group, &topic);
    let p = &o.groups[0].topics[0].partitions[0];
    assert_eq!((p.start_offset, p.lag), (5, 5));
    // The lag (KIP-1226) leaves out records past the start already done with: 7 and 8 accepted
    // while 5, 6 and 9 are still held.
    let r = acknowledge_ranges(&mut c, &group, "member-a", 8, id, 1, &[(7, 8, 1)]);
    assert_eq!(codes(&r), vec![0]);
    let o = describe_offsets(&mut c, &group, &topic);
    let p = &o.groups[0].topics[0].partitions[0];
    assert_eq!((p.start_offset, p.lag), (5, 3));
}

/// A ShareFetch of partition 0 at `version` (the fetch parameters as given).
#[allow(clippy::too_many_arguments)]
fn fetch_at(
    c: &mut Client,
    version: i16,
    (group, member, epoch): (&str, &str, i32),
    topic: uuid::Uuid,
    acks: &[(i64, i64, i8)],
    renew: bool,
    max_records: i32,
    max_wait_ms: i32,
) -> ShareFetchResponse {
    use share_fetch_request::{AcknowledgementBatch, FetchPartition, FetchTopic};
    let max_bytes = if max_records == 0 { 0 } else { 1 << 20 };
    c.call_at(
        ApiKey::ShareFetch,
        version,
        &ShareFetchRequest::default()
            .with_group_id(Some(GroupId(s(group))))
            .with_member_id(Some(s(member)))
            .with_share_session_epoch(epoch)
            .with_max_wait_ms(max_wait_ms)
            .with_min_bytes(if max_records == 0 { 0 } else { 1 })
            .with_max_bytes(max_bytes)
            .with_max_records(max_records)
            .with_batch_size(max_records)
            .with_share_acquire_mode(if version >= 2 { 1 } else { 0 })
            .with_is_renew_ack(renew)
            .with_topics(vec![FetchTopic::default()
                .with_topic_id(topic)
                .with_partitions(vec![FetchPartition::default()
                    .with_partition_index(0)
                    .with_acknowledgement_batches(
                        acks.iter()
                            .map(|(f, l, t)| {
                                AcknowledgementBatch::default()
                                    .with_first_offset(*f)
                                    .with_last_offset(*l)
                                    .with_acknowledge_types(vec![*t])
                            })
                            .collect(),
                    )])]),
    )
    .expect("share fetch")
}

#[test]
fn renew_at_v2_extends_locks_without_counting_a_delivery() {
    use std::time::Instant;
    const LOCK_MS: u64 = 3_000;
    let (_b, mut c, topic, group, id) = share_setup("share-renew", 5);
    assert_eq!(
        set_group_config(&mut c, &group, "share.record.lock.duration.ms", "3000"),
        0
    );
    for m in ["member-a", "member-b"] {
        assert_eq!(heartbeat(&mut c, join(&group, m, &topic)).error_code, 0);
    }
    let invalid = err(ResponseError::InvalidRequest);

    // a acquires all five with a v2 fetch (record-limit mode).
    let r = fetch_at(&mut c, 2, (&group, "member-a", 0), id, &[], false, 5, 1000);
    let acquired_at = Instant::now();
    assert_eq!(r.error_code, 0);
    assert_eq!(r.acquisition_lock_timeout_ms, LOCK_MS as i32);
    let got = &r.responses[0].partitions[0].acquired_records;
    assert_eq!(
        got.iter()
            .map(|a| (a.first_offset, a.last_offset, a.delivery_count))
            .collect::<Vec<_>>(),
        vec![(0, 4, 1)]
    );
    // b opens its session: nothing to acquire.
    let r = fetch_at(&mut c, 2, (&group, "member-b", 0), id, &[], false, 5, 0);
    assert!(r
        .responses
        .iter()
        .all(|t| t.partitions.iter().all(|p| p.acquired_records.is_empty())));

    // What Kafka refuses: Renew before v2, a renew-only fetch asking for records, an unknown
    // acquire mode.
    let r = acknowledge_ranges(&mut c, &group, "member-a", 1, id, 1, &[(0, 4, 4)]);
    assert_eq!(r.responses[0].partitions[0].error_code, invalid);
    let r = fetch_at(
        &mut c,
        1,
        (&group, "member-a", 2),
        id,
        &[(0, 4, 4)],
        false,
        5,
        0,
    );
    assert_eq!(r.responses[0].partitions[0].acknowledge_error_code, invalid);
    let r = fetch_at(
        &mut c,
        2,
        (&group, "member-a", 3),
        id,
        &[(0, 4, 4)],
        true,
        5,
        0,
    );
    assert_eq!(r.error_code, invalid);
    let bad_mode: ShareFetchResponse = c
        .call_at(
            ApiKey::ShareFetch,
            2,
            &ShareFetchRequest::default()
                .with_group_id(Some(GroupId(s(&group))))
                .with_member_id(Some(s("member-a")))
                .with_share_session_epoch(3)
                .with_share_acquire_mode(7),
        )
        .expect("share fetch");
    assert_eq!(bad_mode.error_code, invalid);

    // Halfway through the lock a renews it with a renew-only ShareFetch (nothing fetched).
    std::thread::sleep(Duration::from_millis(LOCK_MS / 2).saturating_sub(acquired_at.elapsed()));
    let renewed_at = Instant::now();
    let r = fetch_at(
        &mut c,
        2,
        (&group, "member-a", 3),
        id,
        &[(0, 4, 4)],
        true,
        0,
        0,
    );
    assert_eq!(r.error_code, 0, "{:?}", r.error_message);
    let p = &r.responses[0].partitions[0];
    assert_eq!(p.acknowledge_error_code, 0);
    assert!(p.acquired_records.is_empty());
    // Past the original lock (and before the renewed one ends) b still finds nothing.
    std::thread::sleep(Duration::from_millis(LOCK_MS + 500).saturating_sub(acquired_at.elapsed()));
    let r = fetch_at(&mut c, 2, (&group, "member-b", 1), id, &[], false, 5, 0);
    assert!(
        renewed_at.elapsed() < Duration::from_millis(LOCK_MS),
        "too slow to observe the renewed lock"
    );
    assert!(r
        .responses
        .iter()
        .all(|t| t.partitions.iter().all(|p| p.acquired_records.is_empty())));
    // ShareAcknowledge v2 renews too, and answers the lock duration.
    let r: ShareAcknowledgeResponse = {
        use share_acknowledge_request::{
            AcknowledgePartition, AcknowledgeTopic, AcknowledgementBatch,
        };
        c.call_at(
            ApiKey::ShareAcknowledge,
            2,
            &ShareAcknowledgeRequest::default()
                .with_group_id(Some(GroupId(s(&group))))
                .with_member_id(Some(s("member-a")))
                .with_share_session_epoch(4)
                .with_is_renew_ack(true)
                .with_topics(vec![AcknowledgeTopic::default()
                    .with_topic_id(id)
                    .with_partitions(vec![AcknowledgePartition::default()
                        .with_partition_index(0)
                        .with_acknowledgement_batches(vec![
                            AcknowledgementBatch::default()
                                .with_first_offset(0)
                                .with_last_offset(1)
                                .with_acknowledge_types(vec![4]),
                        ])])]),
        )
        .expect("share acknowledge")
    };
    assert_eq!(r.error_code, 0);
    assert_eq!(r.acquisition_lock_timeout_ms, LOCK_MS as i32);
    assert_eq!(r.responses[0].partitions[0].error_code, 0);
    // b cannot renew what a holds.
    let r = fetch_at(
        &mut c,
        2,
        (&group, "member-b", 2),
        id,
        &[(0, 4, 4)],
        true,
        0,
        0,
    );
    assert_eq!(
        r.responses[0].partitions[0].acknowledge_error_code,
        err(ResponseError::InvalidRecordState)
    );
    // a stops renewing: the locks lapse (2-4 first, 0-1 renewed once more later) and b gets
    // every record with its second delivery (renewals counted none).
    let deadline = Instant::now() + WAIT_MAX;
    let mut epoch = 3;
    let mut got: std::collections::BTreeMap<i64, i16> = Default::default();
    while got.len() < 5 {
        assert!(
            Instant::now() < deadline,
            "records never came back: {got:?}"
        );
        let r = fetch_at(
            &mut c,
            2,
            (&group, "member-b", epoch),
            id,
            &[],
            false,
            5,
            2000,
        );
        epoch += 1;
        assert_eq!(r.error_code, 0);
        for a in r
            .responses
            .iter()
            .flat_map(|t| t.partitions.iter().flat_map(|p| p.acquired_records.iter()))
        {
            for o in a.first_offset..=a.last_offset {
                assert!(got.insert(o, a.delivery_count).is_none(), "{o} twice");
            }
        }
    }
    assert_eq!(got, (0..5).map(|o| (o, 2)).collect());
}

// ------------------------------------------------------------------------ delayed delivery

/// The test's own clock (the broker's is the same wall clock, but nothing here reads it).
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Produces `records` (value, delivery-time headers) in one zstd batch with librdkafka.
fn produce_with_headers(b: &Broker, topic: &str, records: &[(&str, &[(&str, &str)])]) {
    use rdkafka::config::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("acks", "all")
        .set("linger.ms", "50")
        .set("compression.type", "zstd")
        .create()
        .expect("producer");
    for (value, headers) in records {
        let mut hs = OwnedHeaders::new();
        for (k, v) in *headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        p.send(
            BaseRecord::<(), str>::to(topic)
                .partition(0)
                .payload(*value)
                .headers(hs),
        )
        .expect("enqueue");
    }
    p.flush(Duration::from_secs(30)).expect("flush");
}

/// One ShareFetch of partition 0 waiting up to `max_wait_ms`: the acquired (offset, count)
/// pairs.
fn share_fetch_wait(
    c: &mut Client,
    group: &str,
    member: &str,
    epoch: i32,
    topic: uuid::Uuid,
    max_wait_ms: i32,
    acks: Vec<share_fetch_request::AcknowledgementBatch>,
) -> Vec<(i64, i16)> {
    use share_fetch_request::{FetchPartition, FetchTopic};
    let r: ShareFetchResponse = c
        .call_at(
            ApiKey::ShareFetch,
            1,
            &ShareFetchRequest::default()
                .with_group_id(Some(GroupId(s(group))))
                .with_member_id(Some(s(member)))
                .with_share_session_epoch(epoch)
                .with_max_wait_ms(max_wait_ms)
                .with_min_bytes(1)
                .with_max_bytes(1 << 20)
                .with_max_records(100)
                .with_batch_size(100)
                .with_topics(vec![FetchTopic::default()
                    .with_topic_id(topic)
                    .with_partitions(vec![FetchPartition::default()
                        .with_partition_index(0)
                        .with_acknowledgement_batches(acks)])]),
        )
        .expect("share fetch");
    assert_eq!(r.error_code, 0, "{:?}", r.error_message);
    let Some(p) = r.responses.first().and_then(|t| t.partitions.first()) else {
        return vec![];
    };
    assert_eq!(p.error_code, 0);
    assert_eq!(p.acknowledge_error_code, 0);
    p.acquired_records
        .iter()
        .flat_map(|a| (a.first_offset..=a.last_offset).map(move |o| (o, a.delivery_count)))
        .collect()
}

fn ack(first: i64, last: i64, kind: i8) -> share_fetch_request::AcknowledgementBatch {
    share_fetch_request::AcknowledgementBatch::default()
        .with_first_offset(first)
        .with_last_offset(last)
        .with_acknowledge_types(vec![kind])
}

/// Fetches (accepting what arrives, unless `keep` says otherwise) until `want` was acquired or
/// `WAIT_MAX` passes; returns when each offset arrived by the test's clock, and its count.
struct Poller<'a> {
    c: &'a mut Client,
    group: String,
    member: String,
    topic: uuid::Uuid,
    epoch: i32,
    pending: Vec<share_fetch_request::AcknowledgementBatch>,
}

impl Poller<'_> {
    fn fetch(&mut self, max_wait_ms: i32) -> Vec<(i64, i16)> {
        let acks = std::mem::take(&mut self.pending);
        let got = share_fetch_wait(
            self.c,
            &self.group,
            &self.member,
            self.epoch,
            self.topic,
            max_wait_ms,
            acks,
        );
        self.epoch += 1;
        got
    }

    fn until(&mut self, want: &[i64]) -> std::collections::BTreeMap<i64, (i64, i16)> {
        let mut seen = std::collections::BTreeMap::new();
        let deadline = std::time::Instant::now() + WAIT_MAX;
        while !want.iter().all(|o| seen.contains_key(o)) {
            assert!(
                std::time::Instant::now() < deadline,
                "waiting for {want:?}, got {seen:?}"
            );
            for (o, n) in self.fetch(500) {
                seen.insert(o, (wall_ms(), n));
                self.pending.push(ack(o, o, 1));
            }
        }
        seen
    }
}

fn join_share(c: &mut Client, group: &str, member: &str, topic: &str) {
    let r = heartbeat(c, join(group, member, topic));
    assert_eq!(r.error_code, 0, "{:?}", r.error_message);
}

#[test]
fn delayed_records_wait_for_their_time_and_do_not_hold_back_the_others() {
    let b = Broker::options().cores(2).start();
    let topic = topic_name("share-delay");
    b.create_topic(&topic, 1);
    let group = format!("g-{topic}");
    let mut c = Client::connect(&b.bootstrap()).expect("connect");
    c.wait_coordinator(&group, WAIT_MAX);
    assert_eq!(
        set_group_config(&mut c, &group, "share.auto.offset.reset", "earliest"),
        0
    );
    let id = topic_id(&mut c, &topic);
    join_share(&mut c, &group, "m", &topic);

    // Offsets: 0 plain, 1 five seconds after its timestamp, 2 plain, 3 at an absolute time
    // four seconds from now, 4 malformed (delivered at once).
    let t0 = wall_ms();
    let at = (t0 + 4_000).to_string();
    produce_with_headers(
        &b,
        &topic,
        &[
            ("r0", &[]),
            ("r1", &[("sluice.deliver.after.ms", "5000")]),
            ("r2", &[]),
            ("r3", &[("sluice.deliver.at", &at)]),
            ("r4", &[("sluice.deliver.at", "tomorrow")]),
        ],
    );
    let mut p = Poller {
        c: &mut c,
        group: group.clone(),
        member: "m".into(),
        topic: id,
        epoch: 0,
        pending: vec![],
    };
    // The records behind the delayed ones are not held back.
    let first = p.until(&[0, 2, 4]);
    assert!(
        !first.contains_key(&1) && !first.contains_key(&3),
        "{first:?}"
    );
    // A classic consumer (Fetch) sees all five, headers as written, before any is due.
    {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::{Headers, Message};
        use rdkafka::{Offset, TopicPartitionList};
        let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
            .set("bootstrap.servers", b.bootstrap())
            .set("group.id", format!("classic-{topic}"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .expect("tpl");
        consumer.assign(&tpl).expect("assign");
        let mut got = vec![];
        let deadline = std::time::Instant::now() + WAIT_MAX;
        while got.len() < 5 && std::time::Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m.expect("message");
                let h = m.headers().map(|h| h.count()).unwrap_or(0);
                got.push((m.offset(), h));
            }
        }
        assert_eq!(got, vec![(0, 0), (1, 1), (2, 0), (3, 1), (4, 1)]);
        assert!(
            wall_ms() < t0 + 4_000,
            "the classic consumer read everything before the first delivery time"
        );
    }
    // One long poll: it wakes when offset 3 is due, not at its 30 s limit, and not before.
    let waited_from = std::time::Instant::now();
    let got = p.fetch(30_000);
    let now = wall_ms();
    assert_eq!(got, vec![(3, 1)]);
    assert!(
        now >= t0 + 4_000,
        "offset 3 delivered {} ms early",
        t0 + 4_000 - now
    );
    assert!(waited_from.elapsed() < Duration::from_secs(20));
    p.pending.push(ack(3, 3, 1));
    let last = p.until(&[1]);
    assert!(
        last[&1].0 >= t0 + 5_000,
        "offset 1 delivered {} ms early",
        t0 + 5_000 - last[&1].0
    );
    assert_eq!(last[&1].1, 1);
}

#[test]
fn released_records_back_off_and_both_delays_survive_a_kill_9() {
    let mut b = Broker::options().cores(2).start();
    let topic = topic_name("share-backoff");
    b.create_topic(&topic, 1);
    let group = format!("g-{topic}");
    let mut c = Client::connect(&b.bootstrap()).expect("connect");
    c.wait_coordinator(&group, WAIT_MAX);
    for (k, v) in [
        ("share.auto.offset.reset", "earliest"),
        ("share.release.backoff.ms", "2000"),
        ("share.release.backoff.max.ms", "8000"),
    ] {
        assert_eq!(set_group_config(&mut c, &group, k, v), 0, "{k}");
    }
    assert_eq!(
        set_group_config(&mut c, &group, "share.release.backoff.ms", "-1"),
        err(ResponseError::InvalidConfig)
    );
    let described: DescribeConfigsResponse = c
        .call_at(
            ApiKey::DescribeConfigs,
            4,
            &DescribeConfigsRequest::default().with_resources(vec![
                describe_configs_request::DescribeConfigsResource::default()
                    .with_resource_type(32)
                    .with_resource_name(s(&group)),
            ]),
        )
        .expect("describe configs");
    let value = |k: &str| {
        described.results[0]
            .configs
            .iter()
            .find(|e| e.name.as_str() == k)
            .and_then(|e| e.value.as_ref().map(|v| v.to_string()))
    };
    assert_eq!(value("share.release.backoff.ms").as_deref(), Some("2000"));
    assert_eq!(
        value("share.release.backoff.max.ms").as_deref(),
        Some("8000")
    );
    let id = topic_id(&mut c, &topic);
    join_share(&mut c, &group, "m", &topic);
    let t0 = wall_ms();
    let at = (t0 + 12_000).to_string();
    produce_with_headers(
        &b,
        &topic,
        &[("r0", &[]), ("r1", &[("sluice.deliver.at", &at)])],
    );
    let mut p = Poller {
        c: &mut c,
        group: group.clone(),
        member: "m".into(),
        topic: id,
        epoch: 0,
        pending: vec![],
    };
    // Offset 0: delivered, released, and back no earlier than 2 s later with count 2.
    let deadline = std::time::Instant::now() + WAIT_MAX;
    while p.fetch(500) != vec![(0, 1)] {
        assert!(std::time::Instant::now() < deadline);
    }
    let released = wall_ms();
    p.pending.push(ack(0, 0, 2));
    let mut got = vec![];
    while got.is_empty() {
        assert!(std::time::Instant::now() < deadline);
        got = p.fetch(500);
    }
    let back = wall_ms();
    assert_eq!(got, vec![(0, 2)]);
    assert!(
        back >= released + 2_000,
        "redelivered {} ms early",
        released + 2_000 - back
    );
    // Released again: the back-off doubles to 4 s. Then kill -9 right after the release is
    // answered, and restart: neither offset comes back early.
    let released = wall_ms();
    p.pending.push(ack(0, 0, 2));
    assert_eq!(p.fetch(0), vec![]);
    b.sigkill();
    b.restart();
    let mut c = Client::connect(&b.bootstrap()).expect("connect");
    c.wait_coordinator(&group, WAIT_MAX);
    join_share(&mut c, &group, "m", &topic);
    let mut p = Poller {
        c: &mut c,
        group: group.clone(),
        member: "m".into(),
        topic: id,
        epoch: 0,
        pending: vec![],
    };
    let seen = p.until(&[0, 1]);
    assert!(
        seen[&0].0 >= released + 4_000,
        "offset 0 redelivered {} ms early after the restart",
        released + 4_000 - seen[&0].0
    );
    assert_eq!(seen[&0].1, 3);
    assert!(
        seen[&1].0 >= t0 + 12_000,
        "offset 1 delivered {} ms early after the restart",
        t0 + 12_000 - seen[&1].0
    );
    assert_eq!(seen[&1].1, 1);
}

#[test]
fn dead_letter_group_configs_are_validated_and_described() {
    let b = broker();
    let group = format!("g-{}", topic_name("dlq-cfg"));
    let mut c = Client::connect(&b.bootstrap()).expect("connect");
    c.wait_coordinator(&group, WAIT_MAX);
    for (key, bad) in [
        ("errors.deadletterqueue.topic.name", "__consumer_offsets"),
        ("errors.deadletterqueue.topic.name", "no spaces"),
        ("errors.deadletterqueue.copy.record.enable", "sometimes"),
    ] {
        assert_eq!(
            set_group_config(&mut c, &group, key, bad),
            err(ResponseError::InvalidConfig),
            "{key}={bad}"
        );
    }
    assert_eq!(
        set_group_config(
            &mut c,
            &group,
            "errors.deadletterqueue.topic.name",
            "dlq.orders"
        ),
        0
    );
    assert_eq!(
        set_group_config(
            &mut c,
            &group,
            "errors.deadletterqueue.copy.record.enable",
            "true"
        ),
        0
    );
    use describe_configs_request::*;
    let r: DescribeConfigsResponse = c
        .call_at(
            ApiKey::DescribeConfigs,
            4,
            &DescribeConfigsRequest::default().with_resources(vec![
                DescribeConfigsResource::default()
                    .with_resource_type(32)
                    .with_resource_name(s(&group)),
            ]),
        )
        .expect("describe configs");
    let res = &r.results[0];
    assert_eq!(res.error_code, 0);
    let get = |k: &str| {
        res.configs
            .iter()
            .find(|e| e.name.as_str() == k)
            .and_then(|e| e.value.as_ref().map(|v| v.to_string()))
    };
    assert_eq!(
        get("errors.deadletterqueue.topic.name").as_deref(),
        Some("dlq.orders")
    );
    assert_eq!(
        get("errors.deadletterqueue.copy.record.enable").as_deref(),
        Some("true")
    );
}
