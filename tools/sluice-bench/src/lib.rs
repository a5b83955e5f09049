//! `sluice-bench`: a Kafka-protocol load generator for Sluice or any Kafka-compatible broker.
//! A standalone client: it speaks the wire protocol through `sluice-client` (the one client the
//! `sluice` command line uses too) and builds and checks record batches with `sluice-protocol`
//! (the RecordBatch v2 codec crate it shares with the broker); it knows nothing of the broker's
//! internals.
//!
//! | module | owns |
//! | --- | --- |
//! | [`cli`] | flags, their validation, and units |
//! | [`units`] | sizes (`1KiB`), durations (`30s`), rates (`200MB/s`) |
//! | [`batch`] | pre-built RecordBatch v2 pools (payloads, keys), per-send patching, send stamps |
//! | [`rate`] | open-loop pacing (latency from scheduled send time) |
//! | [`setup`] | `sluice-client` connections on glommio TCP; the run's topic, created and led |
//! | [`produce`] | pipelined producer lanes |
//! | [`txn`] | transactional producer lanes, the transaction coordinator client and its retries |
//! | [`eos`] | `exactly-once`: consume-transform-produce workers |
//! | [`consume`] | fetch loops, end-to-end latency |
//! | [`group`] | classic consumer-group membership, range assignor, commits |
//! | [`share`] | `share-consume`: share-group members, acknowledgement choices, redelivery counts |
//! | [`runner`] | executors per core, live line, warm-up and stop |
//! | [`report`] | counters, HdrHistograms, the per-second timeline, text and JSON summaries |
//! | [`chart`] | `--report DIR`: SVG charts of a run and an HTML page of all runs side by side |
//! | [`scenario`] | named scenarios from `perf/scenarios` |

pub mod batch;
pub mod chart;
pub mod cli;
pub mod consume;
pub mod eos;
pub mod group;
pub mod produce;
pub mod rate;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod setup;
pub mod share;
pub mod txn;
pub mod units;
