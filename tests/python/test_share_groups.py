"""KIP-932 share groups with confluent-kafka's ShareConsumer (librdkafka): several consumers share
one partition without holding a record at the same time, released records come back with a
higher delivery count, rejected ones and those at the delivery limit are archived, a killed
consumer's locks expire and its records are redelivered, and acknowledged state survives a
broker kill -9. Delayed delivery: records with a delivery-time header reach share consumers no
earlier than due (classic consumers at once), released records back off, and both survive a
broker kill -9."""

import signal
import subprocess
import sys
import time
import uuid

from confluent_kafka import AcknowledgeType, Consumer, Producer, ShareConsumer
from confluent_kafka.admin import (AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource,
                                   NewTopic, ResourceType)

from conftest import Broker

WAIT = 60.0
LOCK_MS = 3000


def start_broker(extra=()):
    args = [
        "--group-share-heartbeat-interval-ms", "500",
        "--group-share-session-timeout-ms", "6000",
        "--group-share-record-lock-duration-ms", str(LOCK_MS),
        "--group-share-delivery-count-limit", "3",
        *extra,
    ]
    return Broker(cores=2, extra_args=tuple(args))


def create_topic(broker, partitions=1):
    name = f"pyshare-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for f in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        f.result(timeout=30)
    return name


def earliest(broker, group):
    """share.auto.offset.reset=earliest on the group, as librdkafka's own share tests do."""
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    res = ConfigResource(ResourceType.GROUP, group, incremental_configs=[
        ConfigEntry("share.auto.offset.reset", "earliest",
                    incremental_operation=AlterConfigOpType.SET)])
    for f in admin.incremental_alter_configs([res]).values():
        f.result(timeout=30)


def produce(broker, topic, n, partition=0, prefix="m"):
    p = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    for i in range(n):
        p.produce(topic, value=f"{prefix}{i}".encode(), partition=partition)
    assert p.flush(30) == 0


def share_consumer(broker, group, topic, explicit=False):
    cfg = {"bootstrap.servers": broker.bootstrap, "group.id": group}
    if explicit:
        cfg["share.acknowledgement.mode"] = "explicit"
    c = ShareConsumer(cfg)
    c.subscribe([topic])
    return c


def records(msgs):
    out = []
    for m in msgs:
        assert m.error() is None, m.error()
        out.append(m)
    return out


def test_consumers_share_a_partition_and_every_record_is_delivered_once():
    broker = start_broker()
    try:
        topic = create_topic(broker)
        group = f"g-{uuid.uuid4().hex[:6]}"
        earliest(broker, group)
        # More than one fetch takes (500 records), so that every consumer gets a share.
        n = 3000
        produce(broker, topic, n)
        consumers = [share_consumer(broker, group, topic, explicit=True) for _ in range(3)]
        seen = {}
        by_consumer = [0, 0, 0]
        deadline = time.monotonic() + WAIT
        while len(seen) < n and time.monotonic() < deadline:
            for i, c in enumerate(consumers):
                batch = records(c.poll(0.2))
                for m in batch:
                    # Held by this consumer only: never delivered to another while locked.
                    assert m.offset() not in seen, f"offset {m.offset()} delivered twice"
                    seen[m.offset()] = i
                    assert m.delivery_count() == 1
                    c.acknowledge(m, AcknowledgeType.ACCEPT)
                    by_consumer[i] += 1
                if batch:
                    c.commit_sync(30)
        assert sorted(seen) == list(range(n)), f"missing {set(range(n)) - set(seen)}"
        assert sum(1 for x in by_consumer if x > 0) >= 2, by_consumer
        # Everything accepted: nothing comes back to anyone.
        end = time.monotonic() + 2
        while time.monotonic() < end:
            for c in consumers:
                assert records(c.poll(0.1)) == []
        for c in consumers:
            c.close()
    finally:
        broker.stop()


def test_release_redelivers_with_a_higher_count_and_reject_archives():
    broker = start_broker()
    try:
        topic = create_topic(broker)
        group = f"g-{uuid.uuid4().hex[:6]}"
        earliest(broker, group)
        produce(broker, topic, 2)
        c = share_consumer(broker, group, topic, explicit=True)
        counts = {0: [], 1: []}
        deadline = time.monotonic() + WAIT
        # Offset 0 is released every time: delivered again with counts 1, 2, 3 and then archived
        # at the limit (3). Offset 1 is rejected at once: never delivered again.
        while time.monotonic() < deadline and len(counts[0]) < 3:
            for m in records(c.poll(0.5)):
                counts[m.offset()].append(m.delivery_count())
                c.acknowledge(m, AcknowledgeType.RELEASE if m.offset() == 0 else AcknowledgeType.REJECT)
            c.commit_sync(30)
        assert counts[0] == [1, 2, 3], counts
        assert counts[1] == [1], counts
        end = time.monotonic() + 2
        while time.monotonic() < end:
            assert records(c.poll(0.2)) == []
        c.close()
    finally:
        broker.stop()


