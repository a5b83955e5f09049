"""Kafka transactions (KIP-98, KIP-447) against a real broker with confluent-kafka (librdkafka)
and kafka-python: commit and abort as read_committed and read_uncommitted consumers see them,
consume-transform-produce with offsets sent to the transaction, a fenced zombie producer, a
transaction the broker aborts at its timeout, and a kill -9 between EndTxn and the markers."""

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from kafka import KafkaConsumer
from kafka import TopicPartition as KTopicPartition

from conftest import SEGMENT_BYTES, START_WAIT_S, answers_api_versions, free_port, sluice_bin

WAIT = 60.0


def create_topic(bootstrap, partitions=1):
    name = f"tx-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        f.result(30)
    return name


def txn_producer(bootstrap, tid, **conf):
    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": tid,
                  "linger.ms": 5, **conf})
    p.init_transactions(30)
    return p


def consume_all(bootstrap, topic, isolation, expect, partitions=(0,), group=None):
    """Values read from the start of `partitions` until `expect` values arrived, or until the
    consumer reached the end (partition EOF on every partition) when `expect` is None."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group or f"g-{uuid.uuid4().hex[:8]}",
                  "isolation.level": isolation, "enable.auto.commit": False,
                  "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    c.assign([TopicPartition(topic, p, 0) for p in partitions])
    values, eof = [], set()
    deadline = time.monotonic() + WAIT
    try:
        while time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    eof.add(m.partition())
                    if expect is None and eof == set(partitions):
                        return values
                    continue
                raise KafkaException(m.error())
            values.append(m.value().decode())
            eof.discard(m.partition())
            if expect is not None and len(values) >= expect:
                return values
    finally:
        c.close()
    raise AssertionError(f"consumed {values} before the deadline")


def stable_end(bootstrap, topic, partition=0):
    """The partition's end for read_committed consumers (ListOffsets latest, read_committed:
    the last stable offset), through kafka-python's own protocol code."""
    c = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    try:
        tp = KTopicPartition(topic, partition)
        return c.end_offsets([tp])[tp]
    finally:
        c.close()


def wait_for(cond, what):
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_commit_and_abort_as_both_isolation_levels_see_them(broker):
    topic = create_topic(broker.bootstrap)
    tid = f"tid-{uuid.uuid4().hex[:8]}"
    p = txn_producer(broker.bootstrap, tid)
    p.begin_transaction()
    for i in range(5):
        p.produce(topic, f"c1-{i}".encode(), partition=0)
    p.commit_transaction(30)
    p.begin_transaction()
    for i in range(4):
        p.produce(topic, f"ab-{i}".encode(), partition=0)
    p.flush(30)
    p.abort_transaction(30)
    p.begin_transaction()
    for i in range(3):
        p.produce(topic, f"c2-{i}".encode(), partition=0)
    p.commit_transaction(30)

    committed = [f"c1-{i}" for i in range(5)] + [f"c2-{i}" for i in range(3)]
    assert consume_all(broker.bootstrap, topic, "read_committed", None) == committed
    everything = consume_all(broker.bootstrap, topic, "read_uncommitted", None)
    assert everything == [f"c1-{i}" for i in range(5)] + [f"ab-{i}" for i in range(4)] + \
        [f"c2-{i}" for i in range(3)]

    # An open transaction holds the last stable offset at its first record: read_committed
    # consumers stop there until it commits.
    end_before = stable_end(broker.bootstrap, topic)
    p.begin_transaction()
    p.produce(topic, b"open-0", partition=0)
    p.flush(30)
    assert stable_end(broker.bootstrap, topic) == end_before
    assert consume_all(broker.bootstrap, topic, "read_committed", None) == committed
    p.commit_transaction(30)
    wait_for(lambda: stable_end(broker.bootstrap, topic) > end_before, "the LSO to move")
    assert consume_all(broker.bootstrap, topic, "read_committed", None) == committed + ["open-0"]
    p.flush(5)

    # The command line lists and describes the id (ListTransactions, DescribeTransactions).
    def cli(*args):
        return subprocess.run([sluice_bin(), "txn", *args, "--brokers", broker.bootstrap],
                              capture_output=True, text=True, check=True).stdout
    wait_for(lambda: "CompleteCommit" in cli("describe", tid), "the commit to complete")
    assert any(tid in line and "CompleteCommit" in line for line in cli("list").splitlines())
    assert "PRODUCER EPOCH    0" in cli("describe", tid)


