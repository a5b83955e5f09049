//! Three-node clusters over real TCP on 127.0.0.1: each node is a glommio executor on its own
//! thread with its own data directory. Every wait is bounded by a deadline and waits on a
//! condition the nodes signal (role/leader/term changes, applied entries).

// Protobuf messages are built by setting fields on a default value, as raft-proto itself does.
#![allow(clippy::field_reassign_with_default)]

use sluice_raft::codec::{self, HeartbeatEntry};
use sluice_raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2, Message, MessageType};
use sluice_raft::transport::HEARTBEATS_GROUP;
use sluice_raft::{
    FileLog, GroupConfig, GroupStatus, LogStore, ProposeError, RaftGroup, Role, StateMachine,
    Transport, TransportConfig,
};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const GROUP: u64 = 7;
/// A second group on the same executors and transports, for multi-raft tests. Its nodes are
/// observed under `SECOND + node id`.
const GROUP2: u64 = 8;
const SECOND: u64 = 100;
/// Liveness bound of a failover with the defaults (see `GroupConfig`): an election must not
/// stall. Elections can split (two followers time out in the same tick and each votes for
/// itself; the next round comes 1.0–1.4 s later) and a loaded test machine delays ticks, so this
/// allows several rounds. The 2 s failover target is a speed goal, measured by the broker's
/// `perf/raft_failover.sh` and recorded, not asserted here.
const FAILOVER_MAX: Duration = Duration::from_secs(10);
/// Generous bound for waits that are not the subject of the test (slow CI machines).
const WAIT: Duration = Duration::from_secs(20);

#[derive(Default, Clone)]
struct Observed {
    running: bool,
    status: Option<GroupStatus>,
    /// The state machine's state: every applied entry (index, term, data), in order.
    applied: Vec<(u64, u64, Vec<u8>)>,
    /// Indexes of snapshots restored (at start-up or received from the leader).
    restores: Vec<u64>,
}

type Obs = Arc<(Mutex<HashMap<u64, Observed>>, Condvar)>;

fn update(obs: &Obs, id: u64, f: impl FnOnce(&mut Observed)) {
    let (m, cv) = &**obs;
    f(m.lock().unwrap().entry(id).or_default());
    cv.notify_all();
}

struct TestSm {
    id: u64,
    obs: Obs,
    entries: Vec<(u64, u64, Vec<u8>)>,
}

impl StateMachine for TestSm {
    fn apply(&mut self, index: u64, term: u64, data: &[u8]) {
        if let Some(last) = self.entries.last() {
            assert!(index > last.0, "applied out of order");
        }
        self.entries.push((index, term, data.to_vec()));
        let e = (index, term, data.to_vec());
        update(&self.obs, self.id, |o| o.applied.push(e));
    }

    fn snapshot(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, t, d) in &self.entries {
            out.extend_from_slice(&i.to_le_bytes());
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&(d.len() as u32).to_le_bytes());
            out.extend_from_slice(d);
        }
        out
    }

    fn restore(&mut self, index: u64, _term: u64, mut data: &[u8]) {
        self.entries.clear();
        while !data.is_empty() {
            let i = u64::from_le_bytes(data[..8].try_into().unwrap());
            let t = u64::from_le_bytes(data[8..16].try_into().unwrap());
            let n = u32::from_le_bytes(data[16..20].try_into().unwrap()) as usize;
            self.entries.push((i, t, data[20..20 + n].to_vec()));
            data = &data[20 + n..];
        }
        let entries = self.entries.clone();
        update(&self.obs, self.id, |o| {
            o.applied = entries;
            o.restores.push(index);
        });
    }
}

enum Cmd {
    Propose(Vec<u8>, mpsc::Sender<Result<u64, ProposeError>>),
    ConfChange(ConfChangeV2, mpsc::Sender<Result<u64, ProposeError>>),
    ProposeSecond(Vec<u8>, mpsc::Sender<Result<u64, ProposeError>>),
    Forward(Vec<u8>, mpsc::Sender<Result<(), ProposeError>>),
    Isolate(bool),
    Stop,
}

struct Node {
    cmd: async_channel::Sender<Cmd>,
    thread: Option<glommio::ExecutorJoinHandle<()>>,
}

struct Cluster {
    /// Voters of the new group; nodes with other ids start empty and join.
    voters: Vec<u64>,
    addrs: HashMap<u64, SocketAddr>,
    dirs: HashMap<u64, tempfile::TempDir>,
    nodes: HashMap<u64, Node>,
    obs: Obs,
    tweak: fn(&mut GroupConfig),
    /// Every node also runs group `GROUP2`.
    second_group: bool,
}

