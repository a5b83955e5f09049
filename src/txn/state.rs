//! One transactional id's metadata and Kafka's `__transaction_state` record formats (key v0,
//! value v0), sans-IO.

use std::collections::BTreeSet;

/// Kafka's transaction states, with their record codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnState {
    Empty,
    Ongoing,
    PrepareCommit,
    PrepareAbort,
    CompleteCommit,
    CompleteAbort,
    Dead,
    PrepareEpochFence,
}

impl TxnState {
    pub fn code(self) -> i8 {
        match self {
            TxnState::Empty => 0,
            TxnState::Ongoing => 1,
            TxnState::PrepareCommit => 2,
            TxnState::PrepareAbort => 3,
            TxnState::CompleteCommit => 4,
            TxnState::CompleteAbort => 5,
            TxnState::Dead => 6,
            TxnState::PrepareEpochFence => 7,
        }
    }
    pub fn from_code(c: i8) -> Option<TxnState> {
        Some(match c {
            0 => TxnState::Empty,
            1 => TxnState::Ongoing,
            2 => TxnState::PrepareCommit,
            3 => TxnState::PrepareAbort,
            4 => TxnState::CompleteCommit,
            5 => TxnState::CompleteAbort,
            6 => TxnState::Dead,
            7 => TxnState::PrepareEpochFence,
            _ => return None,
        })
    }
    /// The name DescribeTransactions and ListTransactions report (Kafka's).
    pub fn name(self) -> &'static str {
        match self {
            TxnState::Empty => "Empty",
            TxnState::Ongoing => "Ongoing",
            TxnState::PrepareCommit => "PrepareCommit",
            TxnState::PrepareAbort => "PrepareAbort",
            TxnState::CompleteCommit => "CompleteCommit",
            TxnState::CompleteAbort => "CompleteAbort",
            TxnState::Dead => "Dead",
            TxnState::PrepareEpochFence => "PrepareEpochFence",
        }
    }
    /// Markers are being written: the next request must wait (CONCURRENT_TRANSACTIONS).
    pub fn completing(self) -> bool {
        matches!(
            self,
            TxnState::PrepareCommit | TxnState::PrepareAbort | TxnState::PrepareEpochFence
        )
    }
}

/// The persisted metadata of one transactional id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnMeta {
    pub producer_id: i64,
    pub epoch: i16,
    pub timeout_ms: i32,
    pub state: TxnState,
    /// Partitions in the transaction (empty outside Ongoing/Prepare*).
    pub partitions: BTreeSet<(String, i32)>,
    pub last_update_ms: i64,
    /// When the transaction began (-1 when none is open).
    pub start_ms: i64,
    /// Not persisted. Transaction version 2: the producer id and epoch the last EndTxn v5 was
    /// sent with, whose retry is answered with the current ones instead of being fenced.
    pub previous: Option<(i64, i16)>,
    /// Not persisted. Transaction version 2: the producer id a transaction ending with an
    /// exhausted epoch hands its producer once its markers are written (epoch 0).
    pub next_producer_id: Option<i64>,
}

/// The record key: `[version i16 = 0][transactional id string]`.
pub fn encode_key(tid: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + tid.len());
    b.extend_from_slice(&0i16.to_be_bytes());
    put_str(&mut b, tid);
    b
}

pub fn decode_key(b: &[u8]) -> Result<String, String> {
    let mut r = Reader(b);
    let v = r.i16()?;
    if v != 0 {
        return Err(format!("unknown {} key version {v}", super::TXN_TOPIC));
    }
    r.str()
}