def test_consume_transform_produce_resumes_exactly_once(broker):
    src = create_topic(broker.bootstrap)
    dst = create_topic(broker.bootstrap)
    feeder = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    for i in range(10):
        feeder.produce(src, str(i).encode(), partition=0)
    feeder.flush(30)
    group = f"eos-{uuid.uuid4().hex[:8]}"

    def worker(tid):
        c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group,
                      "isolation.level": "read_committed", "enable.auto.commit": False,
                      "auto.offset.reset": "earliest"})
        c.subscribe([src])
        return c, txn_producer(broker.bootstrap, tid)

    def step(c, p, n):
        """Reads `n` records and produces them transformed, in an open transaction with the
        consumer's offsets."""
        got = []
        deadline = time.monotonic() + WAIT
        p.begin_transaction()
        while len(got) < n:
            assert time.monotonic() < deadline, f"read only {got}"
            m = c.poll(0.2)
            if m is None or m.error():
                continue
            got.append(m.value().decode())
            p.produce(dst, f"out-{m.value().decode()}".encode(), partition=0)
        p.send_offsets_to_transaction(c.position(c.assignment()), c.consumer_group_metadata(), 30)
        return got

    tid = f"eos-{uuid.uuid4().hex[:8]}"
    c, p = worker(tid)
    assert step(c, p, 4) == ["0", "1", "2", "3"]
    p.commit_transaction(30)
    # The next transaction fails half-way: its output and its offsets are abandoned.
    assert step(c, p, 3) == ["4", "5", "6"]
    p.abort_transaction(30)
    c.close()

    # A new worker resumes from the offsets the committed transaction carried.
    c, p = worker(tid)
    assert step(c, p, 6) == ["4", "5", "6", "7", "8", "9"]
    p.commit_transaction(30)
    c.close()
    out = consume_all(broker.bootstrap, dst, "read_committed", None)
    assert out == [f"out-{i}" for i in range(10)]


def test_a_zombie_producer_is_fenced(broker):
    topic = create_topic(broker.bootstrap)
    tid = f"z-{uuid.uuid4().hex[:8]}"
    zombie = txn_producer(broker.bootstrap, tid)
    zombie.begin_transaction()
    zombie.produce(topic, b"zombie", partition=0)
    zombie.flush(30)

    # The same id again: the open transaction is aborted and the old producer fenced.
    fresh = txn_producer(broker.bootstrap, tid)
    fresh.begin_transaction()
    fresh.produce(topic, b"fresh", partition=0)
    fresh.commit_transaction(30)

    with pytest.raises(KafkaException) as e:
        zombie.produce(topic, b"zombie-2", partition=0)
        zombie.commit_transaction(30)
    assert e.value.args[0].fatal() or "fenced" in str(e.value).lower(), str(e.value)
    assert consume_all(broker.bootstrap, topic, "read_committed", None) == ["fresh"]


def test_the_broker_aborts_a_transaction_past_its_timeout(broker):
    topic = create_topic(broker.bootstrap)
    p = txn_producer(broker.bootstrap, f"t-{uuid.uuid4().hex[:8]}",
                     **{"transaction.timeout.ms": 2000})
    p.begin_transaction()
    for i in range(3):
        p.produce(topic, f"late-{i}".encode(), partition=0)
    p.flush(30)
    assert stable_end(broker.bootstrap, topic) == 0
    # Three records and the broker's ABORT marker: the LSO passes them all.
    wait_for(lambda: stable_end(broker.bootstrap, topic) == 4, "the timed-out abort")
    with pytest.raises(KafkaException):
        p.commit_transaction(30)
    assert consume_all(broker.bootstrap, topic, "read_committed", None) == []
    assert len(consume_all(broker.bootstrap, topic, "read_uncommitted", None)) == 3