/// A free address for a node's listener. Each cluster listens on its own 127.0.0.x (x ≥ 2), so
/// clusters running at once do not meet. (Outgoing connections leave from the listener's
/// address, their ports chosen per destination at connect.)
fn free_addr(host: u8) -> SocketAddr {
    TcpListener::bind(("127.0.0.".to_string() + &host.to_string(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

fn cluster_host() -> u8 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    2 + ((seed.wrapping_add(n * 37)) % 250) as u8
}

impl Cluster {
    fn new(n: u64, tweak: fn(&mut GroupConfig)) -> Cluster {
        Cluster::with_spares(n, 0, tweak)
    }

    /// `voters` nodes started as the group, and `spares` more known to the transport but not
    /// started.
    fn with_spares(voters: u64, spares: u64, tweak: fn(&mut GroupConfig)) -> Cluster {
        Cluster::build(voters, spares, false, tweak)
    }

    fn build(voters: u64, spares: u64, second_group: bool, tweak: fn(&mut GroupConfig)) -> Cluster {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let all: Vec<u64> = (1..=voters + spares).collect();
        let host = cluster_host();
        let addrs = all.iter().map(|id| (*id, free_addr(host))).collect();
        let dirs = all
            .iter()
            .map(|id| (*id, tempfile::tempdir().unwrap()))
            .collect();
        let ids: Vec<u64> = (1..=voters).collect();
        let mut c = Cluster {
            voters: ids.clone(),
            addrs,
            dirs,
            nodes: HashMap::new(),
            obs: Arc::new((Mutex::new(HashMap::new()), Condvar::new())),
            tweak,
            second_group,
        };
        for id in ids {
            c.start(id);
        }
        c
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.dirs[&id].path().to_path_buf()
    }

    fn start(&mut self, id: u64) {
        assert!(!self.nodes.contains_key(&id));
        let voters = if self.voters.contains(&id) {
            self.voters.clone()
        } else {
            Vec::new()
        };
        let mut config = GroupConfig::new(GROUP, id, voters.clone());
        (self.tweak)(&mut config);
        let second = self
            .second_group
            .then(|| GroupConfig::new(GROUP2, id, voters));
        let tc = TransportConfig::new(id, self.addrs[&id], self.addrs.clone());
        let dir = self.dir(id);
        let obs = self.obs.clone();
        update(&obs, id, |o| *o = Observed::default());
        update(&obs, SECOND + id, |o| *o = Observed::default());
        let (cmd, cmds) = async_channel::unbounded::<Cmd>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .name(&format!("raft-node-{id}"))
            .spawn(move || async move {
                let transport = Transport::start(tc).expect("transport");
                let log = FileLog::open(&dir).expect("open log");
                let sm = TestSm {
                    id,
                    obs: obs.clone(),
                    entries: Vec::new(),
                };
                let group = RaftGroup::start(config, log, sm, &transport).expect("group");
                let group2 = second.map(|config| {
                    let log = FileLog::open(dir.join("second")).expect("open log");
                    let sm = TestSm {
                        id: SECOND + id,
                        obs: obs.clone(),
                        entries: Vec::new(),
                    };
                    RaftGroup::start(config, log, sm, &transport).expect("group")
                });
                for (key, g) in [(id, Some(&group)), (SECOND + id, group2.as_ref())] {
                    let Some(g) = g else { continue };
                    update(&obs, key, |o| o.running = true);
                    let watch = g.watch();
                    let relay_obs = obs.clone();
                    glommio::spawn_local(async move {
                        while let Ok(s) = watch.recv().await {
                            update(&relay_obs, key, |o| o.status = Some(s));
                        }
                    })
                    .detach();
                }
                ready_tx.send(()).unwrap();
                while let Ok(c) = cmds.recv().await {
                    match c {
                        Cmd::Propose(data, reply) => {
                            let group = group.clone();
                            glommio::spawn_local(async move {
                                let _ = reply.send(group.propose(data).await);
                            })
                            .detach();
                        }
                        Cmd::ConfChange(cc, reply) => {
                            let group = group.clone();
                            glommio::spawn_local(async move {
                                let _ = reply.send(group.propose_conf_change(cc).await);
                            })
                            .detach();
                        }
                        Cmd::ProposeSecond(data, reply) => {
                            let group = group2.clone().expect("second group");
                            glommio::spawn_local(async move {
                                let _ = reply.send(group.propose(data).await);
                            })
                            .detach();
                        }
                        Cmd::Forward(data, reply) => {
                            let _ = reply.send(group.propose_forwarded(data));
                        }
                        Cmd::Isolate(on) => transport.set_isolated(on),
                        Cmd::Stop => break,
                    }
                }
                group.stop().await;
                if let Some(g) = &group2 {
                    g.stop().await;
                }
                transport.close();
                update(&obs, id, |o| o.running = false);
            })
            .expect("executor");
        ready_rx.recv_timeout(WAIT).expect("node started");
        self.nodes.insert(
            id,
            Node {
                cmd,
                thread: Some(thread),
            },
        );
    }

    /// Stops a node's executor (its group and transport end, its sockets close).
    fn kill(&mut self, id: u64) {
        let mut node = self.nodes.remove(&id).expect("running node");
        let _ = node.cmd.try_send(Cmd::Stop);
        node.thread.take().unwrap().join().expect("node thread");
    }

    fn isolate(&self, id: u64, on: bool) {
        self.nodes[&id].cmd.try_send(Cmd::Isolate(on)).unwrap();
    }

    fn propose_async(&self, id: u64, data: &[u8]) -> mpsc::Receiver<Result<u64, ProposeError>> {
        let (tx, rx) = mpsc::channel();
        self.nodes[&id]
            .cmd
            .try_send(Cmd::Propose(data.to_vec(), tx))
            .unwrap();
        rx
    }

    fn propose(&self, id: u64, data: &[u8]) -> Result<u64, ProposeError> {
        self.propose_async(id, data)
            .recv_timeout(WAIT)
            .expect("proposal outcome within the deadline")
    }

    /// Waits until `f` returns Some, or panics after `timeout` naming `what`.
    fn wait<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&HashMap<u64, Observed>) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.obs;
        let mut g = m.lock().unwrap();
        loop {
            if let Some(v) = f(&g) {
                return v;
            }
            let now = Instant::now();
            if now >= deadline {
                let summary: Vec<_> = g
                    .iter()
                    .map(|(id, o)| (id, o.running, o.status.clone(), o.applied.len()))
                    .collect();
                panic!("timed out after {timeout:?} waiting for {what}: {summary:?}");
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Waits until the running nodes among `among` agree on one leader in one term.
    fn leader(&self, among: &[u64], timeout: Duration) -> u64 {
        self.wait(timeout, "one agreed leader", |obs| {
            let statuses: Vec<_> = among
                .iter()
                .map(|id| obs.get(id).and_then(|o| o.status.clone()))
                .collect::<Option<Vec<_>>>()?;
            let leaders: Vec<_> = statuses.iter().filter(|s| s.role == Role::Leader).collect();
            if leaders.len() != 1 {
                return None;
            }
            let (l, term) = (leaders[0].node_id, leaders[0].term);
            statuses
                .iter()
                .all(|s| s.term == term && s.leader_id == Some(l))
                .then_some(l)
        })
    }

    fn applied(&self, id: u64) -> Vec<(u64, u64, Vec<u8>)> {
        self.obs.0.lock().unwrap()[&id].applied.clone()
    }

    /// Waits until every node in `among` has applied `n` entries, and checks they applied the
    /// same entries in the same order.
    fn converged(&self, among: &[u64], n: usize) -> Vec<(u64, u64, Vec<u8>)> {
        let all = self.wait(WAIT, &format!("{n} entries applied on {among:?}"), |obs| {
            let lists: Vec<_> = among.iter().map(|id| &obs[id].applied).collect();
            lists
                .iter()
                .all(|l| l.len() >= n)
                .then(|| lists.iter().map(|l| (*l).clone()).collect::<Vec<_>>())
        });
        for (id, list) in among.iter().zip(&all) {
            assert_eq!(list, &all[0], "node {id} applied a different history");
            assert!(
                list.windows(2).all(|w| w[0].0 < w[1].0),
                "indexes not increasing"
            );
        }
        all[0].clone()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}

fn payloads(entries: &[(u64, u64, Vec<u8>)]) -> Vec<String> {
    entries
        .iter()
        .map(|e| String::from_utf8(e.2.clone()).unwrap())
        .collect()
}

fn no_tweak(_: &mut GroupConfig) {}

#[test]
fn a_forwarded_proposal_from_a_follower_commits_through_the_leader() {
    let c = Cluster::new(3, no_tweak);
    let leader = c.leader(&[1, 2, 3], WAIT);
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    // A plain proposal on a follower is refused and names the leader...
    assert_eq!(
        c.propose(follower, b"direct"),
        Err(ProposeError::NotLeader {
            leader: Some(leader)
        })
    );
    // ...a forwarded one reaches the leader and is applied everywhere.
    let (tx, rx) = mpsc::channel();
    c.nodes[&follower]
        .cmd
        .try_send(Cmd::Forward(b"forwarded".to_vec(), tx))
        .unwrap();
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), Ok(()));
    let applied = c.converged(&[1, 2, 3], 1);
    assert_eq!(payloads(&applied), ["forwarded"]);
    // Empty data is refused at once, as for `propose`.
    let (tx, rx) = mpsc::channel();
    c.nodes[&follower]
        .cmd
        .try_send(Cmd::Forward(Vec::new(), tx))
        .unwrap();
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), Err(ProposeError::Invalid));
}

#[test]
fn three_nodes_elect_one_leader_and_apply_the_same_entries_in_order() {
    let started = Instant::now();
    let c = Cluster::new(3, no_tweak);
    let leader = c.leader(&[1, 2, 3], WAIT);
    eprintln!(
        "first election: leader {leader} after {:?}",
        started.elapsed()
    );

    // A follower refuses and names the leader.
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    assert_eq!(
        c.propose(follower, b"x"),
        Err(ProposeError::NotLeader {
            leader: Some(leader)
        })
    );
    assert_eq!(c.propose(leader, b""), Err(ProposeError::Invalid));

    // One at a time, then 40 at once (they share loop passes).
    let mut last = 0;
    for i in 0..10 {
        let index = c.propose(leader, format!("seq-{i}").as_bytes()).unwrap();
        assert!(index > last);
        last = index;
    }
    let outcomes: Vec<_> = (0..40)
        .map(|i| c.propose_async(leader, format!("burst-{i}").as_bytes()))
        .collect();
    let mut indexes: Vec<u64> = outcomes
        .into_iter()
        .map(|rx| rx.recv_timeout(WAIT).unwrap().unwrap())
        .collect();
    indexes.dedup();
    assert_eq!(indexes.len(), 40, "each proposal has its own index");

    let history = c.converged(&[1, 2, 3], 50);
    let p = payloads(&history);
    assert_eq!(p.len(), 50);
    for (i, x) in p.iter().take(10).enumerate() {
        assert_eq!(*x, format!("seq-{i}"));
    }
    for i in 0..40 {
        assert_eq!(p.iter().filter(|x| **x == format!("burst-{i}")).count(), 1);
    }
    // Exactly one leader, still.
    assert_eq!(c.leader(&[1, 2, 3], WAIT), leader);
}

#[test]
fn killed_leader_is_replaced_within_the_bound_and_catches_up_by_snapshot() {
    let mut c = Cluster::new(3, |cfg| cfg.snapshot_interval_entries = 16);
    let old = c.leader(&[1, 2, 3], WAIT);
    for i in 0..10 {
        c.propose(old, format!("before-{i}").as_bytes()).unwrap();
    }
    c.converged(&[1, 2, 3], 10);
    let old_applied = c.applied(old).last().unwrap().0;

    let rest: Vec<u64> = (1..=3).filter(|id| *id != old).collect();
    let killed_at = Instant::now();
    c.kill(old);
    let new = c.leader(&rest, WAIT);
    let failover = killed_at.elapsed();
    eprintln!("failover: node {new} leads {failover:?} after node {old} was stopped");
    assert_ne!(new, old);
    assert!(
        failover <= FAILOVER_MAX,
        "failover took {failover:?}, at most {FAILOVER_MAX:?}"
    );

    // Proposals continue on the majority, enough to compact past the dead node's log.
    for i in 0..50 {
        c.propose(new, format!("after-{i}").as_bytes()).unwrap();
    }
    c.converged(&rest, 60);

    let restarted_at = Instant::now();
    c.start(old);
    let history = c.converged(&[1, 2, 3], 60);
    eprintln!("restarted node caught up in {:?}", restarted_at.elapsed());
    let restores = c.obs.0.lock().unwrap()[&old].restores.clone();
    assert!(
        restores.iter().any(|i| *i > old_applied),
        "the restarted node should have caught up through a snapshot: restores {restores:?}"
    );
    let p = payloads(&history);
    assert_eq!(
        p[..10].to_vec(),
        (0..10).map(|i| format!("before-{i}")).collect::<Vec<_>>()
    );
    assert_eq!(
        p[10..60].to_vec(),
        (0..50).map(|i| format!("after-{i}")).collect::<Vec<_>>()
    );

    // And it takes part again: a proposal commits everywhere.
    let leader = c.leader(&[1, 2, 3], WAIT);
    c.propose(leader, b"last").unwrap();
    c.converged(&[1, 2, 3], 61);
}

#[test]
fn a_followers_torn_log_tail_is_cut_and_it_catches_up() {
    let mut c = Cluster::new(3, no_tweak);
    let leader = c.leader(&[1, 2, 3], WAIT);
    for i in 0..5 {
        c.propose(leader, format!("a-{i}").as_bytes()).unwrap();
    }
    c.converged(&[1, 2, 3], 5);
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    c.kill(follower);

    // The last write was torn: half a record after the last whole one.
    let path = c.dir(follower).join(sluice_raft::file_log::LOG_FILE);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(&200u32.to_le_bytes()).unwrap();
    f.write_all(&[0xab; 60]).unwrap();
    drop(f);

    c.start(follower);
    for i in 0..5 {
        c.propose(leader, format!("b-{i}").as_bytes()).unwrap();
    }
    let history = c.converged(&[1, 2, 3], 10);
    assert_eq!(payloads(&history)[9], "b-4");

    // Had the torn bytes stayed, the records written after them would make the log unreadable.
    c.kill(follower);
    let log = FileLog::open(c.dir(follower)).unwrap();
    assert_eq!(log.torn_bytes(), 0);
    assert!(log.last_index() >= 10);
}

#[test]
fn an_isolated_leader_cannot_commit_and_the_majority_carries_on() {
    let c = Cluster::new(3, no_tweak);
    let old = c.leader(&[1, 2, 3], WAIT);
    c.propose(old, b"first").unwrap();
    c.converged(&[1, 2, 3], 1);

    c.isolate(old, true);
    let isolated_at = Instant::now();
    let minority = c.propose_async(old, b"minority");
    let rest: Vec<u64> = (1..=3).filter(|id| *id != old).collect();
    let new = c.leader(&rest, WAIT);
    eprintln!("isolated leader replaced after {:?}", isolated_at.elapsed());
    assert_ne!(new, old);
    // Check-quorum: the isolated leader steps down, and its proposal does not succeed.
    let outcome = minority
        .recv_timeout(WAIT)
        .expect("minority proposal resolves");
    assert!(
        matches!(
            outcome,
            Err(ProposeError::LeadershipLost) | Err(ProposeError::Dropped)
        ),
        "{outcome:?}"
    );
    c.wait(WAIT, "isolated node to step down", |obs| {
        (obs[&old].status.as_ref()?.role != Role::Leader).then_some(())
    });
    c.propose(new, b"majority").unwrap();
    c.converged(&rest, 2);
    assert_eq!(
        c.applied(old).len(),
        1,
        "the isolated node applied nothing new"
    );

    c.isolate(old, false);
    let history = c.converged(&[1, 2, 3], 2);
    assert_eq!(payloads(&history), vec!["first", "majority"]);
    c.propose(c.leader(&[1, 2, 3], WAIT), b"healed").unwrap();
    let history = c.converged(&[1, 2, 3], 3);
    assert!(!payloads(&history).contains(&"minority".to_string()));
}

/// A frame whose CRC covers everything (`MODE_COVERED`) around `payload` as its protobuf.
fn frame(group: u64, payload: &[u8]) -> Vec<u8> {
    let mut body = group.to_be_bytes().to_vec();
    body.push(sluice_raft::transport::MODE_COVERED);
    body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    body.extend_from_slice(payload);
    body.extend_from_slice(&0u32.to_be_bytes());
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// A coalesced heartbeat frame (`HEARTBEATS_GROUP`, then the heartbeat list; no mode or
/// protobuf length) around `body`.
fn heartbeats_frame(body: &[u8]) -> Vec<u8> {
    let mut b = HEARTBEATS_GROUP.to_be_bytes().to_vec();
    b.extend_from_slice(body);
    let mut out = (b.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&crc32c::crc32c(&b).to_be_bytes());
    out.extend_from_slice(&b);
    out
}

/// A coalesced heartbeat frame's body with a declared `count` and raw `entries` bytes.
fn heartbeats_body(from: u64, to: u64, count: u32, entries: &[u8]) -> Vec<u8> {
    let mut b = from.to_le_bytes().to_vec();
    b.extend_from_slice(&to.to_le_bytes());
    b.extend_from_slice(&count.to_le_bytes());
    b.extend_from_slice(entries);
    b
}

fn preamble() -> Vec<u8> {
    let mut p = sluice_raft::transport::PREAMBLE_MAGIC.to_vec();
    p.extend_from_slice(&99u64.to_be_bytes());
    p
}

/// True if the peer closes the connection within the deadline.
fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => {} // timeout: not yet
        }
    }
    false
}

