//! Hostile request frames, shared by `hostile_frames.rs` and `fuzz_requests.rs`: a valid request
//! of every API and version the broker advertises (built with kafka-protocol), a raw sender that learns after each frame whether the broker answered it or
//! closed the connection, the health check a real client makes afterwards, and the broker's peak
//! memory.

#![allow(dead_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

pub use crate::common::raw::{frame, read_frame_from, request_header};
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::delete_records_request::{
    DeleteRecordsPartition, DeleteRecordsTopic,
};
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_delete_request::{
    OffsetDeleteRequestPartition, OffsetDeleteRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::{
    OffsetFetchRequestGroup, OffsetFetchRequestTopic, OffsetFetchRequestTopics,
};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

/// Every `(api key, version)` the broker advertises in ApiVersions.
pub fn advertised() -> Vec<(ApiKey, i16)> {
    sluice::kafka::versions::SUPPORTED
        .iter()
        .flat_map(|(k, lo, hi)| (*lo..=*hi).map(move |v| (*k, v)))
        .collect()
}

/// The default (all fields at their defaults) request of `key`.
pub fn default_request(key: ApiKey) -> Box<dyn EncodeAt> {
    match key {
        ApiKey::Produce => Box::new(ProduceRequest::default()),
        ApiKey::Fetch => Box::new(FetchRequest::default()),
        ApiKey::ListOffsets => Box::new(ListOffsetsRequest::default()),
        ApiKey::Metadata => Box::new(MetadataRequest::default()),
        ApiKey::ApiVersions => Box::new(ApiVersionsRequest::default()),
        ApiKey::CreateTopics => Box::new(CreateTopicsRequest::default()),
        ApiKey::DeleteTopics => Box::new(DeleteTopicsRequest::default()),
        ApiKey::DeleteRecords => Box::new(DeleteRecordsRequest::default()),
        ApiKey::InitProducerId => Box::new(InitProducerIdRequest::default()),
        ApiKey::DescribeConfigs => Box::new(DescribeConfigsRequest::default()),
        ApiKey::CreatePartitions => Box::new(CreatePartitionsRequest::default()),
        ApiKey::FindCoordinator => Box::new(FindCoordinatorRequest::default()),
        ApiKey::JoinGroup => Box::new(JoinGroupRequest::default()),
        ApiKey::SyncGroup => Box::new(SyncGroupRequest::default()),
        ApiKey::Heartbeat => Box::new(HeartbeatRequest::default()),
        ApiKey::LeaveGroup => Box::new(LeaveGroupRequest::default()),
        ApiKey::OffsetCommit => Box::new(OffsetCommitRequest::default()),
        ApiKey::OffsetFetch => Box::new(OffsetFetchRequest::default()),
        ApiKey::DescribeGroups => Box::new(DescribeGroupsRequest::default()),
        ApiKey::ListGroups => Box::new(ListGroupsRequest::default()),
        ApiKey::DeleteGroups => Box::new(DeleteGroupsRequest::default()),
        ApiKey::OffsetDelete => Box::new(OffsetDeleteRequest::default()),
        ApiKey::AlterConfigs => Box::new(AlterConfigsRequest::default()),
        ApiKey::IncrementalAlterConfigs => Box::new(IncrementalAlterConfigsRequest::default()),
        ApiKey::DescribeCluster => Box::new(DescribeClusterRequest::default()),
        ApiKey::DescribeTopicPartitions => Box::new(DescribeTopicPartitionsRequest::default()),
        ApiKey::DescribeLogDirs => Box::new(DescribeLogDirsRequest::default()),
        ApiKey::OffsetForLeaderEpoch => Box::new(OffsetForLeaderEpochRequest::default()),
        ApiKey::ElectLeaders => Box::new(ElectLeadersRequest::default()),
        ApiKey::DescribeQuorum => {
            Box::new(kafka_protocol::messages::DescribeQuorumRequest::default())
        }
        ApiKey::AddPartitionsToTxn => Box::new(AddPartitionsToTxnRequest::default()),
        ApiKey::AddOffsetsToTxn => Box::new(AddOffsetsToTxnRequest::default()),
        ApiKey::EndTxn => Box::new(EndTxnRequest::default()),
        ApiKey::TxnOffsetCommit => Box::new(TxnOffsetCommitRequest::default()),
        ApiKey::WriteTxnMarkers => Box::new(WriteTxnMarkersRequest::default()),
        ApiKey::DescribeTransactions => Box::new(DescribeTransactionsRequest::default()),
        ApiKey::ListTransactions => Box::new(ListTransactionsRequest::default()),
        ApiKey::ConsumerGroupHeartbeat => Box::new(ConsumerGroupHeartbeatRequest::default()),
        ApiKey::ConsumerGroupDescribe => Box::new(ConsumerGroupDescribeRequest::default()),
        ApiKey::ShareGroupHeartbeat => Box::new(ShareGroupHeartbeatRequest::default()),
        ApiKey::ShareGroupDescribe => Box::new(ShareGroupDescribeRequest::default()),
        ApiKey::ShareFetch => Box::new(ShareFetchRequest::default()),
        ApiKey::ShareAcknowledge => Box::new(ShareAcknowledgeRequest::default()),
        ApiKey::DescribeShareGroupOffsets => Box::new(DescribeShareGroupOffsetsRequest::default()),
        ApiKey::AlterShareGroupOffsets => Box::new(AlterShareGroupOffsetsRequest::default()),
        ApiKey::DeleteShareGroupOffsets => Box::new(DeleteShareGroupOffsetsRequest::default()),
        other => panic!("no request built for {other:?}: add it when the broker advertises it"),
    }
}

/// Topic and group the populated requests name.
pub const FUZZ_TOPIC: &str = "hostile-fuzz";
pub const FUZZ_GROUP: &str = "hostile-fuzz-group";

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

fn topic() -> TopicName {
    TopicName(s(FUZZ_TOPIC))
}

fn group() -> GroupId {
    GroupId(s(FUZZ_GROUP))
}

/// A request of `key` with its collections populated (a topic, two partitions, a group, a small
/// record batch for Produce), in the fields `version` carries. Every count, length and string in
/// it is then a target for mutation.
pub fn populated_request(key: ApiKey, version: i16) -> Box<dyn EncodeAt> {
    let batch = Bytes::from(sluice::protocol::builder::single(
        Some(b"k"),
        Some(b"hostile value"),
        1_700_000_000_000,
    ));
    let ids = version >= 13 && key == ApiKey::Fetch;
    match key {
        ApiKey::Produce => Box::new(
            ProduceRequest::default()
                // v12 (transaction version 2) adds partitions to the named transaction itself:
                // its frames carry a transactional id so that path is the one mutated.
                .with_transactional_id((version >= 12).then(|| TransactionalId(s("hostile-txn"))))
                .with_acks(1)
                .with_timeout_ms(1000)
                .with_topic_data(vec![TopicProduceData::default()
                    .with_name(topic())
                    .with_partition_data(vec![PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(batch))])]),
        ),
        ApiKey::Fetch => {
            let t = FetchTopic::default().with_partitions(vec![
                FetchPartition::default()
                    .with_partition(0)
                    .with_partition_max_bytes(1 << 16),
                FetchPartition::default()
                    .with_partition(1)
                    .with_partition_max_bytes(1 << 16),
            ]);
            let t = if ids {
                t.with_topic_id(Default::default())
            } else {
                t.with_topic(topic())
            };
            Box::new(
                FetchRequest::default()
                    .with_replica_id(BrokerId(-1))
                    .with_max_wait_ms(10)
                    .with_max_bytes(1 << 20)
                    .with_topics(vec![t]),
            )
        }
        ApiKey::ListOffsets => Box::new(
            ListOffsetsRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_topics(vec![ListOffsetsTopic::default()
                    .with_name(topic())
                    .with_partitions(vec![
                        ListOffsetsPartition::default()
                            .with_partition_index(0)
                            .with_timestamp(-1),
                        ListOffsetsPartition::default()
                            .with_partition_index(1)
                            .with_timestamp(-2),
                    ])]),
        ),
        ApiKey::Metadata => Box::new(MetadataRequest::default().with_topics(Some(vec![
            MetadataRequestTopic::default().with_name(Some(topic())),
        ]))),
        ApiKey::ApiVersions => Box::new(if version >= 3 {
            ApiVersionsRequest::default()
                .with_client_software_name(s("hostile"))
                .with_client_software_version(s("1.0"))
        } else {
            ApiVersionsRequest::default()
        }),
        ApiKey::CreateTopics => Box::new(
            CreateTopicsRequest::default()
                .with_timeout_ms(1000)
                .with_validate_only(true)
                .with_topics(vec![CreatableTopic::default()
                    .with_name(topic())
                    .with_num_partitions(2)
                    .with_replication_factor(1)]),
        ),
        ApiKey::DeleteTopics => Box::new(if version >= 6 {
            DeleteTopicsRequest::default()
                .with_timeout_ms(1000)
                .with_topics(vec![DeleteTopicState::default()
                    .with_name(Some(TopicName(s("hostile-no-such-topic"))))])
        } else {
            DeleteTopicsRequest::default()
                .with_timeout_ms(1000)
                .with_topic_names(vec![TopicName(s("hostile-no-such-topic"))])
        }),
        ApiKey::DeleteRecords => Box::new(
            DeleteRecordsRequest::default()
                .with_timeout_ms(1000)
                .with_topics(vec![DeleteRecordsTopic::default()
                    .with_name(topic())
                    .with_partitions(vec![DeleteRecordsPartition::default()
                        .with_partition_index(0)
                        .with_offset(0)])]),
        ),
        ApiKey::InitProducerId => Box::new(
            InitProducerIdRequest::default()
                .with_transaction_timeout_ms(1000)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
        ),
        ApiKey::DescribeConfigs => Box::new(DescribeConfigsRequest::default().with_resources(
            vec![DescribeConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(s(FUZZ_TOPIC))
                .with_configuration_keys(Some(vec![s("retention.ms"), s("segment.bytes")]))],
        )),
        ApiKey::CreatePartitions => Box::new(
            CreatePartitionsRequest::default()
                .with_timeout_ms(1000)
                .with_validate_only(true)
                .with_topics(vec![CreatePartitionsTopic::default()
                    .with_name(topic())
                    .with_count(3)]),
        ),
        ApiKey::FindCoordinator => Box::new(if version >= 4 {
            FindCoordinatorRequest::default().with_coordinator_keys(vec![s(FUZZ_GROUP)])
        } else {
            FindCoordinatorRequest::default().with_key(s(FUZZ_GROUP))
        }),
        ApiKey::JoinGroup => Box::new(
            JoinGroupRequest::default()
                .with_group_id(group())
                .with_session_timeout_ms(6000)
                .with_rebalance_timeout_ms(if version >= 1 { 50 } else { -1 })
                .with_protocol_type(s("consumer"))
                .with_protocols(vec![JoinGroupRequestProtocol::default()
                    .with_name(s("range"))
                    .with_metadata(Bytes::from_static(b"\0\0\0\0\0\x01\0\x01t\0\0\0\0"))]),
        ),
        ApiKey::SyncGroup => Box::new(
            SyncGroupRequest::default()
                .with_group_id(group())
                .with_generation_id(1)
                .with_member_id(s("m-1"))
                .with_assignments(vec![SyncGroupRequestAssignment::default()
                    .with_member_id(s("m-1"))
                    .with_assignment(Bytes::from_static(b"\0\0\0\0\0\0\0\0"))]),
        ),
        ApiKey::Heartbeat => Box::new(
            HeartbeatRequest::default()
                .with_group_id(group())
                .with_generation_id(1)
                .with_member_id(s("m-1")),
        ),
        ApiKey::LeaveGroup => Box::new(if version >= 3 {
            LeaveGroupRequest::default()
                .with_group_id(group())
                .with_members(vec![MemberIdentity::default().with_member_id(s("m-1"))])
        } else {
            LeaveGroupRequest::default()
                .with_group_id(group())
                .with_member_id(s("m-1"))
        }),
        ApiKey::OffsetCommit => Box::new(
            OffsetCommitRequest::default()
                .with_group_id(group())
                .with_generation_id_or_member_epoch(-1)
                .with_topics(vec![OffsetCommitRequestTopic::default()
                    .with_name(topic())
                    .with_partitions(vec![
                        OffsetCommitRequestPartition::default()
                            .with_partition_index(0)
                            .with_committed_offset(1),
                        OffsetCommitRequestPartition::default()
                            .with_partition_index(1)
                            .with_committed_offset(2)
                            .with_committed_metadata(Some(s("meta"))),
                    ])]),
        ),
        ApiKey::OffsetFetch => Box::new(if version >= 8 {
            OffsetFetchRequest::default().with_groups(vec![OffsetFetchRequestGroup::default()
                .with_group_id(group())
                .with_topics(Some(vec![OffsetFetchRequestTopics::default()
                    .with_name(topic())
                    .with_partition_indexes(vec![0, 1])]))])
        } else {
            OffsetFetchRequest::default()
                .with_group_id(group())
                .with_topics(Some(vec![OffsetFetchRequestTopic::default()
                    .with_name(topic())
                    .with_partition_indexes(vec![0, 1])]))
        }),
        ApiKey::DescribeGroups => Box::new(
            DescribeGroupsRequest::default().with_groups(vec![group(), GroupId(s("other"))]),
        ),
        ApiKey::ListGroups => Box::new(if version >= 4 {
            ListGroupsRequest::default().with_states_filter(vec![s("Stable"), s("Empty")])
        } else {
            ListGroupsRequest::default()
        }),
        ApiKey::DeleteGroups => Box::new(
            DeleteGroupsRequest::default().with_groups_names(vec![GroupId(s("hostile-none"))]),
        ),
        ApiKey::OffsetDelete => Box::new(
            OffsetDeleteRequest::default()
                .with_group_id(group())
                .with_topics(vec![OffsetDeleteRequestTopic::default()
                    .with_name(topic())
                    .with_partitions(vec![
                        OffsetDeleteRequestPartition::default().with_partition_index(0)
                    ])]),
        ),
        ApiKey::AlterConfigs => {
            use kafka_protocol::messages::alter_configs_request::{
                AlterConfigsResource, AlterableConfig,
            };
            Box::new(AlterConfigsRequest::default().with_resources(
                vec![AlterConfigsResource::default()
                    .with_resource_type(2)
                    .with_resource_name(s(FUZZ_TOPIC))
                    .with_configs(vec![
                        AlterableConfig::default()
                            .with_name(s("retention.ms"))
                            .with_value(Some(s("3600000"))),
                        AlterableConfig::default()
                            .with_name(s("cleanup.policy"))
                            .with_value(Some(s("delete"))),
                    ])],
            ))
        }
        ApiKey::IncrementalAlterConfigs => {
            use kafka_protocol::messages::incremental_alter_configs_request::{
                AlterConfigsResource, AlterableConfig,
            };
            Box::new(
                IncrementalAlterConfigsRequest::default().with_resources(vec![
                    AlterConfigsResource::default()
                        .with_resource_type(2)
                        .with_resource_name(s(FUZZ_TOPIC))
                        .with_configs(vec![
                            AlterableConfig::default()
                                .with_name(s("retention.ms"))
                                .with_config_operation(0)
                                .with_value(Some(s("3600000"))),
                            AlterableConfig::default()
                                .with_name(s("cleanup.policy"))
                                .with_config_operation(2)
                                .with_value(Some(s("delete"))),
                        ]),
                    AlterConfigsResource::default()
                        .with_resource_type(4)
                        .with_resource_name(s("0")),
                ]),
            )
        }
        ApiKey::DescribeCluster => Box::new(
            DescribeClusterRequest::default()
                .with_include_cluster_authorized_operations(true)
                .with_endpoint_type(1)
                .with_include_fenced_brokers(version >= 2),
        ),
        ApiKey::DescribeTopicPartitions => {
            use kafka_protocol::messages::describe_topic_partitions_request::{
                Cursor, TopicRequest,
            };
            Box::new(
                DescribeTopicPartitionsRequest::default()
                    .with_topics(vec![
                        TopicRequest::default().with_name(topic()),
                        TopicRequest::default().with_name(TopicName(s("hostile-other"))),
                    ])
                    .with_response_partition_limit(1)
                    .with_cursor(Some(
                        Cursor::default()
                            .with_topic_name(topic())
                            .with_partition_index(1),
                    )),
            )
        }
        ApiKey::OffsetForLeaderEpoch => {
            use kafka_protocol::messages::offset_for_leader_epoch_request::{
                OffsetForLeaderPartition, OffsetForLeaderTopic,
            };
            Box::new(
                OffsetForLeaderEpochRequest::default()
                    .with_replica_id(BrokerId(-1))
                    .with_topics(vec![OffsetForLeaderTopic::default()
                        .with_topic(topic())
                        .with_partitions(vec![
                            OffsetForLeaderPartition::default()
                                .with_partition(0)
                                .with_current_leader_epoch(-1)
                                .with_leader_epoch(0),
                            OffsetForLeaderPartition::default()
                                .with_partition(i32::MAX)
                                .with_current_leader_epoch(i32::MAX)
                                .with_leader_epoch(i32::MIN),
                        ])]),
            )
        }
        ApiKey::ConsumerGroupHeartbeat => Box::new(
            ConsumerGroupHeartbeatRequest::default()
                .with_group_id(group())
                .with_member_id(s("hostile-member-id-0123456789"))
                .with_member_epoch(0)
                .with_rebalance_timeout_ms(1000)
                .with_subscribed_topic_names(Some(vec![topic()]))
                .with_server_assignor(Some(s("uniform")))
                .with_topic_partitions(Some(vec![])),
        ),
        ApiKey::ConsumerGroupDescribe => Box::new(
            ConsumerGroupDescribeRequest::default()
                .with_group_ids(vec![group()])
                .with_include_authorized_operations(true),
        ),
        ApiKey::ShareGroupHeartbeat => Box::new(
            ShareGroupHeartbeatRequest::default()
                .with_group_id(group())
                .with_member_id(s("hostile-share-member-0123456789"))
                .with_member_epoch(0)
                .with_rack_id(Some(s("rack")))
                .with_subscribed_topic_names(Some(vec![topic()])),
        ),
        ApiKey::ShareGroupDescribe => Box::new(
            ShareGroupDescribeRequest::default()
                .with_group_ids(vec![group()])
                .with_include_authorized_operations(true),
        ),
        ApiKey::ShareFetch => {
            use kafka_protocol::messages::share_fetch_request::{
                AcknowledgementBatch, FetchPartition, FetchTopic, ForgottenTopic,
            };
            let id = uuid::Uuid::from_bytes([7; 16]);
            Box::new(
                ShareFetchRequest::default()
                    .with_group_id(Some(group()))
                    .with_member_id(Some(s("hostile-share-member-0123456789")))
                    .with_share_session_epoch(1)
                    .with_max_wait_ms(10)
                    .with_min_bytes(1)
                    .with_max_bytes(1 << 20)
                    .with_max_records(500)
                    .with_batch_size(500)
                    .with_topics(vec![FetchTopic::default()
                        .with_topic_id(id)
                        .with_partitions(vec![
                            FetchPartition::default()
                                .with_partition_index(0)
                                .with_acknowledgement_batches(vec![AcknowledgementBatch::default(
                                )
                                .with_first_offset(0)
                                .with_last_offset(i64::MAX)
                                .with_acknowledge_types(vec![1, 2, 3])]),
                            FetchPartition::default().with_partition_index(1),
                        ])])
                    .with_forgotten_topics_data(vec![ForgottenTopic::default()
                        .with_topic_id(id)
                        .with_partitions(vec![2, -1])]),
            )
        }
        ApiKey::ShareAcknowledge => {
            use kafka_protocol::messages::share_acknowledge_request::{
                AcknowledgePartition, AcknowledgeTopic, AcknowledgementBatch,
            };
            Box::new(
                ShareAcknowledgeRequest::default()
                    .with_group_id(Some(group()))
                    .with_member_id(Some(s("hostile-share-member-0123456789")))
                    .with_share_session_epoch(1)
                    .with_topics(vec![AcknowledgeTopic::default()
                        .with_topic_id(uuid::Uuid::from_bytes([7; 16]))
                        .with_partitions(vec![AcknowledgePartition::default()
                            .with_partition_index(0)
                            .with_acknowledgement_batches(vec![
                                AcknowledgementBatch::default()
                                    .with_first_offset(i64::MIN)
                                    .with_last_offset(i64::MAX)
                                    .with_acknowledge_types(vec![1]),
                            ])])]),
            )
        }
        ApiKey::DescribeShareGroupOffsets => {
            use kafka_protocol::messages::describe_share_group_offsets_request::{
                DescribeShareGroupOffsetsRequestGroup, DescribeShareGroupOffsetsRequestTopic,
            };
            Box::new(
                DescribeShareGroupOffsetsRequest::default().with_groups(vec![
                    DescribeShareGroupOffsetsRequestGroup::default()
                        .with_group_id(group())
                        .with_topics(Some(vec![DescribeShareGroupOffsetsRequestTopic::default()
                            .with_topic_name(topic())
                            .with_partitions(vec![0, 1, -1, i32::MAX])])),
                    DescribeShareGroupOffsetsRequestGroup::default().with_group_id(group()),
                ]),
            )
        }
        ApiKey::AlterShareGroupOffsets => {
            use kafka_protocol::messages::alter_share_group_offsets_request::{
                AlterShareGroupOffsetsRequestPartition, AlterShareGroupOffsetsRequestTopic,
            };
            Box::new(
                AlterShareGroupOffsetsRequest::default()
                    .with_group_id(group())
                    .with_topics(vec![AlterShareGroupOffsetsRequestTopic::default()
                        .with_topic_name(topic())
                        .with_partitions(vec![
                            AlterShareGroupOffsetsRequestPartition::default()
                                .with_partition_index(0)
                                .with_start_offset(i64::MAX),
                            AlterShareGroupOffsetsRequestPartition::default()
                                .with_partition_index(-1)
                                .with_start_offset(-7),
                        ])]),
            )
        }
        ApiKey::DeleteShareGroupOffsets => {
            use kafka_protocol::messages::delete_share_group_offsets_request::DeleteShareGroupOffsetsRequestTopic;
            Box::new(
                DeleteShareGroupOffsetsRequest::default()
                    .with_group_id(group())
                    .with_topics(vec![
                        DeleteShareGroupOffsetsRequestTopic::default().with_topic_name(topic())
                    ]),
            )
        }
        ApiKey::EndTxn => Box::new(
            EndTxnRequest::default()
                .with_transactional_id(TransactionalId(s("hostile-txn")))
                .with_producer_id(ProducerId(1))
                .with_producer_epoch(0)
                .with_committed(true),
        ),
        ApiKey::DescribeLogDirs => {
            use kafka_protocol::messages::describe_log_dirs_request::DescribableLogDirTopic;
            Box::new(DescribeLogDirsRequest::default().with_topics(Some(vec![
                    DescribableLogDirTopic::default()
                        .with_topic(topic())
                        .with_partitions(vec![0, 1, -1, i32::MAX]),
                    DescribableLogDirTopic::default()
                        .with_topic(TopicName(s("hostile-other")))
                        .with_partitions(vec![0]),
                ])))
        }
        ApiKey::ElectLeaders => {
            use kafka_protocol::messages::elect_leaders_request::TopicPartitions;
            Box::new(
                ElectLeadersRequest::default()
                    .with_election_type(if version >= 1 { 1 } else { 0 })
                    .with_timeout_ms(100)
                    .with_topic_partitions(Some(vec![
                        TopicPartitions::default()
                            .with_topic(topic())
                            .with_partitions(vec![0, -1, i32::MAX]),
                        TopicPartitions::default()
                            .with_topic(TopicName(s("hostile-other")))
                            .with_partitions(vec![0]),
                    ])),
            )
        }
        ApiKey::DescribeQuorum => {
            use kafka_protocol::messages::describe_quorum_request::{PartitionData, TopicData};
            Box::new(
                kafka_protocol::messages::DescribeQuorumRequest::default().with_topics(vec![
                    TopicData::default()
                        .with_topic_name(topic())
                        .with_partitions(
                            [0, -1, i32::MAX]
                                .into_iter()
                                .map(|p| PartitionData::default().with_partition_index(p))
                                .collect(),
                        ),
                    TopicData::default()
                        .with_topic_name(TopicName(s("hostile-other")))
                        .with_partitions(vec![PartitionData::default()]),
                ]),
            )
        }
        other => default_request(other),
    }
}

