//! The `__consumer_offsets` record formats, byte-compatible with Kafka's so that the log can be
//! read by Kafka tools and replayed by us. Pure functions over bytes.
//!
//! ```text
//! key   := version:i16 ( v0|v1: group:str topic:str partition:i32     offset commit
//!                      | v2:    group:str )                           group metadata
//! offset value v3 := version:i16 offset:i64 leaderEpoch:i32 metadata:str commitTimestamp:i64
//!   (v0: offset metadata commitTs; v1: offset metadata commitTs expireTs; v2: as v0)
//! group value v3  := version:i16 protocolType:str generation:i32 protocol:str? leader:str?
//!                    currentStateTimestamp:i64 members:[memberId:str instanceId:str? clientId:str
//!                    clientHost:str rebalanceTimeout:i32 sessionTimeout:i32 subscription:bytes
//!                    assignment:bytes]
//!   (v0: no rebalanceTimeout/currentStateTimestamp/instanceId; v1: +rebalanceTimeout;
//!    v2: +currentStateTimestamp)
//! ```
//! `str` is an i16 length (-1 = null) then UTF-8; `bytes` an i32 length; arrays an i32 count.
//! A null record value is a tombstone for its key.

use bytes::Bytes;

/// Why a record did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError(pub String);

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "__consumer_offsets record: {}", self.0)
    }
}
impl std::error::Error for FormatError {}

/// The key of one `__consumer_offsets` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordKey {
    Offset {
        group: String,
        topic: String,
        partition: i32,
    },
    Group {
        group: String,
    },
    /// KIP-848 consumer group metadata (key version 3): the group epoch.
    ConsumerGroup {
        group: String,
    },
    /// KIP-848 member metadata (key version 5).
    ConsumerMember {
        group: String,
        member: String,
    },
    /// KIP-848 member's current assignment (key version 8).
    ConsumerAssignment {
        group: String,
        member: String,
    },
    /// KIP-848 target assignment's epoch (key version 6,
    /// `ConsumerGroupTargetAssignmentMetadataKey`).
    ConsumerTargetEpoch {
        group: String,
    },
    /// KIP-848 member's target assignment (key version 7,
    /// `ConsumerGroupTargetAssignmentMemberKey`).
    ConsumerTargetMember {
        group: String,
        member: String,
    },
    /// KIP-932 share group member (key version 10, Kafka's `ShareGroupMemberMetadataKey`).
    ShareMember {
        group: String,
        member: String,
    },
    /// KIP-932 share group (key version 11, Kafka's `ShareGroupMetadataKey`).
    ShareGroup {
        group: String,
    },
    /// The configs of a classic or consumer group set through (Incremental)AlterConfigs
    /// (Sluice's key version 1000: Kafka keeps group configs in its metadata log).
    GroupConfigs {
        group: String,
    },
}

/// Key version of [`RecordKey::GroupConfigs`], far from Kafka's own key versions.
const GROUP_CONFIGS_KEY_VERSION: i16 = 1000;

/// Key v1000: a group's configs.
pub fn group_configs_key(group: &str) -> Vec<u8> {
    key_of_group(GROUP_CONFIGS_KEY_VERSION, group)
}

/// A group's configs, value v0: `version:i16 consumerSessionTimeoutMs:i32
/// consumerHeartbeatIntervalMs:i32 tagged`, -1 for a config not set.
pub fn group_configs_value(c: &super::share::GroupConfigs) -> Vec<u8> {
    let mut out = Vec::with_capacity(11);
    out.extend_from_slice(&0i16.to_be_bytes());
    out.extend_from_slice(&c.consumer_session_timeout_ms.unwrap_or(-1).to_be_bytes());
    out.extend_from_slice(&c.consumer_heartbeat_interval_ms.unwrap_or(-1).to_be_bytes());
    out.push(0);
    out
}

pub fn decode_group_configs_value(buf: &Bytes) -> Result<super::share::GroupConfigs, FormatError> {
    let mut r = Reader { buf, at: 0 };
    value_version_0(&mut r, "group configs")?;
    let session = r.i32()?;
    let heartbeat = r.i32()?;
    Ok(super::share::GroupConfigs {
        consumer_session_timeout_ms: (session > 0).then_some(session),
        consumer_heartbeat_interval_ms: (heartbeat > 0).then_some(heartbeat),
        ..Default::default()
    })
}

/// A share group as Sluice stores it (value version 0 under key 11; Sluice's own layout, as
/// Kafka keeps group configs in its metadata log):
/// `version:i16 epoch:i32 autoOffsetReset:i8 lockDurationMs:i32 readCommitted:i8 tagged`,
/// with -1 for a config not set. The release back-offs (delayed delivery) are tagged field 1:
/// `releaseBackoffMs:i32 releaseBackoffMaxMs:i32`; the dead-letter configs (KIP-1191) are tagged
/// field [`DLQ_CONFIG_TAG`]: `dlqTopic:compact_nullable_str copyRecord:i8` (-1: not set); a
/// record without a field has none of its configs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShareGroupValue {
    pub epoch: i32,
    pub configs: super::share::GroupConfigs,
}

/// A share group member as stored (Kafka's `ShareGroupMemberMetadataValue` v0 layout:
/// rack, client id, client host, subscribed topic names, tagged fields).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShareMemberValue {
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub subscribed_topic_names: Vec<String>,
}

/// A KIP-848 member as stored (`ConsumerGroupMemberMetadataValue` v0).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConsumerMemberValue {
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub subscribed_topic_names: Vec<String>,
    pub subscribed_topic_regex: Option<String>,
    pub rebalance_timeout_ms: i32,
    pub server_assignor: Option<String>,
    /// Set for a member that speaks the classic protocol (JoinGroup/SyncGroup) in a consumer
    /// group: Kafka's `ClassicMemberMetadata`, tagged field 0.
    pub classic: Option<ClassicMemberValue>,
}

/// A classic member of a consumer group as stored: its session timeout and the protocols (name,
/// ConsumerProtocol subscription) it sent in JoinGroup.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClassicMemberValue {
    pub session_timeout_ms: i32,
    pub protocols: Vec<(String, Bytes)>,
}

/// Partitions by topic id, as KIP-848 records hold them.
pub type TopicIdPartitions = Vec<([u8; 16], Vec<i32>)>;

/// A KIP-848 member's current assignment as stored
/// (`ConsumerGroupCurrentMemberAssignmentValue` v0): partitions by topic id.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CurrentAssignmentValue {
    pub member_epoch: i32,
    pub previous_member_epoch: i32,
    pub state: i8,
    pub assigned: TopicIdPartitions,
    pub revoking: TopicIdPartitions,
}

/// A committed offset as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetValue {
    pub offset: i64,
    /// -1 when unknown.
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_timestamp_ms: i64,
    /// Only in value v1 (explicit retention from OffsetCommit v2-v4); -1 otherwise.
    pub expire_timestamp_ms: i64,
}

