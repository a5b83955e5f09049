//! Topics, their configs, the partition → shard (and, in a cluster, → node) assignment and the
//! registered brokers. The same [`Record`]s and [`MetadataImage::apply`] serve both stores: on
//! a single node a checksummed record log in the data dir (`__meta/metadata.log`), replayed at
//! start and compacted into a single snapshot record when it grows; in a cluster the entries of
//! the controller's raft log (`controller`), whose snapshot is [`MetadataImage::snapshot_record`]. Data and files only: the metadata owner on shard 0 (the
//! `admin` module, above this one) is the only writer; every shard reads the current immutable
//! [`MetadataImage`] through an `ArcSwap` in the shared context, so a reader always sees one
//! consistent view.
//!
//! Record framing: `[len: u32 LE][crc32 (crc32fast) of payload: u32 LE][payload: JSON]`. A torn
//! or corrupt tail record is dropped (it was never acknowledged: the writer fsyncs before
//! answering).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub mod configs;

/// Records past this in the log trigger a compaction into one snapshot record.
const LOG_RECORDS_MAX: usize = 1000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopicMeta {
    pub name: String,
    /// KIP-516 topic id.
    pub id: [u8; 16],
    /// Owner shard (before reduction modulo the running shard count) of each partition.
    pub shards: Vec<u32>,
    /// Topic-level overrides only; defaults come from the broker config.
    pub configs: BTreeMap<String, String>,
    pub internal: bool,
    /// In a cluster, the node that holds each partition (one replica for now); empty on a single
    /// node, where every partition is local. Not written when empty, so a single node's
    /// metadata log is as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<i32>,
    /// In a cluster, every replica of each partition, preferred leader first (so `nodes[p]` is
    /// `replicas[p][0]`); the partition's shard index `shards[p]` is the same on each of them.
    /// Empty when every partition has the one replica `nodes[p]` (and then not written, so
    /// records of topics with one replica are as before).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<Vec<i32>>,
    /// The raft group id of each partition with replicas (assigned by the controller from
    /// [`MetadataImage::next_group`], never reused); empty like `replicas`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<u64>,
}

/// A broker of a cluster, as it registered with the controller.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BrokerInfo {
    pub id: i32,
    /// Where Kafka clients reach it (its advertised address).
    pub host: String,
    pub port: u16,
    /// Its shard count (partitions are given a shard below it).
    pub shards: u32,
    /// Its rack (`--rack`, Kafka's `broker.rack`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rack: Option<String>,
}

impl TopicMeta {
    pub fn partition_count(&self) -> i32 {
        self.shards.len() as i32
    }

    /// The nodes holding a replica of `partition`, preferred leader first; empty on a single
    /// node (every partition is local there) and for a partition that does not exist.
    pub fn replica_nodes(&self, partition: i32) -> &[i32] {
        let Ok(p) = usize::try_from(partition) else {
            return &[];
        };
        if self.replicas.is_empty() {
            self.nodes.get(p..p + 1).unwrap_or(&[])
        } else {
            self.replicas.get(p).map(Vec::as_slice).unwrap_or(&[])
        }
    }

    /// The number of replicas of each partition: 1 unless the topic was placed with more.
    pub fn replication_factor(&self) -> usize {
        self.replicas.first().map_or(1, Vec::len)
    }
}

