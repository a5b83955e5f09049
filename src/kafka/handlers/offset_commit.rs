//! OffsetCommit, versions 2-8 (flexible from 8; group instance id from 7). Commits are appended
//! to `__consumer_offsets` and fsynced before the response.

use bytes::Bytes;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::{OffsetCommitRequest, OffsetCommitResponse};

use super::common::{opt_str, with_coordinator};
use crate::kafka::Request;
use crate::server::Response;

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let r: OffsetCommitRequest = crate::decode_or_close!(req, b);
    let group = r.group_id.to_string();
    let member = r.member_id.to_string();
    let instance = opt_str(&r.group_instance_id);
    let generation = r.generation_id_or_member_epoch;
    let mut flat = Vec::new();
    for t in &r.topics {
        for p in &t.partitions {
            let epoch = if req.version >= 6 {
                p.committed_leader_epoch
            } else {
                -1
            };
            flat.push((
                t.name.to_string(),
                p.partition_index,
                p.committed_offset,
                epoch,
                opt_str(&p.committed_metadata),
            ));
        }
    }
    let n = flat.len();
    let result = with_coordinator(&group.clone(), move |c| async move {
        c.commit(&group, generation, &member, instance.as_deref(), flat)
            .await
    })
    .await;
    let errors: Vec<i16> = match result {
        Ok(Ok(errs)) => errs,
        Ok(Err(e)) | Err(e) => vec![e; n],
    };
    let mut i = 0;
    let topics = r
        .topics
        .iter()
        .map(|t| {
            let parts = t
                .partitions
                .iter()
                .map(|p| {
                    let e = errors[i];
                    i += 1;
                    OffsetCommitResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(e)
                })
                .collect();
            OffsetCommitResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(parts)
        })
        .collect();
    req.respond(&OffsetCommitResponse::default().with_topics(topics))
}
