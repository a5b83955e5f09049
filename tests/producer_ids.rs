//! Producer ids are never handed out twice (KIP-98: a producer id identifies one idempotent
//! producer session; a reused id would let the broker treat a new producer's batches as
//! duplicates or out-of-sequence writes of an old one). Many connections spread over two shards
//! ask for ids at once, the broker is killed with SIGKILL while they do, restarted on the same
//! data dir, and this is repeated: every id any client was ever given must be distinct.
//!
//! Raw requests with our own framing and the `kafka-protocol` codecs. Every wait is bounded.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use common::Broker;
use kafka_protocol::messages::{
    ApiKey, InitProducerIdRequest, InitProducerIdResponse, ProducerId, RequestHeader,
    ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

const IO_WAIT: Duration = Duration::from_secs(15);
/// How long one round may take to collect its ids.
const ROUND_WAIT_MAX: Duration = Duration::from_secs(60);
/// InitProducerId v4 (flexible; KIP-360).
const VERSION: i16 = 4;
/// Concurrent clients: enough that SO_REUSEPORT puts some on each of the two shards.
const CLIENTS: usize = 16;
/// Ids each round collects before the kill: more than one persisted block (1000 ids), so the
/// clients race across block boundaries while the broker dies.
const IDS_PER_ROUND_MIN: usize = 2500;
const ROUNDS: usize = 3;

/// Asks for a new producer id; `None` once the broker has gone away.
fn init_producer_id(s: &mut TcpStream, correlation: i32) -> Option<i64> {
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::InitProducerId as i16)
        .with_request_api_version(VERSION)
        .with_correlation_id(correlation)
        .with_client_id(Some(StrBytes::from_static_str("sluice-pid-test")));
    let body = InitProducerIdRequest::default()
        .with_transactional_id(None)
        .with_transaction_timeout_ms(60_000)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    header
        .encode(
            &mut buf,
            ApiKey::InitProducerId.request_header_version(VERSION),
        )
        .expect("encode header");
    body.encode(&mut buf, VERSION).expect("encode request");
    let len = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    s.write_all(&buf).ok()?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let n = i32::from_be_bytes(len);
    assert!(n >= 4, "response frame length {n}");
    let mut frame = vec![0u8; n as usize];
    s.read_exact(&mut frame).ok()?;
    let mut frame = Bytes::from(frame);
    let h = ResponseHeader::decode(
        &mut frame,
        ApiKey::InitProducerId.response_header_version(VERSION),
    )
    .expect("response header");
    assert_eq!(h.correlation_id, correlation, "correlation id");
    let r = InitProducerIdResponse::decode(&mut frame, VERSION).expect("response body");
    assert_eq!(r.error_code, 0, "InitProducerId error");
    assert_eq!(r.producer_epoch, 0, "a new producer id starts at epoch 0");
    assert!(r.producer_id.0 >= 0, "producer id {}", r.producer_id.0);
    Some(r.producer_id.0)
}

/// Runs `CLIENTS` connections asking for ids until `stop` is set or the broker goes away;
/// returns every id a client received.
fn hammer(addr: SocketAddr, stop: Arc<AtomicBool>, got: Arc<AtomicUsize>) -> Vec<i64> {
    let ids = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, got, ids) = (stop.clone(), got.clone(), ids.clone());
            std::thread::spawn(move || {
                let mut s = TcpStream::connect_timeout(&addr, IO_WAIT).expect("connect");
                s.set_read_timeout(Some(IO_WAIT)).expect("read timeout");
                s.set_write_timeout(Some(IO_WAIT)).expect("write timeout");
                s.set_nodelay(true).expect("nodelay");
                let mut mine = Vec::new();
                let mut correlation = 0;
                while !stop.load(Ordering::Relaxed) {
                    correlation += 1;
                    match init_producer_id(&mut s, correlation) {
                        Some(id) => {
                            mine.push(id);
                            got.fetch_add(1, Ordering::Relaxed);
                        }
                        None => break,
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
    let mut broker = Broker::options().cores(2).start();
    let mut seen = BTreeSet::new();
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let got = Arc::new(AtomicUsize::new(0));
        let addr = broker.addr;
        let clients = {
            let (stop, got) = (stop.clone(), got.clone());
            std::thread::spawn(move || hammer(addr, stop, got))
        };
        let deadline = Instant::now() + ROUND_WAIT_MAX;
        while got.load(Ordering::Relaxed) < IDS_PER_ROUND_MIN && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Killed while the clients are still asking: some blocks are being persisted right now.
        broker.sigkill();
        stop.store(true, Ordering::Relaxed);
        let ids = clients.join().expect("clients");
        assert!(
            ids.len() >= IDS_PER_ROUND_MIN,
            "round {round}: only {} ids within {ROUND_WAIT_MAX:?}",
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
    let mut s = TcpStream::connect_timeout(&broker.addr, IO_WAIT).expect("connect");
    s.set_read_timeout(Some(IO_WAIT)).expect("read timeout");
    for c in 1..=100 {
        let id = init_producer_id(&mut s, c).expect("broker answers");
        assert!(
            seen.insert(id),
            "after restart: producer id {id} handed out twice"
        );
    }
    broker.sigterm();
}
