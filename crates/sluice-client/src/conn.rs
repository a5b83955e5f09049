//! One connection to one broker: ApiVersions handshake, typed calls one at a time, and pipelined
//! sends whose responses come back in request order (Kafka protocol guide), checked by
//! correlation id. Generic over `futures_lite::{AsyncRead, AsyncWrite}`.

use std::future::Future;
use std::marker::PhantomData;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use futures_lite::io::{AssertAsync, ReadHalf, WriteHalf};
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use kafka_protocol::messages::ApiVersionsRequest;
use kafka_protocol::protocol::{Request, StrBytes};

use crate::error::code;
use crate::frame::{decode_response, encode_request, read_frame_into};
use crate::versions::Versions;

/// A request sent and not yet answered: its correlation id and version, typed by the request so
/// its response is decoded as what was asked.
#[derive(Debug)]
pub struct Pending<R> {
    id: i32,
    version: i16,
    _request: PhantomData<fn() -> R>,
}

impl<R> Clone for Pending<R> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<R> Copy for Pending<R> {}

impl<R> Pending<R> {
    pub fn correlation_id(&self) -> i32 {
        self.id
    }
    pub fn version(&self) -> i16 {
        self.version
    }
}

/// Correlation ids: positive, wrapping back to 1.
#[derive(Debug)]
struct Ids(i32);

impl Ids {
    fn next(&mut self) -> i32 {
        let id = self.0;
        self.0 = self.0.wrapping_add(1).max(1);
        id
    }
}

/// One connection to one broker, after ApiVersions.
pub struct Connection<S> {
    stream: S,
    addr: String,
    client_id: StrBytes,
    versions: Versions,
    ids: Ids,
    /// Reused for every request this connection encodes.
    buf: BytesMut,
    /// Reused for every response this connection reads ([`read_frame_into`]).
    rbuf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Negotiates API versions over an open stream to `addr`. `client_id` names the tool in
    /// every request header (`sluice-cli`, `sluice-bench`).
    pub async fn handshake(stream: S, addr: &str, client_id: &'static str) -> Result<Self> {
        let mut c = Connection {
            stream,
            addr: addr.to_string(),
            client_id: StrBytes::from_static_str(client_id),
            versions: Versions::default(),
            ids: Ids(1),
            buf: BytesMut::new(),
            rbuf: BytesMut::new(),
        };
        c.negotiate().await?;
        Ok(c)
    }

    async fn negotiate(&mut self) -> Result<()> {
        let req = ApiVersionsRequest::default()
            .with_client_software_name(self.client_id.clone())
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let mut version = 3;
        for _ in 0..2 {
            let resp = self.call_at(&req, version).await?;
            self.versions = Versions::from_ranges(
                resp.api_keys
                    .iter()
                    .map(|k| (k.api_key, k.min_version, k.max_version)),
            );
            match resp.error_code {
                code::NONE => return Ok(()),
                // The broker answered with v0 and its own range: ask again at a version it has.
                code::UNSUPPORTED_VERSION => {
                    version = self.versions.pick::<ApiVersionsRequest>(None)?
                }
                e => crate::check(
                    e,
                    &format!("broker {} refused ApiVersions", self.addr),
                    None,
                )?,
            }
        }
        bail!(
            "broker {}: ApiVersions negotiation did not converge",
            self.addr
        )
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn versions(&self) -> &Versions {
        &self.versions
    }

    pub fn client_id(&self) -> &StrBytes {
        &self.client_id
    }

    /// The stream, e.g. to change socket options after the handshake.
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Sends `req` at the highest common version (capped at `cap`) and waits for its response.
    pub async fn call<R: Request>(&mut self, req: &R, cap: Option<i16>) -> Result<R::Response> {
        let v = self.versions.pick::<R>(cap)?;
        self.call_at(req, v).await
    }

    /// Sends `req` at `version` and waits for its response.
    pub async fn call_at<R: Request>(&mut self, req: &R, version: i16) -> Result<R::Response> {
        let p = self.send(req, version).await?;
        self.recv(p).await
    }

    /// Sends `req` without waiting; its response is read by [`Connection::recv`], in order.
    pub async fn send<R: Request>(&mut self, req: &R, version: i16) -> Result<Pending<R>> {
        let id = self.ids.next();
        self.buf.clear();
        encode_request(&mut self.buf, &self.client_id, id, version, req)?;
        self.stream
            .write_all(&self.buf)
            .await
            .with_context(|| format!("broker {}: sending a request", self.addr))?;
        Ok(Pending {
            id,
            version,
            _request: PhantomData,
        })
    }

    /// Sends a request that gets no response (acks=0 produce).
    pub async fn send_only<R: Request>(&mut self, req: &R, version: i16) -> Result<()> {
        self.send(req, version).await.map(drop)
    }

    /// Reads the next response, which must answer `p` (responses arrive in request order).
    pub async fn recv<R: Request>(&mut self, p: Pending<R>) -> Result<R::Response> {
        recv_on(&mut self.stream, &mut self.rbuf, &self.addr, p).await
    }

    /// Splits into a sending and a receiving half for pipelining from two tasks: the sender
    /// numbers and writes requests, the receiver reads their responses in the same order.
    pub fn into_split(self) -> (Sender<WriteHalf<S>>, Receiver<ReadHalf<S>>) {
        let (r, w) = futures_lite::io::split(self.stream);
        (
            Sender {
                w,
                addr: self.addr.clone(),
                client_id: self.client_id,
                ids: self.ids,
            },
            Receiver {
                r,
                rbuf: self.rbuf,
                addr: self.addr,
            },
        )
    }
}

async fn recv_on<S: AsyncRead + Unpin, R: Request>(
    s: &mut S,
    rbuf: &mut BytesMut,
    addr: &str,
    p: Pending<R>,
) -> Result<R::Response> {
    let frame = read_frame_into(s, rbuf)
        .await
        .map_err(|e| anyhow!("broker {addr}: {e:#}"))?;
    decode_response::<R>(frame, p.id, p.version).map_err(|e| anyhow!("broker {addr}: {e:#}"))
}

/// The sending half of a split [`Connection`].
pub struct Sender<W> {
    w: W,
    addr: String,
    client_id: StrBytes,
    ids: Ids,
}

impl<W: AsyncWrite + Unpin> Sender<W> {
    /// Numbers the next request; the caller encodes it (see [`Sender::encode`]) and writes it.
    pub fn next<R: Request>(&mut self, version: i16) -> Pending<R> {
        Pending {
            id: self.ids.next(),
            version,
            _request: PhantomData,
        }
    }