KILLED_CONSUMER = r"""
import sys, time
from confluent_kafka import ShareConsumer
c = ShareConsumer({"bootstrap.servers": sys.argv[1], "group.id": sys.argv[2],
                   "share.acknowledgement.mode": "explicit"})
c.subscribe([sys.argv[3]])
got = 0
while got == 0:
    got = len([m for m in c.poll(0.5) if m.error() is None])
print(got, flush=True)
time.sleep(600)
"""


def test_locks_of_a_killed_consumer_expire_and_its_records_are_redelivered():
    broker = start_broker()
    try:
        topic = create_topic(broker)
        group = f"g-{uuid.uuid4().hex[:6]}"
        earliest(broker, group)
        produce(broker, topic, 10)
        proc = subprocess.Popen([sys.executable, "-c", KILLED_CONSUMER, broker.bootstrap, group, topic],
                                stdout=subprocess.PIPE, text=True)
        try:
            held = int(proc.stdout.readline())
            assert held > 0
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        killed_at = time.monotonic()
        c = share_consumer(broker, group, topic, explicit=True)
        got = {}
        deadline = time.monotonic() + WAIT
        while len(got) < 10 and time.monotonic() < deadline:
            for m in records(c.poll(0.5)):
                got[m.offset()] = m.delivery_count()
                c.acknowledge(m)
            c.commit_sync(30)
        assert sorted(got) == list(range(10))
        # What the killed consumer held came back only after its lock expired, counted twice.
        assert sum(1 for v in got.values() if v == 2) == held, got
        assert time.monotonic() - killed_at >= (LOCK_MS / 1000.0) * 0.5
        c.close()
    finally:
        broker.stop()


def test_acknowledged_state_survives_a_broker_kill():
    broker = start_broker()
    try:
        topic = create_topic(broker)
        group = f"g-{uuid.uuid4().hex[:6]}"
        earliest(broker, group)
        produce(broker, topic, 20)
        c = share_consumer(broker, group, topic, explicit=True)
        accepted = set()
        deadline = time.monotonic() + WAIT
        while len(accepted) < 10 and time.monotonic() < deadline:
            for m in records(c.poll(0.5)):
                if m.offset() < 10:
                    c.acknowledge(m, AcknowledgeType.ACCEPT)
                    accepted.add(m.offset())
                else:
                    c.acknowledge(m, AcknowledgeType.RELEASE)
            c.commit_sync(30)
        assert accepted == set(range(10))
        # kill -9 and restart on the same data directory and port.
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait()
        restarted = restart(broker)
        c2 = share_consumer(restarted, group, topic, explicit=True)
        got = set()
        deadline = time.monotonic() + WAIT
        while len(got) < 10 and time.monotonic() < deadline:
            for m in records(c2.poll(0.5)):
                got.add(m.offset())
                c2.acknowledge(m)
            c2.commit_sync(30)
        # Only the unacknowledged records come back.
        assert got == set(range(10, 20)), got
        c2.close()
    finally:
        broker.stop()


def restart(broker):
    """Starts the broker process again on the same directory and port (after a kill)."""
    import conftest
    args = broker.proc.args
    broker._log.close()
    broker._log = open(broker.log_path, "ab")
    broker.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=broker._log, stderr=broker._log)
    deadline = time.monotonic() + conftest.START_WAIT_S
    while not conftest.answers_api_versions(broker.port):
        assert broker.proc.poll() is None, broker.stderr()
        assert time.monotonic() < deadline, broker.stderr()
        time.sleep(0.05)
    return broker


