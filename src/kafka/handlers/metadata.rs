//! Metadata, versions 0-12 (flexible from 9; topic ids from 10). On a single node, this node
//! leads every partition and is the controller; in a cluster, the brokers are the registered
//! ones, each partition's leader is the node that holds it (one replica) and the controller is
//! the controller group's leader. Unknown topics are auto-created when the broker allows it and
//! the request does (v4+; before v4 every request allows it). Topic (v8+) and cluster (v8-10)
//! authorized operations are computed when asked (`common::authorized_operations`).

use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{BrokerId, MetadataRequest, MetadataResponse};
use kafka_protocol::ResponseError;

use super::common::{
    authorized_operations, code, str_bytes, topic_name, topic_or_create, AclResource,
    AUTHORIZED_OPERATIONS_OMITTED,
};
use crate::kafka::{Request, Response};
use crate::metadata::TopicMeta;
use crate::shard::{self, BrokerContext};

pub fn cluster_id() -> String {
    "sluice-single-node".to_string()
}

fn topic_entry(
    broker: &BrokerContext,
    t: &TopicMeta,
    version: i16,
    operations: i32,
) -> MetadataResponseTopic {
    let image = broker.image();
    let partitions = (0..t.partition_count())
        .map(|p| {
            if t.replication_factor() > 1 {
                return replicated_partition(broker, &image, t, p, version);
            }
            let node = broker.node_of(t, p).unwrap_or(-1);
            let entry = MetadataResponsePartition::default()
                .with_partition_index(p)
                .with_leader_epoch(if version >= 7 { 0 } else { -1 })
                .with_replica_nodes(vec![BrokerId(node)]);
            if image.fenced.contains(&node) {
                // Its only replica is on a fenced node: no leader until that node is back.
                entry
                    .with_error_code(code(ResponseError::LeaderNotAvailable).get())
                    .with_leader_id(BrokerId(-1))
            } else {
                entry
                    .with_leader_id(BrokerId(node))
                    .with_isr_nodes(vec![BrokerId(node)])
            }
        })
        .collect();
    MetadataResponseTopic::default()
        .with_name(Some(topic_name(&t.name)))
        .with_topic_id(if version >= 10 {
            uuid::Uuid::from_bytes(t.id)
        } else {
            uuid::Uuid::nil()
        })
        .with_is_internal(t.internal && version >= 1)
        .with_partitions(partitions)
        .with_topic_authorized_operations(operations)
}

/// A broker as Metadata and DescribeCluster list it.
pub struct ListedBroker {
    pub id: i32,
    pub host: String,
    pub port: u16,
    pub fenced: bool,
    pub rack: Option<String>,
}

/// What this node reports of a partition with replicas: its leader (-1 for none known) and
/// leader epoch, and its in-sync replicas.
pub struct ReplicatedState {
    pub leader: i32,
    pub epoch: i32,
    pub isr: Vec<i32>,
}

/// The leader of a replicated partition is the later (by epoch) of what this node's replica
/// knows of its raft group and what the partition's leader last reported to the controller, so
/// a node holding no replica names the current leader too (the preferred one only until the
/// first report) — except that a node never names itself when its own replica does not lead.
/// The ISR: on the leader, from raft progress; elsewhere, the one last reported; replicas on
/// fenced nodes left out either way.
pub fn replicated_state(
    broker: &BrokerContext,
    image: &crate::metadata::MetadataImage,
    t: &TopicMeta,
    p: i32,
) -> ReplicatedState {
    let tp = crate::types::TopicPartition::new(t.name.clone(), p);
    // A replica here knows its group's term, with no leader (-1) while an election runs.
    let own = broker.replica_leader(&tp);
    let reported = image.leader_of(&t.name, p);
    let use_reported =
        reported.filter(|r| own.is_none_or(|(l, e)| r.epoch > e || (l < 0 && r.epoch == e)));
    let (leader, epoch) = match (own, use_reported) {
        (_, Some(r)) => (r.leader, r.epoch),
        (Some(o), None) => o,
        (None, None) => (broker.node_of(t, p).unwrap_or(-1), 0),
    };
    // This node knows better than any report whether it leads: a report naming it while its
    // own replica does not lead (an old leader cut off from the others, whose view of the
    // controller's reports is stale) would send clients back to a node that refuses their
    // writes. None known then: LEADER_NOT_AVAILABLE, and clients look elsewhere.
    let me = broker.config.node_id;
    let leader = match own {
        Some((l, _)) if leader == me && l != me => -1,
        _ => leader,
    };
    let isr = match (broker.replica_isr(&tp), reported) {
        (None, Some(r)) if r.leader == leader && r.epoch == epoch => r
            .isr
            .iter()
            .copied()
            .filter(|n| !image.fenced.contains(n))
            .collect(),
        _ => super::produce::in_sync_replicas(broker, t, p),
    };
    ReplicatedState { leader, epoch, isr }
}

