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
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, CreateTopicsRequest, CreateTopicsResponse,
    MetadataRequest, MetadataResponse, RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

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

#[test]
fn sigterm_exits_zero_and_restart_accepts() {
    let mut b = Broker::start(1);
    let st = b.sigterm();
    assert_eq!(st.code(), Some(0), "stderr:\n{}", b.stderr());
    b.restart();
    assert_serves(&b);
    let _ = create_topic;
}
