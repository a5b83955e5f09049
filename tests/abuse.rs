//! Abuse of the network layer by clients that are not malformed, only hostile or broken: many
//! connections holding partial frames, frames that declare the largest size and stall, clients
//! that really send large frames at once, a client that never reads its responses, idle
//! connections, a client opening fetch sessions past the session cache's budget. In each case other clients keep being served, the broker's memory stays within
//! its documented limits (`request_bytes_max`, `inflight_requests_max`,
//! `shard_request_bytes_max`, `stall_timeout_ms`, `connection_idle_ms`), and the stalled peer is
//! closed.
//!
//! Every broker here runs under an address-space limit (RLIMIT_AS): a buffer sized by a declared
//! length instead of the bytes received would fail to allocate and abort the process, which the
//! tests would see.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{answers_api_versions, sluice, topic_name, Broker};

const STALL_TIMEOUT_MS: u64 = 2_000;
const CONNECTION_IDLE_MS: u64 = 3_000;
const REQUEST_BYTES_MAX: usize = 8 << 20;
const SHARD_REQUEST_BYTES_MAX: usize = 16 << 20;
const INFLIGHT_REQUESTS_MAX: usize = 16;
/// The broker's whole address space: what an idle broker maps (executors, registered I/O
/// memory, thread stacks) plus room for these tests' budgets, far below what trusting a declared
/// length on each connection would take.
const ADDRESS_SPACE_BYTES_MAX: u64 = 2 << 30;
/// How much the broker's peak resident memory may grow during one abuse run: the shard budget,
/// the read buffers of every connection opened, and slack for allocator behaviour.
const PEAK_GROWTH_BYTES_MAX: u64 = 96 << 20;
/// Longest wait for a condition the broker should reach on its own.
const WAIT_MAX: Duration = Duration::from_secs(20);

fn abused_broker() -> Broker {
    Broker::options()
        .args([
            "--stall-timeout-ms".to_string(),
            STALL_TIMEOUT_MS.to_string(),
            "--connection-idle-ms".to_string(),
            CONNECTION_IDLE_MS.to_string(),
            "--request-bytes-max".to_string(),
            REQUEST_BYTES_MAX.to_string(),
            "--shard-request-bytes-max".to_string(),
            SHARD_REQUEST_BYTES_MAX.to_string(),
            "--inflight-requests-max".to_string(),
            INFLIGHT_REQUESTS_MAX.to_string(),
        ])
        .address_space_bytes_max(ADDRESS_SPACE_BYTES_MAX)
        .start()
}

/// A field of /proc/PID/status in bytes (VmHWM: peak resident memory).
fn status_bytes(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("broker status");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("a number of kB");
    kib * 1024
}

fn peak_rss(b: &Broker) -> u64 {
    status_bytes(b.pid().expect("broker running"), "VmHWM:")
}

/// The broker is alive, serves a fresh client, and its peak memory grew by less than the bound.
fn assert_healthy(b: &Broker, peak_before: u64, what: &str) {
    assert!(b.pid().is_some(), "{what}: the broker process died");
    assert!(
        answers_api_versions(b.addr),
        "{what}: a fresh client is not served"
    );
    let growth = peak_rss(b).saturating_sub(peak_before);
    assert!(
        growth < PEAK_GROWTH_BYTES_MAX,
        "{what}: peak resident memory grew by {} MiB",
        growth >> 20
    );
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, WAIT_MAX).expect("connect");
    s.set_read_timeout(Some(WAIT_MAX)).expect("read timeout");
    s.set_write_timeout(Some(WAIT_MAX)).expect("write timeout");
    s
}

/// Waits (bounded) until the broker closes `s`: a read sees EOF or a reset.
fn closed_by_broker(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + WAIT_MAX;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // responses to earlier requests
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
    false
}

/// Writes `frame` again and again, never reading, until a write fails because the broker closed
/// the connection (true) or `WAIT_MAX` passes (false). Writes that time out (the broker is not
/// reading) are retried.
fn writes_until_closed(s: &mut TcpStream, frame: &[u8]) -> bool {
    let deadline = Instant::now() + WAIT_MAX;
    while Instant::now() < deadline {
        match s.write(frame) {
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(_) => return true,
        }
    }
    false
}

/// A length prefix declaring `len` bytes, then `body_bytes` bytes of the body.
fn partial_frame(len: usize, body_bytes: usize) -> Vec<u8> {
    let mut f = (len as i32).to_be_bytes().to_vec();
    // ApiVersions v0 header, then filler: it never completes, so its content does not matter.
    f.extend(18i16.to_be_bytes());
    f.extend(0i16.to_be_bytes());
    f.resize(4 + body_bytes, 0x41);
    f
}

