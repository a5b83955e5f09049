//! The network layer of one shard: accepts connections on the shard's SO_REUSEPORT listener,
//! reads length-prefixed frames, enforces the limits (request size, connections, in-flight
//! bytes), hands each request to [`crate::kafka::dispatch`] and writes responses back in request
//! order with one vectored write each. Never parses record data.
//!
//! A connection runs two tasks: the reader decodes frames and starts one handler task per request
//! (so pipelined produce requests join the same group commit); the writer awaits those tasks in
//! order and writes each response.

mod queue;

use std::cell::Cell;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::AsyncWriteExt;
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::{Semaphore, StaticPermit};
use glommio::task::JoinHandle;

use crate::kafka::{Connection, Response};
use crate::shard;
use crate::stats::{FetchStage, ProduceStage};
use crate::types::{Clock, Sleep};

/// Frame length prefix.
const LENGTH_PREFIX_BYTES: usize = 4;
/// Smallest possible request: api key, version, correlation id, client id length.
const REQUEST_HEADER_BYTES_MIN: usize = 10;
/// How many bytes the reader asks the socket for at a time when no large frame is pending:
/// also what one idle connection's read buffer costs (one whose last frame was larger keeps
/// room for one that size, up to `READ_CALL_BYTES_MAX`).
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Most bytes one read call asks for.
const READ_CALL_BYTES_MAX: usize = 1024 * 1024;
/// A read goes into the room left in the buffer when at least this much is left (frames split
/// off the buffer share its allocation, so one chunk serves several small requests); with less
/// room, a new chunk is reserved first.
const READ_ROOM_MIN: usize = 16 * 1024;

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// A process-wide unique id for a new connection (log lines name connections by it).
fn next_connection_id() -> u64 {
    NEXT_CONN.fetch_add(1, Ordering::Relaxed)
}

/// A TCP socket for `addr` with SO_REUSEADDR set, not yet bound.
pub fn new_tcp_socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // Connections of a previous run lingering in TIME_WAIT must not keep a restarted broker
    // from binding its port (Kafka restarts at once, so do we).
    sock.set_reuse_address(true)?;
    Ok(sock)
}

/// The shard's listener: SO_REUSEPORT so every shard listens on the same port and the kernel
/// spreads connections, SO_REUSEADDR so a restart binds at once.
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let sock = new_tcp_socket(addr)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    // SAFETY: a bound, listening TCP socket whose descriptor we hand over.
    Ok(unsafe { TcpListener::from_raw_fd(sock.into_raw_fd()) })
}

/// Accepts connections on this shard's listener until shutdown, then waits (bounded) for the
/// open connections to finish what they have in flight.
pub async fn accept_loop(listener: TcpListener) {
    let shard = shard::local();
    let broker = shard.broker.clone();
    let active = Rc::new(Cell::new(0usize));
    // Every connection task holds a sender; the channel closes when the last of them ends.
    let (conn_alive, all_closed) = async_channel::bounded::<()>(1);
    // One budget for the request bytes every connection of this shard holds at once.
    let request_memory = Rc::new(Semaphore::new(broker.config.shard_request_bytes_max as u64));
    // This shard's copy of the stop signal (see `Stop`).
    let stop = Stop(Rc::new(Semaphore::new(0)));
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
                // Out of descriptors or memory, usually: back off instead of spinning on it.
                tracing::warn!(error = %e, "accept failed");
                shard.clock.sleep(ACCEPT_RETRY_PAUSE).await;
                continue;
            }
        };
        if active.get() >= broker.config.connections_max {
            tracing::warn!(
                connections_max = broker.config.connections_max,
                "connection limit reached; closing new connection"
            );
            crate::stats::connection_rejected();
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let peer = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let conn = Rc::new(Connection {
            id: next_connection_id(),
            peer,
        });
        active.set(active.get() + 1);
        crate::stats::connection_opened();
        let active2 = active.clone();
        let request_memory = request_memory.clone();
        let stop = stop.clone();
        let alive = conn_alive.clone();
        glommio::spawn_local(async move {
            // Requests are contained one by one (below); this catches a panic of the connection's
            // own reader or writer, which costs that connection only.
            let (id, peer) = (conn.id, conn.peer);
            if let Err(mut p) =
                shard::contain(serve_connection(stream, conn, request_memory, stop)).await
            {
                p.mark_reported();
                tracing::error!(conn = id, peer = %peer, "connection task {p}; connection closed");
            }
            active2.set(active2.get() - 1);
            crate::stats::connection_closed();
            drop(alive);
        })
        .detach();
    }
    // Shutdown: connections notice the stop signal and finish what they have in flight.
    stop.0.close();
    drop(conn_alive);
    let closed = async {
        let _ = all_closed.recv().await;
    };
    futures_lite::future::or(closed, shard.clock.sleep(SHUTDOWN_DRAIN_MAX)).await;
    if active.get() > 0 {
        tracing::warn!(
            connections = active.get(),
            "connections still open after the shutdown drain"
        );
    }
}

