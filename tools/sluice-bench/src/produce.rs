//! One producer lane: a pipelined connection to one partition leader that sends pre-built
//! batches, one batch per Produce request, with up to `max_in_flight` requests outstanding.
//! A writer task patches and sends; a reader task matches responses (they arrive in request
//! order) and records ack latency from each request's scheduled send time.

use crate::batch::{self, BatchPool, ProducerFields};
use crate::rate::Pacer;
use crate::report::Stats;
use crate::setup::{self, CLIENT_ID};
use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use glommio::sync::Semaphore;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ProduceRequest, TopicName, TransactionalId};
use kafka_protocol::protocol::StrBytes;
use sluice_client::error::{code, error_name};
use sluice_client::{admin, Pending};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Everything one lane needs; plain data so it can cross to the lane's executor thread.
#[derive(Debug, Clone)]
pub struct LaneSpec {
    pub leader: String,
    pub topic: String,
    pub topic_id: uuid::Uuid,
    /// Partitions of the topic this lane writes, and all partitions (for key → partition).
    pub partitions: Vec<i32>,
    pub all_partitions: Vec<i32>,
    pub acks: i16,
    pub timeout_ms: i32,
    pub max_in_flight: usize,
    pub idempotent: bool,
    /// Produce requests per second for this lane; None = as fast as the window allows.
    pub sends_per_sec: Option<f64>,
    pub connect_timeout: Duration,
    /// Stop once this many records were sent by all lanes together.
    pub count: Option<u64>,
    /// Transactions, for a transactional lane ([`crate::txn::run_txn_lane`]).
    pub txn: Option<crate::txn::TxnLane>,
}

/// Records sent by all lanes together (for --count).
pub type SentCounter = Arc<AtomicU64>;

pub fn unix_now() -> (i64, i64) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_millis() as i64, d.as_micros() as i64)
}

/// Which (pool batch, partition) pairs the lane cycles through. With fixed keys a batch goes to
/// the partition its key maps to (key index mod partition count), as a keyed producer would.
pub fn schedule(pool: &BatchPool, spec: &LaneSpec) -> Vec<(usize, i32)> {
    let n = spec.all_partitions.len().max(1);
    let keyed: Vec<(usize, i32)> = pool
        .batches
        .iter()
        .enumerate()
        .filter_map(|(i, b)| {
            let p = spec.all_partitions[b.key_index as usize % n];
            spec.partitions.contains(&p).then_some((i, p))
        })
        .collect();
    let fixed_keys = pool.batches.iter().any(|b| b.keyed);
    if fixed_keys && !keyed.is_empty() {
        return keyed;
    }
    let len = pool.batches.len().max(spec.partitions.len());
    (0..len)
        .map(|i| {
            (
                i % pool.batches.len(),
                spec.partitions[i % spec.partitions.len()],
            )
        })
        .collect()
}

pub(crate) struct InFlight {
    pub(crate) request: Pending<ProduceRequest>,
    pub(crate) scheduled: Instant,
    pub(crate) records: u64,
    pub(crate) payload_bytes: u64,
}

