//! `sluice consume TOPIC`: prints records with a `--format` template. Reads every partition (or
//! one) from `--offset`, the beginning, or the end; stops after `-n` records or, with `--exit`,
//! once every partition is read to its end.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::Args;
use futures_lite::future::block_on;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{BrokerId, FetchRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use sluice_client::check;

use super::{
    connect, leader_moved, topic, Client, Leaders, LEADER_RETRY_BACKOFF, LEADER_RETRY_MAX,
};
use crate::protocol::batch;
use crate::protocol::compression::{self, DECOMPRESSED_BATCH_BYTES_MAX};

#[derive(Args, Debug)]
pub struct ConsumeArgs {
    pub topic: String,
    #[arg(long, default_value = "127.0.0.1:9092", env = "SLUICE_BROKERS")]
    pub brokers: String,
    /// Start at the earliest offset (default: only new records).
    #[arg(long)]
    pub from_beginning: bool,
    /// Start at this offset (with --partition, or in every partition).
    #[arg(long)]
    pub offset: Option<i64>,
    /// Only this partition.
    #[arg(short = 'p', long)]
    pub partition: Option<i32>,
    /// Stop after N records.
    #[arg(short = 'n', long)]
    pub num: Option<u64>,
    /// Stop once every partition has been read to its end.
    #[arg(short = 'e', long)]
    pub exit: bool,
    /// Output template: %t topic, %p partition, %o offset, %k key, %v value, %d timestamp (ms),
    /// %h headers, \n newline, \t tab.
    #[arg(short = 'f', long, default_value = "%v\\n")]
    pub format: String,
    /// Consumer group: join it, consume its assigned partitions and commit offsets.
    #[arg(short = 'g', long)]
    pub group: Option<String>,
}

pub struct Formatted<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: String,
}

