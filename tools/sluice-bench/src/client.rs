//! A minimal Kafka-protocol client connection over glommio TCP: framing, ApiVersions
//! negotiation, and typed request/response calls through the `kafka-protocol` codecs.
//!
//! ```text
//! request:  | length i32 | RequestHeader (v1 or v2) | body |
//! response: | length i32 | ResponseHeader (v0 or v1) | body |
//! ```
//! Responses on one connection come back in request order (Kafka protocol guide), which the
//! pipelined producer and consumer rely on.

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Message, Request, StrBytes};
use std::collections::HashMap;
use std::net::ToSocketAddrs;
use std::time::Duration;

/// Largest response frame we accept; protects against a garbage length prefix.
pub const RESPONSE_BYTES_MAX: usize = 256 << 20;
/// Bytes reserved for a response before they arrive (one allocation for most responses); the
/// rest of a larger frame is allocated as it is read.
const FRAME_PREALLOC_BYTES_MAX: usize = 1 << 20;
pub const CLIENT_ID: &str = "sluice-bench";

/// API version ranges the broker advertised.
#[derive(Debug, Clone, Default)]
pub struct Versions {
    ranges: HashMap<i16, (i16, i16)>,
}

impl Versions {
    pub fn from_ranges(ranges: impl IntoIterator<Item = (i16, i16, i16)>) -> Versions {
        Versions {
            ranges: ranges
                .into_iter()
                .map(|(k, lo, hi)| (k, (lo, hi)))
                .collect(),
        }
    }

    /// The highest version both sides speak for request type `R`, capped at `cap`.
    pub fn pick<R: Request>(&self, cap: Option<i16>) -> Result<i16> {
        let name = ApiKey::try_from(R::KEY)
            .map(|k| format!("{k:?}"))
            .unwrap_or_else(|_| R::KEY.to_string());
        let (lo, hi) = *self
            .ranges
            .get(&R::KEY)
            .ok_or_else(|| anyhow!("broker does not support the {name} API"))?;
        let ours = <R as Message>::VERSIONS;
        let top = hi.min(ours.max).min(cap.unwrap_or(i16::MAX));
        if top < lo.max(ours.min) {
            bail!(
                "no common {name} version: broker {lo}..={hi}, client {}..={}",
                ours.min,
                ours.max
            );
        }
        Ok(top)
    }

    pub fn supports(&self, key: ApiKey) -> bool {
        self.ranges.contains_key(&(key as i16))
    }
}

/// Appends one framed request to `buf` and returns nothing; the caller owns correlation ids.
pub fn encode_request<R: Request>(
    buf: &mut BytesMut,
    correlation_id: i32,
    version: i16,
    req: &R,
) -> Result<()> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    let header = RequestHeader::default()
        .with_request_api_key(R::KEY)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
    header.encode(buf, R::header_version(version))?;
    req.encode(buf, version)?;
    let len = buf.len() - start - 4;
    buf[start..start + 4].copy_from_slice(&(len as i32).to_be_bytes());
    Ok(())
}

/// Decodes a response frame (without its length prefix); checks the correlation id.
pub fn decode_response<R: Request>(
    mut frame: Bytes,
    correlation_id: i32,
    version: i16,
) -> Result<R::Response> {
    let header = ResponseHeader::decode(
        &mut frame,
        <R::Response as HeaderVersion>::header_version(version),
    )?;
    if header.correlation_id != correlation_id {
        bail!(
            "response correlation id {} does not match request {correlation_id}",
            header.correlation_id
        );
    }
    R::Response::decode(&mut frame, version)
        .with_context(|| format!("decoding response to API key {} v{version}", R::KEY))
}

/// Reads one length-prefixed frame.
pub async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> Result<Bytes> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)
        .await
        .context("connection closed by broker")?;
    let declared = i32::from_be_bytes(len);
    let len = usize::try_from(declared)
        .ok()
        .filter(|n| (4..=RESPONSE_BYTES_MAX).contains(n))
        .ok_or_else(|| anyhow!("broker sent a frame of impossible length {declared}"))?;
    // Memory follows the bytes that arrive: only the first FRAME_PREALLOC_BYTES_MAX are
    // reserved on the declared length's word.
    let mut buf = Vec::with_capacity(len.min(FRAME_PREALLOC_BYTES_MAX));
    (&mut *s)
        .take(len as u64)
        .read_to_end(&mut buf)
        .await
        .context("reading a response")?;
    if buf.len() != len {
        bail!("connection closed mid-response");
    }
    Ok(Bytes::from(buf))
}

pub async fn write_all<S: AsyncWrite + Unpin>(s: &mut S, buf: &[u8]) -> Result<()> {
    s.write_all(buf).await.context("writing to broker")?;
    Ok(())
}

/// One connection to one broker, after ApiVersions.
pub struct Conn {
    pub stream: TcpStream,
    pub addr: String,
    pub versions: Versions,
    next_correlation_id: i32,
}

pub struct ConnParts {
    pub stream: TcpStream,
    pub next_id: i32,
    pub versions: Versions,
}

/// Resolves `host:port` to its first address.
pub fn resolve(addr: &str) -> Result<std::net::SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("cannot resolve broker address {addr:?}"))?
        .next()
        .ok_or_else(|| anyhow!("broker address {addr:?} resolves to nothing"))
}

