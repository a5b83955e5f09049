//! [`RaftGroup`]: one raft-rs `RawNode` driven on a glommio executor.
//!
//! One task per group runs the standard loop. Each pass it waits for the next tick, an incoming
//! message or a command, then takes everything else already queued (messages and proposals),
//! ticks as many times as are due, and handles one `Ready`:
//!
//! 1. the leader's messages are queued to the transport (they do not depend on local disk);
//! 2. a snapshot from the leader is installed durably and handed to the state machine;
//! 3. committed entries are applied in order (`StateMachine::apply`), completing proposals;
//! 4. new entries are appended and the hard state set, then **one** `LogStore::sync`;
//! 5. only then are the persisted messages (votes, append responses) queued;
//! 6. `advance`: the light ready's commit index, messages and committed entries likewise.
//!
//! The transport writes everything queued for a peer in one write when this task yields, so the
//! messages of one pass travel together. Every `snapshot_interval_entries` applied entries the
//! group asks the state machine for a snapshot and compacts the log to it; a follower that has
//! fallen behind the compacted log receives that snapshot.

use crate::logger;
use crate::storage::{LogStore, RaftStorage};
use crate::transport::{PayloadCheck, Transport};
use bytes::Bytes;
use futures_lite::future;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
};
use raft::{GetEntriesContext, RawNode, SnapshotStatus, StateRole};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Largest proposal. Bounded so that one entry always fits a transport frame
/// (`transport::MAX_FRAME_BYTES`) next to a full `max_size_per_msg` of others.
pub const MAX_PROPOSAL_BYTES: usize = 8 << 20;

/// The application replicated by a group. Called on the group's executor, in log order.
pub trait StateMachine {
    /// Applies the committed entry at `index` (written in `term`). Entries with empty data (the
    /// entry a new leader appends to commit its term) and configuration changes are not passed.
    fn apply(&mut self, index: u64, term: u64, data: &[u8]);

    /// The state after the last applied entry, as bytes `restore` accepts. Used to compact the
    /// log and to catch up followers that are behind the compacted log.
    fn snapshot(&mut self) -> Vec<u8>;

    /// Replaces the state with a snapshot taken at `index` (in `term`): at start-up from the
    /// stored snapshot, or a snapshot received from the leader.
    fn restore(&mut self, index: u64, term: u64, data: &[u8]);
}

/// Timing and limits of a group.
///
/// The defaults fail over in well under 2 s: a leader heartbeats every tick (100 ms); a follower
/// that hears nothing for a randomized 10–14 ticks (1.0–1.4 s) starts a pre-vote, which peers
/// grant once they too have heard nothing for `election_ticks` (8 ticks, 0.8 s: the leader lease
/// of check-quorum); a leader checks every 8 ticks that a quorum was active since its last check
/// and steps down if not (so 0.8–1.6 s after it was cut off).
#[derive(Clone, Debug)]
pub struct GroupConfig {
    pub group_id: u64,
    pub node_id: u64,
    /// Voters of a brand-new group (ignored once the log holds state). Empty for a node that
    /// joins an existing group: it waits for the leader, which adds it with a conf change.
    pub voters: Vec<u64>,
    pub tick_interval: Duration,
    pub heartbeat_ticks: usize,
    /// Check-quorum / leader-lease window, in ticks.
    pub election_ticks: usize,
    /// A follower's election timeout is drawn from `[min_election_ticks, max_election_ticks)`.
    pub min_election_ticks: usize,
    pub max_election_ticks: usize,
    /// Bytes of entries in one append message.
    pub max_size_per_msg: u64,
    /// Append messages in flight to one follower.
    pub max_inflight_msgs: usize,
    /// Take a snapshot and compact the log after this many applied entries.
    pub snapshot_interval_entries: u64,
    /// Proposals awaiting commit; more are refused with `ProposeError::Busy`.
    pub max_pending_proposals: usize,
    /// The check of the group's entry data received from peers, when the data carries its own
    /// checksum (see `Transport::register_with`); `None` for the transport's frame CRC.
    pub payload_check: Option<PayloadCheck>,
}

impl GroupConfig {
    pub fn new(group_id: u64, node_id: u64, voters: Vec<u64>) -> Self {
        GroupConfig {
            group_id,
            node_id,
            voters,
            tick_interval: Duration::from_millis(100),
            heartbeat_ticks: 1,
            election_ticks: 8,
            min_election_ticks: 10,
            max_election_ticks: 14,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            snapshot_interval_entries: 10_000,
            max_pending_proposals: 10_000,
            payload_check: None,
        }
    }