/// The body of `req` encoded at `version`, or `None` if a field it sets does not exist there.
pub fn encode_body(req: &dyn EncodeAt, version: i16) -> Option<Vec<u8>> {
    req.encode_at(version)
}

/// A request body that can be encoded at a version (kafka-protocol's `Encodable` is generic over
/// the buffer, so not object-safe).
pub trait EncodeAt {
    fn encode_at(&self, version: i16) -> Option<Vec<u8>>;
}

impl<T: Encodable> EncodeAt for T {
    fn encode_at(&self, version: i16) -> Option<Vec<u8>> {
        let mut b = BytesMut::new();
        self.encode(&mut b, version).ok()?;
        Some(b.to_vec())
    }
}

/// The body of the populated request (the default one where a populated field does not exist
/// at `version`).
pub fn populated_body(key: ApiKey, version: i16) -> Vec<u8> {
    encode_body(&*populated_request(key, version), version)
        .or_else(|| encode_body(&*default_request(key), version))
        .unwrap_or_else(|| panic!("default {key:?} v{version} request does not encode"))
}

/// The header form `key` uses at `version`.
pub fn native_flexible(key: ApiKey, version: i16) -> bool {
    key.request_header_version(version) >= 2
}

/// Correlation id of the sentinel request that follows each probe frame.
const SENTINEL_CORRELATION_BASE: i32 = 0x4000_0000;

