"""The Prometheus endpoint (`--metrics-listen`): scraped with prometheus_client's own text
parser, its values move under load from kafka-python, and hostile HTTP on the metrics port
(garbage, huge headers, slow trickles, floods) is bounded and never disturbs the Kafka side."""

import json
import os
import socket
import threading
import time
import urllib.request

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

from conftest import Broker, free_port

WAIT_S = 30
# The server's whole-exchange deadline for one metrics connection (EXCHANGE_DEADLINE), plus slack.
EXCHANGE_DEADLINE_S = 5
# Metrics connections served at once (CONNECTIONS_MAX).
CONNECTIONS_MAX = 16

FAMILIES = {
    "sluice_shard_busy_seconds": "counter",
    "sluice_shard_busy_ratio": "gauge",
    "sluice_shard_task_queue_delay_seconds": "gauge",
    "sluice_shard_cross_shard_calls_sent": "counter",
    "sluice_connections": "gauge",
    "sluice_received_bytes": "counter",
    "sluice_sent_bytes": "counter",
    "sluice_requests": "counter",
    "sluice_request_errors": "counter",
    "sluice_request_duration_seconds": "histogram",
    "sluice_storage_fsync_duration_seconds": "histogram",
    "sluice_produce_stage_duration_seconds": "histogram",
    "sluice_fetch_stage_duration_seconds": "histogram",
    "sluice_storage_durable_write_duration_seconds": "histogram",
    "sluice_storage_written_bytes": "counter",
    "sluice_storage_segments": "gauge",
    "sluice_storage_segment_bytes": "gauge",
    "sluice_storage_readahead_hits": "counter",
    "sluice_cache_hits": "counter",
    "sluice_cache_misses": "counter",
    "sluice_cache_bytes": "gauge",
    "sluice_partition_log_start_offset": "gauge",
    "sluice_partition_log_end_offset": "gauge",
    "sluice_partition_high_watermark": "gauge",
    "sluice_group_members": "gauge",
    "sluice_group_state": "gauge",
    "sluice_group_committed_offset": "gauge",
    "sluice_group_lag": "gauge",
    "sluice_controller_leader": "gauge",
}


@pytest.fixture
def mbroker():
    port = free_port()
    b = Broker(cores=2 if (os.cpu_count() or 1) >= 2 else 1,
               extra_args=("--metrics-listen", f"127.0.0.1:{port}"))
    b.metrics_port = port
    yield b
    b.stop()


