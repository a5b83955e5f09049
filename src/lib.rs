//! Sluice: a Kafka-wire-compatible streaming broker, thread-per-core on io_uring (glommio).
//!
//! | module | owns |
//! | --- | --- |
//! | [`config`] | the typed broker configuration (file + flags + env) |
//! | [`contain`] | panic containment: contained futures, the panic hook, the caught [`contain::Panic`] |
//! | [`fault`] | test-only panic points armed by `SLUICE_FAULT_PANIC` (no-ops in release builds) |
//! | [`shard`] | executor pool, pinning, cross-shard calls, partition→shard map |
//! | [`server`] | listener, connection loop, framing, limits, dispatch |
//! | [`protocol`] | RecordBatch v2 view; request/response codecs come from `kafka-protocol` |
//! | [`kafka`] | one handler per Kafka API |
//! | [`storage`] | the partition log: segments, DMA appender, index, recovery, retention, cache |
//! | [`group`] | consumer group coordinator and committed offsets |
//! | [`group`] | consumer group coordinators and committed offsets |
//! | [`metadata`] | topics, configs and partition assignment, persisted in the data dir |
//! | [`cli`] | the `sluice` admin and console commands (Kafka protocol clients) |

pub mod broker;
pub mod cli;
pub mod config;
pub mod contain;
pub mod fault;
pub mod group;
pub mod kafka;
pub mod metadata;
pub mod protocol;
pub mod server;
pub mod shard;
pub mod storage;
pub mod types;
