"""KIP-848 consumer groups with confluent-kafka (librdkafka, group.protocol=consumer): members
share a topic's partitions without overlap through rebalances, no committed record is
delivered twice, and the group is described with its type."""

import uuid

import time

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from conftest import Broker

WAIT = 60.0


def start_broker():
    return Broker(cores=2, extra_args=(
        "--group-consumer-heartbeat-interval-ms", "500",
        "--group-consumer-session-timeout-ms", "6000",
    ))


def create_topic(broker, partitions):
    name = f"py848-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for f in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        f.result(timeout=30)
    return name


def produce(broker, topic, partitions, round_, per_partition):
    p = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    for part in range(partitions):
        for i in range(per_partition):
            p.produce(topic, value=f"r{round_}-p{part}-{i}".encode(), partition=part)
    assert p.flush(30) == 0


def consumer(broker, group):
    return Consumer({
        "bootstrap.servers": broker.bootstrap,
        "group.id": group,
        "group.protocol": "consumer",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })


def owned(c):
    return {tp.partition for tp in c.assignment()}


def poll_until(consumers, seen, cond):
    """Polls every consumer, committing each record synchronously, until cond() holds; checks
    at every round that no partition has two owners."""
    deadline = time.monotonic() + WAIT
    while True:
        for c in consumers:
            m = c.poll(0.02)
            if m is not None and m.error() is None:
                seen.append(m.value().decode())
                c.commit(message=m, asynchronous=False)
        sets = [owned(c) for c in consumers]
        for i, a in enumerate(sets):
            for b in sets[i + 1:]:
                assert not (a & b), f"two members own a partition: {sets}"
        if cond():
            return
        assert time.monotonic() < deadline, f"not reached: assignments {sets}, {len(seen)} records"


def test_members_share_partitions_through_joins_and_leaves_without_duplicates():
    broker = start_broker()
    try:
        topic = create_topic(broker, 4)
        group = f"g848-{uuid.uuid4().hex[:6]}"
        c1, c2 = consumer(broker, group), consumer(broker, group)
        c1.subscribe([topic])
        c2.subscribe([topic])
        seen = []
        poll_until([c1, c2], seen, lambda: len(owned(c1)) == 2 and len(owned(c2)) == 2)
        produce(broker, topic, 4, 1, 10)
        poll_until([c1, c2], seen, lambda: len(seen) >= 40)
        c3 = consumer(broker, group)
        c3.subscribe([topic])
        poll_until([c1, c2, c3], seen,
                   lambda: sorted(len(owned(c)) for c in (c1, c2, c3)) == [1, 1, 2])
        produce(broker, topic, 4, 2, 10)
        poll_until([c1, c2, c3], seen, lambda: len(seen) >= 80)
        c3.close()
        poll_until([c1, c2], seen, lambda: len(owned(c1)) + len(owned(c2)) == 4)
        produce(broker, topic, 4, 3, 10)
        poll_until([c1, c2], seen, lambda: len(seen) >= 120)
        assert len(seen) == 120 and len(set(seen)) == 120, "a record was delivered twice"
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        listed = admin.list_consumer_groups().result(timeout=30)
        types = {g.group_id: g.type.name for g in listed.valid}
        assert types.get(group) == "CONSUMER", types
        c1.close()
        c2.close()
    finally:
        broker.stop()
