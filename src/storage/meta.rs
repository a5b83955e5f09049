//! The small files next to the segments. Index files carry a CRC-32 (crc32fast) per entry, the
//! others one CRC-32 of their body at the end, so a torn or stale file is detected and ignored
//! (then rebuilt) instead of trusted:
//!
//! | file | body |
//! | --- | --- |
//! | `<base>.index` | entries `(relative offset u32, position u32, crc u32)`, big-endian, sorted |
//! | `<base>.timeindex` | entries `(max timestamp so far i64, relative offset u32, crc u32)` |
//! | `log-start-offset.checkpoint` | log start offset i64 |
//! | `producer-state.snapshot` | covers-offsets-below i64, count u32, per producer: id i64, epoch i16, n u8, n × (first seq i32, last seq i32, base i64, last i64) |
//! | `.clean-shutdown` | log end offset i64, active segment size u64 |
//!
//! Index files of sealed segments, checkpoints, the clean marker and the snapshots written at
//! roll and close are written whole, atomically (temp file, fsync, rename, directory fsync) —
//! never per append. Those of a roll and of a log-start move run on the executor's blocking
//! thread pool, so the shard keeps serving meanwhile. Two writes happen while the log is
//! busy: the active segment's index entries are appended (no fsync) after each fdatasync that
//! made their batches durable, and a producer snapshot is written every
//! `PRODUCER_SNAPSHOT_BYTES` on the blocking thread pool. Owned by the partition log.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::storage::producer_state::{BatchMeta, ProducerEntry, ProducerState, BATCHES_MAX};
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
    write_atomic(path, &with_crc(body))
}

/// `body` followed by its CRC-32: the bytes [`write_file`] writes and [`read_file`] checks.
pub fn with_crc(body: &[u8]) -> Vec<u8> {
    let mut all = Vec::with_capacity(body.len() + 4);
    all.extend_from_slice(body);
    all.extend_from_slice(&crc32fast::hash(body).to_be_bytes());
    all
}

/// Replaces `path` with `bytes` atomically and durably (temp file, fsync, rename, directory
/// fsync).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
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

/// Bytes of one `.index` entry: relative offset u32, position u32, CRC-32 of those 8 bytes.
pub const INDEX_ENTRY_BYTES: usize = 12;
/// Bytes of one `.timeindex` entry: timestamp i64, relative offset u32, CRC-32 of those 12 bytes.
pub const TIME_ENTRY_BYTES: usize = 16;

/// One checksummed record per entry, so entries can be appended to the file of the active segment
/// as they become durable and a torn or stale tail is recognised entry by entry.
pub fn encode_index(entries: &[(u32, u32)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.len() * INDEX_ENTRY_BYTES);
    for (rel, pos) in entries {
        let at = v.len();
        v.extend_from_slice(&rel.to_be_bytes());
        v.extend_from_slice(&pos.to_be_bytes());
        let crc = crc32fast::hash(&v[at..]);
        v.extend_from_slice(&crc.to_be_bytes());
    }
    v
}

pub fn encode_time_index(entries: &[(i64, u32)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.len() * TIME_ENTRY_BYTES);
    for (ts, rel) in entries {
        let at = v.len();
        v.extend_from_slice(&ts.to_be_bytes());
        v.extend_from_slice(&rel.to_be_bytes());
        let crc = crc32fast::hash(&v[at..]);
        v.extend_from_slice(&crc.to_be_bytes());
    }
    v
}

/// The entries of an index file, in order: the longest prefix of whole entries whose checksums
/// match and whose keys strictly increase, and whether that prefix is the whole file.
pub struct Decoded<T> {
    pub entries: Vec<T>,
    pub complete: bool,
}

fn decode_entries<T: Copy>(
    b: &[u8],
    size: usize,
    parse: impl Fn(&[u8]) -> T,
    increasing: impl Fn(&T, &T) -> bool,
) -> Decoded<T> {
    let mut entries: Vec<T> = Vec::with_capacity(b.len() / size);
    let mut complete = b.len().is_multiple_of(size);
    for c in b.chunks_exact(size) {
        let (body, crc) = c.split_at(size - 4);
        let ok = crc32fast::hash(body).to_be_bytes() == crc;
        let e = parse(body);
        if !ok || entries.last().is_some_and(|l| !increasing(l, &e)) {
            complete = false;
            break;
        }
        entries.push(e);
    }
    Decoded { entries, complete }
}

pub fn decode_index(b: &[u8]) -> Decoded<(u32, u32)> {
    decode_entries(
        b,
        INDEX_ENTRY_BYTES,
        |c| {
            (
                u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
            )
        },
        |a, b| a.0 < b.0 && a.1 < b.1,
    )
}

