//! Wire formats. Pure functions over bytes: the codec never sees a socket.
//! Request/response bodies come from the `kafka-protocol` crate; `batch` is our zero-copy view of
//! RecordBatch v2 headers, `records` decodes uncompressed records, `compression` expands
//! compressed ones within a bound. Every decoder here refuses a declared count or length larger
//! than the bytes that remain before allocating for it.

pub mod batch;
pub mod compression;
pub mod records;

use bytes::Bytes;
use kafka_protocol::records::{Record, TimestampType};

/// A plain (non-idempotent, non-transactional) record for `kafka-protocol`'s batch encoder, as
/// the CLI and the internal offsets topic write them; `offset` is its delta within the batch.
pub fn plain_record(
    offset: i64,
    timestamp_ms: i64,
    key: Option<Bytes>,
    value: Option<Bytes>,
) -> Record {
    Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset,
        sequence: -1,
        timestamp: timestamp_ms,
        key,
        value,
        headers: Default::default(),
    }
}