/// One member as stored in a group metadata record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberValue {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: i32,
    pub session_timeout_ms: i32,
    pub subscription: Bytes,
    pub assignment: Bytes,
}

/// A group's generation as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupValue {
    pub protocol_type: String,
    pub generation: i32,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    pub current_state_timestamp_ms: i64,
    pub members: Vec<MemberValue>,
}

// ---- writing ----

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    assert!(
        b.len() <= i16::MAX as usize,
        "string too long for the record format"
    );
    out.extend_from_slice(&(b.len() as i16).to_be_bytes());
    out.extend_from_slice(b);
}
fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.extend_from_slice(&(-1i16).to_be_bytes()),
        Some(s) => put_str(out, s),
    }
}
fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
    out.extend_from_slice(b);
}

/// A key of `version` naming a group: `version:i16 group:string`.
fn key_of_group(version: i16, group: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + group.len());
    out.extend_from_slice(&version.to_be_bytes());
    put_str(&mut out, group);
    out
}

/// A key of `version` naming a group member: `version:i16 group:string member:string`.
fn key_of_member(version: i16, group: &str, member: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + group.len() + member.len());
    out.extend_from_slice(&version.to_be_bytes());
    put_str(&mut out, group);
    put_str(&mut out, member);
    out
}

/// Key v1 of an offset commit (v0 and v1 share the layout; Kafka writes v1).
pub fn offset_key(group: &str, topic: &str, partition: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + group.len() + topic.len());
    out.extend_from_slice(&1i16.to_be_bytes());
    put_str(&mut out, group);
    put_str(&mut out, topic);
    out.extend_from_slice(&partition.to_be_bytes());
    out
}

/// Key v2 of a group metadata record.
pub fn group_key(group: &str) -> Vec<u8> {
    key_of_group(2, group)
}

/// Offset value: v1 when an explicit expiry is set, v3 otherwise (Kafka's choice).
pub fn offset_value(v: &OffsetValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + v.metadata.len());
    if v.expire_timestamp_ms >= 0 {
        out.extend_from_slice(&1i16.to_be_bytes());
        out.extend_from_slice(&v.offset.to_be_bytes());
        put_str(&mut out, &v.metadata);
        out.extend_from_slice(&v.commit_timestamp_ms.to_be_bytes());
        out.extend_from_slice(&v.expire_timestamp_ms.to_be_bytes());
    } else {
        out.extend_from_slice(&3i16.to_be_bytes());
        out.extend_from_slice(&v.offset.to_be_bytes());
        out.extend_from_slice(&v.leader_epoch.to_be_bytes());
        put_str(&mut out, &v.metadata);
        out.extend_from_slice(&v.commit_timestamp_ms.to_be_bytes());
    }
    out
}

// KIP-848 records: keys as the classic ones (version, then i16-length strings); values in
// Kafka's flexible encoding (compact strings and arrays, an empty tagged-field section).

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}
fn put_compact_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            put_uvarint(out, s.len() as u64 + 1);
            out.extend_from_slice(s.as_bytes());
        }
    }
}
fn put_compact_str(out: &mut Vec<u8>, s: &str) {
    put_compact_opt_str(out, Some(s));
}
fn put_topic_partitions(out: &mut Vec<u8>, tps: &[([u8; 16], Vec<i32>)]) {
    put_uvarint(out, tps.len() as u64 + 1);
    for (id, ps) in tps {
        out.extend_from_slice(id);
        put_uvarint(out, ps.len() as u64 + 1);
        for p in ps {
            out.extend_from_slice(&p.to_be_bytes());
        }
        out.push(0);
    }
}

/// Key v3: a consumer group's metadata.
pub fn consumer_group_key(group: &str) -> Vec<u8> {
    key_of_group(3, group)
}

/// Key v5: a consumer group member's metadata.
pub fn consumer_member_key(group: &str, member: &str) -> Vec<u8> {
    key_of_member(5, group, member)
}

/// Key v6: a consumer group's target assignment epoch.
pub fn target_epoch_key(group: &str) -> Vec<u8> {
    key_of_group(6, group)
}

/// Key v7: a consumer group member's target assignment.
pub fn target_member_key(group: &str, member: &str) -> Vec<u8> {
    key_of_member(7, group, member)
}

