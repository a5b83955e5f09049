"""Consumer groups with kafka-python (its own protocol code): group membership and rebalance,
committed offsets across consumer restarts, the admin API for groups, and independent groups."""

import subprocess
import time
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import CommitFailedError, RebalanceInProgressError
from kafka.structs import OffsetAndMetadata

from conftest import sluice_bin

WAIT = 60.0


def new_topic(broker, partitions):
    name = f"pyg-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic(name, partitions, 1)])
    admin.close()
    return name


def produce(broker, topic, partitions, per_partition):
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    for part in range(partitions):
        for i in range(per_partition):
            p.send(topic, value=f"p{part}-{i}".encode(), partition=part)
    p.flush(timeout=30)
    p.close()


def consumer(broker, group, **kw):
    return KafkaConsumer(
        bootstrap_servers=broker.bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
        **kw,
    )


def subscribe(c, topic):
    """Subscribes once the consumer's own metadata has the topic's partitions. Otherwise a member
    that leads the group can assign before its first metadata response arrives ("No partition
    metadata"), hand out nothing, and kafka-python 3.0.12 does not always rejoin when the metadata
    then arrives."""
    deadline = time.monotonic() + WAIT
    while not c.partitions_for_topic(topic):
        assert time.monotonic() < deadline, f"no metadata for {topic}"
        time.sleep(0.05)
    c.subscribe([topic])


def poll_until(consumers, cond):
    seen = [[] for _ in consumers]
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for i, c in enumerate(consumers):
            for records in c.poll(timeout_ms=50).values():
                seen[i].extend(r.value.decode() for r in records)
        if cond(consumers, seen):
            return seen
    raise AssertionError(f"condition not met; assignments {[sorted(tp.partition for tp in c.assignment()) for c in consumers]}")


def commit(c, topic, offsets):
    """Commits `offsets` ({partition: next offset}) of `topic` for the consumer's group. A
    commit while the client itself is rejoining is refused by kafka-python with the retriable
    RebalanceInProgressError ("call poll() and retry"): poll, so the rejoin completes, and
    commit again, within WAIT. The offsets are explicit, so records the polls return again
    after a rejoin do not change what is committed."""
    want = {TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()}
    deadline = time.monotonic() + WAIT
    while True:
        try:
            c.commit(want)
            return
        except RebalanceInProgressError:
            assert time.monotonic() < deadline, "the consumer never left its rebalance"
            c.poll(timeout_ms=50)


def test_two_members_split_four_partitions_then_one_takes_all(broker):
    topic = new_topic(broker, 4)
    group = f"split-{uuid.uuid4().hex[:6]}"
    a = consumer(broker, group)
    b = consumer(broker, group)
    subscribe(a, topic)
    subscribe(b, topic)
    poll_until([a, b], lambda cs, _: len(cs[0].assignment()) == 2 and len(cs[1].assignment()) == 2)
    assert {tp.partition for tp in a.assignment()} | {tp.partition for tp in b.assignment()} == {0, 1, 2, 3}
    b.close()  # LeaveGroup
    poll_until([a], lambda cs, _: len(cs[0].assignment()) == 4)
    a.close()


def test_restarted_consumer_resumes_from_commit_and_groups_are_independent(broker):
    topic = new_topic(broker, 2)
    produce(broker, topic, 2, 10)
    group = f"resume-{uuid.uuid4().hex[:6]}"
    c = consumer(broker, group)
    subscribe(c, topic)
    seen = poll_until([c], lambda _, s: len(s[0]) >= 20)
    assert len(seen[0]) == 20
    commit(c, topic, {0: 10, 1: 10})
    committed = {tp.partition: c.committed(tp) for tp in c.assignment()}
    assert committed == {0: 10, 1: 10}
    c.close()
    produce(broker, topic, 2, 3)
    c = consumer(broker, group)
    subscribe(c, topic)
    seen = poll_until([c], lambda _, s: len(s[0]) >= 6)
    assert sorted(seen[0]) == sorted([f"p{p}-{i}" for p in range(2) for i in range(3)])
    c.close()
    other = consumer(broker, f"other-{uuid.uuid4().hex[:6]}")
    subscribe(other, topic)
    seen = poll_until([other], lambda _, s: len(s[0]) >= 26)
    assert len(seen[0]) == 26
    other.close()


