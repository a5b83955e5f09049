//! `sluice group list|describe|delete|reset-offsets`, and the small classic-protocol group member
//! used by `sluice consume --group`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::Subcommand;
use futures_lite::future::block_on;
use kafka_protocol::messages::describe_groups_response::DescribedGroup;
use sluice_client::error::code;
use sluice_client::group::{self as kgroup, range_assign, JoinTimeouts};
use sluice_client::{admin, check, error_name};

use super::{connect, topic, Client};

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// List consumer groups and their states.
    List,
    /// Members, assignments, committed offsets and lag of a group.
    Describe { group: String },
    /// Delete an empty group and its committed offsets.
    Delete { group: String },
    /// Move an empty group's committed offsets of a topic.
    ResetOffsets {
        group: String,
        #[arg(long)]
        topic: String,
        #[arg(long, group = "to")]
        to_earliest: bool,
        #[arg(long, group = "to")]
        to_latest: bool,
        #[arg(long, group = "to")]
        to_offset: Option<i64>,
        /// RFC 3339 time (2026-01-31T12:00:00Z) or milliseconds since the epoch.
        #[arg(long, group = "to")]
        to_datetime: Option<String>,
    },
}

pub fn describe_group(c: &mut Client, group: &str) -> Result<DescribedGroup> {
    block_on(admin::describe_group(c, group))
}

/// Committed offsets of a group for all topics: (topic, partition) → offset.
pub fn committed(
    c: &mut Client,
    group: &str,
    topics: Option<Vec<(String, Vec<i32>)>>,
) -> Result<BTreeMap<(String, i32), i64>> {
    block_on(admin::committed(c, group, topics))
}

/// Topic → partitions of a consumer-protocol assignment.
pub fn decode_assignment(mut b: Bytes) -> Vec<(String, Vec<i32>)> {
    let mut out = Vec::new();
    if b.remaining() < 6 {
        return out;
    }
    let _v = b.get_i16();
    let n = b.get_i32();
    for _ in 0..n.max(0) {
        if b.remaining() < 2 {
            break;
        }
        let l = b.get_i16().max(0) as usize;
        if b.remaining() < l + 4 {
            break;
        }
        let t = String::from_utf8_lossy(&b.split_to(l)).into_owned();
        let k = b.get_i32();
        let mut ps = Vec::new();
        for _ in 0..k.max(0) {
            if b.remaining() < 4 {
                break;
            }
            ps.push(b.get_i32());
        }
        out.push((t, ps));
    }
    out
}

pub fn encode_assignment(a: &[(String, Vec<i32>)]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(0);
    b.put_i32(a.len() as i32);
    for (t, ps) in a {
        b.put_i16(t.len() as i16);
        b.put_slice(t.as_bytes());
        b.put_i32(ps.len() as i32);
        for p in ps {
            b.put_i32(*p);
        }
    }
    b.put_i32(-1); // user data: null
    b.freeze()
}

pub fn encode_subscription(topics: &[String]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(0);
    b.put_i32(topics.len() as i32);
    for t in topics {
        b.put_i16(t.len() as i16);
        b.put_slice(t.as_bytes());
    }
    b.put_i32(-1); // user data: null
    b.freeze()
}

fn parse_datetime(v: &str) -> Result<i64> {
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|d| d.timestamp_millis())
        .map_err(|e| anyhow!("invalid --to-datetime '{v}': {e} (expected RFC 3339 like 2026-01-31T12:00:00Z, or epoch ms)"))
}

