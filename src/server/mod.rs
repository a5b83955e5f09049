//! The network layer of one shard: accepts connections on the shard's SO_REUSEPORT listener,
//! reads length-prefixed frames, enforces the limits (request size, connections, in-flight
//! bytes), hands each request to [`crate::kafka::dispatch`] and writes responses back in request
//! order with one vectored write each. Never parses record data.
//!
//! A connection runs two tasks: the reader decodes frames and starts one handler task per request
//! (so pipelined produce requests join the same group commit); the writer awaits those tasks in
//! order and writes each response.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::Semaphore;
use glommio::task::JoinHandle;

use crate::shard;

/// Frame length prefix.
const LENGTH_PREFIX_BYTES: usize = 4;
/// Smallest possible request: api key, version, correlation id, client id length.
const REQUEST_HEADER_BYTES_MIN: usize = 10;
/// How many bytes the reader asks the socket for at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// What a handler gives back.
pub enum Response {
    /// Encoded frame pieces (length prefix included), written with one vectored write.
    Frames(Vec<Bytes>),
    /// Nothing is sent (acks=0 produce).
    None,
    /// The request was bad enough that Kafka closes the connection.
    Close(String),
}

/// Per-connection context visible to handlers.
pub struct Connection {
    pub id: u64,
    pub peer: SocketAddr,
}

pub async fn accept_loop(listener: TcpListener) {
    let shard = shard::local();
    let broker = shard.broker.clone();
    let active = Rc::new(Cell::new(0usize));
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            let _ = broker.shutdown_rx.recv().await;
            None
        })
        .await;
        let stream = match accepted {
            None => break,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if active.get() >= broker.config.connections_max {
            tracing::warn!(
                connections_max = broker.config.connections_max,
                "connection limit reached; closing new connection"
            );
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let peer = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let conn = Rc::new(Connection {
            id: crate::broker::next_connection_id(),
            peer,
        });
        active.set(active.get() + 1);
        let active2 = active.clone();
        glommio::spawn_local(async move {
            // Requests are contained one by one (below); this catches a panic of the connection's
            // own reader or writer, which costs that connection only.
            let (id, peer) = (conn.id, conn.peer);
            if let Err(mut p) = shard::contain(serve_connection(stream, conn)).await {
                p.mark_reported();
                tracing::error!(conn = id, peer = %peer, "connection task {p}; connection closed");
            }
            active2.set(active2.get() - 1);
        })
        .detach();
    }
    // Shutdown: connections notice `shutdown_rx` and finish what they have in flight.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while active.get() > 0 && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

async fn serve_connection(stream: TcpStream, conn: Rc<Connection>) {
    let broker = shard::local().broker.clone();
    // Reads and writes proceed independently: the writer gets its own descriptor of the socket.
    // SAFETY: dup of a descriptor we own; the new one is owned by `writer_stream` alone.
    let wfd = unsafe { libc::dup(stream.as_raw_fd()) };
    if wfd < 0 {
        tracing::warn!(peer = %conn.peer, "dup failed: {}", std::io::Error::last_os_error());
        return;
    }
    // SAFETY: `wfd` is a fresh descriptor of a connected TCP socket.
    let writer_stream = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(wfd) };
    let stream = Rc::new(std::cell::RefCell::new(stream));
    let wstream = Rc::new(std::cell::RefCell::new(writer_stream));
    let (tx, rx) = async_channel::unbounded::<(usize, JoinHandle<Response>)>();
    let budget = Rc::new(Semaphore::new(broker.config.inflight_bytes_max as u64));
    let reader = read_requests(stream.clone(), conn.clone(), tx, budget.clone());
    let writer = write_responses(wstream.clone(), rx, budget);
    let (why, _) = futures_lite::future::zip(reader, writer).await;
    if let Some(why) = why {
        tracing::info!(peer = %conn.peer, conn = conn.id, "closing connection: {why}");
    }
    let _ = wstream.borrow_mut().close().await;
    let _ = stream.borrow_mut().close().await;
}

/// Reads frames until EOF, shutdown or a protocol violation (returned as the reason).
async fn read_requests(
    stream: Rc<std::cell::RefCell<TcpStream>>,
    conn: Rc<Connection>,
    tx: async_channel::Sender<(usize, JoinHandle<Response>)>,
    budget: Rc<Semaphore>,
) -> Option<String> {
    let broker = shard::local().broker.clone();
    let max = broker.config.request_bytes_max;
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    loop {
        // Is a whole frame here? Check before any parsing or allocation.
        while buf.len() >= LENGTH_PREFIX_BYTES {
            let len = i32::from_be_bytes(buf[..4].try_into().unwrap());
            if len < REQUEST_HEADER_BYTES_MIN as i32 {
                return Some(format!("invalid frame length {len}"));
            }
            let len = len as usize;
            if len > max {
                return Some(format!(
                    "frame of {len} bytes exceeds request_bytes_max {max}"
                ));
            }
            if buf.len() < LENGTH_PREFIX_BYTES + len {
                buf.reserve(LENGTH_PREFIX_BYTES + len - buf.len());
                break;
            }
            let _ = buf.split_to(LENGTH_PREFIX_BYTES);
            let frame = buf.split_to(len).freeze();
            // Back-pressure: wait until earlier requests' bytes are answered.
            let permits = (len as u64).min(broker.config.inflight_bytes_max as u64);
            budget.acquire(permits).await.ok()?;
            let conn2 = conn.clone();
            let task = glommio::spawn_local(async move {
                // A handler bug must cost this connection, not the shard and every client on it.
                let (api_key, api_version) = api_of(&frame);
                match shard::contain(crate::kafka::dispatch(&conn2, frame)).await {
                    Ok(r) => r,
                    Err(p) => handler_panicked(&conn2, api_key, api_version, p),
                }
            })
            .detach();
            if tx.send((permits as usize, task)).await.is_err() {
                return None;
            }
        }
        if broker.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let old = buf.len();
        let want = READ_CHUNK_BYTES.max(buf.capacity() - old);
        buf.resize(old + want, 0);
        let read = {
            let mut s = stream.borrow_mut();
            futures_lite::future::or(async { Some(s.read(&mut buf[old..]).await) }, async {
                let _ = broker.shutdown_rx.recv().await;
                None
            })
            .await
        };
        match read {
            None => {
                buf.truncate(old);
                return None;
            }
            Some(Ok(0)) => {
                buf.truncate(old);
                if old > 0 {
                    return Some(format!("peer closed mid-frame ({old} bytes pending)"));
                }
                return None;
            }
            Some(Ok(n)) => buf.truncate(old + n),
            Some(Err(e)) => return Some(format!("read error: {e}")),
        }
    }
}

