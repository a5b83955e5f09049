//! Incremental fetch sessions (KIP-227): one session cache per shard, sans-IO.
//!
//! A consumer's connection lives on one shard, and so do the sessions it creates: each shard
//! keeps its own cache (a thread-local, no locks) and hands out session ids from its own range of
//! the positive `i32`s (as Kafka's own sharded cache does), so ids never collide across shards.
//! A session id used on another shard (the client reconnected and the kernel put the new
//! connection elsewhere) is simply not found there: FETCH_SESSION_ID_NOT_FOUND, and the client
//! falls back to a full fetch, which creates a session on its new shard.
//!
//! A session remembers, per partition, the fetch offset and `partition_max_bytes` the client
//! last sent, and the high watermark and log start offset it was last told. An incremental
//! request names only what changed (added or changed partitions, `forgotten_topics_data`); its
//! response names only partitions with something new: records, a changed high watermark, last
//! stable offset or log start offset, or an error.
//!
//! Memory: at most [`SESSION_CACHE_SLOTS`] sessions per broker (split over the shards) and at
//! most [`SESSION_CACHE_BYTES_MAX`] of session state per shard, each session at most
//! [`SESSION_BYTES_MAX`], whatever the clients send; every partition is charged its entry and its
//! topic name. Eviction follows Kafka: a session idle for [`SESSION_EVICTION_MS`] can always be
//! evicted (the oldest first); otherwise a new session may evict a smaller one (ties: the least
//! recently used), never a larger one. A full fetch that finds no room gets no session (session
//! id 0): it is answered as a sessionless fetch, which clients accept.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use kafka_protocol::ResponseError;

/// Sessions per broker, split evenly over the shards: Kafka's
/// `max.incremental.fetch.session.cache.slots` default. Bounds the session table; with the byte
/// budgets below, the memory sessions hold.
pub const SESSION_CACHE_SLOTS: usize = 1000;
/// A session unused this long may be evicted by any new session: Kafka's
/// `min.incremental.fetch.session.eviction.ms` default.
pub const SESSION_EVICTION_MS: u64 = 120_000;
/// Session state one shard holds in all: bounds the cache's memory however many partitions the
/// sessions name (an incremental request can add partitions to a session each time).
pub const SESSION_CACHE_BYTES_MAX: usize = 64 << 20;
/// Most state one session may hold (about 100,000 partitions with short topic names): a larger
/// full fetch is served sessionless; an incremental request that would grow a session past it
/// ends the session (FETCH_SESSION_ID_NOT_FOUND, and the client falls back to a full fetch).
pub const SESSION_BYTES_MAX: usize = 8 << 20;
/// What one cached partition is charged, besides its topic name's bytes: the entry, its index
/// key and the hash table's share.
const PART_COST: usize = std::mem::size_of::<CachedPart>() + std::mem::size_of::<PartKey>() + 16;

/// Kafka's epochs: 0 opens a session (full fetch), -1 closes one (or asks for none).
pub const INITIAL_EPOCH: i32 = 0;
pub const FINAL_EPOCH: i32 = -1;

/// The epoch after `e`: wraps from `i32::MAX` to 1, as Kafka's `nextEpoch`.
pub fn next_epoch(e: i32) -> i32 {
    if e < 0 {
        FINAL_EPOCH
    } else if e == i32::MAX {
        1
    } else {
        e + 1
    }
}

/// One partition of a session.
#[derive(Clone, Debug)]
pub struct CachedPart {
    pub topic_id: [u8; 16],
    /// Empty for a session keyed by topic ids (Fetch v13+): the name comes from the metadata.
    pub topic_name: Rc<str>,
    pub partition: i32,
    pub fetch_offset: i64,
    pub partition_max_bytes: i32,
    /// The client's current leader epoch (KIP-320), -1 for none.
    pub current_leader_epoch: i32,
    /// What the client was last told; -1 before the first response names the partition.
    pub high_watermark: i64,
    pub log_start_offset: i64,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum PartKey {
    Id([u8; 16], i32),
    Name(Rc<str>, i32),
}

impl CachedPart {
    fn key(&self, uses_topic_ids: bool) -> PartKey {
        if uses_topic_ids {
            PartKey::Id(self.topic_id, self.partition)
        } else {
            PartKey::Name(self.topic_name.clone(), self.partition)
        }
    }