/// One change of the metadata: a record of the single node's metadata log, or the data of one
/// entry of the controller's raft log. JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Record {
    Snapshot {
        topics: Vec<TopicMeta>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        brokers: Vec<BrokerInfo>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        fenced: Vec<i32>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        broker_configs: BTreeMap<String, BTreeMap<String, String>>,
        #[serde(default, skip_serializing_if = "is_zero")]
        next_group: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        leaders: Vec<PartitionLeader>,
    },
    /// Ignored when a topic of that name exists (the first creation wins).
    CreateTopic(TopicMeta),
    DeleteTopic {
        name: String,
    },
    AddPartitions {
        name: String,
        shards: Vec<u32>,
        /// In a cluster, the node of each new partition.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        nodes: Vec<i32>,
        /// In a cluster, the replicas of each new partition when the topic has more than one
        /// (as [`TopicMeta::replicas`]).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        replicas: Vec<Vec<i32>>,
        /// Their raft group ids (as [`TopicMeta::groups`]).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        groups: Vec<u64>,
    },
    /// A broker joined the cluster, or came back with other addresses or shards.
    RegisterBroker(BrokerInfo),
    /// The controller leader has not heard from this broker for a while: it leads nothing
    /// and gets no new partitions until it is unfenced.
    FenceBroker {
        id: i32,
    },
    /// A fenced broker is heard from again.
    UnfenceBroker {
        id: i32,
    },
    SetConfigs {
        name: String,
        configs: BTreeMap<String, String>,
    },
    /// Dynamic broker configs (AlterConfigs on a broker resource) of `scope`: a node id, or ""
    /// for the cluster-wide default. Keyed by the topic config they are the default of
    /// (`retention.ms` for `log.retention.ms`); they replace the scope's previous ones.
    SetBrokerConfigs {
        scope: String,
        configs: BTreeMap<String, String>,
    },
    /// A replicated partition's leader reported its leadership (on election, or when its ISR
    /// changed): what nodes holding no replica of the partition answer in Metadata. Ignored
    /// for an unknown topic or partition, and when older (lower epoch) than the one recorded.
    PartitionLeader(PartitionLeader),
}

/// The leader of one replicated partition as it reported itself to the controller.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartitionLeader {
    pub topic: String,
    pub partition: i32,
    pub leader: i32,
    /// The raft term it leads in (the Kafka leader epoch).
    pub epoch: i32,
    /// The in-sync replicas it computed from raft progress.
    pub isr: Vec<i32>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("metadata records always serialize")
    }

    /// `None` for bytes that are not a record.
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        serde_json::from_slice(bytes).ok()
    }
}

/// One consistent view of all topics (and, in a cluster, of the registered brokers).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetadataImage {
    pub topics: BTreeMap<String, Arc<TopicMeta>>,
    pub brokers: BTreeMap<i32, BrokerInfo>,
    /// Registered brokers the controller has fenced (not heard from).
    pub fenced: BTreeSet<i32>,
    /// Dynamic broker configs by scope (a node id, or "" for the cluster-wide default), keyed
    /// by the topic config they are the default of.
    pub broker_configs: BTreeMap<String, BTreeMap<String, String>>,
    /// Above every partition raft group id ever assigned (deleted topics included), so ids are
    /// never reused; 0 until the first. Group 0 is the controller's.
    pub next_group: u64,
    /// The last leadership each replicated partition's leader reported, by topic and
    /// partition.
    pub leaders: BTreeMap<String, BTreeMap<i32, PartitionLeader>>,
}

impl MetadataImage {
    pub fn topic(&self, name: &str) -> Option<&Arc<TopicMeta>> {
        self.topics.get(name)
    }
    pub fn topic_by_id(&self, id: &[u8; 16]) -> Option<&Arc<TopicMeta>> {
        self.topics.values().find(|t| &t.id == id)
    }
    /// The whole image as one record: applied to an empty image, it gives this one.
    pub fn snapshot_record(&self) -> Record {
        Record::Snapshot {
            topics: self.topics.values().map(|t| (**t).clone()).collect(),
            brokers: self.brokers.values().cloned().collect(),
            fenced: self.fenced.iter().copied().collect(),
            broker_configs: self.broker_configs.clone(),
            next_group: self.next_group,
            leaders: self
                .leaders
                .values()
                .flat_map(|ps| ps.values().cloned())
                .collect(),
        }
    }