/// Runs one lane until `stats` says stop (or the shared count is reached).
pub async fn run_lane(
    spec: LaneSpec,
    pool: Rc<BatchPool>,
    stats: Arc<Stats>,
    sent: SentCounter,
) -> Result<()> {
    let mut conn = setup::connect(&spec.leader, spec.connect_timeout).await?;
    let cap = if spec.topic_id.is_nil() {
        Some(12)
    } else {
        None
    };
    let version = conn.versions().pick::<ProduceRequest>(cap)?;
    let flexible = version >= 9;
    let mut producer = if spec.idempotent {
        let (id, epoch) = admin::init_producer_id(&mut conn).await?;
        Some((id, epoch))
    } else {
        None
    };
    let mut sequences: HashMap<i32, i32> = HashMap::new();
    let plan = schedule(&pool, &spec);
    assert!(!plan.is_empty());

    let (mut writer, reader) = conn.into_split();
    let window = Rc::new(Semaphore::new(spec.max_in_flight as u64));
    let (tx, rx) = async_channel::unbounded::<InFlight>();
    let reader_task = if spec.acks != 0 {
        let window = window.clone();
        let stats = stats.clone();
        Some(glommio::spawn_local(read_acks(
            reader, rx, window, stats, None,
        )))
    } else {
        None
    };

    let mut pacer = spec.sends_per_sec.map(|r| Pacer::new(Instant::now(), r));
    let mut buf = BytesMut::new();
    let mut at = 0usize;
    let mut result = Ok(());
    while !stats.stopped() {
        let scheduled = match pacer.as_mut() {
            Some(p) => {
                let slot = p.next_slot();
                let now = Instant::now();
                if slot > now {
                    glommio::timer::sleep(slot - now).await;
                }
                slot
            }
            None => Instant::now(),
        };
        if spec.acks != 0 && window.acquire(1).await.is_err() {
            break;
        }
        if stats.stopped() {
            break;
        }
        let (bi, partition) = plan[at % plan.len()];
        at += 1;
        let b = &pool.batches[bi];
        if let Some(limit) = spec.count {
            if sent.fetch_add(b.records as u64, Relaxed) >= limit {
                stats.stop.store(true, Relaxed);
                break;
            }
        }
        let fields = producer.as_mut().map(|(id, epoch)| {
            let seq = sequences.entry(partition).or_insert(0);
            let f = ProducerFields {
                producer_id: *id,
                epoch: *epoch,
                base_sequence: *seq,
            };
            *seq = ((*seq as i64 + b.records as i64) % (i32::MAX as i64 + 1)) as i32;
            f
        });
        let request = writer.next::<ProduceRequest>(version);
        buf.clear();
        // The batch carries its scheduled send time, so end-to-end latency, like ack latency,
        // includes any time the sender fell behind its schedule.
        let behind = Instant::now().saturating_duration_since(scheduled);
        let (now_ms, now_us) = unix_now();
        let stamp = (
            now_ms - behind.as_millis() as i64,
            now_us - behind.as_micros() as i64,
        );
        encode_produce(
            &mut buf,
            request.correlation_id(),
            version,
            flexible,
            &spec,
            partition,
            b,
            fields,
            stamp,
        )?;
        if let Err(e) = writer.write_all(&buf).await {
            result = Err(e);
            break;
        }
        if spec.acks == 0 {
            if stats.measuring() {
                stats.publish.add(b.records as u64, b.payload_bytes);
            }
        } else {
            let _ = tx
                .send(InFlight {
                    request,
                    scheduled,
                    records: b.records as u64,
                    payload_bytes: b.payload_bytes,
                })
                .await;
        }
    }
    drop(tx);
    if let Some(t) = reader_task {
        // Wait for the outstanding acks, but not forever.
        let drained = futures_lite::future::or(async { Some(t.await) }, async {
            glommio::timer::sleep(Duration::from_secs(10)).await;
            None
        })
        .await;
        match drained {
            Some(r) => result = result.and(r),
            None => {
                result = result.and(Err(anyhow::anyhow!(
                    "acks still outstanding 10 s after stop"
                )))
            }
        }
    }
    result.with_context(|| format!("producer to {}", spec.leader))
}

/// Encodes one Produce request carrying batch `b` for `partition`, then patches the batch's
/// per-send fields in place inside the request buffer (one copy of the batch per send):
/// timestamps (`stamp` = unix ms and µs), producer fields, CRC-32C.
#[allow(clippy::too_many_arguments)]
pub fn encode_produce(
    buf: &mut BytesMut,
    correlation_id: i32,
    version: i16,
    flexible: bool,
    spec: &LaneSpec,
    partition: i32,
    b: &batch::PooledBatch,
    fields: Option<ProducerFields>,
    (stamp_ms, stamp_us): (i64, i64),
) -> Result<()> {
    let mut topic =
        TopicProduceData::default().with_partition_data(vec![PartitionProduceData::default()
            .with_index(partition)
            .with_records(Some(b.bytes.clone()))]);
    if version >= 13 {
        topic = topic.with_topic_id(spec.topic_id);
    } else {
        topic = topic.with_name(TopicName(StrBytes::from_string(spec.topic.clone())));
    }
    let mut req = ProduceRequest::default();
    if let Some(t) = &spec.txn {
        req = req.with_transactional_id(Some(TransactionalId(StrBytes::from_string(
            t.transactional_id.clone(),
        ))));
    }
    let req = req
        .with_acks(spec.acks)
        .with_timeout_ms(spec.timeout_ms)
        .with_topic_data(vec![topic]);
    sluice_client::encode_request(
        buf,
        &StrBytes::from_static_str(CLIENT_ID),
        correlation_id,
        version,
        &req,
    )?;
    // Flexible versions end with three empty tagged-field sections: partition, topic, request.
    let end = buf.len() - if flexible { 3 } else { 0 };
    let start = end
        .checked_sub(b.bytes.len())
        .context("produce request shorter than its batch")?;
    // Cheap check that the slice really is our batch: same length field and magic.
    if buf[start + 8..start + 17] != b.bytes[8..17] {
        bail!("batch not found where expected in the encoded produce request");
    }
    batch::patch(&mut buf[start..end], stamp_ms, stamp_us, b.stamp_at, fields);
    Ok(())
}

