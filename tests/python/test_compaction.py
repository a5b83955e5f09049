"""Log compaction end to end with kafka-python: keys overwritten and tombstoned on a compacted
topic with small segments; once the cleaner has run (its pass counter on the metrics endpoint),
a consumer from offset 0 sees only the latest value of each key, at the offset it was produced
at, and no tombstone older than delete.retention.ms. A keyless record is refused with
INVALID_RECORD, as Kafka does. With confluent-kafka (librdkafka), a transactional producer
commits and aborts on a compacted topic: after cleaning, read_committed and read_uncommitted
consumers both see the committed latest values at their offsets and nothing aborted. Waits on
conditions, never on a fixed sleep."""

import os
import time
import urllib.request
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as CTopicPartition
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import InvalidRecordError
from prometheus_client.parser import text_string_to_metric_families

from conftest import Broker, free_port

WAIT_S = 60
KEYS = 20
ROUNDS = 8
TOMBSTONED = 5


@pytest.fixture
def cbroker():
    port = free_port()
    # The cleaner's round interval, short for the test (Kafka's log.cleaner.backoff.ms: 15 s).
    os.environ["SLUICE_CLEANER_BACKOFF_MS"] = "200"
    try:
        b = Broker(cores=1, extra_args=("--metrics-listen", f"127.0.0.1:{port}"))
    finally:
        del os.environ["SLUICE_CLEANER_BACKOFF_MS"]
    b.metrics_port = port
    yield b
    b.stop()


def cleaner_passes(b):
    with urllib.request.urlopen(f"http://127.0.0.1:{b.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for f in text_string_to_metric_families(text):
        if f.name == "sluice_log_cleaner_passes":
            return sum(s.value for s in f.samples if s.name.endswith("_total"))
    return 0


def create(b, topic, configs):
    a = KafkaAdminClient(bootstrap_servers=b.bootstrap, request_timeout_ms=WAIT_S * 1000)
    try:
        a.create_topics({topic: {"num_partitions": 1, "replication_factor": 1,
                                 "configs": configs}})
    finally:
        a.close()


def read_all(b, topic):
    """Every record from offset 0 to the end offset, as (offset, key, value)."""
    c = KafkaConsumer(bootstrap_servers=b.bootstrap, enable_auto_commit=False,
                      request_timeout_ms=WAIT_S * 1000 + 1000)
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        end = c.end_offsets([tp])[tp]
        c.seek(tp, 0)
        out = []
        deadline = time.monotonic() + WAIT_S
        while c.position(tp) < end:
            assert time.monotonic() < deadline, f"read to {c.position(tp)} of {end}"
            for recs in c.poll(timeout_ms=500).values():
                out.extend((r.offset, r.key, r.value) for r in recs)
        return out
    finally:
        c.close()


def test_consumers_see_the_latest_value_per_key_after_cleaning(cbroker, topic):
    create(cbroker, topic, {
        "cleanup.policy": "compact",
        "segment.bytes": "4096",
        "min.cleanable.dirty.ratio": "0.01",
        "delete.retention.ms": "0",
    })
    p = KafkaProducer(bootstrap_servers=cbroker.bootstrap, acks="all", linger_ms=0)
    latest = {}
    for rnd in range(ROUNDS):
        for k in range(KEYS):
            key = f"k{k}".encode()
            value = f"r{rnd}-".encode() + b"x" * 200
            latest[key] = (p.send(topic, key=key, value=value).get(WAIT_S).offset, value)
    tombstones = {}
    for k in range(TOMBSTONED):
        key = f"k{k}".encode()
        tombstones[key] = p.send(topic, key=key, value=None).get(WAIT_S).offset
        del latest[key]
    # Filler (its own key) so the tombstones and the last values leave the active segment,
    # which the cleaner never touches.
    for i in range(40):
        p.send(topic, key=b"filler", value=b"f" * 200).get(WAIT_S)
    p.close()

    def compacted(recs):
        keyed = [r for r in recs if r[1] != b"filler"]
        return sorted((o, k, v) for o, k, v in keyed) == \
            sorted((o, k, v) for k, (o, v) in latest.items())

    deadline = time.monotonic() + WAIT_S
    while True:
        recs = read_all(cbroker, topic)
        if cleaner_passes(cbroker) > 0 and compacted(recs):
            break
        assert time.monotonic() < deadline, \
            f"not compacted: {len(recs)} records, {cleaner_passes(cbroker)} cleaner passes"
        time.sleep(0.2)
    offsets = [r[0] for r in recs]
    assert offsets == sorted(set(offsets)), "offsets increase, none twice"
    assert not any(v is None for _, _, v in recs), "expired tombstones are gone"
    assert len(recs) < ROUNDS * KEYS // 2


def test_a_keyless_record_on_a_compacted_topic_is_invalid(cbroker, topic):
    create(cbroker, topic, {"cleanup.policy": "compact"})
    p = KafkaProducer(bootstrap_servers=cbroker.bootstrap, acks="all", retries=0)
    try:
        with pytest.raises(InvalidRecordError):
            p.send(topic, value=b"no key").get(WAIT_S)
        assert p.send(topic, key=b"k", value=b"keyed").get(WAIT_S).offset == 0
    finally:
        p.close()


def read_confluent(b, topic, isolation):
    """Every record from offset 0 until partition EOF, as (offset, key, value), read by a
    librdkafka consumer at `isolation`."""
    c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": f"g-{uuid.uuid4().hex[:8]}",
                  "isolation.level": isolation, "enable.auto.commit": False,
                  "enable.partition.eof": True})
    try:
        c.assign([CTopicPartition(topic, 0, 0)])
        out = []
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    return out
                raise KafkaException(m.error())
            out.append((m.offset(), m.key(), m.value()))
        raise AssertionError(f"no partition EOF after {len(out)} records")
    finally:
        c.close()


