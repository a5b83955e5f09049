"""kafka-python (pure-Python client, its own protocol code) against the broker: admin,
round trips with keys/headers/null values, every codec, acks, ListOffsets, an invalid request,
and cross-client checks with kcat. Consumers use assign() with explicit positions (no groups)."""

import os
import shutil
import subprocess
import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewPartitions
from kafka.errors import (
    InvalidConfigurationError,
    InvalidPartitionsError,
    InvalidReplicationFactorError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)

WAIT_S = 30


def admin(b):
    return KafkaAdminClient(bootstrap_servers=b.bootstrap, request_timeout_ms=WAIT_S * 1000)


def create(b, name, partitions=1, configs=None):
    a = admin(b)
    try:
        spec = {"num_partitions": partitions, "replication_factor": 1}
        if configs:
            spec["configs"] = configs
        a.create_topics({name: spec})
    finally:
        a.close()


def producer(b, **kw):
    return KafkaProducer(bootstrap_servers=b.bootstrap, request_timeout_ms=WAIT_S * 1000, **kw)


def consumer(b):
    return KafkaConsumer(bootstrap_servers=b.bootstrap, enable_auto_commit=False,
                         request_timeout_ms=WAIT_S * 1000 + 1000,
                         consumer_timeout_ms=WAIT_S * 1000)


def read(b, topic, partition, n, offset=0):
    """Reads exactly n records of topic/partition from offset (bounded)."""
    c = consumer(b)
    try:
        tp = TopicPartition(topic, partition)
        c.assign([tp])
        c.seek(tp, offset)
        out = []
        deadline = time.monotonic() + WAIT_S
        while len(out) < n:
            assert time.monotonic() < deadline, f"read {len(out)} of {n} records"
            for recs in c.poll(timeout_ms=500).values():
                out.extend(recs)
        return out[:n] if len(out) == n else out
    finally:
        c.close()


def kcat_bin():
    path = shutil.which("kcat")
    assert path, "kcat is not installed: run tests/run.sh (it installs kcat) or apt-get install -y kcat"
    return path


# --- admin -------------------------------------------------------------------------------------

def test_admin_create_duplicate_delete_recreate(broker, topic):
    a = admin(broker)
    try:
        a.create_topics({topic: {"num_partitions": 3, "replication_factor": 1}})
        assert topic in a.list_topics()
        (desc,) = a.describe_topics([topic])
        assert desc["error_code"] == 0
        assert len(desc["partitions"]) == 3
        with pytest.raises(TopicAlreadyExistsError):
            a.create_topics({topic: {"num_partitions": 1, "replication_factor": 1}})
        a.delete_topics([topic])
        assert topic not in a.list_topics()
        with pytest.raises(UnknownTopicOrPartitionError):
            a.delete_topics([topic])
        # The name is reusable at once.
        a.create_topics({topic: {"num_partitions": 2, "replication_factor": 1}})
        (desc,) = a.describe_topics([topic])
        assert len(desc["partitions"]) == 2
    finally:
        a.close()


def test_admin_describe_configs(broker, topic):
    create(broker, topic, configs={"retention.ms": "3600000"})
    a = admin(broker)
    try:
        res = ConfigResource(ConfigResourceType.TOPIC, topic)
        modified = a.describe_configs([res])["topic"][topic]
        assert modified["retention.ms"]["value"] == "3600000"
        assert modified["retention.ms"]["config_source"] == "DYNAMIC_TOPIC_CONFIG"
        everything = a.describe_configs([res], config_filter="all")["topic"][topic]
        assert everything["cleanup.policy"]["value"] == "delete"
        assert "max.message.bytes" in everything
        assert "cleanup.policy" not in modified
    finally:
        a.close()