#[test]
fn hostile_frames_close_only_their_connection() {
    let c = Cluster::new(3, no_tweak);
    let leader = c.leader(&[1, 2, 3], WAIT);
    c.propose(leader, b"before").unwrap();
    let target = c.addrs[&(1..=3).find(|id| *id != leader).unwrap()];

    // A well-behaved connection that stays open throughout.
    let mut quiet = TcpStream::connect(target).unwrap();
    quiet.write_all(&preamble()).unwrap();

    let mut bad_crc = frame(GROUP, &[0x08, 0x03]);
    bad_crc[5] ^= 0xff;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not a raft peer", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("length 2^32-1", [preamble(), vec![0xff; 8]].concat()),
        (
            "length below the group id",
            [preamble(), vec![0, 0, 0, 4, 0, 0, 0, 0]].concat(),
        ),
        ("bad crc", [preamble(), bad_crc].concat()),
        (
            "nested groups",
            [preamble(), frame(GROUP, &[0x1b; 5000])].concat(),
        ),
        (
            "length past the end",
            [preamble(), frame(GROUP, &[0x3a, 0xff, 0xff, 0x03])].concat(),
        ),
        (
            "wrong wire type for a known field",
            [preamble(), frame(GROUP, &[0x3d, 1, 2, 3, 4])].concat(),
        ),
        (
            "closed mid-frame",
            [preamble(), frame(GROUP, &[0x08, 0x03])[..9].to_vec()].concat(),
        ),
        (
            "heartbeat count past the end",
            [
                preamble(),
                heartbeats_frame(&heartbeats_body(99, 2, 1000, &[])),
            ]
            .concat(),
        ),
        (
            "heartbeat count of 2^32-1",
            [
                preamble(),
                heartbeats_frame(&heartbeats_body(99, 2, u32::MAX, &[])),
            ]
            .concat(),
        ),
        (
            "heartbeat of an unknown kind",
            [
                preamble(),
                heartbeats_frame(&heartbeats_body(
                    99,
                    2,
                    1,
                    // group 7, kind 9, term, commit, no context
                    &[7, 9, 1, 1, 0],
                )),
            ]
            .concat(),
        ),
        (
            "unknown frame mode",
            [preamble(), {
                let mut f = frame(GROUP, &[0x08, 0x03]);
                f[16] = 9;
                let crc = crc32c::crc32c(&f[8..]);
                f[4..8].copy_from_slice(&crc.to_be_bytes());
                f
            }]
            .concat(),
        ),
        (
            "protobuf length past the frame",
            [preamble(), {
                let mut f = frame(GROUP, &[0x08, 0x03]);
                f[17..21].copy_from_slice(&u32::MAX.to_be_bytes());
                let crc = crc32c::crc32c(&f[8..]);
                f[4..8].copy_from_slice(&crc.to_be_bytes());
                f
            }]
            .concat(),
        ),
    ];
    for (name, bytes) in cases {
        let mut s = TcpStream::connect(target).unwrap();
        s.write_all(&bytes).unwrap();
        if name == "closed mid-frame" {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        assert!(
            closed_by_peer(&mut s),
            "{name}: connection should be closed"
        );
    }

    // The quiet connection is still open (a read times out rather than seeing EOF)…
    quiet
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 8];
    let r = quiet.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "quiet connection: {r:?}"
    );
    // …and the cluster still commits on every node.
    assert_eq!(c.leader(&[1, 2, 3], WAIT), leader);
    c.propose(leader, b"after").unwrap();
    assert_eq!(
        payloads(&c.converged(&[1, 2, 3], 2)),
        vec!["before", "after"]
    );
}