    fn cost(&self) -> usize {
        PART_COST + self.topic_name.len()
    }
}

/// A partition named by a request: added or changed (`fetch`) or forgotten.
#[derive(Clone, Debug)]
pub struct PartUpdate {
    pub topic_id: [u8; 16],
    pub topic_name: Rc<str>,
    pub partition: i32,
    pub fetch_offset: i64,
    pub partition_max_bytes: i32,
    pub current_leader_epoch: i32,
}

/// What a response said about one partition, to decide whether an incremental response must
/// name it and to remember it.
#[derive(Clone, Copy, Debug)]
pub struct PartOutcome {
    pub has_records: bool,
    pub error: bool,
    pub high_watermark: i64,
    pub log_start_offset: i64,
}

struct Session {
    /// The epoch the next incremental request must carry.
    epoch: i32,
    uses_topic_ids: bool,
    parts: Vec<CachedPart>,
    index: HashMap<PartKey, usize>,
    cost: usize,
    last_used_ms: u64,
}

impl Session {
    fn reindex(&mut self) {
        self.index.clear();
        for (i, p) in self.parts.iter().enumerate() {
            self.index.insert(p.key(self.uses_topic_ids), i);
        }
    }
}

/// Why an incremental request got no session.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SessionError {
    NotFound,
    InvalidEpoch,
    TopicIdError,
}

impl SessionError {
    pub fn error(self) -> ResponseError {
        match self {
            SessionError::NotFound => ResponseError::FetchSessionIdNotFound,
            SessionError::InvalidEpoch => ResponseError::InvalidFetchSessionEpoch,
            SessionError::TopicIdError => ResponseError::FetchSessionTopicIdError,
        }
    }
}

/// One shard's sessions.
pub struct SessionCache {
    sessions: HashMap<i32, Session>,
    /// This shard's session ids: `id_base..id_base + id_span`, never 0.
    id_base: i32,
    id_span: i32,
    slots: usize,
    bytes_max: usize,
    cost: usize,
    /// Sessions created, evicted and refused (no room), for tests and the log.
    pub created: u64,
    pub evicted: u64,
    pub refused: u64,
}

impl SessionCache {
    /// The cache of shard `shard` of `shards`, with Kafka's limits split evenly.
    pub fn for_shard(shard: usize, shards: usize) -> SessionCache {
        let shards = shards.max(1);
        SessionCache::new(
            shard,
            shards,
            SESSION_CACHE_SLOTS.div_ceil(shards),
            SESSION_CACHE_BYTES_MAX,
        )
    }

