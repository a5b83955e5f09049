//! Share-group (KIP-932) consumer calls: ShareGroupHeartbeat, and ShareFetch / ShareAcknowledge
//! inside a [`ShareSession`] that numbers the session epochs, adds and forgets partitions, and
//! carries acknowledgements (piggy-backed on the next fetch, or sent alone).
//!
//! Fetched batches stay as the broker sent them; [`acquired_in`] walks their headers to pick the
//! offsets a response's `acquired_records` ranges hand to this member (the broker returns whole
//! stored batches, of which only the acquired offsets are delivered).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite};
use kafka_protocol::messages::{
    share_acknowledge_request as ack_req, share_fetch_request as fetch_req, GroupId,
    ShareAcknowledgeRequest, ShareFetchRequest, ShareGroupHeartbeatRequest, TopicName,
};
use sluice_protocol::batch::{self, BatchHeader};
use uuid::Uuid;

use crate::admin::s;
use crate::Connection;

/// Acknowledgement types (KIP-932).
pub const GAP: i8 = 0;
pub const ACCEPT: i8 = 1;
pub const RELEASE: i8 = 2;
pub const REJECT: i8 = 3;

/// Member epoch that leaves the group.
pub const LEAVE_EPOCH: i32 = -1;

/// A share partition: (topic id, partition).
pub type SharePartition = (Uuid, i32);

/// One ShareGroupHeartbeat answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareHeartbeat {
    pub error_code: i16,
    pub error_message: Option<String>,
    pub member_epoch: i32,
    pub heartbeat_interval_ms: i32,
    /// The member's assignment when the broker sent one (it does when it changed).
    pub assignment: Option<Vec<SharePartition>>,
}

/// ShareGroupHeartbeat of `member_id` (client-chosen) at `epoch`: 0 joins, [`LEAVE_EPOCH`]
/// leaves; `topics` subscribes (None: unchanged).
pub async fn heartbeat<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Connection<S>,
    group: &str,
    member_id: &str,
    epoch: i32,
    topics: Option<&[String]>,
) -> Result<ShareHeartbeat> {
    let req = ShareGroupHeartbeatRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_member_id(s(member_id))
        .with_member_epoch(epoch)
        .with_subscribed_topic_names(topics.map(|ts| ts.iter().map(|t| TopicName(s(t))).collect()));
    let v = c.versions().pick_in::<ShareGroupHeartbeatRequest>(1, 1)?;
    let r = c.call_at(&req, v).await.context("ShareGroupHeartbeat")?;
    Ok(ShareHeartbeat {
        error_code: r.error_code,
        error_message: r.error_message.map(|m| m.to_string()),
        member_epoch: r.member_epoch,
        heartbeat_interval_ms: r.heartbeat_interval_ms,
        assignment: r.assignment.map(|a| {
            a.topic_partitions
                .iter()
                .flat_map(|t| t.partitions.iter().map(|&p| (t.topic_id, p)))
                .collect()
        }),
    })
}

/// One acknowledgement: offsets `first..=last`, all of one type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub first: i64,
    pub last: i64,
    pub kind: i8,
}

/// Acknowledgements to send, per share partition, in offset order.
pub type Acks = BTreeMap<SharePartition, Vec<Ack>>;

/// Appends `offset` acknowledged as `kind` to `acks`, extending the last range when it is
/// adjacent and of the same type.
pub fn push_ack(acks: &mut Vec<Ack>, offset: i64, kind: i8) {
    if let Some(a) = acks.last_mut() {
        if a.kind == kind && a.last.checked_add(1) == Some(offset) {
            a.last = offset;
            return;
        }
    }
    acks.push(Ack {
        first: offset,
        last: offset,
        kind,
    });
}

/// Fetch sizes and waits of a ShareFetch.
#[derive(Debug, Clone, Copy)]
pub struct FetchLimits {
    pub max_wait_ms: i32,
    pub min_bytes: i32,
    pub max_bytes: i32,
    pub partition_max_bytes: i32,
    pub max_records: i32,
    pub batch_size: i32,
}

/// A range of offsets acquired by this member, with its delivery count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquired {
    pub first: i64,
    pub last: i64,
    pub delivery_count: i16,
}

/// One partition of a ShareFetch answer.
#[derive(Debug, Clone)]
pub struct FetchedPartition {
    pub partition: SharePartition,
    pub error_code: i16,
    /// The outcome of the acknowledgements this request carried for the partition.
    pub ack_error_code: i16,
    /// Whole stored batches holding the acquired records, as the broker sent them.
    pub records: Bytes,
    pub acquired: Vec<Acquired>,
}

