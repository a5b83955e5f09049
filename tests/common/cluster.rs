//! A cluster of real `sluice` processes: node i (1-based) listens for Kafka clients and for the
//! controller's raft traffic on 127.0.0.i when that address can be bound (Linux routes all of
//! 127/8 to loopback), else every node on 127.0.0.1 with its own ports. Each node has its own
//! data dir, every node is a controller voter, and every wait is bounded and polls a condition
//! the nodes report over the Kafka protocol (Metadata).

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::history;
use super::raw::Raw;
use super::{Broker, BrokerOptions};

/// How long a condition of a cluster test may take (elections take about a second; start-up
/// of three processes on a loaded machine a few).
pub const CLUSTER_WAIT_MAX: Duration = Duration::from_secs(30);

/// The broker flag of `__consumer_offsets`' replication factor.
pub const OFFSETS_RF_FLAG: &str = "--offsets-topic-replication-factor";

/// Metadata version the harness speaks (controller id, topic ids).
const METADATA_VERSION: i16 = 12;

/// The host of node `id`: 127.0.0.<id> if it binds here, else 127.0.0.1.
fn host_of(id: i32) -> String {
    let own = format!("127.0.0.{id}");
    if TcpListener::bind((own.as_str(), 0)).is_ok() {
        own
    } else {
        "127.0.0.1".to_string()
    }
}

/// A port on `host` that was free a moment ago.
fn free_addr(host: &str) -> SocketAddr {
    let port = super::pick_port(host, |_| true);
    format!("{host}:{port}").parse().expect("a socket address")
}

/// An internal listener address on `host` whose port and the next one (shard 0's partition
/// transport, internal port + 1) were both free a moment ago, neither of them in `taken`.
fn free_internal_addr(host: &str, taken: &[SocketAddr]) -> SocketAddr {
    let used = |port: u16| {
        taken
            .iter()
            .any(|t| t.ip().to_string() == host && t.port() == port)
    };
    let port = super::pick_port(host, |port| {
        port.checked_add(1).is_some_and(|next| {
            !used(port) && !used(next) && TcpListener::bind((host, next)).is_ok()
        })
    });
    format!("{host}:{port}").parse().expect("a socket address")
}

pub struct Cluster {
    /// Node i is `nodes[i - 1]`.
    pub nodes: Vec<Broker>,
    /// The `--controllers` value every node runs with.
    pub controllers: String,
    /// Node i's internal (controller) listener is `internal[i - 1]`.
    pub internal: Vec<SocketAddr>,
    /// Shards (cores) of each node.
    pub shards: usize,
    /// Node i's Prometheus endpoint (`--metrics-listen`) is `metrics[i - 1]`.
    pub metrics: Vec<SocketAddr>,
}

impl Cluster {
    /// Starts `n` nodes, each a controller voter, and waits until each accepts connections.
    pub fn start(n: i32) -> Cluster {
        Cluster::start_with(n, BrokerOptions::default())
    }

    /// Starts `n` nodes with `options`. Unless the options set
    /// `--offsets-topic-replication-factor`, `__consumer_offsets` gets one replica per
    /// partition here: its 50 raft groups per node (the default, three replicas) would load a
    /// shared test machine for tests that are not about groups (`tests/cluster_groups.rs`
    /// covers the replicated one).
    pub fn start_with(n: i32, mut options: BrokerOptions) -> Cluster {
        if !options.extra_args.iter().any(|a| a == OFFSETS_RF_FLAG) {
            options = options.args([OFFSETS_RF_FLAG, "1"]);
        }
        let hosts: Vec<String> = (1..=n).map(host_of).collect();
        let kafka: Vec<SocketAddr> = hosts.iter().map(|h| free_addr(h)).collect();
        let mut taken = kafka.clone();
        let mut internal = Vec::new();
        for h in &hosts {
            let a = free_internal_addr(h, &taken);
            taken.push(a);
            taken.push(SocketAddr::new(a.ip(), a.port() + 1));
            internal.push(a);
        }
        let metrics: Vec<SocketAddr> = hosts
            .iter()
            .map(|h| {
                let port = super::pick_port(h, |port| {
                    !taken
                        .iter()
                        .any(|t| t.ip().to_string() == *h && t.port() == port)
                });
                let a: SocketAddr = format!("{h}:{port}").parse().expect("a socket address");
                taken.push(a);
                a
            })
            .collect();
        let controllers = (1..=n)
            .map(|id| format!("{id}@{}", internal[id as usize - 1]))
            .collect::<Vec<_>>()
            .join(",");
        let shards = options.cores;
        let nodes = (1..=n)
            .map(|id| {
                options
                    .clone()
                    .listen(kafka[id as usize - 1])
                    .args([
                        "--node-id".to_string(),
                        id.to_string(),
                        "--controllers".to_string(),
                        controllers.clone(),
                        "--metrics-listen".to_string(),
                        metrics[id as usize - 1].to_string(),
                    ])
                    .start()
            })
            .collect();
        Cluster {
            nodes,
            controllers,
            internal,
            shards,
            metrics,
        }
    }

    /// The sum over node `id`'s shards of the metric `name` (a family without other labels),
    /// read from its `/metrics`; `None` if the node cannot be reached or does not report it.
    pub fn metric(&self, id: i32, name: &str) -> Option<f64> {
        super::scrape_metric(self.metrics[id as usize - 1], name)
    }

    /// Node `id`'s address and internal ports, for network partitions.
    pub fn node_addrs(&self, id: i32) -> super::netpart::NodeAddrs {
        let shards = u16::try_from(self.shards).expect("shard count");
        super::netpart::NodeAddrs::new(id, self.internal[id as usize - 1], shards)
    }

