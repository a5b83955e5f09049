//! One file per Kafka API. Each opens with the version range it serves; the ranges themselves
//! live in [`crate::kafka::versions`].

pub mod api_versions;
pub mod common;
pub mod create_partitions;
pub mod create_topics;
pub mod delete_records;
pub mod delete_topics;
pub mod describe_configs;
pub mod fetch;
pub mod init_producer_id;
pub mod list_offsets;
pub mod metadata;
pub mod produce;
