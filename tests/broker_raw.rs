//! Raw-protocol and process-level tests of the broker: malformed frames, unsupported versions,
//! corrupt batches, start-up errors, clean and unclean shutdown. Frames are built with the
//! `kafka-protocol` codecs and written to a plain TCP socket.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::Broker;
use kafka_protocol::messages::{
    fetch_request, list_offsets_request, produce_request, FetchRequest, FetchResponse,
    ListOffsetsRequest, ListOffsetsResponse, ProduceRequest, ProduceResponse,
};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, CreateTopicsRequest, CreateTopicsResponse,
    MetadataRequest, MetadataResponse, RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

const IO_WAIT: Duration = Duration::from_secs(10);

/// One raw client connection.
struct Conn {
    s: TcpStream,
    corr: i32,
}

impl Conn {
    fn open(b: &Broker) -> Conn {
        let s = TcpStream::connect_timeout(&b.addr(), IO_WAIT).expect("connect");
        s.set_read_timeout(Some(IO_WAIT)).expect("read timeout");
        s.set_write_timeout(Some(IO_WAIT)).expect("write timeout");
        s.set_nodelay(true).expect("nodelay");
        Conn { s, corr: 0 }
    }

    /// Writes bytes as they are; a reset by the broker is not an error here.
    fn send_raw(&mut self, bytes: &[u8]) {
        match self.s.write_all(bytes) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {}
            Err(e) => panic!("write: {e}"),
        }
    }

    /// A whole frame (length prefix included) for `body` at `version`, with a header claiming
    /// `api_key`.
    fn frame<T: Encodable>(
        &mut self,
        api_key: i16,
        version: i16,
        header_version: i16,
        body: &T,
    ) -> Vec<u8> {
        self.corr += 1;
        let header = RequestHeader::default()
            .with_request_api_key(api_key)
            .with_request_api_version(version)
            .with_correlation_id(self.corr)
            .with_client_id(Some(StrBytes::from_static_str("raw-test")));
        let mut buf = BytesMut::new();
        header
            .encode(&mut buf, header_version)
            .expect("encode header");
        body.encode(&mut buf, version).expect("encode body");
        let mut out = (buf.len() as i32).to_be_bytes().to_vec();
        out.extend_from_slice(&buf);
        out
    }

    /// Reads one response frame; `None` if the broker closed the connection.
    fn read_frame(&mut self) -> Option<Bytes> {
        let mut len = [0u8; 4];
        match self.s.read_exact(&mut len) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ) =>
            {
                return None
            }
            Err(e) => panic!("no response and no close within {IO_WAIT:?}: {e}"),
        }
        let n = i32::from_be_bytes(len);
        assert!(n >= 4, "response frame length {n}");
        let mut buf = vec![0u8; n as usize];
        self.s.read_exact(&mut buf).expect("read response body");
        Some(Bytes::from(buf))
    }

    /// Sends a typed request and returns the decoded response body.
    fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &Req,
    ) -> Resp {
        let f = self.frame(
            key as i16,
            version,
            key.request_header_version(version),
            req,
        );
        self.send_raw(&f);
        let mut buf = self
            .read_frame()
            .unwrap_or_else(|| panic!("broker closed the connection on {key:?} v{version}"));
        let h = ResponseHeader::decode(&mut buf, key.response_header_version(version))
            .expect("response header");
        assert_eq!(h.correlation_id, self.corr, "correlation id");
        Resp::decode(&mut buf, version).expect("response body")
    }

    /// Asserts that the broker closes the connection (EOF or reset) without answering.
    fn expect_closed(&mut self, what: &str) {
        let mut buf = [0u8; 1024];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => panic!("{what}: expected the connection to close, got {n} bytes"),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => panic!("{what}: connection still open after {IO_WAIT:?}: {e}"),
            }
        }
    }
}

