//! Tests of the partition log as a whole, each run inside a glommio LocalExecutor on a temp dir.

use crate::protocol::batch::{build, HEADER_BYTES};

/// An uncompressed batch of `n` records from idempotent producer `pid`/`epoch` starting at
/// sequence `seq` (KIP-98 fields set, CRC recomputed).
pub(crate) fn idempotent_batch(pid: i64, epoch: i16, seq: i32, n: usize) -> Vec<u8> {
    let recs: Vec<build::Record<'_>> = (0..n)
        .map(|_| build::Record {
            key: None,
            value: Some(b"v"),
            headers: &[],
            timestamp_ms: 1000,
        })
        .collect();
    let mut b = build::batch(&recs);
    b[43..51].copy_from_slice(&pid.to_be_bytes());
    b[51..53].copy_from_slice(&epoch.to_be_bytes());
    b[53..57].copy_from_slice(&seq.to_be_bytes());
    let crc = crc32c::crc32c(&b[21..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    debug_assert!(b.len() > HEADER_BYTES);
    b
}
