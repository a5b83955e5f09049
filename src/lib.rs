//! Sluice: a Kafka-wire-compatible streaming broker, thread-per-core on io_uring (glommio).
//!
//! Modules, top to bottom; each uses only modules below it (kept so by `tests/layering.rs`):
//!
//! | module | owns |
//! | --- | --- |
//! | [`broker`] | composition root: process guards and tuning, launch of the shards, signals |
//! | [`cli`] | the `sluice` admin and console commands (Kafka protocol clients) |
//! | [`server`] | listener, connection loop, framing, limits |
//! | [`kafka`] | dispatch and one handler per Kafka API; `Request`, `Response`, `Connection` |
//! | [`txn`] | transaction coordinators (KIP-98) and the `__transaction_state` log |
//! | [`group`] | consumer group coordinators and committed offsets |
//! | [`admin`] | the metadata owner on shard 0: topic administration, producer-id blocks |
//! | [`controller`] | a cluster's controller: the raft group over the metadata records, on shard 0 |
//! | [`shard`] | per-shard state, the shared [`shard::BrokerContext`], routing, cross-shard calls |
//! | [`metadata`] | the topic catalogue: image, metadata log, topic configs |
//! | [`config`] | the typed broker configuration (file + flags + env) |
//! | [`storage`] | the partition log: segments, DMA appender, index, recovery, retention, cache |
//! | [`protocol`] | RecordBatch v2 view; request/response codecs come from `kafka-protocol` |
//! | [`contain`] | panic containment: contained futures, the panic hook, the caught [`contain::Panic`] |
//! | [`fault`] | test-only panic points armed by `SLUICE_FAULT_PANIC` (no-ops in release builds) |
//! | [`stats`] | per-shard counters and latency histograms read by the metrics endpoint |
//! | [`types`] | ids, offsets, topic-partition names, the clock |

pub mod admin;
pub mod broker;
pub mod cli;
pub mod config;
pub mod contain;
pub mod controller;
pub mod fault;
pub mod group;
pub mod kafka;
pub mod metadata;
pub mod protocol;
pub mod replica;
pub mod server;
pub mod shard;
pub mod stats;
pub mod storage;
pub mod txn;
pub mod types;