    fn raft_config(&self, applied: u64) -> raft::Config {
        raft::Config {
            id: self.node_id,
            election_tick: self.election_ticks,
            heartbeat_tick: self.heartbeat_ticks,
            min_election_tick: self.min_election_ticks,
            max_election_tick: self.max_election_ticks,
            applied,
            max_committed_size_per_ready: COMMITTED_BYTES_PER_READY,
            max_size_per_msg: self.max_size_per_msg,
            max_inflight_msgs: self.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
    /// The group's loop has ended (see `RaftGroup::stopped`).
    Stopped,
}

impl From<StateRole> for Role {
    fn from(r: StateRole) -> Role {
        match r {
            StateRole::Follower => Role::Follower,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Candidate => Role::Candidate,
            StateRole::Leader => Role::Leader,
        }
    }
}

/// What a group looks like after its last loop pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStatus {
    pub group_id: u64,
    pub node_id: u64,
    pub role: Role,
    /// The leader this node knows of, if any.
    pub leader_id: Option<u64>,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    /// Index of the latest snapshot (the log holds entries after it).
    pub snapshot_index: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProposeError {
    /// This node is not the leader; `leader` is the one it knows of.
    NotLeader { leader: Option<u64> },
    /// This node stopped being leader before the entry committed. It may still commit under the
    /// next leader: the outcome is unknown.
    LeadershipLost,
    /// The entry was replaced by another leader's entry (or refused by raft): it did not commit.
    Dropped,
    /// Too many proposals are awaiting commit.
    Busy,
    /// Empty data, or more than `MAX_PROPOSAL_BYTES`.
    Invalid,
    /// The group has stopped.
    Stopped,
}

impl std::fmt::Display for ProposeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for ProposeError {}

/// Bytes of committed entries raft-rs hands over in one `ready` (and again in the `advance`
/// after it): it reads them from the store synchronously, so the loop has the store fetch
/// them first (`LogStore::fetch_committed`, this many each time), and a replica re-applying a
/// long log after a restart holds this much of it at a time rather than all of it. The loop
/// goes round again at once while more committed entries wait.
pub const COMMITTED_BYTES_PER_READY: u64 = 1 << 20;

/// How often a follower whose log is shorter than its leader believes tells it so (see
/// `Driver::report_lost_log`).
const LOST_LOG_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a group's loop ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `RaftGroup::stop` was called.
    Requested,
    /// Storage failed or raft-rs panicked: the group cannot continue safely. The text says why.
    Failed(String),
}

type Reply = async_channel::Sender<Result<u64, ProposeError>>;

enum Command {
    Propose(Bytes, Reply),
    ProposeAppended(Bytes, Reply),
    ProposeForwarded(Bytes),
    ProposeConfChange(ConfChangeV2, Reply),
    TransferLeader(u64),
    Campaign,
    Stop,
}

struct Shared {
    commands: async_channel::Sender<Command>,
    status: RefCell<GroupStatus>,
    watchers: RefCell<Vec<async_channel::Sender<GroupStatus>>>,
    stopped: RefCell<Option<StopReason>>,
    done: async_channel::Receiver<()>,
    /// When a message of this group last arrived from each peer.
    heard: RefCell<std::collections::HashMap<u64, Instant>>,
    /// On the leader, per follower: when it last caught up (see `RaftGroup::caught_up_at`).
    caught_up: RefCell<std::collections::HashMap<u64, CatchUp>>,
}

/// A follower's catch-up state on the leader, as Kafka's `lastCaughtUpTime`: `target` is the
/// leader's last index when the follower last caught up (or when it became leader); the
/// follower has caught up again, at `at`, once its matched index reaches it.
#[derive(Clone, Copy, Debug)]
struct CatchUp {
    at: Option<Instant>,
    target: u64,
    /// The follower's matched index (raft progress) at the last publish.
    matched: u64,
}

/// A running raft group: a cheap handle (clone it freely) to the task that drives it.
#[derive(Clone)]
pub struct RaftGroup {
    shared: Rc<Shared>,
}

impl RaftGroup {
    /// Opens the group over `log` (bootstrapping it with `config.voters` if it is empty),
    /// restores `state_machine` from the stored snapshot, registers with `transport` and spawns
    /// the loop on the current glommio executor. A bootstrap's configuration is written by the
    /// store's future, which the loop awaits before it handles any message or command (a
    /// failed write stops the group).
    pub fn start<L, M>(
        config: GroupConfig,
        mut log: L,
        mut state_machine: M,
        transport: &Transport,
    ) -> io::Result<RaftGroup>
    where
        L: LogStore + 'static,
        M: StateMachine + 'static,
    {
        let state = log.raft_state();
        let snapshot = log.snapshot();
        let fresh = state.hard_state == Default::default()
            && state.conf_state.voters.is_empty()
            && snapshot.get_metadata().index == 0
            && log.last_index() == 0;
        // In memory now; its file write runs on the blocking pool, awaited by the loop's task
        // before it handles anything.
        let bootstrapped = (fresh && !config.voters.is_empty()).then(|| {
            let mut cs = ConfState::default();
            cs.voters = config.voters.clone();
            log.bootstrap(&cs)
        });
        let applied = snapshot.get_metadata().index;
        if applied > 0 {
            state_machine.restore(applied, snapshot.get_metadata().term, &snapshot.data);
        }
        let raft_config = config.raft_config(applied);
        raft_config
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let logger = logger::for_group(config.group_id, config.node_id);
        let raw = RawNode::new(&raft_config, RaftStorage::new(log), &logger)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;

        let inbox = transport.register_with(config.group_id, config.payload_check)?;
        let (commands, command_rx) = async_channel::unbounded();
        let (done_tx, done) = async_channel::bounded(1);
        let shared = Rc::new(Shared {
            commands,
            status: RefCell::new(GroupStatus {
                group_id: config.group_id,
                node_id: config.node_id,
                role: Role::Follower,
                leader_id: None,
                term: 0,
                commit: 0,
                applied,
                last_index: 0,
                snapshot_index: applied,
            }),
            watchers: RefCell::new(Vec::new()),
            stopped: RefCell::new(None),
            done,
            heard: RefCell::new(std::collections::HashMap::new()),
            caught_up: RefCell::new(std::collections::HashMap::new()),
        });
        let (fetched_tx, fetched) = async_channel::unbounded();
        let mut driver = Driver {
            raw,
            sm: state_machine,
            config,
            transport: transport.clone(),
            pending: BTreeMap::new(),
            appended: BTreeMap::new(),
            shared: shared.clone(),
            applied,
            was_leader: false,
            lost_log_reported: None,
            fetched_tx,
            fetched,
            proposals: Vec::new(),
        };
        driver.publish();
        glommio::spawn_local(async move {
            let reason = match bootstrapped {
                Some(durable) => match durable.await {
                    Ok(()) => None,
                    Err(e) => Some(storage_failed(e)),
                },
                None => None,
            };
            let reason = match reason {
                Some(failed) => failed,
                None => driver.run(inbox, command_rx).await,
            };
            driver.finish(reason);
            drop(done_tx);
        })
        .detach();
        Ok(RaftGroup { shared })
    }

