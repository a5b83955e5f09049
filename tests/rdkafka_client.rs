//! librdkafka (through the `rdkafka` crate) against the real broker: admin, produce/fetch round
//! trips, codecs, acks, offsets, idempotent retries. Consumers use explicit assignment.

mod common;

use std::time::Duration;

use common::Broker;
use rdkafka::admin::{
    AdminClient, AdminOptions, NewPartitions, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const WAIT: Duration = Duration::from_secs(10);

fn config(b: &Broker) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", b.bootstrap())
        .set("socket.timeout.ms", "10000")
        .set("log_level", "3");
    c
}

fn admin(b: &Broker) -> AdminClient<DefaultClientContext> {
    config(b).create().expect("admin client")
}

fn opts() -> AdminOptions {
    AdminOptions::new()
        .operation_timeout(Some(WAIT))
        .request_timeout(Some(WAIT))
}

fn producer(b: &Broker, extra: &[(&str, &str)]) -> FutureProducer {
    let mut c = config(b);
    c.set("message.timeout.ms", "10000").set("linger.ms", "0");
    for (k, v) in extra {
        c.set(*k, *v);
    }
    c.create().expect("producer")
}

fn consumer(b: &Broker, extra: &[(&str, &str)]) -> BaseConsumer {
    let mut c = config(b);
    // librdkafka wants a group id even for assign(); no group API is used: offsets are explicit
    // and nothing is committed.
    c.set("group.id", "sluice-tests-unused")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "100");
    for (k, v) in extra {
        c.set(*k, *v);
    }
    c.create().expect("consumer")
}

async fn create_topic(b: &Broker, name: &str, partitions: i32, configs: &[(&str, &str)]) {
    let mut t = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (k, v) in configs {
        t = t.set(k, v);
    }
    let res = admin(b)
        .create_topics([&t], &opts())
        .await
        .expect("create_topics request");
    assert_eq!(res.len(), 1);
    assert!(res[0].is_ok(), "create {name}: {:?}", res[0]);
}

/// Reads `n` records of one partition starting at `from` (bounded by WAIT).
fn read_n(
    c: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: Offset,
    n: usize,
) -> Vec<OwnedMessage> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, from)
        .expect("add partition");
    c.assign(&tpl).expect("assign");
    let deadline = std::time::Instant::now() + WAIT;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "read {} of {n} records of {topic}/{partition} before the deadline",
            out.len()
        );
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => out.push(m.detach()),
            Some(Err(e)) => panic!("consume error: {e}"),
            None => {}
        }
    }
    out
}

