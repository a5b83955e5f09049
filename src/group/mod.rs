//! Consumer groups (classic rebalance protocol) and committed offsets. Owned by shards: a group
//! lives on the shard that owns its partition of `__consumer_offsets`
//! (`abs(javaHash(group_id)) % 50`, as Kafka places it), so groups spread over cores with no
//! shared state. Commits are appended to that partition through the storage engine (fdatasync
//! before the commit is acknowledged) and replayed into memory at start.
//!
//! The state machine follows Kafka's GroupCoordinator: Empty → PreparingRebalance →
//! CompletingRebalance → Stable, with member ids (MEMBER_ID_REQUIRED for JoinGroup v4+),
//! generations, leader election, protocol selection, session and rebalance timeouts, and static
//! membership (KIP-345).

pub mod coordinator;
pub mod records;

use std::sync::Arc;

use crate::metadata::TopicMeta;
use crate::shard;
use crate::types::ShardId;

/// The internal topic holding committed offsets.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Kafka's default `offsets.topic.num.partitions`.
pub const OFFSETS_PARTITIONS: i32 = 50;

/// Java's `String.hashCode` over UTF-16 code units, as Kafka uses to place groups.
pub fn java_string_hash(s: &str) -> i32 {
    let mut h: i32 = 0;
    for u in s.encode_utf16() {
        h = h.wrapping_mul(31).wrapping_add(u as i32);
    }
    h
}

/// The `__consumer_offsets` partition of a group (Kafka's `Utils.abs(hash) % partitions`).
pub fn offsets_partition(group_id: &str) -> i32 {
    let h = java_string_hash(group_id);
    let abs = if h == i32::MIN { 0 } else { h.abs() };
    abs % OFFSETS_PARTITIONS
}

/// The offsets topic and the shard coordinating `group_id`, or `None` before the topic exists.
pub fn coordinator_shard(group_id: &str) -> Option<(Arc<TopicMeta>, ShardId)> {
    let broker = shard::local().broker.clone();
    let image = broker.image();
    let topic = image.topic(OFFSETS_TOPIC)?.clone();
    let shard = broker.owner(&topic, offsets_partition(group_id))?;
    Some((topic, shard))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values of java.lang.String#hashCode.
    #[test]
    fn group_placement_matches_kafka() {
        assert_eq!(java_string_hash(""), 0);
        assert_eq!(java_string_hash("a"), 97);
        assert_eq!(java_string_hash("Aa"), 2112);
        assert_eq!(java_string_hash("BB"), 2112);
        assert_eq!(java_string_hash("hello"), 99_162_322);
        assert_eq!(offsets_partition("hello"), 99_162_322 % 50);
        assert!((0..50).contains(&offsets_partition("some-long-group-name-xyz")));
    }
}

/// Starts the group machinery of the calling shard once every shard is serving: shard 0 creates
/// `__consumer_offsets` if missing and then has every shard replay its partitions of it; each
/// shard runs its timers (session expiry, rebalance deadlines, offset expiry).
pub fn start_shard_tasks() {
    let shard = shard::local();
    let retention =
        std::time::Duration::from_secs(shard.broker.config.offsets_retention_minutes * 60);
    glommio::spawn_local(async move {
        let c = coordinator::local();
        let mut last_expiry = std::time::Instant::now();
        loop {
            glommio::timer::sleep(std::time::Duration::from_millis(coordinator::TICK_MS)).await;
            c.tick();
            if last_expiry.elapsed() > std::time::Duration::from_secs(60) && c.is_loaded() {
                last_expiry = std::time::Instant::now();
                c.expire_offsets(retention).await;
            }
        }
    })
    .detach();
    if shard.id.0 != 0 {
        return;
    }
    glommio::spawn_local(async move {
        let broker = shard::local().broker.clone();
        if broker.image().topic(OFFSETS_TOPIC).is_none() {
            let configs = [
                ("cleanup.policy", "compact"),
                ("retention.ms", "-1"),
                ("segment.bytes", "104857600"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            if let Err(e) = crate::broker::create_topic(OFFSETS_TOPIC.into(), OFFSETS_PARTITIONS, 1, configs, false, true).await {
                tracing::error!(error = %e.message(), "cannot create {OFFSETS_TOPIC}; consumer groups are unavailable");
                return;
            }
        }
        shard::invoke_on_all(|| async {
            let broker = shard::local().broker.clone();
            let here = shard::local().id;
            let image = broker.image();
            let Some(topic) = image.topic(OFFSETS_TOPIC).cloned() else { return };
            let mine: Vec<i32> = (0..topic.partition_count()).filter(|p| broker.owner(&topic, *p) == Some(here)).collect();
            coordinator::local().load(mine).await;
        })
        .await;
    })
    .detach();
}
