//! The Kafka record codecs (gzip, snappy, lz4, zstd): compression for batches we build, and
//! bounded decompression of RecordBatch v2 record sections — the one place where the broker (the
//! rare paths that look inside a stored batch, such as ListOffsets by timestamp), the `sluice`
//! CLI (printing fetched records) and the load generator's tests expand compressed data. Pure
//! functions over bytes; no I/O.
//!
//! A compressed batch is small by the time it is checked (`message.max.bytes`), but what it
//! expands to is not: a few KiB of gzip or zstd inflate to gigabytes, and raw snappy declares its
//! output length up front. Every codec here therefore writes into a buffer that grows only with
//! bytes actually produced, and stops with [`DecompressError::TooLarge`] past `bytes_max`
//! ([`DECOMPRESSED_BATCH_BYTES_MAX`] for callers without a better bound).

use std::io::{Read, Write};

use bytes::Bytes;

use crate::batch::{BatchError, BatchHeader, HEADER_BYTES};
use crate::records::{self, Record, RecordError};

/// Largest records section one batch may decompress to. Protects the memory of whoever decodes a
/// batch (broker admin paths, CLI) from decompression bombs; 64 MiB is 64× Kafka's default
/// `message.max.bytes`, far above what real producers' batches expand to.
pub const DECOMPRESSED_BATCH_BYTES_MAX: usize = 64 << 20;

/// Largest zstd window (log2 bytes) a frame may ask for. The decoder allocates the window a frame
/// header declares before producing output; Kafka clients use levels whose windows are far
/// smaller (zstd level 19 uses 2^23).
pub const ZSTD_WINDOW_LOG_MAX: u32 = 26;
const _: () = assert!(1usize << ZSTD_WINDOW_LOG_MAX <= DECOMPRESSED_BATCH_BYTES_MAX);

/// zstd level we compress at: Kafka's default `compression.zstd.level`.
pub const ZSTD_LEVEL: i32 = 3;

/// Bytes of input per snappy block in the xerial framing we write: snappy-java's default block
/// size, which Kafka's own producer uses.
const SNAPPY_BLOCK_BYTES: usize = 32 << 10;

/// Bytes pulled from a streaming decoder per read.
const READ_CHUNK_BYTES: usize = 16 << 10;

/// snappy-java's stream header (xerial framing, as Kafka writes snappy): 8 bytes of magic, then a
/// version and a compatible version (i32 each), then blocks of `[length u32][raw snappy block]`.
const SNAPPY_MAGIC: &[u8; 8] = b"\x82SNAPPY\x00";
const SNAPPY_HEADER_BYTES: usize = 16;
/// The version and compatible version snappy-java writes after the magic.
const SNAPPY_VERSIONS: [u8; 8] = [0, 0, 0, 1, 0, 0, 0, 1];

/// A batch's compression codec (`attributes & 0x07`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    pub const ALL: [Compression; 5] = [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ];

    /// The codec id in the batch attributes (0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd).
    pub fn attribute(self) -> i16 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Snappy => 2,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }

    /// The codec of a batch's attributes (only the codec bits are looked at).
    pub fn from_attributes(attributes: i16) -> Result<Compression, DecompressError> {
        Ok(match attributes & crate::batch::ATTR_COMPRESSION_MASK {
            0 => Compression::None,
            1 => Compression::Gzip,
            2 => Compression::Snappy,
            3 => Compression::Lz4,
            4 => Compression::Zstd,
            other => return Err(DecompressError::UnknownCodec(other)),
        })
    }

    /// Kafka's name for the codec (`compression.type`).
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Compression, String> {
        Compression::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                format!("unknown compression '{s}': expected none, gzip, snappy, lz4 or zstd")
            })
    }
}

/// Why a records section did not decompress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecompressError {
    /// The output would exceed `bytes_max`.
    TooLarge { bytes_max: usize },
    /// The compressed data is malformed.
    Corrupt(String),
    /// A compression codec id Kafka does not define.
    UnknownCodec(i16),
}

impl std::fmt::Display for DecompressError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecompressError::TooLarge { bytes_max } => {
                write!(f, "batch decompresses to more than {bytes_max} bytes")
            }
            DecompressError::Corrupt(e) => write!(f, "compressed batch is corrupt: {e}"),
            DecompressError::UnknownCodec(c) => write!(f, "unknown compression codec {c}"),
        }
    }
}
impl std::error::Error for DecompressError {}

/// Why [`compress`] failed: an encoder error (writing into memory does not fail otherwise).
#[derive(Debug)]
pub struct CompressError(pub String);