#[test]
fn a_group_restarts_from_its_own_snapshot_and_log() {
    let mut c = Cluster::new(3, |cfg| cfg.snapshot_interval_entries = 8);
    let leader = c.leader(&[1, 2, 3], WAIT);
    for i in 0..20 {
        c.propose(leader, format!("e-{i}").as_bytes()).unwrap();
    }
    let before = c.converged(&[1, 2, 3], 20);
    // Whole-cluster restart: state comes back from each node's snapshot + log.
    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        let log = FileLog::open(c.dir(id)).unwrap();
        assert!(
            log.snapshot().get_metadata().index >= 8,
            "node {id} compacted"
        );
    }
    for id in 1..=3 {
        c.start(id);
    }
    let leader = c.leader(&[1, 2, 3], WAIT);
    c.propose(leader, b"after restart").unwrap();
    let after = c.converged(&[1, 2, 3], 21);
    assert_eq!(after[..20], before[..]);
}

#[test]
fn a_new_node_joins_through_a_conf_change_and_receives_the_log() {
    let mut c = Cluster::with_spares(3, 1, no_tweak);
    let leader = c.leader(&[1, 2, 3], WAIT);
    for i in 0..5 {
        c.propose(leader, format!("e-{i}").as_bytes()).unwrap();
    }
    c.start(4);
    let mut change = ConfChangeSingle::default();
    change.set_change_type(ConfChangeType::AddNode);
    change.node_id = 4;
    let mut cc = ConfChangeV2::default();
    cc.changes.push(change);
    let (tx, rx) = mpsc::channel();
    c.nodes[&leader]
        .cmd
        .try_send(Cmd::ConfChange(cc, tx))
        .unwrap();
    rx.recv_timeout(WAIT).unwrap().unwrap();
    c.propose(leader, b"with four").unwrap();
    let history = c.converged(&[1, 2, 3, 4], 6);
    assert_eq!(payloads(&history)[5], "with four");
    assert_eq!(c.leader(&[1, 2, 3, 4], WAIT), leader);

    // The joined node restarts from its own log: its membership comes back from replaying the
    // conf change, and it catches up with what it missed.
    c.kill(4);
    c.propose(leader, b"three of four").unwrap();
    c.converged(&[1, 2, 3], 7);
    c.start(4);
    c.propose(leader, b"all back").unwrap();
    let history = c.converged(&[1, 2, 3, 4], 8);
    assert_eq!(payloads(&history)[6..], ["three of four", "all back"]);
}

