//! Command-line interface. Every flag is checked here, before any connection is made, so a bad
//! flag is one clear line and a non-zero exit.

use crate::batch::{Compression, Keys, Payload};
use crate::units::{parse_bytes, parse_duration, parse_rate, Rate};
use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "sluice-bench",
    args_override_self = true,
    version,
    about = "Kafka-protocol load generator for Sluice or any Kafka-compatible broker",
    long_about = "Kafka-protocol load generator for Sluice or any Kafka-compatible broker.\n\
                  Throughput is reported in records/s and MB/s (MB = 10^6 bytes); latencies in ms."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Produce records as fast as possible (or at --rate) and report ack latency.
    Produce(ProduceCmd),
    /// Consume records (assigned partitions or a consumer group) and report throughput.
    Consume(ConsumeCmd),
    /// Produce and consume at once; report end-to-end latency.
    E2e(E2eCmd),
    /// Consume-transform-produce with transactions: read --topic in a consumer group, write
    /// each input batch to --output-topic and commit the consumed offsets in the same
    /// transaction; report committed input records/s and commit latency.
    #[command(
        name = "exactly-once",
        long_about = "Consume-transform-produce with transactions (Kafka's exactly-once loop).\n\
            Each worker is a member of --group and has its own transactional producer \
            (transactional id ID-N). Per transaction it fetches up to --txn-records records of \
            its partitions of --topic (read_committed by default), adds the output partitions \
            (AddPartitionsToTxn), writes every input batch unchanged to partition \
            `input partition mod output partitions` of --output-topic, adds the group \
            (AddOffsetsToTxn), commits the next offsets with TxnOffsetCommit and ends with \
            EndTxn. An aborted transaction (--abort-every) is re-read from the last committed \
            offsets. --count stops after that many input records were committed.\n\
            The summary's consume and transactions lines count committed input records; the \
            produce line counts output batches acked (MB = bytes of record batches)."
    )]
    ExactlyOnce(ExactlyOnceCmd),
    /// Consume as members of a share group (KIP-932): each record is acquired by one member
    /// under a lock and acknowledged (accept, release or reject) one by one.
    #[command(
        name = "share-consume",
        long_about = "Consume as members of a share group (KIP-932 queues).\n\
            Each consumer is a member of --group (ShareGroupHeartbeat, client-chosen member id) \
            with one share session on the partitions' leader. It fetches up to --max-records \
            acquired records per ShareFetch and acknowledges each one: a first delivery is \
            rejected with probability --reject-ratio, released with probability --release-ratio, \
            accepted otherwise (the choice is a hash of partition and offset, so it is the same \
            in every run); a redelivered record is accepted. Acknowledgements ride on the next \
            ShareFetch (--ack-mode piggyback) or go in their own ShareAcknowledge (explicit).\n\
            --from sets the group's share.auto.offset.reset and --lock-duration-ms its \
            share.record.lock.duration.ms (IncrementalAlterConfigs) before the members join.\n\
            --hold K makes the first K consumers acquire --max-records records and never \
            acknowledge them; the time from that acquisition to the records' redelivery to \
            another member is the lock-expiry redelivery latency.\n\
            --count stops once that many records were settled (accepted or rejected). \
            End-to-end latency runs from each record's timestamp (sluice-bench's send stamp) \
            to its delivery."
    )]
    ShareConsume(ShareConsumeCmd),
    /// Run a named scenario from perf/scenarios (e.g. produce-max, e2e-latency).
    Scenario(ScenarioCmd),
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Bootstrap broker(s), host:port, comma-separated.
    #[arg(long, default_value = "127.0.0.1:9092", env = "SLUICE_BENCH_BROKERS")]
    pub brokers: String,
    /// Topic to use (created with --partitions if missing).
    #[arg(long, default_value = "sluice-bench")]
    pub topic: String,
    /// Executor threads (one glommio executor per core).
    #[arg(long, default_value_t = 1)]
    pub cores: usize,
    /// CPUs to pin the executors to, e.g. "1" or "2,3" or "2-5" (default: not pinned).
    #[arg(long)]
    pub cpu_list: Option<String>,
    /// Measured run time, e.g. 30s, 2m. Default 30s unless --count is given.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many records (produced, consumed for `consume`, settled for
    /// `share-consume`).
    #[arg(long)]
    pub count: Option<u64>,
    /// Warm-up time whose figures are discarded.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub warmup: Duration,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write this run's charts (throughput, latency percentiles per second) and summary into
    /// DIR/<run>/, and rebuild DIR/index.html showing every run in DIR side by side.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Name of this run in the report [default: UTC time, command and topic].
    #[arg(long, value_name = "NAME")]
    pub report_name: Option<String>,
    /// Connection timeout.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub connect_timeout: Duration,
    /// Print no live lines.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ProduceOpts {
    /// Partitions of the topic when it has to be created.
    #[arg(long, default_value_t = 8)]
    pub partitions: i32,
    /// Replication factor when the topic has to be created.
    #[arg(long, default_value_t = 1)]
    pub replication_factor: i16,
    /// Producer connections in total (spread over the cores).
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Value bytes per record, e.g. 1KiB or 100.
    #[arg(long, value_parser = parse_bytes, default_value = "1KiB")]
    pub size: u64,
    /// Target uncompressed bytes per batch (records per batch = batch-bytes / size).
    #[arg(long, value_parser = parse_bytes, default_value = "64KiB")]
    pub batch_bytes: u64,
    /// At a fixed --rate, a batch is sent when full or when its first record is this old.
    #[arg(long, default_value_t = 5)]
    pub linger_ms: u64,
    /// 0, 1 or all.
    #[arg(long, default_value = "all")]
    pub acks: Acks,
    #[arg(long, value_enum, default_value = "none")]
    pub compression: CompressionArg,
    #[arg(long, value_enum, default_value = "random")]
    pub payload: PayloadArg,
    /// none, random, or a number N of distinct keys.
    #[arg(long, default_value = "none")]
    pub keys: KeysArg,
    /// Records/s (e.g. 50000, 50k) or bytes/s (e.g. 200MB/s); absent = as fast as possible.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<Rate>,
    /// Use an idempotent producer (InitProducerId, sequence numbers).
    #[arg(long)]
    pub idempotent: bool,
    /// Max in-flight produce requests per connection.
    #[arg(long, default_value_t = 5)]
    pub max_in_flight: usize,
    /// Produce request timeout (the broker's wait for acks).
    #[arg(long, default_value_t = 30_000)]
    pub request_timeout_ms: i32,
    /// Use a transactional producer (implies --idempotent): each producer connection runs
    /// transactions of --txn-records records (AddPartitionsToTxn, produce, EndTxn commit).
    #[arg(long)]
    pub transactional: bool,
    #[command(flatten)]
    pub txn: TxnOpts,
}