impl std::fmt::Display for CompressError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "compression failed: {}", self.0)
    }
}
impl std::error::Error for CompressError {}

fn compress_error(e: impl std::fmt::Display) -> CompressError {
    CompressError(e.to_string())
}

/// Compresses a records section as Kafka expects it, appending to `out`: a gzip member, snappy
/// in xerial framing, an LZ4 frame (independent 64 KiB blocks, no content checksum, as Kafka's
/// producer writes them) or a zstd frame. `None` copies.
pub fn compress(c: Compression, input: &[u8], out: &mut Vec<u8>) -> Result<(), CompressError> {
    match c {
        Compression::None => out.extend_from_slice(input),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(out, flate2::Compression::default());
            e.write_all(input).map_err(compress_error)?;
            e.finish().map_err(compress_error)?;
        }
        Compression::Snappy => {
            out.extend_from_slice(SNAPPY_MAGIC);
            out.extend_from_slice(&SNAPPY_VERSIONS);
            let mut enc = snap::raw::Encoder::new();
            for block in input.chunks(SNAPPY_BLOCK_BYTES) {
                let len_at = out.len();
                out.extend_from_slice(&[0; 4]);
                let at = out.len();
                out.resize(at + snap::raw::max_compress_len(block.len()), 0);
                let n = enc
                    .compress(block, &mut out[at..])
                    .map_err(compress_error)?;
                out.truncate(at + n);
                out[len_at..at].copy_from_slice(&(n as u32).to_be_bytes());
            }
        }
        Compression::Lz4 => {
            let info = lz4_flex::frame::FrameInfo::new()
                .block_mode(lz4_flex::frame::BlockMode::Independent)
                .block_size(lz4_flex::frame::BlockSize::Max64KB);
            let mut e = lz4_flex::frame::FrameEncoder::with_frame_info(info, out);
            e.write_all(input).map_err(compress_error)?;
            e.finish().map_err(compress_error)?;
        }
        Compression::Zstd => {
            let mut e =
                zstd::stream::write::Encoder::new(out, ZSTD_LEVEL).map_err(compress_error)?;
            e.include_contentsize(true).map_err(compress_error)?;
            e.set_pledged_src_size(Some(input.len() as u64))
                .map_err(compress_error)?;
            e.write_all(input).map_err(compress_error)?;
            e.finish().map_err(compress_error)?;
        }
    }
    Ok(())
}

/// Decompresses one batch's records section, refusing output past `bytes_max` bytes.
pub fn decompress(
    compression: Compression,
    input: &[u8],
    bytes_max: usize,
) -> Result<Vec<u8>, DecompressError> {
    match compression {
        Compression::None => {
            if input.len() > bytes_max {
                return Err(DecompressError::TooLarge { bytes_max });
            }
            Ok(input.to_vec())
        }
        Compression::Gzip => read_bounded(flate2::read::MultiGzDecoder::new(input), bytes_max),
        Compression::Lz4 => read_bounded(lz4_flex::frame::FrameDecoder::new(input), bytes_max),
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(input).map_err(corrupt)?;
            d.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(corrupt)?;
            read_bounded(d, bytes_max)
        }
        Compression::Snappy => snappy(input, bytes_max),
    }
}

/// Why [`decode_batch`] did not decode a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The header is malformed or the CRC-32C does not match.
    Batch(BatchError),
    /// The records section did not decompress within the bound.
    Decompress(DecompressError),
    /// A record is malformed.
    Record(RecordError),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Batch(e) => e.fmt(f),
            DecodeError::Decompress(e) => e.fmt(f),
            DecodeError::Record(e) => e.fmt(f),
        }
    }
}
impl std::error::Error for DecodeError {}

/// Decodes the one batch at the front of `buf` (advancing past it on success): header and
/// CRC-32C checked, the records section expanded with [`decompress`] bounded by `bytes_max`, and
/// every record decoded (each count checked against the bytes that remain). Under LogAppendTime
/// every record carries the batch's `maxTimestamp`, as Kafka consumers see it.
pub fn decode_batch(buf: &mut Bytes, bytes_max: usize) -> Result<Vec<Record>, DecodeError> {
    let h = BatchHeader::parse_checked(buf).map_err(DecodeError::Batch)?;
    let size = h.size();
    let codec = Compression::from_attributes(h.attributes()).map_err(DecodeError::Decompress)?;
    let (base_offset, base_ts, count) = (h.base_offset().0, h.base_timestamp(), h.record_count());
    let log_append = h.is_log_append_time().then(|| h.max_timestamp());
    let body = buf.slice(HEADER_BYTES..size);
    let body = match codec {
        Compression::None => body,
        c => Bytes::from(decompress(c, &body, bytes_max).map_err(DecodeError::Decompress)?),
    };
    let mut out =
        records::decode_records(&body, base_offset, base_ts, count).map_err(DecodeError::Record)?;
    if let Some(ts) = log_append {
        for r in &mut out {
            r.timestamp_ms = ts;
        }
    }
    let _ = buf.split_to(size);
    Ok(out)
}

