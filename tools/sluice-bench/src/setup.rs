//! Set-up glue over `sluice-client`: connections on glommio TCP, and the topic a run uses
//! (created if missing, then waited for until every partition has a leader).

use anyhow::{anyhow, bail, Context, Result};
use glommio::net::TcpStream;
use sluice_client::admin::{self, NewTopic};
use sluice_client::error::{code, kafka_code};
use sluice_client::Connection;
use std::time::{Duration, Instant};

/// The client id in every request header.
pub const CLIENT_ID: &str = "sluice-bench";

/// How long a new or leaderless topic may take to get a leader for every partition.
const TOPIC_READY_WAIT_MAX: Duration = Duration::from_secs(15);

/// One connection to one broker, after ApiVersions.
pub type Conn = Connection<TcpStream>;

/// Connects (bounded by `timeout`, the handshake too), sets TCP_NODELAY, negotiates versions.
pub async fn connect(addr: &str, timeout: Duration) -> Result<Conn> {
    let sa = *sluice_client::conn::resolve(addr)?
        .first()
        .ok_or_else(|| anyhow!("broker address {addr} resolves to nothing"))?;
    let stream = TcpStream::connect_timeout(sa, timeout)
        .await
        .map_err(|e| anyhow!("cannot connect to broker {addr}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| anyhow!("TCP_NODELAY: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| anyhow!("read timeout: {e}"))?;
    let mut c = Connection::handshake(stream, addr, CLIENT_ID)
        .await
        .with_context(|| format!("ApiVersions with {addr}"))?;
    // Fetches wait and acks queue behind a full window: no read timeout after the handshake.
    c.stream_mut()
        .set_read_timeout(None)
        .map_err(|e| anyhow!("read timeout: {e}"))?;
    Ok(c)
}

/// Connects to the first reachable bootstrap broker.
pub async fn bootstrap(brokers: &str, timeout: Duration) -> Result<Conn> {
    sluice_client::connect_first(brokers, |b| async move { connect(&b, timeout).await }).await
}

/// Where one partition lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub index: i32,
    pub leader: String,
}

/// What a run needs to know about its topic.
#[derive(Debug, Clone)]
pub struct TopicInfo {
    pub name: String,
    /// Nil when the broker does not report topic ids (then name-based API versions are used).
    pub id: uuid::Uuid,
    pub partitions: Vec<PartitionInfo>,
}

/// Reads the topic's metadata; creates it with `create = Some((partitions, rf))` if missing.
/// Waits (up to [`TOPIC_READY_WAIT_MAX`]) until every partition has a leader.
pub async fn topic_info(
    conn: &mut Conn,
    topic: &str,
    create: Option<(i32, i16)>,
) -> Result<TopicInfo> {
    let deadline = Instant::now() + TOPIC_READY_WAIT_MAX;
    let mut created = false;
    loop {
        let t = admin::topic_metadata(conn, topic, false).await?;
        match t.error_code {
            code::NONE => {
                let ready = t
                    .partitions
                    .iter()
                    .all(|p| p.error_code == code::NONE && p.leader.is_some());
                if ready && !t.partitions.is_empty() {
                    return Ok(TopicInfo {
                        name: t.name,
                        id: t.id,
                        partitions: t
                            .partitions
                            .into_iter()
                            .map(|p| PartitionInfo {
                                index: p.index,
                                leader: p.leader.unwrap_or_default(),
                            })
                            .collect(),
                    });
                }
            }
            code::UNKNOWN_TOPIC_OR_PARTITION if !created => match create {
                Some((partitions, rf)) => {
                    let new = NewTopic {
                        name: topic.to_string(),
                        partitions,
                        replication_factor: rf,
                        ..NewTopic::default()
                    };
                    match admin::create_topic(conn, &new).await {
                        Ok(_) => {}
                        Err(e) if kafka_code(&e) == Some(code::TOPIC_ALREADY_EXISTS) => {}
                        Err(e) => return Err(e),
                    }
                    created = true;
                    continue;
                }
                None => bail!("topic {topic} does not exist"),
            },
            code::UNKNOWN_TOPIC_OR_PARTITION | code::LEADER_NOT_AVAILABLE => {}
            e => sluice_client::check(e, &format!("metadata for topic {topic}"), None)?,
        }
        if Instant::now() > deadline {
            bail!(
                "topic {topic} has no leader for every partition after {} s",
                TOPIC_READY_WAIT_MAX.as_secs()
            );
        }
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
}
