//! Raft messages between nodes over TCP (glommio sockets), many groups per connection.
//!
//! Each node opens one outgoing connection to each peer and sends on it the messages of every
//! group registered on this executor; it receives on the connections its peers open to it. A
//! connection starts with a preamble (`PREAMBLE_MAGIC`, sender node id u64 BE), then carries
//! frames (all integers big-endian):
//!
//! ```text
//! [len u32][crc32c u32][group id u64][mode u8][pb_len u32][eraftpb::Message, protobuf]
//!     [n u32][data_len u32 x n][data 0][data 1]...
//!  len = the bytes after the crc
//! ```
//!
//! The payloads of a group's entries travel outside the protobuf: the message is encoded with
//! those entries' `data` empty, followed by their lengths (one per entry of the message, 0 for
//! an entry whose data stayed inside the protobuf) and the data itself, which the sender
//! writes from the entries' own buffers (no copy per follower) and the receiver hands on as
//! slices of the frame it read (no copy either). `mode` says what the CRC covers:
//!
//! - `MODE_COVERED` (0): everything after the crc. No data is carried outside (`n` = 0).
//! - `MODE_PAYLOAD_CHECKED` (1): everything after the crc but the data, which the receiving
//!   group checks itself with the [`PayloadCheck`] it registered (a partition's entries are
//!   RecordBatches with their own CRC-32C: checked once, there, instead of once per frame as
//!   well). Used for the groups registered with a check on the sending node; a frame of this
//!   mode for a group that has no check here is dropped, and data that fails the check closes
//!   the connection like a bad CRC.
//!
//! Heartbeats and heartbeat responses (raft-rs sends one per group per follower per heartbeat
//! tick) do not get a frame each: `send` collects those of every group for one peer, and the
//! writer puts them in one frame of group id `HEARTBEATS_GROUP` whose body is a list of
//! (group, term, commit, context) entries (`codec::put_heartbeats`), CRC over the whole body; the
//! receiver expands it back into one raft message per entry. Nothing else about the messages changes.
//!
//! Sending never waits: `send` encodes frames into the peer's queue and wakes its writer, which
//! writes everything queued when it runs — so all the messages a loop pass produces for a peer
//! (for every group on the executor) leave together. A peer that cannot be reached has its queue
//! dropped (raft retransmits) and is retried with exponential backoff.
//!
//! Frames from the network are hostile until checked: the declared length is bounded by
//! `MAX_FRAME_BYTES` before any byte of the body is awaited, the read buffer grows only with
//! bytes received, the inner lengths are checked against the frame, the CRC is checked, the
//! protobuf is checked by `codec::check_message` before it is decoded, and a message not
//! addressed to this node or not from a known peer is dropped. A bad preamble or frame closes
//! that one connection; nothing else is affected. (Raft trusts its peers' well-formed messages:
//! the listener belongs on a private network until it is authenticated.)

use crate::codec::{self, HeartbeatEntry};
use bytes::{Bytes, BytesMut};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use protobuf::Message as _;
use raft::eraftpb::{EntryType, Message};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::time::Duration;

/// First bytes of every connection: a connection from something that is not a raft peer of this
/// protocol version is closed at once.
pub const PREAMBLE_MAGIC: &[u8; 8] = b"SLRAFT02";
const PREAMBLE_BYTES: usize = 16;
const FRAME_HEADER_BYTES: usize = 8;
const GROUP_ID_BYTES: usize = 8;
/// Group id, mode, protobuf length, entry count: the fixed part of a frame body.
const BODY_FIXED_BYTES: usize = GROUP_ID_BYTES + 1 + 4 + 4;

/// Frame mode: the CRC covers the whole body; no data travels outside the protobuf.
pub const MODE_COVERED: u8 = 0;
/// Frame mode: the CRC covers the body but the entries' data, which the receiving group checks
/// with its [`PayloadCheck`].
pub const MODE_PAYLOAD_CHECKED: u8 = 1;

/// A group's own check of an entry's data (normal entries with data only), run once on each
/// entry received from a peer: `Err` names what is wrong, and closes the connection.
pub type PayloadCheck = fn(&[u8]) -> Result<(), &'static str>;