#[test]
fn two_groups_share_each_connection_and_keep_separate_histories() {
    let c = Cluster::build(3, 0, true, no_tweak);
    let first = c.leader(&[1, 2, 3], WAIT);
    let second = c.leader(&[SECOND + 1, SECOND + 2, SECOND + 3], WAIT);
    let second_rx: Vec<_> = (0..10)
        .map(|i| {
            let (tx, rx) = mpsc::channel();
            c.nodes[&second]
                .cmd
                .try_send(Cmd::ProposeSecond(format!("two-{i}").into_bytes(), tx))
                .unwrap();
            rx
        })
        .collect();
    for i in 0..10 {
        c.propose(first, format!("one-{i}").as_bytes()).unwrap();
    }
    for rx in second_rx {
        rx.recv_timeout(WAIT).unwrap().unwrap();
    }
    let one = c.converged(&[1, 2, 3], 10);
    let two = c.converged(&[SECOND + 1, SECOND + 2, SECOND + 3], 10);
    assert!(payloads(&one).iter().all(|p| p.starts_with("one-")));
    assert!(payloads(&two).iter().all(|p| p.starts_with("two-")));
    assert_eq!(one.len(), 10);
    assert_eq!(two.len(), 10);
}

#[test]
fn outgoing_connections_leave_from_the_listeners_address() {
    // The node listens on one 127.0.0.x, its peer on another: the peer sees the node's own
    // address as the source (firewall rules between nodes can name it).
    let host = cluster_host();
    let peer_host = if host == 2 { 3 } else { host - 1 };
    let peer = TcpListener::bind(format!("127.0.0.{peer_host}:0")).unwrap();
    let own = free_addr(host);
    let peers = HashMap::from([(1, own), (2, peer.local_addr().unwrap())]);
    let tc = TransportConfig::new(1, own, peers);
    let (done, wait_done) = async_channel::bounded::<()>(1);
    let node = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let transport = Transport::start(tc).expect("transport");
            let m = sluice_raft::eraftpb::Message {
                to: 2,
                from: 1,
                ..Default::default()
            };
            transport.send(GROUP, vec![m]);
            let _ = wait_done.recv().await;
            transport.close();
        })
        .unwrap();
    peer.set_nonblocking(false).unwrap();
    let (mut conn, from) = peer.accept().unwrap();
    assert_eq!(from.ip(), own.ip(), "source of the node's connection");
    let mut preamble_read = [0u8; 16];
    conn.read_exact(&mut preamble_read).unwrap();
    assert_eq!(preamble_read.to_vec(), preamble_of(1));
    done.send_blocking(()).unwrap();
    node.join().unwrap();
}