def test_admin_lists_describes_and_deletes_groups(broker):
    topic = new_topic(broker, 1)
    produce(broker, topic, 1, 3)
    group = f"admin-{uuid.uuid4().hex[:6]}"
    c = consumer(broker, group, client_id="py-member")
    subscribe(c, topic)
    poll_until([c], lambda _, s: len(s[0]) >= 3)
    commit(c, topic, {0: 3})
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    listed = {g["group_id"]: g for g in admin.list_groups()}
    assert listed[group]["group_state"] == "Stable"
    desc = admin.describe_groups([group], include_authorized_operations=True)[group]
    assert desc["group_state"] == "Stable"
    # No authorizer: every operation Kafka defines for a group (DescribeGroups v3+).
    assert set(desc["authorized_operations"]) == {"READ", "DESCRIBE", "DELETE"}
    assert desc["protocol_type"] == "consumer"
    assert [m["client_id"] for m in desc["members"]] == ["py-member"]
    assert desc["members"][0]["member_assignment"]["assigned_partitions"] == [{"topic": topic, "partitions": [0]}]
    offsets = admin.list_group_offsets(group)[group]
    assert offsets[TopicPartition(topic, 0)].offset == 3
    # A group with a member cannot be deleted.
    assert admin.delete_groups([group])[group] == "NonEmptyGroupError"
    c.close()
    deadline = time.monotonic() + WAIT
    while admin.describe_groups([group])[group]["group_state"] != "Empty":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert admin.delete_groups([group])[group] == "OK"
    assert group not in {g["group_id"] for g in admin.list_groups()}
    assert admin.delete_groups([group])[group] == "GroupIdNotFoundError"
    admin.close()


def sluice_group(broker, *args):
    out = subprocess.run([sluice_bin(), "group", "--brokers", broker.bootstrap, *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_reset_offsets_then_consume_from_the_new_position(broker):
    topic = new_topic(broker, 1)
    produce(broker, topic, 1, 5)
    group = f"reset-{uuid.uuid4().hex[:6]}"
    c = consumer(broker, group)
    subscribe(c, topic)
    poll_until([c], lambda _, s: len(s[0]) >= 5)
    commit(c, topic, {0: 5})
    c.close()  # the only member leaves: the group is Empty and its offsets can move
    sluice_group(broker, "reset-offsets", group, "--topic", topic, "--to-offset", "3")
    c = consumer(broker, group)
    subscribe(c, topic)
    seen = poll_until([c], lambda _, s: len(s[0]) >= 2)
    assert seen[0][:2] == ["p0-3", "p0-4"]
    c.close()
    sluice_group(broker, "reset-offsets", group, "--topic", topic, "--to-earliest")
    c = consumer(broker, group)
    subscribe(c, topic)
    seen = poll_until([c], lambda _, s: len(s[0]) >= 5)
    assert seen[0][:5] == [f"p0-{i}" for i in range(5)]
    c.close()


def test_commit_from_outside_an_active_group_fails(broker):
    topic = new_topic(broker, 1)
    group = f"errs-{uuid.uuid4().hex[:6]}"
    member = consumer(broker, group)
    subscribe(member, topic)
    poll_until([member], lambda cs, _: len(cs[0].assignment()) == 1)
    # A consumer of the same group id outside the group commits with generation -1: the group
    # has members, so the coordinator answers UNKNOWN_MEMBER_ID (CommitFailedError in the client).
    outsider = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False)
    outsider.assign([TopicPartition(topic, 0)])
    with pytest.raises(CommitFailedError):
        outsider.commit({TopicPartition(topic, 0): OffsetAndMetadata(1, "", -1)})
    outsider.close(autocommit=False)
    # The member itself commits fine. (UNKNOWN_TOPIC_OR_PARTITION is retried by kafka-python until
    # its timeout; the Rust raw tests check that code.) First wait for the member's own start-up
    # OffsetFetch (position() blocks until it is answered): kafka-python hands a later
    # committed() call an OffsetFetch for the same partitions that is still in flight, which was
    # sent before the commit and so answers "nothing committed".
    member.position(TopicPartition(topic, 0))
    member.commit({TopicPartition(topic, 0): OffsetAndMetadata(0, "", -1)})
    assert member.committed(TopicPartition(topic, 0)) == 0
    member.close()