/// ApiVersions v0 with correlation id `c`: answered by any healthy connection.
fn sentinel(c: i32) -> Vec<u8> {
    let mut p = Vec::with_capacity(10);
    p.put_i16(ApiKey::ApiVersions as i16);
    p.put_i16(0);
    p.put_i32(c);
    p.put_i16(-1);
    frame(&p)
}

/// What became of the frames a [`Prober`] sent.
#[derive(Debug, Default, Clone)]
pub struct Outcomes {
    pub sent: usize,
    /// The connection survived the frame (the sentinel after it was answered).
    pub answered: usize,
    /// The broker closed the connection (a refused frame).
    pub closed: usize,
    /// Neither within the wait: the frame is still being served (e.g. a long poll it asked for).
    pub stalled: usize,
    pub connections: usize,
    /// `(api key, version)` of each stalled frame.
    pub stalled_requests: Vec<(i16, i16)>,
}

impl Outcomes {
    pub fn add(&mut self, o: Outcomes) {
        self.sent += o.sent;
        self.answered += o.answered;
        self.closed += o.closed;
        self.stalled += o.stalled;
        self.connections += o.connections;
        self.stalled_requests.extend(o.stalled_requests);
    }
}

/// How long one probe may wait for the sentinel after it.
pub const PROBE_WAIT: Duration = Duration::from_secs(2);
/// Largest response frame a probe accepts (the broker's responses to these requests are small).
const PROBE_RESPONSE_BYTES_MAX: usize = 16 << 20;