def test_share_group_cli_lists_describes_and_resets():
    import conftest
    broker = start_broker()
    try:
        topic = create_topic(broker, partitions=2)
        group = f"g-{uuid.uuid4().hex[:6]}"
        earliest(broker, group)
        produce(broker, topic, 5, partition=0)
        produce(broker, topic, 5, partition=1)
        c = share_consumer(broker, group, topic)
        n = 0
        deadline = time.monotonic() + WAIT
        while n < 10 and time.monotonic() < deadline:
            n += len(records(c.poll(0.5)))
        c.commit_sync(30)
        assert n == 10

        def cli(*args):
            out = subprocess.run([conftest.sluice_bin(), "share-group", *args, "--brokers", broker.bootstrap],
                                 capture_output=True, text=True, timeout=60)
            return out

        listed = cli("list")
        assert listed.returncode == 0, listed.stderr
        assert group in listed.stdout and "Stable" in listed.stdout
        described = cli("describe", group)
        assert described.returncode == 0, described.stderr
        assert f"{topic}:[0, 1]" in described.stdout
        # Implicit acknowledgement accepted all five records of each partition: no lag.
        rows = [l.split() for l in described.stdout.splitlines() if l.startswith(topic)]
        assert sorted((int(p), int(o), int(lag)) for _, p, o, lag in rows) == [(0, 5, 0), (1, 5, 0)], \
            described.stdout
        # Offsets of a group with members cannot move.
        busy = cli("reset-offsets", group, "--topic", topic, "--to-earliest")
        assert busy.returncode != 0 and "NON_EMPTY_GROUP" in busy.stderr, busy.stderr
        c.close()
        deadline = time.monotonic() + WAIT
        while "Empty" not in cli("list").stdout:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        reset = cli("reset-offsets", group, "--topic", topic, "--to-offset", "2")
        assert reset.returncode == 0, reset.stderr
        rows = [l.split() for l in cli("describe", group).stdout.splitlines() if l.startswith(topic)]
        # Three records of each partition are to be delivered again.
        assert sorted((int(p), int(o), int(lag)) for _, p, o, lag in rows) == [(0, 2, 3), (1, 2, 3)]
    finally:
        broker.stop()


# ---------------------------------------------------------------------------- delayed delivery

def wall_ms():
    """The test's own clock, epoch ms (the broker is never asked for the time)."""
    return int(time.time() * 1000)


def produce_with_headers(broker, topic, records):
    """records: (value, [(header, value)]) in one batch."""
    p = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 50,
                  "compression.type": "lz4"})
    for value, headers in records:
        p.produce(topic, value=value.encode(), partition=0,
                  headers=[(k, v.encode()) for k, v in headers])
    assert p.flush(30) == 0


def poll_until(c, want, seen=None, on_message=None):
    """Polls until every value in `want` arrived; returns {value: (arrival ms, message)}."""
    seen = {} if seen is None else seen
    deadline = time.monotonic() + WAIT
    while not want <= set(seen) and time.monotonic() < deadline:
        got = records(c.poll(0.2))
        for m in got:
            v = m.value().decode()
            assert v not in seen or on_message is not None, f"{v} delivered twice"
            seen[v] = (wall_ms(), m)
            if on_message:
                on_message(m)
            else:
                c.acknowledge(m, AcknowledgeType.ACCEPT)
        if got:
            c.commit_sync(30)
    assert want <= set(seen), f"waited for {want}, got {sorted(seen)}"
    return seen


def test_delayed_records_arrive_no_earlier_than_due_and_classic_consumers_see_them_at_once():
    broker = start_broker()
    try:
        topic = create_topic(broker)
        group = f"g-{uuid.uuid4().hex[:6]}"
        earliest(broker, group)
        t0 = wall_ms()
        produce_with_headers(broker, topic, [
            ("late", [("sluice.deliver.after.ms", "4000")]),
            ("now", []),
            ("at", [("sluice.deliver.at", str(t0 + 3000))]),
            ("bad", [("sluice.deliver.at", "later")]),
        ])
        # A classic consumer reads all four as written, headers included, before any is due.
        classic = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"c-{group}",
                            "auto.offset.reset": "earliest", "enable.auto.commit": False})
        classic.subscribe([topic])
        read = {}
        deadline = time.monotonic() + WAIT
        while len(read) < 4 and time.monotonic() < deadline:
            m = classic.poll(0.2)
            if m is not None and m.error() is None:
                read[m.value().decode()] = m.headers() or []
        classic.close()
        assert set(read) == {"late", "now", "at", "bad"}
        assert read["at"] == [("sluice.deliver.at", str(t0 + 3000).encode())]
        assert wall_ms() < t0 + 3000, "the classic consumer took longer than the first delay"

        c = share_consumer(broker, group, topic, explicit=True)
        seen = poll_until(c, {"now", "bad"})
        # Neither delayed record came with them: they do not hold the others back.
        assert "late" not in seen and "at" not in seen
        seen = poll_until(c, {"late", "at"}, seen)
        at_ms, _ = seen["at"]
        assert at_ms >= t0 + 3000, f"delivered {t0 + 3000 - at_ms} ms early"
        late_ms, late = seen["late"]
        due = late.timestamp()[1] + 4000
        assert late_ms >= due, f"delivered {due - late_ms} ms early"
        assert late.delivery_count() == 1
        c.close()
    finally:
        broker.stop()