def test_transactional_data_on_a_compacted_topic(cbroker, topic):
    create(cbroker, topic, {
        "cleanup.policy": "compact",
        "segment.bytes": "4096",
        "min.cleanable.dirty.ratio": "0.01",
        "delete.retention.ms": "0",
    })
    p = Producer({"bootstrap.servers": cbroker.bootstrap, "linger.ms": 5,
                  "transactional.id": f"tid-{uuid.uuid4().hex[:8]}"})
    p.init_transactions(WAIT_S)
    delivered = {}

    def on_delivery(err, m):
        assert err is None, err
        delivered[(m.key(), m.value())] = m.offset()

    def txn(prefix, keys, commit):
        p.begin_transaction()
        for k in keys:
            p.produce(topic, key=f"k{k}".encode(), value=f"{prefix}-{k}-".encode() + b"x" * 200,
                      partition=0, on_delivery=on_delivery)
        p.flush(WAIT_S)
        if commit:
            p.commit_transaction(WAIT_S)
        else:
            p.abort_transaction(WAIT_S)

    txn("c1", range(10), True)
    txn("ab", range(10), False)
    txn("c2", range(5), True)
    txn("ab2", range(3, 8), False)
    # Filler (its own key, not transactional) so the transactions and their markers leave the
    # active segment, which the cleaner never touches.
    f = Producer({"bootstrap.servers": cbroker.bootstrap, "linger.ms": 0})
    for i in range(40):
        f.produce(topic, key=b"filler", value=b"f" * 200, partition=0, on_delivery=on_delivery)
        f.flush(WAIT_S)

    latest = {}
    for (key, value), offset in delivered.items():
        if key != b"filler" and not value.startswith(b"ab"):
            if key not in latest or latest[key][0] < offset:
                latest[key] = (offset, value)
    expected = sorted((o, k, v) for k, (o, v) in latest.items())
    assert {k: v[:3] for _, k, v in expected} == \
        {f"k{k}".encode(): b"c2-" if k < 5 else b"c1-" for k in range(10)}

    def keyed(recs):
        return sorted(r for r in recs if r[1] != b"filler")

    deadline = time.monotonic() + WAIT_S
    while True:
        uncommitted = read_confluent(cbroker, topic, "read_uncommitted")
        if cleaner_passes(cbroker) > 0 and keyed(uncommitted) == expected:
            break
        assert time.monotonic() < deadline, \
            f"not compacted: {len(uncommitted)} records, {cleaner_passes(cbroker)} passes"
        time.sleep(0.2)
    # Aborted records are gone for read_uncommitted consumers too, and read_committed
    # consumers see exactly the latest committed value of each key, at its original offset.
    committed = read_confluent(cbroker, topic, "read_committed")
    assert keyed(committed) == expected
    # Non-transactional records are not hidden from read_committed: the latest filler (which
    # no pass removes; older fillers may be cleaned between the two reads) is seen by both.
    def last_filler(recs):
        return max(r[0] for r in recs if r[1] == b"filler")

    assert last_filler(committed) == last_filler(uncommitted)
    offsets = [r[0] for r in committed]
    assert offsets == sorted(set(offsets)), "offsets increase, none twice"
    # The producer carries on: a later transaction lands after everything, and is seen.
    txn("c3", [0], True)
    committed = read_confluent(cbroker, topic, "read_committed")
    assert committed[-1][1:] == (b"k0", b"c3-0-" + b"x" * 200)
    p.flush(WAIT_S)
