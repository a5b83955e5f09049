//! OffsetCommit, versions 2-9 (flexible from 8). Commits are checked against the group's
//! generation (simple consumers commit with generation -1 to an empty or unknown group),
//! appended to `__consumer_offsets` and synced before the answer. v2-4 carry an explicit
//! retention time.

use bytes::Bytes;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::{OffsetCommitRequest, OffsetCommitResponse};
use kafka_protocol::ResponseError;

use super::common::{code, NONE};
use crate::group::coordinator::CommitEntry;
use crate::group::offsets::OffsetValue;
use crate::group::{on_coordinator, MemberRef};
use crate::kafka::{Request, Response};
use crate::shard;
use crate::types::ErrorCode;

/// Kafka's `offset.metadata.max.bytes`.
pub const OFFSET_METADATA_BYTES_MAX: usize = 4096;

/// One partition's offset to commit (OffsetCommit, TxnOffsetCommit), checked against the topic
/// as the metadata has it: the entry, or UNKNOWN_TOPIC_OR_PARTITION / OFFSET_METADATA_TOO_LARGE.
pub struct Commit<'a> {
    pub meta: Option<&'a crate::metadata::TopicMeta>,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: Option<&'a kafka_protocol::protocol::StrBytes>,
    pub now: i64,
    pub expire: i64,
}

impl Commit<'_> {
    pub fn entry(self) -> Result<CommitEntry, ErrorCode> {
        let metadata = self.metadata.map(|m| m.to_string()).unwrap_or_default();
        match self.meta {
            Some(m) if self.partition >= 0 && self.partition < m.partition_count() => {}
            _ => return Err(code(ResponseError::UnknownTopicOrPartition)),
        }
        if metadata.len() > OFFSET_METADATA_BYTES_MAX {
            return Err(code(ResponseError::OffsetMetadataTooLarge));
        }
        Ok(CommitEntry {
            topic: self.topic.to_string(),
            partition: self.partition,
            value: OffsetValue {
                offset: self.offset,
                leader_epoch: self.leader_epoch,
                metadata,
                commit_timestamp_ms: self.now,
                expire_timestamp_ms: self.expire,
            },
        })
    }
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: OffsetCommitRequest = crate::decode_or_close!(req, b);
    let image = shard::local().broker.image();
    let now = shard::local().clock.now_ms();
    let expire = if req.version <= 4 && request.retention_time_ms >= 0 {
        now.saturating_add(request.retention_time_ms)
    } else {
        -1
    };
    // Per (topic index, partition index): the error, or the entry to commit.
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
                leader_epoch: if req.version >= 6 {
                    p.committed_leader_epoch
                } else {
                    -1
                },
                metadata: p.committed_metadata.as_ref(),
                now,
                expire,
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
    let commit_code = if group_id.is_empty() {
        code(ResponseError::InvalidGroupId)
    } else if entries.is_empty() {
        NONE
    } else {
        let member = request.member_id.to_string();
        let instance = request.group_instance_id.as_ref().map(|s| s.to_string());
        let generation = request.generation_id_or_member_epoch;
        let gid = group_id.clone();
        on_coordinator(&group_id, move |gs| async move {
            let who = MemberRef::of_group(&gid)
                .member(&member)
                .instance(instance.as_deref())
                .generation(generation);
            gs.commit(who, entries).await
        })
        .await
        .unwrap_or_else(|e| e)
    };
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
                    OffsetCommitResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(req.error_code(if e.is_error() { e } else { commit_code }))
                })
                .collect();
            OffsetCommitResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(partitions)
        })
        .collect();
    req.respond(&OffsetCommitResponse::default().with_topics(topics))
}
