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