/// Sends frames one at a time on a raw connection, each followed by an ApiVersions sentinel,
/// and reads until the sentinel's answer (the frame was survived) or EOF (the broker refused the
/// frame and closed; the next frame gets a new connection).
pub struct Prober {
    addr: SocketAddr,
    conn: Option<TcpStream>,
    next_sentinel: i32,
    pub outcomes: Outcomes,
}

impl Prober {
    pub fn new(addr: SocketAddr) -> Prober {
        Prober {
            addr,
            conn: None,
            next_sentinel: SENTINEL_CORRELATION_BASE,
            outcomes: Outcomes::default(),
        }
    }

    fn connect(&mut self) -> TcpStream {
        let s = TcpStream::connect_timeout(&self.addr, PROBE_WAIT).expect("connect to the broker");
        s.set_nodelay(true).expect("nodelay");
        s.set_read_timeout(Some(PROBE_WAIT)).expect("read timeout");
        s.set_write_timeout(Some(PROBE_WAIT))
            .expect("write timeout");
        abort_on_close(&s);
        self.outcomes.connections += 1;
        s
    }

    /// Sends one frame (length prefix included) and learns its outcome.
    pub fn probe(&mut self, frame: &[u8]) {
        let mut s = match self.conn.take() {
            Some(s) => s,
            None => self.connect(),
        };
        self.outcomes.sent += 1;
        self.next_sentinel += 1;
        let c = self.next_sentinel;
        let mut out = Vec::with_capacity(frame.len() + 14);
        out.extend_from_slice(frame);
        out.extend_from_slice(&sentinel(c));
        // A refused frame may close the connection before the rest is written; the read says so.
        let _ = s.write_all(&out);
        let deadline = Instant::now() + PROBE_WAIT;
        loop {
            match read_correlation(&mut s) {
                Ok(got) if got == c => {
                    self.outcomes.answered += 1;
                    self.conn = Some(s);
                    return;
                }
                // The probe's own response (or a late one): keep reading.
                Ok(_) if Instant::now() < deadline => {}
                Ok(_) => {
                    self.stalled(frame);
                    return;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    self.stalled(frame);
                    return;
                }
                Err(_) => {
                    self.outcomes.closed += 1;
                    return;
                }
            }
        }
    }
}