    /// Proposes `data`. Resolves with the entry's index once it is committed and applied on this
    /// node, or with why it was not (see `ProposeError`).
    pub async fn propose(&self, data: impl Into<Bytes>) -> Result<u64, ProposeError> {
        let data = data.into();
        if data.is_empty() || data.len() > MAX_PROPOSAL_BYTES {
            return Err(ProposeError::Invalid);
        }
        self.call(|reply| Command::Propose(data, reply)).await
    }

    /// Proposes `data` on the leader and resolves with the entry's index once it is durably
    /// appended to this leader's log (persisted, not yet committed: Kafka's acks=1). Whether it
    /// then commits is not reported; a leader change before the append answers
    /// `LeadershipLost`, an entry replaced at that index `Dropped`.
    pub async fn propose_appended(&self, data: impl Into<Bytes>) -> Result<u64, ProposeError> {
        let data = data.into();
        if data.is_empty() || data.len() > MAX_PROPOSAL_BYTES {
            return Err(ProposeError::Invalid);
        }
        self.call(|reply| Command::ProposeAppended(data, reply))
            .await
    }

    /// Proposes `data` from any member: a follower hands it to the leader it knows of (raft-rs's
    /// proposal forwarding), a leader appends it. Nothing reports whether it committed (a
    /// proposal with no known leader, or one lost on the way, is dropped): the caller watches
    /// its state machine for the effect and proposes again if it does not come. For idempotent
    /// entries only.
    pub fn propose_forwarded(&self, data: impl Into<Bytes>) -> Result<(), ProposeError> {
        let data = data.into();
        if data.is_empty() || data.len() > MAX_PROPOSAL_BYTES {
            return Err(ProposeError::Invalid);
        }
        self.shared
            .commands
            .try_send(Command::ProposeForwarded(data))
            .map_err(|_| ProposeError::Stopped)
    }

    /// Proposes a configuration change; resolves like `propose` once it is applied.
    pub async fn propose_conf_change(&self, change: ConfChangeV2) -> Result<u64, ProposeError> {
        self.call(|reply| Command::ProposeConfChange(change, reply))
            .await
    }

    async fn call(&self, f: impl FnOnce(Reply) -> Command) -> Result<u64, ProposeError> {
        let (tx, rx) = async_channel::bounded(1);
        if self.shared.commands.try_send(f(tx)).is_err() {
            return Err(ProposeError::Stopped);
        }
        rx.recv().await.unwrap_or(Err(ProposeError::Stopped))
    }

    /// Asks the leader to hand leadership to `to`.
    pub fn transfer_leader(&self, to: u64) {
        let _ = self.shared.commands.try_send(Command::TransferLeader(to));
    }

    /// Starts an election now instead of waiting for the election timeout.
    pub fn campaign(&self) {
        let _ = self.shared.commands.try_send(Command::Campaign);
    }

    pub fn status(&self) -> GroupStatus {
        self.shared.status.borrow().clone()
    }

    pub fn is_leader(&self) -> bool {
        self.shared.status.borrow().role == Role::Leader
    }

    /// A stream of statuses: the current one, then one each time role, leader or term change.
    pub fn watch(&self) -> async_channel::Receiver<GroupStatus> {
        let (tx, rx) = async_channel::unbounded();
        let _ = tx.try_send(self.status());
        self.shared.watchers.borrow_mut().push(tx);
        rx
    }

    /// When a message of this group last arrived from `peer` (a leader hears from every live
    /// follower each heartbeat tick); `None` if none has since the group started.
    pub fn last_heard(&self, peer: u64) -> Option<Instant> {
        self.shared.heard.borrow().get(&peer).copied()
    }

