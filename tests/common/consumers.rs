//! librdkafka consumer helpers shared by the group tests: what a consumer owns and what its
//! group has committed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

/// A consumer context that writes librdkafka's log lines to stderr, which the test harness
/// shows when a test fails.
pub struct Logs;

impl ClientContext for Logs {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        eprintln!("rdkafka {level:?} {fac}: {log_message}");
    }
}

impl ConsumerContext for Logs {}

/// Turns on librdkafka's `debug` contexts listed in `KIP848_DEBUG` (e.g. `cgrp,fetch`), at
/// debug log level: with [`Logs`] they explain a failed rebalance.
pub fn debug_from_env(cfg: &mut ClientConfig) {
    if let Ok(d) = std::env::var("KIP848_DEBUG") {
        cfg.set("debug", d).set_log_level(RDKafkaLogLevel::Debug);
    }
}

/// The partitions `c` is assigned now (as the client sees it).
pub fn owned<X: ConsumerContext>(c: &BaseConsumer<X>) -> BTreeSet<i32> {
    c.assignment()
        .map(|a| a.elements().iter().map(|e| e.partition()).collect())
        .unwrap_or_default()
}

/// The committed offset of each of `partitions` partitions of `topic` in `c`'s group (-1 for
/// none).
pub fn committed_of<X: ConsumerContext>(
    c: &BaseConsumer<X>,
    topic: &str,
    partitions: i32,
) -> BTreeMap<i32, i64> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    c.committed_offsets(tpl, Duration::from_secs(20))
        .expect("committed offsets")
        .elements()
        .iter()
        .map(|e| {
            (
                e.partition(),
                match e.offset() {
                    Offset::Offset(o) => o,
                    _ => -1,
                },
            )
        })
        .collect()
}
