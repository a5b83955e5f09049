"""kafka-python (and kcat) against a real sluice broker. Consumers use explicit assignment."""

import subprocess
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewPartitions, NewTopic
from kafka.errors import InvalidReplicationFactorError, TopicAlreadyExistsError

TIMEOUT_MS = 10000


def name(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def admin(broker):
    a = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=TIMEOUT_MS)
    yield a
    a.close()


def consume_all(broker, topic, partition, expected, **kw):
    """Reads `expected` records from the start of one partition (bounded)."""
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False,
                      group_id=None, consumer_timeout_ms=TIMEOUT_MS, **kw)
    try:
        tp = TopicPartition(topic, partition)
        c.assign([tp])
        c.seek_to_beginning(tp)
        out = []
        for msg in c:
            out.append(msg)
            if len(out) >= expected:
                break
        return out
    finally:
        c.close()


def test_admin_create_describe_delete(broker, admin):
    t = name("adm")
    admin.create_topics([NewTopic(t, 3, 1, topic_configs={"retention.ms": "3600000"})])
    with pytest.raises(TopicAlreadyExistsError):
        admin.create_topics([NewTopic(t, 3, 1)])
    assert t in admin.list_topics()
    desc = admin.describe_topics([t])
    assert len(desc[0]["partitions"]) == 3
    admin.delete_topics([t])
    assert t not in admin.list_topics()


def test_admin_describe_configs_and_create_partitions(broker, admin):
    t = name("cfg")
    admin.create_topics([NewTopic(t, 2, 1, topic_configs={"retention.ms": "3600000"})])
    res = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t)])
    assert res == {"topic": {t: {"retention.ms": res["topic"][t]["retention.ms"]}}}, res
    assert res["topic"][t]["retention.ms"]["value"] == "3600000"
    res = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t)], config_filter="all")
    entries = {k: v["value"] for k, v in res["topic"][t].items()}
    assert entries["retention.ms"] == "3600000", entries
    assert entries["cleanup.policy"] == "delete", entries
    admin.create_partitions({t: NewPartitions(total_count=4)})
    desc = admin.describe_topics([t])
    assert len(desc[0]["partitions"]) == 4


def test_admin_replication_factor_three_is_refused(admin):
    with pytest.raises(InvalidReplicationFactorError):
        admin.create_topics([NewTopic(name("rf3"), 1, 3)])


def test_round_trip_keys_headers_null_value(broker, admin):
    t = name("rt")
    admin.create_topics([NewTopic(t, 1, 1)])
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, request_timeout_ms=TIMEOUT_MS)
    ts = 1_700_000_000_000
    futures = [
        p.send(t, key=b"k0", value=b"v0", headers=[("h", b"1"), ("empty", b"")], partition=0,
               timestamp_ms=ts),
        p.send(t, key=b"tomb", value=None, partition=0),
        p.send(t, key=None, value=b"no key", partition=0),
        p.send(t, key=b"k3", value=b"", partition=0),
    ]
    offsets = [f.get(timeout=10).offset for f in futures]
    p.close()
    assert offsets == [0, 1, 2, 3]
    msgs = consume_all(broker, t, 0, 4)
    assert [(m.offset, m.key, m.value) for m in msgs] == [
        (0, b"k0", b"v0"), (1, b"tomb", None), (2, None, b"no key"), (3, b"k3", b"")]
    assert msgs[0].timestamp == ts
    assert list(msgs[0].headers) == [("h", b"1"), ("empty", b"")]


@pytest.mark.parametrize("acks", [0, 1, "all"])
def test_acks(broker, admin, acks):
    t = name(f"acks{acks}")
    admin.create_topics([NewTopic(t, 1, 1)])
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=acks, request_timeout_ms=TIMEOUT_MS)
    futures = [p.send(t, value=f"r{i}".encode(), partition=0) for i in range(20)]
    metas = [f.get(timeout=10) for f in futures]
    p.flush(timeout=10)
    p.close()
    if acks != 0:
        assert [m.offset for m in metas] == list(range(20))
    msgs = consume_all(broker, t, 0, 20)
    assert [m.value for m in msgs] == [f"r{i}".encode() for i in range(20)]


def test_beginning_end_offsets_and_offsets_for_times(broker, admin):
    t = name("offs")
    admin.create_topics([NewTopic(t, 2, 1)])
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    base = 1_700_000_000_000
    for i in range(5):
        p.send(t, value=f"t{i}".encode(), partition=1, timestamp_ms=base + i * 1000).get(timeout=10)
    p.close()
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tp0, tp1 = TopicPartition(t, 0), TopicPartition(t, 1)
        assert c.beginning_offsets([tp0, tp1]) == {tp0: 0, tp1: 0}
        assert c.end_offsets([tp0, tp1]) == {tp0: 0, tp1: 5}
        r = c.offsets_for_times({tp1: base + 2500})
        assert r[tp1].offset == 3 and r[tp1].timestamp == base + 3000
        assert c.offsets_for_times({tp1: base})[tp1].offset == 0
        assert c.offsets_for_times({tp1: base + 10_000})[tp1] is None
    finally:
        c.close()


def kcat(args, stdin=None):
    r = subprocess.run(["kcat", *args], input=stdin, capture_output=True, timeout=30)
    assert r.returncode == 0, f"kcat {args}: {r.stderr.decode(errors='replace')}"
    return r.stdout.decode()


CODECS = ["gzip", "snappy", "lz4", "zstd"]


@pytest.mark.parametrize("codec", CODECS)
def test_codec_kafka_python_to_kcat(broker, admin, codec):
    t = name(f"py2kc-{codec}")
    admin.create_topics([NewTopic(t, 1, 1)])
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, compression_type=codec, linger_ms=20)
    values = [f"{codec} value {i} " + "xyz" * (i % 13) for i in range(100)]
    futures = [p.send(t, key=f"k{i}".encode(), value=v.encode(), partition=0)
               for i, v in enumerate(values)]
    assert sorted(f.get(timeout=10).offset for f in futures) == list(range(100))
    p.close()
    out = kcat(["-C", "-b", broker.bootstrap, "-t", t, "-p", "0", "-o", "beginning", "-e",
                "-f", "%o|%k|%s\\n"])
    assert out.splitlines() == [f"{i}|k{i}|{v}" for i, v in enumerate(values)]


@pytest.mark.parametrize("codec", CODECS)
def test_codec_kcat_to_kafka_python(broker, admin, codec):
    t = name(f"kc2py-{codec}")
    admin.create_topics([NewTopic(t, 1, 1)])
    lines = [f"k{i}:{codec} line {i} " + "abc" * (i % 11) for i in range(100)]
    kcat(["-P", "-b", broker.bootstrap, "-t", t, "-p", "0", "-z", codec, "-K", ":"],
         stdin=("\n".join(lines) + "\n").encode())
    msgs = consume_all(broker, t, 0, 100)
    assert [(m.offset, m.key.decode(), m.value.decode()) for m in msgs] == [
        (i, l.split(":", 1)[0], l.split(":", 1)[1]) for i, l in enumerate(lines)]