#[test]
fn partial_frames_on_many_connections_cost_only_their_bytes_and_are_dropped_after_the_stall_timeout(
) {
    let b = abused_broker();
    let peak_before = peak_rss(&b);
    // 300 connections each declare the largest frame and send 1 KiB of it. Trusting the
    // declared length would buffer 300 × 8 MiB = 2.4 GiB, past the address-space limit.
    let mut conns: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut s = connect(b.addr);
            s.write_all(&partial_frame(REQUEST_BYTES_MAX, 1024))
                .expect("send a partial frame");
            s
        })
        .collect();
    // While they stall, other clients are served at once.
    assert_healthy(&b, peak_before, "300 stalled partial frames");
    // The stall timeout closes every one of them.
    let started = Instant::now();
    for (i, s) in conns.iter_mut().enumerate() {
        assert!(
            closed_by_broker(s),
            "stalled connection {i} still open after {:?}",
            started.elapsed()
        );
    }
    assert!(b
        .stderr()
        .contains("frame not complete within stall_timeout_ms"));
    assert_healthy(&b, peak_before, "after the stalled connections closed");
}

#[test]
fn frames_that_really_send_their_bytes_are_held_within_the_shard_budget() {
    let b = abused_broker();
    let peak_before = peak_rss(&b);
    // Eight clients each send 7 MiB of an 8 MiB frame at once: 56 MiB in all, more than the
    // shard's 16 MiB request budget. Readers past the budget wait (their bytes stay in the
    // socket); every stalled frame is dropped after the stall timeout.
    let senders: Vec<_> = (0..8)
        .map(|_| {
            let addr = b.addr;
            std::thread::spawn(move || {
                let mut s = connect(addr);
                s.set_write_timeout(Some(Duration::from_millis(500)))
                    .expect("write timeout");
                let frame = partial_frame(REQUEST_BYTES_MAX, 7 << 20);
                let mut sent = 0;
                let deadline = Instant::now() + WAIT_MAX;
                while sent < frame.len() && Instant::now() < deadline {
                    match s.write(&frame[sent..]) {
                        Ok(0) => break,
                        Ok(n) => sent += n,
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut =>
                        {
                            continue
                        }
                        Err(_) => break, // closed by the broker
                    }
                }
                s.set_read_timeout(Some(WAIT_MAX)).expect("read timeout");
                closed_by_broker(&mut s)
            })
        })
        .collect();
    for (i, t) in senders.into_iter().enumerate() {
        assert!(
            t.join().expect("sender thread"),
            "sender {i} was not closed after stalling"
        );
    }
    assert_healthy(&b, peak_before, "56 MiB of partial frames");
}

#[test]
fn a_client_that_never_reads_its_responses_is_closed_with_bounded_memory() {
    let b = abused_broker();
    // A topic with many partitions makes every Metadata response a few KiB.
    let topic = topic_name("wide");
    let out = sluice(
        &[
            "topic",
            "create",
            &topic,
            "-p",
            "200",
            "--brokers",
            &b.bootstrap(),
        ],
        None,
    );
    assert!(out.status.success(), "create topic: {out:?}");
    let peak_before = peak_rss(&b);
    // 100,000 pipelined Metadata v1 requests for every topic (~1.7 MB of requests, ~1 GB of
    // responses), never reading one answer.
    let mut s = connect(b.addr);
    s.set_write_timeout(Some(Duration::from_millis(500)))
        .expect("write timeout");
    let mut one = Vec::new();
    one.extend(14i32.to_be_bytes()); // length
    one.extend(3i16.to_be_bytes()); // Metadata
    one.extend(1i16.to_be_bytes()); // v1
    one.extend(7i32.to_be_bytes()); // correlation id
    one.extend((-1i16).to_be_bytes()); // client id: null
    one.extend((-1i32).to_be_bytes()); // topics: null = all
    let requests: Vec<u8> = one.repeat(100_000);
    let mut sent = 0;
    let deadline = Instant::now() + WAIT_MAX;
    while sent < requests.len() && Instant::now() < deadline {
        match s.write(&requests[sent..]) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(_) => break,
        }
    }
    // The broker read only what it could answer, then closed the connection once its writes
    // stalled: a write from our side eventually fails.
    let closed = writes_until_closed(&mut s, &one);
    assert!(
        closed,
        "the broker kept a connection that reads nothing open (sent {sent} bytes)"
    );
    assert!(
        b.stderr().contains("response write failed"),
        "the close is logged"
    );
    assert_healthy(&b, peak_before, "a client that never reads");
}