/// The broker still serves a fresh client: ApiVersions v3 and Metadata v12 answer correctly.
fn assert_serves(b: &Broker) {
    let mut c = Conn::open(b);
    let r: ApiVersionsResponse = c.call(
        ApiKey::ApiVersions,
        3,
        &ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("raw-test"))
            .with_client_software_version(StrBytes::from_static_str("1")),
    );
    assert_eq!(r.error_code, 0);
    let md: MetadataResponse = c.call(ApiKey::Metadata, 12, &MetadataRequest::default());
    assert_eq!(md.brokers.len(), 1);
    assert_eq!(md.brokers[0].port, b.port as i32);
}

fn create_topic(b: &Broker, name: &str, partitions: i32) {
    let mut c = Conn::open(b);
    let req = CreateTopicsRequest::default()
        .with_timeout_ms(10_000)
        .with_topics(vec![
            kafka_protocol::messages::create_topics_request::CreatableTopic::default()
                .with_name(TopicName(StrBytes::from_string(name.to_string())))
                .with_num_partitions(partitions)
                .with_replication_factor(1),
        ]);
    let r: CreateTopicsResponse = c.call(ApiKey::CreateTopics, 7, &req);
    assert_eq!(
        r.topics[0].error_code, 0,
        "create {name}: {:?}",
        r.topics[0]
    );
}

fn raw_broker() -> Broker {
    Broker::start_with(1, &["--request-bytes-max", "1048576"])
}

#[test]
fn garbage_bytes_close_the_connection() {
    let b = raw_broker();
    // An HTTP request: its first four bytes read as a ~1.2 GB length.
    let mut c = Conn::open(&b);
    c.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    c.expect_closed("HTTP request");
    assert_serves(&b);
    // A plausible length followed by noise.
    let mut c = Conn::open(&b);
    let mut f = 40i32.to_be_bytes().to_vec();
    f.extend((0..40u8).map(|i| i.wrapping_mul(97).wrapping_add(13)));
    c.send_raw(&f);
    c.expect_closed("40 bytes of noise");
    assert_serves(&b);
}

#[test]
fn negative_length_closes_the_connection() {
    let b = raw_broker();
    let mut c = Conn::open(&b);
    c.send_raw(&(-2i32).to_be_bytes());
    c.expect_closed("negative length");
    assert_serves(&b);
}

#[test]
fn length_over_request_bytes_max_closes_the_connection() {
    let b = raw_broker();
    let mut c = Conn::open(&b);
    // Only the length and a little of the body: the broker must not wait for the rest.
    let mut f = (2 * 1024 * 1024i32).to_be_bytes().to_vec();
    f.extend_from_slice(&[0u8; 64]);
    c.send_raw(&f);
    c.expect_closed("2 MiB frame with a 1 MiB limit");
    assert_serves(&b);
}

#[test]
fn truncated_frame_then_eof() {
    let b = raw_broker();
    let mut c = Conn::open(&b);
    let full = c.frame(ApiKey::Metadata as i16, 12, 2, &MetadataRequest::default());
    c.send_raw(&full[..full.len() / 2]);
    c.s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    c.expect_closed("half a frame then EOF");
    assert_serves(&b);
}

#[test]
fn unknown_api_key_closes_the_connection() {
    let b = raw_broker();
    let mut c = Conn::open(&b);
    let f = c.frame(999, 0, 1, &MetadataRequest::default());
    c.send_raw(&f);
    c.expect_closed("API key 999");
    assert_serves(&b);
}

#[test]
fn unsupported_metadata_version_closes_the_connection() {
    let b = raw_broker();
    let mut c = Conn::open(&b);
    // Metadata v13 is valid Kafka but above what the broker advertises; encode the body as v12.
    let mut f = c.frame(ApiKey::Metadata as i16, 12, 2, &MetadataRequest::default());
    f[6..8].copy_from_slice(&13i16.to_be_bytes());
    c.send_raw(&f);
    c.expect_closed("Metadata v13");
    assert_serves(&b);
}