/// Pause after a failed accept before the next one.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(10);
/// How long shutdown waits for open connections to finish what they have in flight.
const SHUTDOWN_DRAIN_MAX: Duration = Duration::from_secs(10);

/// The budgets one connection draws on; every permit taken from them is held until the response
/// it was taken for is written (or dropped with the connection), so nothing leaks on close.
///
/// The connection's own budgets are taken at a frame's declared size when its length prefix is
/// read: a client that declares big frames only slows itself. The shard's budget is taken only
/// for bytes as they are received, so declaring large frames and stalling costs other clients
/// nothing; to spend it a client must really send the bytes, and a frame that stalls is dropped
/// after `stall_timeout_ms`.
#[derive(Clone)]
struct Budgets {
    /// This connection's unanswered request bytes (`inflight_bytes_max`).
    bytes: Rc<Semaphore>,
    /// This connection's unanswered requests (`inflight_requests_max`).
    requests: Rc<Semaphore>,
    /// The shard's request bytes over all its connections (`shard_request_bytes_max`).
    shard_bytes: Rc<Semaphore>,
    /// This connection's one Fetch slot: a fetch response holds up to the fetch budget (55 MiB)
    /// of read data until it is written, so a connection has one fetch in flight at a time, as
    /// a Kafka consumer sends them. Produce and other requests still pipeline.
    fetches: Rc<Semaphore>,
}

/// Bytes of the shard's request budget held by one frame; returned when dropped.
struct ShardBytes {
    pool: Rc<Semaphore>,
    held: u64,
}

impl ShardBytes {
    /// Takes `n` more bytes, waiting until the shard has them.
    async fn grow(&mut self, n: u64) -> Option<()> {
        self.pool.acquire(n).await.ok()?;
        self.held += n;
        Some(())
    }
}

impl Drop for ShardBytes {
    fn drop(&mut self) {
        self.pool.signal(self.held);
    }
}

/// Permits held for one request, from the moment its length prefix is read until its response
/// has been written.
struct Held {
    _request: StaticPermit,
    _bytes: StaticPermit,
    shard_bytes: ShardBytes,
}

/// A request's response and, for a produce or fetch request, when it was ready (the writer
/// records how long it waited to be written, in that API's `Respond` stage).
struct Answer {
    response: Response,
    ready: Option<(Instant, Staged)>,
}

/// The requests whose respond time is recorded as a stage.
#[derive(Clone, Copy)]
enum Staged {
    Produce,
    Fetch,
}

/// A request handed from the reader to the writer, in request order.
struct InFlight {
    task: JoinHandle<Answer>,
    _held: Held,
    _fetch: Option<StaticPermit>,
}

impl Budgets {
    /// Takes a request slot and `frame_bytes` from the connection's budget, plus `received`
    /// bytes (what of the frame is already buffered) from the shard's, waiting (back-pressure:
    /// the socket is not read meanwhile) until they are free.
    async fn reserve(&self, frame_bytes: usize, received: usize) -> Option<Held> {
        let limits = &shard::local().broker.config;
        let request = self.requests.acquire_static_permit(1).await.ok()?;
        // A frame larger than the budget takes all of it: it waits for the rest to be answered.
        let bytes = (frame_bytes as u64).min(limits.inflight_bytes_max as u64);
        let bytes = self.bytes.acquire_static_permit(bytes).await.ok()?;
        let mut shard_bytes = ShardBytes {
            pool: self.shard_bytes.clone(),
            held: 0,
        };
        shard_bytes.grow(received.min(frame_bytes) as u64).await?;
        Some(Held {
            _request: request,
            _bytes: bytes,
            shard_bytes,
        })
    }