/// Transactions: ids, size, aborts.
#[derive(Args, Debug, Clone)]
pub struct TxnOpts {
    /// Transactional id prefix: producer (or worker) N uses ID-N [default: sluice-bench-TOPIC].
    #[arg(long, value_name = "ID")]
    pub transactional_id: Option<String>,
    /// Records per transaction (sent in batches of --batch-bytes, the last one holding the
    /// remainder).
    #[arg(long, default_value_t = 100)]
    pub txn_records: u64,
    /// Abort every K-th transaction instead of committing it (0: never).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub abort_every: u64,
    /// transaction.timeout.ms sent with InitProducerId.
    #[arg(long, default_value_t = 60_000)]
    pub transaction_timeout_ms: i32,
}

/// Largest --txn-records: a transaction's batches are planned up front.
pub const TXN_RECORDS_MAX: u64 = 10_000_000;

impl TxnOpts {
    pub fn validate(&self) -> Result<()> {
        if self.txn_records == 0 || self.txn_records > TXN_RECORDS_MAX {
            bail!("--txn-records must be between 1 and {TXN_RECORDS_MAX}");
        }
        if self.transaction_timeout_ms <= 0 {
            bail!("--transaction-timeout-ms must be positive");
        }
        if let Some(id) = &self.transactional_id {
            if id.is_empty() {
                bail!("--transactional-id must not be empty");
            }
        }
        Ok(())
    }