impl Prober {
    fn stalled(&mut self, frame: &[u8]) {
        self.outcomes.stalled += 1;
        if frame.len() >= 8 {
            let key = i16::from_be_bytes([frame[4], frame[5]]);
            let version = i16::from_be_bytes([frame[6], frame[7]]);
            self.outcomes.stalled_requests.push((key, version));
        }
    }
}

/// Closes with RST rather than FIN (SO_LINGER 0): a probe run opens tens of thousands of
/// connections and must not leave them in TIME_WAIT.
fn abort_on_close(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized `linger`.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
}

/// Reads one response frame and returns its correlation id.
fn read_correlation(s: &mut TcpStream) -> std::io::Result<i32> {
    let body = read_frame_from(s, PROBE_RESPONSE_BYTES_MAX)?;
    Ok(i32::from_be_bytes([body[0], body[1], body[2], body[3]]))
}

/// Sends `frames` from `threads` connections at once (frame i on thread i % threads) and sums
/// the outcomes.
pub fn probe_all(addr: SocketAddr, frames: &[Vec<u8>], threads: usize) -> Outcomes {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut p = Prober::new(addr);
                    for f in frames.iter().skip(t).step_by(threads) {
                        p.probe(f);
                    }
                    p.outcomes
                })
            })
            .collect();
        let mut total = Outcomes::default();
        for h in handles {
            total.add(h.join().expect("prober thread"));
        }
        total
    })
}