#[test]
fn api_versions_v99_answers_unsupported_version_with_v0_body() {
    let b = raw_broker();
    let mut c = Conn::open(&b);
    // A future ApiVersions: the broker cannot parse the body, so it answers in v0.
    let mut f = c.frame(
        ApiKey::ApiVersions as i16,
        3,
        2,
        &ApiVersionsRequest::default(),
    );
    f[6..8].copy_from_slice(&99i16.to_be_bytes());
    c.send_raw(&f);
    let mut buf = c.read_frame().expect("a response, not a close");
    let h = ResponseHeader::decode(&mut buf, 0).expect("v0 response header");
    assert_eq!(h.correlation_id, c.corr);
    let r = ApiVersionsResponse::decode(&mut buf, 0).expect("v0 body");
    assert_eq!(r.error_code, 35, "UNSUPPORTED_VERSION");
    let av = r
        .api_keys
        .iter()
        .find(|k| k.api_key == ApiKey::ApiVersions as i16)
        .expect("ApiVersions listed");
    assert_eq!(av.min_version, 0);
    assert!(av.max_version >= 3);
    for key in [
        ApiKey::Produce,
        ApiKey::Fetch,
        ApiKey::Metadata,
        ApiKey::ListOffsets,
    ] {
        assert!(
            r.api_keys.iter().any(|k| k.api_key == key as i16),
            "{key:?} listed"
        );
    }
    assert!(
        buf.is_empty(),
        "{} trailing bytes after the v0 body",
        buf.len()
    );
    // The connection stays usable.
    let md: MetadataResponse = c.call(ApiKey::Metadata, 12, &MetadataRequest::default());
    assert_eq!(md.brokers.len(), 1);
}

fn topic_name(t: &str) -> TopicName {
    TopicName(StrBytes::from_string(t.to_string()))
}

