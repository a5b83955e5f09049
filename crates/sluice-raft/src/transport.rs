//! Raft messages between nodes over TCP (glommio sockets), many groups per connection.
//!
//! Each node opens one outgoing connection to each peer and sends on it the messages of every
//! group registered on this executor; it receives on the connections its peers open to it. A
//! connection starts with a preamble (`PREAMBLE_MAGIC`, sender node id u64 BE), then carries
//! frames:
//!
//! ```text
//! [len u32 BE][crc32c u32 BE][group id u64 BE][eraftpb::Message, protobuf]
//!  len = 8 + protobuf bytes; the CRC covers the group id and the protobuf bytes
//! ```
//!
//! Heartbeats and heartbeat responses (raft-rs sends one per group per follower per heartbeat
//! tick) do not get a frame each: `send` collects those of every group for one peer, and the
//! writer puts them in one frame of group id `HEARTBEATS_GROUP` whose body is a list of
//! (group, term, commit, context) entries (`codec::put_heartbeats`); the receiver expands it back
//! into one raft message per entry. Nothing else about the messages changes.
//!
//! Sending never waits: `send` encodes frames into the peer's queue and wakes its writer, which
//! writes everything queued in one write when it runs — so all the messages a loop pass produces
//! for a peer (for every group on the executor) leave together. A peer that cannot be reached has
//! its queue dropped (raft retransmits) and is retried with exponential backoff.
//!
//! Frames from the network are hostile until checked: the declared length is bounded by
//! `MAX_FRAME_BYTES` before any byte of the body is awaited, the read buffer grows only with
//! bytes received, the CRC is checked, the protobuf is checked by `codec::check_message` before
//! it is decoded, and a message not addressed to this node or not from a known peer is dropped.
//! A bad preamble or frame closes that one connection; nothing else is affected. (Raft trusts its
//! peers' well-formed messages: the listener belongs on a private network until it is
//! authenticated.)

use crate::codec::{self, HeartbeatEntry};
use bytes::Bytes;
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use protobuf::Message as _;
use raft::eraftpb::Message;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::time::Duration;

/// First bytes of every connection: a connection from something that is not a raft peer of this
/// protocol version is closed at once.
pub const PREAMBLE_MAGIC: &[u8; 8] = b"SLRAFT01";
const PREAMBLE_BYTES: usize = 16;
const FRAME_HEADER_BYTES: usize = 8;
const GROUP_ID_BYTES: usize = 8;

/// The group id of a coalesced heartbeat frame (reserved: no raft group may use it). Its body is
/// `codec::put_heartbeats`'s list of heartbeat entries instead of one protobuf message.
pub const HEARTBEATS_GROUP: u64 = u64::MAX;

/// Largest frame body. A frame is one raft message: append messages are bounded by
/// `max_size_per_msg` (1 MiB) plus one entry (`MAX_PROPOSAL_BYTES`, 8 MiB); a snapshot message
/// carries the whole state machine snapshot, which for the controller is metadata only. A larger
/// declared length closes the connection before its body is read.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// Bytes read from a socket at a time: the read buffer grows by what arrives, never by a
/// declared length.
const READ_CHUNK_BYTES: usize = 64 << 10;

/// Incoming connections held at once; more are closed on accept. Peers hold one each per
/// executor, so this is far above any real cluster's need.
pub const MAX_INBOUND_CONNECTIONS: usize = 1024;

/// Messages waiting for one group's loop; more are dropped (raft retransmits).
pub const GROUP_INBOX_MESSAGES: usize = 4096;

/// Bytes all incoming connections of a transport may hold in partial frames together. A frame is
/// read whole before it is decoded, so each connection may hold up to `MAX_FRAME_BYTES`; this caps
/// the sum (a few peers sending snapshots at once fit) so that many connections each sending most
/// of a large frame cannot exhaust memory. A read that would pass it closes that connection.
pub const MAX_INBOUND_BUFFERED_BYTES: usize = 256 << 20;

