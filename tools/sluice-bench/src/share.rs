//! `share-consume`: share-group members (KIP-932). Each member joins with ShareGroupHeartbeat
//! (a heartbeat task on a coordinator connection keeps it in the group and follows its
//! assignment) and runs one share session on the partitions' leader: one ShareFetch in flight at
//! a time, as Kafka's share consumers do. Every delivered record is acknowledged (accept,
//! release or reject, chosen per offset by [`choose`]) on the next ShareFetch or in a
//! ShareAcknowledge. Counts go to [`Stats::share`]: deliveries, redeliveries, distinct offsets
//! and duplicates ([`Seen`]), and what the broker confirmed of each acknowledgement.
//!
//! A holding member (`--hold`) acquires records and never acknowledges them; another member
//! receiving such a record again measures the time from acquisition to redelivery (lock
//! expiry).

use crate::produce::unix_now;
use crate::report::Stats;
use crate::setup::{self, Conn, TopicInfo};
use anyhow::{anyhow, bail, Context, Result};
use sluice_client::error::code;
use sluice_client::share::{
    self, acquired_in, push_ack, Acks, FetchLimits, FetchedPartition, SharePartition, ShareSession,
    ACCEPT, REJECT, RELEASE,
};
use sluice_client::{check, error_name};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How one member behaves.
#[derive(Debug, Clone)]
pub struct MemberSpec {
    pub brokers: String,
    pub group: String,
    pub topic: TopicInfo,
    pub limits: FetchLimits,
    pub explicit_acks: bool,
    pub reject_ratio: f64,
    pub release_ratio: f64,
    /// Acquire and never acknowledge.
    pub hold: bool,
    pub connect_timeout: Duration,
    /// Stop once this many records were settled (accepted or rejected).
    pub count: Option<u64>,
}

/// Distinct offsets delivered per partition, as disjoint ranges (first → last): offsets arrive
/// mostly in order, so a partition read once is one range whatever its size.
#[derive(Debug, Default)]
pub struct Seen {
    ranges: HashMap<i32, BTreeMap<i64, i64>>,
}

impl Seen {
    /// Adds `first..=last` of `partition`; returns how many of its offsets were new.
    pub fn insert(&mut self, partition: i32, first: i64, last: i64) -> u64 {
        if last < first {
            return 0;
        }
        let m = self.ranges.entry(partition).or_default();
        let (mut lo, mut hi) = (first, last);
        let mut covered = 0u64;
        // Ranges overlapping or adjacent to lo..=hi: merge them all into one.
        let start = m
            .range(..=lo)
            .next_back()
            .filter(|(_, &e)| e.saturating_add(1) >= lo)
            .map(|(&s, _)| s)
            .unwrap_or(lo);
        let touching: Vec<(i64, i64)> = m
            .range(start..)
            .take_while(|(&s, _)| s <= hi.saturating_add(1))
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            m.remove(&s);
            // Overlap of s..=e with first..=last.
            let (os, oe) = (s.max(first), e.min(last));
            if os <= oe {
                covered += (oe - os + 1) as u64;
            }
            lo = lo.min(s);
            hi = hi.max(e);
        }
        m.insert(lo, hi);
        (last - first + 1) as u64 - covered
    }
}

/// What the run's members share: the offsets seen, and the records holding members acquired
/// with when (the arrival of the ShareFetch answer that acquired them).
#[derive(Debug, Default)]
pub struct Shared {
    pub seen: Mutex<Seen>,
    pub held: Mutex<BTreeMap<(i32, i64), Instant>>,
    /// Holding members that have not had their first ShareFetch answered: the others wait for
    /// them (up to [`HOLDERS_WAIT_MAX`]), so the holders acquire before the backlog is gone.
    pub holders_waiting: AtomicUsize,
}

impl Shared {
    pub fn new(holders: usize) -> Shared {
        Shared {
            holders_waiting: AtomicUsize::new(holders),
            ..Shared::default()
        }
    }
}

/// How long acknowledging members wait for the holding ones to start.
pub const HOLDERS_WAIT_MAX: Duration = Duration::from_secs(10);