    /// On the leader: when follower `peer` last caught up — its matched index reached the
    /// leader's last index as it was at the previous catch-up (Kafka's `lastCaughtUpTime`, which
    /// a follower keeping pace refreshes every round trip, and a stuck one never does). `None`
    /// if it has not since this node became leader, or on a node that is not the leader.
    pub fn caught_up_at(&self, peer: u64) -> Option<Instant> {
        self.shared.caught_up.borrow().get(&peer).and_then(|c| c.at)
    }

    /// On the leader: the index up to which follower `peer`'s log is known to match the
    /// leader's (raft progress `matched`, as of the last loop pass). `None` on a node that is
    /// not the leader, or for a node that is not a follower of this group.
    pub fn matched(&self, peer: u64) -> Option<u64> {
        self.shared.caught_up.borrow().get(&peer).map(|c| c.matched)
    }

    /// Why the loop ended, once it has.
    pub fn stopped(&self) -> Option<StopReason> {
        self.shared.stopped.borrow().clone()
    }

    /// Stops the loop (proposals awaiting commit fail with `Stopped`) and waits for it to end.
    pub async fn stop(&self) -> StopReason {
        let _ = self.shared.commands.try_send(Command::Stop);
        let _ = self.shared.done.recv().await;
        self.stopped().unwrap_or(StopReason::Requested)
    }
}

enum Wake {
    Message(Message),
    Command(Command),
    /// Entries a read waited for were fetched: these reads can be retried.
    Fetched(Vec<GetEntriesContext>),
    Tick,
    Closed,
}

struct Driver<L: LogStore, M> {
    raw: RawNode<RaftStorage<L>>,
    sm: M,
    config: GroupConfig,
    transport: Transport,
    /// Proposals awaiting commit: index → (term proposed in, entry type proposed, reply).
    pending: BTreeMap<u64, (u64, EntryType, Reply)>,
    /// Proposals answered once appended to this leader's log (`propose_appended`): index →
    /// (term proposed in, reply).
    appended: BTreeMap<u64, (u64, Reply)>,
    shared: Rc<Shared>,
    applied: u64,
    was_leader: bool,
    /// When this node last told a leader that its log is shorter than the leader believes.
    lost_log_reported: Option<Instant>,
    /// Completed entry fetches (see `LogStore::take_fetch`), with the reads waiting for them.
    fetched_tx: async_channel::Sender<Vec<GetEntriesContext>>,
    fetched: async_channel::Receiver<Vec<GetEntriesContext>>,
    /// Data proposals of this pass, proposed together (`flush_proposals`): (data, answered on
    /// append rather than commit, reply).
    proposals: Vec<(Bytes, bool, Reply)>,
}

/// The first tick instant after `now` on a grid of `interval` shared by every group of the
/// process: groups tick together, so the heartbeats of all of them for one peer are produced in
/// one executor pass and leave in one coalesced frame (see `transport`), and the responses
/// likewise. (Election timeouts stay randomized: they are counted in ticks.)
fn aligned_tick(now: Instant, interval: Duration) -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let step = interval.as_nanos().max(1);
    let since = now.saturating_duration_since(epoch).as_nanos();
    let ticks = since / step + 1;
    // Saturating: a grid index past u64 nanoseconds is centuries away.
    epoch + Duration::from_nanos(u64::try_from(ticks * step).unwrap_or(u64::MAX))
}

/// Runs `f` on the raft node, turning a raft-rs panic (a broken invariant, possibly from a peer's
/// bogus message) into a failure of this group instead of the whole executor thread.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, StopReason> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        StopReason::Failed(format!("raft panicked: {msg}"))
    })
}

fn storage_failed(e: io::Error) -> StopReason {
    StopReason::Failed(format!("raft log: {e}"))
}

impl<L: LogStore, M: StateMachine> Driver<L, M> {
    async fn run(
        &mut self,
        inbox: async_channel::Receiver<Message>,
        commands: async_channel::Receiver<Command>,
    ) -> StopReason {
        let interval = self.config.tick_interval;
        let fetched = self.fetched.clone();
        let mut next_tick = aligned_tick(Instant::now(), interval);
        loop {
            // Committed entries left over by the bound on one pass (`COMMITTED_BYTES_PER_READY`)
            // are applied in the next pass, without waiting for a message or a tick.
            let wait = if self.raw.has_ready() {
                std::time::Duration::ZERO
            } else {
                next_tick.saturating_duration_since(Instant::now())
            };
            let wake = future::or(
                future::or(
                    async {
                        inbox
                            .recv()
                            .await
                            .map(Wake::Message)
                            .unwrap_or(Wake::Closed)
                    },
                    future::or(
                        async {
                            commands
                                .recv()
                                .await
                                .map(Wake::Command)
                                .unwrap_or(Wake::Closed)
                        },
                        async {
                            fetched
                                .recv()
                                .await
                                .map(Wake::Fetched)
                                .unwrap_or(Wake::Closed)
                        },
                    ),
                ),
                async {
                    glommio::timer::sleep(wait).await;
                    Wake::Tick
                },
            )
            .await;
            let result = (|| -> Result<(), StopReason> {
                match wake {
                    Wake::Message(m) => self.step(m)?,
                    Wake::Command(c) => self.command(c)?,
                    Wake::Fetched(contexts) => {
                        for c in contexts {
                            guarded(|| self.raw.on_entries_fetched(c))?;
                        }
                    }
                    Wake::Tick => {}
                    Wake::Closed => return Err(StopReason::Requested),
                }
                // Everything else already queued joins this pass.
                while let Ok(m) = inbox.try_recv() {
                    self.step(m)?;
                }
                while let Ok(c) = commands.try_recv() {
                    self.command(c)?;
                }
                self.flush_proposals()?;
                let now = Instant::now();
                if now >= next_tick {
                    guarded(|| self.raw.tick())?;
                    next_tick += interval;
                    if next_tick <= now {
                        // The executor stalled for more than a tick: count one tick, not a burst
                        // that would start elections everywhere at once.
                        next_tick = aligned_tick(now, interval);
                    }
                }
                Ok(())
            })();
            let result = match result {
                Ok(()) => self.handle_ready().await,
                Err(e) => Err(e),
            };
            self.start_fetches();
            self.publish();
            if let Err(reason) = result {
                return reason;
            }
        }
    }