def test_every_documented_topic_config_is_accepted_validated_and_described(broker, topic):
    configs = {
        "compression.type": "zstd",
        "delete.retention.ms": "1000",
        "cleanup.policy": "compact,delete",
        "min.cleanable.dirty.ratio": "0.2",
        "preallocate": "true",
        "segment.bytes": "1048576",
    }
    create(broker, topic, configs=configs)
    a = admin(broker)
    try:
        res = ConfigResource(ConfigResourceType.TOPIC, topic)
        everything = a.describe_configs([res], include_synonyms=True, config_filter="all")["topic"][topic]
        for k, v in configs.items():
            assert everything[k]["value"] == v, k
            assert everything[k]["config_source"] == "DYNAMIC_TOPIC_CONFIG", k
        # Kafka's defaults for keys not set, with their types.
        assert everything["min.insync.replicas"]["value"] == "1"
        assert everything["min.insync.replicas"]["config_source"] == "DEFAULT_CONFIG"
        assert everything["compression.type"]["config_type"] == "STRING"
        assert everything["delete.retention.ms"]["config_type"] == "LONG"
        assert everything["cleanup.policy"]["config_type"] == "LIST"
        # Synonyms: the override first, Kafka's default (under the broker's name) last.
        syn = everything["delete.retention.ms"]["synonyms"]
        assert syn[0]["source"] == "DYNAMIC_TOPIC_CONFIG" and syn[0]["value"] == "1000"
        assert syn[-1] == {"name": "log.cleaner.delete.retention.ms", "value": "86400000",
                           "source": "DEFAULT_CONFIG"}
        # A bad value and an unknown key are INVALID_CONFIG, per topic.
        bad = topic + "-bad"
        for cfg in ({"compression.type": "brotli"}, {"min.cleanable.dirty.ratio": "2"},
                    {"no.such.config": "1"}):
            with pytest.raises(InvalidConfigurationError):
                a.create_topics({bad: {"num_partitions": 1, "replication_factor": 1, "configs": cfg}})
        assert bad not in a.list_topics()
    finally:
        a.close()


def segment_files(b, topic, partition):
    d = os.path.join(b.dir, "data", f"{topic}-{partition}")
    return sorted(f for f in os.listdir(d) if f.endswith(".log"))


def test_alter_configs_incremental_and_legacy_validate_and_apply_live(broker, topic):
    create(broker, topic)
    a = admin(broker)
    res = lambda configs=None: ConfigResource(ConfigResourceType.TOPIC, topic, configs)  # noqa: E731
    described = lambda: a.describe_configs([res()], config_filter="all")["topic"][topic]  # noqa: E731
    try:
        # IncrementalAlterConfigs: SET, APPEND (a list config from its default), DELETE.
        out = a.alter_configs([res({"retention.ms": "3600000", "compression.type": "lz4",
                                    "cleanup.policy": ("APPEND", "compact")})], incremental=True)
        assert out == {"topic": {topic: "OK"}}
        d = described()
        assert d["retention.ms"]["value"] == "3600000"
        assert d["retention.ms"]["config_source"] == "DYNAMIC_TOPIC_CONFIG"
        assert d["compression.type"]["value"] == "lz4"
        assert d["cleanup.policy"]["value"] == "delete,compact"
        a.alter_configs([res({"cleanup.policy": ("SUBTRACT", "compact"),
                              "compression.type": ("DELETE", None)})], incremental=True)
        d = described()
        assert d["cleanup.policy"]["value"] == "delete"
        assert d["compression.type"]["value"] == "producer"
        assert d["compression.type"]["config_source"] == "DEFAULT_CONFIG"
        # validate_only changes nothing; bad values and unknown keys fail that resource only.
        a.alter_configs([res({"retention.ms": "1"})], validate_only=True, incremental=True)
        assert described()["retention.ms"]["value"] == "3600000"
        out = a.alter_configs([res({"retention.ms": "-7"}),
                               ConfigResource(ConfigResourceType.TOPIC, "no-such-topic", {"retention.ms": "1"})],
                              incremental=True, raise_on_unknown=False)
        assert out["topic"][topic].startswith("[Error 40] InvalidConfigurationError"), out
        assert out["topic"]["no-such-topic"].startswith("[Error 3] UnknownTopicOrPartitionError"), out
        out = a.alter_configs([res({"no.such.config": "1"})], incremental=True, raise_on_unknown=False)
        assert "InvalidConfigurationError" in out["topic"][topic], out
        out = a.alter_configs([res({"retention.ms": ("APPEND", "5")})], incremental=True)
        assert "InvalidConfigurationError" in out["topic"][topic], out
        # Broker settings fixed at start are refused per resource, with the reason; the broker
        # defaults of the topic configs Sluice applies are dynamic.
        out = a.alter_configs([ConfigResource(ConfigResourceType.BROKER, "0", {"num.partitions": "3"})],
                              incremental=True, raise_on_unknown=False)
        assert "InvalidRequestError" in out["broker"]["0"] and "sluice start" in out["broker"]["0"], out
        out = a.alter_configs([ConfigResource(ConfigResourceType.BROKER, "0", {"log.retention.bytes": "1000000"})],
                              incremental=True)
        assert out == {"broker": {"0": "OK"}}, out
        assert described()["retention.bytes"]["value"] == "1000000"
        assert described()["retention.bytes"]["config_source"] == "DYNAMIC_BROKER_CONFIG"
        broker_cfg = a.describe_configs([ConfigResource(ConfigResourceType.BROKER, "0")])["broker"]["0"]
        assert broker_cfg["log.retention.bytes"]["value"] == "1000000"
        assert broker_cfg["log.retention.bytes"]["config_source"] == "DYNAMIC_BROKER_CONFIG"
        # Legacy AlterConfigs replaces every override; kafka-python sends the other overrides
        # along (it describes them first), so retention.ms keeps its value.
        a.alter_configs([res({"segment.bytes": "16384"})], incremental=False, raise_on_unknown=False)
        d = described()
        assert d["segment.bytes"]["value"] == "16384"
        assert d["retention.ms"]["value"] == "3600000"
    finally:
        a.close()
    # The new segment.bytes applies to the open log at once: new batches roll segments.
    assert segment_files(broker, topic, 0) == ["00000000000000000000.log"]
    p = producer(broker, acks="all")
    for _ in range(6):
        p.send(topic, b"x" * 10000, partition=0).get(WAIT_S)
    p.close()
    assert len(segment_files(broker, topic, 0)) >= 3, segment_files(broker, topic, 0)
    # A dynamic broker default applies at once to the open logs of topics without an override.
    other = topic + "-other"
    create(broker, other)
    a = admin(broker)
    try:
        out = a.alter_configs([ConfigResource(ConfigResourceType.BROKER, "0", {"log.segment.bytes": "16384"})],
                              incremental=True)
        assert out == {"broker": {"0": "OK"}}, out
    finally:
        a.close()
    p = producer(broker, acks="all")
    for _ in range(6):
        p.send(other, b"x" * 10000, partition=0).get(WAIT_S)
    p.close()
    assert len(segment_files(broker, other, 0)) >= 3, segment_files(broker, other, 0)