/// The acknowledgement of a first delivery of `offset` of `partition`: reject with probability
/// `reject`, release with probability `release`, else accept. A hash of the two, so the same
/// records are chosen in every run and by every member.
pub fn choose(partition: i32, offset: i64, reject: f64, release: f64) -> i8 {
    if reject <= 0.0 && release <= 0.0 {
        return ACCEPT;
    }
    // splitmix64 finaliser.
    let mut z = (offset as u64) ^ ((partition as u64) << 40) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let u = (z >> 11) as f64 / (1u64 << 53) as f64;
    if u < reject {
        REJECT
    } else if u < reject + release {
        RELEASE
    } else {
        ACCEPT
    }
}

/// Acknowledgements sent and not yet answered, counted by type per partition.
#[derive(Debug, Default)]
struct InFlight {
    acks: Acks,
}

impl InFlight {
    fn is_empty(&self) -> bool {
        self.acks.is_empty()
    }

    fn counts(acks: &[share::Ack]) -> [u64; 4] {
        let mut n = [0u64; 4];
        for a in acks {
            if let Some(slot) = n.get_mut(a.kind as usize) {
                *slot += (a.last - a.first + 1).max(0) as u64;
            }
        }
        n
    }

    /// Counts what the broker answered for each partition (`None`: not answered, refused).
    fn settle(&mut self, stats: &Stats, outcome: impl Fn(&SharePartition) -> Option<i16>) {
        for (p, acks) in std::mem::take(&mut self.acks) {
            let n = Self::counts(&acks);
            match outcome(&p) {
                Some(code::NONE) => {
                    let sh = &stats.share;
                    sh.accepted.fetch_add(n[ACCEPT as usize], Relaxed);
                    sh.released.fetch_add(n[RELEASE as usize], Relaxed);
                    sh.rejected.fetch_add(n[REJECT as usize], Relaxed);
                }
                other => {
                    tracing::warn!(
                        partition = p.1,
                        error = other.map(error_name).unwrap_or_else(|| "no answer".into()),
                        "acknowledgement refused"
                    );
                    stats.share.ack_errors.fetch_add(n.iter().sum(), Relaxed);
                }
            }
        }
    }
}

/// The member's place in the group, kept by its heartbeat task.
#[derive(Debug, Default)]
struct Membership {
    epoch: i32,
    partitions: Vec<SharePartition>,
    /// Raised when the group forgot the member (it joins again with epoch 0).
    rejoined: bool,
}

/// Member ids are client-chosen (KIP-932): 128 random bits in UUID form.
fn new_member_id() -> String {
    uuid::Uuid::from_u128(rand::random::<u128>()).to_string()
}

/// Joins `group` or heartbeats; follows the assignment; on FENCED_MEMBER_EPOCH or
/// UNKNOWN_MEMBER_ID joins again. Returns the interval to wait before the next heartbeat.
async fn beat(
    coord: &mut Conn,
    group: &str,
    member_id: &str,
    topic: &str,
    m: &RefCell<Membership>,
) -> Result<Duration> {
    let epoch = m.borrow().epoch;
    let topics = [topic.to_string()];
    let subscribe = (epoch == 0).then_some(&topics[..]);
    let r = share::heartbeat(coord, group, member_id, epoch, subscribe).await?;
    let mut m = m.borrow_mut();
    match r.error_code {
        code::NONE => {
            m.epoch = r.member_epoch;
            if let Some(a) = r.assignment {
                m.partitions = a;
            }
            Ok(Duration::from_millis(
                r.heartbeat_interval_ms.clamp(100, 5_000) as u64,
            ))
        }
        code::FENCED_MEMBER_EPOCH | code::UNKNOWN_MEMBER_ID => {
            m.epoch = 0;
            m.partitions.clear();
            m.rejoined = true;
            Ok(Duration::ZERO)
        }
        code::COORDINATOR_LOAD_IN_PROGRESS | code::COORDINATOR_NOT_AVAILABLE => {
            Ok(Duration::from_millis(200))
        }
        e => {
            check(
                e,
                &format!("ShareGroupHeartbeat of group {group}"),
                r.error_message
                    .map(kafka_protocol::protocol::StrBytes::from_string)
                    .as_ref(),
            )?;
            Ok(Duration::from_millis(200))
        }
    }
}