    /// Requests whose responses are not written yet.
    fn unanswered(&self) -> u64 {
        let max = shard::local().broker.config.inflight_requests_max as u64;
        max - self.requests.available()
    }
}

async fn serve_connection(
    stream: TcpStream,
    conn: Rc<Connection>,
    shard_bytes: Rc<Semaphore>,
    stop: Stop,
) {
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
    // A client that stops reading its responses holds them (and their requests' budgets) only
    // until a write has made no progress for the stall timeout.
    let stall = Duration::from_millis(broker.config.stall_timeout_ms);
    let _ = writer_stream.set_write_timeout(Some(stall));
    let (mut stream, mut wstream) = (stream, writer_stream);
    let queue = queue::Queue::<InFlight>::new();
    let (tx, rx) = queue.split();
    let budgets = Budgets {
        bytes: Rc::new(Semaphore::new(broker.config.inflight_bytes_max as u64)),
        requests: Rc::new(Semaphore::new(broker.config.inflight_requests_max as u64)),
        shard_bytes,
        fetches: Rc::new(Semaphore::new(1)),
    };
    // Set by the writer when it gives the connection up (a Close response, a failed write):
    // the reader then stops, so requests already buffered behind it are not run for nobody.
    let closing = Rc::new(Cell::new(false));
    // Each task has its own descriptor of the socket, borrowed until both are done.
    let reader = read_requests(
        &mut stream,
        conn.clone(),
        tx,
        budgets,
        closing.clone(),
        stop,
    );
    let writer = write_responses(&mut wstream, rx, closing);
    let (why, _) = futures_lite::future::zip(reader, writer).await;
    if let Some(why) = why {
        tracing::info!(peer = %conn.peer, conn = conn.id, "closing connection: {why}");
    }
    let _ = wstream.close().await;
    let _ = stream.close().await;
}

/// One shard's stop signal for its connections: closed by the accept loop once the broker
/// starts shutting down. A wait on it is a waiter in a shard-local list, so the reads and
/// admissions of a connection that race against it take no lock and share no cache line with
/// other shards (the broker-wide shutdown channel is listened to once per shard, by the accept
/// loop).
#[derive(Clone)]
struct Stop(Rc<Semaphore>);

impl Stop {
    /// Runs `fut` unless the broker starts shutting down first.
    async fn until<T>(&self, fut: impl std::future::Future<Output = T>) -> Option<T> {
        futures_lite::future::or(async { Some(fut.await) }, async {
            // Never granted: it fails once the signal is closed.
            let _ = self.0.acquire(1).await;
            None
        })
        .await
    }
}

/// A connection's read deadline, armed lazily: the timer stays armed while later reads move the
/// deadline further out, and only when it fires is the current deadline checked and the timer
/// armed again. It is armed at most `reach` ahead (the stall timeout, the shortest deadline a
/// read can have), so a frame that starts arriving after an idle wait, whose stall deadline is
/// nearer than the idle one, still finds the timer armed early enough. So a busy connection
/// arms about one timer per `reach`, not one per read that waits (each an allocation and a
/// timer-tree insertion and removal in the executor); a deadline earlier than the armed time
/// arms a new timer at once.
struct ReadDeadline {
    armed: Option<(Instant, Sleep)>,
    reach: Duration,
}

impl ReadDeadline {
    fn new(reach: Duration) -> Self {
        ReadDeadline { armed: None, reach }
    }

    /// Runs `fut` until it completes (`Some`) or `deadline` passes first (`None`).
    async fn within<T>(
        &mut self,
        clock: &Clock,
        deadline: Option<Instant>,
        fut: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let Some(deadline) = deadline else {
            return Some(fut.await);
        };
        let mut fut = std::pin::pin!(fut);
        loop {
            if self.armed.as_ref().is_none_or(|(at, _)| *at > deadline) {
                let now = clock.now();
                let at = deadline.min(now + self.reach);
                self.armed = Some((at, clock.sleep(at.saturating_duration_since(now))));
            }
            let (_, sleep) = self.armed.as_mut().expect("armed just above");
            let done = std::future::poll_fn(|cx| {
                if let std::task::Poll::Ready(v) = std::future::Future::poll(fut.as_mut(), cx) {
                    return std::task::Poll::Ready(Some(v));
                }
                std::future::Future::poll(std::pin::Pin::new(&mut *sleep), cx).map(|()| None)
            })
            .await;
            if let Some(v) = done {
                return Some(v);
            }
            // The armed time has come: the deadline, or a time before it.
            self.armed = None;
            if clock.now() >= deadline {
                return None;
            }
        }
    }
}

