"""Kafka transactions with aiokafka (asyncio, its own protocol code: neither librdkafka nor
kafka-python) against a real broker: commit and abort as read_committed and read_uncommitted
consumers see them, offsets sent to a transaction and a new consumer resuming from them, and a
producer fenced by a second one with its transactional id."""

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import ProducerFenced

from conftest import sluice_bin
from test_transactions import create_topic

# Bound on each test's client work: every wait below polls a condition until this deadline.
WAIT_S = 60.0


def run(coro):
    asyncio.run(asyncio.wait_for(coro, WAIT_S))


async def eventually(what, cond, wait_s=30.0):
    """Polls the coroutine function `cond` until it returns a truthy value, for up to `wait_s`."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while not await cond():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def txn_producer(bootstrap, tid):
    """A started transactional producer (start() runs InitProducerId with the id)."""
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=tid,
                         enable_idempotence=True)
    await p.start()
    return p


async def read_to_end(bootstrap, topic, isolation, partition=0):
    """Values of `partition` from its start to the end a consumer of `isolation` sees (the last
    stable offset under read_committed, the high watermark otherwise)."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level=isolation,
                         enable_auto_commit=False, auto_offset_reset="earliest")
    await c.start()
    try:
        tp = TopicPartition(topic, partition)
        c.assign([tp])
        await c.seek_to_beginning(tp)
        end = (await c.end_offsets([tp]))[tp]
        values = []
        while await c.position(tp) < end:
            for records in (await c.getmany(tp, timeout_ms=200)).values():
                values.extend(r.value.decode() for r in records)
        return values, end
    finally:
        await c.stop()


async def read_settled(bootstrap, topic, isolation, end):
    """`read_to_end` once the end `isolation` sees has reached `end`. EndTxn is answered once the
    transaction's outcome is durable at its coordinator; the markers follow it into the
    partitions (as in Kafka), so right after a commit the last stable offset can still stand
    before the marker."""
    seen = None

    async def reached():
        nonlocal seen
        seen = await read_to_end(bootstrap, topic, isolation)
        return seen[1] >= end

    await eventually(f"{isolation} end offset {end}", reached)
    return seen


def test_aiokafka_commit_and_abort_as_both_isolation_levels_see_them(broker):
    topic = create_topic(broker.bootstrap)

    async def body():
        p = await txn_producer(broker.bootstrap, f"aio-{uuid.uuid4().hex[:8]}")
        try:
            async with p.transaction():
                for i in range(3):
                    await p.send(topic, f"c1-{i}".encode(), partition=0)
            await p.begin_transaction()
            for i in range(2):
                # Waited for: the aborted records are in the partition before the abort.
                await p.send_and_wait(topic, f"ab-{i}".encode(), partition=0)
            await p.abort_transaction()
            async with p.transaction():
                for i in range(2):
                    await p.send(topic, f"c2-{i}".encode(), partition=0)

            committed = ["c1-0", "c1-1", "c1-2", "c2-0", "c2-1"]
            # 3 records + COMMIT, 2 + ABORT, 2 + COMMIT.
            got, end = await read_settled(broker.bootstrap, topic, "read_committed", 10)
            assert got == committed
            assert end == 10
            got, _ = await read_to_end(broker.bootstrap, topic, "read_uncommitted")
            assert got == ["c1-0", "c1-1", "c1-2", "ab-0", "ab-1", "c2-0", "c2-1"]

            # An open transaction holds read_committed consumers at its first record.
            await p.begin_transaction()
            await p.send_and_wait(topic, b"open", partition=0)
            got, end = await read_to_end(broker.bootstrap, topic, "read_committed")
            assert (got, end) == (committed, 10)
            _, hw = await read_to_end(broker.bootstrap, topic, "read_uncommitted")
            assert hw == 11
            await p.commit_transaction()
            got, end = await read_settled(broker.bootstrap, topic, "read_committed", 12)
            assert (got, end) == (committed + ["open"], 12)
        finally:
            await p.stop()

    run(body())