    pub fn new(shard: usize, shards: usize, slots: usize, bytes_max: usize) -> SessionCache {
        let shards = shards.clamp(1, 1 << 16);
        let span = (i32::MAX as usize / shards) as i32;
        let base = (shard.min(shards - 1) as i32) * span;
        SessionCache {
            sessions: HashMap::new(),
            id_base: base,
            id_span: span,
            slots,
            bytes_max,
            cost: 0,
            created: 0,
            evicted: 0,
            refused: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Bytes of session state held.
    pub fn cost(&self) -> usize {
        self.cost
    }

    /// Whether `id` is one of this shard's.
    pub fn owns(&self, id: i32) -> bool {
        id > 0 && id >= self.id_base && id - self.id_base < self.id_span
    }

    /// The partitions of session `id`, in the order the next fetch reads them.
    pub fn parts(&self, id: i32) -> Option<&[CachedPart]> {
        self.sessions.get(&id).map(|s| s.parts.as_slice())
    }

    pub fn remove(&mut self, id: i32) -> bool {
        match self.sessions.remove(&id) {
            Some(s) => {
                self.cost -= s.cost;
                true
            }
            None => false,
        }
    }

    /// Starts an incremental fetch: checks the id and epoch, applies the request's added,
    /// changed (`fetch`) and forgotten partitions, and moves the session to its next epoch.
    /// Returns the session's partitions (what this fetch reads) and the epoch to hand to
    /// [`SessionCache::finish_incremental`].
    pub fn begin_incremental(
        &mut self,
        id: i32,
        epoch: i32,
        uses_topic_ids: bool,
        fetch: impl IntoIterator<Item = PartUpdate>,
        forget: impl IntoIterator<Item = PartUpdate>,
        now_ms: u64,
    ) -> Result<(Vec<CachedPart>, i32), SessionError> {
        let s = self.sessions.get_mut(&id).ok_or(SessionError::NotFound)?;
        if s.epoch != epoch {
            return Err(SessionError::InvalidEpoch);
        }
        if s.uses_topic_ids != uses_topic_ids {
            return Err(SessionError::TopicIdError);
        }
        let before = s.cost;
        let mut too_big = false;
        for u in fetch {
            let part = CachedPart {
                topic_id: u.topic_id,
                // Empty for a topic-id session (the request's names are empty from v13).
                topic_name: u.topic_name,
                partition: u.partition,
                fetch_offset: u.fetch_offset,
                partition_max_bytes: u.partition_max_bytes,
                current_leader_epoch: u.current_leader_epoch,
                high_watermark: -1,
                log_start_offset: -1,
            };
            let key = part.key(uses_topic_ids);
            match s.index.get(&key) {
                Some(&i) => {
                    s.parts[i].fetch_offset = u.fetch_offset;
                    s.parts[i].partition_max_bytes = u.partition_max_bytes;
                    s.parts[i].current_leader_epoch = u.current_leader_epoch;
                }
                None => {
                    if s.cost + part.cost() > SESSION_BYTES_MAX {
                        too_big = true;
                        break;
                    }
                    s.cost += part.cost();
                    s.index.insert(key, s.parts.len());
                    s.parts.push(part);
                }
            }
        }
        if !too_big {
            // Marked here, dropped below in one pass: a long forgotten list costs one lookup per
            // entry, and the mask is sized by the session, not by the request.
            let mut gone: Option<Vec<bool>> = None;
            for u in forget {
                let key = if uses_topic_ids {
                    PartKey::Id(u.topic_id, u.partition)
                } else {
                    PartKey::Name(u.topic_name.clone(), u.partition)
                };
                if let Some(i) = s.index.remove(&key) {
                    gone.get_or_insert_with(|| vec![false; s.parts.len()])[i] = true;
                }
            }
            if let Some(gone) = gone {
                let mut freed = 0;
                let mut i = 0;
                s.parts.retain(|p| {
                    let keep = !gone[i];
                    i += 1;
                    if !keep {
                        freed += p.cost();
                    }
                    keep
                });
                s.cost -= freed;
                s.reindex();
            }
        }
        let grown = s.cost.saturating_sub(before);
        if too_big || (grown > 0 && self.cost + grown > self.bytes_max) {
            // Past the per-session bound, or the shard's budget: end the session; the client's
            // full fetch then gets a session only if one fits.
            self.sessions.remove(&id);
            self.cost -= before; // what the cache had charged for it
            self.evicted += 1;
            return Err(SessionError::NotFound);
        }
        self.cost = self.cost - before + s.cost;
        s.epoch = next_epoch(s.epoch);
        s.last_used_ms = now_ms;
        Ok((s.parts.clone(), s.epoch))
    }

    /// Ends an incremental fetch that read the partitions [`SessionCache::begin_incremental`]
    /// returned, in that order, with `outcomes`: returns which of them the response names, and
    /// remembers what it tells the client. Partitions that returned records move to the end of
    /// the session, so that when the response budget runs out the others are read first next
    /// time (Kafka does the same). Fails with INVALID_FETCH_SESSION_EPOCH if another request moved the session
    /// on meanwhile, and FETCH_SESSION_ID_NOT_FOUND if it was evicted.
    pub fn finish_incremental(
        &mut self,
        id: i32,
        expected_epoch: i32,
        outcomes: &[PartOutcome],
    ) -> Result<Vec<bool>, SessionError> {
        let s = self.sessions.get_mut(&id).ok_or(SessionError::NotFound)?;
        if s.epoch != expected_epoch || s.parts.len() != outcomes.len() {
            return Err(SessionError::InvalidEpoch);
        }
        let mut named = Vec::with_capacity(outcomes.len());
        let mut any_records = false;
        for (p, o) in s.parts.iter_mut().zip(outcomes) {
            let changed = o.has_records
                || o.error
                || o.high_watermark != p.high_watermark
                || o.log_start_offset != p.log_start_offset;
            if o.error {
                // Sent again once the error clears (as Kafka does).
                p.high_watermark = -1;
                p.log_start_offset = -1;
            } else {
                p.high_watermark = o.high_watermark;
                p.log_start_offset = o.log_start_offset;
            }
            any_records |= o.has_records;
            named.push(changed);
        }
        if any_records && outcomes.iter().any(|o| !o.has_records) {
            let mut quiet = Vec::with_capacity(s.parts.len());
            let mut loud = Vec::new();
            for (p, o) in s.parts.drain(..).zip(outcomes) {
                if o.has_records {
                    loud.push(p);
                } else {
                    quiet.push(p);
                }
            }
            quiet.extend(loud);
            s.parts = quiet;
            s.reindex();
        }
        Ok(named)
    }

    /// Whether a session of `parts` partitions could fit at all: checked before a full fetch's
    /// partitions are copied for [`SessionCache::create`], so a request naming millions of them
    /// costs no copy.
    pub fn could_hold(parts: usize) -> bool {
        parts.saturating_mul(PART_COST) <= SESSION_BYTES_MAX
    }

    /// Creates a session for a full fetch of `parts` (with what its response told the client),
    /// evicting as Kafka does if the cache is full. Returns the new id, or 0 when there is no
    /// room (the fetch is then answered sessionless).
    pub fn create(
        &mut self,
        uses_topic_ids: bool,
        parts: Vec<CachedPart>,
        now_ms: u64,
        mut random: impl FnMut() -> u32,
    ) -> i32 {
        let mut s = Session {
            epoch: next_epoch(INITIAL_EPOCH),
            uses_topic_ids,
            parts: Vec::with_capacity(parts.len()),
            index: HashMap::with_capacity(parts.len()),
            cost: 0,
            last_used_ms: now_ms,
        };
        let no_name: Rc<str> = Rc::from("");
        for mut p in parts {
            if uses_topic_ids {
                p.topic_name = no_name.clone();
            }
            let key = p.key(uses_topic_ids);
            if let Some(&i) = s.index.get(&key) {
                s.parts[i] = p; // listed twice: the last one counts
                continue;
            }
            s.cost += p.cost();
            if s.cost > SESSION_BYTES_MAX {
                self.refused += 1;
                return 0;
            }
            s.index.insert(key, s.parts.len());
            s.parts.push(p);
        }
        if !self.make_room(s.cost, s.parts.len(), now_ms) {
            self.refused += 1;
            return 0;
        }
        // From a random start, the first free id of this shard's range: the range holds far
        // more ids than the cache has slots, so at most `len + 2` candidates are looked at.
        let span = self.id_span as u32;
        let from = random() % span;
        let free = (0..=self.sessions.len() as u32 + 1)
            .map(|k| self.id_base + ((from + k) % span) as i32)
            .find(|c| *c > 0 && !self.sessions.contains_key(c));
        let Some(id) = free else {
            self.refused += 1;
            return 0;
        };
        self.cost += s.cost;
        self.sessions.insert(id, s);
        self.created += 1;
        id
    }

    fn full(&self, cost: usize) -> bool {
        self.sessions.len() >= self.slots || self.cost + cost > self.bytes_max
    }

    /// Evicts until a session of `cost` bytes and `size` partitions fits: stale sessions first
    /// (least recently used first), then sessions smaller than it (smallest, then least recently
    /// used, first). False if it still does not fit; then nothing stronger was evicted.
    fn make_room(&mut self, cost: usize, size: usize, now_ms: u64) -> bool {
        if self.slots == 0 || cost > self.bytes_max {
            return false;
        }
        while self.full(cost) {
            // A linear scan: at most `slots` sessions, and only when the cache is full.
            let stale = self
                .sessions
                .iter()
                .filter(|(_, s)| now_ms.saturating_sub(s.last_used_ms) >= SESSION_EVICTION_MS)
                .min_by_key(|(_, s)| s.last_used_ms)
                .map(|(id, _)| *id);
            let victim = stale.or_else(|| {
                self.sessions
                    .iter()
                    .filter(|(_, s)| s.parts.len() < size)
                    .min_by_key(|(_, s)| (s.parts.len(), s.last_used_ms))
                    .map(|(id, _)| *id)
            });
            match victim {
                Some(id) => {
                    self.remove(id);
                    self.evicted += 1;
                }
                None => return false,
            }
        }
        true
    }
}

thread_local! {
    static CACHE: RefCell<Option<SessionCache>> = const { RefCell::new(None) };
}

/// Runs `f` on the calling shard's cache (created on first use).
pub fn with_cache<R>(shard: usize, shards: usize, f: impl FnOnce(&mut SessionCache) -> R) -> R {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let cache = c.get_or_insert_with(|| SessionCache::for_shard(shard, shards));
        f(cache)
    })
}