fn corrupt(e: impl std::fmt::Display) -> DecompressError {
    DecompressError::Corrupt(e.to_string())
}

/// Reads `r` to its end into a buffer whose capacity never exceeds `bytes_max`.
fn read_bounded(mut r: impl Read, bytes_max: usize) -> Result<Vec<u8>, DecompressError> {
    let mut out: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        let n = match r.read(&mut chunk) {
            Ok(0) => return Ok(out),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(corrupt(e)),
        };
        let room = bytes_max - out.len();
        if n > room {
            return Err(DecompressError::TooLarge { bytes_max });
        }
        if out.capacity() - out.len() < n {
            // Double, but never past the limit.
            let grow = out.len().max(READ_CHUNK_BYTES).min(room);
            out.reserve_exact(grow.max(n));
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

/// Kafka's snappy: xerial framing when the stream starts with its magic, else one raw block (as
/// snappy-java falls back). Each raw block declares its output length; it is checked against what
/// `bytes_max` leaves before anything is allocated for it.
fn snappy(input: &[u8], bytes_max: usize) -> Result<Vec<u8>, DecompressError> {
    let mut out = Vec::new();
    if !input.starts_with(SNAPPY_MAGIC) {
        snappy_block(input, &mut out, bytes_max)?;
        return Ok(out);
    }
    let mut rest = input
        .get(SNAPPY_HEADER_BYTES..)
        .ok_or_else(|| corrupt("snappy stream header truncated"))?;
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| corrupt("snappy block length truncated"))?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > tail.len() {
            return Err(corrupt("snappy block longer than the stream"));
        }
        let (block, tail) = tail.split_at(len);
        snappy_block(block, &mut out, bytes_max)?;
        rest = tail;
    }
    Ok(out)
}