pub fn format_record(template: &str, r: &Formatted<'_>, out: &mut Vec<u8>) {
    let mut chars = template.chars().peekable();
    while let Some(ch) = chars.next() {
        match (ch, chars.peek().copied()) {
            ('%', Some(x)) => {
                chars.next();
                match x {
                    't' => out.extend_from_slice(r.topic.as_bytes()),
                    'p' => out.extend_from_slice(r.partition.to_string().as_bytes()),
                    'o' => out.extend_from_slice(r.offset.to_string().as_bytes()),
                    'd' => out.extend_from_slice(r.timestamp.to_string().as_bytes()),
                    'k' => out.extend_from_slice(r.key.unwrap_or(b"")),
                    'v' => out.extend_from_slice(r.value.unwrap_or(b"")),
                    'h' => out.extend_from_slice(r.headers.as_bytes()),
                    '%' => out.push(b'%'),
                    other => {
                        out.push(b'%');
                        out.extend_from_slice(other.to_string().as_bytes());
                    }
                }
            }
            ('\\', Some('n')) => {
                chars.next();
                out.push(b'\n');
            }
            ('\\', Some('t')) => {
                chars.next();
                out.push(b'\t');
            }
            (c, _) => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
}

/// Fetches from `positions` (partition → next offset) once from one broker, printing records.
pub fn fetch_once(
    c: &mut Client,
    topic: &str,
    positions: &mut BTreeMap<i32, i64>,
    format: &str,
    remaining: Option<u64>,
    max_wait_ms: i32,
) -> Result<Fetched> {
    let req = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(max_wait_ms)
        .with_min_bytes(1)
        .with_max_bytes(50 * 1024 * 1024)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(
                positions
                    .iter()
                    .map(|(p, o)| {
                        FetchPartition::default()
                            .with_partition(*p)
                            .with_fetch_offset(*o)
                            .with_partition_max_bytes(1 << 20)
                    })
                    .collect(),
            )]);
    // Versions up to 12 address topics by name.
    let v = c.versions().pick_in::<FetchRequest>(4, 12)?;
    let resp = block_on(c.call_at(&req, v))?;
    check(resp.error_code, "fetch", None)?;
    let mut printed = 0u64;
    let mut hws = BTreeMap::new();
    let mut moved = Vec::new();
    let stdout = std::io::stdout();
    let mut out = Vec::new();
    for t in &resp.responses {
        for p in &t.partitions {
            if leader_moved(p.error_code) {
                moved.push(p.partition_index);
                continue;
            }
            check(
                p.error_code,
                &format!("fetch {topic}-{}", p.partition_index),
                None,
            )?;
            hws.insert(p.partition_index, p.high_watermark);
            let Some(mut records) = p.records.clone() else {
                continue;
            };
            let start = positions[&p.partition_index];
            while !records.is_empty() {
                match batch::batch_size(&records) {
                    // A partial batch at the end of the response (the broker cuts at the limit).
                    Some(size) if size > records.len() => break,
                    None if records.len() < batch::LOG_OVERHEAD_BYTES => break,
                    _ => {}
                }
                let recs = compression::decode_batch(&mut records, DECOMPRESSED_BATCH_BYTES_MAX)
                    .with_context(|| {
                        format!(
                            "fetched batch of {topic}-{} does not decode",
                            p.partition_index
                        )
                    })?;
                for r in recs {
                    if r.offset < start {
                        continue;
                    }
                    if remaining.map(|n| printed >= n).unwrap_or(false) {
                        break;
                    }
                    let headers = r
                        .headers
                        .iter()
                        .map(|(k, v)| {
                            format!(
                                "{}={}",
                                String::from_utf8_lossy(k),
                                v.as_ref()
                                    .map(|v| String::from_utf8_lossy(v).into_owned())
                                    .unwrap_or_default()
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(",");
                    format_record(
                        format,
                        &Formatted {
                            topic,
                            partition: p.partition_index,
                            offset: r.offset,
                            timestamp: r.timestamp_ms,
                            key: r.key.as_deref(),
                            value: r.value.as_deref(),
                            headers,
                        },
                        &mut out,
                    );
                    positions.insert(p.partition_index, r.offset + 1);
                    printed += 1;
                }
            }
        }
    }
    stdout.lock().write_all(&out)?;
    stdout.lock().flush()?;
    Ok(Fetched {
        printed,
        hws,
        moved,
    })
}

/// What one fetch did.
pub struct Fetched {
    /// Records printed.
    pub printed: u64,
    /// The high watermark of each partition answered.
    pub hws: BTreeMap<i32, i64>,
    /// Partitions whose leader moved (ask Metadata again).
    pub moved: Vec<i32>,
}

/// Fetches `positions` once from each partition's leader, printing records: the records
/// printed and the high watermarks seen. A partition whose leader moved or whose leader's
/// connection failed is skipped this time, and Metadata asked again.
pub fn fetch_routed(
    leaders: &mut Leaders,
    topic: &str,
    positions: &mut BTreeMap<i32, i64>,
    format: &str,
    remaining: Option<u64>,
    max_wait_ms: i32,
) -> Result<(u64, BTreeMap<i32, i64>)> {
    let parts: Vec<i32> = positions.keys().copied().collect();
    let routes = leaders.by_leader(&parts);
    // With several leaders each waits less, so one idle leader does not hold up the others.
    let wait = if routes.len() > 1 {
        max_wait_ms.min(100)
    } else {
        max_wait_ms
    };
    let (mut printed, mut hws, mut refresh) = (0u64, BTreeMap::new(), false);
    for (node, ps) in routes {
        let Some(node) = node else {
            refresh = true;
            continue;
        };
        let mut mine: BTreeMap<i32, i64> = ps.iter().map(|p| (*p, positions[p])).collect();
        let left = remaining.map(|n| n.saturating_sub(printed));
        let Ok(c) = leaders.conn(node) else {
            // The leader cannot be reached (it may have just failed): ask who leads now.
            refresh = true;
            continue;
        };
        match fetch_once(c, topic, &mut mine, format, left, wait) {
            Ok(f) => {
                printed += f.printed;
                hws.extend(f.hws);
                refresh |= !f.moved.is_empty();
                positions.extend(mine);
            }
            Err(e) if e.downcast_ref::<std::io::Error>().is_some() => {
                leaders.drop_conn(node);
                refresh = true;
            }
            Err(e) => return Err(e),
        }
        if remaining.is_some_and(|n| printed >= n) {
            break;
        }
    }
    if refresh {
        std::thread::sleep(LEADER_RETRY_BACKOFF);
        leaders.refresh(false)?;
    }
    Ok((printed, hws))
}

pub fn run(a: ConsumeArgs) -> Result<()> {
    let mut c = connect(&a.brokers)?;
    if let Some(group) = a.group.clone() {
        return consume_group(&mut c, &a, &group);
    }
    let all: Vec<i32> = topic::partitions(&mut c, &a.topic)?
        .into_iter()
        .map(|p| p.0)
        .collect();
    let parts: Vec<i32> = match a.partition {
        Some(p) if all.contains(&p) => vec![p],
        Some(p) => bail!(
            "partition {p} does not exist (topic {} has {})",
            a.topic,
            all.len()
        ),
        None => all,
    };
    let mut positions = BTreeMap::new();
    let start_ts = if a.from_beginning { -2 } else { -1 };
    for (p, err, off) in topic::offsets(&mut c, &a.topic, &parts, start_ts)? {
        check(err, &format!("offsets of {}-{p}", a.topic), None)?;
        positions.insert(p, a.offset.unwrap_or(off));
    }
    let mut leaders = Leaders::new(c, &a.topic, false)?;
    consume_loop(
        &mut leaders,
        &a.topic,
        &mut positions,
        &a.format,
        a.num,
        a.exit,
    )
}

pub fn consume_loop(
    leaders: &mut Leaders,
    topic: &str,
    positions: &mut BTreeMap<i32, i64>,
    format: &str,
    num: Option<u64>,
    exit_at_end: bool,
) -> Result<()> {
    let mut total = 0u64;
    loop {
        let remaining = num.map(|n| n - total);
        let (n, hws) = fetch_routed(
            leaders,
            topic,
            positions,
            format,
            remaining,
            if exit_at_end { 100 } else { 500 },
        )?;
        total += n;
        if num.map(|x| total >= x).unwrap_or(false) {
            return Ok(());
        }
        if exit_at_end
            && positions
                .iter()
                .all(|(p, o)| hws.get(p).map(|hw| o >= hw).unwrap_or(true))
        {
            return Ok(());
        }
    }
}

/// Coordinator errors after which a client asks FindCoordinator again (the group's
/// `__consumer_offsets` partition is being created, elected or loaded).
const RETRIABLE_COORDINATOR_ERRORS: [i16; 3] = [
    14, // COORDINATOR_LOAD_IN_PROGRESS
    15, // COORDINATOR_NOT_AVAILABLE
    16, // NOT_COORDINATOR
];

/// The `host:port` of `group`'s coordinator, asked again while it is being created, elected
/// or loaded, for up to [`LEADER_RETRY_MAX`].
fn find_coordinator(boot: &mut Client, group: &str) -> Result<String> {
    let deadline = std::time::Instant::now() + LEADER_RETRY_MAX;
    loop {
        let (code, coordinator) = block_on(sluice_client::group::find_coordinator(boot, group))?;
        if !RETRIABLE_COORDINATOR_ERRORS.contains(&code) || std::time::Instant::now() >= deadline {
            check(code, &format!("coordinator of group {group}"), None)?;
            return Ok(coordinator);
        }
        std::thread::sleep(LEADER_RETRY_BACKOFF);
    }
}

/// `--group`: consume the partitions the group assigns to us, resuming from committed offsets
/// (or the beginning/end when none), committing after every fetch that printed records.
fn consume_group(boot: &mut Client, a: &ConsumeArgs, group: &str) -> Result<()> {
    use super::group::{committed, Member};
    topic::partitions(boot, &a.topic)?;
    // The group's requests go to its coordinator, fetches to each partition's leader.
    let c = &mut connect(&find_coordinator(boot, group)?)?;
    let mut leaders = Leaders::new(connect(&a.brokers)?, &a.topic, false)?;
    let mut member = Member::join(c, group, &a.topic)?;
    let mut total = 0u64;
    let result = (|| -> Result<()> {
        'generation: loop {
            let mut positions = BTreeMap::new();
            if !member.assigned.is_empty() {
                let tps = vec![(a.topic.clone(), member.assigned.clone())];
                let done = committed(c, group, Some(tps))?;
                let fallback = topic::offsets(
                    c,
                    &a.topic,
                    &member.assigned,
                    if a.from_beginning { -2 } else { -1 },
                )?;
                for p in &member.assigned {
                    let o = done
                        .get(&(a.topic.clone(), *p))
                        .copied()
                        .filter(|o| *o >= 0);
                    let f = fallback
                        .iter()
                        .find(|x| x.0 == *p)
                        .map(|x| x.2)
                        .unwrap_or(0);
                    positions.insert(*p, o.unwrap_or(f));
                }
            }
            loop {
                if member.heartbeat_due(c)? {
                    member.rejoin(c)?;
                    continue 'generation;
                }
                if positions.is_empty() {
                    if a.exit {
                        return Ok(());
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    continue;
                }
                let remaining = a.num.map(|n| n - total);
                let (n, hws) = fetch_routed(
                    &mut leaders,
                    &a.topic,
                    &mut positions,
                    &a.format,
                    remaining,
                    if a.exit { 100 } else { 500 },
                )?;
                total += n;
                if n > 0 && member.commit(c, &positions)? {
                    member.rejoin(c)?;
                    continue 'generation;
                }
                if a.num.map(|x| total >= x).unwrap_or(false) {
                    return Ok(());
                }
                if a.exit
                    && positions
                        .iter()
                        .all(|(p, o)| hws.get(p).map(|hw| o >= hw).unwrap_or(true))
                {
                    return Ok(());
                }
            }
        }
    })();
    member.leave(c);
    result
}
