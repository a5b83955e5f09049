//! One node on one executor: a group of one, and what happens when its log fails.

use sluice_raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use sluice_raft::raft::RaftState;
use sluice_raft::{
    FileLog, GroupConfig, LogStore, ProposeError, RaftGroup, Role, StateMachine, StopReason,
    Transport, TransportConfig,
};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// A file log whose syncs start failing when told to.
struct FailingLog {
    inner: FileLog,
    fail: Arc<AtomicBool>,
}

impl LogStore for FailingLog {
    fn raft_state(&self) -> RaftState {
        self.inner.raft_state()
    }
    fn first_index(&self) -> u64 {
        self.inner.first_index()
    }
    fn last_index(&self) -> u64 {
        self.inner.last_index()
    }
    fn term(&self, index: u64) -> sluice_raft::raft::Result<u64> {
        self.inner.term(index)
    }
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> sluice_raft::raft::Result<Vec<Entry>> {
        self.inner.entries(low, high, max_size)
    }
    fn snapshot(&self) -> Snapshot {
        self.inner.snapshot()
    }
    fn append(&mut self, entries: &[Entry]) -> io::Result<()> {
        self.inner.append(entries)
    }
    fn set_hard_state(&mut self, hs: &HardState) -> io::Result<()> {
        self.inner.set_hard_state(hs)
    }
    fn bootstrap(&mut self, cs: &ConfState) -> sluice_raft::Persist {
        self.inner.bootstrap(cs)
    }
    fn persist(&mut self) -> sluice_raft::Persist {
        if self.fail.load(Ordering::SeqCst) {
            return Box::pin(std::future::ready(Err(io::Error::other(
                "injected fdatasync failure",
            ))));
        }
        self.inner.persist()
    }
    fn install_snapshot(&mut self, snapshot: Snapshot) -> sluice_raft::Persist {
        self.inner.install_snapshot(snapshot)
    }
}

type Entries = Vec<(u64, Vec<u8>)>;

#[derive(Clone, Default)]
struct Applied(Rc<RefCell<Entries>>);

impl StateMachine for Applied {
    fn apply(&mut self, index: u64, _term: u64, data: &[u8]) {
        self.0.borrow_mut().push((index, data.to_vec()));
    }
    fn snapshot(&mut self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(&mut self, _index: u64, _term: u64, _data: &[u8]) {
        self.0.borrow_mut().clear();
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    futures_lite::future::or(async { Some(f.await) }, async {
        glommio::timer::sleep(WAIT).await;
        None
    })
    .await
    .unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

async fn until_role(group: &RaftGroup, role: Role) {
    let watch = group.watch();
    within(&format!("role {role:?}"), async {
        while let Ok(s) = watch.recv().await {
            if s.role == role {
                return;
            }
        }
        panic!("watch ended before role {role:?}");
    })
    .await
}

#[test]
fn a_group_of_one_commits_and_a_failed_sync_stops_it_safely() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let transport = Transport::start(TransportConfig::new(
                1,
                "127.0.0.1:0".parse().unwrap(),
                HashMap::new(),
            ))
            .unwrap();
            let fail = Arc::new(AtomicBool::new(false));
            let log = FailingLog {
                inner: FileLog::open(&path).unwrap(),
                fail: fail.clone(),
            };
            let applied = Applied::default();
            let config = GroupConfig::new(1, 1, vec![1]);
            let group = RaftGroup::start(config, log, applied.clone(), &transport).unwrap();
            until_role(&group, Role::Leader).await;
            let status = group.status();
            assert_eq!(status.leader_id, Some(1));
            assert!(status.term >= 1);

            let a = within("commit", group.propose(b"a".to_vec()))
                .await
                .unwrap();
            let b = within("commit", group.propose(b"b".to_vec()))
                .await
                .unwrap();
            assert!(b > a);
            assert_eq!(group.status().commit, b);
            assert_eq!(
                *applied.0.borrow(),
                vec![(a, b"a".to_vec()), (b, b"b".to_vec())]
            );

            // The log can no longer be made durable: the group stops rather than carry on, and
            // the proposal waiting on it is told.
            fail.store(true, Ordering::SeqCst);
            let outcome = within("failed proposal", group.propose(b"c".to_vec())).await;
            assert_eq!(outcome, Err(ProposeError::Stopped));
            match group.stopped() {
                Some(StopReason::Failed(why)) => {
                    assert!(why.contains("injected fdatasync failure"), "{why}")
                }
                other => panic!("expected a failed group, got {other:?}"),
            }
            assert_eq!(group.status().role, Role::Stopped);
            assert_eq!(
                applied.0.borrow().len(),
                2,
                "nothing applied after the failure"
            );
            assert_eq!(
                within("propose after stop", group.propose(b"d".to_vec())).await,
                Err(ProposeError::Stopped)
            );
            transport.close();
        })
        .unwrap()
        .join()
        .unwrap();

    // What was synced is there after a restart.
    let log = FileLog::open(dir.path()).unwrap();
    let entries = log
        .entries(log.first_index(), log.last_index() + 1, None)
        .unwrap();
    let datas: Vec<_> = entries
        .iter()
        .filter(|e| !e.data.is_empty())
        .map(|e| e.data.to_vec())
        .collect();
    assert_eq!(&datas[..2], [b"a".to_vec(), b"b".to_vec()]);
}