fn snappy_block(block: &[u8], out: &mut Vec<u8>, bytes_max: usize) -> Result<(), DecompressError> {
    let n = snap::raw::decompress_len(block).map_err(corrupt)?;
    let at = out.len();
    if n > bytes_max - at {
        return Err(DecompressError::TooLarge { bytes_max });
    }
    out.resize(at + n, 0);
    let written = snap::raw::Decoder::new()
        .decompress(block, &mut out[at..])
        .map_err(corrupt)?;
    out.truncate(at + written);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{BatchBuilder, BatchOptions, Record as NewRecord};
    use proptest::prelude::*;

    const ALL: [Compression; 5] = Compression::ALL;

    fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        super::compress(c, data, &mut out).unwrap();
        out
    }

    /// A batch of `n` records built with codec `c`.
    fn encoded_batch(c: Compression, n: usize, value_bytes: usize) -> Bytes {
        let value = vec![b'x'; value_bytes];
        let mut b = BatchBuilder::new(BatchOptions {
            compression: c,
            ..BatchOptions::default()
        });
        for i in 0..n {
            b.push(&NewRecord {
                key: None,
                value: Some(&value),
                headers: &[],
                timestamp_ms: 1000 + i as i64,
            });
        }
        Bytes::from(b.finish().unwrap())
    }

    #[test]
    fn every_codec_round_trips_within_the_limit() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for c in ALL {
            let z = compress(c, &data);
            assert_eq!(decompress(c, &z, data.len()).unwrap(), data, "{c:?}");
        }
    }

    #[test]
    fn decompression_bombs_stop_at_the_limit() {
        // 8 MiB of zeros compresses to a few hundred KiB at most; the limit is 1 MiB.
        let zeros = vec![0u8; 8 << 20];
        for c in [
            Compression::Gzip,
            Compression::Lz4,
            Compression::Zstd,
            Compression::Snappy,
        ] {
            let z = compress(c, &zeros);
            assert!(z.len() < 1 << 20, "{c:?}");
            assert_eq!(
                decompress(c, &z, 1 << 20),
                Err(DecompressError::TooLarge { bytes_max: 1 << 20 }),
                "{c:?}"
            );
        }
    }

    #[test]
    fn raw_snappy_declaring_four_gigabytes_is_refused_before_allocating() {
        // A raw snappy block is a varint output length then ops: declare u32::MAX (5 varint bytes)
        // with no data. kafka-protocol's own fallback allocates the declared length zeroed.
        let block = [0xff, 0xff, 0xff, 0xff, 0x0f];
        assert_eq!(
            decompress(Compression::Snappy, &block, DECOMPRESSED_BATCH_BYTES_MAX),
            Err(DecompressError::TooLarge {
                bytes_max: DECOMPRESSED_BATCH_BYTES_MAX
            })
        );
        // The same inside xerial framing, and a block length past the stream.
        let mut framed = SNAPPY_MAGIC.to_vec();
        framed.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
        framed.extend_from_slice(&(block.len() as u32).to_be_bytes());
        framed.extend_from_slice(&block);
        assert!(matches!(
            decompress(Compression::Snappy, &framed, 1 << 20),
            Err(DecompressError::TooLarge { .. })
        ));
        let mut long = SNAPPY_MAGIC.to_vec();
        long.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
        long.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decompress(Compression::Snappy, &long, 1 << 20),
            Err(DecompressError::Corrupt(_))
        ));
    }

    #[test]
    fn zstd_frame_asking_for_a_huge_window_is_refused() {
        // Frame header: magic, descriptor 0 (no content size, not single segment), window
        // descriptor 0xf8 = window log 41: far past ZSTD_WINDOW_LOG_MAX.
        let frame = [0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xf8, 0x01, 0x00, 0x00];
        assert!(matches!(
            decompress(Compression::Zstd, &frame, DECOMPRESSED_BATCH_BYTES_MAX),
            Err(DecompressError::Corrupt(_))
        ));
    }

    #[test]
    fn decode_batch_reads_every_codec_and_refuses_a_bomb() {
        for c in ALL {
            let mut b = encoded_batch(c, 20, 100);
            let recs = decode_batch(&mut b, DECOMPRESSED_BATCH_BYTES_MAX).unwrap();
            assert!(b.is_empty(), "{c:?}: decode_batch advances past the batch");
            let offsets: Vec<i64> = recs.iter().map(|r| r.offset).collect();
            assert_eq!(offsets, (0..20).collect::<Vec<i64>>(), "{c:?}");
            assert_eq!(recs[19].timestamp_ms, 1019);
            assert_eq!(recs[3].value.as_deref(), Some(&[b'x'; 100][..]));
        }
        // One 4 MiB record of one repeated byte: a few KiB compressed.
        let mut bomb = encoded_batch(Compression::Zstd, 1, 4 << 20);
        assert!(bomb.len() < 64 << 10);
        match decode_batch(&mut bomb, 1 << 20) {
            Ok(_) => panic!("a 4 MiB batch decoded within a 1 MiB limit"),
            Err(e) => assert!(matches!(e, DecodeError::Decompress(_)), "{e}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic_or_exceed_the_limit(
            codec in 0usize..5,
            data in prop::collection::vec(any::<u8>(), 0..2048),
        ) {
            if let Ok(out) = decompress(ALL[codec], &data, 64 << 10) {
                prop_assert!(out.len() <= 64 << 10);
            }
        }

        #[test]
        fn mutated_compressed_data_never_panics(
            codec in 0usize..5,
            data in prop::collection::vec(any::<u8>(), 0..4096),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let c = ALL[codec];
            let mut z = compress(c, &data);
            prop_assert_eq!(&decompress(c, &z, data.len()).unwrap(), &data);
            for (at, x) in &flips {
                if !z.is_empty() {
                    let i = at.index(z.len());
                    z[i] ^= x;
                }
            }
            if truncate && !z.is_empty() {
                z.truncate(cut.index(z.len()));
            }
            if let Ok(out) = decompress(c, &z, 1 << 20) {
                prop_assert!(out.len() <= 1 << 20);
            }
        }

        #[test]
        fn mutated_encoded_batches_never_panic(
            codec in 0usize..5,
            n in 1usize..20,
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            huge_at in prop::option::of(any::<prop::sample::Index>()),
            fix_crc in any::<bool>(),
        ) {
            let b = encoded_batch(ALL[codec], n, 10);
            let mut m = b.to_vec();
            for (at, x) in &flips {
                let i = at.index(m.len());
                m[i] ^= x;
            }
            if let Some(at) = huge_at {
                let i = at.index(m.len() - 4);
                m[i..i + 4].copy_from_slice(&i32::MAX.to_be_bytes());
            }
            if fix_crc {
                // Reach the record decoder past the checksum.
                let crc = crc32c::crc32c(&m[21..]);
                m[17..21].copy_from_slice(&crc.to_be_bytes());
            }
            let _ = decode_batch(&mut Bytes::from(m), 1 << 20);
        }
    }
}
