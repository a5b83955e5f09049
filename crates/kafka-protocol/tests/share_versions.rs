//! Round trips of the share-group message versions added by hand to the generated code (see
//! PATCHED.md): ShareFetch v2 (`ShareAcquireMode`, `IsRenewAck`), ShareAcknowledge v2
//! (`IsRenewAck`; `AcquisitionLockTimeoutMs` in the response) and DescribeShareGroupOffsets v1
//! (`Lag`), each against the byte layout of the version before it.

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::describe_share_group_offsets_response::*;
use kafka_protocol::messages::share_acknowledge_request::{
    AcknowledgePartition, AcknowledgeTopic, AcknowledgementBatch,
};
use kafka_protocol::messages::share_fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

fn encode<T: Encodable>(m: &T, version: i16) -> Bytes {
    let mut b = BytesMut::new();
    m.encode(&mut b, version).expect("encode");
    assert_eq!(m.compute_size(version).expect("size"), b.len());
    b.freeze()
}

fn decode<T: Decodable>(mut b: Bytes, version: i16) -> T {
    let m = T::decode(&mut b, version).expect("decode");
    assert!(b.is_empty(), "bytes left over");
    m
}

fn s(x: &str) -> StrBytes {
    StrBytes::from_string(x.to_string())
}

#[test]
fn share_fetch_v2_adds_the_acquire_mode_and_the_renew_flag_after_the_batch_size() {
    let base = ShareFetchRequest::default()
        .with_group_id(Some(GroupId(s("g"))))
        .with_member_id(Some(s("m")))
        .with_share_session_epoch(3)
        .with_max_records(7)
        .with_batch_size(7)
        .with_topics(vec![FetchTopic::default()
            .with_topic_id(uuid::Uuid::from_bytes([1; 16]))
            .with_partitions(vec![
                FetchPartition::default().with_partition_index(2)
            ])]);
    let v2 = base
        .clone()
        .with_share_acquire_mode(1)
        .with_is_renew_ack(true);
    let b2 = encode(&v2, 2);
    assert_eq!(decode::<ShareFetchRequest>(b2.clone(), 2), v2);
    // v1 is the same bytes without the two fields (int8 1, bool 1) behind batch_size.
    let b1 = encode(&base, 1);
    assert_eq!(b2.len(), b1.len() + 2);
    // group (2) + member (2) + epoch, wait, min, max, records, batch (6 × 4).
    let at = 2 + 2 + 6 * 4;
    assert_eq!(&b2[..at], &b1[..at]);
    assert_eq!(&b2[at..at + 2], &[1, 1]);
    assert_eq!(&b2[at + 2..], &b1[at..]);
    assert_eq!(decode::<ShareFetchRequest>(b1, 1), base);
    // The new fields cannot be sent at v1.
    let mut sink = BytesMut::new();
    assert!(v2.encode(&mut sink, 1).is_err());
    // Responses: v2 has the layout of v1.
    let r = ShareFetchResponse::default().with_acquisition_lock_timeout_ms(30_000);
    assert_eq!(encode(&r, 2), encode(&r, 1));
    assert_eq!(decode::<ShareFetchResponse>(encode(&r, 2), 2), r);
}

#[test]
fn share_acknowledge_v2_adds_the_renew_flag_and_the_lock_timeout() {
    let base = ShareAcknowledgeRequest::default()
        .with_group_id(Some(GroupId(s("g"))))
        .with_member_id(Some(s("m")))
        .with_share_session_epoch(4)
        .with_topics(vec![AcknowledgeTopic::default()
            .with_topic_id(uuid::Uuid::from_bytes([2; 16]))
            .with_partitions(vec![AcknowledgePartition::default()
                .with_partition_index(0)
                .with_acknowledgement_batches(vec![
                    AcknowledgementBatch::default()
                        .with_first_offset(5)
                        .with_last_offset(9)
                        .with_acknowledge_types(vec![4]),
                ])])]);
    let v2 = base.clone().with_is_renew_ack(true);
    let b2 = encode(&v2, 2);
    assert_eq!(decode::<ShareAcknowledgeRequest>(b2.clone(), 2), v2);
    let b1 = encode(&base, 1);
    let at = 2 + 2 + 4;
    assert_eq!(b2.len(), b1.len() + 1);
    assert_eq!(&b2[..at], &b1[..at]);
    assert_eq!(b2[at], 1);
    assert_eq!(&b2[at + 1..], &b1[at..]);
    assert_eq!(decode::<ShareAcknowledgeRequest>(b1, 1), base);
    let mut sink = BytesMut::new();
    assert!(v2.encode(&mut sink, 1).is_err());

    let r = ShareAcknowledgeResponse::default()
        .with_error_code(0)
        .with_acquisition_lock_timeout_ms(15_000);
    let b2 = encode(&r, 2);
    assert_eq!(decode::<ShareAcknowledgeResponse>(b2.clone(), 2), r);
    // v1 has no lock timeout (an ignorable field: dropped, decoded as 0).
    let b1 = encode(&r, 1);
    assert_eq!(b2.len(), b1.len() + 4);
    assert_eq!(
        decode::<ShareAcknowledgeResponse>(b1, 1),
        r.clone().with_acquisition_lock_timeout_ms(0)
    );
}

#[test]
fn describe_share_group_offsets_v1_adds_the_lag_after_the_leader_epoch() {
    let part = DescribeShareGroupOffsetsResponsePartition::default()
        .with_partition_index(0)
        .with_start_offset(10)
        .with_leader_epoch(0)
        .with_lag(42);
    assert_eq!(
        DescribeShareGroupOffsetsResponsePartition::default().lag,
        -1
    );
    let r = DescribeShareGroupOffsetsResponse::default().with_groups(vec![
        DescribeShareGroupOffsetsResponseGroup::default()
            .with_group_id(GroupId(s("g")))
            .with_topics(vec![DescribeShareGroupOffsetsResponseTopic::default()
                .with_topic_name(TopicName(s("t")))
                .with_partitions(vec![part.clone()])]),
    ]);
    let b1 = encode(&r, 1);
    assert_eq!(
        decode::<DescribeShareGroupOffsetsResponse>(b1.clone(), 1),
        r
    );
    let b0 = encode(&r, 0);
    assert_eq!(b1.len(), b0.len() + 8);
    let back: DescribeShareGroupOffsetsResponse = decode(b0, 0);
    assert_eq!(back.groups[0].topics[0].partitions[0].lag, -1);
    assert_eq!(back.groups[0].topics[0].partitions[0].start_offset, 10);
    // The partition alone: index, start, epoch, then the lag.
    let pb = encode(&part, 1);
    assert_eq!(&pb[16..24], &42i64.to_be_bytes());
    // The request is unchanged at v1.
    let q = DescribeShareGroupOffsetsRequest::default();
    assert_eq!(encode(&q, 1), encode(&q, 0));
}