/// `ConsumerGroupTargetAssignmentMetadataValue` v0: the assignment epoch.
pub fn target_epoch_value(epoch: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(7);
    out.extend_from_slice(&0i16.to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.push(0);
    out
}

pub fn decode_target_epoch_value(buf: &Bytes) -> Result<i32, FormatError> {
    let mut r = Reader { buf, at: 0 };
    value_version_0(&mut r, "target assignment epoch")?;
    r.i32()
}

/// `ConsumerGroupTargetAssignmentMemberValue` v0: the member's target partitions by topic id.
pub fn target_member_value(tps: &[([u8; 16], Vec<i32>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(&0i16.to_be_bytes());
    put_topic_partitions(&mut out, tps);
    out.push(0);
    out
}

pub fn decode_target_member_value(buf: &Bytes) -> Result<TopicIdPartitions, FormatError> {
    let mut r = Reader { buf, at: 0 };
    value_version_0(&mut r, "target assignment member")?;
    r.topic_partitions()
}

/// Key v8: a consumer group member's current assignment.
pub fn current_assignment_key(group: &str, member: &str) -> Vec<u8> {
    key_of_member(8, group, member)
}

/// Key v10: a share group member.
pub fn share_member_key(group: &str, member: &str) -> Vec<u8> {
    key_of_member(10, group, member)
}

/// Key v11: a share group.
pub fn share_group_key(group: &str) -> Vec<u8> {
    key_of_group(11, group)
}

/// The tagged field of [`ShareGroupValue`] holding the dead-letter configs (the KIP's number).
pub const DLQ_CONFIG_TAG: u64 = 1191;

/// [`ShareGroupValue`] v0.
pub fn share_group_value(v: &ShareGroupValue) -> Vec<u8> {
    use super::share::AutoOffsetReset;
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&0i16.to_be_bytes());
    out.extend_from_slice(&v.epoch.to_be_bytes());
    out.push(match v.configs.auto_offset_reset {
        None => -1i8,
        Some(AutoOffsetReset::Latest) => 0,
        Some(AutoOffsetReset::Earliest) => 1,
    } as u8);
    out.extend_from_slice(
        &v.configs
            .record_lock_duration_ms
            .unwrap_or(-1)
            .to_be_bytes(),
    );
    out.push(match v.configs.read_committed {
        None => -1i8,
        Some(false) => 0,
        Some(true) => 1,
    } as u8);
    // Tagged fields, in tag order, each written only when set: tag 1 (delayed delivery)
    // `releaseBackoffMs:i32 releaseBackoffMaxMs:i32`, -1 for a config not set; tag
    // [`DLQ_CONFIG_TAG`] (dead-letter topics) `dlqTopic:compact_nullable_str copyRecord:i8`.
    let c = &v.configs;
    let mut tags: Vec<(u64, Vec<u8>)> = Vec::new();
    if c.release_backoff_ms.is_some() || c.release_backoff_max_ms.is_some() {
        let mut f = Vec::with_capacity(8);
        f.extend_from_slice(&c.release_backoff_ms.unwrap_or(-1).to_be_bytes());
        f.extend_from_slice(&c.release_backoff_max_ms.unwrap_or(-1).to_be_bytes());
        tags.push((SHARE_GROUP_TAG_RELEASE_BACKOFF, f));
    }
    if c.dlq_topic.is_some() || c.dlq_copy_record.is_some() {
        let mut dlq = vec![];
        put_compact_opt_str(&mut dlq, c.dlq_topic.as_deref());
        dlq.push(match c.dlq_copy_record {
            None => -1i8,
            Some(false) => 0,
            Some(true) => 1,
        } as u8);
        tags.push((DLQ_CONFIG_TAG, dlq));
    }
    put_uvarint(&mut out, tags.len() as u64);
    for (tag, field) in tags {
        put_uvarint(&mut out, tag);
        put_uvarint(&mut out, field.len() as u64);
        out.extend_from_slice(&field);
    }
    out
}

/// The tagged field of a share group value holding the release back-off configs.
const SHARE_GROUP_TAG_RELEASE_BACKOFF: u64 = 1;

/// [`ShareMemberValue`] v0.
pub fn share_member_value(v: &ShareMemberValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&0i16.to_be_bytes());
    put_compact_opt_str(&mut out, v.rack_id.as_deref());
    put_compact_str(&mut out, &v.client_id);
    put_compact_str(&mut out, &v.client_host);
    put_uvarint(&mut out, v.subscribed_topic_names.len() as u64 + 1);
    for t in &v.subscribed_topic_names {
        put_compact_str(&mut out, t);
    }
    out.push(0);
    out
}

/// `ConsumerGroupMetadataValue` v0: the group epoch.
pub fn consumer_group_value(epoch: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(7);
    out.extend_from_slice(&0i16.to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.push(0);
    out
}

/// `ConsumerGroupMemberMetadataValue` v0.
pub fn consumer_member_value(v: &ConsumerMemberValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&0i16.to_be_bytes());
    put_compact_opt_str(&mut out, v.instance_id.as_deref());
    put_compact_opt_str(&mut out, v.rack_id.as_deref());
    put_compact_str(&mut out, &v.client_id);
    put_compact_str(&mut out, &v.client_host);
    put_uvarint(&mut out, v.subscribed_topic_names.len() as u64 + 1);
    for t in &v.subscribed_topic_names {
        put_compact_str(&mut out, t);
    }
    put_compact_opt_str(&mut out, v.subscribed_topic_regex.as_deref());
    out.extend_from_slice(&v.rebalance_timeout_ms.to_be_bytes());
    put_compact_opt_str(&mut out, v.server_assignor.as_deref());
    match &v.classic {
        None => out.push(0),
        Some(c) => {
            let mut f = Vec::with_capacity(64);
            f.extend_from_slice(&c.session_timeout_ms.to_be_bytes());
            put_uvarint(&mut f, c.protocols.len() as u64 + 1);
            for (name, meta) in &c.protocols {
                put_compact_str(&mut f, name);
                put_uvarint(&mut f, meta.len() as u64 + 1);
                f.extend_from_slice(meta);
                f.push(0);
            }
            f.push(0);
            put_uvarint(&mut out, 1);
            put_uvarint(&mut out, 0);
            put_uvarint(&mut out, f.len() as u64);
            out.extend_from_slice(&f);
        }
    }
    out
}

/// `ConsumerGroupCurrentMemberAssignmentValue` v0.
pub fn current_assignment_value(v: &CurrentAssignmentValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&0i16.to_be_bytes());
    out.extend_from_slice(&v.member_epoch.to_be_bytes());
    out.extend_from_slice(&v.previous_member_epoch.to_be_bytes());
    out.push(v.state as u8);
    put_topic_partitions(&mut out, &v.assigned);
    put_topic_partitions(&mut out, &v.revoking);
    out.push(0);
    out
}

/// Group metadata value v3.
pub fn group_value(v: &GroupValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&3i16.to_be_bytes());
    put_str(&mut out, &v.protocol_type);
    out.extend_from_slice(&v.generation.to_be_bytes());
    put_opt_str(&mut out, v.protocol.as_deref());
    put_opt_str(&mut out, v.leader.as_deref());
    out.extend_from_slice(&v.current_state_timestamp_ms.to_be_bytes());
    out.extend_from_slice(&(v.members.len() as i32).to_be_bytes());
    for m in &v.members {
        put_str(&mut out, &m.member_id);
        put_opt_str(&mut out, m.group_instance_id.as_deref());
        put_str(&mut out, &m.client_id);
        put_str(&mut out, &m.client_host);
        out.extend_from_slice(&m.rebalance_timeout_ms.to_be_bytes());
        out.extend_from_slice(&m.session_timeout_ms.to_be_bytes());
        put_bytes(&mut out, &m.subscription);
        put_bytes(&mut out, &m.assignment);
    }
    out
}

// ---- reading ----

/// The smallest encoded member (value v0): member id, client id and client host as empty strings
/// (2 bytes each), session timeout (4), subscription and assignment as empty bytes (4 each).
const MEMBER_BYTES_MIN: usize = 2 + 2 + 2 + 4 + 4 + 4;