    /// Reads of this pass that wait for entries from disk: their fetch runs in its own task,
    /// which hands the reads back to the loop when it is done (raft-rs then sends the append).
    fn start_fetches(&mut self) {
        let waiting = self.raw.store().take_waiting();
        let fetch = self.raw.mut_store().log_mut().take_fetch();
        if waiting.is_empty() && fetch.is_none() {
            return;
        }
        let tx = self.fetched_tx.clone();
        glommio::spawn_local(async move {
            if let Some(f) = fetch {
                f.await;
            }
            let _ = tx.send(waiting).await;
        })
        .detach();
    }

    fn step(&mut self, mut m: Message) -> Result<(), StopReason> {
        self.shared
            .heard
            .borrow_mut()
            .insert(m.from, Instant::now());
        // A heartbeat carries the commit index as far as the leader believes this node's log
        // reaches. A node whose log was lost (its data wiped, rejoining as the same member)
        // has less than the leader remembers, and raft-rs panics on a commit index past its
        // log; the commit index is only a hint there, so it is capped at the log's end (the
        // appends that rebuild the log carry their own).
        let mut lost_log = None;
        if m.get_msg_type() == MessageType::MsgHeartbeat {
            let last = self.raw.raft.raft_log.last_index();
            if m.commit > last {
                m.commit = last;
                lost_log = Some((m.from, last));
            }
        }
        if let Err(e) = guarded(|| self.raw.step(m))? {
            tracing::debug!(
                group = self.config.group_id,
                "raft step refused a message: {e}"
            );
        }
        if let Some((leader, last)) = lost_log {
            self.report_lost_log(leader, last)?;
        }
        Ok(())
    }

    /// The leader believes this node's log reaches further than it does (the log was lost):
    /// a leader replicating to it in pipeline only sends heartbeats once it thinks the
    /// follower has everything, so it must be told. A rejected append carrying this log's
    /// end as the hint does that: the leader goes back to probing from there. At most once per
    /// `LOST_LOG_REPORT_INTERVAL`, as every heartbeat repeats the news while the log is rebuilt.
    fn report_lost_log(&mut self, leader: u64, last: u64) -> Result<(), StopReason> {
        let now = Instant::now();
        if self
            .lost_log_reported
            .is_some_and(|at| now.saturating_duration_since(at) < LOST_LOG_REPORT_INTERVAL)
        {
            return Ok(());
        }
        self.lost_log_reported = Some(now);
        tracing::info!(
            group = self.config.group_id,
            leader,
            last_index = last,
            "this replica's log is shorter than the leader believes: asking it to probe"
        );
        let mut r = Message::default();
        r.set_msg_type(MessageType::MsgAppendResponse);
        r.from = self.config.node_id;
        r.to = leader;
        r.term = self.raw.raft.term;
        // Past any index the leader may have recorded as matched, so the rejection is not
        // taken for a stale one.
        r.index = u64::MAX;
        r.reject = true;
        r.reject_hint = last;
        self.send(vec![r])
    }

    fn command(&mut self, c: Command) -> Result<(), StopReason> {
        match c {
            Command::Propose(data, reply) => {
                self.proposals.push((data, false, reply));
                return Ok(());
            }
            Command::ProposeAppended(data, reply) => {
                self.proposals.push((data, true, reply));
                return Ok(());
            }
            _ => {}
        }
        // Anything else comes after the data proposals queued before it.
        self.flush_proposals()?;
        match c {
            Command::Propose(..) | Command::ProposeAppended(..) => {}
            Command::ProposeForwarded(data) => {
                let mut m = Message::default();
                m.set_msg_type(MessageType::MsgPropose);
                m.from = self.raw.raft.id;
                let mut e = Entry::default();
                e.data = data;
                m.set_entries(vec![e].into());
                if let Err(e) = guarded(|| self.raw.raft.step(m))? {
                    tracing::debug!(
                        group = self.config.group_id,
                        "forwarded proposal dropped: {e}"
                    );
                }
            }
            Command::ProposeConfChange(cc, reply) => {
                self.propose(reply, EntryType::EntryConfChangeV2, false, |raw| {
                    raw.propose_conf_change(vec![], cc)
                })?
            }
            Command::TransferLeader(to) => guarded(|| self.raw.transfer_leader(to))?,
            Command::Campaign => {
                let _ = guarded(|| self.raw.campaign())?;
            }
            Command::Stop => return Err(StopReason::Requested),
        }
        Ok(())
    }

