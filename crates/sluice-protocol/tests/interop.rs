//! Batches built here decode with another implementation (the `kafka-protocol` crate), and its
//! batches decode here, for every codec: the builder and decoder agree with the wire format, not
//! only with each other.

use bytes::{Bytes, BytesMut};
use kafka_protocol::records::{
    Compression as KpCompression, Record as KpRecord, RecordBatchDecoder, RecordBatchEncoder,
    RecordEncodeOptions, TimestampType,
};
use sluice_protocol::batch::BatchHeader;
use sluice_protocol::builder::{BatchBuilder, BatchOptions, Record};
use sluice_protocol::compression::{decode_batch, Compression, DECOMPRESSED_BATCH_BYTES_MAX};

fn kp(c: Compression) -> KpCompression {
    match c {
        Compression::None => KpCompression::None,
        Compression::Gzip => KpCompression::Gzip,
        Compression::Snappy => KpCompression::Snappy,
        Compression::Lz4 => KpCompression::Lz4,
        Compression::Zstd => KpCompression::Zstd,
    }
}

/// Values large enough to span several snappy and lz4 blocks.
fn value(i: usize) -> Vec<u8> {
    (0..5000).map(|j| ((i * 7 + j) % 251) as u8).collect()
}

#[test]
fn our_batches_decode_with_kafka_protocol() {
    for c in Compression::ALL {
        let values: Vec<Vec<u8>> = (0..40).map(value).collect();
        let mut b = BatchBuilder::new(BatchOptions {
            compression: c,
            producer_id: 7,
            producer_epoch: 1,
            base_sequence: 100,
            ..BatchOptions::default()
        });
        for (i, v) in values.iter().enumerate() {
            b.push(&Record {
                key: (i % 3 == 0).then_some(&b"key"[..]),
                value: Some(v),
                headers: &[("trace", Some(b"abc"))],
                timestamp_ms: 1_700_000_000_000 + i as i64,
            });
        }
        let mut buf = Bytes::from(b.finish().unwrap());
        let set = RecordBatchDecoder::decode(&mut buf).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        assert!(buf.is_empty());
        assert_eq!(set.compression, kp(c), "{c:?}");
        assert_eq!(set.records.len(), 40);
        for (i, r) in set.records.iter().enumerate() {
            assert_eq!(r.offset, i as i64);
            assert_eq!(r.timestamp, 1_700_000_000_000 + i as i64);
            assert_eq!(r.producer_id, 7);
            assert_eq!(r.sequence, 100 + i as i32);
            assert_eq!(r.key.is_some(), i % 3 == 0);
            assert_eq!(r.value.as_deref(), Some(&values[i][..]), "{c:?} record {i}");
            assert_eq!(r.headers.len(), 1);
        }
    }
}

#[test]
fn kafka_protocol_batches_decode_here() {
    for c in Compression::ALL {
        let recs: Vec<KpRecord> = (0..40)
            .map(|i| KpRecord {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: -1,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                sequence: -1,
                timestamp: 1000 + i as i64,
                key: Some(Bytes::from_static(b"k")),
                value: Some(value(i).into()),
                headers: Default::default(),
            })
            .collect();
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            &recs,
            &RecordEncodeOptions {
                version: 2,
                compression: kp(c),
            },
        )
        .unwrap();
        let mut buf = buf.freeze();
        // (kafka-protocol may split the records over several batches.)
        let mut offsets = vec![];
        while !buf.is_empty() {
            assert_eq!(
                BatchHeader::parse_checked(&buf).unwrap().compression(),
                c.attribute()
            );
            for r in decode_batch(&mut buf, DECOMPRESSED_BATCH_BYTES_MAX).unwrap() {
                assert_eq!(r.value.as_deref(), Some(&value(r.offset as usize)[..]));
                assert_eq!(r.timestamp_ms, 1000 + r.offset);
                offsets.push(r.offset);
            }
        }
        assert_eq!(offsets, (0..40).collect::<Vec<i64>>(), "{c:?}");
    }
}