    pub fn node(&self, id: i32) -> &Broker {
        &self.nodes[id as usize - 1]
    }

    pub fn node_mut(&mut self, id: i32) -> &mut Broker {
        &mut self.nodes[id as usize - 1]
    }

    pub fn ids(&self) -> Vec<i32> {
        (1..=self.nodes.len() as i32).collect()
    }

    /// Every node's Kafka address, comma-separated.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(|b| b.bootstrap())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Metadata (all topics) as node `id` answers it; `None` if it cannot be reached.
    pub fn metadata(&self, id: i32) -> Option<MetadataResponse> {
        let addr = self.node(id).addr;
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        let mut raw = Raw::connect(addr);
        raw.try_call(
            ApiKey::Metadata,
            METADATA_VERSION,
            &MetadataRequest::default().with_topics(None),
        )
    }

    /// The controller every node of `among` names, once they all name the same one (a node of
    /// `among`) and see every node of `among` registered.
    pub fn agreed_controller(&self, among: &[i32]) -> Option<i32> {
        let mut seen = None;
        for id in among {
            let m = self.metadata(*id)?;
            let c = m.controller_id.0;
            if !among.contains(&c) || seen.is_some_and(|s| s != c) {
                return None;
            }
            let registered: Vec<i32> = m.brokers.iter().map(|b| b.node_id.0).collect();
            if among.iter().any(|n| !registered.contains(n)) {
                return None;
            }
            seen = Some(c);
        }
        seen
    }

    /// Waits (bounded by `CLUSTER_WAIT_MAX`) until `cond` gives a value; panics naming `what`.
    pub fn wait_for<T>(&self, what: &str, mut cond: impl FnMut(&Cluster) -> Option<T>) -> T {
        let deadline = Instant::now() + CLUSTER_WAIT_MAX;
        loop {
            if let Some(v) = cond(self) {
                return v;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .enumerate()
                    .map(|(i, b)| format!("--- node {} stderr:\n{}", i + 1, b.stderr()))
                    .collect();
                panic!(
                    "{what}: not within {CLUSTER_WAIT_MAX:?}\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every node of `among` names the same controller and sees them all
    /// registered; returns the controller.
    pub fn wait_controller(&self, among: &[i32]) -> i32 {
        self.wait_for("a controller agreed by every node", |c| {
            c.agreed_controller(among)
        })
    }

    /// The leader node of each partition of `topic` as node `id` reports it, once it reports
    /// `partitions` partitions.
    pub fn leaders(&self, id: i32, topic: &str, partitions: usize) -> Option<Vec<i32>> {
        let m = self.metadata(id)?;
        let t = m
            .topics
            .iter()
            .find(|t| t.name.as_ref().map(|n| n.as_str()) == Some(topic))?;
        if t.error_code != 0 || t.partitions.len() != partitions {
            return None;
        }
        let mut ps: Vec<_> = t.partitions.iter().collect();
        ps.sort_by_key(|p| p.partition_index);
        Some(ps.iter().map(|p| p.leader_id.0).collect())
    }
}

/// librdkafka settings of the cluster tests' clients: IPv4 (the nodes listen on 127.0.0.i) and
/// a socket timeout that outlasts an election.
pub fn client_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .set("socket.timeout.ms", "20000");
    c
}

/// Reads partition 0 of `topic` from the beginning through `bootstrap` until every value of
/// `acked` has been read (bounded by `within`; the history check reports what is missing),
/// then half a second more: (offset, value) in the order read. Consumer errors (a node still
/// coming back) are reported and read past.
pub fn read_back(
    bootstrap: &str,
    topic: &str,
    acked: &[history::Acked],
    within: Duration,
) -> Vec<(i64, String)> {
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", "cluster-tests-history")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "error")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let mut want: BTreeSet<&str> = acked.iter().map(|a| a.value.as_str()).collect();
    let mut got = Vec::new();
    let deadline = Instant::now() + within;
    let mut quiet_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now > deadline || quiet_until.is_some_and(|q| now > q) {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                let v = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                want.remove(v.as_str());
                got.push((m.offset(), v));
            }
            Some(Err(e)) => eprintln!("read back: consumer error (read past): {e}"),
        }
        if want.is_empty() && quiet_until.is_none() {
            quiet_until = Some(Instant::now() + Duration::from_millis(500));
        }
    }
    got
}

/// The bytes of every segment file of partition 0 of `topic` on node `id`, in name order.
pub fn segment_bytes(c: &Cluster, id: i32, topic: &str) -> Vec<u8> {
    let dir = c.node(id).data_dir().join(format!("{topic}-0"));
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|f| f.extension().is_some_and(|e| e == "log"));
    files.sort();
    files
        .iter()
        .flat_map(|f| std::fs::read(f).unwrap_or_default())
        .collect()
}

/// Waits until every node of `ids` holds the same bytes in partition 0 of `topic`. Trailing
/// zeros are left out of the comparison: a replica whose tail was cut (conflict truncation, or
/// a crash recovery, which cuts the active segment at its log end) shortened its file and
/// preallocates it again from there, so its zero-filled space past the log end need not match
/// the others'.
pub fn wait_logs_identical(c: &Cluster, ids: &[i32], topic: &str) {
    c.wait_for("every replica's log holds the same bytes", |c| {
        let logs: Vec<Vec<u8>> = ids
            .iter()
            .map(|id| {
                let mut b = segment_bytes(c, *id, topic);
                let end = b.iter().rposition(|x| *x != 0).map_or(0, |i| i + 1);
                b.truncate(end);
                b
            })
            .collect();
        (!logs[0].is_empty() && logs.windows(2).all(|w| w[0] == w[1])).then_some(())
    });
}