    /// Records a reported leadership unless the partition is unknown or a later one is known.
    fn apply_leader(&mut self, l: PartitionLeader) {
        let known = self
            .topics
            .get(&l.topic)
            .is_some_and(|t| l.partition >= 0 && l.partition < t.partition_count());
        if !known {
            return;
        }
        let ps = self.leaders.entry(l.topic.clone()).or_default();
        if ps.get(&l.partition).is_none_or(|o| o.epoch <= l.epoch) {
            ps.insert(l.partition, l);
        }
    }

    /// The leadership last reported for partition `p` of `topic`.
    pub fn leader_of(&self, topic: &str, p: i32) -> Option<&PartitionLeader> {
        self.leaders.get(topic)?.get(&p)
    }

    /// The raft group id for the next replicated partition.
    pub fn first_free_group(&self) -> u64 {
        self.next_group.max(1)
    }

    fn note_groups(&mut self, groups: &[u64]) {
        if let Some(max) = groups.iter().max() {
            self.next_group = self.next_group.max(max.saturating_add(1));
        }
    }

    /// The registered brokers that are not fenced, in id order.
    pub fn live_brokers(&self) -> impl Iterator<Item = &BrokerInfo> {
        self.brokers
            .values()
            .filter(|b| !self.fenced.contains(&b.id))
    }

    pub fn apply(&mut self, r: Record) {
        match r {
            Record::Snapshot {
                topics,
                brokers,
                fenced,
                broker_configs,
                next_group,
                leaders,
            } => {
                self.topics = topics
                    .into_iter()
                    .map(|t| (t.name.clone(), Arc::new(t)))
                    .collect();
                self.brokers = brokers.into_iter().map(|b| (b.id, b)).collect();
                self.fenced = fenced.into_iter().collect();
                self.broker_configs = broker_configs;
                self.next_group = next_group;
                self.leaders = BTreeMap::new();
                for l in leaders {
                    self.apply_leader(l);
                }
                let groups: Vec<u64> = self
                    .topics
                    .values()
                    .flat_map(|t| t.groups.iter().copied())
                    .collect();
                self.note_groups(&groups);
            }
            Record::CreateTopic(t) => {
                if !self.topics.contains_key(&t.name) {
                    self.note_groups(&t.groups);
                }
                self.topics
                    .entry(t.name.clone())
                    .or_insert_with(|| Arc::new(t));
            }
            Record::DeleteTopic { name } => {
                self.topics.remove(&name);
                self.leaders.remove(&name);
            }
            Record::PartitionLeader(l) => self.apply_leader(l),
            Record::AddPartitions {
                name,
                shards,
                nodes,
                replicas,
                groups,
            } => {
                if let Some(t) = self.topics.get_mut(&name) {
                    let t = Arc::make_mut(t);
                    t.shards.extend(shards);
                    t.nodes.extend(nodes);
                    t.replicas.extend(replicas);
                    t.groups.extend(groups.iter().copied());
                    self.note_groups(&groups);
                }
            }
            Record::RegisterBroker(b) => {
                self.brokers.insert(b.id, b);
            }
            Record::FenceBroker { id } => {
                if self.brokers.contains_key(&id) {
                    self.fenced.insert(id);
                }
            }
            Record::UnfenceBroker { id } => {
                self.fenced.remove(&id);
            }
            Record::SetConfigs { name, configs } => {
                if let Some(t) = self.topics.get_mut(&name) {
                    Arc::make_mut(t).configs = configs;
                }
            }
            Record::SetBrokerConfigs { scope, configs } => {
                if configs.is_empty() {
                    self.broker_configs.remove(&scope);
                } else {
                    self.broker_configs.insert(scope, configs);
                }
            }
        }
    }
}

/// The writer side: owns the metadata log file. Lives on shard 0.
pub struct MetadataStore {
    dir: PathBuf,
    file: File,
    records: usize,
    image: MetadataImage,
}