def test_admin_create_partitions(broker, topic):
    create(broker, topic, partitions=2)
    a = admin(broker)
    try:
        a.create_partitions({topic: NewPartitions(5)})
        (desc,) = a.describe_topics([topic])
        assert sorted(p["partition_index"] for p in desc["partitions"]) == [0, 1, 2, 3, 4]
        with pytest.raises(InvalidPartitionsError):
            a.create_partitions({topic: NewPartitions(3)})
    finally:
        a.close()
    p = producer(broker)
    for part in range(5):
        md = p.send(topic, b"x", partition=part).get(WAIT_S)
        assert (md.partition, md.offset) == (part, 0)
    p.close()


def test_invalid_replication_factor(broker, topic):
    a = admin(broker)
    try:
        with pytest.raises(InvalidReplicationFactorError):
            a.create_topics({topic: {"num_partitions": 1, "replication_factor": 3}})
        assert topic not in a.list_topics()
    finally:
        a.close()


# --- produce / consume -------------------------------------------------------------------------

def test_round_trip_keys_headers_nulls(broker, topic):
    create(broker, topic)
    p = producer(broker)
    ts = 1_700_000_000_456
    p.send(topic, key=b"k0", value=b"v0", headers=[("h1", b"a"), ("h2", b"")], partition=0,
           timestamp_ms=ts)
    p.send(topic, key=None, value=b"v1", partition=0)
    p.send(topic, key=b"k2", value=None, partition=0)
    p.send(topic, key=b"", value=b"", partition=0)
    p.flush(WAIT_S)
    p.close()
    recs = read(broker, topic, 0, 4)
    assert [r.offset for r in recs] == [0, 1, 2, 3]
    assert (recs[0].key, recs[0].value, recs[0].timestamp) == (b"k0", b"v0", ts)
    assert list(recs[0].headers) == [("h1", b"a"), ("h2", b"")]
    assert (recs[1].key, recs[1].value) == (None, b"v1")
    assert (recs[2].key, recs[2].value) == (b"k2", None)
    assert (recs[3].key, recs[3].value) == (b"", b"")


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_codecs_round_trip(broker, topic, codec):
    create(broker, topic)
    p = producer(broker, compression_type=codec, linger_ms=20, batch_size=64 * 1024)
    futures = [p.send(topic, key=f"k{i}".encode(), value=f"{codec}-{i}-{'x' * (i % 50)}".encode(),
                      partition=0) for i in range(300)]
    p.flush(WAIT_S)
    offsets = [f.get(WAIT_S).offset for f in futures]
    p.close()
    assert offsets == list(range(300))
    recs = read(broker, topic, 0, 300)
    assert [(r.offset, r.key, r.value) for r in recs] == [
        (i, f"k{i}".encode(), f"{codec}-{i}-{'x' * (i % 50)}".encode()) for i in range(300)]