/// A ShareFetch answer.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub error_code: i16,
    pub error_message: Option<String>,
    pub acquisition_lock_timeout_ms: i32,
    pub partitions: Vec<FetchedPartition>,
    /// Outcomes of acknowledgements sent in a ShareAcknowledge before the fetch (those of
    /// partitions the fetch forgot).
    pub acknowledged: Vec<(SharePartition, i16)>,
}

/// Per partition: the outcome of a ShareAcknowledge.
#[derive(Debug, Clone)]
pub struct Acknowledged {
    pub error_code: i16,
    pub error_message: Option<String>,
    pub partitions: Vec<(SharePartition, i16)>,
}

/// A share session with one broker: the member, the next epoch, and the partitions the broker
/// holds in the session. [`ShareSession::want`] sets the partitions to fetch; the next request
/// adds what is new and forgets what is gone.
#[derive(Debug, Clone)]
pub struct ShareSession {
    group: String,
    member_id: String,
    /// Epoch of the next request: 0 opens the session.
    epoch: i32,
    /// Partitions the broker has in the session.
    open: BTreeSet<SharePartition>,
    /// Partitions to fetch.
    wanted: BTreeSet<SharePartition>,
}

impl ShareSession {
    pub fn new(group: &str, member_id: &str) -> ShareSession {
        ShareSession {
            group: group.to_string(),
            member_id: member_id.to_string(),
            epoch: 0,
            open: BTreeSet::new(),
            wanted: BTreeSet::new(),
        }
    }

    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// The epoch the next request carries.
    pub fn epoch(&self) -> i32 {
        self.epoch
    }

    /// Sets the partitions to fetch from the next request on.
    pub fn want(&mut self, partitions: impl IntoIterator<Item = SharePartition>) {
        self.wanted = partitions.into_iter().collect();
    }

    pub fn wanted(&self) -> &BTreeSet<SharePartition> {
        &self.wanted
    }

    /// Starts over with a new session at the next request (after SHARE_SESSION_NOT_FOUND or
    /// INVALID_SHARE_SESSION_EPOCH).
    pub fn reset(&mut self) {
        self.epoch = 0;
        self.open.clear();
    }

    fn advance(&mut self) {
        self.epoch = if self.epoch == i32::MAX {
            1
        } else {
            self.epoch + 1
        };
    }