/// How long a new connection may take to send its preamble.
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub node_id: u64,
    /// Address of the internal listener (`127.0.0.1:0` picks a port).
    pub listen: SocketAddr,
    /// Every other node: id → address of its listener.
    pub peers: HashMap<u64, SocketAddr>,
    /// Bytes queued for one peer before further messages to it are dropped.
    pub max_queued_bytes: usize,
    pub connect_timeout: Duration,
    /// A write to a peer that makes no progress for this long drops the connection (a peer that
    /// vanished without a reset would otherwise hold it until TCP gives up, minutes later).
    pub write_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Send heartbeats of all groups for a peer as one coalesced frame (received either way).
    pub coalesce_heartbeats: bool,
}

impl TransportConfig {
    pub fn new(node_id: u64, listen: SocketAddr, peers: HashMap<u64, SocketAddr>) -> Self {
        TransportConfig {
            node_id,
            listen,
            peers,
            max_queued_bytes: 128 << 20,
            connect_timeout: Duration::from_secs(1),
            write_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_secs(1),
            coalesce_heartbeats: true,
        }
    }
}

/// Counters, for tests and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Frames queued for peers (a frame is one raft message, or one coalesced heartbeat frame).
    pub frames_sent: u64,
    /// Frames read off incoming connections.
    pub frames_received: u64,
    /// Raft messages queued for peers, counting each heartbeat of a coalesced frame.
    pub messages_sent: u64,
    /// Raft messages read off incoming connections, counting each heartbeat of a coalesced
    /// frame.
    pub messages_received: u64,
    /// Bytes written to peers (frames, not preambles).
    pub bytes_sent: u64,
    /// Bytes read from peers.
    pub bytes_received: u64,
    /// Coalesced heartbeat frames queued for peers (also counted in `frames_sent`), and the
    /// heartbeats and responses they carried (also counted in `messages_sent`).
    pub heartbeat_frames_sent: u64,
    pub heartbeats_coalesced: u64,
    /// Connections closed for a bad preamble or frame.
    pub connections_rejected: u64,
    /// Messages dropped: full queue or inbox, unknown group, wrong addressee, isolation.
    pub messages_dropped: u64,
    pub connects: u64,
}

struct PeerQueue {
    addr: SocketAddr,
    buf: RefCell<Vec<u8>>,
    /// Heartbeats waiting to be coalesced into one frame, appended to `buf` by the writer (or
    /// by `send` once `HEARTBEATS_PER_FRAME_MAX` wait).
    heartbeats: RefCell<Vec<HeartbeatEntry>>,
    kick: async_channel::Sender<()>,
}

struct Inner {
    config: TransportConfig,
    local_addr: SocketAddr,
    peers: HashMap<u64, Rc<PeerQueue>>,
    groups: RefCell<HashMap<u64, async_channel::Sender<Message>>>,
    isolated: Cell<bool>,
    inbound: Cell<usize>,
    /// Bytes held in partial frames by all incoming connections (`MAX_INBOUND_BUFFERED_BYTES`).
    inbound_buffered: Cell<usize>,
    stats: RefCell<TransportStats>,
    /// Closed by `close`: every task of this transport ends.
    stop: RefCell<Option<async_channel::Sender<()>>>,
    stopped: async_channel::Receiver<()>,
    /// The listening socket, shut down by `close`: an accept still in flight in io_uring keeps
    /// the socket open after the listener is dropped (and so its port taken) until the ring is
    /// torn down; shutting it down ends the accept and frees the port at once.
    listener_control: socket2::Socket,
}

/// The node's end of the raft network on this executor. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    inner: Rc<Inner>,
}

/// The listener, and a second handle to the same socket with which `close` shuts it down.
fn listen(addr: SocketAddr) -> io::Result<(TcpListener, socket2::Socket)> {
    let domain = if addr.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    // A restarted node takes its port back while old connections sit in TIME_WAIT. No
    // SO_REUSEPORT: a second process must not be able to share the port.
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    let control = sock.try_clone()?;
    // SAFETY: the descriptor is a listening TCP socket this function owns and hands over.
    Ok((
        unsafe { TcpListener::from_raw_fd(sock.into_raw_fd()) },
        control,
    ))
}