    /// Proposes the data proposals of this pass: as few `MsgPropose` as fit `max_size_per_msg`
    /// each, so that raft appends them together and sends each follower one append for them
    /// rather than one per proposal.
    fn flush_proposals(&mut self) -> Result<(), StopReason> {
        if self.proposals.is_empty() {
            return Ok(());
        }
        let proposals = std::mem::take(&mut self.proposals);
        if self.raw.raft.state != StateRole::Leader {
            let leader = Some(self.raw.raft.leader_id).filter(|id| *id != raft::INVALID_ID);
            for (_, _, reply) in proposals {
                let _ = reply.try_send(Err(ProposeError::NotLeader { leader }));
            }
            return Ok(());
        }
        let mut batch = Vec::new();
        let mut bytes = 0u64;
        for (data, on_append, reply) in proposals {
            if self.pending.len() + self.appended.len() + batch.len()
                >= self.config.max_pending_proposals
            {
                let _ = reply.try_send(Err(ProposeError::Busy));
                continue;
            }
            let len = data.len() as u64;
            if !batch.is_empty() && bytes + len > self.config.max_size_per_msg {
                self.propose_batch(std::mem::take(&mut batch))?;
                bytes = 0;
            }
            bytes += len;
            batch.push((data, on_append, reply));
        }
        if !batch.is_empty() {
            self.propose_batch(batch)?;
        }
        Ok(())
    }