/// The frame being received: its length (without the prefix), the budgets reserved for it, and
/// when it must be complete.
struct Pending {
    len: usize,
    held: Held,
    deadline: Instant,
}

/// Reads frames until EOF, shutdown, a timeout or a protocol violation (returned as the reason).
///
/// Memory: the read buffer grows only with bytes received (at most doubling what has arrived),
/// never by a declared length. A frame takes its declared size from the connection's budget as
/// soon as its length prefix is read, before its body is read, and takes bytes from the shard's
/// budget as they arrive (see [`Budgets`]).
async fn read_requests(
    stream: &mut TcpStream,
    conn: Rc<Connection>,
    tx: queue::Sender<'_, InFlight>,
    budgets: Budgets,
    closing: Rc<Cell<bool>>,
    stop: Stop,
) -> Option<String> {
    let broker = shard::local().broker.clone();
    let max = broker.config.request_bytes_max;
    let stall = Duration::from_millis(broker.config.stall_timeout_ms);
    let idle = Duration::from_millis(broker.config.connection_idle_ms);
    let clock = shard::local().clock.clone();
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    // Room for the next frame: the size of the last one this connection sent (bytes that
    // arrived, not a declared length), at least a chunk, at most one read call.
    let mut next_room = READ_CHUNK_BYTES;
    let mut pending: Option<Pending> = None;
    // When the first bytes of a frame whose length prefix is still incomplete arrived.
    let mut prefix_started: Option<Instant> = None;
    let mut read_deadline = ReadDeadline::new(stall);
    loop {
        // Is a whole frame here? Check before any parsing or allocation.
        loop {
            if closing.get() {
                return None; // the writer closed the connection and logged why
            }
            if pending.is_none() {
                if buf.len() < LENGTH_PREFIX_BYTES {
                    break;
                }
                let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                if len < REQUEST_HEADER_BYTES_MIN as i32 {
                    return Some(format!("invalid frame length {len}"));
                }
                let len = len as usize;
                if len > max {
                    return Some(format!(
                        "frame of {len} bytes exceeds request_bytes_max {max}"
                    ));
                }
                // Back-pressure: wait until earlier requests' bytes are answered. The body is
                // not read meanwhile, so it waits in the socket, not in our memory.
                let frame_bytes = LENGTH_PREFIX_BYTES + len;
                let held = stop
                    .until(budgets.reserve(frame_bytes, buf.len()))
                    .await
                    .flatten()?;
                prefix_started = None;
                pending = Some(Pending {
                    len,
                    held,
                    deadline: clock.now() + stall,
                });
            }
            let len = pending.as_ref().map_or(0, |p| p.len);
            if buf.len() < LENGTH_PREFIX_BYTES + len {
                break;
            }
            let Some(Pending { held, .. }) = pending.take() else {
                unreachable!("a pending frame was just checked");
            };
            let _ = buf.split_to(LENGTH_PREFIX_BYTES);
            let frame = buf.split_to(len).freeze();
            next_room = (LENGTH_PREFIX_BYTES + len).clamp(READ_CHUNK_BYTES, READ_CALL_BYTES_MAX);
            // A buffer that cannot take the next such frame whole is let go of now, before the
            // frame's handler starts (spawning may run it up to its first wait at once): the
            // frame then holds its memory alone, and a produce request's batch becomes the
            // log's without a copy (`kafka::handlers::produce`).
            if buf.is_empty() && next_room > READ_CHUNK_BYTES && buf.capacity() < next_room {
                buf = BytesMut::new();
            }
            let fetch = if api_of(&frame).0 == kafka_protocol::messages::ApiKey::Fetch as i16 {
                let slot = budgets.fetches.acquire_static_permit(1);
                Some(stop.until(slot).await?.ok()?)
            } else {
                None
            };
            let conn2 = conn.clone();
            let received = Instant::now();
            let task = glommio::spawn_local(async move {
                // A handler bug must cost this connection, not the shard and every client on it.
                let (api_key, api_version) = api_of(&frame);
                let started = Instant::now();
                let staged = if api_key == kafka_protocol::messages::ApiKey::Produce as i16 {
                    Some(Staged::Produce)
                } else if api_key == kafka_protocol::messages::ApiKey::Fetch as i16 {
                    Some(Staged::Fetch)
                } else {
                    None
                };
                if matches!(staged, Some(Staged::Produce)) {
                    crate::stats::produce_stage(ProduceStage::Queued, started - received);
                }
                let r = match shard::contain(crate::kafka::dispatch(&conn2, frame)).await {
                    Ok(r) => r,
                    Err(p) => handler_panicked(&conn2, api_key, api_version, p),
                };
                let ready = Instant::now();
                crate::stats::request_done(api_key, ready - started);
                if matches!(r, Response::Close(_)) {
                    crate::stats::request_closed();
                }
                Answer {
                    response: r,
                    ready: staged.map(|st| (ready, st)),
                }
            })
            .detach();
            let in_flight = InFlight {
                task,
                _held: held,
                _fetch: fetch,
            };
            if tx.push(in_flight).is_err() {
                return None;
            }
        }
        if broker.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        // How long this read may wait: a started frame must arrive whole within the stall
        // timeout; a connection with nothing started and nothing in flight may idle for
        // `connection_idle_ms`.
        let now = clock.now();
        let deadline = match (&pending, buf.is_empty()) {
            (Some(p), _) => Some(p.deadline),
            (None, false) => Some(*prefix_started.get_or_insert(now) + stall),
            (None, true) if budgets.unanswered() == 0 => Some(now + idle),
            (None, true) => None,
        };
        // Grow the buffer with what has arrived: a chunk at a time, or for a large frame at most
        // doubling what is here — never by the declared length alone. Before a new frame
        // starts, the buffer gets room for one as large as the connection's last: a frame that
        // outgrows its buffer is copied into the larger one (with frames of 64 KiB batches,
        // 4 % of the shard's core), so producers' frames land whole where they are read.
        let old = buf.len();
        let room = buf.capacity() - old;
        let want = match &pending {
            Some(p) if LENGTH_PREFIX_BYTES + p.len > old + READ_CHUNK_BYTES => {
                (LENGTH_PREFIX_BYTES + p.len - old).min(old.max(READ_CHUNK_BYTES))
            }
            Some(_) => READ_CHUNK_BYTES,
            // No frame started (at most a part of a length prefix is here).
            None => next_room,
        }
        .min(READ_CALL_BYTES_MAX);
        let room_needed = match &pending {
            // The rest of the pending frame fits the room left: it is read there.
            Some(p) if LENGTH_PREFIX_BYTES + p.len - old <= room => 0,
            // A large frame is expected: room for all of it before its first byte.
            None if want > READ_CHUNK_BYTES => want,
            // Small frames share a chunk while it has room.
            _ => want.min(READ_ROOM_MIN),
        };
        if room < room_needed {
            // Part of a frame already here moves with the buffer when it outgrows it; a part
            // of a length prefix (at most 3 bytes) does not count.
            if pending.is_some() && old > 0 {
                crate::stats::request_buffer_regrown(old);
            }
            buf.reserve(want);
        }
        let want = want.min(buf.capacity() - old);
        let read = read_deadline
            .within(
                &clock,
                deadline,
                stop.until(read_into_spare(stream, &mut buf, want)),
            )
            .await;
        // Outer `None`: the deadline passed; inner `None`: the broker is shutting down.
        match read {
            Some(None) => {
                return None;
            }
            None => {
                if old == 0 && pending.is_none() {
                    if budgets.unanswered() > 0 {
                        continue; // a long-poll answer is still coming: not idle
                    }
                    return Some(format!("idle for {} ms", idle.as_millis()));
                }
                return Some(format!(
                    "frame not complete within stall_timeout_ms {} ({old} bytes received)",
                    stall.as_millis()
                ));
            }
            Some(Some(Ok(0))) => {
                if old > 0 {
                    return Some(format!("peer closed mid-frame ({old} bytes pending)"));
                }
                return None;
            }
            Some(Some(Ok(n))) => {
                crate::stats::bytes_in(n);
                // The bytes of the pending frame just received are taken from the shard's
                // budget; while it is spent this connection is not read further (its bytes
                // wait in the socket). Unaccounted at any moment: one read per connection.
                if let Some(p) = pending.as_mut() {
                    let frame_part = (LENGTH_PREFIX_BYTES + p.len - old).min(n) as u64;
                    let grow = stop.until(p.held.shard_bytes.grow(frame_part));
                    match read_deadline.within(&clock, Some(p.deadline), grow).await {
                        Some(Some(Some(()))) => {}
                        Some(_) => return None, // shutting down
                        None => {
                            return Some(format!(
                                "frame not complete within stall_timeout_ms {} (shard request budget spent)",
                                stall.as_millis()
                            ))
                        }
                    }
                }
            }
            Some(Some(Err(e))) => return Some(format!("read error: {e}")),
        }
    }
}

