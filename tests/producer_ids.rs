//! Producer ids are never handed out twice (KIP-98: a producer id identifies one idempotent
//! producer session; a reused id would let the broker take a new producer's batches for
//! duplicates or out-of-sequence writes of an old one). Many connections spread over two shards
//! ask for ids at once; the moment a client is given the first id of a new block, it kills the
//! broker with SIGKILL. The broker is restarted on the same data dir and this is repeated: every
//! id any client was ever given must be distinct. Persisting a block is slowed down on purpose
//! (`SLUICE_FAULT_DELAY_MS=producer_id_block:…`) so that an id handed out before its block is
//! durable is caught, not just possible.
//!
//! Raw requests through the shared test client (`common::raw`). Every wait is bounded.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::raw::Raw;
use common::Broker;
use kafka_protocol::messages::{ApiKey, InitProducerIdRequest, InitProducerIdResponse, ProducerId};

/// How long one round may take to reach the next block.
const ROUND_WAIT_MAX: Duration = Duration::from_secs(60);
/// How long persisting a block stalls: the window in which an id of a block that is not yet
/// durable could be handed out.
const BLOCK_DELAY_MS: u64 = 200;
/// InitProducerId v4 (flexible; KIP-360).
const VERSION: i16 = 4;
/// Concurrent clients: enough that SO_REUSEPORT puts some on each of the two shards.
const CLIENTS: usize = 16;
const ROUNDS: usize = 3;

/// Asks for a new producer id; `None` once the broker has gone away.
fn init_producer_id(raw: &mut Raw) -> Option<i64> {
    let body = InitProducerIdRequest::default()
        .with_transactional_id(None)
        .with_transaction_timeout_ms(60_000)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    let r: InitProducerIdResponse = raw.try_call(ApiKey::InitProducerId, VERSION, &body)?;
    assert_eq!(r.error_code, 0, "InitProducerId error");
    assert_eq!(r.producer_epoch, 0, "a new producer id starts at epoch 0");
    assert!(r.producer_id.0 >= 0, "producer id {}", r.producer_id.0);
    Some(r.producer_id.0)
}

/// The persisted producer-id limit: ids below it may have been handed out.
fn persisted_limit(data_dir: &Path) -> i64 {
    let path = data_dir.join("__meta/producer_ids");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .parse()
        .expect("a number")
}

/// Runs `CLIENTS` connections asking for ids until the broker goes away or `stop` is set. The
/// first client given an id at or above `kill_at` kills the broker (`pid`) with SIGKILL at once
/// and sets `killed`. Returns every id a client received.
fn hammer(
    addr: SocketAddr,
    pid: i32,
    kill_at: i64,
    killed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Vec<i64> {
    let ids = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (killed, stop, ids) = (killed.clone(), stop.clone(), ids.clone());
            std::thread::spawn(move || {
                let mut raw = Raw::connect(addr);
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let Some(id) = init_producer_id(&mut raw) else {
                        break;
                    };
                    mine.push(id);
                    if id >= kill_at && !killed.swap(true, Ordering::SeqCst) {
                        // SAFETY: kill(2) on the PID of the broker this test spawned and has
                        // not reaped yet.
                        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
                        assert_eq!(rc, 0, "kill -9 {pid}");
                    }
                }
                ids.lock().expect("ids").extend(mine);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let ids = ids.lock().expect("ids").clone();
    ids
}

#[test]
fn producer_ids_never_repeat_across_kill_9() {
    let mut broker = Broker::options()
        .cores(2)
        .env(
            "SLUICE_FAULT_DELAY_MS",
            format!("producer_id_block:{BLOCK_DELAY_MS}"),
        )
        .start();
    let mut seen = BTreeSet::new();
    for round in 0..ROUNDS {
        // Start-up persisted the block the broker hands out first; the next block starts here.
        let next_block = persisted_limit(&broker.data_dir());
        let pid = broker.pid().expect("broker running");
        let killed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let addr = broker.addr;
        let clients = {
            let (killed, stop) = (killed.clone(), stop.clone());
            std::thread::spawn(move || hammer(addr, pid, next_block, killed, stop))
        };
        let deadline = Instant::now() + ROUND_WAIT_MAX;
        while !killed.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        broker.sigkill();
        let ids = clients.join().expect("clients");
        assert!(
            killed.load(Ordering::SeqCst),
            "round {round}: no client reached id {next_block} within {ROUND_WAIT_MAX:?} ({} ids)",
            ids.len()
        );
        for id in ids {
            assert!(
                seen.insert(id),
                "round {round}: producer id {id} handed out twice"
            );
        }
        broker.restart();
    }
    // And once more after the last restart, with a clean stop.
    let mut raw = Raw::connect(broker.addr);
    for _ in 0..100 {
        let id = init_producer_id(&mut raw).expect("broker answers");
        assert!(
            seen.insert(id),
            "after restart: producer id {id} handed out twice"
        );
    }
    broker.sigterm();
}