/// `VmHWM` (peak resident set) of process `pid`, in KiB.
pub fn vm_hwm_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}

/// How much the broker's peak resident set may grow while it is fed hostile frames. A decode
/// that trusted one declared count would ask for gigabytes (or abort).
pub const PEAK_GROWTH_KIB_MAX: u64 = 256 * 1024;

/// How long the real client may take for each step of the health check.
const CLIENT_WAIT: Duration = Duration::from_secs(30);

/// A real client (librdkafka) still works: Metadata, then a produced record read back.
pub fn assert_serves_real_client(bootstrap: &str, topic: &str) {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::{Offset, TopicPartitionList};

    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .set("socket.timeout.ms", "20000")
        .set("message.timeout.ms", "30000");
    let producer: BaseProducer = c.create().expect("create producer");
    let md = producer
        .client()
        .fetch_metadata(None, CLIENT_WAIT)
        .expect("metadata from the broker after hostile frames");
    assert_eq!(md.brokers().len(), 1, "one broker in metadata");
    let value = format!("still serving {topic}");
    producer
        .send(BaseRecord::<[u8], [u8]>::to(topic).payload(value.as_bytes()))
        .map_err(|(e, _)| e)
        .expect("enqueue a record");
    producer
        .flush(CLIENT_WAIT)
        .expect("record delivered after hostile frames");

    let consumer: BaseConsumer = c
        .clone()
        .set("group.id", "hostile-check")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("create consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + CLIENT_WAIT;
    loop {
        assert!(
            Instant::now() < deadline,
            "no record of {topic} fetched after hostile frames"
        );
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Ok(m)) => {
                assert_eq!(m.payload(), Some(value.as_bytes()));
                return;
            }
            Some(Err(e)) => panic!("consumer error after hostile frames: {e}"),
        }
    }
}

