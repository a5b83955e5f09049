//! Share sessions (KIP-932) of the members whose connections land on this shard, and what the
//! ShareFetch and ShareAcknowledge handlers share: wire acknowledgements to ranges, releasing a
//! member's records.

use std::cell::RefCell;
use std::collections::HashMap;

use kafka_protocol::ResponseError;

use super::common::{code, with_partition};
use crate::group::on_coordinator;
use crate::group::share::PartitionSettings;
use crate::group::share_partition::{AckRange, ACK_RENEW};
use crate::group::share_state::{self, StateKey};
use crate::types::ErrorCode;

/// Most share sessions one shard keeps (Kafka's `group.share.max.share.sessions` is per
/// broker): a new one past it evicts the session unused for longest when that one has been idle
/// for [`SESSION_IDLE_EVICT_MS`] (a member that died without closing it), else it is
/// SHARE_SESSION_LIMIT_REACHED.
const SHARE_SESSIONS_MAX: usize = 2_000;
/// A session idle this long may be evicted for a new one when the shard is full (Kafka's
/// default share session timeout is the member's session timeout, 45 s).
const SESSION_IDLE_EVICT_MS: i64 = 45_000;
/// Most partitions one share session holds: bounds a session's memory.
const SESSION_PARTITIONS_MAX: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub group: String,
    pub member: String,
}

struct Session {
    next_epoch: i32,
    last_used_ms: i64,
    partitions: Vec<([u8; 16], i32)>,
    settings: PartitionSettings,
}

thread_local! {
    static SESSIONS: RefCell<HashMap<SessionKey, Session>> = RefCell::new(HashMap::new());
}

/// The session after a request's epoch was applied.
pub struct Opened {
    pub partitions: Vec<([u8; 16], i32)>,
    pub settings: PartitionSettings,
    /// Epoch -1: the session is closed once the acknowledgements are applied.
    pub closing: bool,
    /// Partitions that left the session (a replaced session's, forgotten ones).
    pub released: Vec<([u8; 16], i32)>,
}

fn add(parts: &mut Vec<([u8; 16], i32)>, named: &[([u8; 16], i32)]) -> Result<(), ErrorCode> {
    for tp in named {
        if !parts.contains(tp) {
            if parts.len() >= SESSION_PARTITIONS_MAX {
                return Err(code(ResponseError::InvalidRequest));
            }
            parts.push(*tp);
        }
    }
    Ok(())
}

/// Applies a request's session epoch: 0 opens (replacing), -1 closes, else the next epoch.
pub async fn open_or_advance(
    key: &SessionKey,
    epoch: i32,
    named: &[([u8; 16], i32)],
    forgotten: &[([u8; 16], i32)],
) -> Result<Opened, ErrorCode> {
    if epoch == 0 {
        let (g, m) = (key.group.clone(), key.member.clone());
        let (member, settings) = on_coordinator(&key.group, move |gs| async move {
            let c = gs.coordinator.borrow();
            (c.is_share_member(&g, &m), c.share_settings(&g))
        })
        .await?;
        if !member {
            return Err(code(ResponseError::UnknownMemberId));
        }
        let mut partitions = vec![];
        add(&mut partitions, named)?;
        let now = crate::shard::local().clock.now_ms();
        return SESSIONS.with(|s| {
            let mut s = s.borrow_mut();
            let old = s.remove(key);
            if old.is_none() && s.len() >= SHARE_SESSIONS_MAX {
                let idle = s
                    .iter()
                    .min_by_key(|(_, v)| v.last_used_ms)
                    .filter(|(_, v)| now - v.last_used_ms >= SESSION_IDLE_EVICT_MS)
                    .map(|(k, _)| k.clone());
                match idle {
                    // Its records' locks expire on their own.
                    Some(k) => {
                        s.remove(&k);
                    }
                    None => return Err(code(ResponseError::ShareSessionLimitReached)),
                }
            }
            s.insert(
                key.clone(),
                Session {
                    next_epoch: 1,
                    last_used_ms: now,
                    partitions: partitions.clone(),
                    settings,
                },
            );
            Ok(Opened {
                partitions,
                settings,
                closing: false,
                released: old.map(|o| o.partitions).unwrap_or_default(),
            })
        });
    }
    SESSIONS.with(|s| {
        let mut s = s.borrow_mut();
        let Some(session) = s.get_mut(key) else {
            return Err(code(ResponseError::ShareSessionNotFound));
        };
        if epoch == -1 {
            let session = s.remove(key).expect("present");
            return Ok(Opened {
                partitions: session.partitions,
                settings: session.settings,
                closing: true,
                released: vec![],
            });
        }
        if epoch != session.next_epoch {
            return Err(code(ResponseError::InvalidShareSessionEpoch));
        }
        session.last_used_ms = crate::shard::local().clock.now_ms();
        session.next_epoch = if epoch == i32::MAX { 1 } else { epoch + 1 };
        add(&mut session.partitions, named)?;
        let released: Vec<_> = forgotten
            .iter()
            .filter(|tp| session.partitions.contains(tp))
            .copied()
            .collect();
        session.partitions.retain(|tp| !forgotten.contains(tp));
        Ok(Opened {
            partitions: session.partitions.clone(),
            settings: session.settings,
            closing: false,
            released,
        })
    })
}