    /// Numbers `req` and appends it, framed, to `buf` (which the caller may patch and then
    /// write with [`Sender::write_all`]).
    pub fn encode<R: Request>(
        &mut self,
        buf: &mut BytesMut,
        version: i16,
        req: &R,
    ) -> Result<Pending<R>> {
        let p = self.next::<R>(version);
        encode_request(buf, &self.client_id, p.id, version, req)?;
        Ok(p)
    }

    pub fn client_id(&self) -> &StrBytes {
        &self.client_id
    }

    pub async fn write_all(&mut self, buf: &[u8]) -> Result<()> {
        self.w
            .write_all(buf)
            .await
            .with_context(|| format!("broker {}: sending a request", self.addr))
    }
}

/// The receiving half of a split [`Connection`].
pub struct Receiver<Rd> {
    r: Rd,
    rbuf: BytesMut,
    addr: String,
}

impl<Rd: AsyncRead + Unpin> Receiver<Rd> {
    /// Reads the next response, which must answer `p`.
    pub async fn recv<R: Request>(&mut self, p: Pending<R>) -> Result<R::Response> {
        recv_on(&mut self.r, &mut self.rbuf, &self.addr, p).await
    }
}

/// Connects to the first broker of a comma-separated list that `connect` reaches; the error of
/// the last one tried otherwise.
pub async fn connect_first<S, F, Fut>(brokers: &str, mut connect: F) -> Result<Connection<S>>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<Connection<S>>>,
{
    let mut last = None;
    for b in brokers.split(',').map(str::trim).filter(|b| !b.is_empty()) {
        match connect(b.to_string()).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no broker address given")))
}

/// The addresses `host:port` resolves to.
pub fn resolve(addr: &str) -> Result<Vec<SocketAddr>> {
    let all: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| anyhow!("cannot resolve broker address {addr}: {e}"))?
        .collect();
    if all.is_empty() {
        bail!("broker address {addr} resolves to nothing");
    }
    Ok(all)
}

/// A connection over a blocking socket, driven with `futures_lite::future::block_on`.
pub type BlockingConnection = Connection<AssertAsync<TcpStream>>;

/// Time limits of a blocking connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// Each socket read and write; a broker silent for longer fails the call.
    pub io: Duration,
}