pub fn run(cmd: GroupCommand, brokers: &str) -> Result<()> {
    let mut c = connect(brokers)?;
    match cmd {
        GroupCommand::List => {
            let groups = block_on(admin::list_groups(&mut c))?;
            println!("{:<40} {:<20} STATE", "GROUP", "PROTOCOL-TYPE");
            for g in groups {
                println!(
                    "{:<40} {:<20} {}",
                    g.group_id.as_str(),
                    g.protocol_type.as_str(),
                    g.group_state.as_str()
                );
            }
        }
        GroupCommand::Describe { group } => {
            let g = describe_group(&mut c, &group)?;
            if g.group_state.as_str() == "Dead" {
                bail!("group {group} does not exist");
            }
            println!("GROUP     {group}");
            println!("STATE     {}", g.group_state.as_str());
            println!(
                "PROTOCOL  {} {}",
                g.protocol_type.as_str(),
                g.protocol_data.as_str()
            );
            println!("MEMBERS   {}", g.members.len());
            let mut owner: BTreeMap<(String, i32), String> = BTreeMap::new();
            for m in &g.members {
                let a = decode_assignment(m.member_assignment.clone());
                let desc: Vec<String> = a.iter().map(|(t, ps)| format!("{t}{ps:?}")).collect();
                println!(
                    "  {} client={} host={} assigned={}",
                    m.member_id.as_str(),
                    m.client_id.as_str(),
                    m.client_host.as_str(),
                    desc.join(" ")
                );
                for (t, ps) in a {
                    for p in ps {
                        owner.insert((t.clone(), p), m.member_id.to_string());
                    }
                }
            }
            let offsets = committed(&mut c, &group, None)?;
            let mut keys: Vec<(String, i32)> = offsets.keys().cloned().collect();
            for k in owner.keys() {
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
            keys.sort();
            println!();
            println!(
                "{:<30} {:>9} {:>16} {:>15} {:>8}  MEMBER",
                "TOPIC", "PARTITION", "CURRENT-OFFSET", "LOG-END-OFFSET", "LAG"
            );
            for (t, p) in keys {
                let cur = offsets.get(&(t.clone(), p)).copied().unwrap_or(-1);
                let end = topic::offsets(&mut c, &t, &[p], -1)?
                    .first()
                    .map(|x| x.2)
                    .unwrap_or(-1);
                let lag = if cur >= 0 && end >= 0 {
                    (end - cur).to_string()
                } else {
                    "-".into()
                };
                let cur_s = if cur >= 0 {
                    cur.to_string()
                } else {
                    "-".into()
                };
                let m = owner
                    .get(&(t.clone(), p))
                    .cloned()
                    .unwrap_or_else(|| "-".into());
                println!("{t:<30} {p:>9} {cur_s:>16} {end:>15} {lag:>8}  {m}");
            }
        }
        GroupCommand::Delete { group } => {
            block_on(admin::delete_group(&mut c, &group))?;
            println!("deleted group {group}");
        }
        GroupCommand::ResetOffsets {
            group,
            topic: t,
            to_earliest,
            to_latest,
            to_offset,
            to_datetime,
        } => {
            let g = describe_group(&mut c, &group)?;
            if !g.members.is_empty() {
                bail!("group {group} has {} active member(s) (state {}): stop its consumers before resetting offsets", g.members.len(), g.group_state.as_str());
            }
            let parts: Vec<i32> = topic::partitions(&mut c, &t)?
                .into_iter()
                .map(|p| p.0)
                .collect();
            let targets: Vec<(i32, i64)> = if let Some(o) = to_offset {
                if o < 0 {
                    bail!("invalid --to-offset {o}: must be >= 0");
                }
                parts.iter().map(|p| (*p, o)).collect()
            } else {
                let ts = if to_earliest {
                    -2
                } else if to_latest {
                    -1
                } else if let Some(d) = &to_datetime {
                    parse_datetime(d)?
                } else {
                    bail!("give one of --to-earliest, --to-latest, --to-offset N, --to-datetime T");
                };
                let mut v = Vec::new();
                let latest = topic::offsets(&mut c, &t, &parts, -1)?;
                for (p, e, o) in topic::offsets(&mut c, &t, &parts, ts)? {
                    check(e, &format!("offsets of {t}-{p}"), None)?;
                    // No record at or after the time: the end of the partition, as Kafka does.
                    let o = if o < 0 {
                        latest.iter().find(|x| x.0 == p).map(|x| x.2).unwrap_or(0)
                    } else {
                        o
                    };
                    v.push((p, o));
                }
                v
            };
            let codes = block_on(kgroup::commit(
                &mut c,
                &group,
                -1,
                "",
                &t,
                targets.iter().copied(),
            ))?;
            for (p, e) in codes {
                check(e, &format!("reset {t}-{p} for group {group}"), None)?;
            }
            println!("{:<30} {:>9} {:>12}", "TOPIC", "PARTITION", "NEW-OFFSET");
            for (p, o) in targets {
                println!("{t:<30} {p:>9} {o:>12}");
            }
        }
    }
    Ok(())
}

/// A minimal classic-protocol member for `sluice consume --group`: joins, assigns with the range
/// strategy when it leads, heartbeats between fetches, commits what it printed.
pub struct Member {
    pub group: String,
    pub topic: String,
    pub member_id: String,
    pub generation: i32,
    pub assigned: Vec<i32>,
    last_heartbeat: Instant,
}

const TIMEOUTS: JoinTimeouts = JoinTimeouts {
    session_ms: 10_000,
    rebalance_ms: 30_000,
};
const HEARTBEAT_EVERY: Duration = Duration::from_secs(3);

impl Member {
    pub fn join(c: &mut Client, group: &str, topic: &str) -> Result<Member> {
        let mut m = Member {
            group: group.into(),
            topic: topic.into(),
            member_id: String::new(),
            generation: -1,
            assigned: vec![],
            last_heartbeat: Instant::now(),
        };
        m.rejoin(c)?;
        Ok(m)
    }

    pub fn rejoin(&mut self, c: &mut Client) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if Instant::now() > deadline {
                bail!("could not join group {} within 60 s", self.group);
            }
            let resp = block_on(kgroup::join_group(
                c,
                &self.group,
                &self.member_id,
                TIMEOUTS,
                encode_subscription(std::slice::from_ref(&self.topic)),
            ))?;
            self.member_id = resp.member_id.to_string();
            match resp.error_code {
                code::NONE => {}
                // Join again with the id we were given.
                code::MEMBER_ID_REQUIRED => continue,
                code::UNKNOWN_MEMBER_ID => {
                    self.member_id.clear();
                    continue;
                }
                code::REBALANCE_IN_PROGRESS => continue,
                e => bail!("join group {}: {}", self.group, error_name(e)),
            }
            self.generation = resp.generation_id;
            let assignments = if resp.leader == resp.member_id {
                let parts: Vec<i32> = topic::partitions(c, &self.topic)?
                    .into_iter()
                    .map(|p| p.0)
                    .collect();
                let members: Vec<String> = resp
                    .members
                    .iter()
                    .map(|m| m.member_id.to_string())
                    .collect();
                range_assign(&members, &parts)
                    .into_iter()
                    .map(|(m, ps)| (m, encode_assignment(&[(self.topic.clone(), ps)])))
                    .collect()
            } else {
                vec![]
            };
            let resp = block_on(kgroup::sync_group(
                c,
                &self.group,
                self.generation,
                &self.member_id,
                assignments,
            ))?;
            match resp.error_code {
                code::NONE => {}
                code::REBALANCE_IN_PROGRESS => continue,
                e => bail!("sync group {}: {}", self.group, error_name(e)),
            }
            self.assigned = decode_assignment(resp.assignment)
                .into_iter()
                .filter(|(t, _)| *t == self.topic)
                .flat_map(|(_, ps)| ps)
                .collect();
            self.last_heartbeat = Instant::now();
            return Ok(());
        }
    }

    /// Heartbeats when due; `Ok(true)` when the group is rebalancing and the member must rejoin.
    pub fn heartbeat_due(&mut self, c: &mut Client) -> Result<bool> {
        if self.last_heartbeat.elapsed() < HEARTBEAT_EVERY {
            return Ok(false);
        }
        self.last_heartbeat = Instant::now();
        let e = block_on(kgroup::heartbeat(
            c,
            &self.group,
            self.generation,
            &self.member_id,
        ))?;
        match e {
            code::NONE => Ok(false),
            code::REBALANCE_IN_PROGRESS | code::ILLEGAL_GENERATION => Ok(true),
            code::UNKNOWN_MEMBER_ID => {
                self.member_id.clear();
                Ok(true)
            }
            e => bail!("heartbeat: {}", error_name(e)),
        }
    }

    pub fn commit(&self, c: &mut Client, positions: &BTreeMap<i32, i64>) -> Result<bool> {
        let codes = block_on(kgroup::commit(
            c,
            &self.group,
            self.generation,
            &self.member_id,
            &self.topic,
            positions.iter().map(|(p, o)| (*p, *o)),
        ))?;
        for (p, e) in codes {
            match e {
                code::NONE => {}
                code::REBALANCE_IN_PROGRESS
                | code::ILLEGAL_GENERATION
                | code::UNKNOWN_MEMBER_ID => return Ok(true),
                e => bail!("commit {}-{p}: {}", self.topic, error_name(e)),
            }
        }
        Ok(false)
    }

    pub fn leave(&self, c: &mut Client) {
        let _ = block_on(kgroup::leave_group(c, &self.group, &self.member_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_round_trips() {
        let a = vec![("t".to_string(), vec![0, 3])];
        assert_eq!(decode_assignment(encode_assignment(&a)), a);
    }

    #[test]
    fn huge_counts_in_an_assignment_stop_at_the_bytes_present() {
        let mut b = vec![0u8, 0];
        b.extend_from_slice(&i32::MAX.to_be_bytes());
        b.extend_from_slice(&[0, 1, b't']);
        b.extend_from_slice(&i32::MAX.to_be_bytes());
        b.extend_from_slice(&7i32.to_be_bytes());
        assert_eq!(
            decode_assignment(Bytes::from(b)),
            vec![("t".to_string(), vec![7])]
        );
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]
            #[test]
            fn assignments_round_trip_and_mutations_never_panic(
                a in prop::collection::vec(("[a-z]{0,8}", prop::collection::vec(any::<i32>(), 0..6)), 0..5),
                flip in prop::option::of((any::<prop::sample::Index>(), 1u8..)),
                huge in prop::option::of(any::<prop::sample::Index>()),
                cut in prop::option::of(any::<prop::sample::Index>()),
                garbage in prop::collection::vec(any::<u8>(), 0..100),
            ) {
                let enc = encode_assignment(&a);
                prop_assert_eq!(decode_assignment(enc.clone()), a);
                let mut m = enc.to_vec();
                if let Some((i, x)) = flip {
                    let i = i.index(m.len());
                    m[i] ^= x;
                }
                if let Some(i) = huge {
                    let i = i.index(m.len() - 3);
                    m[i..i + 4].copy_from_slice(&i32::MAX.to_be_bytes());
                }
                if let Some(c) = cut {
                    m.truncate(c.index(m.len()));
                }
                let len = m.len();
                let out = decode_assignment(Bytes::from(m));
                let parts: usize = out.iter().map(|(_, p)| p.len()).sum();
                prop_assert!(parts <= len / 4);
                let _ = decode_assignment(Bytes::from(garbage));
            }
        }
    }
}