/// Most offsets the acknowledgements of one ShareFetch or ShareAcknowledge may cover, summed
/// over its partitions. One partition's ranges must be disjoint and inside its in-flight window
/// (the share partition refuses them otherwise), so each partition costs at most
/// `group.share.partition.max.record.locks` (at most 10,000) offsets to check and apply; this
/// bounds a request naming many partitions. Ten times the most records one ShareFetch acquires:
/// a consumer acknowledges what its fetches returned, far below it. The partitions whose ranges
/// go past it answer INVALID_REQUEST and nothing of theirs is applied.
pub const ACK_OFFSETS_PER_REQUEST_MAX: u64 = 100_000;

/// The first version of ShareFetch and ShareAcknowledge that carries Renew (KIP-1222).
pub const RENEW_VERSION: i16 = 2;

/// Whether a request of `version` carries an acknowledgement type it cannot: Renew before
/// [`RENEW_VERSION`] (INVALID_REQUEST for the partition, as any unknown type).
pub fn renew_refused(version: i16, ranges: &[AckRange]) -> bool {
    version < RENEW_VERSION && ranges.iter().any(|a| a.types.contains(&ACK_RENEW))
}

/// What is left of a request's [`ACK_OFFSETS_PER_REQUEST_MAX`].
pub struct AckBudget(u64);

impl Default for AckBudget {
    fn default() -> AckBudget {
        AckBudget(ACK_OFFSETS_PER_REQUEST_MAX)
    }
}

impl AckBudget {
    /// Takes one partition's ranges (each counted as at least one offset, even malformed) out
    /// of the budget; false, taking nothing, when they do not fit.
    pub fn take(&mut self, ranges: &[AckRange]) -> bool {
        let mut n: u64 = 0;
        for a in ranges {
            // i128: a range from the wire may span all of i64.
            let len = (a.last as i128 - a.first as i128 + 1).clamp(1, u64::MAX as i128) as u64;
            n = n.saturating_add(len);
        }
        if n > self.0 {
            return false;
        }
        self.0 -= n;
        true
    }
}

/// Acknowledgement batches from the wire as ranges (checked by the share partition).
pub fn ack_ranges<'a>(batches: impl Iterator<Item = (i64, i64, &'a Vec<i8>)>) -> Vec<AckRange> {
    batches
        .map(|(first, last, types)| AckRange {
            first,
            last,
            types: types.clone(),
        })
        .collect()
}

/// Releases what `member` holds in `parts` (each on its owner shard).
pub async fn release_all(group: &str, member: &str, parts: &[([u8; 16], i32)]) {
    for (t, p) in parts {
        let Some(meta) = share_state::topic_by_id(t) else {
            continue;
        };
        let key = StateKey {
            group: group.to_string(),
            topic: *t,
            partition: *p,
        };
        let member = member.to_string();
        let _ = with_partition(&meta, *p, move |_| share_state::release_here(key, member)).await;
    }
}