/// Reads the acks of the requests queued on `rx` in order, records them, and returns each
/// request's permit to `window`; a failed partition's code goes to `first_error` if given.
pub(crate) async fn read_acks<R: futures_lite::AsyncRead + Unpin>(
    mut reader: sluice_client::Receiver<R>,
    rx: async_channel::Receiver<InFlight>,
    window: Rc<Semaphore>,
    stats: Arc<Stats>,
    first_error: Option<Rc<std::cell::Cell<i16>>>,
) -> Result<()> {
    let mut logged = 0;
    while let Ok(f) = rx.recv().await {
        let resp = reader.recv(f.request).await?;
        let done = Instant::now();
        let mut err = code::NONE;
        for t in &resp.responses {
            for p in &t.partition_responses {
                if p.error_code != code::NONE {
                    err = p.error_code;
                }
            }
        }
        if stats.measuring() {
            if err == code::NONE {
                stats.publish.add(f.records, f.payload_bytes);
                let us = done.saturating_duration_since(f.scheduled).as_micros() as u64;
                stats.publish.latency(us, f.records);
            } else {
                stats.publish.error();
            }
        }
        if let Some(first) = first_error.as_ref().filter(|f| f.get() == code::NONE) {
            first.set(err);
        }
        if err != code::NONE && logged < 3 {
            logged += 1;
            tracing::warn!("produce failed: {}", error_name(err));
        }
        window.signal(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchSpec, Compression, Keys, Payload};
    use kafka_protocol::protocol::Decodable;

    fn lane(topic_id: uuid::Uuid) -> LaneSpec {
        LaneSpec {
            leader: "127.0.0.1:9092".into(),
            topic: "t".into(),
            topic_id,
            partitions: vec![1, 3],
            all_partitions: vec![0, 1, 2, 3],
            acks: -1,
            timeout_ms: 1000,
            max_in_flight: 5,
            idempotent: true,
            sends_per_sec: None,
            connect_timeout: Duration::from_secs(1),
            count: None,
            txn: None,
        }
    }

    #[test]
    fn patched_batch_inside_request_decodes_with_valid_crc_at_every_layout() {
        let spec = BatchSpec {
            value_bytes: 64,
            records_per_batch: 10,
            compression: Compression::None,
            payload: Payload::Random,
            keys: Keys::None,
            seed: 3,
        };
        let pool = BatchPool::build(&spec, 1).unwrap();
        let id = uuid::Uuid::from_u128(0x1234);
        // v8: not flexible; v9: flexible, names; v13: flexible, topic ids.
        for version in [8i16, 9, 13] {
            let mut buf = BytesMut::new();
            let fields = ProducerFields {
                producer_id: 77,
                epoch: 2,
                base_sequence: 40,
            };
            encode_produce(
                &mut buf,
                5,
                version,
                version >= 9,
                &lane(id),
                3,
                &pool.batches[0],
                Some(fields),
                unix_now(),
            )
            .unwrap();
            let mut body = buf.split_off(4).freeze();
            kafka_protocol::protocol::decode_request_header_from_buffer(&mut body).unwrap();
            let req = ProduceRequest::decode(&mut body, version).unwrap();
            let t = &req.topic_data[0];
            if version >= 13 {
                assert_eq!(t.topic_id, id);
            } else {
                assert_eq!(t.name.as_str(), "t");
            }
            let p = &t.partition_data[0];
            assert_eq!(p.index, 3);
            let records = p.records.as_ref().unwrap();
            let h = sluice_protocol::batch::BatchHeader::parse_checked(records)
                .unwrap_or_else(|e| panic!("v{version}: {e}"));
            assert_eq!(h.size(), records.len());
            assert_eq!(h.producer_id(), 77);
            assert!(h.base_timestamp() > 1_600_000_000_000);
            assert!(batch::send_stamp_us(&h).unwrap() / 1000 >= h.base_timestamp() - 1);
            // The pooled original is untouched (the patch applies to the request's copy).
            assert_ne!(&records[..], &pool.batches[0].bytes[..]);
        }
    }

    #[test]
    fn lane_cycles_over_its_own_partitions() {
        let spec = BatchSpec {
            value_bytes: 8,
            records_per_batch: 1,
            compression: Compression::None,
            payload: Payload::Random,
            keys: Keys::Fixed(4),
            seed: 1,
        };
        let pool = BatchPool::build(&spec, 8).unwrap();
        let plan = schedule(&pool, &lane(uuid::Uuid::nil()));
        // Keys 1 and 3 map to partitions 1 and 3, the lane's own.
        assert!(!plan.is_empty());
        for (bi, p) in plan {
            assert_eq!(pool.batches[bi].key_index as i32, p);
        }
    }
}