struct Reader<'a> {
    buf: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.at)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| FormatError("truncated".into()))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn i16(&mut self) -> Result<i16, FormatError> {
        Ok(i16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn i32(&mut self) -> Result<i32, FormatError> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn i64(&mut self) -> Result<i64, FormatError> {
        Ok(i64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn opt_str(&mut self) -> Result<Option<String>, FormatError> {
        let n = self.i16()?;
        if n < 0 {
            return Ok(None);
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec())
            .map(Some)
            .map_err(|_| FormatError("string is not UTF-8".into()))
    }
    fn str(&mut self) -> Result<String, FormatError> {
        self.opt_str()?
            .ok_or_else(|| FormatError("null where a string is required".into()))
    }
    fn bytes(&mut self) -> Result<Bytes, FormatError> {
        let n = self.i32()?;
        if n < 0 {
            return Ok(Bytes::new());
        }
        let start = self.at;
        self.take(n as usize)?;
        Ok(self.buf.slice(start..self.at))
    }
    fn i8(&mut self) -> Result<i8, FormatError> {
        Ok(self.take(1)?[0] as i8)
    }
    fn uvarint(&mut self) -> Result<u64, FormatError> {
        let mut v = 0u64;
        for shift in (0..35).step_by(7) {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(FormatError("varint too long".into()))
    }
    /// A compact array's element count, refused when the remaining bytes cannot hold it at
    /// `min_bytes` each (`None`: a null array).
    fn compact_len(&mut self, min_bytes: usize) -> Result<Option<usize>, FormatError> {
        let n = self.uvarint()?;
        if n == 0 {
            return Ok(None);
        }
        let n = usize::try_from(n - 1).map_err(|_| FormatError("length overflow".into()))?;
        if n > self.remaining() / min_bytes.max(1) {
            return Err(FormatError(format!("array count {n} exceeds the record")));
        }
        Ok(Some(n))
    }
    fn compact_opt_str(&mut self) -> Result<Option<String>, FormatError> {
        let Some(n) = self.compact_len(1)? else {
            return Ok(None);
        };
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map(Some)
            .map_err(|_| FormatError("string is not UTF-8".into()))
    }
    fn compact_str(&mut self) -> Result<String, FormatError> {
        self.compact_opt_str()?
            .ok_or_else(|| FormatError("null where a string is required".into()))
    }
    fn skip_tagged(&mut self) -> Result<(), FormatError> {
        let n = self.uvarint()?;
        for _ in 0..n {
            let _tag = self.uvarint()?;
            let len = usize::try_from(self.uvarint()?)
                .map_err(|_| FormatError("length overflow".into()))?;
            self.take(len)?;
        }
        Ok(())
    }
    fn topic_partitions(&mut self) -> Result<TopicIdPartitions, FormatError> {
        // A topic takes at least its id, an empty partition array and its tagged fields.
        let n = self.compact_len(18)?.unwrap_or(0);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let id: [u8; 16] = self.take(16)?.try_into().expect("16 bytes");
            let np = self.compact_len(4)?.unwrap_or(0);
            let mut ps = Vec::with_capacity(np);
            for _ in 0..np {
                ps.push(self.i32()?);
            }
            self.skip_tagged()?;
            out.push((id, ps));
        }
        Ok(out)
    }
}

fn value_version_0(r: &mut Reader<'_>, what: &str) -> Result<(), FormatError> {
    match r.i16()? {
        0 => Ok(()),
        v => Err(FormatError(format!("unknown {what} value version {v}"))),
    }
}

/// `ConsumerGroupMetadataValue`: the group epoch.
pub fn decode_consumer_group_value(buf: &Bytes) -> Result<i32, FormatError> {
    let mut r = Reader { buf, at: 0 };
    value_version_0(&mut r, "consumer group")?;
    r.i32()
}

pub fn decode_consumer_member_value(buf: &Bytes) -> Result<ConsumerMemberValue, FormatError> {
    let mut r = Reader { buf, at: 0 };
    value_version_0(&mut r, "consumer member")?;
    let instance_id = r.compact_opt_str()?;
    let rack_id = r.compact_opt_str()?;
    let client_id = r.compact_str()?;
    let client_host = r.compact_str()?;
    let n = r.compact_len(1)?.unwrap_or(0);
    let mut subscribed_topic_names = Vec::with_capacity(n);
    for _ in 0..n {
        subscribed_topic_names.push(r.compact_str()?);
    }
    let subscribed_topic_regex = r.compact_opt_str()?;
    let rebalance_timeout_ms = r.i32()?;
    let server_assignor = r.compact_opt_str()?;
    // Tagged fields: 0 is the classic member metadata; others are skipped. A value written
    // before tagged fields were read ends here.
    let mut classic = None;
    if r.remaining() > 0 {
        let n = r.uvarint()?;
        for _ in 0..n {
            let tag = r.uvarint()?;
            let len =
                usize::try_from(r.uvarint()?).map_err(|_| FormatError("length overflow".into()))?;
            let start = r.at;
            r.take(len)?;
            if tag == 0 {
                let field = buf.slice(start..r.at);
                classic = Some(decode_classic_member(&field)?);
            }
        }
    }
    Ok(ConsumerMemberValue {
        instance_id,
        rack_id,
        client_id,
        client_host,
        subscribed_topic_names,
        subscribed_topic_regex,
        rebalance_timeout_ms,
        server_assignor,
        classic,
    })
}

fn decode_classic_member(buf: &Bytes) -> Result<ClassicMemberValue, FormatError> {
    let mut r = Reader { buf, at: 0 };
    let session_timeout_ms = r.i32()?;
    // A protocol takes at least its name, its metadata and its tagged fields.
    let n = r.compact_len(3)?.unwrap_or(0);
    let mut protocols = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.compact_str()?;
        let len = r.compact_len(1)?.unwrap_or(0);
        let start = r.at;
        r.take(len)?;
        let meta = buf.slice(start..r.at);
        r.skip_tagged()?;
        protocols.push((name, meta));
    }
    Ok(ClassicMemberValue {
        session_timeout_ms,
        protocols,
    })
}

pub fn decode_current_assignment_value(buf: &Bytes) -> Result<CurrentAssignmentValue, FormatError> {
    let mut r = Reader { buf, at: 0 };
    value_version_0(&mut r, "current assignment")?;
    Ok(CurrentAssignmentValue {
        member_epoch: r.i32()?,
        previous_member_epoch: r.i32()?,
        state: r.i8()?,
        assigned: r.topic_partitions()?,
        revoking: r.topic_partitions()?,
    })
}

pub fn decode_share_group_value(buf: &Bytes) -> Result<ShareGroupValue, FormatError> {
    use super::share::AutoOffsetReset;
    let mut r = Reader { buf, at: 0 };
    value_version_0(&mut r, "share group")?;
    let epoch = r.i32()?;
    let auto_offset_reset = match r.i8()? {
        0 => Some(AutoOffsetReset::Latest),
        1 => Some(AutoOffsetReset::Earliest),
        _ => None,
    };
    let lock = r.i32()?;
    let read_committed = match r.i8()? {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    };
    // Tagged fields (a value written before they were read ends here); unknown tags skipped.
    let (mut release_backoff_ms, mut release_backoff_max_ms) = (None, None);
    let (mut dlq_topic, mut dlq_copy_record) = (None, None);
    if r.remaining() > 0 {
        let n = r.uvarint()?;
        for _ in 0..n {
            let tag = r.uvarint()?;
            let len =
                usize::try_from(r.uvarint()?).map_err(|_| FormatError("length overflow".into()))?;
            let start = r.at;
            r.take(len)?;
            let field = buf.slice(start..r.at);
            let mut f = Reader { buf: &field, at: 0 };
            if tag == SHARE_GROUP_TAG_RELEASE_BACKOFF {
                release_backoff_ms = Some(f.i32()?).filter(|v| *v >= 0);
                release_backoff_max_ms = Some(f.i32()?).filter(|v| *v >= 0);
            } else if tag == DLQ_CONFIG_TAG {
                dlq_topic = f.compact_opt_str()?;
                dlq_copy_record = match f.i8()? {
                    0 => Some(false),
                    1 => Some(true),
                    _ => None,
                };
            }
        }
    }
    Ok(ShareGroupValue {
        epoch,
        configs: super::share::GroupConfigs {
            auto_offset_reset,
            record_lock_duration_ms: (lock > 0).then_some(lock),
            read_committed,
            release_backoff_ms,
            release_backoff_max_ms,
            dlq_topic,
            dlq_copy_record,
            ..Default::default()
        },
    })
}

pub fn decode_share_member_value(buf: &Bytes) -> Result<ShareMemberValue, FormatError> {
    let mut r = Reader { buf, at: 0 };
    value_version_0(&mut r, "share member")?;
    let rack_id = r.compact_opt_str()?;
    let client_id = r.compact_str()?;
    let client_host = r.compact_str()?;
    let n = r.compact_len(1)?.unwrap_or(0);
    let mut subscribed_topic_names = Vec::with_capacity(n);
    for _ in 0..n {
        subscribed_topic_names.push(r.compact_str()?);
    }
    Ok(ShareMemberValue {
        rack_id,
        client_id,
        client_host,
        subscribed_topic_names,
    })
}

pub fn decode_key(buf: &Bytes) -> Result<RecordKey, FormatError> {
    let mut r = Reader { buf, at: 0 };
    match r.i16()? {
        0 | 1 => Ok(RecordKey::Offset {
            group: r.str()?,
            topic: r.str()?,
            partition: r.i32()?,
        }),
        2 => Ok(RecordKey::Group { group: r.str()? }),
        3 => Ok(RecordKey::ConsumerGroup { group: r.str()? }),
        5 => Ok(RecordKey::ConsumerMember {
            group: r.str()?,
            member: r.str()?,
        }),
        6 => Ok(RecordKey::ConsumerTargetEpoch { group: r.str()? }),
        7 => Ok(RecordKey::ConsumerTargetMember {
            group: r.str()?,
            member: r.str()?,
        }),
        8 => Ok(RecordKey::ConsumerAssignment {
            group: r.str()?,
            member: r.str()?,
        }),
        10 => Ok(RecordKey::ShareMember {
            group: r.str()?,
            member: r.str()?,
        }),
        11 => Ok(RecordKey::ShareGroup { group: r.str()? }),
        GROUP_CONFIGS_KEY_VERSION => Ok(RecordKey::GroupConfigs { group: r.str()? }),
        v => Err(FormatError(format!("unknown key version {v}"))),
    }
}

pub fn decode_offset_value(buf: &Bytes) -> Result<OffsetValue, FormatError> {
    let mut r = Reader { buf, at: 0 };
    let version = r.i16()?;
    let offset = r.i64()?;
    let mut v = OffsetValue {
        offset,
        leader_epoch: -1,
        metadata: String::new(),
        commit_timestamp_ms: 0,
        expire_timestamp_ms: -1,
    };
    match version {
        0 | 2 => {
            v.metadata = r.str()?;
            v.commit_timestamp_ms = r.i64()?;
        }
        1 => {
            v.metadata = r.str()?;
            v.commit_timestamp_ms = r.i64()?;
            v.expire_timestamp_ms = r.i64()?;
        }
        3 => {
            v.leader_epoch = r.i32()?;
            v.metadata = r.str()?;
            v.commit_timestamp_ms = r.i64()?;
        }
        other => return Err(FormatError(format!("unknown offset value version {other}"))),
    }
    Ok(v)
}

pub fn decode_group_value(buf: &Bytes) -> Result<GroupValue, FormatError> {
    let mut r = Reader { buf, at: 0 };
    let version = r.i16()?;
    if !(0..=3).contains(&version) {
        return Err(FormatError(format!(
            "unknown group value version {version}"
        )));
    }
    let protocol_type = r.str()?;
    let generation = r.i32()?;
    let protocol = r.opt_str()?;
    let leader = r.opt_str()?;
    let current_state_timestamp_ms = if version >= 2 { r.i64()? } else { -1 };
    let n = r.i32()?;
    // Refuse a count the remaining bytes cannot hold before allocating for it.
    let n = usize::try_from(n)
        .ok()
        .filter(|n| *n <= r.remaining() / MEMBER_BYTES_MIN)
        .ok_or_else(|| FormatError(format!("member count {n} invalid")))?;
    let mut members = Vec::with_capacity(n);
    for _ in 0..n {
        let member_id = r.str()?;
        let group_instance_id = if version >= 3 { r.opt_str()? } else { None };
        let client_id = r.str()?;
        let client_host = r.str()?;
        let rebalance_timeout_ms = if version >= 1 { r.i32()? } else { -1 };
        let session_timeout_ms = r.i32()?;
        let rebalance_timeout_ms = if rebalance_timeout_ms < 0 {
            session_timeout_ms
        } else {
            rebalance_timeout_ms
        };
        members.push(MemberValue {
            member_id,
            group_instance_id,
            client_id,
            client_host,
            rebalance_timeout_ms,
            session_timeout_ms,
            subscription: r.bytes()?,
            assignment: r.bytes()?,
        });
    }
    Ok(GroupValue {
        protocol_type,
        generation,
        protocol,
        leader,
        current_state_timestamp_ms,
        members,
    })
}

/// The topics a `consumer`-protocol subscription names (ConsumerProtocolSubscription, any
/// version: `version:i16 topics:[str] …`). `None` if it does not parse.
pub fn subscription_topics(subscription: &[u8]) -> Option<Vec<String>> {
    let buf = Bytes::copy_from_slice(subscription);
    let mut r = Reader { buf: &buf, at: 0 };
    let _version = r.i16().ok()?;
    let n = usize::try_from(r.i32().ok()?).ok()?;
    // Each topic name takes at least its 2-byte length.
    if n > r.remaining() / 2 {
        return None;
    }
    (0..n).map(|_| r.str().ok()).collect()
}

/// A `consumer`-protocol subscription (ConsumerProtocolSubscription v0–v3) as a classic member
/// sends it in JoinGroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscription {
    pub version: i16,
    pub topics: Vec<String>,
    /// v1+: the partitions the member owns (by topic name); `None` before v1.
    pub owned: Option<Vec<(String, Vec<i32>)>>,
    /// v3+.
    pub rack_id: Option<String>,
}

/// Parses a ConsumerProtocolSubscription; `None` if it does not parse. Counts are checked
/// against the bytes left before anything is allocated.
pub fn decode_subscription(subscription: &[u8]) -> Option<Subscription> {
    let buf = Bytes::copy_from_slice(subscription);
    let mut r = Reader { buf: &buf, at: 0 };
    let version = r.i16().ok()?;
    if version < 0 {
        return None;
    }
    let n = usize::try_from(r.i32().ok()?).ok()?;
    if n > r.remaining() / 2 {
        return None;
    }
    let topics = (0..n).map(|_| r.str().ok()).collect::<Option<Vec<_>>>()?;
    let mut out = Subscription {
        version,
        topics,
        ..Default::default()
    };
    // User data.
    r.bytes().ok()?;
    if version >= 1 {
        out.owned = Some(topic_partitions_by_name(&mut r)?);
    }
    if version >= 2 {
        let _generation = r.i32().ok()?;
    }
    if version >= 3 {
        out.rack_id = r.opt_str().ok()?;
    }
    Some(out)
}

/// `[topic:str partitions:[i32]]` with i32 counts, checked against the bytes left.
fn topic_partitions_by_name(r: &mut Reader<'_>) -> Option<Vec<(String, Vec<i32>)>> {
    let n = r.i32().ok()?;
    if n < 0 {
        return Some(vec![]);
    }
    let n = n as usize;
    // A topic takes at least its name length and its partition count.
    if n > r.remaining() / 6 {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = r.str().ok()?;
        let np = usize::try_from(r.i32().ok()?).ok()?;
        if np > r.remaining() / 4 {
            return None;
        }
        let ps = (0..np).map(|_| r.i32().ok()).collect::<Option<Vec<_>>>()?;
        out.push((t, ps));
    }
    Some(out)
}

/// The partitions of a ConsumerProtocolAssignment (any version); `None` if it does not parse.
pub fn decode_assignment(assignment: &[u8]) -> Option<Vec<(String, Vec<i32>)>> {
    if assignment.is_empty() {
        return Some(vec![]);
    }
    let buf = Bytes::copy_from_slice(assignment);
    let mut r = Reader { buf: &buf, at: 0 };
    if r.i16().ok()? < 0 {
        return None;
    }
    topic_partitions_by_name(&mut r)
}

/// A ConsumerProtocolAssignment of `version` (0–3 share the layout) with no user data.
pub fn encode_assignment(version: i16, partitions: &[(String, Vec<i32>)]) -> Bytes {
    let mut out = Vec::with_capacity(16 + partitions.len() * 16);
    out.extend_from_slice(&version.clamp(0, 3).to_be_bytes());
    out.extend_from_slice(&(partitions.len() as i32).to_be_bytes());
    for (t, ps) in partitions {
        put_str(&mut out, t);
        out.extend_from_slice(&(ps.len() as i32).to_be_bytes());
        for p in ps {
            out.extend_from_slice(&p.to_be_bytes());
        }
    }
    out.extend_from_slice(&(-1i32).to_be_bytes());
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_protocol_subscription_and_assignment_round_trip() {
        // Subscription v3: topics, user data, owned partitions, generation, rack.
        let mut s = vec![0, 3];
        s.extend(1i32.to_be_bytes());
        put_str(&mut s, "t");
        s.extend((-1i32).to_be_bytes());
        s.extend(1i32.to_be_bytes());
        put_str(&mut s, "t");
        s.extend(2i32.to_be_bytes());
        s.extend(0i32.to_be_bytes());
        s.extend(3i32.to_be_bytes());
        s.extend(7i32.to_be_bytes());
        put_opt_str(&mut s, Some("r1"));
        let d = decode_subscription(&s).unwrap();
        assert_eq!(d.topics, vec!["t".to_string()]);
        assert_eq!(d.owned, Some(vec![("t".to_string(), vec![0, 3])]));
        assert_eq!(d.rack_id.as_deref(), Some("r1"));
        // v0 has no owned partitions.
        let mut v0 = vec![0, 0];
        v0.extend(1i32.to_be_bytes());
        put_str(&mut v0, "t");
        v0.extend((-1i32).to_be_bytes());
        assert_eq!(decode_subscription(&v0).unwrap().owned, None);
        // A huge owned count is refused, not allocated.
        let mut bad = s[..s.len() - 30].to_vec();
        bad.extend(i32::MAX.to_be_bytes());
        assert!(decode_subscription(&bad).is_none());
        let a = vec![("a".to_string(), vec![1, 2]), ("b".to_string(), vec![])];
        assert_eq!(decode_assignment(&encode_assignment(1, &a)), Some(a));
        assert_eq!(decode_assignment(&[]), Some(vec![]));
        assert_eq!(decode_assignment(&[0, 0, 0x7f, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn classic_member_metadata_round_trips_as_tagged_field() {
        let v = ConsumerMemberValue {
            client_id: "c".into(),
            client_host: "h".into(),
            subscribed_topic_names: vec!["t".into()],
            rebalance_timeout_ms: 1000,
            classic: Some(ClassicMemberValue {
                session_timeout_ms: 10_000,
                protocols: vec![("range".into(), Bytes::from_static(b"sub"))],
            }),
            ..Default::default()
        };
        let b = Bytes::from(consumer_member_value(&v));
        assert_eq!(decode_consumer_member_value(&b).unwrap(), v);
        for n in 0..b.len() {
            let _ = decode_consumer_member_value(&b.slice(..n));
        }
    }

    #[test]
    fn consumer_group_records_round_trip() {
        let k = Bytes::from(consumer_member_key("g", "m"));
        assert_eq!(
            decode_key(&k).unwrap(),
            RecordKey::ConsumerMember {
                group: "g".into(),
                member: "m".into()
            }
        );
        let k = Bytes::from(current_assignment_key("g", "m"));
        assert!(matches!(
            decode_key(&k).unwrap(),
            RecordKey::ConsumerAssignment { .. }
        ));
        let k = Bytes::from(consumer_group_key("g"));
        assert_eq!(
            decode_key(&k).unwrap(),
            RecordKey::ConsumerGroup { group: "g".into() }
        );
        assert_eq!(
            decode_consumer_group_value(&Bytes::from(consumer_group_value(7))).unwrap(),
            7
        );
        let m = ConsumerMemberValue {
            instance_id: Some("i".into()),
            rack_id: None,
            client_id: "c".into(),
            client_host: "/1.2.3.4".into(),
            subscribed_topic_names: vec!["a".into(), "b".into()],
            subscribed_topic_regex: Some("t.*".into()),
            rebalance_timeout_ms: 300_000,
            server_assignor: Some("range".into()),
            classic: None,
        };
        assert_eq!(
            decode_consumer_member_value(&Bytes::from(consumer_member_value(&m))).unwrap(),
            m
        );
        let a = CurrentAssignmentValue {
            member_epoch: 5,
            previous_member_epoch: 4,
            state: 1,
            assigned: vec![([1; 16], vec![0, 2]), ([2; 16], vec![])],
            revoking: vec![([3; 16], vec![1])],
        };
        assert_eq!(
            decode_current_assignment_value(&Bytes::from(current_assignment_value(&a))).unwrap(),
            a
        );
        // A count larger than the record is refused before allocating.
        let mut bad = current_assignment_value(&a);
        bad.truncate(11);
        bad.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f]);
        assert!(decode_current_assignment_value(&Bytes::from(bad)).is_err());
        // Every truncation of a member record is an error, never a panic (the last byte is the
        // empty tagged-field section, which the reader does not need).
        let mv = consumer_member_value(&m);
        for cut in 0..mv.len() - 1 {
            assert!(
                decode_consumer_member_value(&Bytes::copy_from_slice(&mv[..cut])).is_err(),
                "cut at {cut}"
            );
        }
        // A subscription count of 2^32 - 2 names in a record of a few bytes: refused before it
        // sizes anything. Version, two null strings, two empty strings, then the count.
        let mut huge = vec![0, 0, 0, 0, 1, 1];
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(decode_consumer_member_value(&Bytes::from(huge)).is_err());
    }

    #[test]
    fn offset_key_and_values_round_trip() {
        let k = Bytes::from(offset_key("g", "orders", 7));
        assert_eq!(
            decode_key(&k).unwrap(),
            RecordKey::Offset {
                group: "g".into(),
                topic: "orders".into(),
                partition: 7
            }
        );
        for expire in [-1, 99] {
            let v = OffsetValue {
                offset: 1234,
                leader_epoch: if expire < 0 { 5 } else { -1 },
                metadata: "meta".into(),
                commit_timestamp_ms: 42,
                expire_timestamp_ms: expire,
            };
            assert_eq!(
                decode_offset_value(&Bytes::from(offset_value(&v))).unwrap(),
                v
            );
        }
    }

    #[test]
    fn offset_value_v3_matches_kafka_layout() {
        // Kafka OffsetCommitValue v3: version, offset, leaderEpoch, metadata, commitTimestamp.
        let v = OffsetValue {
            offset: 1,
            leader_epoch: 2,
            metadata: "m".into(),
            commit_timestamp_ms: 3,
            expire_timestamp_ms: -1,
        };
        let b = offset_value(&v);
        let mut want = vec![0, 3];
        want.extend(1i64.to_be_bytes());
        want.extend(2i32.to_be_bytes());
        want.extend([0, 1, b'm']);
        want.extend(3i64.to_be_bytes());
        assert_eq!(b, want);
    }

    #[test]
    fn group_value_round_trips_and_v0_decodes() {
        let v = GroupValue {
            protocol_type: "consumer".into(),
            generation: 3,
            protocol: Some("range".into()),
            leader: Some("m1".into()),
            current_state_timestamp_ms: 77,
            members: vec![MemberValue {
                member_id: "m1".into(),
                group_instance_id: Some("i1".into()),
                client_id: "c".into(),
                client_host: "/127.0.0.1".into(),
                rebalance_timeout_ms: 300000,
                session_timeout_ms: 10000,
                subscription: Bytes::from_static(b"sub"),
                assignment: Bytes::from_static(b"asg"),
            }],
        };
        let k = Bytes::from(group_key("grp"));
        assert_eq!(
            decode_key(&k).unwrap(),
            RecordKey::Group {
                group: "grp".into()
            }
        );
        assert_eq!(
            decode_group_value(&Bytes::from(group_value(&v))).unwrap(),
            v
        );
        // v0: no instance id, rebalance timeout or state timestamp.
        let mut b = vec![0, 0];
        put_str(&mut b, "consumer");
        b.extend(1i32.to_be_bytes());
        put_opt_str(&mut b, None);
        put_opt_str(&mut b, None);
        b.extend(0i32.to_be_bytes());
        let g = decode_group_value(&Bytes::from(b)).unwrap();
        assert_eq!(g.generation, 1);
        assert!(g.members.is_empty());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode_key(&Bytes::from_static(&[0, 9])).is_err());
        assert!(decode_key(&Bytes::from_static(&[0, 1, 0, 5, b'a'])).is_err());
        assert!(decode_group_value(&Bytes::from_static(&[0, 3, 0])).is_err());
        assert!(decode_offset_value(&Bytes::from_static(&[0, 3, 0, 0])).is_err());
    }

    #[test]
    fn consumer_subscription_topics_parse() {
        let mut s = vec![0, 1];
        s.extend(2i32.to_be_bytes());
        put_str(&mut s, "a");
        put_str(&mut s, "bb");
        s.extend((-1i32).to_be_bytes()); // user data
        assert_eq!(
            subscription_topics(&s),
            Some(vec!["a".to_string(), "bb".to_string()])
        );
        assert_eq!(subscription_topics(&[0]), None);
    }

    #[test]
    fn huge_member_count_and_lengths_are_refused_before_allocating() {
        // Group value v3 with no members, then its member count set to i32::MAX: without the
        // check this reserves 2^31 members (hundreds of GB) and aborts.
        let v = GroupValue {
            protocol_type: "consumer".into(),
            generation: 1,
            protocol: None,
            leader: None,
            current_state_timestamp_ms: 0,
            members: vec![],
        };
        let mut b = group_value(&v);
        let at = b.len() - 4;
        b[at..].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(decode_group_value(&Bytes::from(b.clone())).is_err());
        // A count that the bytes could hold only at one byte per member is refused too.
        b[at..].copy_from_slice(&3i32.to_be_bytes());
        b.extend_from_slice(&[0u8; 20]);
        assert!(decode_group_value(&Bytes::from(b)).is_err());
        // A member whose subscription declares i32::MAX bytes.
        let mut m = group_value(&GroupValue {
            members: vec![MemberValue {
                member_id: "m".into(),
                group_instance_id: None,
                client_id: "c".into(),
                client_host: "h".into(),
                rebalance_timeout_ms: 1,
                session_timeout_ms: 1,
                subscription: Bytes::new(),
                assignment: Bytes::new(),
            }],
            ..v
        });
        let at = m.len() - 8;
        m[at..at + 4].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(decode_group_value(&Bytes::from(m)).is_err());
        // Subscriptions naming 2^31-1 topics.
        let mut s = vec![0, 1];
        s.extend_from_slice(&i32::MAX.to_be_bytes());
        s.extend_from_slice(&[0, 1, b'a']);
        assert_eq!(subscription_topics(&s), None);
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn name() -> impl Strategy<Value = String> {
            "[a-zA-Z0-9._-]{0,20}"
        }

        fn member() -> impl Strategy<Value = MemberValue> {
            (
                name(),
                prop::option::of(name()),
                name(),
                name(),
                0i32..100_000,
                prop::collection::vec(any::<u8>(), 0..30),
                prop::collection::vec(any::<u8>(), 0..30),
            )
                .prop_map(
                    |(member_id, group_instance_id, client_id, client_host, t, s, a)| MemberValue {
                        member_id,
                        group_instance_id,
                        client_id,
                        client_host,
                        rebalance_timeout_ms: t,
                        session_timeout_ms: t,
                        subscription: s.into(),
                        assignment: a.into(),
                    },
                )
        }

        fn mutate(
            b: &mut Vec<u8>,
            flips: &[(prop::sample::Index, u8)],
            huge: Option<prop::sample::Index>,
            cut: Option<prop::sample::Index>,
        ) {
            for (i, x) in flips {
                if !b.is_empty() {
                    let i = i.index(b.len());
                    b[i] ^= x;
                }
            }
            if let Some(i) = huge {
                if b.len() >= 4 {
                    let i = i.index(b.len() - 3);
                    b[i..i + 4].copy_from_slice(&i32::MAX.to_be_bytes());
                }
            }
            if let Some(c) = cut {
                if !b.is_empty() {
                    b.truncate(c.index(b.len()));
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..200)) {
                let b = Bytes::from(data);
                let _ = decode_key(&b);
                let _ = decode_offset_value(&b);
                let _ = decode_group_value(&b);
                let _ = subscription_topics(&b);
            }

            #[test]
            fn records_round_trip_and_mutations_never_panic(
                group in name(),
                topic in name(),
                partition in any::<i32>(),
                offset in any::<i64>(),
                expire in prop::option::of(0i64..i64::MAX),
                metadata in name(),
                members in prop::collection::vec(member(), 0..4),
                topics in prop::collection::vec(name(), 0..5),
                flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..), 0..3),
                huge in prop::option::of(any::<prop::sample::Index>()),
                cut in prop::option::of(any::<prop::sample::Index>()),
            ) {
                let key = offset_key(&group, &topic, partition);
                prop_assert_eq!(
                    decode_key(&Bytes::from(key.clone())).unwrap(),
                    RecordKey::Offset { group: group.clone(), topic: topic.clone(), partition }
                );
                let ov = OffsetValue {
                    offset,
                    leader_epoch: if expire.is_some() { -1 } else { 3 },
                    metadata,
                    commit_timestamp_ms: 5,
                    expire_timestamp_ms: expire.unwrap_or(-1),
                };
                let ob = offset_value(&ov);
                prop_assert_eq!(decode_offset_value(&Bytes::from(ob.clone())).unwrap(), ov);
                let gv = GroupValue {
                    protocol_type: "consumer".into(),
                    generation: 7,
                    protocol: Some("range".into()),
                    leader: members.first().map(|m| m.member_id.clone()),
                    current_state_timestamp_ms: 9,
                    members,
                };
                let gb = group_value(&gv);
                prop_assert_eq!(decode_group_value(&Bytes::from(gb.clone())).unwrap(), gv);
                let mut sub = vec![0u8, 1];
                sub.extend_from_slice(&(topics.len() as i32).to_be_bytes());
                for t in &topics {
                    sub.extend_from_slice(&(t.len() as i16).to_be_bytes());
                    sub.extend_from_slice(t.as_bytes());
                }
                prop_assert_eq!(subscription_topics(&sub), Some(topics));

                for mut b in [key, ob, gb, sub] {
                    mutate(&mut b, &flips, huge, cut);
                    let b = Bytes::from(b);
                    let _ = decode_key(&b);
                    let _ = decode_offset_value(&b);
                    if let Ok(g) = decode_group_value(&b) {
                        prop_assert!(g.members.len() <= b.len() / MEMBER_BYTES_MIN);
                    }
                    if let Some(t) = subscription_topics(&b) {
                        prop_assert!(t.len() <= b.len() / 2);
                    }
                }
            }
        }
    }

    #[test]
    fn share_group_records_round_trip_and_hostile_ones_are_refused() {
        let m = ShareMemberValue {
            rack_id: Some("r1".into()),
            client_id: "client".into(),
            client_host: "/127.0.0.1".into(),
            subscribed_topic_names: vec!["a".into(), "b".into()],
        };
        let mv = share_member_value(&m);
        assert_eq!(
            decode_share_member_value(&Bytes::from(mv.clone())).unwrap(),
            m
        );
        // Every truncation is an error (the last byte is the empty tagged-field section).
        for cut in 0..mv.len() - 1 {
            assert!(
                decode_share_member_value(&Bytes::copy_from_slice(&mv[..cut])).is_err(),
                "cut at {cut}"
            );
        }
        // A subscription count of 2^32 - 2 in a record of a few bytes: refused before it sizes
        // anything. Version, a null rack, two empty strings, then the count.
        let mut huge = vec![0, 0, 0, 1, 1];
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(decode_share_member_value(&Bytes::from(huge)).is_err());
        let g = ShareGroupValue {
            epoch: 7,
            configs: crate::group::share::GroupConfigs {
                auto_offset_reset: Some(crate::group::share::AutoOffsetReset::Earliest),
                record_lock_duration_ms: Some(15_000),
                read_committed: None,
                ..Default::default()
            },
        };
        // Group configs (key v1000): round trip, and unset values stay unset.
        let k = group_configs_key("g1");
        assert_eq!(
            decode_key(&Bytes::from(k)).unwrap(),
            RecordKey::GroupConfigs { group: "g1".into() }
        );
        for c in [
            crate::group::share::GroupConfigs {
                consumer_session_timeout_ms: Some(50_000),
                consumer_heartbeat_interval_ms: Some(7_000),
                ..Default::default()
            },
            crate::group::share::GroupConfigs {
                consumer_heartbeat_interval_ms: Some(7_000),
                ..Default::default()
            },
        ] {
            let v = group_configs_value(&c);
            assert_eq!(decode_group_configs_value(&Bytes::from(v)).unwrap(), c);
        }
        let gv = share_group_value(&g);
        assert_eq!(
            decode_share_group_value(&Bytes::from(gv.clone())).unwrap(),
            g
        );
        for cut in 0..gv.len() - 1 {
            assert!(decode_share_group_value(&Bytes::copy_from_slice(&gv[..cut])).is_err());
        }
        // The release back-offs ride in tagged field 1: round trip, and every cut inside the
        // tagged section is an error (a value cut before it reads as one written without it).
        let mut g2 = g.clone();
        g2.configs.release_backoff_ms = Some(2_000);
        let gv2 = share_group_value(&g2);
        assert_eq!(
            decode_share_group_value(&Bytes::from(gv2.clone())).unwrap(),
            g2
        );
        g2.configs.release_backoff_max_ms = Some(60_000);
        let gv2 = share_group_value(&g2);
        assert_eq!(
            decode_share_group_value(&Bytes::from(gv2.clone())).unwrap(),
            g2
        );
        for cut in gv.len()..gv2.len() {
            assert!(
                decode_share_group_value(&Bytes::copy_from_slice(&gv2[..cut])).is_err(),
                "cut at {cut}"
            );
        }
        // An unknown tag is skipped.
        let mut other = gv[..gv.len() - 1].to_vec();
        other.extend_from_slice(&[1, 9, 2, 0xab, 0xcd]);
        assert_eq!(decode_share_group_value(&Bytes::from(other)).unwrap(), g);
        // The dead-letter configs ride in a tagged field: round trip, and every cut inside
        // the tagged section is an error.
        let mut d = g.clone();
        d.configs.dlq_topic = Some("dlq.orders".into());
        d.configs.dlq_copy_record = Some(true);
        let dv = share_group_value(&d);
        assert_eq!(
            decode_share_group_value(&Bytes::from(dv.clone())).unwrap(),
            d
        );
        for cut in gv.len()..dv.len() {
            assert!(decode_share_group_value(&Bytes::copy_from_slice(&dv[..cut])).is_err());
        }
        assert_eq!(
            decode_key(&Bytes::from(share_member_key("g", "m"))).unwrap(),
            RecordKey::ShareMember {
                group: "g".into(),
                member: "m".into()
            }
        );
        assert_eq!(
            decode_key(&Bytes::from(share_group_key("g"))).unwrap(),
            RecordKey::ShareGroup { group: "g".into() }
        );
    }
}
