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


def test_admin_clients_describe_a_consumer_protocol_group_as_kafka_4_does():
    """kafka-python's describe_groups speaks DescribeGroups only: a KIP-848 group is not a
    classic group, so Kafka 4 (and Sluice) answers GROUP_ID_NOT_FOUND "Group … is not a classic
    group." with state Dead and no members, while a classic group next to it is described with
    its members. confluent-kafka's describe_consumer_groups uses ConsumerGroupDescribe and shows
    the KIP-848 group with its type, assignor and members' assignments."""
    from kafka.admin import KafkaAdminClient
    from kafka.consumer import KafkaConsumer

    broker = start_broker()
    try:
        topic = create_topic(broker, 4)
        group = f"d848-{uuid.uuid4().hex[:6]}"
        c1, c2 = consumer(broker, group), consumer(broker, group)
        c1.subscribe([topic])
        c2.subscribe([topic])
        seen = []
        poll_until([c1, c2], seen, lambda: len(owned(c1)) == 2 and len(owned(c2)) == 2)
        # A classic group on the same topic, for comparison.
        classic = f"dclassic-{uuid.uuid4().hex[:6]}"
        kc = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap, group_id=classic,
                           auto_offset_reset="earliest", consumer_timeout_ms=200)
        deadline = time.monotonic() + WAIT
        while not kc.assignment():
            kc.poll(timeout_ms=100)
            assert time.monotonic() < deadline, "the classic consumer got no assignment"
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=30_000)
        try:
            d = admin.describe_groups([group, classic])
        finally:
            admin.close()
        kip848 = d[group]
        assert kip848["error"] is not None and "GroupIdNotFound" in kip848["error"], kip848
        assert f"Group {group} is not a classic group." in kip848["error"], kip848
        assert kip848["group_state"] == "Dead" and kip848["members"] == [], kip848
        assert d[classic]["error"] is None, d[classic]
        assert d[classic]["group_state"] == "Stable", d[classic]
        assert d[classic]["protocol_type"] == "consumer", d[classic]
        assert len(d[classic]["members"]) == 1, d[classic]
        kc.close()

        cadmin = AdminClient({"bootstrap.servers": broker.bootstrap})
        desc = cadmin.describe_consumer_groups([group])[group].result(timeout=30)
        assert desc.type.name == "CONSUMER", desc.type
        assert desc.partition_assignor == "uniform", desc.partition_assignor
        assert desc.state.name == "STABLE", desc.state
        parts = sorted(tp.partition for m in desc.members for tp in m.assignment.topic_partitions)
        assert parts == [0, 1, 2, 3], parts
        ids = {m.member_id for m in desc.members}
        assert len(ids) == 2, ids
        c1.close()
        c2.close()
    finally:
        broker.stop()