/// Connects over a blocking socket to the first reachable broker of a comma-separated list.
pub fn connect_blocking(
    brokers: &str,
    client_id: &'static str,
    t: Timeouts,
) -> Result<BlockingConnection> {
    futures_lite::future::block_on(connect_first(brokers, |b| async move {
        let mut last = None;
        for a in resolve(&b)? {
            match TcpStream::connect_timeout(&a, t.connect) {
                Ok(s) => {
                    s.set_nodelay(true).ok();
                    s.set_read_timeout(Some(t.io)).ok();
                    s.set_write_timeout(Some(t.io)).ok();
                    return Connection::handshake(AssertAsync::new(s), &b, client_id).await;
                }
                Err(e) => last = Some(anyhow!("cannot connect to broker {b}: {e}")),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("cannot connect to broker {b}")))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use kafka_protocol::messages::api_versions_response::ApiVersion;
    use kafka_protocol::messages::{
        ApiVersionsResponse, MetadataRequest, MetadataResponse, ResponseHeader,
    };
    use kafka_protocol::protocol::Encodable;
    use std::pin::Pin;
    use std::task::{Context as Cx, Poll};

    /// An in-memory broker side: replies are queued up front, requests are collected.
    struct Mem {
        replies: std::io::Cursor<Vec<u8>>,
        written: Vec<u8>,
    }
    impl AsyncRead for Mem {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Cx<'_>,
            b: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(std::io::Read::read(&mut self.replies, b))
        }
    }
    impl AsyncWrite for Mem {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Cx<'_>,
            b: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.written.extend_from_slice(b);
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Cx<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Cx<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn frame<T: Encodable>(out: &mut Vec<u8>, id: i32, header_v: i16, body: &T, v: i16) {
        let mut b = BytesMut::new();
        ResponseHeader::default()
            .with_correlation_id(id)
            .encode(&mut b, header_v)
            .unwrap();
        body.encode(&mut b, v).unwrap();
        out.put_i32(b.len() as i32);
        out.extend_from_slice(&b);
    }

    fn broker(after_handshake: impl FnOnce(&mut Vec<u8>)) -> Mem {
        let mut out = Vec::new();
        let av = ApiVersionsResponse::default().with_api_keys(vec![
            ApiVersion::default()
                .with_api_key(18)
                .with_min_version(0)
                .with_max_version(3),
            ApiVersion::default()
                .with_api_key(3)
                .with_min_version(0)
                .with_max_version(12),
        ]);
        // ApiVersions responses always use header v0.
        frame(&mut out, 1, 0, &av, 3);
        after_handshake(&mut out);
        Mem {
            replies: std::io::Cursor::new(out),
            written: Vec::new(),
        }
    }

    #[test]
    fn pipelined_responses_are_matched_in_order_and_a_wrong_correlation_id_fails() {
        futures_lite::future::block_on(async {
            let mem = broker(|out| {
                frame(
                    out,
                    2,
                    1,
                    &MetadataResponse::default().with_cluster_id(None),
                    12,
                );
                frame(out, 3, 1, &MetadataResponse::default(), 12);
                // A reply to a request never sent.
                frame(out, 99, 1, &MetadataResponse::default(), 12);
            });
            let mut c = Connection::handshake(mem, "mem:1", "test").await.unwrap();
            assert_eq!(c.versions().pick::<MetadataRequest>(None).unwrap(), 12);
            let a = c.send(&MetadataRequest::default(), 12).await.unwrap();
            let b = c.send(&MetadataRequest::default(), 12).await.unwrap();
            let d = c.send(&MetadataRequest::default(), 12).await.unwrap();
            assert_eq!((a.correlation_id(), b.correlation_id()), (2, 3));
            c.recv(a).await.unwrap();
            c.recv(b).await.unwrap();
            let e = c.recv(d).await.unwrap_err().to_string();
            assert!(
                e.contains("mem:1") && e.contains("correlation id 99"),
                "{e}"
            );
            // The client id: in ApiVersions' header and software name, and in the three
            // requests after it.
            let w = &c.stream_mut().written;
            assert_eq!(w.windows(4).filter(|x| x == b"test").count(), 5);
        });
    }

    #[test]
    fn a_split_connection_pairs_sends_with_receives() {
        futures_lite::future::block_on(async {
            let mem = broker(|out| {
                frame(out, 2, 1, &MetadataResponse::default(), 12);
                frame(out, 4, 1, &MetadataResponse::default(), 12);
            });
            let c = Connection::handshake(mem, "mem:1", "test").await.unwrap();
            let (mut tx, mut rx) = c.into_split();
            let mut buf = BytesMut::new();
            let p1 = tx
                .encode(&mut buf, 12, &MetadataRequest::default())
                .unwrap();
            let p2 = tx
                .encode(&mut buf, 12, &MetadataRequest::default())
                .unwrap();
            tx.write_all(&buf).await.unwrap();
            rx.recv(p1).await.unwrap();
            // The broker answered id 4 where 3 was due.
            assert!(rx.recv(p2).await.is_err());
        });
    }

    #[test]
    fn connect_first_tries_each_broker_and_keeps_the_last_error() {
        let r: Result<Connection<Mem>> =
            futures_lite::future::block_on(connect_first(" a:1, ,b:2", |b| async move {
                Err(anyhow!("cannot connect to broker {b}"))
            }));
        assert_eq!(r.err().unwrap().to_string(), "cannot connect to broker b:2");
        let r: Result<Connection<Mem>> =
            futures_lite::future::block_on(connect_first("", |_| async { unreachable!() }));
        assert!(r.err().unwrap().to_string().contains("no broker"));
    }
}
