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

/// Largest response frame the CLI accepts: protects it from a garbage or hostile length prefix.
/// Fetches ask for at most 50 MiB, so a real response is far smaller.
pub const RESPONSE_BYTES_MAX: usize = 256 << 20;

/// Reads one length-prefixed response frame. The buffer grows with the bytes that arrive, never
/// by the declared length, which must lie in `4..=RESPONSE_BYTES_MAX`.
pub fn read_frame(r: &mut impl Read) -> Result<Bytes> {
    let mut lenb = [0u8; 4];
    r.read_exact(&mut lenb)
        .map_err(|e| anyhow!("closed the connection ({e})"))?;
    let n = i32::from_be_bytes(lenb);
    let len = usize::try_from(n)
        .ok()
        .filter(|n| (4..=RESPONSE_BYTES_MAX).contains(n))
        .ok_or_else(|| anyhow!("sent a frame of invalid length {n}"))?;
    let mut body = Vec::new();
    r.take(len as u64)
        .read_to_end(&mut body)
        .context("reading a response")?;
    if body.len() != len {
        bail!("closed the connection mid-response");
    }
    Ok(Bytes::from(body))
}

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
        let mut body =
            read_frame(&mut self.stream).map_err(|e| anyhow!("broker {}: {e:#}", self.addr))?;
        let h = ResponseHeader::decode(&mut body, key.response_header_version(version))?;
        if h.correlation_id != self.correlation {
            bail!(
                "response correlation id {} does not match request {}",
                h.correlation_id,
                self.correlation
            );
        }
        Resp::decode(&mut body, version)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn huge_or_negative_frame_lengths_are_refused_without_allocating() {
        for n in [i32::MAX, i32::MIN, -1, 3, (RESPONSE_BYTES_MAX + 1) as i32] {
            let mut r = &n.to_be_bytes()[..];
            assert!(read_frame(&mut r).is_err(), "{n}");
        }
        // A length within the limit but more than arrives: an error, with memory only for what
        // arrived.
        let mut short = (RESPONSE_BYTES_MAX as i32).to_be_bytes().to_vec();
        short.extend_from_slice(&[1, 2, 3]);
        assert!(read_frame(&mut &short[..]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        #[test]
        fn frames_round_trip_and_garbage_never_panics(
            body in prop::collection::vec(any::<u8>(), 4..300),
            garbage in prop::collection::vec(any::<u8>(), 0..64),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut f = (body.len() as i32).to_be_bytes().to_vec();
            f.extend_from_slice(&body);
            prop_assert_eq!(&read_frame(&mut &f[..]).unwrap()[..], &body[..]);
            let cut = cut.index(f.len());
            prop_assert!(read_frame(&mut &f[..cut]).is_err());
            let _ = read_frame(&mut &garbage[..]);
        }
    }
}
