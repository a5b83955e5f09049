//! Kafka RecordBatch v2, as Sluice's broker, CLI and load generator read and write it. Pure
//! functions over bytes: no I/O, no sockets.
//!
//! | module | owns |
//! | --- | --- |
//! | [`varint`] | zigzag and unsigned varints, bounded decoders |
//! | [`batch`] | the zero-copy header view, validation, `for_each_batch`, in-place header edits |
//! | [`records`] | decoding the records of an uncompressed records section |
//! | [`compression`] | the Kafka codecs: compression, decompression within a bound, `decode_batch` |
//! | [`builder`] | building a batch from records (header, producer fields, codec, CRC-32C) |
//! | [`validated`] | batches checked once (framing, CRC-32C), carried with their boundaries |
//! | [`wire`] | the small request/response encoding helpers hand-written encoders need |
//!
//! Every decoder here refuses a declared count or length larger than the bytes that remain
//! before allocating for it, and never panics on bad input.

pub mod batch;
pub mod builder;
pub mod compression;
pub mod records;
pub mod validated;
pub mod varint;
pub mod wire;

use std::fmt;

/// A Kafka log offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Offset(pub i64);

impl Offset {
    /// The offset after this one; saturates at `i64::MAX` (offsets read from a hostile file or
    /// batch can be anything).
    pub fn next(self) -> Offset {
        Offset(self.0.saturating_add(1))
    }
}
impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
