//! One raw connection to the broker for tests that speak the protocol themselves: our own
//! length-prefixed framing, `kafka-protocol` for headers and bodies. Every read and write has a
//! deadline (`IO_WAIT`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

/// Longest wait for one read or write.
pub const IO_WAIT: Duration = Duration::from_secs(15);
/// Largest response frame [`Raw`] reads (the broker's largest response, a full fetch, stays well
/// below it).
pub const RESPONSE_BYTES_MAX: usize = 256 << 20;
/// The client id every raw request carries.
const CLIENT_ID: &str = "sluice-raw-test";

/// `[i32 length][payload]`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(4 + payload.len());
    f.put_i32(payload.len() as i32);
    f.extend_from_slice(payload);
    f
}

/// A request header in the given form: v1 (`api_key i16, version i16, correlation_id i32,
/// client_id nullable string`) or, when `flexible`, v2 (the same plus an empty tagged-field
/// section), whatever `key` uses at `version` (hostile tests send the wrong one on purpose).
pub fn request_header(key: ApiKey, version: i16, correlation_id: i32, flexible: bool) -> Vec<u8> {
    let h = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
    let mut b = BytesMut::new();
    h.encode(&mut b, if flexible { 2 } else { 1 })
        .expect("encode request header");
    b.to_vec()
}

/// Reads one response frame (without its length prefix) from `s`; a length below 4 (no room for
/// a correlation id) or above `bytes_max` is `InvalidData`. The buffer is sized only after the
/// length is checked.
pub fn read_frame_from(s: &mut impl Read, bytes_max: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let n = i32::from_be_bytes(len);
    if n < 4 || n as usize > bytes_max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("response frame length {n}"),
        ));
    }
    let mut body = vec![0u8; n as usize];
    s.read_exact(&mut body)?;
    Ok(body)
}

pub struct Raw {
    pub s: TcpStream,
    pub correlation: i32,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect_timeout(&addr, IO_WAIT).expect("connect to the broker");
        s.set_read_timeout(Some(IO_WAIT)).expect("read timeout");
        s.set_write_timeout(Some(IO_WAIT)).expect("write timeout");
        s.set_nodelay(true).expect("nodelay");
        Raw { s, correlation: 0 }
    }

    pub fn send_bytes(&mut self, b: &[u8]) {
        // The broker may already have closed on an earlier bad byte; that is not our failure.
        let _ = self.s.write_all(b);
    }

    /// `[len][header][body]` for `key` at `version`, with the next correlation id.
    pub fn frame<T: Encodable>(&mut self, key: ApiKey, version: i16, body: &T) -> Vec<u8> {
        self.correlation += 1;
        let flexible = key.request_header_version(version) >= 2;
        let mut buf = BytesMut::from(&request_header(key, version, self.correlation, flexible)[..]);
        body.encode(&mut buf, version)
            .unwrap_or_else(|e| panic!("encode {key:?} v{version} request: {e}"));
        frame(&buf)
    }

    /// Reads one response frame; `None` if the broker closed the connection (or did not answer
    /// within `IO_WAIT`).
    pub fn read_frame(&mut self) -> Option<Bytes> {
        match read_frame_from(&mut self.s, RESPONSE_BYTES_MAX) {
            Ok(body) => Some(Bytes::from(body)),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => panic!("{e}"),
            Err(_) => None,
        }
    }

    /// One request and its response; `None` when the broker closed the connection instead of
    /// answering (a read timeout is a failure: the broker must either answer or close).
    pub fn try_call<Req: Encodable, Resp: Decodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &Req,
    ) -> Option<Resp> {
        let f = self.frame(key, version, req);
        self.s.write_all(&f).ok()?;
        let mut resp = match read_frame_from(&mut self.s, RESPONSE_BYTES_MAX) {
            Ok(body) => Bytes::from(body),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("{key:?} v{version}: no answer and no close within {IO_WAIT:?}")
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => panic!("{e}"),
            Err(_) => return None, // EOF or reset: closed
        };
        let h = ResponseHeader::decode(&mut resp, key.response_header_version(version))
            .expect("response header");
        assert_eq!(h.correlation_id, self.correlation, "correlation id");
        Some(Resp::decode(&mut resp, version).expect("response body"))
    }

    pub fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &Req,
    ) -> Resp {
        self.try_call(key, version, req).unwrap_or_else(|| {
            panic!("broker closed the connection instead of answering {key:?} v{version}")
        })
    }

    /// Asserts that the broker closes the connection without sending a response (bounded by
    /// the socket read timeout).
    pub fn assert_closed(&mut self, what: &str) {
        let mut buf = [0u8; 1024];
        match self.s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("{what}: broker answered {n} bytes instead of closing"),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("{what}: broker kept the connection open for {IO_WAIT:?}")
            }
            Err(_) => {} // reset: closed
        }
    }
}

/// A topic name as the protocol types carry it.
pub fn tn(s: &str) -> kafka_protocol::messages::TopicName {
    kafka_protocol::messages::TopicName(StrBytes::from_string(s.to_string()))
}

/// Creates `name` with `partitions` partitions (CreateTopics v5) and asserts it worked.
pub fn create_topic(r: &mut Raw, name: &str, partitions: i32) {
    use kafka_protocol::messages::create_topics_request::CreatableTopic;
    use kafka_protocol::messages::{CreateTopicsRequest, CreateTopicsResponse};
    let resp: CreateTopicsResponse = r.call(
        ApiKey::CreateTopics,
        5,
        &CreateTopicsRequest::default()
            .with_topics(vec![CreatableTopic::default()
                .with_name(tn(name))
                .with_num_partitions(partitions)
                .with_replication_factor(1)])
            .with_timeout_ms(10_000),
    );
    assert_eq!(resp.topics[0].error_code, 0, "{:?}", resp.topics[0]);
}

/// The topic id of `name` (Metadata v12).
pub fn topic_id(r: &mut Raw, name: &str) -> uuid::Uuid {
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    use kafka_protocol::messages::{MetadataRequest, MetadataResponse};
    let m: MetadataResponse = r.call(
        ApiKey::Metadata,
        12,
        &MetadataRequest::default().with_topics(Some(vec![
            MetadataRequestTopic::default().with_name(Some(tn(name)))
        ])),
    );
    m.topics[0].topic_id
}

/// One uncompressed v2 batch of `values` (keys `k<i>`, timestamps 1_700_000_000_000 + i).
pub fn batch(values: &[&[u8]]) -> Bytes {
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };
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
            // The encoder starts a new batch whenever `offset - sequence` changes; this keeps all
            // records in one batch while the batch's base sequence stays -1 (no producer id).
            sequence: i as i32 - 1,
            timestamp: 1_700_000_000_000 + i as i64,
            key: Some(Bytes::from(format!("k{i}"))),
            value: Some(Bytes::copy_from_slice(v)),
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
    buf.freeze()
}