async fn send(
    p: &FutureProducer,
    rec: FutureRecord<'_, [u8], [u8]>,
) -> Result<(i32, i64), KafkaError> {
    p.send(rec, Timeout::After(WAIT))
        .await
        .map(|d| (d.partition, d.offset))
        .map_err(|(e, _)| e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_lists_broker_and_topic() {
    let b = Broker::start(2);
    create_topic(&b, "meta", 4, &[]).await;
    let c = consumer(&b, &[]);
    let md = c.fetch_metadata(Some("meta"), WAIT).expect("metadata");
    assert_eq!(md.brokers().len(), 1);
    assert_eq!(md.brokers()[0].host(), "127.0.0.1");
    assert_eq!(md.brokers()[0].port() as u16, b.port);
    assert_eq!(md.topics().len(), 1);
    let t = &md.topics()[0];
    assert_eq!(t.name(), "meta");
    assert!(t.error().is_none(), "{:?}", t.error());
    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ids.sort();
    assert_eq!(ids, vec![0, 1, 2, 3]);
    for p in t.partitions() {
        assert_eq!(p.leader(), md.brokers()[0].id());
        assert_eq!(p.replicas(), &[md.brokers()[0].id()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_create_duplicate_delete_recreate() {
    let b = Broker::start(2);
    let a = admin(&b);
    create_topic(&b, "adm", 3, &[]).await;
    let dup = NewTopic::new("adm", 3, TopicReplication::Fixed(1));
    let res = a.create_topics([&dup], &opts()).await.expect("request");
    assert_eq!(
        res[0],
        Err(("adm".to_string(), RDKafkaErrorCode::TopicAlreadyExists))
    );
    let res = a.delete_topics(&["adm"], &opts()).await.expect("request");
    assert_eq!(res[0], Ok("adm".to_string()));
    let c = consumer(&b, &[]);
    let md = c.fetch_metadata(None, WAIT).expect("metadata");
    assert!(md.topics().iter().all(|t| t.name() != "adm"));
    // Recreate with a different partition count: the old data must be gone.
    create_topic(&b, "adm", 2, &[]).await;
    let md = c.fetch_metadata(Some("adm"), WAIT).expect("metadata");
    assert_eq!(md.topics()[0].partitions().len(), 2);
    let (lo, hi) = c.fetch_watermarks("adm", 0, WAIT).expect("watermarks");
    assert_eq!((lo, hi), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_replication_factor_three_is_refused() {
    let b = Broker::start(1);
    let t = NewTopic::new("rf3", 1, TopicReplication::Fixed(3));
    let res = admin(&b)
        .create_topics([&t], &opts())
        .await
        .expect("request");
    assert_eq!(
        res[0],
        Err((
            "rf3".to_string(),
            RDKafkaErrorCode::InvalidReplicationFactor
        ))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_describe_configs_and_create_partitions() {
    let b = Broker::start(2);
    create_topic(
        &b,
        "cfg",
        2,
        &[
            ("retention.ms", "3600000"),
            ("max.message.bytes", "2000000"),
        ],
    )
    .await;
    let a = admin(&b);
    let res = a
        .describe_configs([&ResourceSpecifier::Topic("cfg")], &opts())
        .await
        .expect("request");
    let r = res[0].as_ref().expect("describe cfg");
    let get = |k: &str| r.get(k).and_then(|e| e.value.clone());
    assert_eq!(get("retention.ms").as_deref(), Some("3600000"));
    assert_eq!(get("max.message.bytes").as_deref(), Some("2000000"));
    assert!(r.get("cleanup.policy").is_some(), "defaults are listed too");

    let res = a
        .create_partitions([&NewPartitions::new("cfg", 5)], &opts())
        .await
        .expect("request");
    assert_eq!(res[0], Ok("cfg".to_string()));
    let c = consumer(&b, &[]);
    let md = c.fetch_metadata(Some("cfg"), WAIT).expect("metadata");
    assert_eq!(md.topics()[0].partitions().len(), 5);
    // Shrinking is refused.
    let res = a
        .create_partitions([&NewPartitions::new("cfg", 3)], &opts())
        .await
        .expect("request");
    assert_eq!(
        res[0],
        Err(("cfg".to_string(), RDKafkaErrorCode::InvalidPartitions))
    );
    // The new partitions take records.
    let p = producer(&b, &[]);
    let (part, off) = send(&p, FutureRecord::to("cfg").partition(4).payload(&b"x"[..]))
        .await
        .expect("produce to new partition");
    assert_eq!((part, off), (4, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_keys_headers_timestamps_nulls() {
    let b = Broker::start(2);
    create_topic(&b, "rt", 1, &[]).await;
    let p = producer(&b, &[]);
    let ts = 1_700_000_000_123i64;
    let h = OwnedHeaders::new()
        .insert(Header {
            key: "h1",
            value: Some(&b"v1"[..]),
        })
        .insert(Header {
            key: "h2",
            value: None::<&[u8]>,
        });
    let o0 = send(
        &p,
        FutureRecord::to("rt")
            .key(&b"k0"[..])
            .payload(&b"v0"[..])
            .headers(h)
            .timestamp(ts),
    )
    .await
    .expect("record 0");
    let o1 = send(&p, FutureRecord::to("rt").payload(&b"no key"[..]))
        .await
        .expect("record 1");
    let o2 = send(&p, FutureRecord::to("rt").key(&b"tombstone"[..]))
        .await
        .expect("record 2");
    let o3 = send(&p, FutureRecord::to("rt").key(&b"k3"[..]).payload(&b""[..]))
        .await
        .expect("record 3");
    assert_eq!(
        [o0.1, o1.1, o2.1, o3.1],
        [0, 1, 2, 3],
        "offsets are dense from 0"
    );

    let c = consumer(&b, &[]);
    let msgs = read_n(&c, "rt", 0, Offset::Beginning, 4);
    assert_eq!(msgs[0].key(), Some(&b"k0"[..]));
    assert_eq!(msgs[0].payload(), Some(&b"v0"[..]));
    assert_eq!(msgs[0].timestamp().to_millis(), Some(ts));
    let hs = msgs[0].headers().expect("headers");
    assert_eq!(hs.count(), 2);
    assert_eq!(hs.get(0).key, "h1");
    assert_eq!(hs.get(0).value, Some(&b"v1"[..]));
    assert_eq!(hs.get(1).key, "h2");
    assert_eq!(hs.get(1).value, None);
    assert_eq!(msgs[1].key(), None);
    assert_eq!(msgs[1].payload(), Some(&b"no key"[..]));
    assert!(msgs[1].timestamp().to_millis().unwrap_or(-1) > 0);
    assert_eq!(msgs[2].key(), Some(&b"tombstone"[..]));
    assert_eq!(msgs[2].payload(), None, "null value stays null");
    assert_eq!(msgs[3].payload(), Some(&b""[..]), "empty value stays empty");
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.offset(), i as i64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_record_round_trip() {
    let b = Broker::start(1);
    create_topic(&b, "big", 1, &[("max.message.bytes", "2097152")]).await;
    let p = producer(&b, &[("message.max.bytes", "2097152")]);
    let value: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let (_, off) = send(
        &p,
        FutureRecord::to("big").key(&b"big"[..]).payload(&value[..]),
    )
    .await
    .expect("1 MiB record");
    assert_eq!(off, 0);
    let c = consumer(&b, &[("fetch.message.max.bytes", "4194304")]);
    let msgs = read_n(&c, "big", 0, Offset::Beginning, 1);
    assert_eq!(msgs[0].payload().map(|v| v.len()), Some(value.len()));
    assert!(
        msgs[0].payload() == Some(&value[..]),
        "payload bytes differ"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_record_is_message_size_too_large() {
    let b = Broker::start(1);
    create_topic(&b, "small", 1, &[("max.message.bytes", "10000")]).await;
    // The producer's own limit is higher, so the broker is the one that refuses.
    let p = producer(&b, &[("message.max.bytes", "2097152")]);
    let value = vec![7u8; 50_000];
    let err = send(&p, FutureRecord::to("small").payload(&value[..]))
        .await
        .expect_err("a 50 kB record must be refused by a 10 kB topic limit");
    assert_eq!(
        err.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge),
        "{err}"
    );
    // A small one still goes through, and the refused one left nothing behind.
    let (_, off) = send(&p, FutureRecord::to("small").payload(&b"ok"[..]))
        .await
        .expect("small record");
    assert_eq!(off, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codec_round_trips() {
    let b = Broker::start(2);
    for codec in ["gzip", "snappy", "lz4", "zstd"] {
        let topic = format!("codec-{codec}");
        create_topic(&b, &topic, 1, &[]).await;
        let p = producer(&b, &[("compression.codec", codec), ("linger.ms", "50")]);
        let n = 200usize;
        let values: Vec<String> = (0..n)
            .map(|i| format!("{codec} record {i} {}", "abc".repeat(i % 20)))
            .collect();
        // Enqueue everything first so that the records share batches.
        let futs: Vec<_> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let key = format!("k{i}");
                p.send_result(
                    FutureRecord::to(&topic)
                        .key(key.as_bytes())
                        .payload(v.as_bytes()),
                )
                .unwrap_or_else(|(e, _)| panic!("{codec}: enqueue: {e}"))
            })
            .collect();
        let mut offsets = Vec::new();
        for f in futs {
            let d = tokio::time::timeout(WAIT, f)
                .await
                .unwrap_or_else(|_| panic!("{codec}: no delivery report in {WAIT:?}"))
                .expect("delivery future canceled")
                .unwrap_or_else(|(e, _)| panic!("{codec}: {e}"));
            offsets.push(d.offset);
        }
        offsets.sort();
        assert_eq!(offsets, (0..n as i64).collect::<Vec<_>>(), "{codec}");
        let c = consumer(&b, &[]);
        let msgs = read_n(&c, &topic, 0, Offset::Beginning, n);
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m.offset(), i as i64, "{codec}");
            assert_eq!(m.key(), Some(format!("k{i}").as_bytes()), "{codec}");
            assert_eq!(m.payload(), Some(values[i].as_bytes()), "{codec}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_zero_one_all() {
    let b = Broker::start(2);
    create_topic(&b, "acks", 1, &[]).await;
    let mut expected = Vec::new();
    for acks in ["0", "1", "all"] {
        let p = producer(&b, &[("acks", acks)]);
        for i in 0..10 {
            let v = format!("acks={acks} {i}");
            let (_, off) = send(&p, FutureRecord::to("acks").payload(v.as_bytes()))
                .await
                .unwrap_or_else(|e| panic!("acks={acks}: {e}"));
            if acks != "0" {
                assert_eq!(off, expected.len() as i64, "acks={acks}");
            }
            expected.push(v);
        }
    }
    let c = consumer(&b, &[]);
    let msgs = read_n(&c, "acks", 0, Offset::Beginning, expected.len());
    let got: Vec<&[u8]> = msgs
        .iter()
        .map(|m| m.payload().unwrap_or_default())
        .collect();
    let want: Vec<&[u8]> = expected.iter().map(|s| s.as_bytes()).collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_for_times_and_watermarks() {
    let b = Broker::start(2);
    create_topic(&b, "times", 2, &[]).await;
    let p = producer(&b, &[]);
    let base = 1_700_000_000_000i64;
    for i in 0..5i64 {
        let v = format!("t{i}");
        let (part, off) = send(
            &p,
            FutureRecord::to("times")
                .partition(1)
                .payload(v.as_bytes())
                .timestamp(base + i * 1000),
        )
        .await
        .expect("produce");
        assert_eq!((part, off), (1, i));
    }
    let c = consumer(&b, &[]);
    assert_eq!(
        c.fetch_watermarks("times", 1, WAIT).expect("watermarks"),
        (0, 5)
    );
    assert_eq!(
        c.fetch_watermarks("times", 0, WAIT).expect("watermarks"),
        (0, 0)
    );
    let query = |ts: i64| {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("times", 1, Offset::Offset(ts))
            .expect("add");
        let r = c.offsets_for_times(tpl, WAIT).expect("offsets_for_times");
        let e = r.find_partition("times", 1).expect("partition in answer");
        assert!(e.error().is_ok(), "{:?}", e.error());
        e.offset()
    };
    assert_eq!(
        query(base - 1),
        Offset::Offset(0),
        "before the first record"
    );
    assert_eq!(query(base), Offset::Offset(0), "exactly the first");
    assert_eq!(query(base + 2000), Offset::Offset(2), "exact match");
    assert_eq!(query(base + 2500), Offset::Offset(3), "first at or after");
    assert_eq!(query(base + 4000), Offset::Offset(4), "the last");
    assert_eq!(query(base + 4001), Offset::End, "after the last: -1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_at_end_receives_later_record() {
    let b = Broker::start(2);
    create_topic(&b, "tail", 1, &[]).await;
    let p = producer(&b, &[]);
    send(&p, FutureRecord::to("tail").payload(&b"before"[..]))
        .await
        .expect("produce");
    let c = consumer(&b, &[("fetch.wait.max.ms", "500")]);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("tail", 0, Offset::End)
        .expect("add");
    c.assign(&tpl).expect("assign");
    // Let the consumer reach the end and park in a long-poll Fetch.
    for _ in 0..10 {
        if let Some(r) = c.poll(Duration::from_millis(100)) {
            panic!("nothing new should arrive yet: {:?}", r.map(|m| m.offset()));
        }
    }
    let producer_task = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        send(&p, FutureRecord::to("tail").payload(&b"after"[..])).await
    });
    let deadline = std::time::Instant::now() + WAIT;
    let msg = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the waiting consumer never got the later record"
        );
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => break m.detach(),
            Some(Err(e)) => panic!("consume error: {e}"),
            None => {}
        }
    };
    assert_eq!(msg.payload(), Some(&b"after"[..]));
    assert_eq!(msg.offset(), 1);
    let sent = producer_task.await.expect("join").expect("produce");
    assert_eq!(sent, (0, 1));
}

/// A 127.0.0.1 TCP proxy in front of the broker that cuts a client connection right after
/// forwarding the produce requests whose global sequence number is in `cut_after`, before their
/// responses can come back: the producer must retry a request the broker already appended.
struct CuttingProxy {
    port: u16,
    produce_requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    cuts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttingProxy {
    async fn bind() -> (tokio::net::TcpListener, u16) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = l.local_addr().expect("proxy addr").port();
        (l, port)
    }

    fn run(
        listener: tokio::net::TcpListener,
        upstream: std::net::SocketAddr,
        cut_after: Vec<usize>,
    ) -> CuttingProxy {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let port = listener.local_addr().expect("proxy addr").port();
        let produce_requests = Arc::new(AtomicUsize::new(0));
        let cuts = Arc::new(AtomicUsize::new(0));
        let (pr, cu) = (produce_requests.clone(), cuts.clone());
        let cut_after = Arc::new(cut_after);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (pr, cu, cut_after) = (pr.clone(), cu.clone(), cut_after.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let mut down = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    });
                    loop {
                        let mut len = [0u8; 4];
                        if cr.read_exact(&mut len).await.is_err() {
                            break;
                        }
                        let n = i32::from_be_bytes(len);
                        assert!(n >= 2 && n < 64 << 20, "client sent frame length {n}");
                        let mut frame = vec![0u8; n as usize];
                        if cr.read_exact(&mut frame).await.is_err() {
                            break;
                        }
                        let api_key = i16::from_be_bytes([frame[0], frame[1]]);
                        let cut = api_key == 0
                            && cut_after.contains(&(pr.fetch_add(1, Ordering::SeqCst) + 1));
                        if cut {
                            // Stop forwarding responses first so that the answer to this
                            // request never reaches the client.
                            down.abort();
                            let _ = (&mut down).await;
                        }
                        if sw.write_all(&len).await.is_err() || sw.write_all(&frame).await.is_err()
                        {
                            break;
                        }
                        if cut {
                            // Give the broker time to append, then drop the connection.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            cu.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                    let _ = down.await;
                });
            }
        });
        CuttingProxy {
            port,
            produce_requests,
            cuts,
            task,
        }
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_producer_survives_cut_connections_exactly_once() {
    use std::sync::atomic::Ordering;
    let (listener, proxy_port) = CuttingProxy::bind().await;
    // Clients learn the broker's address from Metadata: advertise the proxy so every
    // connection goes through it.
    let advertise = format!("127.0.0.1:{proxy_port}");
    let b = Broker::start_with(2, &["--advertise", &advertise]);
    let proxy = CuttingProxy::run(listener, b.addr(), vec![3, 8]);
    create_topic(&b, "idem", 1, &[]).await;
    assert_eq!(proxy.port, proxy_port);

    let mut c = config(&b);
    c.set("bootstrap.servers", &advertise)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "20")
        .set("retry.backoff.ms", "50")
        .set("message.timeout.ms", "30000");
    let p: FutureProducer = c.create().expect("idempotent producer");
    let n = 400usize;
    let mut futs = Vec::with_capacity(n);
    for i in 0..n {
        let v = format!("{i:05}");
        futs.push(
            p.send_result(FutureRecord::<[u8], [u8]>::to("idem").payload(v.as_bytes()))
                .unwrap_or_else(|(e, _)| panic!("enqueue {i}: {e}")),
        );
        if i % 25 == 24 {
            // Spread the records over many produce requests.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut offsets = Vec::with_capacity(n);
    for (i, f) in futs.into_iter().enumerate() {
        let d = tokio::time::timeout(Duration::from_secs(40), f)
            .await
            .unwrap_or_else(|_| panic!("record {i}: no delivery report"))
            .expect("delivery future canceled")
            .unwrap_or_else(|(e, _)| panic!("record {i}: {e}"));
        offsets.push(d.offset);
    }
    eprintln!(
        "proxy: {} produce requests, {} cut",
        proxy.produce_requests.load(Ordering::SeqCst),
        proxy.cuts.load(Ordering::SeqCst)
    );
    assert!(
        proxy.cuts.load(Ordering::SeqCst) >= 1,
        "the proxy must have cut at least one connection (saw {} produce requests)",
        proxy.produce_requests.load(Ordering::SeqCst)
    );
    assert_eq!(
        offsets,
        (0..n as i64).collect::<Vec<_>>(),
        "each record acked once, in order"
    );
    let cons = consumer(&b, &[("bootstrap.servers", advertise.as_str())]);
    let (lo, hi) = cons.fetch_watermarks("idem", 0, WAIT).expect("watermarks");
    assert_eq!((lo, hi), (0, n as i64), "no duplicate was appended");
    let msgs = read_n(&cons, "idem", 0, Offset::Beginning, n);
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.payload(), Some(format!("{i:05}").as_bytes()));
    }
}