/// Value v0: producer id i64, epoch i16, timeout i32, state i8, partitions
/// `[topic string, [partition i32]]`, last update i64, start i64.
pub fn encode_value(m: &TxnMeta) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&m.producer_id.to_be_bytes());
    b.extend_from_slice(&m.epoch.to_be_bytes());
    b.extend_from_slice(&m.timeout_ms.to_be_bytes());
    b.push(m.state.code() as u8);
    let mut topics: Vec<(&str, Vec<i32>)> = vec![];
    for (t, p) in &m.partitions {
        match topics.last_mut() {
            Some((last, ps)) if *last == t.as_str() => ps.push(*p),
            _ => topics.push((t.as_str(), vec![*p])),
        }
    }
    b.extend_from_slice(&(topics.len() as i32).to_be_bytes());
    for (t, ps) in topics {
        put_str(&mut b, t);
        b.extend_from_slice(&(ps.len() as i32).to_be_bytes());
        for p in ps {
            b.extend_from_slice(&p.to_be_bytes());
        }
    }
    b.extend_from_slice(&m.last_update_ms.to_be_bytes());
    b.extend_from_slice(&m.start_ms.to_be_bytes());
    b
}

pub fn decode_value(b: &[u8]) -> Result<TxnMeta, String> {
    let mut r = Reader(b);
    let v = r.i16()?;
    if v != 0 {
        return Err(format!("unknown {} value version {v}", super::TXN_TOPIC));
    }
    let producer_id = r.i64()?;
    let epoch = r.i16()?;
    let timeout_ms = r.i32()?;
    let code = r.i8()?;
    let state = TxnState::from_code(code).ok_or_else(|| format!("unknown state {code}"))?;
    let mut partitions = BTreeSet::new();
    let topics = r.i32()?;
    // A topic takes at least 6 bytes: never loop past what is there.
    if topics < -1 || topics as i64 > r.0.len() as i64 / 6 {
        return Err("bad topic count".into());
    }
    for _ in 0..topics.max(0) {
        let t = r.str()?;
        let n = r.i32()?;
        if n < 0 || n as i64 > r.0.len() as i64 / 4 {
            return Err("bad partition count".into());
        }
        for _ in 0..n {
            partitions.insert((t.clone(), r.i32()?));
        }
    }
    Ok(TxnMeta {
        producer_id,
        epoch,
        timeout_ms,
        state,
        partitions,
        last_update_ms: r.i64()?,
        start_ms: r.i64()?,
        previous: None,
        next_producer_id: None,
    })
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(i16::MAX as usize)];
    b.extend_from_slice(&(s.len() as i16).to_be_bytes());
    b.extend_from_slice(s);
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let (h, t) = self.0.split_first_chunk::<N>().ok_or("record too short")?;
        self.0 = t;
        Ok(*h)
    }
    fn i8(&mut self) -> Result<i8, String> {
        self.take::<1>().map(|a| a[0] as i8)
    }
    fn i16(&mut self) -> Result<i16, String> {
        self.take::<2>().map(i16::from_be_bytes)
    }
    fn i32(&mut self) -> Result<i32, String> {
        self.take::<4>().map(i32::from_be_bytes)
    }
    fn i64(&mut self) -> Result<i64, String> {
        self.take::<8>().map(i64::from_be_bytes)
    }
    fn str(&mut self) -> Result<String, String> {
        let n = self.i16()?;
        if n < 0 || n as usize > self.0.len() {
            return Err("bad string length".into());
        }
        let (s, t) = self.0.split_at(n as usize);
        self.0 = t;
        String::from_utf8(s.to_vec()).map_err(|_| "string is not UTF-8".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_input_is_an_error() {
        let m = TxnMeta {
            producer_id: 42,
            epoch: 3,
            timeout_ms: 60_000,
            state: TxnState::PrepareCommit,
            partitions: [
                ("a".to_string(), 0),
                ("a".to_string(), 2),
                ("b".to_string(), 1),
            ]
            .into_iter()
            .collect(),
            last_update_ms: 7,
            start_ms: 5,
            previous: None,
            next_producer_id: None,
        };
        assert_eq!(decode_value(&encode_value(&m)), Ok(m.clone()));
        assert_eq!(decode_key(&encode_key("tx-1")), Ok("tx-1".to_string()));
        let v = encode_value(&m);
        for cut in 0..v.len() {
            assert!(decode_value(&v[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = v.clone();
        // The topic count, right after the fixed fields: claim 2^31 - 1 topics.
        huge[17..21].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(decode_value(&huge).is_err());
    }
}
