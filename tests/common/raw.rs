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
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(StrBytes::from_static_str("sluice-raw-test")));
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        header
            .encode(&mut buf, key.request_header_version(version))
            .expect("encode header");
        body.encode(&mut buf, version)
            .unwrap_or_else(|e| panic!("encode {key:?} v{version} request: {e}"));
        let len = (buf.len() - 4) as i32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        buf.to_vec()
    }

    /// Reads one response frame; `None` if the broker closed the connection (or did not answer
    /// within `IO_WAIT`).
    pub fn read_frame(&mut self) -> Option<Bytes> {
        let mut len = [0u8; 4];
        self.s.read_exact(&mut len).ok()?;
        let n = i32::from_be_bytes(len);
        assert!(n >= 4, "response frame length {n}");
        let mut body = vec![0u8; n as usize];
        self.s.read_exact(&mut body).ok()?;
        Some(Bytes::from(body))
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
        let mut len = [0u8; 4];
        match self.s.read_exact(&mut len) {
            Ok(()) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("{key:?} v{version}: no answer and no close within {IO_WAIT:?}")
            }
            Err(_) => return None, // EOF or reset: closed
        }
        let n = i32::from_be_bytes(len);
        assert!(n >= 4, "response frame length {n}");
        let mut body = vec![0u8; n as usize];
        self.s.read_exact(&mut body).ok()?;
        let mut resp = Bytes::from(body);
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