fn preamble_of(id: u64) -> Vec<u8> {
    let mut p = sluice_raft::transport::PREAMBLE_MAGIC.to_vec();
    p.extend_from_slice(&id.to_be_bytes());
    p
}

/// Reads one transport frame: (group id, body after it).
fn read_frame(conn: &mut TcpStream) -> (u64, Vec<u8>) {
    let mut head = [0u8; 8];
    conn.read_exact(&mut head).unwrap();
    let len = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).unwrap();
    assert_eq!(
        crc32c::crc32c(&body),
        u32::from_be_bytes(head[4..].try_into().unwrap())
    );
    let group = u64::from_be_bytes(body[..8].try_into().unwrap());
    (group, body[8..].to_vec())
}

#[test]
fn heartbeats_of_many_groups_leave_as_one_frame_and_are_expanded_on_receipt() {
    const GROUPS: u64 = 50;
    let host = cluster_host();
    let peer_host = if host == 2 { 3 } else { host - 1 };
    let peer = TcpListener::bind(format!("127.0.0.{peer_host}:0")).unwrap();
    let own = free_addr(host);
    let peers = HashMap::from([(1, own), (2, peer.local_addr().unwrap())]);
    let tc = TransportConfig::new(1, own, peers);
    let (done, wait_done) = async_channel::bounded::<()>(1);
    let (got_tx, got_rx) = mpsc::channel::<(u64, Message)>();
    let (stats_tx, stats_rx) = mpsc::channel();
    let node = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let transport = Transport::start(tc).expect("transport");
            assert!(transport.register(HEARTBEATS_GROUP).is_err(), "reserved id");
            for g in 1..=GROUPS {
                let inbox = transport.register(g).unwrap();
                let got = got_tx.clone();
                glommio::spawn_local(async move {
                    while let Ok(m) = inbox.recv().await {
                        let _ = got.send((g, m));
                    }
                })
                .detach();
            }
            // One pass: every group's heartbeat for node 2, and one append, which keeps its
            // own frame.
            for g in 1..=GROUPS {
                let mut m = Message::default();
                m.set_msg_type(MessageType::MsgHeartbeat);
                m.from = 1;
                m.to = 2;
                m.term = g;
                m.commit = 10 * g;
                transport.send(g, vec![m]);
            }
            let mut append = Message::default();
            append.set_msg_type(MessageType::MsgAppend);
            append.from = 1;
            append.to = 2;
            append.term = 3;
            append.index = 4;
            transport.send(3, vec![append]);
            let _ = wait_done.recv().await;
            stats_tx.send(transport.stats()).unwrap();
            transport.close();
        })
        .unwrap();

    // What node 1 sends: the append's frame, then one frame with every heartbeat.
    let (mut conn, _) = peer.accept().unwrap();
    let mut preamble_read = [0u8; 16];
    conn.read_exact(&mut preamble_read).unwrap();
    assert_eq!(preamble_read.to_vec(), preamble_of(1));
    let (group, _) = read_frame(&mut conn);
    assert_eq!(group, 3, "the append travels in its own frame");
    let (group, body) = read_frame(&mut conn);
    assert_eq!(group, HEARTBEATS_GROUP);
    let (from, to, entries) = codec::get_heartbeats(&body).unwrap();
    assert_eq!((from, to), (1, 2));
    let expected: Vec<HeartbeatEntry> = (1..=GROUPS)
        .map(|g| HeartbeatEntry {
            group: g,
            response: false,
            term: g,
            commit: 10 * g,
            context: Default::default(),
        })
        .collect();
    assert_eq!(entries, expected);

    // What node 2 sends back: every group's response in one frame, delivered to each group as
    // its own raft message.
    let responses: Vec<HeartbeatEntry> = expected
        .iter()
        .map(|e| HeartbeatEntry {
            response: true,
            ..e.clone()
        })
        .collect();
    let mut body = Vec::new();
    codec::put_heartbeats(&mut body, 2, 1, &responses);
    let mut back = TcpStream::connect(own).unwrap();
    back.write_all(&[preamble_of(2), heartbeats_frame(&body)].concat())
        .unwrap();
    let mut got: Vec<(u64, Message)> = (0..GROUPS)
        .map(|_| got_rx.recv_timeout(WAIT).expect("every group's response"))
        .collect();
    got.sort_by_key(|(g, _)| *g);
    for (e, (g, m)) in responses.into_iter().zip(got) {
        assert_eq!(g, e.group);
        assert_eq!(m, e.into_message(2, 1));
    }
    done.send_blocking(()).unwrap();
    let stats = stats_rx.recv_timeout(WAIT).unwrap();
    assert_eq!(stats.heartbeat_frames_sent, 1);
    assert_eq!(stats.heartbeats_coalesced, GROUPS);
    assert_eq!(stats.frames_sent, 2);
    assert_eq!(stats.messages_sent, GROUPS + 1);
    assert_eq!(stats.messages_received, GROUPS);
    node.join().unwrap();
}