/// Asserts the broker process `pid` has not exited (it is our child, so a dead one is a zombie
/// until reaped: check its state rather than only that /proc has it).
pub fn assert_alive(pid: i32) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    assert!(
        matches!(state, Some(c) if c != 'Z' && c != 'X'),
        "broker process {pid} is gone (state {state:?})"
    );
}

/// Decodes a request frame (without its length prefix) the way the broker's dispatch does:
/// API key and version off the front, refused unless advertised; the header in the form that
/// version uses (`RequestHeader::decode`); then the body with the request type's own
/// `Decodable::decode` at that version, as its handler does. `Err` is a refusal, never a crash.
pub fn decode_request(frame: &[u8]) -> Result<(ApiKey, i16), String> {
    if frame.len() < 4 {
        return Err("short frame".into());
    }
    let key_raw = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let key = ApiKey::try_from(key_raw).map_err(|_| format!("unknown API key {key_raw}"))?;
    match sluice::kafka::versions::supported(key) {
        Some((lo, hi)) if version >= lo && version <= hi => {}
        _ => return Err(format!("unsupported {key:?} v{version}")),
    }
    let mut b = Bytes::copy_from_slice(frame);
    RequestHeader::decode(&mut b, key.request_header_version(version))
        .map_err(|e| format!("header: {e}"))?;
    decode_body(key, &mut b, version).map_err(|e| format!("{key:?} v{version} body: {e}"))?;
    Ok((key, version))
}