impl Conn {
    /// Connects (bounded by `timeout`), sets TCP_NODELAY, and negotiates API versions.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Conn> {
        let sa = resolve(addr)?;
        let stream = TcpStream::connect_timeout(sa, timeout)
            .await
            .map_err(|e| anyhow!("cannot connect to broker {addr}: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| anyhow!("TCP_NODELAY: {e}"))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| anyhow!("read timeout: {e}"))?;
        let mut c = Conn {
            stream,
            addr: addr.to_string(),
            versions: Versions::default(),
            next_correlation_id: 1,
        };
        c.negotiate()
            .await
            .with_context(|| format!("ApiVersions with {addr}"))?;
        c.stream
            .set_read_timeout(None)
            .map_err(|e| anyhow!("read timeout: {e}"))?;
        Ok(c)
    }

    async fn negotiate(&mut self) -> Result<()> {
        let req = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str(CLIENT_ID))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let mut version = 3;
        for _ in 0..2 {
            let resp = self.call_at(&req, version).await?;
            let ranges = resp
                .api_keys
                .iter()
                .map(|k| (k.api_key, k.min_version, k.max_version));
            self.versions = Versions::from_ranges(ranges);
            match resp.error_code {
                0 => return Ok(()),
                35 => {
                    // UNSUPPORTED_VERSION: the broker answered with v0 and its own range.
                    version = self.versions.pick::<ApiVersionsRequest>(None)?;
                }
                e => bail!("ApiVersions failed with error code {e}"),
            }
        }
        bail!("ApiVersions version negotiation did not converge")
    }

    /// Gives up the typed wrapper for pipelined use of the raw stream.
    pub fn into_parts(self) -> ConnParts {
        ConnParts {
            stream: self.stream,
            next_id: self.next_correlation_id,
            versions: self.versions,
        }
    }

    pub fn next_correlation_id(&mut self) -> i32 {
        let id = self.next_correlation_id;
        self.next_correlation_id = self.next_correlation_id.wrapping_add(1).max(1);
        id
    }

    /// Sends `req` at the negotiated version (capped at `cap`) and waits for its response.
    pub async fn call<R: Request>(&mut self, req: &R, cap: Option<i16>) -> Result<R::Response> {
        let v = self.versions.pick::<R>(cap)?;
        self.call_at(req, v).await
    }

    pub async fn call_at<R: Request>(&mut self, req: &R, version: i16) -> Result<R::Response> {
        let id = self.next_correlation_id();
        let mut buf = BytesMut::with_capacity(256);
        encode_request(&mut buf, id, version, req)?;
        write_all(&mut self.stream, &buf).await?;
        let frame = read_frame(&mut self.stream).await?;
        decode_response::<R>(frame, id, version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::{ProduceRequest, ProduceResponse};

    #[test]
    fn picks_highest_common_version_or_explains() {
        let v = Versions::from_ranges([(0, 3, 9), (18, 0, 3)]);
        assert_eq!(v.pick::<ProduceRequest>(None).unwrap(), 9);
        assert_eq!(v.pick::<ProduceRequest>(Some(7)).unwrap(), 7);
        let none = Versions::from_ranges([(18, 0, 3)]);
        let e = none.pick::<ProduceRequest>(None).unwrap_err().to_string();
        assert!(e.contains("Produce"), "{e}");
        let old = Versions::from_ranges([(0, 0, 2)]);
        assert!(old.pick::<ProduceRequest>(None).is_err());
    }

    #[test]
    fn request_frame_round_trips_through_codec() {
        let req = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(1000);
        let mut buf = BytesMut::new();
        encode_request(&mut buf, 42, 9, &req).unwrap();
        let len = i32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - 4);
        let mut body = buf.split_off(4).freeze();
        let h = kafka_protocol::protocol::decode_request_header_from_buffer(&mut body).unwrap();
        assert_eq!(
            (h.request_api_key, h.request_api_version, h.correlation_id),
            (0, 9, 42)
        );
        let back = ProduceRequest::decode(&mut body, 9).unwrap();
        assert_eq!(back, req);
        // A response frame with a wrong correlation id is refused.
        let mut rb = BytesMut::new();
        ResponseHeader::default()
            .with_correlation_id(7)
            .encode(&mut rb, 1)
            .unwrap();
        ProduceResponse::default().encode(&mut rb, 9).unwrap();
        assert!(decode_response::<ProduceRequest>(rb.clone().freeze(), 8, 9).is_err());
        assert!(decode_response::<ProduceRequest>(rb.freeze(), 7, 9).is_ok());
    }

    fn read(bytes: &[u8]) -> Result<Bytes> {
        let mut r = bytes;
        futures_lite::future::block_on(read_frame(&mut r))
    }

    #[test]
    fn huge_or_negative_frame_lengths_are_refused_without_allocating() {
        for n in [i32::MAX, i32::MIN, -1, 3, RESPONSE_BYTES_MAX as i32 + 1] {
            assert!(read(&n.to_be_bytes()).is_err(), "{n}");
        }
        // Within the limit but never arriving: an error after reserving at most the prealloc.
        let mut short = (RESPONSE_BYTES_MAX as i32).to_be_bytes().to_vec();
        short.extend_from_slice(&[1, 2, 3]);
        assert!(read(&short).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]
        #[test]
        fn frames_round_trip_and_garbage_never_panics(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 4..300),
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let mut f = (body.len() as i32).to_be_bytes().to_vec();
            f.extend_from_slice(&body);
            proptest::prop_assert_eq!(&read(&f).unwrap()[..], &body[..]);
            proptest::prop_assert!(read(&f[..cut.index(f.len())]).is_err());
            let _ = read(&garbage);
        }
    }
}