#[test]
fn idle_connections_are_closed_after_connection_idle_ms() {
    let b = abused_broker();
    let mut idle = connect(b.addr);
    let opened = Instant::now();
    assert!(closed_by_broker(&mut idle), "idle connection kept open");
    assert!(
        opened.elapsed() >= Duration::from_millis(CONNECTION_IDLE_MS),
        "closed after {:?}, before connection_idle_ms",
        opened.elapsed()
    );
    assert!(b.stderr().contains("idle for"));
    assert!(answers_api_versions(b.addr));
}

/// Reads one response frame (bounded by `WAIT_MAX` and a sanity limit on its length).
fn read_response(s: &mut TcpStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("response length");
    let len = i32::from_be_bytes(len);
    assert!(
        (4..=256 << 20).contains(&len),
        "response frame length {len}"
    );
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).expect("response body");
    body
}

#[test]
fn a_fetch_listing_one_cold_partition_many_times_reads_only_its_byte_budget() {
    use bytes::{BufMut, BytesMut};
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::{FetchRequest, FetchResponse, RequestHeader, ResponseHeader};
    use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

    let mut b = abused_broker();
    let topic = topic_name("cold");
    let create = sluice(
        &[
            "topic",
            "create",
            &topic,
            "-p",
            "1",
            "--brokers",
            &b.bootstrap(),
        ],
        None,
    );
    assert!(create.status.success(), "create topic: {create:?}");
    // About 8 MB of records, then a restart so that every read of them is a cold disk read
    // into its own buffer (cache hits would share memory and prove nothing).
    let lines: String = (0..16_000).map(|i| format!("{i:0>500}\n")).collect();
    let produce = sluice(
        &[
            "produce",
            &topic,
            "--acks",
            "all",
            "--brokers",
            &b.bootstrap(),
        ],
        Some(lines.as_bytes()),
    );
    assert!(produce.status.success(), "produce: {produce:?}");
    assert_eq!(b.sigterm().code(), Some(0));
    b.restart();
    let peak_before = peak_rss(&b);

    // One Fetch v4 naming partition 0 20,000 times, each with a 1 MiB partition limit, and an
    // 8 MiB response limit. Reading every listed copy at once would take ~20 GiB of buffers.
    const COPIES: usize = 20_000;
    const RESPONSE_BYTES_MAX: i32 = 8 << 20;
    let request = FetchRequest::default()
        .with_replica_id(kafka_protocol::messages::BrokerId(-1))
        .with_max_wait_ms(0)
        .with_min_bytes(1)
        .with_max_bytes(RESPONSE_BYTES_MAX)
        .with_topics(vec![FetchTopic::default()
            .with_topic(kafka_protocol::messages::TopicName(StrBytes::from_string(
                topic.clone(),
            )))
            .with_partitions(vec![
                FetchPartition::default()
                    .with_partition(0)
                    .with_fetch_offset(0)
                    .with_partition_max_bytes(1 << 20);
                COPIES
            ])]);
    let mut frame = BytesMut::new();
    frame.put_i32(0);
    RequestHeader::default()
        .with_request_api_key(1)
        .with_request_api_version(4)
        .with_correlation_id(42)
        .encode(&mut frame, 1)
        .expect("encode header");
    request.encode(&mut frame, 4).expect("encode fetch");
    let len = (frame.len() - 4) as i32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    let mut s = connect(b.addr);
    // A debug build on a busy machine may take a while over 20,000 partitions.
    s.set_read_timeout(Some(3 * WAIT_MAX))
        .expect("read timeout");
    s.write_all(&frame).expect("send fetch");
    let mut body = bytes::Bytes::from(read_response(&mut s));
    let header = ResponseHeader::decode(&mut body, 0).expect("response header");
    assert_eq!(header.correlation_id, 42);
    let response = FetchResponse::decode(&mut body, 4).expect("fetch response");
    let parts = &response.responses[0].partitions;
    assert_eq!(parts.len(), COPIES, "every listed partition is answered");
    let record_bytes: usize = parts
        .iter()
        .map(|p| p.records.as_ref().map_or(0, |r| r.len()))
        .sum();
    assert!(record_bytes > 0, "the first copies carry records");
    // The response limit, plus at most the one batch that crosses it is not kept (KIP-74).
    assert!(
        record_bytes <= RESPONSE_BYTES_MAX as usize,
        "{record_bytes} record bytes in a response limited to {RESPONSE_BYTES_MAX}"
    );
    let hw = parts[0].high_watermark;
    assert!(hw > 0);
    assert!(
        parts
            .iter()
            .all(|p| p.error_code == 0 && p.high_watermark == hw),
        "copies past the budget still report the partition's offsets"
    );
    assert_healthy(
        &b,
        peak_before,
        "a fetch listing one partition 20,000 times",
    );

    // Pipelined fetches of the whole cold partition that are never read: a connection has one
    // fetch in flight, so it holds one response's read data (~8 MB), not one per request
    // (16 × 8 MB with `inflight_requests_max` 16).
    let single = request.clone().with_topics(vec![FetchTopic::default()
        .with_topic(kafka_protocol::messages::TopicName(StrBytes::from_string(
            topic.clone(),
        )))
        .with_partitions(vec![FetchPartition::default()
            .with_partition(0)
            .with_fetch_offset(0)
            .with_partition_max_bytes(RESPONSE_BYTES_MAX)])]);
    let mut one = BytesMut::new();
    one.put_i32(0);
    RequestHeader::default()
        .with_request_api_key(1)
        .with_request_api_version(4)
        .with_correlation_id(43)
        .encode(&mut one, 1)
        .expect("encode header");
    single.encode(&mut one, 4).expect("encode fetch");
    let len = (one.len() - 4) as i32;
    one[..4].copy_from_slice(&len.to_be_bytes());
    let mut greedy = connect(b.addr);
    greedy
        .set_write_timeout(Some(Duration::from_millis(500)))
        .expect("write timeout");
    let closed = writes_until_closed(&mut greedy, &one);
    assert!(
        closed,
        "a connection that never reads its fetches stayed open; broker log:\n{}",
        b.stderr()
    );
    assert_healthy(&b, peak_before, "pipelined cold fetches never read");
}