    /// ShareFetch with `acks` piggy-backed (not allowed when opening: they must wait for an
    /// open session). Names the wanted partitions the session lacks and those acknowledged,
    /// forgets the ones no longer wanted.
    pub async fn fetch<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        c: &mut Connection<S>,
        limits: FetchLimits,
        acks: &Acks,
    ) -> Result<Fetched> {
        if self.epoch == 0 && !acks.is_empty() {
            return Err(anyhow!(
                "acknowledgements cannot open a share session (epoch 0)"
            ));
        }
        // Acknowledgements of partitions this request forgets go first, on their own: a
        // partition is not both named and forgotten in one request, and forgetting releases
        // what the member still holds there.
        let (early, rest): (Acks, Acks) = acks
            .iter()
            .map(|(p, a)| (*p, a.clone()))
            .partition(|(p, _)| self.open.contains(p) && !self.wanted.contains(p));
        let mut acknowledged = vec![];
        if !early.is_empty() {
            let r = self.acknowledge(c, &early).await?;
            acknowledged = early
                .keys()
                .map(|p| {
                    let code = if r.error_code != 0 {
                        r.error_code
                    } else {
                        r.partitions
                            .iter()
                            .find(|(q, _)| q == p)
                            .map(|(_, e)| *e)
                            .unwrap_or(r.error_code)
                    };
                    (*p, code)
                })
                .collect();
        }
        let mut f = self.fetch_at(c, self.epoch, limits, &rest).await?;
        f.acknowledged = acknowledged;
        Ok(f)
    }

    /// Closes the session (epoch -1) after applying `acks`; the broker releases what the member
    /// still holds.
    pub async fn close<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        c: &mut Connection<S>,
        acks: &Acks,
    ) -> Result<Option<Acknowledged>> {
        if self.epoch == 0 {
            return Ok(None); // nothing open
        }
        let r = self.acknowledge_at(c, -1, acks).await?;
        self.reset();
        Ok(Some(r))
    }

    /// ShareAcknowledge of `acks` in the open session.
    pub async fn acknowledge<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        c: &mut Connection<S>,
        acks: &Acks,
    ) -> Result<Acknowledged> {
        if self.epoch == 0 {
            return Err(anyhow!("ShareAcknowledge needs an open share session"));
        }
        let r = self.acknowledge_at(c, self.epoch, acks).await?;
        self.advance();
        Ok(r)
    }

    async fn fetch_at<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        c: &mut Connection<S>,
        epoch: i32,
        l: FetchLimits,
        acks: &Acks,
    ) -> Result<Fetched> {
        let mut named: BTreeMap<SharePartition, Vec<fetch_req::AcknowledgementBatch>> =
            BTreeMap::new();
        for p in self.wanted.difference(&self.open) {
            named.entry(*p).or_default();
        }
        for (p, a) in acks {
            named.entry(*p).or_default().extend(a.iter().map(|a| {
                fetch_req::AcknowledgementBatch::default()
                    .with_first_offset(a.first)
                    .with_last_offset(a.last)
                    .with_acknowledge_types(vec![a.kind])
            }));
        }
        let mut topics: BTreeMap<Uuid, Vec<fetch_req::FetchPartition>> = BTreeMap::new();
        for ((t, p), a) in named {
            topics.entry(t).or_default().push(
                fetch_req::FetchPartition::default()
                    .with_partition_index(p)
                    .with_partition_max_bytes(l.partition_max_bytes)
                    .with_acknowledgement_batches(a),
            );
        }
        let forget: Vec<SharePartition> = self.open.difference(&self.wanted).copied().collect();
        let mut forgotten: BTreeMap<Uuid, Vec<i32>> = BTreeMap::new();
        for (t, p) in &forget {
            forgotten.entry(*t).or_default().push(*p);
        }
        let req = ShareFetchRequest::default()
            .with_group_id(Some(GroupId(s(&self.group))))
            .with_member_id(Some(s(&self.member_id)))
            .with_share_session_epoch(epoch)
            .with_max_wait_ms(l.max_wait_ms)
            .with_min_bytes(l.min_bytes)
            .with_max_bytes(l.max_bytes)
            .with_max_records(l.max_records)
            .with_batch_size(l.batch_size)
            .with_topics(
                topics
                    .into_iter()
                    .map(|(t, ps)| {
                        fetch_req::FetchTopic::default()
                            .with_topic_id(t)
                            .with_partitions(ps)
                    })
                    .collect(),
            )
            .with_forgotten_topics_data(
                forgotten
                    .into_iter()
                    .map(|(t, ps)| {
                        fetch_req::ForgottenTopic::default()
                            .with_topic_id(t)
                            .with_partitions(ps)
                    })
                    .collect(),
            );
        let v = c.versions().pick_in::<ShareFetchRequest>(1, 1)?;
        let r = c.call_at(&req, v).await.context("ShareFetch")?;
        if r.error_code == 0 {
            // The broker took the request: its additions and removals are in the session.
            self.open = self.wanted.clone();
            self.advance();
        }
        Ok(Fetched {
            error_code: r.error_code,
            error_message: r.error_message.map(|m| m.to_string()),
            acquisition_lock_timeout_ms: r.acquisition_lock_timeout_ms,
            acknowledged: vec![],
            partitions: r
                .responses
                .into_iter()
                .flat_map(|t| {
                    let id = t.topic_id;
                    t.partitions.into_iter().map(move |p| FetchedPartition {
                        partition: (id, p.partition_index),
                        error_code: p.error_code,
                        ack_error_code: p.acknowledge_error_code,
                        records: p.records.unwrap_or_default(),
                        acquired: p
                            .acquired_records
                            .iter()
                            .map(|a| Acquired {
                                first: a.first_offset,
                                last: a.last_offset,
                                delivery_count: a.delivery_count,
                            })
                            .collect(),
                    })
                })
                .collect(),
        })
    }

    async fn acknowledge_at<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        c: &mut Connection<S>,
        epoch: i32,
        acks: &Acks,
    ) -> Result<Acknowledged> {
        let mut topics: BTreeMap<Uuid, Vec<ack_req::AcknowledgePartition>> = BTreeMap::new();
        for ((t, p), a) in acks {
            topics.entry(*t).or_default().push(
                ack_req::AcknowledgePartition::default()
                    .with_partition_index(*p)
                    .with_acknowledgement_batches(
                        a.iter()
                            .map(|a| {
                                ack_req::AcknowledgementBatch::default()
                                    .with_first_offset(a.first)
                                    .with_last_offset(a.last)
                                    .with_acknowledge_types(vec![a.kind])
                            })
                            .collect(),
                    ),
            );
        }
        let req = ShareAcknowledgeRequest::default()
            .with_group_id(Some(GroupId(s(&self.group))))
            .with_member_id(Some(s(&self.member_id)))
            .with_share_session_epoch(epoch)
            .with_topics(
                topics
                    .into_iter()
                    .map(|(t, ps)| {
                        ack_req::AcknowledgeTopic::default()
                            .with_topic_id(t)
                            .with_partitions(ps)
                    })
                    .collect(),
            );
        let v = c.versions().pick_in::<ShareAcknowledgeRequest>(1, 1)?;
        let r = c.call_at(&req, v).await.context("ShareAcknowledge")?;
        Ok(Acknowledged {
            error_code: r.error_code,
            error_message: r.error_message.map(|m| m.to_string()),
            partitions: r
                .responses
                .iter()
                .flat_map(|t| {
                    t.partitions
                        .iter()
                        .map(move |p| ((t.topic_id, p.partition_index), p.error_code))
                })
                .collect(),
        })
    }
}