    /// Transactional id of producer or worker `n`.
    pub fn id_of(&self, topic: &str, n: usize) -> String {
        match &self.transactional_id {
            Some(id) => format!("{id}-{n}"),
            None => format!("sluice-bench-{topic}-{n}"),
        }
    }

    /// Whether transaction `k` (0-based) is aborted.
    pub fn aborts(&self, k: u64) -> bool {
        self.abort_every > 0 && (k + 1).is_multiple_of(self.abort_every)
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsolationLevel {
    ReadUncommitted,
    ReadCommitted,
}

impl IsolationLevel {
    pub fn wire(self) -> i8 {
        match self {
            IsolationLevel::ReadUncommitted => 0,
            IsolationLevel::ReadCommitted => 1,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ConsumeOpts {
    /// Consumer group (classic protocol, range assignor). Without it, partitions are assigned
    /// directly and nothing is committed.
    #[arg(long)]
    pub group: Option<String>,
    /// Consumer connections in total (spread over the cores).
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Where to start when there is no committed offset.
    #[arg(long, value_enum, default_value = "earliest")]
    pub from: StartFrom,
    #[arg(long, value_parser = parse_bytes, default_value = "50MB")]
    pub fetch_max_bytes: u64,
    #[arg(long, value_parser = parse_bytes, default_value = "1MiB")]
    pub partition_max_bytes: u64,
    #[arg(long, default_value_t = 500)]
    pub fetch_max_wait_ms: i32,
    /// Verify the CRC-32C of every fetched batch.
    #[arg(long)]
    pub check_crc: bool,
    /// read_committed: only committed transactional records, up to the last stable offset.
    #[arg(long, value_enum, default_value = "read-uncommitted")]
    pub isolation_level: IsolationLevel,
    /// Stop once every partition was read to the end the broker reports (the last stable
    /// offset under read_committed); `consume` without --group only.
    #[arg(long)]
    pub until_end: bool,
}

/// How a share consumer sends its acknowledgements.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// On the next ShareFetch.
    Piggyback,
    /// In a ShareAcknowledge after each fetch.
    Explicit,
}

/// Largest --max-records: the broker acquires at most 10,000 records per ShareFetch.
pub const SHARE_MAX_RECORDS_MAX: i32 = 10_000;

#[derive(Args, Debug, Clone)]
pub struct ShareOpts {
    /// Share group the consumers join.
    #[arg(long)]
    pub group: String,
    /// Share consumers in total (spread over the cores).
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// The group's share.auto.offset.reset: where a share partition with no state starts.
    #[arg(long, value_enum, default_value = "earliest")]
    pub from: StartFrom,
    /// Set the group's share.record.lock.duration.ms (1000 to 3600000).
    #[arg(long)]
    pub lock_duration_ms: Option<u32>,
    /// Fraction of first deliveries rejected (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub reject_ratio: f64,
    /// Fraction of first deliveries released for redelivery (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub release_ratio: f64,
    #[arg(long, value_enum, default_value = "piggyback")]
    pub ack_mode: AckMode,
    /// Records acquired per ShareFetch at most.
    #[arg(long, default_value_t = 500)]
    pub max_records: i32,
    /// The first K consumers acquire and never acknowledge (lock-expiry redelivery probe).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub hold: usize,
    #[arg(long, value_parser = parse_bytes, default_value = "50MB")]
    pub fetch_max_bytes: u64,
    #[arg(long, value_parser = parse_bytes, default_value = "1MiB")]
    pub partition_max_bytes: u64,
    #[arg(long, default_value_t = 500)]
    pub fetch_max_wait_ms: i32,
}

impl ShareOpts {
    pub fn validate(&self) -> Result<()> {
        if self.group.is_empty() {
            bail!("--group must not be empty");
        }
        if self.consumers == 0 {
            bail!("--consumers must be at least 1");
        }
        if self.hold >= self.consumers {
            bail!("--hold must leave at least one consumer that acknowledges");
        }
        for (name, r) in [
            ("--reject-ratio", self.reject_ratio),
            ("--release-ratio", self.release_ratio),
        ] {
            if !(0.0..=1.0).contains(&r) {
                bail!("{name} must be between 0 and 1");
            }
        }
        if self.reject_ratio + self.release_ratio > 1.0 {
            bail!("--reject-ratio and --release-ratio add up to more than 1");
        }
        if let Some(ms) = self.lock_duration_ms {
            if !(1000..=3_600_000).contains(&ms) {
                bail!("--lock-duration-ms must be between 1000 and 3600000");
            }
        }
        if self.max_records < 1 || self.max_records > SHARE_MAX_RECORDS_MAX {
            bail!("--max-records must be between 1 and {SHARE_MAX_RECORDS_MAX}");
        }
        if self.fetch_max_bytes == 0 || self.fetch_max_bytes > i32::MAX as u64 {
            bail!("--fetch-max-bytes out of range");
        }
        if self.partition_max_bytes == 0 || self.partition_max_bytes > i32::MAX as u64 {
            bail!("--partition-max-bytes out of range");
        }
        if self.fetch_max_wait_ms < 0 {
            bail!("--fetch-max-wait-ms must not be negative");
        }
        Ok(())
    }
}

#[derive(Args, Debug, Clone)]
pub struct ShareConsumeCmd {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub share: ShareOpts,
}

#[derive(Args, Debug, Clone)]
pub struct ExactlyOnceOpts {
    /// Topic the records are written to (created with --output-partitions if missing).
    #[arg(long)]
    pub output_topic: String,
    /// Partitions of the output topic when it has to be created [default: the input's].
    #[arg(long)]
    pub output_partitions: Option<i32>,
    /// Replication factor of the output topic when it has to be created.
    #[arg(long, default_value_t = 1)]
    pub replication_factor: i16,
    /// Consumer group of the workers: its committed offsets are the loop's progress.
    #[arg(long, default_value = "sluice-bench-exactly-once")]
    pub group: String,
    /// Workers (group members, each with its own transactional producer), spread over cores.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Where to start when the group has no committed offset.
    #[arg(long, value_enum, default_value = "earliest")]
    pub from: StartFrom,
    /// Isolation level of the input fetches.
    #[arg(long, value_enum, default_value = "read-committed")]
    pub isolation_level: IsolationLevel,
    #[arg(long, value_parser = parse_bytes, default_value = "1MiB")]
    pub partition_max_bytes: u64,
    #[arg(long, default_value_t = 100)]
    pub fetch_max_wait_ms: i32,
    /// Produce request timeout (the broker's wait for acks).
    #[arg(long, default_value_t = 30_000)]
    pub request_timeout_ms: i32,
}

impl ExactlyOnceOpts {
    pub fn validate(&self) -> Result<()> {
        if self.output_topic.is_empty() || self.output_topic.len() > 249 {
            bail!("--output-topic must be 1 to 249 characters");
        }
        if matches!(self.output_partitions, Some(p) if p < 1) {
            bail!("--output-partitions must be at least 1");
        }
        if self.group.is_empty() {
            bail!("--group must not be empty");
        }
        if self.workers == 0 {
            bail!("--workers must be at least 1");
        }
        if self.partition_max_bytes == 0 || self.partition_max_bytes > i32::MAX as u64 {
            bail!("--partition-max-bytes out of range");
        }
        if self.fetch_max_wait_ms < 0 {
            bail!("--fetch-max-wait-ms must not be negative");
        }
        Ok(())
    }
}

#[derive(Args, Debug, Clone)]
pub struct ExactlyOnceCmd {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub txn: TxnOpts,
    #[command(flatten)]
    pub eos: ExactlyOnceOpts,
}

#[derive(Args, Debug, Clone)]
pub struct ProduceCmd {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub produce: ProduceOpts,
}

#[derive(Args, Debug, Clone)]
pub struct ConsumeCmd {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub consume: ConsumeOpts,
}

#[derive(Args, Debug, Clone)]
pub struct E2eCmd {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub produce: ProduceOpts,
    #[command(flatten)]
    pub consume: ConsumeOpts,
}

#[derive(Args, Debug, Clone)]
pub struct ScenarioCmd {
    /// Scenario name (file stem without the sN- prefix, e.g. produce-max) or a path to a file.
    pub name: String,
    /// Read scenario files from this directory instead of the built-in copies of perf/scenarios.
    #[arg(long, visible_alias = "scenario-dir", env = "SLUICE_BENCH_SCENARIOS")]
    pub dir: Option<PathBuf>,
    /// Run only this step (1-based) of a multi-step scenario.
    #[arg(long)]
    pub step: Option<usize>,
    /// Print the commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
    /// Everything else (e.g. --duration 5s --brokers host:port --json f) is appended to each
    /// step's arguments and overrides the scenario's values.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub overrides: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    None,
    Leader,
    All,
}

impl Acks {
    pub fn wire(self) -> i16 {
        match self {
            Acks::None => 0,
            Acks::Leader => 1,
            Acks::All => -1,
        }
    }
}

impl std::str::FromStr for Acks {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "0" => Ok(Acks::None),
            "1" => Ok(Acks::Leader),
            "all" | "-1" => Ok(Acks::All),
            _ => Err(format!("invalid acks {s:?} (use 0, 1 or all)")),
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionArg {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl From<CompressionArg> for Compression {
    fn from(c: CompressionArg) -> Compression {
        match c {
            CompressionArg::None => Compression::None,
            CompressionArg::Gzip => Compression::Gzip,
            CompressionArg::Snappy => Compression::Snappy,
            CompressionArg::Lz4 => Compression::Lz4,
            CompressionArg::Zstd => Compression::Zstd,
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadArg {
    Random,
    Text,
}

impl From<PayloadArg> for Payload {
    fn from(p: PayloadArg) -> Payload {
        match p {
            PayloadArg::Random => Payload::Random,
            PayloadArg::Text => Payload::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeysArg(pub Keys);

impl std::str::FromStr for KeysArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(KeysArg(Keys::None)),
            "random" => Ok(KeysArg(Keys::Random)),
            n => match n.parse::<u32>() {
                Ok(n) if n > 0 => Ok(KeysArg(Keys::Fixed(n))),
                _ => Err(format!(
                    "invalid keys {s:?} (use none, random or a positive number)"
                )),
            },
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    Earliest,
    Latest,
}

/// Parses a CPU list: "1", "0,2", "2-5", "0,4-6".
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>> {
    let mut out = vec![];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (usize, usize) = (a.trim().parse()?, b.trim().parse()?);
            if a > b {
                bail!("invalid CPU range {part:?}");
            }
            out.extend(a..=b);
        } else {
            out.push(
                part.parse()
                    .map_err(|_| anyhow::anyhow!("invalid CPU {part:?} in --cpu-list"))?,
            );
        }
    }
    if out.is_empty() {
        bail!("--cpu-list {s:?} names no CPU");
    }
    Ok(out)
}

impl Common {
    /// Checks cross-flag constraints; returns the CPUs to pin to (one per core), if any.
    pub fn validate(&self) -> Result<Option<Vec<usize>>> {
        if self.cores == 0 || self.cores > 1024 {
            bail!("--cores must be between 1 and 1024");
        }
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            bail!("--brokers is empty");
        }
        if self.topic.is_empty() || self.topic.len() > 249 {
            bail!("--topic must be 1 to 249 characters");
        }
        if self.count == Some(0) {
            bail!("--count must be positive");
        }
        match &self.cpu_list {
            None => Ok(None),
            Some(s) => {
                let cpus = parse_cpu_list(s)?;
                // Configured CPUs, not this process's affinity (we may run under taskset).
                // SAFETY: sysconf has no preconditions.
                let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize;
                if let Some(c) = cpus.iter().find(|&&c| c >= online) {
                    bail!("--cpu-list names CPU {c} but the machine has only {online}");
                }
                Ok(Some(cpus))
            }
        }
    }

    /// The measured run time: --duration, or 30 s without --count, or unbounded with --count.
    pub fn run_time(&self) -> Option<Duration> {
        match (self.duration, self.count) {
            (Some(d), _) => Some(d),
            (None, Some(_)) => None,
            (None, None) => Some(Duration::from_secs(30)),
        }
    }
}

impl ProduceOpts {
    pub fn validate(&self) -> Result<()> {
        if self.partitions < 1 {
            bail!("--partitions must be at least 1");
        }
        if self.producers == 0 {
            bail!("--producers must be at least 1");
        }
        if self.size == 0 || self.size > 8 << 20 {
            bail!("--size must be between 1 byte and 8 MiB");
        }
        if self.batch_bytes > crate::batch::BATCH_BYTES_MAX as u64 {
            bail!(
                "--batch-bytes must be at most {} bytes",
                crate::batch::BATCH_BYTES_MAX
            );
        }
        if self.max_in_flight == 0 {
            bail!("--max-in-flight must be at least 1");
        }
        if self.idempotent && self.acks != Acks::All {
            bail!("--idempotent requires --acks all");
        }
        if (self.idempotent || self.transactional) && self.max_in_flight > 5 {
            bail!("--idempotent allows at most 5 in-flight requests per connection");
        }
        if self.transactional {
            if self.acks != Acks::All {
                bail!("--transactional requires --acks all");
            }
            if self.rate.is_some() {
                bail!("--transactional runs as fast as it can: no --rate");
            }
            self.txn.validate()?;
        }
        Ok(())
    }

    /// Records per full batch.
    pub fn records_per_batch(&self) -> usize {
        ((self.batch_bytes / self.size.max(1)) as usize).max(1)
    }
}

impl ConsumeOpts {
    pub fn validate(&self) -> Result<()> {
        if self.consumers == 0 {
            bail!("--consumers must be at least 1");
        }
        if self.fetch_max_bytes == 0 || self.fetch_max_bytes > i32::MAX as u64 {
            bail!("--fetch-max-bytes out of range");
        }
        if self.partition_max_bytes == 0 || self.partition_max_bytes > i32::MAX as u64 {
            bail!("--partition-max-bytes out of range");
        }
        if self.fetch_max_wait_ms < 0 {
            bail!("--fetch-max-wait-ms must not be negative");
        }
        if let Some(g) = &self.group {
            if g.is_empty() {
                bail!("--group must not be empty");
            }
            if self.until_end {
                bail!("--until-end reads assigned partitions: not with --group");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sluice-bench").chain(args.iter().copied()))
    }

    #[test]
    fn produce_flags_parse_with_units() {
        let c = parse(&[
            "produce",
            "--size",
            "1KiB",
            "--acks",
            "1",
            "--rate",
            "200MB/s",
            "--compression",
            "lz4",
            "--keys",
            "16",
            "--duration",
            "10s",
            "--cpu-list",
            "0",
        ])
        .unwrap();
        let Command::Produce(p) = c.command else {
            panic!()
        };
        assert_eq!(p.produce.size, 1024);
        assert_eq!(p.produce.acks, Acks::Leader);
        assert_eq!(p.produce.rate, Some(Rate::BytesPerSec(200e6)));
        assert_eq!(p.produce.keys, KeysArg(Keys::Fixed(16)));
        assert_eq!(p.common.run_time(), Some(Duration::from_secs(10)));
        assert_eq!(p.produce.records_per_batch(), 64);
        assert_eq!(p.common.validate().unwrap(), Some(vec![0]));
    }

    #[test]
    fn later_flag_overrides_earlier_one() {
        let c = parse(&["produce", "--duration", "30s", "--duration", "2s"]).unwrap();
        let Command::Produce(p) = c.command else {
            panic!()
        };
        assert_eq!(p.common.duration, Some(Duration::from_secs(2)));
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse(&["produce", "--acks", "2"]).is_err());
        assert!(parse(&["produce", "--size", "big"]).is_err());
        assert!(parse(&["produce", "--no-such-flag"]).is_err());
        let c = parse(&["produce", "--idempotent", "--acks", "1"]).unwrap();
        let Command::Produce(p) = c.command else {
            panic!()
        };
        assert!(p.produce.validate().is_err());
        assert!(parse_cpu_list("3-1").is_err());
        assert_eq!(parse_cpu_list("0,2-3").unwrap(), vec![0, 2, 3]);
    }

    #[test]
    fn count_without_duration_runs_unbounded() {
        let c = parse(&["consume", "--count", "100"]).unwrap();
        let Command::Consume(k) = c.command else {
            panic!()
        };
        assert_eq!(k.common.run_time(), None);
    }
}
