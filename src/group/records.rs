//! Kafka's `__consumer_offsets` record formats for offset commits, so the log is readable by
//! Kafka tooling: key v1 `(group, topic, partition)`, value v3 `(offset, leader epoch, metadata,
//! commit timestamp)`; a null value is a tombstone.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const KEY_VERSION_OFFSET: i16 = 1;
pub const VALUE_VERSION_OFFSET: i16 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetKey {
    pub group: String,
    pub topic: String,
    pub partition: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetValue {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_timestamp_ms: i64,
}

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_i16(s.len() as i16);
    b.put_slice(s.as_bytes());
}

fn get_str(b: &mut Bytes) -> Option<String> {
    if b.remaining() < 2 {
        return None;
    }
    let n = b.get_i16();
    if n < 0 {
        return Some(String::new());
    }
    let n = n as usize;
    if b.remaining() < n {
        return None;
    }
    let s = b.split_to(n);
    String::from_utf8(s.to_vec()).ok()
}

pub fn encode_key(k: &OffsetKey) -> Bytes {
    let mut b = BytesMut::with_capacity(8 + k.group.len() + k.topic.len());
    b.put_i16(KEY_VERSION_OFFSET);
    put_str(&mut b, &k.group);
    put_str(&mut b, &k.topic);
    b.put_i32(k.partition);
    b.freeze()
}

pub fn encode_value(v: &OffsetValue) -> Bytes {
    let mut b = BytesMut::with_capacity(32 + v.metadata.len());
    b.put_i16(VALUE_VERSION_OFFSET);
    b.put_i64(v.offset);
    b.put_i32(v.leader_epoch);
    put_str(&mut b, &v.metadata);
    b.put_i64(v.commit_timestamp_ms);
    b.freeze()
}

/// An offset-commit key; `None` for other record kinds (group metadata) or damage.
pub fn decode_key(mut b: Bytes) -> Option<OffsetKey> {
    if b.remaining() < 2 {
        return None;
    }
    let version = b.get_i16();
    if version != 0 && version != 1 {
        return None;
    }
    let group = get_str(&mut b)?;
    let topic = get_str(&mut b)?;
    if b.remaining() < 4 {
        return None;
    }
    Some(OffsetKey {
        group,
        topic,
        partition: b.get_i32(),
    })
}

/// An offset-commit value of any version Kafka has written (0-3).
pub fn decode_value(mut b: Bytes) -> Option<OffsetValue> {
    if b.remaining() < 10 {
        return None;
    }
    let version = b.get_i16();
    let offset = b.get_i64();
    let leader_epoch = if version >= 3 {
        if b.remaining() < 4 {
            return None;
        }
        b.get_i32()
    } else {
        -1
    };
    let metadata = get_str(&mut b)?;
    if b.remaining() < 8 {
        return None;
    }
    let commit_timestamp_ms = b.get_i64();
    Some(OffsetValue {
        offset,
        leader_epoch,
        metadata,
        commit_timestamp_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_records_round_trip() {
        let k = OffsetKey {
            group: "g".into(),
            topic: "orders".into(),
            partition: 3,
        };
        let v = OffsetValue {
            offset: 42,
            leader_epoch: 0,
            metadata: "m".into(),
            commit_timestamp_ms: 7,
        };
        assert_eq!(decode_key(encode_key(&k)), Some(k));
        assert_eq!(decode_value(encode_value(&v)), Some(v));
        assert_eq!(decode_key(Bytes::from_static(&[0, 2, 0, 1, b'g'])), None);
        assert_eq!(decode_value(Bytes::from_static(&[0, 3, 0])), None);
    }
}
