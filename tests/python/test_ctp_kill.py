"""Exactly-once through crashes: a consume-transform-produce worker (tests/python/ctp_worker.py,
confluent-kafka, its own process) killed with SIGKILL at random points, and the broker killed
with SIGKILL and restarted once mid-run. Each time a fresh worker resumes from the offsets the
last committed transaction carried; at the end a read_committed consumer of the output sees
every input record exactly once.

The kill points are drawn from a seeded RNG (the seed is printed; pytest shows it when the test
fails) as a count of the worker's reported steps (begin, each produce, offsets, commit), so a
kill lands inside a transaction, between sending the offsets and committing, or between
transactions. Environment:

    SLUICE_CTP_SEED     the seed (default: random)
    SLUICE_CTP_ROUNDS   workers killed (default 6; the broker is killed during one of them)
    SLUICE_CTP_RECORDS  input records (default 300; more rounds want more records)
    SLUICE_CTP_TIME_S   bound on the whole run (default 150)
"""

import collections
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from test_transactions import RestartableBroker, create_topic

HERE = os.path.dirname(os.path.abspath(__file__))
# How long one worker may go without reporting a step before the test gives up on it: longer
# than the worker's own bound on a transactional call (ctp_worker.TXN_CALL_S) plus its start.
STEP_WAIT_S = 45
# A kill point is drawn among this many reported steps of a worker (a few transactions of
# ctp_worker.BATCH records).
KILL_SPAN = 40


class Worker:
    """A ctp_worker.py process and the steps it reports, read by a thread into a queue."""

    def __init__(self, args, log):
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "ctp_worker.py"), *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=log, text=True)
        self.lines = queue.Queue()
        self.last = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def next_step(self, deadline):
        """The next step reported, or None when the worker exited (or stopped reporting)."""
        try:
            line = self.lines.get(timeout=max(0.0, min(STEP_WAIT_S, deadline - time.monotonic())))
        except queue.Empty:
            return None
        if line is not None:
            self.last = (self.last + [line])[-5:]
        return line

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def committed(line):
    return int(line.split()[1]) if line and line.startswith("commit ") else None


def read_committed_output(bootstrap, topic):
    """Every value of `topic` partition 0 a read_committed consumer sees up to its end (the last
    stable offset)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{uuid.uuid4().hex[:8]}",
                  "isolation.level": "read_committed", "enable.auto.commit": False,
                  "enable.partition.eof": True})
    c.assign([TopicPartition(topic, 0, 0)])
    values = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    return values
                raise KafkaException(m.error())
            values.append(m.value().decode())
    finally:
        c.close()
    raise AssertionError(f"read {len(values)} outputs and no end before the deadline")


def test_consume_transform_produce_killed_at_random_is_exactly_once():
    seed = int(os.environ.get("SLUICE_CTP_SEED") or random.randrange(1 << 32))
    rounds = int(os.environ.get("SLUICE_CTP_ROUNDS", "6"))
    records = int(os.environ.get("SLUICE_CTP_RECORDS", "300"))
    deadline = time.monotonic() + float(os.environ.get("SLUICE_CTP_TIME_S", "150"))
    print(f"consume-transform-produce kill test: SLUICE_CTP_SEED={seed} rounds={rounds} "
          f"records={records}", flush=True)
    rng = random.Random(seed)
    broker_round = rng.randrange(rounds)

    b = RestartableBroker()
    log = open(os.path.join(b.dir, "workers.log"), "a")
    worker = None
    try:
        src = create_topic(b.bootstrap, partitions=2)
        dst = create_topic(b.bootstrap, partitions=1)
        feeder = Producer({"bootstrap.servers": b.bootstrap, "acks": "all"})
        for i in range(records):
            feeder.produce(src, str(i).encode(), partition=i % 2)
        assert feeder.flush(30) == 0
        group = f"ctp-{uuid.uuid4().hex[:8]}"
        args = [b.bootstrap, src, dst, group, f"ctp-{uuid.uuid4().hex[:8]}"]

        done = 0  # records the last commit reported consumed
        history = []
        workers = 0
        t0 = time.monotonic()

        def note(what):
            history.append(f"{time.monotonic() - t0:.1f}s worker {workers}: {what}")

        broker_killed = False
        while done < records:
            assert time.monotonic() < deadline, \
                f"seed {seed}: {done} of {records} after {workers} workers: {history}"
            killing = workers < rounds
            # In the broker's round the broker dies first, the worker a few steps later.
            broker_at = rng.randrange(1, KILL_SPAN) if workers == broker_round else None
            kill_at = rng.randrange(1, KILL_SPAN) + (broker_at or 0) if killing else None
            workers += 1
            worker = Worker(args, log)
            steps = 0
            restart_done = None
            while True:
                line = worker.next_step(deadline)
                if line is None:
                    # An exit (the worker's own error) or a stall: either way a fresh worker
                    # takes over, as after a kill.
                    how = "stalled" if worker.proc.poll() is None else "exited"
                    note(f"{how} after {steps} steps {worker.last}")
                    break
                if line == "ready":
                    continue
                steps += 1
                done = committed(line) or done
                if done >= records:
                    break
                if steps == broker_at and not broker_killed:
                    b.kill9()
                    b.start()
                    broker_killed = True
                    restart_done = done
                    note(f"broker killed at step {steps}")
                # After the broker's restart the worker is killed only once it committed again.
                if kill_at is not None and steps >= kill_at and \
                        (broker_at is None or done > restart_done):
                    note(f"killed at step {steps} ({line}), {done} committed")
                    break
            worker.kill()
        note("done")
        print("\n".join(history), flush=True)
        assert done == records
        assert workers > rounds and broker_killed, \
            f"seed {seed}: finished before every kill: {history}"

        # The group's committed offsets are the ends of the input.
        c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": group})
        try:
            offsets = c.committed([TopicPartition(src, 0), TopicPartition(src, 1)], timeout=30)
        finally:
            c.close()
        assert sorted(tp.offset for tp in offsets) == [records // 2, records - records // 2]

        out = read_committed_output(b.bootstrap, dst)
        dups = sorted(v for v, n in collections.Counter(out).items() if n > 1)
        missing = sorted(set(f"out-{i}" for i in range(records)) - set(out))
        assert not dups and not missing and len(out) == records, \
            f"seed {seed}: duplicates {dups[:10]}, missing {missing[:10]}; {history}"
    finally:
        if worker is not None:
            worker.kill()
        log.close()
        b.stop()