    /// One `MsgPropose` of several entries: raft appends all of them or none.
    fn propose_batch(&mut self, batch: Vec<(Bytes, bool, Reply)>) -> Result<(), StopReason> {
        let before = self.raw.raft.raft_log.last_index();
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgPropose);
        m.from = self.raw.raft.id;
        let entries: Vec<Entry> = batch
            .iter()
            .map(|(data, _, _)| {
                let mut e = Entry::default();
                e.data = data.clone();
                e
            })
            .collect();
        m.set_entries(entries.into());
        let stepped = guarded(|| self.raw.raft.step(m))?;
        let after = self.raw.raft.raft_log.last_index();
        let appended_all = stepped.is_ok() && after.saturating_sub(before) == batch.len() as u64;
        let term = self.raw.raft.term;
        for (k, (_, on_append, reply)) in batch.into_iter().enumerate() {
            if !appended_all {
                let _ = reply.try_send(Err(ProposeError::Dropped));
                continue;
            }
            let index = before + 1 + k as u64;
            if on_append {
                self.appended.insert(index, (term, reply));
            } else {
                self.pending
                    .insert(index, (term, EntryType::EntryNormal, reply));
            }
        }
        Ok(())
    }

    fn propose(
        &mut self,
        reply: Reply,
        kind: EntryType,
        on_append: bool,
        f: impl FnOnce(&mut RawNode<RaftStorage<L>>) -> raft::Result<()>,
    ) -> Result<(), StopReason> {
        if self.raw.raft.state != StateRole::Leader {
            let leader = Some(self.raw.raft.leader_id).filter(|id| *id != raft::INVALID_ID);
            let _ = reply.try_send(Err(ProposeError::NotLeader { leader }));
            return Ok(());
        }
        if self.pending.len() + self.appended.len() >= self.config.max_pending_proposals {
            let _ = reply.try_send(Err(ProposeError::Busy));
            return Ok(());
        }
        let before = self.raw.raft.raft_log.last_index();
        match guarded(|| f(&mut self.raw))? {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                if index == before {
                    let _ = reply.try_send(Err(ProposeError::Dropped));
                } else if on_append {
                    self.appended.insert(index, (self.raw.raft.term, reply));
                } else {
                    self.pending
                        .insert(index, (self.raw.raft.term, kind, reply));
                }
            }
            Err(_) => {
                let _ = reply.try_send(Err(ProposeError::Dropped));
            }
        }
        Ok(())
    }

    fn send(&mut self, msgs: Vec<Message>) -> Result<(), StopReason> {
        if msgs.is_empty() {
            return Ok(());
        }
        let snapshots_to: Vec<u64> = msgs
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .map(|m| m.to)
            .collect();
        self.transport.send(self.config.group_id, msgs);
        // A snapshot is reported sent as soon as it is queued: the follower's progress leaves the
        // snapshot state and is probed. If the snapshot was lost (a dropped connection, a full
        // queue), the probe is rejected and the leader sends a fresh snapshot, instead of
        // waiting forever for an acknowledgement that will not come.
        for to in snapshots_to {
            guarded(|| self.raw.report_snapshot(to, SnapshotStatus::Finish))?;
        }
        Ok(())
    }

    async fn handle_ready(&mut self) -> Result<(), StopReason> {
        if !self.raw.has_ready() {
            self.check_leadership();
            return Ok(());
        }
        let log = &self.raw.raft.raft_log;
        let (low, high) = (log.applied + 1, log.committed.min(log.persisted) + 1);
        self.fetch_committed(low, high).await;
        let mut ready = guarded(|| self.raw.ready())?;
        self.send(ready.take_messages())?;
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.install_received_snapshot(snap).await?;
        }
        self.apply_entries(ready.take_committed_entries())?;
        // (index, term) of the entries this pass makes durable, for `propose_appended`.
        let appending: Vec<(u64, u64)> = if self.appended.is_empty() {
            Vec::new()
        } else {
            ready.entries().iter().map(|e| (e.index, e.term)).collect()
        };
        let store = self.raw.mut_store().log_mut();
        if !ready.entries().is_empty() {
            store.append(ready.entries()).map_err(storage_failed)?;
        }
        if let Some(hs) = ready.hs() {
            store.set_hard_state(hs).map_err(storage_failed)?;
        }
        // The store's writes and their sync: awaited (the segment log's group commit), with
        // the store inside raft-rs untouched meanwhile.
        store.persist().await.map_err(storage_failed)?;
        // Durable now: votes and append responses may go out.
        self.send(ready.take_persisted_messages())?;
        self.answer_appended(&appending);
        let high = self.raw.raft.raft_log.last_index() + 1;
        self.fetch_committed(self.applied + 1, high).await;
        let mut light = guarded(|| self.raw.advance(ready))?;
        if let Some(commit) = light.commit_index() {
            let store = self.raw.mut_store().log_mut();
            let mut hs = store.raft_state().hard_state;
            hs.commit = commit;
            store.set_hard_state(&hs).map_err(storage_failed)?;
        }
        self.send(light.take_messages())?;
        self.apply_entries(light.take_committed_entries())?;
        guarded(|| self.raw.advance_apply())?;
        self.check_leadership();
        self.maybe_compact().await
    }

    /// Has the store bring into memory the committed entries raft-rs is about to hand over
    /// from `low` on (it reads them synchronously, `GetEntriesFor::GenReady`): before `ready`,
    /// from the applied index on (the loop applies everything it is handed in each pass); and
    /// before `advance`, which commits what this pass made durable, from there to the log's
    /// end. Nothing else touches the raft state while it is awaited.
    async fn fetch_committed(&mut self, low: u64, high: u64) {
        let low = low.max(self.raw.raft.raft_log.first_index());
        if high <= low {
            return;
        }
        let store = self.raw.mut_store().log_mut();
        if let Some(fetch) = store.fetch_committed(low, high, COMMITTED_BYTES_PER_READY) {
            fetch.await;
        }
    }

    async fn install_received_snapshot(&mut self, snap: Snapshot) -> Result<(), StopReason> {
        let (index, term) = (snap.get_metadata().index, snap.get_metadata().term);
        tracing::info!(
            group = self.config.group_id,
            node = self.config.node_id,
            "installing snapshot at index {index} term {term} ({} bytes)",
            snap.data.len()
        );
        self.sm.restore(index, term, &snap.data);
        self.raw
            .mut_store()
            .log_mut()
            .install_snapshot(snap)
            .await
            .map_err(storage_failed)?;
        self.applied = index;
        self.complete_up_to(index, None);
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), StopReason> {
        for e in entries {
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if !e.data.is_empty() {
                        self.sm.apply(e.index, e.term, &e.data);
                    }
                }
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    if let Err(err) = cc.merge_from_bytes(&e.data) {
                        return Err(StopReason::Failed(format!(
                            "conf change at {}: {err}",
                            e.index
                        )));
                    }
                    self.apply_conf_change(&cc)?;
                }
                EntryType::EntryConfChangeV2 => {
                    let mut cc = ConfChangeV2::default();
                    if let Err(err) = cc.merge_from_bytes(&e.data) {
                        return Err(StopReason::Failed(format!(
                            "conf change at {}: {err}",
                            e.index
                        )));
                    }
                    self.apply_conf_change(&cc)?;
                }
            }
            self.applied = e.index;
            self.complete_up_to(e.index, Some((e.term, e.get_entry_type())));
        }
        Ok(())
    }

    fn apply_conf_change(&mut self, cc: &impl raft_proto::ConfChangeI) -> Result<(), StopReason> {
        match guarded(|| self.raw.apply_conf_change(cc))? {
            Ok(cs) => tracing::info!(group = self.config.group_id, "configuration now {cs:?}"),
            Err(e) => tracing::warn!(group = self.config.group_id, "conf change refused: {e}"),
        }
        Ok(())
    }

    /// Completes the proposals at or below `index`: the one at `index` succeeded if the entry
    /// applied there is of the term and type proposed (raft-rs turns a conf change it refuses
    /// into an empty normal entry); any other was replaced.
    fn complete_up_to(&mut self, index: u64, applied: Option<(u64, EntryType)>) {
        let rest = self.pending.split_off(&(index + 1));
        for (i, (t, kind, reply)) in std::mem::replace(&mut self.pending, rest) {
            let outcome = if i == index && Some((t, kind)) == applied {
                Ok(index)
            } else {
                Err(ProposeError::Dropped)
            };
            let _ = reply.try_send(outcome);
        }
    }

    /// Answers the `propose_appended` proposals among the entries just made durable: `Ok` if
    /// the entry at their index is the one proposed (same term), `Dropped` if another replaced
    /// it.
    fn answer_appended(&mut self, appended: &[(u64, u64)]) {
        let Some(&(last, _)) = appended.last() else {
            return;
        };
        let rest = self.appended.split_off(&(last + 1));
        for (index, (term, reply)) in std::mem::replace(&mut self.appended, rest) {
            let stored = appended.iter().find(|(i, _)| *i == index).map(|(_, t)| *t);
            let outcome = if stored == Some(term) {
                Ok(index)
            } else {
                Err(ProposeError::Dropped)
            };
            let _ = reply.try_send(outcome);
        }
    }

    fn check_leadership(&mut self) {
        let leader = self.raw.raft.state == StateRole::Leader;
        if self.was_leader && !leader {
            for (_, (_, _, reply)) in std::mem::take(&mut self.pending) {
                let _ = reply.try_send(Err(ProposeError::LeadershipLost));
            }
            for (_, (_, reply)) in std::mem::take(&mut self.appended) {
                let _ = reply.try_send(Err(ProposeError::LeadershipLost));
            }
        }
        self.was_leader = leader;
    }

    async fn maybe_compact(&mut self) -> Result<(), StopReason> {
        let store = self.raw.store().log();
        let snap_index = store.snapshot().get_metadata().index;
        if self.applied < snap_index + self.config.snapshot_interval_entries.max(1) {
            return Ok(());
        }
        let term = store.term(self.applied).map_err(|e| {
            StopReason::Failed(format!("term of applied index {}: {e}", self.applied))
        })?;
        let mut snap = Snapshot::default();
        snap.data = self.sm.snapshot().into();
        let meta = snap.mut_metadata();
        meta.index = self.applied;
        meta.term = term;
        meta.set_conf_state(self.raw.raft.prs().conf().to_conf_state());
        self.raw
            .mut_store()
            .log_mut()
            .install_snapshot(snap)
            .await
            .map_err(storage_failed)?;
        tracing::debug!(
            group = self.config.group_id,
            "compacted the log to {}",
            self.applied
        );
        Ok(())
    }

    fn status(&self) -> GroupStatus {
        let r = &self.raw.raft;
        GroupStatus {
            group_id: self.config.group_id,
            node_id: self.config.node_id,
            role: r.state.into(),
            leader_id: Some(r.leader_id).filter(|id| *id != raft::INVALID_ID),
            term: r.term,
            commit: r.raft_log.committed,
            applied: self.applied,
            last_index: r.raft_log.last_index(),
            snapshot_index: self.raw.store().log().snapshot().get_metadata().index,
        }
    }

    fn publish(&self) {
        let status = self.status();
        self.track_catch_up(&status);
        self.publish_status(status);
    }

    /// Updates each follower's catch-up state from raft progress (leader only; cleared
    /// otherwise, so a new leader starts with no follower caught up).
    fn track_catch_up(&self, status: &GroupStatus) {
        let mut caught_up = self.shared.caught_up.borrow_mut();
        if status.role != Role::Leader {
            caught_up.clear();
            return;
        }
        let now = Instant::now();
        for (id, pr) in self.raw.raft.prs().iter() {
            if *id == self.config.node_id {
                continue;
            }
            let c = caught_up.entry(*id).or_insert(CatchUp {
                at: None,
                target: status.last_index,
                matched: 0,
            });
            c.matched = pr.matched;
            if pr.matched >= c.target {
                c.at = Some(now);
                c.target = status.last_index;
            }
        }
    }

    fn publish_status(&self, status: GroupStatus) {
        let changed = {
            let old = self.shared.status.borrow();
            old.role != status.role || old.leader_id != status.leader_id || old.term != status.term
        };
        *self.shared.status.borrow_mut() = status.clone();
        if changed {
            self.shared
                .watchers
                .borrow_mut()
                .retain(|w| w.try_send(status.clone()).is_ok());
        }
    }

    fn finish(&mut self, reason: StopReason) {
        if let StopReason::Failed(why) = &reason {
            tracing::error!(
                group = self.config.group_id,
                node = self.config.node_id,
                "raft group stopped: {why}"
            );
        }
        self.transport.unregister(self.config.group_id);
        for (_, (_, _, reply)) in std::mem::take(&mut self.pending) {
            let _ = reply.try_send(Err(ProposeError::Stopped));
        }
        for (_, (_, reply)) in std::mem::take(&mut self.appended) {
            let _ = reply.try_send(Err(ProposeError::Stopped));
        }
        *self.shared.stopped.borrow_mut() = Some(reason);
        let mut status = self.shared.status.borrow().clone();
        status.role = Role::Stopped;
        self.publish_status(status);
        self.shared.watchers.borrow_mut().clear();
    }
}