/// A random `u32` for session ids (ids are hard to guess, as Kafka's are).
pub fn random_u32() -> u32 {
    uuid::Uuid::new_v4().as_u128() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upd(topic: &str, p: i32, off: i64) -> PartUpdate {
        PartUpdate {
            topic_id: [1; 16],
            topic_name: Rc::from(topic),
            partition: p,
            fetch_offset: off,
            partition_max_bytes: 1 << 20,
            current_leader_epoch: -1,
        }
    }

    fn part(topic: &str, p: i32) -> CachedPart {
        CachedPart {
            topic_id: [1; 16],
            topic_name: Rc::from(topic),
            partition: p,
            fetch_offset: 0,
            partition_max_bytes: 1 << 20,
            current_leader_epoch: -1,
            high_watermark: 0,
            log_start_offset: 0,
        }
    }

    fn quiet(hw: i64) -> PartOutcome {
        PartOutcome {
            has_records: false,
            error: false,
            high_watermark: hw,
            log_start_offset: 0,
        }
    }

    fn counter() -> impl FnMut() -> u32 {
        let mut n = 0u32;
        move || {
            n += 7;
            n
        }
    }

    #[test]
    fn epochs_advance_and_wrap_to_one() {
        assert_eq!(next_epoch(0), 1);
        assert_eq!(next_epoch(41), 42);
        assert_eq!(next_epoch(i32::MAX), 1);
        assert_eq!(next_epoch(-1), -1);
        assert_eq!(next_epoch(-7), -1);
    }

    #[test]
    fn ids_stay_in_the_shards_range() {
        for shards in [1usize, 2, 3, 64] {
            for shard in 0..shards {
                let mut c = SessionCache::new(shard, shards, 10, 1 << 20);
                for r in [0u32, 1, u32::MAX, 12345] {
                    let id = c.create(false, vec![part("t", 0)], 0, move || r);
                    assert!(id > 0 && c.owns(id), "{shard}/{shards}: {id}");
                    for other in (0..shards).filter(|o| *o != shard) {
                        assert!(!SessionCache::new(other, shards, 1, 1).owns(id));
                    }
                    c.remove(id);
                }
            }
        }
    }

    #[test]
    fn incremental_checks_id_epoch_and_topic_id_use() {
        let mut c = SessionCache::new(0, 1, 10, 1 << 20);
        let id = c.create(false, vec![part("t", 0)], 0, counter());
        assert_eq!(
            c.begin_incremental(id + 1, 1, false, vec![], vec![], 0)
                .unwrap_err(),
            SessionError::NotFound
        );
        assert_eq!(
            c.begin_incremental(id, 2, false, vec![], vec![], 0)
                .unwrap_err(),
            SessionError::InvalidEpoch
        );
        assert_eq!(
            c.begin_incremental(id, 1, true, vec![], vec![], 0)
                .unwrap_err(),
            SessionError::TopicIdError
        );
        let (parts, e) = c
            .begin_incremental(id, 1, false, vec![], vec![], 0)
            .unwrap();
        assert_eq!((parts.len(), e), (1, 2));
        // The same epoch again is stale now.
        assert_eq!(
            c.begin_incremental(id, 1, false, vec![], vec![], 0)
                .unwrap_err(),
            SessionError::InvalidEpoch
        );
    }

    #[test]
    fn adds_changes_and_forgets_partitions() {
        let mut c = SessionCache::new(0, 1, 10, 1 << 20);
        let id = c.create(false, vec![part("t", 0), part("t", 1)], 0, counter());
        let cost0 = c.cost();
        let (parts, e) = c
            .begin_incremental(
                id,
                1,
                false,
                vec![upd("t", 1, 50), upd("u", 0, 3)],
                vec![upd("t", 0, 0), upd("nope", 9, 0)],
                0,
            )
            .unwrap();
        let seen: Vec<_> = parts
            .iter()
            .map(|p| (&*p.topic_name, p.partition, p.fetch_offset))
            .collect();
        assert_eq!(seen, vec![("t", 1, 50), ("u", 0, 3)]);
        assert_eq!(e, 2);
        assert_eq!(c.cost(), cost0 - PART_COST - 1 + PART_COST + 1);
        c.remove(id);
        assert_eq!(c.cost(), 0);
    }

    #[test]
    fn incremental_response_names_only_what_changed_and_rotates_them_last() {
        let mut c = SessionCache::new(0, 1, 10, 1 << 20);
        let id = c.create(
            false,
            vec![part("t", 0), part("t", 1), part("t", 2)],
            0,
            counter(),
        );
        let (_, e) = c
            .begin_incremental(id, 1, false, vec![], vec![], 0)
            .unwrap();
        let data = PartOutcome {
            has_records: true,
            ..quiet(5)
        };
        let named = c
            .finish_incremental(id, e, &[quiet(0), data, quiet(0)])
            .unwrap();
        assert_eq!(named, vec![false, true, false]);
        let order: Vec<_> = c.parts(id).unwrap().iter().map(|p| p.partition).collect();
        assert_eq!(order, vec![0, 2, 1]);
        // Nothing new: nothing named; an error is always named, and once it clears the
        // partition is named again.
        let (_, e) = c
            .begin_incremental(id, e, false, vec![], vec![], 0)
            .unwrap();
        let err = PartOutcome {
            error: true,
            ..quiet(-1)
        };
        assert_eq!(
            c.finish_incremental(id, e, &[quiet(0), quiet(0), quiet(5)])
                .unwrap(),
            vec![false, false, false]
        );
        let (_, e) = c
            .begin_incremental(id, e, false, vec![], vec![], 0)
            .unwrap();
        assert_eq!(
            c.finish_incremental(id, e, &[err, quiet(0), quiet(5)])
                .unwrap(),
            vec![true, false, false]
        );
        let (_, e) = c
            .begin_incremental(id, e, false, vec![], vec![], 0)
            .unwrap();
        // Only partitions that returned records move, so the order is still [0, 2, 1]; and
        // partition 0 is named again now that its error has cleared.
        assert_eq!(
            c.finish_incremental(id, e, &[quiet(0), quiet(0), quiet(5)])
                .unwrap(),
            vec![true, false, false]
        );
        let order: Vec<_> = c.parts(id).unwrap().iter().map(|p| p.partition).collect();
        assert_eq!(order, vec![0, 2, 1]);
        // A log start change is named too.
        let (_, e) = c
            .begin_incremental(id, e, false, vec![], vec![], 0)
            .unwrap();
        let moved = PartOutcome {
            log_start_offset: 3,
            ..quiet(0)
        };
        assert_eq!(
            c.finish_incremental(id, e, &[moved, quiet(0), quiet(5)])
                .unwrap(),
            vec![true, false, false]
        );
    }

    #[test]
    fn a_concurrent_request_makes_the_older_one_invalid_epoch() {
        let mut c = SessionCache::new(0, 1, 10, 1 << 20);
        let id = c.create(false, vec![part("t", 0)], 0, counter());
        let (_, e1) = c
            .begin_incremental(id, 1, false, vec![], vec![], 0)
            .unwrap();
        let (_, e2) = c
            .begin_incremental(id, e1, false, vec![], vec![], 0)
            .unwrap();
        assert_eq!(
            c.finish_incremental(id, e1, &[quiet(0)]).unwrap_err(),
            SessionError::InvalidEpoch
        );
        assert!(c.finish_incremental(id, e2, &[quiet(0)]).is_ok());
    }

    #[test]
    fn epoch_wraps_from_max_to_one() {
        let mut c = SessionCache::new(0, 1, 10, 1 << 20);
        let id = c.create(false, vec![part("t", 0)], 0, counter());
        c.sessions.get_mut(&id).unwrap().epoch = i32::MAX;
        let (_, e) = c
            .begin_incremental(id, i32::MAX, false, vec![], vec![], 0)
            .unwrap();
        assert_eq!(e, 1);
        assert!(c.begin_incremental(id, 1, false, vec![], vec![], 0).is_ok());
    }

    #[test]
    fn full_cache_evicts_stale_then_smaller_never_larger() {
        let mut c = SessionCache::new(0, 1, 2, 1 << 20);
        let mut r = counter();
        let small = c.create(false, vec![part("t", 0)], 0, &mut r);
        let big = c.create(false, (0..5).map(|p| part("t", p)).collect(), 0, &mut r);
        // A session no bigger than the smallest finds no room.
        assert_eq!(c.create(false, vec![part("u", 0)], 10, &mut r), 0);
        assert_eq!(c.refused, 1);
        // A bigger one evicts the smallest.
        let mid = c.create(false, (0..3).map(|p| part("u", p)).collect(), 10, &mut r);
        assert!(mid > 0);
        assert!(c.parts(small).is_none() && c.parts(big).is_some());
        // Once `big` is stale, even a one-partition session evicts it.
        c.begin_incremental(mid, 1, false, vec![], vec![], SESSION_EVICTION_MS)
            .unwrap();
        let tiny = c.create(false, vec![part("v", 0)], SESSION_EVICTION_MS, &mut r);
        assert!(tiny > 0);
        assert!(c.parts(big).is_none() && c.parts(mid).is_some());
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn memory_stays_within_the_budgets() {
        let budget = 64 * (PART_COST + 1);
        let mut c = SessionCache::new(0, 1, 1000, budget);
        let mut r = counter();
        // Too big for the shard's budget: no session.
        assert_eq!(
            c.create(false, (0..65).map(|p| part("t", p)).collect(), 0, &mut r),
            0
        );
        let id = c.create(false, (0..60).map(|p| part("t", p)).collect(), 0, &mut r);
        assert!(id > 0);
        // Growing past the budget ends the session.
        let adds: Vec<_> = (100..110).map(|p| upd("t", p, 0)).collect();
        assert_eq!(
            c.begin_incremental(id, 1, false, adds, vec![], 0)
                .unwrap_err(),
            SessionError::NotFound
        );
        assert_eq!((c.len(), c.cost()), (0, 0));
        // Many small sessions: slots and bytes both hold.
        for i in 0..2000 {
            c.create(false, vec![part("t", i)], i as u64, &mut r);
            assert!(c.cost() <= budget);
        }
        // A session past SESSION_BYTES_MAX is refused whatever the budget.
        let mut c = SessionCache::new(0, 1, 10, usize::MAX);
        let n = SESSION_BYTES_MAX / PART_COST + 1;
        assert_eq!(
            c.create(
                false,
                (0..n as i32).map(|p| part("t", p)).collect(),
                0,
                &mut r
            ),
            0
        );
    }
}