/// API key and version of a request frame (at least `REQUEST_HEADER_BYTES_MIN` long).
fn api_of(frame: &[u8]) -> (i16, i16) {
    (
        i16::from_be_bytes([frame[0], frame[1]]),
        i16::from_be_bytes([frame[2], frame[3]]),
    )
}

/// A request's handler (or work it waited for, on any shard) panicked: one error line with the
/// API and the panic, and the connection is closed. Kafka has no error code for a crashed
/// handler, and the client's view of this connection is unknown after it.
fn handler_panicked(
    conn: &Connection,
    api_key: i16,
    api_version: i16,
    mut p: shard::Panic,
) -> Response {
    p.mark_reported();
    let api = kafka_protocol::messages::ApiKey::try_from(api_key)
        .map(|k| format!("{k:?}"))
        .unwrap_or_else(|_| "unknown".into());
    let here = std::thread::current();
    let here = here.name().unwrap_or("unnamed");
    tracing::error!(
        conn = conn.id,
        peer = %conn.peer,
        api_key,
        api_version,
        "request {api} v{api_version} (api key {api_key}) on {here} {p}; closing the connection"
    );
    Response::Close("internal error while handling a request".into())
}

async fn write_responses(
    stream: Rc<std::cell::RefCell<TcpStream>>,
    rx: async_channel::Receiver<(usize, JoinHandle<Response>)>,
    budget: Rc<Semaphore>,
) {
    let mut failed = false;
    while let Ok((permits, task)) = rx.recv().await {
        let resp = task.await;
        budget.signal(permits as u64);
        if failed {
            continue;
        }
        match resp {
            Some(Response::Frames(parts)) => {
                if let Err(e) = write_vectored_all(&stream, parts).await {
                    tracing::debug!(error = %e, "write failed");
                    failed = true;
                    let _ = stream.borrow().shutdown(std::net::Shutdown::Both).await;
                }
            }
            Some(Response::None) => {}
            Some(Response::Close(why)) => {
                tracing::info!("closing connection: {why}");
                failed = true;
                let _ = stream.borrow().shutdown(std::net::Shutdown::Both).await;
            }
            None => {
                failed = true;
                let _ = stream.borrow().shutdown(std::net::Shutdown::Both).await;
            }
        }
    }
}

/// Writes `parts` in order. First tries one non-blocking `writev` of everything (the common case:
/// the whole response fits the socket buffer, one syscall, no copy); whatever is left goes
/// through the executor's async writes.
pub async fn write_vectored_all(
    stream: &Rc<std::cell::RefCell<TcpStream>>,
    parts: Vec<Bytes>,
) -> std::io::Result<()> {
    let fd = stream.borrow().as_raw_fd();
    let mut queue: VecDeque<Bytes> = parts.into_iter().filter(|p| !p.is_empty()).collect();
    while !queue.is_empty() {
        let slices: Vec<IoSlice<'_>> = queue.iter().take(64).map(|b| IoSlice::new(b)).collect();
        // SAFETY: IoSlice is ABI-compatible with iovec; fd is the open socket we own.
        let n = unsafe {
            libc::sendmsg(
                fd,
                &libc::msghdr {
                    msg_name: std::ptr::null_mut(),
                    msg_namelen: 0,
                    msg_iov: slices.as_ptr() as *mut libc::iovec,
                    msg_iovlen: slices.len(),
                    msg_control: std::ptr::null_mut(),
                    msg_controllen: 0,
                    msg_flags: 0,
                },
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        drop(slices);
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(e);
            }
            // The socket buffer is full: let the executor wait for room with the first piece.
            let first = queue.pop_front().expect("non-empty");
            stream.borrow_mut().write_all(&first).await?;
            continue;
        }
        let mut n = n as usize;
        while n > 0 {
            let front = queue.front_mut().expect("sent more than queued");
            if n >= front.len() {
                n -= front.len();
                queue.pop_front();
            } else {
                let _ = front.split_to(n);
                n = 0;
            }
        }
    }
    Ok(())
}