def test_released_records_back_off_and_delays_survive_a_broker_kill():
    broker = start_broker()
    try:
        topic = create_topic(broker)
        group = f"g-{uuid.uuid4().hex[:6]}"
        earliest(broker, group)
        set_group_configs(broker, group, {"share.release.backoff.ms": "2000",
                                          "share.release.backoff.max.ms": "8000"})
        t0 = wall_ms()
        produce_with_headers(broker, topic, [
            ("retry", []),
            ("at", [("sluice.deliver.at", str(t0 + 12000))]),
        ])
        c = share_consumer(broker, group, topic, explicit=True)
        released = []

        def release(m):
            released.append((wall_ms(), m.delivery_count()))
            c.acknowledge(m, AcknowledgeType.RELEASE)

        # Released at count 1: back after 2 s. Released at count 2: the back-off doubles (4 s).
        seen = {}
        while len(released) < 2:
            seen.pop("retry", None)
            seen = poll_until(c, {"retry"}, seen, on_message=release)
            if len(released) == 2:
                back_ms, m = seen["retry"]
                assert m.delivery_count() == 2
                assert back_ms >= released[0][0] + 2000, \
                    f"redelivered {released[0][0] + 2000 - back_ms} ms early"
        assert "at" not in seen
        # This consumer holds nothing now; closed so that it cannot take records after the
        # restart. Then kill -9 (the second release is acknowledged) and restart.
        c.close()
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait()
        restarted = restart(broker)
        c2 = share_consumer(restarted, group, topic, explicit=True)
        after = poll_until(c2, {"retry", "at"})
        retry_ms, m = after["retry"]
        assert m.delivery_count() == 3
        assert retry_ms >= released[1][0] + 4000, \
            f"redelivered {released[1][0] + 4000 - retry_ms} ms early after the restart"
        at_ms, _ = after["at"]
        assert at_ms >= t0 + 12000, f"delivered {t0 + 12000 - at_ms} ms early after the restart"
        c2.close()
    finally:
        broker.stop()


# ---------------------------------------------------------------- dead-letter topics (KIP-1191)

DLQ_HEADERS = ("__dlq.errors.topic", "__dlq.errors.partition", "__dlq.errors.offset",
               "__dlq.errors.group.id", "__dlq.errors.delivery.count", "__dlq.errors.reason")


def set_group_configs(broker, group, configs):
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    res = ConfigResource(ResourceType.GROUP, group, incremental_configs=[
        ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in configs.items()])
    for f in admin.incremental_alter_configs([res]).values():
        f.result(timeout=30)


def group_configs(broker, group):
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    res = ConfigResource(ResourceType.GROUP, group)
    for f in admin.describe_configs([res]).values():
        return {k: v.value for k, v in f.result(timeout=30).items()}


def dead_letters(broker, dlq, want, settle_s=1.0):
    """Every record of topic `dlq` (one partition), read by a classic consumer: waits until
    `want` are there, then keeps reading `settle_s` more to see any extra one."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"dlq-reader-{uuid.uuid4().hex[:6]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                  "topic.metadata.refresh.interval.ms": 500})
    c.assign([TopicPartition(dlq, 0, 0)])
    got = []
    deadline = time.monotonic() + WAIT
    settle = None
    while True:
        m = c.poll(0.2)
        if m is not None and m.error() is None:
            got.append(m)
        if len(got) >= want and settle is None:
            settle = time.monotonic() + settle_s
        if settle is not None and time.monotonic() > settle:
            break
        assert time.monotonic() < deadline, f"{len(got)} of {want} dead-letter records"
    c.close()
    return got


def headers_of(m):
    return {k: (v.decode() if v is not None else None) for k, v in (m.headers() or [])}


def share_start(broker, group, topic):
    """The share partition's start offset (partition 0), from `sluice share-group describe`."""
    import conftest
    out = subprocess.run([conftest.sluice_bin(), "share-group", "describe", group, "--brokers", broker.bootstrap],
                         capture_output=True, text=True, timeout=60)
    for l in out.stdout.splitlines():
        f = l.split()
        if l.startswith(topic) and len(f) >= 3 and f[1] == "0":
            return int(f[2])
    return None