def scrape(b):
    with urllib.request.urlopen(f"http://127.0.0.1:{b.metrics_port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def total(fams, family, sample=None, **labels):
    """Sum of the samples of `family` (sample name `sample`, default the family's own or
    `_total`) whose labels include `labels`."""
    f = fams.get(family)
    if f is None:
        return 0.0
    names = {sample} if sample else {family, family + "_total"}
    return sum(s.value for s in f.samples
               if s.name in names and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_for(b, cond, what):
    """Scrapes until cond(families) holds; returns the families."""
    deadline = time.monotonic() + WAIT_S
    while True:
        fams = scrape(b)
        if cond(fams):
            return fams
        assert time.monotonic() < deadline, f"metrics never showed {what}"
        time.sleep(0.2)


def produce(b, topic, n, partitions=2):
    a = KafkaAdminClient(bootstrap_servers=b.bootstrap, request_timeout_ms=WAIT_S * 1000)
    try:
        from kafka.admin import NewTopic
        a.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        a.close()
    p = KafkaProducer(bootstrap_servers=b.bootstrap, acks="all",
                      request_timeout_ms=WAIT_S * 1000)
    try:
        for i in range(n):
            p.send(topic, key=str(i % 7).encode(), value=b"v" * 200, partition=i % partitions)
        p.flush(WAIT_S)
    finally:
        p.close()


def consume_group(b, topic, group, n):
    c = KafkaConsumer(topic, bootstrap_servers=b.bootstrap, group_id=group,
                      auto_offset_reset="earliest", enable_auto_commit=False,
                      request_timeout_ms=WAIT_S * 1000 + 1000, consumer_timeout_ms=WAIT_S * 1000)
    try:
        got = 0
        deadline = time.monotonic() + WAIT_S
        while got < n:
            assert time.monotonic() < deadline, f"consumed {got} of {n}"
            for recs in c.poll(timeout_ms=500).values():
                got += len(recs)
        c.commit()
        return c
    except BaseException:
        c.close()
        raise


def test_scrape_parses_and_values_move_under_load(mbroker, topic):
    before = scrape(mbroker)
    for name, kind in FAMILIES.items():
        assert name in before, f"family {name} missing"
        assert before[name].type == kind, f"{name} is {before[name].type}, not {kind}"
    # Every shard answered.
    ok = [s.value for s in before["sluice_shard_scrape_ok"].samples]
    assert ok and all(v == 1 for v in ok)
    assert total(before, "sluice_controller_leader") == 1

    n = 500
    produce(mbroker, topic, n)
    group = f"g-{topic}"
    c = consume_group(mbroker, topic, group, n)
    try:
        after = wait_for(
            mbroker,
            lambda f: total(f, "sluice_group_committed_offset", group=group) == n
            and total(f, "sluice_group_members", group=group) == 1,
            "the group's committed offsets and member",
        )
        # Offsets of the topic's partitions add up to what was produced.
        assert total(after, "sluice_partition_log_end_offset", topic=topic) == n
        assert total(after, "sluice_partition_high_watermark", topic=topic) == n
        assert total(after, "sluice_partition_log_start_offset", topic=topic) == 0
        assert total(after, "sluice_group_lag", group=group) == 0
        assert total(after, "sluice_group_state", group=group, state="Stable") == 1
        # Counters moved.
        for fam in ("sluice_received_bytes", "sluice_sent_bytes",
                    "sluice_storage_written_bytes", "sluice_shard_busy_seconds"):
            assert total(after, fam) > total(before, fam), fam
        assert total(after, "sluice_requests", api="Produce") > 0
        assert total(after, "sluice_requests", api="Fetch") > 0
        assert total(after, "sluice_requests", api="JoinGroup") > 0
        assert total(after, "sluice_request_duration_seconds",
                     sample="sluice_request_duration_seconds_count", api="Produce") \
            == total(after, "sluice_requests", api="Produce")
        # Produce stages: queued and respond once per request, the append's stages once per
        # partition of a request (acks=all: every append waited for durability).
        produced = total(after, "sluice_requests", api="Produce")

        def stage_count(stage):
            return total(after, "sluice_produce_stage_duration_seconds",
                         sample="sluice_produce_stage_duration_seconds_count", stage=stage)
        assert stage_count("queued") == produced
        assert stage_count("respond") == produced
        for stage in ("handler", "admit", "durable"):
            assert stage_count(stage) >= produced, stage
        # acks=all flushes are synced: by durable writes or fdatasync.
        synced = (total(after, "sluice_storage_durable_write_duration_seconds",
                        sample="sluice_storage_durable_write_duration_seconds_count")
                  + total(after, "sluice_storage_fsync_duration_seconds",
                          sample="sluice_storage_fsync_duration_seconds_count"))
        assert synced > 0
        assert total(after, "sluice_cache_hits") + total(after, "sluice_cache_misses") > 0
        assert total(after, "sluice_connections") >= 1
        # Histogram buckets are cumulative and end at the count.
        h = after["sluice_request_duration_seconds"]
        buckets = [s for s in h.samples if s.name.endswith("_bucket")
                   and s.labels["api"] == "Produce"]
        by_shard = {}
        for s in buckets:
            by_shard.setdefault(s.labels["shard"], []).append(s.value)
        for values in by_shard.values():
            assert values == sorted(values)
        # Lag follows new records.
        produce_more_lag(mbroker, topic)
        lagged = wait_for(mbroker, lambda f: total(f, "sluice_group_lag", group=group) == 10,
                          "lag after 10 more records")
        assert total(lagged, "sluice_partition_log_end_offset", topic=topic) == n + 10
    finally:
        c.close()


def test_fetch_stages_attribute_a_long_poll_woken_by_new_records(mbroker, topic):
    """A consumer parked in a long poll (10 s max wait) is woken by records produced one at a
    time: the fetch stages count the wake-ups and their re-reads, and every fetch's respond."""
    produce(mbroker, topic, 1, partitions=1)
    from kafka import TopicPartition
    c = KafkaConsumer(bootstrap_servers=mbroker.bootstrap, fetch_max_wait_ms=10_000,
                      fetch_min_bytes=1, enable_auto_commit=False,
                      request_timeout_ms=WAIT_S * 1000 + 11_000)
    stop = threading.Event()

    def trickle():
        p = KafkaProducer(bootstrap_servers=mbroker.bootstrap, acks="all",
                          request_timeout_ms=WAIT_S * 1000)
        try:
            while not stop.wait(0.2):
                p.send(topic, value=b"late", partition=0).get(WAIT_S)
        finally:
            p.close()

    t = threading.Thread(target=trickle, daemon=True)
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        c.seek(tp, 1)
        t.start()
        got = 0
        deadline = time.monotonic() + WAIT_S
        while got < 5:
            assert time.monotonic() < deadline, f"consumed {got} of 5 trickled records"
            for recs in c.poll(timeout_ms=500).values():
                got += len(recs)
    finally:
        stop.set()
        t.join(WAIT_S)
        c.close()

    def stage_count(f, stage):
        return total(f, "sluice_fetch_stage_duration_seconds",
                     sample="sluice_fetch_stage_duration_seconds_count", stage=stage)
    fams = wait_for(
        mbroker,
        lambda f: stage_count(f, "respond") == total(f, "sluice_requests", api="Fetch"),
        "a respond stage for every fetch",
    )
    woken = stage_count(fams, "woken")
    assert woken >= 1, "no long poll was woken by the trickled records"
    assert stage_count(fams, "read") == woken
    # A wake-up is measured from the append to the re-read: never longer than the poll.
    assert total(fams, "sluice_fetch_stage_duration_seconds",
                 sample="sluice_fetch_stage_duration_seconds_sum", stage="woken") < 10 * woken


def produce_more_lag(b, topic):
    p = KafkaProducer(bootstrap_servers=b.bootstrap, acks="all",
                      request_timeout_ms=WAIT_S * 1000)
    try:
        for i in range(10):
            p.send(topic, value=b"x", partition=0)
        p.flush(WAIT_S)
    finally:
        p.close()


def http_exchange(port, payload, read_s=EXCHANGE_DEADLINE_S + 5):
    """Sends payload, returns what the server answered before closing (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_s) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close on a huge request before taking it all
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except ConnectionResetError:
            pass
        return out


def kafka_round_trip(b, topic, n=20):
    p = KafkaProducer(bootstrap_servers=b.bootstrap, acks="all",
                      request_timeout_ms=WAIT_S * 1000)
    try:
        for i in range(n):
            p.send(topic, value=f"r{i}".encode(), partition=0)
        p.flush(WAIT_S)
    finally:
        p.close()
    fams = scrape(b)
    return total(fams, "sluice_partition_high_watermark", topic=topic)


def test_hostile_http_on_the_metrics_port_stays_contained(mbroker, topic):
    port = mbroker.metrics_port
    # Slow trickle: a request head that never completes holds one slot until the deadline,
    # then is closed; meanwhile scrapes and Kafka are served.
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"GET /met")
    stop = threading.Event()

    def trickle():
        for _ in range(EXCHANGE_DEADLINE_S * 4):
            if stop.wait(0.5):
                return
            try:
                slow.sendall(b"r")
            except OSError:
                return
    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    started = time.monotonic()
    try:
        assert total(scrape(mbroker), "sluice_shard_scrape_ok") >= 1
        assert kafka_round_trip(mbroker, topic) == 20

        # Garbage, a huge header, a wrong method, a wrong path: each gets its own error.
        assert http_exchange(port, b"\x00\xff\xfe garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
        huge = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
        assert http_exchange(port, huge).startswith(b"HTTP/1.1 431")
        assert http_exchange(port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
        assert http_exchange(port, b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")

        # The trickling connection is cut off at the deadline, however slowly it sends.
        slow.settimeout(EXCHANGE_DEADLINE_S + 10)
        closed = b""
        try:
            closed = slow.recv(1024)
        except ConnectionResetError:
            pass
        assert closed == b""
        assert time.monotonic() - started < EXCHANGE_DEADLINE_S + 8
    finally:
        stop.set()
        slow.close()

    # A flood of idle connections: past the cap they are closed at once; Kafka does not notice,
    # and once the flood goes away scrapes are served again.
    flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(CONNECTIONS_MAX * 3)]
    try:
        extra = flood[-1]
        extra.settimeout(WAIT_S)
        assert extra.recv(1) == b""  # closed by the server: over the cap
        assert kafka_round_trip_no_scrape(mbroker, topic) == 40
    finally:
        for s in flood:
            s.close()
    fams = wait_for(mbroker, lambda f: True, "a scrape after the flood")
    assert total(fams, "sluice_partition_high_watermark", topic=topic) == 40
    assert mbroker.proc.poll() is None


def kafka_round_trip_no_scrape(b, topic, n=20):
    p = KafkaProducer(bootstrap_servers=b.bootstrap, acks="all",
                      request_timeout_ms=WAIT_S * 1000)
    try:
        futures = [p.send(topic, value=f"f{i}".encode(), partition=0) for i in range(n)]
        p.flush(WAIT_S)
        return futures[-1].get(WAIT_S).offset + 1
    finally:
        p.close()


def test_json_logs(topic):
    b = Broker(cores=1, extra_args=("--log-format", "json"))
    try:
        produce(b, topic, 5, partitions=1)
        log = b.stderr()
    finally:
        b.stop()
    lines = [l for l in log.splitlines() if l.strip()]
    assert lines
    events = [json.loads(l) for l in lines]  # every line is one JSON object
    started = [e for e in events if e["fields"].get("message") == "sluice started"]
    assert started and started[0]["level"] == "INFO"
    assert started[0]["fields"]["metrics"] == "off"
    assert any(e["fields"].get("message") == "topic created"
               and e["fields"].get("topic") == topic for e in events)