impl Transport {
    /// Binds the listener and spawns the accept loop and one writer per peer on the current
    /// glommio executor.
    pub fn start(config: TransportConfig) -> io::Result<Transport> {
        let (listener, listener_control) = listen(config.listen)?;
        let local_addr = listener.local_addr()?;
        let (stop_tx, stopped) = async_channel::bounded::<()>(1);
        let mut peers = HashMap::new();
        let mut kicks = Vec::new();
        for (id, addr) in &config.peers {
            if *id == config.node_id {
                continue;
            }
            let (kick, kicked) = async_channel::bounded(1);
            peers.insert(
                *id,
                Rc::new(PeerQueue {
                    addr: *addr,
                    buf: RefCell::new(Vec::new()),
                    heartbeats: RefCell::new(Vec::new()),
                    kick,
                }),
            );
            kicks.push((*id, kicked));
        }
        let inner = Rc::new(Inner {
            config,
            local_addr,
            peers,
            groups: RefCell::new(HashMap::new()),
            isolated: Cell::new(false),
            inbound: Cell::new(0),
            inbound_buffered: Cell::new(0),
            stats: RefCell::new(TransportStats::default()),
            stop: RefCell::new(Some(stop_tx)),
            stopped,
            listener_control,
        });
        for (id, kicked) in kicks {
            let inner = inner.clone();
            glommio::spawn_local(async move {
                let stopped = inner.stopped.clone();
                future::or(writer(inner, id, kicked), async {
                    let _ = stopped.recv().await;
                })
                .await
            })
            .detach();
        }
        let accept_inner = inner.clone();
        glommio::spawn_local(async move {
            let stopped = accept_inner.stopped.clone();
            future::or(accept_loop(accept_inner, listener), async {
                let _ = stopped.recv().await;
            })
            .await
        })
        .detach();
        Ok(Transport { inner })
    }

    pub fn node_id(&self) -> u64 {
        self.inner.config.node_id
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Registers a group: messages for it arrive on the returned receiver.
    pub fn register(&self, group_id: u64) -> io::Result<async_channel::Receiver<Message>> {
        let mut groups = self.inner.groups.borrow_mut();
        if group_id == HEARTBEATS_GROUP {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("raft group id {group_id} is reserved for coalesced heartbeats"),
            ));
        }
        if groups.contains_key(&group_id) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("raft group {group_id} is already registered"),
            ));
        }
        let (tx, rx) = async_channel::bounded(GROUP_INBOX_MESSAGES);
        groups.insert(group_id, tx);
        Ok(rx)
    }

    pub fn unregister(&self, group_id: u64) {
        self.inner.groups.borrow_mut().remove(&group_id);
    }

    /// Queues messages of one group; each goes to its `to` node. Never waits.
    pub fn send(&self, group_id: u64, msgs: Vec<Message>) {
        let inner = &self.inner;
        let mut stats = inner.stats.borrow_mut();
        if inner.isolated.get() {
            stats.messages_dropped += msgs.len() as u64;
            return;
        }
        let mut kicked = Vec::new();
        for m in msgs {
            let Some(peer) = inner.peers.get(&m.to) else {
                stats.messages_dropped += 1;
                continue;
            };
            if inner.config.coalesce_heartbeats {
                if let Some(entry) = HeartbeatEntry::from_message(group_id, &m) {
                    let full = {
                        let mut hbs = peer.heartbeats.borrow_mut();
                        hbs.push(entry);
                        hbs.len() >= codec::HEARTBEATS_PER_FRAME_MAX
                    };
                    if full {
                        queue_heartbeats(inner, &mut stats, peer, m.to);
                    }
                    stats.messages_sent += 1;
                    kicked.push(peer.clone());
                    continue;
                }
            }
            let body = match m.write_to_bytes() {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!("raft message did not encode: {e}");
                    stats.messages_dropped += 1;
                    continue;
                }
            };
            let len = GROUP_ID_BYTES + body.len();
            let mut buf = peer.buf.borrow_mut();
            if len > MAX_FRAME_BYTES
                || buf.len() + FRAME_HEADER_BYTES + len > inner.config.max_queued_bytes
            {
                if len > MAX_FRAME_BYTES {
                    tracing::error!(
                        "raft message of {len} bytes to node {} is over MAX_FRAME_BYTES: dropped",
                        m.to
                    );
                }
                stats.messages_dropped += 1;
                continue;
            }
            let group = group_id.to_be_bytes();
            let mut crc = crc32c::crc32c(&group);
            crc = crc32c::crc32c_append(crc, &body);
            buf.extend_from_slice(&(len as u32).to_be_bytes());
            buf.extend_from_slice(&crc.to_be_bytes());
            buf.extend_from_slice(&group);
            buf.extend_from_slice(&body);
            stats.frames_sent += 1;
            stats.messages_sent += 1;
            kicked.push(peer.clone());
        }
        for peer in kicked {
            let _ = peer.kick.try_send(());
        }
    }

    /// Cuts this node off the network (test hook, and a way to fence a node): every message in
    /// or out is dropped while set; connections stay open.
    pub fn set_isolated(&self, isolated: bool) {
        self.inner.isolated.set(isolated);
    }

    pub fn stats(&self) -> TransportStats {
        self.inner.stats.borrow().clone()
    }

    /// Ends the accept loop, the writers and every connection of this transport.
    pub fn close(&self) {
        self.inner.stop.borrow_mut().take();
        let _ = self
            .inner
            .listener_control
            .shutdown(std::net::Shutdown::Both);
    }
}