def metric_total(port, name):
    """The sum over shards of counter `name` on the metrics endpoint."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith(name + "{") or l.startswith(name + " "))


def test_rejected_and_exhausted_records_are_dead_lettered_once_with_their_context():
    import conftest
    metrics_port = conftest.free_port()
    broker = start_broker(("--metrics-listen", f"127.0.0.1:{metrics_port}"))
    try:
        topic = create_topic(broker)
        dlq = create_topic(broker)
        group = f"g-{uuid.uuid4().hex[:6]}"
        set_group_configs(broker, group, {"share.auto.offset.reset": "earliest",
                                          "errors.deadletterqueue.topic.name": dlq,
                                          "errors.deadletterqueue.copy.record.enable": "true"})
        cfg = group_configs(broker, group)
        assert cfg["errors.deadletterqueue.topic.name"] == dlq
        assert cfg["errors.deadletterqueue.copy.record.enable"] == "true"
        p = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
        for i in range(3):
            p.produce(topic, key=f"k{i}".encode(), value=f"m{i}".encode(), partition=0,
                      headers=[("app", f"h{i}".encode())])
        assert p.flush(30) == 0
        c = share_consumer(broker, group, topic, explicit=True)
        # 0 is rejected, 1 released until the delivery limit (3), 2 accepted.
        deadline = time.monotonic() + WAIT
        done = set()
        while len(done) < 3 and time.monotonic() < deadline:
            for m in records(c.poll(0.5)):
                if m.offset() == 0:
                    c.acknowledge(m, AcknowledgeType.REJECT)
                    done.add(0)
                elif m.offset() == 1:
                    c.acknowledge(m, AcknowledgeType.RELEASE)
                    if m.delivery_count() == 3:
                        done.add(1)
                else:
                    c.acknowledge(m, AcknowledgeType.ACCEPT)
                    done.add(2)
            c.commit_sync(30)
        assert done == {0, 1, 2}
        got = dead_letters(broker, dlq, 2)
        assert len(got) == 2, [headers_of(m) for m in got]
        by_offset = {int(headers_of(m)["__dlq.errors.offset"]): m for m in got}
        assert sorted(by_offset) == [0, 1]
        for o, reason, count in [(0, "rejected", "1"), (1, "delivery.count.exceeded", "3")]:
            m = by_offset[o]
            h = headers_of(m)
            assert all(k in h for k in DLQ_HEADERS), h
            assert h["__dlq.errors.topic"] == topic
            assert h["__dlq.errors.partition"] == "0"
            assert h["__dlq.errors.group.id"] == group
            assert h["__dlq.errors.reason"] == reason
            assert h["__dlq.errors.delivery.count"] == count
            assert h["app"] == f"h{o}"
            assert m.key() == f"k{o}".encode() and m.value() == f"m{o}".encode()
        # Everything is settled: the share partition's start moved past all three.
        deadline = time.monotonic() + WAIT
        while share_start(broker, group, topic) != 3:
            assert time.monotonic() < deadline, share_start(broker, group, topic)
            time.sleep(0.1)
        assert metric_total(metrics_port, "sluice_share_dead_lettered_records_total") == 2
        assert metric_total(metrics_port, "sluice_share_dead_letter_failures_total") == 0
        c.close()
    finally:
        broker.stop()


def test_dead_letter_topic_is_auto_created_and_records_are_not_copied_by_default():
    broker = start_broker()
    try:
        topic = create_topic(broker)
        dlq = f"dlq.{uuid.uuid4().hex[:8]}"
        group = f"g-{uuid.uuid4().hex[:6]}"
        set_group_configs(broker, group, {"share.auto.offset.reset": "earliest",
                                          "errors.deadletterqueue.topic.name": dlq})
        produce(broker, topic, 1)
        c = share_consumer(broker, group, topic, explicit=True)
        deadline = time.monotonic() + WAIT
        rejected = False
        while not rejected and time.monotonic() < deadline:
            for m in records(c.poll(0.5)):
                c.acknowledge(m, AcknowledgeType.REJECT)
                rejected = True
            c.commit_sync(30)
        assert rejected
        got = dead_letters(broker, dlq, 1)
        assert len(got) == 1
        assert got[0].key() is None and got[0].value() is None
        assert headers_of(got[0])["__dlq.errors.reason"] == "rejected"
        c.close()
    finally:
        broker.stop()


def run_crash_between_steps(point, fetch_after_restart):
    """Five records are rejected; the broker's dead-letter drain stops at `point` (a panic
    point), the broker is killed with SIGKILL and started again: each record is in the
    dead-letter topic exactly once and the share partition settles."""
    import os
    group = f"g-{uuid.uuid4().hex[:6]}"
    os.environ["SLUICE_FAULT_PANIC"] = f"{point}:{group}"
    try:
        broker = start_broker()
    finally:
        del os.environ["SLUICE_FAULT_PANIC"]
    try:
        topic = create_topic(broker)
        dlq = create_topic(broker)
        set_group_configs(broker, group, {"share.auto.offset.reset": "earliest",
                                          "errors.deadletterqueue.topic.name": dlq,
                                          "errors.deadletterqueue.copy.record.enable": "true"})
        produce(broker, topic, 5)
        c = share_consumer(broker, group, topic, explicit=True)
        rejected = set()
        deadline = time.monotonic() + WAIT
        while len(rejected) < 5 and time.monotonic() < deadline:
            for m in records(c.poll(0.5)):
                c.acknowledge(m, AcknowledgeType.REJECT)
                rejected.add(m.offset())
            c.commit_sync(30)
        assert rejected == set(range(5))
        deadline = time.monotonic() + WAIT
        while f"panic point {point} for {group}" not in broker.stderr():
            assert time.monotonic() < deadline, broker.stderr()
            time.sleep(0.05)
        # The drain stopped before recording its work: the records are still pending, and in
        # the dead-letter topic (after the append) or not (before it).
        assert share_start(broker, group, topic) == 0
        before = dead_letters(broker, dlq, 5 if point == "dlq_appended" else 0)
        assert len(before) == (5 if point == "dlq_appended" else 0)
        c.close()
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait()
        restarted = restart(broker)
        # The drain resumes at start, and at the group's next fetch of the partition.
        c2 = share_consumer(restarted, group, topic, explicit=True) if fetch_after_restart else None
        deadline = time.monotonic() + WAIT
        while share_start(restarted, group, topic) != 5:
            assert time.monotonic() < deadline, share_start(restarted, group, topic)
            if c2 is not None:
                assert records(c2.poll(0.2)) == []
            else:
                time.sleep(0.1)
        got = dead_letters(restarted, dlq, 5)
        offsets = sorted(int(headers_of(m)["__dlq.errors.offset"]) for m in got)
        assert offsets == list(range(5)), offsets
        assert sorted(m.value() for m in got) == [f"m{i}".encode() for i in range(5)]
        if c2 is not None:
            c2.close()
    finally:
        broker.stop()


def test_kill_9_before_the_dead_letter_append_loses_nothing():
    # No consumer comes back: the broker resumes the drain at start by itself.
    run_crash_between_steps("dlq_append", fetch_after_restart=False)


def test_kill_9_after_the_dead_letter_append_duplicates_nothing():
    run_crash_between_steps("dlq_appended", fetch_after_restart=True)


def test_a_missing_dead_letter_topic_never_blocks_the_share_partition():
    """Auto-creation off and no such topic: the rejected record stays archived only, counted
    as a dead-letter failure, and the share partition moves on."""
    import conftest
    metrics_port = conftest.free_port()
    broker = start_broker(("--auto-create-topics", "false",
                           "--metrics-listen", f"127.0.0.1:{metrics_port}"))
    try:
        topic = create_topic(broker)
        group = f"g-{uuid.uuid4().hex[:6]}"
        set_group_configs(broker, group, {"share.auto.offset.reset": "earliest",
                                          "errors.deadletterqueue.topic.name": "dlq.nowhere"})
        produce(broker, topic, 2)
        c = share_consumer(broker, group, topic, explicit=True)
        acked = set()
        deadline = time.monotonic() + WAIT
        while len(acked) < 2 and time.monotonic() < deadline:
            for m in records(c.poll(0.5)):
                c.acknowledge(m, AcknowledgeType.REJECT if m.offset() == 0 else AcknowledgeType.ACCEPT)
                acked.add(m.offset())
            c.commit_sync(30)
        assert acked == {0, 1}
        deadline = time.monotonic() + WAIT
        while share_start(broker, group, topic) != 2:
            assert time.monotonic() < deadline, share_start(broker, group, topic)
            time.sleep(0.1)
        assert metric_total(metrics_port, "sluice_share_dead_letter_failures_total") == 1
        assert metric_total(metrics_port, "sluice_share_dead_lettered_records_total") == 0
        c.close()
    finally:
        broker.stop()