/// Entry data of at least this size is written from its own buffer (one write of it to each
/// peer it goes to, no copy); smaller pieces are copied into the queue's current buffer so that
/// small frames leave in one write.
const SHARED_WRITE_MIN_BYTES: usize = 4 << 10;

/// The group id of a coalesced heartbeat frame (reserved: no raft group may use it). Its body is
/// `codec::put_heartbeats`'s list of heartbeat entries instead of one protobuf message.
pub const HEARTBEATS_GROUP: u64 = u64::MAX;

/// Largest frame body. A frame is one raft message: append messages are bounded by
/// `max_size_per_msg` (1 MiB) plus one entry (`MAX_PROPOSAL_BYTES`, 8 MiB); a snapshot message
/// carries the whole state machine snapshot, which for the controller is metadata only. A larger
/// declared length closes the connection before its body is read.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// Bytes read from a socket at a time: the read buffer grows by what arrives, never by a
/// declared length. Frames are cut out of it without a copy; a partial frame at its end moves to
/// the next buffer.
const READ_CHUNK_BYTES: usize = 256 << 10;

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
    /// Entries whose data failed their group's payload check (the connection was closed).
    pub payloads_refused: u64,
}

struct PeerQueue {
    addr: SocketAddr,
    queue: RefCell<Outgoing>,
    /// Heartbeats waiting to be coalesced into one frame, appended to `queue` by the writer (or
    /// by `send` once `HEARTBEATS_PER_FRAME_MAX` wait).
    heartbeats: RefCell<Vec<HeartbeatEntry>>,
    kick: async_channel::Sender<()>,
}

/// What waits to be written to a peer, in order: buffers written one after the other (frame
/// headers and small pieces copied together into one, large entry data shared with the entries
/// it came from).
#[derive(Default)]
struct Outgoing {
    parts: Vec<Bytes>,
    /// The buffer small pieces are copied into, after `parts`.
    tail: Vec<u8>,
    bytes: usize,
}

impl Outgoing {
    fn is_empty(&self) -> bool {
        self.bytes == 0
    }
    fn put_small(&mut self, b: &[u8]) {
        self.tail.extend_from_slice(b);
        self.bytes += b.len();
    }
    fn put_shared(&mut self, b: Bytes) {
        if b.len() < SHARED_WRITE_MIN_BYTES {
            return self.put_small(&b);
        }
        if !self.tail.is_empty() {
            self.parts.push(Bytes::from(std::mem::take(&mut self.tail)));
        }
        self.bytes += b.len();
        self.parts.push(b);
    }
    fn take(&mut self) -> Vec<Bytes> {
        let mut parts = std::mem::take(&mut self.parts);
        if !self.tail.is_empty() {
            parts.push(Bytes::from(std::mem::take(&mut self.tail)));
        }
        self.bytes = 0;
        parts
    }
}

/// A registered group: where its messages go, and its payload check if it has one.
struct Registered {
    inbox: async_channel::Sender<Message>,
    check: Option<PayloadCheck>,
}

struct Inner {
    config: TransportConfig,
    local_addr: SocketAddr,
    peers: HashMap<u64, Rc<PeerQueue>>,
    groups: RefCell<HashMap<u64, Registered>>,
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
                    queue: RefCell::new(Outgoing::default()),
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
        self.register_with(group_id, None)
    }

    /// Registers a group whose entries' data carry their own checksum, checked by `check`: its
    /// frames leave in `MODE_PAYLOAD_CHECKED` (the frame CRC skips the data) and the data of
    /// every entry received for it passes `check` once before the message is delivered. Every
    /// node must register the group the same way.
    pub fn register_with(
        &self,
        group_id: u64,
        check: Option<PayloadCheck>,
    ) -> io::Result<async_channel::Receiver<Message>> {
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
        groups.insert(group_id, Registered { inbox: tx, check });
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
        let checked = inner
            .groups
            .borrow()
            .get(&group_id)
            .is_some_and(|g| g.check.is_some());
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
            let to = m.to;
            let frame = match encode_frame(group_id, m, checked) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!("raft message did not encode: {e}");
                    stats.messages_dropped += 1;
                    continue;
                }
            };
            let len = frame.body_len();
            let mut queue = peer.queue.borrow_mut();
            if len > MAX_FRAME_BYTES
                || queue.bytes + FRAME_HEADER_BYTES + len > inner.config.max_queued_bytes
            {
                if len > MAX_FRAME_BYTES {
                    tracing::error!(
                        "raft message of {len} bytes to node {to} is over MAX_FRAME_BYTES: dropped"
                    );
                }
                stats.messages_dropped += 1;
                continue;
            }
            queue.put_small(&frame.head);
            for d in frame.data {
                queue.put_shared(d);
            }
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
    let mut queue = peer.queue.borrow_mut();
    if queue.bytes + FRAME_HEADER_BYTES + body.len() > inner.config.max_queued_bytes {
        stats.messages_dropped += entries.len() as u64;
        return;
    }
    queue.put_small(&(body.len() as u32).to_be_bytes());
    queue.put_small(&crc32c::crc32c(&body).to_be_bytes());
    queue.put_small(&body);
    stats.frames_sent += 1;
    stats.heartbeat_frames_sent += 1;
    stats.heartbeats_coalesced += entries.len() as u64;
}