pub fn decode_time_index(b: &[u8]) -> Decoded<(i64, u32)> {
    decode_entries(
        b,
        TIME_ENTRY_BYTES,
        |c| {
            (
                i64::from_be_bytes(c[0..8].try_into().unwrap_or([0; 8])),
                u32::from_be_bytes([c[8], c[9], c[10], c[11]]),
            )
        },
        |a, b| a.0 < b.0 && a.1 < b.1,
    )
}

/// Reads an index file; a missing file decodes as empty and incomplete.
#[cfg(test)]
pub fn read_index_file<T: Copy>(path: &Path, decode: fn(&[u8]) -> Decoded<T>) -> Decoded<T> {
    match fs::read(path) {
        Ok(b) => decode(&b),
        Err(_) => Decoded {
            entries: vec![],
            complete: false,
        },
    }
}

/// The raw contents of one segment's two index files, read on the blocking pool when a log is
/// opened and decoded on the shard. `Err`: missing or unreadable.
pub struct IndexFileBytes {
    pub index: io::Result<Vec<u8>>,
    pub time: io::Result<Vec<u8>>,
}

impl IndexFileBytes {
    /// Blocking: reads both files of the segment starting at `base`.
    pub fn read(dir: &Path, base: Offset) -> Self {
        IndexFileBytes {
            index: fs::read(segment_path(dir, base, "index")),
            time: fs::read(segment_path(dir, base, "timeindex")),
        }
    }
    /// The offset index as [`read_index_file`] would decode it.
    pub fn decode_index(&self) -> Decoded<(u32, u32)> {
        decode_read(&self.index, decode_index)
    }
    /// The time index as [`read_index_file`] would decode it.
    pub fn decode_time_index(&self) -> Decoded<(i64, u32)> {
        decode_read(&self.time, decode_time_index)
    }
}

