//! Delayed delivery for share groups: the delivery time a record asks for in its headers.
//!
//! Two record headers, values in ASCII decimal (what every client can write):
//! - [`DELIVER_AT`] (`sluice.deliver.at`): the absolute delivery time, epoch milliseconds;
//! - [`DELIVER_AFTER_MS`] (`sluice.deliver.after.ms`): a delay in milliseconds after the
//!   record's timestamp (the producer's CreateTime, or the broker's LogAppendTime).
//!
//! With both, the later time wins. A value that is not a non-negative decimal integer of at
//! most 19 digits (or a delay whose sum overflows) is malformed: the record is delivered at once
//! and counted (`sluice_share_delivery_time_invalid_total`). Share acquisition reads these from the batches whose
//! records enter the in-flight window (decompressing only those); the log itself, Fetch and
//! classic consumers see records as written.

use bytes::Bytes;

use crate::protocol::compression;

use super::share_partition::DueTimes;

/// Absolute delivery time (epoch ms, ASCII decimal).
pub const DELIVER_AT: &[u8] = b"sluice.deliver.at";
/// Delay after the record's timestamp (ms, ASCII decimal).
pub const DELIVER_AFTER_MS: &[u8] = b"sluice.deliver.after.ms";
/// Longest header value read as a number: 19 digits hold every positive i64 ms value.
const DIGITS_MAX: usize = 19;
/// Largest batch expanded to read delivery times: the decompression bound every decoder of
/// stored batches uses.
const DECOMPRESSED_BYTES_MAX: usize = compression::DECOMPRESSED_BATCH_BYTES_MAX;

/// An ASCII decimal number of at most [`DIGITS_MAX`] digits; `None` for anything else.
fn decimal(v: &[u8]) -> Option<i64> {
    if v.is_empty() || v.len() > DIGITS_MAX || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse::<i64>().ok()
}

/// A delivery-time header whose value is not a valid time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// The delivery time the headers of a record with timestamp `timestamp_ms` ask for: `Ok(0)`
/// without one.
pub fn due_ms<'a>(
    timestamp_ms: i64,
    headers: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
) -> Result<i64, Malformed> {
    let mut due = 0i64;
    for (k, v) in headers {
        let at = if k == DELIVER_AT {
            v.and_then(decimal).ok_or(Malformed)?
        } else if k == DELIVER_AFTER_MS {
            let d = v.and_then(decimal).ok_or(Malformed)?;
            timestamp_ms.max(0).checked_add(d).ok_or(Malformed)?
        } else {
            continue;
        };
        due = due.max(at);
    }
    Ok(due)
}

/// The delivery times of one stored batch's records (decompressed if needed). A batch that
/// does not decode delivers its records at once (the fetch hands them on as stored).
pub fn due_times(batch: &Bytes) -> DueTimes {
    let mut b = batch.clone();
    let Ok(records) = compression::decode_batch(&mut b, DECOMPRESSED_BYTES_MAX) else {
        return vec![];
    };
    let mut out = vec![];
    for r in &records {
        if r.headers.is_empty() {
            continue;
        }
        let hs = r.headers.iter().map(|(k, v)| (&k[..], v.as_deref()));
        match due_ms(r.timestamp_ms, hs) {
            Ok(0) => {}
            Ok(d) => out.push((r.offset, d)),
            Err(Malformed) => {
                crate::stats::share_delivery_time_invalid();
                tracing::debug!(
                    offset = r.offset,
                    "malformed delivery-time header: delivered at once"
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::batch::set_base_offset;
    use crate::protocol::builder::{self, BatchBuilder, BatchOptions};
    use crate::protocol::compression::Compression;
    use crate::types::Offset;

    fn h<'a>(
        pairs: &'a [(&'a [u8], Option<&'a [u8]>)],
    ) -> impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)> {
        pairs.iter().copied()
    }

    #[test]
    fn headers_give_absolute_or_relative_times_and_malformed_ones_are_errors() {
        assert_eq!(due_ms(1000, h(&[])), Ok(0));
        assert_eq!(due_ms(1000, h(&[(b"other", Some(b"5"))])), Ok(0));
        assert_eq!(due_ms(1000, h(&[(DELIVER_AT, Some(b"5000"))])), Ok(5000));
        assert_eq!(
            due_ms(1000, h(&[(DELIVER_AFTER_MS, Some(b"250"))])),
            Ok(1250)
        );
        // Both: the later.
        assert_eq!(
            due_ms(
                1000,
                h(&[
                    (DELIVER_AT, Some(b"1100")),
                    (DELIVER_AFTER_MS, Some(b"250"))
                ])
            ),
            Ok(1250)
        );
        for bad in [
            &b""[..],
            b"-5",
            b"+5",
            b" 5",
            b"5ms",
            b"1e3",
            b"99999999999999999999",
        ] {
            assert_eq!(
                due_ms(0, h(&[(DELIVER_AT, Some(bad))])),
                Err(Malformed),
                "{bad:?}"
            );
        }
        assert_eq!(due_ms(0, h(&[(DELIVER_AT, None)])), Err(Malformed));
        assert_eq!(
            due_ms(10, h(&[(DELIVER_AFTER_MS, Some(b"9223372036854775807"))])),
            Err(Malformed)
        );
    }

    #[test]
    fn due_times_are_read_from_compressed_batches() {
        for c in Compression::ALL {
            let mut b = BatchBuilder::new(BatchOptions {
                compression: c,
                ..Default::default()
            });
            let at = b"7000".to_vec();
            let after = b"300".to_vec();
            let recs = [
                builder::Record {
                    key: None,
                    value: Some(b"a"),
                    headers: &[],
                    timestamp_ms: 1000,
                },
                builder::Record {
                    key: None,
                    value: Some(b"b"),
                    headers: &[("sluice.deliver.at", Some(&at))],
                    timestamp_ms: 1000,
                },
                builder::Record {
                    key: None,
                    value: Some(b"c"),
                    headers: &[("sluice.deliver.after.ms", Some(&after))],
                    timestamp_ms: 1001,
                },
                builder::Record {
                    key: None,
                    value: Some(b"d"),
                    headers: &[("sluice.deliver.at", Some(b"soon"))],
                    timestamp_ms: 1001,
                },
            ];
            for r in &recs {
                b.push(r);
            }
            let mut bytes = b.finish().unwrap();
            set_base_offset(&mut bytes, Offset(40));
            let before = crate::stats::snapshot(&[]).share_delivery_time_invalid;
            assert_eq!(
                due_times(&Bytes::from(bytes)),
                vec![(41, 7000), (42, 1301)],
                "{c:?}"
            );
            assert_eq!(
                crate::stats::snapshot(&[]).share_delivery_time_invalid,
                before + 1
            );
        }
        // Garbage is no delivery time, not a panic.
        assert_eq!(due_times(&Bytes::from_static(b"garbage")), vec![]);
    }
}
