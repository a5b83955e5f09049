#!/usr/bin/env python3
"""Fetch sessions (KIP-227): what they save a consumer of many mostly idle partitions.

Starts a broker, creates one topic of --partitions partitions, and drives one consumer that
fetches all of them --fetches times with Fetch v12 (max_wait_ms 0, so every fetch is answered at
once and the broker's work per fetch is what is measured), once sessionless (session id 0,
epoch -1: every request names every partition and every response answers for all of them) and
once through a session (a full fetch, then incremental fetches that name only partitions whose
offset moved). Every --produce-every fetches one record goes to the next partition in turn, and
the consumer advances that partition's offset once a response returned the record, so a few
partitions are live and the rest idle. Prints request and response bytes per fetch and the
broker's CPU time (utime + stime of the broker process) per 1,000 fetches, for each mode.

Needs kafka-python (for the producer) and a built broker:
    perf/fetch_sessions.py --sluice target/release/sluice --partitions 1000 --fetches 3000
"""

import argparse
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

CLK_TCK = os.sysconf("SC_CLK_TCK")


def uvarint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def compact_str(s):
    b = s.encode()
    return uvarint(len(b) + 1) + b


def fetch_v12(corr, session_id, epoch, topic, parts):
    """A Fetch v12 request frame naming `parts` [(partition, offset)] of `topic`."""
    head = struct.pack(">hhih", 1, 12, corr, 5) + b"perf1" + b"\x00"
    body = struct.pack(">iiiibii", -1, 0, 0, 16 << 20, 0, session_id, epoch)
    if parts:
        body += uvarint(2) + compact_str(topic) + uvarint(len(parts) + 1)
        for p, off in parts:
            body += struct.pack(">iiqiqi", p, -1, off, -1, -1, 1 << 20) + b"\x00"
        body += b"\x00"
    else:
        body += uvarint(1)
    body += uvarint(1) + uvarint(1) + b"\x00"  # no forgotten topics, rack "", no tags
    payload = head + body
    return struct.pack(">i", len(payload)) + payload


def read_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise RuntimeError("broker closed the connection")
        buf += chunk
    return bytes(buf)


def call(s, frame):
    s.sendall(frame)
    (n,) = struct.unpack(">i", read_exact(s, 4))
    resp = read_exact(s, n)
    # correlation id, header tags (one byte 0), throttle, error, session id
    _, _, _, err, sid = struct.unpack(">iBihi", resp[:15])
    return 4 + n, err, sid, resp


def broker_cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run(mode, addr, pid, topic, partitions, fetches, produce_every, producer, produced):
    """One run; `produced` (each partition's log end) carries over from run to run, and the
    consumer starts at the log end, so every run sees only its own records."""
    offsets = list(produced)
    changed = set()
    next_p = 0
    s = socket.create_connection(addr)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sid, epoch = 0, -1
    if mode == "session":
        _, err, sid, _ = call(s, fetch_v12(0, 0, 0, topic, list(enumerate(offsets))))
        assert err == 0 and sid > 0, f"no session: error {err}, id {sid}"
        epoch = 1
    req_bytes = resp_bytes = 0
    cpu0, t0 = broker_cpu_s(pid), time.monotonic()
    for i in range(fetches):
        if produce_every and i % produce_every == 0:
            producer.send(topic, b"x" * 100, partition=next_p).get(timeout=30)
            produced[next_p] += 1
            next_p = (next_p + 1) % partitions
        if mode == "session":
            parts = [(p, offsets[p]) for p in sorted(changed)]
            frame = fetch_v12(i + 1, sid, epoch, topic, parts)
            epoch += 1
        else:
            frame = fetch_v12(i + 1, 0, -1, topic, list(enumerate(offsets)))
        changed.clear()
        n, err, got_sid, _ = call(s, frame)
        assert err == 0, f"fetch error {err}"
        assert got_sid == sid
        req_bytes += len(frame)
        resp_bytes += n
        # The consumer took what was produced so far (max_bytes covers it): advance.
        for p in range(partitions):
            if offsets[p] != produced[p]:
                offsets[p] = produced[p]
                changed.add(p)
    wall = time.monotonic() - t0
    cpu = broker_cpu_s(pid) - cpu0
    s.close()
    return {
        "mode": mode,
        "req_b": req_bytes / fetches,
        "resp_b": resp_bytes / fetches,
        "cpu_ms_per_1k": cpu * 1e6 / fetches,
        "fetches_per_s": fetches / wall,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sluice", default="target/release/sluice")
    ap.add_argument("--partitions", type=int, default=1000)
    ap.add_argument("--fetches", type=int, default=3000)
    ap.add_argument("--produce-every", type=int, default=10)
    ap.add_argument("--cores", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--broker-cpu", type=int, default=0,
                    help="pin the broker to this CPU, and this client to the next (-1: no pinning)")
    a = ap.parse_args()
    pin = []
    if a.broker_cpu >= 0 and shutil.which("taskset"):
        pin = ["taskset", "-c", str(a.broker_cpu)]
        os.sched_setaffinity(0, {(a.broker_cpu + 1) % os.cpu_count()})

    d = tempfile.mkdtemp(prefix="sluice-perf-sessions-")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    addr = ("127.0.0.1", port)
    log = open(os.path.join(d, "broker.log"), "wb")
    broker = subprocess.Popen(
        pin + [a.sluice, "start", "--data-dir", os.path.join(d, "data"), "--listen",
         f"127.0.0.1:{port}", "--cores", str(a.cores), "--segment-bytes", str(8 << 20)],
        stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(addr, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or broker.poll() is not None:
                    raise RuntimeError("broker did not start")
                time.sleep(0.05)
        bootstrap = f"127.0.0.1:{port}"
        topic = "perf-sessions"
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics([NewTopic(topic, a.partitions, 1)])
        admin.close()
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
        print(f"{a.partitions} partitions, {a.fetches} fetches per run, one record every "
              f"{a.produce_every} fetches, broker --cores {a.cores}")
        print("mode        request B/fetch  response B/fetch  broker CPU ms/1k fetches  fetches/s")
        produced = [0] * a.partitions
        for _ in range(a.rounds):
            for mode in ("sessionless", "session"):
                r = run(mode, addr, broker.pid, topic, a.partitions, a.fetches,
                        a.produce_every, producer, produced)
                print(f"{r['mode']:<11} {r['req_b']:>15,.0f}  {r['resp_b']:>16,.0f}  "
                      f"{r['cpu_ms_per_1k']:>24,.0f}  {r['fetches_per_s']:>9,.0f}")
        producer.close()
    finally:
        broker.terminate()
        try:
            broker.wait(120)  # closing 1,000 partition logs syncs each one
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()
        log.close()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
