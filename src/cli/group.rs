//! `sluice group list|describe|delete|reset-offsets`, and the small classic-protocol group member
//! used by `sluice consume --group`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::Subcommand;
use kafka_protocol::messages::describe_groups_response::DescribedGroup;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use super::client::{check, error_name, Client};
use super::topic;

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

fn s(x: &str) -> StrBytes {
    StrBytes::from_string(x.to_string())
}

pub fn describe_group(c: &mut Client, group: &str) -> Result<DescribedGroup> {
    let req = DescribeGroupsRequest::default().with_groups(vec![GroupId(s(group))]);
    let resp: DescribeGroupsResponse = c.call(ApiKey::DescribeGroups, (0, 5), &req)?;
    let g = resp
        .groups
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("broker described no group"))?;
    check(
        g.error_code,
        &format!("describe group {group}"),
        g.error_message.as_ref(),
    )?;
    Ok(g)
}

/// Committed offsets of a group for all topics: (topic, partition) → offset.
pub fn committed(
    c: &mut Client,
    group: &str,
    topics: Option<Vec<(String, Vec<i32>)>>,
) -> Result<BTreeMap<(String, i32), i64>> {
    let req = OffsetFetchRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_topics(topics.map(|ts| {
            ts.into_iter()
                .map(|(t, ps)| {
                    OffsetFetchRequestTopic::default()
                        .with_name(TopicName(s(&t)))
                        .with_partition_indexes(ps)
                })
                .collect()
        }));
    let resp: OffsetFetchResponse = c.call(ApiKey::OffsetFetch, (2, 7), &req)?;
    check(resp.error_code, &format!("offsets of group {group}"), None)?;
    let mut out = BTreeMap::new();
    for t in resp.topics {
        for p in t.partitions {
            check(
                p.error_code,
                &format!("offset of {}-{}", t.name.as_str(), p.partition_index),
                None,
            )?;
            out.insert((t.name.to_string(), p.partition_index), p.committed_offset);
        }
    }
    Ok(out)
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
    let mut c = Client::connect(brokers)?;
    match cmd {
        GroupCommand::List => {
            let resp: ListGroupsResponse =
                c.call(ApiKey::ListGroups, (0, 4), &ListGroupsRequest::default())?;
            check(resp.error_code, "list groups", None)?;
            println!("{:<40} {:<20} STATE", "GROUP", "PROTOCOL-TYPE");
            for g in resp.groups {
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
            let resp: DeleteGroupsResponse = c.call(
                ApiKey::DeleteGroups,
                (0, 2),
                &DeleteGroupsRequest::default().with_groups_names(vec![GroupId(s(&group))]),
            )?;
            let r = resp
                .results
                .first()
                .ok_or_else(|| anyhow!("broker returned no result"))?;
            check(r.error_code, &format!("cannot delete group {group}"), None)?;
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
            let req = commit_request(&group, -1, "", &t, targets.iter().copied());
            let resp: OffsetCommitResponse = c.call(ApiKey::OffsetCommit, (2, 8), &req)?;
            for tr in &resp.topics {
                for p in &tr.partitions {
                    check(
                        p.error_code,
                        &format!("reset {t}-{} for group {group}", p.partition_index),
                        None,
                    )?;
                }
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

const SESSION_TIMEOUT_MS: i32 = 10_000;
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
            let req = JoinGroupRequest::default()
                .with_group_id(GroupId(s(&self.group)))
                .with_session_timeout_ms(SESSION_TIMEOUT_MS)
                .with_rebalance_timeout_ms(30_000)
                .with_member_id(s(&self.member_id))
                .with_protocol_type(s("consumer"))
                .with_protocols(vec![JoinGroupRequestProtocol::default()
                    .with_name(s("range"))
                    .with_metadata(encode_subscription(&[self.topic.clone()]))]);
            let resp: JoinGroupResponse = c.call(ApiKey::JoinGroup, (4, 5), &req)?;
            self.member_id = resp.member_id.to_string();
            match resp.error_code {
                0 => {}
                79 => continue, // MEMBER_ID_REQUIRED: join again with the id we were given
                25 => {
                    self.member_id.clear();
                    continue;
                }
                27 => continue,
                e => bail!("join group {}: {}", self.group, error_name(e)),
            }
            self.generation = resp.generation_id;
            let assignments = if resp.leader == resp.member_id {
                let parts: Vec<i32> = topic::partitions(c, &self.topic)?
                    .into_iter()
                    .map(|p| p.0)
                    .collect();
                let mut members: Vec<String> = resp
                    .members
                    .iter()
                    .map(|m| m.member_id.to_string())
                    .collect();
                members.sort();
                range_assign(&members, &parts)
                    .into_iter()
                    .map(|(m, ps)| {
                        SyncGroupRequestAssignment::default()
                            .with_member_id(s(&m))
                            .with_assignment(encode_assignment(&[(self.topic.clone(), ps)]))
                    })
                    .collect()
            } else {
                vec![]
            };
            let req = SyncGroupRequest::default()
                .with_group_id(GroupId(s(&self.group)))
                .with_generation_id(self.generation)
                .with_member_id(s(&self.member_id))
                .with_assignments(assignments);
            let resp: SyncGroupResponse = c.call(ApiKey::SyncGroup, (1, 3), &req)?;
            match resp.error_code {
                0 => {}
                27 => continue,
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
        let req = HeartbeatRequest::default()
            .with_group_id(GroupId(s(&self.group)))
            .with_generation_id(self.generation)
            .with_member_id(s(&self.member_id));
        let resp: HeartbeatResponse = c.call(ApiKey::Heartbeat, (0, 4), &req)?;
        match resp.error_code {
            0 => Ok(false),
            27 | 22 => Ok(true),
            25 => {
                self.member_id.clear();
                Ok(true)
            }
            e => bail!("heartbeat: {}", error_name(e)),
        }
    }

    pub fn commit(&self, c: &mut Client, positions: &BTreeMap<i32, i64>) -> Result<bool> {
        let req = commit_request(
            &self.group,
            self.generation,
            &self.member_id,
            &self.topic,
            positions.iter().map(|(p, o)| (*p, *o)),
        );
        let resp: OffsetCommitResponse = c.call(ApiKey::OffsetCommit, (2, 8), &req)?;
        for t in &resp.topics {
            for p in &t.partitions {
                match p.error_code {
                    0 => {}
                    27 | 22 | 25 => return Ok(true),
                    e => bail!(
                        "commit {}-{}: {}",
                        self.topic,
                        p.partition_index,
                        error_name(e)
                    ),
                }
            }
        }
        Ok(false)
    }

    pub fn leave(&self, c: &mut Client) {
        let req = LeaveGroupRequest::default()
            .with_group_id(GroupId(s(&self.group)))
            .with_member_id(s(&self.member_id));
        let _: Result<LeaveGroupResponse> = c.call(ApiKey::LeaveGroup, (0, 2), &req);
    }
}

/// OffsetCommit of `(partition, offset)` pairs of one topic; generation -1 and an empty member id
/// commit for an empty group (reset-offsets).
fn commit_request(
    group: &str,
    generation: i32,
    member_id: &str,
    topic: &str,
    offsets: impl Iterator<Item = (i32, i64)>,
) -> OffsetCommitRequest {
    OffsetCommitRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_generation_id_or_member_epoch(generation)
        .with_member_id(s(member_id))
        .with_topics(vec![OffsetCommitRequestTopic::default()
            .with_name(TopicName(s(topic)))
            .with_partitions(
                offsets
                    .map(|(p, o)| {
                        OffsetCommitRequestPartition::default()
                            .with_partition_index(p)
                            .with_committed_offset(o)
                    })
                    .collect(),
            )])
}

/// Kafka's range assignor for one topic: contiguous ranges, the first members take one extra.
pub fn range_assign(members: &[String], partitions: &[i32]) -> Vec<(String, Vec<i32>)> {
    let n = members.len().max(1);
    let per = partitions.len() / n;
    let extra = partitions.len() % n;
    let mut out = Vec::new();
    let mut at = 0;
    for (i, m) in members.iter().enumerate() {
        let take = per + usize::from(i < extra);
        out.push((m.clone(), partitions[at..at + take].to_vec()));
        at += take;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_assignor_gives_leading_members_the_extra_partitions() {
        let ms = vec!["a".to_string(), "b".to_string()];
        assert_eq!(
            range_assign(&ms, &[0, 1, 2]),
            vec![("a".into(), vec![0, 1]), ("b".into(), vec![2])]
        );
        assert_eq!(
            range_assign(&ms[..1], &[0, 1]),
            vec![("a".into(), vec![0, 1])]
        );
    }

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