/// Fetch sessions cannot hold more than the cache's budget: one client opens session after
/// session, each naming 20,000 partitions of a 249-character topic name (about 7 MB of session
/// state each, 50 of them ~360 MB if all were kept); the cache keeps what fits in its 64 MiB per
/// shard, serves the rest sessionless, and the broker's peak memory stays bounded.
#[test]
fn fetch_sessions_are_held_within_the_cache_budget() {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::{
        BrokerId, FetchRequest, FetchResponse, RequestHeader, ResponseHeader, TopicName,
    };
    use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

    const SESSIONS: i32 = 50;
    const PARTITIONS: i32 = 20_000;
    let b = abused_broker();
    let peak_before = peak_rss(&b);
    let name = TopicName(StrBytes::from_string("s".repeat(249)));
    let request = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(0)
        .with_session_id(0)
        .with_session_epoch(0)
        .with_topics(vec![FetchTopic::default()
            .with_topic(name)
            .with_partitions(
                (0..PARTITIONS)
                    .map(|p| {
                        FetchPartition::default()
                            .with_partition(p)
                            .with_partition_max_bytes(1 << 20)
                    })
                    .collect(),
            )]);
    let mut frame = bytes::BytesMut::new();
    frame.extend_from_slice(&[0; 4]);
    RequestHeader::default()
        .with_request_api_key(1)
        .with_request_api_version(12)
        .with_correlation_id(7)
        .encode(&mut frame, 2)
        .expect("encode header");
    request.encode(&mut frame, 12).expect("encode fetch");
    let len = (frame.len() - 4) as i32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    let mut s = connect(b.addr);
    let mut opened = 0;
    let mut sessionless = 0;
    for _ in 0..SESSIONS {
        s.write_all(&frame).expect("send fetch");
        let mut body = bytes::Bytes::from(read_response(&mut s));
        ResponseHeader::decode(&mut body, 1).expect("response header");
        let r = FetchResponse::decode(&mut body, 12).expect("fetch response");
        assert_eq!(r.error_code, 0);
        assert_eq!(r.responses[0].partitions.len(), PARTITIONS as usize);
        if r.session_id > 0 {
            opened += 1;
        } else {
            sessionless += 1;
        }
    }
    assert!(opened >= 1, "sessions are opened while they fit");
    assert!(
        sessionless > 0,
        "{opened} sessions of 20,000 partitions: more than the cache budget holds"
    );
    // 64 MiB per shard, each session charged ~7 MB: about 8 fit.
    assert!(opened <= 10, "{opened} sessions held");
    assert_healthy(&b, peak_before, "50 fetch sessions of 20,000 partitions");
}