/// The acquired records of one fetched batch: the batch header, and the acquired ranges that
/// fall inside it, clipped to the batch.
pub struct AcquiredBatch<'a> {
    pub header: BatchHeader<'a>,
    pub ranges: Vec<Acquired>,
}

impl AcquiredBatch<'_> {
    /// Acquired offsets in this batch. Exact for batches whose offsets are dense (every batch a
    /// producer wrote; compaction can leave holes, which the broker never acquires).
    pub fn records(&self) -> u64 {
        self.ranges
            .iter()
            .map(|r| (r.last - r.first + 1).max(0) as u64)
            .sum()
    }
}

/// Walks the batches of `p.records` (headers only; a trailing partial batch ends the walk) and
/// calls `f` with each one holding acquired offsets. Control batches are skipped: the broker
/// never hands them out.
pub fn acquired_in<'a>(
    p: &'a FetchedPartition,
    mut f: impl FnMut(AcquiredBatch<'a>),
) -> Result<()> {
    if p.acquired.is_empty() {
        return Ok(());
    }
    batch::for_each_fetched_batch(&p.records, false, |h| {
        if h.is_control() {
            return;
        }
        let (base, last) = (h.base_offset().0, h.last_offset().0);
        let ranges: Vec<Acquired> = p
            .acquired
            .iter()
            .filter(|a| a.first <= last && a.last >= base)
            .map(|a| Acquired {
                first: a.first.max(base),
                last: a.last.min(last),
                delivery_count: a.delivery_count,
            })
            .collect();
        if !ranges.is_empty() {
            f(AcquiredBatch { header: h, ranges });
        }
    })
    .map_err(|e| anyhow!("fetched batch of partition {}: {e}", p.partition.1))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::builder::{BatchBuilder, BatchOptions, Record};

    #[test]
    fn adjacent_acks_of_one_type_merge() {
        let mut a = vec![];
        for (o, k) in [
            (5, ACCEPT),
            (6, ACCEPT),
            (7, RELEASE),
            (9, RELEASE),
            (10, RELEASE),
        ] {
            push_ack(&mut a, o, k);
        }
        let got: Vec<(i64, i64, i8)> = a.iter().map(|a| (a.first, a.last, a.kind)).collect();
        assert_eq!(got, vec![(5, 6, ACCEPT), (7, 7, RELEASE), (9, 10, RELEASE)]);
    }

    fn batch_at(base: i64, records: usize) -> Vec<u8> {
        let mut b = BatchBuilder::new(BatchOptions::default());
        for i in 0..records {
            b.push(&Record {
                key: None,
                value: Some(b"v"),
                headers: &[],
                timestamp_ms: 1000 + i as i64,
            });
        }
        let mut bytes = b.finish().unwrap();
        batch::set_base_offset(&mut bytes, sluice_protocol::Offset(base));
        bytes
    }

    #[test]
    fn acquired_ranges_are_clipped_to_the_batches_that_hold_them() {
        let mut records = batch_at(0, 10);
        records.extend(batch_at(10, 10));
        records.extend(batch_at(20, 10));
        records.extend_from_slice(&batch_at(30, 10)[..20]); // cut at the size limit
        let p = FetchedPartition {
            partition: (Uuid::nil(), 0),
            error_code: 0,
            ack_error_code: 0,
            records: Bytes::from(records),
            acquired: vec![
                Acquired {
                    first: 5,
                    last: 12,
                    delivery_count: 1,
                },
                Acquired {
                    first: 15,
                    last: 15,
                    delivery_count: 2,
                },
            ],
        };
        let mut seen = vec![];
        acquired_in(&p, |b| {
            seen.push((b.header.base_offset().0, b.records(), b.ranges.clone()));
        })
        .unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0].0, 0);
        assert_eq!(seen[0].1, 5);
        assert_eq!((seen[1].0, seen[1].1), (10, 4));
        assert_eq!(
            seen[1].2,
            vec![
                Acquired {
                    first: 10,
                    last: 12,
                    delivery_count: 1
                },
                Acquired {
                    first: 15,
                    last: 15,
                    delivery_count: 2
                }
            ]
        );
    }
}
