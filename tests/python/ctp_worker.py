"""A consume-transform-produce worker for tests/python/test_ctp_kill.py, run as its own process.

    python3 ctp_worker.py BOOTSTRAP INPUT OUTPUT GROUP TRANSACTIONAL_ID

Reads INPUT in GROUP (read_committed, a static member, so that a worker started after one was
killed takes its place at once) and, for each batch, in one transaction: produces "out-<value>"
to OUTPUT and sends the consumer's positions to the transaction (KIP-447 group metadata), then
commits. Every worker uses the same transactional id: InitProducerId fences the one before it
and aborts its open transaction.

It reports each step on stdout, one line each, flushed: "ready", "begin", "produce",
"offsets", and "commit N" with N the sum of the committed positions (records consumed and
committed so far). On any error it prints "error ..." and exits with status 2: the test then
starts a fresh worker, as for one it killed.
"""

import sys

from confluent_kafka import Consumer, KafkaException, Producer

# Records per transaction at most, and how long a poll waits for them.
BATCH = 10
POLL_S = 0.5
# Bound on each transactional call: a worker that cannot finish one exits.
TXN_CALL_S = 20
# When every broker is down (the test kills its only broker), librdkafka 2.16 "rebootstraps": it
# drops the brokers it knew and starts again from bootstrap.servers. A transactional producer
# caught in send_offsets_to_transaction then waits on the decommissioned group coordinator, well
# past the call's timeout (a client bug: librdkafka issue 5511). The broker is back at the same
# address, so the worker keeps its brokers.
NO_REBOOTSTRAP = {"metadata.recovery.strategy": "none"}


def emit(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main():
    bootstrap, src, dst, group, tid = sys.argv[1:6]
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": group, "group.instance.id": f"{group}-w",
        "isolation.level": "read_committed", "enable.auto.commit": False,
        "auto.offset.reset": "earliest", "session.timeout.ms": 10000, **NO_REBOOTSTRAP,
    })
    producer = Producer({
        "bootstrap.servers": bootstrap, "transactional.id": tid, "linger.ms": 2,
        "transaction.timeout.ms": 10000, **NO_REBOOTSTRAP,
    })
    producer.init_transactions(TXN_CALL_S)
    consumer.subscribe([src])
    emit("ready")
    while True:
        msgs = [m for m in consumer.consume(BATCH, POLL_S) if not m.error()]
        if not msgs:
            continue
        producer.begin_transaction()
        emit("begin")
        for m in msgs:
            producer.produce(dst, b"out-" + m.value(), partition=0)
            emit("produce")
        positions = consumer.position(consumer.assignment())
        producer.send_offsets_to_transaction(positions, consumer.consumer_group_metadata(),
                                             TXN_CALL_S)
        emit("offsets")
        producer.commit_transaction(TXN_CALL_S)
        emit(f"commit {sum(max(tp.offset, 0) for tp in positions)}")


if __name__ == "__main__":
    try:
        main()
    except KafkaException as e:
        emit(f"error {e}")
        sys.exit(2)
