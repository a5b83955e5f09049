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

fn fetch(
    c: &mut Client,
    group: &str,
    member: &str,
    epoch: i32,
    topic: uuid::Uuid,
    acks: Vec<share_fetch_request::AcknowledgementBatch>,
) -> ShareFetchResponse {
    use share_fetch_request::{FetchPartition, FetchTopic};
    c.call_at(
        ApiKey::ShareFetch,
        1,
        &ShareFetchRequest::default()
            .with_group_id(Some(GroupId(s(group))))
            .with_member_id(Some(s(member)))
            .with_share_session_epoch(epoch)
            .with_max_wait_ms(200)
            .with_min_bytes(1)
            .with_max_bytes(1 << 20)
            .with_max_records(5)
            .with_batch_size(5)
            .with_topics(vec![FetchTopic::default()
                .with_topic_id(topic)
                .with_partitions(vec![FetchPartition::default()
                    .with_partition_index(0)
                    .with_acknowledgement_batches(acks)])]),
    )
    .expect("share fetch")
}

fn acknowledge(
    c: &mut Client,
    group: &str,
    member: &str,
    epoch: i32,
    topic: uuid::Uuid,
    (first, last, kind): (i64, i64, i8),
) -> ShareAcknowledgeResponse {
    use share_acknowledge_request::{AcknowledgePartition, AcknowledgeTopic, AcknowledgementBatch};
    c.call_at(
        ApiKey::ShareAcknowledge,
        1,
        &ShareAcknowledgeRequest::default()
            .with_group_id(Some(GroupId(s(group))))
            .with_member_id(Some(s(member)))
            .with_share_session_epoch(epoch)
            .with_topics(vec![AcknowledgeTopic::default()
                .with_topic_id(topic)
                .with_partitions(vec![AcknowledgePartition::default()
                    .with_partition_index(0)
                    .with_acknowledgement_batches(vec![
                        AcknowledgementBatch::default()
                            .with_first_offset(first)
                            .with_last_offset(last)
                            .with_acknowledge_types(vec![kind]),
                    ])])]),
    )
    .expect("share acknowledge")
}

fn describe_offsets(c: &mut Client, group: &str, topic: &str) -> DescribeShareGroupOffsetsResponse {
    use describe_share_group_offsets_request::*;
    c.call_at(
        ApiKey::DescribeShareGroupOffsets,
        0,
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
    use incremental_alter_configs_request::*;
    let r: IncrementalAlterConfigsResponse = c
        .call_at(
            ApiKey::IncrementalAlterConfigs,
            1,
            &IncrementalAlterConfigsRequest::default().with_resources(vec![
                AlterConfigsResource::default()
                    .with_resource_type(32)
                    .with_resource_name(s(group))
                    .with_configs(vec![AlterableConfig::default()
                        .with_name(s(key))
                        .with_config_operation(0)
                        .with_value(Some(s(value)))]),
            ]),
        )
        .expect("incremental alter configs");
    r.responses[0].error_code
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
        (ApiKey::ShareFetch, 1, 1),
        (ApiKey::ShareAcknowledge, 1, 1),
        (ApiKey::DescribeShareGroupOffsets, 0, 0),
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
    let b = broker();
    let topic = topic_name("share-raw");
    b.create_topic(&topic, 1);
    b.produce_to_partitions(&topic, 1, 10, "r");
    let group = format!("g-{topic}");
    let mut c = Client::connect(&b.bootstrap()).expect("connect");
    c.wait_coordinator(&group, WAIT_MAX);
    assert_eq!(
        set_group_config(&mut c, &group, "share.auto.offset.reset", "earliest"),
        0
    );
    assert_eq!(
        set_group_config(&mut c, &group, "share.auto.offset.reset", "sometimes"),
        err(ResponseError::InvalidConfig)
    );
    let id = topic_id(&mut c, &topic);

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
    let r = fetch(&mut c, &group, "member-a", 1, id, vec![]);
    assert_eq!(r.error_code, err(ResponseError::ShareSessionNotFound));
    let r = fetch(&mut c, &group, "member-a", 0, id, vec![]);
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
    let rb = fetch(&mut c, &group, "member-b", 0, id, vec![]);
    let gb = &rb.responses[0].partitions[0].acquired_records[0];
    assert_eq!((gb.first_offset, gb.last_offset), (5, 9));
    // A wrong epoch; then b acknowledging a's records is INVALID_RECORD_STATE.
    let r = fetch(&mut c, &group, "member-a", 7, id, vec![]);
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
    let r = fetch(
        &mut c,
        &group,
        "member-a",
        1,
        id,
        vec![share_fetch_request::AcknowledgementBatch::default()
            .with_first_offset(0)
            .with_last_offset(4)
            .with_acknowledge_types(vec![1])],
    );
    assert_eq!(r.error_code, 0);
    assert_eq!(r.responses[0].partitions[0].acknowledge_error_code, 0);
    let r = acknowledge(&mut c, &group, "member-b", 2, id, (5, 9, 3));
    assert_eq!(r.responses[0].partitions[0].error_code, 0);
    let o = describe_offsets(&mut c, &group, &topic);
    assert_eq!(o.groups[0].topics[0].partitions[0].start_offset, 10);

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
    assert_eq!(o.groups[0].topics[0].partitions[0].start_offset, 3);
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
    assert_eq!(o.groups[0].topics[0].partitions[0].start_offset, -1);
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