/// Reads at most `want` bytes (`buf` has room for them) into `buf`'s spare capacity and extends
/// it by what was read: the bytes go from the socket into uninitialised memory, so the buffer is
/// never zero-filled first. Tries a non-blocking `recv` first (the common case under load: data
/// is waiting); when the socket is empty, waits until it is readable through the executor.
/// `Ok(0)` at end of stream.
async fn read_into_spare(
    stream: &TcpStream,
    buf: &mut BytesMut,
    want: usize,
) -> std::io::Result<usize> {
    let fd = stream.as_raw_fd();
    loop {
        let spare = buf.spare_capacity_mut();
        let len = want.min(spare.len());
        // SAFETY: `spare` is writable memory of at least `len` bytes owned by `buf`; the kernel
        // writes at most `len` bytes into it and reports how many.
        let n = unsafe {
            libc::recv(
                fd,
                spare.as_mut_ptr().cast::<libc::c_void>(),
                len,
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            let n = n as usize;
            // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
            unsafe { buf.set_len(buf.len() + n) };
            return Ok(n);
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::WouldBlock => {
                // Wait for data (or end of stream) without taking it: the next `recv` does.
                let mut probe = [0u8; 1];
                stream.peek(&mut probe).await?;
            }
            std::io::ErrorKind::Interrupted => {}
            _ => return Err(e),
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

/// Answers one write gathers at most. Pipelined requests whose answers are ready together (a
/// read that brought several produce requests, acks=1 answers completing in one pass) go out in
/// one `sendmsg` — one system call, one loopback delivery and wake-up of the client — instead of
/// one each; an answer not ready yet is never waited for, so gathering adds no latency.
const ANSWERS_PER_SEND_MAX: usize = 16;

/// What a gathered answer keeps until its bytes are written: when it was ready (its `Respond`
/// stage) and its request's budgets.
struct Gathered {
    ready: Option<(Instant, Staged)>,
    _held: Held,
    _fetch: Option<StaticPermit>,
}

/// What the writer does after an answer is gathered.
enum Then {
    Continue,
    /// Close the connection once what was gathered before it is written (`None`: the handler
    /// ended without an answer).
    Close(Option<String>),
}

/// Adds one request's answer to the write being gathered: its frames to `parts`, its bookkeeping
/// to `gathered`.
fn gather(
    flight: InFlight,
    answer: Option<Answer>,
    parts: &mut Vec<Bytes>,
    gathered: &mut Vec<Gathered>,
) -> Then {
    let InFlight {
        task: _,
        _held,
        _fetch,
    } = flight;
    let Some(Answer { response, ready }) = answer else {
        return Then::Close(None);
    };
    match response {
        Response::Frames(frames) => parts.extend(frames),
        Response::Frame(frame) => parts.push(frame),
        // Nothing to write; the budgets return now.
        Response::None => return Then::Continue,
        Response::Close(why) => return Then::Close(Some(why)),
    }
    gathered.push(Gathered {
        ready,
        _held,
        _fetch,
    });
    Then::Continue
}

async fn write_responses(
    stream: &mut TcpStream,
    rx: queue::Receiver<'_, InFlight>,
    closing: Rc<Cell<bool>>,
) {
    let mut failed = false;
    // Reused by every write of the connection: the pieces of the gathered answers and what each
    // answer keeps until written.
    let mut parts: Vec<Bytes> = Vec::with_capacity(IOV_PER_SEND_MAX);
    let mut gathered: Vec<Gathered> = Vec::with_capacity(ANSWERS_PER_SEND_MAX);
    // A request taken from the channel while gathering whose answer was not ready yet: the next
    // write starts with it (answers go out in request order).
    let mut unready: Option<InFlight> = None;
    loop {
        let mut flight = match unready.take() {
            Some(flight) => flight,
            None => match rx.recv().await {
                Some(flight) => flight,
                None => break,
            },
        };
        let answer = (&mut flight.task).await;
        let mut then = gather(flight, answer, &mut parts, &mut gathered);
        while matches!(then, Then::Continue)
            && !failed
            && gathered.len() < ANSWERS_PER_SEND_MAX
            && parts.len() < IOV_PER_SEND_MAX
        {
            let Some(mut next) = rx.try_recv() else { break };
            match futures_lite::future::poll_once(&mut next.task).await {
                Some(answer) => then = gather(next, answer, &mut parts, &mut gathered),
                None => {
                    unready = Some(next);
                    break;
                }
            }
        }
        if !failed && !gathered.is_empty() {
            send_answers(stream, &mut parts, &gathered, &closing, &mut failed).await;
        }
        parts.clear();
        // The gathered requests' budgets return once their responses are written.
        gathered.clear();
        if let Then::Close(why) = then {
            if failed {
                continue;
            }
            if let Some(why) = why {
                tracing::info!("closing connection: {why}");
            }
            failed = true;
            closing.set(true);
            let _ = stream.shutdown(std::net::Shutdown::Both).await;
        }
    }
}

/// Writes the gathered answers with as few `sendmsg` calls as they fit in; a failed write gives
/// the connection up (`failed`, `closing`).
async fn send_answers(
    stream: &mut TcpStream,
    parts: &mut [Bytes],
    gathered: &[Gathered],
    closing: &Cell<bool>,
    failed: &mut bool,
) {
    if let Err(e) = write_vectored_all(stream, parts).await {
        tracing::info!(error = %e, "closing connection: response write failed");
        *failed = true;
        closing.set(true);
        let _ = stream.shutdown(std::net::Shutdown::Both).await;
        return;
    }
    for g in gathered {
        match g.ready {
            Some((ready, Staged::Produce)) => {
                crate::stats::produce_stage(ProduceStage::Respond, ready.elapsed())
            }
            Some((ready, Staged::Fetch)) => {
                crate::stats::fetch_stage(FetchStage::Respond, ready.elapsed())
            }
            None => {}
        }
    }
}

/// Pieces one `sendmsg` takes at most; longer responses take several.
const IOV_PER_SEND_MAX: usize = 64;

/// Writes `parts` in order. First tries one non-blocking `sendmsg` of everything (the common
/// case: the whole response fits the socket buffer, one syscall, no copy); whatever is left goes
/// through the executor's async writes. The I/O vector lives on the stack: no allocation per
/// response.
pub async fn write_vectored_all(
    stream: &mut TcpStream,
    parts: &mut [Bytes],
) -> std::io::Result<()> {
    let fd = stream.as_raw_fd();
    // `parts[next..]` is left to send; `parts[next]` may have been sent in part (split off).
    let mut next = 0usize;
    while next < parts.len() {
        if parts[next].is_empty() {
            next += 1;
            continue;
        }
        let mut slices = [IoSlice::new(&[]); IOV_PER_SEND_MAX];
        let mut n_slices = 0usize;
        for p in parts[next..].iter().filter(|p| !p.is_empty()) {
            if n_slices == IOV_PER_SEND_MAX {
                break;
            }
            slices[n_slices] = IoSlice::new(p);
            n_slices += 1;
        }
        // SAFETY: IoSlice is ABI-compatible with iovec; fd is the open socket we own.
        let n = unsafe {
            libc::sendmsg(
                fd,
                &libc::msghdr {
                    msg_name: std::ptr::null_mut(),
                    msg_namelen: 0,
                    msg_iov: slices.as_ptr() as *mut libc::iovec,
                    msg_iovlen: n_slices,
                    msg_control: std::ptr::null_mut(),
                    msg_controllen: 0,
                    msg_flags: 0,
                },
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(e);
            }
            // The socket buffer is full: let the executor wait for room with the first piece.
            let first = std::mem::take(&mut parts[next]);
            next += 1;
            stream.write_all(&first).await?;
            crate::stats::bytes_out(first.len());
            continue;
        }
        let mut n = n as usize;
        crate::stats::bytes_out(n);
        while n > 0 {
            let front = &mut parts[next];
            if n >= front.len() {
                n -= front.len();
                next += 1;
            } else {
                let _ = front.split_to(n);
                n = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ReadDeadline;
    use crate::types::{Clock, FakeClock};
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    fn poll<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn a_read_deadline_arms_one_timer_for_later_deadlines_and_still_expires_at_the_current_one() {
        glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor")
            .run(async {
                let fake = FakeClock::new(0);
                let clock = Clock::fake(&fake);
                let mut d = ReadDeadline::new(Duration::from_secs(30));
                let s = Duration::from_secs(1);
                let made = fake.sleeps_made();
                // A wait arms the timer at its deadline (10 s); it stays armed after the wait.
                let first = clock.now() + 10 * s;
                assert_eq!(d.within(&clock, Some(first), async { 1 }).await, Some(1));
                assert_eq!(fake.sleeps_made(), made + 1);
                // Later waits with later deadlines reuse that timer.
                fake.advance(4 * s);
                let later = clock.now() + 10 * s; // 14 s
                for _ in 0..3 {
                    assert_eq!(d.within(&clock, Some(later), async { 2 }).await, Some(2));
                }
                {
                    let mut w = pin!(d.within(&clock, Some(later), std::future::pending::<()>()));
                    assert!(poll(w.as_mut()).is_pending());
                    assert_eq!(fake.sleeps_made(), made + 1);
                    // The armed time (10 s) passes: not expired, armed again at 14 s.
                    fake.advance(7 * s);
                    assert!(poll(w.as_mut()).is_pending());
                    assert_eq!(fake.sleeps_made(), made + 2);
                    // 14 s passes: expired.
                    fake.advance(3 * s);
                    assert_eq!(poll(w.as_mut()), Poll::Ready(None));
                }
                // An earlier deadline than the armed one arms a new timer at once, and expires
                // at its own time.
                let far = clock.now() + 60 * s;
                assert_eq!(d.within(&clock, Some(far), async { 3 }).await, Some(3));
                assert_eq!(fake.sleeps_made(), made + 3);
                let near = clock.now() + s;
                {
                    let mut w = pin!(d.within(&clock, Some(near), std::future::pending::<()>()));
                    assert!(poll(w.as_mut()).is_pending());
                    assert_eq!(fake.sleeps_made(), made + 4);
                    fake.advance(s);
                    assert_eq!(poll(w.as_mut()), Poll::Ready(None));
                }
                // An idle wait's far deadline arms the timer only `reach` (30 s) ahead, so the
                // nearer stall deadline of a frame that starts arriving later needs no new one.
                let t0 = clock.now();
                let idle = t0 + 600 * s;
                assert_eq!(d.within(&clock, Some(idle), async { 5 }).await, Some(5));
                assert_eq!(fake.sleeps_made(), made + 5);
                fake.advance(10 * s);
                let stall = clock.now() + 30 * s; // t0 + 40 s
                {
                    let mut w = pin!(d.within(&clock, Some(stall), std::future::pending::<()>()));
                    assert!(poll(w.as_mut()).is_pending());
                    assert_eq!(fake.sleeps_made(), made + 5);
                    fake.advance(20 * s); // t0 + 30 s: the armed time, not the deadline
                    assert!(poll(w.as_mut()).is_pending());
                    assert_eq!(fake.sleeps_made(), made + 6);
                    fake.advance(10 * s);
                    assert_eq!(poll(w.as_mut()), Poll::Ready(None));
                }
                // No deadline: no timer.
                assert_eq!(d.within(&clock, None, async { 4 }).await, Some(4));
                assert_eq!(fake.sleeps_made(), made + 6);
            });
    }
}
