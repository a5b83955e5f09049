//! Wire formats: the broker's layer over the `sluice-protocol` crate, which the CLI and the
//! `sluice-bench` load generator share. Pure functions over bytes: the codec never sees a socket.
//! Request/response bodies come from the `kafka-protocol` crate; `batch` is the zero-copy view of
//! RecordBatch v2 headers, `records` decodes uncompressed records, `compression` expands
//! compressed ones within a bound, `builder` writes batches, `varint` and `wire` hold the
//! encodings hand-written encoders need. Every decoder refuses a declared count or length larger
//! than the bytes that remain before allocating for it.

pub use sluice_protocol::{batch, builder, compression, records, validated, varint, wire};