@pytest.mark.parametrize("acks", [0, 1, "all"])
def test_acks(broker, topic, acks):
    create(broker, topic)
    p = producer(broker, acks=acks)
    futures = [p.send(topic, value=f"acks-{acks}-{i}".encode(), partition=0) for i in range(25)]
    p.flush(WAIT_S)
    for i, f in enumerate(futures):
        md = f.get(WAIT_S)
        if acks != 0:
            assert md.offset == i
    p.close()
    recs = read(broker, topic, 0, 25)
    assert [r.value for r in recs] == [f"acks-{acks}-{i}".encode() for i in range(25)]


def test_list_offsets(broker, topic):
    create(broker, topic)
    tp = TopicPartition(topic, 0)
    c = consumer(broker)
    try:
        assert c.beginning_offsets([tp]) == {tp: 0}
        assert c.end_offsets([tp]) == {tp: 0}
        p = producer(broker)
        t0 = 1_700_000_000_000
        for i in range(5):
            p.send(topic, value=f"t{i}".encode(), partition=0, timestamp_ms=t0 + 1000 * i)
        p.flush(WAIT_S)
        p.close()
        assert c.beginning_offsets([tp]) == {tp: 0}
        assert c.end_offsets([tp]) == {tp: 5}
        # Kafka protocol: the first offset whose timestamp is >= the one asked for.
        for ts, want in [(t0 - 5, 0), (t0, 0), (t0 + 1, 1), (t0 + 2500, 3), (t0 + 4000, 4)]:
            r = c.offsets_for_times({tp: ts})[tp]
            assert r is not None and r.offset == want, (ts, r)
            assert r.timestamp == t0 + 1000 * want
        assert c.offsets_for_times({tp: t0 + 4001})[tp] is None
    finally:
        c.close()


# --- cross-client ------------------------------------------------------------------------------

def test_kafka_python_produces_kcat_consumes(broker, topic):
    kcat = kcat_bin()
    create(broker, topic)
    p = producer(broker, compression_type="gzip")
    for i in range(40):
        p.send(topic, key=f"k{i}".encode(), value=f"py-{i}".encode(), partition=0)
    p.flush(WAIT_S)
    p.close()
    out = subprocess.run([kcat, "-b", broker.bootstrap, "-C", "-t", topic, "-p", "0", "-o",
                          "beginning", "-e", "-f", "%o %k %s\n"],
                         capture_output=True, timeout=60, check=True)
    assert out.stdout.decode() == "".join(f"{i} k{i} py-{i}\n" for i in range(40))


def test_kcat_produces_kafka_python_consumes(broker, topic):
    kcat = kcat_bin()
    create(broker, topic)
    data = "".join(f"k{i}:kcat-{i}\n" for i in range(40)).encode()
    subprocess.run([kcat, "-b", broker.bootstrap, "-P", "-t", topic, "-p", "0", "-K", ":",
                    "-z", "snappy"], input=data, capture_output=True, timeout=60, check=True)
    recs = read(broker, topic, 0, 40)
    assert [(r.key, r.value) for r in recs] == [
        (f"k{i}".encode(), f"kcat-{i}".encode()) for i in range(40)]


CODECS = ["gzip", "snappy", "lz4", "zstd"]


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_kafka_python_to_kcat(broker, topic, codec):
    kcat = kcat_bin()
    create(broker, topic)
    p = producer(broker, compression_type=codec, linger_ms=20)
    values = [f"{codec} value {i} " + "xyz" * (i % 13) for i in range(100)]
    futures = [p.send(topic, key=f"k{i}".encode(), value=v.encode(), partition=0)
               for i, v in enumerate(values)]
    assert sorted(f.get(timeout=WAIT_S).offset for f in futures) == list(range(100))
    p.close()
    out = subprocess.run([kcat, "-b", broker.bootstrap, "-C", "-t", topic, "-p", "0", "-o",
                          "beginning", "-e", "-f", "%o|%k|%s\n"],
                         capture_output=True, timeout=60, check=True)
    assert out.stdout.decode().splitlines() == [f"{i}|k{i}|{v}" for i, v in enumerate(values)]


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_kcat_to_kafka_python(broker, topic, codec):
    kcat = kcat_bin()
    create(broker, topic)
    lines = [f"k{i}:{codec} line {i} " + "abc" * (i % 11) for i in range(100)]
    subprocess.run([kcat, "-b", broker.bootstrap, "-P", "-t", topic, "-p", "0", "-K", ":",
                    "-z", codec], input=("\n".join(lines) + "\n").encode(),
                   capture_output=True, timeout=60, check=True)
    recs = read(broker, topic, 0, 100)
    assert [(r.offset, r.key.decode(), r.value.decode()) for r in recs] == [
        (i, line.split(":", 1)[0], line.split(":", 1)[1]) for i, line in enumerate(lines)]


