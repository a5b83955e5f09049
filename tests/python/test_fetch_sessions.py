"""kafka-python's consumer uses incremental fetch sessions (KIP-227) by default: one consumer
reading many partitions through one session, new data on a few partitions of an otherwise idle
session, and a narrowed assignment (forgotten partitions). Consumers use assign() (no groups)."""

import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient

WAIT_S = 30
PARTITIONS = 300


def create(b, name, partitions):
    a = KafkaAdminClient(bootstrap_servers=b.bootstrap, request_timeout_ms=WAIT_S * 1000)
    try:
        a.create_topics({name: {"num_partitions": partitions, "replication_factor": 1}})
    finally:
        a.close()


def produce(b, topic, items):
    """items: (partition, value) pairs, sent in order and flushed."""
    p = KafkaProducer(bootstrap_servers=b.bootstrap, request_timeout_ms=WAIT_S * 1000,
                      linger_ms=5)
    for partition, value in items:
        p.send(topic, value=value, partition=partition)
    p.flush(WAIT_S)
    p.close()


def consumer(b):
    return KafkaConsumer(bootstrap_servers=b.bootstrap, enable_auto_commit=False,
                         request_timeout_ms=WAIT_S * 1000 + 1000, fetch_max_wait_ms=200)


def poll_n(c, n):
    """Polls until n records arrived (bounded); returns {partition: [values]}."""
    got = {}
    count = 0
    deadline = time.monotonic() + WAIT_S
    while count < n:
        assert time.monotonic() < deadline, f"read {count} of {n} records"
        for tp, recs in c.poll(timeout_ms=200).items():
            got.setdefault(tp.partition, []).extend(r.value for r in recs)
            count += len(recs)
    assert count == n, f"read {count} records, expected {n}"
    return got


def sessions(c):
    """(session id, next epoch) per broker the consumer fetches from."""
    return {node: (h.next_metadata.session_id, h.next_metadata.epoch)
            for node, h in c._fetcher._session_handlers.items()}


def test_one_consumer_reads_many_partitions_through_one_session(broker, topic):
    create(broker, topic, PARTITIONS)
    produce(broker, topic, [(p, f"{p}-{i}".encode()) for i in range(3) for p in range(PARTITIONS)])
    c = consumer(broker)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        got = poll_n(c, 3 * PARTITIONS)
        assert got == {p: [f"{p}-{i}".encode() for i in range(3)] for p in range(PARTITIONS)}
        first = sessions(c)
        assert len(first) == 1
        (sid, epoch), = first.values()
        assert sid > 0, "the broker opened a session"

        # Idle: nothing comes back, and the session goes on.
        assert c.poll(timeout_ms=1000) == {}
        # New data on a few partitions of the idle session reaches the consumer.
        live = [7, 150, 299]
        produce(broker, topic, [(p, f"{p}-new".encode()) for p in live])
        got = poll_n(c, len(live))
        assert got == {p: [f"{p}-new".encode()] for p in live}
        (sid2, epoch2), = sessions(c).values()
        assert sid2 == sid, "the same session served every fetch (no fallback to a full fetch)"
        assert epoch2 > epoch, "the consumer fetched incrementally"
        assert c.poll(timeout_ms=500) == {}
    finally:
        c.close()


def test_narrowed_assignment_forgets_partitions(broker, topic):
    create(broker, topic, 40)
    c = consumer(broker)
    try:
        tps = [TopicPartition(topic, p) for p in range(40)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        produce(broker, topic, [(p, b"one") for p in range(40)])
        poll_n(c, 40)
        (sid, _), = sessions(c).values()
        assert sid > 0
        # Keep only the even partitions: the next incremental fetch forgets the odd ones.
        c.assign(tps[::2])
        produce(broker, topic, [(p, b"two") for p in range(40)])
        got = poll_n(c, 20)
        assert got == {p: [b"two"] for p in range(0, 40, 2)}
        assert c.poll(timeout_ms=1000) == {}, "nothing from forgotten partitions"
        (sid2, _), = sessions(c).values()
        assert sid2 == sid
    finally:
        c.close()