/// `T::decode` for the request type of `key`.
pub fn decode_body(key: ApiKey, b: &mut Bytes, version: i16) -> anyhow::Result<()> {
    fn d<T: Decodable>(b: &mut Bytes, version: i16) -> anyhow::Result<()> {
        T::decode(b, version).map(drop)
    }
    match key {
        ApiKey::Produce => d::<ProduceRequest>(b, version),
        ApiKey::Fetch => d::<FetchRequest>(b, version),
        ApiKey::ListOffsets => d::<ListOffsetsRequest>(b, version),
        ApiKey::Metadata => d::<MetadataRequest>(b, version),
        ApiKey::ApiVersions => d::<ApiVersionsRequest>(b, version),
        ApiKey::CreateTopics => d::<CreateTopicsRequest>(b, version),
        ApiKey::DeleteTopics => d::<DeleteTopicsRequest>(b, version),
        ApiKey::DeleteRecords => d::<DeleteRecordsRequest>(b, version),
        ApiKey::InitProducerId => d::<InitProducerIdRequest>(b, version),
        ApiKey::DescribeConfigs => d::<DescribeConfigsRequest>(b, version),
        ApiKey::CreatePartitions => d::<CreatePartitionsRequest>(b, version),
        ApiKey::FindCoordinator => d::<FindCoordinatorRequest>(b, version),
        ApiKey::JoinGroup => d::<JoinGroupRequest>(b, version),
        ApiKey::SyncGroup => d::<SyncGroupRequest>(b, version),
        ApiKey::Heartbeat => d::<HeartbeatRequest>(b, version),
        ApiKey::LeaveGroup => d::<LeaveGroupRequest>(b, version),
        ApiKey::OffsetCommit => d::<OffsetCommitRequest>(b, version),
        ApiKey::OffsetFetch => d::<OffsetFetchRequest>(b, version),
        ApiKey::DescribeGroups => d::<DescribeGroupsRequest>(b, version),
        ApiKey::ListGroups => d::<ListGroupsRequest>(b, version),
        ApiKey::DeleteGroups => d::<DeleteGroupsRequest>(b, version),
        ApiKey::OffsetDelete => d::<OffsetDeleteRequest>(b, version),
        other => anyhow::bail!("{other:?} is not served"),
    }
}