fn decode_read<T: Copy>(read: &io::Result<Vec<u8>>, decode: fn(&[u8]) -> Decoded<T>) -> Decoded<T> {
    match read {
        Ok(b) => decode(b),
        Err(_) => Decoded {
            entries: vec![],
            complete: false,
        },
    }
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

/// Bytes of one producer in a snapshot with no batches: id i64, epoch i16, batch count u8.
const PRODUCER_BYTES_MIN: usize = 8 + 2 + 1;
/// Bytes of one remembered batch: first/last sequence i32, base/last offset i64.
const PRODUCER_BATCH_BYTES: usize = 4 + 4 + 8 + 8;

/// A producer snapshot's body; `None` (the snapshot is then ignored and the producer state
/// rebuilt by the recovery scan) if it does not decode exactly. Counts are checked against the
/// bytes that remain before any entry is built.
pub fn decode_producers(b: &[u8]) -> Option<(Offset, ProducerState)> {
    let mut r = Reader { b };
    let upto = Offset(r.i64()?);
    let n = r.i32()? as u32 as usize;
    if n > r.b.len() / PRODUCER_BYTES_MIN {
        return None;
    }
    let mut s = ProducerState::default();
    for _ in 0..n {
        let id = r.i64()?;
        let epoch = r.i16()?;
        let k = r.take::<1>()?[0] as usize;
        if k > BATCHES_MAX || k * PRODUCER_BATCH_BYTES > r.b.len() {
            return None;
        }
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
        write_atomic(&p, &encode_index(&idx)).unwrap();
        let d = read_index_file(&p, decode_index);
        assert_eq!((d.entries, d.complete), (idx.clone(), true));
        // A flipped byte in the second entry: only the first is kept.
        let mut raw = fs::read(&p).unwrap();
        raw[INDEX_ENTRY_BYTES + 3] ^= 1;
        fs::write(&p, &raw).unwrap();
        let d = read_index_file(&p, decode_index);
        assert_eq!((d.entries, d.complete), (idx[..1].to_vec(), false));
        // A torn last entry: the whole ones before it are kept.
        let good = encode_index(&idx);
        let d = decode_index(&good[..good.len() - 5]);
        assert_eq!((d.entries, d.complete), (idx[..2].to_vec(), false));
        // Entries out of order are not trusted.
        let d = decode_index(&encode_index(&[(5, 100), (4, 200)]));
        assert_eq!((d.entries.len(), d.complete), (1, false));
        let t = vec![(10i64, 0u32), (20, 7)];
        let d = decode_time_index(&encode_time_index(&t));
        assert_eq!((d.entries, d.complete), (t, true));
        assert!(!read_index_file(&dir.path().join("missing"), decode_index).complete);

        let q = dir.path().join("x.snapshot");
        write_file(&q, b"body").unwrap();
        assert_eq!(read_file(&q).as_deref(), Some(&b"body"[..]));
        let mut raw = fs::read(&q).unwrap();
        raw[1] ^= 1;
        fs::write(&q, &raw).unwrap();
        assert!(read_file(&q).is_none());
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

    #[test]
    fn huge_counts_in_a_producer_snapshot_are_refused_before_building_entries() {
        for n in [u32::MAX, i32::MAX as u32, 2] {
            let mut body = 5i64.to_be_bytes().to_vec();
            body.extend_from_slice(&n.to_be_bytes());
            body.extend_from_slice(&[0u8; 11]);
            assert_eq!(decode_producers(&body), None, "{n}");
        }
        // More batches per producer than Kafka remembers, or than the bytes hold.
        for k in [BATCHES_MAX as u8 + 1, 255, 2] {
            let mut body = 5i64.to_be_bytes().to_vec();
            body.extend_from_slice(&1u32.to_be_bytes());
            body.extend_from_slice(&[0u8; 10]);
            body.push(k);
            body.extend_from_slice(&[0u8; PRODUCER_BATCH_BYTES]);
            assert_eq!(decode_producers(&body), None, "{k}");
        }
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn producers() -> impl Strategy<Value = ProducerState> {
            prop::collection::hash_map(
                any::<i64>(),
                (
                    any::<i16>(),
                    prop::collection::vec(
                        (any::<i32>(), any::<i32>(), any::<i64>(), any::<i64>()),
                        1..=BATCHES_MAX,
                    ),
                ),
                0..5,
            )
            .prop_map(|m| ProducerState {
                producers: m
                    .into_iter()
                    .map(|(id, (epoch, bs))| {
                        let batches = bs
                            .into_iter()
                            .map(|(f, l, b, e)| BatchMeta {
                                first_seq: f,
                                last_seq: l,
                                base: Offset(b),
                                last: Offset(e),
                            })
                            .collect();
                        (id, ProducerEntry { epoch, batches })
                    })
                    .collect(),
            })
        }

        fn mutate(
            b: &mut Vec<u8>,
            flip: Option<(prop::sample::Index, u8)>,
            huge: Option<prop::sample::Index>,
            cut: Option<prop::sample::Index>,
        ) {
            if b.is_empty() {
                return;
            }
            if let Some((i, x)) = flip {
                let i = i.index(b.len());
                b[i] ^= x;
            }
            if let Some(i) = huge {
                if b.len() >= 4 {
                    let i = i.index(b.len() - 3);
                    b[i..i + 4].copy_from_slice(&u32::MAX.to_be_bytes());
                }
            }
            if let Some(c) = cut {
                b.truncate(c.index(b.len()));
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..300)) {
                let _ = decode_producers(&data);
                let _ = decode_clean(&data);
                let d = decode_index(&data);
                prop_assert!(d.entries.len() <= data.len() / INDEX_ENTRY_BYTES);
                let d = decode_time_index(&data);
                prop_assert!(d.entries.len() <= data.len() / TIME_ENTRY_BYTES);
            }

            #[test]
            fn files_round_trip_and_mutations_never_panic(
                upto in any::<i64>(),
                s in producers(),
                rels in prop::collection::btree_set(any::<u32>(), 0..20),
                flip in prop::option::of((any::<prop::sample::Index>(), 1u8..)),
                huge in prop::option::of(any::<prop::sample::Index>()),
                cut in prop::option::of(any::<prop::sample::Index>()),
            ) {
                let p = encode_producers(Offset(upto), &s);
                prop_assert_eq!(decode_producers(&p), Some((Offset(upto), s)));
                let idx: Vec<(u32, u32)> = rels.iter().map(|r| (*r, *r)).collect();
                let ib = encode_index(&idx);
                let d = decode_index(&ib);
                prop_assert_eq!((d.entries, d.complete), (idx, true));
                let t: Vec<(i64, u32)> = rels.iter().map(|r| (*r as i64 - 7, *r)).collect();
                let tb = encode_time_index(&t);
                let d = decode_time_index(&tb);
                prop_assert_eq!((d.entries, d.complete), (t, true));
                let cb = encode_clean(Offset(upto), upto as u64);
                prop_assert_eq!(decode_clean(&cb), Some((Offset(upto), upto as u64)));
                for mut b in [p, ib, tb, cb] {
                    mutate(&mut b, flip, huge, cut);
                    if let Some((_, st)) = decode_producers(&b) {
                        prop_assert!(st.producers.values().all(|e| e.batches.len() <= BATCHES_MAX));
                    }
                    let _ = decode_clean(&b);
                    let _ = decode_index(&b);
                    let _ = decode_time_index(&b);
                }
            }
        }
    }
}