/// A partition with replicas, as [`replicated_state`] has it.
fn replicated_partition(
    broker: &BrokerContext,
    image: &crate::metadata::MetadataImage,
    t: &TopicMeta,
    p: i32,
    version: i16,
) -> MetadataResponsePartition {
    let ReplicatedState { leader, epoch, isr } = replicated_state(broker, image, t, p);
    let replicas = t.replica_nodes(p).iter().map(|n| BrokerId(*n)).collect();
    let entry = MetadataResponsePartition::default()
        .with_partition_index(p)
        .with_leader_epoch(if version >= 7 { epoch } else { -1 })
        .with_replica_nodes(replicas)
        .with_isr_nodes(isr.into_iter().map(BrokerId).collect());
    if leader < 0 || image.fenced.contains(&leader) {
        entry
            .with_error_code(code(ResponseError::LeaderNotAvailable).get())
            .with_leader_id(BrokerId(-1))
    } else {
        entry.with_leader_id(BrokerId(leader))
    }
}

/// The brokers clients may connect to: this node, and in a cluster every registered node that
/// is not fenced (this one included before its registration is applied); with
/// `include_fenced`, the fenced ones too.
pub fn listed_brokers(broker: &BrokerContext, include_fenced: bool) -> Vec<ListedBroker> {
    let me = broker.config.node_id;
    let mut out = Vec::new();
    if broker.config.cluster.is_some() {
        let image = broker.image();
        for b in image.brokers.values() {
            let fenced = image.fenced.contains(&b.id);
            if !fenced || include_fenced {
                out.push(ListedBroker {
                    id: b.id,
                    host: b.host.clone(),
                    port: b.port,
                    fenced,
                    rack: b.rack.clone(),
                });
            }
        }
    }
    if !out.iter().any(|b| b.id == me) {
        out.push(ListedBroker {
            id: me,
            host: broker.config.advertise_host.clone(),
            port: broker.config.advertise_port,
            fenced: false,
            rack: broker.config.rack.clone(),
        });
    }
    out
}

fn brokers(broker: &BrokerContext) -> Vec<MetadataResponseBroker> {
    listed_brokers(broker, false)
        .into_iter()
        .map(|b| {
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(b.id))
                .with_host(str_bytes(&b.host))
                .with_port(b.port as i32)
                .with_rack(b.rack.as_deref().map(str_bytes))
        })
        .collect()
}

pub async fn handle(req: &Request<'_>, mut b: Bytes) -> Response {
    let request: MetadataRequest = crate::decode_or_close!(req, b);
    let broker = shard::local().broker.clone();
    let allow_auto = req.version < 4 || request.allow_auto_topic_creation;
    // v8+: the topic's authorized operations when asked; v8-10: the cluster's too.
    let topic_ops = authorized_operations(
        AclResource::Topic,
        req.version >= 8 && request.include_topic_authorized_operations,
    );
    let cluster_ops = authorized_operations(
        AclResource::Cluster,
        (8..=10).contains(&req.version) && request.include_cluster_authorized_operations,
    );
    // v0: an empty list means all topics; v1+: null means all, empty means none.
    let all = match &request.topics {
        None => true,
        Some(t) => t.is_empty() && req.version == 0,
    };
    let mut topics = Vec::new();
    if all {
        let image = broker.image();
        for t in image.topics.values() {
            topics.push(topic_entry(&broker, t, req.version, topic_ops));
        }
    } else {
        for rt in request.topics.unwrap_or_default() {
            match (&rt.name, rt.topic_id.is_nil()) {
                (Some(name), _) => match topic_or_create(name, allow_auto).await {
                    Ok(t) => topics.push(topic_entry(&broker, &t, req.version, topic_ops)),
                    Err(e) => topics.push(
                        MetadataResponseTopic::default()
                            .with_error_code(req.error_code(e))
                            .with_name(Some(name.clone()))
                            .with_topic_authorized_operations(AUTHORIZED_OPERATIONS_OMITTED),
                    ),
                },
                (None, false) => {
                    let image = broker.image();
                    match image.topic_by_id(rt.topic_id.as_bytes()) {
                        Some(t) => topics.push(topic_entry(
                            &broker,
                            &Arc::clone(t),
                            req.version,
                            topic_ops,
                        )),
                        None => topics.push(
                            MetadataResponseTopic::default()
                                .with_error_code(
                                    req.error_code(code(ResponseError::UnknownTopicId)),
                                )
                                .with_topic_id(rt.topic_id)
                                .with_topic_authorized_operations(AUTHORIZED_OPERATIONS_OMITTED),
                        ),
                    }
                }
                (None, true) => topics.push(
                    MetadataResponseTopic::default()
                        .with_error_code(req.error_code(code(ResponseError::InvalidRequest)))
                        .with_topic_authorized_operations(AUTHORIZED_OPERATIONS_OMITTED),
                ),
            }
        }
    }
    let response = MetadataResponse::default()
        .with_brokers(brokers(&broker))
        .with_cluster_id((req.version >= 2).then(|| str_bytes(&cluster_id())))
        .with_controller_id(BrokerId(broker.controller_id()))
        .with_topics(topics)
        .with_cluster_authorized_operations(cluster_ops);
    req.respond(&response)
}