fn frame(r: &Record) -> Vec<u8> {
    let payload = r.encode();
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Replays the records of a metadata log: the image, the record count, and the length of the
/// valid prefix. Stops at the first torn, corrupt or undecodable record; a declared length is
/// only trusted once the bytes it covers are there (nothing is allocated by it).
fn replay(buf: &[u8]) -> (MetadataImage, usize, usize) {
    let mut image = MetadataImage::default();
    let mut at = 0usize;
    let mut records = 0usize;
    while let Some((head, rest)) = buf
        .get(at..)
        .and_then(|b| b.split_first_chunk::<RECORD_HEADER_BYTES>())
    {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let Some(payload) = rest.get(..len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        match Record::decode(payload) {
            Some(r) => image.apply(r),
            None => break,
        }
        records += 1;
        at += RECORD_HEADER_BYTES + len;
    }
    (image, records, at)
}

/// Bytes before each record's payload: length and CRC, u32 LE each.
const RECORD_HEADER_BYTES: usize = 8;

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The file work of one change of the metadata log ([`MetadataStore::stage`]).
pub struct MetadataWrite {
    /// The log, open for appending (a second descriptor of the store's).
    file: File,
    frame: Vec<u8>,
    /// The log's directory and the snapshot record that replaces it, when it is due.
    rewrite: Option<(PathBuf, Vec<u8>)>,
}

/// What [`MetadataWrite::run`] did, for [`MetadataStore::staged_written`].
pub struct MetadataWritten {
    /// The rewritten log, open for appending, if it was rewritten; the rewrite's error if that
    /// failed.
    rewritten: std::io::Result<Option<File>>,
}

impl MetadataWrite {
    /// Appends the record and fdatasyncs it, then rewrites the log if due. Blocks: the broker
    /// runs it on the blocking thread pool. An error means the record may not be durable.
    pub fn run(self) -> std::io::Result<MetadataWritten> {
        (&self.file).write_all(&self.frame)?;
        self.file.sync_data()?;
        let rewritten = match self.rewrite {
            Some((dir, snap)) => rewrite_log(&dir, &snap).map(Some),
            None => Ok(None),
        };
        Ok(MetadataWritten { rewritten })
    }
}

/// Rewrites the log as one snapshot record: write a temp file, fsync, rename over the log,
/// fsync the directory so the rename itself is durable. Returns the new log, open for appending.
fn rewrite_log(dir: &Path, snap_frame: &[u8]) -> std::io::Result<File> {
    let tmp = dir.join("metadata.log.tmp");
    let path = dir.join("metadata.log");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(snap_frame)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    sync_dir(dir)?;
    OpenOptions::new().append(true).open(&path)
}

impl MetadataStore {
    /// Opens (or creates) the metadata log under `data_dir/__meta` and replays it.
    pub fn open(data_dir: &Path) -> std::io::Result<MetadataStore> {
        let dir = data_dir.join("__meta");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("metadata.log");
        let mut buf = Vec::new();
        if path.exists() {
            File::open(&path)?.read_to_end(&mut buf)?;
        }
        let (image, records, at) = replay(&buf);
        if at < buf.len() {
            tracing::warn!(
                path = %path.display(),
                kept_bytes = at,
                dropped_bytes = buf.len() - at,
                "metadata log had a torn or corrupt tail; truncated"
            );
            let f = OpenOptions::new().write(true).open(&path)?;
            f.set_len(at as u64)?;
            f.sync_all()?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        sync_dir(&dir)?;
        Ok(MetadataStore {
            dir,
            file,
            records,
            image,
        })
    }

    pub fn image(&self) -> &MetadataImage {
        &self.image
    }

    /// Appends `r` durably and applies it, on the calling thread (tests, tools; the broker
    /// stages the file work off its executor: [`MetadataStore::stage`]).
    fn append(&mut self, r: Record) -> std::io::Result<()> {
        let written = self.stage(&r)?.run()?;
        self.staged_written(r, written)
    }

    /// The file work of appending `r` — its frame appended and fdatasynced, then, when the log
    /// is due for it, its rewrite as one snapshot record of the image with `r` applied — to be
    /// run elsewhere ([`MetadataWrite::run`], blocking) and handed back to
    /// [`MetadataStore::staged_written`]. The store does not change meanwhile: the caller
    /// runs one staged write at a time.
    pub fn stage(&self, r: &Record) -> std::io::Result<MetadataWrite> {
        let rewrite = (self.records + 1 > LOG_RECORDS_MAX).then(|| {
            let mut next = self.image.clone();
            next.apply(r.clone());
            (self.dir.clone(), frame(&next.snapshot_record()))
        });
        Ok(MetadataWrite {
            file: self.file.try_clone()?,
            frame: frame(r),
            rewrite,
        })
    }

    /// `r`, staged by [`MetadataStore::stage`], is durable in the log: applies it. Returns the
    /// error of the log's rewrite, if that failed (the record itself is in the log; the next
    /// change tries the rewrite again).
    pub fn staged_written(&mut self, r: Record, w: MetadataWritten) -> std::io::Result<()> {
        self.image.apply(r);
        match w.rewritten {
            Ok(Some(file)) => {
                self.file = file;
                self.records = 1;
                Ok(())
            }
            Ok(None) => {
                self.records += 1;
                Ok(())
            }
            Err(e) => {
                self.records += 1;
                Err(e)
            }
        }
    }

    pub fn create_topic(&mut self, t: TopicMeta) -> std::io::Result<()> {
        self.append(Record::CreateTopic(t))
    }
    pub fn delete_topic(&mut self, name: &str) -> std::io::Result<()> {
        self.append(Record::DeleteTopic {
            name: name.to_string(),
        })
    }
    pub fn add_partitions(&mut self, name: &str, shards: Vec<u32>) -> std::io::Result<()> {
        self.append(Record::AddPartitions {
            name: name.to_string(),
            shards,
            replicas: Vec::new(),
            groups: Vec::new(),
            nodes: Vec::new(),
        })
    }
    pub fn set_broker_configs(
        &mut self,
        scope: &str,
        configs: BTreeMap<String, String>,
    ) -> std::io::Result<()> {
        self.append(Record::SetBrokerConfigs {
            scope: scope.to_string(),
            configs,
        })
    }
    pub fn set_configs(
        &mut self,
        name: &str,
        configs: BTreeMap<String, String>,
    ) -> std::io::Result<()> {
        self.append(Record::SetConfigs {
            name: name.to_string(),
            configs,
        })
    }
}

/// Kafka's topic name rule: 1-249 chars of [a-zA-Z0-9._-], not "." or "..".
pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str, n: u32) -> TopicMeta {
        TopicMeta {
            name: name.into(),
            id: [7; 16],
            shards: (0..n).collect(),
            configs: BTreeMap::new(),
            internal: false,
            nodes: Vec::new(),
            replicas: Vec::new(),
            groups: Vec::new(),
        }
    }

    #[test]
    fn single_node_records_are_written_as_before_and_cluster_records_round_trip() {
        // No `nodes`, no `brokers`: a single node's log reads as it did before clusters.
        let json = String::from_utf8(Record::CreateTopic(topic("a", 1)).encode()).unwrap();
        assert!(!json.contains("nodes"), "{json}");
        let json = String::from_utf8(MetadataImage::default().snapshot_record().encode()).unwrap();
        assert_eq!(json, r#"{"Snapshot":{"topics":[]}}"#);
        let old = br#"{"AddPartitions":{"name":"a","shards":[3]}}"#;
        assert!(Record::decode(old).is_some());

        let mut image = MetadataImage::default();
        let mut t = topic("a", 2);
        t.nodes = vec![1, 2];
        for r in [
            Record::RegisterBroker(BrokerInfo {
                id: 1,
                host: "h1".into(),
                port: 9092,
                shards: 2,
                rack: None,
            }),
            Record::CreateTopic(t),
            Record::AddPartitions {
                name: "a".into(),
                shards: vec![0],
                nodes: vec![3],
                replicas: Vec::new(),
                groups: Vec::new(),
            },
            Record::FenceBroker { id: 1 },
            // Unknown brokers are not fenced.
            Record::FenceBroker { id: 9 },
        ] {
            image.apply(Record::decode(&r.encode()).unwrap());
        }
        // A second creation of the same name changes nothing.
        image.apply(Record::CreateTopic(topic("a", 5)));
        assert_eq!(image.topic("a").unwrap().nodes, vec![1, 2, 3]);
        assert_eq!(image.topic("a").unwrap().shards, vec![0, 1, 0]);
        assert_eq!(image.fenced.iter().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(image.live_brokers().count(), 0);
        let mut again = MetadataImage::default();
        again.apply(Record::decode(&image.snapshot_record().encode()).unwrap());
        assert_eq!(again, image);
    }

    #[test]
    fn replica_lists_round_trip_and_default_to_the_node() {
        let mut t = topic("r", 2);
        t.nodes = vec![1, 2];
        assert_eq!(t.replica_nodes(1), [2]);
        assert_eq!(t.replication_factor(), 1);
        t.replicas = vec![vec![1, 2, 3], vec![2, 3, 1]];
        t.groups = vec![1, 2];
        let mut image = MetadataImage::default();
        for r in [
            Record::CreateTopic(t),
            Record::AddPartitions {
                name: "r".into(),
                shards: vec![1],
                nodes: vec![3],
                replicas: vec![vec![3, 1, 2]],
                groups: vec![7],
            },
            Record::DeleteTopic { name: "r".into() },
        ] {
            image.apply(Record::decode(&r.encode()).unwrap());
        }
        // Group ids are never reused, even after the topic is deleted.
        assert!(image.topic("r").is_none());
        assert_eq!(image.first_free_group(), 8);
        let mut t = topic("r", 2);
        t.replicas = vec![vec![1, 2, 3], vec![2, 3, 1]];
        t.groups = vec![8, 9];
        image.apply(Record::CreateTopic(t));
        image.apply(Record::AddPartitions {
            name: "r".into(),
            shards: vec![1],
            nodes: vec![3],
            replicas: vec![vec![3, 1, 2]],
            groups: vec![10],
        });
        let t = image.topic("r").unwrap();
        assert_eq!(t.groups, [8, 9, 10]);
        assert_eq!(t.replica_nodes(2), [3, 1, 2]);
        assert_eq!(t.replica_nodes(3), [] as [i32; 0]);
        assert_eq!(t.replica_nodes(-1), [] as [i32; 0]);
        assert_eq!(t.replication_factor(), 3);
        let mut again = MetadataImage::default();
        again.apply(Record::decode(&image.snapshot_record().encode()).unwrap());
        assert_eq!(again, image);
        assert_eq!(again.first_free_group(), 11);
    }

    #[test]
    fn replays_after_reopen_and_compacts() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut s = MetadataStore::open(d.path()).unwrap();
            s.create_topic(topic("a", 2)).unwrap();
            s.create_topic(topic("b", 1)).unwrap();
            s.add_partitions("a", vec![5]).unwrap();
            s.delete_topic("b").unwrap();
        }
        let mut s = MetadataStore::open(d.path()).unwrap();
        assert_eq!(s.image().topics.len(), 1);
        assert_eq!(s.image().topic("a").unwrap().shards, vec![0, 1, 5]);
        // The next record is past the log's limit: staged with the log's rewrite, one snapshot
        // record holding it too.
        s.records = LOG_RECORDS_MAX;
        s.create_topic(topic("c", 1)).unwrap();
        assert_eq!(s.records, 1);
        s.create_topic(topic("d", 1)).unwrap();
        let s = MetadataStore::open(d.path()).unwrap();
        assert_eq!(s.records, 2);
        assert_eq!(s.image().topic("a").unwrap().shards, vec![0, 1, 5]);
        assert!(s.image().topic("b").is_none());
        assert!(s.image().topic("c").is_some() && s.image().topic("d").is_some());
    }

    #[test]
    fn torn_tail_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut s = MetadataStore::open(d.path()).unwrap();
            s.create_topic(topic("a", 1)).unwrap();
            s.create_topic(topic("b", 1)).unwrap();
        }
        let path = d.path().join("__meta/metadata.log");
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let s = MetadataStore::open(d.path()).unwrap();
        assert!(s.image().topic("a").is_some());
        assert!(s.image().topic("b").is_none());
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(valid_topic_name("orders.v1_x-2"));
        assert!(!valid_topic_name(""));
        assert!(!valid_topic_name(".."));
        assert!(!valid_topic_name("a b"));
        assert!(!valid_topic_name(&"x".repeat(250)));
    }

    #[test]
    fn huge_declared_record_length_truncates_the_log_and_it_stays_usable() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut s = MetadataStore::open(d.path()).unwrap();
            s.create_topic(topic("a", 1)).unwrap();
        }
        let path = d.path().join("__meta/metadata.log");
        for len in [u32::MAX, i32::MAX as u32, 1 << 20] {
            let good = std::fs::metadata(&path).unwrap().len();
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(&len.to_le_bytes()).unwrap();
            f.write_all(&[0xab; 4]).unwrap();
            f.write_all(b"{\"DeleteTopic\"").unwrap();
            drop(f);
            let mut s = MetadataStore::open(d.path()).unwrap();
            assert!(s.image().topic("a").is_some());
            assert_eq!(std::fs::metadata(&path).unwrap().len(), good, "{len}");
            // Appends after the cut replay.
            s.create_topic(topic("b", 1)).unwrap();
            drop(s);
            let s = MetadataStore::open(d.path()).unwrap();
            assert!(s.image().topic("b").is_some());
            let mut s = s;
            s.delete_topic("b").unwrap();
        }
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_logs_never_panic(data in prop::collection::vec(any::<u8>(), 0..400)) {
                let (_, _, at) = replay(&data);
                prop_assert!(at <= data.len());
            }

            #[test]
            fn valid_logs_round_trip_and_mutations_keep_a_valid_prefix(
                names in prop::collection::vec("[a-z]{1,8}", 1..6),
                flip in (any::<prop::sample::Index>(), 1u8..),
                huge in prop::option::of((any::<prop::sample::Index>(), any::<bool>())),
                cut in prop::option::of(any::<prop::sample::Index>()),
            ) {
                let mut log = vec![];
                let mut want = MetadataImage::default();
                for (i, n) in names.iter().enumerate() {
                    let r = Record::CreateTopic(topic(n, i as u32 + 1));
                    log.extend(frame(&r));
                    want.apply(r);
                }
                let (image, records, at) = replay(&log);
                prop_assert_eq!(records, names.len());
                prop_assert_eq!(at, log.len());
                prop_assert_eq!(image.topics, want.topics);

                let mut m = log.clone();
                let i = flip.0.index(m.len());
                m[i] ^= flip.1;
                if let Some((i, max)) = huge {
                    let i = i.index(m.len() - 3);
                    let v = if max { u32::MAX } else { i32::MAX as u32 };
                    m[i..i + 4].copy_from_slice(&v.to_le_bytes());
                }
                if let Some(c) = cut {
                    m.truncate(c.index(m.len()));
                }
                let (_, _, at) = replay(&m);
                prop_assert!(at <= m.len());
                // What survives is a prefix of whole, valid records.
                let (_, _, again) = replay(&m[..at]);
                prop_assert_eq!(again, at);
            }
        }
    }
}
