//! A small blocking Kafka client for the CLI: one connection, ApiVersions negotiation, and typed
//! request/response round trips through the `kafka-protocol` codecs. Errors are one line.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

pub struct Client {
    stream: TcpStream,
    correlation: i32,
    versions: Vec<(i16, i16, i16)>,
    pub addr: String,
}

const CLIENT_ID: &str = "sluice-cli";

impl Client {
    /// Connects to the first reachable broker of a comma-separated list.
    pub fn connect(brokers: &str) -> Result<Client> {
        let mut last = None;
        for b in brokers.split(',').map(str::trim).filter(|b| !b.is_empty()) {
            let addrs = match b.to_socket_addrs() {
                Ok(a) => a,
                Err(e) => {
                    last = Some(anyhow!("cannot resolve broker '{b}': {e}"));
                    continue;
                }
            };
            for a in addrs {
                match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
                    Ok(stream) => {
                        stream.set_nodelay(true).ok();
                        stream.set_read_timeout(Some(Duration::from_secs(60))).ok();
                        let mut c = Client {
                            stream,
                            correlation: 0,
                            versions: vec![],
                            addr: b.to_string(),
                        };
                        c.negotiate()?;
                        return Ok(c);
                    }
                    Err(e) => last = Some(anyhow!("cannot connect to broker {b}: {e}")),
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no broker address given")))
    }

    fn negotiate(&mut self) -> Result<()> {
        let req = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("sluice-cli"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let resp: ApiVersionsResponse = self.call_at(ApiKey::ApiVersions, 3, &req)?;
        if resp.error_code != 0 {
            bail!("broker refused ApiVersions (error {})", resp.error_code);
        }
        self.versions = resp
            .api_keys
            .iter()
            .map(|k| (k.api_key, k.min_version, k.max_version))
            .collect();
        Ok(())
    }

    /// The highest version both sides support, capped at `ours_max`.
    pub fn version(&self, key: ApiKey, ours_min: i16, ours_max: i16) -> Result<i16> {
        let (_, lo, hi) = self
            .versions
            .iter()
            .find(|(k, _, _)| *k == key as i16)
            .ok_or_else(|| anyhow!("broker does not support {key:?}"))?;
        let v = ours_max.min(*hi);
        if v < ours_min.max(*lo) {
            bail!("no common version of {key:?} (broker {lo}-{hi}, client {ours_min}-{ours_max})");
        }
        Ok(v)
    }

    /// Sends `req` at the negotiated version (within `ours_min..=ours_max`) and decodes the reply.
    pub fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        key: ApiKey,
        ours: (i16, i16),
        req: &Req,
    ) -> Result<Resp> {
        let v = self.version(key, ours.0, ours.1)?;
        self.call_at(key, v, req)
    }

    /// Sends a request that gets no response (acks=0 produce).
    pub fn send_only<Req: Encodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &Req,
    ) -> Result<()> {
        let buf = self.frame(key, version, req)?;
        self.stream
            .write_all(&buf)
            .with_context(|| format!("send to {}", self.addr))?;
        Ok(())
    }

    fn frame<Req: Encodable>(&mut self, key: ApiKey, version: i16, req: &Req) -> Result<BytesMut> {
        self.correlation += 1;
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        header.encode(&mut buf, key.request_header_version(version))?;
        req.encode(&mut buf, version)?;
        let len = (buf.len() - 4) as i32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        Ok(buf)
    }

    pub fn call_at<Req: Encodable, Resp: Decodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &Req,
    ) -> Result<Resp> {
        let buf = self.frame(key, version, req)?;
        self.stream
            .write_all(&buf)
            .with_context(|| format!("send to {}", self.addr))?;
        let mut lenb = [0u8; 4];
        self.stream
            .read_exact(&mut lenb)
            .map_err(|e| anyhow!("broker {} closed the connection ({e})", self.addr))?;
        let n = i32::from_be_bytes(lenb);
        if n < 4 {
            bail!("broker sent a frame of invalid length {n}");
        }
        let mut body = vec![0u8; n as usize];
        self.stream.read_exact(&mut body)?;
        let mut body = Bytes::from(body);
        let h = ResponseHeader::decode(&mut body, key.response_header_version(version))?;
        if h.correlation_id != self.correlation {
            bail!(
                "response correlation id {} does not match request {}",
                h.correlation_id,
                self.correlation
            );
        }
        Ok(Resp::decode(&mut body, version)?)
    }
}

/// `NAME (code)` of a Kafka error code.
pub fn error_name(code: i16) -> String {
    use kafka_protocol::error::ParseResponseErrorCode;
    match code.err() {
        Some(e) => format!("{e:?} ({code})"),
        None => format!("error {code}"),
    }
}

/// Fails with a readable line when `code` is an error.
pub fn check(code: i16, what: &str, message: Option<&StrBytes>) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    match message {
        Some(m) if !m.is_empty() => bail!("{what}: {}: {}", error_name(code), m.as_str()),
        _ => bail!("{what}: {}", error_name(code)),
    }
}