class RestartableBroker:
    """A broker on a fixed data dir and port that can be killed with SIGKILL and started again."""

    def __init__(self, env=None):
        self.dir = tempfile.mkdtemp(prefix="sluice-pytest-tx-")
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc = None
        self._log = open(os.path.join(self.dir, "stderr.log"), "ab")
        self.start(env)

    def start(self, env=None):
        self.proc = subprocess.Popen(
            [sluice_bin(), "start", "--data-dir", os.path.join(self.dir, "data"),
             "--listen", self.bootstrap, "--cores", "2",
             "--segment-bytes", str(SEGMENT_BYTES), "--group-initial-rebalance-delay-ms", "0"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + START_WAIT_S
        while not answers_api_versions(self.port):
            assert self.proc.poll() is None, "sluice exited during start-up"
            assert time.monotonic() < deadline, "sluice did not start"
            time.sleep(0.02)

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_kill_9_between_end_txn_and_the_markers_recovers_the_commit():
    tid = f"crash-{uuid.uuid4().hex[:8]}"
    # The broker stops right after PrepareCommit is durable: no marker is written.
    b = RestartableBroker(env={"SLUICE_FAULT_PANIC": f"txn_markers:{tid}"})
    try:
        topic = create_topic(b.bootstrap, partitions=2)
        p = txn_producer(b.bootstrap, tid)
        p.begin_transaction()
        for i in range(4):
            p.produce(topic, f"v{i}".encode(), partition=i % 2)
        p.commit_transaction(30)
        assert stable_end(b.bootstrap, topic, 0) == 0
        assert stable_end(b.bootstrap, topic, 1) == 0
        b.kill9()
        b.start()
        # Recovery finds the transaction prepared and writes its markers.
        wait_for(lambda: stable_end(b.bootstrap, topic, 0) == 3, "the markers after restart")
        wait_for(lambda: stable_end(b.bootstrap, topic, 1) == 3, "the markers after restart")
        got = consume_all(b.bootstrap, topic, "read_committed", 4, partitions=(0, 1))
        assert sorted(got) == [f"v{i}" for i in range(4)]
    finally:
        b.stop()


def test_kafka_python_transactional_producer(broker):
    """kafka-python's own transaction code (not librdkafka): commit, abort, and offsets sent to
    the transaction, seen by a read_committed kafka-python consumer."""
    from kafka import KafkaProducer
    from kafka.structs import OffsetAndMetadata

    topic = create_topic(broker.bootstrap)
    group = f"kp-{uuid.uuid4().hex[:8]}"
    p = KafkaProducer(bootstrap_servers=broker.bootstrap,
                      transactional_id=f"kp-{uuid.uuid4().hex[:8]}")
    p.init_transactions()
    p.begin_transaction()
    for i in range(3):
        p.send(topic, f"k{i}".encode(), partition=0)
    p.send_offsets_to_transaction({KTopicPartition(topic, 0): OffsetAndMetadata(3, "", -1)},
                                  group)
    p.commit_transaction()
    p.begin_transaction()
    p.send(topic, b"dropped", partition=0)
    p.flush()
    p.abort_transaction()
    p.close()

    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, isolation_level="read_committed",
                      auto_offset_reset="earliest", enable_auto_commit=False,
                      consumer_timeout_ms=3000)
    tp = KTopicPartition(topic, 0)
    c.assign([tp])
    # Three records, the COMMIT marker, the aborted record (flushed before the abort, so it
    # reached the partition) and its ABORT marker.
    end = stable_end(broker.bootstrap, topic)
    assert end == 6
    got = []
    deadline = time.monotonic() + WAIT
    while c.position(tp) < end:
        assert time.monotonic() < deadline, f"read {got}, position {c.position(tp)}"
        for recs in c.poll(timeout_ms=200).values():
            got.extend(r.value.decode() for r in recs)
    c.close()
    assert got == ["k0", "k1", "k2"]
    g = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group)
    assert g.committed(tp) == 3
    g.close()