# --- cluster and topic description (authorized operations, pagination) -----------------------

TOPIC_OPERATIONS = {"READ", "WRITE", "CREATE", "DELETE", "ALTER", "DESCRIBE", "DESCRIBE_CONFIGS", "ALTER_CONFIGS"}
CLUSTER_OPERATIONS = {"CREATE", "ALTER", "DESCRIBE", "CLUSTER_ACTION", "DESCRIBE_CONFIGS", "ALTER_CONFIGS",
                      "IDEMPOTENT_WRITE"}


def test_describe_cluster_and_topics_report_every_authorized_operation(broker, topic):
    create(broker, topic, partitions=2)
    a = admin(broker)
    try:
        cluster = a.describe_cluster()  # DescribeCluster, asking for the authorized operations
        assert [b["broker_id"] for b in cluster["brokers"]] == [0]
        assert cluster["brokers"][0]["port"] == broker.port
        assert cluster["controller_id"] == 0
        assert cluster["cluster_id"]
        assert set(cluster["authorized_operations"]) == CLUSTER_OPERATIONS
        (desc,) = a.describe_topics([topic])  # Metadata, asking for topic operations
        assert set(desc["authorized_operations"]) == TOPIC_OPERATIONS
    finally:
        a.close()


def test_describe_topic_partitions_pages_with_a_cursor(broker, topic):
    names = [f"{topic}-a", f"{topic}-b", f"{topic}-c"]
    for n, parts in zip(names, (3, 1, 4)):
        create(broker, n, partitions=parts)
    a = admin(broker)
    try:
        seen, cursor, pages = [], None, 0
        while True:
            page = a.describe_topic_partitions(names + ["no-such-topic"], response_partition_limit=2,
                                               cursor=cursor)
            pages += 1
            for t in page["topics"]:
                assert t["error_code"] in (0, 3), t
                if t["error_code"] == 0:
                    # The raw bitfield here: one bit per operation code (READ=3 ... ALTER_CONFIGS=11).
                    assert t["topic_authorized_operations"] == sum(1 << c for c in (3, 4, 5, 6, 7, 8, 10, 11))
                    assert sum(1 for _ in t["partitions"]) <= 2
                seen.extend((t["name"], p["partition_index"], p["leader_id"]) for p in t["partitions"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert pages < 10
        expected = [(n, p, 0) for n, parts in zip(names, (3, 1, 4)) for p in range(parts)]
        assert seen == expected
        assert pages == 4
    finally:
        a.close()


def test_describe_log_dirs_reports_each_partition_size(broker, topic):
    create(broker, topic, partitions=2)
    p = producer(broker, linger_ms=0)
    try:
        for i in range(50):
            p.send(topic, value=b"x" * 1000, partition=0)
        p.flush(timeout=WAIT_S)
    finally:
        p.close()
    a = admin(broker)
    try:
        every = a.describe_log_dirs()
        mine = a.describe_log_dirs(topic_partitions={topic: [0, 1, 7]})
    finally:
        a.close()

    def sizes(answer):
        """{(topic, partition): size} over every broker's and directory's answer."""
        out = {}
        for per_broker in answer:
            results = per_broker["log_dirs"] if isinstance(per_broker, dict) and "log_dirs" in per_broker else per_broker
            for d in results if isinstance(results, list) else [results]:
                assert d["error_code"] == 0, d
                assert os.path.isabs(d["log_dir"]), d["log_dir"]
                if "total_bytes" in d:
                    assert d["total_bytes"] >= d["usable_bytes"] > 0
                for t in d["topics"]:
                    for part in t["partitions"]:
                        assert part["is_future_key"] is False
                        assert part["offset_lag"] == 0
                        out[(t["name"], part["partition_index"])] = part["partition_size"]
        return out

    listed = sizes(mine)
    # Only the two partitions that exist: partition 7 is not held here, so it is left out.
    assert set(listed) == {(topic, 0), (topic, 1)}, listed
    assert listed[(topic, 0)] > 50 * 1000, listed
    assert listed[(topic, 1)] == 0, listed
    all_sizes = sizes(every)
    assert all_sizes[(topic, 0)] == listed[(topic, 0)]
    assert (topic, 1) in all_sizes