/// A v2 record batch holding `values` (key `k{i}`), uncompressed.
fn batch(values: &[String]) -> Vec<u8> {
    let now = 1_700_000_000_000i64;
    let records: Vec<Record> = values
        .iter()
        .enumerate()
        .map(|(i, v)| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: -1,
            timestamp: now + i as i64,
            key: Some(Bytes::from(format!("k{i}"))),
            value: Some(Bytes::from(v.clone())),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .expect("encode batch");
    buf.to_vec()
}

/// Produces one batch; returns (error_code, base_offset).
fn produce(c: &mut Conn, topic: &str, partition: i32, acks: i16, batch: Vec<u8>) -> (i16, i64) {
    let req = ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(10_000)
        .with_topic_data(vec![produce_request::TopicProduceData::default()
            .with_name(topic_name(topic))
            .with_partition_data(vec![
                produce_request::PartitionProduceData::default()
                    .with_index(partition)
                    .with_records(Some(Bytes::from(batch))),
            ])]);
    let r: ProduceResponse = c.call(ApiKey::Produce, 9, &req);
    let p = &r.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

/// ListOffsets with `timestamp` (-1 latest, -2 earliest); returns (error_code, offset).
fn list_offset(c: &mut Conn, topic: &str, partition: i32, timestamp: i64) -> (i16, i64) {
    let req = ListOffsetsRequest::default()
        .with_replica_id(kafka_protocol::messages::BrokerId(-1))
        .with_topics(vec![list_offsets_request::ListOffsetsTopic::default()
            .with_name(topic_name(topic))
            .with_partitions(vec![
                list_offsets_request::ListOffsetsPartition::default()
                    .with_partition_index(partition)
                    .with_timestamp(timestamp),
            ])]);
    let r: ListOffsetsResponse = c.call(ApiKey::ListOffsets, 7, &req);
    let p = &r.topics[0].partitions[0];
    (p.error_code, p.offset)
}

/// Every record of a partition as (offset, key, value), fetched until the high watermark.
fn fetch_all(c: &mut Conn, topic: &str, partition: i32) -> Vec<(i64, String, String)> {
    let mut out = Vec::new();
    let mut next = 0i64;
    for _ in 0..1000 {
        let req = FetchRequest::default()
            .with_replica_id(kafka_protocol::messages::BrokerId(-1))
            .with_max_wait_ms(100)
            .with_min_bytes(1)
            .with_max_bytes(16 << 20)
            .with_session_epoch(-1)
            .with_topics(vec![fetch_request::FetchTopic::default()
                .with_topic(topic_name(topic))
                .with_partitions(vec![fetch_request::FetchPartition::default()
                    .with_partition(partition)
                    .with_fetch_offset(next)
                    .with_partition_max_bytes(4 << 20)])]);
        let r: FetchResponse = c.call(ApiKey::Fetch, 11, &req);
        assert_eq!(r.error_code, 0);
        let p = &r.responses[0].partitions[0];
        assert_eq!(p.error_code, 0, "fetch {topic}/{partition} at {next}");
        if let Some(mut bytes) = p.records.clone() {
            for set in RecordBatchDecoder::decode_all(&mut bytes).expect("decode fetched batches") {
                for rec in set.records {
                    if rec.offset < next {
                        continue;
                    }
                    let key =
                        String::from_utf8_lossy(rec.key.as_deref().unwrap_or(b"")).into_owned();
                    let val =
                        String::from_utf8_lossy(rec.value.as_deref().unwrap_or(b"")).into_owned();
                    out.push((rec.offset, key, val));
                    next = rec.offset + 1;
                }
            }
        }
        if next >= p.high_watermark {
            return out;
        }
    }
    panic!("fetch of {topic}/{partition} made no progress");
}

#[test]
fn produce_with_flipped_crc_is_corrupt_message() {
    let b = raw_broker();
    create_topic(&b, "crc", 1);
    let mut c = Conn::open(&b);
    let good = batch(&["a".to_string(), "b".to_string()]);
    // Byte 17 is the first byte of the CRC field (base offset 8, length 4, leader epoch 4,
    // magic 1).
    let mut bad = good.clone();
    bad[17] ^= 0xff;
    assert_eq!(
        produce(&mut c, "crc", 0, -1, bad),
        (2, -1),
        "CORRUPT_MESSAGE"
    );
    // A flipped byte inside the CRC-covered part is caught as well.
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    assert_eq!(produce(&mut c, "crc", 0, 1, bad).0, 2, "CORRUPT_MESSAGE");
    assert_eq!(
        list_offset(&mut c, "crc", 0, -1),
        (0, 0),
        "nothing was appended"
    );
    assert_eq!(fetch_all(&mut c, "crc", 0), vec![]);
    // The same connection still works, and the good batch goes in at offset 0.
    assert_eq!(produce(&mut c, "crc", 0, -1, good), (0, 0));
    assert_eq!(list_offset(&mut c, "crc", 0, -1), (0, 2));
    assert_serves(&b);
}

#[test]
fn sigterm_exits_zero_and_data_survives_restart() {
    let mut b = Broker::start(2);
    create_topic(&b, "clean", 2);
    let mut c = Conn::open(&b);
    let values: Vec<String> = (0..50).map(|i| format!("value-{i}")).collect();
    assert_eq!(produce(&mut c, "clean", 0, 1, batch(&values[..30])), (0, 0));
    assert_eq!(
        produce(&mut c, "clean", 0, 1, batch(&values[30..])),
        (0, 30)
    );
    assert_eq!(produce(&mut c, "clean", 1, 1, batch(&values[..5])), (0, 0));
    drop(c);
    let st = b.sigterm();
    assert_eq!(st.code(), Some(0), "stderr:\n{}", b.stderr());
    b.restart();
    let mut c = Conn::open(&b);
    let got = fetch_all(&mut c, "clean", 0);
    let want: Vec<(i64, String, String)> = (0..50)
        .map(|i| {
            (
                i as i64,
                format!("k{}", if i < 30 { i } else { i - 30 }),
                values[i].clone(),
            )
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(fetch_all(&mut c, "clean", 1).len(), 5);
    assert_eq!(list_offset(&mut c, "clean", 0, -1), (0, 50));
    // Appends continue after the recovered end.
    assert_eq!(
        produce(&mut c, "clean", 0, -1, batch(&values[..1])),
        (0, 50)
    );
}

#[test]
fn acks_all_records_survive_sigkill_with_identical_offsets() {
    let mut b = Broker::start(2);
    create_topic(&b, "durable", 3);
    let mut c = Conn::open(&b);
    let mut acked: Vec<(i32, i64, Vec<String>)> = Vec::new();
    for n in 0..60usize {
        let partition = (n % 3) as i32;
        let values: Vec<String> = (0..(1 + n % 7))
            .map(|i| format!("b{n}-r{i}-{}", "x".repeat(n * 10)))
            .collect();
        let (err, base) = produce(&mut c, "durable", partition, -1, batch(&values));
        assert_eq!(err, 0, "batch {n}");
        acked.push((partition, base, values));
    }
    drop(c);
    b.sigkill();
    b.restart();
    let mut c = Conn::open(&b);
    for partition in 0..3 {
        let got = fetch_all(&mut c, "durable", partition);
        let mut want = Vec::new();
        for (p, base, values) in &acked {
            if *p != partition {
                continue;
            }
            for (i, v) in values.iter().enumerate() {
                want.push((base + i as i64, format!("k{i}"), v.clone()));
            }
        }
        assert_eq!(got, want, "partition {partition} after kill -9");
    }
}

/// Runs `sluice start` with `args` and returns (exit code, stderr lines).
fn start_fails(args: &[&str]) -> (Option<i32>, Vec<String>) {
    let mut cmd = std::process::Command::new(common::BIN);
    cmd.arg("start").args(args).env_remove("RUST_LOG");
    let (st, _out, err) = common::run_bounded(cmd, Duration::from_secs(10));
    let lines = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    (st.code(), lines)
}

#[test]
fn second_broker_on_same_data_dir_is_refused() {
    let b = Broker::start(1);
    let port = common::free_port();
    let dir = b.data_dir();
    let listen = format!("127.0.0.1:{port}");
    let (code, lines) = start_fails(&[
        "--data-dir",
        dir.to_str().expect("utf-8 path"),
        "--listen",
        &listen,
        "--cores",
        "1",
    ]);
    assert!(code.is_some() && code != Some(0), "exit {code:?}");
    assert_eq!(lines.len(), 1, "one stderr line: {lines:?}");
    assert!(lines[0].to_lowercase().contains("lock"), "{lines:?}");
    assert_serves(&b);
}

#[test]
fn port_in_use_exits_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, lines) = start_fails(&[
        "--data-dir",
        dir.path().to_str().expect("utf-8 path"),
        "--listen",
        &listen,
        "--cores",
        "1",
    ]);
    assert_eq!(code, Some(2), "{lines:?}");
    assert_eq!(lines.len(), 1, "one stderr line: {lines:?}");
    assert!(lines[0].contains(&listen), "{lines:?}");
}

#[test]
fn invalid_settings_exit_2_with_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("data");
    let d = d.to_str().expect("utf-8 path");
    let listen = format!("127.0.0.1:{}", common::free_port());
    let cfg = dir.path().join("sluice.toml");
    std::fs::write(&cfg, "cores = 1\nno_such_setting = 5\n").expect("write config");
    let cfg = cfg.to_str().expect("utf-8 path");
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "--cores 0",
            vec!["--data-dir", d, "--listen", &listen, "--cores", "0"],
            "cores",
        ),
        (
            "bad --listen",
            vec![
                "--data-dir",
                d,
                "--listen",
                "not-an-address",
                "--cores",
                "1",
            ],
            "listen",
        ),
        (
            "bad --listen port",
            vec![
                "--data-dir",
                d,
                "--listen",
                "127.0.0.1:99999",
                "--cores",
                "1",
            ],
            "listen",
        ),
        (
            "unknown config key",
            vec!["--data-dir", d, "--listen", &listen, "--config", cfg],
            "no_such_setting",
        ),
    ];
    for (what, args, mention) in cases {
        let (code, lines) = start_fails(&args);
        assert_eq!(code, Some(2), "{what}: {lines:?}");
        assert_eq!(lines.len(), 1, "{what}: one stderr line: {lines:?}");
        assert!(lines[0].contains(mention), "{what}: {lines:?}");
    }
}