/// Appends the heartbeats waiting for peer `to` to its queue as one coalesced frame.
fn queue_heartbeats(inner: &Inner, stats: &mut TransportStats, peer: &PeerQueue, to: u64) {
    let entries = std::mem::take(&mut *peer.heartbeats.borrow_mut());
    if entries.is_empty() {
        return;
    }
    let mut body = HEARTBEATS_GROUP.to_be_bytes().to_vec();
    codec::put_heartbeats(&mut body, inner.config.node_id, to, &entries);
    let mut buf = peer.buf.borrow_mut();
    if buf.len() + FRAME_HEADER_BYTES + body.len() > inner.config.max_queued_bytes {
        stats.messages_dropped += entries.len() as u64;
        return;
    }
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
    buf.extend_from_slice(&body);
    stats.frames_sent += 1;
    stats.heartbeat_frames_sent += 1;
    stats.heartbeats_coalesced += entries.len() as u64;
}

async fn writer(inner: Rc<Inner>, peer_id: u64, kicked: async_channel::Receiver<()>) {
    let peer = inner.peers[&peer_id].clone();
    let mut conn: Option<TcpStream> = None;
    let mut backoff = inner.config.backoff_min;
    loop {
        if peer.buf.borrow().is_empty()
            && peer.heartbeats.borrow().is_empty()
            && kicked.recv().await.is_err()
        {
            return;
        }
        if conn.is_none() {
            match connect(&inner, peer.addr).await {
                Ok(c) => {
                    inner.stats.borrow_mut().connects += 1;
                    backoff = inner.config.backoff_min;
                    conn = Some(c);
                }
                Err(e) => {
                    tracing::debug!("raft: node {peer_id} at {} unreachable: {e}", peer.addr);
                    // What was queued is stale by the time a connection exists: raft resends.
                    let dropped = std::mem::take(&mut *peer.buf.borrow_mut());
                    let heartbeats = std::mem::take(&mut *peer.heartbeats.borrow_mut());
                    if !dropped.is_empty() || !heartbeats.is_empty() {
                        inner.stats.borrow_mut().messages_dropped += 1;
                    }
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(inner.config.backoff_max);
                    continue;
                }
            }
        }
        // Every group's heartbeats queued since the last write: one frame.
        queue_heartbeats(&inner, &mut inner.stats.borrow_mut(), &peer, peer_id);
        let batch = std::mem::take(&mut *peer.buf.borrow_mut());
        if batch.is_empty() {
            continue;
        }
        if let Some(c) = conn.as_mut() {
            let timeout = inner.config.write_timeout;
            let written = future::or(c.write_all(&batch), async {
                glommio::timer::sleep(timeout).await;
                Err(io::Error::new(io::ErrorKind::TimedOut, "write stalled"))
            })
            .await;
            match written {
                Ok(()) => inner.stats.borrow_mut().bytes_sent += batch.len() as u64,
                Err(e) => {
                    tracing::debug!("raft: connection to node {peer_id} lost: {e}");
                    conn = None;
                }
            }
        }
    }
}

