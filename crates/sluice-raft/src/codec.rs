//! Byte formats: the records of the log file, the hard-state file, the coalesced heartbeat
//! frame of the transport, and the check every raft message from the network passes before the
//! protobuf decoder sees it.
//!
//! Every decoder here checks a declared length against the bytes present before it slices or
//! allocates, uses checked arithmetic, and returns an error instead of panicking.

use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Message, MessageType, Snapshot};

/// Decoding failed: the bytes are not what the format says. The text names what was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Malformed {}

/// A cursor over bytes that refuses to read past their end.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn bytes(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        if len > self.buf.len() {
            return Err(Malformed(what));
        }
        let (head, tail) = self.buf.split_at(len);
        self.buf = tail;
        Ok(head)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, Malformed> {
        Ok(self.bytes(1, what)?[0])
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, Malformed> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, Malformed> {
        let b = self.bytes(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A protobuf-style varint (7 bits a byte, at most 10 bytes).
    pub fn varint(&mut self, what: &'static str) -> Result<u64, Malformed> {
        let mut pos = 0;
        let v = read_varint(self.buf, &mut pos).map_err(|_| Malformed(what))?;
        self.buf = &self.buf[pos..];
        Ok(v)
    }

    /// A u32 length followed by that many bytes; the length is checked against what remains.
    pub fn len_bytes(&mut self, what: &'static str) -> Result<&'a [u8], Malformed> {
        let len = self.u32(what)? as usize;
        self.bytes(len, what)
    }

    /// A u32 count of u64s; the count is checked against what remains before anything is
    /// allocated.
    pub fn u64s(&mut self, what: &'static str) -> Result<Vec<u64>, Malformed> {
        let count = self.u32(what)? as usize;
        if count > self.remaining() / 8 {
            return Err(Malformed(what));
        }
        (0..count).map(|_| self.u64(what)).collect()
    }
}

fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_len_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    // Entries and snapshots are bounded far below 4 GiB (`MAX_RECORD_BYTES`).
    put_u32(buf, b.len() as u32);
    buf.extend_from_slice(b);
}

fn put_u64s(buf: &mut Vec<u8>, v: &[u64]) {
    put_u32(buf, v.len() as u32);
    for x in v {
        put_u64(buf, *x);
    }
}

/// Size an entry takes in the log file, for sizing buffers.
pub fn entry_encoded_len(e: &Entry) -> usize {
    8 + 8 + 1 + 4 + e.context.len() + 4 + e.data.len()
}

pub fn put_entry(buf: &mut Vec<u8>, e: &Entry) {
    put_u64(buf, e.index);
    put_u64(buf, e.term);
    buf.push(e.get_entry_type() as u8);
    put_len_bytes(buf, &e.context);
    put_len_bytes(buf, &e.data);
}

pub fn get_entry(r: &mut Reader<'_>) -> Result<Entry, Malformed> {
    let mut e = Entry::default();
    e.index = r.u64("entry index")?;
    e.term = r.u64("entry term")?;
    e.set_entry_type(match r.u8("entry type")? {
        0 => EntryType::EntryNormal,
        1 => EntryType::EntryConfChange,
        2 => EntryType::EntryConfChangeV2,
        _ => return Err(Malformed("unknown entry type")),
    });
    e.context = bytes::Bytes::copy_from_slice(r.len_bytes("entry context")?);
    e.data = bytes::Bytes::copy_from_slice(r.len_bytes("entry data")?);
    Ok(e)
}

pub fn put_conf_state(buf: &mut Vec<u8>, cs: &ConfState) {
    put_u64s(buf, &cs.voters);
    put_u64s(buf, &cs.learners);
    put_u64s(buf, &cs.voters_outgoing);
    put_u64s(buf, &cs.learners_next);
    buf.push(cs.auto_leave as u8);
}

pub fn get_conf_state(r: &mut Reader<'_>) -> Result<ConfState, Malformed> {
    let mut cs = ConfState::default();
    cs.voters = r.u64s("conf state voters")?;
    cs.learners = r.u64s("conf state learners")?;
    cs.voters_outgoing = r.u64s("conf state outgoing voters")?;
    cs.learners_next = r.u64s("conf state next learners")?;
    cs.auto_leave = r.u8("conf state auto leave")? != 0;
    Ok(cs)
}

pub fn put_hard_state(buf: &mut Vec<u8>, hs: &HardState) {
    put_u64(buf, hs.term);
    put_u64(buf, hs.vote);
    put_u64(buf, hs.commit);
}

pub fn get_hard_state(r: &mut Reader<'_>) -> Result<HardState, Malformed> {
    let mut hs = HardState::default();
    hs.term = r.u64("hard state term")?;
    hs.vote = r.u64("hard state vote")?;
    hs.commit = r.u64("hard state commit")?;
    Ok(hs)
}

pub fn put_snapshot(buf: &mut Vec<u8>, s: &Snapshot) {
    let m = s.get_metadata();
    put_u64(buf, m.index);
    put_u64(buf, m.term);
    put_conf_state(buf, m.get_conf_state());
    put_len_bytes(buf, &s.data);
}

pub fn get_snapshot(r: &mut Reader<'_>) -> Result<Snapshot, Malformed> {
    let mut s = Snapshot::default();
    let m = s.mut_metadata();
    m.index = r.u64("snapshot index")?;
    m.term = r.u64("snapshot term")?;
    m.set_conf_state(get_conf_state(r)?);
    s.data = bytes::Bytes::copy_from_slice(r.len_bytes("snapshot data")?);
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Checking raft messages from the network before decoding them.
//
// rust-protobuf 2.x skips unknown *group* fields recursively (RUSTSEC-2024-0437): a message of
// nested group tags overflows the stack. eraftpb is proto3 and has no groups, so any group or
// invalid wire type is refused here, at every nesting level the decoder will enter, before the
// bytes reach `protobuf`. Varints, fixed-width fields and lengths are checked against the bytes
// present, and only the message fields eraftpb declares are descended into (at most four
// levels: Message → Snapshot → SnapshotMetadata → ConfState).

#[derive(Clone, Copy)]
enum Schema {
    Message,
    Entry,
    Snapshot,
    SnapshotMetadata,
    ConfState,
}

impl Schema {
    /// The schema of a length-delimited field, if it is an embedded message.
    fn child(self, field: u64) -> Option<Schema> {
        match (self, field) {
            (Schema::Message, 7) => Some(Schema::Entry),
            (Schema::Message, 9) => Some(Schema::Snapshot),
            (Schema::Snapshot, 2) => Some(Schema::SnapshotMetadata),
            (Schema::SnapshotMetadata, 1) => Some(Schema::ConfState),
            _ => None,
        }
    }
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, Malformed> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let b = *buf.get(*pos).ok_or(Malformed("truncated varint"))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(Malformed("varint longer than 10 bytes"))
}

fn check_fields(buf: &[u8], schema: Schema) -> Result<(), Malformed> {
    let mut pos = 0usize;
    while pos < buf.len() {
        let tag = read_varint(buf, &mut pos)?;
        let field = tag >> 3;
        if field == 0 || field > u64::from(u32::MAX >> 3) {
            return Err(Malformed("bad field number"));
        }
        match tag & 7 {
            0 => {
                read_varint(buf, &mut pos)?;
            }
            1 => {
                pos = pos
                    .checked_add(8)
                    .filter(|p| *p <= buf.len())
                    .ok_or(Malformed("truncated fixed64"))?;
            }
            5 => {
                pos = pos
                    .checked_add(4)
                    .filter(|p| *p <= buf.len())
                    .ok_or(Malformed("truncated fixed32"))?;
            }
            2 => {
                let len = read_varint(buf, &mut pos)?;
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|l| pos.checked_add(l))
                    .filter(|e| *e <= buf.len())
                    .ok_or(Malformed("length past the end"))?;
                if let Some(child) = schema.child(field) {
                    check_fields(&buf[pos..end], child)?;
                }
                pos = end;
            }
            _ => return Err(Malformed("group or invalid wire type")),
        }
    }
    Ok(())
}

/// Largest heartbeat context carried in a coalesced heartbeat entry. raft-rs puts a read-index
/// request's context (its id) there; a heartbeat with a longer one travels as its own frame, so
/// a coalesced entry, and a frame of `HEARTBEATS_PER_FRAME_MAX` of them, stays small.
pub const HEARTBEAT_CONTEXT_BYTES_MAX: usize = 256;

/// Heartbeat entries in one coalesced frame; a sender with more starts another frame. With
/// `HEARTBEAT_CONTEXT_BYTES_MAX` this bounds a frame to about 1.1 MiB.
pub const HEARTBEATS_PER_FRAME_MAX: usize = 4096;

/// Fewest bytes of a coalesced heartbeat entry: group, term, commit and context length are
/// varints of at least one byte each, the kind one byte.
pub const HEARTBEAT_ENTRY_MIN_BYTES: usize = 5;

/// Bytes before the entries of a coalesced heartbeat frame: from u64, to u64, count u32.
const HEARTBEATS_HEADER_BYTES: usize = 8 + 8 + 4;

/// One group's heartbeat (leader to follower) or heartbeat response, as it travels in a
/// coalesced frame: everything raft-rs puts in either message except `from` and `to`, which the
/// frame carries once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatEntry {
    pub group: u64,
    pub response: bool,
    pub term: u64,
    pub commit: u64,
    pub context: bytes::Bytes,
}

impl HeartbeatEntry {
    /// `m` as an entry of group `group` when it is a heartbeat or heartbeat response that an
    /// entry carries whole (only the fields raft-rs sets on them, a short context); `None` for
    /// every other message, which travels as its own frame.
    pub fn from_message(group: u64, m: &Message) -> Option<HeartbeatEntry> {
        let response = match m.get_msg_type() {
            MessageType::MsgHeartbeat => false,
            MessageType::MsgHeartbeatResponse => true,
            _ => return None,
        };
        let plain = m.log_term == 0
            && m.index == 0
            && m.entries.is_empty()
            && m.commit_term == 0
            && !m.has_snapshot()
            && m.request_snapshot == 0
            && !m.reject
            && m.reject_hint == 0
            && m.deprecated_priority == 0
            && m.priority == 0
            && m.context.len() <= HEARTBEAT_CONTEXT_BYTES_MAX;
        plain.then(|| HeartbeatEntry {
            group,
            response,
            term: m.term,
            commit: m.commit,
            context: m.context.clone(),
        })
    }

    /// The raft message this entry stands for.
    pub fn into_message(self, from: u64, to: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(if self.response {
            MessageType::MsgHeartbeatResponse
        } else {
            MessageType::MsgHeartbeat
        });
        m.from = from;
        m.to = to;
        m.term = self.term;
        m.commit = self.commit;
        m.context = self.context;
        m
    }
}

/// Encodes a coalesced heartbeat frame's body: `[from u64][to u64][count u32]` (little-endian)
/// then per entry `[group][kind u8: 0 heartbeat, 1 response][term][commit][context len][context]`,
/// group, term, commit and the context length as protobuf-style varints (an idle group's entry
/// is 5–10 bytes).
/// The caller keeps `entries` within `HEARTBEATS_PER_FRAME_MAX` and each context within
/// `HEARTBEAT_CONTEXT_BYTES_MAX` (as `HeartbeatEntry::from_message` does).
pub fn put_heartbeats(buf: &mut Vec<u8>, from: u64, to: u64, entries: &[HeartbeatEntry]) {
    buf.reserve(HEARTBEATS_HEADER_BYTES + entries.len() * HEARTBEAT_ENTRY_MIN_BYTES);
    put_u64(buf, from);
    put_u64(buf, to);
    put_u32(buf, entries.len() as u32);
    for e in entries {
        put_varint(buf, e.group);
        buf.push(u8::from(e.response));
        put_varint(buf, e.term);
        put_varint(buf, e.commit);
        put_varint(buf, e.context.len() as u64);
        buf.extend_from_slice(&e.context);
    }
}

/// Decodes a coalesced heartbeat frame's body: (from, to, entries). The count is checked against
/// the bytes that remain before any entry is read (the entries vector grows with entries
/// decoded, never by the count), contexts are bounded by `HEARTBEAT_CONTEXT_BYTES_MAX`, and
/// bytes after the last entry are an error.
pub fn get_heartbeats(buf: &[u8]) -> Result<(u64, u64, Vec<HeartbeatEntry>), Malformed> {
    let mut r = Reader::new(buf);
    let from = r.u64("heartbeats: truncated header")?;
    let to = r.u64("heartbeats: truncated header")?;
    let count = r.u32("heartbeats: truncated header")? as usize;
    if count > HEARTBEATS_PER_FRAME_MAX {
        return Err(Malformed("heartbeats: too many entries"));
    }
    if count > r.remaining() / HEARTBEAT_ENTRY_MIN_BYTES {
        return Err(Malformed("heartbeats: count past the frame's end"));
    }
    let mut entries = Vec::new();
    for _ in 0..count {
        let group = r.varint("heartbeats: truncated entry")?;
        let response = match r.u8("heartbeats: truncated entry")? {
            0 => false,
            1 => true,
            _ => return Err(Malformed("heartbeats: unknown entry kind")),
        };
        let term = r.varint("heartbeats: truncated entry")?;
        let commit = r.varint("heartbeats: truncated entry")?;
        let len = r.varint("heartbeats: truncated entry")?;
        if len > HEARTBEAT_CONTEXT_BYTES_MAX as u64 {
            return Err(Malformed("heartbeats: context too long"));
        }
        let context = r.bytes(len as usize, "heartbeats: truncated context")?;
        entries.push(HeartbeatEntry {
            group,
            response,
            term,
            commit,
            context: bytes::Bytes::copy_from_slice(context),
        });
    }
    if r.remaining() != 0 {
        return Err(Malformed("heartbeats: bytes after the last entry"));
    }
    Ok((from, to, entries))
}

/// Checks that `buf` is well-formed protobuf for an `eraftpb::Message` as far as the decoder will
/// read it: see the comment above.
pub fn check_message(buf: &[u8]) -> Result<(), Malformed> {
    check_fields(buf, Schema::Message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message as _;

    fn heartbeat(group: u64, response: bool, context: &'static [u8]) -> HeartbeatEntry {
        HeartbeatEntry {
            group,
            response,
            term: 7 + group,
            commit: 100 * group,
            context: bytes::Bytes::from_static(context),
        }
    }

    #[test]
    fn heartbeats_round_trip_through_messages_and_frames() {
        // What raft-rs sends: a heartbeat (term, commit, maybe a read-index context) and the
        // response (term, commit, the context echoed).
        let mut hb = Message::default();
        hb.set_msg_type(MessageType::MsgHeartbeat);
        hb.from = 1;
        hb.to = 2;
        hb.term = 5;
        hb.commit = 42;
        hb.context = bytes::Bytes::from_static(b"ctx");
        let mut resp = hb.clone();
        resp.set_msg_type(MessageType::MsgHeartbeatResponse);
        resp.context = bytes::Bytes::new();
        let a = HeartbeatEntry::from_message(9, &hb).unwrap();
        let b = HeartbeatEntry::from_message(u64::MAX - 1, &resp).unwrap();
        let mut buf = Vec::new();
        put_heartbeats(&mut buf, 1, 2, &[a.clone(), b.clone()]);
        // Group 9 takes one varint byte, u64::MAX - 1 ten; terms and commits one each.
        assert_eq!(
            buf.len(),
            20 + HEARTBEAT_ENTRY_MIN_BYTES + 3 + HEARTBEAT_ENTRY_MIN_BYTES + 9
        );
        let (from, to, entries) = get_heartbeats(&buf).unwrap();
        assert_eq!((from, to), (1, 2));
        assert_eq!(entries, vec![a, b]);
        let mut back = entries.into_iter().map(|e| e.into_message(from, to));
        assert_eq!(back.next().unwrap(), hb);
        assert_eq!(back.next().unwrap(), resp);
        // An empty frame is valid (and harmless).
        let mut empty = Vec::new();
        put_heartbeats(&mut empty, 3, 1, &[]);
        assert_eq!(get_heartbeats(&empty).unwrap(), (3, 1, vec![]));
    }

    #[test]
    fn only_plain_heartbeats_are_coalesced() {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        assert!(HeartbeatEntry::from_message(1, &m).is_none());
        m.set_msg_type(MessageType::MsgHeartbeat);
        assert!(HeartbeatEntry::from_message(1, &m).is_some());
        // Any field an entry does not carry keeps the message whole.
        let mut odd = m.clone();
        odd.reject = true;
        assert!(HeartbeatEntry::from_message(1, &odd).is_none());
        let mut odd = m.clone();
        odd.index = 3;
        assert!(HeartbeatEntry::from_message(1, &odd).is_none());
        let mut odd = m.clone();
        odd.context = bytes::Bytes::from(vec![0u8; HEARTBEAT_CONTEXT_BYTES_MAX + 1]);
        assert!(HeartbeatEntry::from_message(1, &odd).is_none());
    }

    #[test]
    fn truncated_and_oversized_heartbeat_frames_are_refused() {
        let mut buf = Vec::new();
        put_heartbeats(
            &mut buf,
            1,
            2,
            &[heartbeat(1, false, b""), heartbeat(2, true, b"xy")],
        );
        for cut in 0..buf.len() {
            assert!(get_heartbeats(&buf[..cut]).is_err(), "cut at {cut}");
        }
        // Trailing bytes.
        let mut long = buf.clone();
        long.push(0);
        assert!(get_heartbeats(&long).is_err());
        // A count of 2^32-1 in a short frame: refused before anything is allocated for it.
        let mut huge = buf[..16].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            get_heartbeats(&huge),
            Err(Malformed("heartbeats: too many entries"))
        );
        // A count within the cap but past what the bytes can hold.
        let mut past = buf[..16].to_vec();
        past.extend_from_slice(&3u32.to_le_bytes());
        past.extend_from_slice(&buf[20..]);
        assert_eq!(
            get_heartbeats(&past),
            Err(Malformed("heartbeats: count past the frame's end"))
        );
        // An unknown kind (group 1 is one varint byte), a context length over the bound, and
        // a varint of eleven bytes.
        let mut kind = buf.clone();
        kind[20 + 1] = 2;
        assert_eq!(
            get_heartbeats(&kind),
            Err(Malformed("heartbeats: unknown entry kind"))
        );
        let mut ctx = buf[..20].to_vec();
        ctx[16..20].copy_from_slice(&1u32.to_le_bytes());
        ctx.extend_from_slice(&[1, 0, 1, 1]);
        put_varint(&mut ctx, u64::MAX);
        ctx.extend(std::iter::repeat_n(0u8, 1000));
        assert_eq!(
            get_heartbeats(&ctx),
            Err(Malformed("heartbeats: context too long"))
        );
        let mut long_varint = buf[..20].to_vec();
        long_varint[16..20].copy_from_slice(&1u32.to_le_bytes());
        long_varint.extend_from_slice(&[0xff; 11]);
        long_varint.extend_from_slice(&[0; 8]);
        assert!(get_heartbeats(&long_varint).is_err());
    }

    #[test]
    fn real_messages_pass_the_check() {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgSnapshot);
        m.to = 2;
        m.from = 1;
        let mut e = Entry::default();
        e.index = 7;
        e.data = bytes::Bytes::from_static(b"hello");
        m.entries.push(e);
        let snap = m.mut_snapshot();
        snap.mut_metadata().index = 5;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        snap.data = bytes::Bytes::from_static(b"state");
        let bytes = m.write_to_bytes().unwrap();
        check_message(&bytes).unwrap();
    }

    #[test]
    fn nested_groups_are_refused_at_every_level() {
        // 100k nested start-group tags for an unknown field: would recurse in the decoder.
        let deep = vec![0x1b_u8; 100_000]; // field 3, wire type 3
        assert!(check_message(&deep).is_err());
        // A group inside the snapshot's metadata's conf state.
        let conf = [0x53_u8, 0x54]; // field 10 start group, field 10 end group
        let meta = [&[0x0a, conf.len() as u8][..], &conf].concat();
        let snap = [&[0x12, meta.len() as u8][..], &meta].concat();
        let msg = [&[0x4a, snap.len() as u8][..], &snap].concat();
        assert_eq!(
            check_message(&msg),
            Err(Malformed("group or invalid wire type"))
        );
    }

    #[test]
    fn lengths_and_varints_are_bounded() {
        assert!(check_message(&[0x3a, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err()); // len 2^32-1
        assert!(check_message(&[0x08; 1]).is_err()); // truncated varint
        assert!(check_message(&[
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
        ])
        .is_err());
        assert!(check_message(&[0x00, 0x00]).is_err()); // field 0
    }

    #[test]
    fn disk_records_round_trip_and_reject_short_input() {
        let mut e = Entry::default();
        e.index = 3;
        e.term = 2;
        e.data = bytes::Bytes::from_static(b"abc");
        let mut buf = Vec::new();
        put_entry(&mut buf, &e);
        assert_eq!(buf.len(), entry_encoded_len(&e));
        assert_eq!(get_entry(&mut Reader::new(&buf)).unwrap(), e);
        for cut in 0..buf.len() {
            assert!(get_entry(&mut Reader::new(&buf[..cut])).is_err());
        }
        // A conf state declaring 2^32-1 voters in 4 bytes is refused without allocating.
        assert!(get_conf_state(&mut Reader::new(&[0xff, 0xff, 0xff, 0xff])).is_err());
    }
}
