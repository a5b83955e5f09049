//! Wire formats. Pure functions over bytes: the codec never sees a socket.
//! Request/response bodies come from the `kafka-protocol` crate; `batch` is our zero-copy view of
//! RecordBatch v2 headers.

pub mod batch;
pub mod records;