/// Runs one share-group member until the run stops, then closes its share session (with the
/// acknowledgements still pending) and leaves the group.
pub async fn run_member(spec: MemberSpec, stats: Arc<Stats>, shared: Arc<Shared>) -> Result<()> {
    let mut boot = setup::bootstrap(&spec.brokers, spec.connect_timeout).await?;
    let coord_addr = crate::group::find_coordinator(&mut boot, &spec.group).await?;
    drop(boot);
    let mut coord = setup::connect(&coord_addr, spec.connect_timeout).await?;
    let member_id = new_member_id();
    let membership = Rc::new(RefCell::new(Membership::default()));
    // Join before fetching: a share session needs a member.
    for _ in 0..50 {
        beat(
            &mut coord,
            &spec.group,
            &member_id,
            &spec.topic.name,
            &membership,
        )
        .await?;
        if membership.borrow().epoch > 0 {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
    if membership.borrow().epoch <= 0 {
        bail!("could not join share group {}", spec.group);
    }
    let done = Rc::new(std::cell::Cell::new(false));
    let hb = {
        let (m, done, stats, group, topic, member_id) = (
            membership.clone(),
            done.clone(),
            stats.clone(),
            spec.group.clone(),
            spec.topic.name.clone(),
            member_id.clone(),
        );
        glommio::spawn_local(async move {
            let mut wait = Duration::from_millis(500);
            let mut waited = Duration::ZERO;
            while !done.get() && !stats.stopped() {
                let step = Duration::from_millis(50);
                glommio::timer::sleep(step).await;
                waited += step;
                if waited < wait {
                    continue;
                }
                waited = Duration::ZERO;
                wait = beat(&mut coord, &group, &member_id, &topic, &m).await?;
            }
            share::heartbeat(&mut coord, &group, &member_id, share::LEAVE_EPOCH, None).await?;
            Ok::<(), anyhow::Error>(())
        })
    };
    let r = fetch_loop(&spec, &member_id, &membership, &stats, &shared).await;
    done.set(true);
    let left = hb.await;
    r?;
    left
}

/// The leader of the share partitions: one share session per member, so every partition of
/// the topic must be led by the same broker (share groups run on one node).
fn leader(topic: &TopicInfo) -> Result<String> {
    let first = topic
        .partitions
        .first()
        .map(|p| p.leader.clone())
        .context("topic has no partitions")?;
    if topic.partitions.iter().any(|p| p.leader != first) {
        bail!(
            "share-consume needs every partition of {} led by one broker",
            topic.name
        );
    }
    Ok(first)
}

async fn fetch_loop(
    spec: &MemberSpec,
    member_id: &str,
    membership: &RefCell<Membership>,
    stats: &Stats,
    shared: &Shared,
) -> Result<()> {
    let mut conn = setup::connect(&leader(&spec.topic)?, spec.connect_timeout).await?;
    let mut session = ShareSession::new(&spec.group, member_id);
    let mut pending = InFlight::default();
    if !spec.hold {
        let start = Instant::now();
        while shared.holders_waiting.load(Relaxed) > 0
            && start.elapsed() < HOLDERS_WAIT_MAX
            && !stats.stopped()
        {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut first = spec.hold;
    while !stats.stopped() {
        {
            let mut m = membership.borrow_mut();
            if m.rejoined {
                // A new membership: what the old one held was released by the broker.
                m.rejoined = false;
                session.reset();
                pending.settle(stats, |_| None);
            }
            session.want(m.partitions.iter().copied());
        }
        if session.wanted().is_empty() {
            glommio::timer::sleep(Duration::from_millis(20)).await;
            continue;
        }
        if session.epoch() == 0 && !pending.is_empty() {
            pending.settle(stats, |_| None);
        }
        let sending = std::mem::take(&mut pending.acks);
        let r = session.fetch(&mut conn, spec.limits, &sending).await?;
        pending.acks = sending;
        match r.error_code {
            code::NONE => {}
            code::SHARE_SESSION_NOT_FOUND
            | code::INVALID_SHARE_SESSION_EPOCH
            | code::UNKNOWN_MEMBER_ID => {
                session.reset();
                pending.settle(stats, |_| None);
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
            e => check(
                e,
                &format!("ShareFetch of group {}", spec.group),
                r.error_message
                    .map(kafka_protocol::protocol::StrBytes::from_string)
                    .as_ref(),
            )?,
        }
        let answered: HashMap<SharePartition, i16> = r
            .partitions
            .iter()
            .map(|p| (p.partition, p.ack_error_code))
            .chain(r.acknowledged.iter().copied())
            .collect();
        pending.settle(stats, |p| answered.get(p).copied());
        let (_, now_us) = unix_now();
        let now = Instant::now();
        let mut acks = Acks::new();
        let mut held_now = vec![];
        for p in &r.partitions {
            if p.error_code != code::NONE {
                tracing::warn!(partition = p.partition.1, error = %error_name(p.error_code), "share fetch");
                continue;
            }
            let packs = acks.entry(p.partition).or_default();
            deliver(spec, p, stats, shared, now_us, now, packs, &mut held_now)?;
        }
        acks.retain(|_, a| !a.is_empty());
        if first {
            first = false;
            shared.holders_waiting.fetch_sub(1, Relaxed);
        }
        if spec.hold {
            if held_now.is_empty() {
                continue;
            }
            {
                let mut h = shared.held.lock().map_err(|_| anyhow!("poisoned"))?;
                // The lock starts when the broker acquires, just before it answers: the
                // answer's arrival (a fetch that long-polled began well before).
                for k in &held_now {
                    h.insert(*k, now);
                }
            }
            stats.share.held.fetch_add(held_now.len() as u64, Relaxed);
            wait_redelivered(shared, stats, &held_now, r.acquisition_lock_timeout_ms).await;
            continue;
        }
        if spec.explicit_acks && !acks.is_empty() {
            let a = session.acknowledge(&mut conn, &acks).await?;
            let by: HashMap<SharePartition, i16> = a.partitions.iter().copied().collect();
            let top = a.error_code;
            InFlight { acks }.settle(stats, |p| {
                if top != code::NONE {
                    Some(top)
                } else {
                    by.get(p).copied()
                }
            });
        } else {
            pending.acks = acks;
        }
        if let Some(limit) = spec.count {
            if stats.share.settled() >= limit {
                stats.stop.store(true, Relaxed);
            }
        }
    }
    // Close the session with what is still to acknowledge.
    let sending = std::mem::take(&mut pending.acks);
    if let Some(a) = session.close(&mut conn, &sending).await? {
        let by: HashMap<SharePartition, i16> = a.partitions.iter().copied().collect();
        let top = a.error_code;
        InFlight { acks: sending }.settle(stats, |p| {
            if top != code::NONE {
                Some(top)
            } else {
                by.get(p).copied()
            }
        });
    }
    Ok(())
}

/// Counts one partition's deliveries and chooses their acknowledgements (into `acks`), or,
/// for a holding member, lists them in `held`.
#[allow(clippy::too_many_arguments)]
fn deliver(
    spec: &MemberSpec,
    p: &FetchedPartition,
    stats: &Stats,
    shared: &Shared,
    now_us: i64,
    now: Instant,
    acks: &mut Vec<share::Ack>,
    held: &mut Vec<(i32, i64)>,
) -> Result<()> {
    let part = p.partition.1;
    let mut seen = shared.seen.lock().map_err(|_| anyhow!("poisoned"))?;
    let mut holds = if spec.hold {
        None
    } else {
        Some(shared.held.lock().map_err(|_| anyhow!("poisoned"))?)
    };
    let sh = &stats.share;
    acquired_in(p, |b| {
        let n = b.records();
        let count = b.header.record_count().max(1) as u64;
        stats
            .consume
            .add(n, (b.header.size() as u64).saturating_mul(n) / count);
        sh.deliveries.fetch_add(n, Relaxed);
        let sent_us = crate::batch::send_stamp_us(&b.header)
            .unwrap_or(b.header.base_timestamp().saturating_mul(1000));
        if sent_us > 0 {
            stats
                .end_to_end
                .latency((now_us - sent_us).max(0) as u64, n);
        }
        for r in &b.ranges {
            let new = seen.insert(part, r.first, r.last);
            sh.distinct.fetch_add(new, Relaxed);
            sh.duplicates
                .fetch_add((r.last - r.first + 1) as u64 - new, Relaxed);
            if r.delivery_count > 1 {
                sh.redeliveries
                    .fetch_add((r.last - r.first + 1) as u64, Relaxed);
            }
            if spec.hold {
                held.extend((r.first..=r.last).map(|o| (part, o)));
                continue;
            }
            for o in r.first..=r.last {
                if r.delivery_count > 1 {
                    if let Some(h) = holds.as_mut() {
                        if let Some(at) = h.remove(&(part, o)) {
                            sh.lock_redelivery
                                .latency(now.duration_since(at).as_micros() as u64, 1);
                        }
                    }
                    push_ack(acks, o, ACCEPT);
                } else {
                    push_ack(
                        acks,
                        o,
                        choose(part, o, spec.reject_ratio, spec.release_ratio),
                    );
                }
            }
        }
    })
}

/// How long a holding member waits for its records to come back to others before it acquires
/// again anyway: this many lock durations.
const HOLD_WAIT_LOCKS: u32 = 5;

/// Waits until every record in `held` was redelivered to another member (or a few lock
/// durations passed, or the run stops).
async fn wait_redelivered(shared: &Shared, stats: &Stats, held: &[(i32, i64)], lock_ms: i32) {
    let limit = Duration::from_millis(lock_ms.max(1000) as u64) * HOLD_WAIT_LOCKS;
    let start = Instant::now();
    while !stats.stopped() && start.elapsed() < limit {
        let left = match shared.held.lock() {
            Ok(h) => held.iter().any(|k| h.contains_key(k)),
            Err(_) => false,
        };
        if !left {
            return;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    if let Ok(mut h) = shared.held.lock() {
        for k in held {
            h.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_counts_new_offsets_and_merges_ranges() {
        let mut s = Seen::default();
        assert_eq!(s.insert(0, 0, 9), 10);
        assert_eq!(s.insert(0, 5, 14), 5);
        assert_eq!(s.insert(0, 20, 24), 5);
        assert_eq!(s.insert(0, 15, 19), 5); // fills the hole: one range 0..=24
        assert_eq!(s.ranges[&0].len(), 1);
        assert_eq!(s.insert(0, 0, 24), 0);
        assert_eq!(s.insert(1, 0, 0), 1);
        assert_eq!(s.insert(0, 30, 31), 2);
        assert_eq!(s.insert(0, 22, 40), 40 - 22 + 1 - 3 - 2);
        assert_eq!(s.ranges[&0].len(), 1);
    }

    #[test]
    fn choices_follow_the_ratios_and_are_stable() {
        let n = 100_000;
        let mut counts = [0u32; 4];
        for o in 0..n {
            counts[choose(3, o, 0.1, 0.05) as usize] += 1;
        }
        let frac = |k: i8| counts[k as usize] as f64 / n as f64;
        assert!((frac(REJECT) - 0.1).abs() < 0.01, "{counts:?}");
        assert!((frac(RELEASE) - 0.05).abs() < 0.01, "{counts:?}");
        assert_eq!(choose(3, 17, 0.1, 0.05), choose(3, 17, 0.1, 0.05));
        assert!((0..1000).all(|o| choose(0, o, 0.0, 0.0) == ACCEPT));
        assert!((0..1000).all(|o| choose(0, o, 0.0, 1.0) == RELEASE));
    }
}