async fn connect(inner: &Inner, addr: SocketAddr) -> io::Result<TcpStream> {
    let timeout = inner.config.connect_timeout;
    let mut c = open(inner.local_addr.ip(), addr, timeout).await?;
    c.set_nodelay(true)?;
    let mut preamble = PREAMBLE_MAGIC.to_vec();
    preamble.extend_from_slice(&inner.config.node_id.to_be_bytes());
    // The preamble leaves once the connection is established: bounded like the connect.
    future::or(c.write_all(&preamble), async {
        glommio::timer::sleep(timeout).await;
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "connection timed out",
        ))
    })
    .await?;
    Ok(c)
}

/// Opens a connection to `peer` that leaves from `source` (the listener's address, the port
/// chosen by the kernel), so that a peer — and a firewall between nodes — sees this node's
/// internal address as the source: without it the kernel picks the source by route, which on a
/// host with several addresses (nodes on 127.0.0.1–3 all leave from 127.0.0.1) is not this
/// node's. A listener on the unspecified address (or of another family) leaves that choice to
/// the kernel.
async fn open(source: IpAddr, peer: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    if source.is_unspecified() || source.is_ipv4() != peer.is_ipv4() {
        return Ok(TcpStream::connect_timeout(peer, timeout).await?);
    }
    let domain = if peer.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    // The port is chosen at connect, by the whole 4-tuple: binding the address does not
    // reserve a port of its own for each connection. Best effort (an older kernel lacks it).
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option value of the size passed.
    let _ = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    sock.bind(&SocketAddr::new(source, 0).into())?;
    sock.set_nonblocking(true)?;
    match sock.connect(&peer.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // Blocking mode, as the sockets glommio connects itself (its writes pass MSG_DONTWAIT).
    sock.set_nonblocking(false)?;
    // SAFETY: the descriptor is a TCP socket this function owns and hands over. The
    // connection completes in the background: the stream's first write waits for it (the
    // socket is not writable before) and fails with the connect's error.
    Ok(unsafe { TcpStream::from_raw_fd(sock.into_raw_fd()) })
}

async fn accept_loop(inner: Rc<Inner>, listener: TcpListener) {
    loop {
        let conn = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                if inner.stop.borrow().is_none() {
                    // `close` shut the listener down: this is the end, not a failure.
                    return;
                }
                tracing::warn!("raft: accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if inner.inbound.get() >= MAX_INBOUND_CONNECTIONS {
            tracing::warn!("raft: {MAX_INBOUND_CONNECTIONS} inbound connections: refusing one");
            continue;
        }
        inner.inbound.set(inner.inbound.get() + 1);
        let inner = inner.clone();
        glommio::spawn_local(async move {
            let stopped = inner.stopped.clone();
            let peer = conn.peer_addr().ok();
            let result = future::or(read_connection(&inner, conn), async {
                let _ = stopped.recv().await;
                Ok(())
            })
            .await;
            if let Err(e) = result {
                inner.stats.borrow_mut().connections_rejected += 1;
                tracing::warn!("raft: closing connection from {peer:?}: {e}");
            }
            inner.inbound.set(inner.inbound.get() - 1);
        })
        .detach();
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Reads frames until the peer closes (Ok) or sends something bad (Err: the connection closes).
async fn read_connection(inner: &Inner, mut conn: TcpStream) -> io::Result<()> {
    let mut preamble = [0u8; PREAMBLE_BYTES];
    future::or(async { conn.read_exact(&mut preamble).await }, async {
        glommio::timer::sleep(PREAMBLE_TIMEOUT).await;
        Err(io::Error::new(io::ErrorKind::TimedOut, "no preamble"))
    })
    .await?;
    if &preamble[..8] != PREAMBLE_MAGIC {
        return Err(bad("not a raft peer (bad preamble)"));
    }
    let mut buf = Budgeted {
        bytes: Vec::new(),
        inner,
    };
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        let buf = &mut buf.bytes;
        let mut consumed = 0;
        while buf.len() - consumed >= FRAME_HEADER_BYTES {
            let h = &buf[consumed..];
            let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            if !(GROUP_ID_BYTES..=MAX_FRAME_BYTES).contains(&len) {
                return Err(bad("frame length out of bounds"));
            }
            if h.len() < FRAME_HEADER_BYTES + len {
                break;
            }
            let crc = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            let body = &h[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len];
            if crc32c::crc32c(body) != crc {
                return Err(bad("frame checksum mismatch"));
            }
            let mut group = [0u8; 8];
            group.copy_from_slice(&body[..GROUP_ID_BYTES]);
            let group = u64::from_be_bytes(group);
            let pb = &body[GROUP_ID_BYTES..];
            if group == HEARTBEATS_GROUP {
                // Decoded whole before anything is delivered: a bad frame delivers nothing.
                let (from, to, entries) = codec::get_heartbeats(pb).map_err(|e| bad(e.0))?;
                inner.stats.borrow_mut().frames_received += 1;
                for e in entries {
                    let group = e.group;
                    deliver(inner, group, e.into_message(from, to));
                }
            } else {
                codec::check_message(pb).map_err(|e| bad(e.0))?;
                let msg = Message::parse_from_carllerche_bytes(&Bytes::copy_from_slice(pb))
                    .map_err(|e| bad(&format!("raft message did not decode: {e}")))?;
                inner.stats.borrow_mut().frames_received += 1;
                deliver(inner, group, msg);
            }
            consumed += FRAME_HEADER_BYTES + len;
        }
        buf.drain(..consumed);
        inner
            .inbound_buffered
            .set(inner.inbound_buffered.get() - consumed);
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(())
            } else {
                Err(bad("connection closed mid-frame"))
            };
        }
        if inner.inbound_buffered.get() + n > MAX_INBOUND_BUFFERED_BYTES {
            return Err(bad("inbound buffer budget exhausted"));
        }
        inner.inbound_buffered.set(inner.inbound_buffered.get() + n);
        inner.stats.borrow_mut().bytes_received += n as u64;
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A connection's read buffer, whose bytes are charged to `Inner::inbound_buffered` until it is
/// dropped.
struct Budgeted<'a> {
    bytes: Vec<u8>,
    inner: &'a Inner,
}

impl Drop for Budgeted<'_> {
    fn drop(&mut self) {
        let held = self.inner.inbound_buffered.get();
        self.inner
            .inbound_buffered
            .set(held.saturating_sub(self.bytes.len()));
    }
}

fn deliver(inner: &Inner, group: u64, msg: Message) {
    let mut stats = inner.stats.borrow_mut();
    stats.messages_received += 1;
    let known_peer = inner.peers.contains_key(&msg.from);
    if inner.isolated.get() || msg.to != inner.config.node_id || !known_peer {
        stats.messages_dropped += 1;
        return;
    }
    let groups = inner.groups.borrow();
    match groups.get(&group) {
        Some(tx) if tx.try_send(msg).is_ok() => {}
        _ => stats.messages_dropped += 1,
    }
}