def test_aiokafka_offsets_sent_to_the_transaction_resume_a_new_consumer(broker):
    src = create_topic(broker.bootstrap)
    dst = create_topic(broker.bootstrap)
    group = f"aio-g-{uuid.uuid4().hex[:8]}"
    tid = f"aio-ctp-{uuid.uuid4().hex[:8]}"
    tp = TopicPartition(src, 0)

    async def consumer():
        c = AIOKafkaConsumer(src, bootstrap_servers=broker.bootstrap, group_id=group,
                             isolation_level="read_committed", enable_auto_commit=False,
                             auto_offset_reset="earliest")
        await c.start()
        return c

    async def step(c, p, n):
        """Reads `n` records and sends them transformed, in an open transaction that carries
        the consumer's position."""
        got = []
        await p.begin_transaction()
        while len(got) < n:
            for records in (await c.getmany(timeout_ms=200, max_records=n - len(got))).values():
                for r in records:
                    got.append(r.value.decode())
                    await p.send(dst, f"out-{got[-1]}".encode(), partition=0)
        await p.send_offsets_to_transaction({tp: await c.position(tp)}, group)
        return got

    async def committed_is(c, offset):
        return await c.committed(tp) == offset

    async def transaction_state_is(state):
        out = await asyncio.create_subprocess_exec(
            sluice_bin(), "txn", "describe", tid, "--brokers", broker.bootstrap,
            stdout=asyncio.subprocess.PIPE)
        return state in (await out.communicate())[0].decode()

    async def body():
        feeder = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        await feeder.start()
        try:
            for i in range(8):
                await feeder.send(src, str(i).encode(), partition=0)
            await feeder.flush()
        finally:
            await feeder.stop()

        p = await txn_producer(broker.bootstrap, tid)
        try:
            c = await consumer()
            assert await step(c, p, 3) == ["0", "1", "2"]
            await p.commit_transaction()
            # EndTxn is answered once PrepareCommit is durable; the offsets become the group's
            # when the COMMIT marker reaches its offsets partition, just after.
            await eventually("the offset commit", lambda: committed_is(c, 3))
            # Offsets sent to an aborted transaction are dropped with its records.
            assert await step(c, p, 2) == ["3", "4"]
            await p.abort_transaction()
            await eventually("the abort to complete", lambda: transaction_state_is("CompleteAbort"))
            assert await c.committed(tp) == 3
            await c.stop()

            # A new member of the group starts from the committed offset.
            c = await consumer()
            assert await step(c, p, 5) == ["3", "4", "5", "6", "7"]
            await p.commit_transaction()
            await eventually("the offset commit", lambda: committed_is(c, 8))
            await c.stop()
        finally:
            await p.stop()
        # The commit's markers follow its answer into the partition (see `read_settled`).
        want = [f"out-{i}" for i in range(8)]

        async def all_out():
            return (await read_to_end(broker.bootstrap, dst, "read_committed"))[0] == want

        await eventually("the committed outputs under read_committed", all_out)

    run(body())


def test_aiokafka_a_zombie_producer_is_fenced(broker):
    topic = create_topic(broker.bootstrap)
    tid = f"aio-z-{uuid.uuid4().hex[:8]}"

    async def body():
        zombie = await txn_producer(broker.bootstrap, tid)
        fresh = None
        try:
            await zombie.begin_transaction()
            await zombie.send_and_wait(topic, b"zombie", partition=0)
            # The same id again: the zombie's open transaction is aborted, its epoch fenced.
            fresh = await txn_producer(broker.bootstrap, tid)
            async with fresh.transaction():
                await fresh.send(topic, b"fresh", partition=0)
            with pytest.raises(ProducerFenced):
                await zombie.send_and_wait(topic, b"zombie-2", partition=0)
                await zombie.commit_transaction()
        finally:
            if fresh is not None:
                await fresh.stop()
            # A fenced producer's sender has stopped with the error; stop() re-raises it.
            try:
                await zombie.stop()
            except ProducerFenced:
                pass
        # The commit's markers follow its answer into the partition (see `read_settled`).
        async def only_fresh():
            got, _ = await read_to_end(broker.bootstrap, topic, "read_committed")
            assert got in ([], ["fresh"]), got
            return got == ["fresh"]

        await eventually("the fresh producer's commit under read_committed", only_fresh)
        got, _ = await read_to_end(broker.bootstrap, topic, "read_uncommitted")
        assert got == ["zombie", "fresh"]

    run(body())