async fn writer(inner: Rc<Inner>, peer_id: u64, kicked: async_channel::Receiver<()>) {
    let peer = inner.peers[&peer_id].clone();
    let mut conn: Option<TcpStream> = None;
    let mut backoff = inner.config.backoff_min;
    loop {
        if peer.queue.borrow().is_empty()
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
                    let dropped = peer.queue.borrow_mut().take();
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
        let parts = peer.queue.borrow_mut().take();
        if parts.is_empty() {
            continue;
        }
        if let Some(c) = conn.as_mut() {
            let timeout = inner.config.write_timeout;
            let write = async {
                for part in &parts {
                    c.write_all(part).await?;
                }
                Ok::<(), io::Error>(())
            };
            let written = future::or(write, async {
                glommio::timer::sleep(timeout).await;
                Err(io::Error::new(io::ErrorKind::TimedOut, "write stalled"))
            })
            .await;
            match written {
                Ok(()) => {
                    inner.stats.borrow_mut().bytes_sent +=
                        parts.iter().map(|p| p.len() as u64).sum::<u64>()
                }
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
    let mut rb = ReadBuffer {
        buf: BytesMut::zeroed(READ_CHUNK_BYTES),
        filled: 0,
        inner,
    };
    loop {
        // Every whole frame received is cut off the buffer (no copy) and handled.
        while rb.filled >= FRAME_HEADER_BYTES {
            let h = &rb.buf[..FRAME_HEADER_BYTES];
            let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            if !(GROUP_ID_BYTES..=MAX_FRAME_BYTES).contains(&len) {
                return Err(bad("frame length out of bounds"));
            }
            if rb.filled < FRAME_HEADER_BYTES + len {
                break;
            }
            let frame = rb.buf.split_to(FRAME_HEADER_BYTES + len).freeze();
            rb.filled -= frame.len();
            inner
                .inbound_buffered
                .set(inner.inbound_buffered.get() - frame.len());
            if frame_group(&frame) == Some(HEARTBEATS_GROUP) {
                let crc = u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
                let body = &frame[FRAME_HEADER_BYTES..];
                if crc32c::crc32c(body) != crc {
                    return Err(bad("frame checksum mismatch"));
                }
                // Decoded whole before anything is delivered: a bad frame delivers nothing.
                let (from, to, entries) =
                    codec::get_heartbeats(&body[GROUP_ID_BYTES..]).map_err(|e| bad(e.0))?;
                inner.stats.borrow_mut().frames_received += 1;
                for e in entries {
                    let group = e.group;
                    deliver(inner, group, e.into_message(from, to), &[])?;
                }
                continue;
            }
            let (group, msg, outside) = decode_frame(frame).map_err(|e| bad(e.0))?;
            inner.stats.borrow_mut().frames_received += 1;
            deliver(inner, group, msg, &outside)?;
        }
        // Room for the next read: a fresh buffer when this one is (nearly) full, the partial
        // frame moved over. It grows with what was received (twice the partial frame), never
        // with a declared length.
        if rb.buf.len() - rb.filled < READ_CHUNK_BYTES / 4 {
            let mut fresh = BytesMut::zeroed(READ_CHUNK_BYTES.max(2 * rb.filled));
            fresh[..rb.filled].copy_from_slice(&rb.buf[..rb.filled]);
            rb.buf = fresh;
        }
        let filled = rb.filled;
        let n = conn.read(&mut rb.buf[filled..]).await?;
        if n == 0 {
            return if rb.filled == 0 {
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
        rb.filled += n;
    }
}

/// A connection's read buffer: `buf[..filled]` was received and not consumed yet; those bytes
/// are charged to `Inner::inbound_buffered` until they are cut off as a frame or the buffer is
/// dropped.
struct ReadBuffer<'a> {
    buf: BytesMut,
    filled: usize,
    inner: &'a Inner,
}

impl Drop for ReadBuffer<'_> {
    fn drop(&mut self) {
        let held = self.inner.inbound_buffered.get();
        self.inner
            .inbound_buffered
            .set(held.saturating_sub(self.filled));
    }
}

/// One frame to send: its header and protobuf (`head`, the frame from its first byte up to the
/// data) and the entry data that follows it, shared with the entries.
struct Frame {
    head: Vec<u8>,
    data: Vec<Bytes>,
}

impl Frame {
    /// The frame's `len`: the bytes after the CRC.
    fn body_len(&self) -> usize {
        self.head.len() - FRAME_HEADER_BYTES + self.data.iter().map(|d| d.len()).sum::<usize>()
    }
}

/// Encodes `m` for `group`. With `checked` (the group checks its entries' data itself), the
/// data of normal entries travels after the protobuf, outside the CRC (`MODE_PAYLOAD_CHECKED`).
fn encode_frame(group: u64, mut m: Message, checked: bool) -> Result<Frame, String> {
    let mut lens: Vec<u32> = Vec::new();
    let mut data: Vec<Bytes> = Vec::new();
    if checked {
        for e in m.entries.iter_mut() {
            if e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty() {
                let len = u32::try_from(e.data.len()).map_err(|_| "entry over 4 GiB")?;
                lens.push(len);
                data.push(std::mem::take(&mut e.data));
            } else {
                lens.push(0);
            }
        }
        if data.is_empty() {
            lens.clear();
        }
    }
    let pb = m.write_to_bytes().map_err(|e| e.to_string())?;
    let pb_len = u32::try_from(pb.len()).map_err(|_| "message over 4 GiB")?;
    let mut head =
        Vec::with_capacity(FRAME_HEADER_BYTES + BODY_FIXED_BYTES + pb.len() + 4 * lens.len());
    head.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    head.extend_from_slice(&group.to_be_bytes());
    head.push(if checked {
        MODE_PAYLOAD_CHECKED
    } else {
        MODE_COVERED
    });
    head.extend_from_slice(&pb_len.to_be_bytes());
    head.extend_from_slice(&pb);
    head.extend_from_slice(&(lens.len() as u32).to_be_bytes());
    for l in &lens {
        head.extend_from_slice(&l.to_be_bytes());
    }
    let crc = crc32c::crc32c(&head[FRAME_HEADER_BYTES..]);
    let mut frame = Frame { head, data };
    // Bounded by MAX_FRAME_BYTES by the caller; saturated here so that an oversized frame is
    // refused there rather than wrapped.
    let len = u32::try_from(frame.body_len()).unwrap_or(u32::MAX);
    frame.head[..4].copy_from_slice(&len.to_be_bytes());
    frame.head[4..8].copy_from_slice(&crc.to_be_bytes());
    Ok(frame)
}

/// The bytes of one frame carrying `m` for `group`, as `Transport::send` writes it (for tests
/// and tools that speak the protocol).
pub fn frame_bytes(group: u64, m: Message, checked: bool) -> Result<Vec<u8>, String> {
    let f = encode_frame(group, m, checked)?;
    let mut out = f.head;
    for d in f.data {
        out.extend_from_slice(&d);
    }
    Ok(out)
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Checks and decodes one whole frame (header included). Returns the group, the message (entry
/// data carried outside the protobuf put back, as slices of `frame`) and the indexes of the
/// entries whose data travelled outside the CRC.
fn decode_frame(frame: Bytes) -> Result<(u64, Message, Vec<usize>), codec::Malformed> {
    use codec::Malformed;
    let crc = be_u32(&frame, 4).ok_or(Malformed("short frame"))?;
    let body = frame.slice(FRAME_HEADER_BYTES..);
    if body.len() < BODY_FIXED_BYTES {
        return Err(Malformed("short frame"));
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&body[..GROUP_ID_BYTES]);
    let group = u64::from_be_bytes(g);
    let mode = body[GROUP_ID_BYTES];
    let pb_start = GROUP_ID_BYTES + 1 + 4;
    let pb_len = be_u32(&body, GROUP_ID_BYTES + 1).ok_or(Malformed("short frame"))? as usize;
    let pb_end = pb_start
        .checked_add(pb_len)
        .filter(|e| e + 4 <= body.len())
        .ok_or(Malformed("protobuf length past the frame"))?;
    let n = be_u32(&body, pb_end).ok_or(Malformed("short frame"))? as usize;
    let lens_start = pb_end + 4;
    if n > (body.len() - lens_start) / 4 {
        return Err(Malformed("entry count past the frame"));
    }
    let data_start = lens_start + 4 * n;
    let mut data_total = 0usize;
    for i in 0..n {
        let l = be_u32(&body, lens_start + 4 * i).ok_or(Malformed("short frame"))? as usize;
        data_total = data_total
            .checked_add(l)
            .ok_or(Malformed("data lengths overflow"))?;
    }
    if data_total != body.len() - data_start {
        return Err(Malformed("data lengths do not match the frame"));
    }
    let computed = match mode {
        MODE_COVERED if n == 0 => crc32c::crc32c(&body),
        MODE_PAYLOAD_CHECKED => crc32c::crc32c(&body[..data_start]),
        _ => return Err(Malformed("unknown frame mode")),
    };
    if computed != crc {
        return Err(Malformed("frame checksum mismatch"));
    }
    let pb = &body[pb_start..pb_end];
    codec::check_message(pb)?;
    let mut msg = Message::parse_from_carllerche_bytes(&body.slice(pb_start..pb_end))
        .map_err(|_| Malformed("raft message did not decode"))?;
    let mut outside = Vec::new();
    if n > 0 {
        if msg.entries.len() != n {
            return Err(Malformed("data lengths do not match the entries"));
        }
        let mut at = data_start;
        for (i, e) in msg.entries.iter_mut().enumerate() {
            let l = be_u32(&body, lens_start + 4 * i).ok_or(Malformed("short frame"))? as usize;
            if l == 0 {
                continue;
            }
            if e.get_entry_type() != EntryType::EntryNormal || !e.data.is_empty() {
                return Err(Malformed(
                    "data outside the protobuf for an entry that has its own",
                ));
            }
            e.data = body.slice(at..at + l);
            at += l;
            outside.push(i);
        }
    }
    Ok((group, msg, outside))
}

/// The group id of a whole frame (`None` if it is too short to hold one).
fn frame_group(frame: &[u8]) -> Option<u64> {
    let g = frame.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + GROUP_ID_BYTES)?;
    Some(u64::from_be_bytes(g.try_into().ok()?))
}

/// Hands a checked message to its group. Entry data that travelled outside the frame CRC
/// (`outside`) passes the group's payload check first: a failure closes the connection
/// (`Err`); a group with no check here cannot vouch for it, so the message is dropped.
fn deliver(inner: &Inner, group: u64, msg: Message, outside: &[usize]) -> io::Result<()> {
    let mut stats = inner.stats.borrow_mut();
    stats.messages_received += 1;
    let known_peer = inner.peers.contains_key(&msg.from);
    if inner.isolated.get() || msg.to != inner.config.node_id || !known_peer {
        stats.messages_dropped += 1;
        return Ok(());
    }
    let groups = inner.groups.borrow();
    let Some(g) = groups.get(&group) else {
        stats.messages_dropped += 1;
        return Ok(());
    };
    if !outside.is_empty() {
        let Some(check) = g.check else {
            stats.messages_dropped += 1;
            return Ok(());
        };
        for &i in outside {
            if let Err(what) = check(&msg.entries[i].data) {
                stats.payloads_refused += 1;
                return Err(bad(&format!(
                    "group {group}: entry {} refused: {what}",
                    msg.entries[i].index
                )));
            }
        }
    }
    if g.inbox.try_send(msg).is_err() {
        stats.messages_dropped += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{Entry, MessageType};

    fn append_of(datas: &[&[u8]]) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = 1;
        m.to = 2;
        let entries: Vec<Entry> = datas
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut e = Entry::default();
                e.index = i as u64 + 1;
                e.data = Bytes::copy_from_slice(d);
                e
            })
            .collect();
        m.set_entries(entries.into());
        m
    }

    #[test]
    fn entry_data_travels_outside_the_protobuf_and_comes_back_as_slices_of_the_frame() {
        let big = vec![7u8; 3 * SHARED_WRITE_MIN_BYTES];
        let m = append_of(&[b"small", b"", &big]);
        let bytes = Bytes::from(frame_bytes(5, m.clone(), true).unwrap());
        let (group, decoded, outside) = decode_frame(bytes.clone()).unwrap();
        assert_eq!(group, 5);
        assert_eq!(decoded, m);
        assert_eq!(outside, vec![0, 2]);
        // The data is the frame's own bytes, not a copy.
        let at = decoded.entries[2].data.as_ptr() as usize;
        let frame = bytes.as_ptr() as usize;
        assert!(at >= frame && at + big.len() <= frame + bytes.len());
        // Unchecked groups: everything inside the protobuf and under the CRC.
        let (_, plain, outside) =
            decode_frame(Bytes::from(frame_bytes(5, m.clone(), false).unwrap())).unwrap();
        assert_eq!(plain, m);
        assert!(outside.is_empty());
    }

    #[test]
    fn the_crc_covers_the_data_unless_the_group_checks_it() {
        let m = append_of(&[b"abc"]);
        let mut covered = frame_bytes(5, m.clone(), false).unwrap();
        let end = covered.len() - 5; // inside the protobuf's entry
        covered[end] ^= 1;
        assert_eq!(
            decode_frame(Bytes::from(covered)).unwrap_err(),
            codec::Malformed("frame checksum mismatch")
        );
        // Payload-checked: a flipped data bit passes the frame CRC; the group's check is what
        // refuses it (see `deliver`).
        let mut checked = frame_bytes(5, m, true).unwrap();
        let end = checked.len() - 1;
        checked[end] ^= 1;
        let (_, decoded, outside) = decode_frame(Bytes::from(checked)).unwrap();
        assert_eq!(&decoded.entries[0].data[..], b"abb");
        assert_eq!(outside, vec![0]);
    }

    #[test]
    fn truncated_and_oversized_frames_are_refused_without_panicking() {
        let m = append_of(&[b"hello", b"world"]);
        let good = frame_bytes(5, m, true).unwrap();
        for cut in 0..good.len() {
            assert!(
                decode_frame(Bytes::copy_from_slice(&good[..cut])).is_err(),
                "cut {cut}"
            );
        }
        // Declared lengths past the frame: protobuf length, entry count, one data length. The
        // CRC is made right each time, so the lengths themselves are what is refused.
        let pb_len_at = FRAME_HEADER_BYTES + GROUP_ID_BYTES + 1;
        let pb_len = be_u32(&good, pb_len_at).unwrap() as usize;
        let n_at = pb_len_at + 4 + pb_len;
        for (at, v) in [
            (pb_len_at, u32::MAX),
            (n_at, u32::MAX),
            (n_at, 1),
            (n_at + 4, u32::MAX),
            (n_at + 4, 0),
        ] {
            let mut bad = good.clone();
            bad[at..at + 4].copy_from_slice(&v.to_be_bytes());
            let lens_end = (n_at + 4 + 8).min(bad.len());
            let crc = crc32c::crc32c(&bad[FRAME_HEADER_BYTES..lens_end]);
            bad[4..8].copy_from_slice(&crc.to_be_bytes());
            assert!(decode_frame(Bytes::from(bad)).is_err(), "{at}: {v}");
        }
    }
}
