//! The small files next to the segments, each ending in a CRC-32 (crc32fast) of its body so a
//! torn or stale file is detected and ignored (then rebuilt) instead of trusted:
//!
//! | file | body |
//! | --- | --- |
//! | `<base>.index` | entries `(relative offset u32, position u32)`, big-endian, sorted |
//! | `<base>.timeindex` | entries `(max timestamp so far i64, relative offset u32)` |
//! | `log-start-offset.checkpoint` | log start offset i64 |
//! | `producer-state.snapshot` | covers-offsets-below i64, count u32, per producer: id i64, epoch i16, n u8, n × (first seq i32, last seq i32, base i64, last i64) |
//! | `.clean-shutdown` | log end offset i64, active segment size u64 |
//!
//! All are written whole, atomically (temp file, fsync, rename, directory fsync), and only on
//! open, roll, close and DeleteRecords — never per append. Blocking `std::fs` is acceptable
//! there. Owned by the partition log.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::storage::producer_state::{BatchMeta, ProducerEntry, ProducerState};
use crate::types::Offset;

pub const LOG_START_FILE: &str = "log-start-offset.checkpoint";
pub const PRODUCER_FILE: &str = "producer-state.snapshot";
pub const CLEAN_FILE: &str = ".clean-shutdown";

pub fn segment_path(dir: &Path, base: Offset, ext: &str) -> PathBuf {
    dir.join(format!("{:020}.{ext}", base.0))
}

/// Base offsets of the `.log` files in `dir`, sorted.
pub fn list_segments(dir: &Path) -> io::Result<Vec<Offset>> {
    let mut out = vec![];
    for e in fs::read_dir(dir)? {
        let name = e?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".log") {
            if stem.len() == 20 {
                if let Ok(v) = stem.parse::<i64>() {
                    out.push(Offset(v));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes `body` + CRC to `path` atomically and durably.
pub fn write_file(path: &Path, body: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.write_all(&crc32fast::hash(body).to_be_bytes())?;
        f.sync_data()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Makes creations, renames and unlinks in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// The body of a file written by [`write_file`]; `None` if missing, torn or corrupt.
pub fn read_file(path: &Path) -> Option<Vec<u8>> {
    let mut v = fs::read(path).ok()?;
    if v.len() < 4 {
        return None;
    }
    let crc = u32::from_be_bytes(v[v.len() - 4..].try_into().ok()?);
    v.truncate(v.len() - 4);
    (crc32fast::hash(&v) == crc).then_some(v)
}

pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

pub fn encode_index(entries: &[(u32, u32)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.len() * 8);
    for (rel, pos) in entries {
        v.extend_from_slice(&rel.to_be_bytes());
        v.extend_from_slice(&pos.to_be_bytes());
    }
    v
}

pub fn decode_index(b: &[u8]) -> Option<Vec<(u32, u32)>> {
    if !b.len().is_multiple_of(8) {
        return None;
    }
    let v: Vec<(u32, u32)> = b
        .chunks_exact(8)
        .map(|c| {
            (
                u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect();
    v.windows(2)
        .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1)
        .then_some(v)
}

pub fn encode_time_index(entries: &[(i64, u32)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.len() * 12);
    for (ts, rel) in entries {
        v.extend_from_slice(&ts.to_be_bytes());
        v.extend_from_slice(&rel.to_be_bytes());
    }
    v
}

pub fn decode_time_index(b: &[u8]) -> Option<Vec<(i64, u32)>> {
    if !b.len().is_multiple_of(12) {
        return None;
    }
    let v: Vec<(i64, u32)> = b
        .chunks_exact(12)
        .map(|c| {
            (
                i64::from_be_bytes(c[0..8].try_into().unwrap_or([0; 8])),
                u32::from_be_bytes([c[8], c[9], c[10], c[11]]),
            )
        })
        .collect();
    v.windows(2)
        .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1)
        .then_some(v)
}

pub fn encode_clean(log_end: Offset, active_size: u64) -> Vec<u8> {
    let mut v = log_end.0.to_be_bytes().to_vec();
    v.extend_from_slice(&active_size.to_be_bytes());
    v
}

pub fn decode_clean(b: &[u8]) -> Option<(Offset, u64)> {
    if b.len() != 16 {
        return None;
    }
    Some((
        Offset(i64::from_be_bytes(b[0..8].try_into().ok()?)),
        u64::from_be_bytes(b[8..16].try_into().ok()?),
    ))
}

pub fn encode_producers(upto: Offset, s: &ProducerState) -> Vec<u8> {
    let mut v = upto.0.to_be_bytes().to_vec();
    v.extend_from_slice(&(s.producers.len() as u32).to_be_bytes());
    let mut ids: Vec<_> = s.producers.keys().copied().collect();
    ids.sort();
    for id in ids {
        let e = &s.producers[&id];
        v.extend_from_slice(&id.to_be_bytes());
        v.extend_from_slice(&e.epoch.to_be_bytes());
        v.push(e.batches.len() as u8);
        for m in &e.batches {
            v.extend_from_slice(&m.first_seq.to_be_bytes());
            v.extend_from_slice(&m.last_seq.to_be_bytes());
            v.extend_from_slice(&m.base.0.to_be_bytes());
            v.extend_from_slice(&m.last.0.to_be_bytes());
        }
    }
    v
}

/// A bounds-checked big-endian reader over a file body.
struct Reader<'a> {
    b: &'a [u8],
}
impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        if self.b.len() < N {
            return None;
        }
        let (h, t) = self.b.split_at(N);
        self.b = t;
        h.try_into().ok()
    }
    fn i64(&mut self) -> Option<i64> {
        self.take::<8>().map(i64::from_be_bytes)
    }
    fn i32(&mut self) -> Option<i32> {
        self.take::<4>().map(i32::from_be_bytes)
    }
    fn i16(&mut self) -> Option<i16> {
        self.take::<2>().map(i16::from_be_bytes)
    }
}

pub fn decode_producers(b: &[u8]) -> Option<(Offset, ProducerState)> {
    let mut r = Reader { b };
    let upto = Offset(r.i64()?);
    let n = r.i32()? as u32;
    let mut s = ProducerState::default();
    for _ in 0..n {
        let id = r.i64()?;
        let epoch = r.i16()?;
        let k = r.take::<1>()?[0];
        let mut e = ProducerEntry {
            epoch,
            batches: Default::default(),
        };
        for _ in 0..k {
            e.batches.push_back(BatchMeta {
                first_seq: r.i32()?,
                last_seq: r.i32()?,
                base: Offset(r.i64()?),
                last: Offset(r.i64()?),
            });
        }
        s.producers.insert(id, e);
    }
    r.b.is_empty().then_some((upto, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.index");
        let idx = vec![(0u32, 0u32), (10, 4096), (25, 9000)];
        write_file(&p, &encode_index(&idx)).unwrap();
        assert_eq!(decode_index(&read_file(&p).unwrap()), Some(idx));
        let mut raw = fs::read(&p).unwrap();
        raw[3] ^= 1;
        fs::write(&p, &raw).unwrap();
        assert!(read_file(&p).is_none());
        assert!(read_file(&dir.path().join("missing")).is_none());

        let mut s = ProducerState::default();
        s.apply(
            3,
            1,
            BatchMeta {
                first_seq: 0,
                last_seq: 4,
                base: Offset(7),
                last: Offset(11),
            },
        );
        let body = encode_producers(Offset(12), &s);
        assert_eq!(decode_producers(&body), Some((Offset(12), s)));
        assert_eq!(decode_producers(&body[..body.len() - 1]), None);
    }
}