/// Payloads of the payload-checked group below carry their own checksum, as a partition's
/// RecordBatches do: `[crc32c of the rest, u32 BE][rest]`.
fn sealed(text: &[u8]) -> Vec<u8> {
    [&crc32c::crc32c(text).to_be_bytes()[..], text].concat()
}

fn check_sealed(d: &[u8]) -> Result<(), &'static str> {
    match d.split_first_chunk::<4>() {
        Some((crc, rest)) if u32::from_be_bytes(*crc) == crc32c::crc32c(rest) => Ok(()),
        _ => Err("sealed payload damaged"),
    }
}

#[test]
fn payload_checked_entries_arrive_intact_and_a_damaged_one_is_refused_before_the_log() {
    let c = Cluster::new(3, |cfg| cfg.payload_check = Some(check_sealed));
    let leader = c.leader(&[1, 2, 3], WAIT);
    // One small entry (copied into the queue) and one large (written from its own buffer).
    let small = sealed(b"small");
    let large = sealed(&vec![b'x'; 200_000]);
    c.propose(leader, &small).unwrap();
    c.propose(leader, &large).unwrap();
    let history = c.converged(&[1, 2, 3], 2);
    assert_eq!(history[0].2, small);
    assert_eq!(history[1].2, large);

    // A peer speaking as the leader sends a follower the next entry with one bit flipped in its
    // data (outside the frame CRC, inside the entry's own checksum).
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let status = c.obs.0.lock().unwrap()[&follower].status.clone().unwrap();
    let last = status.last_index;
    let mut e = sluice_raft::eraftpb::Entry::default();
    e.index = last + 1;
    e.term = status.term;
    e.data = sealed(b"damaged on the way").into();
    let mut m = sluice_raft::eraftpb::Message::default();
    m.set_msg_type(sluice_raft::eraftpb::MessageType::MsgAppend);
    m.from = leader;
    m.to = follower;
    m.term = status.term;
    m.index = last;
    m.log_term = status.term;
    m.commit = status.commit;
    m.set_entries(vec![e].into());
    let mut bytes = sluice_raft::transport::frame_bytes(GROUP, m, true).unwrap();
    let end = bytes.len() - 1;
    bytes[end] ^= 0x01;
    let mut s = TcpStream::connect(c.addrs[&follower]).unwrap();
    s.write_all(&[preamble_of(leader), bytes].concat()).unwrap();
    assert!(
        closed_by_peer(&mut s),
        "a damaged entry closes its connection"
    );
    // Nothing of it reached the follower's log, and the group carries on.
    c.propose(leader, &sealed(b"after")).unwrap();
    let history = c.converged(&[1, 2, 3], 3);
    let datas: Vec<Vec<u8>> = history.into_iter().map(|e| e.2).collect();
    assert_eq!(datas, vec![small, large, sealed(b"after")]);
}