/// A file log whose entries found at open count as on disk (a restarted replica's log, its
/// cache empty): a synchronous read of one of them is counted, and `fetch_committed` brings
/// them into memory asynchronously. Entries appended since are in memory.
struct ColdLog {
    inner: FileLog,
    cold: Rc<RefCell<BTreeSet<u64>>>,
    cold_reads: Rc<Cell<u64>>,
    fetches: Rc<Cell<u64>>,
}

impl LogStore for ColdLog {
    fn raft_state(&self) -> RaftState {
        self.inner.raft_state()
    }
    fn first_index(&self) -> u64 {
        self.inner.first_index()
    }
    fn last_index(&self) -> u64 {
        self.inner.last_index()
    }
    fn term(&self, index: u64) -> sluice_raft::raft::Result<u64> {
        self.inner.term(index)
    }
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> sluice_raft::raft::Result<Vec<Entry>> {
        let out = self.inner.entries(low, high, max_size)?;
        let cold = self.cold.borrow();
        let n = out.iter().filter(|e| cold.contains(&e.index)).count();
        self.cold_reads.set(self.cold_reads.get() + n as u64);
        Ok(out)
    }
    fn snapshot(&self) -> Snapshot {
        self.inner.snapshot()
    }
    fn append(&mut self, entries: &[Entry]) -> io::Result<()> {
        if let Some(first) = entries.first() {
            let _ = self.cold.borrow_mut().split_off(&first.index);
        }
        self.inner.append(entries)
    }
    fn set_hard_state(&mut self, hs: &HardState) -> io::Result<()> {
        self.inner.set_hard_state(hs)
    }
    fn bootstrap(&mut self, cs: &ConfState) -> sluice_raft::Persist {
        self.inner.bootstrap(cs)
    }
    fn persist(&mut self) -> sluice_raft::Persist {
        self.inner.persist()
    }
    fn fetch_committed(
        &mut self,
        low: u64,
        high: u64,
        max_size: u64,
    ) -> Option<sluice_raft::Fetch> {
        let wanted = self.inner.entries(low, high, Some(max_size)).ok()?;
        let missing: Vec<u64> = {
            let cold = self.cold.borrow();
            wanted
                .iter()
                .map(|e| e.index)
                .filter(|i| cold.contains(i))
                .collect()
        };
        if missing.is_empty() {
            return None;
        }
        self.fetches.set(self.fetches.get() + 1);
        let cold = self.cold.clone();
        Some(Box::pin(async move {
            // Read asynchronously: the loop's task waits here while others run.
            futures_lite::future::yield_now().await;
            let mut cold = cold.borrow_mut();
            for i in missing {
                cold.remove(&i);
            }
        }))
    }
    fn install_snapshot(&mut self, snapshot: Snapshot) -> sluice_raft::Persist {
        self.inner.install_snapshot(snapshot)
    }
}

/// A restarted group re-applies its committed entries from the log; raft-rs reads them
/// synchronously (`ready`), so the loop has the store fetch them first: none of the 300
/// entries (several passes' worth at `COMMITTED_BYTES_PER_READY`) is read from disk
/// synchronously, and all of them are applied again.
#[test]
fn a_restarted_group_fetches_its_committed_entries_before_raft_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let transport = Transport::start(TransportConfig::new(
                1,
                "127.0.0.1:0".parse().unwrap(),
                HashMap::new(),
            ))
            .unwrap();
            let payload = vec![7u8; 10 << 10];
            {
                let log = FileLog::open(&path).unwrap();
                let group = RaftGroup::start(
                    GroupConfig::new(1, 1, vec![1]),
                    log,
                    Applied::default(),
                    &transport,
                )
                .unwrap();
                until_role(&group, Role::Leader).await;
                for _ in 0..300 {
                    within("commit", group.propose(payload.clone()))
                        .await
                        .unwrap();
                }
                group.stop().await;
            }
            let inner = FileLog::open(&path).unwrap();
            let cold: BTreeSet<u64> = (inner.first_index()..=inner.last_index()).collect();
            assert!(cold.len() > 300);
            let (cold_reads, fetches) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
            let log = ColdLog {
                inner,
                cold: Rc::new(RefCell::new(cold)),
                cold_reads: cold_reads.clone(),
                fetches: fetches.clone(),
            };
            let applied = Applied::default();
            let group = RaftGroup::start(
                GroupConfig::new(1, 1, vec![1]),
                log,
                applied.clone(),
                &transport,
            )
            .unwrap();
            until_role(&group, Role::Leader).await;
            // One more, committed after all the earlier ones: once it is applied, so are they.
            within("commit", group.propose(b"after".to_vec()))
                .await
                .unwrap();
            let datas = applied
                .0
                .borrow()
                .iter()
                .filter(|(_, d)| *d == payload)
                .count();
            assert_eq!(datas, 300, "the earlier entries were applied again");
            assert!(
                fetches.get() > 1,
                "fetched in several passes: {} fetches, {} cold reads",
                fetches.get(),
                cold_reads.get()
            );
            assert_eq!(
                cold_reads.get(),
                0,
                "raft-rs read committed entries from disk synchronously"
            );
            group.stop().await;
            transport.close();
        })
        .unwrap()
        .join()
        .unwrap();
}
